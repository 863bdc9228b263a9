// kvc/score/compactor.hpp: Compactor (Chari, Van Durme, "Compactor: Calibrated Query-Agnostic
// KV Cache Compression with Approximate Leverage Scores", arXiv:2507.08143, 2025, Sec. 3;
// reference implementations CompactorPress and NonCausalAttnPress in NVIDIA/kvpress,
// kvpress/presses/compactor_press.py and non_causal_attention_press.py, and
// vnchari/compactor-vllm, src/compactor_vllm/compression/compactor.py): approximate leverage
// scores of the keys blended with chunked non-causal attention.
//
// The first protect_first and the last protect_last retained tokens are kept (+inf) and
// left out of everything below, as the reference slices them off before scoring. Over the
// remaining tokens U:
//   lev_i   = leverage of token i among U (kvc/score/leverage.hpp: keys before RoPE, centred
//             over U, Gaussian sketch of dimension 48)
//   A_i     = chunked non-causal attention received by token i: U is cut into chunks of
//             `chunk` tokens (from its first token); in each chunk c every query of the
//             chunk's tokens attends every key of the chunk (no causal mask) with
//             softmax_t(attention_scale * q.k_t + lw_t), and A_i sums what token i receives,
//             averaged over the query heads of the group
//   att_i   = mean over the pooling window of A_i * ||v_i||_2 (average pooling of width
//             `pool`, zero padding at the ends of U, as torch avg_pool1d in the reference)
//   score_i = beta * zscore(lev)_i + zscore(att)_i
// zscore(x) = (x - mean) / max(std, 1e-6) over U (population standard deviation, as
// compactor-vllm; KVPress's torch.std divides by |U| - 1). This is the paper's blend of the
// z-scored leverage (Sec. 3) with the z-scored, value-norm-weighted non-causal attention.
//
// Which queries. The reference scores the prompt at prefill, where every token's own query
// (after RoPE) is at hand. A kvc stream keeps the keys of every retained token but only the
// observed queries (stream_data::queries, the last cache_config::observe.query_window of the
// sequence). The queries of chunk c are therefore the observed queries whose positions are
// positions of tokens of c. With a query window at least as long as the prompt, compressing
// right after the prefill attend() reproduces the reference. Chunks where fewer queries were
// observed than they hold tokens are rescaled by (tokens / observed queries), so that each
// observed chunk gives out the same mass per token as a fully observed one; chunks with no
// observed query have no attention estimate: their tokens count as zero padding in the
// pooling, are left out of the attention z-score statistics and get zscore(att) = 0, so that
// leverage alone ranks them. The last chunk may be shorter than `chunk`; as in the references
// (which mask the padding of the last chunk), its queries attend only its own tokens.
//
// Defaults: chunk 256, protect_first 8, protect_last 4, pooling 3 and unscaled logits
// (attention_scale 1: both references pass the raw dot products to the softmax) follow the
// references; beta = 0.5 is compactor-vllm's blending (KVPress ties it to the compression
// ratio, which a scorer does not know). Both references z-score over all KV heads of a layer
// at once; a kvc scorer sees one stream, so z-scores are per stream.
//
// Usable at prefill and during decoding (it reads only stream_data). Needs observed queries:
// cache_config::observe.query_window > 0 and at least one attend() before compress();
// without them score() returns invalid_argument naming the missing observation. Scratch
// comes from the workspace (status_code::workspace_exhausted when it is too small).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

#include <Eigen/Core>

#include "kvc/detail/attention.hpp"
#include "kvc/score/leverage.hpp"
#include "kvc/score/scorer.hpp"
#include "kvc/status.hpp"
#include "kvc/stream.hpp"
#include "kvc/version.hpp"
#include "kvc/workspace.hpp"

KVC_NAMESPACE_BEGIN
namespace detail {
namespace compactor {

// y [rows][cols] (row stride ldy) = a [rows][depth] * b [cols][depth]^T, both row-major, in
// blocks small enough for Eigen to pack on the stack (see kvc/score/leverage.hpp).
inline void product_nt(const float* a, int rows, const float* b, int cols, int depth, float* y, int ldy) noexcept {
  using rmap = Eigen::Map<const row_matrix>;
  using out_map = Eigen::Map<row_matrix, 0, Eigen::OuterStride<>>;
  const int blk = lev::product_block(depth, sizeof(float));
  for (int r0 = 0; r0 < rows; r0 += blk) {
    const int rn = std::min(blk, rows - r0);
    for (int c0 = 0; c0 < cols; c0 += blk) {
      const int cn = std::min(blk, cols - c0);
      out_map out(y + static_cast<std::size_t>(r0) * ldy + c0, rn, cn, Eigen::OuterStride<>(ldy));
      out.noalias() = rmap(a + static_cast<std::size_t>(r0) * depth, rn, depth) *
                      rmap(b + static_cast<std::size_t>(c0) * depth, cn, depth).transpose();
    }
  }
}

// x [count] -> (x - mean) / max(std, 1e-6) over the entries with use[i] (all when use is
// null); the others become 0.
inline void zscore(float* x, int count, const std::uint8_t* use) noexcept {
  double sum = 0.0, sq = 0.0;
  int m = 0;
  for (int i = 0; i < count; ++i)
    if (use == nullptr || use[i]) {
      sum += x[i];
      ++m;
    }
  const double mean = m > 0 ? sum / m : 0.0;
  for (int i = 0; i < count; ++i)
    if (use == nullptr || use[i]) sq += (x[i] - mean) * (x[i] - mean);
  const double sd = std::max(m > 0 ? std::sqrt(sq / m) : 0.0, 1e-6);
  for (int i = 0; i < count; ++i) x[i] = use == nullptr || use[i] ? static_cast<float>((x[i] - mean) / sd) : 0.0f;
}

}  // namespace compactor
}  // namespace detail

namespace score {

struct compactor {
  static constexpr const char* name = "compactor";
  static constexpr stream_fields fields = stream_fields::keys | stream_fields::values | stream_fields::queries;

  float beta = 0.5f;             // weight of zscore(leverage)
  int chunk = 256;               // tokens per attention chunk
  int protect_first = 8;         // first retained tokens always kept
  int protect_last = 4;          // last retained tokens always kept
  int pool = 3;                  // average-pooling width (odd; 1: none)
  float attention_scale = 1.0f;  // logit = attention_scale * q.k (+ log-weight)
  leverage lev;                  // sketch dimension, seed, exact, undo_rope of the leverage term

  status score(const stream_data& s, workspace& ws, float* out) const noexcept {
    KVC_RETURN_IF_ERROR(check(s));
    const int n = s.size();
    const int first = std::min(protect_first, n), last = std::min(protect_last, n - first), m = n - first - last;
    const float inf = std::numeric_limits<float>::infinity();
    for (int i = 0; i < first; ++i) out[i] = inf;
    for (int i = n - last; i < n; ++i) out[i] = inf;
    if (m == 0) return ok_status();
    workspace_scope scope(ws);
    float* lv = out + first;
    {
      workspace_scope inner(ws);
      KVC_RETURN_IF_ERROR(
          lev.exact ? kvc::detail::lev::exact(s, first, m, lev.undo_rope, name, ws, lv)
                    : kvc::detail::lev::sketched(s, first, m, lev.sketch_dim, lev.seed, lev.undo_rope, name, ws, lv));
    }
    kvc::detail::compactor::zscore(lv, m, nullptr);
    float* att = ws.alloc<float>(static_cast<std::size_t>(m));
    std::uint8_t* covered = ws.alloc<std::uint8_t>(static_cast<std::size_t>(m));
    if (att == nullptr || covered == nullptr) return kvc::detail::lev::exhausted(ws, name, s);
    KVC_RETURN_IF_ERROR(attention(s, first, m, ws, att, covered));
    kvc::detail::compactor::zscore(att, m, covered);
    for (int i = 0; i < m; ++i) lv[i] = beta * lv[i] + att[i];
    return ok_status();
  }

 private:
  status check(const stream_data& s) const noexcept {
    KVC_RETURN_IF_ERROR(lev.check(s, name));
    if (!std::isfinite(beta))
      return status::error(status_code::invalid_argument, "compactor: beta is %g, must be finite",
                           static_cast<double>(beta));
    if (chunk < 1) return status::error(status_code::invalid_argument, "compactor: chunk is %d, must be >= 1", chunk);
    if (protect_first < 0 || protect_last < 0)
      return status::error(status_code::invalid_argument,
                           "compactor: protect_first %d and protect_last %d must be >= 0", protect_first, protect_last);
    if (pool < 1 || pool % 2 == 0)
      return status::error(status_code::invalid_argument, "compactor: pool is %d, must be odd and >= 1", pool);
    if (!std::isfinite(attention_scale))
      return status::error(status_code::invalid_argument, "compactor: attention_scale is %g, must be finite",
                           static_cast<double>(attention_scale));
    if (s.size() > 0 && s.values == nullptr)
      return status::error(status_code::invalid_argument, "compactor: stream (layer %d, kv_head %d) lacks its values",
                           s.info.layer, s.info.kv_head);
    if (s.queries == nullptr || s.query_positions == nullptr || s.n_queries <= 0)
      return status::error(status_code::invalid_argument,
                           "compactor: no observed queries for stream (layer %d, kv_head %d); set "
                           "cache_config::observe.query_window > 0 and attend() before compress()",
                           s.info.layer, s.info.kv_head);
    return ok_status();
  }

  // att [m], covered [m] for tokens [first, first + m): pooled A_i * ||v_i|| and whether
  // token i's chunk had observed queries.
  status attention(const stream_data& s, int first, int m, workspace& ws, float* att,
                   std::uint8_t* covered) const noexcept {
    const int d = s.head_dim(), g = s.group_size(), nq = s.n_queries;
    const std::size_t ud = static_cast<std::size_t>(d);
    const int cmax = std::min(chunk, m);
    const int qb = std::max(1, std::min(256, kvc::detail::lev::product_block(d, sizeof(float))) / g) * g;
    int* chunk_of = ws.alloc<int>(static_cast<std::size_t>(nq));
    float* mass = ws.alloc<float>(static_cast<std::size_t>(m));
    float* qbuf = ws.alloc<float>(static_cast<std::size_t>(qb) * ud);
    float* logits = ws.alloc<float>(static_cast<std::size_t>(qb) * static_cast<std::size_t>(cmax));
    if (chunk_of == nullptr || mass == nullptr || qbuf == nullptr || logits == nullptr)
      return kvc::detail::lev::exhausted(ws, name, s);
    // The chunk of each observed query: that of the token at its position, if retained in range.
    const std::int32_t* pos = s.positions + first;
    for (int j = 0; j < nq; ++j) {
      const std::int32_t* it = std::lower_bound(pos, pos + m, s.query_positions[j]);
      chunk_of[j] = it != pos + m && *it == s.query_positions[j] ? static_cast<int>(it - pos) / chunk : -1;
    }
    for (int i = 0; i < m; ++i) mass[i] = 0.0f;
    for (int c0 = 0; c0 < m; c0 += chunk) {
      const int c = c0 / chunk, len = std::min(chunk, m - c0);
      const float* keys = s.keys + static_cast<std::size_t>(first + c0) * ud;
      const float* lw = s.log_weights != nullptr ? s.log_weights + first + c0 : nullptr;
      int observed = 0, rows = 0;
      const auto flush = [&] {
        if (rows == 0) return;
        kvc::detail::compactor::product_nt(qbuf, rows, keys, len, d, logits, len);
        for (int r = 0; r < rows; ++r) {
          float* lr = logits + static_cast<std::size_t>(r) * static_cast<std::size_t>(len);
          float mx = -std::numeric_limits<float>::infinity();
          for (int t = 0; t < len; ++t) {
            lr[t] = attention_scale * lr[t] + (lw != nullptr ? lw[t] : 0.0f);
            mx = std::max(mx, lr[t]);
          }
          double sum = 0.0;
          for (int t = 0; t < len; ++t) sum += (lr[t] = kvc::detail::exp_nonpositive(lr[t] - mx));
          const float inv = static_cast<float>(1.0 / sum);
          for (int t = 0; t < len; ++t) mass[c0 + t] += lr[t] * inv;
        }
        rows = 0;
      };
      for (int j = 0; j < nq; ++j) {
        if (chunk_of[j] != c) continue;
        ++observed;
        for (int h = 0; h < g; ++h, ++rows)
          std::copy(s.query(j, h), s.query(j, h) + d, qbuf + static_cast<std::size_t>(rows) * ud);
        if (rows + g > qb) flush();
      }
      flush();
      const float norm = observed > 0 ? static_cast<float>(len) / (static_cast<float>(observed) * g) : 0.0f;
      for (int t = 0; t < len; ++t) {
        const float* v = s.values + static_cast<std::size_t>(first + c0 + t) * ud;
        mass[c0 + t] *= norm * std::sqrt(kvc::detail::dot(v, v, d));
        covered[c0 + t] = observed > 0 ? 1 : 0;
      }
    }
    // Average pooling of width `pool`, zero padding at both ends (count_include_pad).
    const int half = pool / 2;
    for (int i = 0; i < m; ++i) {
      float sum = 0.0f;
      for (int t = std::max(0, i - half); t <= std::min(m - 1, i + half); ++t) sum += mass[t];
      att[i] = sum / static_cast<float>(pool);
    }
    return ok_status();
  }
};

}  // namespace score

static_assert(is_scorer_v<score::compactor>, "kvc::score::compactor must satisfy the scorer interface");

KVC_NAMESPACE_END
