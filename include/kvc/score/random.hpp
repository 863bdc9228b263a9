// kvc/score/random.hpp: the random-eviction baseline. Each token's score is a hash of
// (seed, layer, kv_head, position), uniform in [0, 1): the same token always gets the
// same score for a given seed, whatever else the stream holds or in which order
// streams are scored.
#pragma once

#include <cstdint>

#include "kvc/detail/hash.hpp"
#include "kvc/score/scorer.hpp"

KVC_NAMESPACE_BEGIN
namespace score {

struct random {
  static constexpr const char* name = "random";
  static constexpr stream_fields fields = stream_fields::none;
  std::uint64_t seed = 0;

  status score(const stream_data& s, workspace& /*ws*/, float* out) const noexcept {
    const std::uint64_t base =
        kvc::detail::mix64(seed ^ kvc::detail::mix64((static_cast<std::uint64_t>(s.info.layer) << 32) |
                                                     static_cast<std::uint32_t>(s.info.kv_head)));
    for (int i = 0; i < s.size(); ++i) {
      const std::uint64_t h = kvc::detail::mix64(base ^ static_cast<std::uint32_t>(s.positions[i]));
      out[i] = static_cast<float>(h >> 40) * (1.0f / 16777216.0f);  // 24 bits -> [0, 1)
    }
    return ok_status();
  }
};

}  // namespace score
KVC_NAMESPACE_END
