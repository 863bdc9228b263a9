// kvc/score/keydiff.hpp: KeyDiff (Park et al., "KeyDiff: Key Similarity-Based KV Cache
// Eviction for Long-Context LLM Inference in Resource-Constrained Environments", 2025,
// arXiv:2504.15364, Sec. 3, the anchor-based score): keys that point away from the
// stream's mean key direction attract attention, so
//   mu  = (1/n) sum_j k_j / ||k_j||          (the anchor: mean of the normalised keys)
//   s_i = -cos(k_i, mu) = -(k_i . mu) / (||k_i|| ||mu||)
// and the keys most similar to the anchor go first. As in the paper and in kvpress's
// KeyDiffPress, the anchor is taken over every retained key of the stream (post-RoPE, as
// stored). A zero key has no direction: it adds nothing to the anchor and scores 0 (as
// torch's cosine_similarity gives); if the anchor itself is zero every token scores 0.
//
// Two passes over the keys (the anchor needs all of them before any cosine): norms and the
// anchor, then the cosines, four keys at a time, with prefetch hints 64 keys ahead. Norms
// the cache keeps (cache_config::observe.key_norms, of the keys as appended) are used
// instead of recomputing them. The
// anchor is summed in float per block of 256 tokens and across blocks in double. Scratch: n
// floats and 4 * head_dim floats. The keys are read twice, n * head_dim * 8 bytes per call:
// at long contexts that bounds the speed by the memory bandwidth (one pass cannot do: every
// cosine needs the finished anchor).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>

#include "kvc/detail/attention.hpp"
#include "kvc/score/scorer.hpp"

KVC_NAMESPACE_BEGIN
namespace detail {

#if KVC_ATTEND_AVX2
// k . a over the whole blocks of eight elements (e < d / 8 * 8), in two accumulators.
inline __m256 dot8(const float* k, const float* a, int d) noexcept {
  __m256 x = _mm256_setzero_ps(), y = x;
  int e = 0;
  for (; e + 16 <= d; e += 16) {
    x = _mm256_fmadd_ps(_mm256_loadu_ps(k + e), _mm256_loadu_ps(a + e), x);
    y = _mm256_fmadd_ps(_mm256_loadu_ps(k + e + 8), _mm256_loadu_ps(a + e + 8), y);
  }
  if (e + 8 <= d) x = _mm256_fmadd_ps(_mm256_loadu_ps(k + e), _mm256_loadu_ps(a + e), x);
  return _mm256_add_ps(x, y);
}
#endif

// out[t] = k[t] . a[t] for four pairs of rows [d]. Each row is read from start to end before
// the next: four rows read side by side stream from memory markedly slower.
inline void dots4(const float* const* k, const float* const* a, int d, float* out) noexcept {
#if KVC_ATTEND_AVX2
  const __m256 x0 = dot8(k[0], a[0], d), x1 = dot8(k[1], a[1], d);
  const __m256 x2 = dot8(k[2], a[2], d), x3 = dot8(k[3], a[3], d);
  _mm_storeu_ps(out, avx2::hsum4(x0, x1, x2, x3));
  for (int t = 0; t < 4; ++t)
    for (int e = d / 8 * 8; e < d; ++e) out[t] += k[t][e] * a[t][e];
#else
  for (int t = 0; t < 4; ++t) out[t] = dot(k[t], a[t], d);
#endif
}

// acc[e] += sum_t w[t] * k[t][e] for the four rows k[t] [d]: one load and store of acc per
// four keys.
inline void accumulate4(float* acc, const float* const* k, const float* w, int d) noexcept {
  int e = 0;
#if KVC_ATTEND_AVX2
  const __m256 w0 = _mm256_set1_ps(w[0]), w1 = _mm256_set1_ps(w[1]), w2 = _mm256_set1_ps(w[2]),
               w3 = _mm256_set1_ps(w[3]);
  for (; e + 8 <= d; e += 8) {
    __m256 a = _mm256_loadu_ps(acc + e);
    a = _mm256_fmadd_ps(_mm256_loadu_ps(k[0] + e), w0, a);
    a = _mm256_fmadd_ps(_mm256_loadu_ps(k[1] + e), w1, a);
    a = _mm256_fmadd_ps(_mm256_loadu_ps(k[2] + e), w2, a);
    a = _mm256_fmadd_ps(_mm256_loadu_ps(k[3] + e), w3, a);
    _mm256_storeu_ps(acc + e, a);
  }
#endif
  for (; e < d; ++e) acc[e] += k[0][e] * w[0] + k[1][e] * w[1] + k[2][e] * w[2] + k[3][e] * w[3];
}

// Prefetch hints for rows [row, row + 4) of keys [n][d] (those that exist). Hardware
// prefetchers stop at 4 KiB pages of memory, every eight rows of 128 floats; hinting each
// line ahead of time keeps a long sequential read streaming.
inline void prefetch_rows4(const float* keys, int row, int n, int d) noexcept {
#if defined(__GNUC__) || defined(__clang__)
  if (row >= n) return;
  const char* p = reinterpret_cast<const char*>(keys + static_cast<std::size_t>(row) * static_cast<std::size_t>(d));
  const std::size_t bytes =
      static_cast<std::size_t>(std::min(4, n - row)) * static_cast<std::size_t>(d) * sizeof(float);
  for (std::size_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 3);
#else
  (void)keys, (void)row, (void)n, (void)d;
#endif
}

}  // namespace detail

namespace score {

struct keydiff {
  static constexpr const char* name = "keydiff";
  static constexpr stream_fields fields = stream_fields::keys;

  status score(const stream_data& s, workspace& ws, float* out) const noexcept {
    const int n = s.size(), d = s.head_dim();
    if (n == 0) return ok_status();
    if (s.keys == nullptr)
      return status::error(status_code::invalid_argument, "keydiff: the stream has no keys loaded");
    workspace_scope scope(ws);
    float* inv_norm = ws.alloc<float>(static_cast<std::size_t>(n));  // [n] 1 / ||k_i||, 0 for a zero key
    double* anchor = ws.alloc<double>(static_cast<std::size_t>(d));  // [d]
    float* block = ws.alloc<float>(static_cast<std::size_t>(d));     // [d] partial sum of one block
    float* unit = ws.alloc<float>(static_cast<std::size_t>(d));      // [d] the anchor, unit length
    if (inv_norm == nullptr || anchor == nullptr || block == nullptr || unit == nullptr)
      return status::error(status_code::workspace_exhausted, "keydiff: no workspace for %d norms", n);
    auto key = [&s, d](int i) { return s.keys + static_cast<std::size_t>(i) * static_cast<std::size_t>(d); };

    // 1. Norms and the sum of unit keys (the 1/n of the mean cancels in the cosine).
    constexpr int block_tokens = 256;
    for (int e = 0; e < d; ++e) anchor[e] = 0.0;
    for (int b0 = 0; b0 < n; b0 += block_tokens) {
      const int b1 = b0 + block_tokens < n ? b0 + block_tokens : n;
      for (int e = 0; e < d; ++e) block[e] = 0.0f;
      for (int i = b0; i < b1; i += 4) {
        // Past the block's end the first row repeats, with weight 0.
        const float* k[4] = {key(i), key(i + 1 < b1 ? i + 1 : i), key(i + 2 < b1 ? i + 2 : i),
                             key(i + 3 < b1 ? i + 3 : i)};
        float norm[4], inv[4];
        kvc::detail::prefetch_rows4(s.keys, i + 64, n, d);
        if (s.key_norms != nullptr) {
          for (int t = 0; t < 4; ++t) norm[t] = i + t < b1 ? s.key_norms[i + t] : 0.0f;
        } else {
          kvc::detail::dots4(k, k, d, norm);
          for (int t = 0; t < 4; ++t) norm[t] = std::sqrt(norm[t]);
        }
        for (int t = 0; t < 4; ++t) {
          inv[t] = i + t < b1 && norm[t] > 0.0f ? 1.0f / norm[t] : 0.0f;
          if (i + t < b1) inv_norm[i + t] = inv[t];
        }
        kvc::detail::accumulate4(block, k, inv, d);
      }
      for (int e = 0; e < d; ++e) anchor[e] += static_cast<double>(block[e]);
    }
    double sq = 0.0;
    for (int e = 0; e < d; ++e) sq += anchor[e] * anchor[e];
    if (!(sq > 0.0)) {
      for (int i = 0; i < n; ++i) out[i] = 0.0f;
      return ok_status();
    }
    const double inv_anchor = 1.0 / std::sqrt(sq);
    for (int e = 0; e < d; ++e) unit[e] = static_cast<float>(anchor[e] * inv_anchor);

    // 2. s_i = -(k_i . mu / ||mu||) / ||k_i||.
    for (int i = 0; i < n; i += 4) {
      const float* k[4] = {key(i), key(i + 1 < n ? i + 1 : i), key(i + 2 < n ? i + 2 : i), key(i + 3 < n ? i + 3 : i)};
      float dt[4];
      kvc::detail::prefetch_rows4(s.keys, i + 64, n, d);
      const float* u[4] = {unit, unit, unit, unit};
      kvc::detail::dots4(k, u, d, dt);
      for (int t = 0; t < 4 && i + t < n; ++t) out[i + t] = -dt[t] * inv_norm[i + t];
    }
    return ok_status();
  }
};

}  // namespace score
KVC_NAMESPACE_END
