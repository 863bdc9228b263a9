// kvc/score/tova.hpp: TOVA, Token Omission Via Attention (Oren et al., "Transformers are
// Multi-State RNNs", EMNLP 2024, arXiv:2401.06104, Sec. 3.3): keep the tokens that the
// current (last) query attends to most. With the last observed query q_h of the KV head's
// group (head h of the group), at position p:
//   a_{h,i} = softmax_i(q_h . k_i / sqrt(d) + log_weight_i)   over tokens with position_i <= p
//   s_i = mean (or max) over h of a_{h,i}
// The paper drops the token with the lowest such score at every decoding step once the
// cache is full; kvc::evict keeps the budget's top-k by the same score, so a compress after
// every step with a budget of one token less than the stream holds is the paper's policy.
//
// The last query is the last one attend() recorded (cache_config::observe.query_window >= 1):
// at prefill the prompt's last token, during decoding the token just generated. Its softmax
// is recomputed over the tokens the stream retains now, so a compress right after that
// attend() scores exactly the attention it computed. A token the last query cannot see
// (position > p: appended after it) scores +inf, so it is not evicted before a query has
// looked at it (kvpress pads the newest token with the maximum score for the same reason).
//
// Per KV head: TOVA as published averages the last query's attention over all heads of the
// layer (Sec. 3.3; the authors' TOVACache and kvpress's TOVAPress do the same), so every
// head of a layer keeps the same tokens. A scorer sees one KV head, so here each KV head
// keeps its own tokens by its query group's mean (or max).
//
// Cost: group_size * n * head_dim multiply-adds and group_size * n exponentials (see
// kvc/detail/observed_attention.hpp). Scratch: 2 * group_size * n floats (the attention
// and its logits).
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>

#include "kvc/detail/observed_attention.hpp"
#include "kvc/score/scorer.hpp"

KVC_NAMESPACE_BEGIN
namespace score {

struct tova {
  static constexpr const char* name = "tova";
  static constexpr stream_fields fields = stream_fields::keys | stream_fields::queries;
  group_reduce reduce = group_reduce::mean;

  status score(const stream_data& s, workspace& ws, float* out) const noexcept {
    const int n = s.size(), g = s.group_size();
    if (n == 0) return ok_status();
    if (s.queries == nullptr || s.query_positions == nullptr || s.n_queries <= 0)
      return status::error(status_code::invalid_argument,
                           "tova: no observed queries for stream (layer %d, kv_head %d); set "
                           "cache_config::observe.query_window (>= 1) and attend() before compressing",
                           s.info.layer, s.info.kv_head);
    if (s.keys == nullptr) return status::error(status_code::invalid_argument, "tova: the stream has no keys loaded");
    const int last = s.n_queries - 1;
    const int seen = detail::count_at_or_before(s.positions, n, s.query_positions[last]);
    for (int i = seen; i < n; ++i) out[i] = std::numeric_limits<float>::infinity();
    if (seen == 0) return ok_status();

    workspace_scope scope(ws);
    const std::size_t nv = static_cast<std::size_t>(seen);
    float* votes = ws.alloc<float>(static_cast<std::size_t>(g) * nv);  // [g][seen]
    if (votes == nullptr)
      return status::error(status_code::workspace_exhausted, "tova: no workspace for the attention of %d tokens", n);
    KVC_RETURN_IF_ERROR(detail::observed_attention(s, ws, last, 1, seen, votes, "tova"));
    const float inv_g = 1.0f / static_cast<float>(g);
    for (int i = 0; i < seen; ++i) {
      float r = votes[i];
      for (int h = 1; h < g; ++h) {
        const float a = votes[static_cast<std::size_t>(h) * nv + static_cast<std::size_t>(i)];
        r = reduce == group_reduce::mean ? r + a : (a > r ? a : r);
      }
      out[i] = reduce == group_reduce::mean ? r * inv_g : r;
    }
    return ok_status();
  }
};

}  // namespace score
KVC_NAMESPACE_END
