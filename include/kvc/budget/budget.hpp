// kvc/budget/budget.hpp: the budget interface. A budget decides how many tokens each
// stream in scope keeps, seeing every stream's size (and scores, for budgets that
// allocate across heads) at once. Sinks and recent windows count inside the budget.
//
//   status allocate(const budget_request& r, std::int32_t* keep) const;
//        keep: [r.num_streams], each in [0, r.streams[i].n_tokens]
//
// An out-of-range parameter is reported here, as status_code::invalid_budget.
//
// Streams arrive in (layer, kv_head) order. A stream keeping k tokens keeps its k best by
// (score, then the more recent index): the order of detail::ranks_before, which
// kvc::evict applies, so a budget that sees scores knows exactly which tokens each count
// keeps.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "kvc/config.hpp"
#include "kvc/status.hpp"
#include "kvc/stream.hpp"
#include "kvc/version.hpp"
#include "kvc/workspace.hpp"

KVC_NAMESPACE_BEGIN

struct budget_request {
  const model_shape* shape = nullptr;
  int num_streams = 0;
  const stream_info* streams = nullptr;  // [num_streams]
  const float* const* scores = nullptr;  // [num_streams][streams[i].n_tokens]
  // Scratch for budgets that rank tokens across streams; null when the caller has none.
  workspace* scratch = nullptr;
  // Where each stream's tokens lie, for budgets that count bytes; sealed_tokens is null
  // when the caller does not know. A stream's first sealed_tokens[i] tokens are in sealed
  // pages, the rest in its open page. After compaction a stream that keeps s of its sealed
  // tokens and o of its open ones holds ceil(s / page_tokens) sealed pages, plus its open
  // page when o > 0 (see paged_kv_cache::compress).
  const std::int32_t* sealed_tokens = nullptr;  // [num_streams]
  int page_tokens = 0;
  std::size_t open_page_bytes = 0, sealed_page_bytes = 0;
};

namespace detail {

// The keep order within a stream: a higher score first, and among equal scores the more
// recent (higher) index. A strict total order, so the k kept tokens are unique and the
// kept set for k is contained in the kept set for k + 1.
inline bool ranks_before(const float* scores, std::int32_t a, std::int32_t b) noexcept {
  return scores[a] > scores[b] || (scores[a] == scores[b] && a > b);
}

template <class T, class = void>
struct is_budget_impl : std::false_type {};

template <class T>
struct is_budget_impl<T, std::void_t<decltype(std::declval<const T&>().allocate(std::declval<const budget_request&>(),
                                                                                static_cast<std::int32_t*>(nullptr)))>>
    : std::is_same<decltype(std::declval<const T&>().allocate(std::declval<const budget_request&>(),
                                                              static_cast<std::int32_t*>(nullptr))),
                   status> {};

}  // namespace detail

template <class T>
inline constexpr bool is_budget_v = detail::is_budget_impl<T>::value;

KVC_NAMESPACE_END
