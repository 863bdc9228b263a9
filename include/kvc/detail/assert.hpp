// kvc/detail/assert.hpp: KVC_ASSERT, for broken internal invariants only.
//
// Conditions caused by the caller's input are reported with kvc::status, never with
// an assert. Define KVC_ASSERT before including kvc to route failures elsewhere
// (for example into a test framework); define KVC_NO_ASSERT to compile them out.
#pragma once

#include <cstdio>
#include <cstdlib>

#ifndef KVC_ASSERT
#ifdef KVC_NO_ASSERT
#define KVC_ASSERT(cond) static_cast<void>(0)
#else
#define KVC_ASSERT(cond)                                                                                      \
  ((cond) ? static_cast<void>(0)                                                                              \
          : (std::fprintf(stderr, "kvc: internal invariant failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__), \
             std::abort()))
#endif
#endif
