// kvc/detail/projection.hpp: a small matrix F [rows][depth] applied to many token rows
// k_t [depth], for the scorers that project every key of a stream onto a few directions
// (expected attention, leverage):
//
//   y_{r,t} = b_r + f_r . k_t
//   project_store:  y[r * row_stride + t * token_stride] = y_{r,t}
//   project_sumsq:  out[t] += sum_r y_{r,t}^2   (for one matrix, or several over the same tokens)
//
// F is packed once (pack_rows) into panels of 8 rows, each stored [depth][8], rows past
// `rows` zero, so that the AVX2 + FMA kernel reads one 8-row column of F per step and
// multiplies it by one coordinate of up to 6 tokens, broadcast from each token's row: 2
// panels x 6 tokens = 12
// accumulators. Without AVX2 and FMA a plain loop computes the same sums (each y_{r,t} in
// float, in order of increasing depth).
//
// Nothing here allocates; packed storage comes from the caller (a workspace).
#pragma once

#include <algorithm>
#include <cstddef>

#include "kvc/detail/assert.hpp"
#include "kvc/version.hpp"

#if defined(__AVX2__) && defined(__FMA__)
#define KVC_PROJECTION_AVX2 1
#include <immintrin.h>
#else
#define KVC_PROJECTION_AVX2 0
#endif

// Full unrolling of the register-tile loops, so the accumulators stay in registers.
#if defined(__clang__)
#define KVC_PROJECTION_UNROLL _Pragma("clang loop unroll(full)")
#elif defined(__GNUC__)
#define KVC_PROJECTION_UNROLL _Pragma("GCC unroll 16")
#else
#define KVC_PROJECTION_UNROLL
#endif

KVC_NAMESPACE_BEGIN
namespace detail {

inline constexpr int projection_panel = 8;
inline constexpr int projection_max_depth = 512;  // the largest depth (head_dim or sketch size) packed here

// Which entries of F may be nonzero: all, or a triangle (row r nonzero only in columns <= r,
// or >= r), which the kernel skips panel by panel.
enum class row_shape { full, lower, upper };

// F packed by pack_rows: data [panels][depth][8], bias [panels * 8] (zero past rows).
struct packed_rows {
  float* data = nullptr;
  float* bias = nullptr;
  int rows = 0, depth = 0, panels = 0;
  row_shape shape = row_shape::full;
};

inline int projection_panels(int rows) noexcept { return (rows + projection_panel - 1) / projection_panel; }

// Floats pack_rows needs for data (bias needs projection_panels(rows) * 8 more).
inline std::size_t packed_floats(int rows, int depth) noexcept {
  return static_cast<std::size_t>(projection_panels(rows)) * projection_panel * static_cast<std::size_t>(depth);
}

// Packs F, element (r, e) at f[r * row_stride + e * depth_stride], into p.data; bias
// [rows] (nullptr: 0) into p.bias. p.data and p.bias must be set by the caller, with room for
// packed_floats(rows, depth) and projection_panels(rows) * 8 floats.
inline void pack_rows(const float* f, int rows, int depth, std::size_t row_stride, std::size_t depth_stride,
                      const float* bias, packed_rows& p, row_shape shape = row_shape::full) noexcept {
  p.rows = rows;
  p.depth = depth;
  p.panels = projection_panels(rows);
  p.shape = shape;
  for (int pn = 0; pn < p.panels; ++pn) {
    float* dst = p.data + static_cast<std::size_t>(pn) * projection_panel * static_cast<std::size_t>(depth);
    for (int e = 0; e < depth; ++e)
      for (int i = 0; i < projection_panel; ++i) {
        const int r = pn * projection_panel + i;
        dst[static_cast<std::size_t>(e) * projection_panel + static_cast<std::size_t>(i)] =
            r < rows ? f[static_cast<std::size_t>(r) * row_stride + static_cast<std::size_t>(e) * depth_stride] : 0.0f;
      }
    for (int i = 0; i < projection_panel; ++i) {
      const int r = pn * projection_panel + i;
      p.bias[pn * projection_panel + i] = r < rows && bias != nullptr ? bias[r] : 0.0f;
    }
  }
}

#if KVC_PROJECTION_AVX2

namespace proj {

// acc[p][t] = bias of panel p0 + p, plus F rows . k_t over the whole depth, for the NT token
// rows k_t = k + t * ldk; each step broadcasts one coordinate of every token straight from its row.
template <int NP, int NT>
inline void tile(const packed_rows& f, int p0, const float* k, std::size_t ldk, __m256 (&acc)[NP][NT]) noexcept {
  const std::size_t panel_stride = static_cast<std::size_t>(f.depth) * projection_panel;
  // the columns where rows of panels p0 .. p0 + NP - 1 can be nonzero
  const int e0 = f.shape == row_shape::upper ? std::min(f.depth, p0 * projection_panel) : 0;
  const int e1 = f.shape == row_shape::lower ? std::min(f.depth, (p0 + NP) * projection_panel) : f.depth;
  const float* fp =
      f.data + static_cast<std::size_t>(p0) * panel_stride + static_cast<std::size_t>(e0) * projection_panel;
  const float* kt[NT];
  KVC_PROJECTION_UNROLL
  for (int t = 0; t < NT; ++t) kt[t] = k + static_cast<std::size_t>(t) * ldk;
  KVC_PROJECTION_UNROLL
  for (int p = 0; p < NP; ++p) {
    const __m256 b = _mm256_loadu_ps(f.bias + (p0 + p) * projection_panel);
    KVC_PROJECTION_UNROLL
    for (int t = 0; t < NT; ++t) acc[p][t] = b;
  }
  for (int e = e0; e < e1; ++e, fp += projection_panel) {
    __m256 fv[NP];
    KVC_PROJECTION_UNROLL
    for (int p = 0; p < NP; ++p) fv[p] = _mm256_loadu_ps(fp + static_cast<std::size_t>(p) * panel_stride);
    KVC_PROJECTION_UNROLL
    for (int t = 0; t < NT; ++t) {
      const __m256 kb = _mm256_broadcast_ss(kt[t] + e);
      KVC_PROJECTION_UNROLL
      for (int p = 0; p < NP; ++p) acc[p][t] = _mm256_fmadd_ps(fv[p], kb, acc[p][t]);
    }
  }
}

inline float hsum(__m256 v) noexcept {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}

// NT tokens through every matrix f[0 .. nf): NP panels at a time (NP * NT accumulators);
// out[i * out_stride + t] += the sum of squares for matrix i.
template <int NP, int NT>
inline void sumsq_tokens(const packed_rows* f, int nf, const float* k, std::size_t ldk, float* out,
                         std::size_t out_stride) noexcept {
  for (int i = 0; i < nf; ++i) {
    __m256 total[NT];
    KVC_PROJECTION_UNROLL
    for (int t = 0; t < NT; ++t) total[t] = _mm256_setzero_ps();
    int p0 = 0;
    for (; p0 + NP <= f[i].panels; p0 += NP) {
      __m256 acc[NP][NT];
      tile<NP, NT>(f[i], p0, k, ldk, acc);
      KVC_PROJECTION_UNROLL
      for (int p = 0; p < NP; ++p) {
        KVC_PROJECTION_UNROLL
        for (int t = 0; t < NT; ++t) total[t] = _mm256_fmadd_ps(acc[p][t], acc[p][t], total[t]);
      }
    }
    for (; p0 < f[i].panels; ++p0) {
      __m256 acc[1][NT];
      tile<1, NT>(f[i], p0, k, ldk, acc);
      KVC_PROJECTION_UNROLL
      for (int t = 0; t < NT; ++t) total[t] = _mm256_fmadd_ps(acc[0][t], acc[0][t], total[t]);
    }
    float* o = out + static_cast<std::size_t>(i) * out_stride;
    for (int t = 0; t < NT; ++t) o[t] += hsum(total[t]);
  }
}

template <int NP, int NT>
inline void store_lanes(const packed_rows& f, int p0, const __m256 (&acc)[NP][NT], float* y, std::size_t row_stride,
                        std::size_t token_stride) noexcept {
  alignas(32) float lanes[NP][NT][projection_panel];
  KVC_PROJECTION_UNROLL
  for (int p = 0; p < NP; ++p) {
    KVC_PROJECTION_UNROLL
    for (int t = 0; t < NT; ++t) _mm256_store_ps(lanes[p][t], acc[p][t]);
  }
  for (int p = 0; p < NP; ++p) {
    const int r0 = (p0 + p) * projection_panel, rn = std::min(projection_panel, f.rows - r0);
    for (int t = 0; t < NT; ++t) {
      float* dst = y + static_cast<std::size_t>(r0) * row_stride + static_cast<std::size_t>(t) * token_stride;
      if (row_stride == 1 && rn == projection_panel)
        _mm256_storeu_ps(dst, _mm256_load_ps(lanes[p][t]));
      else
        for (int i = 0; i < rn; ++i) dst[static_cast<std::size_t>(i) * row_stride] = lanes[p][t][i];
    }
  }
}

template <int NP, int NT>
inline void store_tokens(const packed_rows& f, const float* k, std::size_t ldk, float* y, std::size_t row_stride,
                         std::size_t token_stride) noexcept {
  int p0 = 0;
  for (; p0 + NP <= f.panels; p0 += NP) {
    __m256 acc[NP][NT];
    tile<NP, NT>(f, p0, k, ldk, acc);
    store_lanes<NP, NT>(f, p0, acc, y, row_stride, token_stride);
  }
  for (; p0 < f.panels; ++p0) {
    __m256 acc[1][NT];
    tile<1, NT>(f, p0, k, ldk, acc);
    store_lanes<1, NT>(f, p0, acc, y, row_stride, token_stride);
  }
}

// Runs op.template run<NT>(t) over tokens [0, count) in tiles of NT = Full and a last tile of
// the remainder: the register tile is Full tokens by NP panels.
template <int NT>
struct token_tail {
  template <class Op>
  static void run(const Op& op, int t, int rem) noexcept {
    if (rem == NT)
      op.template run<NT>(t);
    else if constexpr (NT > 1)
      token_tail<NT - 1>::run(op, t, rem);
  }
};

template <int Full, class Op>
inline void over_tokens(const Op& op, int count) noexcept {
  int t = 0;
  for (; t + Full <= count; t += Full) op.template run<Full>(t);
  if (t < count) token_tail<Full - 1>::run(op, t, count - t);
}

template <int NP>
struct sumsq_op {
  const packed_rows* f;
  int nf;
  const float* k;
  std::size_t ldk;
  float* out;
  std::size_t out_stride;
  template <int NT>
  void run(int t) const noexcept {
    sumsq_tokens<NP, NT>(f, nf, k + static_cast<std::size_t>(t) * ldk, ldk, out + t, out_stride);
  }
};

template <int NP>
struct store_op {
  const packed_rows& f;
  const float* k;
  std::size_t ldk;
  float* y;
  std::size_t row_stride, token_stride;
  template <int NT>
  void run(int t) const noexcept {
    store_tokens<NP, NT>(f, k + static_cast<std::size_t>(t) * ldk, ldk, y + static_cast<std::size_t>(t) * token_stride,
                         row_stride, token_stride);
  }
};

}  // namespace proj

#endif  // KVC_PROJECTION_AVX2

// For each matrix i < nf (all of the same depth): out[i * out_stride + t] += sum_r (b_r +
// f_r . k_t)^2 over its rows, for the `count` token rows k_t = k + t * ldk.
inline void project_sumsq(const packed_rows* f, int nf, const float* k, int count, std::size_t ldk, float* out,
                          std::size_t out_stride) noexcept {
  if (nf <= 0) return;
  KVC_ASSERT(f[0].depth <= projection_max_depth);
#if KVC_PROJECTION_AVX2
  // One panel each: 12 tokens at a time; more: two panels by 6 tokens (12 accumulators).
  int max_panels = 0;
  for (int i = 0; i < nf; ++i) max_panels = std::max(max_panels, f[i].panels);
  if (max_panels == 1)
    proj::over_tokens<12>(proj::sumsq_op<1>{f, nf, k, ldk, out, out_stride}, count);
  else
    proj::over_tokens<6>(proj::sumsq_op<2>{f, nf, k, ldk, out, out_stride}, count);
#else
  for (int m = 0; m < nf; ++m) {
    const packed_rows& fm = f[m];
    const std::size_t panel_stride = static_cast<std::size_t>(fm.depth) * projection_panel;
    for (int t = 0; t < count; ++t) {
      const float* kt = k + static_cast<std::size_t>(t) * ldk;
      float total = 0.0f;
      for (int pn = 0; pn < fm.panels; ++pn) {
        float y[projection_panel];
        for (int i = 0; i < projection_panel; ++i) y[i] = fm.bias[pn * projection_panel + i];
        const float* fp = fm.data + static_cast<std::size_t>(pn) * panel_stride;
        for (int e = 0; e < fm.depth; ++e)
          for (int i = 0; i < projection_panel; ++i)
            y[i] += fp[static_cast<std::size_t>(e) * projection_panel + i] * kt[e];
        for (int i = 0; i < projection_panel; ++i) total += y[i] * y[i];
      }
      out[static_cast<std::size_t>(m) * out_stride + static_cast<std::size_t>(t)] += total;
    }
  }
#endif
}

// out[t] += sum_r (b_r + f_r . k_t)^2 for one matrix.
inline void project_sumsq(const packed_rows& f, const float* k, int count, std::size_t ldk, float* out) noexcept {
  project_sumsq(&f, 1, k, count, ldk, out, 0);
}

// y[r * row_stride + t * token_stride] = b_r + f_r . k_t for r < f.rows, t < count.
inline void project_store(const packed_rows& f, const float* k, int count, std::size_t ldk, float* y,
                          std::size_t row_stride, std::size_t token_stride) noexcept {
  KVC_ASSERT(f.depth <= projection_max_depth);
#if KVC_PROJECTION_AVX2
  if (f.panels == 1)
    proj::over_tokens<12>(proj::store_op<1>{f, k, ldk, y, row_stride, token_stride}, count);
  else
    proj::over_tokens<6>(proj::store_op<2>{f, k, ldk, y, row_stride, token_stride}, count);
#else
  const std::size_t panel_stride = static_cast<std::size_t>(f.depth) * projection_panel;
  for (int t = 0; t < count; ++t) {
    const float* kt = k + static_cast<std::size_t>(t) * ldk;
    for (int pn = 0; pn < f.panels; ++pn) {
      float v[projection_panel];
      for (int i = 0; i < projection_panel; ++i) v[i] = f.bias[pn * projection_panel + i];
      const float* fp = f.data + static_cast<std::size_t>(pn) * panel_stride;
      for (int e = 0; e < f.depth; ++e)
        for (int i = 0; i < projection_panel; ++i)
          v[i] += fp[static_cast<std::size_t>(e) * projection_panel + i] * kt[e];
      for (int i = 0; i < projection_panel && pn * projection_panel + i < f.rows; ++i)
        y[static_cast<std::size_t>(pn * projection_panel + i) * row_stride +
          static_cast<std::size_t>(t) * token_stride] = v[i];
    }
  }
#endif
}

}  // namespace detail
KVC_NAMESPACE_END
