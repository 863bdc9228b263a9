// Tests of the observation policies rely on: kvc::rope_rotate (the model's RoPE), the query
// window attend() records (cache_config::observe.query_window) and the attention statistics
// it accumulates (observe.track_attention), as compress_context::load hands them to a
// policy. Every expectation comes from an independent formulation written here: complex
// rotations for RoPE, the test's own list of every query it attended, and a dense softmax in
// double precision over the test's own record of every stream.
#include <algorithm>
#include <cmath>
#include <complex>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include <kvc/kvc.hpp>

#include "policy_helpers.hpp"

namespace {

// ============================================================================ RoPE

// RoFormer (Su et al. 2021, eq. 34) as complex multiplication: pair i of the rotated
// dimensions is the complex number x_a + i x_b, multiplied by e^(i m w_i) with
// w_i = theta^(-2i / rotary_dims); (a, b) = (i, i + rotary_dims / 2) for the half-split
// layout, (2i, 2i + 1) for the interleaved one. Dimensions past rotary_dims stay.
std::vector<double> rope_reference(const std::vector<float>& x, int rotary_dims, kvc::rope_layout layout, double theta,
                                   double m) {
  std::vector<double> y(x.begin(), x.end());
  for (int i = 0; i < rotary_dims / 2; ++i) {
    const int a = layout == kvc::rope_layout::half_split ? i : 2 * i;
    const int b = layout == kvc::rope_layout::half_split ? i + rotary_dims / 2 : 2 * i + 1;
    const double w = std::pow(theta, -2.0 * i / rotary_dims);
    const std::complex<double> z =
        std::complex<double>(x[static_cast<std::size_t>(a)], x[static_cast<std::size_t>(b)]) * std::polar(1.0, m * w);
    y[static_cast<std::size_t>(a)] = z.real();
    y[static_cast<std::size_t>(b)] = z.imag();
  }
  return y;
}

std::vector<float> random_vector(std::mt19937& rng, int n) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (float& x : v) x = normal(rng);
  return v;
}

struct rope_case {
  int head_dim, rotary_dims;  // rotary_dims as in rope_spec (-1: all of head_dim)
  kvc::rope_layout layout;
  double theta;
};

const rope_case rope_cases[] = {
    {16, -1, kvc::rope_layout::half_split, 10000.0},  {16, -1, kvc::rope_layout::interleaved, 10000.0},
    {64, 32, kvc::rope_layout::half_split, 500000.0}, {64, 32, kvc::rope_layout::interleaved, 1e6},
    {15, -1, kvc::rope_layout::half_split, 10000.0},  {12, 0, kvc::rope_layout::interleaved, 10000.0},
    {128, -1, kvc::rope_layout::half_split, 1e6},
};

std::string describe(const rope_case& c) {
  return "head_dim " + std::to_string(c.head_dim) + ", rotary_dims " + std::to_string(c.rotary_dims) + ", " +
         (c.layout == kvc::rope_layout::half_split ? "half_split" : "interleaved") + ", theta " +
         std::to_string(c.theta);
}

// rope_rotate equals the complex-multiplication form for both layouts, positions from
// negative to a million, and leaves the dimensions past rotary_dims bit for bit alone
// (including the odd last dimension when rotary_dims = -1 and head_dim is odd, and all of
// them when rotary_dims = 0).
TEST(Rope, MatchesComplexMultiplication) {
  std::mt19937 rng(1);
  for (const rope_case& c : rope_cases) {
    SCOPED_TRACE(describe(c));
    kvc::rope_spec spec;
    spec.theta = c.theta;
    spec.rotary_dims = c.rotary_dims;
    spec.layout = c.layout;
    const int rd = c.rotary_dims < 0 ? c.head_dim / 2 * 2 : c.rotary_dims;
    ASSERT_EQ(spec.dims(c.head_dim), rd);
    for (double m : {0.0, 1.0, 17.0, 4096.0, 123457.0, 1000000.0, -5.0, 2.5}) {
      const std::vector<float> x = random_vector(rng, c.head_dim);
      std::vector<float> y = x;
      kvc::rope_rotate(spec, c.head_dim, m, y.data());
      const std::vector<double> ref = rope_reference(x, rd, c.layout, c.theta, m);
      for (int e = 0; e < c.head_dim; ++e) {
        const std::size_t i = static_cast<std::size_t>(e);
        if (e >= rd)
          EXPECT_EQ(y[i], x[i]) << "dimension " << e << " past rotary_dims changed";
        else
          EXPECT_NEAR(y[i], ref[i], 2e-6 * (1.0 + std::fabs(ref[i]))) << "position " << m << ", dimension " << e;
      }
    }
  }
}

// A rotation by -m undoes one by m; rotations compose: m then m' is m + m'.
TEST(Rope, InverseAndComposition) {
  std::mt19937 rng(2);
  for (const rope_case& c : rope_cases) {
    SCOPED_TRACE(describe(c));
    kvc::rope_spec spec{c.theta, c.rotary_dims, c.layout};
    for (double m : {1.0, 300.0, 77777.0}) {
      const std::vector<float> x = random_vector(rng, c.head_dim);
      std::vector<float> y = x;
      kvc::rope_rotate(spec, c.head_dim, m, y.data());
      kvc::rope_rotate(spec, c.head_dim, -m, y.data());
      for (std::size_t e = 0; e < x.size(); ++e) EXPECT_NEAR(y[e], x[e], 2e-6 * (1.0 + std::fabs(x[e])));
      std::vector<float> two = x, one = x;
      kvc::rope_rotate(spec, c.head_dim, m, two.data());
      kvc::rope_rotate(spec, c.head_dim, 11.0, two.data());
      kvc::rope_rotate(spec, c.head_dim, m + 11.0, one.data());
      for (std::size_t e = 0; e < x.size(); ++e) EXPECT_NEAR(two[e], one[e], 4e-6 * (1.0 + std::fabs(one[e])));
    }
  }
}

// RoFormer Sec. 3.4.2: <R(m) q, R(n) k> depends only on m - n. Shifting both positions by
// the same amount leaves the product unchanged, and it equals
// Re sum_i q_i conj(k_i) e^(i (m - n) w_i) plus the product of the unrotated dimensions.
TEST(Rope, ProductDependsOnlyOnRelativePosition) {
  std::mt19937 rng(3);
  for (const rope_case& c : rope_cases) {
    SCOPED_TRACE(describe(c));
    kvc::rope_spec spec{c.theta, c.rotary_dims, c.layout};
    const int rd = spec.dims(c.head_dim);
    const std::vector<float> q = random_vector(rng, c.head_dim), k = random_vector(rng, c.head_dim);
    for (int rel : {0, 1, 9, 250}) {
      // The reference product, from the complex form with relative angle (m - n) w_i.
      const std::vector<double> q_rel = rope_reference(q, rd, c.layout, c.theta, rel);
      double expected = 0.0;
      for (int e = 0; e < c.head_dim; ++e)
        expected += q_rel[static_cast<std::size_t>(e)] * static_cast<double>(k[static_cast<std::size_t>(e)]);
      for (double n : {0.0, 3.0, 1000.0, 65536.0}) {
        std::vector<float> qm = q, kn = k;
        kvc::rope_rotate(spec, c.head_dim, n + rel, qm.data());
        kvc::rope_rotate(spec, c.head_dim, n, kn.data());
        double got = 0.0;
        for (std::size_t e = 0; e < q.size(); ++e) got += static_cast<double>(qm[e]) * kn[e];
        EXPECT_NEAR(got, expected, 1e-5 * c.head_dim) << "m - n = " << rel << ", n = " << n;
      }
    }
  }
}

// ============================================================================ probes

// A policy that loads every stream in scope with `fields`, hands it to `see`, and keeps
// every token (so compress() changes no token, only how they are packed).
struct probe {
  kvc::stream_fields fields;
  std::function<void(const kvc::stream_data&)> see;

  template <class Context>
  kvc::status plan(Context& ctx) const {
    for (int i = 0; i < ctx.num_streams(); ++i) {
      kvc::workspace_scope scope(ctx.scratch());
      kvc::stream_data s;
      KVC_RETURN_IF_ERROR(ctx.load(i, fields, s));
      see(s);
    }
    return kvc::ok_status();
  }
};

// ============================================================================ query window

// One attended query: its position and its rows for every query head, [num_q_heads][d].
struct query_record {
  std::int32_t position;
  std::vector<float> rows;
};

struct observed {
  std::vector<std::int32_t> positions;
  std::vector<std::vector<float>> rows;  // [n_queries] of [group][d]
};

using window_map = std::map<std::pair<int, int>, observed>;

template <class Cache>
window_map load_windows(Cache& cache, kvc::seq_id seq) {
  window_map out;
  const probe p{kvc::stream_fields::queries, [&](const kvc::stream_data& s) {
                  observed& o = out[{s.info.layer, s.info.kv_head}];
                  o.positions.assign(s.query_positions, s.query_positions + s.n_queries);
                  for (int j = 0; j < s.n_queries; ++j) {
                    std::vector<float> r;
                    for (int g = 0; g < s.group_size(); ++g)
                      r.insert(r.end(), s.query(j, g), s.query(j, g) + s.head_dim());
                    o.rows.push_back(std::move(r));
                  }
                  EXPECT_NE(s.rope, nullptr);
                  EXPECT_EQ(s.attention_sum, nullptr) << "attention was not asked for";
                }};
  auto r = cache.compress(seq, p);
  EXPECT_TRUE(r.ok()) << r.status().message();
  return out;
}

// The window each KV head should see: the last `w` queries of `history` (oldest first),
// restricted to the head's group of query heads.
::testing::AssertionResult window_is(const observed& got, const std::vector<query_record>& history, int w, int kv_head,
                                     int group, int d) {
  const std::size_t n = std::min(history.size(), static_cast<std::size_t>(w));
  if (got.positions.size() != n)
    return ::testing::AssertionFailure() << got.positions.size() << " observed queries, expected " << n;
  for (std::size_t j = 0; j < n; ++j) {
    const query_record& q = history[history.size() - n + j];
    if (got.positions[j] != q.position)
      return ::testing::AssertionFailure()
             << "query " << j << " at position " << got.positions[j] << ", expected " << q.position;
    const auto first = q.rows.begin() + static_cast<std::ptrdiff_t>(kv_head) * group * d;
    if (!std::equal(first, first + static_cast<std::ptrdiff_t>(group) * d, got.rows[j].begin()))
      return ::testing::AssertionFailure() << "query " << j << " (position " << q.position
                                           << ") differs from the attended rows of kv_head " << kv_head;
  }
  return ::testing::AssertionSuccess();
}

constexpr kvc::model_shape obs_shape{2, 6, 2, 8};  // group of 3 query heads per KV head
constexpr int obs_group = 3;

kvc::cache_config observing_config(int window, bool track) {
  kvc::cache_config c = policy_test::make_config(obs_shape, 4, 256);
  c.observe.query_window = window;
  c.observe.track_attention = track;
  return c;
}

// Attends n queries at the given positions to one layer and records them in `history`.
template <class Cache>
void attend_and_record(Cache& cache, kvc::seq_id seq, int layer, const std::vector<std::int32_t>& positions,
                       std::mt19937& rng, std::vector<query_record>& history) {
  const int n = static_cast<int>(positions.size()), width = obs_shape.num_q_heads * obs_shape.head_dim;
  const std::vector<float> q = random_vector(rng, n * width);
  std::vector<float> out(q.size());
  POLICY_ASSERT_OK(cache.attend(seq, layer, q.data(), positions.data(), n, out.data()));
  for (int i = 0; i < n; ++i)
    history.push_back({positions[static_cast<std::size_t>(i)],
                       std::vector<float>(q.begin() + static_cast<std::ptrdiff_t>(i) * width,
                                          q.begin() + static_cast<std::ptrdiff_t>(i + 1) * width)});
}

std::vector<std::int32_t> range(std::int32_t first, int n) {
  std::vector<std::int32_t> r(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) r[static_cast<std::size_t>(i)] = first + i;
  return r;
}

// With observe.query_window = W, load(i, queries) gives the last W queries attended on the
// stream's layer, oldest first, with their positions, restricted to the KV head's group
// (query heads kv_head * group ... + group - 1): after a multi-query prefill of more than
// W queries, after fewer than W, and after decode steps that wrap the ring several times.
TEST(ObserveQueries, WindowHoldsTheLastWQueries) {
  using cache_t = kvc::paged_kv_cache<kvc::codec::f16>;
  const int W = 5;
  cache_t cache = policy_test::make_cache<cache_t>(observing_config(W, false));
  policy_test::mirror m(obs_shape);
  std::mt19937 rng(4);
  const kvc::seq_id seq = cache.create_sequence();
  for (int l = 0; l < 2; ++l) POLICY_ASSERT_OK(policy_test::append_random(cache, m, seq, l, 0, 20, rng));
  std::vector<query_record> history[2];
  const auto check = [&](const char* when) {
    SCOPED_TRACE(when);
    const window_map w = load_windows(cache, seq);
    for (int l = 0; l < 2; ++l)
      for (int h = 0; h < 2; ++h)
        EXPECT_TRUE(window_is(w.at({l, h}), history[l], W, h, obs_group, obs_shape.head_dim))
            << "layer " << l << ", kv_head " << h;
  };
  check("before any attend");
  attend_and_record(cache, seq, 0, range(8, 12), rng, history[0]);  // prefill: 12 > W queries
  check("after a 12-query prefill on layer 0");
  attend_and_record(cache, seq, 1, range(18, 2), rng, history[1]);
  check("after 2 queries on layer 1");
  for (int step = 0; step < 13; ++step) {
    for (int l = 0; l < 2; ++l) {
      POLICY_ASSERT_OK(policy_test::append_random(cache, m, seq, l, 20 + step, 1, rng));
      attend_and_record(cache, seq, l, {20 + step}, rng, history[l]);
    }
    if (step % 4 == 3) check(("after decode step " + std::to_string(step)).c_str());
  }
  attend_and_record(cache, seq, 1, range(30, 3), rng, history[1]);
  check("after 3 queries on layer 1");
  EXPECT_TRUE(policy_test::cache_equals(cache, seq, m)) << "loading the window changed the tokens";
}

// fork() copies the window; afterwards parent and fork record their own queries.
TEST(ObserveQueries, ForkCopiesWindowThenDiverges) {
  using cache_t = kvc::paged_kv_cache<kvc::codec::f32>;
  const int W = 6;
  cache_t cache = policy_test::make_cache<cache_t>(observing_config(W, false));
  policy_test::mirror m(obs_shape);
  std::mt19937 rng(5);
  const kvc::seq_id parent = cache.create_sequence();
  for (int l = 0; l < 2; ++l) POLICY_ASSERT_OK(policy_test::append_random(cache, m, parent, l, 0, 10, rng));
  std::vector<query_record> hp[2];
  attend_and_record(cache, parent, 0, range(5, 4), rng, hp[0]);
  attend_and_record(cache, parent, 1, range(9, 1), rng, hp[1]);
  auto fork = cache.fork(parent);
  ASSERT_TRUE(fork.ok());
  std::vector<query_record> hf[2] = {hp[0], hp[1]};
  {
    const window_map w = load_windows(cache, *fork);
    for (int l = 0; l < 2; ++l)
      for (int h = 0; h < 2; ++h) EXPECT_TRUE(window_is(w.at({l, h}), hf[l], W, h, obs_group, obs_shape.head_dim));
  }
  attend_and_record(cache, parent, 0, range(9, 3), rng, hp[0]);
  attend_and_record(cache, *fork, 0, range(7, 2), rng, hf[0]);
  attend_and_record(cache, *fork, 1, range(9, 7), rng, hf[1]);
  const window_map wp = load_windows(cache, parent), wf = load_windows(cache, *fork);
  for (int l = 0; l < 2; ++l)
    for (int h = 0; h < 2; ++h) {
      EXPECT_TRUE(window_is(wp.at({l, h}), hp[l], W, h, obs_group, obs_shape.head_dim)) << "parent, layer " << l;
      EXPECT_TRUE(window_is(wf.at({l, h}), hf[l], W, h, obs_group, obs_shape.head_dim)) << "fork, layer " << l;
    }
}

// ============================================================================ attention statistics

// The test's record of one stream with its expected statistics, in double precision.
struct tracked_token {
  std::int32_t position;
  std::vector<double> key;
  double sum = 0.0, count = 0.0, last = 0.0;
};

class attention_model {
 public:
  explicit attention_model(const kvc::model_shape& s)
      : shape_(s), streams_(static_cast<std::size_t>(s.streams_per_sequence())) {}

  // k: [n][num_kv_heads][d], as appended.
  void append(int layer, const std::vector<float>& k, const std::vector<std::int32_t>& positions) {
    const int d = shape_.head_dim, h = shape_.num_kv_heads;
    for (std::size_t i = 0; i < positions.size(); ++i)
      for (int j = 0; j < h; ++j) {
        const auto first = k.begin() + static_cast<std::ptrdiff_t>((i * h + static_cast<std::size_t>(j)) * d);
        stream(layer, j).push_back({positions[i], std::vector<double>(first, first + d)});
      }
  }

  // Dense causal softmax of each query row over its KV head's tokens (position <= the
  // query's), log-weights 0: a_t = exp(s_t - max s) / sum exp(s - max s), s_t = q.k_t /
  // sqrt(d). Per token: sum += a_t / group for every row, count += 1 per query that sees
  // it, and last = the call's last query's sum over the group / group (reset every call).
  void attend(int layer, const std::vector<float>& q, const std::vector<std::int32_t>& positions) {
    const int d = shape_.head_dim, g = shape_.group_size(), n = static_cast<int>(positions.size());
    for (int h = 0; h < shape_.num_kv_heads; ++h) {
      std::vector<tracked_token>& s = stream(layer, h);
      for (tracked_token& t : s) t.last = 0.0;
      for (int i = 0; i < n; ++i) {
        const std::int32_t qp = positions[static_cast<std::size_t>(i)];
        for (int j = 0; j < g; ++j) {
          const float* row = &q[(static_cast<std::size_t>(i) * shape_.num_q_heads + h * g + j) * d];
          std::vector<double> logit(s.size(), -INFINITY);
          double mx = -INFINITY;
          for (std::size_t t = 0; t < s.size(); ++t) {
            if (s[t].position > qp) continue;
            double dot = 0.0;
            for (int e = 0; e < d; ++e) dot += static_cast<double>(row[e]) * s[t].key[static_cast<std::size_t>(e)];
            logit[t] = dot / std::sqrt(static_cast<double>(d));
            mx = std::max(mx, logit[t]);
          }
          if (mx == -INFINITY) continue;  // the query sees nothing
          double denom = 0.0;
          for (std::size_t t = 0; t < s.size(); ++t)
            if (s[t].position <= qp) denom += std::exp(logit[t] - mx);
          for (std::size_t t = 0; t < s.size(); ++t) {
            if (s[t].position > qp) continue;
            const double a = std::exp(logit[t] - mx) / denom / g;
            s[t].sum += a;
            if (j == 0) s[t].count += 1.0;
            if (i == n - 1) s[t].last += a;
          }
        }
      }
    }
  }

  void keep_if(const std::function<bool(int, int, std::int32_t)>& pred) {
    for (int l = 0; l < shape_.num_layers; ++l)
      for (int h = 0; h < shape_.num_kv_heads; ++h) {
        std::vector<tracked_token>& s = stream(l, h);
        s.erase(std::remove_if(s.begin(), s.end(), [&](const tracked_token& t) { return !pred(l, h, t.position); }),
                s.end());
      }
  }

  std::vector<tracked_token>& stream(int layer, int h) {
    return streams_[static_cast<std::size_t>(layer * shape_.num_kv_heads + h)];
  }

 private:
  kvc::model_shape shape_;
  std::vector<std::vector<tracked_token>> streams_;
};

// The statistics load(i, attention) gives every stream equal the model's, token by token.
template <class Cache>
::testing::AssertionResult statistics_match(Cache& cache, kvc::seq_id seq, attention_model& model) {
  ::testing::AssertionResult result = ::testing::AssertionSuccess();
  int streams_seen = 0;
  const probe p{
      kvc::stream_fields::attention, [&](const kvc::stream_data& s) {
        ++streams_seen;
        const std::vector<tracked_token>& ref = model.stream(s.info.layer, s.info.kv_head);
        const std::string where =
            " (layer " + std::to_string(s.info.layer) + ", kv_head " + std::to_string(s.info.kv_head) + ")";
        if (s.attention_sum == nullptr || s.attention_count == nullptr || s.last_attention == nullptr) {
          result = ::testing::AssertionFailure() << "no statistics loaded" << where;
          return;
        }
        if (s.size() != static_cast<int>(ref.size())) {
          result = ::testing::AssertionFailure() << s.size() << " tokens, expected " << ref.size() << where;
          return;
        }
        for (int t = 0; t < s.size(); ++t) {
          const tracked_token& r = ref[static_cast<std::size_t>(t)];
          const double tol = 2e-6 + 1e-5 * r.sum;
          if (s.positions[t] != r.position || std::fabs(s.attention_sum[t] - r.sum) > tol ||
              s.attention_count[t] != r.count || std::fabs(s.last_attention[t] - r.last) > 2e-6 + 1e-5 * r.last) {
            result = ::testing::AssertionFailure()
                     << "token " << t << " at position " << s.positions[t] << where << ": sum " << s.attention_sum[t]
                     << " count " << s.attention_count[t] << " last " << s.last_attention[t] << ", expected position "
                     << r.position << ", sum " << r.sum << " count " << r.count << " last " << r.last;
            return;
          }
        }
      }};
  auto r = cache.compress(seq, p);
  if (!r.ok()) return ::testing::AssertionFailure() << r.status().message();
  if (streams_seen != cache.shape().streams_per_sequence())
    return ::testing::AssertionFailure() << streams_seen << " streams loaded";
  return result;
}

template <class Codec>
class ObserveAttention : public ::testing::Test {};
using observe_codecs = ::testing::Types<kvc::codec::f32, kvc::codec::f16, kvc::codec::bf16>;
TYPED_TEST_SUITE(ObserveAttention, observe_codecs);

// observe.track_attention against a dense double-precision softmax (H2O's accumulated
// attention, Zhang et al. 2023, Sec. 3; TOVA's last-query attention, Oren et al. 2024,
// eq. 2), with GQA groups of 3, causal masking (queries before some tokens, rows that see
// nothing), pages of 4 tokens, and a 25-query call whose 75 rows span two row blocks with
// a query's group split between them. Along the way: new tokens start at zero; compress
// compacts the statistics with the kept tokens; fork copies them and the two then
// accumulate separately. Keys are multiples of 1/32 in [-4, 4], exact in every codec.
TYPED_TEST(ObserveAttention, MatchesDenseReference) {
  using cache_t = kvc::paged_kv_cache<TypeParam>;
  cache_t cache = policy_test::make_cache<cache_t>(observing_config(0, true));
  std::mt19937 rng(6);
  const kvc::seq_id seq = cache.create_sequence();
  attention_model model(obs_shape);
  const int width = obs_shape.num_q_heads * obs_shape.head_dim;
  std::int32_t next[2] = {0, 0};
  const auto append = [&](kvc::seq_id id, attention_model& mdl, int layer, int n, std::int32_t step) {
    const std::size_t count = static_cast<std::size_t>(n) * obs_shape.num_kv_heads * obs_shape.head_dim;
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> k(count), v(count);
    for (float& x : k) x = policy_test::snap(normal(rng));
    for (float& x : v) x = policy_test::snap(normal(rng));
    std::vector<std::int32_t> pos(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) pos[static_cast<std::size_t>(i)] = next[layer] + i * step;
    next[layer] += n * step;
    POLICY_ASSERT_OK(cache.append(id, layer, k.data(), v.data(), pos.data(), n));
    mdl.append(layer, k, pos);
  };
  const auto attend = [&](kvc::seq_id id, attention_model& mdl, int layer, const std::vector<std::int32_t>& pos) {
    const std::vector<float> q = random_vector(rng, static_cast<int>(pos.size()) * width);
    std::vector<float> out(q.size());
    POLICY_ASSERT_OK(cache.attend(id, layer, q.data(), pos.data(), static_cast<int>(pos.size()), out.data()));
    mdl.attend(layer, q, pos);
  };

  append(seq, model, 0, 10, 1);  // positions 0..9
  append(seq, model, 1, 10, 2);  // positions 0, 2, ..., 18
  ASSERT_TRUE(statistics_match(cache, seq, model)) << "fresh tokens";
  attend(seq, model, 0, {5, 7, 9});  // causal: the first query sees 6 tokens
  attend(seq, model, 1, {-3, 20});   // the first sees nothing
  attend(seq, model, 0, {9});        // a decode step: last is reset, sum accumulates
  ASSERT_TRUE(statistics_match(cache, seq, model)) << "after the first calls";
  append(seq, model, 0, 5, 1);  // 10..14
  append(seq, model, 1, 5, 1);  // 20..24
  ASSERT_TRUE(statistics_match(cache, seq, model)) << "new tokens must start at zero";
  attend(seq, model, 1, range(17, 7));  // a 7-query prefill over the new tokens
  for (int l = 0; l < 2; ++l) {
    append(seq, model, l, 1, 1);
    attend(seq, model, l, {next[l] - 1});
  }
  append(seq, model, 0, 20, 1);          // 16..35
  attend(seq, model, 0, range(11, 25));  // 75 rows: two row blocks
  ASSERT_TRUE(statistics_match(cache, seq, model)) << "after a two-block call";

  const auto pred = [](int l, int h, std::int32_t p) { return (p + l + 2 * h) % 3 != 1; };
  auto r = cache.compress(seq, policy_test::keep_if{pred, nullptr});
  ASSERT_TRUE(r.ok()) << r.status().message();
  model.keep_if(pred);
  ASSERT_TRUE(statistics_match(cache, seq, model)) << "compress must compact the statistics";
  attend(seq, model, 0, range(30, 4));
  attend(seq, model, 1, {26});
  ASSERT_TRUE(statistics_match(cache, seq, model)) << "accumulating after a compress";

  auto fork = cache.fork(seq);
  ASSERT_TRUE(fork.ok());
  attention_model fork_model = model;
  ASSERT_TRUE(statistics_match(cache, *fork, fork_model)) << "fork must copy the statistics";
  attend(*fork, fork_model, 0, {35, 36});
  append(*fork, fork_model, 1, 3, 1);
  attend(*fork, fork_model, 1, {next[1] - 1});
  ASSERT_TRUE(statistics_match(cache, *fork, fork_model)) << "the fork after its own calls";
  ASSERT_TRUE(statistics_match(cache, seq, model)) << "the parent must not see the fork's calls";
}

// ============================================================================ observation off

// Asking for queries or attention that the cache does not record fails with
// invalid_argument, and the cache is unchanged.
TEST(ObserveOff, AskingForUnrecordedFieldsFails) {
  using cache_t = kvc::paged_kv_cache<kvc::codec::f16>;
  struct cfg_case {
    int window;
    bool track;
    kvc::stream_fields fields;
  };
  const cfg_case cases[] = {{0, false, kvc::stream_fields::queries},
                            {0, false, kvc::stream_fields::attention},
                            {4, false, kvc::stream_fields::attention},
                            {0, true, kvc::stream_fields::queries},
                            {0, false, kvc::stream_fields::keys | kvc::stream_fields::queries}};
  for (const cfg_case& c : cases) {
    cache_t cache = policy_test::make_cache<cache_t>(observing_config(c.window, c.track));
    policy_test::mirror m(obs_shape);
    std::mt19937 rng(7);
    const kvc::seq_id seq = cache.create_sequence();
    for (int l = 0; l < 2; ++l) POLICY_ASSERT_OK(policy_test::append_random(cache, m, seq, l, 0, 9, rng));
    std::vector<float> q(static_cast<std::size_t>(obs_shape.num_q_heads * obs_shape.head_dim), 0.5f), out(q.size());
    const std::int32_t qp = 8;
    POLICY_ASSERT_OK(cache.attend(seq, 0, q.data(), &qp, 1, out.data()));
    const policy_test::cache_snapshot before = policy_test::snapshot(cache, seq);
    auto r = cache.compress(seq, probe{c.fields, [](const kvc::stream_data&) {}});
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), kvc::status_code::invalid_argument) << r.status().message();
    EXPECT_NE(std::string(r.status().message()).find("observe"), std::string::npos) << r.status().message();
    EXPECT_TRUE(policy_test::snapshot(cache, seq) == before);
  }
}

}  // namespace
