// kvc/score/knorm.hpp: K-norm (Devoto et al., "A Simple and Effective L2 Norm-Based
// Strategy for KV Cache Compression", EMNLP 2024, Sec. 4): keys with a LOW L2 norm
// attract high attention, so score_i = -||k_i||_2 and the highest-norm keys go first.
#pragma once

#include <cmath>

#include "kvc/detail/attention.hpp"
#include "kvc/score/scorer.hpp"

KVC_NAMESPACE_BEGIN
namespace score {

struct knorm {
  static constexpr const char* name = "knorm";
  static constexpr stream_fields fields = stream_fields::keys;

  status score(const stream_data& s, workspace& /*ws*/, float* out) const noexcept {
    const int n = s.size(), d = s.head_dim();
    for (int i = 0; i < n; ++i) {
      const float* k = s.keys + static_cast<std::size_t>(i) * d;
      out[i] = -std::sqrt(kvc::detail::dot(k, k, d));
    }
    return ok_status();
  }
};

}  // namespace score
KVC_NAMESPACE_END
