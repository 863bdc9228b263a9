// Half-precision conversion (binary16 and bfloat16) against a reference computed from the
// definition in double arithmetic, and the page codecs' encode / decode / copy contracts
// and documented error bounds.
#include <gtest/gtest.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <kvc/kvc.hpp>

#include "reference/rounding.hpp"

namespace {

using kvc::detail::bf16_to_float_scalar;
using kvc::detail::float_to_bf16_scalar;
using kvc::detail::float_to_half_scalar;
using kvc::detail::half_to_float_scalar;

std::uint32_t bits_of(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
float float_of(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

bool is_nan16(std::uint16_t h, kvc_ref::format16 f) { return std::isnan(kvc_ref::decode16(h, f)); }

// A float with a random sign, mantissa and an exponent in [lo, hi] (binary exponent of the value).
float random_float(std::mt19937_64& rng, int lo, int hi) {
  std::uniform_int_distribution<int> e(lo, hi);
  const std::uint32_t mant = static_cast<std::uint32_t>(rng()) & 0x7FFFFFu;
  const std::uint32_t sign = static_cast<std::uint32_t>(rng() & 1u) << 31;
  const int exp = e(rng);
  if (exp < -126) {  // float subnormal
    return float_of(sign | (mant >> (-126 - exp)));
  }
  return float_of(sign | (static_cast<std::uint32_t>(exp + 127) << 23) | mant);
}

// Any float bit pattern that is not NaN.
float random_non_nan(std::mt19937_64& rng) {
  for (;;) {
    const float f = float_of(static_cast<std::uint32_t>(rng()));
    if (!std::isnan(f)) return f;
  }
}

// The reference relies on nearbyint rounding ties to even: check the mode it runs in.
TEST(Rounding, ReferenceRunsInRoundToNearest) {
  ASSERT_TRUE(kvc_ref::default_rounding_mode());
  EXPECT_EQ(std::nearbyint(2.5), 2.0);
  EXPECT_EQ(std::nearbyint(3.5), 4.0);
}

// ------------------------------------------------------------------ binary16

// Every binary16 pattern decodes to the value the IEEE definition gives it.
TEST(Half, DecodeEveryPatternMatchesDefinition) {
  for (std::uint32_t h = 0; h <= 0xFFFF; ++h) {
    const std::uint16_t b = static_cast<std::uint16_t>(h);
    const float f = half_to_float_scalar(b);
    const double want = kvc_ref::decode16(b, kvc_ref::binary16);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(f)) << std::hex << h;
    } else {
      EXPECT_EQ(static_cast<double>(f), want) << std::hex << h;
      EXPECT_EQ(std::signbit(f), std::signbit(want)) << std::hex << h;
    }
  }
}

// float -> half -> float is the identity on every non-NaN binary16 value (including
// zeros, subnormals and infinities).
TEST(Half, EveryPatternRoundTrips) {
  for (std::uint32_t h = 0; h <= 0xFFFF; ++h) {
    const std::uint16_t b = static_cast<std::uint16_t>(h);
    if (is_nan16(b, kvc_ref::binary16)) continue;
    EXPECT_EQ(float_to_half_scalar(half_to_float_scalar(b)), b) << std::hex << h;
  }
}

// NaN stays NaN (with its sign) in both directions; decoding gives a quiet NaN (IEEE
// conversions quiet signalling NaNs, and so does F16C, which the bulk path may use).
TEST(Half, NaNStaysNaN) {
  for (std::uint32_t h = 0; h <= 0xFFFF; ++h) {
    const std::uint16_t b = static_cast<std::uint16_t>(h);
    if (!is_nan16(b, kvc_ref::binary16)) continue;
    EXPECT_TRUE(std::isnan(half_to_float_scalar(b)));
    EXPECT_NE(bits_of(half_to_float_scalar(b)) & 0x400000u, 0u) << "not quiet: " << std::hex << h;
    const std::uint16_t back = float_to_half_scalar(half_to_float_scalar(b));
    EXPECT_TRUE(is_nan16(back, kvc_ref::binary16)) << std::hex << h;
    EXPECT_EQ(back & 0x8000u, b & 0x8000u);
  }
  const std::uint16_t n = float_to_half_scalar(std::numeric_limits<float>::quiet_NaN());
  EXPECT_TRUE(is_nan16(n, kvc_ref::binary16));
  const std::uint16_t s = float_to_half_scalar(float_of(0x7F800001u));  // signalling, payload only in low bits
  EXPECT_TRUE(is_nan16(s, kvc_ref::binary16));
}

// The midpoint between every two adjacent binary16 values rounds to the even one, and
// one float ulp either side of it rounds to the nearer one.
TEST(Half, MidpointsRoundToEven) {
  for (std::uint32_t h = 0; h < 0x7C00; ++h) {
    const double lo = kvc_ref::decode16(static_cast<std::uint16_t>(h), kvc_ref::binary16);
    const double hi = kvc_ref::decode16(static_cast<std::uint16_t>(h + 1), kvc_ref::binary16);  // 0x7C00 is +inf
    const double hi_finite = h + 1 == 0x7C00 ? 65536.0 : hi;
    const float mid = static_cast<float>((lo + hi_finite) / 2);
    ASSERT_EQ(static_cast<double>(mid), (lo + hi_finite) / 2) << "midpoint not exact in float";
    const std::uint16_t even = static_cast<std::uint16_t>((h & 1u) == 0 ? h : h + 1);
    for (const float sign : {1.0f, -1.0f}) {
      const std::uint16_t sbit = sign < 0 ? 0x8000u : 0u;
      EXPECT_EQ(float_to_half_scalar(sign * mid), even | sbit) << std::hex << h;
      EXPECT_EQ(float_to_half_scalar(sign * std::nextafter(mid, 0.0f)), h | sbit) << std::hex << h;
      EXPECT_EQ(float_to_half_scalar(sign * std::nextafter(mid, 1e9f)), (h + 1) | sbit) << std::hex << h;
    }
  }
}

// Hand-worked cases at the edges of the format.
TEST(Half, EdgeCases) {
  struct edge {
    float x;
    std::uint16_t bits;
  };
  const edge cases[] = {
      {0.0f, 0x0000},
      {-0.0f, 0x8000},
      {1.0f, 0x3C00},
      {-2.0f, 0xC000},
      {65504.0f, 0x7BFF},         // largest finite
      {65519.99609375f, 0x7BFF},  // just below the midpoint to 65536
      {65520.0f, 0x7C00},         // midpoint, ties to even = 2^16 = inf
      {-65520.0f, 0xFC00},        //
      {1e10f, 0x7C00},            //
      {std::numeric_limits<float>::infinity(), 0x7C00},
      {-std::numeric_limits<float>::infinity(), 0xFC00},
      {std::ldexp(1.0f, -14), 0x0400},     // smallest normal
      {std::ldexp(1023.0f, -24), 0x03FF},  // largest subnormal
      {std::ldexp(2047.0f, -25), 0x0400},  // midpoint largest subnormal / smallest normal -> even (0x400)
      {std::ldexp(1.0f, -24), 0x0001},     // smallest subnormal
      {std::ldexp(1.0f, -25), 0x0000},     // tie between 0 and 2^-24 -> 0 (even)
      {-std::ldexp(1.0f, -25), 0x8000},    // keeps the sign
      {std::nextafter(std::ldexp(1.0f, -25), 1.0f), 0x0001},  // just above the tie
      {std::ldexp(3.0f, -25), 0x0002},                        // 1.5 * 2^-24: tie -> 2 (even)
      {std::ldexp(5.0f, -25), 0x0002},                        // 2.5 * 2^-24: tie -> 2 (even)
      {std::ldexp(1.0f, -26), 0x0000},                        // underflow
      {std::numeric_limits<float>::denorm_min(), 0x0000},
      {-std::numeric_limits<float>::denorm_min(), 0x8000},
      {1.0f + std::ldexp(1.0f, -11), 0x3C00},  // tie between 1 and 1 + 2^-10 -> 1 (even)
      {1.0f + std::ldexp(3.0f, -11), 0x3C02},  // tie between 1 + 2^-10 and 1 + 2^-9 -> 1 + 2^-9 (even)
      {0.1f, 0x2E66},
  };
  for (const edge& c : cases) EXPECT_EQ(float_to_half_scalar(c.x), c.bits) << c.x;
}

// float -> half equals the nearest-even reference on random floats: random bit patterns
// (mostly out of range) and random values spread over the binary16 exponent range.
TEST(Half, RandomFloatsMatchReference) {
  std::mt19937_64 rng(1);
  for (int i = 0; i < 200000; ++i) {
    const float x = i % 2 == 0 ? random_non_nan(rng) : random_float(rng, -27, 16);
    ASSERT_EQ(float_to_half_scalar(x), kvc_ref::encode16(x, kvc_ref::binary16))
        << x << " bits " << std::hex << bits_of(x);
  }
}

// The bulk conversions (SIMD where compiled in) agree bit for bit with the scalar ones,
// for every length and misalignment around the vector widths.
TEST(Half, BulkMatchesScalar) {
  std::mt19937_64 rng(2);
  std::vector<float> src(80 + 4);
  for (float& f : src) f = rng() % 4 == 0 ? random_non_nan(rng) : random_float(rng, -27, 16);
  src[5] = 65520.0f;
  src[9] = -0.0f;
  src[17] = std::ldexp(1.0f, -25);
  src[33] = std::numeric_limits<float>::infinity();
  for (std::size_t off = 0; off < 4; ++off) {
    for (std::size_t n = 0; n <= 80; ++n) {
      std::vector<std::uint16_t> bulk(n + 1, 0xABCD);
      kvc::detail::float_to_half(src.data() + off, bulk.data(), n);
      for (std::size_t i = 0; i < n; ++i) ASSERT_EQ(bulk[i], float_to_half_scalar(src[off + i])) << off << " " << i;
      EXPECT_EQ(bulk[n], 0xABCD) << "wrote past the end";
    }
  }
  std::vector<std::uint16_t> all(65536 + 1);
  for (std::uint32_t h = 0; h <= 0xFFFF; ++h) all[h] = static_cast<std::uint16_t>(h);
  all[65536] = 0x3C00;
  for (std::size_t off = 0; off < 2; ++off) {
    std::vector<float> dst(65536, -1.0f);
    kvc::detail::half_to_float(all.data() + off, dst.data(), 65536);
    for (std::size_t i = 0; i < 65536; ++i)
      ASSERT_EQ(bits_of(dst[i]), bits_of(half_to_float_scalar(all[i + off]))) << std::hex << all[i + off];
  }
}

// ------------------------------------------------------------------ bfloat16

// Every bfloat16 pattern decodes to the value the definition gives it.
TEST(BFloat16, DecodeEveryPatternMatchesDefinition) {
  for (std::uint32_t h = 0; h <= 0xFFFF; ++h) {
    const std::uint16_t b = static_cast<std::uint16_t>(h);
    const float f = bf16_to_float_scalar(b);
    const double want = kvc_ref::decode16(b, kvc_ref::bfloat16);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(f)) << std::hex << h;
    } else {
      EXPECT_EQ(static_cast<double>(f), want) << std::hex << h;
      EXPECT_EQ(std::signbit(f), std::signbit(want)) << std::hex << h;
    }
  }
}

// float -> bf16 -> float is the identity on every non-NaN bfloat16 value; NaN stays NaN.
TEST(BFloat16, EveryPatternRoundTrips) {
  for (std::uint32_t h = 0; h <= 0xFFFF; ++h) {
    const std::uint16_t b = static_cast<std::uint16_t>(h);
    const std::uint16_t back = float_to_bf16_scalar(bf16_to_float_scalar(b));
    if (is_nan16(b, kvc_ref::bfloat16)) {
      EXPECT_TRUE(is_nan16(back, kvc_ref::bfloat16)) << std::hex << h;
      EXPECT_EQ(back & 0x8000u, b & 0x8000u);
    } else {
      EXPECT_EQ(back, b) << std::hex << h;
    }
  }
  EXPECT_TRUE(is_nan16(float_to_bf16_scalar(float_of(0x7F800001u)), kvc_ref::bfloat16));  // payload only in low bits
}

// Midpoints between adjacent bfloat16 values round to the even one; one float ulp either
// side rounds to the nearer one.
TEST(BFloat16, MidpointsRoundToEven) {
  for (std::uint32_t h = 0; h < 0x7F80; ++h) {
    const std::uint32_t lo_bits = h << 16;
    const float mid = float_of(lo_bits | 0x8000u);  // exactly halfway to the next bf16
    const std::uint16_t even = static_cast<std::uint16_t>((h & 1u) == 0 ? h : h + 1);
    for (const std::uint32_t sbit : {0u, 0x80000000u}) {
      const float m = float_of(bits_of(mid) | sbit);
      const std::uint16_t s16 = static_cast<std::uint16_t>(sbit >> 16);
      EXPECT_EQ(float_to_bf16_scalar(m), even | s16) << std::hex << h;
      EXPECT_EQ(float_to_bf16_scalar(float_of(bits_of(m) - 1)), h | s16) << std::hex << h;
      EXPECT_EQ(float_to_bf16_scalar(float_of(bits_of(m) + 1)), (h + 1) | s16) << std::hex << h;
    }
  }
}

// Hand-worked cases at the edges of the format.
TEST(BFloat16, EdgeCases) {
  struct edge {
    float x;
    std::uint16_t bits;
  };
  const float max_bf16 = std::ldexp(255.0f, 120);  // (2 - 2^-7) 2^127
  const edge cases[] = {
      {0.0f, 0x0000},
      {-0.0f, 0x8000},
      {1.0f, 0x3F80},
      {-2.0f, 0xC000},
      {max_bf16, 0x7F7F},
      {std::numeric_limits<float>::max(), 0x7F80},  // above the midpoint to 2^128: inf
      {std::ldexp(511.0f, 119), 0x7F80},            // the midpoint itself: ties to even = inf
      {std::nextafter(std::ldexp(511.0f, 119), 0.0f), 0x7F7F},
      {std::numeric_limits<float>::infinity(), 0x7F80},
      {-std::numeric_limits<float>::infinity(), 0xFF80},
      {std::numeric_limits<float>::min(), 0x0080},  // smallest normal float is a bf16 normal
      {std::ldexp(1.0f, -133), 0x0001},             // smallest bf16 subnormal
      {std::ldexp(1.0f, -134), 0x0000},             // tie with 0 -> 0 (even)
      {std::ldexp(3.0f, -134), 0x0002},             // 1.5 units: tie -> 2
      {std::numeric_limits<float>::denorm_min(), 0x0000},
      {1.0f + std::ldexp(1.0f, -8), 0x3F80},  // tie between 1 and 1 + 2^-7 -> 1
      {1.0f + std::ldexp(3.0f, -8), 0x3F82},  // tie -> 1 + 2^-6
      {0.1f, 0x3DCD},
  };
  for (const edge& c : cases) EXPECT_EQ(float_to_bf16_scalar(c.x), c.bits) << c.x;
}

// float -> bf16 equals the nearest-even reference on random bit patterns (every float
// exponent, subnormals included) and random values near 1.
TEST(BFloat16, RandomFloatsMatchReference) {
  std::mt19937_64 rng(3);
  for (int i = 0; i < 200000; ++i) {
    const float x = i % 2 == 0 ? random_non_nan(rng) : random_float(rng, -4, 4);
    ASSERT_EQ(float_to_bf16_scalar(x), kvc_ref::encode16(x, kvc_ref::bfloat16))
        << x << " bits " << std::hex << bits_of(x);
  }
}

// The bulk conversions agree bit for bit with the scalar ones.
TEST(BFloat16, BulkMatchesScalar) {
  std::mt19937_64 rng(4);
  std::vector<float> src(80 + 4);
  for (float& f : src) f = random_non_nan(rng);
  src[3] = float_of(0x7FC00001u);
  for (std::size_t off = 0; off < 4; ++off) {
    for (std::size_t n = 0; n <= 80; ++n) {
      std::vector<std::uint16_t> bulk(n + 1, 0xABCD);
      kvc::detail::float_to_bf16(src.data() + off, bulk.data(), n);
      for (std::size_t i = 0; i < n; ++i) ASSERT_EQ(bulk[i], float_to_bf16_scalar(src[off + i]));
      EXPECT_EQ(bulk[n], 0xABCD) << "wrote past the end";
    }
  }
  std::vector<std::uint16_t> all(65536);
  for (std::uint32_t h = 0; h <= 0xFFFF; ++h) all[h] = static_cast<std::uint16_t>(h);
  std::vector<float> dst(65536);
  kvc::detail::bf16_to_float(all.data(), dst.data(), all.size());
  for (std::size_t i = 0; i < all.size(); ++i) ASSERT_EQ(bits_of(dst[i]), bits_of(bf16_to_float_scalar(all[i])));
}

// ------------------------------------------------------------------ page codecs

static_assert(kvc::is_codec_v<kvc::codec::f32>);
static_assert(kvc::is_codec_v<kvc::codec::f16>);
static_assert(kvc::is_codec_v<kvc::codec::bf16>);
static_assert(!kvc::is_codec_v<int>);
struct not_a_codec {
  static constexpr const char* name = "x";
};
static_assert(!kvc::is_codec_v<not_a_codec>);

// Per codec: bytes per element, and the rounding of one float as the documentation defines it.
template <class C>
struct codec_traits;
template <>
struct codec_traits<kvc::codec::f32> {
  static constexpr std::size_t bytes = 4;
  static double round(float x) { return x; }
  static double largest_finite() { return std::numeric_limits<float>::max(); }
};
template <>
struct codec_traits<kvc::codec::f16> {
  static constexpr std::size_t bytes = 2;
  static double round(float x) { return kvc_ref::round16(x, kvc_ref::binary16); }
  static double largest_finite() { return kvc_ref::decode16(0x7BFF, kvc_ref::binary16); }
};
template <>
struct codec_traits<kvc::codec::bf16> {
  static constexpr std::size_t bytes = 2;
  static double round(float x) { return kvc_ref::round16(x, kvc_ref::bfloat16); }
  static double largest_finite() { return kvc_ref::decode16(0x7F7F, kvc_ref::bfloat16); }
};

template <class C>
class Codec : public ::testing::Test {};
using codecs = ::testing::Types<kvc::codec::f32, kvc::codec::f16, kvc::codec::bf16>;
struct codec_names {
  template <class T>
  static std::string GetName(int) {
    return T::name;
  }
};
TYPED_TEST_SUITE(Codec, codecs, codec_names);

// Random rows over a codec's range: mostly O(1), some tiny (subnormal in f16), some near max_abs.
template <class C>
std::vector<float> random_rows(std::mt19937_64& rng, int n, int d) {
  std::vector<float> x(static_cast<std::size_t>(n) * d);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int max_exp = static_cast<int>(std::floor(std::log2(static_cast<double>(C::max_abs)))) - 1;
  for (std::size_t i = 0; i < x.size(); ++i) {
    switch (i % 5) {
      case 0:
        x[i] = random_float(rng, -30, 2);
        break;
      case 1:
        x[i] = random_float(rng, max_exp - 8, max_exp);
        break;
      default:
        x[i] = normal(rng);
    }
  }
  return x;
}

// Documented payload sizes: f32 4 bytes per element, f16 and bf16 2.
TYPED_TEST(Codec, PageBytesAreDocumentedSize) {
  using C = TypeParam;
  for (int p : {1, 16, 33})
    for (int d : {1, 64, 128})
      EXPECT_EQ(C::page_bytes(p, d),
                codec_traits<C>::bytes * static_cast<std::size_t>(p) * static_cast<std::size_t>(d));
}

// max_abs is the largest finite value of the format, and it survives encoding.
TYPED_TEST(Codec, MaxAbsIsLargestFinite) {
  using C = TypeParam;
  EXPECT_EQ(static_cast<double>(C::max_abs), codec_traits<C>::largest_finite());
  const float x[2] = {C::max_abs, -C::max_abs};
  std::vector<std::byte> page(C::page_bytes(1, 2));
  C::encode(x, 1, 2, 1, page.data());
  float y[2];
  C::decode(page.data(), 0, 1, 2, 1, y);
  EXPECT_EQ(y[0], C::max_abs);
  EXPECT_EQ(y[1], -C::max_abs);
}

// encode then decode gives each element's reference rounding, and that stays within the
// documented bound |x~ - x| <= relative_error |x| + absolute_error; the relative bound is
// nearly attained (it is not an overstatement).
TYPED_TEST(Codec, RoundTripIsReferenceRoundingWithinBound) {
  using C = TypeParam;
  std::mt19937_64 rng(5);
  for (const int P : {16, 64}) {
    for (const int d : {8, 64, 128}) {
      for (const int n : {1, P / 2, P}) {
        const std::vector<float> x = random_rows<C>(rng, n, d);
        std::vector<std::byte> page(C::page_bytes(P, d));
        C::encode(x.data(), n, d, P, page.data());
        std::vector<float> y(x.size());
        C::decode(page.data(), 0, n, d, P, y.data());
        double worst_rel = 0.0;
        for (std::size_t i = 0; i < x.size(); ++i) {
          ASSERT_EQ(static_cast<double>(y[i]), codec_traits<C>::round(x[i])) << i << " " << x[i];
          const double err = std::fabs(static_cast<double>(y[i]) - x[i]);
          ASSERT_LE(err, C::relative_error * std::fabs(x[i]) + C::absolute_error) << x[i];
          if (std::fabs(x[i]) > 1e-3) worst_rel = std::max(worst_rel, err / std::fabs(x[i]));
        }
        if (C::relative_error > 0 && x.size() >= 512) {
          EXPECT_GT(worst_rel, 0.7 * C::relative_error);
        }
      }
    }
  }
}

// The absolute term covers inputs below the normal range, where the relative bound alone fails.
TYPED_TEST(Codec, TinyInputsWithinAbsoluteBound) {
  using C = TypeParam;
  std::mt19937_64 rng(6);
  const int d = 64;
  std::vector<float> x(static_cast<std::size_t>(d));
  double worst_abs = 0.0;
  for (int rep = 0; rep < 200; ++rep) {
    for (float& f : x) f = random_float(rng, -150, -10);
    std::vector<std::byte> page(C::page_bytes(1, d));
    C::encode(x.data(), 1, d, 1, page.data());
    std::vector<float> y(x.size());
    C::decode(page.data(), 0, 1, d, 1, y.data());
    for (std::size_t i = 0; i < x.size(); ++i) {
      const double err = std::fabs(static_cast<double>(y[i]) - x[i]);
      ASSERT_LE(err, C::relative_error * std::fabs(x[i]) + C::absolute_error) << x[i];
      if (C::relative_error * std::fabs(x[i]) < C::absolute_error) worst_abs = std::max(worst_abs, err);
    }
  }
  if (C::absolute_error > 0) {
    EXPECT_GT(worst_abs, 0.5 * C::absolute_error);
  }
}

// decode(first, n) returns exactly rows [first, first + n) of the full decode.
TYPED_TEST(Codec, PartialDecodeIsRowSlice) {
  using C = TypeParam;
  std::mt19937_64 rng(7);
  const int P = 16, d = 24;
  const std::vector<float> x = random_rows<C>(rng, P, d);
  std::vector<std::byte> page(C::page_bytes(P, d));
  C::encode(x.data(), P, d, P, page.data());
  std::vector<float> all(x.size());
  C::decode(page.data(), 0, P, d, P, all.data());
  for (int first = 0; first < P; first += 3) {
    for (int n = 1; first + n <= P; n += 4) {
      std::vector<float> part(static_cast<std::size_t>(n) * d);
      C::decode(page.data(), first, n, d, P, part.data());
      for (std::size_t i = 0; i < part.size(); ++i)
        ASSERT_EQ(bits_of(part[i]), bits_of(all[static_cast<std::size_t>(first) * d + i]));
    }
  }
}

// rows_f32 gives the decoded rows: a pointer into the page for identity codecs, the
// scratch buffer otherwise.
TYPED_TEST(Codec, RowsF32) {
  using C = TypeParam;
  std::mt19937_64 rng(8);
  const int P = 16, d = 32;
  const std::vector<float> x = random_rows<C>(rng, P, d);
  std::vector<std::byte> page(C::page_bytes(P, d));
  C::encode(x.data(), P, d, P, page.data());
  std::vector<float> scratch(static_cast<std::size_t>(5) * d);
  const float* r = C::rows_f32(page.data(), 7, 5, d, P, scratch.data());
  if (C::identity) {
    EXPECT_EQ(static_cast<const void*>(r), static_cast<const void*>(page.data() + 7 * C::page_bytes(1, d)));
  } else {
    EXPECT_EQ(r, scratch.data());
  }
  for (int i = 0; i < 5 * d; ++i) EXPECT_EQ(static_cast<double>(r[i]), codec_traits<C>::round(x[7 * d + i]));
}

// copy_rows moves encoded rows between pages and, overlapping, to lower slots of one page.
TYPED_TEST(Codec, CopyRows) {
  using C = TypeParam;
  std::mt19937_64 rng(9);
  const int P = 16, d = 8;
  const std::vector<float> x = random_rows<C>(rng, P, d);
  std::vector<std::byte> a(C::page_bytes(P, d)), b(C::page_bytes(P, d));
  C::encode(x.data(), P, d, P, a.data());
  std::vector<float> want(x.size());
  C::decode(a.data(), 0, P, d, P, want.data());

  C::copy_rows(a.data(), 3, b.data(), 10, 6, d, P);
  std::vector<float> got(static_cast<std::size_t>(6) * d);
  C::decode(b.data(), 10, 6, d, P, got.data());
  for (int i = 0; i < 6 * d; ++i) EXPECT_EQ(bits_of(got[i]), bits_of(want[3 * d + i]));

  C::copy_rows(a.data(), 2, a.data(), 0, 12, d, P);  // overlapping, towards lower slots
  std::vector<float> after(x.size());
  C::decode(a.data(), 0, P, d, P, after.data());
  for (int r = 0; r < P; ++r) {
    const int from = r < 12 ? r + 2 : r;  // rows 12.. are untouched
    for (int e = 0; e < d; ++e) EXPECT_EQ(bits_of(after[r * d + e]), bits_of(want[from * d + e])) << r;
  }
}

}  // namespace
