// kvc/score/qfilter.hpp: Q-Filters (Godey et al., "Q-Filters: Leveraging QK Geometry for
// Efficient KV Cache Compression", 2025, arXiv:2503.02812). Sec. 3: the queries of a head
// share one dominant direction u (the first right singular vector of the query matrix),
// and a key's projection on it estimates the attention logit the key will get: E_q[q . k]
// grows with k . u when u is oriented so that the queries project positively on it. Sec. 4:
// the filter is that singular vector, and the KV pairs with the lowest projection go first.
// So, for query head h with queries Q_h (rows after RoPE, as the keys are stored, uncentred):
//   u_h = sign * v_1(Q_h),  sign: more rows of Q_h project positively on u_h than negatively
//   s_i = k_i . u_h
// GQA: per query head of the group, reduced by the mean (s_i = k_i . mean_h u_h, what
// averaging the filters of a group gives) or the max.
//
// The sign, checked against the authors' code: make_filters.py (NathanGodey/qfilters) takes
// the SVD of each head's stacked queries, sets svd_sign = +1 when more than half of the
// first LEFT singular vector's entries are positive (those entries are the rows' projections
// on v_1, over sigma_1 > 0) and stores the filter f = -svd_sign * v_1 = -u: the published
// filter points away from the queries. Eviction then keeps the top-k of -(k . f)
// (src/hf_cache.py, QFiltersCache; kvpress QFilterPress: scores = -(q_filter * keys).sum),
// which is k . u. The two negations cancel: keys that point where the queries point are
// kept. (Reading the filter as oriented with the queries and scoring by -(k . f) would keep
// the opposite keys.)
//
// Two scorers:
//  - qfilter: u_h from the observed queries of the KV head's group (the last
//    cache_config::observe.query_window queries recorded by attend()), recomputed at every
//    compress, so it follows the context; usable at prefill (the prompt's queries) and
//    during decoding. An exact tie in the sign rule goes to the side where the projections
//    sum to >= 0.
//  - qfilter_calibrated: a loaded direction, as the paper uses it (computed once per model
//    on calibration text) and as kvpress's QFilterPress loads it. No observed queries
//    needed. Filters in the published convention, f = -u, scored s_i = -(k_i . f) = k_i . u:
//    pass the published tensors as they are. They are per KV head (the group's mean), shape
//    [num_layers][num_kv_heads][head_dim]; per query head [num_layers][num_q_heads][head_dim]
//    is accepted too and reduced over the group.
//
// The principal direction is computed in double without allocating: the Gram matrix of the
// m observed queries (m x m when m <= head_dim, else head_dim x head_dim), then Lanczos with
// full reorthogonalisation until the top Ritz pair's residual is below 1e-12 of its
// eigenvalue (exact once the Krylov space is invariant). Zero queries have no direction:
// their head scores 0. Cost: per query head O(m * head_dim * min(m, head_dim)) for the Gram
// matrix and O(min(m, head_dim)^2) per Lanczos step, then n * head_dim for the projections.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "kvc/detail/attention.hpp"
#include "kvc/detail/hash.hpp"
#include "kvc/score/scorer.hpp"
#include "kvc/tensor.hpp"

KVC_NAMESPACE_BEGIN
namespace detail {

// a . b for doubles, in four partial sums so that the loop vectorises.
inline double dot4(const double* a, const double* b, int n) noexcept {
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  int i = 0;
  for (; i + 4 <= n; i += 4)
    for (int j = 0; j < 4; ++j) acc[j] += a[i + j] * b[i + j];
  for (; i < n; ++i) acc[0] += a[i] * b[i];
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// Largest eigenvalue and its unit eigenvector y [k] of the symmetric tridiagonal matrix with
// diagonal a [k] and off-diagonal b [k - 1]: multisection on Sturm counts (four points per
// round, whose pivot recurrences run side by side), then inverse iteration with a pivoted
// tridiagonal solve. Scratch: 5 * k doubles and k ints.
inline double tridiagonal_top(const double* a, const double* b, int k, double* y, double* scratch,
                              int* pivot) noexcept {
  double lo = a[0], hi = a[0], scale = 0.0;
  for (int i = 0; i < k; ++i) {
    const double r = (i > 0 ? std::fabs(b[i - 1]) : 0.0) + (i + 1 < k ? std::fabs(b[i]) : 0.0);
    lo = std::min(lo, a[i] - r);
    hi = std::max(hi, a[i] + r);
    scale = std::max(scale, std::fabs(a[i]) + r);
  }
  if (!(scale > 0.0)) {
    for (int i = 0; i < k; ++i) y[i] = i == 0 ? 1.0 : 0.0;
    return 0.0;
  }
  const double tiny = 1e-300;
  // For each of four points x[p]: whether all k eigenvalues lie below it, from the signs of
  // the LDL^T pivots of T - x I (Sturm count == k).
  auto all_below = [&](const double* x, bool* all) {
    double piv[4] = {1.0, 1.0, 1.0, 1.0};
    int count[4] = {0, 0, 0, 0};
    for (int i = 0; i < k; ++i) {
      const double b2 = i > 0 ? b[i - 1] * b[i - 1] : 0.0;
      for (int p = 0; p < 4; ++p) {
        double v = a[i] - x[p] - (i > 0 ? b2 / piv[p] : 0.0);
        if (std::fabs(v) < tiny) v = -tiny;
        piv[p] = v;
        count[p] += v < 0.0;
      }
    }
    for (int p = 0; p < 4; ++p) all[p] = count[p] == k;
  };
  // lo stays below the largest eigenvalue, hi at or above it; each round cuts [lo, hi] in 5.
  for (int it = 0; it < 100 && hi - lo > 4e-16 * scale; ++it) {
    double x[4];
    bool all[4];
    for (int p = 0; p < 4; ++p) x[p] = lo + (hi - lo) * static_cast<double>(p + 1) / 5.0;
    all_below(x, all);
    int first = 4;  // the first point above every eigenvalue
    for (int p = 3; p >= 0; --p)
      if (all[p]) first = p;
    const double new_lo = first == 0 ? lo : x[first - 1];
    const double new_hi = first == 4 ? hi : x[first];
    if (!(new_hi - new_lo < hi - lo)) break;  // no progress left in floating point
    lo = new_lo;
    hi = new_hi;
  }
  const double theta = 0.5 * (lo + hi);
  // Inverse iteration: LU of T - theta I with partial pivoting (U has two superdiagonals).
  double* d = scratch;   // [k] U diagonal
  double* du = d + k;    // [k] U first superdiagonal
  double* du2 = du + k;  // [k] U second superdiagonal
  double* dl = du2 + k;  // [k] multipliers
  const double eps_pivot = 1e-16 * scale;
  for (int i = 0; i < k; ++i) {
    d[i] = a[i] - theta;
    du[i] = i + 1 < k ? b[i] : 0.0;
    dl[i] = i + 1 < k ? b[i] : 0.0;
    du2[i] = 0.0;
  }
  for (int i = 0; i + 1 < k; ++i) {
    if (std::fabs(d[i]) >= std::fabs(dl[i])) {
      pivot[i] = 0;
      if (d[i] == 0.0) d[i] = eps_pivot;
      const double f = dl[i] / d[i];
      dl[i] = f;
      d[i + 1] -= f * du[i];
    } else {
      pivot[i] = 1;  // rows i and i + 1 swap
      const double f = d[i] / dl[i];
      d[i] = dl[i];
      dl[i] = f;
      const double t = du[i];
      du[i] = d[i + 1];
      d[i + 1] = t - f * d[i + 1];
      if (i + 2 < k) {
        du2[i] = du[i + 1];
        du[i + 1] = -f * du[i + 1];
      }
    }
  }
  if (d[k - 1] == 0.0) d[k - 1] = eps_pivot;
  for (int i = 0; i < k; ++i) y[i] = 1.0;
  for (int round = 0; round < 3; ++round) {
    for (int i = 0; i + 1 < k; ++i) {  // forward: L with the row swaps
      if (pivot[i] == 0) {
        y[i + 1] -= dl[i] * y[i];
      } else {
        const double t = y[i];
        y[i] = y[i + 1];
        y[i + 1] = t - dl[i] * y[i + 1];
      }
    }
    for (int i = k - 1; i >= 0; --i) {  // back: U
      double r = y[i];
      if (i + 1 < k) r -= du[i] * y[i + 1];
      if (i + 2 < k) r -= du2[i] * y[i + 2];
      y[i] = r / d[i];
    }
    double nrm = 0.0, big = 0.0;
    for (int i = 0; i < k; ++i) big = std::max(big, std::fabs(y[i]));
    for (int i = 0; i < k; ++i) nrm += (y[i] / big) * (y[i] / big);
    const double inv = 1.0 / (big * std::sqrt(nrm));
    for (int i = 0; i < k; ++i) y[i] *= inv;
  }
  return theta;
}

// Scratch (doubles) for lanczos_top on an s x s matrix.
inline std::size_t lanczos_scratch(int s) noexcept {
  const std::size_t n = static_cast<std::size_t>(s);
  return n * n + 10 * n + 8;
}

// The top eigenvector of the symmetric positive semi-definite g (s x s, row stride `stride`)
// into top [s], unit length; returns its eigenvalue (0 when g is zero). Lanczos with full
// reorthogonalisation from a fixed pseudo-random start, until the top Ritz pair's residual
// is below 1e-12 of its eigenvalue, or the Krylov space is invariant (exact).
// scratch: lanczos_scratch(s) doubles; pivot: s ints.
inline double lanczos_top(const double* g, int s, int stride, double* top, double* scratch, int* pivot) noexcept {
  const std::size_t n = static_cast<std::size_t>(s);
  double* basis = scratch;    // [s][s]: Lanczos vector j in row j
  double* w = basis + n * n;  // [s]
  double* alpha = w + n;      // [s]
  double* beta = alpha + n;   // [s]
  double* y = beta + n;       // [s]
  double* tri = y + n;        // [5 s]
  double norm_g = 0.0;
  for (int i = 0; i < s; ++i) norm_g = std::max(norm_g, g[static_cast<std::size_t>(i) * stride + i]);
  if (!(norm_g > 0.0)) {  // a PSD matrix with a zero diagonal is zero
    for (int i = 0; i < s; ++i) top[i] = 0.0;
    return 0.0;
  }
  double nrm = 0.0;
  for (int i = 0; i < s; ++i) {
    w[i] = static_cast<double>(mix64(0x51F17E5ull + static_cast<std::uint64_t>(i)) >> 11) * 0x1.0p-53 - 0.5;
    nrm += w[i] * w[i];
  }
  for (int i = 0; i < s; ++i) basis[i] = w[i] / std::sqrt(nrm);
  double theta = 0.0;
  int k = 0;  // Lanczos vectors kept
  for (int j = 0; j < s; ++j) {
    const double* v = basis + static_cast<std::size_t>(j) * n;
    k = j + 1;
    // w = g v, as a sum of rows (g is symmetric), so that the loop runs along rows.
    for (int i = 0; i < s; ++i) w[i] = 0.0;
    for (int c = 0; c < s; ++c) {
      const double vc = v[c];
      const double* gc = g + static_cast<std::size_t>(c) * stride;
      for (int i = 0; i < s; ++i) w[i] += vc * gc[i];
    }
    alpha[j] = dot4(v, w, s);
    // Full reorthogonalisation against every Lanczos vector, twice (the three-term
    // recurrence is its first step).
    for (int pass = 0; pass < 2; ++pass)
      for (int p = 0; p <= j; ++p) {
        const double* vp = basis + static_cast<std::size_t>(p) * n;
        const double dot = dot4(vp, w, s);
        for (int i = 0; i < s; ++i) w[i] -= dot * vp[i];
      }
    const double bn = std::sqrt(dot4(w, w, s));
    beta[j] = bn;
    const bool invariant = bn <= 1e-14 * norm_g || j + 1 == s;
    if (invariant || j % 4 == 3) {
      theta = tridiagonal_top(alpha, beta, k, y, tri, pivot);
      if (invariant || bn * std::fabs(y[k - 1]) <= 1e-12 * theta) break;
    }
    double* next = basis + static_cast<std::size_t>(j + 1) * n;
    for (int i = 0; i < s; ++i) next[i] = w[i] / bn;
  }
  // Ritz vector: top = sum_j y_j v_j.
  for (int i = 0; i < s; ++i) top[i] = 0.0;
  for (int j = 0; j < k; ++j) {
    const double* v = basis + static_cast<std::size_t>(j) * n;
    for (int i = 0; i < s; ++i) top[i] += y[j] * v[i];
  }
  nrm = 0.0;
  for (int i = 0; i < s; ++i) nrm += top[i] * top[i];
  const double inv = nrm > 0.0 ? 1.0 / std::sqrt(nrm) : 0.0;
  for (int i = 0; i < s; ++i) top[i] *= inv;
  return theta;
}

// g = a^T a for at [rows][cols] (row stride `cols`, cols a multiple of 8), into g [cols][cols].
// Blocks of 4 x 8 entries on or above the diagonal are computed, the rest mirrored.
inline void gram_of_columns(const double* at, int rows, int cols, double* g) noexcept {
  for (int a0 = 0; a0 < cols; a0 += 4)
    for (int b0 = a0 / 8 * 8; b0 < cols; b0 += 8) {
      double acc[4][8] = {};
      for (int e = 0; e < rows; ++e) {
        const double* r = at + static_cast<std::size_t>(e) * static_cast<std::size_t>(cols);
        for (int i = 0; i < 4; ++i) {
          const double x = r[a0 + i];
          for (int j = 0; j < 8; ++j) acc[i][j] += x * r[b0 + j];
        }
      }
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 8; ++j)
          g[static_cast<std::size_t>(a0 + i) * static_cast<std::size_t>(cols) + static_cast<std::size_t>(b0 + j)] =
              acc[i][j];
    }
  for (int a = 8; a < cols; ++a)
    for (int b = 0; b < a / 8 * 8; ++b)
      g[static_cast<std::size_t>(a) * static_cast<std::size_t>(cols) + static_cast<std::size_t>(b)] =
          g[static_cast<std::size_t>(b) * static_cast<std::size_t>(cols) + static_cast<std::size_t>(a)];
}

// Scratch (doubles) that principal_query_direction needs for m queries of head_dim d.
inline std::size_t principal_direction_scratch(int m, int d) noexcept {
  const int s = std::min(m, d), sp = (s + 7) / 8 * 8, other = std::max(m, d);
  return static_cast<std::size_t>(other) * static_cast<std::size_t>(sp) +
         static_cast<std::size_t>(sp) * static_cast<std::size_t>(sp) + lanczos_scratch(s) +
         static_cast<std::size_t>(s) + static_cast<std::size_t>(d) + static_cast<std::size_t>(s) / 2 + 8;
}

// u [d]: the first right singular vector of the m queries q(j) (j < m, each [d]), oriented so
// that more than half of them project positively (an exact tie: their sum is >= 0). All
// zeros when the queries are. scratch: principal_direction_scratch(m, d) doubles.
//
// With s = min(m, d) the eigenproblem is s x s: g = Q Q^T when m <= d (then v = Q^T x / |.|),
// g = Q^T Q otherwise (then v = x). Both are at^T at for at [max(m, d)][s], padded to a
// multiple of 8 columns with zeros.
template <class Query>
void principal_query_direction(Query q, int m, int d, float* u, double* scratch) noexcept {
  const bool by_query = m <= d;
  const int s = std::min(m, d), sp = (s + 7) / 8 * 8, other = std::max(m, d);
  const std::size_t stride = static_cast<std::size_t>(sp);
  double* at = scratch;                                       // [other][sp]
  double* g = at + static_cast<std::size_t>(other) * stride;  // [sp][sp]
  double* lz = g + stride * stride;                           // lanczos_scratch(s)
  double* x = lz + lanczos_scratch(s);                        // [s]
  double* v = x + s;                                          // [d]
  int* pivot = reinterpret_cast<int*>(v + d);                 // [s] ints
  std::fill(at, at + static_cast<std::size_t>(other) * stride, 0.0);
  if (by_query) {  // at [d][sp] = Q^T, eight queries (one line of at) at a time
    for (int j0 = 0; j0 < m; j0 += 8) {
      const int jn = std::min(8, m - j0);
      const float* r[8];
      for (int j = 0; j < jn; ++j) r[j] = q(j0 + j);
      for (int e = 0; e < d; ++e) {
        double* dst = at + static_cast<std::size_t>(e) * stride + static_cast<std::size_t>(j0);
        for (int j = 0; j < jn; ++j) dst[j] = static_cast<double>(r[j][e]);
      }
    }
  } else {  // at [m][sp] = Q
    for (int j = 0; j < m; ++j) {
      const float* r = q(j);
      double* dst = at + static_cast<std::size_t>(j) * stride;
      for (int e = 0; e < d; ++e) dst[e] = static_cast<double>(r[e]);
    }
  }
  gram_of_columns(at, other, sp, g);
  const double lambda = lanczos_top(g, s, sp, x, lz, pivot);
  if (!(lambda > 0.0)) {
    for (int e = 0; e < d; ++e) u[e] = 0.0f;
    return;
  }
  // v = Q^T x / |.| (by_query: at holds Q^T, [d][sp]), or x itself.
  if (by_query) {
    for (int e = 0; e < d; ++e) v[e] = dot4(x, at + static_cast<std::size_t>(e) * stride, m);
  } else {
    for (int e = 0; e < d; ++e) v[e] = x[e];
  }
  const double inv = 1.0 / std::sqrt(dot4(v, v, d));
  for (int e = 0; e < d; ++e) v[e] *= inv;
  // The projections p_j = q_j . v, into x (free now; m entries when by_query).
  double* p = x;
  if (by_query) {
    for (int j = 0; j < m; ++j) p[j] = 0.0;
    for (int e = 0; e < d; ++e) {
      const double* row = at + static_cast<std::size_t>(e) * stride;
      for (int j = 0; j < m; ++j) p[j] += row[j] * v[e];
    }
  }
  int positive = 0, negative = 0;
  double total = 0.0;
  for (int j = 0; j < m; ++j) {
    const double pj = by_query ? p[j] : dot4(at + static_cast<std::size_t>(j) * stride, v, d);
    positive += pj > 0.0;
    negative += pj < 0.0;
    total += pj;
  }
  const double sign = positive > negative || (positive == negative && total >= 0.0) ? 1.0 : -1.0;
  for (int e = 0; e < d; ++e) u[e] = static_cast<float>(sign * v[e]);
}

// out[i] = sign * k_i . f (one filter) or the reduction over the group of sign * k_i . f_h.
inline void project_keys(const stream_data& s, const float* filters, int n_filters, score::group_reduce reduce,
                         float sign, float* mean_filter, float* out) noexcept {
  const int n = s.size(), d = s.head_dim();
  const float* f = filters;
  if (n_filters > 1 && reduce == score::group_reduce::mean) {
    for (int e = 0; e < d; ++e) {
      float acc = 0.0f;
      for (int h = 0; h < n_filters; ++h) acc += filters[static_cast<std::size_t>(h) * d + e];
      mean_filter[e] = acc / static_cast<float>(n_filters);
    }
    f = mean_filter;
  }
  if (n_filters == 1 || reduce == score::group_reduce::mean) {
    for (int i = 0; i < n; ++i) out[i] = sign * dot(s.keys + static_cast<std::size_t>(i) * d, f, d);
    return;
  }
  for (int i = 0; i < n; ++i) {
    const float* k = s.keys + static_cast<std::size_t>(i) * d;
    float best = sign * dot(k, filters, d);
    for (int h = 1; h < n_filters; ++h) {
      const float x = sign * dot(k, filters + static_cast<std::size_t>(h) * d, d);
      best = x > best ? x : best;
    }
    out[i] = best;
  }
}

}  // namespace detail

namespace score {

// Q-Filters from the observed queries of the KV head's group.
struct qfilter {
  static constexpr const char* name = "qfilter";
  static constexpr stream_fields fields = stream_fields::keys | stream_fields::queries;
  group_reduce reduce = group_reduce::mean;

  status score(const stream_data& s, workspace& ws, float* out) const noexcept {
    const int n = s.size(), d = s.head_dim(), g = s.group_size(), m = s.n_queries;
    if (n == 0) return ok_status();
    if (s.queries == nullptr || m <= 0)
      return status::error(status_code::invalid_argument,
                           "qfilter: no observed queries for stream (layer %d, kv_head %d); set "
                           "cache_config::observe.query_window and attend() before compressing, or use "
                           "qfilter_calibrated",
                           s.info.layer, s.info.kv_head);
    if (s.keys == nullptr)
      return status::error(status_code::invalid_argument, "qfilter: the stream has no keys loaded");
    workspace_scope scope(ws);
    float* u = ws.alloc<float>(static_cast<std::size_t>(g) * static_cast<std::size_t>(d));  // [g][d]
    float* mean_u = ws.alloc<float>(static_cast<std::size_t>(d));
    double* scratch = ws.alloc<double>(detail::principal_direction_scratch(m, d));
    if (u == nullptr || mean_u == nullptr || scratch == nullptr)
      return status::error(status_code::workspace_exhausted,
                           "qfilter: no workspace for the SVD of %d observed queries of head_dim %d", m, d);
    for (int h = 0; h < g; ++h)
      detail::principal_query_direction([&s, h](int j) { return s.query(j, h); }, m, d,
                                        u + static_cast<std::size_t>(h) * d, scratch);
    detail::project_keys(s, u, g, reduce, 1.0f, mean_u, out);
    return ok_status();
  }
};

// Q-Filters from precomputed filters, in the published convention: f = -u, s_i = -(k_i . f).
struct qfilter_calibrated {
  static constexpr const char* name = "qfilter_calibrated";
  static constexpr stream_fields fields = stream_fields::keys;
  enum class layout {
    per_kv_head,     // [num_layers][num_kv_heads][head_dim]: the published filters
    per_query_head,  // [num_layers][num_q_heads][head_dim], reduced over the group
  };
  span<const float> filters;  // the model's filters, laid out as `heads` says
  layout heads = layout::per_kv_head;
  group_reduce reduce = group_reduce::mean;

  status score(const stream_data& s, workspace& ws, float* out) const noexcept {
    const model_shape& sh = *s.shape;
    const int n = s.size(), d = sh.head_dim, g = sh.group_size();
    const int per_layer = heads == layout::per_kv_head ? sh.num_kv_heads : sh.num_q_heads;
    const std::size_t expected =
        static_cast<std::size_t>(sh.num_layers) * static_cast<std::size_t>(per_layer) * static_cast<std::size_t>(d);
    if (filters.data() == nullptr || filters.size() != expected)
      return status::error(status_code::invalid_argument,
                           "qfilter_calibrated: filters hold %zu floats, expected %zu ([%d layers][%d %s heads][%d])",
                           filters.size(), expected, sh.num_layers, per_layer,
                           heads == layout::per_kv_head ? "kv" : "query", d);
    if (n == 0) return ok_status();
    if (s.keys == nullptr)
      return status::error(status_code::invalid_argument, "qfilter_calibrated: the stream has no keys loaded");
    const int n_filters = heads == layout::per_kv_head ? 1 : g;
    const std::size_t first = (static_cast<std::size_t>(s.info.layer) * static_cast<std::size_t>(per_layer) +
                               static_cast<std::size_t>(s.info.kv_head) * static_cast<std::size_t>(n_filters)) *
                              static_cast<std::size_t>(d);
    workspace_scope scope(ws);
    float* mean_f = ws.alloc<float>(static_cast<std::size_t>(d));
    if (mean_f == nullptr) return status::error(status_code::workspace_exhausted, "qfilter_calibrated: no workspace");
    detail::project_keys(s, filters.data() + first, n_filters, reduce, -1.0f, mean_f, out);
    return ok_status();
  }
};

}  // namespace score
KVC_NAMESPACE_END
