// kvc/rope.hpp: rotary position embedding (Su et al., "RoFormer: Enhanced Transformer with
// Rotary Position Embedding", 2021, eq. 34), as cache_config::rope describes it.
//
// Pair i (0 <= i < rotary_dims / 2) of a head vector turns by the angle
//   position * theta^(-2i / rotary_dims);
// the pair is (i, i + rotary_dims / 2) for rope_layout::half_split and (2i, 2i + 1) for
// rope_layout::interleaved. Dimensions past rotary_dims do not turn. Angles are computed in
// double precision, so positions in the millions stay accurate.
#pragma once

#include <cmath>

#include "kvc/config.hpp"
#include "kvc/version.hpp"

KVC_NAMESPACE_BEGIN

// The two dimensions of rotated pair i.
inline void rope_pair(const rope_spec& r, int head_dim, int i, int& a, int& b) noexcept {
  const int rd = r.dims(head_dim);
  if (r.layout == rope_layout::half_split) {
    a = i;
    b = i + rd / 2;
  } else {
    a = 2 * i;
    b = 2 * i + 1;
  }
}

// Angular frequency of pair i.
inline double rope_frequency(const rope_spec& r, int head_dim, int i) noexcept {
  return std::pow(r.theta, -2.0 * static_cast<double>(i) / static_cast<double>(r.dims(head_dim)));
}

// Rotates x [head_dim] in place by `position` (a negative position undoes a rotation).
inline void rope_rotate(const rope_spec& r, int head_dim, double position, float* x) noexcept {
  const int pairs = r.dims(head_dim) / 2;
  for (int i = 0; i < pairs; ++i) {
    int a, b;
    rope_pair(r, head_dim, i, a, b);
    const double angle = position * rope_frequency(r, head_dim, i);
    const double c = std::cos(angle), s = std::sin(angle);
    const double xa = x[a], xb = x[b];
    x[a] = static_cast<float>(xa * c - xb * s);
    x[b] = static_cast<float>(xa * s + xb * c);
  }
}

KVC_NAMESPACE_END
