// tests/reference/rounding.hpp: IEEE binary16 and bfloat16 encoding and decoding from
// their definitions, in double arithmetic (frexp, ldexp, nearbyint). Shares no code with
// the library.
//
// A 16-bit format with `mant` stored mantissa bits, exponent bias `bias` and normal
// exponents [1 - bias, bias]: a finite x is rounded to the nearest multiple of
// 2^(max(floor(log2|x|), 1 - bias) - mant), ties to even; a result of 2^(bias + 1) or
// more is infinity.
#pragma once

#include <cfenv>
#include <cmath>
#include <cstdint>
#include <limits>

namespace kvc_ref {

struct format16 {
  int mant;  // stored mantissa bits
  int bias;  // exponent bias; the largest normal exponent equals the bias
};

inline constexpr format16 binary16{10, 15};
inline constexpr format16 bfloat16{7, 127};

// The value of a 16-bit pattern: NaN patterns give a quiet NaN.
inline double decode16(std::uint16_t bits, format16 f) {
  const bool neg = (bits & 0x8000u) != 0;
  const int exp_field = (bits & 0x7FFF) >> f.mant;
  const int mant_field = bits & ((1 << f.mant) - 1);
  const int exp_max = (1 << (15 - f.mant)) - 1;
  double v;
  if (exp_field == exp_max)
    v = mant_field == 0 ? std::numeric_limits<double>::infinity() : std::numeric_limits<double>::quiet_NaN();
  else if (exp_field == 0)
    v = std::ldexp(static_cast<double>(mant_field), 1 - f.bias - f.mant);
  else
    v = std::ldexp(static_cast<double>((1 << f.mant) + mant_field), exp_field - f.bias - f.mant);
  return neg ? -v : v;
}

// Round to nearest, ties to even, of a non-NaN x.
inline std::uint16_t encode16(double x, format16 f) {
  const std::uint16_t sign = std::signbit(x) ? 0x8000u : 0u;
  const std::uint16_t inf = static_cast<std::uint16_t>(sign | (((1 << (15 - f.mant)) - 1) << f.mant));
  const double a = std::fabs(x);
  if (std::isinf(a)) return inf;
  if (a == 0.0) return sign;
  int e2 = 0;
  std::frexp(a, &e2);  // a = m 2^e2, m in [0.5, 1): floor(log2 a) = e2 - 1
  int e = e2 - 1 < 1 - f.bias ? 1 - f.bias : e2 - 1;
  const double unit = std::ldexp(1.0, e - f.mant);
  double r = std::nearbyint(a / unit);     // a / unit is exact; the default mode rounds ties to even
  if (r == std::ldexp(1.0, f.mant + 1)) {  // carried into the next binade
    ++e;
    r /= 2;
  }
  if (e > f.bias) return inf;
  const int ri = static_cast<int>(r);
  if (ri < (1 << f.mant)) return static_cast<std::uint16_t>(sign | ri);  // subnormal (e is the lowest exponent)
  return static_cast<std::uint16_t>(sign | ((e + f.bias) << f.mant) | (ri - (1 << f.mant)));
}

// x rounded to the format and back; infinity when it does not fit.
inline double round16(double x, format16 f) { return decode16(encode16(x, f), f); }

inline bool default_rounding_mode() { return std::fegetround() == FE_TONEAREST; }

}  // namespace kvc_ref
