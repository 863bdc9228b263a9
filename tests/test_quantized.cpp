// The quantized page codecs (kvc/codecs/quantized.hpp: KIVI, Liu et al. 2024, Sec. 3-4;
// int8) inside paged_kv_cache: exact page bytes, streaming appends, attention computed on
// the codes against attention over the decoded rows and against the dense float cache,
// eviction moving rows without re-quantizing them, kivi_channel's re-encoding of compacted
// pages against a brute-force oracle, bad input, and codec::weights8 (the same pages, with
// attention on 8-bit weights) through all of it. The quantizer itself (packing,
// parameters, error bounds) is tested in test_quant.cpp, the code kernels in
// test_code_kernels.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <kvc/kvc.hpp>

#include "policy_helpers.hpp"
#include "quantized_helpers.hpp"

namespace {

using kvc::codec::rotation;
using namespace quantized_test;

// Every codec under test, as a (key codec, value codec) pair.
using codec_pairs =
    ::testing::Types<pair<kvc::codec::kivi<2>, kvc::codec::kivi<2>>, pair<kvc::codec::kivi<4>, kvc::codec::kivi<4>>,
                     pair<kvc::codec::kivi<8>, kvc::codec::kivi<8>>, pair<kvc::codec::kivi<2>, kvc::codec::kivi<4>>,
                     pair<kvc::codec::kivi<3, 128, rotation::hadamard>, kvc::codec::kivi<3, 128>>,
                     pair<kvc::codec::int8, kvc::codec::int8>,
                     pair<kvc::codec::kivi_token<2, 32, rotation::hadamard>, kvc::codec::kivi_token<4>>,
                     pair<kvc::codec::weights8<kvc::codec::kivi<2>>, kvc::codec::weights8<kvc::codec::kivi<4>>>,
                     pair<kvc::codec::kivi<2, 32, rotation::none, 3>, kvc::codec::kivi<4>>,
                     pair<kvc::codec::kivi<4, 32, rotation::hadamard, 2>, kvc::codec::kivi<4>>>;

template <class T>
class QuantizedCache : public ::testing::Test {};
TYPED_TEST_SUITE(QuantizedCache, codec_pairs);

// ---------------------------------------------------------------- bytes

// The documented bytes per token per head (quantized.hpp), from the formulas worked by
// hand: kivi_channel<B> 4d (binary16 scale and zero per channel) + P d B / 8 a page,
// kivi_token<B, 32> P d B / 8 + 4 P d / 32, int8 P d + 4 P.
TEST(QuantizedCodecs, PageBytesAreTheDocumentedFormulas) {
  using namespace kvc::codec;
  // head_dim 128, 64 tokens a page: 40, 72, 48, 80 and 132 bytes per token.
  EXPECT_EQ(kivi_channel<2>::page_bytes(64, 128), 64u * 40);
  EXPECT_EQ(kivi_channel<4>::page_bytes(64, 128), 64u * 72);
  EXPECT_EQ(kivi_token<2>::page_bytes(64, 128), 64u * 48);
  EXPECT_EQ(kivi_token<4>::page_bytes(64, 128), 64u * 80);
  EXPECT_EQ(int8::page_bytes(64, 128), 64u * 132);
  // head_dim 64: 20, 36, 24, 40, 68.
  EXPECT_EQ(kivi_channel<2>::page_bytes(64, 64), 64u * 20);
  EXPECT_EQ(kivi_channel<4>::page_bytes(64, 64), 64u * 36);
  EXPECT_EQ(kivi_token<2>::page_bytes(64, 64), 64u * 24);
  EXPECT_EQ(kivi_token<4>::page_bytes(64, 64), 64u * 40);
  EXPECT_EQ(int8::page_bytes(64, 64), 64u * 68);
  // 3 bits, groups of 128, 16 tokens at head_dim 128: 48 code bytes a token.
  EXPECT_EQ(kivi_channel<3>::page_bytes(16, 128), 512u + 16 * 48);
  EXPECT_EQ((kivi_token<3, 128>::page_bytes(16, 128)), 16u * 48 + 16 * 4);
  // Tails: head_dim 80, 2 bits: 20 code bytes a row; channel parameters padded to 8 bytes.
  EXPECT_EQ(kivi_channel<2>::page_bytes(16, 80), align8(320) + 16 * 20);
  EXPECT_EQ(kivi_token<2>::page_bytes(5, 80), align8(5 * 20) + 4 * 5 * 3);
  // Grids G > 1: G grids of 4d bytes and the first rows of grids 1 .. G - 1 (2 bytes each),
  // padded to 8. head_dim 128, 64 tokens: 3 x 512 + 4 = 1540 -> 1544, and 2 x 512 + 2 = 1026
  // -> 1032, before the 2048 code bytes of 2 bits: 56.125 and 48.125 bytes a token.
  EXPECT_EQ((kivi_channel<2, rotation::none, 3>::page_bytes(64, 128)), 1544u + 2048);
  EXPECT_EQ((kivi_channel<2, rotation::none, 2>::page_bytes(64, 128)), 1032u + 2048);
  EXPECT_EQ((kivi_channel<4, rotation::hadamard, 4>::page_bytes(16, 64)), align8(4 * 256 + 6) + 16 * 32);
}

// stats() counts pages at their layout's bytes: the key and value payloads as above, each
// rounded up to 64 bytes, plus positions and log-weights.
TYPED_TEST(QuantizedCache, StatsCountTheLayoutBytes) {
  using K = kvc::detail::key_role_t<typename TypeParam::key>;
  using V = kvc::detail::value_role_t<typename TypeParam::value>;
  using cache_t = kvc::paged_kv_cache<typename TypeParam::key, typename TypeParam::value>;
  const int d = 128, P = 16;
  cache_t cache = policy_test::make_cache<cache_t>(config(d, P));
  const std::size_t sealed = align64(K::page_bytes(P, d)) + align64(V::page_bytes(P, d)) + 2 * align64(4 * P);
  EXPECT_EQ(cache.sealed_page_bytes(), sealed);
  const tokens t(53, d, 5);  // 3 sealed pages and 5 open tokens per stream
  const kvc::seq_id s = cache.create_sequence();
  ASSERT_TRUE(cache.append(s, 0, t.k.data(), t.v.data(), t.pos.data(), t.n).ok());
  const kvc::cache_stats st = cache.stats();
  EXPECT_EQ(st.sealed_pages, 3 * kv_heads);
  EXPECT_EQ(st.open_pages, kv_heads);
  EXPECT_EQ(st.bytes_in_use, 3 * kv_heads * sealed + kv_heads * cache.open_page_bytes());
}

// codec::weights8 is Base's pages: the same tokens give the same page size, bytes in use and
// decoded keys and values, bit for bit (weights8.hpp; only attention differs).
TEST(QuantizedCodecs, Weights8StoresTheBaseCodecsPages) {
  using base_t = kvc::paged_kv_cache<kvc::codec::kivi<2>, kvc::codec::kivi<4>>;
  using w8_t =
      kvc::paged_kv_cache<kvc::codec::weights8<kvc::codec::kivi<2>>, kvc::codec::weights8<kvc::codec::kivi<4>>>;
  const int d = 128, P = 16;
  const tokens t(53, d, 9);
  base_t a = policy_test::make_cache<base_t>(config(d, P));
  w8_t b = policy_test::make_cache<w8_t>(config(d, P));
  const kvc::seq_id sa = a.create_sequence(), sb = b.create_sequence();
  ASSERT_TRUE(a.append(sa, 0, t.k.data(), t.v.data(), t.pos.data(), t.n).ok());
  ASSERT_TRUE(b.append(sb, 0, t.k.data(), t.v.data(), t.pos.data(), t.n).ok());
  EXPECT_EQ(a.sealed_page_bytes(), b.sealed_page_bytes());
  EXPECT_EQ(a.stats().bytes_in_use, b.stats().bytes_in_use);
  EXPECT_STREQ(w8_t::key_codec::name, "weights8<kivi_channel<2>>");
  EXPECT_STREQ(kvc::codec::weights8<kvc::codec::kivi<4>>::name, "weights8<kivi<4>>");
  for (int h = 0; h < kv_heads; ++h) {
    EXPECT_EQ(a.view(sa, 0, h)->keys(), b.view(sb, 0, h)->keys());
    EXPECT_EQ(a.view(sa, 0, h)->values(), b.view(sb, 0, h)->values());
  }
}

// ---------------------------------------------------------------- appending

// The open page stays float and is encoded once, when it fills: appending one token at a
// time leaves exactly the stream that one call leaves (decoded rows equal bit for bit).
TYPED_TEST(QuantizedCache, StreamingAppendsEncodeLikeOneCall) {
  using cache_t = kvc::paged_kv_cache<typename TypeParam::key, typename TypeParam::value>;
  const int d = 64, P = 16;
  const tokens t(70, d, 9);
  cache_t one = policy_test::make_cache<cache_t>(config(d, P)), many = policy_test::make_cache<cache_t>(config(d, P));
  const kvc::seq_id a = one.create_sequence(), b = many.create_sequence();
  ASSERT_TRUE(one.append(a, 0, t.k.data(), t.v.data(), t.pos.data(), t.n).ok());
  for (int i = 0; i < t.n; ++i) {
    const std::size_t off = static_cast<std::size_t>(i) * kv_heads * d;
    ASSERT_TRUE(many.append(b, 0, t.k.data() + off, t.v.data() + off, t.pos.data() + i, 1).ok());
  }
  for (int h = 0; h < kv_heads; ++h) {
    EXPECT_EQ(one.view(a, 0, h)->keys(), many.view(b, 0, h)->keys());
    EXPECT_EQ(one.view(a, 0, h)->values(), many.view(b, 0, h)->values());
  }
}

// ---------------------------------------------------------------- attention

// attend() on the codes equals attention in double over the decoded rows (quantized_helpers.hpp).
TYPED_TEST(QuantizedCache, FusedAttendEqualsAttentionOverDecodedRows) {
  fused_attend_equals_attention_over_decoded_rows<typename TypeParam::key, typename TypeParam::value>();
}

// Against the dense float cache holding the same tokens: the attention-output error of each
// codec stays within the per-element value error bound of its width for Gaussian data
// (test_quant.cpp: 0.45, 0.09, 0.006 at 2, 4, 8 bits in groups of 32) times 1.35 for what the
// key error does to the weights, and more bits give less error (KIVI Table 1's ordering).
// 8-bit attention weights (weights8) add little to it.
TEST(QuantizedAttend, ErrorAgainstDenseFloatIsBoundedAndFallsWithBits) {
  const int d = 128, P = 64;
  const tokens t(2048, d, 31);
  const std::vector<float> q = queries(4, d, 32);
  const std::vector<std::int32_t> qp{2048, 2048, 2048, 2048};
  using dense_t = kvc::paged_kv_cache<kvc::codec::f32>;
  dense_t dense = policy_test::make_cache<dense_t>(config(d, P));
  const kvc::seq_id sd = dense.create_sequence();
  ASSERT_TRUE(dense.append(sd, 0, t.k.data(), t.v.data(), t.pos.data(), t.n).ok());
  const std::vector<float> ref_f = attend(dense, sd, q, qp);
  const std::vector<double> ref(ref_f.begin(), ref_f.end());
  auto error = [&](auto which) {
    using cache_t = typename decltype(which)::type;
    cache_t c = policy_test::make_cache<cache_t>(config(d, P));
    const kvc::seq_id s = c.create_sequence();
    EXPECT_TRUE(c.append(s, 0, t.k.data(), t.v.data(), t.pos.data(), t.n).ok());
    return rel(attend(c, s, q, qp), ref);
  };
  const double e2 = error(tag<kvc::paged_kv_cache<kvc::codec::kivi<2>>>{});
  const double e4 = error(tag<kvc::paged_kv_cache<kvc::codec::kivi<4>>>{});
  const double e8 = error(tag<kvc::paged_kv_cache<kvc::codec::kivi<8>>>{});
  const double e24 = error(tag<kvc::paged_kv_cache<kvc::codec::kivi<2>, kvc::codec::kivi<4>>>{});
  const double ei8 = error(tag<kvc::paged_kv_cache<kvc::codec::int8>>{});
  const double w2 = error(tag<kvc::paged_kv_cache<kvc::codec::weights8<kvc::codec::kivi<2>>>>{});
  const double w4 = error(tag<kvc::paged_kv_cache<kvc::codec::weights8<kvc::codec::kivi<4>>>>{});
  std::printf("attention error vs dense f32: kivi<2> %.4f, kivi<2>/<4> %.4f, kivi<4> %.4f, kivi<8> %.5f, int8 %.5f\n",
              e2, e24, e4, e8, ei8);
  std::printf("with 8-bit weights (weights8): kivi<2> %.4f (%.4fx), kivi<4> %.4f (%.4fx)\n", w2, w2 / e2, w4, w4 / e4);
  EXPECT_LE(e2, 0.45 * 1.35);
  EXPECT_LE(e4, 0.09 * 1.35);
  EXPECT_LE(e8, 0.006 * 1.35);
  EXPECT_LE(ei8, 0.006 * 1.35 * 2);  // one scale per 128 channels, not per 32
  EXPECT_LT(e8, e4);
  EXPECT_LT(e4, e24);  // 4-bit values but 2-bit keys
  EXPECT_LT(e24, e2);
  // codec::weights8 stores the same codes; its 8-bit rounding moves outputs by about 0.03
  // relative (FusedAttendEqualsAttentionOverDecodedRows), independently of the quantization
  // error, so the two add in quadrature: sqrt(0.095^2 + 0.03^2) = 1.05x kivi<4>'s error,
  // 1.002x kivi<2>'s. Measured 1.045x and 1.002x; allowed 1.1x and 1.02x.
  EXPECT_LE(w4, 1.1 * e4);
  EXPECT_LE(w2, 1.02 * e2);
}

// ---------------------------------------------------------------- eviction

// Codecs whose rows carry their own parameters (int8, kivi_token) move kept rows between
// pages as bytes: after compress the stream is exactly the kept subset of what it decoded
// before, bit for bit. Channel-quantized keys (kivi_channel) re-encode each page whose rows
// change: their values move as bytes, and the keys stay within the quantizer's bound of the
// decoded keys they came from (a key is at most quantized once more, on a grid whose range
// is at most the union of its sources').
TYPED_TEST(QuantizedCache, EvictionMovesRowsWithoutRequantizing) {
  using K = kvc::detail::key_role_t<typename TypeParam::key>;
  using cache_t = kvc::paged_kv_cache<typename TypeParam::key, typename TypeParam::value>;
  const int d = 64, P = 16;
  const tokens t(200, d, 41);
  cache_t cache = policy_test::make_cache<cache_t>(config(d, P));
  const kvc::seq_id s = cache.create_sequence();
  ASSERT_TRUE(cache.append(s, 0, t.k.data(), t.v.data(), t.pos.data(), t.n).ok());
  std::vector<kvc::row_matrix> keys, values;
  std::vector<std::vector<std::int32_t>> pos;
  for (int h = 0; h < kv_heads; ++h) {
    keys.push_back(cache.view(s, 0, h)->keys());
    values.push_back(cache.view(s, 0, h)->values());
    pos.push_back(cache.view(s, 0, h)->positions());
  }
  ASSERT_TRUE(cache.compress(s, drop_fraction(0.25, 5)).ok());
  for (int h = 0; h < kv_heads; ++h) {
    auto view = cache.view(s, 0, h);
    const std::vector<std::int32_t> kept = view->positions();
    ASSERT_LT(kept.size(), pos[static_cast<std::size_t>(h)].size());
    const kvc::row_matrix k = view->keys(), v = view->values();
    double err = 0.0, norm = 0.0;
    for (std::size_t i = 0; i < kept.size(); ++i) {
      const auto& before = pos[static_cast<std::size_t>(h)];
      const long j = std::find(before.begin(), before.end(), kept[i]) - before.begin();
      ASSERT_LT(static_cast<std::size_t>(j), before.size());
      EXPECT_TRUE(v.row(static_cast<long>(i)) == values[static_cast<std::size_t>(h)].row(j)) << "value row " << i;
      if (kvc::detail::token_granular_v<K>) {
        EXPECT_TRUE(k.row(static_cast<long>(i)) == keys[static_cast<std::size_t>(h)].row(j)) << "key row " << i;
      } else {
        err += (k.row(static_cast<long>(i)) - keys[static_cast<std::size_t>(h)].row(j)).squaredNorm();
        norm += keys[static_cast<std::size_t>(h)].row(j).squaredNorm();
      }
    }
    if (!kvc::detail::token_granular_v<K>) {
      // One more quantization of the decoded keys: the Gaussian per-channel bound of the width
      // (test_quant.cpp) applies to the added error.
      const double bound = K::bits == 2 ? 0.45 : K::bits == 3 ? 0.20 : K::bits == 4 ? 0.09 : 0.006;
      EXPECT_LE(std::sqrt(err / norm), bound) << K::name;
    }
  }
}

// Repeated evictions (10 rounds of 10%) against one eviction of the same final set: the
// attention error stays within 1.1x. Codecs whose rows move as bytes give the same error;
// channel-quantized keys re-encode the pages that change, keeping the grids of the pages
// their rows came from where that costs least (kivi_channel::reencode), so a key moved again
// on the same grid gains no error. The ratios are printed.
//
// With three grids a page (kivi<B, G, R, 3>) the runs of rows that a round of 10% brings
// together nearly always fit, and keys keep their codes: measured 1.011 (2-bit keys with
// 4-bit values), and 1.005, 1.001, 1.010, 1.002 for 2, 4, 8 and 3-bit Hadamard keys. With
// one grid (the default) they do not reach 1.1x: compaction packs pages densely, so a round
// that evicts a tenth refills nearly every page from two source pages, and whichever grid a
// channel keeps, the rows from the other page are quantized again (about 3 times per key over
// ten rounds against 0.7 in one). Measured 1.07 (2-bit), 1.13 (4-bit), 1.13 (8-bit), 1.24
// (2-bit keys with 4-bit values), 1.07 (3-bit, Hadamard); a fresh min-max grid for every
// re-encoded page gave 1.19, 1.32, 1.38, 1.46 and 1.16. Two grids: 1.03, 1.02, 1.08, 1.105
// (2-bit keys, 4-bit values). For one and two grids the test holds the measured level (at
// most 1.3x), so that a change that loses the grid choice fails here.
TYPED_TEST(QuantizedCache, RepeatedEvictionsAgainstOneRound) {
  using K = kvc::detail::key_role_t<typename TypeParam::key>;
  using cache_t = kvc::paged_kv_cache<typename TypeParam::key, typename TypeParam::value>;
  using dense_t = kvc::paged_kv_cache<kvc::codec::f32>;
  const int d = 128, P = 32;
  const tokens t(1500, d, 51);
  cache_t many = policy_test::make_cache<cache_t>(config(d, P)), one = policy_test::make_cache<cache_t>(config(d, P));
  dense_t dense = policy_test::make_cache<dense_t>(config(d, P));
  const kvc::seq_id a = many.create_sequence(), b = one.create_sequence(), c = dense.create_sequence();
  ASSERT_TRUE(many.append(a, 0, t.k.data(), t.v.data(), t.pos.data(), t.n).ok());
  ASSERT_TRUE(one.append(b, 0, t.k.data(), t.v.data(), t.pos.data(), t.n).ok());
  ASSERT_TRUE(dense.append(c, 0, t.k.data(), t.v.data(), t.pos.data(), t.n).ok());
  for (unsigned round = 0; round < 10; ++round) ASSERT_TRUE(many.compress(a, drop_fraction(0.1, 100 + round)).ok());
  // The same final set, in one round: keep exactly the positions `many` kept.
  std::vector<std::vector<std::int32_t>> kept;
  for (int h = 0; h < kv_heads; ++h) kept.push_back(many.view(a, 0, h)->positions());
  const auto keep_kept = [&kept](int, int h, std::int32_t p) {
    const auto& k = kept[static_cast<std::size_t>(h)];
    return std::binary_search(k.begin(), k.end(), p);
  };
  ASSERT_TRUE(one.compress(b, policy_test::keep_if{keep_kept, nullptr}).ok());
  ASSERT_TRUE(dense.compress(c, policy_test::keep_if{keep_kept, nullptr}).ok());
  ASSERT_EQ(one.view(b, 0, 1)->positions(), kept[1]);
  double e_many = 0, e_one = 0;
  for (unsigned qs = 0; qs < 4; ++qs) {
    const std::vector<float> q = queries(1, d, 60 + qs);
    const std::vector<std::int32_t> qp{t.n};
    const std::vector<float> ref_f = attend(dense, c, q, qp);
    const std::vector<double> ref(ref_f.begin(), ref_f.end());
    e_many += rel(attend(many, a, q, qp), ref);
    e_one += rel(attend(one, b, q, qp), ref);
  }
  std::printf("%s: attention error after 10 rounds of 10%% / one round: %.4f / %.4f = %.3f\n", K::name, e_many, e_one,
              e_many / e_one);
  EXPECT_LE(e_many, (kvc::detail::token_granular_v<K> || kvc::detail::grids_v<K> >= 3 ? 1.1 : 1.3) * e_one) << K::name;
}

// Compaction that moves every kept row of a page as a block, without mixing pages, changes no
// key or value at all. Four sealed pages of 16 tokens: dropping all of page 1 moves page 2 whole
// into slot 1, and dropping 5 rows of page 3 leaves its 11 others alone in slot 2. Channel-
// quantized keys are re-encoded there, from one source page each, so they keep that page's
// scale, zero and codes (a fresh min-max grid over the 11 rows would move some keys). The
// same on a fork, whose pages are shared and copied on write.
TYPED_TEST(QuantizedCache, EvictionWithinPagesKeepsEveryKeyBitForBit) {
  using cache_t = kvc::paged_kv_cache<typename TypeParam::key, typename TypeParam::value>;
  const int d = 64, P = 16;
  const tokens t(70, d, 81);  // 4 sealed pages and 6 open tokens per stream
  const std::vector<std::int32_t> dropped{16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26,
                                          27, 28, 29, 30, 31, 49, 52, 55, 58, 62};
  const auto keep = [&dropped](int, int, std::int32_t p) {
    return std::find(dropped.begin(), dropped.end(), p) == dropped.end();
  };
  for (const bool fork : {false, true}) {
    SCOPED_TRACE(fork ? "forked" : "own pages");
    cache_t cache = policy_test::make_cache<cache_t>(config(d, P));
    const kvc::seq_id a = cache.create_sequence();
    ASSERT_TRUE(cache.append(a, 0, t.k.data(), t.v.data(), t.pos.data(), t.n).ok());
    kvc::seq_id s = a;
    if (fork) {
      auto f = cache.fork(a);
      ASSERT_TRUE(f.ok());
      s = *f;
    }
    std::vector<kvc::row_matrix> keys, values;
    for (int h = 0; h < kv_heads; ++h) {
      keys.push_back(cache.view(s, 0, h)->keys());
      values.push_back(cache.view(s, 0, h)->values());
    }
    ASSERT_TRUE(cache.compress(s, policy_test::keep_if{keep, nullptr}).ok());
    for (int h = 0; h < kv_heads; ++h) {
      auto view = cache.view(s, 0, h);
      ASSERT_EQ(view->size(), t.n - static_cast<int>(dropped.size()));
      const std::vector<std::int32_t> kept = view->positions();
      const kvc::row_matrix k = view->keys(), v = view->values();
      for (std::size_t i = 0; i < kept.size(); ++i) {
        EXPECT_TRUE(k.row(static_cast<long>(i)) == keys[static_cast<std::size_t>(h)].row(kept[i])) << "key " << kept[i];
        EXPECT_TRUE(v.row(static_cast<long>(i)) == values[static_cast<std::size_t>(h)].row(kept[i]))
            << "value " << kept[i];
      }
      if (fork) {
        EXPECT_EQ(cache.view(a, 0, h)->keys(), keys[static_cast<std::size_t>(h)]) << "the original changed";
      }
    }
  }
}

// ---------------------------------------------------------------- re-encoding, by hand

// A kivi_channel page built by encode, read back field by field.
template <class K>
struct channel_page {
  int n, d;
  std::vector<std::byte> bytes;
  channel_page(const std::vector<float>& x, int n_, int d_) : n(n_), d(d_), bytes(K::page_bytes(n_, d_)) {
    K::encode(x.data(), n, d, n, bytes.data());
  }
  std::uint16_t scale(int c) const { return K::scales(bytes.data())[c]; }
  std::uint16_t zero(int c) const { return K::zeros(bytes.data(), d)[c]; }
  std::vector<std::uint8_t> codes(int r) const {
    std::vector<std::uint8_t> c(static_cast<std::size_t>(d));
    kvc::detail::unpack_codes(K::codes(bytes.data(), d) + static_cast<std::size_t>(r) * K::row_bytes(d), d, K::bits,
                              c.data());
    return c;
  }
  std::vector<float> decoded(int r) const {
    std::vector<float> x(static_cast<std::size_t>(d));
    K::decode(bytes.data(), r, 1, d, n, x.data());
    return x;
  }
};

double half(std::uint16_t h) { return kvc::detail::half_to_float_scalar(h); }

// n Gaussian rows [n][d] with channel c drawn from N(mean[c], sd[c]).
std::vector<float> gaussian_rows(int n, int d, const std::vector<float>& mean, const std::vector<float>& sd,
                                 unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> x(static_cast<std::size_t>(n) * d);
  for (std::size_t i = 0; i < x.size(); ++i) {
    const std::size_t c = i % static_cast<std::size_t>(d);
    x[i] = mean[c] + sd[c] * normal(rng);
  }
  return x;
}

// Some rows of one page, re-encoded into that page (as compaction does in place): the page
// keeps its scale and zero per channel, and row i holds the codes row kept[i] had, bit for bit,
// for per-channel and Hadamard-rotated keys. Encoding the decoded rows afresh would change the
// grid: the dropped rows hold the extremes of some channels.
template <class K>
void reencode_one_page() {
  SCOPED_TRACE(K::name);
  const int d = 64, P = 16;
  const std::vector<float> mean(d, 0.5f), sd(d, 2.0f);
  const channel_page<K> source(gaussian_rows(P, d, mean, sd, 91), P, d);
  const std::vector<int> kept{1, 2, 4, 5, 8, 9, 11, 13, 14};
  const int n = static_cast<int>(kept.size());
  std::vector<float> rows;
  std::vector<kvc::detail::row_origin> origin;
  for (int r : kept) {
    const std::vector<float> x = source.decoded(r);
    rows.insert(rows.end(), x.begin(), x.end());
    origin.push_back({0, r});
  }
  channel_page<K> fresh(rows, n, d);  // what plain encode does with the same rows
  int regridded = 0;
  for (int c = 0; c < d; ++c) regridded += fresh.scale(c) != source.scale(c) || fresh.zero(c) != source.zero(c);
  ASSERT_GT(regridded, 0) << "the test needs rows whose min-max grid differs from the page's";

  channel_page<K> page = source;
  const std::byte* sources[] = {page.bytes.data()};
  K::reencode(rows.data(), n, d, P, sources, 1, origin.data(), page.bytes.data());
  for (int c = 0; c < d; ++c) {
    EXPECT_EQ(page.scale(c), source.scale(c)) << "channel " << c;
    EXPECT_EQ(page.zero(c), source.zero(c)) << "channel " << c;
  }
  for (int i = 0; i < n; ++i) EXPECT_EQ(page.codes(i), source.codes(kept[static_cast<std::size_t>(i)])) << "row " << i;
}

TEST(QuantizedCodecs, ReencodingRowsOfOnePageKeepsItsGridAndCodes) {
  using namespace kvc::codec;
  reencode_one_page<kivi_channel<2>>();
  reencode_one_page<kivi_channel<3>>();
  reencode_one_page<kivi_channel<4>>();
  reencode_one_page<kivi_channel<8>>();
  reencode_one_page<kivi_channel<3, rotation::hadamard>>();
  reencode_one_page<kivi_channel<8, rotation::hadamard>>();
}

// A page filled from three pages A, B and C (C not passed to reencode), against a brute-force
// oracle. The quantizer is KIVI's (Liu et al. 2024, Eq. 1, Sec. 3): on the grid (s, z) a
// value x has code q = clamp(round((x - z) / s), 0, 2^B - 1) and reads back z + s q. For each
// channel the oracle tries every candidate grid, A's, B's and the min-max grid of the page's
// rows, and adds up (z + s q - x)^2 over the rows, x the decoded row, except for rows of a
// source whose own grid the candidate is (their codes are copied: no error); the least sum
// wins, ties to the earlier candidate. The page then holds that grid, the copied codes and the
// oracle's q for every other row. The page is A's own buffer, rewritten in place. Channel
// kinds make all three choices happen: A and B alike (A has more rows), A narrow and B wide,
// A and B far apart.
template <int Bits>
void reencode_mixed_page() {
  SCOPED_TRACE("bits " + std::to_string(Bits));
  using K = kvc::codec::kivi_channel<Bits>;
  const int d = 80, P = 20;  // 80 channels: two blocks of 32 and a tail of 16
  std::vector<float> mean_a(d), sd_a(d), mean_b(d), sd_b(d);
  for (int c = 0; c < d; ++c) {
    const int kind = c % 3;
    mean_a[c] = kind == 2 ? -2.0f : 0.0f;
    mean_b[c] = kind == 2 ? 2.0f : 0.0f;
    sd_a[c] = kind == 1 ? 0.2f : 1.0f;
    sd_b[c] = kind == 1 ? 3.0f : 1.0f;
  }
  const channel_page<K> a(gaussian_rows(P, d, mean_a, sd_a, 101), P, d);
  const channel_page<K> b(gaussian_rows(P, d, mean_b, sd_b, 102), P, d);
  const channel_page<K> c(gaussian_rows(P, d, std::vector<float>(d, 0.0f), std::vector<float>(d, 1.0f), 103), P, d);
  // Rows: 10 of A (each at or before its own slot), 6 of B, 2 of C.
  const std::vector<std::pair<const channel_page<K>*, int>> from{
      {&a, 0},  {&a, 1}, {&a, 3}, {&a, 4}, {&a, 6},  {&a, 8},  {&a, 9},  {&a, 11}, {&a, 12},
      {&a, 14}, {&b, 2}, {&b, 5}, {&b, 7}, {&b, 10}, {&b, 13}, {&b, 15}, {&c, 4},  {&c, 9}};
  const int n = static_cast<int>(from.size());
  std::vector<float> rows;
  std::vector<kvc::detail::row_origin> origin;
  for (const auto& [p, r] : from) {
    const std::vector<float> x = p->decoded(r);
    rows.insert(rows.end(), x.begin(), x.end());
    origin.push_back({p == &a ? 0 : p == &b ? 1 : -1, r});
  }

  // The oracle.
  const double qmax = (1 << Bits) - 1;
  std::vector<int> pick(static_cast<std::size_t>(d));
  std::vector<std::uint16_t> want_scale(static_cast<std::size_t>(d)), want_zero(static_cast<std::size_t>(d));
  std::vector<std::vector<int>> want_code(static_cast<std::size_t>(n), std::vector<int>(static_cast<std::size_t>(d)));
  int picked[3] = {0, 0, 0};
  for (int ch = 0; ch < d; ++ch) {
    std::vector<float> column;
    for (int i = 0; i < n; ++i) column.push_back(rows[static_cast<std::size_t>(i) * d + ch]);
    const kvc::detail::minmax mm = kvc::detail::minmax_params(column.data(), n, Bits);
    const std::uint16_t cs[3] = {a.scale(ch), b.scale(ch), mm.scale};
    const std::uint16_t cz[3] = {a.zero(ch), b.zero(ch), mm.zero};
    auto own = [&](int i, int k) {  // row i's code is copied under candidate k
      const int o = origin[static_cast<std::size_t>(i)].source;
      return o >= 0 && cs[o] == cs[k] && cz[o] == cz[k];
    };
    auto code = [&](double x, int k) {
      const double s = half(cs[k]), z = half(cz[k]);
      if (s == 0.0) return 0;
      return static_cast<int>(std::clamp(std::nearbyint((x - z) / s), 0.0, qmax));
    };
    double cost[3] = {0, 0, 0};
    for (int k = 0; k < 3; ++k)
      for (int i = 0; i < n; ++i) {
        if (own(i, k)) continue;
        const double x = column[static_cast<std::size_t>(i)];
        const double e = half(cz[k]) + half(cs[k]) * code(x, k) - x;
        cost[k] += e * e;
      }
    int best = 0;
    for (int k = 1; k < 3; ++k)
      if (cost[k] < cost[best]) best = k;
    ++picked[best];
    want_scale[static_cast<std::size_t>(ch)] = cs[best];
    want_zero[static_cast<std::size_t>(ch)] = cz[best];
    for (int i = 0; i < n; ++i) {
      const auto& [p, r] = from[static_cast<std::size_t>(i)];
      want_code[static_cast<std::size_t>(i)][static_cast<std::size_t>(ch)] =
          own(i, best) ? p->codes(r)[static_cast<std::size_t>(ch)] : code(column[static_cast<std::size_t>(i)], best);
    }
  }
  ASSERT_GT(picked[0], 0) << "no channel keeps A's grid";
  ASSERT_GT(picked[1], 0) << "no channel takes B's grid";
  ASSERT_GT(picked[2], 0) << "no channel takes the min-max grid";

  channel_page<K> page = a;
  const std::byte* sources[] = {page.bytes.data(), b.bytes.data()};
  K::reencode(rows.data(), n, d, P, sources, 2, origin.data(), page.bytes.data());
  for (int ch = 0; ch < d; ++ch) {
    EXPECT_EQ(page.scale(ch), want_scale[static_cast<std::size_t>(ch)]) << "channel " << ch;
    EXPECT_EQ(page.zero(ch), want_zero[static_cast<std::size_t>(ch)]) << "channel " << ch;
  }
  for (int i = 0; i < n; ++i) {
    const std::vector<std::uint8_t> got = page.codes(i);
    EXPECT_EQ(std::vector<int>(got.begin(), got.end()), want_code[static_cast<std::size_t>(i)]) << "row " << i;
  }
  std::printf("kivi_channel<%d> mixed page: %d channels keep A's grid, %d take B's, %d the min-max grid\n", Bits,
              picked[0], picked[1], picked[2]);
}

TEST(QuantizedCodecs, ReencodingAMixedPageTakesTheLeastErrorGridPerChannel) {
  reencode_mixed_page<2>();
  reencode_mixed_page<3>();
  reencode_mixed_page<4>();
  reencode_mixed_page<8>();
}

// A page of a codec with Grids > 1 filled from three runs of rows: 6 rows of page A, 4 of
// page B (a copy of A, so its grid has A's bits) and 6 of page C, whose channels sit near 40.
// With two grids the runs are joined two by two, the pair whose joining adds the least
// squared error first (kivi_channel::reencode): joining A's and B's runs adds nothing (B's
// rows are quantized on a grid with A's bits, so they keep their codes), joining either with
// C's re-quantizes a whole run. So in the order A, B, C the page holds A's grid for rows
// [0, 10) and C's for [10, 16); in the order C, A, B, C's grid for [0, 6) and A's for
// [6, 16), though the first pair is C and A. With three grids nothing is joined. Either way
// every row keeps the codes it had, so it decodes exactly as in its source page.
template <int Grids>
void reencode_runs_into_grids(bool c_first) {
  using K = kvc::codec::kivi_channel<4, rotation::none, Grids>;
  SCOPED_TRACE(std::string(K::name) + (c_first ? ", C first" : ", A first"));
  const int d = 64, P = 16;
  const channel_page<K> a(gaussian_rows(P, d, std::vector<float>(d, 0.0f), std::vector<float>(d, 1.0f), 111), P, d);
  const channel_page<K> b = a;
  const channel_page<K> c(gaussian_rows(P, d, std::vector<float>(d, 40.0f), std::vector<float>(d, 1.0f), 112), P, d);
  std::vector<std::pair<const channel_page<K>*, int>> from;
  for (int r = 0; r < 6 && c_first; ++r) from.push_back({&c, r});
  for (int r = 0; r < 6; ++r) from.push_back({&a, r});
  for (int r = 8; r < 12; ++r) from.push_back({&b, r});
  for (int r = 0; r < 6 && !c_first; ++r) from.push_back({&c, r});
  std::vector<float> rows;
  std::vector<kvc::detail::row_origin> origin;
  for (const auto& [p, r] : from) {
    const std::vector<float> x = p->decoded(r);
    rows.insert(rows.end(), x.begin(), x.end());
    origin.push_back({p == &a ? 0 : p == &b ? 1 : 2, r});
  }
  const std::byte* sources[] = {a.bytes.data(), b.bytes.data(), c.bytes.data()};
  std::vector<std::byte> page(K::page_bytes(P, d));
  K::reencode(rows.data(), P, d, P, sources, 3, origin.data(), page.data());

  // The grids and their first rows.
  const std::vector<int> first = Grids == 2 ? (c_first ? std::vector<int>{0, 6} : std::vector<int>{0, 10})
                                            : (c_first ? std::vector<int>{0, 6, 12} : std::vector<int>{0, 6, 10});
  const std::vector<const channel_page<K>*> grid =
      Grids == 2 ? (c_first ? std::vector<const channel_page<K>*>{&c, &a} : std::vector<const channel_page<K>*>{&a, &c})
                 : (c_first ? std::vector<const channel_page<K>*>{&c, &a, &b}
                            : std::vector<const channel_page<K>*>{&a, &b, &c});
  for (int k = 0; k < Grids; ++k) {
    EXPECT_EQ(K::grid_first(page.data(), d, P, k), first[static_cast<std::size_t>(k)]) << "grid " << k;
    for (int ch = 0; ch < d; ++ch) {
      EXPECT_EQ(K::grid_scales(page.data(), d, k)[ch], grid[static_cast<std::size_t>(k)]->scale(ch)) << "grid " << k;
      EXPECT_EQ(K::grid_zeros(page.data(), d, k)[ch], grid[static_cast<std::size_t>(k)]->zero(ch)) << "grid " << k;
    }
  }
  EXPECT_EQ(K::grid_first(page.data(), d, P, Grids), P);
  std::vector<float> out(static_cast<std::size_t>(P) * d);
  K::decode(page.data(), 0, P, d, P, out.data());
  for (int i = 0; i < P; ++i) {
    const auto& [p, r] = from[static_cast<std::size_t>(i)];
    const std::vector<float> want = p->decoded(r);
    EXPECT_TRUE(std::equal(want.begin(), want.end(), out.begin() + static_cast<std::ptrdiff_t>(i) * d)) << "row " << i;
  }
}

TEST(QuantizedCodecs, ReencodingRunsIntoGridsJoinsTheCheapestNeighbours) {
  reencode_runs_into_grids<2>(false);
  reencode_runs_into_grids<2>(true);
  reencode_runs_into_grids<3>(false);
  reencode_runs_into_grids<3>(true);
}

// Through the cache: four sealed pages of 16 tokens and 6 open ones. Dropping 3 rows of page
// 0 refills every page from two: page 0 keeps 13 of its rows and takes 3 of page 1, page 1
// 13 of its own and 3 of page 2, and so on. With two grids a page each run keeps its grid
// and every key its codes, bit for bit. A second round (3 more rows of page 0) refills page 0
// from three runs: its own rows, the 3 it holds on page 1's grid and 3 more of page 1, whose
// grids have the same bits, so joining them costs nothing and again no key changes. With one
// grid (the default) the same rounds quantize some keys again.
template <class Codec>
int keys_changed_by_two_rounds() {
  using cache_t = kvc::paged_kv_cache<Codec>;
  const int d = 64, P = 16;
  const tokens t(70, d, 83);
  cache_t cache = policy_test::make_cache<cache_t>(config(d, P));
  const kvc::seq_id s = cache.create_sequence();
  EXPECT_TRUE(cache.append(s, 0, t.k.data(), t.v.data(), t.pos.data(), t.n).ok());
  std::vector<kvc::row_matrix> keys;
  for (int h = 0; h < kv_heads; ++h) keys.push_back(cache.view(s, 0, h)->keys());
  int changed = 0;
  for (const std::vector<std::int32_t>& dropped : {std::vector<std::int32_t>{2, 7, 11}, {0, 5, 9}}) {
    const auto keep = [&dropped](int, int, std::int32_t p) {
      return std::find(dropped.begin(), dropped.end(), p) == dropped.end();
    };
    EXPECT_TRUE(cache.compress(s, policy_test::keep_if{keep, nullptr}).ok());
    for (int h = 0; h < kv_heads; ++h) {
      auto view = cache.view(s, 0, h);
      const std::vector<std::int32_t> kept = view->positions();
      const kvc::row_matrix k = view->keys();
      for (std::size_t i = 0; i < kept.size(); ++i)
        changed += k.row(static_cast<long>(i)) != keys[static_cast<std::size_t>(h)].row(kept[i]);
    }
  }
  return changed;
}

TEST(QuantizedCache, TwoGridsKeepEveryKeyWhenEachPageTakesTwoRuns) {
  using namespace kvc::codec;
  EXPECT_EQ((keys_changed_by_two_rounds<kivi<4, 32, rotation::none, 2>>()), 0);
  EXPECT_EQ((keys_changed_by_two_rounds<kivi<2, 32, rotation::hadamard, 2>>()), 0);
  EXPECT_GT(keys_changed_by_two_rounds<kivi<4>>(), 0);
}

// ---------------------------------------------------------------- bad input

// Values a binary16 scale or zero cannot hold are rejected by append with out_of_range
// naming the codec, as are non-finite ones, and the cache is left as it was.
TEST(QuantizedCache, RejectsValuesOutsideTheParameterRange) {
  using cache_t = kvc::paged_kv_cache<kvc::codec::kivi<4>>;
  const int d = 64;
  cache_t cache = policy_test::make_cache<cache_t>(config(d, 16));
  const kvc::seq_id s = cache.create_sequence();
  tokens t(20, d, 71);
  ASSERT_TRUE(cache.append(s, 0, t.k.data(), t.v.data(), t.pos.data(), 10).ok());
  const kvc::row_matrix before = cache.view(s, 0, 0)->keys();
  t.k[static_cast<std::size_t>(12) * kv_heads * d + 5] = 1e6f;
  const kvc::status st = cache.append(s, 0, t.k.data() + static_cast<std::size_t>(10) * kv_heads * d,
                                      t.v.data() + static_cast<std::size_t>(10) * kv_heads * d, t.pos.data() + 10, 10);
  EXPECT_EQ(st.code(), kvc::status_code::out_of_range);
  EXPECT_NE(std::string(st.message()).find("kivi"), std::string::npos) << st.message();
  EXPECT_EQ(cache.view(s, 0, 0)->size(), 10);
  EXPECT_EQ(cache.view(s, 0, 0)->keys(), before);
  t.k[static_cast<std::size_t>(12) * kv_heads * d + 5] = std::nanf("");
  EXPECT_EQ(cache
                .append(s, 0, t.k.data() + static_cast<std::size_t>(10) * kv_heads * d,
                        t.v.data() + static_cast<std::size_t>(10) * kv_heads * d, t.pos.data() + 10, 10)
                .code(),
            kvc::status_code::non_finite);
  EXPECT_EQ(cache.view(s, 0, 0)->size(), 10);
}

}  // namespace
