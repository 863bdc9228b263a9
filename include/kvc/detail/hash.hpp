// kvc/detail/hash.hpp: a stateless 64-bit mixer for seeded, order-independent choices.
#pragma once

#include <cstdint>

#include "kvc/version.hpp"

KVC_NAMESPACE_BEGIN
namespace detail {

// SplitMix64 finaliser (Steele, Lea, Flood, "Fast splittable pseudorandom number
// generators", OOPSLA 2014).
constexpr std::uint64_t mix64(std::uint64_t z) noexcept {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace detail
KVC_NAMESPACE_END
