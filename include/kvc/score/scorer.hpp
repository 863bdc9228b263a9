// kvc/score/scorer.hpp: the scorer interface. A scorer assigns one score per retained
// token of a stream; higher means more worth keeping. It never allocates: scratch comes
// from the workspace it is given.
//
//   static constexpr const char* name;          printable name
//   static constexpr stream_fields fields;      what compress() must load (keys, values)
//   status score(const stream_data& s, workspace& ws, float* scores) const;
//                                               scores: [s.size()], finite or +-inf, no NaN
//
// GQA: a scorer that uses queries reduces its per-query-head scores over the KV head's
// group with group_reduce (mean by default).
#pragma once

#include <type_traits>
#include <utility>

#include "kvc/status.hpp"
#include "kvc/stream.hpp"
#include "kvc/version.hpp"
#include "kvc/workspace.hpp"

KVC_NAMESPACE_BEGIN
namespace score {

enum class group_reduce { mean, max };

}  // namespace score

namespace detail {

template <class T, class = void>
struct is_scorer_impl : std::false_type {};

template <class T>
struct is_scorer_impl<
    T, std::void_t<decltype(T::name), decltype(T::fields),
                   decltype(std::declval<const T&>().score(std::declval<const stream_data&>(),
                                                           std::declval<workspace&>(), static_cast<float*>(nullptr)))>>
    : std::bool_constant<std::is_same_v<decltype(std::declval<const T&>().score(std::declval<const stream_data&>(),
                                                                                std::declval<workspace&>(),
                                                                                static_cast<float*>(nullptr))),
                                        status> &&
                         std::is_convertible_v<decltype(T::fields), stream_fields>> {};

}  // namespace detail

template <class T>
inline constexpr bool is_scorer_v = detail::is_scorer_impl<T>::value;

KVC_NAMESPACE_END
