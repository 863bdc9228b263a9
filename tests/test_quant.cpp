// Low-bit quantization primitives (kvc/codecs/detail/quant.hpp): the packed code layout
// against a bit-position reference written from the layout and hand-worked bytes, KIVI
// asymmetric min-max quantization (Liu et al. 2024, Sec. 3) per token and per channel
// against the quantizer's definition, its error on Gaussian and outlier data, symmetric
// int8, and the Walsh-Hadamard rotation against the Sylvester matrix.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <kvc/codecs/detail/quant.hpp>

namespace {

using kvc::detail::float_to_half_scalar;
using kvc::detail::half_to_float_scalar;
using kvc::detail::minmax;
using kvc::detail::packed_bytes;

constexpr int kBits[] = {2, 3, 4, 8};

// ------------------------------------------------------------------ layout reference

// Byte and bit of bit b of code i in a packed row of `count` codes, read off the layout:
// full blocks of 32 codes at 4 * B bytes each, then the tail packed sequentially.
std::pair<std::size_t, int> bit_location(int i, int b, int count, int bits) {
  const int full = count / 32;
  if (i / 32 < full) {
    const std::size_t base = static_cast<std::size_t>(4 * bits * (i / 32));
    const int j = i % 32;
    switch (bits) {
      case 8:
        return {base + j, b};
      case 4:
        return {base + j % 16, b + 4 * (j / 16)};
      case 2:
        return {base + j % 8, b + 2 * (j / 8)};
      default:  // 3: low two bits as B = 2, bit 2 in the little-endian word at byte 8
        if (b < 2) return {base + j % 8, b + 2 * (j / 8)};
        return {base + 8 + j / 8, j % 8};
    }
  }
  const std::size_t base = static_cast<std::size_t>(4 * bits * full);
  const int t = (i - 32 * full) * bits + b;
  return {base + t / 8, t % 8};
}

std::vector<std::uint8_t> reference_pack(const std::vector<std::uint8_t>& codes, int bits) {
  const int count = static_cast<int>(codes.size());
  std::vector<std::uint8_t> out(packed_bytes(count, bits), 0);
  for (int i = 0; i < count; ++i)
    for (int b = 0; b < bits; ++b)
      if ((codes[i] >> b) & 1) {
        const auto loc = bit_location(i, b, count, bits);
        out[loc.first] = static_cast<std::uint8_t>(out[loc.first] | (1u << loc.second));
      }
  return out;
}

// ------------------------------------------------------------------ quantizer reference

// Q(x) = clamp(round((x - z) / s), 0, 2^B - 1) against the stored (binary16) s and z.
int reference_code(float x, std::uint16_t scale, std::uint16_t zero, int bits) {
  const float s = half_to_float_scalar(scale), z = half_to_float_scalar(zero);
  const int qmax = (1 << bits) - 1;
  if (s == 0.0f) return 0;
  const float q = std::nearbyint((x - z) / s);
  return q < 0.0f ? 0 : q > static_cast<float>(qmax) ? qmax : static_cast<int>(q);
}

// Checks the parameter rule for a group with minimum lo and maximum hi: z = f16(lo);
// s = 0 when lo == hi; otherwise s is the smallest binary16 at or above
// f16((hi - lo) / (2^B - 1)) with z + (2^B - 1) s >= hi.
void expect_params(float lo, float hi, int bits, minmax p) {
  EXPECT_EQ(p.zero, float_to_half_scalar(lo)) << lo;
  if (lo == hi) {
    EXPECT_EQ(p.scale, 0u);
    return;
  }
  const int qmax = (1 << bits) - 1;
  const std::uint16_t nominal = float_to_half_scalar((hi - lo) / static_cast<float>(qmax));
  const double z = half_to_float_scalar(p.zero);
  auto top = [&](std::uint16_t s) { return z + qmax * static_cast<double>(half_to_float_scalar(s)); };
  EXPECT_GE(top(p.scale), hi) << lo << " " << hi << " bits " << bits;
  // The reader's float arithmetic reaches hi too.
  const float zf = half_to_float_scalar(p.zero), sf = half_to_float_scalar(p.scale);
  EXPECT_GE(zf + sf * static_cast<float>(qmax), hi);
  EXPECT_GE(p.scale, nominal);
  if (p.scale > nominal) {
    EXPECT_LT(top(static_cast<std::uint16_t>(p.scale - 1)), hi) << lo << " " << hi;
  }
}

std::vector<float> gaussian(std::size_t n, std::uint64_t seed, float sigma = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, sigma);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

double rel_frobenius(const std::vector<float>& approx, const std::vector<float>& x) {
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double e = static_cast<double>(approx[i]) - x[i];
    num += e * e;
    den += static_cast<double>(x[i]) * x[i];
  }
  return std::sqrt(num / den);
}

// Per-token grouped round trip of x [rows][d].
std::vector<float> grouped_round_trip(const std::vector<float>& x, int rows, int d, int group, int bits) {
  const int groups = kvc::detail::group_count(d, group);
  std::vector<std::uint8_t> packed(rows * packed_bytes(d, bits));
  std::vector<std::uint16_t> scale(static_cast<std::size_t>(rows) * groups), zero(scale.size());
  kvc::detail::quantize_rows_grouped(x.data(), rows, d, group, bits, packed.data(), scale.data(), zero.data());
  std::vector<float> y(x.size());
  kvc::detail::dequantize_rows_grouped(packed.data(), rows, d, group, bits, scale.data(), zero.data(), y.data());
  return y;
}

// Per-channel round trip of x [rows][d], one block of `rows` tokens.
std::vector<float> per_channel_round_trip(const std::vector<float>& x, int rows, int d, int bits) {
  std::vector<std::uint8_t> packed(rows * packed_bytes(d, bits));
  std::vector<std::uint16_t> scale(d), zero(d);
  kvc::detail::quantize_rows_per_channel(x.data(), rows, d, bits, packed.data(), scale.data(), zero.data());
  std::vector<float> y(x.size());
  kvc::detail::dequantize_rows_per_channel(packed.data(), rows, d, bits, scale.data(), zero.data(), y.data());
  return y;
}

constexpr int kOutliers[] = {3, 40, 77, 114};

// Keys [rows][d] with 4 outlier channels of 20x the magnitude of the others. Persistent
// (the key cache of KIVI Sec. 3.1, Fig. 2: fixed channels whose large magnitude holds across
// tokens): channel c is mu_c + e with a channel mean mu_c ~ N(0, 1) and e ~ N(0, 1); an
// outlier channel is 20 (m_c + e / 2) with m_c = +-2. Not persistent: plain N(0, 1) with the
// outlier channels multiplied by 20.
std::vector<float> outlier_keys(int rows, int d, std::uint64_t seed, bool persistent = true) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> mean(d, 0.0f);
  std::vector<bool> outlier(d, false);
  for (int c : kOutliers) outlier[c] = true;
  for (int c = 0; c < d; ++c) {
    if (!persistent) continue;
    mean[c] = outlier[c] ? ((rng() & 1) ? 2.0f : -2.0f) : normal(rng);
  }
  std::vector<float> x(static_cast<std::size_t>(rows) * d);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < d; ++c) {
      const float e = normal(rng);
      const float v = outlier[c] && persistent ? 20.0f * (mean[c] + 0.5f * e) : mean[c] + e;
      x[static_cast<std::size_t>(r) * d + c] = outlier[c] && !persistent ? 20.0f * v : v;
    }
  return x;
}

// ------------------------------------------------------------------ packing

// The layout: every width, counts 1..160 (no block, full blocks, tails of every length),
// random codes; pack matches the bit-position reference, writes nothing past
// packed_bytes, and unpack inverts it.
TEST(QuantPack, RoundTripMatchesLayoutReference) {
  std::mt19937_64 rng(0x5eed);
  for (int bits : kBits) {
    for (int count = 1; count <= 160; ++count) {
      const std::size_t nb = packed_bytes(count, bits);
      ASSERT_EQ(nb, (static_cast<std::size_t>(count) * bits + 7) / 8);
      std::vector<std::uint8_t> codes(count);
      for (auto& c : codes) c = static_cast<std::uint8_t>(rng() & ((1u << bits) - 1u));
      std::vector<std::uint8_t> packed(nb + 8, 0xA5);
      kvc::detail::pack_codes(codes.data(), count, bits, packed.data());
      const std::vector<std::uint8_t> want = reference_pack(codes, bits);
      for (std::size_t i = 0; i < nb; ++i) ASSERT_EQ(packed[i], want[i]) << "bits " << bits << " count " << count;
      for (std::size_t i = nb; i < packed.size(); ++i) ASSERT_EQ(packed[i], 0xA5) << "wrote past the row";
      std::vector<std::uint8_t> back(count + 8, 0xEE);
      kvc::detail::unpack_codes(packed.data(), count, bits, back.data());
      for (int i = 0; i < count; ++i) ASSERT_EQ(back[i], codes[i]) << "bits " << bits << " count " << count;
      for (int i = count; i < count + 8; ++i) ASSERT_EQ(back[i], 0xEE) << "wrote past the codes";
    }
  }
}

// Bits of a code above B do not leak into its neighbours.
TEST(QuantPack, HighBitsIgnored) {
  std::mt19937_64 rng(11);
  for (int bits : {2, 3, 4}) {
    const int count = 77;
    std::vector<std::uint8_t> codes(count), masked(count);
    for (int i = 0; i < count; ++i) {
      codes[i] = static_cast<std::uint8_t>(rng());
      masked[i] = static_cast<std::uint8_t>(codes[i] & ((1u << bits) - 1u));
    }
    std::vector<std::uint8_t> a(packed_bytes(count, bits)), b(a.size());
    kvc::detail::pack_codes(codes.data(), count, bits, a.data());
    kvc::detail::pack_codes(masked.data(), count, bits, b.data());
    EXPECT_EQ(a, b) << bits;
  }
}

void expect_golden(const std::vector<std::uint8_t>& codes, int bits, const std::vector<std::uint8_t>& bytes) {
  const int count = static_cast<int>(codes.size());
  ASSERT_EQ(packed_bytes(count, bits), bytes.size());
  std::vector<std::uint8_t> packed(bytes.size());
  kvc::detail::pack_codes(codes.data(), count, bits, packed.data());
  EXPECT_EQ(packed, bytes) << "bits " << bits;
  std::vector<std::uint8_t> back(count);
  kvc::detail::unpack_codes(bytes.data(), count, bits, back.data());
  EXPECT_EQ(back, codes) << "bits " << bits;
}

// Hand-worked bytes from the layout text. B = 8, 37 codes 7j: bytes are the codes.
TEST(QuantPack, GoldenBytes8) {
  std::vector<std::uint8_t> codes;
  for (int j = 0; j < 37; ++j) codes.push_back(static_cast<std::uint8_t>(7 * j));
  expect_golden(codes, 8, {0x00, 0x07, 0x0E, 0x15, 0x1C, 0x23, 0x2A, 0x31, 0x38, 0x3F, 0x46, 0x4D, 0x54,
                           0x5B, 0x62, 0x69, 0x70, 0x77, 0x7E, 0x85, 0x8C, 0x93, 0x9A, 0xA1, 0xA8, 0xAF,
                           0xB6, 0xBD, 0xC4, 0xCB, 0xD2, 0xD9, 0xE0, 0xE7, 0xEE, 0xF5, 0xFC});
}

// B = 4: block codes j >> 1, byte j = (j >> 1) | ((j + 16) >> 1) << 4 = 0x80, 0x80, 0x91, ...;
// tail {A, 3, C, 5, F} sequential nibbles: 0x3A, 0x5C, 0x0F.
TEST(QuantPack, GoldenBytes4) {
  std::vector<std::uint8_t> codes;
  for (int j = 0; j < 32; ++j) codes.push_back(static_cast<std::uint8_t>(j >> 1));
  for (int c : {0xA, 0x3, 0xC, 0x5, 0xF}) codes.push_back(static_cast<std::uint8_t>(c));
  expect_golden(codes, 4,
                {0x80, 0x80, 0x91, 0x91, 0xA2, 0xA2, 0xB3, 0xB3, 0xC4, 0xC4, 0xD5, 0xD5, 0xE6, 0xE6, 0xF7, 0xF7, 0x3A,
                 0x5C, 0x0F});
}

// B = 2: block 0 codes j & 3 (byte j = (j & 3) * 0x55), block 1 codes j >> 3
// (every byte 0 | 1 << 2 | 2 << 4 | 3 << 6 = 0xE4), tail {3, 1, 2, 0, 3}: 0x27, 0x03.
TEST(QuantPack, GoldenBytes2) {
  std::vector<std::uint8_t> codes;
  for (int j = 0; j < 32; ++j) codes.push_back(static_cast<std::uint8_t>(j & 3));
  for (int j = 0; j < 32; ++j) codes.push_back(static_cast<std::uint8_t>(j >> 3));
  for (int c : {3, 1, 2, 0, 3}) codes.push_back(static_cast<std::uint8_t>(c));
  expect_golden(
      codes, 2,
      {0x00, 0x55, 0xAA, 0xFF, 0x00, 0x55, 0xAA, 0xFF, 0xE4, 0xE4, 0xE4, 0xE4, 0xE4, 0xE4, 0xE4, 0xE4, 0x27, 0x03});
}

// B = 3: block 0 codes j & 7: low bits (j & 3) * 0x55, bit 2 set for j % 8 >= 4 -> word
// bytes 0xF0; block 1 codes j >> 2: low bytes 0x88 (j < 4: 0,2,0,2) and 0xDD (1,3,1,3), bit 2
// set for j >= 16 -> word 0xFFFF0000 little-endian; tail {5, 2, 7, 1, 6} at 3-bit offsets:
// 0xD5, 0x63 (code 7 straddles the bytes).
TEST(QuantPack, GoldenBytes3) {
  std::vector<std::uint8_t> codes;
  for (int j = 0; j < 32; ++j) codes.push_back(static_cast<std::uint8_t>(j & 7));
  for (int j = 0; j < 32; ++j) codes.push_back(static_cast<std::uint8_t>(j >> 2));
  for (int c : {5, 2, 7, 1, 6}) codes.push_back(static_cast<std::uint8_t>(c));
  expect_golden(codes, 3, {0x00, 0x55, 0xAA, 0xFF, 0x00, 0x55, 0xAA, 0xFF, 0xF0, 0xF0, 0xF0, 0xF0, 0x88,
                           0x88, 0x88, 0x88, 0xDD, 0xDD, 0xDD, 0xDD, 0x00, 0x00, 0xFF, 0xFF, 0xD5, 0x63});
}

// ------------------------------------------------------------------ min-max quantizer

// KIVI Sec. 3 quantizer by hand: x = {-1, 0, 0.5, 2} at 2 bits: z = -1, s = 3 / 3 = 1,
// codes round({0, 1, 1.5, 3}) = {0, 1, 2, 3} (1.5 ties to even), packed as the 4-code tail
// 0 | 1 << 2 | 2 << 4 | 3 << 6 = 0xE4; dequantized -1 + code exactly.
TEST(QuantMinmax, GoldenTwoBitGroup) {
  const float x[4] = {-1.0f, 0.0f, 0.5f, 2.0f};
  const minmax p = kvc::detail::minmax_params(x, 4, 2);
  EXPECT_EQ(p.scale, 0x3C00u);  // 1.0
  EXPECT_EQ(p.zero, 0xBC00u);   // -1.0
  for (int i = 0; i < 4; ++i) EXPECT_EQ(kvc::detail::quantize_code(x[i], 1.0f, -1.0f, 2), i);
  std::uint8_t packed[1] = {0};
  std::uint16_t scale = 0, zero = 0;
  kvc::detail::quantize_rows_grouped(x, 1, 4, 4, 2, packed, &scale, &zero);
  EXPECT_EQ(packed[0], 0xE4);
  EXPECT_EQ(scale, 0x3C00u);
  EXPECT_EQ(zero, 0xBC00u);
  float y[4];
  kvc::detail::dequantize_rows_grouped(packed, 1, 4, 4, 2, &scale, &zero, y);
  const float want[4] = {-1.0f, 0.0f, 1.0f, 2.0f};
  for (int i = 0; i < 4; ++i) EXPECT_EQ(y[i], want[i]);
}

// The round-up of s: x = {0, 0.25, 0.5, 1} at 2 bits. (1 - 0) / 3 rounds to the binary16
// 1365 / 4096 (0x3555), and 3 * 1365 / 4096 = 0.99976 < 1, so s becomes the next binary16
// 1366 / 4096 = 0.33349609375 (0x3556). Codes: 0.25 / s = 0.7496 -> 1, 0.5 / s = 1.4993 -> 1,
// 1 / s = 2.9985 -> 3; the top value reads back as 3 * 1366 / 4096 = 1.00048828125.
TEST(QuantMinmax, GoldenScaleRoundsUp) {
  EXPECT_EQ(float_to_half_scalar(1.0f / 3.0f), 0x3555u);  // the nominal s falls short
  const float x[4] = {0.0f, 0.25f, 0.5f, 1.0f};
  const minmax p = kvc::detail::minmax_params(x, 4, 2);
  EXPECT_EQ(p.scale, 0x3556u);
  EXPECT_EQ(p.zero, 0x0000u);
  EXPECT_EQ(half_to_float_scalar(p.scale), 0.33349609375f);
  std::uint8_t packed[1];
  std::uint16_t scale, zero;
  kvc::detail::quantize_rows_grouped(x, 1, 4, 4, 2, packed, &scale, &zero);
  EXPECT_EQ(packed[0], 0 | 1 << 2 | 1 << 4 | 3 << 6);
  float y[4];
  kvc::detail::dequantize_rows_grouped(packed, 1, 4, 4, 2, &scale, &zero, y);
  EXPECT_EQ(y[3], 1.00048828125f);
  EXPECT_EQ(y[1], 0.33349609375f);
}

// Q rounds to nearest with ties to even and clamps to [0, 2^B - 1]: with s = 1, z = 0 at
// 8 bits, k + 0.5 goes to the even neighbour and the floats next to it to the nearer one.
TEST(QuantMinmax, CodeRoundingAndClamping) {
  for (int k = 0; k < 255; ++k) {
    const float t = static_cast<float>(k) + 0.5f;
    EXPECT_EQ(kvc::detail::quantize_code(t, 1.0f, 0.0f, 8), k % 2 == 0 ? k : k + 1) << k;
    EXPECT_EQ(kvc::detail::quantize_code(std::nextafter(t, 0.0f), 1.0f, 0.0f, 8), k) << k;
    EXPECT_EQ(kvc::detail::quantize_code(std::nextafter(t, 1e9f), 1.0f, 0.0f, 8), k + 1) << k;
  }
  EXPECT_EQ(kvc::detail::quantize_code(0.49999997f, 1.0f, 0.0f, 2), 0);
  EXPECT_EQ(kvc::detail::quantize_code(-5.0f, 1.0f, 0.0f, 2), 0);
  EXPECT_EQ(kvc::detail::quantize_code(3.4f, 1.0f, 0.0f, 2), 3);
  EXPECT_EQ(kvc::detail::quantize_code(1e4f, 1.0f, 0.0f, 3), 7);
  EXPECT_EQ(kvc::detail::quantize_code(2.0f, 0.0f, 0.0f, 4), 0);  // s = 0
  EXPECT_EQ(kvc::detail::quantize_code(-2.5f, 0.5f, -3.0f, 4), 1);
}

// quantize_codes (eight channels at a time where AVX2 is built) gives quantize_code's code in
// every channel: the hand-worked ties and clampings of CodeRoundingAndClamping, s = 0
// channels, and random grids. add_grid_errors adds w (z + s q - x)^2 per channel, checked
// against the sum in double of the codes above; the row-wise error of reencode's grid choice.
TEST(QuantMinmax, VectorCodesAndErrorsMatchScalar) {
  for (int bits : {2, 3, 4, 8}) {
    SCOPED_TRACE("bits " + std::to_string(bits));
    const int m = 45;  // five vectors of eight and a tail of five
    std::mt19937 rng(static_cast<unsigned>(40 + bits));
    std::normal_distribution<float> g;
    std::vector<float> x(m), sc(m), z(m), w(m);
    for (int i = 0; i < m; ++i) {
      z[i] = half_to_float_scalar(float_to_half_scalar(g(rng)));
      sc[i] = i % 9 == 4 ? 0.0f : half_to_float_scalar(float_to_half_scalar(std::fabs(g(rng)) * 0.3f));
      x[i] = i % 7 == 0 ? z[i] + sc[i] * (static_cast<float>(i % 5) + 0.5f)  // a tie
                        : z[i] + g(rng) * static_cast<float>(1 << bits) * 0.2f;
      w[i] = i % 4 == 3 ? 0.0f : 1.0f;
    }
    x[1] = z[1] - 100.0f;  // clamped below
    x[2] = z[2] + 1e4f;    // clamped above
    std::vector<std::uint8_t> codes(m);
    kvc::detail::quantize_codes(x.data(), m, sc.data(), z.data(), bits, codes.data());
    std::vector<double> cost(m, 0.5);
    kvc::detail::add_grid_errors(x.data(), m, sc.data(), z.data(), w.data(), bits, cost.data());
    for (int i = 0; i < m; ++i) {
      const int q = kvc::detail::quantize_code(x[i], sc[i], z[i], bits);
      EXPECT_EQ(codes[i], q) << i;
      const double e = static_cast<double>(z[i]) + static_cast<double>(sc[i]) * q - static_cast<double>(x[i]);
      // The float residual of a float z + s q - x: at most a few ulps of the larger term.
      const double ulp = 4e-7 * (std::fabs(z[i]) + std::fabs(sc[i] * q) + std::fabs(x[i]));
      EXPECT_NEAR(cost[i], 0.5 + w[i] * e * e, 2.0 * ulp * std::fabs(e) + ulp * ulp + 1e-12) << i;
    }
  }
}

// A constant group has s = 0 and all codes 0, reading back z = f16(x).
TEST(QuantMinmax, ConstantGroup) {
  const float x[5] = {0.3f, 0.3f, 0.3f, 0.3f, 0.3f};
  for (int bits : kBits) {
    std::uint8_t packed[8] = {0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF};
    std::uint16_t scale = 1, zero = 0;
    kvc::detail::quantize_rows_grouped(x, 1, 5, 32, bits, packed, &scale, &zero);
    EXPECT_EQ(scale, 0u);
    EXPECT_EQ(zero, float_to_half_scalar(0.3f));
    for (std::size_t i = 0; i < packed_bytes(5, bits); ++i) EXPECT_EQ(packed[i], 0u);
    float y[5];
    kvc::detail::dequantize_rows_grouped(packed, 1, 5, 32, bits, &scale, &zero, y);
    for (float v : y) EXPECT_EQ(v, half_to_float_scalar(float_to_half_scalar(0.3f)));
  }
}

// The parameter rule on random ranges of every magnitude (including ones where f16(min)
// is far from min relative to the range, and the f16 extremes).
TEST(QuantMinmax, ParameterRuleOnRandomRanges) {
  std::mt19937_64 rng(77);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::uniform_int_distribution<int> e(-20, 15);
  for (int bits : kBits) {
    for (int t = 0; t < 4000; ++t) {
      const float a = std::ldexp(u(rng), e(rng));
      const float b = a + std::ldexp(std::fabs(u(rng)), e(rng));
      const float lo = a < b ? a : b, hi = a < b ? b : a;
      if (std::fabs(lo) > 65504.0f || std::fabs(hi) > 65504.0f) continue;
      expect_params(lo, hi, bits, kvc::detail::minmax_from_range(lo, hi, bits));
    }
    expect_params(-65504.0f, 65504.0f, bits, kvc::detail::minmax_from_range(-65504.0f, 65504.0f, bits));
    // f16(1000.1) = 1000 lies below the range by more than a step of s makes up.
    expect_params(1000.1f, 1000.2f, bits, kvc::detail::minmax_from_range(1000.1f, 1000.2f, bits));
    expect_params(1000.3f, 1000.4f, bits, kvc::detail::minmax_from_range(1000.3f, 1000.4f, bits));
    expect_params(0.0f, 1e-9f, bits, kvc::detail::minmax_from_range(0.0f, 1e-9f, bits));
  }
}

// Per-token groups, d = 100 with group 24 (groups of 24, 24, 24, 24, 4) and group 32:
// each group's parameters follow the rule over exactly its channels, every code is
// Q(x) of its group, and x~ = z + s * code within s / 2 of x (KIVI Sec. 3).
TEST(QuantGrouped, PartialGroupsMatchDefinition) {
  const int rows = 5, d = 100;
  const std::vector<float> x = gaussian(static_cast<std::size_t>(rows) * d, 3, 2.0f);
  for (int group : {24, 32, 100, 128}) {
    for (int bits : kBits) {
      const int groups = kvc::detail::group_count(d, group);
      ASSERT_EQ(groups, (d + group - 1) / group);
      const std::size_t rb = packed_bytes(d, bits);
      std::vector<std::uint8_t> packed(rows * rb);
      std::vector<std::uint16_t> scale(static_cast<std::size_t>(rows) * groups), zero(scale.size());
      kvc::detail::quantize_rows_grouped(x.data(), rows, d, group, bits, packed.data(), scale.data(), zero.data());
      std::vector<float> y(x.size());
      kvc::detail::dequantize_rows_grouped(packed.data(), rows, d, group, bits, scale.data(), zero.data(), y.data());
      for (int r = 0; r < rows; ++r) {
        std::vector<std::uint8_t> codes(d);
        kvc::detail::unpack_codes(packed.data() + r * rb, d, bits, codes.data());
        for (int g = 0; g < groups; ++g) {
          const int c0 = g * group, c1 = std::min(d, c0 + group);
          float lo = x[r * d + c0], hi = lo;
          for (int c = c0; c < c1; ++c) lo = std::min(lo, x[r * d + c]), hi = std::max(hi, x[r * d + c]);
          const std::uint16_t s = scale[r * groups + g], z = zero[r * groups + g];
          expect_params(lo, hi, bits, minmax{s, z});
          const float sf = half_to_float_scalar(s), zf = half_to_float_scalar(z);
          for (int c = c0; c < c1; ++c) {
            const float v = x[r * d + c];
            ASSERT_EQ(codes[c], reference_code(v, s, z, bits)) << r << " " << c;
            const double below = v < zf ? static_cast<double>(zf) - v : 0.0;  // f16(min) above min
            EXPECT_LE(std::fabs(static_cast<double>(y[r * d + c]) - v), 0.5 * sf * (1 + 1e-5) + below + 1e-6);
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------ error on Gaussian data

// Relative Frobenius error ||X~ - X||_F / ||X||_F of per-token grouped quantization of
// Gaussian X [256][128]. A uniform quantizer's error is about s / sqrt(12) with
// s = range / (2^B - 1); the bounds are that closed form with margin.
TEST(QuantError, GaussianPerTokenGroups) {
  const int rows = 256, d = 128;
  const std::vector<float> x = gaussian(static_cast<std::size_t>(rows) * d, 2024);
  const double bound32[] = {0.45, 0.20, 0.09, 0.006};
  const double bound128[] = {0.55, 0.24, 0.11, 0.0075};
  for (int i = 0; i < 4; ++i) {
    const int bits = kBits[i];
    const double e32 = rel_frobenius(grouped_round_trip(x, rows, d, 32, bits), x);
    const double e128 = rel_frobenius(grouped_round_trip(x, rows, d, 128, bits), x);
    std::printf("  per-token %d-bit: group 32 rel. Frobenius error %.4f, group 128 %.4f\n", bits, e32, e128);
    RecordProperty("rel_err_g32_b" + std::to_string(bits), std::to_string(e32));
    RecordProperty("rel_err_g128_b" + std::to_string(bits), std::to_string(e128));
    EXPECT_LE(e32, bound32[i]) << bits;
    EXPECT_LE(e128, bound128[i]) << bits;
    EXPECT_LT(e32, e128) << bits;  // smaller groups have smaller ranges
  }
}

// KIVI Sec. 3.1: keys have a few fixed outlier channels, so grouping along tokens within a
// channel (per-channel) keeps each channel's own range, where a per-token group that holds
// an outlier channel spends its levels on it. At 2 bits per-channel over a block of 64
// tokens is at least 2x better than per-token groups of 32 and 128 on persistent outliers.
// With zero-mean outliers (N(0, 1) times 20) the outlier channels' own noise dominates the
// Frobenius norm and per-channel only beats the full-row group; those figures are printed
// and per-channel must still beat group 128.
TEST(QuantError, OutlierChannelsPerChannelBeatsPerToken) {
  const int rows = 64, d = 128, bits = 2;
  for (bool persistent : {true, false}) {
    const std::vector<float> x = outlier_keys(rows, d, 99, persistent);
    const double ch = rel_frobenius(per_channel_round_trip(x, rows, d, bits), x);
    const double t32 = rel_frobenius(grouped_round_trip(x, rows, d, 32, bits), x);
    const double t128 = rel_frobenius(grouped_round_trip(x, rows, d, 128, bits), x);
    const char* kind = persistent ? "persistent" : "zero_mean";
    std::printf("  %s outlier keys 2-bit: per-channel %.4f, per-token group 32 %.4f, group 128 %.4f\n", kind, ch, t32,
                t128);
    RecordProperty(std::string(kind) + "_per_channel", std::to_string(ch));
    RecordProperty(std::string(kind) + "_per_token_g32", std::to_string(t32));
    RecordProperty(std::string(kind) + "_per_token_g128", std::to_string(t128));
    if (persistent) {
      EXPECT_LE(2.0 * ch, t32);
      EXPECT_LE(2.0 * ch, t128);
    } else {
      EXPECT_LT(ch, t128);
    }
  }
}

// Incoherence processing (QuaRot, Ashkboos et al. 2024): rotating each token by H_d / sqrt(d) spreads the outlier
// channels' energy over all channels, so per-token quantization of the rotated keys (error measured after rotating
// back) beats quantizing them as they are.
TEST(QuantError, OutlierChannelsHadamardBeatsNoRotation) {
  const int rows = 64, d = 128;
  for (bool persistent : {true, false}) {
    const std::vector<float> x = outlier_keys(rows, d, 99, persistent);
    for (int group : {32, 128}) {
      for (int bits : {2, 3, 4}) {
        const double plain = rel_frobenius(grouped_round_trip(x, rows, d, group, bits), x);
        std::vector<float> rx = x;
        kvc::detail::hadamard_rotate_rows(rx.data(), rows, d);
        std::vector<float> y = grouped_round_trip(rx, rows, d, group, bits);
        kvc::detail::hadamard_rotate_rows(y.data(), rows, d);
        const double rotated = rel_frobenius(y, x);
        std::printf("  %s outlier keys %d-bit group %d: no rotation %.4f, Hadamard %.4f\n",
                    persistent ? "persistent" : "zero-mean", bits, group, plain, rotated);
        EXPECT_LT(rotated, plain) << bits << " " << group << " " << persistent;
      }
    }
  }
}

// ------------------------------------------------------------------ per-channel

// Per-channel (KIVI keys): channel c's parameters follow the rule over its column, codes
// are Q(x) of the column's parameters, odd d and a partial block of tokens included.
TEST(QuantPerChannel, MatchesDefinition) {
  for (int d : {128, 72, 5}) {
    for (int rows : {64, 17, 1}) {
      const std::vector<float> x = gaussian(static_cast<std::size_t>(rows) * d, 1000 + d + rows, 3.0f);
      for (int bits : kBits) {
        const std::size_t rb = packed_bytes(d, bits);
        std::vector<std::uint8_t> packed(rows * rb);
        std::vector<std::uint16_t> scale(d), zero(d);
        kvc::detail::quantize_rows_per_channel(x.data(), rows, d, bits, packed.data(), scale.data(), zero.data());
        std::vector<float> y(x.size());
        kvc::detail::dequantize_rows_per_channel(packed.data(), rows, d, bits, scale.data(), zero.data(), y.data());
        for (int c = 0; c < d; ++c) {
          float lo = x[c], hi = x[c];
          for (int r = 0; r < rows; ++r) lo = std::min(lo, x[r * d + c]), hi = std::max(hi, x[r * d + c]);
          expect_params(lo, hi, bits, minmax{scale[c], zero[c]});
        }
        for (int r = 0; r < rows; ++r) {
          std::vector<std::uint8_t> codes(d);
          kvc::detail::unpack_codes(packed.data() + r * rb, d, bits, codes.data());
          for (int c = 0; c < d; ++c) {
            ASSERT_EQ(codes[c], reference_code(x[r * d + c], scale[c], zero[c], bits));
            const float want = half_to_float_scalar(zero[c]) + half_to_float_scalar(scale[c]) * codes[c];
            ASSERT_EQ(y[r * d + c], want);
          }
        }
        // A range of rows decodes from the packed pointer advanced by first rows.
        if (rows > 3) {
          std::vector<float> part(3 * static_cast<std::size_t>(d));
          kvc::detail::dequantize_rows_per_channel(packed.data() + 2 * rb, 3, d, bits, scale.data(), zero.data(),
                                                   part.data());
          for (int i = 0; i < 3 * d; ++i) ASSERT_EQ(part[i], y[2 * d + i]);
        }
      }
    }
  }
}

// Re-encoding rows [first, first + n) against a block's fixed per-channel parameters
// reproduces the block's bytes bit for bit, from the original values and from the
// dequantized ones, and leaves the other rows alone.
TEST(QuantPerChannel, ReencodeAgainstFixedParametersIsExact) {
  const int rows = 64, d = 128;
  const std::vector<float> x = outlier_keys(rows, d, 5);
  for (int bits : kBits) {
    const std::size_t rb = packed_bytes(d, bits);
    std::vector<std::uint8_t> packed(rows * rb);
    std::vector<std::uint16_t> scale(d), zero(d);
    kvc::detail::quantize_rows_per_channel(x.data(), rows, d, bits, packed.data(), scale.data(), zero.data());
    std::vector<float> y(x.size());
    kvc::detail::dequantize_rows_per_channel(packed.data(), rows, d, bits, scale.data(), zero.data(), y.data());
    for (const auto& range : {std::pair<int, int>{0, 64}, {0, 1}, {13, 20}, {63, 1}}) {
      const int first = range.first, n = range.second;
      for (const std::vector<float>* src : {&x, static_cast<const std::vector<float>*>(&y)}) {
        std::vector<std::uint8_t> again(rows * rb, 0xCC);
        kvc::detail::quantize_rows_per_channel_fixed(src->data() + first * d, first, n, d, bits, scale.data(),
                                                     zero.data(), again.data());
        for (std::size_t i = 0; i < again.size(); ++i) {
          const bool inside = i >= first * rb && i < (first + n) * rb;
          ASSERT_EQ(again[i], inside ? packed[i] : 0xCC) << "bits " << bits << " byte " << i;
        }
      }
    }
    // Values beyond a channel's range clamp to the end codes.
    std::vector<float> wide(d);
    for (int c = 0; c < d; ++c) wide[c] = (c & 1) ? 1e4f : -1e4f;
    std::vector<std::uint8_t> row(rb);
    kvc::detail::quantize_rows_per_channel_fixed(wide.data(), 0, 1, d, bits, scale.data(), zero.data(), row.data());
    std::vector<std::uint8_t> codes(d);
    kvc::detail::unpack_codes(row.data(), d, bits, codes.data());
    for (int c = 0; c < d; ++c) EXPECT_EQ(codes[c], (c & 1) ? (1 << bits) - 1 : 0) << c;
  }
}

// ------------------------------------------------------------------ int8

// Symmetric int8 per row: s = max|x| / 127, |x~ - x| <= s / 2 (plus the float rounding of
// x / s and s * code: 127 s 2^-23 at most), codes in [-127, 127], the largest magnitude at
// +-127, and negating x negates every code with the same scale.
TEST(QuantInt8, BoundSignSymmetryAndZeroRows) {
  const int rows = 40, d = 96;
  std::vector<float> x = gaussian(static_cast<std::size_t>(rows) * d, 8);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < d; ++c) x[r * d + c] *= std::ldexp(1.0f, r % 20 - 10);
  for (int c = 0; c < d; ++c) x[7 * d + c] = 0.0f;  // a zero row
  for (int c = 0; c < d; ++c) x[9 * d + c] = c == 50 ? -3.0f : 0.0f;
  std::vector<std::int8_t> codes(x.size());
  std::vector<float> scales(rows), y(x.size());
  kvc::detail::quantize_rows_int8(x.data(), rows, d, codes.data(), scales.data());
  kvc::detail::dequantize_rows_int8(codes.data(), scales.data(), rows, d, y.data());
  for (int r = 0; r < rows; ++r) {
    float m = 0.0f;
    int arg = 0;
    for (int c = 0; c < d; ++c)
      if (std::fabs(x[r * d + c]) > m) m = std::fabs(x[r * d + c]), arg = c;
    EXPECT_EQ(scales[r], m / 127.0f) << r;
    const double s = scales[r];
    for (int c = 0; c < d; ++c) {
      ASSERT_GE(codes[r * d + c], -127);
      const double err = std::fabs(static_cast<double>(y[r * d + c]) - x[r * d + c]);
      ASSERT_LE(err, 0.5 * s + 127.0 * s * 0x1p-23) << r << " " << c;
    }
    if (m > 0.0f) {
      EXPECT_EQ(std::abs(static_cast<int>(codes[r * d + arg])), 127) << r;
    }
  }
  for (int c = 0; c < d; ++c) {
    EXPECT_EQ(codes[7 * d + c], 0);
    EXPECT_EQ(y[7 * d + c], 0.0f);
    EXPECT_EQ(codes[9 * d + c], c == 50 ? -127 : 0);
    EXPECT_EQ(y[9 * d + c], c == 50 ? -3.0f : 0.0f);
  }
  EXPECT_EQ(scales[7], 0.0f);

  std::vector<float> neg(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) neg[i] = -x[i];
  std::vector<std::int8_t> ncodes(x.size());
  std::vector<float> nscales(rows);
  kvc::detail::quantize_rows_int8(neg.data(), rows, d, ncodes.data(), nscales.data());
  EXPECT_EQ(nscales, scales);
  for (std::size_t i = 0; i < x.size(); ++i) ASSERT_EQ(ncodes[i], -codes[i]) << i;
}

// int8 rounds to nearest: x = {127, 63.5, 62.5, -0.5, 1.5} has s = 1 and codes
// {127, 64, 62, 0, 2} (ties to even).
TEST(QuantInt8, GoldenRow) {
  const float x[5] = {127.0f, 63.5f, 62.5f, -0.5f, 1.5f};
  std::int8_t codes[5];
  float scale = 0.0f;
  kvc::detail::quantize_rows_int8(x, 1, 5, codes, &scale);
  EXPECT_EQ(scale, 1.0f);
  const std::int8_t want[5] = {127, 64, 62, 0, 2};
  for (int i = 0; i < 5; ++i) EXPECT_EQ(codes[i], want[i]) << i;
}

// ------------------------------------------------------------------ Hadamard

// H_d by the Sylvester recursion H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]].
std::vector<int> sylvester(int d) {
  std::vector<int> h{1};
  for (int n = 1; n < d; n *= 2) {
    std::vector<int> next(static_cast<std::size_t>(4) * n * n);
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) {
        const int v = h[i * n + j];
        next[i * 2 * n + j] = v;
        next[i * 2 * n + j + n] = v;
        next[(i + n) * 2 * n + j] = v;
        next[(i + n) * 2 * n + j + n] = -v;
      }
    h.swap(next);
  }
  return h;
}

double norm2(const std::vector<float>& v) {
  double s = 0.0;
  for (float x : v) s += static_cast<double>(x) * x;
  return std::sqrt(s);
}

double dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

// The butterfly equals H_d x / sqrt(d) with the explicit Sylvester matrix, d = 1..128.
TEST(QuantHadamard, MatchesSylvesterMatrix) {
  for (int d = 1; d <= 128; d *= 2) {
    ASSERT_TRUE(kvc::detail::hadamard_supported(d));
    const std::vector<int> h = sylvester(d);
    std::vector<float> x = gaussian(d, 40 + d);
    std::vector<float> y = x;
    kvc::detail::hadamard_rotate(y.data(), d);
    const double scale = 1e-6 * norm2(x);
    for (int i = 0; i < d; ++i) {
      double want = 0.0;
      for (int j = 0; j < d; ++j) want += h[i * d + j] * static_cast<double>(x[j]);
      want /= std::sqrt(static_cast<double>(d));
      ASSERT_NEAR(y[i], want, scale) << "d " << d << " row " << i;
    }
  }
}

// H_d / sqrt(d) is symmetric and orthonormal: applied twice it is the identity, it keeps
// norms and the dot products q . k that attention scores are made of.
TEST(QuantHadamard, OrthonormalAndInvolutive) {
  for (int d = 2; d <= 256; d *= 2) {
    const std::vector<float> q = gaussian(d, 7 * d), k = gaussian(d, 7 * d + 1, 4.0f);
    std::vector<float> hq = q, hk = k;
    kvc::detail::hadamard_rotate(hq.data(), d);
    kvc::detail::hadamard_rotate(hk.data(), d);
    EXPECT_NEAR(norm2(hq), norm2(q), 1e-6 * norm2(q)) << d;
    EXPECT_NEAR(dot(hq, hk), dot(q, k), 1e-6 * norm2(q) * norm2(k)) << d;
    std::vector<float> back = hq;
    kvc::detail::hadamard_rotate(back.data(), d);
    double err = 0.0;
    for (int i = 0; i < d; ++i) err += (static_cast<double>(back[i]) - q[i]) * (static_cast<double>(back[i]) - q[i]);
    EXPECT_LE(std::sqrt(err), 1e-6 * norm2(q)) << d;
  }
  // The rows version rotates each row independently.
  const int rows = 3, d = 64;
  std::vector<float> x = gaussian(static_cast<std::size_t>(rows) * d, 12), one = x;
  kvc::detail::hadamard_rotate_rows(x.data(), rows, d);
  for (int r = 0; r < rows; ++r) kvc::detail::hadamard_rotate(one.data() + r * d, d);
  EXPECT_EQ(x, one);
}

// Only powers of two are supported; anything else is left unchanged.
TEST(QuantHadamard, SupportedSizes) {
  static_assert(kvc::detail::hadamard_supported(128), "");
  for (int d : {1, 2, 4, 64, 128, 256}) EXPECT_TRUE(kvc::detail::hadamard_supported(d)) << d;
  for (int d : {0, -4, 3, 6, 96, 100, 129}) EXPECT_FALSE(kvc::detail::hadamard_supported(d)) << d;
  std::vector<float> x = gaussian(96, 1), y = x;
  kvc::detail::hadamard_rotate(y.data(), 96);
  EXPECT_EQ(x, y);
}

}  // namespace
