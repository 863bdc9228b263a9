// The fused kernels of kvc/codecs/detail/code_kernels.hpp against references written here
// from the definitions: rows are packed by a packer written from the layout (full blocks of
// 32 codes, then a sequential tail), unpacked again code by code, and the sums evaluated in
// double:
//   keys   out[g][t] = sum_c w[g][c] code(t, c),
//   values acc[g][c] += sum_t p[g][t] (s[t][k] code(t, c) + z[t][k]), k = c / group
// (the key and value terms of attention over KIVI-quantised rows, x~ = z + s q; Liu et al.
// 2024, Sec. 3). Both the dispatched kernels (AVX2 + FMA where compiled for it) and the
// portable loops are checked.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

#include <kvc/codecs/detail/code_kernels.hpp>

namespace {

using Rng = std::mt19937_64;

std::size_t packed_size(int count, int bits) { return (static_cast<std::size_t>(count) * bits + 7) / 8; }

// One row of codes in the packed layout: block k of 32 codes in 4B bytes from byte 4Bk,
// then the count % 32 remaining codes at bit offsets i B of the tail.
std::vector<std::uint8_t> pack_row(const std::vector<int>& code, int bits) {
  const int count = static_cast<int>(code.size());
  std::vector<std::uint8_t> out(packed_size(count, bits), 0);
  const int blocks = count / 32;
  for (int k = 0; k < blocks; ++k) {
    std::uint8_t* o = out.data() + 4 * bits * k;
    const int* c = code.data() + 32 * k;
    switch (bits) {
      case 8:
        for (int j = 0; j < 32; ++j) o[j] = static_cast<std::uint8_t>(c[j]);
        break;
      case 4:
        for (int j = 0; j < 16; ++j) o[j] = static_cast<std::uint8_t>(c[j] | c[j + 16] << 4);
        break;
      default:  // 2 and 3: the low two bits as a 2-bit block
        for (int j = 0; j < 8; ++j)
          o[j] =
              static_cast<std::uint8_t>((c[j] & 3) | (c[j + 8] & 3) << 2 | (c[j + 16] & 3) << 4 | (c[j + 24] & 3) << 6);
        if (bits == 3) {
          std::uint32_t word = 0;
          for (int j = 0; j < 32; ++j) word |= static_cast<std::uint32_t>((c[j] >> 2) & 1) << j;
          for (int i = 0; i < 4; ++i) o[8 + i] = static_cast<std::uint8_t>(word >> (8 * i));
        }
        break;
    }
  }
  std::uint8_t* tail = out.data() + 4 * bits * blocks;
  for (int i = 0; i < count % 32; ++i)
    for (int b = 0; b < bits; ++b)
      if ((code[32 * blocks + i] >> b) & 1) {
        const int bit = i * bits + b;
        tail[bit / 8] = static_cast<std::uint8_t>(tail[bit / 8] | 1 << (bit % 8));
      }
  return out;
}

// n rows of random codes, packed at `stride` bytes with the padding filled with junk.
struct code_rows {
  std::vector<std::vector<int>> code;  // [n][d]
  std::vector<std::uint8_t> bytes;     // [n][stride], exactly n * stride bytes
  std::size_t stride;
};

// Rows 3 and 4 of every 8 hold only the largest and only the smallest code.
code_rows make_rows(Rng& rng, int n, int d, int bits, std::size_t pad) {
  code_rows r;
  r.stride = packed_size(d, bits) + pad;
  r.bytes.assign(static_cast<std::size_t>(n) * r.stride, 0xA5);
  const int top = (1 << bits) - 1;
  std::uniform_int_distribution<int> dist(0, top);
  for (int t = 0; t < n; ++t) {
    std::vector<int> c(static_cast<std::size_t>(d));
    for (int& x : c) x = t % 8 == 3 ? top : t % 8 == 4 ? 0 : dist(rng);
    const std::vector<std::uint8_t> packed = pack_row(c, bits);
    std::copy(packed.begin(), packed.end(), r.bytes.begin() + static_cast<std::ptrdiff_t>(t * r.stride));
    r.code.push_back(c);
  }
  return r;
}

std::vector<float> uniform(Rng& rng, std::size_t n, float lo, float hi) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

template <int Bits, int WeightBits = 16>
void dot_kernel(bool portable, const float* w, int nq, const std::uint8_t* rows, std::size_t stride, int n, int d,
                float* out) {
  if (portable)
    kvc::detail::dot_code_rows_portable<Bits>(w, nq, rows, stride, n, d, out);
  else
    kvc::detail::dot_code_rows<Bits, WeightBits>(w, nq, rows, stride, n, d, out);
}

template <int Bits, int WeightBits = 16>
void accumulate_kernel(bool portable, const float* p, int nq, const std::uint8_t* rows, std::size_t stride, int n,
                       int d, int group, const float* s, const float* z, float* acc) {
  if (portable)
    kvc::detail::accumulate_code_rows_portable<Bits>(p, nq, rows, stride, n, d, group, s, z, acc);
  else
    kvc::detail::accumulate_code_rows<Bits, WeightBits>(p, nq, rows, stride, n, d, group, s, z, acc);
}

const int kDims[] = {32, 64, 80, 96, 128, 136, 13, 45, 264};  // the last three: tail only, tail remainder, windows
const int kQueries[] = {1, 2, 3, 4, 5, 8};
const int kRows[] = {1, 7, 64};
const std::size_t kPads[] = {0, 3, 13};  // 0: the last row ends where the buffer ends

// The integer kernels' weight bound L (code_kernels.hpp, "Integer kernels"): d products of
// a B-bit code and |weight| <= L must sum inside int32.
int weight_limit(int d, int bits) {
  const long long lim = 2147483647LL / (static_cast<long long>(d) * ((1 << bits) - 1));
  return lim < 32767 ? static_cast<int>(lim) : 32767;
}

// The bound L a kernel rounds weights to at head_dim d (and value group `group`, 0 for keys):
// 127 where the byte kernels run (WeightBits 8), weight_limit (keys) or 32767 (values) where
// the integer kernels run, 0 where the weights stay float.
template <int Bits, int WeightBits>
int rounding_limit(bool portable, int d, int group) {
  if (portable) return 0;
  if (WeightBits == 8 && kvc::detail::byte_code_kernels<Bits>(d, group)) return 127;
  if (kvc::detail::integer_code_kernels<Bits>(d, group)) return group > 0 ? 32767 : weight_limit(d, Bits);
  return 0;
}

// Keys: every out[g][t] within 1e-5 sum_c |w_c| (code + 1) of the sum in double (float
// rounding of terms of the size of |w| times a code); where the integer or byte kernels run,
// plus their rounding of w to L levels: (max_c |w_c| / (2 L)) sum_c code(t, c).
template <int Bits, int WeightBits = 16>
void check_dot(bool portable, const int* rows_begin, const int* rows_end) {
  Rng rng(1000 + Bits);
  int run = 0;
  for (int d : kDims)
    for (int nq : kQueries)
      for (const int* pn = rows_begin; pn != rows_end; ++pn) {
        const int n = *pn;
        const code_rows r = make_rows(rng, n, d, Bits, kPads[run++ % 3]);
        const std::vector<float> w = uniform(rng, static_cast<std::size_t>(nq) * d, -1.0f, 1.0f);
        std::vector<float> out(static_cast<std::size_t>(nq) * n, -7.0f);
        dot_kernel<Bits, WeightBits>(portable, w.data(), nq, r.bytes.data(), r.stride, n, d, out.data());
        const int L = rounding_limit<Bits, WeightBits>(portable, d, 0);
        for (int g = 0; g < nq; ++g) {
          double wmax = 0.0;
          for (int c = 0; c < d; ++c) wmax = std::max(wmax, std::fabs(double{w[static_cast<std::size_t>(g) * d + c]}));
          for (int t = 0; t < n; ++t) {
            double ref = 0.0, mag = 0.0, codes = 0.0;
            for (int c = 0; c < d; ++c) {
              const double x = static_cast<double>(w[static_cast<std::size_t>(g) * d + c]) * r.code[t][c];
              ref += x;
              mag += std::fabs(w[static_cast<std::size_t>(g) * d + c]) * (r.code[t][c] + 1);
              codes += r.code[t][c];
            }
            const double rounding = L > 0 ? wmax / (2.0 * L) * codes : 0.0;
            ASSERT_NEAR(out[static_cast<std::size_t>(g) * n + t], ref, 1e-5 * mag + rounding)
                << "bits " << Bits << " d " << d << " nq " << nq << " n " << n << " g " << g << " t " << t;
          }
        }
      }
}

// Values: every acc[g][c] within 1e-5 (|acc0| + sum_t |p| (s (code + 1) + |z|)) of the sum in
// double; where the integer or byte kernels run, plus their rounding of the factors p s to L
// levels: per chunk of 64 rows, query row g and group k, (max_t |p_t s_t,k| / (2 L)) sum_t
// code(t, c).
template <int Bits, int WeightBits = 16>
void check_accumulate(bool portable, const int* rows_begin, const int* rows_end) {
  Rng rng(2000 + Bits);
  const int groups[] = {32, 128, 48, 8, 24, 12};  // 48: a partial last group; 8, 24: groups inside a block
  int run = 0;
  for (int d : kDims)
    for (int nq : kQueries)
      for (const int* pn = rows_begin; pn != rows_end; ++pn)
        for (int group : groups) {
          const int n = *pn;
          const int ng = (d + group - 1) / group;
          const code_rows r = make_rows(rng, n, d, Bits, kPads[run++ % 3]);
          const std::size_t params = static_cast<std::size_t>(n) * ng;
          const std::vector<float> s = uniform(rng, params, 0.01f, 1.0f);
          const std::vector<float> z = uniform(rng, params, -1.0f, 1.0f);
          const std::vector<float> p = uniform(rng, static_cast<std::size_t>(nq) * n, 0.0f, 1.0f);
          const std::vector<float> acc0 = uniform(rng, static_cast<std::size_t>(nq) * d, -1.0f, 1.0f);
          std::vector<float> acc = acc0;
          accumulate_kernel<Bits, WeightBits>(portable, p.data(), nq, r.bytes.data(), r.stride, n, d, group, s.data(),
                                              z.data(), acc.data());
          const int L = rounding_limit<Bits, WeightBits>(portable, d, group);
          for (int g = 0; g < nq; ++g)
            for (int c = 0; c < d; ++c) {
              const std::size_t o = static_cast<std::size_t>(g) * d + c;
              double ref = acc0[o], mag = std::fabs(acc0[o]), rounding = 0.0;
              for (int t0 = 0; t0 < n; t0 += 64) {
                double amax = 0.0, codes = 0.0;
                for (int t = t0; t < std::min(n, t0 + 64); ++t) {
                  const std::size_t k = static_cast<std::size_t>(t) * ng + c / group;
                  const double pv = p[static_cast<std::size_t>(g) * n + t];
                  ref += pv * (static_cast<double>(s[k]) * r.code[t][c] + z[k]);
                  mag += std::fabs(pv) * (s[k] * (r.code[t][c] + 1) + std::fabs(z[k]));
                  amax = std::max(amax, std::fabs(pv * s[k]));
                  codes += r.code[t][c];
                }
                if (L > 0) rounding += amax / (2.0 * L) * codes;
              }
              ASSERT_NEAR(acc[o], ref, 1e-5 * mag + rounding) << "bits " << Bits << " d " << d << " nq " << nq << " n "
                                                              << n << " group " << group << " g " << g << " c " << c;
            }
        }
}

// The packing formulas above, checked on literal bytes so that the reference packer is
// itself pinned to the layout.
TEST(CodeKernels, ReferencePackerMatchesLayoutBytes) {
  std::vector<int> c(32);
  for (int j = 0; j < 32; ++j) c[j] = j % 4;
  // B = 2, byte j = c_j | c_{j+8} << 2 | c_{j+16} << 4 | c_{j+24} << 6 with c_{j+8s} = j % 4 for all s.
  EXPECT_EQ(pack_row(c, 2), (std::vector<std::uint8_t>{0x00, 0x55, 0xAA, 0xFF, 0x00, 0x55, 0xAA, 0xFF}));
  for (int j = 0; j < 32; ++j) c[j] = j < 16 ? j : 15 - (j - 16);
  // B = 4, byte j = c_j | c_{j+16} << 4 = j | (15 - j) << 4.
  std::vector<std::uint8_t> want4(16);
  for (int j = 0; j < 16; ++j) want4[j] = static_cast<std::uint8_t>(j | (15 - j) << 4);
  EXPECT_EQ(pack_row(c, 4), want4);
  // B = 3: code 5 = 0b101 everywhere but code 1 = 2 = 0b010: low bits 1 (code 1: 2), so byte 1 is
  // 2 | 1 << 2 | 1 << 4 | 1 << 6 = 0x56; the third-bit word is ~(1 << 1).
  for (int j = 0; j < 32; ++j) c[j] = j == 1 ? 2 : 5;
  EXPECT_EQ(pack_row(c, 3),
            (std::vector<std::uint8_t>{0x55, 0x56, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0xFD, 0xFF, 0xFF, 0xFF}));
  // Tail of three 3-bit codes 7, 0, 5: bits 0-2 set, bits 6 and 8 set -> 0x47, 0x01.
  EXPECT_EQ(pack_row({7, 0, 5}, 3), (std::vector<std::uint8_t>{0x47, 0x01}));
}

// Hand-worked 2-bit row: bytes 1B E4 00 FF 55 AA 27 93 hold (byte j = c_j | c_{j+8} << 2 |
// c_{j+16} << 4 | c_{j+24} << 6) the codes
//   c_0..7 = 3 0 0 3 1 2 3 3, c_8..15 = 2 1 0 3 1 2 1 0, c_16..23 = 1 2 0 3 1 2 2 1, c_24..31 = 0 3 0 3 1 2 0 2.
// With w_c = c: sum c c_c = 62 + 110 + 236 + 304 = 712; with w_c = 1: sum c_c = 15 + 10 + 12 + 11 = 48.
TEST(CodeKernels, HandWorkedTwoBitDot) {
  const std::uint8_t row[8] = {0x1B, 0xE4, 0x00, 0xFF, 0x55, 0xAA, 0x27, 0x93};
  float w[64];
  for (int c = 0; c < 32; ++c) {
    w[c] = static_cast<float>(c);
    w[32 + c] = 1.0f;
  }
  float out[2] = {0.0f, 0.0f};
  kvc::detail::dot_code_rows<2>(w, 2, row, 8, 1, 32, out);
  EXPECT_EQ(out[0], 712.0f);
  EXPECT_EQ(out[1], 48.0f);
  kvc::detail::dot_code_rows_portable<2>(w, 2, row, 8, 1, 32, out);
  EXPECT_EQ(out[0], 712.0f);
  EXPECT_EQ(out[1], 48.0f);
}

// The same row as values, one weight p = 0.5, groups of 16 with (s, z) = (2, -1) and (4, 1):
// acc_c += 0.5 (s c_c + z), i.e. c_c - 0.5 for c < 16 and 2 c_c + 0.5 above. All exact in float.
TEST(CodeKernels, HandWorkedTwoBitAccumulate) {
  const std::uint8_t row[8] = {0x1B, 0xE4, 0x00, 0xFF, 0x55, 0xAA, 0x27, 0x93};
  const float want[32] = {2.5f, -0.5f, -0.5f, 2.5f, 0.5f,  1.5f, 2.5f, 2.5f, 1.5f, 0.5f, -0.5f,
                          2.5f, 0.5f,  1.5f,  0.5f, -0.5f, 2.5f, 4.5f, 0.5f, 6.5f, 2.5f, 4.5f,
                          4.5f, 2.5f,  0.5f,  6.5f, 0.5f,  6.5f, 2.5f, 4.5f, 0.5f, 4.5f};
  const float p = 0.5f, s[2] = {2.0f, 4.0f}, z[2] = {-1.0f, 1.0f};
  for (bool portable : {false, true}) {
    float acc[32] = {};
    accumulate_kernel<2>(portable, &p, 1, row, 8, 1, 32, 16, s, z, acc);
    for (int c = 0; c < 32; ++c) EXPECT_EQ(acc[c], want[c]) << "channel " << c << " portable " << portable;
  }
}

const int* const kRowsEnd = kRows + sizeof kRows / sizeof kRows[0];

// Keys, the q . k~ term of attention over KIVI rows (Sec. 3) without the zero-point term:
// each code width through the dispatched kernel, then all through the portable loops.
TEST(CodeKernels, Dot2BitMatchesReference) { check_dot<2>(false, kRows, kRowsEnd); }
TEST(CodeKernels, Dot3BitMatchesReference) { check_dot<3>(false, kRows, kRowsEnd); }
TEST(CodeKernels, Dot4BitMatchesReference) { check_dot<4>(false, kRows, kRowsEnd); }
TEST(CodeKernels, Dot8BitMatchesReference) { check_dot<8>(false, kRows, kRowsEnd); }
TEST(CodeKernels, PortableDotMatchesReference) {
  check_dot<2>(true, kRows, kRowsEnd);
  check_dot<3>(true, kRows, kRowsEnd);
  check_dot<4>(true, kRows, kRowsEnd);
  check_dot<8>(true, kRows, kRowsEnd);
}

// Values, sum_t p_t v~_t over KIVI rows (Sec. 3) with per-token groups, zero points included:
// each code width through the dispatched kernel, then all through the portable loops.
TEST(CodeKernels, Accumulate2BitMatchesReference) { check_accumulate<2>(false, kRows, kRowsEnd); }
TEST(CodeKernels, Accumulate3BitMatchesReference) { check_accumulate<3>(false, kRows, kRowsEnd); }
TEST(CodeKernels, Accumulate4BitMatchesReference) { check_accumulate<4>(false, kRows, kRowsEnd); }
TEST(CodeKernels, Accumulate8BitMatchesReference) { check_accumulate<8>(false, kRows, kRowsEnd); }
TEST(CodeKernels, PortableAccumulateMatchesReference) {
  check_accumulate<2>(true, kRows, kRowsEnd);
  check_accumulate<3>(true, kRows, kRowsEnd);
  check_accumulate<4>(true, kRows, kRowsEnd);
  check_accumulate<8>(true, kRows, kRowsEnd);
}

// The same with 8-bit weights (codec::weights8): 2- and 4-bit codes take the byte kernels
// where they run, whose rounding the reference allows for (2^-8 of the largest weight per
// code unit); elsewhere the results must equal those of 16-bit weights bit for bit.
TEST(CodeKernels, ByteWeightsMatchReference) {
  const int many[] = {299};
  check_dot<2, 8>(false, kRows, kRowsEnd);
  check_dot<4, 8>(false, kRows, kRowsEnd);
  check_dot<4, 8>(false, many, many + 1);
  check_accumulate<2, 8>(false, kRows, kRowsEnd);
  check_accumulate<4, 8>(false, kRows, kRowsEnd);
  check_accumulate<2, 8>(false, many, many + 1);
}

template <int Bits>
void check_weight_bits_agree_without_byte_kernels() {
  Rng rng(4000 + Bits);
  for (int d : kDims)
    for (int group : {32, 8, 24}) {
      const int n = 70, nq = 4, ng = (d + group - 1) / group;
      const code_rows r = make_rows(rng, n, d, Bits, 3);
      const std::vector<float> w = uniform(rng, static_cast<std::size_t>(nq) * d, -1.0f, 1.0f);
      const std::vector<float> p = uniform(rng, static_cast<std::size_t>(nq) * n, 0.0f, 1.0f);
      const std::vector<float> sc = uniform(rng, static_cast<std::size_t>(n) * ng, 0.01f, 1.0f);
      const std::vector<float> z = uniform(rng, static_cast<std::size_t>(n) * ng, -1.0f, 1.0f);
      std::vector<float> o16(static_cast<std::size_t>(nq) * n), o8 = o16, a16(static_cast<std::size_t>(nq) * d, 0.5f),
                                                                a8 = a16;
      kvc::detail::dot_code_rows<Bits, 16>(w.data(), nq, r.bytes.data(), r.stride, n, d, o16.data());
      kvc::detail::dot_code_rows<Bits, 8>(w.data(), nq, r.bytes.data(), r.stride, n, d, o8.data());
      kvc::detail::accumulate_code_rows<Bits, 16>(p.data(), nq, r.bytes.data(), r.stride, n, d, group, sc.data(),
                                                  z.data(), a16.data());
      kvc::detail::accumulate_code_rows<Bits, 8>(p.data(), nq, r.bytes.data(), r.stride, n, d, group, sc.data(),
                                                 z.data(), a8.data());
      if (!kvc::detail::byte_code_kernels<Bits>(d)) {
        EXPECT_EQ(o8, o16) << "bits " << Bits << " d " << d;
      }
      if (!kvc::detail::byte_code_kernels<Bits>(d, group)) {
        EXPECT_EQ(a8, a16) << "bits " << Bits << " d " << d << " group " << group;
      }
    }
}

TEST(CodeKernels, ByteWeightsElsewhereChangeNothing) {
  check_weight_bits_agree_without_byte_kernels<2>();
  check_weight_bits_agree_without_byte_kernels<3>();
  check_weight_bits_agree_without_byte_kernels<4>();
  check_weight_bits_agree_without_byte_kernels<8>();
}

// More rows than one pass of the kernels takes at a time (they go in chunks of rows), so
// that results cross chunk boundaries; the same references.
TEST(CodeKernels, ManyRowsMatchReference) {
  const int many[] = {299};
  check_dot<2>(false, many, many + 1);
  check_dot<4>(false, many, many + 1);
  check_accumulate<2>(false, many, many + 1);
  check_accumulate<4>(false, many, many + 1);
}

// int8 symmetric rows (x~ = s_t q): out[g][t] = sum_c w[g][c] q[t][c] and
// acc[g][c] += sum_t p[g][t] s_t q[t][c], against double sums.
TEST(CodeKernels, Int8MatchesReference) {
  Rng rng(3000);
  std::uniform_int_distribution<int> dist(-128, 127);
  int run = 0;
  for (bool portable : {false, true})
    for (int d : kDims)
      for (int nq : kQueries)
        for (int n : kRows) {
          const std::size_t stride = static_cast<std::size_t>(d) + kPads[run++ % 3];
          std::vector<std::int8_t> rows(static_cast<std::size_t>(n) * stride, static_cast<std::int8_t>(0x5A));
          for (int t = 0; t < n; ++t)
            for (int c = 0; c < d; ++c) rows[t * stride + c] = static_cast<std::int8_t>(dist(rng));
          const std::vector<float> w = uniform(rng, static_cast<std::size_t>(nq) * d, -1.0f, 1.0f);
          const std::vector<float> p = uniform(rng, static_cast<std::size_t>(nq) * n, 0.0f, 1.0f);
          const std::vector<float> rs = uniform(rng, static_cast<std::size_t>(n), 0.001f, 0.1f);
          const std::vector<float> acc0 = uniform(rng, static_cast<std::size_t>(nq) * d, -1.0f, 1.0f);
          std::vector<float> out(static_cast<std::size_t>(nq) * n), acc = acc0;
          if (portable) {
            kvc::detail::dot_int8_rows_portable(w.data(), nq, rows.data(), stride, n, d, out.data());
            kvc::detail::accumulate_int8_rows_portable(p.data(), nq, rows.data(), stride, n, d, rs.data(), acc.data());
          } else {
            kvc::detail::dot_int8_rows(w.data(), nq, rows.data(), stride, n, d, out.data());
            kvc::detail::accumulate_int8_rows(p.data(), nq, rows.data(), stride, n, d, rs.data(), acc.data());
          }
          for (int g = 0; g < nq; ++g) {
            for (int t = 0; t < n; ++t) {
              double ref = 0.0, mag = 0.0;
              for (int c = 0; c < d; ++c) {
                const double x = static_cast<double>(w[static_cast<std::size_t>(g) * d + c]) * rows[t * stride + c];
                ref += x;
                mag += std::fabs(x);
              }
              ASSERT_NEAR(out[static_cast<std::size_t>(g) * n + t], ref, 1e-5 * mag + 1e-12)
                  << "d " << d << " nq " << nq << " n " << n << " portable " << portable;
            }
            for (int c = 0; c < d; ++c) {
              const std::size_t o = static_cast<std::size_t>(g) * d + c;
              double ref = acc0[o], mag = std::fabs(acc0[o]);
              for (int t = 0; t < n; ++t) {
                const double x =
                    static_cast<double>(p[static_cast<std::size_t>(g) * n + t]) * rs[t] * rows[t * stride + c];
                ref += x;
                mag += std::fabs(x);
              }
              ASSERT_NEAR(acc[o], ref, 1e-5 * mag)
                  << "d " << d << " nq " << nq << " n " << n << " portable " << portable;
            }
          }
        }
}

// n packed rows of d codes, every one 2^bits - 1 (the largest).
std::vector<std::uint8_t> full_scale_rows(int d, int n, int bits) {
  const std::vector<std::uint8_t> r = pack_row(std::vector<int>(static_cast<std::size_t>(d), (1 << bits) - 1), bits);
  std::vector<std::uint8_t> rows;
  for (int t = 0; t < n; ++t) rows.insert(rows.end(), r.begin(), r.end());
  return rows;
}

// No query rows or no code rows: nothing is read or written. No channels: the sums are 0.
// The largest sums the integer kernels form: every code at 2^B - 1 against weights of one
// sign and equal size (each rounds to the bound L, so d (2^B - 1) L is the int32 sum), d = 256
// at 8 bits being the tightest case; values over a whole 64-row chunk. The results are the
// closed forms d (2^B - 1) and 64 (2^B - 1) s p.
TEST(CodeKernels, FullScaleSumsDoNotOverflow) {
  for (int d : {256, 128, 32}) {
    const int n = 64;
    const std::vector<std::uint8_t> rows = full_scale_rows(d, n, 8);
    for (float sign : {1.0f, -1.0f}) {
      std::vector<float> w(static_cast<std::size_t>(d), sign), out(static_cast<std::size_t>(n));
      kvc::detail::dot_code_rows<8>(w.data(), 1, rows.data(), static_cast<std::size_t>(d), n, d, out.data());
      for (int t = 0; t < n; ++t) ASSERT_NEAR(out[static_cast<std::size_t>(t)], sign * 255.0f * d, 1e-6 * 255 * d);
    }
    std::vector<float> p(static_cast<std::size_t>(n), 0.5f), s(static_cast<std::size_t>(n), 2.0f),
        z(static_cast<std::size_t>(n), 0.0f), acc(static_cast<std::size_t>(d), 0.0f);
    kvc::detail::accumulate_code_rows<8>(p.data(), 1, rows.data(), static_cast<std::size_t>(d), n, d, d, s.data(),
                                         z.data(), acc.data());
    for (int c = 0; c < d; ++c) ASSERT_NEAR(acc[static_cast<std::size_t>(c)], 64.0 * 255.0, 1e-6 * 64 * 255);
  }
}

// The same for the byte kernels, whose int16 lanes are the tight case: every 4-bit code at 15
// against weights of one sign and equal size (each rounds to 127), d = 256 (a lane adds eight
// pairs of products, 8 x 2 x 15 x 127 = 30480), and values over a whole 64-row chunk (a lane
// adds eight row pairs before it is widened). The results are the closed forms 15 d and
// 64 x 15 s p.
TEST(CodeKernels, FullScaleByteSumsDoNotOverflow) {
  for (int d : {256, 128, 32}) {
    const int n = 64;
    const std::vector<std::uint8_t> rows = full_scale_rows(d, n, 4);
    const std::size_t stride = packed_size(d, 4);
    for (float sign : {1.0f, -1.0f}) {
      std::vector<float> w(static_cast<std::size_t>(d), sign), out(static_cast<std::size_t>(n));
      kvc::detail::dot_code_rows<4, 8>(w.data(), 1, rows.data(), stride, n, d, out.data());
      for (int t = 0; t < n; ++t) ASSERT_NEAR(out[static_cast<std::size_t>(t)], sign * 15.0f * d, 1e-6 * 15 * d);
    }
    std::vector<float> p(static_cast<std::size_t>(n), 0.5f), s(static_cast<std::size_t>(n), 2.0f),
        z(static_cast<std::size_t>(n), 0.0f), acc(static_cast<std::size_t>(d), 0.0f);
    kvc::detail::accumulate_code_rows<4, 8>(p.data(), 1, rows.data(), stride, n, d, d, s.data(), z.data(), acc.data());
    for (int c = 0; c < d; ++c) ASSERT_NEAR(acc[static_cast<std::size_t>(c)], 64.0 * 15.0, 1e-6 * 64 * 15);
  }
}

TEST(CodeKernels, EmptyCallsWriteNothing) {
  float out[4] = {1.0f, 2.0f, 3.0f, 4.0f};
  float acc[4] = {1.0f, 2.0f, 3.0f, 4.0f};
  const float w[4] = {1.0f, 1.0f, 1.0f, 1.0f};
  kvc::detail::dot_code_rows<4>(w, 1, nullptr, 2, 0, 4, out);
  kvc::detail::dot_code_rows<4>(w, 0, nullptr, 2, 3, 4, out);
  kvc::detail::accumulate_code_rows<4>(w, 1, nullptr, 2, 0, 4, 8, nullptr, nullptr, acc);
  kvc::detail::accumulate_code_rows<4>(w, 0, nullptr, 2, 3, 4, 8, nullptr, nullptr, acc);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(out[i], static_cast<float>(i + 1));
    EXPECT_EQ(acc[i], static_cast<float>(i + 1));
  }
  const std::uint8_t row[1] = {0};
  kvc::detail::dot_code_rows<4>(w, 2, row, 1, 2, 0, out);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(out[i], 0.0f);
}

}  // namespace
