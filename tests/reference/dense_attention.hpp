// tests/reference/dense_attention.hpp: dense softmax attention, written out plainly in
// double precision. Shares no code with the library.
//
// For query row (i, h) with position p_i, over the tokens t of KV head h / group whose
// position is <= p_i:
//   s_t = q . k_t / sqrt(d) + w_t,   a_t = exp(s_t - max s) / sum exp(s - max s),
//   out = sum_t a_t v_t,
// and out = 0 when the query sees no token.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

namespace kvc_ref {

// One KV head's tokens, in any order.
struct kv_stream {
  std::vector<double> keys;             // [n][d]
  std::vector<double> values;           // [n][d]
  std::vector<std::int32_t> positions;  // [n]
  std::vector<double> log_weights;      // [n]

  std::size_t size() const { return positions.size(); }
};

// q: [n_queries][num_q_heads][d]; q_positions: [n_queries]; kv: [num_kv_heads].
// Returns [n_queries][num_q_heads][d].
inline std::vector<double> dense_attention(const std::vector<double>& q, const std::vector<std::int32_t>& q_positions,
                                           int num_q_heads, int d, const std::vector<kv_stream>& kv) {
  const int n_queries = static_cast<int>(q_positions.size());
  const int group = num_q_heads / static_cast<int>(kv.size());
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<double> out(static_cast<std::size_t>(n_queries) * num_q_heads * d, 0.0);
  for (int i = 0; i < n_queries; ++i) {
    for (int h = 0; h < num_q_heads; ++h) {
      const kv_stream& s = kv[static_cast<std::size_t>(h / group)];
      const double* qr = &q[(static_cast<std::size_t>(i) * num_q_heads + h) * d];
      double* o = &out[(static_cast<std::size_t>(i) * num_q_heads + h) * d];
      std::vector<double> logit(s.size(), 0.0);
      std::vector<bool> visible(s.size(), false);
      double mx = -std::numeric_limits<double>::infinity();
      for (std::size_t t = 0; t < s.size(); ++t) {
        if (s.positions[t] > q_positions[static_cast<std::size_t>(i)]) continue;
        visible[t] = true;
        double dot = 0.0;
        for (int e = 0; e < d; ++e) dot += qr[e] * s.keys[t * d + e];
        logit[t] = dot * scale + s.log_weights[t];
        if (logit[t] > mx) mx = logit[t];
      }
      double denom = 0.0;
      for (std::size_t t = 0; t < s.size(); ++t)
        if (visible[t]) denom += std::exp(logit[t] - mx);
      if (denom == 0.0) continue;  // nothing visible: zero output
      for (std::size_t t = 0; t < s.size(); ++t) {
        if (!visible[t]) continue;
        const double a = std::exp(logit[t] - mx) / denom;
        for (int e = 0; e < d; ++e) o[e] += a * s.values[t * d + e];
      }
    }
  }
  return out;
}

}  // namespace kvc_ref
