// kvc/codecs/detail/quant.hpp: low-bit quantization primitives for KV-cache pages.
//
// Asymmetric min-max quantization (KIVI, Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric
// 2bit Quantization for KV Cache", Sec. 3). A group x_1..x_g becomes B-bit codes
//
//   Q(x) = clamp(round((x - z) / s), 0, 2^B - 1),   x~ = z + s * Q(x),
//   z = min x,   s = (max x - min x) / (2^B - 1),
//
// with z and s stored as IEEE binary16 and the codes computed against the stored values,
// so z + s * code is exactly what a reader computes. s is rounded up to the next binary16
// when the stored z + (2^B - 1) s would fall below max x, so the largest value stays
// representable; a constant group has s = 0 and all codes 0. KIVI quantizes keys per
// channel (the group runs along the tokens of a block) and values per token (the group
// runs along consecutive channels); both are here.
//
// Also: symmetric int8 per row (s = max|x| / 127, x~ = s * round(x / s)) and the
// Walsh-Hadamard rotation H_d / sqrt(d) along head_dim, which spreads outlier channels
// over all channels before per-token quantization (incoherence processing, as in QuaRot,
// Ashkboos et al. 2024).
//
// Packed layout of a row of `count` B-bit codes (B in {2, 3, 4, 8}), packed_bytes(count, B)
// = ceil(count * B / 8) bytes: full blocks of 32 codes, then a tail of count % 32 codes.
// Full block k takes 4 * B bytes from byte 4 * B * k:
//   B = 8: byte j = code j
//   B = 4: byte j (0..15) = code j | code (j + 16) << 4
//   B = 2: byte j (0..7)  = code j | code (j + 8) << 2 | code (j + 16) << 4 | code (j + 24) << 6
//   B = 3: bytes 0..7 hold the low 2 bits of the codes as B = 2; bytes 8..11 are a
//          little-endian 32-bit word whose bit j is bit 2 of code j
// The tail is packed sequentially: tail code i at bit offset i * B of its ceil(m * B / 8)
// bytes (bit 0 = least significant bit of the first byte), unused high bits 0.
//
// Preconditions (checked by callers): bits in {2, 3, 4, 8}; inputs finite with |x| <= 65504.
// Functions called with other bit widths do nothing. Nothing here allocates.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kvc/detail/half.hpp"
#include "kvc/version.hpp"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KVC_QUANT_AVX2 1
#else
#define KVC_QUANT_AVX2 0
#endif

KVC_NAMESPACE_BEGIN
namespace detail {

constexpr bool quant_bits_supported(int bits) noexcept { return bits == 2 || bits == 3 || bits == 4 || bits == 8; }

// Bytes of a packed row of `count` codes of `bits` bits: ceil(count * bits / 8).
constexpr std::size_t packed_bytes(int count, int bits) noexcept {
  return (static_cast<std::size_t>(count) * static_cast<std::size_t>(bits) + 7u) / 8u;
}

namespace quant_impl {

// Eight bytes as a little-endian word and back (a single load / store on little-endian
// targets). Word-wise code below works on eight codes per operation: shifts by less than 8
// followed by a per-byte mask never mix bits of different bytes.
inline std::uint64_t load64_le(const std::uint8_t* p) noexcept {
  return static_cast<std::uint64_t>(p[0]) | static_cast<std::uint64_t>(p[1]) << 8 |
         static_cast<std::uint64_t>(p[2]) << 16 | static_cast<std::uint64_t>(p[3]) << 24 |
         static_cast<std::uint64_t>(p[4]) << 32 | static_cast<std::uint64_t>(p[5]) << 40 |
         static_cast<std::uint64_t>(p[6]) << 48 | static_cast<std::uint64_t>(p[7]) << 56;
}
inline void store64_le(std::uint8_t* p, std::uint64_t v) noexcept {
  p[0] = static_cast<std::uint8_t>(v);
  p[1] = static_cast<std::uint8_t>(v >> 8);
  p[2] = static_cast<std::uint8_t>(v >> 16);
  p[3] = static_cast<std::uint8_t>(v >> 24);
  p[4] = static_cast<std::uint8_t>(v >> 32);
  p[5] = static_cast<std::uint8_t>(v >> 40);
  p[6] = static_cast<std::uint8_t>(v >> 48);
  p[7] = static_cast<std::uint8_t>(v >> 56);
}

constexpr std::uint64_t kBytes01 = 0x0101010101010101ull;
constexpr std::uint64_t kBytes03 = 0x0303030303030303ull;
constexpr std::uint64_t kBytes0F = 0x0F0F0F0F0F0F0F0Full;

// Bit 0 of each byte of t (the rest 0) gathered into one byte, byte j's bit to bit j:
// the product places byte j's bit at bit 56 + j, every other partial product at a distinct
// position outside bits 56..63, so no carries reach them.
inline std::uint8_t gather_bits(std::uint64_t t) noexcept {
  return static_cast<std::uint8_t>((t * 0x0102040810204080ull) >> 56);
}

// Inverse of gather_bits: bit j of m to bit 0 of byte j. Replicate m to every byte, keep
// bit j in byte j, then turn each nonzero byte into 1 (adding 0x7F sets bit 7 without a carry).
inline std::uint64_t spread_bits(std::uint8_t m) noexcept {
  const std::uint64_t x = (m * kBytes01) & 0x8040201008040201ull;
  return ((x + 0x7F7F7F7F7F7F7F7Full) >> 7) & kBytes01;
}

// One full block of 32 codes into 4 * B bytes. Bits of a code above B are ignored.
template <int B>
inline void pack_block(const std::uint8_t* c, std::uint8_t* out) noexcept {
  if constexpr (B == 8) {
    std::memcpy(out, c, 32);
  } else if constexpr (B == 4) {
    for (int j = 0; j < 16; j += 8)
      store64_le(out + j, (load64_le(c + j) & kBytes0F) | (load64_le(c + j + 16) & kBytes0F) << 4);
  } else if constexpr (B == 2) {
    store64_le(out, (load64_le(c) & kBytes03) | (load64_le(c + 8) & kBytes03) << 2 |
                        (load64_le(c + 16) & kBytes03) << 4 | (load64_le(c + 24) & kBytes03) << 6);
  } else {
    static_assert(B == 3, "bits must be 2, 3, 4 or 8");
    pack_block<2>(c, out);
    for (int q = 0; q < 4; ++q) out[8 + q] = gather_bits((load64_le(c + 8 * q) >> 2) & kBytes01);
  }
}

template <int B>
inline void unpack_block(const std::uint8_t* p, std::uint8_t* c) noexcept {
  if constexpr (B == 8) {
    std::memcpy(c, p, 32);
  } else if constexpr (B == 4) {
    for (int j = 0; j < 16; j += 8) {
      const std::uint64_t w = load64_le(p + j);
      store64_le(c + j, w & kBytes0F);
      store64_le(c + j + 16, (w >> 4) & kBytes0F);
    }
  } else if constexpr (B == 2) {
    const std::uint64_t w = load64_le(p);
    for (int k = 0; k < 4; ++k) store64_le(c + 8 * k, (w >> (2 * k)) & kBytes03);
  } else {
    static_assert(B == 3, "bits must be 2, 3, 4 or 8");
    const std::uint64_t w = load64_le(p);
    for (int q = 0; q < 4; ++q) store64_le(c + 8 * q, ((w >> (2 * q)) & kBytes03) | spread_bits(p[8 + q]) << 2);
  }
}

// m < 32 codes packed sequentially into packed_bytes(m, bits) bytes.
inline void pack_tail(const std::uint8_t* c, int m, int bits, std::uint8_t* out) noexcept {
  std::memset(out, 0, packed_bytes(m, bits));
  const unsigned mask = (1u << bits) - 1u;
  for (int i = 0; i < m; ++i) {
    const unsigned v = c[i] & mask;
    const int bit = i * bits;
    const int sh = bit & 7;
    out[bit >> 3] = static_cast<std::uint8_t>(out[bit >> 3] | (v << sh));
    if (sh + bits > 8) out[(bit >> 3) + 1] = static_cast<std::uint8_t>(out[(bit >> 3) + 1] | (v >> (8 - sh)));
  }
}

inline void unpack_tail(const std::uint8_t* p, int m, int bits, std::uint8_t* c) noexcept {
  const unsigned mask = (1u << bits) - 1u;
  for (int i = 0; i < m; ++i) {
    const int bit = i * bits;
    const int sh = bit & 7;
    unsigned v = static_cast<unsigned>(p[bit >> 3]) >> sh;
    if (sh + bits > 8) v |= static_cast<unsigned>(p[(bit >> 3) + 1]) << (8 - sh);
    c[i] = static_cast<std::uint8_t>(v & mask);
  }
}

template <int B>
inline void pack_row(const std::uint8_t* codes, int count, std::uint8_t* out) noexcept {
  const int full = count / 32;
  for (int k = 0; k < full; ++k) pack_block<B>(codes + 32 * k, out + 4 * B * k);
  if (count % 32 != 0) pack_tail(codes + 32 * full, count % 32, B, out + 4 * B * full);
}

template <int B>
inline void unpack_row(const std::uint8_t* packed, int count, std::uint8_t* codes) noexcept {
  const int full = count / 32;
  for (int k = 0; k < full; ++k) unpack_block<B>(packed + 4 * B * k, codes + 32 * k);
  if (count % 32 != 0) unpack_tail(packed + 4 * B * full, count % 32, B, codes + 32 * full);
}

// Calls f with a tag whose ::value is the bit width, a compile-time constant.
template <int B>
struct bits_tag {
  static constexpr int value = B;
};

template <class F>
inline void with_bits(int bits, F&& f) noexcept {
  switch (bits) {
    case 2:
      f(bits_tag<2>{});
      break;
    case 3:
      f(bits_tag<3>{});
      break;
    case 4:
      f(bits_tag<4>{});
      break;
    case 8:
      f(bits_tag<8>{});
      break;
    default:
      break;
  }
}

}  // namespace quant_impl

// Packs `count` codes (each < 2^bits; higher bits are ignored) into packed_bytes(count, bits)
// bytes at `out` in the layout above. Writes no byte past packed_bytes(count, bits).
inline void pack_codes(const std::uint8_t* codes, int count, int bits, std::uint8_t* out) noexcept {
  quant_impl::with_bits(bits, [&](auto tag) { quant_impl::pack_row<decltype(tag)::value>(codes, count, out); });
}

// Inverse of pack_codes: `count` codes, each < 2^bits.
inline void unpack_codes(const std::uint8_t* packed, int count, int bits, std::uint8_t* codes) noexcept {
  quant_impl::with_bits(bits, [&](auto tag) { quant_impl::unpack_row<decltype(tag)::value>(packed, count, codes); });
}

// Quantization parameters of one group, binary16 bit patterns: x~ = zero + scale * code.
struct minmax {
  std::uint16_t scale;
  std::uint16_t zero;
};

// Parameters of a group whose smallest value is lo and largest hi (lo <= hi, both finite,
// |.| <= 65504). z = f16(lo), s = f16((hi - lo) / (2^B - 1)); s is then raised to the next
// binary16 while z + (2^B - 1) s < hi. That test is exact (double holds every such sum of
// binary16 values), so a reader's float z + s * (2^B - 1), fused or not, is >= hi: rounding
// is monotone and hi is a float. With lo == hi, s = 0.
inline minmax minmax_from_range(float lo, float hi, int bits) noexcept {
  const std::uint16_t z = float_to_half_scalar(lo);
  if (!(hi > lo)) return {0, z};
  const double qmax = static_cast<double>((1 << bits) - 1);
  const double zf = static_cast<double>(half_to_float_scalar(z));
  const double top = static_cast<double>(hi);
  auto covers = [&](std::uint16_t s) { return zf + qmax * static_cast<double>(half_to_float_scalar(s)) >= top; };
  std::uint16_t s = float_to_half_scalar((hi - lo) / static_cast<float>(qmax));
  if (covers(s)) return {s, z};
  ++s;  // s >= 0: the next binary16 up is the next bit pattern
  if (covers(s)) return {s, z};
  // f16(lo) fell below lo by more than one step of s makes up: start from the range above z.
  s = float_to_half_scalar(static_cast<float>((top - zf) / qmax));
  while (!covers(s)) ++s;  // at most a couple of steps: f16 round to nearest is within half an ulp
  return {s, z};
}

// Parameters of the n >= 1 values x[0..n).
inline minmax minmax_params(const float* x, int n, int bits) noexcept {
  float lo = x[0], hi = x[0];
  for (int i = 1; i < n; ++i) {
    lo = x[i] < lo ? x[i] : lo;
    hi = x[i] > hi ? x[i] : hi;
  }
  return minmax_from_range(lo, hi, bits);
}

// round(v) to nearest, ties to even, for 0 <= v < 2^23: truncation, then the exact
// fraction decides. No library call, no dependence on the rounding mode or on -ffast-math.
inline int round_nonneg(float v) noexcept {
  const int t = static_cast<int>(v);
  const float f = v - static_cast<float>(t);  // exact
  return t + static_cast<int>((f > 0.5f) | ((f == 0.5f) & ((t & 1) != 0)));
}

// clamp(round((x - zero) / scale), 0, 2^bits - 1), round to nearest even; 0 when scale == 0.
inline std::uint8_t quantize_code(float x, float scale, float zero, int bits) noexcept {
  const float qmax = static_cast<float>((1 << bits) - 1);
  const bool live = scale > 0.0f;
  float v = (x - zero) / (live ? scale : 1.0f);
  v = live && v > 0.0f ? v : 0.0f;
  v = v < qmax ? v : qmax;
  return static_cast<std::uint8_t>(round_nonneg(v));
}

#if KVC_QUANT_AVX2
// quantize_code of eight values at once, as floats: the same division and rounding (to
// nearest, ties to even), so the same codes.
inline __m256 quantize_code8(__m256 x, __m256 s, __m256 z, __m256 qmax) noexcept {
  const __m256 zero = _mm256_setzero_ps();
  const __m256 live = _mm256_cmp_ps(s, zero, _CMP_GT_OQ);
  __m256 v = _mm256_div_ps(_mm256_sub_ps(x, z), _mm256_blendv_ps(_mm256_set1_ps(1.0f), s, live));
  v = _mm256_and_ps(_mm256_max_ps(v, zero), live);
  return _mm256_round_ps(_mm256_min_ps(v, qmax), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
#endif

// out[i] = quantize_code(x[i], s[i], z[i], bits) for i < m; with AVX2 eight at a time.
inline void quantize_codes(const float* x, int m, const float* s, const float* z, int bits,
                           std::uint8_t* out) noexcept {
  int i = 0;
#if KVC_QUANT_AVX2
  const __m256 qmax = _mm256_set1_ps(static_cast<float>((1 << bits) - 1));
  for (; i + 8 <= m; i += 8) {
    const __m256i q = _mm256_cvtps_epi32(
        quantize_code8(_mm256_loadu_ps(x + i), _mm256_loadu_ps(s + i), _mm256_loadu_ps(z + i), qmax));
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), _mm_packus_epi16(w, w));
  }
#endif
  for (; i < m; ++i) out[i] = quantize_code(x[i], s[i], z[i], bits);
}

// cost[i] += w[i] e_i^2 for i < m, e_i = z[i] + s[i] q_i - x[i] the error of x[i] on the grid
// (s[i], z[i]), q_i = quantize_code(x[i], s[i], z[i], bits): one row's squared error per
// channel, weighted (w 0 or 1), summed in double. With AVX2 eight channels at a time: the
// same codes (quantize_code8).
inline void add_grid_errors(const float* x, int m, const float* s, const float* z, const float* w, int bits,
                            double* cost) noexcept {
  int i = 0;
#if KVC_QUANT_AVX2
  const __m256 qmax = _mm256_set1_ps(static_cast<float>((1 << bits) - 1));
  for (; i + 8 <= m; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i), sv = _mm256_loadu_ps(s + i), zv = _mm256_loadu_ps(z + i);
    const __m256 e = _mm256_sub_ps(_mm256_fmadd_ps(sv, quantize_code8(xv, sv, zv, qmax), zv), xv);
    const __m256 p = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(w + i), e), e);
    _mm256_storeu_pd(cost + i, _mm256_add_pd(_mm256_loadu_pd(cost + i), _mm256_cvtps_pd(_mm256_castps256_ps128(p))));
    _mm256_storeu_pd(cost + i + 4,
                     _mm256_add_pd(_mm256_loadu_pd(cost + i + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(p, 1))));
  }
#endif
  for (; i < m; ++i) {
    const float q = static_cast<float>(quantize_code(x[i], s[i], z[i], bits));
    const float e = z[i] + s[i] * q - x[i];
    cost[i] += static_cast<double>(w[i] * e * e);
  }
}

namespace quant_impl {

// Float parameters of the n <= 32 channels [c0, c0 + n) when channel c uses
// scale[c / group], zero[c / group].
inline void chunk_params(const std::uint16_t* scale, const std::uint16_t* zero, int group, int c0, int n, float* s,
                         float* z) noexcept {
  if (group == 1) {
    half_to_float(scale + c0, s, static_cast<std::size_t>(n));
    half_to_float(zero + c0, z, static_cast<std::size_t>(n));
    return;
  }
  for (int i = 0; i < n;) {
    const int g = (c0 + i) / group;
    const int end = (g + 1) * group - c0 < n ? (g + 1) * group - c0 : n;
    const float sg = half_to_float_scalar(scale[g]), zg = half_to_float_scalar(zero[g]);
    for (; i < end; ++i) {
      s[i] = sg;
      z[i] = zg;
    }
  }
}

// n <= 32 codes of x against s[i], z[i] into a full block (n == 32) or the tail at out.
template <int B>
inline void encode_chunk(const float* x, int n, const float* s, const float* z, std::uint8_t* out) noexcept {
  std::uint8_t buf[32];
  quantize_codes(x, n, s, z, B, buf);
  if (n == 32)
    pack_block<B>(buf, out);
  else
    pack_tail(buf, n, B, out);
}

// x~ = z + s * code for the n <= 32 codes of a block or tail.
template <int B>
inline void decode_chunk(const std::uint8_t* p, int n, const float* s, const float* z, float* out) noexcept {
  std::uint8_t buf[32];
  if (n == 32)
    unpack_block<B>(p, buf);
  else
    unpack_tail(p, n, B, buf);
  for (int i = 0; i < n; ++i) out[i] = z[i] + s[i] * static_cast<float>(buf[i]);
}

// Rows [0, n) of x [n][d] into packed rows `packed + r * packed_bytes(d, B)` against fixed
// per-channel parameters; channels outer, so each chunk's parameters convert once.
template <int B>
inline void encode_rows_per_channel(const float* x, int n, int d, const std::uint16_t* scale, const std::uint16_t* zero,
                                    std::uint8_t* packed) noexcept {
  const std::size_t row_bytes = packed_bytes(d, B);
  float s[32], z[32];
  for (int c0 = 0; c0 < d; c0 += 32) {
    const int m = d - c0 < 32 ? d - c0 : 32;
    chunk_params(scale, zero, 1, c0, m, s, z);
    for (int r = 0; r < n; ++r)
      encode_chunk<B>(x + static_cast<std::size_t>(r) * d + c0, m, s, z, packed + r * row_bytes + 4 * B * (c0 / 32));
  }
}

}  // namespace quant_impl

// Groups per row for per-token grouped quantization: ceil(d / group).
constexpr int group_count(int d, int group) noexcept { return (d + group - 1) / group; }

// Per-token grouped quantization (KIVI values): row r, group g covers channels
// [g * group, min(d, (g + 1) * group)) (the last group may be partial) and gets
// scale[r * G + g], zero[r * G + g], G = group_count(d, group). Row r's codes go to
// packed + r * packed_bytes(d, bits).
inline void quantize_rows_grouped(const float* x, int rows, int d, int group, int bits, std::uint8_t* packed,
                                  std::uint16_t* scale, std::uint16_t* zero) noexcept {
  if (!quant_bits_supported(bits) || group < 1) return;
  const int groups = group_count(d, group);
  const std::size_t row_bytes = packed_bytes(d, bits);
  quant_impl::with_bits(bits, [&](auto tag) {
    constexpr int B = decltype(tag)::value;
    float s[32], z[32];
    for (int r = 0; r < rows; ++r) {
      const float* xr = x + static_cast<std::size_t>(r) * d;
      std::uint16_t* sr = scale + static_cast<std::size_t>(r) * groups;
      std::uint16_t* zr = zero + static_cast<std::size_t>(r) * groups;
      for (int g = 0; g < groups; ++g) {
        const int c0 = g * group;
        const minmax p = minmax_params(xr + c0, d - c0 < group ? d - c0 : group, B);
        sr[g] = p.scale;
        zr[g] = p.zero;
      }
      for (int c0 = 0; c0 < d; c0 += 32) {
        const int m = d - c0 < 32 ? d - c0 : 32;
        quant_impl::chunk_params(sr, zr, group, c0, m, s, z);
        quant_impl::encode_chunk<B>(xr + c0, m, s, z, packed + r * row_bytes + 4 * B * (c0 / 32));
      }
    }
  });
}

// Inverse of quantize_rows_grouped into float [rows][d]. A range of rows [first, first + n)
// decodes with packed, scale and zero advanced by first rows.
inline void dequantize_rows_grouped(const std::uint8_t* packed, int rows, int d, int group, int bits,
                                    const std::uint16_t* scale, const std::uint16_t* zero, float* out) noexcept {
  if (!quant_bits_supported(bits) || group < 1) return;
  const int groups = group_count(d, group);
  const std::size_t row_bytes = packed_bytes(d, bits);
  quant_impl::with_bits(bits, [&](auto tag) {
    constexpr int B = decltype(tag)::value;
    float s[32], z[32];
    for (int r = 0; r < rows; ++r) {
      const std::uint16_t* sr = scale + static_cast<std::size_t>(r) * groups;
      const std::uint16_t* zr = zero + static_cast<std::size_t>(r) * groups;
      for (int c0 = 0; c0 < d; c0 += 32) {
        const int m = d - c0 < 32 ? d - c0 : 32;
        quant_impl::chunk_params(sr, zr, group, c0, m, s, z);
        quant_impl::decode_chunk<B>(packed + r * row_bytes + 4 * B * (c0 / 32), m, s, z,
                                    out + static_cast<std::size_t>(r) * d + c0);
      }
    }
  });
}

// The min-max grid (minmax_from_range) of channels [c0, c0 + m), m <= 32, over the rows
// x [rows][d], rows >= 1: scale[i], zero[i] for i < m. A running min / max of the m channels,
// rows read contiguously.
inline void channel_minmax(const float* x, int rows, int d, int c0, int m, int bits, std::uint16_t* scale,
                           std::uint16_t* zero) noexcept {
  float lo[32], hi[32];
  for (int i = 0; i < m; ++i) lo[i] = hi[i] = x[c0 + i];
  for (int r = 1; r < rows; ++r) {
    const float* xr = x + static_cast<std::size_t>(r) * d + c0;
    for (int i = 0; i < m; ++i) {
      lo[i] = xr[i] < lo[i] ? xr[i] : lo[i];
      hi[i] = xr[i] > hi[i] ? xr[i] : hi[i];
    }
  }
  for (int i = 0; i < m; ++i) {
    const minmax p = minmax_from_range(lo[i], hi[i], bits);
    scale[i] = p.scale;
    zero[i] = p.zero;
  }
}

// Per-channel quantization over a block of tokens (KIVI keys): channel c's group is
// x[0..rows)[c], with parameters scale[c], zero[c]. Row r's codes go to
// packed + r * packed_bytes(d, bits). rows == 0 writes zero parameters.
inline void quantize_rows_per_channel(const float* x, int rows, int d, int bits, std::uint8_t* packed,
                                      std::uint16_t* scale, std::uint16_t* zero) noexcept {
  if (!quant_bits_supported(bits)) return;
  if (rows < 1) {
    for (int c = 0; c < d; ++c) scale[c] = zero[c] = 0;
    return;
  }
  for (int c0 = 0; c0 < d; c0 += 32)
    channel_minmax(x, rows, d, c0, d - c0 < 32 ? d - c0 : 32, bits, scale + c0, zero + c0);
  quant_impl::with_bits(bits, [&](auto tag) {
    quant_impl::encode_rows_per_channel<decltype(tag)::value>(x, rows, d, scale, zero, packed);
  });
}

// Quantizes the n rows x [n][d] into rows [first, first + n) of a per-channel block at
// `packed` (row stride packed_bytes(d, bits)) against its fixed scale[d], zero[d]; values
// outside a channel's range clamp to codes 0 and 2^bits - 1. Rows encoded by
// quantize_rows_per_channel re-encode to the same bytes, and so do their dequantized values.
inline void quantize_rows_per_channel_fixed(const float* x, int first, int n, int d, int bits,
                                            const std::uint16_t* scale, const std::uint16_t* zero,
                                            std::uint8_t* packed) noexcept {
  if (!quant_bits_supported(bits)) return;
  std::uint8_t* base = packed + static_cast<std::size_t>(first) * packed_bytes(d, bits);
  quant_impl::with_bits(
      bits, [&](auto tag) { quant_impl::encode_rows_per_channel<decltype(tag)::value>(x, n, d, scale, zero, base); });
}

// Inverse of quantize_rows_per_channel into float [rows][d]. A range of rows
// [first, first + n) decodes with packed advanced by first rows (scale and zero unchanged).
inline void dequantize_rows_per_channel(const std::uint8_t* packed, int rows, int d, int bits,
                                        const std::uint16_t* scale, const std::uint16_t* zero, float* out) noexcept {
  if (!quant_bits_supported(bits)) return;
  const std::size_t row_bytes = packed_bytes(d, bits);
  quant_impl::with_bits(bits, [&](auto tag) {
    constexpr int B = decltype(tag)::value;
    float s[32], z[32];
    for (int c0 = 0; c0 < d; c0 += 32) {
      const int m = d - c0 < 32 ? d - c0 : 32;
      quant_impl::chunk_params(scale, zero, 1, c0, m, s, z);
      for (int r = 0; r < rows; ++r)
        quant_impl::decode_chunk<B>(packed + r * row_bytes + 4 * B * (c0 / 32), m, s, z,
                                    out + static_cast<std::size_t>(r) * d + c0);
    }
  });
}

// Symmetric int8 per row: scales[r] = max_c |x[r][c]| / 127 (float), codes[r][c] =
// clamp(round(x / scale), -127, 127), round to nearest even; x~ = scale * code, so
// |x~ - x| <= scale / 2 up to float rounding. An all-zero row has scale 0 and codes 0.
inline void quantize_rows_int8(const float* x, int rows, int d, std::int8_t* codes, float* scales) noexcept {
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + static_cast<std::size_t>(r) * d;
    std::int8_t* cr = codes + static_cast<std::size_t>(r) * d;
    float m = 0.0f;
    for (int c = 0; c < d; ++c) {
      const float a = std::fabs(xr[c]);
      m = a > m ? a : m;
    }
    const float s = m / 127.0f;
    scales[r] = s;
    if (!(s > 0.0f)) {
      std::memset(cr, 0, static_cast<std::size_t>(d));
      continue;
    }
    for (int c = 0; c < d; ++c) {
      const float v = xr[c] / s;
      float a = std::fabs(v);
      a = a < 127.0f ? a : 127.0f;
      const int q = round_nonneg(a);
      cr[c] = static_cast<std::int8_t>(v < 0.0f ? -q : q);
    }
  }
}

inline void dequantize_rows_int8(const std::int8_t* codes, const float* scales, int rows, int d, float* out) noexcept {
  for (int r = 0; r < rows; ++r) {
    const std::int8_t* cr = codes + static_cast<std::size_t>(r) * d;
    float* o = out + static_cast<std::size_t>(r) * d;
    const float s = scales[r];
    for (int c = 0; c < d; ++c) o[c] = s * static_cast<float>(cr[c]);
  }
}

// The fast Walsh-Hadamard transform needs d a power of two (1, 2, 4, ..., 128, ...).
constexpr bool hadamard_supported(int d) noexcept { return d > 0 && (d & (d - 1)) == 0; }

// x <- H_d x / sqrt(d) in place, H_d the Sylvester Hadamard matrix (H_1 = [1],
// H_2n = [[H_n, H_n], [H_n, -H_n]]), by the O(d log d) butterfly. H_d / sqrt(d) is
// symmetric and orthonormal, so it is its own inverse and preserves norms and dot
// products. d must satisfy hadamard_supported(d); otherwise x is left unchanged.
inline void hadamard_rotate(float* x, int d) noexcept {
  if (!hadamard_supported(d)) return;
  for (int h = 1; h < d; h *= 2)
    for (int i = 0; i < d; i += 2 * h)
      for (int j = i; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
  const float norm = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  for (int j = 0; j < d; ++j) x[j] *= norm;
}

// hadamard_rotate on each row of x [rows][d].
inline void hadamard_rotate_rows(float* x, int rows, int d) noexcept {
  for (int r = 0; r < rows; ++r) hadamard_rotate(x + static_cast<std::size_t>(r) * d, d);
}

}  // namespace detail
KVC_NAMESPACE_END

#undef KVC_QUANT_AVX2
