// kvc/codecs/detail/code_kernels.hpp: attention arithmetic read straight from bit-packed
// low-bit codes; no dequantised copy of a row is ever written.
//
// A row holds `d` unsigned B-bit codes, B in {2, 3, 4, 8}, in the packed layout of the
// quantised codecs: full blocks of 32 codes, block k in 4B bytes from byte 4Bk (B = 8: byte
// j is code j; B = 4: byte j holds codes j and j + 16 in its low and high nibble; B = 2: byte
// j holds codes j, j + 8, j + 16, j + 24 from bit 0 up; B = 3: a B = 2 block of the low two
// bits, then a little-endian 32-bit word whose bit j is bit 2 of code j), then the d % 32
// remaining codes packed sequentially, code i at bit i B.
//
// With asymmetric quantisation x~ = z + s q (KIVI, Liu et al. 2024, Sec. 3):
//   keys, quantised per channel c:  q . k~_t = sum_c (q_c s_c) q_{t,c} + sum_c q_c z_c,
//     dot_code_rows computes sum_c w_c q_{t,c}; the caller folds w = q * s and adds the
//     zero-point term;
//   values, quantised per token in groups of `group` channels, k = c / group:
//     sum_t p_t v~_{t,c} = sum_t (p_t s_{t,k}) q_{t,c} + sum_t p_t z_{t,k},
//     accumulate_code_rows adds both terms into acc.
// int8 symmetric rows (x~ = s_t q, q signed) have the same two kernels with one scale a row.
//
// Each kernel takes nq query rows at once (the query heads of a GQA group): every code is
// unpacked once, into registers, and used for all of them (four at a time).
//
// With AVX2, B = 2, 4 and 8 at head_dim a multiple of 32 up to 256 take the integer kernels
// ("Integer kernels" below): the weights (q s for keys, p s for values) are rounded to 16-bit
// integers, one scale per query row (and per value group and chunk of 64 rows), and multiplied
// with the codes widened to 16 bits by VPMADDWD: no conversion of codes to float, sixteen
// products an instruction. Their results differ from the exact sums by the rounding of the
// weights, at most 2^-16 of a row's largest weight per code unit (documented there, and
// tested); integer_code_kernels<Bits>(d, group) says where they run. Callers that ask for
// 8-bit weights (WeightBits = 8: codec::weights8) get the byte kernels for B = 2 and 4 ("Byte
// kernels" below): weights rounded to 8 bits and multiplied with the codes as bytes by
// VPMADDUBSW, 32 products an instruction, off by at most 2^-8 of a row's largest weight per
// code unit; byte_code_kernels<Bits>(d, group) says where they run. Otherwise (B = 3, other
// head_dims, int8's signed codes) the float kernels run, with eight to twelve independent FMA
// chains. The AVX2 + FMA kernels turn eight 2- or 4-bit codes into
// floats with a broadcast load, a mask and a conversion, without moving the codes (see
// "Vectors of codes" below); the resulting lane order and scale are folded into the query
// rows (keys) or undone once per chunk of rows (values). Rows ahead are prefetched.
// The float kernels' results equal the sums in exact arithmetic up to float rounding of terms
// of magnitude |w| (code + 2^(B-1)) (keys) and |p| (s (code + 2^(B-1)) + |z|) (values); the
// portable loops give the same sums in another order. Each call prepares its query rows in O(nq d)
// steps, so calls should cover many rows (a page, not a token).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kvc/version.hpp"

#if defined(__AVX2__) && defined(__FMA__)
#define KVC_CODE_KERNELS_AVX2 1
#include <immintrin.h>
#else
#define KVC_CODE_KERNELS_AVX2 0
#endif

// Loops over small arrays of vector registers must be unrolled completely, or they live in
// memory (GCC at -O2 leaves them rolled).
#if defined(__clang__)
#define KVC_CODE_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define KVC_CODE_UNROLL _Pragma("GCC unroll 16")
#else
#define KVC_CODE_UNROLL
#endif
#if defined(__GNUC__) || defined(__clang__)
#define KVC_CODE_INLINE inline __attribute__((always_inline))
#define KVC_CODE_OUTLINE inline __attribute__((noinline))  // a function of its own (its registers too)
#else
#define KVC_CODE_INLINE inline
#define KVC_CODE_OUTLINE inline
#endif
// The same for a lambda, after its noexcept (GCC; Clang inlines these lambdas by itself).
#if defined(__GNUC__) && !defined(__clang__)
#define KVC_CODE_LAMBDA_INLINE __attribute__((always_inline))
#else
#define KVC_CODE_LAMBDA_INLINE
#endif

KVC_NAMESPACE_BEGIN
namespace detail {

inline constexpr bool code_kernels_simd = KVC_CODE_KERNELS_AVX2 != 0;  // the AVX2 + FMA kernels are in use

namespace code_kernel {

// Bytes of one full block of 32 codes.
template <int Bits>
constexpr int block_bytes = 4 * Bits;

// True when value groups of `group` channels (group <= 0: none, as for keys) are made of whole
// 32-code blocks at head_dim d, as the integer and byte kernels need.
constexpr bool whole_block_groups(int d, int group) noexcept { return group <= 0 || group % 32 == 0 || group >= d; }

template <int Bits, bool Signed>
constexpr void check_kind() noexcept {
  static_assert(Bits == 2 || Bits == 3 || Bits == 4 || Bits == 8, "kvc: codes are 2, 3, 4 or 8 bits");
  static_assert(!Signed || Bits == 8, "kvc: signed codes are 8 bits");
}

// The 32 codes of a full block, in channel order.
template <int Bits, bool Signed>
inline void unpack_block(const std::uint8_t* blk, float* out) noexcept {
  if constexpr (Bits == 8) {
    for (int j = 0; j < 32; ++j)
      out[j] = Signed ? static_cast<float>(static_cast<std::int8_t>(blk[j])) : static_cast<float>(blk[j]);
  } else if constexpr (Bits == 4) {
    for (int j = 0; j < 16; ++j) {
      out[j] = static_cast<float>(blk[j] & 15u);
      out[j + 16] = static_cast<float>(blk[j] >> 4);
    }
  } else {
    std::uint32_t third = 0;
    if constexpr (Bits == 3) {
      third = static_cast<std::uint32_t>(blk[8]) | static_cast<std::uint32_t>(blk[9]) << 8 |
              static_cast<std::uint32_t>(blk[10]) << 16 | static_cast<std::uint32_t>(blk[11]) << 24;
    }
    for (int j = 0; j < 8; ++j)
      for (int s = 0; s < 4; ++s) {
        const int c = j + 8 * s;
        const unsigned hi = Bits == 3 ? ((third >> c) & 1u) << 2 : 0u;
        out[c] = static_cast<float>(((blk[j] >> (2 * s)) & 3u) | hi);
      }
  }
}

// Code i of a row's tail (the codes after its full blocks), packed sequentially.
template <int Bits, bool Signed>
inline int tail_code(const std::uint8_t* tail, int i) noexcept {
  if constexpr (Bits == 8) {
    return Signed ? static_cast<int>(static_cast<std::int8_t>(tail[i])) : static_cast<int>(tail[i]);
  } else {
    const int bit = i * Bits;
    unsigned v = static_cast<unsigned>(tail[bit >> 3]) >> (bit & 7);
    if ((bit & 7) + Bits > 8) v |= static_cast<unsigned>(tail[(bit >> 3) + 1]) << (8 - (bit & 7));  // B = 3 only
    return static_cast<int>(v & ((1u << Bits) - 1u));
  }
}

// Codes of channels [c0, min(c0 + 32, d)) of a row, c0 a multiple of 32; returns the count.
template <int Bits, bool Signed>
inline int chunk_codes(const std::uint8_t* row, int d, int c0, float* out) noexcept {
  const std::uint8_t* at = row + static_cast<std::size_t>(c0 / 32) * block_bytes<Bits>;
  if (c0 + 32 <= d) {
    unpack_block<Bits, Signed>(at, out);
    return 32;
  }
  const int m = d - c0;
  for (int i = 0; i < m; ++i) out[i] = static_cast<float>(tail_code<Bits, Signed>(at, i));
  return m;
}

// Portable kernels: a block of 32 codes is unpacked into a small local array and used for
// four query rows at a time; sums run over eight lanes, in loops of fixed length that
// compilers vectorise. The tail goes code by code.
template <int Bits, bool Signed>
inline void dot_rows_portable(const float* w, int nq, const std::uint8_t* rows, std::size_t stride, int n, int d,
                              float* out) noexcept {
  check_kind<Bits, Signed>();
  const int full = d & ~31;
  float codes[32];
  for (int t = 0; t < n; ++t) {
    const std::uint8_t* row = rows + static_cast<std::size_t>(t) * stride;
    for (int q0 = 0; q0 < nq; q0 += 4) {
      const int nqb = nq - q0 < 4 ? nq - q0 : 4;
      float acc[4][8] = {};
      for (int c0 = 0; c0 < full; c0 += 32) {
        unpack_block<Bits, Signed>(row + static_cast<std::size_t>(c0 / 32) * block_bytes<Bits>, codes);
        for (int q = 0; q < nqb; ++q) {
          const float* wq = w + static_cast<std::size_t>(q0 + q) * d + c0;
          for (int j = 0; j < 32; j += 8)
            for (int l = 0; l < 8; ++l) acc[q][l] += wq[j + l] * codes[j + l];
        }
      }
      const std::uint8_t* tail = row + static_cast<std::size_t>(full / 32) * block_bytes<Bits>;
      for (int q = 0; q < nqb; ++q) {
        const float* a = acc[q];
        const float* wq = w + static_cast<std::size_t>(q0 + q) * d + full;
        float x = ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
        for (int c = 0; c < d - full; ++c) x += wq[c] * static_cast<float>(tail_code<Bits, Signed>(tail, c));
        out[static_cast<std::size_t>(q0 + q) * n + t] = x;
      }
    }
  }
}

template <int Bits, bool Signed>
inline void accumulate_rows_portable(const float* p, int nq, const std::uint8_t* rows, std::size_t stride, int n, int d,
                                     int group, const float* scale, const float* zero, float* acc) noexcept {
  check_kind<Bits, Signed>();
  if (d <= 0) return;
  const int ng = (d + group - 1) / group;
  // Eight channels at a time where each run of eight lies in one group.
  const int full = group % 8 == 0 ? d & ~31 : 0;
  float codes[32];
  for (int t = 0; t < n; ++t) {
    const std::uint8_t* row = rows + static_cast<std::size_t>(t) * stride;
    const float* st = scale + static_cast<std::size_t>(t) * ng;
    const float* zt = zero != nullptr ? zero + static_cast<std::size_t>(t) * ng : nullptr;
    for (int c0 = 0; c0 < full; c0 += 32) {
      unpack_block<Bits, Signed>(row + static_cast<std::size_t>(c0 / 32) * block_bytes<Bits>, codes);
      for (int j = 0; j < 32; j += 8) {
        const int k = (c0 + j) / group;
        const float s = st[k], z = zt != nullptr ? zt[k] : 0.0f;
        for (int q = 0; q < nq; ++q) {
          const float pq = p[static_cast<std::size_t>(q) * n + t];
          const float a = pq * s, b = pq * z;
          float* out = acc + static_cast<std::size_t>(q) * d + c0 + j;
          for (int l = 0; l < 8; ++l) out[l] += a * codes[j + l] + b;
        }
      }
    }
    for (int c0 = full; c0 < d; c0 += 32) {
      const int len = chunk_codes<Bits, Signed>(row, d, c0, codes);
      for (int j = 0; j < len; ++j) {
        const int k = (c0 + j) / group;
        const float s = st[k], z = zt != nullptr ? zt[k] : 0.0f;
        for (int q = 0; q < nq; ++q) {
          const float pq = p[static_cast<std::size_t>(q) * n + t];
          acc[static_cast<std::size_t>(q) * d + c0 + j] += pq * s * codes[j] + pq * z;
        }
      }
    }
  }
}

#if KVC_CODE_KERNELS_AVX2
namespace avx2 {

// Keeps a loaded value in a register, so that the compiler does not fold the load into
// every FMA that uses it (the loops would run out of load ports first).
inline __m256 in_reg(__m256 x) noexcept {
#if defined(__GNUC__) || defined(__clang__)
  __asm__("" : "+x"(x));
#endif
  return x;
}

// Hides p's value from the optimiser, so that equal loads through it are not merged.
inline void opaque(const std::uint8_t*& p) noexcept {
#if defined(__GNUC__) || defined(__clang__)
  __asm__ volatile("" : "+r"(p));
#else
  static_cast<void>(p);
#endif
}

// Eight bytes from p, zero- or sign-extended to 32-bit lanes.
template <bool Signed>
inline __m256i widen8(const std::uint8_t* p) noexcept {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return Signed ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b);
}

// {sum v0, ..., sum v7}.
inline __m256 lane_sums8(__m256 v0, __m256 v1, __m256 v2, __m256 v3, __m256 v4, __m256 v5, __m256 v6,
                         __m256 v7) noexcept {
  const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
  const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(v4, v5), _mm256_hadd_ps(v6, v7));
  return _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
}

inline float lane_sum(__m256 v) noexcept {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Asks for the cache lines of [p, p + bytes) ahead of use. Hardware prefetchers stop at
// 4 KiB pages and a plain software prefetch that misses the TLB may be dropped (Zen 3 drops
// them), so a line that starts a page gets a prefetch for writing (PREFETCHW where the target
// has it), which walks the page table; the others a plain one. Prefetches never fault.
inline void prefetch_bytes(const void* p, std::size_t bytes) noexcept {
#if defined(__GNUC__) || defined(__clang__)
  const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(p);
  const std::uintptr_t end = a + bytes;
  for (std::uintptr_t line = a & ~std::uintptr_t{63}; line < end; line += 64) {
    const void* at = reinterpret_cast<const void*>(line);
    if ((line & 4095) == 0)
      __builtin_prefetch(at, 1, 3);
    else
      __builtin_prefetch(at, 0, 3);
  }
#else
  static_cast<void>(p);
  static_cast<void>(bytes);
#endif
}

// ---- Vectors of codes. A full block is read as four vectors of eight codes, vector J holding
// channels 8J .. 8J + 7 of the block. For B = 2 and 4 the codes are not moved: an 8-byte load
// broadcast to every 64-bit lane gives lane 2m + e the 32-bit word of bytes 4e .. 4e + 3 (of
// the block's first or second half for B = 4), and a mask per lane keeps the B-bit field of
// byte 4e + m that belongs to vector J, in place at bit f = 8m + (its offset in the byte): the
// lane converts exactly to code 2^f. A field that ends at bit 31 would convert as negative;
// its top bit is flipped instead, which gives (code - 2^(B-1)) 2^f exactly. No shifts or
// shuffles are needed (on current cores they compete with the FMAs for ports, and cost more
// than the masks); the lane order, scales and biases are undone outside the loops over rows.
// B = 3 and 8 are widened in channel order with a zero- (sign-) extending load.
template <int Bits>
constexpr bool masked_layout = Bits == 2 || Bits == 4;

// Bit position of lane l's field in vector J (B = 2, 4).
constexpr int lane_field(int bits, int j, int l) noexcept {
  return 8 * (l >> 1) + (bits == 4 ? (j >= 2 ? 4 : 0) : 2 * j);
}
// Channel (within the block) of lane l of vector J.
constexpr int lane_channel(int bits, int j, int l) noexcept {
  return bits == 2 || bits == 4 ? 8 * j + 4 * (l & 1) + (l >> 1) : 8 * j + l;
}
constexpr bool lane_flipped(int bits, int j, int l) noexcept {
  return (bits == 2 || bits == 4) && lane_field(bits, j, l) + bits == 32;
}
template <int Bits, int J>
constexpr bool has_flip = lane_flipped(Bits, J, 6) || lane_flipped(Bits, J, 7);

template <int Bits, int J>
inline __m256i lane_masks() noexcept {
  const auto m = [](int l) {
    return static_cast<int>(static_cast<std::uint32_t>((1u << Bits) - 1u) << lane_field(Bits, J, l));
  };
  return _mm256_setr_epi32(m(0), m(1), m(2), m(3), m(4), m(5), m(6), m(7));
}
template <int Bits, int J>
inline __m256i lane_flips() noexcept {
  const auto f = [](int l) { return lane_flipped(Bits, J, l) ? static_cast<int>(0x80000000u) : 0; };
  return _mm256_setr_epi32(f(0), f(1), f(2), f(3), f(4), f(5), f(6), f(7));
}
// 2^-field, per lane.
template <int Bits, int J>
inline __m256 lane_scales() noexcept {
  const auto s = [](int l) { return (127 - lane_field(Bits, J, l)) << 23; };
  return _mm256_castsi256_ps(_mm256_setr_epi32(s(0), s(1), s(2), s(3), s(4), s(5), s(6), s(7)));
}
// 2^(B-1) on flipped lanes.
template <int Bits, int J>
inline __m256 lane_biases() noexcept {
  const auto b = [](int l) { return lane_flipped(Bits, J, l) ? static_cast<float>(1 << (Bits - 1)) : 0.0f; };
  return _mm256_setr_ps(b(0), b(1), b(2), b(3), b(4), b(5), b(6), b(7));
}
// Index vectors between lane order and channel order (the same for every vector J).
inline __m256i lanes_from_channels() noexcept { return _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7); }
inline __m256i channels_from_lanes() noexcept { return _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7); }

// Vector J of a full block: (code - bias) 2^field per lane for B = 2, 4; codes in channel
// order for B = 3, 8.
// Fresh: load the block's bytes again rather than reuse an equal earlier load (where keeping
// that one live across the FMAs would spill registers; a broadcast load takes no ALU port).
template <int Bits, bool Signed, int J, bool Fresh = false>
inline __m256 unpack_vec(const std::uint8_t* blk) noexcept {
  static_assert(J >= 0 && J < 4, "kvc: a block has four vectors of codes");
  if constexpr (masked_layout<Bits>) {
    const std::uint8_t* at = blk + (Bits == 4 ? 8 * (J & 1) : 0);
    if constexpr (Fresh) opaque(at);
    const __m256i src = _mm256_broadcastq_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(at)));
    __m256i v = _mm256_and_si256(src, lane_masks<Bits, J>());
    if constexpr (has_flip<Bits, J>) v = _mm256_xor_si256(v, lane_flips<Bits, J>());
    return _mm256_cvtepi32_ps(v);
  } else if constexpr (Bits == 8) {
    return _mm256_cvtepi32_ps(widen8<Signed>(blk + 8 * J));
  } else {  // B = 3: the B = 2 fields of the low bits, then bit 8J + i of the third-bit word
    const __m256i x = widen8<false>(blk);
    __m256i c = J == 0 ? x : _mm256_srli_epi32(x, 2 * J);
    if constexpr (J < 3) c = _mm256_and_si256(c, _mm256_set1_epi32(3));
    std::uint32_t word;
    std::memcpy(&word, blk + 8, sizeof word);
    // Bit 8J + i of the word moved to bit i + 2: shifting lane i right by i leaves it at bit 2.
    const std::uint32_t h = J == 0 ? word << 2 : word >> (8 * J - 2);
    const __m256i hi =
        _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(h)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_cvtepi32_ps(_mm256_or_si256(c, _mm256_and_si256(hi, _mm256_set1_epi32(4))));
  }
}

// Codes 8i .. 8i + 7 of a row's tail, in channel order: they fill exactly Bits bytes from byte i Bits.
template <int Bits, bool Signed>
inline __m256 unpack_tail8(const std::uint8_t* tail, int i) noexcept {
  const std::uint8_t* at = tail + static_cast<std::size_t>(i) * Bits;
  if constexpr (Bits == 8) {
    return _mm256_cvtepi32_ps(widen8<Signed>(at));
  } else {
    std::uint32_t u = 0;
    std::memcpy(&u, at, Bits);  // little-endian, as on every AVX2 target
    const __m256i sh = _mm256_setr_epi32(0, Bits, 2 * Bits, 3 * Bits, 4 * Bits, 5 * Bits, 6 * Bits, 7 * Bits);
    const __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(u)), sh);
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32((1 << Bits) - 1)));
  }
}

// ---- Keys. Query rows are prepared per window of full blocks in the lane order and scale of
// the code vectors (w' = w 2^-field), with the bias terms sum w 2^(B-1) over flipped lanes;
// then out[q][t] = sum w' code' + bias, plus the tail against w itself.
inline constexpr int kchunk = 96;  // rows per pass over the query rows (a multiple of every tile height)
inline constexpr int kwindow = 8;  // full blocks per window
inline constexpr int kwin = 32 * kwindow;

template <int Bits>
inline void prepare_keys(const float* w, std::size_t ds, int Q, int b0, int b1, float* wp, float* bias) noexcept {
  const int len = 32 * (b1 - b0);
  for (int q = 0; q < Q; ++q) {
    __m256 bsum = _mm256_setzero_ps();
    for (int b = b0; b < b1; ++b) {
      const float* src = w + q * ds + 32 * b;
      float* dst = wp + q * len + 32 * (b - b0);
      const auto vec = [&](auto j) noexcept {
        constexpr int J = decltype(j)::value;
        const __m256 x = _mm256_permutevar8x32_ps(_mm256_loadu_ps(src + 8 * J), lanes_from_channels());
        _mm256_store_ps(dst + 8 * J, _mm256_mul_ps(x, lane_scales<Bits, J>()));
        if constexpr (has_flip<Bits, J>) bsum = _mm256_fmadd_ps(x, lane_biases<Bits, J>(), bsum);
      };
      vec(std::integral_constant<int, 0>{});
      vec(std::integral_constant<int, 1>{});
      vec(std::integral_constant<int, 2>{});
      vec(std::integral_constant<int, 3>{});
    }
    bias[q] = lane_sum(bsum);
  }
}

// Accumulators of Q query rows against R code rows: Q R independent FMA chains, each w
// vector loaded once for the R rows and each code vector unpacked once for the Q query rows.
template <int Q, int R>
struct key_tile {
  static_assert(Q * R <= 12, "kvc: at most twelve accumulators");
  __m256 acc[Q * R];

  // acc[q][r] += w[q][0..8) code(r), code(r) giving eight codes of row r in w's lane order.
  template <class Code>
  void step(Code code, const float* w, std::size_t ws) noexcept {
    if constexpr (R <= Q) {  // R code registers and one w register live
      __m256 c[R];
      KVC_CODE_UNROLL
      for (int r = 0; r < R; ++r) c[r] = code(r);
      KVC_CODE_UNROLL
      for (int q = 0; q < Q; ++q) {
        const __m256 x = in_reg(_mm256_loadu_ps(w + q * ws));
        KVC_CODE_UNROLL
        for (int r = 0; r < R; ++r) acc[q * R + r] = _mm256_fmadd_ps(x, c[r], acc[q * R + r]);
      }
    } else {  // Q w registers and one code register live
      __m256 x[Q];
      KVC_CODE_UNROLL
      for (int q = 0; q < Q; ++q) x[q] = in_reg(_mm256_loadu_ps(w + q * ws));
      KVC_CODE_UNROLL
      for (int r = 0; r < R; ++r) {
        const __m256 c = code(r);
        KVC_CODE_UNROLL
        for (int q = 0; q < Q; ++q) acc[q * R + r] = _mm256_fmadd_ps(x[q], c, acc[q * R + r]);
      }
    }
  }

  // The Q R sums, [q][r], into s[0, 16).
  void sums(float* s) noexcept {
    constexpr int N = Q * R;
    const __m256 z = _mm256_setzero_ps();
    const auto at = [&](int i) noexcept { return i < N ? acc[i] : z; };
    _mm256_storeu_ps(s, lane_sums8(at(0), at(1), at(2), at(3), at(4), at(5), at(6), at(7)));
    if constexpr (N > 8) _mm256_storeu_ps(s + 8, lane_sums8(at(8), at(9), at(10), at(11), z, z, z, z));
  }
};

// Where a key pass reads: full blocks [b0, b1) against wp ([q][32 (b1 - b0)], prepared) or,
// for B = 3 and 8, against w itself; then, on the last window, the tail against w.
struct key_pass {
  const float* wp;    // prepared query rows, or w + 32 b0 for the channel-order layouts
  std::size_t wps;    // floats from one query row of wp to the next
  const float* bias;  // [Q], added to every sum
  int b0, b1;         // full blocks of this window
  const float* w;     // the query rows, for the tail
  std::size_t ds;     // d
  int tail;           // codes of the tail to add here (0 but on the last window)
  bool first;         // out is written, not added to
  std::size_t ahead;  // bytes from a row to the rows fetched meanwhile; 0: none
  std::size_t end;    // bytes of the rows
};

template <int Bits, bool Signed, int Q, int R>
KVC_CODE_INLINE void dot_tile(const key_pass& k, const std::uint8_t* row, std::size_t stride, float* out,
                              std::size_t out_stride) noexcept {
  constexpr int bb = block_bytes<Bits>;
  key_tile<Q, R> kt;
  KVC_CODE_UNROLL
  for (int i = 0; i < Q * R; ++i) kt.acc[i] = _mm256_setzero_ps();
  for (int b = k.b0; b < k.b1; ++b) {
    const std::uint8_t* blk = row + static_cast<std::size_t>(b) * bb;
    const float* wb = k.wp + 32 * (b - k.b0);
    const auto vec = [&](auto j) noexcept {
      constexpr int J = decltype(j)::value;
      kt.step([&](int r) noexcept { return unpack_vec<Bits, Signed, J, true>(blk + r * stride); }, wb + 8 * J, k.wps);
    };
    vec(std::integral_constant<int, 0>{});
    vec(std::integral_constant<int, 1>{});
    vec(std::integral_constant<int, 2>{});
    vec(std::integral_constant<int, 3>{});
  }
  // The tail: vectors of eight codes, then single codes.
  const std::uint8_t* tail = row + static_cast<std::size_t>(k.b1) * bb;
  const float* wt = k.w + 32 * k.b1;
  const int m8 = k.tail >> 3;
  for (int i = 0; i < m8; ++i)
    kt.step([&](int r) noexcept { return unpack_tail8<Bits, Signed>(tail + r * stride, i); }, wt + 8 * i, k.ds);
  alignas(32) float s[16];
  kt.sums(s);
  if ((k.tail & 7) != 0)
    for (int c = 8 * m8; c < k.tail; ++c)
      for (int r = 0; r < R; ++r) {
        const float code = static_cast<float>(tail_code<Bits, Signed>(tail + r * stride, c));
        for (int q = 0; q < Q; ++q) s[q * R + r] += wt[q * k.ds + c] * code;
      }
  KVC_CODE_UNROLL
  for (int q = 0; q < Q; ++q) {
    KVC_CODE_UNROLL
    for (int r = 0; r < R; ++r) {
      float& o = out[q * out_stride + r];
      o = (k.first ? 0.0f : o) + (s[q * R + r] + k.bias[q]);
    }
  }
}

// Rows [t0, t0 + T) against Q query rows.
template <int Bits, bool Signed, int Q, int R>
inline void dot_rows(const key_pass& k, const std::uint8_t* rows, std::size_t stride, int t0, int T, std::size_t n,
                     float* out) noexcept {
  int t = t0;
  for (; t + R <= t0 + T; t += R) {
    if (k.ahead != 0) {
      const std::size_t from = static_cast<std::size_t>(t) * stride + k.ahead;
      if (from < k.end) prefetch_bytes(rows + from, std::min(R * stride, k.end - from));
    }
    dot_tile<Bits, Signed, Q, R>(k, rows + static_cast<std::size_t>(t) * stride, stride, out + t, n);
  }
  for (; t < t0 + T; ++t)
    dot_tile<Bits, Signed, Q, 1>(k, rows + static_cast<std::size_t>(t) * stride, stride, out + t, n);
}

template <int Bits, bool Signed>
inline void dot_rows_simd(const float* w, int nq, const std::uint8_t* rows, std::size_t stride, int n, int d,
                          float* out) noexcept {
  const std::size_t ds = static_cast<std::size_t>(d), ns = static_cast<std::size_t>(n);
  const int nb = d >> 5;
  const int windows = nb == 0 ? 1 : (nb + kwindow - 1) / kwindow;
  alignas(32) float wp[4 * kwin];
  float bias[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int t0 = 0; t0 < n; t0 += kchunk) {
    const int T = n - t0 < kchunk ? n - t0 : kchunk;
    for (int q0 = 0; q0 < nq; q0 += 4) {
      const int Q = nq - q0 < 4 ? nq - q0 : 4;
      const float* wq = w + q0 * ds;
      for (int win = 0; win < windows; ++win) {
        key_pass k;
        k.b0 = win * kwindow;
        k.b1 = k.b0 + kwindow < nb ? k.b0 + kwindow : nb;
        k.w = wq;
        k.ds = ds;
        k.tail = win == windows - 1 ? d - 32 * nb : 0;
        k.first = win == 0;
        k.ahead = q0 == 0 && win == 0 ? kchunk * stride : 0;  // the next chunk, on the first pass over this one
        k.end = ns * stride;
        if constexpr (masked_layout<Bits>) {
          prepare_keys<Bits>(wq, ds, Q, k.b0, k.b1, wp, bias);
          k.wp = wp;
          k.wps = static_cast<std::size_t>(32 * (k.b1 - k.b0));
          k.bias = bias;
        } else {
          k.wp = wq + 32 * k.b0;
          k.wps = ds;
          k.bias = bias;
        }
        float* o = out + q0 * ns;
        switch (Q) {
          case 4:
            dot_rows<Bits, Signed, 4, 2>(k, rows, stride, t0, T, ns, o);
            break;
          case 3:
            dot_rows<Bits, Signed, 3, 3>(k, rows, stride, t0, T, ns, o);
            break;
          case 2:
            dot_rows<Bits, Signed, 2, 4>(k, rows, stride, t0, T, ns, o);
            break;
          default:
            dot_rows<Bits, Signed, 1, 8>(k, rows, stride, t0, T, ns, o);
            break;
        }
      }
    }
  }
}

// ---- Values. Rows go in chunks of vchunk, channels in windows of at most vgroups groups.
// For a chunk and a window the factors a = p s (per row, group and query row), their sums
// over the rows and the zero-point sums sum_t p z (per group and query row) are computed
// first, four query rows to a vector; the main loop is then acc += a code, one FMA per code
// and query row, and each pass ends by undoing the lane order, scale and bias of its vectors.
inline constexpr int vchunk = 32;
inline constexpr int vgroups = 8;

struct value_factors {
  alignas(32) float a[vchunk][vgroups][4];  // [row in chunk][group in window][query row]
  alignas(32) float zs[vgroups][4];         // [group in window][query row]: sum_t p z
  alignas(32) float as[vgroups][4];         // [group in window][query row]: sum_t a
};

// Factors of rows [t0, t0 + T) (T <= vchunk), groups [k_lo, k_lo + nk) (nk <= 2 P) and
// query rows [0, Q) of p (rows of n weights); query rows Q.. of the factors are zero.
template <int Q, int P>
inline void value_factors_for(value_factors& f, const float* p, std::size_t n, int t0, int T, int ng, int k_lo, int nk,
                              const float* scale, const float* zero, bool sums) noexcept {
  // p of the chunk, transposed to [row][query row].
  alignas(32) float pt[vchunk][4];
  const __m256 zero8 = _mm256_setzero_ps();
  int t = 0;
  for (; t + 8 <= T; t += 8) {
    __m256 r[4];
    KVC_CODE_UNROLL
    for (int q = 0; q < 4; ++q) r[q] = q < Q ? _mm256_loadu_ps(p + q * n + t0 + t) : zero8;
    const __m256 a = _mm256_unpacklo_ps(r[0], r[1]), b = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 c = _mm256_unpacklo_ps(r[2], r[3]), e = _mm256_unpackhi_ps(r[2], r[3]);
    // Rows t, t + 4 | t + 1, t + 5 | t + 2, t + 6 | t + 3, t + 7.
    const __m256 r04 = _mm256_shuffle_ps(a, c, 0x44), r15 = _mm256_shuffle_ps(a, c, 0xEE);
    const __m256 r26 = _mm256_shuffle_ps(b, e, 0x44), r37 = _mm256_shuffle_ps(b, e, 0xEE);
    _mm256_store_ps(pt[t], _mm256_permute2f128_ps(r04, r15, 0x20));
    _mm256_store_ps(pt[t + 2], _mm256_permute2f128_ps(r26, r37, 0x20));
    _mm256_store_ps(pt[t + 4], _mm256_permute2f128_ps(r04, r15, 0x31));
    _mm256_store_ps(pt[t + 6], _mm256_permute2f128_ps(r26, r37, 0x31));
  }
  for (; t < T; ++t)
    for (int q = 0; q < 4; ++q) pt[t][q] = q < Q ? p[q * n + t0 + t] : 0.0f;

  const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(nk), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  // Group pair j of the window: lanes {2j x4, 2j + 1 x4} of a row of scales.
  const auto spread = [](__m256 v, int j) noexcept {
    return _mm256_permutevar8x32_ps(
        v, _mm256_setr_epi32(2 * j, 2 * j, 2 * j, 2 * j, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1));
  };
  constexpr int S = P <= 2 ? 2 : 1;  // interleaved sets of sums: at least four chains
  __m256 za[S][P], aa[S][P];
  KVC_CODE_UNROLL
  for (int s = 0; s < S; ++s) {
    KVC_CODE_UNROLL
    for (int j = 0; j < P; ++j) za[s][j] = aa[s][j] = zero8;
  }
  const std::size_t ngs = static_cast<std::size_t>(ng);
  const auto row = [&](int r, int s) noexcept {
    const std::size_t o = static_cast<std::size_t>(t0 + r) * ngs + static_cast<std::size_t>(k_lo);
    const __m256 pv = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(pt[r]));
    const __m256 sv = _mm256_maskload_ps(scale + o, lanes);
    KVC_CODE_UNROLL
    for (int j = 0; j < P; ++j) {
      const __m256 a = _mm256_mul_ps(pv, spread(sv, j));
      _mm256_store_ps(&f.a[r][2 * j][0], a);
      aa[s][j] = _mm256_add_ps(aa[s][j], a);
    }
    if (zero != nullptr) {
      const __m256 zv = _mm256_maskload_ps(zero + o, lanes);
      KVC_CODE_UNROLL
      for (int j = 0; j < P; ++j) za[s][j] = _mm256_fmadd_ps(pv, spread(zv, j), za[s][j]);
    }
  };
  t = 0;
  for (; t + S <= T; t += S) {
    KVC_CODE_UNROLL
    for (int s = 0; s < S; ++s) row(t + s, s);
  }
  for (; t < T; ++t) row(t, 0);
  KVC_CODE_UNROLL
  for (int j = 0; j < P; ++j) {
    __m256 z = za[0][j], a = aa[0][j];
    KVC_CODE_UNROLL
    for (int s = 1; s < S; ++s) {
      z = _mm256_add_ps(z, za[s][j]);
      a = _mm256_add_ps(a, aa[s][j]);
    }
    _mm256_store_ps(&f.zs[2 * j][0], z);
    if (sums) _mm256_store_ps(&f.as[2 * j][0], a);
  }
}

// Where a value pass reads and writes, per vector v: a_v, the factors of its group (row t,
// query row q at a_v[32 t + q]); acc_v, its eight channels in query row 0 of acc (query row
// q at + q d); zs_v and as_v, its group's zero-point sums and factor sums (null: none).
template <int NV>
struct value_pass {
  const float* a[NV];
  float* acc[NV];
  const float* zs[NV];
  const float* as[NV];
};

// acc_v[q] += sum_t a_v[t][q] code_v(t) (+ zs_v[q]) for the full-block vectors Js of the rows
// at blk + t stride, t < T, and Q query rows; U interleaved row accumulators: Q NV U FMA chains.
template <int Bits, bool Signed, int Q, int U, bool Same, int... Js>
inline void value_tile(const value_pass<sizeof...(Js)>& vp, const std::uint8_t* blk, std::size_t stride, int T,
                       std::size_t d) noexcept {
  constexpr int NV = sizeof...(Js);
  static_assert(Q * NV * U <= 12, "kvc: at most twelve accumulators");
  constexpr int ts = vgroups * 4;  // floats from one row's factors to the next
  __m256 s[U][Q][NV];
  KVC_CODE_UNROLL
  for (int u = 0; u < U; ++u) {
    KVC_CODE_UNROLL
    for (int q = 0; q < Q; ++q) {
      KVC_CODE_UNROLL
      for (int v = 0; v < NV; ++v) s[u][q][v] = _mm256_setzero_ps();
    }
  }
  const auto row = [&](int t, int u) noexcept {
    const std::uint8_t* r = blk + static_cast<std::size_t>(t) * stride;
    const __m256 c[NV] = {unpack_vec<Bits, Signed, Js>(r)...};
    KVC_CODE_UNROLL
    for (int q = 0; q < Q; ++q) {
      const __m256 a0 = _mm256_broadcast_ss(vp.a[0] + t * ts + q);
      KVC_CODE_UNROLL
      for (int v = 0; v < NV; ++v) {
        const __m256 av = Same || v == 0 ? a0 : _mm256_broadcast_ss(vp.a[v] + t * ts + q);
        s[u][q][v] = _mm256_fmadd_ps(av, c[v], s[u][q][v]);
      }
    }
  };
  int t = 0;
  for (; t + U <= T; t += U) {
    KVC_CODE_UNROLL
    for (int u = 0; u < U; ++u) row(t + u, u);
  }
  for (; t < T; ++t) row(t, 0);
  // Undo the lane layout: x = sum 2^-field + bias sum_t a, in channel order.
  const auto finish = [&](auto j, int v) noexcept {
    constexpr int J = decltype(j)::value;
    KVC_CODE_UNROLL
    for (int q = 0; q < Q; ++q) {
      __m256 x = s[0][q][v];
      KVC_CODE_UNROLL
      for (int u = 1; u < U; ++u) x = _mm256_add_ps(x, s[u][q][v]);
      if constexpr (masked_layout<Bits>) {
        x = _mm256_mul_ps(x, lane_scales<Bits, J>());
        if constexpr (has_flip<Bits, J>) x = _mm256_fmadd_ps(lane_biases<Bits, J>(), _mm256_set1_ps(vp.as[v][q]), x);
        x = _mm256_permutevar8x32_ps(x, channels_from_lanes());
      }
      float* out = vp.acc[v] + q * d;
      __m256 m = _mm256_loadu_ps(out);
      if (vp.zs[v] != nullptr) m = _mm256_add_ps(m, _mm256_set1_ps(vp.zs[v][q]));
      _mm256_storeu_ps(out, _mm256_add_ps(m, x));
    }
  };
  int v = 0;
  (finish(std::integral_constant<int, Js>{}, v++), ...);
}

// The same for tail vector i (channel order, no lane layout to undo).
template <int Bits, bool Signed, int Q>
inline void value_tail_tile(const value_pass<1>& vp, const std::uint8_t* tail, std::size_t stride, int T, int i,
                            std::size_t d) noexcept {
  constexpr int ts = vgroups * 4;
  __m256 s[2][Q];
  KVC_CODE_UNROLL
  for (int q = 0; q < Q; ++q) s[0][q] = s[1][q] = _mm256_setzero_ps();
  for (int t = 0; t < T; ++t) {
    const __m256 c = unpack_tail8<Bits, Signed>(tail + static_cast<std::size_t>(t) * stride, i);
    KVC_CODE_UNROLL
    for (int q = 0; q < Q; ++q)
      s[t & 1][q] = _mm256_fmadd_ps(_mm256_broadcast_ss(vp.a[0] + t * ts + q), c, s[t & 1][q]);
  }
  for (int q = 0; q < Q; ++q) {
    float* out = vp.acc[0] + q * d;
    __m256 m = _mm256_loadu_ps(out);
    if (vp.zs[0] != nullptr) m = _mm256_add_ps(m, _mm256_set1_ps(vp.zs[0][q]));
    _mm256_storeu_ps(out, _mm256_add_ps(m, _mm256_add_ps(s[0][q], s[1][q])));
  }
}

// How value passes go for Q query rows: pairs of vectors or whole blocks, and interleaved
// row accumulators, for eight to twelve FMA chains.
template <int Q>
struct value_shape {
  static constexpr bool whole = Q <= 2;
  static constexpr int unroll = Q == 4 || Q == 2 ? 1 : 2;
};

// Channels [c0, c1) of rows [0, T) of a chunk (c0 a multiple of 32, c1 a multiple of 32 or
// d), whose groups start at group k_lo.
template <int Bits, bool Signed, int Q>
inline void value_window(const std::uint8_t* rows, std::size_t stride, int T, int d, int group, int c0, int c1,
                         const value_factors& f, int k_lo, bool has_zero, float* acc) noexcept {
  constexpr int bb = block_bytes<Bits>;
  constexpr int U = value_shape<Q>::unroll;
  const std::size_t ds = static_cast<std::size_t>(d);
  // Group (in the window) of channel c, for c not decreasing from call to call: no divisions.
  int kk = 0, next = (k_lo + 1) * group;
  const auto group_of = [&](int c) noexcept {
    while (c >= next) {
      ++kk;
      next += group;
    }
    return kk;
  };
  const auto fill = [&](auto& vp, int v, int c, int g) noexcept {
    vp.a[v] = &f.a[0][g][0];
    vp.acc[v] = acc + c;
    vp.zs[v] = has_zero ? f.zs[g] : nullptr;
    vp.as[v] = f.as[g];
  };
  const int b_end = c1 >> 5;  // full blocks below c1
  for (int b = c0 >> 5; b < b_end; ++b) {
    const int cb = 32 * b;
    const int g[4] = {group_of(cb), group_of(cb + 8), group_of(cb + 16), group_of(cb + 24)};
    const std::uint8_t* blk = rows + static_cast<std::size_t>(b) * bb;
    const auto pass = [&](auto... js) noexcept {
      constexpr int NV = sizeof...(js);
      value_pass<NV> vp;
      int v = 0;
      (fill(vp, v++, cb + 8 * decltype(js)::value, g[decltype(js)::value]), ...);
      if (g[std::min({decltype(js)::value...})] == g[std::max({decltype(js)::value...})])
        value_tile<Bits, Signed, Q, U, true, decltype(js)::value...>(vp, blk, stride, T, ds);
      else
        value_tile<Bits, Signed, Q, U, false, decltype(js)::value...>(vp, blk, stride, T, ds);
    };
    using J0 = std::integral_constant<int, 0>;
    using J1 = std::integral_constant<int, 1>;
    using J2 = std::integral_constant<int, 2>;
    using J3 = std::integral_constant<int, 3>;
    if constexpr (value_shape<Q>::whole) {
      pass(J0{}, J1{}, J2{}, J3{});
    } else if constexpr (Bits == 4) {  // vectors 0 and 2 come from the same bytes, 1 and 3 too
      pass(J0{}, J2{});
      pass(J1{}, J3{});
    } else {
      pass(J0{}, J1{});
      pass(J2{}, J3{});
    }
  }
  if (c1 != d || (d & 31) == 0) return;
  // The tail: vectors of eight codes, then single codes.
  const int ct = 32 * (d >> 5);
  const std::uint8_t* tail = rows + static_cast<std::size_t>(d >> 5) * bb;
  const int m = d - ct, m8 = m >> 3;
  for (int i = 0; i < m8; ++i) {
    value_pass<1> vp;
    fill(vp, 0, ct + 8 * i, group_of(ct + 8 * i));
    value_tail_tile<Bits, Signed, Q>(vp, tail, stride, T, i, ds);
  }
  for (int c = ct + 8 * m8; c < d; ++c) {
    const int gc = group_of(c);
    for (int q = 0; q < Q; ++q) {
      float x = has_zero ? f.zs[gc][q] : 0.0f;
      for (int t = 0; t < T; ++t)
        x += f.a[t][gc][q] *
             static_cast<float>(tail_code<Bits, Signed>(tail + static_cast<std::size_t>(t) * stride, c - ct));
      acc[q * ds + c] += x;
    }
  }
}

template <int Bits, bool Signed, int Q>
inline void value_rows(const float* p, std::size_t n, const std::uint8_t* chunk, std::size_t stride, int t0, int T,
                       int d, int group, const float* scale, const float* zero, float* acc, value_factors& f) noexcept {
  const int ng = (d + group - 1) / group;
  for (int k_lo = 0; k_lo < ng; k_lo += vgroups) {
    const int nk = ng - k_lo < vgroups ? ng - k_lo : vgroups;
    const int c0 = k_lo * group, c1 = d - c0 <= vgroups * group ? d : c0 + vgroups * group;
    const bool sums = masked_layout<Bits>;
    switch ((nk + 1) >> 1) {
      case 1:
        value_factors_for<Q, 1>(f, p, n, t0, T, ng, k_lo, nk, scale, zero, sums);
        break;
      case 2:
        value_factors_for<Q, 2>(f, p, n, t0, T, ng, k_lo, nk, scale, zero, sums);
        break;
      case 3:
        value_factors_for<Q, 3>(f, p, n, t0, T, ng, k_lo, nk, scale, zero, sums);
        break;
      default:
        value_factors_for<Q, 4>(f, p, n, t0, T, ng, k_lo, nk, scale, zero, sums);
        break;
    }
    value_window<Bits, Signed, Q>(chunk, stride, T, d, group, c0, c1, f, k_lo, zero != nullptr, acc);
  }
}

template <int Bits, bool Signed>
inline void accumulate_rows_simd(const float* p, int nq, const std::uint8_t* rows, std::size_t stride, int n, int d,
                                 int group, const float* scale, const float* zero, float* acc) noexcept {
  const std::size_t ds = static_cast<std::size_t>(d), ns = static_cast<std::size_t>(n);
  value_factors f;
  const std::size_t ng = static_cast<std::size_t>((d + group - 1) / group);
  for (int t0 = 0; t0 < n; t0 += vchunk) {
    const int T = n - t0 < vchunk ? n - t0 : vchunk;
    const std::uint8_t* chunk = rows + static_cast<std::size_t>(t0) * stride;
    if (t0 + vchunk < n) {  // the next chunk: rows and their scales and zero points
      const int Tn = n - t0 - vchunk < vchunk ? n - t0 - vchunk : vchunk;
      prefetch_bytes(chunk + vchunk * stride, static_cast<std::size_t>(Tn) * stride);
      const std::size_t po = static_cast<std::size_t>(t0 + vchunk) * ng;
      prefetch_bytes(scale + po, sizeof(float) * Tn * ng);
      if (zero != nullptr) prefetch_bytes(zero + po, sizeof(float) * Tn * ng);
    }
    for (int q0 = 0; q0 < nq; q0 += 4) {
      const float* pq = p + q0 * ns;
      float* aq = acc + q0 * ds;
      switch (nq - q0 < 4 ? nq - q0 : 4) {
        case 4:
          value_rows<Bits, Signed, 4>(pq, ns, chunk, stride, t0, T, d, group, scale, zero, aq, f);
          break;
        case 3:
          value_rows<Bits, Signed, 3>(pq, ns, chunk, stride, t0, T, d, group, scale, zero, aq, f);
          break;
        case 2:
          value_rows<Bits, Signed, 2>(pq, ns, chunk, stride, t0, T, d, group, scale, zero, aq, f);
          break;
        default:
          value_rows<Bits, Signed, 1>(pq, ns, chunk, stride, t0, T, d, group, scale, zero, aq, f);
          break;
      }
    }
  }
}

}  // namespace avx2

// ---- Integer kernels: B = 2, 4 and 8, d a multiple of 32 up to max_d. The query rows (keys)
// and the attention weights times the value scales (values) are rounded to 16-bit integers,
// one scale per query row (keys) or per query row, group and chunk of 64 rows (values), and
// multiplied with the codes widened to 16 bits by VPMADDWD, the int32 sums added by VPADDD
// (sixteen products per instruction pair, no conversion of the codes to float). Rounding: a
// row x gets a = max |x| / L and x_i ~ a round(x_i / a), so |x_i - a round(x_i / a)| <= a / 2
// (plus float rounding); L = 32767 (values), or for keys the largest L <= 32767 with
// d (2^B - 1) L inside int32. A key sum is then off by at most (max |w| / (2 L)) sum_c code_c,
// a value sum by (max_t |p_t s_t| / 65534) sum_t code_t per chunk: 2^-16 of the largest term
// per code unit, finer than the binary16 the scales are kept in.
//
// Units: a row's codes are read sixteen at a time as int16 lanes ("units"), in channel order
// for B = 4 and 8 (unit u: channels 16 u ..; for B = 4 a block's low nibbles, then its high
// nibbles). For B = 2 the sixteen bytes of two blocks (i, i + 1) are widened once and unit
// 4 i' + s (s < 4) is bits 2s, 2s + 1 of each: lanes 0-7 are channels 64 i' + 8 s + l of the
// first block, lanes 8-15 the same of the second. A row with an odd number of 2-bit blocks
// has a last pair with one block (its lanes 8-15 read zero).
namespace avx2i {

inline constexpr int max_d = 256;
inline constexpr int vchunk = 64;  // rows per value pass (bounds the int32 sums)

template <int Bits>
constexpr bool supported(int d) noexcept {
  return (Bits == 2 || Bits == 4 || Bits == 8) && d > 0 && d % 32 == 0 && d <= max_d;
}

template <int Bits>
constexpr int units(int d) noexcept {
  return Bits == 2 ? 4 * ((d / 32 + 1) / 2) : d / 16;
}

// For B = 2: the channel of lane 0 (half 0) or lane 8 (half 1) of unit u; -1: past d.
constexpr int pair_unit_channel(int d, int u, int half) noexcept {
  const int c = 64 * (u / 4) + 32 * half + 8 * (u % 4);
  return c < d ? c : -1;
}

// The largest integer weight L for which n products of it and a B-bit code sum inside int32.
template <int Bits>
constexpr int weight_limit(int n) noexcept {
  const long long lim = 2147483647LL / (static_cast<long long>(n > 0 ? n : 1) * ((1 << Bits) - 1));
  return lim < 32767 ? static_cast<int>(lim) : 32767;
}

inline float lane_max(__m256 v) noexcept {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// max |x[i]| for i < n (n a multiple of 8).
inline float max_abs(const float* x, int n) noexcept {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 mx = _mm256_setzero_ps();
  for (int i = 0; i < n; i += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask));
  return lane_max(mx);
}

// out[i] = round(x[i] / a) for i < n (n a multiple of 8), a = m / L where m = max |x| (the
// caller's, often found while x was written); returns a (0 when every x is 0).
inline float round_weights(const float* x, int n, int L, float m, std::int16_t* out) noexcept {
  if (!(m > 0.0f)) {
    std::memset(out, 0, sizeof(std::int16_t) * static_cast<std::size_t>(n));
    return 0.0f;
  }
  const __m256 inv = _mm256_set1_ps(static_cast<float>(L) / m);
  for (int i = 0; i < n; i += 8) {
    const __m256i r = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packs_epi32(r, r), 0xD8)));
  }
  return m / static_cast<float>(L);
}

// Query rows in unit order: for B = 2, unit 4 i + s takes channels 64 i + 8 s .. + 8 and
// 64 i + 32 + 8 s .. + 8 (zero where past d).
template <int Bits>
inline void to_unit_order(const std::int16_t* w, int d, std::int16_t* out) noexcept {
  if constexpr (Bits == 2) {
    for (int u = 0; u < units<Bits>(d); ++u)
      for (int h = 0; h < 2; ++h) {
        const int c = pair_unit_channel(d, u, h);
        if (c >= 0)
          std::memcpy(out + 16 * u + 8 * h, w + c, 8 * sizeof(std::int16_t));
        else
          std::memset(out + 16 * u + 8 * h, 0, 8 * sizeof(std::int16_t));
      }
  } else {
    std::memcpy(out, w, sizeof(std::int16_t) * static_cast<std::size_t>(d));
  }
}

inline __m256i widen16(const std::uint8_t* p) noexcept {
  return _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256i widen8(const std::uint8_t* p) noexcept {
  return _mm256_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// Unit J of a block in channel order: sixteen channels 16 J .. 16 J + 15 (B = 8: of the
// block's half at p; B = 4: its low, then high nibbles; B = 2 (values only; keys read pairs
// of blocks, for_units): lanes 0-7 are bits 4J, 4J + 1 and lanes
// 8-15 bits 4J + 2, 4J + 3 of the block's eight bytes, read twice by one load).
template <int Bits, int J>
KVC_CODE_INLINE __m256i unit_at(const std::uint8_t* p) noexcept {
  if constexpr (Bits == 8) {
    return widen16(p);
  } else if constexpr (Bits == 4) {
    const __m256i x = widen16(p);
    return J == 0 ? _mm256_and_si256(x, _mm256_set1_epi16(15)) : _mm256_srli_epi16(x, 4);
  } else {
    const __m256i x = _mm256_cvtepu8_epi16(_mm_castpd_si128(_mm_loaddup_pd(reinterpret_cast<const double*>(p))));
    // Shifting 32-bit lanes moves bits of a lane's upper int16 into its lower one, above the
    // two bits kept.
    const __m256i y =
        _mm256_srlv_epi32(x, _mm256_setr_epi32(4 * J, 4 * J, 4 * J, 4 * J, 4 * J + 2, 4 * J + 2, 4 * J + 2, 4 * J + 2));
    return _mm256_and_si256(y, _mm256_set1_epi16(3));
  }
}

// f(u, c0, c1) for every unit u of rows r0 and r1 (c0, c1: their codes, int16 lanes).
template <int Bits, class F>
KVC_CODE_INLINE void for_units(const std::uint8_t* r0, const std::uint8_t* r1, int d, F&& f) noexcept {
  const int nb = d / 32;
  if constexpr (Bits == 8) {
    for (int u = 0; u < 2 * nb; ++u) f(u, unit_at<8, 0>(r0 + 16 * u), unit_at<8, 0>(r1 + 16 * u));
  } else if constexpr (Bits == 4) {
    for (int b = 0; b < nb; ++b) {
      f(2 * b, unit_at<4, 0>(r0 + 16 * b), unit_at<4, 0>(r1 + 16 * b));
      f(2 * b + 1, unit_at<4, 1>(r0 + 16 * b), unit_at<4, 1>(r1 + 16 * b));
    }
  } else {
    const __m256i m = _mm256_set1_epi16(3);
    for (int i = 0; 2 * i < nb; ++i) {
      const bool two = 2 * i + 1 < nb;
      const __m256i x0 = two ? widen16(r0 + 16 * i) : widen8(r0 + 16 * i);
      const __m256i x1 = two ? widen16(r1 + 16 * i) : widen8(r1 + 16 * i);
      f(4 * i, _mm256_and_si256(x0, m), _mm256_and_si256(x1, m));
      f(4 * i + 1, _mm256_and_si256(_mm256_srli_epi16(x0, 2), m), _mm256_and_si256(_mm256_srli_epi16(x1, 2), m));
      f(4 * i + 2, _mm256_and_si256(_mm256_srli_epi16(x0, 4), m), _mm256_and_si256(_mm256_srli_epi16(x1, 4), m));
      f(4 * i + 3, _mm256_srli_epi16(x0, 6), _mm256_srli_epi16(x1, 6));
    }
  }
}

// Keeps integer vectors in registers at this point: the compiler may neither fold a load into
// each instruction that uses it nor interleave the work before and after.
inline void in_reg(__m256i& x) noexcept {
#if defined(__GNUC__) || defined(__clang__)
  __asm__("" : "+x"(x));
#endif
}
inline void in_reg(__m256i& x, __m256i& y) noexcept {
#if defined(__GNUC__) || defined(__clang__)
  __asm__("" : "+x"(x), "+x"(y));
#endif
}

inline __m256i lane_sums8i(__m256i v0, __m256i v1, __m256i v2, __m256i v3, __m256i v4, __m256i v5, __m256i v6,
                           __m256i v7) noexcept {
  const __m256i h0 = _mm256_hadd_epi32(_mm256_hadd_epi32(v0, v1), _mm256_hadd_epi32(v2, v3));
  const __m256i h1 = _mm256_hadd_epi32(_mm256_hadd_epi32(v4, v5), _mm256_hadd_epi32(v6, v7));
  return _mm256_add_epi32(_mm256_permute2x128_si256(h0, h1, 0x20), _mm256_permute2x128_si256(h0, h1, 0x31));
}

// f(std::integral_constant<int, Q>{}, q0) for the query rows [q0, q0 + Q) of nq, four at a
// time (Q = 4 but for the last).
template <class F>
KVC_CODE_INLINE void in_fours(int nq, F&& f) noexcept {
  for (int q0 = 0; q0 < nq; q0 += 4) switch (nq - q0 < 4 ? nq - q0 : 4) {
      case 4:
        f(std::integral_constant<int, 4>{}, q0);
        break;
      case 3:
        f(std::integral_constant<int, 3>{}, q0);
        break;
      case 2:
        f(std::integral_constant<int, 2>{}, q0);
        break;
      default:
        f(std::integral_constant<int, 1>{}, q0);
        break;
    }
}

// f(tp, r0, r1) for the row pairs tp in [p0, p1) of a chunk of T rows at `at`: rows 2 tp and
// 2 tp + 1, or row 2 tp twice for an odd last row (whose partner the caller weights 0).
template <class F>
KVC_CODE_INLINE void for_row_pairs(const std::uint8_t* at, std::size_t stride, int T, int p0, int p1, F&& f) noexcept {
  const int whole = p1 < T / 2 ? p1 : T / 2;  // pairs of two rows below T
  const std::uint8_t* r = at + static_cast<std::size_t>(2 * p0) * stride;
  int tp = p0;
  for (; tp < whole; ++tp, r += 2 * stride) f(tp, r, r + stride);
  if (tp < p1) f(tp, r, r);
}

// out[q ns + t] = alpha[q] (the sum of the eight int32 lanes of part[q][t]) for q < Q and
// t < T <= 8: the key sums of eight rows, reduced together.
template <int Q>
inline void store_row_sums(const std::int32_t (*part)[8][8], int T, const float* alpha, float* out,
                           std::size_t ns) noexcept {
  for (int q = 0; q < Q; ++q) {
    const auto v = [&](int t) noexcept {
      return t < T ? _mm256_load_si256(reinterpret_cast<const __m256i*>(part[q][t])) : _mm256_setzero_si256();
    };
    const __m256 s = _mm256_mul_ps(_mm256_cvtepi32_ps(lane_sums8i(v(0), v(1), v(2), v(3), v(4), v(5), v(6), v(7))),
                                   _mm256_set1_ps(alpha[q]));
    float* o = out + q * ns;
    if (T == 8) {
      _mm256_storeu_ps(o, s);
    } else {
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, s);
      std::memcpy(o, tmp, sizeof(float) * static_cast<std::size_t>(T));
    }
  }
}

// out[q ns + t] = alpha[q] (the sum of row t's int32 lanes) for Q query rows, rows [0, n):
// two rows at a time, sums(r0, r1, a0, a1) setting a0[q] and a1[q] to the lanes of the rows
// at r0 and r1 (r1 = r0 past the last row); the sums of eight rows are reduced together.
template <int Q, class Sums>
KVC_CODE_INLINE void key_row_sums(const std::uint8_t* rows, std::size_t stride, int n, const float* alpha, float* out,
                                  std::size_t ns, Sums&& sums) noexcept {
  alignas(32) std::int32_t part[Q][8][8];
  for (int t0 = 0; t0 < n; t0 += 8) {
    const int T = n - t0 < 8 ? n - t0 : 8;
    if (t0 + 8 < n) avx2::prefetch_bytes(rows + static_cast<std::size_t>(t0 + 8) * stride, 8 * stride);
    for (int t = 0; t < T; t += 2) {
      const std::uint8_t* r0 = rows + static_cast<std::size_t>(t0 + t) * stride;
      const std::uint8_t* r1 = t + 1 < T ? r0 + stride : r0;
      __m256i a0[Q], a1[Q];
      sums(r0, r1, a0, a1);
      KVC_CODE_UNROLL
      for (int q = 0; q < Q; ++q) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(part[q][t]), a0[q]);
        _mm256_store_si256(reinterpret_cast<__m256i*>(part[q][t + 1]), a1[q]);
      }
    }
    store_row_sums<Q>(part, T, alpha, out + t0, ns);
  }
}

// out[q ns + t] = alpha[q] sum_c wi[q][c] code(t, c) for Q query rows (wi in unit order, ws
// int16 a row), rows [0, n): 2 Q int32 accumulators.
template <int Bits, int Q>
inline void key_rows(const std::int16_t* wi, std::size_t ws, const float* alpha, const std::uint8_t* rows,
                     std::size_t stride, int n, int d, float* out, std::size_t ns) noexcept {
  key_row_sums<Q>(rows, stride, n, alpha, out, ns,
                  [&](const std::uint8_t* r0, const std::uint8_t* r1, __m256i(&a0)[Q],
                      __m256i(&a1)[Q]) noexcept KVC_CODE_LAMBDA_INLINE {
                    KVC_CODE_UNROLL
                    for (int q = 0; q < Q; ++q) a0[q] = a1[q] = _mm256_setzero_si256();
                    for_units<Bits>(r0, r1, d, [&](int u, __m256i c0, __m256i c1) noexcept KVC_CODE_LAMBDA_INLINE {
                      KVC_CODE_UNROLL
                      for (int q = 0; q < Q; ++q) {
                        __m256i w = _mm256_load_si256(
                            reinterpret_cast<const __m256i*>(wi + q * ws + 16 * static_cast<std::size_t>(u)));
                        // Each unit's sums are pinned to registers before the next (below): else
                        // GCC carries some of them through memory across the loop (4-bit keys:
                        // 14-25% faster). 2-bit keys unpack four units from one load and also
                        // need w pinned to one load (15-20% faster); for 4- and 8-bit units that
                        // measured the same or slower.
                        if constexpr (Bits == 2) in_reg(w);
                        a0[q] = _mm256_add_epi32(a0[q], _mm256_madd_epi16(c0, w));
                        a1[q] = _mm256_add_epi32(a1[q], _mm256_madd_epi16(c1, w));
                      }
                      KVC_CODE_UNROLL
                      for (int q = 0; q < Q; ++q) in_reg(a0[q], a1[q]);
                    });
                  });
}

template <int Bits>
inline void dot_rows_int(const float* w, int nq, const std::uint8_t* rows, std::size_t stride, int n, int d,
                         float* out) noexcept {
  const std::size_t ns = static_cast<std::size_t>(n), ws = 16 * static_cast<std::size_t>(units<Bits>(d));
  alignas(32) std::int16_t natural[max_d];
  alignas(32) std::int16_t wi[4 * 16 * units<Bits>(max_d)];
  float alpha[4];
  const int L = weight_limit<Bits>(d);
  in_fours(nq, [&](auto quad, int q0) noexcept KVC_CODE_LAMBDA_INLINE {
    constexpr int Q = decltype(quad)::value;
    for (int q = 0; q < Q; ++q) {
      const float* wq = w + static_cast<std::size_t>(q0 + q) * d;
      alpha[q] = round_weights(wq, d, L, max_abs(wq, d), natural);
      to_unit_order<Bits>(natural, d, wi + q * ws);
    }
    key_rows<Bits, Q>(wi, ws, alpha, rows, stride, n, d, out + q0 * ns, ns);
  });
}

// Values. For a chunk of T <= vchunk rows, query row q and group k: a_t = p[q][t] s[t][k] is
// rounded to int16 (scale beta[q][k]); the unit's codes of rows t, t + 1 are interleaved
// (VPUNPCKLWD / HWD) so that VPMADDWD against the pair (a_t, a_t+1) adds both rows' products
// per channel; the int32 sums become beta (sum) + sum_t p_t z[t][k] once per chunk.
struct value_weights {
  alignas(32) std::int16_t a[4][max_d / 32][vchunk + 16];  // [q][k][t], an even count (0 past T)
  float beta[4][max_d / 32];
  float zs[4][max_d / 32];
};

// Channels [c, c + 16) (one unit, in one group k) over the rows of a chunk: the int32 sums of
// rows 2 tp and 2 tp + 1 times their weights, the int16 pair at w[q] + 2 tp; then
// acc[q][c ..] += beta (sums) + the zero-point sums.
template <int Bits, int Q, int J>
KVC_CODE_INLINE void value_unit(const value_weights& vw, const std::uint8_t* at, std::size_t stride, int T, int c,
                                int k, float* acc, std::size_t ds) noexcept {
  __m256i lo[Q], hi[Q];
  KVC_CODE_UNROLL
  for (int q = 0; q < Q; ++q) lo[q] = hi[q] = _mm256_setzero_si256();
  const auto pair = [&](int tp, const std::uint8_t* r0, const std::uint8_t* r1) noexcept KVC_CODE_LAMBDA_INLINE {
    const __m256i x0 = unit_at<Bits, J>(r0), x1 = unit_at<Bits, J>(r1);
    const __m256i l = _mm256_unpacklo_epi16(x0, x1), h = _mm256_unpackhi_epi16(x0, x1);
    KVC_CODE_UNROLL
    for (int q = 0; q < Q; ++q) {
      const __m256i w = _mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float*>(vw.a[q][k] + 2 * tp)));
      lo[q] = _mm256_add_epi32(lo[q], _mm256_madd_epi16(l, w));
      hi[q] = _mm256_add_epi32(hi[q], _mm256_madd_epi16(h, w));
    }
    // The sums stay in registers from pair to pair (else GCC carries some through memory:
    // BM_code_kernels, 4-bit values 1.3-1.5x faster, 2-bit 1.2x).
    KVC_CODE_UNROLL
    for (int q = 0; q < Q; ++q) in_reg(lo[q], hi[q]);
  };
  for_row_pairs(at, stride, T, 0, (T + 1) / 2, pair);  // vw.a is 0 past T
  KVC_CODE_UNROLL
  for (int q = 0; q < Q; ++q) {
    // lo holds lanes 0-3 and 8-11 of the unit, hi lanes 4-7 and 12-15.
    float* o = acc + q * ds + c;
    const __m256 beta = _mm256_set1_ps(vw.beta[q][k]), zs = _mm256_set1_ps(vw.zs[q][k]);
    const __m256 x0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_permute2x128_si256(lo[q], hi[q], 0x20)), beta, zs);
    const __m256 x1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_permute2x128_si256(lo[q], hi[q], 0x31)), beta, zs);
    _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), x0));
    _mm256_storeu_ps(o + 8, _mm256_add_ps(_mm256_loadu_ps(o + 8), x1));
  }
}

// Not inlined into the caller, so that the accumulators of value_unit get the registers
// (inlined into paged_kv_cache's page loop, GCC spilled them).
template <int Bits, int Q>
KVC_CODE_OUTLINE void value_units(const value_weights& vw, const std::uint8_t* rows, std::size_t stride, int T, int d,
                                  int group, float* acc) noexcept {
  const std::size_t ds = static_cast<std::size_t>(d);
  for (int b = 0; b < d / 32; ++b) {
    const std::uint8_t* blk = rows + static_cast<std::size_t>(b) * 4 * Bits;
    const int k = 32 * b / group;
    value_unit<Bits, Q, 0>(vw, blk, stride, T, 32 * b, k, acc, ds);
    if constexpr (Bits == 8)
      value_unit<Bits, Q, 0>(vw, blk + 16, stride, T, 32 * b + 16, k, acc, ds);
    else
      value_unit<Bits, Q, 1>(vw, blk, stride, T, 32 * b + 16, k, acc, ds);
  }
}

// dst[k][t] = src[t ng + k] for t < T8 (a multiple of 8; the rows past T are zero already
// in src's caller's view: they are read, so src must hold T8 rows) and k < ng.
inline void transpose_params(const float* src, int T8, int ng, float (*dst)[vchunk]) noexcept {
  if (ng == 1) {
    std::memcpy(dst[0], src, sizeof(float) * static_cast<std::size_t>(T8));
  } else if (ng == 4) {  // eight rows of four groups: four vectors, transposed in registers
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int t = 0; t < T8; t += 8) {
      const float* at = src + 4 * t;
      const __m256 v0 = _mm256_loadu_ps(at), v1 = _mm256_loadu_ps(at + 8), v2 = _mm256_loadu_ps(at + 16),
                   v3 = _mm256_loadu_ps(at + 24);
      const __m256 a0 = _mm256_unpacklo_ps(v0, v1), a1 = _mm256_unpackhi_ps(v0, v1);
      const __m256 a2 = _mm256_unpacklo_ps(v2, v3), a3 = _mm256_unpackhi_ps(v2, v3);
      // Lanes hold rows 0, 2, 4, 6, 1, 3, 5, 7: put them in order.
      _mm256_storeu_ps(dst[0] + t, _mm256_permutevar8x32_ps(_mm256_shuffle_ps(a0, a2, 0x44), order));
      _mm256_storeu_ps(dst[1] + t, _mm256_permutevar8x32_ps(_mm256_shuffle_ps(a0, a2, 0xEE), order));
      _mm256_storeu_ps(dst[2] + t, _mm256_permutevar8x32_ps(_mm256_shuffle_ps(a1, a3, 0x44), order));
      _mm256_storeu_ps(dst[3] + t, _mm256_permutevar8x32_ps(_mm256_shuffle_ps(a1, a3, 0xEE), order));
    }
  } else {
    for (int t = 0; t < T8; ++t)
      for (int k = 0; k < ng; ++k) dst[k][t] = src[static_cast<std::size_t>(t) * ng + k];
  }
}

// The factors of a chunk for Q query rows: p [q][ns] from column t0, scale / zero [t][ng].
// For each query row q < Q and group k < ng, a[t] = p[q][t0 + t] s[t][k] (zero for t >= T, up
// to vchunk), zsum = sum_t p z and amax = max_t |a[t]| go to sink(q, k, a, T8, zsum, amax),
// T8 = T rounded up to 8. One pass per group reads its scales and zeros once for every query row.
template <class Sink>
inline void value_factors(const float* p, std::size_t ns, int Q, int t0, int T, int ng, const float* scale,
                          const float* zero, Sink&& sink) noexcept {
  alignas(32) float st[max_d / 32][vchunk], zt[max_d / 32][vchunk], a[4][vchunk], pz[4][vchunk];
  alignas(32) float pad[2][8 * (max_d / 32)];
  const int T8 = (T + 7) & ~7, full = T & ~7;
  const std::size_t gs = static_cast<std::size_t>(ng);
  // Rows past T read as zero: the last partial eight rows go through a zero-padded copy.
  const auto params = [&](const float* src, float(*dst)[vchunk], float* tmp) noexcept {
    const float* at = src + static_cast<std::size_t>(t0) * gs;
    transpose_params(at, full, ng, dst);
    if (full < T) {
      std::memset(tmp, 0, sizeof(float) * 8 * gs);
      std::memcpy(tmp, at + static_cast<std::size_t>(full) * gs,
                  sizeof(float) * static_cast<std::size_t>(T - full) * gs);
      float(*tail)[vchunk] = reinterpret_cast<float(*)[vchunk]>(&dst[0][full]);
      transpose_params(tmp, 8, ng, tail);
    }
  };
  params(scale, st, pad[0]);
  if (zero != nullptr) params(zero, zt, pad[1]);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int q = 0; q < Q; ++q) {
    const float* pq = p + static_cast<std::size_t>(q) * ns + t0;
    std::memcpy(pz[q], pq, sizeof(float) * static_cast<std::size_t>(full));
    if (full < T)
      _mm256_store_ps(pz[q] + full,
                      _mm256_maskload_ps(pq + full, _mm256_cmpgt_epi32(_mm256_set1_epi32(T - full), lanes)));
    std::memset(a[q] + T8, 0, sizeof(float) * static_cast<std::size_t>(vchunk - T8));
  }
  for (int k = 0; k < ng; ++k) {
    __m256 zs[4], mx[4];
    KVC_CODE_UNROLL
    for (int q = 0; q < 4; ++q) zs[q] = mx[q] = _mm256_setzero_ps();
    for (int t = 0; t < T8; t += 8) {
      const __m256 sv = _mm256_load_ps(st[k] + t);
      const __m256 zv = zero != nullptr ? _mm256_load_ps(zt[k] + t) : _mm256_setzero_ps();
      KVC_CODE_UNROLL
      for (int q = 0; q < 4; ++q)
        if (q < Q) {
          const __m256 pv = _mm256_load_ps(pz[q] + t);
          const __m256 x = _mm256_mul_ps(pv, sv);
          _mm256_store_ps(a[q] + t, x);
          mx[q] = _mm256_max_ps(mx[q], _mm256_and_ps(x, abs_mask));
          zs[q] = _mm256_fmadd_ps(pv, zv, zs[q]);
        }
    }
    KVC_CODE_UNROLL
    for (int q = 0; q < 4; ++q)
      if (q < Q) sink(q, k, static_cast<const float*>(a[q]), T8, avx2::lane_sum(zs[q]), lane_max(mx[q]));
  }
}

inline void value_factors_int(const float* p, std::size_t ns, int Q, int t0, int T, int ng, const float* scale,
                              const float* zero, value_weights& vw) noexcept {
  value_factors(p, ns, Q, t0, T, ng, scale, zero,
                [&](int q, int k, const float* a, int T8, float zs, float m) noexcept {
                  vw.beta[q][k] = round_weights(a, T8, 32767, m, vw.a[q][k]);
                  vw.a[q][k][T] = 0;  // the partner of an odd last row
                  vw.zs[q][k] = zs;
                });
}

// The value pass of the integer and byte kernels: rows in chunks of vchunk (the next chunk
// fetched meanwhile), query rows four at a time; per chunk and four query rows,
// factors(p, ns, Q, t0, T, ng, scale, zero, w) fills the weights w, then
// units(std::integral_constant<int, Q>{}, w, chunk, stride, T, d, g, acc) adds the chunk.
template <class Weights, class Factors, class Units>
inline void value_chunks(const float* p, int nq, const std::uint8_t* rows, std::size_t stride, int n, int d, int group,
                         const float* scale, const float* zero, float* acc, Factors&& factors, Units&& units) noexcept {
  const std::size_t ds = static_cast<std::size_t>(d), ns = static_cast<std::size_t>(n);
  const int g = group < d ? group : d;
  const int ng = (d + g - 1) / g;
  Weights w;
  for (int t0 = 0; t0 < n; t0 += vchunk) {
    const int T = n - t0 < vchunk ? n - t0 : vchunk;
    const std::uint8_t* chunk = rows + static_cast<std::size_t>(t0) * stride;
    if (t0 + vchunk < n) {
      const int Tn = n - t0 - vchunk < vchunk ? n - t0 - vchunk : vchunk;
      avx2::prefetch_bytes(chunk + vchunk * stride, static_cast<std::size_t>(Tn) * stride);
    }
    for (int q0 = 0; q0 < nq; q0 += 4) {
      const int Q = nq - q0 < 4 ? nq - q0 : 4;
      factors(p + q0 * ns, ns, Q, t0, T, ng, scale, zero, w);
      float* aq = acc + q0 * ds;
      in_fours(Q, [&](auto quad, int) noexcept KVC_CODE_LAMBDA_INLINE { units(quad, w, chunk, stride, T, d, g, aq); });
    }
  }
}

template <int Bits>
inline void accumulate_rows_int(const float* p, int nq, const std::uint8_t* rows, std::size_t stride, int n, int d,
                                int group, const float* scale, const float* zero, float* acc) noexcept {
  value_chunks<value_weights>(p, nq, rows, stride, n, d, group, scale, zero, acc, value_factors_int,
                              [](auto q, const value_weights& vw, const std::uint8_t* chunk, std::size_t st, int T,
                                 int dd, int g, float* aq) noexcept KVC_CODE_LAMBDA_INLINE {
                                value_units<Bits, decltype(q)::value>(vw, chunk, st, T, dd, g, aq);
                              });
}

}  // namespace avx2i

// ---- Byte kernels: B = 2 and 4, d a multiple of 32 up to max_d, for callers that ask for
// 8-bit weights (WeightBits = 8 below). As the integer kernels, but the weights are rounded
// to 8-bit integers (a = max |x| / 127, |round(x / a)| <= 127) and multiplied with the codes
// as bytes by VPMADDUBSW: 32 products an instruction, twice VPMADDWD's, summed in int16
// lanes; every sum stays inside int16 (a lane adds at most 2 (2^B - 1) 127 an instruction:
// at most eight such for B = 4 before it is widened to int32, 43 for B = 2). Rounding: a key
// sum is off by at most (max |w| / 254) sum_c code_c, a value sum by (max_t |p_t s_t| / 254)
// sum_t code_t per chunk of 64 rows: 2^-8 of the largest term per code unit.
//
// A block of 32 codes becomes one vector of 32 bytes in channel order: for B = 4 its 16 bytes
// in both halves, the upper half shifted right by 4, then the low nibble of each byte; for
// B = 2 its 8 bytes in all four quarters, quarter j shifted right by 2 j, then the low two
// bits (byte i of quarter j is code 8 j + i of the block).
namespace avx2b {

inline constexpr int max_d = 256;
inline constexpr int vchunk = avx2i::vchunk;

template <int Bits>
constexpr bool supported(int d) noexcept {
  return (Bits == 2 || Bits == 4) && d > 0 && d % 32 == 0 && d <= max_d;
}

// out[i] = round(x[i] / a) for i < n (n a multiple of 32), a = m / 127 where m = max |x| (as
// for round_weights); returns a (0 when every x is 0).
inline float round_weights8(const float* x, int n, float m, std::int8_t* out) noexcept {
  if (!(m > 0.0f)) {
    std::memset(out, 0, static_cast<std::size_t>(n));
    return 0.0f;
  }
  const __m256 inv = _mm256_set1_ps(127.0f / m);
  // Packing interleaves the four vectors by 32-bit groups: the permutation puts them back.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int i = 0; i < n; i += 32) {
    const auto r = [&](int j) noexcept {
      return _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * j), inv));
    };
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(r(0), r(1)), _mm256_packs_epi32(r(2), r(3)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_permutevar8x32_epi32(b, order));
  }
  return m / 127.0f;
}

// The 32 codes of the block at p as bytes, in channel order.
template <int Bits>
KVC_CODE_INLINE __m256i block_bytes_of(const std::uint8_t* p) noexcept {
  if constexpr (Bits == 4) {
    const __m256i x = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_and_si256(_mm256_srlv_epi32(x, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), _mm256_set1_epi8(15));
  } else {
    std::int64_t v;
    std::memcpy(&v, p, sizeof v);
    const __m256i x = _mm256_set1_epi64x(v);
    return _mm256_and_si256(_mm256_srlv_epi64(x, _mm256_setr_epi64x(0, 2, 4, 6)), _mm256_set1_epi8(3));
  }
}

// out[q ns + t] = alpha[q] sum_c wb[q][c] code(t, c) for Q query rows (wb int8, d a row),
// rows [0, n): two rows at a time, 2 Q int16 accumulators; the sums of eight rows are
// reduced together.
template <int Bits, int Q>
inline void key_rows(const std::int8_t* wb, const float* alpha, const std::uint8_t* rows, std::size_t stride, int n,
                     int d, float* out, std::size_t ns) noexcept {
  constexpr int bb = block_bytes<Bits>;
  const int nb = d / 32;
  const __m256i ones = _mm256_set1_epi16(1);
  avx2i::key_row_sums<Q>(
      rows, stride, n, alpha, out, ns,
      [&](const std::uint8_t* r0, const std::uint8_t* r1, __m256i(&a0)[Q],
          __m256i(&a1)[Q]) noexcept KVC_CODE_LAMBDA_INLINE {
        KVC_CODE_UNROLL
        for (int q = 0; q < Q; ++q) a0[q] = a1[q] = _mm256_setzero_si256();
        for (int b = 0; b < nb; ++b) {
          const __m256i c0 = block_bytes_of<Bits>(r0 + b * bb), c1 = block_bytes_of<Bits>(r1 + b * bb);
          KVC_CODE_UNROLL
          for (int q = 0; q < Q; ++q) {
            const __m256i w = _mm256_load_si256(reinterpret_cast<const __m256i*>(wb + q * d + 32 * b));
            a0[q] = _mm256_add_epi16(a0[q], _mm256_maddubs_epi16(c0, w));
            a1[q] = _mm256_add_epi16(a1[q], _mm256_maddubs_epi16(c1, w));
          }
          KVC_CODE_UNROLL
          for (int q = 0; q < Q; ++q) avx2i::in_reg(a0[q], a1[q]);  // as in avx2i::key_rows
        }
        KVC_CODE_UNROLL
        for (int q = 0; q < Q; ++q) {  // int16 lanes, pairwise to int32
          a0[q] = _mm256_madd_epi16(a0[q], ones);
          a1[q] = _mm256_madd_epi16(a1[q], ones);
        }
      });
}

template <int Bits>
inline void dot_rows_b(const float* w, int nq, const std::uint8_t* rows, std::size_t stride, int n, int d,
                       float* out) noexcept {
  const std::size_t ns = static_cast<std::size_t>(n), ds = static_cast<std::size_t>(d);
  alignas(32) std::int8_t wb[4 * max_d];
  float alpha[4];
  avx2i::in_fours(nq, [&](auto quad, int q0) noexcept KVC_CODE_LAMBDA_INLINE {
    constexpr int Q = decltype(quad)::value;
    for (int q = 0; q < Q; ++q) {
      const float* wq = w + (q0 + q) * ds;
      alpha[q] = round_weights8(wq, d, avx2i::max_abs(wq, d), wb + q * d);
    }
    key_rows<Bits, Q>(wb, alpha, rows, stride, n, d, out + q0 * ns, ns);
  });
}

// Values. For a chunk of T <= vchunk rows, query row q and group k: a_t = p[q][t] s[t][k]
// is rounded to int8 (scale beta[q][k]), and the pair (a_t, a_t+1) kept twice in 32 bits, so
// that one broadcast gives VPMADDUBSW its weights against the interleaved codes of rows t,
// t + 1 (VPUNPCKLBW / HBW): each int16 lane adds both rows' products for one channel.
struct value_weights {
  alignas(32) std::int32_t a[4][max_d / 32][vchunk / 2];  // [q][k][row pair]
  float beta[4][max_d / 32];
  float zs[4][max_d / 32];
};

inline void value_factors_b(const float* p, std::size_t ns, int Q, int t0, int T, int ng, const float* scale,
                            const float* zero, value_weights& vw) noexcept {
  avx2i::value_factors(
      p, ns, Q, t0, T, ng, scale, zero, [&](int q, int k, const float* a, int, float zs, float m) noexcept {
        alignas(32) std::int8_t r[vchunk];
        vw.beta[q][k] = round_weights8(a, vchunk, m, r);  // a is zero past T
        for (int i = 0; i < vchunk; i += 32) {
          const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(r + i));  // 16 pairs
          const __m256i lo = _mm256_unpacklo_epi16(v, v), hi = _mm256_unpackhi_epi16(v, v);
          std::int32_t* dst = vw.a[q][k] + i / 2;
          _mm256_store_si256(reinterpret_cast<__m256i*>(dst), _mm256_permute2x128_si256(lo, hi, 0x20));
          _mm256_store_si256(reinterpret_cast<__m256i*>(dst + 8), _mm256_permute2x128_si256(lo, hi, 0x31));
        }
        vw.zs[q][k] = zs;
      });
}

// Channels [c, c + 32) (one block, in group k) over the rows of a chunk: acc[q][c ..] +=
// beta (sums) + the zero-point sums.
template <int Bits, int Q>
KVC_CODE_INLINE void value_block(const value_weights& vw, const std::uint8_t* at, std::size_t stride, int T, int c,
                                 int k, float* acc, std::size_t ds) noexcept {
  constexpr int run = Bits == 4 ? 8 : vchunk / 2;  // row pairs an int16 lane can add up
  if (T < 1) return;                               // so that the first pass below, which writes every sum, always runs
  const int pairs = (T + 1) / 2;
  alignas(32) std::int32_t sum[Q][32];
  for (int p0 = 0; p0 < pairs; p0 += run) {
    const int p1 = pairs - p0 < run ? pairs : p0 + run;
    __m256i lo[Q], hi[Q];
    KVC_CODE_UNROLL
    for (int q = 0; q < Q; ++q) lo[q] = hi[q] = _mm256_setzero_si256();
    const auto pair = [&](int tp, const std::uint8_t* r0, const std::uint8_t* r1) noexcept KVC_CODE_LAMBDA_INLINE {
      const __m256i x0 = block_bytes_of<Bits>(r0), x1 = block_bytes_of<Bits>(r1);
      // Channels 0-7 and 16-23 (lo), 8-15 and 24-31 (hi), each as (row t, row t + 1) bytes.
      const __m256i l = _mm256_unpacklo_epi8(x0, x1), h = _mm256_unpackhi_epi8(x0, x1);
      KVC_CODE_UNROLL
      for (int q = 0; q < Q; ++q) {
        const __m256i w = _mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float*>(vw.a[q][k] + tp)));
        lo[q] = _mm256_add_epi16(lo[q], _mm256_maddubs_epi16(l, w));
        hi[q] = _mm256_add_epi16(hi[q], _mm256_maddubs_epi16(h, w));
      }
      KVC_CODE_UNROLL
      for (int q = 0; q < Q; ++q) avx2i::in_reg(lo[q], hi[q]);  // as in avx2i::value_unit
    };
    avx2i::for_row_pairs(at, stride, T, p0, p1, pair);  // vw.a is 0 past T
    KVC_CODE_UNROLL
    for (int q = 0; q < Q; ++q) {
      const __m256i part[4] = {_mm256_cvtepi16_epi32(_mm256_castsi256_si128(lo[q])),
                               _mm256_cvtepi16_epi32(_mm256_castsi256_si128(hi[q])),
                               _mm256_cvtepi16_epi32(_mm256_extracti128_si256(lo[q], 1)),
                               _mm256_cvtepi16_epi32(_mm256_extracti128_si256(hi[q], 1))};
      for (int j = 0; j < 4; ++j) {
        __m256i* dst = reinterpret_cast<__m256i*>(sum[q] + 8 * j);
        _mm256_store_si256(dst, p0 == 0 ? part[j] : _mm256_add_epi32(_mm256_load_si256(dst), part[j]));
      }
    }
  }
  for (int q = 0; q < Q; ++q) {
    float* o = acc + q * ds + c;
    const __m256 beta = _mm256_set1_ps(vw.beta[q][k]), zs = _mm256_set1_ps(vw.zs[q][k]);
    for (int j = 0; j < 4; ++j) {
      const __m256 x = _mm256_fmadd_ps(
          _mm256_cvtepi32_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(sum[q] + 8 * j))), beta, zs);
      _mm256_storeu_ps(o + 8 * j, _mm256_add_ps(_mm256_loadu_ps(o + 8 * j), x));
    }
  }
}

template <int Bits, int Q>  // out of line as value_units
KVC_CODE_OUTLINE void value_blocks(const value_weights& vw, const std::uint8_t* rows, std::size_t stride, int T, int d,
                                   int group, float* acc) noexcept {
  const std::size_t ds = static_cast<std::size_t>(d);
  for (int b = 0; b < d / 32; ++b)
    value_block<Bits, Q>(vw, rows + static_cast<std::size_t>(b) * block_bytes<Bits>, stride, T, 32 * b, 32 * b / group,
                         acc, ds);
}

template <int Bits>
inline void accumulate_rows_b(const float* p, int nq, const std::uint8_t* rows, std::size_t stride, int n, int d,
                              int group, const float* scale, const float* zero, float* acc) noexcept {
  avx2i::value_chunks<value_weights>(p, nq, rows, stride, n, d, group, scale, zero, acc, value_factors_b,
                                     [](auto q, const value_weights& vw, const std::uint8_t* chunk, std::size_t st,
                                        int T, int dd, int g, float* aq) noexcept KVC_CODE_LAMBDA_INLINE {
                                       value_blocks<Bits, decltype(q)::value>(vw, chunk, st, T, dd, g, aq);
                                     });
}

}  // namespace avx2b
#endif  // KVC_CODE_KERNELS_AVX2

template <int WeightBits>
constexpr void check_weights() noexcept {
  static_assert(WeightBits == 16 || WeightBits == 8, "kvc: attention weights are rounded to 16 or 8 bits");
}

template <int Bits, bool Signed, int WeightBits = 16>
inline void dot_rows(const float* w, int nq, const std::uint8_t* rows, std::size_t stride, int n, int d,
                     float* out) noexcept {
  check_kind<Bits, Signed>();
  check_weights<WeightBits>();
  if (nq <= 0 || n <= 0) return;
#if KVC_CODE_KERNELS_AVX2
  if constexpr (!Signed && WeightBits == 8 && (Bits == 2 || Bits == 4)) {
    if (avx2b::supported<Bits>(d)) {
      avx2b::dot_rows_b<Bits>(w, nq, rows, stride, n, d, out);
      return;
    }
  }
  if constexpr (!Signed && Bits != 3) {
    if (avx2i::supported<Bits>(d)) {
      avx2i::dot_rows_int<Bits>(w, nq, rows, stride, n, d, out);
      return;
    }
  }
  avx2::dot_rows_simd<Bits, Signed>(w, nq, rows, stride, n, d, out);
#else
  dot_rows_portable<Bits, Signed>(w, nq, rows, stride, n, d, out);
#endif
}

template <int Bits, bool Signed, int WeightBits = 16>
inline void accumulate_rows(const float* p, int nq, const std::uint8_t* rows, std::size_t stride, int n, int d,
                            int group, const float* scale, const float* zero, float* acc) noexcept {
  check_kind<Bits, Signed>();
  check_weights<WeightBits>();
  if (nq <= 0 || n <= 0 || d <= 0) return;
#if KVC_CODE_KERNELS_AVX2
  if constexpr (!Signed && WeightBits == 8 && (Bits == 2 || Bits == 4)) {
    if (avx2b::supported<Bits>(d) && whole_block_groups(d, group)) {
      avx2b::accumulate_rows_b<Bits>(p, nq, rows, stride, n, d, group, scale, zero, acc);
      return;
    }
  }
  if constexpr (!Signed && Bits != 3) {
    if (avx2i::supported<Bits>(d) && whole_block_groups(d, group)) {
      avx2i::accumulate_rows_int<Bits>(p, nq, rows, stride, n, d, group, scale, zero, acc);
      return;
    }
  }
  // Every aligned run of eight channels must lie in one group.
  if (group % 8 == 0 || group >= d) {
    avx2::accumulate_rows_simd<Bits, Signed>(p, nq, rows, stride, n, d, group < d ? group : d, scale, zero, acc);
    return;
  }
#endif
  accumulate_rows_portable<Bits, Signed>(p, nq, rows, stride, n, d, group, scale, zero, acc);
}

}  // namespace code_kernel

// True where dot_code_rows<Bits> (group 0) or accumulate_code_rows<Bits> (group > 0) at
// head_dim d run the integer kernels, which round their float weights to 16 bits (see
// "Integer kernels" above): B = 2, 4, 8, d a multiple of 32 up to 256, value groups a
// multiple of 32 (or d or more), AVX2.
template <int Bits>
constexpr bool integer_code_kernels(int d, int group = 0) noexcept {
#if KVC_CODE_KERNELS_AVX2
  return code_kernel::avx2i::supported<Bits>(d) && code_kernel::whole_block_groups(d, group);
#else
  (void)d, (void)group;
  return false;
#endif
}

// True where dot_code_rows<Bits, 8> (group 0) or accumulate_code_rows<Bits, 8> (group > 0)
// at head_dim d run the byte kernels, which round their float weights to 8 bits (see "Byte
// kernels" above): B = 2, 4, d a multiple of 32 up to 256, value groups a multiple of 32 (or
// d or more), AVX2. Elsewhere WeightBits = 8 changes nothing: the 16-bit integer kernels or
// the float kernels run as for WeightBits = 16.
template <int Bits>
constexpr bool byte_code_kernels(int d, int group = 0) noexcept {
#if KVC_CODE_KERNELS_AVX2
  return code_kernel::avx2b::supported<Bits>(d) && code_kernel::whole_block_groups(d, group);
#else
  (void)d, (void)group;
  return false;
#endif
}

// out[g n_rows + t] = sum_c w[g d + c] code(t, c) for g < nq, t < n_rows: w are nq query
// rows of d channels with the per-channel key scale folded in, code(t, c) is code c of the
// packed row at rows + t row_stride (Bits in {2, 3, 4, 8}). WeightBits (16 or 8): the
// precision the integer kernels round w to (integer_code_kernels, byte_code_kernels).
template <int Bits, int WeightBits = 16>
inline void dot_code_rows(const float* w, int nq, const std::uint8_t* rows, std::size_t row_stride, int n_rows, int d,
                          float* out) noexcept {
  code_kernel::dot_rows<Bits, false, WeightBits>(w, nq, rows, row_stride, n_rows, d, out);
}

// acc[g d + c] += sum_t p[g n_rows + t] (scale[t ng + k] code(t, c) + zero[t ng + k]),
// k = c / group, ng = ceil(d / group), for g < nq, c < d: p are nq rows of attention
// weights, scale and zero each row's per-group dequantisation parameters (zero may be null:
// no zero points). group is a positive multiple of 8 (the last group may be partial); other
// sizes take the portable loop. WeightBits (16 or 8): the precision the integer kernels round
// p scale to (integer_code_kernels, byte_code_kernels).
template <int Bits, int WeightBits = 16>
inline void accumulate_code_rows(const float* p, int nq, const std::uint8_t* rows, std::size_t row_stride, int n_rows,
                                 int d, int group, const float* scale, const float* zero, float* acc) noexcept {
  code_kernel::accumulate_rows<Bits, false, WeightBits>(p, nq, rows, row_stride, n_rows, d, group, scale, zero, acc);
}

// int8 symmetric rows (row_stride in elements): out[g n_rows + t] = sum_c w[g d + c] rows[t row_stride + c].
inline void dot_int8_rows(const float* w, int nq, const std::int8_t* rows, std::size_t row_stride, int n_rows, int d,
                          float* out) noexcept {
  code_kernel::dot_rows<8, true>(w, nq, reinterpret_cast<const std::uint8_t*>(rows), row_stride, n_rows, d, out);
}

// acc[g d + c] += sum_t p[g n_rows + t] row_scale[t] rows[t row_stride + c].
inline void accumulate_int8_rows(const float* p, int nq, const std::int8_t* rows, std::size_t row_stride, int n_rows,
                                 int d, const float* row_scale, float* acc) noexcept {
  code_kernel::accumulate_rows<8, true>(p, nq, reinterpret_cast<const std::uint8_t*>(rows), row_stride, n_rows, d, d,
                                        row_scale, nullptr, acc);
}

// The portable loops, whatever the target: the same results up to the order of float sums.
template <int Bits>
inline void dot_code_rows_portable(const float* w, int nq, const std::uint8_t* rows, std::size_t row_stride, int n_rows,
                                   int d, float* out) noexcept {
  code_kernel::dot_rows_portable<Bits, false>(w, nq, rows, row_stride, n_rows, d, out);
}
template <int Bits>
inline void accumulate_code_rows_portable(const float* p, int nq, const std::uint8_t* rows, std::size_t row_stride,
                                          int n_rows, int d, int group, const float* scale, const float* zero,
                                          float* acc) noexcept {
  if (nq <= 0 || n_rows <= 0 || d <= 0) return;
  code_kernel::accumulate_rows_portable<Bits, false>(p, nq, rows, row_stride, n_rows, d, group, scale, zero, acc);
}
inline void dot_int8_rows_portable(const float* w, int nq, const std::int8_t* rows, std::size_t row_stride, int n_rows,
                                   int d, float* out) noexcept {
  code_kernel::dot_rows_portable<8, true>(w, nq, reinterpret_cast<const std::uint8_t*>(rows), row_stride, n_rows, d,
                                          out);
}
inline void accumulate_int8_rows_portable(const float* p, int nq, const std::int8_t* rows, std::size_t row_stride,
                                          int n_rows, int d, const float* row_scale, float* acc) noexcept {
  if (nq <= 0 || n_rows <= 0 || d <= 0) return;
  code_kernel::accumulate_rows_portable<8, true>(p, nq, reinterpret_cast<const std::uint8_t*>(rows), row_stride, n_rows,
                                                 d, d, row_scale, nullptr, acc);
}

}  // namespace detail
KVC_NAMESPACE_END

#undef KVC_CODE_UNROLL
#undef KVC_CODE_INLINE
#undef KVC_CODE_OUTLINE
#undef KVC_CODE_LAMBDA_INLINE
