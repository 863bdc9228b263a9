// kvc/score/oracle.hpp: the oracle scorer, the upper bound evaluations compare against.
// Given the queries that will actually come (per layer), a token's score is the
// attention it receives from them:
//   a_{r,i} = softmax_i(q_r . k_i / sqrt(d) + log_weight_i) over tokens with
//             position_i <= position_r,
// averaged (or maxed, group_reduce::max) over every future query and every query head
// of the KV head's group. Tokens no query can see score 0.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "kvc/detail/attention.hpp"
#include "kvc/score/scorer.hpp"
#include "kvc/tensor.hpp"

KVC_NAMESPACE_BEGIN
namespace score {

// One layer's future queries: q [n_queries][num_q_heads][head_dim], positions [n_queries].
struct future_queries {
  const float* q = nullptr;
  const std::int32_t* positions = nullptr;
  int n_queries = 0;
};

struct oracle {
  static constexpr const char* name = "oracle";
  static constexpr stream_fields fields = stream_fields::keys;
  span<const future_queries> layers;  // [num_layers]
  group_reduce reduce = group_reduce::mean;

  status score(const stream_data& s, workspace& ws, float* out) const noexcept {
    const int layer = s.info.layer;
    if (static_cast<std::size_t>(layer) >= layers.size())
      return status::error(status_code::invalid_argument, "oracle: no future queries for layer %d (%zu layers given)",
                           layer, layers.size());
    const future_queries& fq = layers[static_cast<std::size_t>(layer)];
    if (fq.n_queries <= 0 || fq.q == nullptr || fq.positions == nullptr)
      return status::error(status_code::invalid_argument, "oracle: layer %d has no future queries", layer);
    const int n = s.size(), d = s.head_dim(), g = s.shape->group_size(), qh = s.shape->num_q_heads;
    workspace_scope scope(ws);
    float* logits = ws.alloc<float>(static_cast<std::size_t>(n));
    if (n > 0 && logits == nullptr)
      return status::error(status_code::workspace_exhausted, "oracle: no workspace for %d logits", n);
    for (int i = 0; i < n; ++i) out[i] = 0.0f;
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    const int rows = fq.n_queries * g;
    for (int qi = 0; qi < fq.n_queries; ++qi) {
      for (int j = 0; j < g; ++j) {
        const float* q =
            fq.q + (static_cast<std::size_t>(qi) * qh + static_cast<std::size_t>(s.info.kv_head) * g + j) * d;
        float mx = -std::numeric_limits<float>::infinity();
        for (int i = 0; i < n; ++i) {
          logits[i] = s.positions[i] <= fq.positions[qi]
                          ? kvc::detail::dot(q, s.keys + static_cast<std::size_t>(i) * d, d) * scale + s.log_weights[i]
                          : -std::numeric_limits<float>::infinity();
          mx = logits[i] > mx ? logits[i] : mx;
        }
        if (mx == -std::numeric_limits<float>::infinity()) continue;
        double sum = 0.0;
        for (int i = 0; i < n; ++i) sum += (logits[i] = std::exp(logits[i] - mx));
        const float inv = static_cast<float>(1.0 / sum);
        for (int i = 0; i < n; ++i) {
          const float a = logits[i] * inv;
          if (reduce == group_reduce::mean)
            out[i] += a / static_cast<float>(rows);
          else
            out[i] = a > out[i] ? a : out[i];
        }
      }
    }
    return ok_status();
  }
};

}  // namespace score
KVC_NAMESPACE_END
