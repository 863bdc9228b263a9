// kvc/detail/half.hpp: IEEE binary16 and bfloat16 conversion, scalar and bulk.
//
// Bulk conversion uses F16C or AVX-512 instructions when the compiler targets them
// (-mf16c, -mavx512f, -march=native) and a portable bit-exact fallback otherwise.
// All paths round to nearest, ties to even, and agree bit for bit.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "kvc/version.hpp"

KVC_NAMESPACE_BEGIN
namespace detail {

inline std::uint32_t float_bits(float f) noexcept {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float bits_float(std::uint32_t u) noexcept {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// binary16 -> binary32, exact.
inline float half_to_float_scalar(std::uint16_t h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1Fu;
  std::uint32_t mant = h & 0x3FFu;
  if (exp == 0x1F)  // inf, or nan made quiet as F16C does
    return bits_float(sign | 0x7F800000u | (mant << 13) | (mant != 0 ? 0x400000u : 0u));
  if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return bits_float(sign);
  // Subnormal: value = mant * 2^-24, exact in float.
  const float v = static_cast<float>(mant) * 5.9604644775390625e-08f;
  return sign ? -v : v;
}

// binary32 -> binary16, round to nearest even; overflow gives infinity.
inline std::uint16_t float_to_half_scalar(float f) noexcept {
  const std::uint32_t x = float_bits(f);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t absx = x & 0x7FFFFFFFu;
  if (absx >= 0x7F800000u)  // inf or nan (keep nan quiet)
    return static_cast<std::uint16_t>(sign | 0x7C00u | (absx > 0x7F800000u ? 0x200u | ((absx >> 13) & 0x3FFu) : 0u));
  if (absx >= 0x477FF000u) return static_cast<std::uint16_t>(sign | 0x7C00u);  // rounds to >= 65520
  if (absx < 0x38800000u) {
    // Result is subnormal or zero: value / 2^-24 rounded to nearest even integer.
    if (absx < 0x33000000u) return static_cast<std::uint16_t>(sign);  // < 2^-25 rounds to 0
    const std::uint32_t e = absx >> 23;
    const std::uint32_t m = (absx & 0x7FFFFFu) | 0x800000u;
    const std::uint32_t shift = 126u - e;  // 14..24 for e in [102, 112]
    std::uint32_t q = m >> shift;
    const std::uint32_t rem = m & ((1u << shift) - 1u);
    const std::uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return static_cast<std::uint16_t>(sign | q);
  }
  // Normal: rebias exponent, round mantissa from 23 to 10 bits.
  std::uint32_t h = ((absx >> 13) - (112u << 10));
  const std::uint32_t rem = absx & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // may carry into exponent: correct
  return static_cast<std::uint16_t>(sign | h);
}

// bfloat16 is the top half of a binary32.
inline float bf16_to_float_scalar(std::uint16_t b) noexcept { return bits_float(static_cast<std::uint32_t>(b) << 16); }

inline std::uint16_t float_to_bf16_scalar(float f) noexcept {
  const std::uint32_t x = float_bits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<std::uint16_t>((x >> 16) | 0x40u);  // quiet nan
  const std::uint32_t lsb = (x >> 16) & 1u;
  return static_cast<std::uint16_t>((x + 0x7FFFu + lsb) >> 16);
}

// binary16 -> binary32 without branches, bit for bit half_to_float_scalar: loops over it
// vectorise, so bulk conversion stays fast where F16C is not targeted.
inline float half_to_float_branchless(std::uint16_t h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t em = h & 0x7FFFu;                    // exponent and mantissa
  const std::uint32_t normal = (em << 13) + (112u << 23);  // rebiased exponent
  // inf and nan; a nan gets the quiet bit (mantissa != 0 sets bit 10 of mant + 0x3FF).
  const std::uint32_t special = (em << 13) | 0x7F800000u | ((((em & 0x3FFu) + 0x3FFu) & 0x400u) << 12);
  // Zero and subnormals: mant * 2^-24, exact in float.
  const std::uint32_t small = float_bits(static_cast<float>(static_cast<std::int32_t>(em)) * 5.9604644775390625e-08f);
  const std::uint32_t is_small = 0u - static_cast<std::uint32_t>(em < 0x400u);
  const std::uint32_t is_special = 0u - static_cast<std::uint32_t>(em >= 0x7C00u);
  return bits_float(sign | (small & is_small) | (special & is_special) | (normal & ~(is_small | is_special)));
}

inline void half_to_float(const std::uint16_t* src, float* dst, std::size_t n) noexcept {
  std::size_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
#endif
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  // The tail as a count from i: GCC warns spuriously about `i < n` after the loops above.
  const std::size_t rest = n - i;
  for (std::size_t j = 0; j < rest; ++j) dst[i + j] = half_to_float_branchless(src[i + j]);
}

inline void float_to_half(const float* src, std::uint16_t* dst, std::size_t n) noexcept {
  std::size_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  const std::size_t rest = n - i;  // see half_to_float
  for (std::size_t j = 0; j < rest; ++j) dst[i + j] = float_to_half_scalar(src[i + j]);
}

// Plain loops: shifts and adds that compilers vectorize at -O2 and above.
inline void bf16_to_float(const std::uint16_t* src, float* dst, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint32_t u = static_cast<std::uint32_t>(src[i]) << 16;
    std::memcpy(dst + i, &u, sizeof u);
  }
}

inline void float_to_bf16(const float* src, std::uint16_t* dst, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) dst[i] = float_to_bf16_scalar(src[i]);
}

}  // namespace detail
KVC_NAMESPACE_END
