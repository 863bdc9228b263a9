// kvc/score/snapkv.hpp: SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for
// Before Generation", NeurIPS 2024, arXiv:2404.14469, Sec. 4.1 and Listing 1): the queries of
// an observation window at the end of the context vote for the tokens they attend to, the
// votes are pooled so that a token's neighbours come with it, and the window itself is
// always kept.
//
// Paper, Sec. 4.1: C = sum_{i=0}^{L_obs} W_obs[:, i, :] (Eq. 1, the votes of the window's
// queries for the prefix), I = Top_k(C, k) (Eq. 2), with C pooled by a 1-D pooling of width
// kernel_size before the top-k (Listing 1). Here, with the last W observed queries q_{j,h}
// of the KV head's group (j = 1..W, head h of the group; W = min(window, observed)), each at
// position p_j:
//   a_{j,h,i} = softmax_i(q_{j,h} . k_i / sqrt(d) + log_weight_i)  over tokens with position_i <= p_j
//   C_{h,i} = sum_j a_{j,h,i}                          (Eq. 1, for the tokens before the window)
//   P_{h,i} = (1 / kernel) sum of C_{h,t} over tokens t with |position_t - position_i| <= kernel / 2
//             (pooling::avg), or their max (pooling::max)
//   s_i = mean (or max) over h of P_{h,i}              (GQA reduction over the query group)
// and s_i = +inf for the tokens of the observation window (position_i >= min_j p_j) when
// protect_window is set; kvc::evict then keeps the top-k (Eq. 2).
//
// Defaults and their sources: window 64 and kernel 5 with average pooling are the defaults
// of the authors' SnapKVCluster (FasterDecoding/SnapKV, snapkv/monkeypatch/snapkv_utils.py,
// pooling 'avgpool'; 'maxpool' is its alternative) and of kvpress's SnapKVPress (avg_pool1d).
// Details that follow the reference implementations:
//  - the softmax of each window query runs over every token it can see, window tokens
//    included (they are in the denominator), and the votes are then taken for the tokens
//    before the window only; the window is kept whole (the reference concatenates it back,
//    kvpress pads it with the maximum score; +inf here);
//  - average pooling counts the padding: the window sum is divided by `kernel` at the ends
//    too (avg_pool1d with padding kernel / 2 counts the padded zeros); max pooling takes the
//    maximum of the neighbours that exist (max_pool1d pads with -inf);
//  - pooling runs per query head, then the group is reduced (kvpress: pool, then mean over
//    the group); with average pooling and the mean the two orders agree;
//  - the vote is the sum over the window's queries as in Eq. 1 (kvpress averages: the same
//    ranking, scaled by 1 / W).
// Pooling is over token positions: on a stream of consecutive positions (prefill) it is the
// reference's pooling over indices; after earlier evictions an evicted neighbour counts as
// zero, like the padding at the ends, instead of pulling in a distant token.
//
// Needs cache_config::observe.query_window >= window (queries recorded by attend()); usable
// at prefill (the prompt's last queries) and during decoding (the last decode steps'). With
// fewer observed queries than `window`, all of them form the window.
//
// Cost: W * group_size * n * head_dim multiply-adds for the logits (the bulk, see
// kvc/detail/observed_attention.hpp), then group_size * n * kernel for the pooling. Scratch:
// (group_size + 1) * n floats plus the logits of as many window rows as the workspace holds.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "kvc/detail/observed_attention.hpp"
#include "kvc/score/scorer.hpp"

KVC_NAMESPACE_BEGIN
namespace score {

enum class pooling { avg, max };

}  // namespace score

namespace score {

struct snapkv {
  static constexpr const char* name = "snapkv";
  static constexpr stream_fields fields = stream_fields::keys | stream_fields::queries;
  int window = 64;  // observation window: the last `window` observed queries
  int kernel = 5;   // pooling width in positions (odd); 1: no pooling
  pooling pool = pooling::avg;
  group_reduce reduce = group_reduce::mean;
  bool protect_window = true;  // the window's own tokens score +inf

  status score(const stream_data& s, workspace& ws, float* out) const noexcept {
    if (window < 1) return status::error(status_code::invalid_argument, "snapkv: window %d must be >= 1", window);
    if (kernel < 1 || kernel % 2 == 0)
      return status::error(status_code::invalid_argument, "snapkv: pooling kernel %d must be odd and >= 1", kernel);
    const int n = s.size(), g = s.group_size();
    if (n == 0) return ok_status();
    if (s.queries == nullptr || s.query_positions == nullptr || s.n_queries <= 0)
      return status::error(status_code::invalid_argument,
                           "snapkv: no observed queries for stream (layer %d, kv_head %d); set "
                           "cache_config::observe.query_window (>= %d) and attend() before compressing",
                           s.info.layer, s.info.kv_head, window);
    if (s.keys == nullptr) return status::error(status_code::invalid_argument, "snapkv: the stream has no keys loaded");

    const int w = std::min(window, s.n_queries), j0 = s.n_queries - w;
    std::int32_t window_start = std::numeric_limits<std::int32_t>::max();
    for (int j = j0; j < s.n_queries; ++j) window_start = std::min(window_start, s.query_positions[j]);
    // Tokens that get a vote: those before the window, or all of them.
    const int n_vote =
        protect_window ? static_cast<int>(std::lower_bound(s.positions, s.positions + n, window_start) - s.positions)
                       : n;
    for (int i = n_vote; i < n; ++i) out[i] = std::numeric_limits<float>::infinity();
    if (n_vote == 0) return ok_status();

    workspace_scope scope(ws);
    const std::size_t nv = static_cast<std::size_t>(n_vote);
    float* votes = ws.alloc<float>(static_cast<std::size_t>(g) * nv);  // [g][n_vote]
    float* pooled = ws.alloc<float>(nv);                               // [n_vote]
    if (votes == nullptr || pooled == nullptr)
      return status::error(status_code::workspace_exhausted, "snapkv: no workspace for the votes of %d tokens", n);
    KVC_RETURN_IF_ERROR(detail::observed_attention(s, ws, j0, w, n_vote, votes, "snapkv"));

    // Pool each head's votes over neighbouring positions, then reduce over the group.
    const std::int64_t half = kernel / 2;
    const float inv_kernel = 1.0f / static_cast<float>(kernel), inv_g = 1.0f / static_cast<float>(g);
    for (int h = 0; h < g; ++h) {
      const float* v = votes + static_cast<std::size_t>(h) * nv;
      if (half == 0) {
        std::copy(v, v + nv, pooled);
      } else {
        for (int i = 0; i < n_vote; ++i) {
          int lo = i, hi = i;
          while (lo > 0 && static_cast<std::int64_t>(s.positions[i]) - s.positions[lo - 1] <= half) --lo;
          while (hi + 1 < n_vote && static_cast<std::int64_t>(s.positions[hi + 1]) - s.positions[i] <= half) ++hi;
          float p = v[lo];
          if (pool == pooling::avg) {
            for (int t = lo + 1; t <= hi; ++t) p += v[t];
            p *= inv_kernel;
          } else {
            for (int t = lo + 1; t <= hi; ++t) p = v[t] > p ? v[t] : p;
          }
          pooled[i] = p;
        }
      }
      if (reduce == group_reduce::mean) {
        for (int i = 0; i < n_vote; ++i) out[i] = (h == 0 ? 0.0f : out[i]) + pooled[i] * inv_g;
      } else {
        for (int i = 0; i < n_vote; ++i) out[i] = h == 0 || pooled[i] > out[i] ? pooled[i] : out[i];
      }
    }
    return ok_status();
  }
};

}  // namespace score
KVC_NAMESPACE_END
