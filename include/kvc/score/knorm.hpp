// kvc/score/knorm.hpp: K-norm (Devoto et al., "A Simple and Effective L2 Norm-Based
// Strategy for KV Cache Compression", EMNLP 2024, Sec. 4): keys with a LOW L2 norm
// attract high attention, so score_i = -||k_i||_2 and the highest-norm keys go first.
//
// It reads only the key norms (stream_fields::key_norms): with
// cache_config::observe.key_norms the cache keeps them from append on and compress()
// loads no keys at all; without it compress() computes them from the stored keys.
#pragma once

#include "kvc/score/scorer.hpp"

KVC_NAMESPACE_BEGIN
namespace score {

struct knorm {
  static constexpr const char* name = "knorm";
  static constexpr stream_fields fields = stream_fields::key_norms;

  status score(const stream_data& s, workspace& /*ws*/, float* out) const noexcept {
    const int n = s.size();
    if (n > 0 && s.key_norms == nullptr)
      return status::error(status_code::invalid_argument, "knorm: the stream has no key norms loaded");
    for (int i = 0; i < n; ++i) out[i] = -s.key_norms[i];
    return ok_status();
  }
};

}  // namespace score
KVC_NAMESPACE_END
