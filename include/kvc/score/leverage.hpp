// kvc/score/leverage.hpp: approximate leverage scores of a stream's keys (Chari, Van Durme,
// "Compactor: Calibrated Query-Agnostic KV Cache Compression with Approximate Leverage
// Scores", arXiv:2507.08143, 2025, Sec. 3; reference implementations LeverageScorePress in
// NVIDIA/kvpress, kvpress/presses/leverage_press.py, and approximate_leverage_scores in
// vnchari/compactor-vllm, src/compactor_vllm/compression/compactor.py).
//
// The paper's leverage score of token i is the i-th diagonal entry of the hat matrix of the
// centred key matrix K_c (n x d, rows k_i - mean_j k_j):
//   l_i = k_c,i^T (K_c^T K_c)^+ k_c,i = [K_c K_c^+]_ii,   0 <= l_i <= 1,   sum_i l_i = rank(K_c).
// Tokens whose keys point where few other keys do (geometric outliers) score high.
//
// Sketched (the default, as the references): with Phi a d x s Gaussian matrix (entries
// N(0, 1/s), s = sketch_dim), the right sketch X = K_c Phi and G = X^T X = L L^T (Cholesky),
//   l_i ~ x_i^T (X^T X)^-1 x_i = ||L^-1 x_i||^2,
// the exact leverage of the sketch X. When rank(K_c) <= s this equals the exact leverage of
// K_c (almost surely); otherwise it approximates it (at head_dim 128 and s = 48 the Spearman
// rank correlation with the exact score is about 0.6 on synthetic keys, and the outlier
// tokens rank first in both: tests/test_scorers_ea.cpp). Cost per token: d * s multiply-adds
// for the sketch and s (s + 1) / 2 for the whitening (kvc/detail/projection.hpp, AVX2 + FMA
// where the compiler targets it), s^2 / 2 for G (Eigen).
// exact = true computes l_i from K_c itself: a pivoted Cholesky of K_c^T K_c (double) finds
// its numerical rank r (pivots below 1e-9 of the largest diagonal count as zero) and r
// independent coordinates J, and l_i = ||L_J^-1 k_c,i[J]||^2; cost d^2 per token.
//
// Keys are scored before RoPE, as in both reference implementations (undo_rope; the stored
// keys are rotated back by their positions with the cache's rope_spec).
//
// Phi is a function of (seed, d, s) alone: entry e of the row-major d x s matrix comes from
// the SplitMix64 hash of (seed, e / 2) through a double-precision Box-Muller transform,
// rounded to float; every platform gives the same Phi except where its libm's log or cos
// differs from another's in the last bit of a double and that changes the float rounding.
// Scores are deterministic for a given seed.
//
// Numerics: keys are shifted by the mean of their first 240 before sketching, so the sketch
// is small where the keys share a large common part, and the exact mean is removed in double;
// the Gram matrix is accumulated in double from float blocks. If G is not positive definite to
// single precision (a Cholesky pivot ratio below 1e-6, e.g. keys of rank below s, or fewer
// tokens than s), a diagonal jitter of 1e-6 of G's mean diagonal, growing 10-fold per try
// until the ratio holds, is added ("jitter on failure"): the ridge leverage of the sketch,
// which for keys of rank below s stays close to their exact leverage (1e-7 apart on the
// rank-6 keys of tests/test_scorers_ea.cpp). Keys that are all equal give l_i = 0.
//
// Workspace: (n + 240) * s + 2 * d * s + 240 * d floats and a few s x s blocks; when n * s
// floats do not fit, the sketch is recomputed in a second pass instead of stored. Too small
// a workspace gives status_code::workspace_exhausted.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

#include <Eigen/Cholesky>
#include <Eigen/Core>

#include "kvc/config.hpp"
#include "kvc/detail/attention.hpp"
#include "kvc/detail/hash.hpp"
#include "kvc/detail/projection.hpp"
#include "kvc/rope.hpp"
#include "kvc/score/scorer.hpp"
#include "kvc/status.hpp"
#include "kvc/stream.hpp"
#include "kvc/version.hpp"
#include "kvc/workspace.hpp"

KVC_NAMESPACE_BEGIN
namespace detail {
namespace lev {

using dmatrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>;  // column-major
using drow_matrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Eigen's matrix products pack operand blocks on the stack when each holds at most
// EIGEN_STACK_ALLOCATION_LIMIT (128 KiB), on the heap otherwise: products here keep
// rows * depth and cols * depth at most this many bytes' worth, so they never allocate.
inline int product_block(int depth, std::size_t scalar_bytes) noexcept {
  return std::max(1, static_cast<int>(131072 / scalar_bytes) / std::max(depth, 1));
}

// The sketch matrix Phi [d][s], row-major, entries N(0, 1/s), a function of (seed, d, s).
inline void sketch_matrix(std::uint64_t seed, int d, int s, float* phi) noexcept {
  const std::size_t total = static_cast<std::size_t>(d) * static_cast<std::size_t>(s);
  const std::uint64_t base = mix64(seed ^ 0x6c65766572616765ull);  // "leverage"
  const double two_pi = 6.283185307179586476925286766559;
  const double scale = 1.0 / std::sqrt(static_cast<double>(s));
  for (std::size_t e = 0; e < total; e += 2) {
    const std::uint64_t h1 = mix64(base + 2 * static_cast<std::uint64_t>(e / 2));
    const std::uint64_t h2 = mix64(h1 ^ 0x9E3779B97F4A7C15ull);
    const double u1 = (static_cast<double>(h1 >> 11) + 1.0) * 0x1.0p-53;  // (0, 1]
    const double u2 = static_cast<double>(h2 >> 11) * 0x1.0p-53;          // [0, 1)
    const double radius = std::sqrt(-2.0 * std::log(u1)) * scale;
    phi[e] = static_cast<float>(radius * std::cos(two_pi * u2));
    if (e + 1 < total) phi[e + 1] = static_cast<float>(radius * std::sin(two_pi * u2));
  }
}

// Rotates keys back by their positions (RoPE undone), token by token in increasing position
// order. The rotation of each token follows from the previous one's by a precomputed step
// when positions are at most max_step apart (complex multiplication in double, resynchronised
// from cos/sin every 1024 steps), and is computed directly otherwise.
class unrotator {
 public:
  static constexpr int max_step = 8;

  // Storage: (2 * max_step + 4) * pairs doubles and 2 * pairs floats from the workspace;
  // false when it is full.
  bool init(const rope_spec& rope, int head_dim, workspace& ws) noexcept {
    rope_ = &rope;
    d_ = head_dim;
    pairs_ = rope.dims(head_dim) / 2;
    const std::size_t p = static_cast<std::size_t>(pairs_);
    cos_ = ws.alloc<double>(p);
    sin_ = ws.alloc<double>(p);
    freq_ = ws.alloc<double>(p);
    steps_ = ws.alloc<double>(2 * p * max_step);
    cf_ = ws.alloc<float>(p);
    sf_ = ws.alloc<float>(p);
    if (pairs_ > 0 && (cos_ == nullptr || sin_ == nullptr || freq_ == nullptr || steps_ == nullptr || cf_ == nullptr ||
                       sf_ == nullptr))
      return false;
    for (int i = 0; i < pairs_; ++i) freq_[i] = rope_frequency(rope, head_dim, i);
    for (int st = 1; st <= max_step; ++st) {
      double* c = steps_ + 2 * p * static_cast<std::size_t>(st - 1);
      set(static_cast<double>(st), c, c + p);
    }
    reset();
    return true;
  }
  void reset() noexcept { have_ = false; }

  // out [head_dim] = key k at `position` with its RoPE undone.
  void next(std::int32_t position, const float* k, float* out) noexcept {
    for (int c = 2 * pairs_; c < d_; ++c) out[c] = k[c];  // dimensions RoPE leaves alone
    if (pairs_ == 0) return;
    const std::size_t p = static_cast<std::size_t>(pairs_);
    const std::int64_t delta = static_cast<std::int64_t>(position) - pos_;
    if (!have_ || delta < 1 || delta > max_step || ++since_ >= 1024) {
      set(static_cast<double>(position), cos_, sin_);
      have_ = true;
      since_ = 0;
    } else {
      const double* c1 = steps_ + 2 * p * static_cast<std::size_t>(delta - 1);
      const double* s1 = c1 + p;
      for (std::size_t i = 0; i < p; ++i) {
        const double c = cos_[i], s = sin_[i];
        cos_[i] = c * c1[i] - s * s1[i];
        sin_[i] = s * c1[i] + c * s1[i];
      }
    }
    pos_ = position;
    for (std::size_t i = 0; i < p; ++i) {
      cf_[i] = static_cast<float>(cos_[i]);
      sf_[i] = static_cast<float>(sin_[i]);
    }
    // rotation by -position: (x_a, x_b) -> (x_a c + x_b s, x_b c - x_a s)
    if (rope_->layout == rope_layout::half_split) {
      const float* ka = k;
      const float* kb = k + p;
      float* oa = out;
      float* ob = out + p;
      for (std::size_t i = 0; i < p; ++i) {
        oa[i] = ka[i] * cf_[i] + kb[i] * sf_[i];
        ob[i] = kb[i] * cf_[i] - ka[i] * sf_[i];
      }
    } else {
      for (std::size_t i = 0; i < p; ++i) {
        const float xa = k[2 * i], xb = k[2 * i + 1];
        out[2 * i] = xa * cf_[i] + xb * sf_[i];
        out[2 * i + 1] = xb * cf_[i] - xa * sf_[i];
      }
    }
  }

 private:
  void set(double position, double* c, double* s) const noexcept {
    for (int i = 0; i < pairs_; ++i) {
      const double angle = position * freq_[i];
      c[i] = std::cos(angle);
      s[i] = std::sin(angle);
    }
  }
  const rope_spec* rope_ = nullptr;
  int d_ = 0, pairs_ = 0;
  double* cos_ = nullptr;
  double* sin_ = nullptr;
  double* freq_ = nullptr;
  double* steps_ = nullptr;  // [max_step][cos: pairs, sin: pairs]
  float* cf_ = nullptr;
  float* sf_ = nullptr;
  bool have_ = false;
  std::int64_t pos_ = 0;
  int since_ = 0;
};

// Keys of tokens [first, first + count) as the scorer sees them (before RoPE when unrotating),
// delivered block by block.
class key_source {
 public:
  bool init(const stream_data& s, bool undo_rope, workspace& ws, int block) noexcept {
    s_ = &s;
    undo_ = undo_rope && s.rope != nullptr && s.rope->dims(s.head_dim()) > 0;
    buf_ = undo_ ? ws.alloc<float>(static_cast<std::size_t>(block) * static_cast<std::size_t>(s.head_dim())) : nullptr;
    if (undo_ && (buf_ == nullptr || !rot_.init(*s.rope, s.head_dim(), ws))) return false;
    return true;
  }
  // Rows of tokens [b, b + cnt), in increasing b between calls to restart().
  const float* rows(int b, int cnt) noexcept {
    const std::size_t d = static_cast<std::size_t>(s_->head_dim());
    if (!undo_) return s_->keys + static_cast<std::size_t>(b) * d;
    for (int t = 0; t < cnt; ++t)
      rot_.next(s_->positions[b + t], s_->keys + static_cast<std::size_t>(b + t) * d,
                buf_ + static_cast<std::size_t>(t) * d);
    return buf_;
  }
  void restart() noexcept { rot_.reset(); }

 private:
  const stream_data* s_ = nullptr;
  bool undo_ = false;
  float* buf_ = nullptr;
  unrotator rot_;
};

// Cholesky of the s x s matrix g (column-major, lower triangle used), in place (Eigen's LLT
// on a Ref: for s <= 256 its blocks stay on the stack); when the pivot ratio min L_jj^2 / max L_jj^2 is below 1e-6,
// restores g from `backup` and adds a growing diagonal jitter. Returns false only when every try fails.
inline bool cholesky_with_jitter(Eigen::Map<dmatrix>& g, Eigen::Map<dmatrix>& backup) noexcept {
  backup = g;
  const double mean_diag = std::max(g.diagonal().mean(), std::numeric_limits<double>::min());
  double jitter = 0.0;
  for (int attempt = 0; attempt < 8; ++attempt) {
    if (attempt > 0) {
      jitter = attempt == 1 ? 1e-6 * mean_diag : jitter * 10.0;
      g = backup;
      g.diagonal().array() += jitter;
    }
    Eigen::LLT<Eigen::Ref<dmatrix>, Eigen::Lower> llt(g);
    if (llt.info() != Eigen::Success) continue;
    const auto diag = g.diagonal().array().square();
    if (diag.minCoeff() >= 1e-6 * diag.maxCoeff()) return true;
  }
  return false;
}

// Pivoted Cholesky of the symmetric positive semi-definite d x d matrix c (column-major,
// lower triangle read, left unchanged): c[J, J] = L L^T for the pivot coordinates J [rank],
// stopping when the largest remaining diagonal is at most tol times the largest initial one.
// l: d x d column-major scratch whose leading rank x rank block receives L; resid: [d].
inline int pivoted_cholesky(const double* c, int d, double tol, int* piv, double* l, double* resid) noexcept {
  const std::size_t ud = static_cast<std::size_t>(d);
  double max_diag = 0.0;
  for (int i = 0; i < d; ++i) {
    piv[i] = i;
    resid[i] = c[static_cast<std::size_t>(i) * ud + static_cast<std::size_t>(i)];
    max_diag = std::max(max_diag, resid[i]);
  }
  const auto at = [&](int r, int col) {  // c(r, col) from the lower triangle
    return r >= col ? c[static_cast<std::size_t>(col) * ud + static_cast<std::size_t>(r)]
                    : c[static_cast<std::size_t>(r) * ud + static_cast<std::size_t>(col)];
  };
  int rank = 0;
  for (; rank < d; ++rank) {
    int best = rank;
    for (int i = rank + 1; i < d; ++i)
      if (resid[piv[i]] > resid[piv[best]]) best = i;
    if (!(resid[piv[best]] > tol * max_diag)) break;
    std::swap(piv[rank], piv[best]);
    // swap the already computed rows of L too
    for (int col = 0; col < rank; ++col)
      std::swap(l[static_cast<std::size_t>(col) * ud + static_cast<std::size_t>(rank)],
                l[static_cast<std::size_t>(col) * ud + static_cast<std::size_t>(best)]);
    const double diag = std::sqrt(resid[piv[rank]]);
    l[static_cast<std::size_t>(rank) * ud + static_cast<std::size_t>(rank)] = diag;
    for (int i = rank + 1; i < d; ++i) {
      double v = at(piv[i], piv[rank]);
      for (int col = 0; col < rank; ++col)
        v -= l[static_cast<std::size_t>(col) * ud + static_cast<std::size_t>(i)] *
             l[static_cast<std::size_t>(col) * ud + static_cast<std::size_t>(rank)];
      v /= diag;
      l[static_cast<std::size_t>(rank) * ud + static_cast<std::size_t>(i)] = v;
      resid[piv[i]] -= v * v;
    }
  }
  return rank;
}

inline status exhausted(const workspace& ws, const char* who, const stream_data& s) noexcept {
  return status::error(status_code::workspace_exhausted,
                       "%s: workspace of %zu bytes is full (%zu in use) for stream (layer %d, kv_head %d); raise "
                       "cache_config::workspace_bytes",
                       who, ws.capacity(), ws.used(), s.info.layer, s.info.kv_head);
}

// Sketched leverage of tokens [first, first + count), centred over that range: out [count].
inline status sketched(const stream_data& s, int first, int count, int sketch_dim, std::uint64_t seed, bool undo_rope,
                       const char* who, workspace& ws, float* out) noexcept {
  const int d = s.head_dim(), sd = sketch_dim;
  const std::size_t ud = static_cast<std::size_t>(d), us = static_cast<std::size_t>(sd);
  constexpr int tb = 240;  // tokens per block: unrotated together, then sketched
  // Gram updates in row chunks whose packing buffers stay within Eigen's stack allocation limit
  const int gram_rows = std::max(1, std::min(tb, 16384 / sd));
  const std::size_t panel_floats = static_cast<std::size_t>(projection_panels(sd)) * projection_panel;
  float* phi = ws.alloc<float>(ud * us);
  double* shift = ws.alloc<double>(ud);
  float* shift_sketch = ws.alloc<float>(us);
  double* acc = ws.alloc<double>(us);
  double* gram = ws.alloc<double>(us * us);
  double* backup = ws.alloc<double>(us * us);
  float* block_gram = ws.alloc<float>(us * us);
  float* whiten = ws.alloc<float>(us * us);
  float* bias = ws.alloc<float>(us);
  float* key0 = ws.alloc<float>(ud);
  packed_rows sketch_rows, whiten_rows;
  sketch_rows.data = ws.alloc<float>(packed_floats(sd, d));
  sketch_rows.bias = ws.alloc<float>(panel_floats);
  whiten_rows.data = ws.alloc<float>(packed_floats(sd, sd));
  whiten_rows.bias = ws.alloc<float>(panel_floats);
  key_source keys;
  if (phi == nullptr || shift == nullptr || shift_sketch == nullptr || acc == nullptr || gram == nullptr ||
      backup == nullptr || block_gram == nullptr || whiten == nullptr || bias == nullptr || key0 == nullptr ||
      sketch_rows.data == nullptr || sketch_rows.bias == nullptr || whiten_rows.data == nullptr ||
      whiten_rows.bias == nullptr || !keys.init(s, undo_rope, ws, tb))
    return exhausted(ws, who, s);
  // The whole sketch [count][s] when it fits, else one block recomputed per pass.
  float* xs = ws.alloc<float>(static_cast<std::size_t>(count) * us);
  const bool stored = xs != nullptr;
  if (!stored) {
    xs = ws.alloc<float>(static_cast<std::size_t>(tb) * us);
    if (xs == nullptr) return exhausted(ws, who, s);
  }
  sketch_matrix(seed, d, sd, phi);

  // Shift c: the mean of the first keys (up to tb), so that the sketch of k - c is small where
  // the keys share a large common part and the exact mean can be removed in double. The
  // sketch rows are the columns of Phi, with bias -c Phi: x = (k - c) Phi.
  {
    const int m = std::min(count, tb);
    const float* k = keys.rows(first, m);
    for (std::size_t c = 0; c < ud; ++c) shift[c] = 0.0;
    for (int t = 0; t < m; ++t)
      for (std::size_t c = 0; c < ud; ++c) shift[c] += k[static_cast<std::size_t>(t) * ud + c];
    for (std::size_t c = 0; c < ud; ++c) shift[c] = static_cast<double>(static_cast<float>(shift[c] / m));
    for (std::size_t j = 0; j < us; ++j) {
      double v = 0.0;
      for (std::size_t c = 0; c < ud; ++c) v += shift[c] * static_cast<double>(phi[c * us + j]);
      shift_sketch[j] = static_cast<float>(-v);
    }
    keys.restart();
  }
  pack_rows(phi, sd, d, 1, us, shift_sketch, sketch_rows);
  // x [cnt][s] for tokens first + b ...; notes whether every key equals the first.
  bool all_equal = true;
  const auto sketch_block = [&](int b, int cnt, float* x) {
    const float* k = keys.rows(first + b, cnt);
    if (b == 0)
      for (std::size_t c = 0; c < ud; ++c) key0[c] = k[c];
    for (int t = 0; t < cnt && all_equal; ++t)
      for (std::size_t c = 0; c < ud; ++c) all_equal = all_equal && k[static_cast<std::size_t>(t) * ud + c] == key0[c];
    project_store(sketch_rows, k, cnt, ud, x, 1, us);
  };

  // Pass 1: sketch of the shifted keys, its column sums and Gram matrix.
  Eigen::Map<dmatrix> g(gram, sd, sd), keep(backup, sd, sd);
  Eigen::Map<Eigen::MatrixXf> gb(block_gram, sd, sd);
  g.setZero();
  for (std::size_t j = 0; j < us; ++j) acc[j] = 0.0;
  for (int b = 0; b < count; b += tb) {
    const int cnt = std::min(tb, count - b);
    float* x = stored ? xs + static_cast<std::size_t>(b) * us : xs;
    sketch_block(b, cnt, x);
    gb.setZero();
    for (int r = 0; r < cnt; r += gram_rows) {
      const int rn = std::min(gram_rows, cnt - r);
      gb.selfadjointView<Eigen::Lower>().rankUpdate(
          Eigen::Map<const row_matrix>(x + static_cast<std::size_t>(r) * us, rn, sd).transpose());
    }
    g.triangularView<Eigen::Lower>() += gb.cast<double>();
    for (int t = 0; t < cnt; ++t)
      for (std::size_t j = 0; j < us; ++j) acc[j] += static_cast<double>(x[static_cast<std::size_t>(t) * us + j]);
  }
  // Centre: G = sum x x^T - count * mean mean^T.
  const double raw_max = g.diagonal().maxCoeff();
  for (std::size_t j = 0; j < us; ++j) acc[j] /= count;
  for (int c = 0; c < sd; ++c)
    for (int r = c; r < sd; ++r) g(r, c) -= count * acc[r] * acc[c];
  // Keys all equal (K_c = 0), or equal but for rounding of the float Gram (the centred
  // variance at most 1e-6 of the uncentred one): every leverage is 0.
  if (all_equal || !(g.diagonal().maxCoeff() > 1e-6 * raw_max)) {
    for (int i = 0; i < count; ++i) out[i] = 0.0f;
    return ok_status();
  }
  if (!cholesky_with_jitter(g, keep))
    return status::error(status_code::non_finite,
                         "%s: the key sketch of stream (layer %d, kv_head %d) has no Cholesky factor", who,
                         s.info.layer, s.info.kv_head);
  // W = L^-1 by forward substitution (column-major, lower triangular, in backup); whiten = W
  // row-major (lower triangular), bias = -W mean, so that the whitened sketch is W x + bias.
  {
    Eigen::Map<dmatrix> inv(backup, sd, sd);
    inv.setZero();
    for (int col = 0; col < sd; ++col) {
      inv(col, col) = 1.0 / g(col, col);
      for (int r = col + 1; r < sd; ++r) {
        double v = 0.0;
        for (int q = col; q < r; ++q) v -= g(r, q) * inv(q, col);
        inv(r, col) = v / g(r, r);
      }
    }
    for (int r = 0; r < sd; ++r) {
      double v = 0.0;
      for (int c = 0; c < sd; ++c) {
        whiten[static_cast<std::size_t>(r) * us + static_cast<std::size_t>(c)] = static_cast<float>(inv(r, c));
        v += inv(r, c) * acc[c];
      }
      bias[r] = static_cast<float>(-v);
    }
  }
  pack_rows(whiten, sd, sd, us, 1, bias, whiten_rows, row_shape::lower);
  // Pass 2: l = ||L^-1 (x - mean)||^2.
  keys.restart();
  for (int i = 0; i < count; ++i) out[i] = 0.0f;
  for (int b = 0; b < count; b += tb) {
    const int cnt = std::min(tb, count - b);
    float* x = xs;
    if (stored)
      x = xs + static_cast<std::size_t>(b) * us;
    else
      sketch_block(b, cnt, x);
    project_sumsq(whiten_rows, x, cnt, us, out + b);
  }
  return ok_status();
}

// Exact leverage of tokens [first, first + count), centred over that range: out [count].
inline status exact(const stream_data& s, int first, int count, bool undo_rope, const char* who, workspace& ws,
                    float* out) noexcept {
  const int d = s.head_dim();
  const std::size_t ud = static_cast<std::size_t>(d);
  const int tb = std::min(256, product_block(d, sizeof(double)));
  double* mean = ws.alloc<double>(ud);
  double* xb = ws.alloc<double>(static_cast<std::size_t>(tb) * ud);
  double* c = ws.alloc<double>(ud * ud);
  double* l = ws.alloc<double>(ud * ud);
  double* resid = ws.alloc<double>(ud);
  double* a = ws.alloc<double>(ud);
  int* piv = ws.alloc<int>(ud);
  key_source keys;
  if (mean == nullptr || xb == nullptr || c == nullptr || l == nullptr || resid == nullptr || a == nullptr ||
      piv == nullptr || !keys.init(s, undo_rope, ws, tb))
    return exhausted(ws, who, s);
  for (std::size_t j = 0; j < ud; ++j) mean[j] = 0.0;
  for (int b = 0; b < count; b += tb) {
    const int cnt = std::min(tb, count - b);
    const float* k = keys.rows(first + b, cnt);
    for (int t = 0; t < cnt; ++t)
      for (std::size_t j = 0; j < ud; ++j) mean[j] += k[static_cast<std::size_t>(t) * ud + j];
  }
  for (std::size_t j = 0; j < ud; ++j) mean[j] /= count;
  Eigen::Map<dmatrix> cm(c, d, d);
  cm.setZero();
  keys.restart();
  for (int b = 0; b < count; b += tb) {
    const int cnt = std::min(tb, count - b);
    const float* k = keys.rows(first + b, cnt);
    for (int t = 0; t < cnt; ++t)
      for (std::size_t j = 0; j < ud; ++j)
        xb[static_cast<std::size_t>(t) * ud + j] = k[static_cast<std::size_t>(t) * ud + j] - mean[j];
    cm.selfadjointView<Eigen::Lower>().rankUpdate(Eigen::Map<const drow_matrix>(xb, cnt, d).transpose());
  }
  const int rank = pivoted_cholesky(c, d, 1e-9, piv, l, resid);
  keys.restart();
  for (int b = 0; b < count; b += tb) {
    const int cnt = std::min(tb, count - b);
    const float* k = keys.rows(first + b, cnt);
    for (int t = 0; t < cnt; ++t) {
      // forward substitution L a = k_c[J]
      double sum = 0.0;
      for (int r = 0; r < rank; ++r) {
        double v =
            static_cast<double>(k[static_cast<std::size_t>(t) * ud + static_cast<std::size_t>(piv[r])]) - mean[piv[r]];
        for (int q = 0; q < r; ++q) v -= l[static_cast<std::size_t>(q) * ud + static_cast<std::size_t>(r)] * a[q];
        a[r] = v / l[static_cast<std::size_t>(r) * ud + static_cast<std::size_t>(r)];
        sum += a[r] * a[r];
      }
      out[b + t] = static_cast<float>(sum);
    }
  }
  return ok_status();
}

}  // namespace lev
}  // namespace detail

namespace score {

struct leverage {
  static constexpr const char* name = "leverage";
  static constexpr stream_fields fields = stream_fields::keys;

  static constexpr int max_sketch_dim = 256;

  int sketch_dim = 48;     // s, the reference default; at most max_sketch_dim
  std::uint64_t seed = 0;  // Phi's seed
  bool exact = false;      // true: the exact leverage of the centred keys (no sketch)
  bool undo_rope = true;   // score the keys before RoPE, as the reference does

  status score(const stream_data& s, workspace& ws, float* out) const noexcept {
    KVC_RETURN_IF_ERROR(check(s, name));
    const int n = s.size();
    if (n == 0) return ok_status();
    workspace_scope scope(ws);
    return exact ? kvc::detail::lev::exact(s, 0, n, undo_rope, name, ws, out)
                 : kvc::detail::lev::sketched(s, 0, n, sketch_dim, seed, undo_rope, name, ws, out);
  }

  // The sketch matrix Phi [head_dim][sketch_dim] (row-major) this scorer uses.
  void sketch(int head_dim, float* phi) const noexcept {
    kvc::detail::lev::sketch_matrix(seed, head_dim, sketch_dim, phi);
  }

  // Also used by compactor, which names itself in the messages.
  status check(const stream_data& s, const char* who) const noexcept {
    if (sketch_dim < 1 || sketch_dim > max_sketch_dim)
      return status::error(status_code::invalid_argument, "%s: sketch_dim is %d, must be in [1, %d]", who, sketch_dim,
                           max_sketch_dim);
    if (s.shape == nullptr || (s.size() > 0 && (s.keys == nullptr || s.positions == nullptr)) ||
        (undo_rope && s.rope == nullptr))
      return status::error(status_code::invalid_argument,
                           "%s: stream (layer %d, kv_head %d) lacks its keys, positions or RoPE spec", who,
                           s.info.layer, s.info.kv_head);
    return ok_status();
  }
};

}  // namespace score

static_assert(is_scorer_v<score::leverage>, "kvc::score::leverage must satisfy the scorer interface");

KVC_NAMESPACE_END
