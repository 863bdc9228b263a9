// tests/gear_helpers.hpp: what the tests of the GEAR correction share (test_gear.cpp,
// test_gear_codec.cpp): Frobenius distances in double and a fit into fresh buffers.
#pragma once

#include <cmath>
#include <cstddef>
#include <vector>

#include <kvc/codecs/detail/gear.hpp>

namespace gear_test {

// |a - b|_F over n floats, in double.
inline double frob_diff(const float* a, const float* b, std::size_t n) {
  double acc = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    const double t = static_cast<double>(a[i]) - b[i];
    acc += t * t;
  }
  return std::sqrt(acc);
}

inline double frob_diff(const std::vector<float>& a, const std::vector<float>& b) {
  return frob_diff(a.data(), b.data(), a.size());
}

// Fits the correction of e [n][d] (at least n * d floats); returns the stored bytes.
inline std::vector<std::byte> fit(const std::vector<float>& e, int n, int d, const kvc::detail::gear_params& p) {
  std::vector<float> scratch(kvc::detail::gear_scratch_floats(n, d, p));
  std::vector<std::byte> out(kvc::detail::gear_bytes(n, d, p));
  kvc::detail::gear_fit(e.data(), n, d, p, scratch.data(), out.data());
  return out;
}

}  // namespace gear_test
