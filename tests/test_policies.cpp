// Tests of the first policies: kvc::evict with the streaming, knorm, random and oracle
// scorers and the uniform budget. Every expected kept set comes from the test's own
// record of what it appended (policy_test::mirror) and a brute-force reference, never
// from data read back through the library.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include <kvc/kvc.hpp>

#include "policy_helpers.hpp"

namespace {

using policy_test::mirror;
using policy_test::token;
using score_map = std::map<std::pair<int, int>, std::vector<float>>;

constexpr kvc::model_shape small_shape{3, 4, 2, 16};  // layers, q heads, kv heads, head_dim

template <class Cache, class Policy>
kvc::compress_report compress_ok(Cache& cache, kvc::seq_id seq, int layer, Policy&& policy) {
  auto r = cache.compress(seq, layer, std::forward<Policy>(policy));
  EXPECT_TRUE(r.ok()) << r.status().message();
  return r.ok() ? r.value() : kvc::compress_report{};
}

// keep = round(n * f), halves away from zero: the rule of kvc/budget/uniform.hpp.
int round_keep(int n, double f) { return static_cast<int>(std::floor(static_cast<double>(n) * f + 0.5)); }

std::vector<std::int32_t> positions_of(const std::vector<token>& s) {
  std::vector<std::int32_t> p;
  for (const token& t : s) p.push_back(t.position);
  return p;
}

// Builds streams of different lengths on every (layer, kv_head) of small_shape:
// 45 tokens per layer at positions 3 + layer + 2i, then a head-dependent thinning of
// layers 1 and 2 (a custom policy), then 13 more tokens on layer 0 and 7 on layer 1.
template <class Cache>
void build_varied(Cache& cache, mirror& m, kvc::seq_id seq, std::mt19937& rng) {
  for (int l = 0; l < 3; ++l) POLICY_ASSERT_OK(policy_test::append_random(cache, m, seq, l, 3 + l, 45, rng, 2));
  const auto pred = [](int l, int h, std::int32_t p) {
    if (l == 1) return (p / 2 + h) % 3 != 0;
    if (l == 2) return h == 0 || p % 4 != 1;
    return true;
  };
  compress_ok(cache, seq, kvc::all_layers, policy_test::keep_if{pred, nullptr});
  policy_test::mirror_keep_if(m, pred);
  POLICY_ASSERT_OK(policy_test::append_random(cache, m, seq, 0, 100, 13, rng));
  POLICY_ASSERT_OK(policy_test::append_random(cache, m, seq, 1, 100, 7, rng));
  ASSERT_TRUE(policy_test::cache_equals(cache, seq, m));
  std::set<std::size_t> lengths;
  for (int l = 0; l < 3; ++l)
    for (int h = 0; h < 2; ++h) lengths.insert(m.stream(l, h).size());
  ASSERT_GE(lengths.size(), 4u) << "the setup should give streams of different lengths";
}

// ====================================================================== evict: top-k

struct budget_case {
  const char* name;
  kvc::budget::uniform budget;
  int (*keep)(int n);  // the reference count
};

const budget_case budget_cases[] = {
    {"keep_fraction(0.3)", kvc::budget::uniform::keep_fraction(0.3), [](int n) { return round_keep(n, 0.3); }},
    {"keep_fraction(0.5)", kvc::budget::uniform::keep_fraction(0.5), [](int n) { return round_keep(n, 0.5); }},
    {"compression_ratio(0.25)", kvc::budget::uniform::compression_ratio(0.25),
     [](int n) { return round_keep(n, 0.75); }},
    {"tokens(9)", kvc::budget::uniform::tokens(9), [](int n) { return std::min(n, 9); }},
    {"tokens(1000)", kvc::budget::uniform::tokens(1000), [](int n) { return std::min(n, 1000); }},
    {"keep_fraction(0)", kvc::budget::uniform::keep_fraction(0.0), [](int) { return 0; }},
    {"keep_fraction(1)", kvc::budget::uniform::keep_fraction(1.0), [](int n) { return n; }},
};

// Forks `seq`, compresses the fork with evict(recording(scorer), budget) and checks
// that every stream holds exactly expected(layer, kv_head, tokens, k, recorded
// scores), in position order with the original data; the parent must not change.
template <class Cache, class Scorer, class Expected>
void check_evict(Cache& cache, kvc::seq_id seq, const mirror& m, const Scorer& scorer, const budget_case& bc,
                 Expected expected) {
  SCOPED_TRACE(std::string(Scorer::name) + " with " + bc.name);
  const policy_test::cache_snapshot parent = policy_test::snapshot(cache, seq);
  auto fork = cache.fork(seq);
  ASSERT_TRUE(fork.ok()) << fork.status().message();
  score_map recorded;
  const kvc::compress_report rep = compress_ok(
      cache, *fork, kvc::all_layers, kvc::evict(policy_test::recording<Scorer>{scorer, &recorded}, bc.budget));
  ASSERT_FALSE(::testing::Test::HasFailure());
  const kvc::model_shape& sh = cache.shape();
  std::int64_t before = 0, after = 0;
  for (int l = 0; l < sh.num_layers; ++l)
    for (int h = 0; h < sh.num_kv_heads; ++h) {
      const std::vector<token>& s = m.stream(l, h);
      const int n = static_cast<int>(s.size()), k = bc.keep(n);
      const std::vector<float>& sc = recorded[{l, h}];
      ASSERT_EQ(sc.size(), s.size());
      const std::vector<int> kept = expected(l, h, s, k, sc);
      ASSERT_EQ(static_cast<int>(kept.size()), k);
      EXPECT_TRUE(policy_test::stream_equals(cache, *fork, l, h, policy_test::pick(s, kept)));
      const int si = l * sh.num_kv_heads + h;
      EXPECT_EQ(rep.stream_tokens_before[static_cast<std::size_t>(si)], n);
      EXPECT_EQ(rep.stream_tokens_after[static_cast<std::size_t>(si)], k);
      before += n;
      after += k;
    }
  EXPECT_EQ(rep.tokens_before, before);
  EXPECT_EQ(rep.tokens_after, after);
  POLICY_ASSERT_OK(cache.release(*fork));
  EXPECT_TRUE(policy_test::snapshot(cache, seq) == parent) << "compressing a fork changed its parent";
}

template <class Codec>
class EvictTopK : public ::testing::Test {};
using codecs = ::testing::Types<kvc::codec::f32, kvc::codec::f16, kvc::codec::bf16>;
TYPED_TEST_SUITE(EvictTopK, codecs);

// DESIGN.md Sec. 3, "Eviction": evict = score, allocate, keep the top-k per stream.
// The kept set of every stream equals a brute-force top-k (full sort of (score,
// index), ties towards the higher index) of scores the test computes itself, for
// streams of different lengths, page sizes that do and do not divide them, and every
// uniform budget form. The data is exactly representable in each codec, so the view
// must return the appended keys and values bit for bit.
TYPED_TEST(EvictTopK, KeptSetIsBruteForceTopKOfIndependentScores) {
  using cache_t = kvc::paged_kv_cache<TypeParam>;
  for (int page_tokens : {5, 16}) {
    SCOPED_TRACE("page_tokens " + std::to_string(page_tokens));
    cache_t cache = policy_test::make_cache<cache_t>(policy_test::make_config(small_shape, page_tokens));
    mirror m(small_shape);
    std::mt19937 rng(1234u + static_cast<unsigned>(page_tokens));
    const kvc::seq_id seq = cache.create_sequence();
    ASSERT_NO_FATAL_FAILURE(build_varied(cache, m, seq, rng));

    for (const budget_case& bc : budget_cases) {
      // K-norm (Devoto et al. 2024, Sec. 4): score = -||k||_2 of the appended key, in double.
      ASSERT_NO_FATAL_FAILURE(
          check_evict(cache, seq, m, kvc::score::knorm{}, bc,
                      [](int, int, const std::vector<token>& s, int k, const std::vector<float>& rec) {
                        const std::vector<double> ref = policy_test::knorm_reference(s);
                        for (std::size_t i = 0; i < s.size(); ++i)
                          EXPECT_NEAR(rec[i], ref[i], 1e-6 * std::fabs(ref[i]));
                        return policy_test::brute_top_k(ref, k);
                      }));
      // StreamingLLM (Xiao et al. 2023, Sec. 3.2): the first `sinks` tokens plus the most recent ones.
      for (int sinks : {0, 4, 50}) {
        kvc::score::streaming streaming;
        streaming.sinks = sinks;
        ASSERT_NO_FATAL_FAILURE(
            check_evict(cache, seq, m, streaming, bc,
                        [sinks](int, int, const std::vector<token>& s, int k, const std::vector<float>&) {
                          return policy_test::streaming_reference(static_cast<int>(s.size()), k, sinks);
                        }));
      }
      // Random: the scores are the hash (tested below); the kept set is their top-k.
      ASSERT_NO_FATAL_FAILURE(
          check_evict(cache, seq, m, kvc::score::random{99}, bc,
                      [](int, int, const std::vector<token>&, int k, const std::vector<float>& rec) {
                        for (float x : rec) EXPECT_TRUE(x >= 0.0f && x < 1.0f) << x;
                        return policy_test::brute_top_k(std::vector<double>(rec.begin(), rec.end()), k);
                      }));
    }
  }
}

// ====================================================================== streaming

// StreamingLLM (Xiao et al. 2023, Sec. 3.2, Fig. 1d): a rolling cache of the attention
// sinks plus a window of recent tokens. Appending and compressing to a fixed budget
// over and over keeps exactly the first `sinks` positions ever appended and the
// (budget - sinks) most recent ones.
TEST(Streaming, RollingCacheKeepsSinksAndRecentWindow) {
  using cache_t = kvc::paged_kv_cache<kvc::codec::f16>;
  const kvc::model_shape shape{2, 2, 1, 8};
  cache_t cache = policy_test::make_cache<cache_t>(policy_test::make_config(shape, 8));
  mirror m(shape);
  std::mt19937 rng(7);
  const kvc::seq_id seq = cache.create_sequence();
  const int sinks = 4, budget = 20;
  std::vector<std::int32_t> all;  // every position appended (both layers get the same)
  std::int32_t next = 0;
  for (int round = 0; round < 12; ++round) {
    for (int l = 0; l < 2; ++l) POLICY_ASSERT_OK(policy_test::append_random(cache, m, seq, l, next, 7, rng));
    for (int i = 0; i < 7; ++i) all.push_back(next + i);
    next += 7;
    compress_ok(cache, seq, kvc::all_layers,
                kvc::evict(kvc::score::streaming{sinks}, kvc::budget::uniform::tokens(budget)));
    std::vector<std::int32_t> expected;
    for (std::size_t i = 0; i < all.size(); ++i)
      if (i < static_cast<std::size_t>(sinks) || i + (budget - sinks) >= all.size()) expected.push_back(all[i]);
    for (int l = 0; l < 2; ++l) {
      auto v = cache.view(seq, l, 0);
      ASSERT_TRUE(v.ok());
      EXPECT_EQ(v->positions(), expected) << "round " << round << ", layer " << l;
      std::vector<token>& s = m.stream(l, 0);
      m.keep(l, 0, policy_test::streaming_reference(static_cast<int>(s.size()), budget, sinks));
      EXPECT_TRUE(policy_test::stream_equals(cache, seq, l, 0, s));
    }
  }
}

// StreamingLLM with a budget below the sink count keeps the earliest sinks; with no
// sinks it is a plain recent window; a negative sink count is an invalid argument.
TEST(Streaming, BudgetBelowSinksAndNoSinks) {
  using cache_t = kvc::paged_kv_cache<kvc::codec::f32>;
  const kvc::model_shape shape{1, 2, 2, 8};
  const auto build = [&](cache_t& cache, mirror& m) {
    std::mt19937 rng(3);
    const kvc::seq_id seq = cache.create_sequence();
    EXPECT_TRUE(policy_test::append_random(cache, m, seq, 0, 10, 30, rng, 3).ok());
    return seq;
  };
  struct test_case {
    int sinks, keep;
    std::vector<int> kept;  // indices
  };
  std::vector<int> first3{0, 1, 2}, last5{25, 26, 27, 28, 29}, sinks2_recent3{0, 1, 27, 28, 29};
  const test_case cases[] = {{6, 3, first3}, {0, 5, last5}, {2, 5, sinks2_recent3}, {40, 3, first3}};
  for (const test_case& tc : cases) {
    SCOPED_TRACE("sinks " + std::to_string(tc.sinks) + ", keep " + std::to_string(tc.keep));
    cache_t cache = policy_test::make_cache<cache_t>(policy_test::make_config(shape, 8));
    mirror m(shape);
    const kvc::seq_id seq = build(cache, m);
    compress_ok(cache, seq, 0, kvc::evict(kvc::score::streaming{tc.sinks}, kvc::budget::uniform::tokens(tc.keep)));
    for (int h = 0; h < 2; ++h)
      EXPECT_TRUE(policy_test::stream_equals(cache, seq, 0, h, policy_test::pick(m.stream(0, h), tc.kept)));
  }
  cache_t cache = policy_test::make_cache<cache_t>(policy_test::make_config(shape, 8));
  mirror m(shape);
  const kvc::seq_id seq = build(cache, m);
  const policy_test::cache_snapshot before = policy_test::snapshot(cache, seq);
  auto r = cache.compress(seq, kvc::evict(kvc::score::streaming{-1}, kvc::budget::uniform::tokens(3)));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), kvc::status_code::invalid_argument);
  EXPECT_TRUE(policy_test::snapshot(cache, seq) == before);
}

// ====================================================================== knorm

// K-norm (Devoto et al. 2024, Sec. 4): low-norm keys draw attention, so the highest-
// norm keys are evicted first: removing 3 tokens removes exactly the 3 planted
// large-norm keys; keeping 10 keeps the 10 smallest norms.
TEST(Knorm, HighestNormKeysGoFirst) {
  using cache_t = kvc::paged_kv_cache<kvc::codec::f32>;
  const kvc::model_shape shape{1, 1, 1, 16};
  const int n = 32;
  const std::vector<int> planted{5, 17, 30};
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 0.25f);
  std::vector<float> k(static_cast<std::size_t>(n) * 16), v(k.size());
  for (float& x : k) x = policy_test::snap(normal(rng));
  for (float& x : v) x = policy_test::snap(normal(rng));
  for (int i : planted) std::fill(k.begin() + i * 16, k.begin() + (i + 1) * 16, 3.0f);
  std::vector<std::int32_t> pos(static_cast<std::size_t>(n));
  std::iota(pos.begin(), pos.end(), 0);

  for (int keep : {n - 3, 10}) {
    SCOPED_TRACE("keep " + std::to_string(keep));
    cache_t cache = policy_test::make_cache<cache_t>(policy_test::make_config(shape, 8));
    mirror m(shape);
    const kvc::seq_id seq = cache.create_sequence();
    POLICY_ASSERT_OK(cache.append(seq, 0, k.data(), v.data(), pos.data(), n));
    m.append(0, k, v, pos);
    compress_ok(cache, seq, 0, kvc::evict(kvc::score::knorm{}, kvc::budget::uniform::tokens(keep)));
    // Reference: indices sorted by squared norm, ascending.
    std::vector<std::pair<double, int>> by_norm;
    for (int i = 0; i < n; ++i) {
      double acc = 0.0;
      for (int j = 0; j < 16; ++j) acc += static_cast<double>(k[i * 16 + j]) * k[i * 16 + j];
      by_norm.emplace_back(acc, i);
    }
    std::sort(by_norm.begin(), by_norm.end());
    std::vector<int> kept;
    for (int i = 0; i < keep; ++i) kept.push_back(by_norm[static_cast<std::size_t>(i)].second);
    std::sort(kept.begin(), kept.end());
    if (keep == n - 3) {
      for (int p : planted) EXPECT_EQ(std::count(kept.begin(), kept.end(), p), 0);
    }
    EXPECT_TRUE(policy_test::stream_equals(cache, seq, 0, 0, policy_test::pick(m.stream(0, 0), kept)));
  }
}

// evict.hpp: ties in score are broken towards the more recent token. Keys that are
// cyclic shifts of one vector have exactly equal norms, so knorm keeps the most recent.
TEST(Knorm, EqualNormsKeepTheMostRecent) {
  using cache_t = kvc::paged_kv_cache<kvc::codec::f32>;
  const kvc::model_shape shape{1, 2, 1, 8};
  const int n = 20, d = 8;
  const float base[d] = {0.5f, -1.25f, 2.0f, 0.0f, -0.75f, 1.5f, 3.0f, -2.5f};
  std::vector<float> k(static_cast<std::size_t>(n) * d), v(k.size(), 0.25f);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < d; ++j) k[static_cast<std::size_t>(i * d + j)] = base[(i + j) % d];
  std::vector<std::int32_t> pos(static_cast<std::size_t>(n));
  std::iota(pos.begin(), pos.end(), 100);
  cache_t cache = policy_test::make_cache<cache_t>(policy_test::make_config(shape, 8));
  const kvc::seq_id seq = cache.create_sequence();
  POLICY_ASSERT_OK(cache.append(seq, 0, k.data(), v.data(), pos.data(), n));
  compress_ok(cache, seq, 0, kvc::evict(kvc::score::knorm{}, kvc::budget::uniform::tokens(6)));
  auto view = cache.view(seq, 0, 0);
  ASSERT_TRUE(view.ok());
  EXPECT_EQ(view->positions(), (std::vector<std::int32_t>{114, 115, 116, 117, 118, 119}));
}

// config.hpp, observe.key_norms: the cache keeps ||k|| of every appended key in step
// with eviction and fork, so K-norm (Devoto et al. 2024, Sec. 4) reads no keys. Over
// three rounds of appending and compressing (a custom thinning, a fork, top-k evictions)
// the scores knorm sees equal -||k||_2 of the test's own record of the retained keys,
// and are bit-identical to those computed from the stored keys by a cache that does not
// keep norms (f32 pages: the same keys, the same kernel).
TEST(Knorm, KeptNormsFollowEvictionAndForkAndMatchStoredKeys) {
  using cache_t = kvc::paged_kv_cache<kvc::codec::f32>;
  kvc::cache_config with = policy_test::make_config(small_shape, 5);
  with.observe.key_norms = true;
  cache_t kept = policy_test::make_cache<cache_t>(with);
  cache_t computed = policy_test::make_cache<cache_t>(policy_test::make_config(small_shape, 5));
  mirror m(small_shape), parent(small_shape), scratch(small_shape);
  std::mt19937 rng(2024), rng_copy(2024);
  const kvc::seq_id a = kept.create_sequence(), b = computed.create_sequence();
  ASSERT_NO_FATAL_FAILURE(build_varied(kept, m, a, rng));
  ASSERT_NO_FATAL_FAILURE(build_varied(computed, parent, b, rng_copy));
  auto fa = kept.fork(a);
  auto fb = computed.fork(b);
  ASSERT_TRUE(fa.ok() && fb.ok());
  for (int round = 0; round < 3; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    std::mt19937 r1(77u + static_cast<unsigned>(round)), r2 = r1;
    POLICY_ASSERT_OK(policy_test::append_random(kept, m, *fa, round % 3, 200 + 20 * round, 9, r1));
    POLICY_ASSERT_OK(policy_test::append_random(computed, scratch, *fb, round % 3, 200 + 20 * round, 9, r2));
    score_map rk, rc;
    const auto budget = kvc::budget::uniform::keep_fraction(0.7);
    compress_ok(kept, *fa, kvc::all_layers, kvc::evict(policy_test::recording<kvc::score::knorm>{{}, &rk}, budget));
    compress_ok(computed, *fb, kvc::all_layers, kvc::evict(policy_test::recording<kvc::score::knorm>{{}, &rc}, budget));
    for (int l = 0; l < small_shape.num_layers; ++l)
      for (int h = 0; h < small_shape.num_kv_heads; ++h) {
        const std::vector<double> ref = policy_test::knorm_reference(m.stream(l, h));
        const std::vector<float>& sk = rk[{l, h}];
        ASSERT_EQ(sk.size(), ref.size());
        for (std::size_t i = 0; i < ref.size(); ++i) EXPECT_NEAR(sk[i], ref[i], 1e-6 * std::fabs(ref[i]));
        EXPECT_EQ(sk, (rc[{l, h}]));
        m.keep(l, h, policy_test::brute_top_k(ref, round_keep(static_cast<int>(ref.size()), 0.7)));
      }
    ASSERT_TRUE(policy_test::cache_equals(kept, *fa, m));
  }
  // The parent kept its own norms through the fork.
  score_map rp;
  compress_ok(kept, a, kvc::all_layers,
              kvc::evict(policy_test::recording<kvc::score::knorm>{{}, &rp}, kvc::budget::uniform::keep_fraction(1.0)));
  const std::vector<double> ref = policy_test::knorm_reference(parent.stream(1, 1));
  const std::vector<float>& sp = rp[{1, 1}];
  ASSERT_EQ(sp.size(), ref.size());
  for (std::size_t i = 0; i < ref.size(); ++i) EXPECT_NEAR(sp[i], ref[i], 1e-6 * std::fabs(ref[i]));
}

// ====================================================================== random

// Appends `n` tokens at positions 5 + 3i to every layer of a 4-layer, 2-KV-head cache.
template <class Cache>
kvc::seq_id build_random_case(Cache& cache, mirror& m, unsigned data_seed, int n) {
  std::mt19937 rng(data_seed);
  const kvc::seq_id seq = cache.create_sequence();
  for (int l = 0; l < cache.shape().num_layers; ++l)
    EXPECT_TRUE(policy_test::append_random(cache, m, seq, l, 5, n, rng, 3).ok());
  return seq;
}

std::vector<std::vector<std::int32_t>> kept_positions(const kvc::paged_kv_cache<kvc::codec::f32>& cache,
                                                      kvc::seq_id seq) {
  std::vector<std::vector<std::int32_t>> r;
  for (int l = 0; l < cache.shape().num_layers; ++l)
    for (int h = 0; h < cache.shape().num_kv_heads; ++h) r.push_back(cache.view(seq, l, h)->positions());
  return r;
}

const kvc::model_shape random_shape{4, 2, 2, 4};

// The random baseline is a deterministic function of its seed: two identical caches
// (and a fork) compressed with the same seed keep the same tokens; a different seed
// keeps a different, roughly independent half (overlap about k^2 / n).
TEST(Random, DeterministicForASeedDifferentAcrossSeeds) {
  using cache_t = kvc::paged_kv_cache<kvc::codec::f32>;
  const auto run = [](std::uint64_t seed, bool via_fork) {
    cache_t cache = policy_test::make_cache<cache_t>(policy_test::make_config(random_shape, 16));
    mirror m(random_shape);
    kvc::seq_id seq = build_random_case(cache, m, 5, 100);
    if (via_fork) seq = *cache.fork(seq);
    compress_ok(cache, seq, kvc::all_layers,
                kvc::evict(kvc::score::random{seed}, kvc::budget::uniform::keep_fraction(0.5)));
    return kept_positions(cache, seq);
  };
  const auto a = run(1, false), b = run(1, false), c = run(1, true), d = run(2, false);
  EXPECT_EQ(a, b);
  EXPECT_EQ(a, c);
  std::size_t overlap = 0, total = 0;
  for (std::size_t s = 0; s < a.size(); ++s) {
    ASSERT_EQ(a[s].size(), 50u);
    ASSERT_EQ(d[s].size(), 50u);
    EXPECT_NE(a[s], d[s]) << "stream " << s;
    std::vector<std::int32_t> both;
    std::set_intersection(a[s].begin(), a[s].end(), d[s].begin(), d[s].end(), std::back_inserter(both));
    overlap += both.size();
    total += a[s].size();
  }
  const double frac = static_cast<double>(overlap) / static_cast<double>(total);
  EXPECT_GT(frac, 0.4);
  EXPECT_LT(frac, 0.6);
}

// Random eviction keeps every position with the same probability: with keep 1/2 on 8
// streams of 512 tokens, the kept count in each of 16 position buckets (256 tokens,
// 128 expected) passes Pearson's chi-square test at the 0.1% level (df = 15,
// critical value 37.70), for each of five fixed seeds.
TEST(Random, KeptFractionIsUniformOverPositions) {
  using cache_t = kvc::paged_kv_cache<kvc::codec::f32>;
  const int n = 512, buckets = 16, per_bucket = n / buckets;
  for (std::uint64_t seed = 1; seed <= 5; ++seed) {
    cache_t cache = policy_test::make_cache<cache_t>(policy_test::make_config(random_shape, 16, 1024));
    mirror m(random_shape);
    const kvc::seq_id seq = build_random_case(cache, m, 9, n);
    compress_ok(cache, seq, kvc::all_layers,
                kvc::evict(kvc::score::random{seed}, kvc::budget::uniform::keep_fraction(0.5)));
    std::vector<int> kept(buckets, 0);
    int streams = 0;
    for (const auto& s : kept_positions(cache, seq)) {
      EXPECT_EQ(s.size(), static_cast<std::size_t>(n / 2));
      for (std::int32_t p : s) ++kept[static_cast<std::size_t>((p - 5) / 3 / per_bucket)];
      ++streams;
    }
    const double total = static_cast<double>(streams * per_bucket), expected = total / 2.0;
    double chi2 = 0.0;
    for (int b : kept) {
      chi2 += (b - expected) * (b - expected) / expected;                            // kept
      chi2 += (total - b - expected) * (total - b - expected) / (total - expected);  // evicted
    }
    EXPECT_LT(chi2, 37.70) << "seed " << seed;
  }
}

// random.hpp: a token's score depends on (seed, layer, kv_head, position) only. Two
// caches with different keys and values, one thinned before scoring and compressed
// layer by layer in reverse order, give every shared (layer, kv_head, position) the
// same score; different layers or heads give different scores.
TEST(Random, ScoreDependsOnSeedLayerHeadPositionOnly) {
  using cache_t = kvc::paged_kv_cache<kvc::codec::f32>;
  const int n = 100;
  cache_t a_cache = policy_test::make_cache<cache_t>(policy_test::make_config(random_shape, 16));
  cache_t b_cache = policy_test::make_cache<cache_t>(policy_test::make_config(random_shape, 7));
  mirror ma(random_shape), mb(random_shape);
  const kvc::seq_id a = build_random_case(a_cache, ma, 1, n);
  const kvc::seq_id b = build_random_case(b_cache, mb, 2, n);
  const auto thin = [](int l, int h, std::int32_t p) { return (p + l + h) % 7 != 0; };
  compress_ok(b_cache, b, kvc::all_layers, policy_test::keep_if{thin, nullptr});

  score_map sa, sb;
  const kvc::score::random rnd{77};
  compress_ok(a_cache, a, kvc::all_layers,
              kvc::evict(policy_test::recording<kvc::score::random>{rnd, &sa}, kvc::budget::uniform::tokens(n)));
  for (int l = random_shape.num_layers - 1; l >= 0; --l)
    compress_ok(b_cache, b, l,
                kvc::evict(policy_test::recording<kvc::score::random>{rnd, &sb}, kvc::budget::uniform::tokens(n)));
  for (int l = 0; l < random_shape.num_layers; ++l)
    for (int h = 0; h < random_shape.num_kv_heads; ++h) {
      const std::vector<std::int32_t> pa = positions_of(ma.stream(l, h));
      const std::vector<std::int32_t> pb = b_cache.view(b, l, h)->positions();
      ASSERT_LT(pb.size(), pa.size());
      const std::vector<float>& xa = sa[{l, h}];
      const std::vector<float>& xb = sb[{l, h}];
      ASSERT_EQ(xa.size(), pa.size());
      ASSERT_EQ(xb.size(), pb.size());
      for (std::size_t i = 0; i < pb.size(); ++i) {
        const std::size_t j = static_cast<std::size_t>(std::find(pa.begin(), pa.end(), pb[i]) - pa.begin());
        ASSERT_LT(j, pa.size());
        EXPECT_EQ(xb[i], xa[j]) << "layer " << l << ", kv_head " << h << ", position " << pb[i];
      }
    }
  EXPECT_NE(sa[std::make_pair(0, 0)], sa[std::make_pair(0, 1)]);
  EXPECT_NE(sa[std::make_pair(0, 0)], sa[std::make_pair(1, 0)]);
}

// ====================================================================== oracle

// The oracle's score of token i (oracle.hpp; the "oracle" of DESIGN.md Sec. 3): the
// softmax attention q_r . k_i / sqrt(d) + log_weight_i over the tokens with position
// <= position_r, reduced over every future query r and every query head of the KV
// head's group (mean over all rows, or max). Naive, in double.
std::vector<double> oracle_reference(const std::vector<token>& s, const std::vector<float>& q,
                                     const std::vector<std::int32_t>& q_pos, int kv_head, const kvc::model_shape& sh,
                                     bool use_max) {
  const int d = sh.head_dim, g = sh.group_size();
  const std::size_t n = s.size();
  std::vector<double> out(n, 0.0);
  const double rows = static_cast<double>(q_pos.size()) * g;
  for (std::size_t r = 0; r < q_pos.size(); ++r)
    for (int j = 0; j < g; ++j) {
      const float* qr = q.data() + (r * sh.num_q_heads + static_cast<std::size_t>(kv_head * g + j)) * d;
      std::vector<double> logit(n);
      double mx = -std::numeric_limits<double>::infinity();
      for (std::size_t i = 0; i < n; ++i) {
        if (s[i].position > q_pos[r]) continue;
        double dot = 0.0;
        for (int e = 0; e < d; ++e) dot += static_cast<double>(qr[e]) * s[i].key[static_cast<std::size_t>(e)];
        logit[i] = dot / std::sqrt(static_cast<double>(d));
        mx = std::max(mx, logit[i]);
      }
      if (mx == -std::numeric_limits<double>::infinity()) continue;  // this query sees nothing
      double sum = 0.0;
      for (std::size_t i = 0; i < n; ++i)
        if (s[i].position <= q_pos[r]) sum += std::exp(logit[i] - mx);
      for (std::size_t i = 0; i < n; ++i) {
        if (s[i].position > q_pos[r]) continue;
        const double a = std::exp(logit[i] - mx) / sum;
        out[i] = use_max ? std::max(out[i], a) : out[i] + a / rows;
      }
    }
  return out;
}

std::vector<float> gaussian(std::size_t n, std::mt19937& rng, float sigma = 1.0f) {
  std::normal_distribution<float> normal(0.0f, sigma);
  std::vector<float> x(n);
  for (float& e : x) e = normal(rng);
  return x;
}

// Oracle scores equal the naive double-precision softmax reference, with GQA group
// mean and max, causal masking by position (one query sees no token, one layer's
// queries see only a prefix, so later tokens score exactly 0), on streams thinned by
// an earlier compress; and evict(oracle) keeps tokens whose reference score is at
// least that of every evicted token.
TEST(Oracle, ScoresAreMeanAttentionOfFutureQueries) {
  using cache_t = kvc::paged_kv_cache<kvc::codec::f32>;
  const kvc::model_shape shape{2, 8, 2, 16};  // group of 4
  cache_t cache = policy_test::make_cache<cache_t>(policy_test::make_config(shape, 8));
  mirror m(shape);
  std::mt19937 rng(21);
  const kvc::seq_id seq = cache.create_sequence();
  for (int l = 0; l < 2; ++l) POLICY_ASSERT_OK(policy_test::append_random(cache, m, seq, l, 0, 40, rng));
  const auto thin = [](int, int h, std::int32_t p) { return p % 5 != h; };
  compress_ok(cache, seq, kvc::all_layers, policy_test::keep_if{thin, nullptr});
  policy_test::mirror_keep_if(m, thin);

  const std::vector<std::vector<std::int32_t>> q_pos{{-1, 12, 25, 39, 60}, {5, 20}};
  std::vector<std::vector<float>> q;
  std::vector<kvc::score::future_queries> fq;
  for (int l = 0; l < 2; ++l)
    q.push_back(gaussian(q_pos[static_cast<std::size_t>(l)].size() * shape.num_q_heads * shape.head_dim, rng, 1.5f));
  for (int l = 0; l < 2; ++l)
    fq.push_back({q[static_cast<std::size_t>(l)].data(), q_pos[static_cast<std::size_t>(l)].data(),
                  static_cast<int>(q_pos[static_cast<std::size_t>(l)].size())});

  for (bool use_max : {false, true}) {
    SCOPED_TRACE(use_max ? "max" : "mean");
    kvc::score::oracle oracle;
    oracle.layers = kvc::span<const kvc::score::future_queries>(fq.data(), fq.size());
    oracle.reduce = use_max ? kvc::score::group_reduce::max : kvc::score::group_reduce::mean;
    // Scores, through a recording wrapper on a fork that keeps everything.
    auto fork = cache.fork(seq);
    ASSERT_TRUE(fork.ok());
    score_map rec;
    compress_ok(
        cache, *fork, kvc::all_layers,
        kvc::evict(policy_test::recording<kvc::score::oracle>{oracle, &rec}, kvc::budget::uniform::tokens(1000)));
    for (int l = 0; l < 2; ++l)
      for (int h = 0; h < 2; ++h) {
        const std::vector<token>& s = m.stream(l, h);
        const std::vector<double> ref =
            oracle_reference(s, q[static_cast<std::size_t>(l)], q_pos[static_cast<std::size_t>(l)], h, shape, use_max);
        const std::vector<float>& x = rec[{l, h}];
        ASSERT_EQ(x.size(), s.size());
        double total = 0.0;
        for (std::size_t i = 0; i < s.size(); ++i) {
          EXPECT_NEAR(x[i], ref[i], 1e-6 + 1e-4 * ref[i]) << "layer " << l << ", kv_head " << h << ", token " << i;
          if (s[i].position > 20 && l == 1) {
            EXPECT_EQ(x[i], 0.0f) << "a token no query sees must score 0";
          }
          total += ref[i];
        }
        // Mean over rows of probability vectors: the mass is the fraction of rows that see a token.
        if (!use_max) {
          EXPECT_NEAR(total, l == 0 ? 4.0 / 5.0 : 1.0, 1e-9);
        }
      }
    POLICY_ASSERT_OK(cache.release(*fork));

    // evict(oracle, tokens(9)): no evicted token has a higher reference score than a kept one.
    fork = cache.fork(seq);
    ASSERT_TRUE(fork.ok());
    compress_ok(cache, *fork, kvc::all_layers, kvc::evict(oracle, kvc::budget::uniform::tokens(9)));
    for (int l = 0; l < 2; ++l)
      for (int h = 0; h < 2; ++h) {
        const std::vector<token>& s = m.stream(l, h);
        const std::vector<double> ref =
            oracle_reference(s, q[static_cast<std::size_t>(l)], q_pos[static_cast<std::size_t>(l)], h, shape, use_max);
        const std::vector<std::int32_t> kept = cache.view(*fork, l, h)->positions();
        ASSERT_EQ(kept.size(), 9u);
        double min_kept = 1e300, max_evicted = -1.0;
        std::vector<int> kept_idx;
        for (std::size_t i = 0; i < s.size(); ++i) {
          if (std::find(kept.begin(), kept.end(), s[i].position) != kept.end()) {
            min_kept = std::min(min_kept, ref[i]);
            kept_idx.push_back(static_cast<int>(i));
          } else {
            max_evicted = std::max(max_evicted, ref[i]);
          }
        }
        EXPECT_GE(min_kept, max_evicted - 1e-6) << "layer " << l << ", kv_head " << h;
        EXPECT_TRUE(policy_test::stream_equals(cache, *fork, l, h, policy_test::pick(s, kept_idx)));
      }
    POLICY_ASSERT_OK(cache.release(*fork));
  }

  // Too few layers of future queries: invalid_argument, nothing changes.
  kvc::score::oracle short_oracle;
  short_oracle.layers = kvc::span<const kvc::score::future_queries>(fq.data(), 1);
  const policy_test::cache_snapshot before = policy_test::snapshot(cache, seq);
  auto r = cache.compress(seq, kvc::evict(short_oracle, kvc::budget::uniform::tokens(9)));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), kvc::status_code::invalid_argument);
  EXPECT_TRUE(policy_test::snapshot(cache, seq) == before);
}

// Dense softmax attention of queries q [nq][num_q_heads][d] over every token of each
// stream of one layer, in double: the uncompressed output.
std::vector<double> dense_attention(const mirror& m, int layer, const std::vector<float>& q, int nq) {
  const kvc::model_shape& sh = m.shape();
  const int d = sh.head_dim, g = sh.group_size();
  std::vector<double> out(static_cast<std::size_t>(nq) * sh.num_q_heads * d, 0.0);
  for (int r = 0; r < nq; ++r)
    for (int qh = 0; qh < sh.num_q_heads; ++qh) {
      const std::vector<token>& s = m.stream(layer, qh / g);
      const float* qr = q.data() + (static_cast<std::size_t>(r) * sh.num_q_heads + qh) * d;
      std::vector<double> logit(s.size());
      double mx = -std::numeric_limits<double>::infinity(), sum = 0.0;
      for (std::size_t i = 0; i < s.size(); ++i) {
        double dot = 0.0;
        for (int e = 0; e < d; ++e) dot += static_cast<double>(qr[e]) * s[i].key[static_cast<std::size_t>(e)];
        logit[i] = dot / std::sqrt(static_cast<double>(d));
        mx = std::max(mx, logit[i]);
      }
      double* o = out.data() + (static_cast<std::size_t>(r) * sh.num_q_heads + qh) * d;
      for (std::size_t i = 0; i < s.size(); ++i) {
        const double p = std::exp(logit[i] - mx);
        sum += p;
        for (int e = 0; e < d; ++e) o[e] += p * s[i].value[static_cast<std::size_t>(e)];
      }
      for (int e = 0; e < d; ++e) o[e] /= sum;
    }
  return out;
}

// With a few planted heavy tokens per stream (keys and future queries share a
// direction, so those tokens take most of the attention), the oracle at keep k = n/8
// reproduces the future queries' attention output far better than random or
// StreamingLLM at the same budget: the upper bound DESIGN.md Sec. 5 compares against.
TEST(Oracle, BeatsRandomAndStreamingOnPlantedHeavyTokens) {
  using cache_t = kvc::paged_kv_cache<kvc::codec::f32>;
  const kvc::model_shape shape{2, 4, 2, 32};
  const int n = 256, nq = 8, keep = n / 8, d = shape.head_dim;
  cache_t cache = policy_test::make_cache<cache_t>(policy_test::make_config(shape, 16));
  mirror m(shape);
  std::mt19937 rng(31);
  const kvc::seq_id seq = cache.create_sequence();
  std::vector<std::vector<float>> q(2);
  std::vector<std::int32_t> q_pos(nq);
  std::iota(q_pos.begin(), q_pos.end(), n);
  std::vector<std::int32_t> pos(n);
  std::iota(pos.begin(), pos.end(), 0);
  std::uniform_int_distribution<int> where(16, 200);
  for (int l = 0; l < 2; ++l) {
    std::vector<float> k = gaussian(static_cast<std::size_t>(n) * 2 * d, rng), v = gaussian(k.size(), rng);
    q[static_cast<std::size_t>(l)] = gaussian(static_cast<std::size_t>(nq) * shape.num_q_heads * d, rng);
    for (int h = 0; h < 2; ++h) {
      std::vector<float> u = gaussian(static_cast<std::size_t>(d), rng);
      const float norm = std::sqrt(std::inner_product(u.begin(), u.end(), u.begin(), 0.0f));
      for (float& x : u) x *= 6.0f / norm;
      for (int j = 0; j < 8; ++j) {  // heavy tokens: key += 6 u
        const int t = where(rng);
        for (int e = 0; e < d; ++e) k[(static_cast<std::size_t>(t) * 2 + h) * d + e] += u[static_cast<std::size_t>(e)];
      }
      for (int r = 0; r < nq; ++r)  // every query head of the group: query += 6 u
        for (int j = 0; j < shape.group_size(); ++j)
          for (int e = 0; e < d; ++e)
            q[static_cast<std::size_t>(l)][(static_cast<std::size_t>(r) * shape.num_q_heads + h * 2 + j) * d + e] +=
                u[static_cast<std::size_t>(e)];
    }
    POLICY_ASSERT_OK(cache.append(seq, l, k.data(), v.data(), pos.data(), n));
    m.append(l, k, v, pos);
  }
  std::vector<kvc::score::future_queries> fq;
  for (int l = 0; l < 2; ++l) fq.push_back({q[static_cast<std::size_t>(l)].data(), q_pos.data(), nq});
  kvc::score::oracle oracle;
  oracle.layers = kvc::span<const kvc::score::future_queries>(fq.data(), fq.size());

  // Relative L2 error of the cache's attention output against the dense double reference.
  const auto error = [&](kvc::seq_id s) {
    double num = 0.0, den = 0.0;
    for (int l = 0; l < 2; ++l) {
      std::vector<float> out(q[static_cast<std::size_t>(l)].size());
      EXPECT_TRUE(cache.attend(s, l, q[static_cast<std::size_t>(l)].data(), q_pos.data(), nq, out.data()).ok());
      const std::vector<double> ref = dense_attention(m, l, q[static_cast<std::size_t>(l)], nq);
      for (std::size_t i = 0; i < out.size(); ++i) {
        num += (out[i] - ref[i]) * (out[i] - ref[i]);
        den += ref[i] * ref[i];
      }
    }
    return std::sqrt(num / den);
  };
  const auto compressed_error = [&](auto policy) {
    auto fork = cache.fork(seq);
    EXPECT_TRUE(fork.ok());
    compress_ok(cache, *fork, kvc::all_layers, policy);
    const double e = error(*fork);
    EXPECT_TRUE(cache.release(*fork).ok());
    return e;
  };
  const auto budget = kvc::budget::uniform::tokens(keep);
  const double full = error(seq);
  const double e_oracle = compressed_error(kvc::evict(oracle, budget));
  const double e_random = compressed_error(kvc::evict(kvc::score::random{3}, budget));
  const double e_streaming = compressed_error(kvc::evict(kvc::score::streaming{}, budget));
  EXPECT_LT(full, 1e-5) << "the uncompressed cache must match the dense reference";
  EXPECT_LT(e_oracle, 0.5 * e_random) << "oracle " << e_oracle << ", random " << e_random;
  EXPECT_LT(e_oracle, 0.5 * e_streaming) << "oracle " << e_oracle << ", streaming " << e_streaming;
  EXPECT_LT(e_oracle, 0.3);
}

// ====================================================================== budget::uniform

// uniform.hpp: keep_fraction(f) keeps round(n f) of n tokens (halves away from zero),
// compression_ratio(c) is keep_fraction(1 - c), tokens(k) keeps min(n, k).
TEST(UniformBudget, RoundingRule) {
  const kvc::model_shape shape{1, 1, 1, 4};
  std::vector<kvc::stream_info> infos;
  for (int n = 0; n <= 41; ++n) infos.push_back({0, 0, n});
  kvc::budget_request req;
  req.shape = &shape;
  req.num_streams = static_cast<int>(infos.size());
  req.streams = infos.data();
  std::vector<std::int32_t> keep(infos.size());
  for (double f : {0.0, 0.1, 0.25, 0.3, 1.0 / 3.0, 0.5, 0.7, 0.875, 0.99, 1.0}) {
    POLICY_ASSERT_OK(kvc::budget::uniform::keep_fraction(f).allocate(req, keep.data()));
    for (int n = 0; n <= 41; ++n)
      EXPECT_EQ(keep[static_cast<std::size_t>(n)], round_keep(n, f)) << "f " << f << ", n " << n;
    POLICY_ASSERT_OK(kvc::budget::uniform::compression_ratio(f).allocate(req, keep.data()));
    for (int n = 0; n <= 41; ++n)
      EXPECT_EQ(keep[static_cast<std::size_t>(n)], round_keep(n, 1.0 - f)) << "c " << f << ", n " << n;
  }
  // Exact halves round up: 0.5 * {1, 3, 5} -> {1, 2, 3}.
  POLICY_ASSERT_OK(kvc::budget::uniform::keep_fraction(0.5).allocate(req, keep.data()));
  EXPECT_EQ(keep[1], 1);
  EXPECT_EQ(keep[3], 2);
  EXPECT_EQ(keep[5], 3);
  for (std::int64_t k : {std::int64_t{0}, std::int64_t{1}, std::int64_t{17}, std::int64_t{1} << 40}) {
    POLICY_ASSERT_OK(kvc::budget::uniform::tokens(k).allocate(req, keep.data()));
    for (int n = 0; n <= 41; ++n)
      EXPECT_EQ(keep[static_cast<std::size_t>(n)], std::min<std::int64_t>(n, k)) << "k " << k << ", n " << n;
  }
}

// uniform.hpp ranges: f and c in [0, 1], k >= 0. Anything else (including NaN and
// infinity) is status_code::invalid_budget, and compress leaves the cache unchanged.
// The range ends are valid: keep nothing frees every page, keep everything changes nothing.
TEST(UniformBudget, InvalidRangesLeaveTheCacheUnchanged) {
  using cache_t = kvc::paged_kv_cache<kvc::codec::f16>;
  cache_t cache = policy_test::make_cache<cache_t>(policy_test::make_config(small_shape, 8));
  mirror m(small_shape);
  std::mt19937 rng(5);
  const kvc::seq_id seq = cache.create_sequence();
  ASSERT_NO_FATAL_FAILURE(build_varied(cache, m, seq, rng));
  const policy_test::cache_snapshot before = policy_test::snapshot(cache, seq);
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  const kvc::budget::uniform bad[] = {
      kvc::budget::uniform::keep_fraction(-0.01),
      kvc::budget::uniform::keep_fraction(1.01),
      kvc::budget::uniform::keep_fraction(nan),
      kvc::budget::uniform::keep_fraction(inf),
      kvc::budget::uniform::compression_ratio(-0.5),
      kvc::budget::uniform::compression_ratio(2.0),
      kvc::budget::uniform::compression_ratio(nan),
      kvc::budget::uniform::compression_ratio(-inf),
      kvc::budget::uniform::tokens(-1),
  };
  for (const kvc::budget::uniform& b : bad) {
    for (int layer : {kvc::all_layers, 1}) {
      auto r = cache.compress(seq, layer, kvc::evict(kvc::score::knorm{}, b));
      ASSERT_FALSE(r.ok());
      EXPECT_EQ(r.status().code(), kvc::status_code::invalid_budget) << r.status().message();
      EXPECT_TRUE(policy_test::snapshot(cache, seq) == before);
    }
  }
  compress_ok(cache, seq, kvc::all_layers, kvc::evict(kvc::score::knorm{}, kvc::budget::uniform::keep_fraction(1.0)));
  EXPECT_TRUE(policy_test::snapshot(cache, seq) == before);
  compress_ok(cache, seq, kvc::all_layers,
              kvc::evict(kvc::score::knorm{}, kvc::budget::uniform::compression_ratio(0.0)));
  EXPECT_TRUE(policy_test::snapshot(cache, seq) == before);
  const kvc::compress_report rep = compress_ok(
      cache, seq, kvc::all_layers, kvc::evict(kvc::score::knorm{}, kvc::budget::uniform::compression_ratio(1.0)));
  EXPECT_EQ(rep.tokens_after, 0);
  EXPECT_EQ(rep.bytes_after, 0u);
  EXPECT_GT(rep.pages_freed, 0);
  EXPECT_EQ(cache.stats().bytes_in_use, 0u);
  EXPECT_EQ(cache.stats().tokens_retained, 0);
  // Empty streams are fine for every scorer and budget.
  const kvc::compress_report empty = compress_ok(
      cache, seq, kvc::all_layers, kvc::evict(kvc::score::knorm{}, kvc::budget::uniform::keep_fraction(0.5)));
  EXPECT_EQ(empty.tokens_before, 0);
  EXPECT_EQ(empty.tokens_after, 0);
}

// ====================================================================== evict errors

// evict.hpp: scores may be +-inf but not NaN. A scorer that gives one token of the
// last layer NaN makes compress fail with non_finite before anything is applied.
TEST(EvictErrors, NanScoreIsNonFiniteAndChangesNothing) {
  using cache_t = kvc::paged_kv_cache<kvc::codec::f32>;
  cache_t cache = policy_test::make_cache<cache_t>(policy_test::make_config(small_shape, 8));
  mirror m(small_shape);
  std::mt19937 rng(6);
  const kvc::seq_id seq = cache.create_sequence();
  ASSERT_NO_FATAL_FAILURE(build_varied(cache, m, seq, rng));
  const policy_test::cache_snapshot before = policy_test::snapshot(cache, seq);
  const std::int32_t victim = m.stream(2, 1)[3].position;
  policy_test::function_scorer nan_scorer{[victim](int l, int h, std::int32_t p) {
    return l == 2 && h == 1 && p == victim ? std::numeric_limits<float>::quiet_NaN() : static_cast<float>(p);
  }};
  for (int layer : {kvc::all_layers, 2}) {
    auto r = cache.compress(seq, layer, kvc::evict(nan_scorer, kvc::budget::uniform::keep_fraction(0.5)));
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), kvc::status_code::non_finite) << r.status().message();
    EXPECT_TRUE(policy_test::snapshot(cache, seq) == before);
  }
  // The same scorer on a layer without the NaN works.
  compress_ok(cache, seq, 0, kvc::evict(nan_scorer, kvc::budget::uniform::keep_fraction(0.5)));
}

// Infinite scores are ordinary scores: +inf tokens are kept first, -inf tokens evicted
// first; the kept set is the brute-force top-k of the same scores in double.
TEST(EvictErrors, InfiniteScoresAreAllowed) {
  using cache_t = kvc::paged_kv_cache<kvc::codec::f32>;
  cache_t cache = policy_test::make_cache<cache_t>(policy_test::make_config(small_shape, 8));
  mirror m(small_shape);
  std::mt19937 rng(8);
  const kvc::seq_id seq = cache.create_sequence();
  ASSERT_NO_FATAL_FAILURE(build_varied(cache, m, seq, rng));
  const auto f = [](int l, int h, std::int32_t p) {
    const float inf = std::numeric_limits<float>::infinity();
    return p % 5 == 0 ? inf : p % 5 == 1 ? -inf : static_cast<float>((p * 7 + l + h) % 11);
  };
  for (double frac : {0.1, 0.5, 0.9}) {
    auto fork = cache.fork(seq);
    ASSERT_TRUE(fork.ok());
    compress_ok(cache, *fork, kvc::all_layers,
                kvc::evict(policy_test::function_scorer{f}, kvc::budget::uniform::keep_fraction(frac)));
    for (int l = 0; l < 3; ++l)
      for (int h = 0; h < 2; ++h) {
        const std::vector<token>& s = m.stream(l, h);
        std::vector<double> ref;
        for (const token& t : s) ref.push_back(f(l, h, t.position));
        const std::vector<int> kept = policy_test::brute_top_k(ref, round_keep(static_cast<int>(s.size()), frac));
        EXPECT_TRUE(policy_test::stream_equals(cache, *fork, l, h, policy_test::pick(s, kept))) << "frac " << frac;
      }
    POLICY_ASSERT_OK(cache.release(*fork));
  }
}

struct failing_budget {
  kvc::status allocate(const kvc::budget_request&, std::int32_t*) const {
    return kvc::status::error(kvc::status_code::invalid_budget, "test budget refuses");
  }
};

struct failing_scorer {
  static constexpr const char* name = "failing";
  static constexpr kvc::stream_fields fields = kvc::stream_fields::keys;
  kvc::status score(const kvc::stream_data& s, kvc::workspace&, float* out) const {
    for (int i = 0; i < s.size(); ++i) out[i] = 0.0f;
    if (s.info.layer == 1) return kvc::status::error(kvc::status_code::out_of_range, "test scorer refuses");
    return kvc::ok_status();
  }
};

// budget.hpp: a budget must keep between 0 and n tokens per stream. A custom budget
// that asks for n + 1 or -1 in one stream gives invalid_budget; a budget's or a
// scorer's own error comes back as is; a workspace too small for the scores gives
// workspace_exhausted. Each time the cache is unchanged.
TEST(EvictErrors, BadBudgetsAndFailingPartsChangeNothing) {
  using cache_t = kvc::paged_kv_cache<kvc::codec::bf16>;
  cache_t cache = policy_test::make_cache<cache_t>(policy_test::make_config(small_shape, 8));
  mirror m(small_shape);
  std::mt19937 rng(9);
  const kvc::seq_id seq = cache.create_sequence();
  ASSERT_NO_FATAL_FAILURE(build_varied(cache, m, seq, rng));
  const policy_test::cache_snapshot before = policy_test::snapshot(cache, seq);
  const auto expect_fails = [&](kvc::status_code code, auto policy) {
    auto r = cache.compress(seq, policy);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), code) << r.status().message();
    EXPECT_TRUE(policy_test::snapshot(cache, seq) == before);
  };
  for (std::int32_t delta : {1, -1000}) {
    SCOPED_TRACE("delta " + std::to_string(delta));
    policy_test::function_budget b{[delta](const kvc::stream_info& s) {
      return s.layer == 1 && s.kv_head == 1 ? s.n_tokens + delta : s.n_tokens / 2;
    }};
    expect_fails(kvc::status_code::invalid_budget, kvc::evict(kvc::score::knorm{}, b));
  }
  policy_test::function_budget minus_one{[](const kvc::stream_info& s) { return s.layer == 2 ? -1 : s.n_tokens; }};
  expect_fails(kvc::status_code::invalid_budget, kvc::evict(kvc::score::streaming{}, minus_one));
  expect_fails(kvc::status_code::invalid_budget, kvc::evict(kvc::score::knorm{}, failing_budget{}));
  expect_fails(kvc::status_code::out_of_range, kvc::evict(failing_scorer{}, kvc::budget::uniform::tokens(3)));

  // Room for compress's own keep masks but not for every stream's scores.
  kvc::cache_config tiny = policy_test::make_config(small_shape, 8);
  tiny.workspace_bytes = 1024;
  cache_t small_ws = policy_test::make_cache<cache_t>(tiny);
  mirror m2(small_shape);
  const kvc::seq_id s2 = small_ws.create_sequence();
  for (int l = 0; l < 3; ++l) POLICY_ASSERT_OK(policy_test::append_random(small_ws, m2, s2, l, 0, 45, rng));
  const policy_test::cache_snapshot before2 = policy_test::snapshot(small_ws, s2);
  auto r = small_ws.compress(s2, kvc::evict(kvc::score::knorm{}, kvc::budget::uniform::keep_fraction(0.5)));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), kvc::status_code::workspace_exhausted) << r.status().message();
  EXPECT_TRUE(policy_test::snapshot(small_ws, s2) == before2);
}

// ====================================================================== scope

// DESIGN.md Sec. 2: compress(seq, layer, policy) hands the policy that layer's streams
// only and changes no other layer; compress(seq, policy) covers every layer in
// (layer, kv_head) order. The report counts the streams in scope.
TEST(CompressScope, OneLayerOrAllLayers) {
  using cache_t = kvc::paged_kv_cache<kvc::codec::f16>;
  cache_t cache = policy_test::make_cache<cache_t>(policy_test::make_config(small_shape, 8));
  mirror m(small_shape);
  std::mt19937 rng(10);
  const kvc::seq_id seq = cache.create_sequence();
  ASSERT_NO_FATAL_FAILURE(build_varied(cache, m, seq, rng));
  const policy_test::cache_snapshot before = policy_test::snapshot(cache, seq);
  const auto budget = kvc::budget::uniform::keep_fraction(0.5);

  for (int layer = 0; layer < 3; ++layer) {
    SCOPED_TRACE("layer " + std::to_string(layer));
    auto fork = cache.fork(seq);
    ASSERT_TRUE(fork.ok());
    // A custom policy first (it records what it is shown), then evict on the same layer.
    const auto half = [](int, int, std::int32_t p) { return p % 4 < 2; };
    std::vector<kvc::stream_info> seen;
    const kvc::compress_report rep = compress_ok(cache, *fork, layer, policy_test::keep_if{half, &seen});
    ASSERT_EQ(seen.size(), 2u);
    std::int64_t tokens_before = 0, tokens_after = 0;
    std::vector<std::vector<token>> expected(6);
    for (int l = 0; l < 3; ++l)
      for (int h = 0; h < 2; ++h) {
        const std::size_t si = static_cast<std::size_t>(l * 2 + h);
        const std::vector<token>& s = m.stream(l, h);
        EXPECT_EQ(rep.stream_tokens_before[si], static_cast<std::int32_t>(s.size()));
        if (l != layer) {
          EXPECT_EQ(rep.stream_tokens_after[si], static_cast<std::int32_t>(s.size()));
          continue;
        }
        EXPECT_EQ(seen[static_cast<std::size_t>(h)].layer, layer);
        EXPECT_EQ(seen[static_cast<std::size_t>(h)].kv_head, h);
        std::vector<int> idx;
        for (std::size_t i = 0; i < s.size(); ++i)
          if (half(l, h, s[i].position)) idx.push_back(static_cast<int>(i));
        const std::vector<token> halved = policy_test::pick(s, idx);
        EXPECT_EQ(rep.stream_tokens_after[si], static_cast<std::int32_t>(halved.size()));
        tokens_before += static_cast<std::int64_t>(s.size());
        tokens_after += static_cast<std::int64_t>(halved.size());
        const int k = round_keep(static_cast<int>(halved.size()), 0.5);
        expected[si] = policy_test::pick(halved, policy_test::brute_top_k(policy_test::knorm_reference(halved), k));
      }
    EXPECT_EQ(rep.tokens_before, tokens_before);
    EXPECT_EQ(rep.tokens_after, tokens_after);

    compress_ok(cache, *fork, layer, kvc::evict(kvc::score::knorm{}, budget));
    const policy_test::cache_snapshot after = policy_test::snapshot(cache, *fork);
    for (int l = 0; l < 3; ++l)
      for (int h = 0; h < 2; ++h) {
        const std::size_t si = static_cast<std::size_t>(l * 2 + h);
        if (l != layer)
          EXPECT_TRUE(after.streams[si] == before.streams[si]) << "layer " << l << " changed";
        else
          EXPECT_TRUE(policy_test::stream_equals(cache, *fork, l, h, expected[si]));
      }
    POLICY_ASSERT_OK(cache.release(*fork));
  }

  std::vector<kvc::stream_info> seen;
  const kvc::compress_report rep = compress_ok(
      cache, seq, kvc::all_layers, policy_test::keep_if{[](int, int, std::int32_t p) { return p % 3 != 0; }, &seen});
  ASSERT_EQ(seen.size(), 6u);
  for (std::size_t i = 0; i < seen.size(); ++i) {
    EXPECT_EQ(seen[i].layer, static_cast<int>(i) / 2);
    EXPECT_EQ(seen[i].kv_head, static_cast<int>(i) % 2);
    EXPECT_EQ(seen[i].n_tokens, static_cast<int>(m.stream(seen[i].layer, seen[i].kv_head).size()));
  }
  policy_test::mirror_keep_if(m, [](int, int, std::int32_t p) { return p % 3 != 0; });
  EXPECT_TRUE(policy_test::cache_equals(cache, seq, m));
  std::int64_t before_tokens = 0, after_tokens = 0;
  for (const auto& s : before.streams) before_tokens += static_cast<std::int64_t>(s.positions.size());
  for (int l = 0; l < 3; ++l)
    for (int h = 0; h < 2; ++h) after_tokens += static_cast<std::int64_t>(m.stream(l, h).size());
  EXPECT_EQ(rep.tokens_before, before_tokens);
  EXPECT_EQ(rep.tokens_after, after_tokens);
  EXPECT_LT(rep.bytes_after, rep.bytes_before);

  for (int layer : {3, -2}) {
    const policy_test::cache_snapshot now = policy_test::snapshot(cache, seq);
    auto r = cache.compress(seq, layer, kvc::evict(kvc::score::knorm{}, budget));
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), kvc::status_code::out_of_range);
    EXPECT_TRUE(policy_test::snapshot(cache, seq) == now);
  }
}

}  // namespace
