// The GEAR residual correction (kvc/codecs/detail/gear.hpp; Kang et al. 2024, "GEAR: An
// Efficient KV Cache Compression Recipe for Near-Lossless Generative Inference of LLM",
// Sec. 3 and Algorithm 1): sizes and the stored layout against hand-worked bytes, the sparse
// selection against a brute-force sort, the low-rank part against the optimal rank-r error
// from a Jacobi eigen-decomposition written here, the error of a min-max quantizer (written
// here from its definition) with and without the correction, row-range decoding and
// determinism.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include <kvc/codecs/detail/gear.hpp>

#include "gear_helpers.hpp"

namespace {

using gear_test::fit;
using gear_test::frob_diff;
using kvc::detail::float_to_half_scalar;
using kvc::detail::gear_apply;
using kvc::detail::gear_apply_rows;
using kvc::detail::gear_bytes;
using kvc::detail::gear_fit;
using kvc::detail::gear_index_bytes;
using kvc::detail::gear_outliers;
using kvc::detail::gear_params;
using kvc::detail::gear_scratch_floats;
using kvc::detail::half_to_float_scalar;

gear_params make_params(float s, int rank, int iters) {
  gear_params p;
  p.outlier_fraction = s;
  p.rank = rank;
  p.iters = iters;
  return p;
}

// Standard normal from the raw 64-bit Mersenne Twister (fully specified by the standard,
// unlike std::normal_distribution), by Box-Muller.
struct gauss_source {
  std::mt19937_64 rng;
  explicit gauss_source(std::uint64_t seed) : rng(seed) {}
  double uniform() { return (static_cast<double>(rng() >> 11) + 0.5) * 0x1.0p-53; }  // (0, 1)
  float operator()() {
    const double u = uniform(), v = uniform();
    return static_cast<float>(std::sqrt(-2.0 * std::log(u)) * std::cos(6.283185307179586 * v));
  }
};

float f16_round(float v) { return half_to_float_scalar(float_to_half_scalar(v)); }

// Asymmetric min-max quantization, then dequantization, of each token row in groups of 32
// along d (the last group may be shorter): z = min, s = (max - min) / (2^B - 1), both f16,
// s rounded up to the next f16 while z + (2^B - 1) s < max; code = clamp(round((x - z)/s)).
std::vector<float> quant_dequant(const std::vector<float>& x, int n, int d, int bits) {
  std::vector<float> out(x.size());
  const int levels = (1 << bits) - 1;
  for (int i = 0; i < n; ++i)
    for (int g0 = 0; g0 < d; g0 += 32) {
      const int len = std::min(32, d - g0);
      const float* v = x.data() + static_cast<std::size_t>(i) * d + g0;
      float* o = out.data() + static_cast<std::size_t>(i) * d + g0;
      float mn = v[0], mx = v[0];
      for (int c = 1; c < len; ++c) mn = std::min(mn, v[c]), mx = std::max(mx, v[c]);
      const float z = f16_round(mn);
      float s = 0.0f;
      if (mx != mn) {
        std::uint16_t hs = float_to_half_scalar((mx - mn) / static_cast<float>(levels));
        s = half_to_float_scalar(hs);
        while (z + static_cast<float>(levels) * s < mx) s = half_to_float_scalar(++hs);
      }
      for (int c = 0; c < len; ++c) {
        float code = s > 0.0f ? std::nearbyint((v[c] - z) / s) : 0.0f;
        code = std::min(static_cast<float>(levels), std::max(0.0f, code));
        o[c] = z + s * code;
      }
    }
  return out;
}

double frob(const std::vector<float>& a) { return frob_diff(a, std::vector<float>(a.size(), 0.0f)); }

// The correction alone: S + A B^T as floats [n][d].
std::vector<float> correction(const std::vector<float>& e, int n, int d, const gear_params& p) {
  const std::vector<std::byte> bytes = fit(e, n, d, p);
  std::vector<float> x(e.size(), 0.0f);
  gear_apply(bytes.data(), n, d, p, x.data());
  return x;
}

// X~ = D^ + S + A B^T for a block and its base approximation.
std::vector<float> corrected(const std::vector<float>& x, const std::vector<float>& base, int n, int d,
                             const gear_params& p) {
  std::vector<float> e(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) e[i] = x[i] - base[i];
  const std::vector<std::byte> bytes = fit(e, n, d, p);
  std::vector<float> y = base;
  gear_apply(bytes.data(), n, d, p, y.data());
  return y;
}

std::vector<float> gaussian(int n, int d, std::uint64_t seed, float scale = 1.0f) {
  gauss_source g(seed);
  std::vector<float> x(static_cast<std::size_t>(n) * d);
  for (float& v : x) v = scale * g();
  return x;
}

// Sum_{j < r} u_j v_j^T with Gaussian u [n], v [d], component j scaled by scale^j.
std::vector<float> low_rank(int n, int d, int r, std::uint64_t seed, double scale = 1.0) {
  gauss_source g(seed);
  std::vector<double> acc(static_cast<std::size_t>(n) * d, 0.0);
  std::vector<double> u(n), v(d);
  double w = 1.0;
  for (int j = 0; j < r; ++j, w *= scale) {
    for (double& t : u) t = g();
    for (double& t : v) t = g();
    for (int i = 0; i < n; ++i)
      for (int c = 0; c < d; ++c) acc[static_cast<std::size_t>(i) * d + c] += w * u[i] * v[c];
  }
  return std::vector<float>(acc.begin(), acc.end());
}

// Eigenvalues of the symmetric m x m matrix a (row-major, destroyed) by cyclic Jacobi
// rotations, in descending order.
std::vector<double> jacobi_eigenvalues(std::vector<double> a, int m) {
  auto at = [&](int i, int j) -> double& { return a[static_cast<std::size_t>(i) * m + j]; };
  for (int sweep = 0; sweep < 100; ++sweep) {
    double off = 0.0, diag = 0.0;
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < m; ++j) (i == j ? diag : off) += at(i, j) * at(i, j);
    if (off <= 1e-26 * diag) break;
    for (int p = 0; p < m - 1; ++p)
      for (int q = p + 1; q < m; ++q) {
        const double apq = at(p, q);
        if (apq == 0.0) continue;
        const double theta = (at(q, q) - at(p, p)) / (2.0 * apq);
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1.0));
        const double c = 1.0 / std::sqrt(t * t + 1.0), s = t * c;
        for (int k = 0; k < m; ++k) {  // columns p, q
          const double akp = at(k, p), akq = at(k, q);
          at(k, p) = c * akp - s * akq;
          at(k, q) = s * akp + c * akq;
        }
        for (int k = 0; k < m; ++k) {  // rows p, q
          const double apk = at(p, k), aqk = at(q, k);
          at(p, k) = c * apk - s * aqk;
          at(q, k) = s * apk + c * aqk;
        }
      }
  }
  std::vector<double> ev(m);
  for (int i = 0; i < m; ++i) ev[i] = at(i, i);
  std::sort(ev.begin(), ev.end(), [](double x, double y) { return x > y; });
  return ev;
}

// The optimal rank-r approximation error |E - E_r|_F (Eckart-Young): the square root of the
// sum of the squared singular values past r, from the eigenvalues of E E^T (n <= d).
double optimal_rank_error(const std::vector<float>& e, int n, int d, int r) {
  std::vector<double> g(static_cast<std::size_t>(n) * n, 0.0);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      double acc = 0.0;
      for (int c = 0; c < d; ++c)
        acc += static_cast<double>(e[static_cast<std::size_t>(i) * d + c]) * e[static_cast<std::size_t>(j) * d + c];
      g[static_cast<std::size_t>(i) * n + j] = acc;
    }
  const std::vector<double> ev = jacobi_eigenvalues(g, n);
  double tail = 0.0;
  for (int i = r; i < n; ++i) tail += std::max(0.0, ev[i]);
  return std::sqrt(tail);
}

// Sizes against hand-computed values: k = ceil(s n d), index width, and the byte count
// k (index + 2) + (n + d) r 2 of the stored S (GEAR Sec. 3: sparse part as (index, value))
// and L = A B^T.
TEST(GearSizes, HandComputed) {
  const gear_params def;
  EXPECT_EQ(gear_outliers(64, 128, def), 164u);                  // 0.02 * 8192 = 163.84
  EXPECT_EQ(gear_outliers(10, 1, make_params(0.1f, 2, 3)), 1u);  // 0.1f is a hair above 0.1
  EXPECT_EQ(gear_outliers(8, 8, make_params(0.5f, 2, 3)), 32u);
  EXPECT_EQ(gear_outliers(300, 256, make_params(0.01f, 2, 3)), 768u);
  EXPECT_EQ(gear_outliers(7, 3, make_params(0.05f, 2, 3)), 2u);  // 1.05 -> 2
  EXPECT_EQ(gear_outliers(64, 128, make_params(0.0f, 2, 3)), 0u);
  EXPECT_EQ(gear_outliers(64, 128, make_params(-0.5f, 2, 3)), 0u);
  EXPECT_EQ(gear_outliers(4, 5, make_params(1.0f, 2, 3)), 20u);
  EXPECT_EQ(gear_outliers(4, 5, make_params(3.0f, 2, 3)), 20u);

  EXPECT_EQ(gear_index_bytes(256, 256), 2u);  // 65536 entries: indices up to 65535
  EXPECT_EQ(gear_index_bytes(1, 65536), 2u);
  EXPECT_EQ(gear_index_bytes(1, 65537), 4u);
  EXPECT_EQ(gear_index_bytes(257, 256), 4u);

  EXPECT_EQ(gear_bytes(64, 128, def), 164u * 4 + 192u * 2 * 2);                        // 1424
  EXPECT_EQ(gear_bytes(300, 256, make_params(0.01f, 4, 3)), 768u * 6 + 556u * 4 * 2);  // 9056
  EXPECT_EQ(gear_bytes(64, 128, make_params(0.0f, 2, 3)), 192u * 4);
  EXPECT_EQ(gear_bytes(64, 128, make_params(0.02f, 0, 3)), 164u * 4);
  EXPECT_EQ(gear_bytes(64, 128, make_params(0.0f, 0, 3)), 0u);

  EXPECT_EQ(gear_scratch_floats(64, 128, def), 8192u + 192u * 2);
  EXPECT_EQ(gear_scratch_floats(64, 128, make_params(0.0f, 0, 3)), 0u);
}

// The stored layout [indices][f16 values][A][B^T] on a hand-worked block with rank 0:
// k = ceil(0.5 * 6) = 3 entries of largest |E| (GEAR Sec. 3, the sparse part S), the tie
// |2| between flat indices 2 and 4 going to the lower index, indices ascending.
TEST(GearLayout, HandWorkedSparseBytes) {
  const std::vector<float> e = {3.0f, -1.0f, 2.0f, -3.0f, 2.0f, 0.5f};  // [2][3]
  const gear_params p = make_params(0.5f, 0, 3);
  ASSERT_EQ(gear_bytes(2, 3, p), 12u);
  const std::vector<std::byte> out = fit(e, 2, 3, p);
  const unsigned char expected[12] = {0, 0, 2, 0, 3, 0, 0x00, 0x42, 0x00, 0x40, 0x00, 0xC2};
  for (int i = 0; i < 12; ++i) EXPECT_EQ(static_cast<unsigned>(out[i]), expected[i]) << "byte " << i;

  std::vector<float> x(6, 1.0f);
  gear_apply(out.data(), 2, 3, p, x.data());
  const std::vector<float> want = {4.0f, 1.0f, 3.0f, -2.0f, 1.0f, 1.0f};
  EXPECT_EQ(x, want);
  std::vector<float> row1(3, 0.0f);
  gear_apply_rows(out.data(), 2, 3, p, 1, 1, row1.data());
  EXPECT_EQ(row1, (std::vector<float>{-3.0f, 0.0f, 0.0f}));
}

struct shape {
  int n, d;
  gear_params p;
};

std::vector<shape> layout_shapes() {
  return {{64, 128, gear_params{}},           {16, 64, make_params(0.0f, 2, 3)}, {16, 64, make_params(0.05f, 0, 3)},
          {1, 1, make_params(0.02f, 2, 3)},   {3, 5, make_params(0.3f, 4, 2)},   {256, 257, make_params(0.01f, 2, 1)},
          {64, 128, make_params(0.0f, 0, 3)}, {7, 33, make_params(0.1f, 3, 0)},  {32, 96, make_params(0.02f, 8, 5)},
          {128, 64, make_params(1.0f, 1, 3)}};
}

// gear_bytes is exactly what gear_fit writes, and gear_scratch_floats what it uses: every
// byte of [0, gear_bytes) is written (two fills give the same bytes) and nothing past it or
// past the scratch is touched. Sizes follow GEAR Sec. 3's storage of S and L = A B^T.
TEST(GearLayout, BytesWrittenExactly) {
  for (const shape& s : layout_shapes()) {
    SCOPED_TRACE(::testing::Message() << "n=" << s.n << " d=" << s.d << " s=" << s.p.outlier_fraction
                                      << " r=" << s.p.rank << " iters=" << s.p.iters);
    const std::vector<float> e = gaussian(s.n, s.d, 1000 + static_cast<std::uint64_t>(s.n) * s.d, 0.1f);
    const std::size_t bytes = gear_bytes(s.n, s.d, s.p), floats = gear_scratch_floats(s.n, s.d, s.p);
    constexpr std::size_t pad = 64;
    std::vector<std::vector<std::byte>> outs;
    for (unsigned char fill : {0x00, 0xA5}) {
      std::vector<std::byte> out(bytes + pad, static_cast<std::byte>(fill));
      std::vector<float> scratch(floats + pad, fill == 0 ? -7.25f : 1e30f);
      gear_fit(e.data(), s.n, s.d, s.p, scratch.data(), out.data());
      for (std::size_t i = bytes; i < bytes + pad; ++i) ASSERT_EQ(static_cast<unsigned>(out[i]), fill) << i;
      for (std::size_t i = floats; i < floats + pad; ++i) ASSERT_EQ(scratch[i], fill == 0 ? -7.25f : 1e30f) << i;
      out.resize(bytes);
      outs.push_back(out);
    }
    EXPECT_EQ(outs[0], outs[1]);
  }
}

// Row-range decoding (needed to decode a few tokens of a page) adds exactly the same floats
// as the whole-block reconstruction X~ = D^ + S + A B^T (GEAR Sec. 3) to every row range.
TEST(GearApplyRows, EqualsWholeBlockRows) {
  struct rcase {
    int n, d;
    gear_params p;
  };
  for (const rcase& rc : {rcase{13, 40, make_params(0.05f, 2, 3)}, rcase{9, 32, make_params(0.2f, 3, 2)},
                          rcase{11, 24, make_params(0.0f, 2, 3)}, rcase{10, 16, make_params(0.1f, 0, 3)},
                          rcase{260, 256, make_params(0.003f, 2, 2)}}) {
    SCOPED_TRACE(::testing::Message() << "n=" << rc.n << " d=" << rc.d);
    const std::vector<float> e = gaussian(rc.n, rc.d, 77 + rc.n, 0.5f);
    const std::vector<float> base = gaussian(rc.n, rc.d, 99 + rc.n);
    const std::vector<std::byte> bytes = fit(e, rc.n, rc.d, rc.p);
    std::vector<float> whole = base;
    gear_apply(bytes.data(), rc.n, rc.d, rc.p, whole.data());
    const int step = rc.n > 64 ? 37 : 1;
    for (int first = 0; first < rc.n; first += step)
      for (int count = 0; first + count <= rc.n; count += (rc.n > 64 ? 29 : 1)) {
        const std::size_t off = static_cast<std::size_t>(first) * rc.d;
        std::vector<float> rows(base.begin() + off, base.begin() + off + static_cast<std::size_t>(count) * rc.d);
        gear_apply_rows(bytes.data(), rc.n, rc.d, rc.p, first, count, rows.data());
        for (std::size_t i = 0; i < rows.size(); ++i)
          ASSERT_EQ(std::memcmp(&rows[i], &whole[off + i], sizeof(float)), 0)
              << "first=" << first << " count=" << count << " i=" << i;
      }
  }
}

// Two fits of the same residual give identical bytes, whatever scratch held before: the
// subspace iteration (GEAR Sec. 3, low-rank part) starts from a fixed vector.
TEST(GearDeterminism, TwoFitsIdenticalBytes) {
  const int n = 64, d = 128;
  const std::vector<float> x = gaussian(n, d, 5);
  const std::vector<float> base = quant_dequant(x, n, d, 2);
  std::vector<float> e(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) e[i] = x[i] - base[i];
  for (const gear_params& p : {gear_params{}, make_params(0.05f, 4, 6)}) {
    const std::size_t floats = gear_scratch_floats(n, d, p);
    std::vector<float> s1(floats, 0.0f), s2(floats);
    gauss_source g(11);
    for (float& v : s2) v = 1e6f * g();
    std::vector<std::byte> o1(gear_bytes(n, d, p)), o2(gear_bytes(n, d, p));
    gear_fit(e.data(), n, d, p, s1.data(), o1.data());
    gear_fit(e.data(), n, d, p, s2.data(), o2.data());
    EXPECT_EQ(o1, o2);
  }
}

// The parsed (index, f16 value) pairs of the stored sparse part.
struct sparse_entry {
  std::uint32_t index;
  std::uint16_t value;
};
std::vector<sparse_entry> parse_sparse(const std::vector<std::byte>& b, int n, int d, const gear_params& p) {
  const std::size_t k = gear_outliers(n, d, p), ib = gear_index_bytes(n, d);
  std::vector<sparse_entry> out(k);
  for (std::size_t e = 0; e < k; ++e) {
    std::uint32_t idx = 0;
    for (std::size_t j = 0; j < ib; ++j) idx |= static_cast<std::uint32_t>(b[e * ib + j]) << (8 * j);
    const std::size_t v = k * ib + 2 * e;
    out[e] = {idx, static_cast<std::uint16_t>(static_cast<unsigned>(b[v]) | (static_cast<unsigned>(b[v + 1]) << 8))};
  }
  return out;
}

// The sparse part alone (rank 0; GEAR Sec. 3, S = the outlier entries): the stored indices
// are the k entries of largest |E| as a brute-force stable sort ranks them (ties to the lower
// index), ascending, with f16(E) values; applying S fixes exactly those entries up to f16
// rounding and leaves every other entry alone. Many tied magnitudes (E on a 1/4 grid, both
// signs) exercise the tie rule; 300 x 256 exercises 32-bit indices.
TEST(GearSparse, MatchesBruteForceSort) {
  struct scase {
    int n, d;
    float s;
    bool grid;
  };
  for (const scase& sc : {scase{24, 40, 0.07f, true}, scase{24, 40, 0.3f, true}, scase{64, 128, 0.02f, false},
                          scase{300, 256, 0.001f, false}, scase{5, 7, 1.0f, true}}) {
    SCOPED_TRACE(::testing::Message() << "n=" << sc.n << " d=" << sc.d << " s=" << sc.s);
    std::vector<float> e = gaussian(sc.n, sc.d, 31 + sc.n, sc.grid ? 2.0f : 0.3f);
    if (sc.grid)
      for (float& v : e) v = std::nearbyint(v * 4.0f) / 4.0f;
    const gear_params p = make_params(sc.s, 0, 3);
    const std::size_t k = gear_outliers(sc.n, sc.d, p);
    ASSERT_GT(k, 0u);

    std::vector<std::uint32_t> order(e.size());
    std::iota(order.begin(), order.end(), 0u);
    std::stable_sort(order.begin(), order.end(),
                     [&](std::uint32_t a, std::uint32_t b) { return std::fabs(e[a]) > std::fabs(e[b]); });
    std::vector<std::uint32_t> want(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(k));
    std::sort(want.begin(), want.end());

    const std::vector<std::byte> bytes = fit(e, sc.n, sc.d, p);
    const std::vector<sparse_entry> got = parse_sparse(bytes, sc.n, sc.d, p);
    ASSERT_EQ(got.size(), k);
    for (std::size_t j = 0; j < k; ++j) {
      ASSERT_EQ(got[j].index, want[j]) << j;
      EXPECT_EQ(got[j].value, float_to_half_scalar(e[want[j]])) << j;
    }

    // S alone on a zero block: f16(E) at the selected entries, 0 elsewhere.
    std::vector<float> s(e.size(), 0.0f);
    gear_apply(bytes.data(), sc.n, sc.d, p, s.data());
    std::vector<char> chosen(e.size(), 0);
    for (std::uint32_t i : want) chosen[i] = 1;
    for (std::size_t i = 0; i < e.size(); ++i) {
      const float expect = chosen[i] ? f16_round(e[i]) : 0.0f;
      ASSERT_EQ(s[i], expect) << i;
      if (chosen[i]) {
        ASSERT_LE(std::fabs(e[i] - s[i]), std::fabs(e[i]) * 0x1.0p-11f) << i;
      }
    }
  }
}

// Applied after a real base quantizer, S fixes the k largest residual entries of X up to f16
// rounding (GEAR Sec. 3) and leaves the others as the base left them.
TEST(GearSparse, FixesLargestResidualsOfQuantizedBlock) {
  const int n = 32, d = 64;
  const std::vector<float> x = gaussian(n, d, 8);
  const std::vector<float> base = quant_dequant(x, n, d, 2);
  const gear_params p = make_params(0.05f, 0, 3);
  const std::vector<float> y = corrected(x, base, n, d, p);
  std::vector<float> err(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) err[i] = std::fabs(x[i] - base[i]);
  std::vector<float> sorted = err;
  std::sort(sorted.begin(), sorted.end(), [](float a, float b) { return a > b; });
  const std::size_t k = gear_outliers(n, d, p);
  const float kth = sorted[k - 1];
  std::size_t fixed = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    if (y[i] != base[i]) {
      ++fixed;
      EXPECT_GE(err[i], kth);
      // |X - (D + f16(E))| <= f16 rounding of E plus one float rounding of the sum.
      EXPECT_LE(std::fabs(x[i] - y[i]), err[i] * 0x1.0p-11f + std::fabs(x[i]) * 0x1.0p-23f) << i;
    } else {
      EXPECT_LE(err[i], kth);
    }
  }
  EXPECT_EQ(fixed, k);
}

// The low-rank part alone (s = 0; GEAR Sec. 3, L = A B^T by power iteration) on an exactly
// rank-r residual is reconstructed to f16 accuracy, also when the requested rank exceeds the
// true rank or min(n, d).
TEST(GearLowRank, ExactLowRankResidual) {
  struct lcase {
    int n, d, true_rank, rank;
  };
  for (const lcase& lc : {lcase{64, 128, 1, 1}, lcase{64, 128, 2, 2}, lcase{64, 128, 3, 3}, lcase{64, 128, 1, 3},
                          lcase{16, 64, 2, 4}, lcase{2, 40, 2, 4}, lcase{128, 64, 2, 2}}) {
    SCOPED_TRACE(::testing::Message() << "n=" << lc.n << " d=" << lc.d << " true rank " << lc.true_rank << " rank "
                                      << lc.rank);
    const std::vector<float> e = low_rank(lc.n, lc.d, lc.true_rank, 500 + lc.n + lc.d, 0.5);
    const std::vector<float> l = correction(e, lc.n, lc.d, make_params(0.0f, lc.rank, 3));
    const double rel = frob_diff(l, e) / frob(e);
    std::printf("[gear] exact rank %d, fitted rank %d, %dx%d: relative error %.2e\n", lc.true_rank, lc.rank, lc.n, lc.d,
                rel);
    EXPECT_LT(rel, 2e-3);
  }
}

// On generic residuals, the rank-r fit is within a few percent of the optimal rank-r error
// (Eckart-Young, from a Jacobi eigen-decomposition of E E^T): GEAR Sec. 3 uses power
// iteration in place of the SVD.
TEST(GearLowRank, NearOptimalOnGenericMatrices) {
  const int n = 64, d = 128;
  struct gcase {
    const char* name;
    std::vector<float> e;
    double slack;
  };
  std::vector<float> decaying = low_rank(n, d, 24, 61, 0.7);
  std::vector<float> spiked = low_rank(n, d, 3, 62, 0.6);
  const std::vector<float> noise = gaussian(n, d, 63, 0.05f);
  for (std::size_t i = 0; i < spiked.size(); ++i) spiked[i] += noise[i];
  // On the Gaussian matrix the top singular values barely stand out, so even a random rank-r
  // subspace is within about 2.5% there: its bound is tighter.
  for (const gcase& gc : {gcase{"gaussian", gaussian(n, d, 60), 1.015}, gcase{"decaying spectrum", decaying, 1.01},
                          gcase{"rank 3 + noise", spiked, 1.01}})
    for (int r : {1, 2, 4}) {
      const double opt = optimal_rank_error(gc.e, n, d, r);
      const double got = frob_diff(correction(gc.e, n, d, make_params(0.0f, r, 3)), gc.e);
      std::printf("[gear] %s, rank %d: error %.4f, optimal %.4f, ratio %.4f\n", gc.name, r, got, opt, got / opt);
      EXPECT_GE(got, opt * 0.999) << gc.name << " rank " << r;  // nothing beats the SVD
      EXPECT_LE(got, opt * gc.slack) << gc.name << " rank " << r;
    }
}

// GEAR's setting (Sec. 3, Fig. 1-2): a block that is low rank (a dominant component and a
// weaker second one) plus small noise plus a few large sparse spikes. Quantized per token in
// groups of 32 at 2 and 4 bits, the residual is mostly low rank plus sparse, and the default
// correction (s = 2%, r = 2) at least halves the relative Frobenius error.
TEST(GearQuality, LowRankPlusOutliersHalvesError) {
  const int n = 64, d = 128;
  gauss_source g(2024);
  std::vector<float> u0(n), u1(n), v0(d), v1(d);
  for (float& t : u0) t = g();
  for (float& t : u1) t = 0.03f * g();
  for (float& t : v0) t = g();
  for (float& t : v1) t = g();
  std::vector<float> x(static_cast<std::size_t>(n) * d);
  for (int i = 0; i < n; ++i)
    for (int c = 0; c < d; ++c) x[static_cast<std::size_t>(i) * d + c] = u0[i] * v0[c] + u1[i] * v1[c] + 0.002f * g();
  x[5 * d + 17] += 20.0f;
  x[30 * d + 70] -= 20.0f;
  x[51 * d + 100] += 20.0f;
  const double norm = frob(x);
  for (int bits : {2, 3, 4, 8}) {
    const std::vector<float> base = quant_dequant(x, n, d, bits);
    const double before = frob_diff(base, x) / norm;
    const double after = frob_diff(corrected(x, base, n, d, gear_params{}), x) / norm;
    std::printf("[gear] low rank + outliers, %d bits: base %.5f, with GEAR %.5f (%.2fx lower)\n", bits, before, after,
                before / after);
    if (bits == 2 || bits == 4) {
      EXPECT_GE(before / after, 2.0) << bits << " bits";
    }
    EXPECT_LT(after, before) << bits << " bits";
  }
}

// On i.i.d. Gaussian blocks (no structure to exploit) the correction never makes the error
// worse: S lowers |E| entry by entry, and each stored low-rank component is a least-squares
// fit of what remains (GEAR Sec. 3).
TEST(GearQuality, GaussianNeverWorse) {
  const int n = 64, d = 128;
  for (std::uint64_t seed : {1u, 2u, 3u}) {
    const std::vector<float> x = gaussian(n, d, seed);
    for (int bits : {2, 3, 4, 8}) {
      const std::vector<float> base = quant_dequant(x, n, d, bits);
      const double before = frob_diff(base, x);
      for (const gear_params& p : {gear_params{}, make_params(0.0f, 2, 3), make_params(0.02f, 0, 3),
                                   make_params(0.05f, 6, 1), make_params(0.02f, 2, 0)}) {
        const double after = frob_diff(corrected(x, base, n, d, p), x);
        if (seed == 1 && p.rank == 2 && p.outlier_fraction == 0.02f && p.iters == 3)
          std::printf("[gear] gaussian, %d bits: relative error base %.5f, with GEAR %.5f\n", bits, before / frob(x),
                      after / frob(x));
        EXPECT_LE(after, before) << "seed " << seed << ", " << bits << " bits, s=" << p.outlier_fraction
                                 << " r=" << p.rank << " iters=" << p.iters;
      }
    }
  }
}

}  // namespace
