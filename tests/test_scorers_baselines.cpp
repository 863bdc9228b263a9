// Tests of the baseline scorers: snapkv (SnapKV), h2o (H2O), tova (TOVA), qfilter and
// qfilter_calibrated (Q-Filters) and keydiff (KeyDiff).
//
// Every expected score is computed here, in double precision, from the test's own copy of
// the data: a dense causal softmax for the attention of observed queries, pooling written
// out as avg_pool1d / max_pool1d (over indices, and over positions for streams with gaps),
// a dense symmetric eigensolver (Eigen) for the principal direction of the queries, the
// anchor of unit keys for KeyDiff, and a replay of every attend() call for H2O's statistics.
// Small examples are worked by hand in the comments. Kept sets after compress() are
// compared with a brute-force top-k of the expected scores (policy_test::brute_top_k: ties
// go to the more recent token, as in kvc::evict).
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <gtest/gtest.h>
#include <Eigen/Core>
#include <Eigen/Eigenvalues>

#include <kvc/kvc.hpp>

#include "policy_helpers.hpp"
#include "reference/snapshot.hpp"

namespace {

constexpr double inf = std::numeric_limits<double>::infinity();
using kvc::score::group_reduce;
using kvc::score::pooling;

static_assert(kvc::is_scorer_v<kvc::score::snapkv>, "snapkv must satisfy the scorer interface");
static_assert(kvc::is_scorer_v<kvc::score::h2o>, "h2o must satisfy the scorer interface");
static_assert(kvc::is_scorer_v<kvc::score::tova>, "tova must satisfy the scorer interface");
static_assert(kvc::is_scorer_v<kvc::score::qfilter>, "qfilter must satisfy the scorer interface");
static_assert(kvc::is_scorer_v<kvc::score::qfilter_calibrated>, "qfilter_calibrated must satisfy the interface");
static_assert(kvc::is_scorer_v<kvc::score::keydiff>, "keydiff must satisfy the scorer interface");

// ============================================================================ data

// RoPE as in RoFormer (Su et al. 2021) with half-split pairs (i, i + d/2) turned by
// position * 10000^(-2i/d): kvc's default rope_spec. Keys and queries are rotated before
// they reach the cache, as a model's are.
std::vector<double> rotate(std::vector<double> x, double position) {
  const int d = static_cast<int>(x.size());
  for (int i = 0; i < d / 2; ++i) {
    const double w = position * std::pow(10000.0, -2.0 * i / d);
    const double a = x[static_cast<std::size_t>(i)], b = x[static_cast<std::size_t>(i + d / 2)];
    x[static_cast<std::size_t>(i)] = a * std::cos(w) - b * std::sin(w);
    x[static_cast<std::size_t>(i + d / 2)] = a * std::sin(w) + b * std::cos(w);
  }
  return x;
}

// A key or query of a model-like head: Gaussian plus a shared offset on every fifth
// channel (so queries and keys lean in a common direction), rotated to its position,
// rounded to float.
std::vector<float> random_row(std::mt19937& rng, int d, std::int32_t position, double offset, double spread) {
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> x(static_cast<std::size_t>(d));
  for (int e = 0; e < d; ++e) x[static_cast<std::size_t>(e)] = spread * normal(rng) + (e % 5 == 0 ? offset : 0.0);
  const std::vector<double> r = rotate(x, position);
  return std::vector<float>(r.begin(), r.end());
}

// One stream as the references see it: every value exactly the float the scorer gets.
struct ref_stream {
  int d = 0, g = 1;
  std::vector<std::int32_t> pos;                    // [n], increasing
  std::vector<double> lw;                           // [n] log-weights
  std::vector<std::vector<double>> keys;            // [n][d]
  std::vector<std::int32_t> qpos;                   // [m], oldest first
  std::vector<std::vector<std::vector<double>>> q;  // [m][g][d]
  std::vector<double> att_sum, att_count;           // [n], for h2o (may be empty)

  int size() const { return static_cast<int>(pos.size()); }
  int queries() const { return static_cast<int>(qpos.size()); }
};

// The same stream packed as compress() hands it to a scorer.
struct packed_stream {
  kvc::model_shape shape;
  kvc::rope_spec rope;
  std::vector<std::int32_t> pos, qpos;
  std::vector<float> lw, keys, queries, att_sum, att_count, att_last;

  explicit packed_stream(const ref_stream& r) : shape{1, r.g, 1, r.d} {
    pos = r.pos;
    qpos = r.qpos;
    lw.assign(r.lw.begin(), r.lw.end());
    for (const auto& k : r.keys) keys.insert(keys.end(), k.begin(), k.end());
    for (const auto& rows : r.q)
      for (const auto& row : rows) queries.insert(queries.end(), row.begin(), row.end());
    att_sum.assign(r.att_sum.begin(), r.att_sum.end());
    att_count.assign(r.att_count.begin(), r.att_count.end());
    att_last.assign(r.att_sum.size(), 0.0f);
  }

  kvc::stream_data data() const {
    kvc::stream_data s;
    s.shape = &shape;
    s.info = {0, 0, static_cast<int>(pos.size())};
    s.positions = pos.data();
    s.log_weights = lw.data();
    s.keys = keys.empty() ? nullptr : keys.data();
    s.queries = queries.empty() ? nullptr : queries.data();
    s.query_positions = qpos.empty() ? nullptr : qpos.data();
    s.n_queries = static_cast<int>(qpos.size());
    s.attention_sum = att_sum.empty() ? nullptr : att_sum.data();
    s.attention_count = att_count.empty() ? nullptr : att_count.data();
    s.last_attention = att_last.empty() ? nullptr : att_last.data();
    s.rope = &rope;
    return s;
  }
};

struct stream_options {
  int n = 40, m = 8, g = 1, d = 16;
  bool gaps = false;         // positions advance by 1..3 (a stream after evictions)
  bool log_weights = false;  // some tokens stand for merged ones (log-weight log 2, log 3)
  std::int32_t first = 0;    // position of the first token
  std::int32_t q_last = -1;  // position of the last query; -1: the last token's
};

// n tokens and m queries; query j sits at q_last - (m - 1 - j), so the queries are the last
// positions of the stream (a prefill's window, or the last decode steps).
ref_stream random_stream(std::mt19937& rng, const stream_options& o) {
  ref_stream r;
  r.d = o.d;
  r.g = o.g;
  std::uniform_int_distribution<int> step(1, 3);
  std::int32_t p = o.first;
  for (int i = 0; i < o.n; ++i) {
    r.pos.push_back(p);
    p += o.gaps ? step(rng) : 1;
  }
  for (int i = 0; i < o.n; ++i) {
    r.lw.push_back(o.log_weights ? std::log(static_cast<double>(static_cast<float>(1 + i % 3))) : 0.0);
    const std::vector<float> k = random_row(rng, o.d, r.pos[static_cast<std::size_t>(i)], 1.0, 1.0);
    r.keys.emplace_back(k.begin(), k.end());
  }
  // Log-weights as the float the scorer sees.
  for (double& w : r.lw) w = static_cast<double>(static_cast<float>(w));
  const std::int32_t last = o.q_last >= 0 ? o.q_last : (o.n > 0 ? r.pos.back() : 0);
  for (int j = 0; j < o.m; ++j) {
    const std::int32_t qp = last - (o.m - 1 - j);
    r.qpos.push_back(qp);
    std::vector<std::vector<double>> rows;
    for (int h = 0; h < o.g; ++h) {
      const std::vector<float> q = random_row(rng, o.d, qp, 0.8 + 0.2 * h, 0.8);
      rows.emplace_back(q.begin(), q.end());
    }
    r.q.push_back(std::move(rows));
  }
  return r;
}

// ============================================================================ references

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0.0;
  for (std::size_t e = 0; e < a.size(); ++e) s += a[e] * b[e];
  return s;
}

// Attention of query (j, h) to every token: softmax of q.k / sqrt(d) + log-weight over the
// tokens at or before the query's position, 0 for the others.
std::vector<double> attention_row(const ref_stream& r, int j, int h) {
  const std::size_t n = r.pos.size();
  std::vector<double> a(n, 0.0);
  const std::vector<double>& q = r.q[static_cast<std::size_t>(j)][static_cast<std::size_t>(h)];
  double mx = -inf;
  for (std::size_t i = 0; i < n; ++i)
    if (r.pos[i] <= r.qpos[static_cast<std::size_t>(j)]) {
      a[i] = dot(q, r.keys[i]) / std::sqrt(static_cast<double>(r.d)) + r.lw[i];
      mx = std::max(mx, a[i]);
    }
  if (mx == -inf) return std::vector<double>(n, 0.0);
  double z = 0.0;
  for (std::size_t i = 0; i < n; ++i)
    if (r.pos[i] <= r.qpos[static_cast<std::size_t>(j)]) z += std::exp(a[i] - mx);
  for (std::size_t i = 0; i < n; ++i)
    a[i] = r.pos[i] <= r.qpos[static_cast<std::size_t>(j)] ? std::exp(a[i] - mx) / z : 0.0;
  return a;
}

double reduce_group(const std::vector<double>& per_head, group_reduce red) {
  double acc = red == group_reduce::mean ? 0.0 : -inf;
  for (double x : per_head) acc = red == group_reduce::mean ? acc + x : std::max(acc, x);
  return red == group_reduce::mean ? acc / static_cast<double>(per_head.size()) : acc;
}

// torch.nn.functional.avg_pool1d / max_pool1d with stride 1 and padding kernel / 2, as the
// SnapKV reference calls them: the average divides by `kernel` everywhere (padded zeros
// count), the maximum ignores the padding.
std::vector<double> pool1d(const std::vector<double>& x, int kernel, pooling pool) {
  const int n = static_cast<int>(x.size()), half = kernel / 2;
  std::vector<double> out(x.size());
  for (int i = 0; i < n; ++i) {
    double acc = pool == pooling::avg ? 0.0 : -inf;
    for (int o = -half; o <= half; ++o) {
      const int t = i + o;
      if (t < 0 || t >= n) continue;
      acc = pool == pooling::avg ? acc + x[static_cast<std::size_t>(t)] : std::max(acc, x[static_cast<std::size_t>(t)]);
    }
    out[static_cast<std::size_t>(i)] = pool == pooling::avg ? acc / kernel : acc;
  }
  return out;
}

// The same pooling over positions: the neighbours of token i are the tokens t whose
// position is within kernel / 2 of its own; a position with no token counts as padding.
std::vector<double> pool_positions(const std::vector<double>& x, const std::vector<std::int32_t>& pos, int kernel,
                                   pooling pool) {
  const std::size_t n = x.size();
  std::vector<double> out(n);
  for (std::size_t i = 0; i < n; ++i) {
    double acc = pool == pooling::avg ? 0.0 : -inf;
    for (std::size_t t = 0; t < n; ++t)
      if (std::abs(static_cast<long>(pos[t]) - static_cast<long>(pos[i])) <= kernel / 2)
        acc = pool == pooling::avg ? acc + x[t] : std::max(acc, x[t]);
    out[i] = pool == pooling::avg ? acc / kernel : acc;
  }
  return out;
}

// SnapKV (Li et al. 2024, Sec. 4.1): C = sum over the window's queries of their attention to
// the tokens before the window (Eq. 1), pooled per query head (Listing 1), reduced over the
// group; the window's tokens (position >= the window's first query) score +inf.
std::vector<double> snapkv_reference(const ref_stream& r, const kvc::score::snapkv& p) {
  const int n = r.size(), m = r.queries(), w = std::min(p.window, m), j0 = m - w;
  std::int32_t start = std::numeric_limits<std::int32_t>::max();
  for (int j = j0; j < m; ++j) start = std::min(start, r.qpos[static_cast<std::size_t>(j)]);
  int n_vote = 0;
  while (n_vote < n && (!p.protect_window || r.pos[static_cast<std::size_t>(n_vote)] < start)) ++n_vote;
  const std::vector<std::int32_t> vote_pos(r.pos.begin(), r.pos.begin() + n_vote);
  bool consecutive = true;
  for (int i = 1; i < n_vote; ++i)
    consecutive = consecutive && vote_pos[static_cast<std::size_t>(i)] == vote_pos[static_cast<std::size_t>(i - 1)] + 1;
  std::vector<std::vector<double>> pooled;
  for (int h = 0; h < r.g; ++h) {
    std::vector<double> c(static_cast<std::size_t>(n_vote), 0.0);
    for (int j = j0; j < m; ++j) {
      const std::vector<double> a = attention_row(r, j, h);
      for (int i = 0; i < n_vote; ++i) c[static_cast<std::size_t>(i)] += a[static_cast<std::size_t>(i)];
    }
    // Consecutive positions: exactly the reference's pooling over indices.
    pooled.push_back(consecutive ? pool1d(c, p.kernel, p.pool) : pool_positions(c, vote_pos, p.kernel, p.pool));
  }
  std::vector<double> s(static_cast<std::size_t>(n), inf);
  for (int i = 0; i < n_vote; ++i) {
    std::vector<double> per_head;
    for (int h = 0; h < r.g; ++h) per_head.push_back(pooled[static_cast<std::size_t>(h)][static_cast<std::size_t>(i)]);
    s[static_cast<std::size_t>(i)] = reduce_group(per_head, p.reduce);
  }
  return s;
}

// TOVA (Oren et al. 2024, Sec. 3.3): the last query's attention, reduced over the group;
// tokens it cannot see score +inf.
std::vector<double> tova_reference(const ref_stream& r, group_reduce red) {
  const int n = r.size(), last = r.queries() - 1;
  std::vector<std::vector<double>> a;
  for (int h = 0; h < r.g; ++h) a.push_back(attention_row(r, last, h));
  std::vector<double> s(static_cast<std::size_t>(n), inf);
  for (int i = 0; i < n; ++i) {
    if (r.pos[static_cast<std::size_t>(i)] > r.qpos[static_cast<std::size_t>(last)]) continue;
    std::vector<double> per_head;
    for (int h = 0; h < r.g; ++h) per_head.push_back(a[static_cast<std::size_t>(h)][static_cast<std::size_t>(i)]);
    s[static_cast<std::size_t>(i)] = reduce_group(per_head, red);
  }
  return s;
}

// Q-Filters (Godey et al. 2025, Sec. 3-4): u_h, the first right singular vector of head h's
// query matrix Q_h [m][d], i.e. the top eigenvector of Q_h^T Q_h (dense eigensolver, double),
// oriented so that more of the queries project positively on it than negatively (an exact
// tie: their summed projection >= 0); zero when Q_h is.
std::vector<double> principal_direction(const ref_stream& r, int h) {
  const int m = r.queries(), d = r.d;
  Eigen::MatrixXd q(m, d);
  for (int j = 0; j < m; ++j)
    for (int e = 0; e < d; ++e)
      q(j, e) = r.q[static_cast<std::size_t>(j)][static_cast<std::size_t>(h)][static_cast<std::size_t>(e)];
  const Eigen::MatrixXd gram = q.transpose() * q;
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig(gram);
  std::vector<double> u(static_cast<std::size_t>(d), 0.0);
  if (!(eig.eigenvalues()(d - 1) > 0.0)) return u;
  const Eigen::VectorXd v = eig.eigenvectors().col(d - 1);
  const Eigen::VectorXd proj = q * v;
  int positive = 0, negative = 0;
  for (int j = 0; j < m; ++j) {
    positive += proj(j) > 0.0;
    negative += proj(j) < 0.0;
  }
  const double sign = positive > negative || (positive == negative && proj.sum() >= 0.0) ? 1.0 : -1.0;
  for (int e = 0; e < d; ++e) u[static_cast<std::size_t>(e)] = sign * v(e);
  return u;
}

// s_i = reduce over h of k_i . u_h: the keys that point where the queries point score high.
std::vector<double> qfilter_reference(const ref_stream& r, group_reduce red) {
  std::vector<std::vector<double>> u;
  for (int h = 0; h < r.g; ++h) u.push_back(principal_direction(r, h));
  std::vector<double> s;
  for (const auto& k : r.keys) {
    std::vector<double> per_head;
    for (const auto& uh : u) per_head.push_back(dot(k, uh));
    s.push_back(reduce_group(per_head, red));
  }
  return s;
}

// KeyDiff (Park et al. 2025, Sec. 3): mu = mean of k_j / ||k_j||, s_i = -cos(k_i, mu); a zero
// key adds nothing to mu and scores 0, and everything scores 0 when mu is zero.
std::vector<double> keydiff_reference(const ref_stream& r) {
  std::vector<double> mu(static_cast<std::size_t>(r.d), 0.0);
  for (const auto& k : r.keys) {
    const double nk = std::sqrt(dot(k, k));
    if (nk > 0.0)
      for (std::size_t e = 0; e < mu.size(); ++e) mu[e] += k[e] / nk;
  }
  const double nmu = std::sqrt(dot(mu, mu));
  std::vector<double> s;
  for (const auto& k : r.keys) {
    const double nk = std::sqrt(dot(k, k));
    s.push_back(nk > 0.0 && nmu > 0.0 ? -dot(k, mu) / (nk * nmu) : 0.0);
  }
  return s;
}

// H2O (Zhang et al. 2023, Algorithm 1) with the normalisation by the number of queries that
// could see the token; +inf for a token no query has seen.
std::vector<double> h2o_reference(const ref_stream& r, bool normalize) {
  std::vector<double> s;
  for (std::size_t i = 0; i < r.att_sum.size(); ++i)
    s.push_back(r.att_count[i] > 0.0 ? (normalize ? r.att_sum[i] / r.att_count[i] : r.att_sum[i]) : inf);
  return s;
}

// ============================================================================ checks

::testing::AssertionResult scores_near(const std::vector<float>& got, const std::vector<double>& ref, double abs_tol,
                                       double rel_tol) {
  if (got.size() != ref.size())
    return ::testing::AssertionFailure() << got.size() << " scores, expected " << ref.size();
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double g = got[i], r = ref[i];
    const bool ok = std::isinf(r) ? g == r : std::fabs(g - r) <= abs_tol + rel_tol * std::fabs(r);
    if (!ok)
      return ::testing::AssertionFailure()
             << "token " << i << ": score " << g << ", expected " << r << " (off by " << g - r << ")";
  }
  return ::testing::AssertionSuccess();
}

// Runs a scorer on a packed stream with a workspace big enough for anything here.
template <class Scorer>
std::vector<float> run(const Scorer& scorer, const kvc::stream_data& s, kvc::status* st = nullptr) {
  kvc::workspace ws(std::size_t{8} << 20);
  std::vector<float> out(static_cast<std::size_t>(s.size()), -12345.0f);
  const kvc::status r = scorer.score(s, ws, out.data());
  EXPECT_EQ(ws.used(), 0u) << Scorer::name << " left workspace allocated";
  if (st != nullptr)
    *st = r;
  else
    EXPECT_TRUE(r.ok()) << r.message();
  return out;
}

::testing::AssertionResult fails_with(const kvc::status& st, kvc::status_code code,
                                      std::initializer_list<const char*> words) {
  if (st.ok()) return ::testing::AssertionFailure() << "succeeded";
  if (st.code() != code)
    return ::testing::AssertionFailure() << "code " << kvc::to_string(st.code()) << " (" << st.message() << ")";
  for (const char* w : words)
    if (std::string(st.message()).find(w) == std::string::npos)
      return ::testing::AssertionFailure() << "message \"" << st.message() << "\" does not say \"" << w << "\"";
  return ::testing::AssertionSuccess();
}

// The workspace may be any size: the scorer either gives the same scores, bit for bit, or
// reports workspace_exhausted naming itself, and gives back everything it took.
template <class Scorer>
void check_workspace_sizes(const Scorer& scorer, const kvc::stream_data& s) {
  SCOPED_TRACE(Scorer::name);
  kvc::workspace big(std::size_t{8} << 20);
  std::vector<float> expected(static_cast<std::size_t>(s.size()));
  ASSERT_TRUE(scorer.score(s, big, expected.data()).ok());
  const std::size_t need = big.high_water();
  int failures = 0, successes = 0;
  for (std::size_t cap = 0; cap <= need + 256; cap += std::max<std::size_t>(need / 37, 8)) {
    kvc::workspace ws(cap);
    std::vector<float> out(static_cast<std::size_t>(s.size()), 0.0f);
    const kvc::status st = scorer.score(s, ws, out.data());
    EXPECT_EQ(ws.used(), 0u) << "capacity " << cap;
    if (st.ok()) {
      ++successes;
      EXPECT_EQ(out, expected) << "capacity " << cap;
    } else {
      ++failures;
      EXPECT_TRUE(fails_with(st, kvc::status_code::workspace_exhausted, {Scorer::name})) << "capacity " << cap;
    }
  }
  EXPECT_GT(successes, 0);
  if (need > 0) {
    EXPECT_GT(failures, 0);
  }
}

// ============================================================================ SnapKV

// SnapKV, Eqs. 1-2 and Listing 1 (Li et al. 2024), on random RoPE'd data against the double
// precision reference: group sizes 1 and 3 (GQA, mean and max over the group), average and
// max pooling of widths 1 to 7, more observed queries than the window and fewer, streams of
// consecutive positions (pooling over indices) and with gaps (pooling over positions),
// log-weights of merged tokens in the softmax, the window protected or not.
TEST(SnapKV, MatchesBruteForceOnRandomData) {
  std::mt19937 rng(11);
  int cases = 0;
  for (int g : {1, 3})
    for (bool gaps : {false, true})
      for (int window : {4, 16, 64}) {
        stream_options o;
        o.n = 57;
        o.m = 20;
        o.g = g;
        o.d = g == 1 ? 16 : 20;  // whole blocks of eight dimensions, and a remainder
        o.gaps = gaps;
        o.log_weights = gaps;
        const ref_stream r = random_stream(rng, o);
        const packed_stream p(r);
        for (int kernel : {1, 3, 5, 7})
          for (pooling pool : {pooling::avg, pooling::max})
            for (group_reduce red : {group_reduce::mean, group_reduce::max})
              for (bool protect : {true, false}) {
                kvc::score::snapkv sc;
                sc.window = window;
                sc.kernel = kernel;
                sc.pool = pool;
                sc.reduce = red;
                sc.protect_window = protect;
                SCOPED_TRACE("group " + std::to_string(g) + (gaps ? ", gaps" : "") + ", window " +
                             std::to_string(window) + ", kernel " + std::to_string(kernel) +
                             (pool == pooling::avg ? ", avg" : ", max") +
                             (red == group_reduce::mean ? ", mean" : ", max") + (protect ? ", protected" : ""));
                ASSERT_TRUE(scores_near(run(sc, p.data()), snapkv_reference(r, sc), 2e-6, 2e-5));
                ++cases;
              }
      }
  EXPECT_EQ(cases, 2 * 2 * 3 * 4 * 2 * 2 * 2);
}

// A hand-worked example of the votes, the pooling and the protected window. All keys zero,
// so each query's attention is proportional to e^(log-weight): with weights m = 1, 2, 3, 4,
// 1, 1 on positions 0..5 and a window of two queries at positions 4 and 5, query 4 gives
// m_i / 11 to tokens 0..4 and query 5 gives m_i / 12 to tokens 0..5. The window starts at
// position 4, so tokens 0..3 vote: C = m_i (1/11 + 1/12) = m_i * 23/132 = (1, 2, 3, 4) * 23/132.
// Kernel 3, average (padding counts, token 4 is not in the prefix): (0+1+2)/3, (1+2+3)/3,
// (2+3+4)/3, (3+4+0)/3 = 1, 2, 3, 7/3 times 23/132. Max: 2, 3, 4, 4 times 23/132. Tokens 4
// and 5 score +inf. Without protection all six vote: C = (1,2,3,4,1, 132/23 * 1/12) * 23/132,
// where token 5 is seen by query 5 only.
TEST(SnapKV, HandWorkedVotesPoolingAndWindow) {
  ref_stream r;
  r.d = 4;
  r.pos = {0, 1, 2, 3, 4, 5};
  for (double m : {1.0, 2.0, 3.0, 4.0, 1.0, 1.0}) r.lw.push_back(static_cast<double>(static_cast<float>(std::log(m))));
  r.keys.assign(6, std::vector<double>(4, 0.0));
  r.qpos = {4, 5};
  r.q = {{{0.5, -1.0, 2.0, 0.0}}, {{1.0, 1.0, 1.0, 1.0}}};
  const packed_stream p(r);
  const double c = 23.0 / 132.0;
  kvc::score::snapkv sc;
  sc.window = 2;
  sc.kernel = 3;
  EXPECT_TRUE(scores_near(run(sc, p.data()), {1 * c, 2 * c, 3 * c, 7.0 / 3.0 * c, inf, inf}, 1e-6, 1e-5));
  sc.pool = pooling::max;
  EXPECT_TRUE(scores_near(run(sc, p.data()), {2 * c, 3 * c, 4 * c, 4 * c, inf, inf}, 1e-6, 1e-5));
  sc.kernel = 1;
  sc.protect_window = false;
  EXPECT_TRUE(scores_near(run(sc, p.data()), {1 * c, 2 * c, 3 * c, 4 * c, 1 * c, 1.0 / 12.0}, 1e-6, 1e-5));
  sc.window = 1;  // only the query at position 5: m_i / 12
  EXPECT_TRUE(scores_near(run(sc, p.data()), {1 / 12.0, 2 / 12.0, 3 / 12.0, 4 / 12.0, 1 / 12.0, 1 / 12.0}, 1e-6, 1e-5));
}

// Edge cases: fewer tokens than the window (every token is in the window: all +inf; without
// protection they are scored like any other), one token, fewer observed queries than the
// window, queries that see no token (all before the stream: zero votes), an empty stream.
TEST(SnapKV, EdgeCases) {
  std::mt19937 rng(12);
  kvc::score::snapkv sc;  // window 64, kernel 5
  for (int n : {1, 2, 5, 30}) {
    SCOPED_TRACE("n = " + std::to_string(n));
    stream_options o;
    o.n = n;
    o.m = n;  // a prefill of n tokens: n queries, all inside the window of 64
    o.g = 2;
    const ref_stream r = random_stream(rng, o);
    const packed_stream p(r);
    const std::vector<float> all = run(sc, p.data());
    for (float x : all) EXPECT_EQ(x, std::numeric_limits<float>::infinity());
    kvc::score::snapkv open = sc;
    open.protect_window = false;
    EXPECT_TRUE(scores_near(run(open, p.data()), snapkv_reference(r, open), 2e-6, 2e-5));
    if (n == 1) {
      EXPECT_NEAR(run(open, p.data())[0], 1.0f / 5.0f, 1e-6) << "one token, all attention, kernel 5";
    }
  }
  {  // 3 observed queries, window 64: the window is those 3; 20 tokens before them vote.
    stream_options o;
    o.n = 23;
    o.m = 3;
    const ref_stream r = random_stream(rng, o);
    EXPECT_TRUE(scores_near(run(sc, packed_stream(r).data()), snapkv_reference(r, sc), 2e-6, 2e-5));
  }
  {  // Queries before every token: nothing is seen, the window starts before the stream.
    stream_options o;
    o.n = 10;
    o.m = 4;
    o.first = 100;
    o.q_last = 50;
    const ref_stream r = random_stream(rng, o);
    const packed_stream p(r);
    for (float x : run(sc, p.data())) EXPECT_EQ(x, std::numeric_limits<float>::infinity());
    kvc::score::snapkv open = sc;
    open.protect_window = false;
    for (float x : run(open, p.data())) EXPECT_EQ(x, 0.0f);
  }
  {  // An empty stream needs nothing, not even queries.
    kvc::model_shape shape{1, 1, 1, 8};
    kvc::stream_data s;
    s.shape = &shape;
    kvc::workspace ws(64);
    EXPECT_TRUE(sc.score(s, ws, nullptr).ok());
  }
}

// Missing inputs and bad options give invalid_argument with a message that names the scorer
// and the problem; any workspace size either works exactly or gives workspace_exhausted.
TEST(SnapKV, MissingInputsOptionsAndWorkspace) {
  std::mt19937 rng(13);
  stream_options o;
  o.n = 90;
  o.m = 24;
  o.g = 3;
  const ref_stream r = random_stream(rng, o);
  const packed_stream p(r);
  kvc::status st;
  kvc::stream_data s = p.data();
  s.queries = nullptr;
  s.query_positions = nullptr;
  s.n_queries = 0;
  run(kvc::score::snapkv{}, s, &st);
  EXPECT_TRUE(fails_with(st, kvc::status_code::invalid_argument, {"snapkv", "observed queries", "query_window"}));
  s = p.data();
  s.keys = nullptr;
  run(kvc::score::snapkv{}, s, &st);
  EXPECT_TRUE(fails_with(st, kvc::status_code::invalid_argument, {"snapkv", "keys"}));
  kvc::score::snapkv bad;
  bad.kernel = 4;
  run(bad, p.data(), &st);
  EXPECT_TRUE(fails_with(st, kvc::status_code::invalid_argument, {"snapkv", "kernel 4"}));
  bad = {};
  bad.window = 0;
  run(bad, p.data(), &st);
  EXPECT_TRUE(fails_with(st, kvc::status_code::invalid_argument, {"snapkv", "window 0"}));
  kvc::score::snapkv sc;
  sc.window = 16;
  check_workspace_sizes(sc, p.data());
}

// ============================================================================ TOVA

// TOVA (Oren et al. 2024, Sec. 3.3): the last observed query's attention, mean or max over
// the group, on random RoPE'd data with gaps and log-weights; tokens after the last query
// score +inf. Edge cases: one token (attention 1), a last query that sees nothing.
TEST(TOVA, MatchesBruteForceOnRandomData) {
  std::mt19937 rng(21);
  for (int g : {1, 4})
    for (bool gaps : {false, true})
      for (std::int32_t q_last : {-1, 30})
        for (group_reduce red : {group_reduce::mean, group_reduce::max}) {
          stream_options o;
          o.n = 45;
          o.m = 5;
          o.g = g;
          o.gaps = gaps;
          o.log_weights = gaps;
          o.q_last = q_last;
          const ref_stream r = random_stream(rng, o);
          kvc::score::tova sc;
          sc.reduce = red;
          SCOPED_TRACE("group " + std::to_string(g) + (gaps ? ", gaps" : "") + ", last query at " +
                       std::to_string(q_last) + (red == group_reduce::mean ? ", mean" : ", max"));
          const std::vector<double> ref = tova_reference(r, red);
          ASSERT_TRUE(scores_near(run(sc, packed_stream(r).data()), ref, 1e-6, 2e-5));
          if (q_last == 30) {
            EXPECT_TRUE(std::isinf(ref.back())) << "the test should have unseen tokens";
          }
        }
  stream_options o;
  o.n = 1;
  o.m = 1;
  o.g = 3;
  EXPECT_EQ(run(kvc::score::tova{}, packed_stream(random_stream(rng, o)).data())[0], 1.0f);
  o.n = 6;
  o.first = 10;
  o.q_last = 3;
  for (float x : run(kvc::score::tova{}, packed_stream(random_stream(rng, o)).data()))
    EXPECT_EQ(x, std::numeric_limits<float>::infinity());
}

TEST(TOVA, MissingInputsAndWorkspace) {
  std::mt19937 rng(22);
  stream_options o;
  o.n = 70;
  o.m = 3;
  o.g = 2;
  const packed_stream p(random_stream(rng, o));
  kvc::status st;
  kvc::stream_data s = p.data();
  s.queries = nullptr;
  s.n_queries = 0;
  run(kvc::score::tova{}, s, &st);
  EXPECT_TRUE(fails_with(st, kvc::status_code::invalid_argument, {"tova", "observed queries", "query_window"}));
  s = p.data();
  s.keys = nullptr;
  run(kvc::score::tova{}, s, &st);
  EXPECT_TRUE(fails_with(st, kvc::status_code::invalid_argument, {"tova", "keys"}));
  check_workspace_sizes(kvc::score::tova{}, p.data());
}

// ============================================================================ Q-Filters

// The direction qfilter projects on, read back through keys that are the unit vectors e_c
// (score of e_c = u_c), equals the top eigenvector of Q^T Q up to sign (|<u, v>| = 1), and
// its sign follows Q-Filters' rule: more queries project positively on u than negatively.
// Fewer queries than dimensions (the m x m Gram path), more (the d x d path), as many,
// random queries with and without a common offset, a rank-one query set.
TEST(QFilter, DirectionIsThePrincipalRightSingularVector) {
  std::mt19937 rng(31);
  struct dir_case {
    int m, d;
    double offset;
  };
  for (const dir_case& c : {dir_case{5, 16, 1.0}, dir_case{40, 16, 1.0}, dir_case{16, 16, 0.0}, dir_case{64, 32, 0.5},
                            dir_case{3, 8, 0.0}, dir_case{100, 8, 0.0}, dir_case{1, 12, 0.0}}) {
    SCOPED_TRACE("m " + std::to_string(c.m) + ", d " + std::to_string(c.d) + ", offset " + std::to_string(c.offset));
    ref_stream r;
    r.d = c.d;
    for (int i = 0; i < c.d; ++i) {
      r.pos.push_back(i);
      r.lw.push_back(0.0);
      std::vector<double> k(static_cast<std::size_t>(c.d), 0.0);
      k[static_cast<std::size_t>(i)] = 1.0;
      r.keys.push_back(k);
    }
    for (int j = 0; j < c.m; ++j) {
      const std::vector<float> q = random_row(rng, c.d, 1000 + j, c.offset, 1.0);
      r.qpos.push_back(1000 + j);
      r.q.push_back({std::vector<double>(q.begin(), q.end())});
    }
    const std::vector<float> u = run(kvc::score::qfilter{}, packed_stream(r).data());
    const std::vector<double> v = principal_direction(r, 0);
    double uv = 0.0, uu = 0.0;
    for (int e = 0; e < c.d; ++e) {
      uv += u[static_cast<std::size_t>(e)] * v[static_cast<std::size_t>(e)];
      uu += static_cast<double>(u[static_cast<std::size_t>(e)]) * u[static_cast<std::size_t>(e)];
    }
    EXPECT_NEAR(uu, 1.0, 1e-6);
    EXPECT_GT(std::fabs(uv), 1.0 - 1e-6) << "not the principal direction";
    int positive = 0, negative = 0;
    double total = 0.0;
    for (int j = 0; j < c.m; ++j) {
      double p = 0.0;
      for (int e = 0; e < c.d; ++e)
        p += r.q[static_cast<std::size_t>(j)][0][static_cast<std::size_t>(e)] * u[static_cast<std::size_t>(e)];
      positive += p > 0.0;
      negative += p < 0.0;
      total += p;
    }
    EXPECT_TRUE(positive > negative || (positive == negative && total >= 0.0))
        << "the queries must project positively on the filter direction: " << positive << " positive, " << negative
        << " negative";
    EXPECT_GT(uv, 0.0) << "sign differs from the reference's orientation";
  }
}

// Q-Filters' sign, worked by hand. Queries along e_0 with coefficients 3, 2, 1, -1, -0.5:
// Q is rank one, u = +-e_0, and three of five project positively on +e_0, so u = +e_0 and
// the key k+ = e_0 (q . k+ > 0 for most queries: it is attended) scores +1 while k- = -e_0
// scores -1; a budget of one keeps k+. Flipping every query flips the choice. With two
// positive and two negative coefficients (3, 1, -1, -2) the tie goes to the side where the
// projections sum to >= 0: sum 3 + 1 - 1 - 2 = 1 > 0, u = +e_0.
TEST(QFilter, SignConventionWorkedByHand) {
  auto make = [](std::vector<double> coef) {
    ref_stream r;
    r.d = 4;
    r.pos = {0, 1, 2};
    r.lw = {0, 0, 0};
    r.keys = {{1, 0, 0, 0}, {-1, 0, 0, 0}, {0, 1, 0, 0}};
    std::int32_t p = 10;
    for (double c : coef) {
      r.qpos.push_back(p++);
      r.q.push_back({{c, 0, 0, 0}});
    }
    return r;
  };
  const std::vector<double> plus = {1.0, -1.0, 0.0}, minus = {-1.0, 1.0, 0.0};
  EXPECT_TRUE(scores_near(run(kvc::score::qfilter{}, packed_stream(make({3, 2, 1, -1, -0.5})).data()), plus, 1e-6, 0));
  EXPECT_TRUE(
      scores_near(run(kvc::score::qfilter{}, packed_stream(make({-3, -2, -1, 1, 0.5})).data()), minus, 1e-6, 0));
  EXPECT_TRUE(scores_near(run(kvc::score::qfilter{}, packed_stream(make({3, 1, -1, -2})).data()), plus, 1e-6, 0));
  EXPECT_TRUE(scores_near(run(kvc::score::qfilter{}, packed_stream(make({-3, -1, 1, 2})).data()), minus, 1e-6, 0));
  // The published filters store f = -u and score -(k . f): the same numbers.
  const std::vector<float> f = {-1.0f, 0.0f, 0.0f, 0.0f};
  kvc::score::qfilter_calibrated cal;
  cal.filters = kvc::span<const float>(f.data(), f.size());
  ref_stream keys_only = make({1});
  EXPECT_TRUE(scores_near(run(cal, packed_stream(keys_only).data()), plus, 1e-6, 0));
}

// Scores against the reference on random RoPE'd keys and queries, GQA groups of 1 and 4 with
// the mean (k . mean_h u_h) and the max over the group; zero queries give zero scores; one
// token; missing inputs; any workspace size.
TEST(QFilter, MatchesBruteForceAndEdgeCases) {
  std::mt19937 rng(32);
  for (int g : {1, 4})
    for (int m : {6, 40})
      for (group_reduce red : {group_reduce::mean, group_reduce::max}) {
        stream_options o;
        o.n = 50;
        o.m = m;
        o.g = g;
        o.gaps = true;
        const ref_stream r = random_stream(rng, o);
        kvc::score::qfilter sc;
        sc.reduce = red;
        SCOPED_TRACE("group " + std::to_string(g) + ", " + std::to_string(m) + " queries, " +
                     (red == group_reduce::mean ? "mean" : "max"));
        EXPECT_TRUE(scores_near(run(sc, packed_stream(r).data()), qfilter_reference(r, red), 1e-5, 1e-5));
      }
  stream_options o;
  o.n = 9;
  o.m = 7;
  o.g = 2;
  ref_stream r = random_stream(rng, o);
  for (auto& rows : r.q)
    for (auto& row : rows) std::fill(row.begin(), row.end(), 0.0);
  for (float x : run(kvc::score::qfilter{}, packed_stream(r).data())) EXPECT_EQ(x, 0.0f);
  o.n = 1;
  o.m = 3;
  r = random_stream(rng, o);
  EXPECT_TRUE(scores_near(run(kvc::score::qfilter{}, packed_stream(r).data()), qfilter_reference(r, group_reduce::mean),
                          1e-5, 1e-5));

  o.n = 60;
  o.m = 20;
  o.g = 3;
  const packed_stream p(random_stream(rng, o));
  kvc::status st;
  kvc::stream_data s = p.data();
  s.queries = nullptr;
  s.n_queries = 0;
  run(kvc::score::qfilter{}, s, &st);
  EXPECT_TRUE(
      fails_with(st, kvc::status_code::invalid_argument, {"qfilter", "observed queries", "qfilter_calibrated"}));
  s = p.data();
  s.keys = nullptr;
  run(kvc::score::qfilter{}, s, &st);
  EXPECT_TRUE(fails_with(st, kvc::status_code::invalid_argument, {"qfilter", "keys"}));
  check_workspace_sizes(kvc::score::qfilter{}, p.data());
}

// Loaded filters (qfilter_calibrated), as kvpress's QFilterPress uses the published ones:
// [layers][kv_heads][d] holding f = -u, score -(k . f). Filters built here from the observed
// queries' directions (f = -mean_h u_h) give exactly qfilter's scores; the per-query-head
// layout [layers][q_heads][d] is reduced over the group (mean and max); the slice of the
// stream's (layer, kv_head) is used; a tensor of the wrong size is invalid_argument.
TEST(QFilterCalibrated, LoadedDirectionsInThePublishedConvention) {
  std::mt19937 rng(33);
  stream_options o;
  o.n = 40;
  o.m = 30;
  o.g = 2;
  const ref_stream r = random_stream(rng, o);
  packed_stream p(r);
  p.shape = kvc::model_shape{3, 4, 2, o.d};  // 3 layers, 2 KV heads of 2 query heads
  kvc::stream_data s = p.data();
  s.info.layer = 2;
  s.info.kv_head = 1;
  const int d = o.d;
  std::vector<std::vector<double>> u = {principal_direction(r, 0), principal_direction(r, 1)};
  std::mt19937 noise(7);
  std::normal_distribution<float> normal;
  std::vector<float> per_kv(static_cast<std::size_t>(3 * 2 * d)), per_q(static_cast<std::size_t>(3 * 4 * d));
  for (float& x : per_kv) x = normal(noise);  // other heads' filters: noise, must not be read
  for (float& x : per_q) x = normal(noise);
  for (int e = 0; e < d; ++e) {
    per_kv[static_cast<std::size_t>((2 * 2 + 1) * d + e)] =
        static_cast<float>(-(u[0][static_cast<std::size_t>(e)] + u[1][static_cast<std::size_t>(e)]) / 2.0);
    for (int h = 0; h < 2; ++h)
      per_q[static_cast<std::size_t>((2 * 4 + 2 + h) * d + e)] =
          static_cast<float>(-u[static_cast<std::size_t>(h)][static_cast<std::size_t>(e)]);
  }
  kvc::score::qfilter_calibrated cal;
  cal.filters = kvc::span<const float>(per_kv.data(), per_kv.size());
  const std::vector<double> mean_ref = qfilter_reference(r, group_reduce::mean);
  EXPECT_TRUE(scores_near(run(cal, s), mean_ref, 1e-5, 1e-5));
  EXPECT_TRUE(scores_near(run(kvc::score::qfilter{}, s), mean_ref, 1e-5, 1e-5));
  cal.filters = kvc::span<const float>(per_q.data(), per_q.size());
  cal.heads = kvc::score::qfilter_calibrated::layout::per_query_head;
  EXPECT_TRUE(scores_near(run(cal, s), mean_ref, 1e-5, 1e-5));
  cal.reduce = group_reduce::max;
  EXPECT_TRUE(scores_near(run(cal, s), qfilter_reference(r, group_reduce::max), 1e-5, 1e-5));
  // No observed queries are needed.
  s.queries = nullptr;
  s.query_positions = nullptr;
  s.n_queries = 0;
  EXPECT_TRUE(scores_near(run(cal, s), qfilter_reference(r, group_reduce::max), 1e-5, 1e-5));
  kvc::status st;
  cal.filters = kvc::span<const float>(per_q.data(), per_q.size() - 1);
  run(cal, s, &st);
  EXPECT_TRUE(fails_with(st, kvc::status_code::invalid_argument, {"qfilter_calibrated", "expected"}));
  cal.filters = {};
  run(cal, s, &st);
  EXPECT_TRUE(fails_with(st, kvc::status_code::invalid_argument, {"qfilter_calibrated"}));
}

// ============================================================================ KeyDiff

// KeyDiff (Park et al. 2025, Sec. 3), s_i = -cos(k_i, mu), mu the mean unit key, on random
// RoPE'd keys from 1 to 700 tokens (more than one block of the anchor sum), and worked by
// hand: keys (1,0), (0,2), (3,3) have unit keys (1,0), (0,1), (1,1)/sqrt 2, so mu points along
// (1,1) and the scores are -1/sqrt 2, -1/sqrt 2, -1: the third key, most like the others'
// mean, goes first. A zero key scores 0; opposite keys cancel (mu = 0: all 0); parallel keys
// all score -1; a single key scores -1.
TEST(KeyDiff, MatchesBruteForceAndHandWorkedExamples) {
  std::mt19937 rng(41);
  for (int n : {1, 2, 7, 300, 700}) {
    stream_options o;
    o.n = n;
    o.m = 0;
    o.d = n == 300 ? 13 : 16;  // a head_dim that is not a multiple of the vector width
    const ref_stream r = random_stream(rng, o);
    SCOPED_TRACE("n = " + std::to_string(n));
    EXPECT_TRUE(scores_near(run(kvc::score::keydiff{}, packed_stream(r).data()), keydiff_reference(r), 1e-6, 0));
    // With the norms a cache keeps (observe.key_norms), computed here in double, the same scores.
    std::vector<float> norms;
    for (const std::vector<double>& k : r.keys) {
      double sq = 0.0;
      for (double x : k) sq += x * x;
      norms.push_back(static_cast<float>(std::sqrt(sq)));
    }
    const packed_stream with_norms(r);
    kvc::stream_data sn = with_norms.data();
    sn.key_norms = norms.data();
    EXPECT_TRUE(scores_near(run(kvc::score::keydiff{}, sn), keydiff_reference(r), 1e-6, 0));
  }
  auto keys = [](std::vector<std::vector<double>> k) {
    ref_stream r;
    r.d = static_cast<int>(k[0].size());
    for (std::size_t i = 0; i < k.size(); ++i) {
      r.pos.push_back(static_cast<std::int32_t>(i));
      r.lw.push_back(0.0);
    }
    r.keys = std::move(k);
    return packed_stream(r);
  };
  const double h = 1.0 / std::sqrt(2.0);
  EXPECT_TRUE(scores_near(run(kvc::score::keydiff{}, keys({{1, 0}, {0, 2}, {3, 3}}).data()), {-h, -h, -1.0}, 1e-6, 0));
  EXPECT_TRUE(scores_near(run(kvc::score::keydiff{}, keys({{1, 0}, {0, 0}, {3, 0.5}}).data()), keydiff_reference([] {
                            ref_stream r;
                            r.d = 2;
                            r.keys = {{1, 0}, {0, 0}, {3, 0.5}};
                            return r;
                          }()),
                          1e-6, 0));
  EXPECT_EQ(run(kvc::score::keydiff{}, keys({{1, 0}, {0, 0}, {3, 0.5}}).data())[1], 0.0f);
  EXPECT_TRUE(scores_near(run(kvc::score::keydiff{}, keys({{1, 2}, {-1, -2}}).data()), {0.0, 0.0}, 0, 0));
  EXPECT_TRUE(scores_near(run(kvc::score::keydiff{}, keys({{1, 2}, {2, 4}, {0.5, 1}}).data()), {-1, -1, -1}, 1e-6, 0));
  EXPECT_TRUE(scores_near(run(kvc::score::keydiff{}, keys({{0.3, -2}}).data()), {-1.0}, 1e-6, 0));

  stream_options o;
  o.n = 64;
  o.m = 0;
  const packed_stream p(random_stream(rng, o));
  kvc::status st;
  kvc::stream_data s = p.data();
  s.keys = nullptr;
  run(kvc::score::keydiff{}, s, &st);
  EXPECT_TRUE(fails_with(st, kvc::status_code::invalid_argument, {"keydiff", "keys"}));
  check_workspace_sizes(kvc::score::keydiff{}, p.data());
}

// ============================================================================ head_dim 128

// The four scorers that read keys, at a model's head_dim of 128 (whole vector blocks, the
// kernels' main path) with GQA groups of 4, 100 tokens (a partial last tile) and log-weights,
// against the same references.
TEST(Baselines, HeadDim128MatchesBruteForce) {
  std::mt19937 rng(81);
  stream_options o;
  o.n = 100;
  o.m = 12;
  o.g = 4;
  o.d = 128;
  o.gaps = true;
  o.log_weights = true;
  const ref_stream r = random_stream(rng, o);
  const packed_stream p(r);
  kvc::score::snapkv snap;
  snap.window = 8;
  EXPECT_TRUE(scores_near(run(snap, p.data()), snapkv_reference(r, snap), 2e-6, 2e-5)) << "snapkv";
  snap.protect_window = false;
  snap.reduce = group_reduce::max;
  EXPECT_TRUE(scores_near(run(snap, p.data()), snapkv_reference(r, snap), 2e-6, 2e-5)) << "snapkv, group max";
  EXPECT_TRUE(scores_near(run(kvc::score::tova{}, p.data()), tova_reference(r, group_reduce::mean), 1e-6, 2e-5))
      << "tova";
  EXPECT_TRUE(scores_near(run(kvc::score::qfilter{}, p.data()), qfilter_reference(r, group_reduce::mean), 2e-5, 1e-5))
      << "qfilter";
  EXPECT_TRUE(scores_near(run(kvc::score::keydiff{}, p.data()), keydiff_reference(r), 1e-6, 0)) << "keydiff";
}

// ============================================================================ H2O (unit)

// H2O's scores are the tracked statistics normalised as documented: sum / count, or the raw
// sum (Algorithm 1), +inf for count 0; no statistics, or none observed at all, is an error.
TEST(H2O, ScoresAreTheNormalisedStatistics) {
  ref_stream r;
  r.d = 4;
  r.pos = {0, 1, 2, 3, 4};
  r.lw.assign(5, 0.0);
  r.att_sum = {0.75, 1.5, 0.25, 0.0, 0.0};
  r.att_count = {3, 3, 2, 1, 0};
  const packed_stream p(r);
  EXPECT_TRUE(scores_near(run(kvc::score::h2o{}, p.data()), {0.25, 0.5, 0.125, 0.0, inf}, 0, 0));
  kvc::score::h2o raw;
  raw.normalize = false;
  EXPECT_TRUE(scores_near(run(raw, p.data()), {0.75, 1.5, 0.25, 0.0, inf}, 0, 0));
  kvc::status st;
  kvc::stream_data s = p.data();
  s.attention_sum = nullptr;
  run(kvc::score::h2o{}, s, &st);
  EXPECT_TRUE(fails_with(st, kvc::status_code::invalid_argument, {"h2o", "track_attention"}));
  r.att_count.assign(5, 0.0);
  run(kvc::score::h2o{}, packed_stream(r).data(), &st);
  EXPECT_TRUE(fails_with(st, kvc::status_code::invalid_argument, {"h2o", "no query has attended"}));
}

// ============================================================================ through the cache

// The test's record of one sequence in a paged_kv_cache: every token appended (mirror),
// every query attended per layer, and H2O's statistics replayed from a dense double
// precision softmax of each attended query over the tokens the stream retained then.
class recorded_sequence {
 public:
  struct query_record {
    std::int32_t position;
    std::vector<float> rows;  // [num_q_heads][d]
  };

  recorded_sequence(const kvc::model_shape& shape, unsigned seed) : shape_(shape), mirror_(shape), rng_(seed) {
    history_.resize(static_cast<std::size_t>(shape.num_layers));
  }

  template <class Cache>
  void append(Cache& cache, kvc::seq_id seq, int layer, const std::vector<std::int32_t>& positions, bool snap = false) {
    const int d = shape_.head_dim, h = shape_.num_kv_heads;
    std::vector<float> k, v;
    std::normal_distribution<float> normal;
    for (std::int32_t p : positions)
      for (int j = 0; j < h; ++j) {
        std::vector<float> key = random_row(rng_, d, p, 0.7 + 0.3 * j, 1.0);
        if (snap)
          for (float& x : key) x = policy_test::snap(x);
        k.insert(k.end(), key.begin(), key.end());
        for (int e = 0; e < d; ++e) v.push_back(policy_test::snap(normal(rng_)));
      }
    ASSERT_TRUE(
        cache.append(seq, layer, k.data(), v.data(), positions.data(), static_cast<int>(positions.size())).ok());
    mirror_.append(layer, k, v, positions);
    if (!positions.empty()) last_[layer] = std::max(last_[layer], positions.back());
  }

  // The largest position ever appended to the layer (evicted tokens included).
  std::int32_t last_position(int layer) const { return last_.at(layer); }

  template <class Cache>
  void attend(Cache& cache, kvc::seq_id seq, int layer, const std::vector<std::int32_t>& positions) {
    const int d = shape_.head_dim, qh = shape_.num_q_heads, g = shape_.group_size();
    std::vector<float> q;
    for (std::int32_t p : positions)
      for (int h = 0; h < qh; ++h) {
        const std::vector<float> row = random_row(rng_, d, p, 0.8, 0.8);
        q.insert(q.end(), row.begin(), row.end());
      }
    std::vector<float> out(q.size());
    ASSERT_TRUE(
        cache.attend(seq, layer, q.data(), positions.data(), static_cast<int>(positions.size()), out.data()).ok());
    for (std::size_t i = 0; i < positions.size(); ++i) {
      const auto first = q.begin() + static_cast<std::ptrdiff_t>(i * static_cast<std::size_t>(qh * d));
      history_[static_cast<std::size_t>(layer)].push_back({positions[i], std::vector<float>(first, first + qh * d)});
    }
    // Replay: a_t = softmax over the retained tokens at or before the query, summed into the
    // token's statistics as the group mean; count + 1 per query that sees the token.
    for (int kv = 0; kv < shape_.num_kv_heads; ++kv) {
      const std::vector<policy_test::token>& s = mirror_.stream(layer, kv);
      for (std::size_t i = 0; i < positions.size(); ++i)
        for (int j = 0; j < g; ++j) {
          const float* row = &q[(i * static_cast<std::size_t>(qh) + static_cast<std::size_t>(kv * g + j)) * d];
          std::vector<double> logit(s.size(), -inf);
          double mx = -inf;
          for (std::size_t t = 0; t < s.size(); ++t) {
            if (s[t].position > positions[i]) continue;
            double acc = 0.0;
            for (int e = 0; e < d; ++e) acc += static_cast<double>(row[e]) * s[t].key[static_cast<std::size_t>(e)];
            logit[t] = acc / std::sqrt(static_cast<double>(d));
            mx = std::max(mx, logit[t]);
          }
          if (mx == -inf) continue;
          double z = 0.0;
          for (double l : logit) z += l == -inf ? 0.0 : std::exp(l - mx);
          for (std::size_t t = 0; t < s.size(); ++t) {
            if (logit[t] == -inf) continue;
            auto& st = stats_[{layer, kv, s[t].position}];
            st.first += std::exp(logit[t] - mx) / z / g;
            if (j == 0) st.second += 1.0;
          }
        }
    }
  }

  // Stream (layer, kv_head) as the references see it: the retained tokens, the last `window`
  // attended queries of the layer restricted to the KV head's group, H2O's statistics.
  ref_stream reference(int layer, int kv_head, int window) const {
    ref_stream r;
    r.d = shape_.head_dim;
    r.g = shape_.group_size();
    for (const policy_test::token& t : mirror_.stream(layer, kv_head)) {
      r.pos.push_back(t.position);
      r.lw.push_back(0.0);
      r.keys.emplace_back(t.key.begin(), t.key.end());
      const auto it = stats_.find({layer, kv_head, t.position});
      r.att_sum.push_back(it == stats_.end() ? 0.0 : it->second.first);
      r.att_count.push_back(it == stats_.end() ? 0.0 : it->second.second);
    }
    const auto& hist = history_[static_cast<std::size_t>(layer)];
    const std::size_t w = std::min(hist.size(), static_cast<std::size_t>(window));
    for (std::size_t j = hist.size() - w; j < hist.size(); ++j) {
      r.qpos.push_back(hist[j].position);
      std::vector<std::vector<double>> rows;
      for (int h = 0; h < r.g; ++h) {
        const auto first = hist[j].rows.begin() + static_cast<std::ptrdiff_t>((kv_head * r.g + h) * r.d);
        rows.emplace_back(first, first + r.d);
      }
      r.q.push_back(std::move(rows));
    }
    return r;
  }

  policy_test::mirror& mirror() { return mirror_; }

 private:
  kvc::model_shape shape_;
  policy_test::mirror mirror_;
  std::mt19937 rng_;
  std::vector<std::vector<query_record>> history_;
  std::map<std::tuple<int, int, std::int32_t>, std::pair<double, double>> stats_;
  std::map<int, std::int32_t> last_;
};

constexpr kvc::model_shape e2e_shape{2, 6, 2, 16};  // group of 3 query heads per KV head
constexpr int e2e_window = 16;                      // observe.query_window

using e2e_cache = kvc::paged_kv_cache<kvc::codec::f32>;

e2e_cache make_e2e_cache() {
  kvc::cache_config c = policy_test::make_config(e2e_shape, 8, 160);
  c.observe.query_window = e2e_window;
  c.observe.track_attention = true;
  return policy_test::make_cache<e2e_cache>(c);
}

std::vector<std::int32_t> range(std::int32_t first, int n, std::int32_t step = 1) {
  std::vector<std::int32_t> r;
  for (int i = 0; i < n; ++i) r.push_back(first + i * step);
  return r;
}

// Everything compress() could change, read through the public interface: the pages, tokens
// and statistics of kvc_ref::snapshot, and what a policy loads (observed queries, attention
// statistics).
struct loaded_state {
  std::vector<float> values;
  bool operator==(const loaded_state& o) const { return values == o.values; }
};

struct load_probe {
  loaded_state* out;
  template <class Context>
  kvc::status plan(Context& ctx) const {
    for (int i = 0; i < ctx.num_streams(); ++i) {
      kvc::workspace_scope scope(ctx.scratch());
      kvc::stream_data s;
      KVC_RETURN_IF_ERROR(ctx.load(i, kvc::stream_fields::queries | kvc::stream_fields::attention, s));
      std::vector<float>& v = out->values;
      v.insert(v.end(), s.queries, s.queries + static_cast<std::size_t>(s.n_queries) * s.group_size() * s.head_dim());
      for (int j = 0; j < s.n_queries; ++j) v.push_back(static_cast<float>(s.query_positions[j]));
      v.insert(v.end(), s.attention_sum, s.attention_sum + s.size());
      v.insert(v.end(), s.attention_count, s.attention_count + s.size());
      v.insert(v.end(), s.last_attention, s.last_attention + s.size());
    }
    return kvc::ok_status();
  }
};

loaded_state load_state(e2e_cache& cache, kvc::seq_id seq) {
  loaded_state st;
  auto r = cache.compress(seq, load_probe{&st});
  EXPECT_TRUE(r.ok()) << r.status().message();
  return st;
}

// Runs `attempt` (a compress that must fail) and checks that nothing a caller can observe
// changed.
::testing::AssertionResult fails_and_changes_nothing(e2e_cache& cache, kvc::seq_id seq,
                                                     const std::function<kvc::status()>& attempt) {
  const loaded_state before_loaded = load_state(cache, seq);
  const kvc_ref::cache_snapshot before = kvc_ref::snapshot(cache, {seq});
  const kvc::status st = attempt();
  const kvc_ref::cache_snapshot after = kvc_ref::snapshot(cache, {seq});
  if (st.ok()) return ::testing::AssertionFailure() << "compress succeeded";
  const std::string diff = kvc_ref::snapshot_diff(before, after);
  if (!diff.empty())
    return ::testing::AssertionFailure() << "failed compress (" << st.message() << ") changed " << diff;
  if (!(load_state(cache, seq) == before_loaded))
    return ::testing::AssertionFailure() << "failed compress (" << st.message() << ") changed the observations";
  return ::testing::AssertionSuccess() << st.message();
}

using reference_fn = std::function<std::vector<double>(const ref_stream&)>;

// The stream keeps exactly the brute-force top-k of the reference scores, k = round(n f);
// the mirror then keeps the same tokens. The brute-force set is only meaningful if float
// rounding cannot reorder the cut: the reference scores on either side of it must differ by
// more than the tolerance, or tie exactly in the reference and in the scorer's floats (max
// pooling copies one vote to its neighbours), where both break the tie towards the more
// recent token.
template <class Cache>
void check_kept(const Cache& cache, kvc::seq_id seq, policy_test::mirror& m, int layer, int kv_head,
                const std::vector<double>& ref, const std::vector<float>& got, double f, double abs_tol,
                double rel_tol) {
  const int n = static_cast<int>(ref.size()), k = static_cast<int>(std::llround(n * f));
  std::vector<double> sorted = ref;
  std::sort(sorted.begin(), sorted.end(), std::greater<double>());
  if (k > 0 && k < n && !std::isinf(sorted[static_cast<std::size_t>(k - 1)])) {
    const double above = sorted[static_cast<std::size_t>(k - 1)], below = sorted[static_cast<std::size_t>(k)];
    if (above == below) {
      std::vector<float> tied;
      for (int i = 0; i < n; ++i)
        if (ref[static_cast<std::size_t>(i)] == above) tied.push_back(got[static_cast<std::size_t>(i)]);
      ASSERT_TRUE(std::all_of(tied.begin(), tied.end(), [&](float x) { return x == tied[0]; }))
          << "tokens tied in the reference are not tied in the scores";
    } else {
      ASSERT_GT(above - below, 2 * (abs_tol + rel_tol * std::fabs(below)))
          << "the reference scores nearly tie at the cut: choose other data";
    }
  }
  const std::vector<int> kept = policy_test::brute_top_k(ref, k);
  EXPECT_TRUE(
      policy_test::stream_equals(cache, seq, layer, kv_head, policy_test::pick(m.stream(layer, kv_head), kept)));
  m.keep(layer, kv_head, kept);
}

// Compresses every stream with evict<scorer, uniform::keep_fraction(f)> and checks, per
// stream, the recorded scores against the reference and the kept tokens (positions, keys,
// values) against the brute-force top-k of the reference scores; the mirror then keeps them.
template <class Scorer>
void compress_and_check(e2e_cache& cache, kvc::seq_id seq, recorded_sequence& rec, const Scorer& scorer,
                        const reference_fn& reference, double f, double abs_tol, double rel_tol) {
  std::map<std::pair<int, int>, std::vector<float>> recorded;
  auto rep = cache.compress(
      seq, kvc::evict(policy_test::recording<Scorer>{scorer, &recorded}, kvc::budget::uniform::keep_fraction(f)));
  ASSERT_TRUE(rep.ok()) << rep.status().message();
  for (int l = 0; l < e2e_shape.num_layers; ++l)
    for (int h = 0; h < e2e_shape.num_kv_heads; ++h) {
      SCOPED_TRACE("stream (layer " + std::to_string(l) + ", kv_head " + std::to_string(h) + ")");
      const ref_stream r = rec.reference(l, h, e2e_window);
      const std::vector<double> ref = reference(r);
      ASSERT_TRUE(scores_near(recorded[{l, h}], ref, abs_tol, rel_tol));
      ASSERT_NO_FATAL_FAILURE(check_kept(cache, seq, rec.mirror(), l, h, ref, recorded[{l, h}], f, abs_tol, rel_tol));
    }
}

struct e2e_case {
  std::string label;
  std::function<void(e2e_cache&, kvc::seq_id, recorded_sequence&, double)> compress;           // f: keep fraction
  std::function<kvc::status(e2e_cache&, kvc::seq_id, kvc::workspace&, double)> compress_with;  // f: keep fraction
  bool needs_queries, needs_attention;
};

template <class Scorer>
e2e_case make_case(std::string label, Scorer scorer, reference_fn reference, double abs_tol, double rel_tol) {
  e2e_case c;
  c.label = std::move(label);
  c.compress = [=](e2e_cache& cache, kvc::seq_id seq, recorded_sequence& rec, double f) {
    compress_and_check(cache, seq, rec, scorer, reference, f, abs_tol, rel_tol);
  };
  c.compress_with = [=](e2e_cache& cache, kvc::seq_id seq, kvc::workspace& ws, double f) {
    auto r = cache.compress(seq, kvc::all_layers, kvc::evict(scorer, kvc::budget::uniform::keep_fraction(f)), ws);
    return r.ok() ? kvc::ok_status() : r.status();
  };
  c.needs_queries = kvc::has_field(Scorer::fields, kvc::stream_fields::queries);
  c.needs_attention = kvc::has_field(Scorer::fields, kvc::stream_fields::attention);
  return c;
}

std::vector<e2e_case> e2e_cases() {
  kvc::score::snapkv snap_small;
  snap_small.window = 8;
  snap_small.kernel = 3;
  snap_small.pool = pooling::max;
  snap_small.reduce = group_reduce::max;
  kvc::score::tova tova_max;
  tova_max.reduce = group_reduce::max;
  kvc::score::qfilter qfilter_max;
  qfilter_max.reduce = group_reduce::max;
  kvc::score::h2o h2o_raw;
  h2o_raw.normalize = false;
  const kvc::score::snapkv snap_default;
  return {
      make_case(
          "snapkv", snap_default, [=](const ref_stream& r) { return snapkv_reference(r, snap_default); }, 2e-6, 2e-5),
      make_case(
          "snapkv window 8, max pool 3, group max", snap_small,
          [=](const ref_stream& r) { return snapkv_reference(r, snap_small); }, 2e-6, 2e-5),
      make_case(
          "tova", kvc::score::tova{}, [](const ref_stream& r) { return tova_reference(r, group_reduce::mean); }, 1e-6,
          2e-5),
      make_case(
          "tova group max", tova_max, [](const ref_stream& r) { return tova_reference(r, group_reduce::max); }, 1e-6,
          2e-5),
      make_case(
          "qfilter", kvc::score::qfilter{},
          [](const ref_stream& r) { return qfilter_reference(r, group_reduce::mean); }, 1e-5, 1e-5),
      make_case(
          "qfilter group max", qfilter_max, [](const ref_stream& r) { return qfilter_reference(r, group_reduce::max); },
          1e-5, 1e-5),
      make_case(
          "keydiff", kvc::score::keydiff{}, [](const ref_stream& r) { return keydiff_reference(r); }, 1e-6, 0),
      make_case(
          "h2o", kvc::score::h2o{}, [](const ref_stream& r) { return h2o_reference(r, true); }, 2e-6, 1e-5),
      make_case(
          "h2o raw sum", h2o_raw, [](const ref_stream& r) { return h2o_reference(r, false); }, 2e-6, 1e-5),
  };
}

// Prefill: layer 0 holds positions 0..39, layer 1 positions 0, 3, ..., 87 (gaps); the last
// 12 tokens of each layer are attended as one chunk (the prompt's observation window).
void prefill(e2e_cache& cache, kvc::seq_id seq, recorded_sequence& rec) {
  rec.append(cache, seq, 0, range(0, 40));
  rec.append(cache, seq, 1, range(0, 30, 3));
  rec.attend(cache, seq, 0, range(28, 12));
  rec.attend(cache, seq, 1, range(54, 12, 3));
}

// Decoding: per step and layer one token appended and its query attended; then one token
// per layer appended that no query has seen yet.
void decode(e2e_cache& cache, kvc::seq_id seq, recorded_sequence& rec, int steps) {
  std::int32_t next[2];
  for (int l = 0; l < 2; ++l) next[l] = rec.last_position(l) + (l == 0 ? 1 : 2);
  for (int s = 0; s < steps; ++s)
    for (int l = 0; l < 2; ++l) {
      rec.append(cache, seq, l, {next[l]});
      rec.attend(cache, seq, l, {next[l]});
      next[l] += l == 0 ? 1 : 2;
    }
  for (int l = 0; l < 2; ++l) rec.append(cache, seq, l, {next[l]});
}

// Every scorer through paged_kv_cache (observation on) and kvc::evict<scorer, uniform>: at
// prefill, then again after decode steps on the compressed sequence (tokens appended
// later, seen by fewer queries, and one seen by none), the scores equal the references on
// the test's own record and the kept tokens are exactly the brute-force top-k.
TEST(BaselinesThroughTheCache, PrefillThenDecodeKeepTheBruteForceTopK) {
  for (const e2e_case& c : e2e_cases()) {
    SCOPED_TRACE(c.label);
    e2e_cache cache = make_e2e_cache();
    recorded_sequence rec(e2e_shape, 51);
    const kvc::seq_id seq = cache.create_sequence();
    prefill(cache, seq, rec);
    ASSERT_NO_FATAL_FAILURE(c.compress(cache, seq, rec, 0.6));
    decode(cache, seq, rec, 5);
    ASSERT_NO_FATAL_FAILURE(c.compress(cache, seq, rec, 0.5));
    decode(cache, seq, rec, 2);
    ASSERT_NO_FATAL_FAILURE(c.compress(cache, seq, rec, 0.7));
    EXPECT_TRUE(policy_test::cache_equals(cache, seq, rec.mirror()));
  }
}

// A compress that fails leaves the cache exactly as it was: a budget rejected after every
// stream was scored; a layer whose queries were never observed (the scorers that need them
// name the missing input); and workspaces of every size from tiny to sufficient, where each
// compress either succeeds with the same kept set as with the cache's own workspace or fails
// with workspace_exhausted and changes nothing.
TEST(BaselinesThroughTheCache, FailingCompressChangesNothing) {
  for (const e2e_case& c : e2e_cases()) {
    SCOPED_TRACE(c.label);
    e2e_cache cache = make_e2e_cache();
    recorded_sequence rec(e2e_shape, 52);
    const kvc::seq_id seq = cache.create_sequence();
    prefill(cache, seq, rec);
    decode(cache, seq, rec, 2);

    kvc::workspace big(std::size_t{4} << 20);
    EXPECT_TRUE(fails_and_changes_nothing(cache, seq, [&] { return c.compress_with(cache, seq, big, 1.5); }));

    // Workspace sizes: the kept set of a successful compress is the one a full workspace gives.
    kvc::result<kvc::seq_id> ref_fork = cache.fork(seq);
    ASSERT_TRUE(ref_fork.ok());
    ASSERT_TRUE(c.compress_with(cache, *ref_fork, big, 0.5).ok());
    const std::size_t need = big.high_water();
    int failures = 0, successes = 0;
    for (std::size_t cap = 256; cap <= need + 4096; cap += need / 13) {
      kvc::workspace ws(cap);
      kvc::result<kvc::seq_id> fork = cache.fork(seq);
      ASSERT_TRUE(fork.ok());
      const kvc_ref::cache_snapshot before = kvc_ref::snapshot(cache, {*fork});
      const kvc::status st = c.compress_with(cache, *fork, ws, 0.5);
      if (st.ok()) {
        ++successes;
        const kvc_ref::cache_snapshot got = kvc_ref::snapshot(cache, {*fork});
        const kvc_ref::cache_snapshot want = kvc_ref::snapshot(cache, {*ref_fork});
        for (std::size_t i = 0; i < got.sequences[0].streams.size(); ++i)
          EXPECT_EQ(got.sequences[0].streams[i].positions, want.sequences[0].streams[i].positions)
              << "workspace " << cap << ", stream " << i;
      } else {
        ++failures;
        EXPECT_EQ(st.code(), kvc::status_code::workspace_exhausted) << st.message();
        EXPECT_EQ(kvc_ref::snapshot_diff(before, kvc_ref::snapshot(cache, {*fork})), "") << "workspace " << cap;
      }
      ASSERT_TRUE(cache.release(*fork).ok());
    }
    EXPECT_GT(failures, 0);
    EXPECT_GT(successes, 0);

    // A second sequence whose layer 1 has tokens but no observed query.
    if (c.needs_queries || c.needs_attention) {
      recorded_sequence rec2(e2e_shape, 53);
      const kvc::seq_id other = cache.create_sequence();
      rec2.append(cache, other, 0, range(0, 20));
      rec2.append(cache, other, 1, range(0, 20));
      rec2.attend(cache, other, 0, range(10, 10));
      const std::string name = c.label.substr(0, c.label.find(' '));
      EXPECT_TRUE(fails_and_changes_nothing(cache, other, [&] { return c.compress_with(cache, other, big, 0.5); }));
      const kvc::status st = c.compress_with(cache, other, big, 0.5);
      EXPECT_EQ(st.code(), kvc::status_code::invalid_argument);
      EXPECT_NE(std::string(st.message()).find(name), std::string::npos) << st.message();
      EXPECT_NE(std::string(st.message()).find("layer 1"), std::string::npos) << st.message();
    }
  }
}

// Observation off: a scorer that needs observed queries or attention statistics fails on a
// cache that records neither, naming the setting to turn on, and changes nothing.
TEST(BaselinesThroughTheCache, ObservationOffNamesTheSetting) {
  kvc::cache_config c = policy_test::make_config(e2e_shape, 8, 160);
  e2e_cache cache = policy_test::make_cache<e2e_cache>(c);
  recorded_sequence rec(e2e_shape, 54);
  const kvc::seq_id seq = cache.create_sequence();
  rec.append(cache, seq, 0, range(0, 20));
  rec.attend(cache, seq, 0, range(10, 10));
  for (const e2e_case& k : e2e_cases()) {
    SCOPED_TRACE(k.label);
    kvc::workspace ws(std::size_t{1} << 20);
    const kvc::status st = k.compress_with(cache, seq, ws, 0.5);
    if (!k.needs_queries && !k.needs_attention) {
      EXPECT_TRUE(st.ok()) << st.message();
      continue;
    }
    EXPECT_TRUE(fails_with(st, kvc::status_code::invalid_argument,
                           {k.needs_queries ? "observe.query_window" : "observe.track_attention"}));
  }
}

// H2O through the cache for every codec: attend()'s accumulated statistics, normalised by
// the number of queries that could see each token, equal a brute-force replay of the
// attention over a chunked prefill and twelve decode steps, including tokens appended later
// (seen by fewer queries) and one not seen at all (+inf); the kept set is the top-k. Keys are
// multiples of 1/32 in [-4, 4], stored exactly by every codec.
template <class Codec>
class H2OThroughTheCache : public ::testing::Test {};
using h2o_codecs = ::testing::Types<kvc::codec::f32, kvc::codec::f16, kvc::codec::bf16>;
TYPED_TEST_SUITE(H2OThroughTheCache, h2o_codecs);

TYPED_TEST(H2OThroughTheCache, StatisticsEqualReplayOverDecodeSteps) {
  using cache_t = kvc::paged_kv_cache<TypeParam>;
  kvc::cache_config c = policy_test::make_config(e2e_shape, 8, 160);
  c.observe.track_attention = true;
  cache_t cache = policy_test::make_cache<cache_t>(c);
  recorded_sequence rec(e2e_shape, 61);
  const kvc::seq_id seq = cache.create_sequence();
  for (int l = 0; l < 2; ++l) {
    rec.append(cache, seq, l, range(0, 24), true);
    rec.attend(cache, seq, l, range(8, 8));   // a chunk: tokens 16..23 unseen so far
    rec.attend(cache, seq, l, range(16, 8));  // the next chunk
  }
  for (int step = 0; step < 12; ++step)
    for (int l = 0; l < 2; ++l) {
      rec.append(cache, seq, l, {24 + step}, true);
      rec.attend(cache, seq, l, {24 + step});
    }
  for (int l = 0; l < 2; ++l) rec.append(cache, seq, l, {36}, true);  // not attended: +inf
  std::map<std::pair<int, int>, std::vector<float>> recorded;
  auto rep = cache.compress(seq, kvc::evict(policy_test::recording<kvc::score::h2o>{kvc::score::h2o{}, &recorded},
                                            kvc::budget::uniform::keep_fraction(0.5)));
  ASSERT_TRUE(rep.ok()) << rep.status().message();
  for (int l = 0; l < 2; ++l)
    for (int h = 0; h < 2; ++h) {
      const ref_stream r = rec.reference(l, h, 0);
      const std::vector<double> ref = h2o_reference(r, true);
      EXPECT_TRUE(scores_near(recorded[{l, h}], ref, 2e-6, 1e-5));
      EXPECT_EQ(r.att_count.front(), 28.0) << "token 0 was seen by every query: 8 + 8 + 12";
      EXPECT_EQ(r.att_count[16], 20.0) << "token 16 was seen by the second chunk and the decode steps";
      EXPECT_EQ(r.att_count[r.att_count.size() - 2], 1.0) << "the last attended token was seen once";
      EXPECT_TRUE(std::isinf(ref.back()));
      check_kept(cache, seq, rec.mirror(), l, h, ref, recorded[{l, h}], 0.5, 2e-6, 1e-5);
    }
}

// TOVA's recomputed attention of the last query equals what attend() itself tracked for it
// (observe.track_attention's last_attention, the group mean): two independent paths.
TEST(TOVAThroughTheCache, EqualsTheAttentionAttendTracked) {
  e2e_cache cache = make_e2e_cache();
  recorded_sequence rec(e2e_shape, 71);
  const kvc::seq_id seq = cache.create_sequence();
  prefill(cache, seq, rec);
  decode(cache, seq, rec, 3);
  rec.attend(cache, seq, 0, {rec.last_position(0)});  // the last token seen too
  std::vector<std::vector<float>> tracked, scored;
  struct both {
    std::vector<std::vector<float>>* tracked;
    std::vector<std::vector<float>>* scored;
    kvc::status plan(e2e_cache::compress_context& ctx) const {
      for (int i = 0; i < ctx.num_streams(); ++i) {
        kvc::workspace_scope scope(ctx.scratch());
        kvc::stream_data s;
        KVC_RETURN_IF_ERROR(ctx.load(i, kvc::score::tova::fields | kvc::stream_fields::attention, s));
        std::vector<float> out(static_cast<std::size_t>(s.size()));
        KVC_RETURN_IF_ERROR(kvc::score::tova{}.score(s, ctx.scratch(), out.data()));
        scored->push_back(out);
        tracked->emplace_back(s.last_attention, s.last_attention + s.size());
      }
      return kvc::ok_status();
    }
  };
  ASSERT_TRUE(cache.compress(seq, 0, both{&tracked, &scored}).ok());
  ASSERT_EQ(scored.size(), 2u);
  for (std::size_t h = 0; h < 2; ++h)
    for (std::size_t i = 0; i < scored[h].size(); ++i)
      EXPECT_NEAR(scored[h][i], tracked[h][i], 1e-6 + 1e-5 * tracked[h][i]) << "kv_head " << h << ", token " << i;
}

}  // namespace
