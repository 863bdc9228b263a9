// kvc/score/expected_attention.hpp: Expected Attention (Devoto, Jeblick, Jégou, "Expected
// Attention: KV Cache Compression by Estimating Attention from Future Queries
// Distribution", arXiv:2510.00636, 2025, Sec. 3; reference implementation
// ExpectedAttentionPress in NVIDIA/kvpress, kvpress/presses/expected_attention_press.py).
//
// The queries a head will issue next are modelled as Gaussian, and each token is scored by
// the attention such a query pays it in expectation. For query head h of the KV head's
// group, from the observed queries q_j at positions p_j (stream_data::queries), leaving out
// those at positions below n_sink as the reference leaves out the first n_sink hidden states:
//
//   x_j    = R_{-p_j} q_j                      RoPE undone (kvc::rope_spec, both layouts)
//   mu     = (1/N) sum_j x_j
//   Sigma  = (1/N) sum_j (x_j - mu)(x_j - mu)^T    (divided by N, as the reference does)
//   R      = (1/F) sum_{t=a}^{a+F-1} R_t        RoPE averaged over the F = n_future positions
//                                               after the newest observed query (a = p + 1)
//   mu'    = R mu,   Sigma' = R Sigma R^T
//   z_i    = mu'.k_i / sqrt(d) + k_i^T Sigma' k_i / (2d)
//
// z_i is the paper's closed form of the expected exponentiated logit, the moment generating
// function of the Gaussian q.k_i: E_{q ~ N(mu', Sigma')}[exp(q.k_i / sqrt(d))] = exp(z_i).
// The averaged rotation keeps RoPE's pair structure: pair i (frequency w) turns by the mean
// of e^{i t w}, in closed form
//   (1/F) sum_{t=a}^{a+F-1} e^{i t w} = e^{i w (a + (F-1)/2)} sin(F w / 2) / (F sin(w / 2)).
//
// Scores, over the retained tokens i >= n_sink (the first n_sink retained tokens are the
// attention sinks: they score +inf and stay out of the softmax, as in the reference):
//   a_{h,i}  = exp(z_i + lw_i) / sum_{j >= n_sink} exp(z_j + lw_j)   (lw: log-weight, 0 for a
//              plain token, so that a token standing for n merged ones counts n times)
//   a_i      = mean over the group's query heads of a_{h,i} (group_reduce::max: the maximum)
//   score_i  = (a_i + eps) * ||v_i||_2          (use_value_norm; a_i otherwise)
//
// Defaults follow the reference: n_future 512, n_sink 4, covariance and value norm on,
// eps 0 (ExpectedAttentionPress.epsilon).
//
// Cost per token and query head, exact: one dot product of length head_dim for mu' / sqrt(d),
// and one per row of a factor with rows c_r, sum_r (c_r . k)^2 = k^T Sigma' k / (2d): the
// rotated centred queries themselves (N rows) when there are at most head_dim observed
// queries, otherwise the rows of the Cholesky factor of Sigma' (head_dim rows, triangular, so
// about head_dim / 2 full rows). kvc/detail/projection.hpp runs these products (AVX2 + FMA
// where the compiler targets it); the statistics (mu, Sigma, the averaged rotation, the
// factor) are computed in double once per call. Workspace: about group * (n + (N + 1) *
// head_dim) floats plus group * N * head_dim doubles (2 * head_dim^2 doubles more when N >
// head_dim); too small a workspace gives status_code::workspace_exhausted.
//
// Usable at prefill and during decoding: it reads only stream_data. Needs observed queries
// (cache_config::observe.query_window > 0 and at least one attend() since the sequence
// began); without them score() returns invalid_argument naming the missing observation.
// A stream whose tokens are all sinks needs no statistics: all +inf.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

#include <Eigen/Core>

#include "kvc/config.hpp"
#include "kvc/detail/projection.hpp"
#include "kvc/rope.hpp"
#include "kvc/score/scorer.hpp"
#include "kvc/status.hpp"
#include "kvc/stream.hpp"
#include "kvc/version.hpp"
#include "kvc/workspace.hpp"

KVC_NAMESPACE_BEGIN
namespace detail {
namespace ea {

using dmatrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>;  // column-major

// RoPE averaged over positions first .. first + count - 1: pair i of the average turns
// like (cos_mean[i], sin_mean[i]), i.e. (x_a, x_b) -> (c x_a - s x_b, s x_a + c x_b), with
// (c, s) the real and imaginary parts of (1/count) sum_t e^{i t w_i}. cos_mean, sin_mean:
// [rope.dims(head_dim) / 2].
inline void average_rotation(const rope_spec& rope, int head_dim, double first, int count, double* cos_mean,
                             double* sin_mean) noexcept {
  const int pairs = rope.dims(head_dim) / 2;
  const double f = static_cast<double>(count);
  for (int i = 0; i < pairs; ++i) {
    const double w = rope_frequency(rope, head_dim, i);
    // sin(f w / 2) / (f sin(w / 2)): the Dirichlet kernel, accurate for small w too
    // (0 < w <= 1, so sin(w / 2) > 0).
    const double amp = std::sin(0.5 * f * w) / (f * std::sin(0.5 * w));
    const double phase = w * (first + 0.5 * (f - 1.0));
    cos_mean[i] = amp * std::cos(phase);
    sin_mean[i] = amp * std::sin(phase);
  }
}

// y = R x for the averaged rotation (cos_mean, sin_mean); dimensions past the rotary
// ones are copied. x and y may be the same array.
inline void apply_average_rotation(const rope_spec& rope, int head_dim, const double* cos_mean, const double* sin_mean,
                                   const double* x, double* y) noexcept {
  const int pairs = rope.dims(head_dim) / 2;
  if (x != y)
    for (int c = 0; c < head_dim; ++c) y[c] = x[c];
  for (int i = 0; i < pairs; ++i) {
    int a, b;
    rope_pair(rope, head_dim, i, a, b);
    const double xa = x[a], xb = x[b];
    y[a] = cos_mean[i] * xa - sin_mean[i] * xb;
    y[b] = sin_mean[i] * xa + cos_mean[i] * xb;
  }
}

// cs [2 * pairs]: cos and sin of position * w_i, for unrotate().
inline void rotation_at(const rope_spec& rope, int head_dim, double position, double* cs) noexcept {
  const int pairs = rope.dims(head_dim) / 2;
  for (int i = 0; i < pairs; ++i) {
    const double angle = position * rope_frequency(rope, head_dim, i);
    cs[2 * i] = std::cos(angle);
    cs[2 * i + 1] = std::sin(angle);
  }
}

// out [head_dim] = R_{-position} q, the query before RoPE, with cs from rotation_at(position).
inline void unrotate(const rope_spec& rope, int head_dim, const double* cs, const float* q, double* out) noexcept {
  for (int c = 0; c < head_dim; ++c) out[c] = q[c];
  const int pairs = rope.dims(head_dim) / 2;
  for (int i = 0; i < pairs; ++i) {
    int a, b;
    rope_pair(rope, head_dim, i, a, b);
    const double c = cs[2 * i], s = cs[2 * i + 1], xa = q[a], xb = q[b];
    out[a] = xa * c + xb * s;
    out[b] = xb * c - xa * s;
  }
}

// Cholesky a = L L^T in place (column-major d x d, lower triangle read and overwritten with
// L); false when a pivot is not positive. Plain loops: d^3 / 3 operations once per head, and
// no blocking buffers.
inline bool cholesky(double* a, int d) noexcept {
  const std::size_t ud = static_cast<std::size_t>(d);
  for (int j = 0; j < d; ++j) {
    double* cj = a + static_cast<std::size_t>(j) * ud;
    double diag = cj[j];
    for (int q = 0; q < j; ++q) {
      const double l = a[static_cast<std::size_t>(q) * ud + static_cast<std::size_t>(j)];
      diag -= l * l;
    }
    if (!(diag > 0.0)) return false;
    diag = std::sqrt(diag);
    cj[j] = diag;
    for (int q = 0; q < j; ++q) {
      const double* cq = a + static_cast<std::size_t>(q) * ud;
      const double ljq = cq[j];
      for (int r = j + 1; r < d; ++r) cj[r] -= cq[r] * ljq;
    }
    for (int r = j + 1; r < d; ++r) cj[r] /= diag;
  }
  return true;
}

}  // namespace ea
}  // namespace detail

namespace score {

struct expected_attention {
  static constexpr const char* name = "expected_attention";
  // Values are loaded even with use_value_norm off (fields is a compile-time constant).
  static constexpr stream_fields fields = stream_fields::keys | stream_fields::values | stream_fields::queries;

  int n_sink = 4;              // first retained tokens kept (+inf) and left out of the softmax;
                               // observed queries at positions below n_sink are left out of mu, Sigma
  int n_future = 512;          // future positions RoPE is averaged over
  bool use_covariance = true;  // false: z_i = mu'.k_i / sqrt(d)
  bool use_value_norm = true;  // score (a_i + eps) * ||v_i||; false: a_i (eps unused)
  float eps = 0.0f;            // added to a_i before the value norm
  group_reduce reduce = group_reduce::mean;

  status score(const stream_data& s, workspace& ws, float* out) const noexcept {
    const int n = s.size(), g = s.group_size();
    const int sinks = std::min(std::max(n_sink, 0), n);
    KVC_RETURN_IF_ERROR(check(s, n > sinks));
    for (int i = 0; i < sinks; ++i) out[i] = std::numeric_limits<float>::infinity();
    if (n <= sinks) return ok_status();
    workspace_scope scope(ws);
    plan p;
    KVC_RETURN_IF_ERROR(prepare(s, ws, p));
    const std::size_t un = static_cast<std::size_t>(n);
    float* z = ws.alloc<float>(static_cast<std::size_t>(g) * un);
    if (z == nullptr) return exhausted(ws, s);
    logits(s, p, sinks, z);
    using array_map = Eigen::Map<Eigen::ArrayXf>;
    const Eigen::Index m = n - sinks;
    array_map a(out + sinks, m);
    a.setZero();
    for (int h = 0; h < g; ++h) {
      array_map zh(z + static_cast<std::size_t>(h) * un + static_cast<std::size_t>(sinks), m);
      if (s.log_weights != nullptr) zh += Eigen::Map<const Eigen::ArrayXf>(s.log_weights + sinks, m);
      zh = (zh - zh.maxCoeff()).exp();
      const float inv = static_cast<float>(1.0 / zh.cast<double>().sum());
      if (reduce == group_reduce::mean)
        a += zh * (inv / static_cast<float>(g));
      else
        a = a.max(zh * inv);
    }
    if (use_value_norm) {
      const int d = s.head_dim();
      const Eigen::Map<const row_matrix> v(s.values + static_cast<std::size_t>(sinks) * static_cast<std::size_t>(d), m,
                                           d);
      for (Eigen::Index i = 0; i < m; ++i) a(i) = (a(i) + eps) * v.row(i).norm();
    }
    return ok_status();
  }

  // z [s.size()]: the log of the expected exponentiated logit, z_i = mu'.k_i / sqrt(d) +
  // k_i^T Sigma' k_i / (2d), of query head `head` (0 <= head < group size) for every
  // retained token, sinks included; log-weights not added.
  status expected_logits(const stream_data& s, workspace& ws, int head, float* z) const noexcept {
    KVC_RETURN_IF_ERROR(check(s, true));
    if (head < 0 || head >= s.group_size())
      return status::error(status_code::out_of_range, "expected_attention: head %d outside the group of %d", head,
                           s.group_size());
    workspace_scope scope(ws);
    plan p;
    KVC_RETURN_IF_ERROR(prepare(s, ws, p));
    const int n = s.size(), g = s.group_size();
    float* all = ws.alloc<float>(static_cast<std::size_t>(g) * static_cast<std::size_t>(n));
    if (n > 0 && all == nullptr) return exhausted(ws, s);
    logits(s, p, 0, all);
    for (int i = 0; i < n; ++i) z[i] = all[static_cast<std::size_t>(head) * static_cast<std::size_t>(n) + i];
    return ok_status();
  }

 private:
  // The projections of the keys: `mean` holds mu'_h / sqrt(d) for every query head h of the
  // group (one row each); cov[h] holds rows c_r with sum_r (c_r . k)^2 = k^T Sigma'_h k / (2d)
  // (none when the covariance is off).
  struct plan {
    kvc::detail::packed_rows mean;
    kvc::detail::packed_rows* cov = nullptr;  // [group], or nullptr
  };

  static status exhausted(const workspace& ws, const stream_data& s) noexcept {
    return status::error(status_code::workspace_exhausted,
                         "expected_attention: workspace of %zu bytes is full (%zu in use) for stream (layer %d, "
                         "kv_head %d); raise cache_config::workspace_bytes",
                         ws.capacity(), ws.used(), s.info.layer, s.info.kv_head);
  }

  // needs_statistics: some token is not a sink, so mu and Sigma are needed. Observed queries
  // are required in any case (their absence means observation is off or nothing was attended).
  status check(const stream_data& s, bool needs_statistics) const noexcept {
    if (n_sink < 0)
      return status::error(status_code::invalid_argument, "expected_attention: n_sink is %d, must be >= 0", n_sink);
    if (n_future < 1)
      return status::error(status_code::invalid_argument, "expected_attention: n_future is %d, must be >= 1", n_future);
    if (!(eps >= 0.0f) || !std::isfinite(eps))
      return status::error(status_code::invalid_argument, "expected_attention: eps is %g, must be finite and >= 0",
                           static_cast<double>(eps));
    if (s.shape == nullptr || s.rope == nullptr || (s.size() > 0 && s.keys == nullptr) ||
        (use_value_norm && s.size() > 0 && s.values == nullptr))
      return status::error(status_code::invalid_argument,
                           "expected_attention: stream (layer %d, kv_head %d) lacks its keys, values or RoPE spec",
                           s.info.layer, s.info.kv_head);
    if (s.queries == nullptr || s.query_positions == nullptr || s.n_queries <= 0)
      return status::error(status_code::invalid_argument,
                           "expected_attention: no observed queries for stream (layer %d, kv_head %d); set "
                           "cache_config::observe.query_window > 0 and attend() before compress()",
                           s.info.layer, s.info.kv_head);
    int usable = 0;
    for (int j = 0; j < s.n_queries; ++j) usable += s.query_positions[j] >= n_sink ? 1 : 0;
    if (needs_statistics && usable == 0)
      return status::error(status_code::invalid_argument,
                           "expected_attention: the %d observed queries of stream (layer %d, kv_head %d) are all at "
                           "positions below n_sink (%d), which the query statistics leave out; attend() at later "
                           "positions before compress()",
                           s.n_queries, s.info.layer, s.info.kv_head, n_sink);
    return ok_status();
  }

  // Computes mu' and a factor of Sigma' for every query head of the group, packed for
  // kvc::detail::project_store / project_sumsq.
  status prepare(const stream_data& s, workspace& ws, plan& p) const noexcept {
    using namespace kvc::detail::ea;
    const int d = s.head_dim(), g = s.group_size();
    const rope_spec& rope = *s.rope;
    const int pairs = rope.dims(d) / 2;
    const std::size_t ud = static_cast<std::size_t>(d), ug = static_cast<std::size_t>(g);
    int count = 0;
    std::int32_t newest = s.query_positions[0];
    for (int j = 0; j < s.n_queries; ++j) {
      count += s.query_positions[j] >= n_sink ? 1 : 0;
      newest = std::max(newest, s.query_positions[j]);
    }
    // The covariance factor: the centred queries (count rows; none for one query, whose
    // covariance is 0) or a Cholesky factor (d rows).
    const bool few = count <= d;
    const int rank = use_covariance ? (few ? (count > 1 ? count : 0) : d) : 0;
    const std::size_t urank = static_cast<std::size_t>(rank);

    double* cos_mean = ws.alloc<double>(static_cast<std::size_t>(pairs));
    double* sin_mean = ws.alloc<double>(static_cast<std::size_t>(pairs));
    double* cs = ws.alloc<double>(2 * static_cast<std::size_t>(pairs));
    double* mu = ws.alloc<double>(ug * ud);
    double* tmp = ws.alloc<double>(ud);
    float* rows = ws.alloc<float>(std::max(ug, urank) * ud);  // rows before packing
    p.mean.data = ws.alloc<float>(kvc::detail::packed_floats(g, d));
    p.mean.bias =
        ws.alloc<float>(static_cast<std::size_t>(kvc::detail::projection_panels(g)) * kvc::detail::projection_panel);
    if ((pairs > 0 && (cos_mean == nullptr || sin_mean == nullptr || cs == nullptr)) || mu == nullptr ||
        tmp == nullptr || rows == nullptr || p.mean.data == nullptr || p.mean.bias == nullptr)
      return exhausted(ws, s);
    // The unrotated queries of every head (few), or a block of them (many) whose rank-update
    // buffers stay within Eigen's stack allocation limit.
    const int block = std::max(1, std::min(64, 8192 / std::max(d, 1)));
    double* x = nullptr;
    double* sigma = nullptr;
    double* backup = nullptr;
    if (rank > 0) {
      p.cov = ws.alloc<kvc::detail::packed_rows>(ug);
      if (p.cov == nullptr) return exhausted(ws, s);
      for (int h = 0; h < g; ++h) {
        p.cov[h] = kvc::detail::packed_rows{};
        p.cov[h].data = ws.alloc<float>(kvc::detail::packed_floats(rank, d));
        p.cov[h].bias = ws.alloc<float>(static_cast<std::size_t>(kvc::detail::projection_panels(rank)) *
                                        kvc::detail::projection_panel);
        if (p.cov[h].data == nullptr || p.cov[h].bias == nullptr) return exhausted(ws, s);
      }
      x = ws.alloc<double>((few ? ug * static_cast<std::size_t>(count) : static_cast<std::size_t>(block)) * ud);
      if (!few) {
        sigma = ws.alloc<double>(ud * ud);
        backup = ws.alloc<double>(ud * ud);
      }
      if (x == nullptr || (!few && (sigma == nullptr || backup == nullptr))) return exhausted(ws, s);
    }

    average_rotation(rope, d, static_cast<double>(newest) + 1.0, n_future, cos_mean, sin_mean);

    // mu of every head, keeping the unrotated queries when there are few.
    const bool keep_x = rank > 0 && few;
    for (std::size_t c = 0; c < ug * ud; ++c) mu[c] = 0.0;
    for (int j = 0, r = 0; j < s.n_queries; ++j) {
      if (s.query_positions[j] < n_sink) continue;
      rotation_at(rope, d, static_cast<double>(s.query_positions[j]), cs);
      for (int h = 0; h < g; ++h) {
        double* xr =
            keep_x
                ? x + (static_cast<std::size_t>(h) * static_cast<std::size_t>(count) + static_cast<std::size_t>(r)) * ud
                : tmp;
        unrotate(rope, d, cs, s.query(j, h), xr);
        for (std::size_t c = 0; c < ud; ++c) mu[static_cast<std::size_t>(h) * ud + c] += xr[c];
      }
      ++r;
    }
    const double inv_count = 1.0 / static_cast<double>(count);
    for (std::size_t c = 0; c < ug * ud; ++c) mu[c] *= inv_count;

    // Mean rows: mu'_h / sqrt(d).
    const double mean_scale = 1.0 / std::sqrt(static_cast<double>(d));
    for (int h = 0; h < g; ++h) {
      apply_average_rotation(rope, d, cos_mean, sin_mean, mu + static_cast<std::size_t>(h) * ud, tmp);
      for (std::size_t c = 0; c < ud; ++c)
        rows[static_cast<std::size_t>(h) * ud + c] = static_cast<float>(tmp[c] * mean_scale);
    }
    kvc::detail::pack_rows(rows, g, d, ud, 1, nullptr, p.mean);
    if (rank == 0) return ok_status();

    const double cov_scale = 1.0 / std::sqrt(2.0 * static_cast<double>(d));
    for (int h = 0; h < g; ++h) {
      const double* mh = mu + static_cast<std::size_t>(h) * ud;
      if (few) {
        // Sigma' = (1/N) sum_j c_j c_j^T with c_j = R (x_j - mu): rows c_j / sqrt(2 d N).
        const double scale = cov_scale * std::sqrt(inv_count);
        for (int r = 0; r < count; ++r) {
          double* xr =
              x + (static_cast<std::size_t>(h) * static_cast<std::size_t>(count) + static_cast<std::size_t>(r)) * ud;
          for (std::size_t c = 0; c < ud; ++c) xr[c] -= mh[c];
          apply_average_rotation(rope, d, cos_mean, sin_mean, xr, xr);
          for (std::size_t c = 0; c < ud; ++c)
            rows[static_cast<std::size_t>(r) * ud + c] = static_cast<float>(xr[c] * scale);
        }
      } else {
        KVC_RETURN_IF_ERROR(covariance_factor(s, h, count, mh, cos_mean, sin_mean, cs, x, block, sigma, backup));
        // Sigma' = L L^T, k^T Sigma' k = ||L^T k||^2: the rows of L^T, over sqrt(2d). sigma is
        // column-major, so row r of L^T (column r of L) lies at sigma[r * d + c] for c >= r.
        for (std::size_t r = 0; r < ud; ++r)
          for (std::size_t c = 0; c < ud; ++c)
            rows[r * ud + c] = c >= r ? static_cast<float>(sigma[r * ud + c] * cov_scale) : 0.0f;
      }
      kvc::detail::pack_rows(rows, rank, d, ud, 1, nullptr, p.cov[h],
                             few ? kvc::detail::row_shape::full : kvc::detail::row_shape::upper);
    }
    return ok_status();
  }

  // Many observed queries: Sigma of head h accumulated in blocks, rotated to Sigma', and
  // factored in place, Sigma' = L L^T (column-major; the strictly upper triangle holds
  // leftovers). A diagonal jitter (1e-12 of the mean variance, growing 100-fold per try) is
  // added only when the factorisation fails.
  status covariance_factor(const stream_data& s, int h, int count, const double* mu, const double* cos_mean,
                           const double* sin_mean, double* cs, double* x, int block, double* sigma,
                           double* backup) const noexcept {
    using namespace kvc::detail::ea;
    const int d = s.head_dim();
    const rope_spec& rope = *s.rope;
    const std::size_t ud = static_cast<std::size_t>(d);
    Eigen::Map<dmatrix> sig(sigma, d, d);
    sig.setZero();
    int filled = 0;
    const auto flush = [&] {
      if (filled == 0) return;
      Eigen::Map<const Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> xb(x, filled, d);
      sig.selfadjointView<Eigen::Lower>().rankUpdate(xb.transpose());
      filled = 0;
    };
    for (int j = 0; j < s.n_queries; ++j) {
      if (s.query_positions[j] < n_sink) continue;
      rotation_at(rope, d, static_cast<double>(s.query_positions[j]), cs);
      double* xr = x + static_cast<std::size_t>(filled) * ud;
      unrotate(rope, d, cs, s.query(j, h), xr);
      for (std::size_t c = 0; c < ud; ++c) xr[c] -= mu[c];
      if (++filled == block) flush();
    }
    flush();
    sig.triangularView<Eigen::StrictlyUpper>() = sig.transpose();
    sig /= static_cast<double>(count);
    // Sigma' = R Sigma R^T: R on the columns' pairs (left), then on the rows' pairs (right).
    const int pairs = rope.dims(d) / 2;
    for (int i = 0; i < pairs; ++i) {
      int a, b;
      rope_pair(rope, d, i, a, b);
      const double c = cos_mean[i], sn = sin_mean[i];
      for (int col = 0; col < d; ++col) {
        const double xa = sig(a, col), xb = sig(b, col);
        sig(a, col) = c * xa - sn * xb;
        sig(b, col) = sn * xa + c * xb;
      }
      for (int row = 0; row < d; ++row) {
        const double xa = sig(row, a), xb = sig(row, b);
        sig(row, a) = c * xa - sn * xb;
        sig(row, b) = sn * xa + c * xb;
      }
    }
    Eigen::Map<dmatrix> keep(backup, d, d);
    keep = sig;
    const double mean_var = sig.trace() / static_cast<double>(d);
    double jitter = 0.0;
    for (int attempt = 0; attempt < 6; ++attempt) {
      if (attempt > 0) {
        jitter = attempt == 1 ? 1e-12 * std::max(mean_var, std::numeric_limits<double>::min()) : jitter * 100.0;
        sig = keep;
        sig.diagonal().array() += jitter;
      }
      if (cholesky(sigma, d)) return ok_status();
    }
    return status::error(status_code::non_finite,
                         "expected_attention: the query covariance of stream (layer %d, kv_head %d) head %d has no "
                         "Cholesky factor",
                         s.info.layer, s.info.kv_head, h);
  }

  // z [group][n] for tokens [first, n); entries before `first` are left as they are. Tokens
  // go in blocks that stay in the L2 cache while every head's rows pass over them.
  void logits(const stream_data& s, const plan& p, int first, float* z) const noexcept {
    const int n = s.size(), d = s.head_dim(), g = s.group_size();
    const std::size_t ud = static_cast<std::size_t>(d), un = static_cast<std::size_t>(n);
    constexpr int token_block = 240;
    for (int b = first; b < n; b += token_block) {
      const int cnt = std::min(token_block, n - b);
      const float* kb = s.keys + static_cast<std::size_t>(b) * ud;
      kvc::detail::project_store(p.mean, kb, cnt, ud, z + b, un, 1);
      if (p.cov != nullptr) kvc::detail::project_sumsq(p.cov, g, kb, cnt, ud, z + b, un);
    }
  }
};

}  // namespace score

static_assert(is_scorer_v<score::expected_attention>,
              "kvc::score::expected_attention must satisfy the scorer interface");

KVC_NAMESPACE_END
