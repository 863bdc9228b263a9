// kvc/policies/policy.hpp: the policy interface that paged_kv_cache::compress calls.
//
// A policy decides, for every stream in scope, which retained tokens to keep. It never
// touches pages: compress() hands it a context, the policy reads streams through it
// and writes keep flags, and the container then applies every decision or none.
//
//   template <class Context> kvc::status plan(Context& ctx);
//
// The context (paged_kv_cache<...>::compress_context) offers
//   shape()                         the model shape
//   num_streams()                   streams in scope, in (layer, kv_head) order
//   info(i)                         layer, kv_head and retained token count of stream i
//   load(i, fields, out)            stream i's positions, log-weights and the requested
//                                   keys / values as float, in scratch memory
//   keep(i)                         stream i's keep flags [n_tokens], all 1 on entry
//   scratch()                       the workspace, for the policy's own buffers
// A failed status from plan() aborts compress() with the cache unchanged.
#pragma once

#include <type_traits>
#include <utility>

#include "kvc/status.hpp"
#include "kvc/version.hpp"

KVC_NAMESPACE_BEGIN
namespace detail {

template <class P, class Ctx, class = void>
struct is_policy_impl : std::false_type {};

template <class P, class Ctx>
struct is_policy_impl<P, Ctx, std::void_t<decltype(std::declval<P&>().plan(std::declval<Ctx&>()))>>
    : std::is_same<decltype(std::declval<P&>().plan(std::declval<Ctx&>())), status> {};

}  // namespace detail

// True when P has `status plan(Ctx&)`.
template <class P, class Ctx>
inline constexpr bool is_policy_for_v = detail::is_policy_impl<P, Ctx>::value;

KVC_NAMESPACE_END
