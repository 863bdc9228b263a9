// kvc/budget/adakv.hpp: Ada-KV's head-wise adaptive budget (Feng et al., "Ada-KV:
// Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM Inference",
// 2024, arXiv:2407.11550, Algorithm 1 with its safeguard, alpha = 0.2). Heads whose
// attention is concentrated need few tokens, heads whose attention is spread need many:
// instead of a top-k per head, each layer takes one top-B over the scores of all its heads,
// and each head keeps what it won there.
//
// Per layer, with h heads (streams) in scope, B the layer's total under the base budget
// (the sum of the base counts of its heads) and B*_i the number of head i's tokens among
// the B best of the whole layer (ranked by score; ties towards the more recent token, then
// the lower kv_head):
//   paper:  B_i = alpha B / h + (1 - alpha) B*_i                (the safeguard)
//   here:   s = floor(alpha B / h),  B_i = s + (B - h s) B*_i / B
// which is the paper's count when alpha B / h is whole, and in general guarantees every
// head s whole tokens while splitting the rest in proportion to B*_i. Whole tokens: the
// quotients are rounded down and the tokens left over go one each to the heads with the
// largest remainders (ties to the lower kv_head), so sum_i B_i = B exactly. A head with
// fewer than B_i tokens keeps them all, and what it cannot take goes, token by token, to
// the best tokens not yet kept in the layer's ranking among heads with room, so the layer
// total stays B whenever the layer holds B tokens.
//
//   adakv(base, alpha = 0.2)        base: kvc::budget::uniform, or kvc::budget::pyramid
//                                   (Ada-PyramidKV: the pyramid sets each layer's total)
//   adakv::keep_fraction(f, alpha), adakv::compression_ratio(c, alpha), adakv::tokens(k, alpha)
// alpha in [0, 1] (0: pure top-B, 1: uniform); out of range: invalid_budget. Needs the
// scores and a scratch workspace in the request (kvc::evict passes both): the layer's
// ranking takes 12 bytes per token of one layer.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "kvc/budget/budget.hpp"
#include "kvc/budget/pyramid.hpp"
#include "kvc/budget/uniform.hpp"
#include "kvc/workspace.hpp"

KVC_NAMESPACE_BEGIN
namespace budget {

class adakv {
 public:
  static constexpr double default_alpha = 0.2;

  // A uniform base is the pyramid with beta = 1 and no floor, whose counts are uniform's.
  constexpr explicit adakv(uniform base, double alpha = default_alpha) noexcept
      : base_(pyramid(base, 0, 1.0)), alpha_(alpha) {}
  constexpr explicit adakv(pyramid base, double alpha = default_alpha) noexcept : base_(base), alpha_(alpha) {}
  static constexpr adakv keep_fraction(double f, double alpha = default_alpha) noexcept {
    return adakv(uniform::keep_fraction(f), alpha);
  }
  static constexpr adakv compression_ratio(double c, double alpha = default_alpha) noexcept {
    return adakv(uniform::compression_ratio(c), alpha);
  }
  static constexpr adakv tokens(std::int64_t k, double alpha = default_alpha) noexcept {
    return adakv(uniform::tokens(k), alpha);
  }

  constexpr const pyramid& base() const noexcept { return base_; }
  constexpr double alpha() const noexcept { return alpha_; }

  status allocate(const budget_request& r, std::int32_t* keep) const noexcept {
    if (!(alpha_ >= 0.0 && alpha_ <= 1.0))
      return status::error(status_code::invalid_budget, "adakv: alpha %g outside [0, 1]", alpha_);
    KVC_RETURN_IF_ERROR(base_.allocate(r, keep));
    if (r.num_streams > 0 && r.scores == nullptr)
      return status::error(status_code::invalid_argument, "adakv: the budget request carries no scores");
    for (int first = 0; first < r.num_streams;) {
      int end = first + 1;
      while (end < r.num_streams && r.streams[end].layer == r.streams[first].layer) ++end;
      KVC_RETURN_IF_ERROR(allocate_layer(r, first, end - first, keep + first));
      first = end;
    }
    return ok_status();
  }

 private:
  struct entry {
    float score;
    std::int32_t index;  // token index in its stream
    std::int32_t head;   // stream, counted from the layer's first
  };

  // Best first: higher score, then the more recent token, then the lower head.
  static bool before(const entry& a, const entry& b) noexcept {
    if (a.score != b.score) return a.score > b.score;
    if (a.index != b.index) return a.index > b.index;
    return a.head < b.head;
  }

  // Streams [first, first + h) of one layer; keep holds their base counts on entry.
  status allocate_layer(const budget_request& r, int first, int h, std::int32_t* keep) const noexcept {
    std::int64_t total = 0, tokens = 0;
    for (int i = 0; i < h; ++i) {
      total += keep[i];
      tokens += r.streams[first + i].n_tokens;
    }
    if (h == 1 || total == 0) return ok_status();
    if (r.scratch == nullptr)
      return status::error(status_code::invalid_argument, "adakv: the budget request carries no scratch workspace");
    workspace_scope scope(*r.scratch);
    entry* e = r.scratch->alloc<entry>(static_cast<std::size_t>(tokens));
    std::int64_t* won = r.scratch->alloc<std::int64_t>(static_cast<std::size_t>(h));
    std::int64_t* rest = r.scratch->alloc<std::int64_t>(static_cast<std::size_t>(h));
    if (e == nullptr || won == nullptr || rest == nullptr)
      return status::error(status_code::workspace_exhausted,
                           "adakv: workspace of %zu bytes is full ranking layer %d (%lld tokens); raise "
                           "cache_config::workspace_bytes",
                           r.scratch->capacity(), r.streams[first].layer, static_cast<long long>(tokens));
    std::size_t at = 0;
    for (int i = 0; i < h; ++i) {
      won[i] = 0;
      const float* s = r.scores[first + i];
      for (std::int32_t t = 0; t < r.streams[first + i].n_tokens; ++t) e[at++] = entry{s[t], t, i};
    }
    // B*_i: each head's share of the layer's top-B.
    const std::ptrdiff_t n = static_cast<std::ptrdiff_t>(tokens), b = static_cast<std::ptrdiff_t>(total);
    std::nth_element(e, e + (b - 1), e + n, before);
    for (std::ptrdiff_t j = 0; j < b; ++j) ++won[e[j].head];

    // The safeguard, then the proportional split in whole tokens.
    const std::int64_t safe =
        static_cast<std::int64_t>(std::floor(alpha_ * static_cast<double>(total) / static_cast<double>(h) + 1e-9));
    const std::int64_t shared = total - static_cast<std::int64_t>(h) * safe;
    std::int64_t assigned = 0;
    for (int i = 0; i < h; ++i) {
      keep[i] = static_cast<std::int32_t>(safe + shared * won[i] / total);
      rest[i] = shared * won[i] % total;
      assigned += keep[i];
    }
    for (std::int64_t left = total - assigned; left > 0; --left) {
      int best = -1;
      for (int i = 0; i < h; ++i)
        if (rest[i] >= 0 && (best < 0 || rest[i] > rest[best])) best = i;
      ++keep[best];
      rest[best] = -1;
    }

    // Heads shorter than their share keep everything; the excess goes down the ranking.
    std::int64_t excess = 0;
    for (int i = 0; i < h; ++i) {
      const std::int32_t n_i = r.streams[first + i].n_tokens;
      if (keep[i] > n_i) {
        excess += keep[i] - n_i;
        keep[i] = n_i;
      }
    }
    if (excess > 0) {
      std::sort(e, e + n, before);
      std::int64_t* seen = won;  // reused: tokens of each head passed so far in the ranking
      std::fill(seen, seen + h, std::int64_t{0});
      for (std::ptrdiff_t j = 0; j < n && excess > 0; ++j) {
        const int i = e[j].head;
        if (seen[i] == keep[i] && keep[i] < r.streams[first + i].n_tokens) {
          ++keep[i];
          --excess;
        }
        ++seen[i];
      }
    }
    return ok_status();
  }

  pyramid base_;
  double alpha_;
};

}  // namespace budget
KVC_NAMESPACE_END
