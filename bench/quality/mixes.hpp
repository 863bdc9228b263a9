// bench/quality/mixes.hpp: the codec rows of the quality evaluation. Eviction alone,
// quantization alone and both together, compared at equal bytes (README.md, "Codecs and
// eviction at equal bytes").
//
// Bytes are what the cache's pages take, as stats() counts them (keys, values, the codec's
// scales and zero points, positions and log-weights, each region rounded to 64 bytes). The
// unit is the base sequence in an f16 cache: every token kept, two bytes an element. A byte
// budget is a fraction of that unit, and each mix meets it its own way:
//   eviction alone      f16 pages, evict(scorer, byte_cap(budget)): keeps about `budget`
//                       of the tokens;
//   quantization alone  the largest codec whose pages fit the budget with every token kept;
//   both                a codec larger than the budget, evicting with byte_cap(budget).
// byte_cap stops only when no stream can take one more token, so within one page of the
// budget: every row of a budget holds the same bytes to that granularity, and never more
// (both are checked).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <kvc/codecs/f16.hpp>
#include <kvc/codecs/quantized.hpp>

namespace quality {

template <class Codec>
struct codec_line {
  using type = Codec;  // keys and values: paged_kv_cache<Codec>
};

// The page codecs compared, largest pages first. The first is the unit of every byte
// budget and the codec eviction alone runs on; each KIVI codec quantizes keys per channel
// over a page and values per token in groups of 32 channels.
inline auto codec_table() {
  return std::make_tuple(codec_line<kvc::codec::f16>{}, codec_line<kvc::codec::kivi<8>>{},
                         codec_line<kvc::codec::kivi<4>>{}, codec_line<kvc::codec::kivi<2>>{});
}

// The scorers that evict in the codec rows: the oracle (what the best eviction could do at
// that budget, a reference), SnapKV (the usual observation-based choice) and Compactor (the
// least error of the policy rows on the synthetic suites).
inline std::vector<std::string> default_mix_scorers() { return {"oracle", "snapkv", "compactor"}; }

// One codec row: a budget in bytes, a codec (index in codec_table()), and the scorer that
// evicts down to the budget, or an empty scorer when the codec fits it with every token.
struct mix {
  std::size_t budget = 0;
  int codec = 0;
  std::string scorer;
};

// The rows at each budget, in (budget, codec, scorer) order. full[c] holds the bytes of
// codec c's cache with every token, largest first. At a budget, every codec larger than it
// evicts with every scorer, and the largest codec that fits it runs alone (smaller ones
// would only spend fewer bytes).
inline std::vector<mix> plan_mixes(const std::vector<std::size_t>& budgets, const std::vector<std::size_t>& full,
                                   const std::vector<std::string>& scorers) {
  std::vector<mix> out;
  for (std::size_t b : budgets)
    for (int c = 0; c < static_cast<int>(full.size()); ++c) {
      if (full[static_cast<std::size_t>(c)] <= b) {
        out.push_back({b, c, {}});
        break;
      }
      for (const std::string& s : scorers) out.push_back({b, c, s});
    }
  return out;
}

namespace detail {

// A bound on |x~ - x| for x in a quantization group [lo, hi] with range_error re
// (kvc/codecs/quantized.hpp): half a step of the binary16 scale, which min-max rounding
// leaves at most 2^-8 above (hi - lo) / (2^B - 1), plus the binary16 rounding of the zero
// point (2^-11 of the group's magnitude, carried into the step) and of float arithmetic.
inline double group_error(double lo, double hi, double re) noexcept {
  const double magnitude = std::max(std::fabs(lo), std::fabs(hi));
  return re * (hi - lo) * (1.0 + 1.0 / 256.0) + 6e-4 * magnitude + 2e-7;
}

template <class T, class = void>
struct has_group : std::false_type {};
template <class T>
struct has_group<T, std::void_t<decltype(T::group)>> : std::true_type {};

}  // namespace detail

// e[t * d + c] >= |x~ - x| for element c of row t of the n rows Codec stores (row t at
// x + t * stride): the first `sealed` rows lie in sealed pages of page_tokens rows, the rest
// in the open page, which is float and exact. Row codecs follow their per-element contract
// (relative_error |x| + absolute_error); KIVI keys have one group per channel and page,
// KIVI values one per token and `group` channels.
template <class Codec>
void element_error_bounds(const float* x, std::size_t stride, int n, int sealed, int d, int page_tokens, float* e) {
  const auto at = [&](int t, int c) -> double { return x[static_cast<std::size_t>(t) * stride + c]; };
  std::fill(e, e + static_cast<std::size_t>(n) * d, 0.0f);
  if constexpr (Codec::identity) {
    (void)at, (void)sealed, (void)page_tokens;
  } else if constexpr (Codec::absolute_error < std::numeric_limits<double>::infinity()) {
    (void)page_tokens;
    for (int t = 0; t < sealed; ++t)
      for (int c = 0; c < d; ++c)
        e[static_cast<std::size_t>(t) * d + c] =
            static_cast<float>(Codec::relative_error * std::fabs(at(t, c)) + Codec::absolute_error);
  } else if constexpr (!Codec::token_granular) {
    for (int t0 = 0; t0 < sealed; t0 += page_tokens)
      for (int c = 0; c < d; ++c) {
        double lo = at(t0, c), hi = lo;
        for (int t = t0; t < t0 + page_tokens; ++t) lo = std::min(lo, at(t, c)), hi = std::max(hi, at(t, c));
        const float b = static_cast<float>(detail::group_error(lo, hi, Codec::range_error));
        for (int t = t0; t < t0 + page_tokens; ++t) e[static_cast<std::size_t>(t) * d + c] = b;
      }
  } else {
    static_assert(detail::has_group<Codec>::value, "element_error_bounds: no error model for this codec");
    (void)page_tokens;
    for (int t = 0; t < sealed; ++t)
      for (int c0 = 0; c0 < d; c0 += Codec::group) {
        const int c1 = std::min(d, c0 + Codec::group);
        double lo = at(t, c0), hi = lo;
        for (int c = c0; c < c1; ++c) lo = std::min(lo, at(t, c)), hi = std::max(hi, at(t, c));
        const float b = static_cast<float>(detail::group_error(lo, hi, Codec::range_error));
        for (int c = c0; c < c1; ++c) e[static_cast<std::size_t>(t) * d + c] = b;
      }
  }
}

}  // namespace quality
