// Tests of the budgets beyond uniform: pyramid (PyramidKV's layer schedule), adakv (Ada-KV's
// head-wise top-B with its safeguard) and byte_cap (a byte budget for a sequence). Each is
// checked against the paper's formula or a brute-force reference written here, through
// allocate() directly and end to end through kvc::evict on a real cache.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include <kvc/budget/adakv.hpp>
#include <kvc/budget/byte_cap.hpp>
#include <kvc/budget/pyramid.hpp>
#include <kvc/kvc.hpp>

#include "policy_helpers.hpp"

namespace {

using policy_test::mirror;
using policy_test::token;
using score_map = std::map<std::pair<int, int>, std::vector<float>>;

// A budget request over every (layer, kv_head) of `shape`, stream i of length n[i], with
// the given scores; it owns its arrays.
struct request {
  kvc::model_shape shape;
  std::vector<kvc::stream_info> streams;
  std::vector<std::vector<float>> scores;
  std::vector<const float*> score_ptrs;
  kvc::workspace ws{std::size_t{1} << 20};

  request(kvc::model_shape s, const std::vector<int>& lengths, std::vector<std::vector<float>> sc = {})
      : shape(s), scores(std::move(sc)) {
    for (int l = 0; l < s.num_layers; ++l)
      for (int h = 0; h < s.num_kv_heads; ++h)
        streams.push_back({l, h, lengths[static_cast<std::size_t>(l * s.num_kv_heads + h)]});
    if (scores.empty()) scores.resize(streams.size());
    for (std::size_t i = 0; i < streams.size(); ++i) {
      scores[i].resize(static_cast<std::size_t>(streams[i].n_tokens), 0.0f);
      score_ptrs.push_back(scores[i].data());
    }
  }

  kvc::budget_request get(bool with_scratch = true) {
    kvc::budget_request r;
    r.shape = &shape;
    r.num_streams = static_cast<int>(streams.size());
    r.streams = streams.data();
    r.scores = score_ptrs.data();
    r.scratch = with_scratch ? &ws : nullptr;
    return r;
  }
};

template <class Budget>
std::vector<std::int32_t> allocate_ok(const Budget& b, const kvc::budget_request& r) {
  std::vector<std::int32_t> keep(static_cast<std::size_t>(r.num_streams), -1);
  const kvc::status st = b.allocate(r, keep.data());
  EXPECT_TRUE(st.ok()) << st.message();
  return keep;
}

// keep = round(n * f), halves away from zero: the rule of kvc/budget/uniform.hpp.
int round_keep(int n, double f) { return static_cast<int>(std::floor(static_cast<double>(n) * f + 0.5)); }

// Whole numbers stay whole under rounding noise.
double snap_whole(double v) { return std::fabs(v - std::round(v)) < 1e-9 ? std::round(v) : v; }

// ============================================================================ pyramid

// PyramidKV (Cai et al. 2024, arXiv:2406.02069, Sec. 4), written the way the paper states
// it: with T the total budget over L layers above the window (here the floor f, so T =
// L (k - f)), the top layer keeps T / (beta L), the bottom 2T / L minus that, and the
// layers between follow the arithmetic sequence; every layer keeps the f floor tokens on
// top. As in the authors' code, a bottom layer that would exceed the stream keeps all of
// it and the top takes up the difference. Returns the real-valued budget of every layer.
std::vector<double> paper_pyramid(int L, int n, int k, int f, double beta) {
  std::vector<double> v(static_cast<std::size_t>(L), static_cast<double>(k));
  if (L == 1 || k <= f) return v;
  const double T = static_cast<double>(L) * (k - f);
  double top = T / (beta * L);
  double bottom = 2.0 * T / L - top;
  if (bottom > n - f) {
    bottom = n - f;
    top = 2.0 * T / L - bottom;
  }
  for (int l = 0; l < L; ++l) v[static_cast<std::size_t>(l)] = snap_whole(f + bottom - (bottom - top) * l / (L - 1));
  return v;
}

// Whole tokens by largest remainder: floor every value, then one more token to each of
// the layers with the largest fractional parts (ties to the lower layer) until the total
// is L k. A full sort of (fraction, layer).
std::vector<int> largest_remainder(const std::vector<double>& v, std::int64_t total) {
  std::vector<int> c(v.size());
  std::vector<std::pair<double, int>> frac;
  std::int64_t sum = 0;
  for (std::size_t l = 0; l < v.size(); ++l) {
    c[l] = static_cast<int>(std::floor(v[l]));
    sum += c[l];
    frac.emplace_back(v[l] - std::floor(v[l]), static_cast<int>(l));
  }
  std::sort(frac.begin(), frac.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  for (std::int64_t i = 0; i < total - sum; ++i)
    ++c[static_cast<std::size_t>(frac[static_cast<std::size_t>(i)].second)];
  return c;
}

struct pyramid_case {
  int layers, heads, n;
  kvc::budget::pyramid budget;
  int k;  // what the uniform base keeps of n
};

// Sec. 4 of PyramidKV: the schedule of every layer equals the paper's formula evaluated
// directly (within one token, and exactly after the whole-token rule), all heads of a
// layer get the same count, the mean over layers equals the uniform budget exactly,
// counts never increase with the layer (lower layers keep more), never fall below the
// floor and never exceed the stream.
TEST(Pyramid, ScheduleMatchesPaperFormula) {
  using kvc::budget::pyramid;
  const pyramid_case cases[] = {
      {32, 8, 1000, pyramid::keep_fraction(0.25, 36), 250},   // Llama-like: 32 layers
      {32, 2, 4096, pyramid::tokens(512, 64), 512},           // the paper's 512-token budget
      {6, 2, 64, pyramid::compression_ratio(0.5, 8), 32},     // no cap
      {8, 2, 64, pyramid::tokens(40, 8), 40},                 // bottom capped at n
      {5, 1, 300, pyramid::keep_fraction(0.9, 10), 270},      // capped, steep
      {7, 3, 100, pyramid::keep_fraction(0.3, 10, 3.0), 30},  // another beta
      {4, 2, 50, pyramid::tokens(20, 20), 20},                // k == floor: uniform
      {4, 2, 50, pyramid::tokens(12, 20), 12},                // k < floor: uniform
      {1, 4, 50, pyramid::keep_fraction(0.5, 4), 25},         // one layer: uniform
      {9, 2, 80, pyramid::keep_fraction(0.5, 0, 1.0), 40},    // beta = 1: flat
      {16, 4, 33, pyramid::keep_fraction(1.0, 4), 33},        // keep all
      {16, 4, 33, pyramid::keep_fraction(0.0, 4), 0},         // keep none
  };
  for (const pyramid_case& c : cases) {
    SCOPED_TRACE("L " + std::to_string(c.layers) + ", n " + std::to_string(c.n) + ", k " + std::to_string(c.k) +
                 ", floor " + std::to_string(c.budget.floor_tokens()) + ", beta " + std::to_string(c.budget.beta()));
    request req({c.layers, c.heads, c.heads, 8}, std::vector<int>(static_cast<std::size_t>(c.layers * c.heads), c.n));
    const std::vector<std::int32_t> keep = allocate_ok(c.budget, req.get());
    const std::vector<double> ref = paper_pyramid(c.layers, c.n, c.k, c.budget.floor_tokens(), c.budget.beta());
    const std::vector<int> whole = largest_remainder(ref, static_cast<std::int64_t>(c.layers) * c.k);
    std::int64_t sum = 0;
    for (int l = 0; l < c.layers; ++l) {
      const std::int32_t kl = keep[static_cast<std::size_t>(l * c.heads)];
      for (int h = 1; h < c.heads; ++h) EXPECT_EQ(keep[static_cast<std::size_t>(l * c.heads + h)], kl) << "layer " << l;
      EXPECT_LT(std::fabs(kl - ref[static_cast<std::size_t>(l)]), 1.0) << "layer " << l;
      EXPECT_EQ(kl, whole[static_cast<std::size_t>(l)]) << "layer " << l;
      EXPECT_NEAR(kvc::budget::pyramid::value(l, c.layers, c.n, c.k, c.budget.floor_tokens(), c.budget.beta()),
                  ref[static_cast<std::size_t>(l)], 1e-9)
          << "layer " << l;
      EXPECT_LE(kl, c.n);
      EXPECT_GE(kl, std::min(c.k, c.budget.floor_tokens())) << "layer " << l << " below the floor";
      if (l > 0) {
        EXPECT_LE(kl, keep[static_cast<std::size_t>((l - 1) * c.heads)]) << "layer " << l << " grew";
      }
      sum += kl;
    }
    EXPECT_EQ(sum, static_cast<std::int64_t>(c.layers) * c.k) << "the mean over layers is not the uniform budget";
    if (c.layers > 1 && c.k > c.budget.floor_tokens() + c.budget.beta() && c.k < c.n && c.budget.beta() > 1.0) {
      EXPECT_GT(keep.front(), keep.back()) << "no pyramid";
    }
  }
}

// The worked numbers of the schedule for 6 layers, k = 32, floor 8, beta 20: top 9.2,
// bottom 54.8, step 9.12, i.e. 54.8, 45.68, 36.56, 27.44, 18.32, 9.2 (sum 192 = 6 * 32).
TEST(Pyramid, WorkedExample) {
  request req({6, 2, 2, 8}, std::vector<int>(12, 64));
  const std::vector<std::int32_t> keep = allocate_ok(kvc::budget::pyramid::keep_fraction(0.5, 8), req.get());
  const std::vector<int> expected{55, 46, 37, 27, 18, 9};  // floors 54 45 36 27 18 9 (+3: fractions .8 .68 .56)
  for (int l = 0; l < 6; ++l) EXPECT_EQ(keep[static_cast<std::size_t>(2 * l)], expected[static_cast<std::size_t>(l)]);
}

// Out-of-range parameters give invalid_budget with a message, from allocate() and from a
// compress() that then leaves the cache unchanged.
TEST(Pyramid, InvalidParameters) {
  using kvc::budget::pyramid;
  request req({4, 2, 2, 8}, std::vector<int>(8, 20));
  const pyramid bad[] = {pyramid::keep_fraction(0.5, -1), pyramid::keep_fraction(0.5, 4, 0.5),
                         pyramid::keep_fraction(0.5, 4, std::nan("")), pyramid::keep_fraction(1.5, 4),
                         pyramid::tokens(-3, 4)};
  for (const pyramid& b : bad) {
    std::vector<std::int32_t> keep(8);
    const kvc::status st = b.allocate(req.get(), keep.data());
    EXPECT_EQ(st.code(), kvc::status_code::invalid_budget) << st.message();
    const std::string msg = st.message();
    EXPECT_TRUE(msg.find("pyramid") != std::string::npos || msg.find("uniform") != std::string::npos) << msg;
  }
  using cache_t = kvc::paged_kv_cache<kvc::codec::f16>;
  cache_t cache = policy_test::make_cache<cache_t>(policy_test::make_config({2, 2, 1, 8}, 8));
  mirror m(cache.shape());
  std::mt19937 rng(3);
  const kvc::seq_id seq = cache.create_sequence();
  for (int l = 0; l < 2; ++l) POLICY_ASSERT_OK(policy_test::append_random(cache, m, seq, l, 0, 20, rng));
  const policy_test::cache_snapshot before = policy_test::snapshot(cache, seq);
  auto r = cache.compress(seq, kvc::evict(kvc::score::knorm{}, pyramid::keep_fraction(0.5, 4, 0.0)));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), kvc::status_code::invalid_budget);
  EXPECT_TRUE(policy_test::snapshot(cache, seq) == before);
}

// End to end: evict<knorm, pyramid> on a real cache gives every stream the schedule's count
// as its real length, and keeps that stream's top-k by K-norm (Devoto et al. 2024, score
// -||k||), checked against the test's own record of the appended tokens.
TEST(Pyramid, EvictOnCache) {
  using cache_t = kvc::paged_kv_cache<kvc::codec::f16>;
  const kvc::model_shape shape{6, 4, 2, 16};
  cache_t cache = policy_test::make_cache<cache_t>(policy_test::make_config(shape, 8));
  mirror m(shape);
  std::mt19937 rng(11);
  const kvc::seq_id seq = cache.create_sequence();
  for (int l = 0; l < 6; ++l) POLICY_ASSERT_OK(policy_test::append_random(cache, m, seq, l, 0, 64, rng));
  score_map rec;
  auto r = cache.compress(seq, kvc::evict(policy_test::recording<kvc::score::knorm>{{}, &rec},
                                          kvc::budget::pyramid::compression_ratio(0.5, 8)));
  ASSERT_TRUE(r.ok()) << r.status().message();
  const std::vector<double> ref = paper_pyramid(6, 64, 32, 8, 20.0);
  const std::vector<int> counts = largest_remainder(ref, 6 * 32);
  std::int64_t total = 0;
  for (int l = 0; l < 6; ++l)
    for (int h = 0; h < 2; ++h) {
      const int k = counts[static_cast<std::size_t>(l)];
      EXPECT_EQ(cache.view(seq, l, h)->size(), k);
      const std::vector<token>& s = m.stream(l, h);
      const std::vector<double> kn = policy_test::knorm_reference(s);
      const std::vector<float>& sc = rec[{l, h}];
      for (std::size_t i = 0; i < s.size(); ++i) EXPECT_NEAR(sc[i], kn[i], 1e-6 * std::fabs(kn[i]));
      EXPECT_TRUE(policy_test::stream_equals(
          cache, seq, l, h, policy_test::pick(s, policy_test::brute_top_k({sc.begin(), sc.end()}, k))));
      total += k;
    }
  EXPECT_EQ(total, 6 * 2 * 32);
  EXPECT_EQ(r->tokens_after, total);
}

// ============================================================================ adakv

// Ada-KV (Feng et al. 2024, arXiv:2407.11550, Algorithm 1 and its safeguard) by brute force
// for one layer: sort every (score, token, head) of the layer, best first (ties towards
// the more recent token, then the lower head); B*_i = head i's share of the first B; the
// safeguard s = floor(alpha B / h) and B_i = s + (B - h s) B*_i / B in whole tokens by
// largest remainder (ties to the lower head); heads shorter than B_i keep all, and the
// excess goes down the sorted list to the first tokens not yet kept of heads with room.
struct adakv_ref {
  std::vector<int> counts, won;
  std::int64_t safe = 0;
};

adakv_ref brute_adakv(const std::vector<std::vector<float>>& scores, const std::vector<int>& base, double alpha) {
  const int h = static_cast<int>(scores.size());
  adakv_ref out;
  out.counts = base;
  out.won.assign(static_cast<std::size_t>(h), 0);
  const std::int64_t B = std::accumulate(base.begin(), base.end(), std::int64_t{0});
  if (h == 1 || B == 0) return out;
  std::vector<std::tuple<float, int, int>> all;  // (score, token, head)
  for (int i = 0; i < h; ++i)
    for (std::size_t t = 0; t < scores[static_cast<std::size_t>(i)].size(); ++t)
      all.emplace_back(scores[static_cast<std::size_t>(i)][t], static_cast<int>(t), i);
  std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) {
    if (std::get<0>(a) != std::get<0>(b)) return std::get<0>(a) > std::get<0>(b);
    if (std::get<1>(a) != std::get<1>(b)) return std::get<1>(a) > std::get<1>(b);
    return std::get<2>(a) < std::get<2>(b);
  });
  for (std::int64_t j = 0; j < B; ++j)
    ++out.won[static_cast<std::size_t>(std::get<2>(all[static_cast<std::size_t>(j)]))];
  out.safe = static_cast<std::int64_t>(std::floor(alpha * static_cast<double>(B) / h + 1e-9));
  const std::int64_t shared = B - h * out.safe;
  std::vector<std::pair<std::int64_t, int>> rem;  // (remainder, head)
  std::int64_t sum = 0;
  for (int i = 0; i < h; ++i) {
    const std::int64_t num = shared * out.won[static_cast<std::size_t>(i)];
    out.counts[static_cast<std::size_t>(i)] = static_cast<int>(out.safe + num / B);
    rem.emplace_back(num % B, i);
    sum += out.counts[static_cast<std::size_t>(i)];
  }
  std::sort(rem.begin(), rem.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  for (std::int64_t j = 0; j < B - sum; ++j)
    ++out.counts[static_cast<std::size_t>(rem[static_cast<std::size_t>(j)].second)];
  std::int64_t excess = 0;
  for (int i = 0; i < h; ++i) {
    const int n = static_cast<int>(scores[static_cast<std::size_t>(i)].size());
    if (out.counts[static_cast<std::size_t>(i)] > n) {
      excess += out.counts[static_cast<std::size_t>(i)] - n;
      out.counts[static_cast<std::size_t>(i)] = n;
    }
  }
  std::vector<int> passed(static_cast<std::size_t>(h), 0);
  for (const auto& e : all) {
    if (excess == 0) break;
    const std::size_t i = static_cast<std::size_t>(std::get<2>(e));
    if (passed[i] == out.counts[i] && out.counts[i] < static_cast<int>(scores[i].size())) {
      ++out.counts[i];
      --excess;
    }
    ++passed[i];
  }
  return out;
}

// Scores with ties (a small set of values) and one concentrated head per layer (a few high
// scores, the rest low) next to spread heads.
std::vector<std::vector<float>> adakv_scores(const kvc::model_shape& s, const std::vector<int>& lengths,
                                             std::mt19937& rng) {
  std::vector<std::vector<float>> sc;
  std::uniform_int_distribution<int> level(0, 7);
  for (int l = 0; l < s.num_layers; ++l)
    for (int h = 0; h < s.num_kv_heads; ++h) {
      const int n = lengths[static_cast<std::size_t>(l * s.num_kv_heads + h)];
      std::vector<float> v(static_cast<std::size_t>(n));
      for (int t = 0; t < n; ++t) {
        const float x = static_cast<float>(level(rng)) / 4.0f;
        v[static_cast<std::size_t>(t)] = h == l % s.num_kv_heads ? (t % 9 == 0 ? 8.0f + x : x - 6.0f) : x;
      }
      sc.push_back(std::move(v));
    }
  return sc;
}

// Algorithm 1 of Ada-KV with the safeguard, against the brute force above, for uniform and
// pyramid bases, several alphas, equal and unequal stream lengths. Every layer's total is
// the base budget's layer total exactly; every head keeps at least the safeguard (or its
// whole stream); without clamping, B_i lies within one token of the paper's
// alpha B / h + (1 - alpha) B*_i; and the heads end up with different counts.
TEST(AdaKV, MatchesBruteForce) {
  using kvc::budget::adakv;
  using kvc::budget::pyramid;
  using kvc::budget::uniform;
  const kvc::model_shape shape{3, 8, 4, 8};
  const std::vector<int> equal(12, 40);
  const std::vector<int> unequal{40, 12, 33, 5, 7, 50, 2, 30, 25, 25, 0, 60};
  std::mt19937 rng(5);
  struct base_case {
    const char* name;
    uniform u;
    bool pyr;
  };
  const base_case bases[] = {{"keep_fraction(0.5)", uniform::keep_fraction(0.5), false},
                             {"tokens(10)", uniform::tokens(10), false},
                             {"compression_ratio(0.75)", uniform::compression_ratio(0.75), false},
                             {"pyramid keep_fraction(0.4)", uniform::keep_fraction(0.4), true}};
  for (const std::vector<int>* lengths : {&equal, &unequal})
    for (const base_case& bc : bases)
      for (double alpha : {0.2, 0.0, 0.5, 1.0}) {
        SCOPED_TRACE(std::string(lengths == &equal ? "equal" : "unequal") + " lengths, " + bc.name + ", alpha " +
                     std::to_string(alpha));
        request req(shape, *lengths, adakv_scores(shape, *lengths, rng));
        const adakv budget = bc.pyr ? adakv(pyramid(bc.u, 2), alpha) : adakv(bc.u, alpha);
        const std::vector<std::int32_t> keep = allocate_ok(budget, req.get());
        std::vector<std::int32_t> base;
        if (bc.pyr)
          base = allocate_ok(pyramid(bc.u, 2), req.get());
        else
          base = allocate_ok(bc.u, req.get());
        bool differ = false;
        for (int l = 0; l < shape.num_layers; ++l) {
          std::vector<std::vector<float>> sc;
          std::vector<int> b;
          for (int h = 0; h < 4; ++h) {
            sc.push_back(req.scores[static_cast<std::size_t>(l * 4 + h)]);
            b.push_back(base[static_cast<std::size_t>(l * 4 + h)]);
          }
          const adakv_ref ref = brute_adakv(sc, b, alpha);
          const std::int64_t B = std::accumulate(b.begin(), b.end(), std::int64_t{0});
          std::int64_t total = 0;
          for (int h = 0; h < 4; ++h) {
            const std::size_t i = static_cast<std::size_t>(l * 4 + h);
            const int n = (*lengths)[i];
            EXPECT_EQ(keep[i], ref.counts[static_cast<std::size_t>(h)]) << "layer " << l << ", head " << h;
            EXPECT_GE(keep[i], std::min<std::int64_t>(n, ref.safe)) << "below the safeguard";
            EXPECT_LE(keep[i], n);
            if (lengths == &equal) {
              const double paper =
                  alpha * static_cast<double>(B) / 4 + (1 - alpha) * ref.won[static_cast<std::size_t>(h)];
              EXPECT_LT(std::fabs(keep[i] - paper), 1.0 + 1e-9) << "layer " << l << ", head " << h;
              EXPECT_GE(keep[i] + 1.0, alpha * static_cast<double>(B) / 4) << "below alpha times the average";
            }
            if (keep[i] != keep[static_cast<std::size_t>(l * 4)]) differ = true;
            total += keep[i];
          }
          EXPECT_EQ(total, B) << "layer " << l << " total differs from the base budget's";
        }
        if (alpha < 1.0 && lengths == &equal) {
          EXPECT_TRUE(differ) << "every head got the same count";
        }
        if (alpha == 1.0 && lengths == &equal && !bc.pyr) {
          EXPECT_EQ(keep, base) << "alpha = 1 is the uniform budget when B is a multiple of h";
        }
      }
}

// With alpha B / h whole, the counts are exactly the paper's alpha B / h + (1 - alpha) B*_i
// whenever (1 - alpha) B*_i is whole too: 4 heads of 50 tokens, B = 4 * 25 = 100, alpha =
// 0.2 gives s = 5 and B_i = 5 + 0.8 B*_i; with B*_i multiples of 5 this is exact.
TEST(AdaKV, SafeguardExactCase) {
  const kvc::model_shape shape{1, 4, 4, 8};
  request req(shape, {50, 50, 50, 50});
  // Head 0's 50 tokens and head 1's first 30 score high, head 2's first 15 and head 3's
  // first 5 medium, everything else low: B*_i = 50, 30, 15, 5 of the top 100.
  for (int t = 0; t < 50; ++t) {
    req.scores[0][static_cast<std::size_t>(t)] = 10.0f + static_cast<float>(t);
    req.scores[1][static_cast<std::size_t>(t)] = t < 30 ? 9.0f : -1.0f;
    req.scores[2][static_cast<std::size_t>(t)] = t < 15 ? 5.0f : -2.0f;
    req.scores[3][static_cast<std::size_t>(t)] = t < 5 ? 4.0f : -3.0f;
  }
  const std::vector<std::int32_t> keep = allocate_ok(kvc::budget::adakv::keep_fraction(0.5), req.get());
  const std::vector<std::int32_t> expected{5 + 40, 5 + 24, 5 + 12, 5 + 4};
  EXPECT_EQ(keep, expected);
  // alpha = 0: pure top-B across heads.
  EXPECT_EQ(allocate_ok(kvc::budget::adakv::keep_fraction(0.5, 0.0), req.get()),
            (std::vector<std::int32_t>{50, 30, 15, 5}));
}

TEST(AdaKV, InvalidParametersAndMissingInputs) {
  request req({2, 2, 2, 8}, {10, 10, 10, 10});
  std::vector<std::int32_t> keep(4);
  for (double alpha : {-0.1, 1.5, std::nan("")}) {
    const kvc::status st = kvc::budget::adakv::keep_fraction(0.5, alpha).allocate(req.get(), keep.data());
    EXPECT_EQ(st.code(), kvc::status_code::invalid_budget) << st.message();
  }
  EXPECT_EQ(kvc::budget::adakv::keep_fraction(2.0).allocate(req.get(), keep.data()).code(),
            kvc::status_code::invalid_budget);
  EXPECT_EQ(kvc::budget::adakv::keep_fraction(0.5).allocate(req.get(false), keep.data()).code(),
            kvc::status_code::invalid_argument);
  kvc::budget_request no_scores = req.get();
  no_scores.scores = nullptr;
  EXPECT_EQ(kvc::budget::adakv::keep_fraction(0.5).allocate(no_scores, keep.data()).code(),
            kvc::status_code::invalid_argument);
  kvc::workspace tiny(64);
  kvc::budget_request small = req.get();
  small.scratch = &tiny;
  EXPECT_EQ(kvc::budget::adakv::keep_fraction(0.5).allocate(small, keep.data()).code(),
            kvc::status_code::workspace_exhausted);
}

// End to end on a real cache: heads whose keys have different scales get different K-norm
// score distributions, so evict<knorm, adakv> gives them real, different stream lengths.
// Every stream's length is the brute-force Ada-KV count for the scores the scorer gave,
// each layer's total is the uniform total, and each stream keeps its own top-B_i.
TEST(AdaKV, EvictOnCacheGivesDifferentLengths) {
  using cache_t = kvc::paged_kv_cache<kvc::codec::bf16>;
  const kvc::model_shape shape{2, 4, 4, 16};
  cache_t cache = policy_test::make_cache<cache_t>(policy_test::make_config(shape, 8));
  mirror m(shape);
  std::mt19937 rng(17);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const kvc::seq_id seq = cache.create_sequence();
  const int n = 48;
  for (int l = 0; l < 2; ++l) {
    std::vector<float> k(static_cast<std::size_t>(n) * 4 * 16), v(k.size());
    for (std::size_t i = 0; i < k.size(); ++i) {
      const int head = static_cast<int>(i / 16 % 4);
      const float scale = 0.8f + 0.1f * static_cast<float>((head + l) % 4);
      k[i] = policy_test::snap(normal(rng) * scale);
      v[i] = policy_test::snap(normal(rng));
    }
    std::vector<std::int32_t> pos(static_cast<std::size_t>(n));
    std::iota(pos.begin(), pos.end(), 0);
    POLICY_ASSERT_OK(cache.append(seq, l, k.data(), v.data(), pos.data(), n));
    m.append(l, k, v, pos);
  }
  score_map rec;
  auto r = cache.compress(
      seq, kvc::evict(policy_test::recording<kvc::score::knorm>{{}, &rec}, kvc::budget::adakv::keep_fraction(0.25)));
  ASSERT_TRUE(r.ok()) << r.status().message();
  for (int l = 0; l < 2; ++l) {
    std::vector<std::vector<float>> sc;
    for (int h = 0; h < 4; ++h) sc.push_back(rec[{l, h}]);
    const adakv_ref ref = brute_adakv(sc, std::vector<int>(4, round_keep(n, 0.25)), 0.2);
    std::set<int> lengths;
    int total = 0;
    for (int h = 0; h < 4; ++h) {
      const int size = cache.view(seq, l, h)->size();
      EXPECT_EQ(size, ref.counts[static_cast<std::size_t>(h)]) << "layer " << l << ", head " << h;
      EXPECT_GE(size, 2) << "safeguard floor(0.2 * 48 / 4) = 2";
      lengths.insert(size);
      total += size;
      const std::vector<token>& s = m.stream(l, h);
      const std::vector<float>& own = sc[static_cast<std::size_t>(h)];
      EXPECT_TRUE(policy_test::stream_equals(
          cache, seq, l, h, policy_test::pick(s, policy_test::brute_top_k({own.begin(), own.end()}, size))));
    }
    EXPECT_EQ(total, 4 * round_keep(n, 0.25));
    EXPECT_GE(lengths.size(), 3u) << "the heads should keep different numbers of tokens";
  }
  // Attention still runs over the ragged streams.
  std::vector<float> q(4 * 16, 0.25f), out(q.size());
  const std::int32_t qpos = 100;
  POLICY_ASSERT_OK(cache.attend(seq, 0, q.data(), &qpos, 1, out.data()));
}

// ============================================================================ byte_cap

// The bytes a stream holds after compaction when it keeps its top-k by `scores`, computed
// from its sealed / open split before compaction (paged_kv_cache::compress packs the kept
// sealed tokens into ceil(s / P) sealed pages and keeps the open page when any of its
// tokens stays).
struct stream_layout {
  int n = 0, sealed = 0;
  std::vector<int> ranked;  // token indices, best first
};

std::size_t bytes_after(const stream_layout& s, int k, int P, std::size_t open_bytes, std::size_t sealed_bytes) {
  int in_sealed = 0;
  for (int j = 0; j < k; ++j) in_sealed += s.ranked[static_cast<std::size_t>(j)] < s.sealed ? 1 : 0;
  const int in_open = k - in_sealed;
  return static_cast<std::size_t>((in_sealed + P - 1) / P) * sealed_bytes + (in_open > 0 ? open_bytes : 0);
}

// Ranks by (score, index), best first, with a full sort.
std::vector<int> rank_tokens(const std::vector<float>& sc) {
  std::vector<int> idx(sc.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::sort(idx.begin(), idx.end(), [&](int a, int b) {
    return sc[static_cast<std::size_t>(a)] > sc[static_cast<std::size_t>(b)] ||
           (sc[static_cast<std::size_t>(a)] == sc[static_cast<std::size_t>(b)] && a > b);
  });
  return idx;
}

template <class Codec>
class ByteCap : public ::testing::Test {};
using byte_cap_codecs = ::testing::Types<kvc::codec::f16, kvc::codec::f32>;
TYPED_TEST_SUITE(ByteCap, byte_cap_codecs);

// A byte cap for a whole sequence, end to end. Streams of different lengths, with partial
// sealed pages in the middle (left by an earlier compress) and open pages of different
// fill, are compressed on forks with evict<knorm, byte_cap(cap)> over a sweep of caps. For
// every cap: the bytes stats(seq) reports are within the cap, and equal the page count the
// test computes from each stream's kept tokens and its sealed / open split before the
// compress; each stream keeps its top-k by its scores; and no stream could keep one more
// token within the cap (its next token would need more bytes than are left), i.e. the
// sequence is as close to the cap as page granularity allows.
TYPED_TEST(ByteCap, SequenceBytesWithinCapAndMaximal) {
  using cache_t = kvc::paged_kv_cache<TypeParam>;
  const kvc::model_shape shape{3, 4, 2, 16};
  const int P = 8;
  cache_t cache = policy_test::make_cache<cache_t>(policy_test::make_config(shape, P));
  mirror m(shape);
  std::mt19937 rng(23);
  const kvc::seq_id seq = cache.create_sequence();
  for (int l = 0; l < 3; ++l) POLICY_ASSERT_OK(policy_test::append_random(cache, m, seq, l, 0, 37 + 6 * l, rng));
  const auto pred = [](int l, int h, std::int32_t p) { return (p + l + h) % (3 + h) != 0; };
  auto thin = cache.compress(seq, policy_test::keep_if{pred, nullptr});
  ASSERT_TRUE(thin.ok()) << thin.status().message();
  policy_test::mirror_keep_if(m, pred);
  for (int l = 0; l < 3; ++l) POLICY_ASSERT_OK(policy_test::append_random(cache, m, seq, l, 100, 5 + 7 * l, rng));
  ASSERT_TRUE(policy_test::cache_equals(cache, seq, m));

  const std::size_t open_bytes = cache.open_page_bytes(), sealed_bytes = cache.sealed_page_bytes();
  std::vector<stream_layout> layout;
  for (int l = 0; l < 3; ++l)
    for (int h = 0; h < 2; ++h) {
      auto v = cache.view(seq, l, h);
      stream_layout s;
      s.n = v->size();
      for (int j = 0; j < v->page_count(); ++j)
        if (v->page_sealed(j)) s.sealed += v->page_tokens(j);
      layout.push_back(s);
    }
  const std::size_t all = cache.stats(seq)->bytes;

  std::vector<std::size_t> caps{0, 1, sealed_bytes - 1, sealed_bytes, open_bytes, all - 1, all, 2 * all};
  for (int i = 1; i < 40; ++i) caps.push_back(all * static_cast<std::size_t>(i) / 40 + static_cast<std::size_t>(i));
  for (std::size_t cap : caps) {
    SCOPED_TRACE("cap " + std::to_string(cap) + " of " + std::to_string(all));
    auto fork = cache.fork(seq);
    ASSERT_TRUE(fork.ok());
    score_map rec;
    auto r = cache.compress(
        *fork, kvc::evict(policy_test::recording<kvc::score::knorm>{{}, &rec}, kvc::budget::byte_cap(cap)));
    ASSERT_TRUE(r.ok()) << r.status().message();
    const std::size_t bytes = cache.stats(*fork)->bytes;
    EXPECT_LE(bytes, cap);
    EXPECT_EQ(r->bytes_after, bytes);
    std::size_t computed = 0;
    std::vector<int> kept(layout.size());
    for (int l = 0; l < 3; ++l)
      for (int h = 0; h < 2; ++h) {
        stream_layout& s = layout[static_cast<std::size_t>(l * 2 + h)];
        s.ranked = rank_tokens(rec[{l, h}]);
        const int k = cache.view(*fork, l, h)->size();
        kept[static_cast<std::size_t>(l * 2 + h)] = k;
        computed += bytes_after(s, k, P, open_bytes, sealed_bytes);
        const std::vector<float>& sc = rec[{l, h}];
        EXPECT_TRUE(policy_test::stream_equals(
            cache, *fork, l, h,
            policy_test::pick(m.stream(l, h), policy_test::brute_top_k({sc.begin(), sc.end()}, k))));
      }
    EXPECT_EQ(computed, bytes) << "the page accounting differs from the cache's";
    for (std::size_t i = 0; i < layout.size(); ++i) {
      const int k = kept[i];
      if (k == layout[i].n) continue;
      const std::size_t more = bytes_after(layout[i], k + 1, P, open_bytes, sealed_bytes) -
                               bytes_after(layout[i], k, P, open_bytes, sealed_bytes);
      EXPECT_GT(more, cap - bytes) << "stream " << i << " could keep token " << k + 1 << " within the cap";
    }
    if (cap >= all) {
      EXPECT_EQ(r->tokens_after, r->tokens_before);
    }
    POLICY_ASSERT_OK(cache.release(*fork));
  }
}

// byte_cap needs the page layout: a request without it is unsupported; without scores or
// scratch, invalid_argument.
TEST(ByteCapErrors, MissingInputs) {
  request req({1, 2, 2, 8}, {10, 10});
  std::vector<std::int32_t> keep(2);
  EXPECT_EQ(kvc::budget::byte_cap(100).allocate(req.get(), keep.data()).code(), kvc::status_code::unsupported);
  for (auto& sc : req.scores)
    for (std::size_t t = 0; t < sc.size(); ++t) sc[t] = -static_cast<float>(t);  // sealed tokens rank first
  const std::int32_t sealed[2] = {8, 8};
  kvc::budget_request r = req.get();
  r.sealed_tokens = sealed;
  r.page_tokens = 8;
  r.open_page_bytes = 1000;
  r.sealed_page_bytes = 300;
  // All of it takes 2 * (300 + 1000) bytes; within 1299 both keep their 8 sealed tokens
  // (600 bytes), and neither can add its open page (1000 more).
  ASSERT_TRUE(kvc::budget::byte_cap(1299).allocate(r, keep.data()).ok());
  EXPECT_EQ(keep[0] + keep[1], 16);
  r.scratch = nullptr;
  EXPECT_EQ(kvc::budget::byte_cap(100).allocate(r, keep.data()).code(), kvc::status_code::invalid_argument);
  r = req.get();
  r.sealed_tokens = sealed;
  r.page_tokens = 0;
  EXPECT_EQ(kvc::budget::byte_cap(100).allocate(r, keep.data()).code(), kvc::status_code::invalid_argument);
}

}  // namespace
