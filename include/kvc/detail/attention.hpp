// kvc/detail/attention.hpp: the tile kernel of attend(): online softmax over tiles
// of at most attn_tile tokens for a block of at most attn_rows query rows.
//
// A "row" is one (query, query head) pair of a KV head's group. For each row the kernel
// keeps the running maximum m, the running denominator l and the unnormalised output
// acc (in the caller's output buffer); a tile updates them as in FlashAttention:
//   m' = max(m, max_t s_t),  l' = l e^(m - m') + sum_t e^(s_t - m'),
//   acc' = acc e^(m - m') + sum_t e^(s_t - m') v_t,
// with s_t = q.k_t / sqrt(d) + log_weight_t, and s_t = -inf for position_t > position_q.
// Nothing here grows with the context.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "kvc/codecs/codec.hpp"
#include "kvc/detail/half.hpp"
#include "kvc/version.hpp"

// The AVX2 + FMA kernel is compiled in when the compiler targets those instructions
// (-mavx2 -mfma, -march=native on x86-64 since 2013); otherwise the portable loops run.
#if defined(__AVX2__) && defined(__FMA__)
#define KVC_ATTEND_AVX2 1
#include <immintrin.h>
#else
#define KVC_ATTEND_AVX2 0
#endif

KVC_NAMESPACE_BEGIN
namespace detail {

inline constexpr int attn_tile = 16;  // tokens per tile
inline constexpr int attn_rows = 64;  // query rows per pass over a stream

inline constexpr bool attend_simd = KVC_ATTEND_AVX2 != 0;  // the AVX2 + FMA kernel is in use
#if defined(__F16C__)
inline constexpr bool attend_f16c = true;  // binary16 rows are widened in registers
#else
inline constexpr bool attend_f16c = false;
#endif

// e^x for x <= 0 (including -inf, which gives exactly 0). Relative error below 2e-7 on
// [-87, 0]; e^x for x < -87 (below 1.7e-38) is returned as 0. Branch-free so that loops
// over it vectorise.
inline float exp_nonpositive(float x) noexcept {
  const float xc = x < -87.0f ? -87.0f : x;
  const float t = xc * 1.44269504088896341f;
  const int n = static_cast<int>(t - 0.5f);  // round to nearest for t <= 0
  const float nf = static_cast<float>(n);
  // r = x - n ln2, in two parts for accuracy; |r| <= ln2 / 2.
  const float r = (xc - nf * 0.693359375f) + nf * 2.12194440e-4f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const std::uint32_t bits = static_cast<std::uint32_t>(n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.0f ? 0.0f : p * scale;
}

inline float dot(const float* a, const float* b, int n) noexcept {
  float acc[16] = {};
  int i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
  float tail = 0.0f;
  for (; i < n; ++i) tail += a[i] * b[i];
  for (int w = 8; w > 0; w >>= 1)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0] + tail;
}

// Running state of one block of rows.
struct row_block {
  int n = 0;                  // rows in use
  const float* q[attn_rows];  // [n][head_dim]
  float* acc[attn_rows];      // [n][head_dim], the caller's output rows
  std::int32_t q_pos[attn_rows];
  float m[attn_rows];
  float l[attn_rows];
  std::int32_t min_pos, max_pos;  // over q_pos
  std::uintptr_t fetched_page;    // the 4 KiB page of memory the kernel read last (see tile_fetcher)

  void reset(int head_dim) noexcept {
    fetched_page = ~std::uintptr_t{0};
    min_pos = std::numeric_limits<std::int32_t>::max();
    max_pos = std::numeric_limits<std::int32_t>::min();
    for (int r = 0; r < n; ++r) {
      m[r] = -std::numeric_limits<float>::infinity();
      l[r] = 0.0f;
      std::memset(acc[r], 0, sizeof(float) * static_cast<std::size_t>(head_dim));
      if (q_pos[r] < min_pos) min_pos = q_pos[r];
      if (q_pos[r] > max_pos) max_pos = q_pos[r];
    }
  }

  // acc /= l; rows that saw no visible token get zeros.
  void finish(int head_dim) noexcept {
    for (int r = 0; r < n; ++r) {
      const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
      for (int k = 0; k < head_dim; ++k) acc[r][k] *= inv;
    }
  }
};

// Where the tile after the current one lies, so that the kernel can start fetching it
// while it works on this one. Empty: nothing follows.
struct tile_prefetch {
  const void* keys = nullptr;
  const void* values = nullptr;
  std::size_t key_bytes = 0, value_bytes = 0;
  const void* positions = nullptr;
  const void* log_weights = nullptr;
};

// Fetches the tile after the current one while a kernel works on this one: its keys a slice
// per step of the score loop, its values (then its positions and log-weights) a slice per
// step of the output loop. Decode attention reads every byte of the cache once, so it runs
// at memory speed only if the next lines are in flight while the current ones are computed
// on; spread out like this, the requests keep memory busy without flooding the miss buffers.
//
// Pages lie in 4 KiB pages of virtual memory, which hardware prefetchers do not cross and
// where a plain software prefetch that misses the TLB may be dropped (on Zen 3 it is). So
// the first line fetched in each 4 KiB page gets a request that walks the page table: a
// PREFETCHW where the target has it (it does not hold up retirement), a demand load
// otherwise; the other lines get a prefetch hint. Bytes read are folded into a value that
// the destructor makes observable, so that the loads are not optimised away.
class tile_fetcher {
 public:
  // `page` carries the last page read from one tile to the next.
  tile_fetcher(const tile_prefetch* next, std::uintptr_t& page) noexcept : next_(next), page_(page) {}
  tile_fetcher(const tile_fetcher&) = delete;
  tile_fetcher& operator=(const tile_fetcher&) = delete;
  ~tile_fetcher() {
    volatile std::uint32_t sink = read_;
    static_cast<void>(sink);
  }

  void keys(int part, int parts) noexcept {
    if (next_ != nullptr) fetch(next_->keys, next_->key_bytes, part, parts);
  }
  void values(int part, int parts) noexcept {
    if (next_ == nullptr) return;
    fetch(next_->values, next_->value_bytes, part, parts);
    if (part == parts - 1) {
      fetch(next_->positions, sizeof(std::int32_t) * attn_tile, 0, 1);
      fetch(next_->log_weights, sizeof(float) * attn_tile, 0, 1);
    }
  }

 private:
  // Part `part` of `parts` of the cache lines of [p, p + bytes).
  void fetch(const void* p, std::size_t bytes, int part, int parts) noexcept {
    if (p == nullptr || bytes == 0) return;
    const unsigned char* c = static_cast<const unsigned char*>(p);
    const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(p);
    const std::uintptr_t first = a / 64;
    const std::uintptr_t lines = (a + bytes - 1) / 64 - first + 1;
    const std::uintptr_t per = (lines + static_cast<std::uintptr_t>(parts) - 1) / static_cast<std::uintptr_t>(parts);
    const std::uintptr_t lo = static_cast<std::uintptr_t>(part) * per;
    const std::uintptr_t hi = lo + per < lines ? lo + per : lines;
    for (std::uintptr_t i = lo; i < hi; ++i) {
      const std::uintptr_t line = (first + i) * 64;
      const std::size_t at = line > a ? line - a : 0;
      if (line / 4096 != page_) {
        page_ = line / 4096;
#if defined(__PRFCHW__) && (defined(__GNUC__) || defined(__clang__))
        __builtin_prefetch(c + at, 1, 3);
#else
        read_ += c[at];
#endif
      } else {
#if defined(__GNUC__) || defined(__clang__)
        __builtin_prefetch(c + at, 0, 3);
#endif
      }
    }
  }

  const tile_prefetch* next_;
  std::uintptr_t& page_;  // the 4 KiB page read last
  std::uint32_t read_ = 0;
};

// Portable form of attend_tile: the same blocking as the SIMD kernel (up to four rows
// against each key, so each key and value row is read once per four rows), written as
// plain loops over eight lanes that compilers vectorise.
template <int R>
inline void tile_rows_portable(row_block& b, int r0, const float* keys, const float* values, const std::int32_t* pos,
                               const float* log_w, int T, int d, float scale, const tile_prefetch* next) noexcept {
  constexpr float ninf = -std::numeric_limits<float>::infinity();
  const float* q[R];
  for (int r = 0; r < R; ++r) q[r] = b.q[r0 + r];
  const int d8 = d & ~7;
  float s[attn_tile][R];
  tile_fetcher fetch(next, b.fetched_page);
  // 1. Scores.
  for (int t = 0; t < T; ++t) {
    fetch.keys(t, T);
    const float* k = keys + static_cast<std::size_t>(t) * d;
    float a[R][8] = {};
    for (int e = 0; e < d8; e += 8)
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < 8; ++j) a[r][j] += q[r][e + j] * k[e + j];
    for (int r = 0; r < R; ++r) {
      float x = ((a[r][0] + a[r][1]) + (a[r][2] + a[r][3])) + ((a[r][4] + a[r][5]) + (a[r][6] + a[r][7]));
      for (int e = d8; e < d; ++e) x += q[r][e] * k[e];
      s[t][r] = pos[t] <= b.q_pos[r0 + r] ? x * scale + log_w[t] : ninf;
    }
  }
  // 2. Online softmax, per row.
  float corr[R];
  bool any = false;
  for (int r = 0; r < R; ++r) {
    float mx = ninf;
    for (int t = 0; t < T; ++t) mx = s[t][r] > mx ? s[t][r] : mx;
    if (mx == ninf) {  // nothing visible to this row in this tile
      corr[r] = 1.0f;
      for (int t = 0; t < T; ++t) s[t][r] = 0.0f;
      continue;
    }
    any = true;
    const float m_new = mx > b.m[r0 + r] ? mx : b.m[r0 + r];
    corr[r] = exp_nonpositive(b.m[r0 + r] - m_new);
    float sum = 0.0f;
    for (int t = 0; t < T; ++t) {
      s[t][r] = exp_nonpositive(s[t][r] - m_new);
      sum += s[t][r];
    }
    b.l[r0 + r] = b.l[r0 + r] * corr[r] + sum;
    b.m[r0 + r] = m_new;
  }
  const int slabs = d / 8 > 0 ? d / 8 : 1;
  if (!any) {
    fetch.values(0, 1);
    return;
  }
  // 3. acc = acc * corr + sum_t p_t v_t, eight lanes of every row at a time.
  float* acc[R];
  for (int r = 0; r < R; ++r) acc[r] = b.acc[r0 + r];
  if (d < 8) fetch.values(0, 1);
  int e = 0;
  for (; e + 8 <= d; e += 8) {
    fetch.values(e / 8, slabs);
    float a[R][8];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 8; ++j) a[r][j] = acc[r][e + j] * corr[r];
    for (int t = 0; t < T; ++t) {
      const float* v = values + static_cast<std::size_t>(t) * d + e;
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < 8; ++j) a[r][j] += s[t][r] * v[j];
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 8; ++j) acc[r][e + j] = a[r][j];
  }
  for (; e < d; ++e)
    for (int r = 0; r < R; ++r) {
      float a = acc[r][e] * corr[r];
      for (int t = 0; t < T; ++t) a += s[t][r] * values[static_cast<std::size_t>(t) * d + e];
      acc[r][e] = a;
    }
}

inline void attend_tile_portable(row_block& b, const float* keys, const float* values, const std::int32_t* pos,
                                 const float* log_w, int T, int head_dim, float scale,
                                 const tile_prefetch& next) noexcept {
  int r0 = 0;
  for (; r0 + 4 <= b.n; r0 += 4)
    tile_rows_portable<4>(b, r0, keys, values, pos, log_w, T, head_dim, scale, r0 == 0 ? &next : nullptr);
  const tile_prefetch* pf = r0 == 0 ? &next : nullptr;
  switch (b.n - r0) {
    case 3:
      tile_rows_portable<3>(b, r0, keys, values, pos, log_w, T, head_dim, scale, pf);
      break;
    case 2:
      tile_rows_portable<2>(b, r0, keys, values, pos, log_w, T, head_dim, scale, pf);
      break;
    case 1:
      tile_rows_portable<1>(b, r0, keys, values, pos, log_w, T, head_dim, scale, pf);
      break;
    default:
      break;
  }
}

#if KVC_ATTEND_AVX2
namespace avx2 {

// Eight elements of a row, widened to float in registers.
template <element_type E>
inline __m256 load8(const void* base, std::size_t i) noexcept {
  static_assert(E == element_type::f32 || E == element_type::f16 || E == element_type::bf16,
                "kvc: no in-register load for this element type");
  if constexpr (E == element_type::f32) {
    return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const std::uint16_t*>(base) + i));
    if constexpr (E == element_type::f16) {
#if defined(__F16C__)
      return _mm256_cvtph_ps(h);
#else
      static_cast<void>(h);  // unreachable: reads_in_place(f16) is false without F16C
      return _mm256_setzero_ps();
#endif
    } else {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }
}

template <element_type E>
inline float load1(const void* base, std::size_t i) noexcept {
  if constexpr (E == element_type::f32) {
    return static_cast<const float*>(base)[i];
  } else if constexpr (E == element_type::f16) {
    return half_to_float_scalar(static_cast<const std::uint16_t*>(base)[i]);
  } else {
    return bf16_to_float_scalar(static_cast<const std::uint16_t*>(base)[i]);
  }
}

// Keeps a loaded value in a register. Without it compilers fold the load into every FMA
// that uses it, and the loops run out of load ports before they run out of FMA units.
inline __m256 in_reg(__m256 x) noexcept {
#if defined(__GNUC__) || defined(__clang__)
  __asm__("" : "+x"(x));
#endif
  return x;
}

// exp_nonpositive on eight lanes: the same reduction and polynomial, with fused
// multiply-adds (at least as accurate).
inline __m256 exp_nonpositive8(__m256 x) noexcept {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 xc = _mm256_max_ps(x, lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), y);
}

// Lane sums of four vectors: {sum a0, sum a1, sum a2, sum a3}.
inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) noexcept {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// Rows [r0, r0 + R) of the block (R <= 4) against one tile. Scores are kept token-major,
// four rows per token, so that two tokens fill one vector in the softmax step.
template <int R, element_type KE, element_type VE>
inline void tile_rows(row_block& b, int r0, const void* keys, const void* values, const std::int32_t* pos,
                      const float* log_w, int T, int d, float scale, const tile_prefetch* next) noexcept {
  static_assert(R >= 1 && R <= 4, "kvc: tile_rows handles one to four rows");
  const float* q[R];
  for (int r = 0; r < R; ++r) q[r] = b.q[r0 + r];
  const int d8 = d & ~7;
  alignas(32) float s[attn_tile * 4];

  // 1. Dot products, two keys at a time, each key chunk loaded (and widened) once for all
  //    rows. The next tile's keys are fetched a slice per key pair.
  const int pairs = (T + 1) / 2;
  tile_fetcher fetch(next, b.fetched_page);
  int t = 0;
  for (; t + 2 <= T; t += 2) {
    fetch.keys(t / 2, pairs);
    __m256 a0[4], a1[4];
    for (int r = 0; r < 4; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
    const std::size_t o0 = static_cast<std::size_t>(t) * d, o1 = o0 + static_cast<std::size_t>(d);
    for (int e = 0; e < d8; e += 8) {
      const __m256 k0 = in_reg(load8<KE>(keys, o0 + e)), k1 = in_reg(load8<KE>(keys, o1 + e));
      for (int r = 0; r < R; ++r) {
        const __m256 qv = in_reg(_mm256_loadu_ps(q[r] + e));
        a0[r] = _mm256_fmadd_ps(qv, k0, a0[r]);
        a1[r] = _mm256_fmadd_ps(qv, k1, a1[r]);
      }
    }
    _mm_store_ps(s + 4 * t, hsum4(a0[0], a0[1], a0[2], a0[3]));
    _mm_store_ps(s + 4 * t + 4, hsum4(a1[0], a1[1], a1[2], a1[3]));
    for (int e = d8; e < d; ++e) {
      const float k0 = load1<KE>(keys, o0 + e), k1 = load1<KE>(keys, o1 + e);
      for (int r = 0; r < R; ++r) {
        s[4 * t + r] += q[r][e] * k0;
        s[4 * t + 4 + r] += q[r][e] * k1;
      }
    }
  }
  if (t < T) {
    fetch.keys(t / 2, pairs);
    __m256 a0[4];
    for (int r = 0; r < 4; ++r) a0[r] = _mm256_setzero_ps();
    const std::size_t o0 = static_cast<std::size_t>(t) * d;
    for (int e = 0; e < d8; e += 8) {
      const __m256 k0 = in_reg(load8<KE>(keys, o0 + e));
      for (int r = 0; r < R; ++r) a0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q[r] + e), k0, a0[r]);
    }
    _mm_store_ps(s + 4 * t, hsum4(a0[0], a0[1], a0[2], a0[3]));
    _mm_store_ps(s + 4 * t + 4, _mm_setzero_ps());  // the padding token, masked below
    for (int e = d8; e < d; ++e) {
      const float k0 = load1<KE>(keys, o0 + e);
      for (int r = 0; r < R; ++r) s[4 * t + r] += q[r][e] * k0;
    }
  }

  // 2. Scale, log-weight, causal mask (and padding past T) to -inf; running maxima.
  alignas(16) std::int32_t qp[4];
  for (int r = 0; r < 4; ++r) qp[r] = b.q_pos[r0 + (r < R ? r : 0)];
  const __m256i qpv = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(qp)));
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256 scv = _mm256_set1_ps(scale);
  __m256 mx = ninf;
  for (t = 0; t < T; t += 2) {
    const bool two = t + 1 < T;
    const __m256 lw = _mm256_set_m128(_mm_set1_ps(two ? log_w[t + 1] : 0.0f), _mm_set1_ps(log_w[t]));
    const __m256i pv = _mm256_set_m128i(_mm_set1_epi32(two ? pos[t + 1] : 0), _mm_set1_epi32(pos[t]));
    __m256 hidden = _mm256_castsi256_ps(_mm256_cmpgt_epi32(pv, qpv));
    if (!two) hidden = _mm256_or_ps(hidden, _mm256_castsi256_ps(_mm256_set_epi32(-1, -1, -1, -1, 0, 0, 0, 0)));
    const __m256 sv = _mm256_blendv_ps(_mm256_fmadd_ps(_mm256_load_ps(s + 4 * t), scv, lw), ninf, hidden);
    _mm256_store_ps(s + 4 * t, sv);
    mx = _mm256_max_ps(mx, sv);
  }
  const __m128 tile_max = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  const int used = (1 << R) - 1;
  if ((_mm_movemask_ps(_mm_cmpeq_ps(tile_max, _mm256_castps256_ps128(ninf))) & used) == used) {
    fetch.values(0, 1);
    return;
  }

  // 3. Online softmax update: m' = max(m, tile max); corr = e^(m - m'); p = e^(s - m').
  //    Rows that have seen nothing yet (m' = -inf) subtract 0 instead, giving p = corr = 0.
  alignas(16) float m_old[4], l_old[4];
  for (int r = 0; r < 4; ++r) {
    m_old[r] = r < R ? b.m[r0 + r] : -std::numeric_limits<float>::infinity();
    l_old[r] = r < R ? b.l[r0 + r] : 0.0f;
  }
  const __m128 m_prev = _mm_load_ps(m_old);
  const __m128 m_new = _mm_max_ps(m_prev, tile_max);
  const __m128 m_sub = _mm_andnot_ps(_mm_cmpeq_ps(m_new, _mm256_castps256_ps128(ninf)), m_new);
  const __m256 m_sub2 = _mm256_set_m128(m_sub, m_sub);
  alignas(16) float corr[4];
  _mm_store_ps(corr, _mm256_castps256_ps128(exp_nonpositive8(_mm256_castps128_ps256(_mm_sub_ps(m_prev, m_sub)))));
  __m256 sum = _mm256_setzero_ps();
  for (t = 0; t < T; t += 2) {
    const __m256 p = exp_nonpositive8(_mm256_sub_ps(_mm256_load_ps(s + 4 * t), m_sub2));
    _mm256_store_ps(s + 4 * t, p);
    sum = _mm256_add_ps(sum, p);
  }
  alignas(16) float l_new[4], m_out[4];
  _mm_store_ps(l_new, _mm_fmadd_ps(_mm_load_ps(l_old), _mm_load_ps(corr),
                                   _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1))));
  _mm_store_ps(m_out, m_new);
  for (int r = 0; r < R; ++r) {
    b.m[r0 + r] = m_out[r];
    b.l[r0 + r] = l_new[r];
  }

  // 4. acc = acc * corr + sum_t p_t v_t, sixteen lanes of every row at a time, each value
  //    chunk loaded (and widened) once for all rows. The next tile's values are fetched a
  //    slice per sixteen lanes.
  float* acc[R];
  for (int r = 0; r < R; ++r) acc[r] = b.acc[r0 + r];
  const int slabs = d / 16;
  if (slabs == 0) fetch.values(0, 1);
  int e = 0;
  for (; e + 16 <= d; e += 16) {
    fetch.values(e / 16, slabs);
    __m256 a0[R], a1[R];
    for (int r = 0; r < R; ++r) {
      const __m256 c = _mm256_set1_ps(corr[r]);
      a0[r] = _mm256_mul_ps(_mm256_loadu_ps(acc[r] + e), c);
      a1[r] = _mm256_mul_ps(_mm256_loadu_ps(acc[r] + e + 8), c);
    }
    for (t = 0; t < T; ++t) {
      const std::size_t o = static_cast<std::size_t>(t) * d + static_cast<std::size_t>(e);
      const __m256 v0 = in_reg(load8<VE>(values, o)), v1 = in_reg(load8<VE>(values, o + 8));
      for (int r = 0; r < R; ++r) {
        const __m256 p = _mm256_broadcast_ss(s + 4 * t + r);
        a0[r] = _mm256_fmadd_ps(p, v0, a0[r]);
        a1[r] = _mm256_fmadd_ps(p, v1, a1[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(acc[r] + e, a0[r]);
      _mm256_storeu_ps(acc[r] + e + 8, a1[r]);
    }
  }
  if (e + 8 <= d) {
    __m256 a0[R];
    for (int r = 0; r < R; ++r) a0[r] = _mm256_mul_ps(_mm256_loadu_ps(acc[r] + e), _mm256_set1_ps(corr[r]));
    for (t = 0; t < T; ++t) {
      const __m256 v0 = in_reg(load8<VE>(values, static_cast<std::size_t>(t) * d + static_cast<std::size_t>(e)));
      for (int r = 0; r < R; ++r) a0[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(s + 4 * t + r), v0, a0[r]);
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(acc[r] + e, a0[r]);
    e += 8;
  }
  for (; e < d; ++e)
    for (int r = 0; r < R; ++r) {
      float a = acc[r][e] * corr[r];
      for (t = 0; t < T; ++t) a += s[4 * t + r] * load1<VE>(values, static_cast<std::size_t>(t) * d + e);
      acc[r][e] = a;
    }
}

template <element_type KE, element_type VE>
inline void attend_tile(row_block& b, const void* keys, const void* values, const std::int32_t* pos, const float* log_w,
                        int T, int head_dim, float scale, const tile_prefetch& next) noexcept {
  int r0 = 0;
  for (; r0 + 4 <= b.n; r0 += 4)
    tile_rows<4, KE, VE>(b, r0, keys, values, pos, log_w, T, head_dim, scale, r0 == 0 ? &next : nullptr);
  const tile_prefetch* pf = r0 == 0 ? &next : nullptr;
  switch (b.n - r0) {
    case 3:
      tile_rows<3, KE, VE>(b, r0, keys, values, pos, log_w, T, head_dim, scale, pf);
      break;
    case 2:
      tile_rows<2, KE, VE>(b, r0, keys, values, pos, log_w, T, head_dim, scale, pf);
      break;
    case 1:
      tile_rows<1, KE, VE>(b, r0, keys, values, pos, log_w, T, head_dim, scale, pf);
      break;
    default:
      break;
  }
}

}  // namespace avx2
#endif  // KVC_ATTEND_AVX2

// Masked, scaled logits of one query row over T tokens, in place: s[t] = s[t] * scale +
// log_w[t] where pos[t] <= q_pos, -inf elsewhere. Returns the largest.
inline float mask_logits(float* s, const std::int32_t* pos, const float* log_w, int T, std::int32_t q_pos,
                         float scale) noexcept {
  constexpr float ninf = -std::numeric_limits<float>::infinity();
  float mx = ninf;
  int t = 0;
#if KVC_ATTEND_AVX2
  __m256 m8 = _mm256_set1_ps(ninf);
  const __m256i q8 = _mm256_set1_epi32(q_pos);
  const __m256 sc8 = _mm256_set1_ps(scale), ninf8 = _mm256_set1_ps(ninf);
  for (; t + 8 <= T; t += 8) {
    const __m256 hidden =
        _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pos + t)), q8));
    const __m256 x =
        _mm256_blendv_ps(_mm256_fmadd_ps(_mm256_loadu_ps(s + t), sc8, _mm256_loadu_ps(log_w + t)), ninf8, hidden);
    _mm256_storeu_ps(s + t, x);
    m8 = _mm256_max_ps(m8, x);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m8);
  for (float v : lanes) mx = v > mx ? v : mx;
#endif
  for (; t < T; ++t) {
    s[t] = pos[t] <= q_pos ? s[t] * scale + log_w[t] : ninf;
    mx = s[t] > mx ? s[t] : mx;
  }
  return mx;
}

// s[t] = e^(s[t] - m) for t < T (m >= every s[t]); returns their sum.
inline float exp_shifted_sum(float* s, int T, float m) noexcept {
  float sum = 0.0f;
  int t = 0;
#if KVC_ATTEND_AVX2
  __m256 acc = _mm256_setzero_ps();
  const __m256 m8 = _mm256_set1_ps(m);
  for (; t + 8 <= T; t += 8) {
    const __m256 p = avx2::exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(s + t), m8));
    _mm256_storeu_ps(s + t, p);
    acc = _mm256_add_ps(acc, p);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
#endif
  for (; t < T; ++t) {
    s[t] = exp_nonpositive(s[t] - m);
    sum += s[t];
  }
  return sum;
}

// True when attend_tile_in_place reads rows of this element type straight from a page.
constexpr bool reads_in_place(element_type e) noexcept {
  return e == element_type::f32 || (attend_simd && e == element_type::bf16) ||
         (attend_simd && attend_f16c && e == element_type::f16);
}

// One tile of T tokens: keys and values [T][head_dim] float, positions and log-weights [T];
// `next` is the tile that follows, fetched meanwhile.
inline void attend_tile(row_block& b, const float* keys, const float* values, const std::int32_t* pos,
                        const float* log_w, int T, int head_dim, float scale,
                        const tile_prefetch& next = tile_prefetch{}) noexcept {
#if KVC_ATTEND_AVX2
  avx2::attend_tile<element_type::f32, element_type::f32>(b, keys, values, pos, log_w, T, head_dim, scale, next);
#else
  attend_tile_portable(b, keys, values, pos, log_w, T, head_dim, scale, next);
#endif
}

// The same, with keys and values [T][head_dim] of the given element types, read where
// they lie (widened to float in registers). Needs reads_in_place(KE) and reads_in_place(VE).
template <element_type KE, element_type VE>
inline void attend_tile_in_place(row_block& b, const void* keys, const void* values, const std::int32_t* pos,
                                 const float* log_w, int T, int head_dim, float scale,
                                 const tile_prefetch& next = tile_prefetch{}) noexcept {
  static_assert(reads_in_place(KE) && reads_in_place(VE), "kvc: this build cannot read these rows in place");
#if KVC_ATTEND_AVX2
  avx2::attend_tile<KE, VE>(b, keys, values, pos, log_w, T, head_dim, scale, next);
#else
  attend_tile_portable(b, static_cast<const float*>(keys), static_cast<const float*>(values), pos, log_w, T, head_dim,
                       scale, next);
#endif
}

}  // namespace detail
KVC_NAMESPACE_END
