// kvc/detail/observed_attention.hpp: the attention that observed queries give a stream's
// tokens, replayed at compress time (SnapKV's observation window, TOVA's last query).
//
// For the rows (j, h) of observed queries j in [j0, j0 + w) and query heads h of the KV
// head's group, with p_j the position of query j:
//   a_{j,h,i} = softmax_i(q_{j,h} . k_i / sqrt(d) + log_weight_i)  over tokens with position_i <= p_j
//   votes[h][i] = sum_j a_{j,h,i}                                  for i < n_vote
// The softmax runs over every token a query sees; only the first n_vote tokens get votes.
//
// Cost: w * group * (visible tokens) * head_dim multiply-adds for the logits, in a kernel of
// 6 rows x 16 tokens (twelve AVX2 accumulators, FMA-bound), then one exp per logit. The logits
// of as many rows as the workspace holds are kept ([block][cols] floats), so the keys are read
// ceil(rows / block) times. Scratch besides: 9 floats per window row and head_dim * 16 floats.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "kvc/detail/attention.hpp"
#include "kvc/status.hpp"
#include "kvc/stream.hpp"
#include "kvc/version.hpp"
#include "kvc/workspace.hpp"

KVC_NAMESPACE_BEGIN
namespace detail {

inline constexpr int window_tile = 16;  // tokens per tile of the logits kernel
inline constexpr int window_rows = 6;   // query rows per pass of the logits kernel

// Logits of window_rows query rows q[r] [d] against one tile of keys, transposed: kt
// [d][window_tile] (64-byte aligned). out[r][t] = q[r] . k_t. Each step broadcasts one
// element of every row against the tile's sixteen keys: twelve accumulators, no horizontal
// sums.
inline void window_logits(const float* const* q, const float* kt, int d, float (*out)[window_tile]) noexcept {
#if KVC_ATTEND_AVX2
  static_assert(window_tile == 16 && window_rows == 6, "kvc: the AVX2 logits kernel covers 6 rows x 16 tokens");
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const float *q0 = q[0], *q1 = q[1], *q2 = q[2], *q3 = q[3], *q4 = q[4], *q5 = q[5];
  for (int e = 0; e < d; ++e) {
    const float* k = kt + static_cast<std::size_t>(e) * window_tile;
    const __m256 k0 = avx2::in_reg(_mm256_load_ps(k)), k1 = avx2::in_reg(_mm256_load_ps(k + 8));
    __m256 b = _mm256_broadcast_ss(q0 + e);
    c00 = _mm256_fmadd_ps(b, k0, c00);
    c01 = _mm256_fmadd_ps(b, k1, c01);
    b = _mm256_broadcast_ss(q1 + e);
    c10 = _mm256_fmadd_ps(b, k0, c10);
    c11 = _mm256_fmadd_ps(b, k1, c11);
    b = _mm256_broadcast_ss(q2 + e);
    c20 = _mm256_fmadd_ps(b, k0, c20);
    c21 = _mm256_fmadd_ps(b, k1, c21);
    b = _mm256_broadcast_ss(q3 + e);
    c30 = _mm256_fmadd_ps(b, k0, c30);
    c31 = _mm256_fmadd_ps(b, k1, c31);
    b = _mm256_broadcast_ss(q4 + e);
    c40 = _mm256_fmadd_ps(b, k0, c40);
    c41 = _mm256_fmadd_ps(b, k1, c41);
    b = _mm256_broadcast_ss(q5 + e);
    c50 = _mm256_fmadd_ps(b, k0, c50);
    c51 = _mm256_fmadd_ps(b, k1, c51);
  }
  _mm256_storeu_ps(out[0], c00);
  _mm256_storeu_ps(out[0] + 8, c01);
  _mm256_storeu_ps(out[1], c10);
  _mm256_storeu_ps(out[1] + 8, c11);
  _mm256_storeu_ps(out[2], c20);
  _mm256_storeu_ps(out[2] + 8, c21);
  _mm256_storeu_ps(out[3], c30);
  _mm256_storeu_ps(out[3] + 8, c31);
  _mm256_storeu_ps(out[4], c40);
  _mm256_storeu_ps(out[4] + 8, c41);
  _mm256_storeu_ps(out[5], c50);
  _mm256_storeu_ps(out[5] + 8, c51);
#else
  float acc[window_rows][window_tile] = {};
  for (int e = 0; e < d; ++e) {
    const float* k = kt + static_cast<std::size_t>(e) * window_tile;
    for (int r = 0; r < window_rows; ++r) {
      const float x = q[r][e];
      for (int t = 0; t < window_tile; ++t) acc[r][t] += x * k[t];
    }
  }
  for (int r = 0; r < window_rows; ++r)
    for (int t = 0; t < window_tile; ++t) out[r][t] = acc[r][t];
#endif
}

// kt [d][window_tile] = the tn (<= window_tile) rows keys [tn][d], transposed; columns past
// tn are zero.
inline void transpose_tile(const float* keys, int d, int tn, float* kt) noexcept {
  int e0 = 0;
#if KVC_ATTEND_AVX2
  if (tn == window_tile) {
    // 8 x 8 blocks: unpack pairs, shuffle quads, swap 128-bit halves; eight rows at a time,
    // read from start to end.
    for (int t0 = 0; t0 < window_tile; t0 += 8)
      for (e0 = 0; e0 + 8 <= d; e0 += 8) {
        __m256 r[8];
        for (int t = 0; t < 8; ++t)
          r[t] = _mm256_loadu_ps(keys + static_cast<std::size_t>(t0 + t) * static_cast<std::size_t>(d) + e0);
        const __m256 a0 = _mm256_unpacklo_ps(r[0], r[1]), a1 = _mm256_unpackhi_ps(r[0], r[1]);
        const __m256 a2 = _mm256_unpacklo_ps(r[2], r[3]), a3 = _mm256_unpackhi_ps(r[2], r[3]);
        const __m256 a4 = _mm256_unpacklo_ps(r[4], r[5]), a5 = _mm256_unpackhi_ps(r[4], r[5]);
        const __m256 a6 = _mm256_unpacklo_ps(r[6], r[7]), a7 = _mm256_unpackhi_ps(r[6], r[7]);
        const __m256 b0 = _mm256_shuffle_ps(a0, a2, 0x44), b1 = _mm256_shuffle_ps(a0, a2, 0xEE);
        const __m256 b2 = _mm256_shuffle_ps(a1, a3, 0x44), b3 = _mm256_shuffle_ps(a1, a3, 0xEE);
        const __m256 b4 = _mm256_shuffle_ps(a4, a6, 0x44), b5 = _mm256_shuffle_ps(a4, a6, 0xEE);
        const __m256 b6 = _mm256_shuffle_ps(a5, a7, 0x44), b7 = _mm256_shuffle_ps(a5, a7, 0xEE);
        float* out = kt + static_cast<std::size_t>(e0) * window_tile + static_cast<std::size_t>(t0);
        _mm256_store_ps(out + 0 * window_tile, _mm256_permute2f128_ps(b0, b4, 0x20));
        _mm256_store_ps(out + 1 * window_tile, _mm256_permute2f128_ps(b1, b5, 0x20));
        _mm256_store_ps(out + 2 * window_tile, _mm256_permute2f128_ps(b2, b6, 0x20));
        _mm256_store_ps(out + 3 * window_tile, _mm256_permute2f128_ps(b3, b7, 0x20));
        _mm256_store_ps(out + 4 * window_tile, _mm256_permute2f128_ps(b0, b4, 0x31));
        _mm256_store_ps(out + 5 * window_tile, _mm256_permute2f128_ps(b1, b5, 0x31));
        _mm256_store_ps(out + 6 * window_tile, _mm256_permute2f128_ps(b2, b6, 0x31));
        _mm256_store_ps(out + 7 * window_tile, _mm256_permute2f128_ps(b3, b7, 0x31));
      }
  }
#endif
  for (int e = e0; e < d; ++e) {
    float* out = kt + static_cast<std::size_t>(e) * window_tile;
    for (int t = 0; t < tn; ++t) out[t] = keys[static_cast<std::size_t>(t) * static_cast<std::size_t>(d) + e];
    for (int t = tn; t < window_tile; ++t) out[t] = 0.0f;
  }
}

// x[i] = e^(x[i] - m) for i < n (x[i] <= m); returns the sum.
inline float exp_shift_sum(float* x, int n, float m) noexcept {
  int i = 0;
#if KVC_ATTEND_AVX2
  const __m256 mv = _mm256_set1_ps(m);
  __m256 s0 = _mm256_setzero_ps(), s1 = s0;
  for (; i + 16 <= n; i += 16) {
    const __m256 p0 = avx2::exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv));
    const __m256 p1 = avx2::exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), mv));
    _mm256_storeu_ps(x + i, p0);
    _mm256_storeu_ps(x + i + 8, p1);
    s0 = _mm256_add_ps(s0, p0);
    s1 = _mm256_add_ps(s1, p1);
  }
  alignas(32) float acc[16];
  _mm256_store_ps(acc, s0);
  _mm256_store_ps(acc + 8, s1);
#else
  float acc[16] = {};
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) {
      const float p = exp_nonpositive(x[i + j] - m);
      x[i + j] = p;
      acc[j] += p;
    }
#endif
  float tail = 0.0f;
  for (; i < n; ++i) tail += (x[i] = exp_nonpositive(x[i] - m));
  for (int w = 8; w > 0; w >>= 1)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0] + tail;
}

// Tokens of positions[0..n) (increasing) at or before p.
inline int count_at_or_before(const std::int32_t* positions, int n, std::int32_t p) noexcept {
  return static_cast<int>(std::upper_bound(positions, positions + n, p) - positions);
}

// votes [group][n_vote] (written whole): the summed attention of observed queries
// [j0, j0 + w) of each query head of the group, as in the comment at the top. Needs s.keys
// and the observed queries; n_vote <= s.size(). Fails only with workspace_exhausted, the
// message naming `who`.
inline status observed_attention(const stream_data& s, workspace& ws, int j0, int w, int n_vote, float* votes,
                                 const char* who) noexcept {
  const int n = s.size(), d = s.head_dim(), g = s.group_size(), rows = w * g;
  const std::size_t nv = static_cast<std::size_t>(n_vote);
  std::fill(votes, votes + static_cast<std::size_t>(g) * nv, 0.0f);
  workspace_scope scope(ws);
  int* visible = ws.alloc<int>(static_cast<std::size_t>(rows));            // [rows]
  float* row_max = ws.alloc<float>(static_cast<std::size_t>(rows) * 8);    // [rows][8 lanes]
  float* kt = ws.alloc<float>(static_cast<std::size_t>(d) * window_tile);  // [d][tile]
  if ((rows > 0 && (visible == nullptr || row_max == nullptr)) || kt == nullptr)
    return status::error(status_code::workspace_exhausted, "%s: no workspace for %d observed query rows", who, rows);
  int cols = 0;  // logits needed per row: the most tokens any row sees
  for (int r = 0; r < rows; ++r) {
    visible[r] = count_at_or_before(s.positions, n, s.query_positions[j0 + r / g]);
    cols = std::max(cols, visible[r]);
  }
  if (cols == 0) return ok_status();  // no query sees any token: no votes
  // As many rows of logits [block][cols] as the rest of the workspace holds.
  const std::size_t row_bytes = static_cast<std::size_t>(cols) * sizeof(float);
  const std::size_t room = ws.capacity() - std::min(ws.capacity(), ws.used() + workspace::alignment);
  int block = static_cast<int>(std::min<std::size_t>(static_cast<std::size_t>(rows), room / row_bytes));
  if (block >= window_rows) block -= block % window_rows;
  if (block == 0)
    return status::error(status_code::workspace_exhausted,
                         "%s: no workspace for one row of %d attention logits (%zu bytes free)", who, cols, room);
  float* logits = ws.alloc<float>(static_cast<std::size_t>(block) * static_cast<std::size_t>(cols));
  if (logits == nullptr)
    return status::error(status_code::workspace_exhausted, "%s: no workspace for the attention logits", who);

  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  for (int r0 = 0; r0 < rows; r0 += block) {
    const int r1 = std::min(rows, r0 + block);
    int block_cols = 0;
    for (int r = r0; r < r1; ++r) block_cols = std::max(block_cols, visible[r]);
    std::fill(row_max + static_cast<std::size_t>(r0) * 8, row_max + static_cast<std::size_t>(r1) * 8,
              -std::numeric_limits<float>::infinity());
    // 1. Logits of rows [r0, r1) for tokens [0, block_cols): scaled, plus log-weights, and
    // each row's running maximum over the tokens it sees, in eight lanes.
    for (int t0 = 0; t0 < block_cols; t0 += window_tile) {
      const int tn = std::min(window_tile, block_cols - t0);
      transpose_tile(s.keys + static_cast<std::size_t>(t0) * static_cast<std::size_t>(d), d, tn, kt);
      for (int r = r0; r < r1; r += window_rows) {
        const int rn = std::min(window_rows, r1 - r);
        bool any = false;
        const float* q[window_rows];
        for (int k = 0; k < window_rows; ++k) {
          const int rr = r + (k < rn ? k : 0);  // rows past the block repeat its first
          q[k] = s.query(j0 + rr / g, rr % g);
          any = any || (k < rn && visible[rr] > t0);
        }
        if (!any) continue;
        alignas(64) float lg[window_rows][window_tile];
        window_logits(q, kt, d, lg);
        for (int k = 0; k < rn; ++k) {
          float* dst = logits + static_cast<std::size_t>(r + k - r0) * static_cast<std::size_t>(cols) +
                       static_cast<std::size_t>(t0);
          float* mx = row_max + static_cast<std::size_t>(r + k) * 8;
          const int seen = std::min(tn, visible[r + k] - t0);  // tokens of the tile this row sees
#if KVC_ATTEND_AVX2
          if (seen == window_tile) {
            const __m256 sc = _mm256_set1_ps(scale);
            const __m256 x0 = _mm256_fmadd_ps(_mm256_load_ps(lg[k]), sc, _mm256_loadu_ps(s.log_weights + t0));
            const __m256 x1 = _mm256_fmadd_ps(_mm256_load_ps(lg[k] + 8), sc, _mm256_loadu_ps(s.log_weights + t0 + 8));
            _mm256_storeu_ps(dst, x0);
            _mm256_storeu_ps(dst + 8, x1);
            _mm256_storeu_ps(mx, _mm256_max_ps(_mm256_loadu_ps(mx), _mm256_max_ps(x0, x1)));
            continue;
          }
#endif
          for (int t = 0; t < tn; ++t) {
            const float x = lg[k][t] * scale + s.log_weights[t0 + t];
            dst[t] = x;
            if (t < seen) mx[t % 8] = x > mx[t % 8] ? x : mx[t % 8];
          }
        }
      }
    }
    // 2. Per row: softmax over its visible tokens, added to its head's votes.
    for (int r = r0; r < r1; ++r) {
      const int c = visible[r];
      if (c == 0) continue;
      float* l = logits + static_cast<std::size_t>(r - r0) * static_cast<std::size_t>(cols);
      const float* mx = row_max + static_cast<std::size_t>(r) * 8;
      float m = mx[0];
      for (int j = 1; j < 8; ++j) m = mx[j] > m ? mx[j] : m;
      const float inv = 1.0f / exp_shift_sum(l, c, m);
      float* v = votes + static_cast<std::size_t>(r % g) * nv;
      const int cv = std::min(c, n_vote);
      for (int i = 0; i < cv; ++i) v[i] += l[i] * inv;
    }
  }
  return ok_status();
}

}  // namespace detail
KVC_NAMESPACE_END
