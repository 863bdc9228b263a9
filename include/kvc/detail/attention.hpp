// kvc/detail/attention.hpp: the tile kernel of attend(): online softmax over tiles
// of at most attn_tile tokens for a block of at most attn_rows query rows.
//
// A "row" is one (query, query head) pair of a KV head's group. For each row the kernel
// keeps the running maximum m, the running denominator l and the unnormalised output
// acc (in the caller's output buffer); a tile updates them as in FlashAttention:
//   m' = max(m, max_t s_t),  l' = l e^(m - m') + sum_t e^(s_t - m'),
//   acc' = acc e^(m - m') + sum_t e^(s_t - m') v_t,
// with s_t = q.k_t / sqrt(d) + log_weight_t, and s_t = -inf for position_t > position_q.
// Nothing here grows with the context.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "kvc/version.hpp"

KVC_NAMESPACE_BEGIN
namespace detail {

inline constexpr int attn_tile = 16;  // tokens per tile
inline constexpr int attn_rows = 64;  // query rows per pass over a stream

// e^x for x <= 0 (including -inf, which gives exactly 0). Relative error below 2e-7 on
// [-87, 0]; e^x for x < -87 (below 1.7e-38) is returned as 0. Branch-free so that loops
// over it vectorise.
inline float exp_nonpositive(float x) noexcept {
  const float xc = x < -87.0f ? -87.0f : x;
  const float t = xc * 1.44269504088896341f;
  const int n = static_cast<int>(t - 0.5f);  // round to nearest for t <= 0
  const float nf = static_cast<float>(n);
  // r = x - n ln2, in two parts for accuracy; |r| <= ln2 / 2.
  const float r = (xc - nf * 0.693359375f) + nf * 2.12194440e-4f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const std::uint32_t bits = static_cast<std::uint32_t>(n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.0f ? 0.0f : p * scale;
}

inline float dot(const float* a, const float* b, int n) noexcept {
  float acc[16] = {};
  int i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
  float tail = 0.0f;
  for (; i < n; ++i) tail += a[i] * b[i];
  for (int w = 8; w > 0; w >>= 1)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0] + tail;
}

// Running state of one block of rows.
struct row_block {
  int n = 0;                  // rows in use
  const float* q[attn_rows];  // [n][head_dim]
  float* acc[attn_rows];      // [n][head_dim], the caller's output rows
  std::int32_t q_pos[attn_rows];
  float m[attn_rows];
  float l[attn_rows];
  std::int32_t min_pos, max_pos;  // over q_pos

  void reset(int head_dim) noexcept {
    min_pos = std::numeric_limits<std::int32_t>::max();
    max_pos = std::numeric_limits<std::int32_t>::min();
    for (int r = 0; r < n; ++r) {
      m[r] = -std::numeric_limits<float>::infinity();
      l[r] = 0.0f;
      std::memset(acc[r], 0, sizeof(float) * static_cast<std::size_t>(head_dim));
      if (q_pos[r] < min_pos) min_pos = q_pos[r];
      if (q_pos[r] > max_pos) max_pos = q_pos[r];
    }
  }

  // acc /= l; rows that saw no visible token get zeros.
  void finish(int head_dim) noexcept {
    for (int r = 0; r < n; ++r) {
      const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
      for (int k = 0; k < head_dim; ++k) acc[r][k] *= inv;
    }
  }
};

// One tile of T tokens: keys and values [T][head_dim] float, positions and log-weights [T].
inline void attend_tile(row_block& b, const float* keys, const float* values, const std::int32_t* pos,
                        const float* log_w, int T, int head_dim, float scale) noexcept {
  const bool unmasked = pos[T - 1] <= b.min_pos;
  float s[attn_tile];
  for (int r = 0; r < b.n; ++r) {
    const float* q = b.q[r];
    float mx = -std::numeric_limits<float>::infinity();
    if (unmasked) {
      for (int t = 0; t < T; ++t) {
        s[t] = dot(q, keys + static_cast<std::size_t>(t) * head_dim, head_dim) * scale + log_w[t];
        mx = s[t] > mx ? s[t] : mx;
      }
    } else {
      const std::int32_t qp = b.q_pos[r];
      for (int t = 0; t < T; ++t) {
        s[t] = pos[t] <= qp ? dot(q, keys + static_cast<std::size_t>(t) * head_dim, head_dim) * scale + log_w[t]
                            : -std::numeric_limits<float>::infinity();
        mx = s[t] > mx ? s[t] : mx;
      }
    }
    if (mx == -std::numeric_limits<float>::infinity()) continue;  // nothing visible yet
    const float m_new = mx > b.m[r] ? mx : b.m[r];
    const float corr = exp_nonpositive(b.m[r] - m_new);
    float sum = 0.0f;
    for (int t = 0; t < T; ++t) {
      s[t] = exp_nonpositive(s[t] - m_new);
      sum += s[t];
    }
    b.l[r] = b.l[r] * corr + sum;
    b.m[r] = m_new;
    float* acc = b.acc[r];
    // acc = acc * corr + sum_t p_t v_t, 16 lanes at a time so the lanes stay in registers.
    int k = 0;
    for (; k + 16 <= head_dim; k += 16) {
      float a[16];
      for (int j = 0; j < 16; ++j) a[j] = acc[k + j] * corr;
      for (int t = 0; t < T; ++t) {
        const float p = s[t];
        const float* v = values + static_cast<std::size_t>(t) * head_dim + k;
        for (int j = 0; j < 16; ++j) a[j] += p * v[j];
      }
      for (int j = 0; j < 16; ++j) acc[k + j] = a[j];
    }
    for (; k < head_dim; ++k) {
      float a = acc[k] * corr;
      for (int t = 0; t < T; ++t) a += s[t] * values[static_cast<std::size_t>(t) * head_dim + k];
      acc[k] = a;
    }
  }
}

}  // namespace detail
KVC_NAMESPACE_END
