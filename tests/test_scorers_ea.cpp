// Tests of the expected_attention, leverage and compactor scorers against independent
// references written here in double precision: explicit per-position RoPE matrices and
// their average, the Gaussian moments of the observed queries, a Monte-Carlo estimate of
// the expected exponentiated logit, Eigen's pseudo-inverse for the hat matrix, brute-force
// chunked attention, and the test's own record of every token it appended to a cache.
//
// Papers and the equations checked:
// - Expected Attention (Devoto, Jeblick, Jégou, arXiv:2510.00636, Sec. 3): queries
//   q ~ N(mu', Sigma') with mu' = R mu, Sigma' = R Sigma R^T, R the RoPE matrix averaged over
//   the next n_future positions, and the closed form
//     log E[exp(q.k / sqrt(d))] = mu'.k / sqrt(d) + k^T Sigma' k / (2d)       (the Gaussian
//   moment generating function), then a = softmax(z) and score = (a + eps) * ||v||.
// - Compactor (Chari, Van Durme, arXiv:2507.08143, Sec. 3): the leverage score
//     l_i = k_i^T (K_c^T K_c)^+ k_i = [K_c K_c^+]_ii,  sum_i l_i = rank(K_c),
//   its right-sketch estimate x_i^T (X^T X)^-1 x_i with X = K_c Phi, and the blend
//     score = beta * zscore(l) + zscore(pool(A * ||v||)),  A the chunked non-causal attention.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>
#include <Eigen/Dense>

#include <kvc/kvc.hpp>

#include "policy_helpers.hpp"

static_assert(kvc::is_scorer_v<kvc::score::expected_attention>, "expected_attention is a scorer");
static_assert(kvc::is_scorer_v<kvc::score::leverage>, "leverage is a scorer");
static_assert(kvc::is_scorer_v<kvc::score::compactor>, "compactor is a scorer");

// ====================================================================== allocation probe
//
// The scorers must not allocate. Eigen allocates with std::malloc, which operator-new
// counters do not see, so on glibc (outside the sanitizers, which own malloc) this file
// interposes malloc, calloc and realloc, forwarding to glibc's own entry points and counting
// the calls a thread makes while it is armed.
#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(memory_sanitizer) || __has_feature(thread_sanitizer)
#define KVC_EA_TEST_SANITIZED 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define KVC_EA_TEST_SANITIZED 1
#endif
#if defined(__GLIBC__) && !defined(KVC_EA_TEST_SANITIZED)
#define KVC_EA_TEST_COUNTS_MALLOC 1
namespace {
thread_local bool malloc_armed = false;
thread_local long malloc_calls = 0;
}  // namespace
extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* malloc(std::size_t n) {
  if (malloc_armed) ++malloc_calls;
  return __libc_malloc(n);
}
void* calloc(std::size_t n, std::size_t size) {
  if (malloc_armed) ++malloc_calls;
  return __libc_calloc(n, size);
}
void* realloc(void* p, std::size_t n) {
  if (malloc_armed) ++malloc_calls;
  return __libc_realloc(p, n);
}
}
#endif

namespace {

using dmat = Eigen::MatrixXd;
using dvec = Eigen::VectorXd;
using kvc::score::compactor;
using kvc::score::expected_attention;
using kvc::score::leverage;

constexpr float inf = std::numeric_limits<float>::infinity();

#define EA_ASSERT_OK(expr)                                         \
  do {                                                             \
    const ::kvc::status ea_st_ = (expr);                           \
    ASSERT_TRUE(ea_st_.ok()) << #expr << ": " << ea_st_.message(); \
  } while (0)

// ====================================================================== one stream by hand

struct stream_case {
  kvc::model_shape shape{1, 1, 1, 16};
  kvc::rope_spec rope;
  int n = 0;
  std::vector<std::int32_t> positions, query_positions;
  std::vector<float> log_weights, keys, values, queries;  // keys, values [n][d]; queries [nq][group][d]

  int d() const { return shape.head_dim; }
  int group() const { return shape.group_size(); }
  int n_queries() const { return static_cast<int>(query_positions.size()); }
  std::size_t at(int i) const { return static_cast<std::size_t>(i) * static_cast<std::size_t>(d()); }
  std::size_t qat(int j, int h) const {
    return (static_cast<std::size_t>(j) * static_cast<std::size_t>(group()) + static_cast<std::size_t>(h)) *
           static_cast<std::size_t>(d());
  }
  dvec key(int i) const { return Eigen::Map<const Eigen::VectorXf>(&keys[at(i)], d()).cast<double>(); }
  dvec value(int i) const { return Eigen::Map<const Eigen::VectorXf>(&values[at(i)], d()).cast<double>(); }
  dvec query(int j, int h) const { return Eigen::Map<const Eigen::VectorXf>(&queries[qat(j, h)], d()).cast<double>(); }

  kvc::stream_data data() const {
    kvc::stream_data s;
    s.shape = &shape;
    s.info = {0, 0, n};
    s.positions = positions.data();
    s.log_weights = log_weights.data();
    s.keys = keys.data();
    s.values = values.data();
    s.queries = queries.empty() ? nullptr : queries.data();
    s.query_positions = query_positions.empty() ? nullptr : query_positions.data();
    s.n_queries = n_queries();
    s.rope = &rope;
    return s;
  }
};

kvc::model_shape group_shape(int group, int d) { return kvc::model_shape{1, group, 1, d}; }

// n tokens at positions first, first + 1, ...; keys N(0, key_scale^2), values N(0, 1),
// log-weights 0.
stream_case random_stream(std::mt19937& rng, int group, int d, int n, float key_scale = 1.0f, std::int32_t first = 0) {
  stream_case c;
  c.shape = group_shape(group, d);
  c.n = n;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int i = 0; i < n; ++i) c.positions.push_back(first + i);
  c.log_weights.assign(static_cast<std::size_t>(n), 0.0f);
  for (int i = 0; i < n * d; ++i) {
    c.keys.push_back(key_scale * normal(rng));
    c.values.push_back(normal(rng));
  }
  return c;
}

// ====================================================================== RoPE as explicit matrices

// The RoPE matrix of position t (Su et al. 2021, eq. 34) written out: pair i turns by
// t * theta^(-2i / rotary_dims); the pair is (i, i + rotary_dims / 2) or (2i, 2i + 1).
dmat rope_matrix(const kvc::rope_spec& r, int d, double t) {
  const int rd = r.rotary_dims < 0 ? d / 2 * 2 : r.rotary_dims;
  dmat m = dmat::Identity(d, d);
  for (int i = 0; i < rd / 2; ++i) {
    const bool half = r.layout == kvc::rope_layout::half_split;
    const int a = half ? i : 2 * i, b = half ? i + rd / 2 : 2 * i + 1;
    const double angle = t * std::pow(r.theta, -2.0 * i / rd);
    m(a, a) = std::cos(angle);
    m(a, b) = -std::sin(angle);
    m(b, a) = std::sin(angle);
    m(b, b) = std::cos(angle);
  }
  return m;
}

// (1/F) sum_{t = first}^{first + F - 1} R_t, summed matrix by matrix.
dmat average_rope_matrix(const kvc::rope_spec& r, int d, double first, int count) {
  dmat sum = dmat::Zero(d, d);
  for (int t = 0; t < count; ++t) sum += rope_matrix(r, d, first + t);
  return sum / count;
}

// ====================================================================== expected attention reference

struct gaussian {
  dvec mean;
  dmat cov;
};

// The paper's future-query distribution for query head h (Sec. 3): the observed queries at
// positions >= n_sink with RoPE undone by the transposed matrix, their mean and covariance
// (divided by N), both moved by the RoPE matrix averaged over the n_future positions after
// the newest observed query.
gaussian ea_moments(const stream_case& c, int h, int n_sink, int n_future) {
  const int d = c.d();
  std::int32_t newest = std::numeric_limits<std::int32_t>::min();
  std::vector<dvec> x;
  for (int j = 0; j < c.n_queries(); ++j) {
    const std::int32_t p = c.query_positions[static_cast<std::size_t>(j)];
    newest = std::max(newest, p);
    if (p >= n_sink) x.push_back(rope_matrix(c.rope, d, p).transpose() * c.query(j, h));
  }
  dvec mu = dvec::Zero(d);
  for (const dvec& v : x) mu += v;
  mu /= static_cast<double>(x.size());
  dmat sigma = dmat::Zero(d, d);
  for (const dvec& v : x) sigma += (v - mu) * (v - mu).transpose();
  sigma /= static_cast<double>(x.size());
  const dmat r = average_rope_matrix(c.rope, d, static_cast<double>(newest) + 1.0, n_future);
  return {r * mu, r * sigma * r.transpose()};
}

// z_i = mu'.k_i / sqrt(d) + k_i^T Sigma' k_i / (2d).
double ea_logit(const gaussian& g, const dvec& k, bool covariance) {
  const double d = static_cast<double>(k.size());
  return g.mean.dot(k) / std::sqrt(d) + (covariance ? k.dot(g.cov * k) / (2.0 * d) : 0.0);
}

// The whole score: sinks +inf; a_{h,i} = softmax over i >= n_sink of z + log-weight;
// mean (or max) over the group; (a + eps) * ||v||.
std::vector<double> ea_reference(const stream_case& c, const expected_attention& ea) {
  const int n = c.n, sinks = std::min(ea.n_sink, n);
  if (sinks == n) return std::vector<double>(static_cast<std::size_t>(n), std::numeric_limits<double>::infinity());
  std::vector<double> a(static_cast<std::size_t>(n), 0.0);
  for (int h = 0; h < c.group(); ++h) {
    const gaussian g = ea_moments(c, h, ea.n_sink, ea.n_future);
    std::vector<double> z;
    double mx = -std::numeric_limits<double>::infinity(), sum = 0.0;
    for (int i = sinks; i < n; ++i) {
      z.push_back(ea_logit(g, c.key(i), ea.use_covariance) + c.log_weights[static_cast<std::size_t>(i)]);
      mx = std::max(mx, z.back());
    }
    for (double& v : z) sum += (v = std::exp(v - mx));
    for (int i = sinks; i < n; ++i) {
      const double p = z[static_cast<std::size_t>(i - sinks)] / sum;
      double& dst = a[static_cast<std::size_t>(i)];
      dst = ea.reduce == kvc::score::group_reduce::mean ? dst + p / c.group() : std::max(dst, p);
    }
  }
  std::vector<double> s(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i)
    s[static_cast<std::size_t>(i)] =
        i < sinks ? std::numeric_limits<double>::infinity()
                  : (ea.use_value_norm ? (a[static_cast<std::size_t>(i)] + ea.eps) * c.value(i).norm()
                                       : a[static_cast<std::size_t>(i)]);
  return s;
}

// Observed queries for every head of the group: the pre-RoPE query of head h at position p
// is mean_h + noise, then rotated by the explicit RoPE matrix of p.
void add_queries(stream_case& c, std::mt19937& rng, const std::vector<std::int32_t>& positions, float mean_scale,
                 float noise_scale, std::vector<dmat>* unrotated = nullptr) {
  const int d = c.d(), g = c.group();
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<dvec> means;
  for (int h = 0; h < g; ++h) {
    dvec m(d);
    for (int e = 0; e < d; ++e) m(e) = mean_scale * normal(rng);
    means.push_back(m);
  }
  if (unrotated != nullptr) unrotated->assign(static_cast<std::size_t>(g), dmat(0, d));
  for (std::int32_t p : positions) {
    c.query_positions.push_back(p);
    const dmat r = rope_matrix(c.rope, d, p);
    for (int h = 0; h < g; ++h) {
      dvec x = means[static_cast<std::size_t>(h)];
      for (int e = 0; e < d; ++e) x(e) += noise_scale * normal(rng);
      // round the pre-RoPE query to float first, so the record below is exact
      for (int e = 0; e < d; ++e) x(e) = static_cast<float>(x(e));
      if (unrotated != nullptr) {
        dmat& u = (*unrotated)[static_cast<std::size_t>(h)];
        u.conservativeResize(u.rows() + 1, d);
        u.row(u.rows() - 1) = x.transpose();
      }
      const dvec q = r * x;
      for (int e = 0; e < d; ++e) c.queries.push_back(static_cast<float>(q(e)));
    }
  }
}

std::vector<std::int32_t> range(std::int32_t first, int count, std::int32_t step = 1) {
  std::vector<std::int32_t> r;
  for (int i = 0; i < count; ++i) r.push_back(first + i * step);
  return r;
}

std::vector<float> logits_of(const stream_case& c, const expected_attention& ea, int head) {
  kvc::workspace ws(std::size_t{8} << 20);
  std::vector<float> z(static_cast<std::size_t>(c.n));
  const kvc::status st = ea.expected_logits(c.data(), ws, head, z.data());
  EXPECT_TRUE(st.ok()) << st.message();
  return z;
}

template <class Scorer>
std::vector<float> scores_of(const stream_case& c, const Scorer& scorer, std::size_t ws_bytes = std::size_t{16} << 20) {
  kvc::workspace ws(ws_bytes);
  std::vector<float> out(static_cast<std::size_t>(c.n), std::numeric_limits<float>::quiet_NaN());
  const kvc::status st = scorer.score(c.data(), ws, out.data());
  EXPECT_TRUE(st.ok()) << st.message();
  EXPECT_EQ(ws.used(), 0u) << "the scorer must give its scratch back";
  return out;
}

const kvc::rope_layout layouts[] = {kvc::rope_layout::half_split, kvc::rope_layout::interleaved};

const char* layout_name(kvc::rope_layout l) { return l == kvc::rope_layout::half_split ? "half_split" : "interleaved"; }

// ====================================================================== expected attention

// The RoPE average over the next n_future positions, in closed form in the scorer, equals the
// explicit per-position matrices averaged in double. All observed queries share one pre-RoPE
// vector x (so mu = x, Sigma = 0), and the keys are sqrt(d) times the unit vectors, so with the
// covariance off z_c = (R x)_c exposes R x coordinate by coordinate. Both layouts, full and
// partial rotary_dims, a start past a million positions.
TEST(ExpectedAttention, RopeAverageMatchesExplicitMatrices) {
  std::mt19937 rng(11);
  for (kvc::rope_layout layout : layouts)
    for (int rotary : {-1, 8, 0})
      for (std::int32_t newest : {40, 1500000})
        for (int future : {1, 7, 512}) {
          SCOPED_TRACE(std::string(layout_name(layout)) + ", rotary_dims " + std::to_string(rotary) + ", newest " +
                       std::to_string(newest) + ", n_future " + std::to_string(future));
          const int d = 16;
          stream_case c;
          c.shape = group_shape(1, d);
          c.rope.layout = layout;
          c.rope.rotary_dims = rotary;
          c.rope.theta = rotary == 8 ? 500000.0 : 10000.0;
          c.n = d;
          for (int i = 0; i < d; ++i) {
            c.positions.push_back(i);
            for (int e = 0; e < d; ++e) c.keys.push_back(e == i ? std::sqrt(static_cast<float>(d)) : 0.0f);
          }
          c.values.assign(c.keys.size(), 1.0f);
          c.log_weights.assign(static_cast<std::size_t>(d), 0.0f);
          dvec x(d);
          std::normal_distribution<double> normal(0.0, 1.0);
          for (int e = 0; e < d; ++e) x(e) = static_cast<float>(normal(rng));
          for (std::int32_t p : {newest - 9, newest - 3, newest}) {
            c.query_positions.push_back(p);
            const dvec q = rope_matrix(c.rope, d, p) * x;
            for (int e = 0; e < d; ++e) c.queries.push_back(static_cast<float>(q(e)));
          }
          expected_attention ea;
          ea.n_future = future;
          ea.use_covariance = false;
          const dvec expect = average_rope_matrix(c.rope, d, newest + 1.0, future) * x;
          const std::vector<float> z = logits_of(c, ea, 0);
          for (int e = 0; e < d; ++e)
            EXPECT_NEAR(z[static_cast<std::size_t>(e)], expect(e), 2e-6) << "coordinate " << e;
        }
}

// mu is the mean of the queries with RoPE undone: with queries generated before rotation (the
// test keeps them) and rotated at scattered positions, z_i with the covariance off equals
// (R mean_j x_j) . k_i / sqrt(d) computed from the pre-RoPE queries themselves. Queries at
// positions below n_sink are left out: they are huge here, so including them would show.
TEST(ExpectedAttention, MeanIsTheMeanOfUnrotatedQueries) {
  std::mt19937 rng(12);
  for (kvc::rope_layout layout : layouts)
    for (int rotary : {-1, 10}) {
      SCOPED_TRACE(std::string(layout_name(layout)) + ", rotary_dims " + std::to_string(rotary));
      const int d = 16, g = 2;
      stream_case c = random_stream(rng, g, d, 40);
      c.rope.layout = layout;
      c.rope.rotary_dims = rotary;
      std::vector<dmat> sinks_x, x;
      add_queries(c, rng, {0, 1, 3}, 50.0f, 50.0f, &sinks_x);  // below n_sink = 4: ignored
      add_queries(c, rng, {4, 9, 10, 17, 18, 19, 33, 260}, 0.7f, 1.0f, &x);
      expected_attention ea;
      ea.use_covariance = false;
      const dmat r = average_rope_matrix(c.rope, d, 261.0, ea.n_future);
      for (int h = 0; h < g; ++h) {
        const dvec mu = x[static_cast<std::size_t>(h)].colwise().mean().transpose();
        const dvec mu_future = r * mu;
        const std::vector<float> z = logits_of(c, ea, h);
        for (int i = 0; i < c.n; ++i)
          EXPECT_NEAR(z[static_cast<std::size_t>(i)], mu_future.dot(c.key(i)) / std::sqrt(double(d)), 1e-5)
              << "head " << h << ", token " << i;
      }
    }
}

// With the covariance on, z_i equals the closed form evaluated in double from the explicit
// moments (mu', Sigma'), for both ways the scorer factors Sigma': fewer observed queries than
// head_dim (the centred queries themselves) and more (a Cholesky factor).
TEST(ExpectedAttention, LogitsMatchClosedForm) {
  std::mt19937 rng(13);
  for (kvc::rope_layout layout : layouts)
    for (int observed : {1, 2, 9, 16, 17, 70}) {
      SCOPED_TRACE(std::string(layout_name(layout)) + ", " + std::to_string(observed) + " observed queries");
      const int d = 16, g = 3;
      stream_case c = random_stream(rng, g, d, 50, 1.0f, 100);
      c.rope.layout = layout;
      c.rope.rotary_dims = layout == kvc::rope_layout::interleaved ? 12 : -1;
      add_queries(c, rng, range(200 - 2 * observed, observed, 2), 0.5f, 1.0f);
      for (bool cov : {true, false}) {
        expected_attention ea;
        ea.use_covariance = cov;
        ea.n_future = 64;
        for (int h = 0; h < g; ++h) {
          const gaussian m = ea_moments(c, h, ea.n_sink, ea.n_future);
          const std::vector<float> z = logits_of(c, ea, h);
          for (int i = 0; i < c.n; ++i) {
            const double expect = ea_logit(m, c.key(i), cov);
            EXPECT_NEAR(z[static_cast<std::size_t>(i)], expect, 2e-5 * (1.0 + std::abs(expect)))
                << "covariance " << cov << ", head " << h << ", token " << i;
          }
        }
      }
    }
}

// The closed form is what the paper says it is (arXiv:2510.00636, Sec. 3): z_i =
// log E[exp(q.k_i / sqrt(d))] for q ~ N(mu', Sigma'). A seeded Monte-Carlo estimate with M samples agrees within 4.5
// standard errors (delta method: se(log mean) = sd / (mean sqrt(M))). The mean-only logit is far outside that band, so
// the check can tell the covariance term apart.
TEST(ExpectedAttention, LogitsMatchMonteCarlo) {
  std::mt19937 rng(14);
  const int d = 16, samples = 40000;
  stream_case c = random_stream(rng, 1, d, 24, 1.0f, 0);
  add_queries(c, rng, range(4, 60), 0.5f, 0.8f);
  expected_attention ea;
  const gaussian m = ea_moments(c, 0, ea.n_sink, ea.n_future);
  const Eigen::SelfAdjointEigenSolver<dmat> eig(m.cov);
  const dmat factor = eig.eigenvectors() * eig.eigenvalues().cwiseMax(0.0).cwiseSqrt().asDiagonal();
  const std::vector<float> z = logits_of(c, ea, 0);
  std::mt19937_64 mc(2024);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> sum(static_cast<std::size_t>(c.n), 0.0), sq(static_cast<std::size_t>(c.n), 0.0);
  dvec e(d);
  for (int s = 0; s < samples; ++s) {
    for (int j = 0; j < d; ++j) e(j) = normal(mc);
    const dvec q = m.mean + factor * e;
    for (int i = 0; i < c.n; ++i) {
      const double x = std::exp(q.dot(c.key(i)) / std::sqrt(double(d)));
      sum[static_cast<std::size_t>(i)] += x;
      sq[static_cast<std::size_t>(i)] += x * x;
    }
  }
  int mean_only_outside = 0;
  for (int i = 0; i < c.n; ++i) {
    const double mean = sum[static_cast<std::size_t>(i)] / samples;
    const double var = sq[static_cast<std::size_t>(i)] / samples - mean * mean;
    const double se_log = std::sqrt(var / samples) / mean;
    const double estimate = std::log(mean);
    EXPECT_NEAR(z[static_cast<std::size_t>(i)], estimate, 4.5 * se_log + 1e-5) << "token " << i;
    mean_only_outside += std::abs(ea_logit(m, c.key(i), false) - estimate) > 4.5 * se_log ? 1 : 0;
  }
  EXPECT_GE(mean_only_outside, c.n * 3 / 4) << "the covariance term should be larger than the sampling error";
}

// Whole scores against the reference: sinks +inf, softmax over the others with log-weights,
// the group reduced by mean or max, (a + eps) * ||v||, value norm off (then the non-sink
// scores of one head sum to 1), and n_sink 0.
TEST(ExpectedAttention, ScoresMatchReference) {
  std::mt19937 rng(15);
  for (int g : {1, 4}) {
    stream_case c = random_stream(rng, g, 16, 90, 0.8f, 3);
    std::uniform_real_distribution<float> lw(0.0f, 1.5f);
    for (float& w : c.log_weights) w = lw(rng) < 1.0f ? 0.0f : std::log(1.0f + std::floor(lw(rng) * 4.0f));
    add_queries(c, rng, range(60, 30), 0.6f, 0.9f);
    struct option_case {
      const char* name;
      void (*set)(expected_attention&);
    };
    const option_case options[] = {
        {"defaults", [](expected_attention&) {}},
        {"eps 0.01", [](expected_attention& e) { e.eps = 0.01f; }},
        {"value norm off", [](expected_attention& e) { e.use_value_norm = false; }},
        {"covariance off", [](expected_attention& e) { e.use_covariance = false; }},
        {"max over the group", [](expected_attention& e) { e.reduce = kvc::score::group_reduce::max; }},
        {"no sinks, 32 future positions",
         [](expected_attention& e) {
           e.n_sink = 0;
           e.n_future = 32;
         }},
        {"more sinks than tokens", [](expected_attention& e) { e.n_sink = 200; }},
    };
    for (const option_case& o : options) {
      SCOPED_TRACE(std::string(o.name) + ", group " + std::to_string(g));
      expected_attention ea;
      o.set(ea);
      const std::vector<double> expect = ea_reference(c, ea);
      const std::vector<float> got = scores_of(c, ea);
      double total = 0.0;
      for (int i = 0; i < c.n; ++i) {
        const double e = expect[static_cast<std::size_t>(i)];
        const float s = got[static_cast<std::size_t>(i)];
        if (std::isinf(e)) {
          EXPECT_EQ(s, inf) << "sink " << i;
          continue;
        }
        EXPECT_NEAR(s, e, 2e-4 * std::abs(e) + 1e-9) << "token " << i;
        total += s;
      }
      if (!ea.use_value_norm && g == 1 && ea.n_sink < c.n) {
        EXPECT_NEAR(total, 1.0, 1e-5);
      }
    }
  }
}

// What the scorer needs and does not get is an error that names it, and nothing is scored.
TEST(ExpectedAttention, MissingInputsAreErrors) {
  std::mt19937 rng(16);
  stream_case c = random_stream(rng, 2, 16, 20);
  kvc::workspace ws(std::size_t{1} << 20);
  std::vector<float> out(20);
  const expected_attention ea;
  {
    const kvc::status st = ea.score(c.data(), ws, out.data());  // no queries at all
    EXPECT_EQ(st.code(), kvc::status_code::invalid_argument);
    EXPECT_NE(std::string(st.message()).find("observed queries"), std::string::npos) << st.message();
    EXPECT_NE(std::string(st.message()).find("query_window"), std::string::npos) << st.message();
  }
  add_queries(c, rng, {0, 2, 3}, 1.0f, 1.0f);  // only below n_sink
  EXPECT_EQ(ea.score(c.data(), ws, out.data()).code(), kvc::status_code::invalid_argument);
  add_queries(c, rng, {7}, 1.0f, 1.0f);
  EA_ASSERT_OK(ea.score(c.data(), ws, out.data()));
  kvc::stream_data no_rope = c.data();
  no_rope.rope = nullptr;
  EXPECT_EQ(ea.score(no_rope, ws, out.data()).code(), kvc::status_code::invalid_argument);
  expected_attention bad;
  bad.n_future = 0;
  EXPECT_EQ(bad.score(c.data(), ws, out.data()).code(), kvc::status_code::invalid_argument);
  bad = expected_attention{};
  bad.eps = -1.0f;
  EXPECT_EQ(bad.score(c.data(), ws, out.data()).code(), kvc::status_code::invalid_argument);
  EXPECT_EQ(ea.expected_logits(c.data(), ws, 2, out.data()).code(), kvc::status_code::out_of_range);
  EXPECT_EQ(ws.used(), 0u);
}

// ====================================================================== leverage reference

// Rows k_i - mean_j k_j.
dmat centred(const dmat& k) { return k.rowwise() - k.colwise().mean(); }

// diag(A A^+) from Eigen's complete orthogonal decomposition (the full pseudo-inverse).
dvec hat_diagonal(const dmat& a, int* rank = nullptr) {
  Eigen::CompleteOrthogonalDecomposition<dmat> cod(a);
  cod.setThreshold(1e-9);
  const dmat h = a * cod.pseudoInverse();
  if (rank != nullptr) *rank = static_cast<int>(cod.rank());
  return h.diagonal();
}

// A stream whose pre-RoPE keys are `pre` (n x d): stored rotated by their positions, so the
// scorer must undo RoPE to get them back.
stream_case stream_with_keys(const dmat& pre, const kvc::rope_spec& rope, std::mt19937& rng, std::int32_t first = 0,
                             std::int32_t step = 1) {
  const int n = static_cast<int>(pre.rows()), d = static_cast<int>(pre.cols());
  stream_case c;
  c.shape = group_shape(1, d);
  c.rope = rope;
  c.n = n;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int i = 0; i < n; ++i) {
    const std::int32_t p = first + i * step;
    c.positions.push_back(p);
    const dvec k = rope_matrix(rope, d, p) * pre.row(i).transpose();
    for (int e = 0; e < d; ++e) {
      c.keys.push_back(static_cast<float>(k(e)));
      c.values.push_back(normal(rng));
    }
  }
  c.log_weights.assign(static_cast<std::size_t>(n), 0.0f);
  return c;
}

dmat gaussian_matrix(std::mt19937& rng, int rows, int cols, double scale = 1.0) {
  std::normal_distribution<double> normal(0.0, scale);
  dmat m(rows, cols);
  for (int r = 0; r < rows; ++r)
    for (int col = 0; col < cols; ++col) m(r, col) = normal(rng);
  return m;
}

// Keys rounded to float (what a cache stores before rotation would give back).
dmat to_float(const dmat& m) { return m.cast<float>().cast<double>(); }

// Keys of rank r plus a common offset (which centring removes): A [n x r] * B [r x d] + 1 c^T,
// with small integers in A and multiples of 1/8 and 1/4 in B and c, so that the keys are
// exact in float and K_c has rank r exactly (float rounding would add r' > r directions of
// size 1e-7 that the hat matrix, being scale-free, would count in full).
dmat low_rank_keys(std::mt19937& rng, int n, int d, int r) {
  const auto grid = [&](int rows, int cols, double scale, double step) {
    dmat m = gaussian_matrix(rng, rows, cols, scale);
    return dmat((m / step).array().round() * step);
  };
  const dmat c = grid(1, d, 3.0, 0.25);
  const dmat k = (grid(n, r, 2.0, 1.0) * grid(r, d, 1.0, 0.125)).rowwise() + c.row(0);
  EXPECT_TRUE(k == to_float(k)) << "the keys should be exact in float";
  return k;
}

// Spearman's rank correlation (ties get their mean rank).
double spearman(const std::vector<double>& a, const std::vector<double>& b) {
  const auto ranks = [](const std::vector<double>& x) {
    std::vector<std::size_t> idx(x.size());
    std::iota(idx.begin(), idx.end(), std::size_t{0});
    std::sort(idx.begin(), idx.end(), [&](std::size_t i, std::size_t j) { return x[i] < x[j]; });
    std::vector<double> r(x.size());
    for (std::size_t i = 0; i < idx.size();) {
      std::size_t j = i;
      while (j + 1 < idx.size() && x[idx[j + 1]] == x[idx[i]]) ++j;
      for (std::size_t t = i; t <= j; ++t) r[idx[t]] = 0.5 * static_cast<double>(i + j);
      i = j + 1;
    }
    return r;
  };
  const std::vector<double> ra = ranks(a), rb = ranks(b);
  const double n = static_cast<double>(a.size()), mean = (n - 1.0) / 2.0;
  double num = 0.0, da = 0.0, db = 0.0;
  for (std::size_t i = 0; i < ra.size(); ++i) {
    num += (ra[i] - mean) * (rb[i] - mean);
    da += (ra[i] - mean) * (ra[i] - mean);
    db += (rb[i] - mean) * (rb[i] - mean);
  }
  return num / std::sqrt(da * db);
}

std::vector<double> as_double(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

// ====================================================================== leverage

// exact = true gives the paper's leverage (arXiv:2507.08143, Sec. 3), the diagonal of the hat
// matrix of the centred pre-RoPE keys (Eigen's pseudo-inverse in double), and the leverages sum
// to rank(K_c): full rank, rank 5 of 16
// (with a large common offset), fewer tokens than dimensions (then every l_i = 1 - 1/n), and
// keys scored as stored (undo_rope off) or without RoPE.
TEST(Leverage, ExactIsTheHatDiagonalAndSumsToRank) {
  std::mt19937 rng(21);
  const int d = 16;
  struct key_case {
    const char* name;
    dmat keys;
    int rank;
  };
  const key_case cases[] = {
      {"full rank", to_float(gaussian_matrix(rng, 200, d)), d},
      {"rank 5 plus an offset", low_rank_keys(rng, 150, d, 5), 5},
      {"10 tokens", to_float(gaussian_matrix(rng, 10, d)), 9},
      {"one token", to_float(gaussian_matrix(rng, 1, d)), 0},
  };
  for (const key_case& kc : cases)
    for (kvc::rope_layout layout : layouts) {
      SCOPED_TRACE(std::string(kc.name) + ", " + layout_name(layout));
      kvc::rope_spec rope;
      rope.layout = layout;
      const stream_case c = stream_with_keys(kc.keys, rope, rng, 5, 3);
      int rank = -1;
      const dvec h = hat_diagonal(centred(kc.keys), &rank);
      ASSERT_EQ(rank, kc.rank);
      leverage lev;
      lev.exact = true;
      const std::vector<float> l = scores_of(c, lev);
      double total = 0.0;
      for (int i = 0; i < c.n; ++i) {
        EXPECT_NEAR(l[static_cast<std::size_t>(i)], h(i), 2e-5) << "token " << i;
        total += l[static_cast<std::size_t>(i)];
      }
      EXPECT_NEAR(total, kc.rank, 1e-4 * c.n);
      if (c.n == 10) {
        for (float x : l) EXPECT_NEAR(x, 0.9, 1e-5);
      }
      // As stored: the hat diagonal of the rotated keys themselves.
      lev.undo_rope = false;
      dmat stored(c.n, d);
      for (int i = 0; i < c.n; ++i) stored.row(i) = c.key(i).transpose();
      const dvec hs = hat_diagonal(centred(stored));
      const std::vector<float> ls = scores_of(c, lev);
      for (int i = 0; i < c.n; ++i)
        EXPECT_NEAR(ls[static_cast<std::size_t>(i)], hs(i), 2e-5) << "as stored, token " << i;
    }
  // No RoPE at all (rotary_dims 0): the keys are used as they are.
  kvc::rope_spec none;
  none.rotary_dims = 0;
  const dmat k = to_float(gaussian_matrix(rng, 64, d));
  const stream_case c = stream_with_keys(k, none, rng);
  leverage lev;
  lev.exact = true;
  const dvec h = hat_diagonal(centred(k));
  const std::vector<float> l = scores_of(c, lev);
  for (int i = 0; i < c.n; ++i) EXPECT_NEAR(l[static_cast<std::size_t>(i)], h(i), 2e-5);
}

// The sketched score is the exact leverage of the sketch X = K_c Phi, with Phi the scorer's
// own Gaussian matrix: checked against the hat diagonal of X in double, for sketches smaller
// than the key rank (where the sketch is an approximation of the keys' leverage). Phi's
// entries have mean 0 and variance 1/s.
TEST(Leverage, SketchIsTheLeverageOfTheSketchedKeys) {
  std::mt19937 rng(22);
  for (int s : {8, 24, 48}) {
    SCOPED_TRACE("sketch_dim " + std::to_string(s));
    const int d = 64, n = 700;
    const dmat pre = to_float(gaussian_matrix(rng, n, d) * gaussian_matrix(rng, d, d, 0.3));
    kvc::rope_spec rope;
    const stream_case c = stream_with_keys(pre, rope, rng, 100);
    leverage lev;
    lev.sketch_dim = s;
    lev.seed = 7;
    std::vector<float> phi(static_cast<std::size_t>(d * s));
    lev.sketch(d, phi.data());
    const dmat p =
        Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(phi.data(), d, s)
            .cast<double>();
    const dvec h = hat_diagonal(centred(pre) * p);
    const std::vector<float> l = scores_of(c, lev);
    for (int i = 0; i < n; ++i) EXPECT_NEAR(l[static_cast<std::size_t>(i)], h(i), 1e-4 + 1e-3 * h(i)) << "token " << i;
    const double mean = p.mean(), var = (p.array() - mean).square().mean();
    const double cells = static_cast<double>(d * s);
    EXPECT_NEAR(mean, 0.0, 4.0 * std::sqrt(1.0 / s / cells));
    EXPECT_NEAR(var * s, 1.0, 4.0 * std::sqrt(2.0 / cells));
  }
}

// Phi and the scores are a function of the seed: the same seed gives the same bits from two
// scorer objects, another seed another sketch.
TEST(Leverage, DeterministicForASeed) {
  std::mt19937 rng(23);
  const int d = 32;
  const stream_case c = stream_with_keys(to_float(gaussian_matrix(rng, 300, d)), kvc::rope_spec{}, rng);
  leverage a, b, other;
  a.seed = b.seed = 99;
  other.seed = 100;
  const std::vector<float> la = scores_of(c, a), lb = scores_of(c, b), lo = scores_of(c, other);
  EXPECT_EQ(la, lb);
  EXPECT_NE(la, lo);
  std::vector<float> pa(static_cast<std::size_t>(d * a.sketch_dim)), pb(pa.size()), po(pa.size());
  a.sketch(d, pa.data());
  b.sketch(d, pb.data());
  other.sketch(d, po.data());
  EXPECT_EQ(pa, pb);
  EXPECT_NE(pa, po);
}

// How well the default sketch (s = 48) ranks tokens like the exact leverage at head_dim 128,
// on keys with a decaying spectrum, a few large channels and a few outlier tokens. The
// Spearman correlation is reported and bounded.
TEST(Leverage, SketchRanksLikeExactLeverage) {
  std::mt19937 rng(24);
  const int d = 128, n = 2048;
  dmat pre = gaussian_matrix(rng, n, d);
  for (int e = 0; e < d; ++e) pre.col(e) *= std::pow(0.97, e) * (e % 32 == 3 ? 6.0 : 1.0);
  for (int i = 0; i < n; i += 97) pre.row(i) *= 3.0;
  pre = to_float(pre);
  const stream_case c = stream_with_keys(pre, kvc::rope_spec{}, rng);
  leverage exact;
  exact.exact = true;
  const std::vector<double> le = as_double(scores_of(c, exact));
  double worst = 1.0, total = 0.0;
  int worst_outlier_rank = 0;
  for (std::uint64_t seed : {0u, 1u, 2u}) {
    leverage sketched;
    sketched.seed = seed;
    const std::vector<double> ls = as_double(scores_of(c, sketched));
    const double rho = spearman(ls, le);
    worst = std::min(worst, rho);
    total += rho;
    // rank (0 = highest) of every outlier token under the sketch
    std::vector<double> sorted = ls;
    std::sort(sorted.begin(), sorted.end(), std::greater<double>());
    for (int i = 0; i < n; i += 97) {
      const int r = static_cast<int>(
          std::lower_bound(sorted.begin(), sorted.end(), ls[static_cast<std::size_t>(i)], std::greater<double>()) -
          sorted.begin());
      worst_outlier_rank = std::max(worst_outlier_rank, r);
    }
  }
  std::cout << "[ leverage ] Spearman(sketch s=48, exact), head_dim 128, 2048 tokens: mean " << total / 3.0
            << ", worst of 3 seeds " << worst << "; worst sketch rank of the 22 outlier tokens " << worst_outlier_rank
            << "\n";
  ::testing::Test::RecordProperty("spearman_sketch48_exact_worst", std::to_string(worst));
  EXPECT_GT(worst, 0.5);
  EXPECT_LT(worst_outlier_rank, 22) << "the 22 outlier tokens should be the sketch's top 22";
}

// Degenerate keys: rank 6 below the sketch dimension (the sketch Gram matrix is singular and
// the jitter path runs; the result still matches the exact leverage to 1e-4 and sums to the
// rank),
// fewer tokens than the sketch dimension (every leverage 1 - 1/n), and equal keys (0).
TEST(Leverage, JitterOnDegenerateKeys) {
  std::mt19937 rng(25);
  const int d = 32;
  {
    const dmat pre = low_rank_keys(rng, 400, d, 6);
    const stream_case c = stream_with_keys(pre, kvc::rope_spec{}, rng);
    const dvec h = hat_diagonal(centred(pre));
    const std::vector<float> l = scores_of(c, leverage{});
    double total = 0.0;
    for (int i = 0; i < c.n; ++i) {
      EXPECT_TRUE(std::isfinite(l[static_cast<std::size_t>(i)]));
      EXPECT_NEAR(l[static_cast<std::size_t>(i)], h(i), 1e-4) << "token " << i;
      total += l[static_cast<std::size_t>(i)];
    }
    EXPECT_NEAR(total, 6.0, 1e-3);
  }
  {
    const stream_case c = stream_with_keys(to_float(gaussian_matrix(rng, 12, d)), kvc::rope_spec{}, rng);
    for (float x : scores_of(c, leverage{})) EXPECT_NEAR(x, 1.0 - 1.0 / 12.0, 1e-4);
  }
  {
    dmat same(30, d);
    for (int i = 0; i < 30; ++i) same.row(i) = dvec::Constant(d, 0.25).transpose();
    kvc::rope_spec none;
    none.rotary_dims = 0;
    const stream_case c = stream_with_keys(same, none, rng);
    for (float x : scores_of(c, leverage{})) EXPECT_EQ(x, 0.0f);
    leverage exact;
    exact.exact = true;
    for (float x : scores_of(c, exact)) EXPECT_EQ(x, 0.0f);
  }
}

TEST(Leverage, BadOptionsAreErrors) {
  std::mt19937 rng(26);
  const stream_case c = random_stream(rng, 1, 16, 20);
  kvc::workspace ws(std::size_t{1} << 20);
  std::vector<float> out(20);
  for (int s : {0, leverage::max_sketch_dim + 1}) {
    leverage lev;
    lev.sketch_dim = s;
    const kvc::status st = lev.score(c.data(), ws, out.data());
    EXPECT_EQ(st.code(), kvc::status_code::invalid_argument);
    EXPECT_NE(std::string(st.message()).find("sketch_dim"), std::string::npos) << st.message();
  }
  kvc::stream_data no_keys = c.data();
  no_keys.keys = nullptr;
  EXPECT_EQ(leverage{}.score(no_keys, ws, out.data()).code(), kvc::status_code::invalid_argument);
}

// ====================================================================== compactor reference

// (x - mean) / max(std, 1e-6) over the entries with use[i]; population standard deviation;
// the others 0.
std::vector<double> zscore(const std::vector<double>& x, const std::vector<bool>& use) {
  double sum = 0.0, sq = 0.0, m = 0.0;
  for (std::size_t i = 0; i < x.size(); ++i)
    if (use[i]) {
      sum += x[i];
      m += 1.0;
    }
  const double mean = m > 0.0 ? sum / m : 0.0;
  for (std::size_t i = 0; i < x.size(); ++i)
    if (use[i]) sq += (x[i] - mean) * (x[i] - mean);
  const double sd = std::max(m > 0.0 ? std::sqrt(sq / m) : 0.0, 1e-6);
  std::vector<double> z(x.size(), 0.0);
  for (std::size_t i = 0; i < x.size(); ++i)
    if (use[i]) z[i] = (x[i] - mean) / sd;
  return z;
}

// Compactor as documented, by brute force: leverage of the unprotected tokens U from the
// sketch X = K_c Phi (pre-RoPE keys, centred over U) through the pseudo-inverse; chunked
// non-causal attention over U with the observed queries whose positions fall in each chunk
// (softmax of attention_scale * q.k + lw over the chunk's keys, summed over queries, mean over
// the group, rescaled by tokens / observed queries), times ||v||, average-pooled with zero
// padding; z-scores; beta * zlev + zatt. Protected tokens +inf.
std::vector<double> compactor_reference(const stream_case& c, const dmat& pre_keys, const compactor& cp) {
  const int n = c.n, d = c.d(), g = c.group();
  const int first = std::min(cp.protect_first, n), last = std::min(cp.protect_last, n - first), m = n - first - last;
  std::vector<double> out(static_cast<std::size_t>(n), std::numeric_limits<double>::infinity());
  if (m == 0) return out;
  std::vector<float> phi(static_cast<std::size_t>(d * cp.lev.sketch_dim));
  cp.lev.sketch(d, phi.data());
  const dmat p = Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(
                     phi.data(), d, cp.lev.sketch_dim)
                     .cast<double>();
  const dvec h = hat_diagonal(centred(pre_keys.middleRows(first, m)) * p);
  std::vector<double> lev(h.data(), h.data() + m);
  std::vector<double> mass(static_cast<std::size_t>(m), 0.0);
  std::vector<bool> covered(static_cast<std::size_t>(m), false);
  for (int c0 = 0; c0 < m; c0 += cp.chunk) {
    const int len = std::min(cp.chunk, m - c0);
    int observed = 0;
    std::vector<double> chunk_mass(static_cast<std::size_t>(len), 0.0);
    for (int j = 0; j < c.n_queries(); ++j) {
      bool in_chunk = false;
      for (int t = 0; t < len; ++t)
        in_chunk |=
            c.positions[static_cast<std::size_t>(first + c0 + t)] == c.query_positions[static_cast<std::size_t>(j)];
      if (!in_chunk) continue;
      ++observed;
      for (int hh = 0; hh < g; ++hh) {
        std::vector<double> logit(static_cast<std::size_t>(len));
        double mx = -std::numeric_limits<double>::infinity(), sum = 0.0;
        for (int t = 0; t < len; ++t) {
          logit[static_cast<std::size_t>(t)] = cp.attention_scale * c.query(j, hh).dot(c.key(first + c0 + t)) +
                                               c.log_weights[static_cast<std::size_t>(first + c0 + t)];
          mx = std::max(mx, logit[static_cast<std::size_t>(t)]);
        }
        for (double& x : logit) sum += (x = std::exp(x - mx));
        for (int t = 0; t < len; ++t)
          chunk_mass[static_cast<std::size_t>(t)] += logit[static_cast<std::size_t>(t)] / sum;
      }
    }
    for (int t = 0; t < len; ++t) {
      covered[static_cast<std::size_t>(c0 + t)] = observed > 0;
      mass[static_cast<std::size_t>(c0 + t)] =
          observed > 0 ? chunk_mass[static_cast<std::size_t>(t)] * len / (observed * g) * c.value(first + c0 + t).norm()
                       : 0.0;
    }
  }
  std::vector<double> att(static_cast<std::size_t>(m), 0.0);
  for (int i = 0; i < m; ++i) {
    for (int t = i - cp.pool / 2; t <= i + cp.pool / 2; ++t)
      if (t >= 0 && t < m) att[static_cast<std::size_t>(i)] += mass[static_cast<std::size_t>(t)];
    att[static_cast<std::size_t>(i)] /= cp.pool;
  }
  const std::vector<double> zl = zscore(lev, std::vector<bool>(static_cast<std::size_t>(m), true));
  const std::vector<double> za = zscore(att, covered);
  for (int i = 0; i < m; ++i)
    out[static_cast<std::size_t>(first + i)] =
        cp.beta * zl[static_cast<std::size_t>(i)] + za[static_cast<std::size_t>(i)];
  return out;
}

// Every token's own query, as a prefill attend() would record with a window at least as long
// as the prompt: pre-RoPE queries correlated with the pre-RoPE keys, rotated by position.
void add_own_queries(stream_case& c, const dmat& pre_keys, std::mt19937& rng, int from, int to) {
  std::normal_distribution<double> normal(0.0, 1.0);
  for (int i = from; i < to; ++i) {
    const std::int32_t p = c.positions[static_cast<std::size_t>(i)];
    c.query_positions.push_back(p);
    const dmat r = rope_matrix(c.rope, c.d(), p);
    for (int h = 0; h < c.group(); ++h) {
      dvec x = 0.3 * pre_keys.row(i).transpose();
      for (int e = 0; e < c.d(); ++e) x(e) += 0.5 * normal(rng);
      const dvec q = r * x;
      for (int e = 0; e < c.d(); ++e) c.queries.push_back(static_cast<float>(q(e)));
    }
  }
}

stream_case grouped(stream_case c, int group) {
  c.shape = group_shape(group, c.d());
  return c;
}

void expect_scores(const std::vector<float>& got, const std::vector<double>& expect, double tol) {
  ASSERT_EQ(got.size(), expect.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (std::isinf(expect[i]))
      EXPECT_EQ(got[i], inf) << "token " << i << " is protected";
    else
      EXPECT_NEAR(got[i], expect[i], tol) << "token " << i;
  }
}

// ====================================================================== compactor

// Prefill: every token's query observed. The score equals the brute-force composition of the
// paper (arXiv:2507.08143, Sec. 3) beta * zscore(leverage) + zscore(pool(A * ||v||)) for the defaults (chunks of 256, a
// last partial chunk), and for other chunk, pooling, blending, protection and scale settings.
TEST(Compactor, MatchesBruteForceComposition) {
  std::mt19937 rng(31);
  const int d = 16, n = 700;
  const dmat pre = to_float(gaussian_matrix(rng, n, d, 0.6));
  kvc::rope_spec rope;
  stream_case c = grouped(stream_with_keys(pre, rope, rng, 0), 2);
  std::uniform_real_distribution<float> lw(0.0f, 1.0f);
  for (float& w : c.log_weights) w = lw(rng) < 0.9f ? 0.0f : std::log(2.0f);
  add_own_queries(c, pre, rng, 0, n);
  struct option_case {
    const char* name;
    void (*set)(compactor&);
  };
  const option_case options[] = {
      {"defaults", [](compactor&) {}},
      {"chunk 100, no pooling, beta 2",
       [](compactor& x) {
         x.chunk = 100;
         x.pool = 1;
         x.beta = 2.0f;
       }},
      {"pool 5, protect 0 and 1, scale 1/4, sketch 8",
       [](compactor& x) {
         x.pool = 5;
         x.protect_first = 0;
         x.protect_last = 1;
         x.attention_scale = 0.25f;
         x.lev.sketch_dim = 8;
         x.lev.seed = 3;
       }},
  };
  for (const option_case& o : options) {
    SCOPED_TRACE(o.name);
    compactor cp;
    o.set(cp);
    expect_scores(scores_of(c, cp), compactor_reference(c, pre, cp), 2e-3);
  }
}

// Decoding: only the last 40 queries were observed (a gap in positions after an eviction, the
// last 4 tokens protected). The chunk that holds them is rescaled by tokens / observed
// queries; chunks without any observed query get zscore(attention) = 0, so leverage alone
// ranks them.
TEST(Compactor, PartialObservation) {
  std::mt19937 rng(32);
  const int d = 16, n = 600;
  const dmat pre = to_float(gaussian_matrix(rng, n, d, 0.6));
  stream_case c = grouped(stream_with_keys(pre, kvc::rope_spec{}, rng, 0, 2), 4);
  add_own_queries(c, pre, rng, n - 40, n);
  compactor cp;
  const std::vector<double> expect = compactor_reference(c, pre, cp);
  expect_scores(scores_of(c, cp), expect, 2e-3);
  // The first chunk has no observed query: its scores are beta * zscore(leverage) alone.
  compactor lev_only = cp;
  lev_only.beta = 1.0f;
  const std::vector<float> b1 = scores_of(c, lev_only), b05 = scores_of(c, cp);
  for (int i = cp.protect_first; i < cp.protect_first + cp.chunk; ++i)
    EXPECT_NEAR(b05[static_cast<std::size_t>(i)], 0.5 * b1[static_cast<std::size_t>(i)], 1e-5);
}

// The first protect_first and last protect_last tokens are +inf; all of a short stream is.
TEST(Compactor, ProtectsFirstAndLastTokens) {
  std::mt19937 rng(33);
  for (int n : {5, 12, 13, 40}) {
    SCOPED_TRACE(std::to_string(n) + " tokens");
    const dmat pre = to_float(gaussian_matrix(rng, n, 16));
    stream_case c = stream_with_keys(pre, kvc::rope_spec{}, rng);
    add_own_queries(c, pre, rng, 0, n);
    const std::vector<float> s = scores_of(c, compactor{});
    for (int i = 0; i < n; ++i) {
      const bool protected_token = i < 8 || i >= n - 4;
      EXPECT_EQ(std::isinf(s[static_cast<std::size_t>(i)]), protected_token) << "token " << i;
      if (!protected_token) {
        EXPECT_TRUE(std::isfinite(s[static_cast<std::size_t>(i)]));
      }
    }
    if (n == 13) {
      EXPECT_EQ(s[8], 0.0f) << "one scored token: both z-scores are 0";
    }
  }
}

TEST(Compactor, MissingInputsAreErrors) {
  std::mt19937 rng(34);
  const dmat pre = to_float(gaussian_matrix(rng, 40, 16));
  stream_case c = stream_with_keys(pre, kvc::rope_spec{}, rng);
  kvc::workspace ws(std::size_t{1} << 20);
  std::vector<float> out(40);
  const kvc::status st = compactor{}.score(c.data(), ws, out.data());
  EXPECT_EQ(st.code(), kvc::status_code::invalid_argument);
  EXPECT_NE(std::string(st.message()).find("observed queries"), std::string::npos) << st.message();
  add_own_queries(c, pre, rng, 30, 40);
  EA_ASSERT_OK(compactor{}.score(c.data(), ws, out.data()));
  for (void (*set)(compactor&) : {+[](compactor& x) { x.chunk = 0; }, +[](compactor& x) { x.pool = 2; },
                                  +[](compactor& x) { x.protect_first = -1; },
                                  +[](compactor& x) { x.beta = std::numeric_limits<float>::quiet_NaN(); }}) {
    compactor bad;
    set(bad);
    EXPECT_EQ(bad.score(c.data(), ws, out.data()).code(), kvc::status_code::invalid_argument);
  }
  kvc::stream_data no_values = c.data();
  no_values.values = nullptr;
  EXPECT_EQ(compactor{}.score(no_values, ws, out.data()).code(), kvc::status_code::invalid_argument);
  EXPECT_EQ(ws.used(), 0u);
}

// ====================================================================== scratch

// Every workspace size either scores exactly as a large workspace does or reports
// workspace_exhausted (naming the stream), never anything else; the scorers never write past
// what they were given (the sanitizer build checks).
template <class Scorer>
void sweep_workspace(const stream_case& c, const Scorer& scorer) {
  SCOPED_TRACE(Scorer::name);
  kvc::workspace big(std::size_t{16} << 20);
  std::vector<float> expect(static_cast<std::size_t>(c.n)), out(expect.size());
  EA_ASSERT_OK(scorer.score(c.data(), big, expect.data()));
  const std::size_t need = big.high_water();
  int failures = 0, successes = 0;
  std::vector<std::size_t> sizes = {need, need + 64};
  for (std::size_t i = 0; i < 200; ++i) sizes.push_back(need * i / 200);
  for (std::size_t bytes : sizes) {
    kvc::workspace ws(bytes);
    const kvc::status st = scorer.score(c.data(), ws, out.data());
    if (st.ok()) {
      ++successes;
      for (std::size_t i = 0; i < out.size(); ++i) {
        if (std::isinf(expect[i]))
          EXPECT_EQ(out[i], expect[i]) << bytes << " bytes, token " << i;
        else
          EXPECT_NEAR(out[i], expect[i], 1e-5f * (1.0f + std::abs(expect[i]))) << bytes << " bytes, token " << i;
      }
    } else {
      ++failures;
      ASSERT_EQ(st.code(), kvc::status_code::workspace_exhausted) << bytes << " bytes: " << st.message();
      EXPECT_NE(std::string(st.message()).find("workspace"), std::string::npos);
    }
    EXPECT_EQ(ws.used(), 0u);
  }
  EXPECT_GT(failures, 0);
  EXPECT_GT(successes, 0);
}

TEST(ScorersEa, SmallWorkspaceIsAStatus) {
  std::mt19937 rng(41);
  const dmat pre = to_float(gaussian_matrix(rng, 300, 16, 0.6));
  stream_case c = grouped(stream_with_keys(pre, kvc::rope_spec{}, rng), 2);
  add_own_queries(c, pre, rng, 250, 300);
  sweep_workspace(c, expected_attention{});
  expected_attention few;
  few.use_covariance = true;
  stream_case c_few = c;
  c_few.query_positions.resize(10);
  c_few.queries.resize(10 * 2 * 16);
  sweep_workspace(c_few, few);
  sweep_workspace(c, leverage{});
  leverage exact;
  exact.exact = true;
  sweep_workspace(c, exact);
  sweep_workspace(c, compactor{});
}

// No scorer calls the allocator (Eigen's products and factorisations included), at head_dim
// 128 with the benchmark's shapes (64 observed queries, a group of 4), with more observed
// queries than head_dim, and at head_dim 256.
TEST(ScorersEa, NeverAllocate) {
#if defined(KVC_EA_TEST_COUNTS_MALLOC)
  std::mt19937 rng(42);
  const int d = 128, n = 1500;
  const dmat pre = to_float(gaussian_matrix(rng, n, d));
  stream_case c = grouped(stream_with_keys(pre, kvc::rope_spec{}, rng), 4);
  add_own_queries(c, pre, rng, n - 200, n);
  stream_case c64 = c;
  c64.query_positions.erase(c64.query_positions.begin(), c64.query_positions.end() - 64);
  c64.queries.erase(c64.queries.begin(), c64.queries.end() - 64 * 4 * d);
  kvc::workspace ws(std::size_t{64} << 20);
  std::vector<float> out(static_cast<std::size_t>(n));
  leverage exact;
  exact.exact = true;
  const auto run = [&](const char* what, auto&& scorer, const stream_case& sc) {
    malloc_calls = 0;
    malloc_armed = true;
    const kvc::status st = scorer.score(sc.data(), ws, out.data());
    malloc_armed = false;
    EXPECT_TRUE(st.ok()) << what << ": " << st.message();
    EXPECT_EQ(malloc_calls, 0) << what << " allocated";
  };
  // The probe sees this thread's allocations.
  malloc_calls = 0;
  malloc_armed = true;
  void* volatile p = std::malloc(16);
  malloc_armed = false;
  std::free(p);
  ASSERT_EQ(malloc_calls, 1) << "the malloc probe is not working";
  run("expected_attention, 64 queries", expected_attention{}, c64);
  run("expected_attention, 200 queries", expected_attention{}, c);
  run("leverage", leverage{}, c);
  run("leverage exact", exact, c);
  run("compactor", compactor{}, c);
  run("compactor, 64 queries", compactor{}, c64);
  // head_dim 256: more observed queries than head_dim (the Cholesky path), the largest sketch
  const int d2 = 256, n2 = 400;
  const dmat pre2 = to_float(gaussian_matrix(rng, n2, d2));
  stream_case c2 = grouped(stream_with_keys(pre2, kvc::rope_spec{}, rng), 2);
  add_own_queries(c2, pre2, rng, n2 - 300, n2);
  leverage wide;
  wide.sketch_dim = leverage::max_sketch_dim;
  run("expected_attention, head_dim 256, 300 queries", expected_attention{}, c2);
  run("leverage, head_dim 256, sketch 256", wide, c2);
  run("leverage exact, head_dim 256", exact, c2);
  run("compactor, head_dim 256", compactor{}, c2);
#else
  GTEST_SKIP() << "malloc is not interposed in this build (sanitizer or not glibc)";
#endif
}

// ====================================================================== through the cache

using policy_test::mirror;
using policy_test::token;
using cache_t = kvc::paged_kv_cache<kvc::codec::f32>;

constexpr kvc::model_shape e2e_shape{2, 4, 2, 16};  // layers, q heads, kv heads, head_dim

kvc::cache_config e2e_config(int query_window) {
  kvc::cache_config cfg = policy_test::make_config(e2e_shape, 16, 1024);
  cfg.observe.query_window = query_window;
  cfg.rope.theta = 50000.0;
  return cfg;
}

// A stream_case from the test's mirror of one (layer, kv_head) and its own list of the
// queries attend() received on that layer: [n][num_q_heads][d], the last `window` of them.
stream_case case_from_mirror(const mirror& m, int layer, int kv_head, const std::vector<float>& q_all,
                             const std::vector<std::int32_t>& qpos_all, int window, const kvc::rope_spec& rope) {
  const kvc::model_shape& sh = m.shape();
  const int d = sh.head_dim, g = sh.group_size();
  stream_case c;
  c.shape = sh;
  c.rope = rope;
  for (const token& t : m.stream(layer, kv_head)) {
    c.positions.push_back(t.position);
    c.keys.insert(c.keys.end(), t.key.begin(), t.key.end());
    c.values.insert(c.values.end(), t.value.begin(), t.value.end());
  }
  c.n = static_cast<int>(c.positions.size());
  c.log_weights.assign(static_cast<std::size_t>(c.n), 0.0f);
  const int total = static_cast<int>(qpos_all.size()), from = std::max(0, total - window);
  for (int j = from; j < total; ++j) {
    c.query_positions.push_back(qpos_all[static_cast<std::size_t>(j)]);
    for (int h = 0; h < g; ++h) {
      const std::size_t off =
          (static_cast<std::size_t>(j) * sh.num_q_heads + static_cast<std::size_t>(kv_head * g + h)) * d;
      c.queries.insert(c.queries.end(), q_all.begin() + static_cast<std::ptrdiff_t>(off),
                       q_all.begin() + static_cast<std::ptrdiff_t>(off + static_cast<std::size_t>(d)));
    }
  }
  return c;
}

// A small model run: per layer, the queries attend() was given, and the cache's mirror.
struct e2e_run {
  cache_t cache;
  kvc::seq_id seq;
  mirror m{e2e_shape};
  std::vector<std::vector<float>> q{2};
  std::vector<std::vector<std::int32_t>> qpos{2};

  explicit e2e_run(const kvc::cache_config& cfg)
      : cache(policy_test::make_cache<cache_t>(cfg)), seq(cache.create_sequence()) {}

  // Appends n tokens at `first` on every layer and attends with their n queries (a prefill, or
  // a decode step when n = 1); queries correlated with the keys so attention is not uniform.
  void step(std::mt19937& rng, std::int32_t first, int n, bool attend = true) {
    const int d = e2e_shape.head_dim, qh = e2e_shape.num_q_heads;
    for (int l = 0; l < e2e_shape.num_layers; ++l) {
      const std::size_t before = m.stream(l, 0).size();
      POLICY_ASSERT_OK(policy_test::append_random(cache, m, seq, l, first, n, rng));
      if (!attend) continue;
      std::normal_distribution<float> normal(0.0f, 0.5f);
      std::vector<float> q(static_cast<std::size_t>(n) * qh * d), out(q.size());
      std::vector<std::int32_t> pos;
      for (int i = 0; i < n; ++i) {
        pos.push_back(first + i);
        for (int h = 0; h < qh; ++h) {
          const token& t = m.stream(l, h / e2e_shape.group_size())[before + static_cast<std::size_t>(i)];
          for (int e = 0; e < d; ++e)
            q[(static_cast<std::size_t>(i) * qh + static_cast<std::size_t>(h)) * d + static_cast<std::size_t>(e)] =
                0.4f * t.key[static_cast<std::size_t>(e)] + normal(rng);
        }
      }
      POLICY_ASSERT_OK(cache.attend(seq, l, q.data(), pos.data(), n, out.data()));
      q_all(l).insert(q_all(l).end(), q.begin(), q.end());
      qpos[static_cast<std::size_t>(l)].insert(qpos[static_cast<std::size_t>(l)].end(), pos.begin(), pos.end());
    }
  }
  std::vector<float>& q_all(int l) { return q[static_cast<std::size_t>(l)]; }
};

// The stored keys of a stream with RoPE undone, in double.
dmat unrotated_keys(const stream_case& c) {
  dmat k(c.n, c.d());
  for (int i = 0; i < c.n; ++i)
    k.row(i) =
        (rope_matrix(c.rope, c.d(), c.positions[static_cast<std::size_t>(i)]).transpose() * c.key(i)).transpose();
  return k;
}

// Through paged_kv_cache with observation on: kvc::evict<scorer, uniform> scores every stream
// as the reference does from the test's own record (the scores are recorded inside
// compress), and keeps exactly the top-k of those scores with the original data; after a
// prefill, and again after decode steps (append one token, attend with its query).
template <class Scorer, class Reference>
void check_through_cache(const Scorer& scorer, Reference reference, double rel, double abs) {
  SCOPED_TRACE(Scorer::name);
  std::mt19937 rng(51);
  const int window = 320;
  const kvc::cache_config cfg = e2e_config(window);
  e2e_run run(cfg);
  run.step(rng, 0, 300);  // prefill
  for (int phase = 0; phase < 2; ++phase) {
    SCOPED_TRACE(phase == 0 ? "after the prefill" : "during decoding");
    std::map<std::pair<int, int>, std::vector<float>> recorded;
    const kvc::budget::uniform budget = kvc::budget::uniform::keep_fraction(0.6);
    auto r = run.cache.compress(run.seq, kvc::all_layers,
                                kvc::evict(policy_test::recording<Scorer>{scorer, &recorded}, budget));
    ASSERT_TRUE(r.ok()) << r.status().message();
    for (int l = 0; l < e2e_shape.num_layers; ++l)
      for (int h = 0; h < e2e_shape.num_kv_heads; ++h) {
        SCOPED_TRACE("layer " + std::to_string(l) + ", kv_head " + std::to_string(h));
        const stream_case c =
            case_from_mirror(run.m, l, h, run.q_all(l), run.qpos[static_cast<std::size_t>(l)], window, cfg.rope);
        const std::vector<float>& got = recorded[{l, h}];
        ASSERT_EQ(static_cast<int>(got.size()), c.n);
        const std::vector<double> expect = reference(c);
        for (int i = 0; i < c.n; ++i) {
          const double e = expect[static_cast<std::size_t>(i)];
          if (std::isinf(e))
            EXPECT_EQ(got[static_cast<std::size_t>(i)], inf) << "token " << i;
          else
            EXPECT_NEAR(got[static_cast<std::size_t>(i)], e, rel * std::abs(e) + abs) << "token " << i;
        }
        const int k = static_cast<int>(std::llround(c.n * 0.6));
        const std::vector<int> kept = policy_test::brute_top_k(std::vector<double>(got.begin(), got.end()), k);
        EXPECT_TRUE(policy_test::stream_equals(run.cache, run.seq, l, h, policy_test::pick(run.m.stream(l, h), kept)));
        run.m.keep(l, h, kept);
      }
    if (phase == 0)
      for (int t = 0; t < 6; ++t) run.step(rng, 300 + t, 1);
  }
}

TEST(ScorersEa, EvictThroughCache) {
  check_through_cache(
      expected_attention{}, [](const stream_case& c) { return ea_reference(c, expected_attention{}); }, 2e-3, 1e-9);
  // head_dim 16 < sketch_dim 48: the sketch keeps the keys' whole row space, so the sketched
  // score is the exact leverage of the pre-RoPE keys.
  check_through_cache(
      leverage{},
      [](const stream_case& c) {
        const dvec h = hat_diagonal(centred(unrotated_keys(c)));
        return std::vector<double>(h.data(), h.data() + h.size());
      },
      0.0, 2e-3);
  check_through_cache(
      compactor{}, [](const stream_case& c) { return compactor_reference(c, unrotated_keys(c), compactor{}); }, 0.0,
      5e-3);
}

// Without observation the scorers that need queries fail with a status that says so, and the
// cache is left as it was: observation off in the config (compress refuses), and on but no
// attend() yet (the scorer refuses). Leverage needs only keys and works either way.
TEST(ScorersEa, MissingObservationLeavesCacheUnchanged) {
  std::mt19937 rng(52);
  for (int window : {0, 64}) {
    SCOPED_TRACE("query_window " + std::to_string(window));
    e2e_run run(e2e_config(window));
    run.step(rng, 0, 100, /*attend=*/false);
    const policy_test::cache_snapshot before = policy_test::snapshot(run.cache, run.seq);
    const auto budget = kvc::budget::uniform::keep_fraction(0.5);
    auto ea = run.cache.compress(run.seq, kvc::all_layers, kvc::evict(expected_attention{}, budget));
    ASSERT_FALSE(ea.ok());
    EXPECT_NE(std::string(ea.status().message()).find("queries"), std::string::npos) << ea.status().message();
    auto cp = run.cache.compress(run.seq, kvc::all_layers, kvc::evict(compactor{}, budget));
    ASSERT_FALSE(cp.ok());
    EXPECT_NE(std::string(cp.status().message()).find("queries"), std::string::npos) << cp.status().message();
    EXPECT_TRUE(policy_test::snapshot(run.cache, run.seq) == before);
    EXPECT_TRUE(policy_test::cache_equals(run.cache, run.seq, run.m));
    auto lv = run.cache.compress(run.seq, kvc::all_layers, kvc::evict(leverage{}, budget));
    EXPECT_TRUE(lv.ok()) << lv.status().message();
  }
}

}  // namespace
