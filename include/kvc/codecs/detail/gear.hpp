// kvc/codecs/detail/gear.hpp: the GEAR residual correction (Kang et al. 2024, "GEAR: An
// Efficient KV Cache Compression Recipe for Near-Lossless Generative Inference of LLM",
// Sec. 3 and Algorithm 1).
//
// A block X [n][d] (the n tokens of one page, d = head_dim) is stored by a base quantizer as
// D^ = dequant(quant(X)). GEAR approximates the residual E = X - D^ by a sparse part S plus a
// low-rank part L = A B^T, and the block is reconstructed as
//
//   X~ = D^ + S + A B^T            (GEAR Sec. 3: quantized backbone + low-rank + sparse)
//
// with every stored value rounded to IEEE binary16 (f16).
//
// Sparse part S: the k = gear_outliers(n, d, p) entries of E of largest |E| (ties: the lower
// flat index i * d + c first), each stored as its flat index and its f16 value. S is picked
// from the residual of the base quantizer, which is left unchanged; GEAR's Algorithm 1
// instead removes the outliers of X before quantizing. Values saturate to +-65504.
//
// Low-rank part A B^T (rank r = p.rank), fitted to R = E - S (S as stored, f16-rounded) by
// subspace (power) iteration, the solver GEAR uses in place of a full SVD:
//
//   Q_0 [d][r]: column j, entry c = u(mix64(gear_seed + j * d + c)), u(z) = (z >> 40) * 2^-24 - 1/2
//   Q <- orth(Q_0)
//   repeat p.iters times:  P <- orth(R Q),  Q <- orth(R^T P)
//   P <- orth(R Q)                                      (P [n][r]: orthonormal columns a_j)
//
// orth is modified Gram-Schmidt with a second (re-orthogonalisation) pass; a column whose
// norm falls to at most gear_dependence times its norm before projection (one in the span
// of the earlier columns, or zero) becomes zero and stays zero. Then, for each component j
// in order, with s_j = |R^T a_j|:
//
//   A_j = f16(a_j * sqrt(s_j))                          (A and B share the magnitude, which keeps
//   B_j = f16((R - sum_{i<j} A_i B_i^T)^T A_j / |A_j|^2)  both inside the range of f16)
//
// B_j is the least-squares fit of the deflated residual given the stored A_j, so each
// component never increases |R - A B^T|_F (rounding to nearest never moves an entry of B_j
// further from the fit than 0 does). S only lowers |E| entry by entry, so the corrected
// block is never further from X than D^ is, up to float rounding.
//
// Stored layout (gear_bytes(n, d, p) bytes, no padding, all little-endian):
//
//   [k indices]   flat index i * d + c, ascending; gear_index_bytes(n, d) bytes each
//   [k values]    f16 S values, in the order of the indices
//   [A]           n * r f16, token-major: A[i][j] at element i * r + j
//   [B^T]         r * d f16, component-major: B[c][j] at element j * d + c
//
// A fit is a deterministic function of its inputs for a given build (no randomness, no
// dependence on the prior contents of scratch or out). Nothing here allocates; scratch
// (gear_scratch_floats floats) comes from the caller.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "kvc/detail/assert.hpp"
#include "kvc/detail/half.hpp"
#include "kvc/detail/hash.hpp"
#include "kvc/version.hpp"

KVC_NAMESPACE_BEGIN
namespace detail {

struct gear_params {
  float outlier_fraction = 0.02f;  // s: fraction of the block's entries kept as sparse outliers
  int rank = 2;                    // r: rank of the low-rank part (0: none)
  int iters = 3;                   // subspace iteration steps (see above)
};

inline constexpr std::uint64_t gear_seed = 0x6EA4C0DE5EEDull;  // start of the subspace iteration
inline constexpr double gear_dependence = 1.0 / (1 << 20);     // orth: relative norm taken as zero

// k = ceil(s * n * d), clamped to [0, n * d]. The product is taken in double and shrunk by a
// relative 2^-22 before the ceiling, so that a float fraction meant to give an integer count
// gives it (0.1f * 10 -> 1, not 2); s <= 0 (or NaN) gives 0.
inline std::size_t gear_outliers(int n, int d, const gear_params& p) noexcept {
  const std::size_t total = static_cast<std::size_t>(n) * static_cast<std::size_t>(d);
  const double s = static_cast<double>(p.outlier_fraction);
  if (!(s > 0.0) || total == 0) return 0;
  if (s >= 1.0) return total;
  const double k = std::ceil(s * static_cast<double>(total) * (1.0 - 0x1.0p-22));
  return std::min(total, static_cast<std::size_t>(k));
}

// Bytes of one stored index: 2 (uint16) when every flat index fits, n * d <= 65536, else 4 (uint32).
constexpr std::size_t gear_index_bytes(int n, int d) noexcept {
  return static_cast<std::size_t>(n) * static_cast<std::size_t>(d) <= 65536u ? 2u : 4u;
}

inline std::size_t gear_rank(const gear_params& p) noexcept {
  return p.rank > 0 ? static_cast<std::size_t>(p.rank) : 0u;
}

// The sections of a stored correction of an [n][d] block (layout above): byte offsets of
// the values, A and B^T from the start, and the total.
struct gear_sections {
  std::size_t k = 0, index_bytes = 2, rank = 0;
  std::size_t values = 0, a = 0, bt = 0, bytes = 0;
};

inline gear_sections gear_sections_of(int n, int d, const gear_params& p) noexcept {
  gear_sections s;
  s.k = gear_outliers(n, d, p);
  s.index_bytes = gear_index_bytes(n, d);
  s.rank = gear_rank(p);
  s.values = s.k * s.index_bytes;
  s.a = s.values + 2u * s.k;
  s.bt = s.a + 2u * static_cast<std::size_t>(n) * s.rank;
  s.bytes = s.bt + 2u * static_cast<std::size_t>(d) * s.rank;
  return s;
}

// Exact stored bytes: k * (index + 2) for the sparse part, (n + d) * r * 2 for A and B.
inline std::size_t gear_bytes(int n, int d, const gear_params& p) noexcept { return gear_sections_of(n, d, p).bytes; }

// Scratch floats gear_fit needs: R [n][d] (first |E| for the selection), Q [r][d], P [r][n].
inline std::size_t gear_scratch_floats(int n, int d, const gear_params& p) noexcept {
  const std::size_t un = static_cast<std::size_t>(n), ud = static_cast<std::size_t>(d);
  if (gear_outliers(n, d, p) == 0 && gear_rank(p) == 0) return 0;
  return un * ud + (un + ud) * gear_rank(p);
}

// Little-endian stores and loads on unaligned bytes.
inline void gear_store16(std::byte* p, std::uint16_t v) noexcept {
  p[0] = static_cast<std::byte>(v & 0xFFu);
  p[1] = static_cast<std::byte>(v >> 8);
}
inline std::uint16_t gear_load16(const std::byte* p) noexcept {
  return static_cast<std::uint16_t>(static_cast<unsigned>(p[0]) | (static_cast<unsigned>(p[1]) << 8));
}
inline void gear_store_index(std::byte* p, std::size_t bytes, std::uint32_t v) noexcept {
  for (std::size_t b = 0; b < bytes; ++b) p[b] = static_cast<std::byte>((v >> (8 * b)) & 0xFFu);
}
inline std::uint32_t gear_load_index(const std::byte* p, std::size_t bytes) noexcept {
  std::uint32_t v = 0;
  for (std::size_t b = 0; b < bytes; ++b) v |= static_cast<std::uint32_t>(p[b]) << (8 * b);
  return v;
}

// The first of the k stored indices (ascending, `bytes` each) that is >= lo; k if none. The
// entries of rows [first, first + m) of the block are those from gear_first_index(.., first * d)
// up to the first index >= (first + m) * d.
inline std::size_t gear_first_index(const std::byte* idx, std::size_t bytes, std::size_t k, std::size_t lo) noexcept {
  std::size_t a = 0, b = k;
  while (a < b) {
    const std::size_t mid = a + (b - a) / 2;
    if (gear_load_index(idx + mid * bytes, bytes) < lo)
      a = mid + 1;
    else
      b = mid;
  }
  return a;
}

// f16 with saturation to the largest finite value instead of infinity.
inline std::uint16_t gear_half(float v) noexcept {
  return float_to_half_scalar(std::min(65504.0f, std::max(-65504.0f, v)));
}

// Modified Gram-Schmidt, two passes, on the r columns q[j * len, (j + 1) * len).
inline void gear_orthonormalize(float* q, std::size_t len, std::size_t r) noexcept {
  for (std::size_t j = 0; j < r; ++j) {
    float* v = q + j * len;
    double before = 0.0;
    for (std::size_t t = 0; t < len; ++t) before += static_cast<double>(v[t]) * v[t];
    before = std::sqrt(before);
    if (before > 0.0)
      for (int pass = 0; pass < 2; ++pass)
        for (std::size_t i = 0; i < j; ++i) {
          const float* u = q + i * len;
          double dot = 0.0;
          for (std::size_t t = 0; t < len; ++t) dot += static_cast<double>(u[t]) * v[t];
          if (dot != 0.0)
            for (std::size_t t = 0; t < len; ++t) v[t] = static_cast<float>(v[t] - dot * u[t]);
        }
    double after = 0.0;
    for (std::size_t t = 0; t < len; ++t) after += static_cast<double>(v[t]) * v[t];
    after = std::sqrt(after);
    const bool keep = before > 0.0 && after > gear_dependence * before;
    const double inv = keep ? 1.0 / after : 0.0;
    for (std::size_t t = 0; t < len; ++t) v[t] = keep ? static_cast<float>(v[t] * inv) : 0.0f;
  }
}

// p[j][i] = sum_c R[i][c] q[j][c]  (R [n][d]; q [r][d]; p [r][n]). Each sum runs in order of
// c; eight rows at a time, so that eight sums advance together instead of one waiting on the
// last addition.
inline void gear_mul_r(const float* rm, std::size_t n, std::size_t d, const float* q, std::size_t r,
                       float* p) noexcept {
  constexpr std::size_t rows = 8;
  for (std::size_t j = 0; j < r; ++j) {
    const float* qj = q + j * d;
    std::size_t i = 0;
    for (; i + rows <= n; i += rows) {
      const float* r0 = rm + i * d;
      double a[rows] = {};
      for (std::size_t c = 0; c < d; ++c) {
        const double x = qj[c];
        for (std::size_t k = 0; k < rows; ++k) a[k] += static_cast<double>(r0[k * d + c]) * x;
      }
      for (std::size_t k = 0; k < rows; ++k) p[j * n + i + k] = static_cast<float>(a[k]);
    }
    for (; i < n; ++i) {
      const float* row = rm + i * d;
      double acc = 0.0;
      for (std::size_t c = 0; c < d; ++c) acc += static_cast<double>(row[c]) * qj[c];
      p[j * n + i] = static_cast<float>(acc);
    }
  }
}

// q[j][c] = sum_i R[i][c] p[j][i]. Each sum runs in order of i; 64 channels advance together,
// row by row.
inline void gear_mul_rt(const float* rm, std::size_t n, std::size_t d, const float* p, std::size_t r,
                        float* q) noexcept {
  constexpr std::size_t block = 64;
  double acc[block];
  for (std::size_t j = 0; j < r; ++j) {
    const float* pj = p + j * n;
    for (std::size_t c0 = 0; c0 < d; c0 += block) {
      const std::size_t m = d - c0 < block ? d - c0 : block;
      for (std::size_t c = 0; c < m; ++c) acc[c] = 0.0;
      for (std::size_t i = 0; i < n; ++i) {
        const float* row = rm + i * d + c0;
        const double w = pj[i];
        for (std::size_t c = 0; c < m; ++c) acc[c] += static_cast<double>(row[c]) * w;
      }
      for (std::size_t c = 0; c < m; ++c) q[j * d + c0 + c] = static_cast<float>(acc[c]);
    }
  }
}

// The low-rank part of R [n][d] (see the file comment) into the A and B^T sections of the layout.
inline void gear_fit_low_rank(const float* rm, std::size_t n, std::size_t d, std::size_t r, int iters, float* scratch,
                              std::byte* a_out, std::byte* bt_out) noexcept {
  float* q = scratch;    // [r][d]
  float* p = q + r * d;  // [r][n]
  for (std::size_t j = 0; j < r; ++j)
    for (std::size_t c = 0; c < d; ++c)
      q[j * d + c] = static_cast<float>(static_cast<double>(mix64(gear_seed + j * d + c) >> 40) * 0x1.0p-24 - 0.5);
  gear_orthonormalize(q, d, r);
  for (int it = 0; it < iters; ++it) {
    gear_mul_r(rm, n, d, q, r, p);
    gear_orthonormalize(p, n, r);
    gear_mul_rt(rm, n, d, p, r, q);
    gear_orthonormalize(q, d, r);
  }
  gear_mul_r(rm, n, d, q, r, p);
  gear_orthonormalize(p, n, r);
  gear_mul_rt(rm, n, d, p, r, q);  // q_j = R^T a_j, |q_j| = s_j

  // A_j = f16(a_j sqrt(s_j)), kept in p as the float value of the stored f16.
  for (std::size_t j = 0; j < r; ++j) {
    double s = 0.0;
    for (std::size_t c = 0; c < d; ++c) s += static_cast<double>(q[j * d + c]) * q[j * d + c];
    const double scale = std::sqrt(std::sqrt(s));
    for (std::size_t i = 0; i < n; ++i) {
      const std::uint16_t h = gear_half(static_cast<float>(p[j * n + i] * scale));
      gear_store16(a_out + 2 * (i * r + j), h);
      p[j * n + i] = half_to_float_scalar(h);
    }
  }
  // B_j: least squares on the residual deflated by the stored components before j.
  gear_mul_rt(rm, n, d, p, r, q);  // q_j = R^T A_j
  for (std::size_t j = 0; j < r; ++j) {
    const float* aj = p + j * n;
    float* bj = q + j * d;
    double aa = 0.0;
    for (std::size_t t = 0; t < n; ++t) aa += static_cast<double>(aj[t]) * aj[t];
    if (aa > 0.0) {
      for (std::size_t i = 0; i < j; ++i) {
        const float* ai = p + i * n;
        double g = 0.0;
        for (std::size_t t = 0; t < n; ++t) g += static_cast<double>(ai[t]) * aj[t];
        if (g != 0.0)
          for (std::size_t c = 0; c < d; ++c) bj[c] = static_cast<float>(bj[c] - g * q[i * d + c]);
      }
    }
    const double inv = aa > 0.0 ? 1.0 / aa : 0.0;
    for (std::size_t c = 0; c < d; ++c) {
      const std::uint16_t h = gear_half(static_cast<float>(bj[c] * inv));
      gear_store16(bt_out + 2 * (j * d + c), h);
      bj[c] = half_to_float_scalar(h);
    }
  }
}

// Fits the correction of residual [n][d] (E = X - D^, finite) and writes gear_bytes(n, d, p)
// bytes to out in the layout above. Requires n, d >= 1, n * d <= 2^32, p.rank >= 0,
// p.iters >= 0; scratch holds gear_scratch_floats(n, d, p) floats (contents irrelevant).
inline void gear_fit(const float* residual, int n, int d, const gear_params& p, float* scratch,
                     std::byte* out) noexcept {
  KVC_ASSERT(n > 0 && d > 0 && p.rank >= 0 && p.iters >= 0);
  const std::size_t un = static_cast<std::size_t>(n), ud = static_cast<std::size_t>(d);
  const std::size_t total = un * ud;
  KVC_ASSERT(static_cast<std::uint64_t>(total) <= (std::uint64_t{1} << 32));
  const gear_sections sec = gear_sections_of(n, d, p);
  const std::size_t k = sec.k, ib = sec.index_bytes, r = sec.rank;
  std::byte* idx_out = out;
  std::byte* val_out = out + sec.values;
  std::byte* a_out = out + sec.a;
  std::byte* bt_out = out + sec.bt;
  float* rm = scratch;  // [n][d]: |E| for the selection, then R = E - S

  if (k > 0) {
    // The k-th largest magnitude t; every entry above t is taken, and the lowest-index
    // entries equal to t up to k in all.
    for (std::size_t i = 0; i < total; ++i) rm[i] = std::fabs(residual[i]);
    std::nth_element(rm, rm + (total - k), rm + total);
    const float t = rm[total - k];
    std::size_t above = 0;
    for (std::size_t i = 0; i < total; ++i) above += std::fabs(residual[i]) > t ? 1u : 0u;
    std::size_t ties = k - above;  // >= 1
    std::size_t taken = 0;
    std::copy(residual, residual + total, rm);
    for (std::size_t i = 0; i < total; ++i) {
      const float e = residual[i];
      const float m = std::fabs(e);
      if (!(m >= t)) continue;  // nearly every entry
      if (m == t) {
        if (ties == 0) continue;
        --ties;
      }
      const std::uint16_t h = gear_half(e);
      gear_store_index(idx_out + taken * ib, ib, static_cast<std::uint32_t>(i));
      gear_store16(val_out + 2 * taken, h);
      ++taken;
      rm[i] = e - half_to_float_scalar(h);
    }
    KVC_ASSERT(taken == k);
  } else if (r > 0) {
    std::copy(residual, residual + total, rm);
  }
  if (r > 0) gear_fit_low_rank(rm, un, ud, r, p.iters, scratch + total, a_out, bt_out);
}

// Adds the stored correction (S + A B^T) to rows [first, first + count) of the block:
// rows [count][d] holds those rows. Per entry, the low-rank terms are added in order of j,
// then the sparse value, so any row range gives the same floats as gear_apply.
inline void gear_apply_rows(const std::byte* in, int n, int d, const gear_params& p, int first, int count,
                            float* rows) noexcept {
  KVC_ASSERT(first >= 0 && count >= 0 && first + count <= n);
  const std::size_t ud = static_cast<std::size_t>(d);
  const gear_sections sec = gear_sections_of(n, d, p);
  const std::size_t k = sec.k, ib = sec.index_bytes, r = sec.rank;
  const std::byte* idx_in = in;
  const std::byte* val_in = in + sec.values;
  const std::byte* a_in = in + sec.a;
  const std::byte* bt_in = in + sec.bt;
  const std::size_t f = static_cast<std::size_t>(first), m = static_cast<std::size_t>(count);

  for (std::size_t t = 0; t < m; ++t) {
    float* x = rows + t * ud;
    const std::byte* arow = a_in + 2 * (f + t) * r;
    for (std::size_t j = 0; j < r; ++j) {
      const float a = half_to_float_scalar(gear_load16(arow + 2 * j));
      if (a == 0.0f) continue;
      const std::byte* bj = bt_in + 2 * j * ud;
      for (std::size_t c = 0; c < ud; ++c) x[c] += a * half_to_float_branchless(gear_load16(bj + 2 * c));
    }
  }

  // Sparse part: indices ascend, so the range's entries are one run found by bisection.
  const std::size_t lo = f * ud, hi = (f + m) * ud;
  for (std::size_t e = gear_first_index(idx_in, ib, k, lo); e < k; ++e) {
    const std::size_t idx = gear_load_index(idx_in + e * ib, ib);
    if (idx >= hi) break;
    rows[idx - lo] += half_to_float_scalar(gear_load16(val_in + 2 * e));
  }
}

// Adds the stored correction to the whole block x [n][d].
inline void gear_apply(const std::byte* in, int n, int d, const gear_params& p, float* x) noexcept {
  gear_apply_rows(in, n, d, p, 0, n, x);
}

}  // namespace detail
KVC_NAMESPACE_END
