// kvc/budget/budget.hpp: the budget interface. A budget decides how many tokens each
// stream in scope keeps, seeing every stream's size (and scores, for budgets that
// allocate across heads) at once. Sinks and recent windows count inside the budget.
//
//   status allocate(const budget_request& r, std::int32_t* keep) const;
//        keep: [r.num_streams], each in [0, r.streams[i].n_tokens]
//
// An out-of-range parameter is reported here, as status_code::invalid_budget.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

#include "kvc/config.hpp"
#include "kvc/status.hpp"
#include "kvc/stream.hpp"
#include "kvc/version.hpp"

KVC_NAMESPACE_BEGIN

struct budget_request {
  const model_shape* shape = nullptr;
  int num_streams = 0;
  const stream_info* streams = nullptr;  // [num_streams]
  const float* const* scores = nullptr;  // [num_streams][streams[i].n_tokens]
};

namespace detail {

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
