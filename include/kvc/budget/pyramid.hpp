// kvc/budget/pyramid.hpp: PyramidKV's layer schedule (Cai et al., "PyramidKV: Dynamic KV
// Cache Compression based on Pyramidal Information Funneling", 2024, arXiv:2406.02069,
// Sec. 4, the layer budget allocation; beta = 20 as in the paper and its reference code).
// Attention funnels from broad in low layers to a few tokens in high ones, so low layers
// keep more tokens and high layers fewer, in an arithmetic sequence over the layers whose
// mean is the uniform budget.
//
// The paper, for a total budget T over m layers: the top layer keeps T / (beta m), the
// bottom layer 2T / m minus that, and the layers between follow the arithmetic sequence.
// Every layer also keeps the recent window, outside T. Here, for one stream of n
// retained tokens in layer l of L, with k what the base (uniform) budget keeps and f the
// floor (the sink and window tokens every layer keeps), the shared part is e = k - f and
//   top      k_top    = f + e / beta
//   bottom   k_bottom = 2k - k_top               (= f + 2e - e / beta)
//   if k_bottom > n:  k_bottom = n,  k_top = 2k - n      (the bottom layer keeps all)
//   layer l  k_l      = k_bottom - (k_bottom - k_top) l / (L - 1)
// so that the mean of k_l over the layers is k, k_l never increases with l, and
// f <= k_top <= k_l <= k_bottom <= n. When k <= f (a budget at or under the floor) or
// L = 1, every layer keeps k.
//
// Whole tokens: each k_l is rounded down and the L k - sum_l floor(k_l) tokens left over
// go one each to the layers with the largest fractional parts (ties to the lower layer).
// The counts then sum over the layers to exactly L k, lie within one token of k_l, never
// increase with the layer and never fall below f. With every stream of the sequence the
// same length, the mean over layers of a head's counts is exactly the uniform count.
// Streams of different lengths each get the schedule computed for their own n and k.
//
//   pyramid(base, floor = 0, beta = 20)        base: a kvc::budget::uniform
//   pyramid::keep_fraction(f, floor, beta)     the same with uniform::keep_fraction(f)
//   pyramid::compression_ratio(c, floor, beta) ... uniform::compression_ratio(c)
//   pyramid::tokens(k, floor, beta)            ... uniform::tokens(k)
// floor >= 0 and beta >= 1 (beta = 1 is the uniform budget); out of range: invalid_budget.
#pragma once

#include <cmath>
#include <cstdint>

#include "kvc/budget/budget.hpp"
#include "kvc/budget/uniform.hpp"

KVC_NAMESPACE_BEGIN
namespace budget {

class pyramid {
 public:
  static constexpr double default_beta = 20.0;

  constexpr explicit pyramid(uniform base, int floor_tokens = 0, double beta = default_beta) noexcept
      : base_(base), floor_(floor_tokens), beta_(beta) {}
  static constexpr pyramid keep_fraction(double f, int floor_tokens = 0, double beta = default_beta) noexcept {
    return pyramid(uniform::keep_fraction(f), floor_tokens, beta);
  }
  static constexpr pyramid compression_ratio(double c, int floor_tokens = 0, double beta = default_beta) noexcept {
    return pyramid(uniform::compression_ratio(c), floor_tokens, beta);
  }
  static constexpr pyramid tokens(std::int64_t k, int floor_tokens = 0, double beta = default_beta) noexcept {
    return pyramid(uniform::tokens(k), floor_tokens, beta);
  }

  constexpr const uniform& base() const noexcept { return base_; }
  constexpr int floor_tokens() const noexcept { return floor_; }
  constexpr double beta() const noexcept { return beta_; }

  status allocate(const budget_request& r, std::int32_t* keep) const noexcept {
    KVC_RETURN_IF_ERROR(check());
    if (r.num_streams > 0 && r.shape == nullptr)
      return status::error(status_code::invalid_argument, "pyramid: the budget request carries no model shape");
    KVC_RETURN_IF_ERROR(base_.allocate(r, keep));
    for (int i = 0; i < r.num_streams; ++i)
      keep[i] = count(r.streams[i].layer, r.shape->num_layers, r.streams[i].n_tokens, keep[i], floor_, beta_);
    return ok_status();
  }

  status check() const noexcept {
    if (floor_ < 0) return status::error(status_code::invalid_budget, "pyramid: floor %d is negative", floor_);
    if (!(beta_ >= 1.0) || !std::isfinite(beta_))
      return status::error(status_code::invalid_budget, "pyramid: beta %g must be finite and >= 1", beta_);
    return ok_status();
  }

  // The whole-token count of layer `layer` of `num_layers` for a stream of n tokens whose
  // base budget keeps k (0 <= k <= n), per the schedule above.
  static std::int32_t count(int layer, int num_layers, std::int32_t n, std::int32_t k, int floor_tokens,
                            double beta) noexcept {
    if (num_layers <= 1 || k <= floor_tokens) return k;
    const double x = value(layer, num_layers, n, k, floor_tokens, beta);
    const double fx = std::floor(x);
    std::int64_t sum_floor = 0;
    int ahead = 0;  // layers that get a left-over token before this one
    for (int l = 0; l < num_layers; ++l) {
      const double y = value(l, num_layers, n, k, floor_tokens, beta);
      const double fy = std::floor(y);
      sum_floor += static_cast<std::int64_t>(fy);
      if (l != layer && ((y - fy) > (x - fx) || ((y - fy) == (x - fx) && l < layer))) ++ahead;
    }
    const std::int64_t left = static_cast<std::int64_t>(num_layers) * k - sum_floor;
    const std::int64_t c = static_cast<std::int64_t>(fx) + (ahead < left ? 1 : 0);
    return static_cast<std::int32_t>(c < n ? c : n);
  }

  // The real-valued k_l of the schedule (before rounding), within [floor, n].
  static double value(int layer, int num_layers, std::int32_t n, std::int32_t k, int floor_tokens,
                      double beta) noexcept {
    if (num_layers <= 1 || k <= floor_tokens) return static_cast<double>(k);
    const double f = static_cast<double>(floor_tokens);
    const double e = static_cast<double>(k) - f;
    double top = f + e / beta;
    double bottom = 2.0 * static_cast<double>(k) - top;
    if (bottom > static_cast<double>(n)) {
      bottom = static_cast<double>(n);
      top = 2.0 * static_cast<double>(k) - static_cast<double>(n);
    }
    double v = bottom - (bottom - top) * static_cast<double>(layer) / static_cast<double>(num_layers - 1);
    // Rounding noise must not move a whole number across an integer boundary.
    const double whole = std::round(v);
    if (std::fabs(v - whole) < 1e-9) v = whole;
    if (v < f) v = f;
    if (v > static_cast<double>(n)) v = static_cast<double>(n);
    return v;
  }

 private:
  uniform base_;
  int floor_;
  double beta_;
};

}  // namespace budget
KVC_NAMESPACE_END
