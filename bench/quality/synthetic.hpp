// bench/quality/synthetic.hpp: generated sequences with the structure of real KV caches,
// each structure planted explicitly so that what a policy keeps can be explained.
//
// Every vector is built before RoPE from parts that live in chosen rotary pairs, then
// rotated to its position with kvc::rope_rotate (RoPE pair i turns by theta^(-2i/rotary)
// per position; low i turns fast). With P = rotary_dims / 2 pairs:
//   positional band, pairs [0, P/2): fast pairs. A query and a key that share a vector w
//     spread evenly over them score |w|^2 mean_i cos((m - n) theta_i): the full logit for
//     m = n, falling roughly with log(m - n) to noise beyond ~1/theta of the band's slowest
//     pair (about 600 tokens at theta 500000, head_dim 128) (local heads);
//   semantic band, pairs [5P/8, P - 2): slow pairs that turn by at most about half a
//     radian over 2048 tokens: topics, sinks and needles live here;
//   outlier channels, the two slowest pairs (4 dimensions): a large constant key offset
//     (+-8 per dimension, 16 times the key noise, jittered 15% per token), as the massive
//     key channels of real models; queries do not look at them.
// Key parts have amplitude sqrt(head_dim) along a unit vector, so a query part of
// amplitude L along the same vector adds L to the logit q.k / sqrt(head_dim). Keys and
// queries carry N(0, 0.5^2) noise per dimension.
//
// Every stream has 4 sink tokens (positions 0-3): keys along a sink direction with small
// noise (0.3) and 0.3 of the outlier offset, so lower-norm than the others, and values near
// zero (N(0, 0.1^2)). Every query of the stream looks at the sink direction with a logit
// drawn per query head: 3.5 to 5.5 (local heads: 12 to 15). The context is a run of topic
// segments (12 topics, each segment 1/64 to 1/8 of the context long); each token's key
// holds its topic's vector. Queries before the observation window look for their own
// segment's topic; the window's and the held-out ones for one of three "current" topics
// (the last two segments' and one other) with probability 0.75, else any topic. Topic
// logits grow with depth, 2 in the first layer to 5 in the last, so deep layers attend more
// sharply (the PyramidKV observation). Head kinds:
//   local:   keys and queries share a vector of the positional band (query logit 16 to 22
//            per query head, so the nearest tokens score that much); topics at 0.4x;
//   diffuse: topics only;
//   needle:  4 needles per stream, keys along their own semantic directions instead of a
//            topic, at distinct random positions in [12, context - window - 32); held-out
//            query j looks for needle j mod 4 with logit 12 (so it is the argmax on the full
//            cache). The observed queries ask for them too (logit 9, window query i for
//            needle i mod 4), as a prompt that ends with the question does;
//   blind:   the same needles, but the observed queries do not ask: the question comes only
//            after compression.
// Values: a per-stream mean (N(0, 1) per dimension) plus the token's topic value (0.8 N(0, 1)
// per topic and dimension) plus N(0, 0.5^2); needles carry 2 N(0, 1) instead of a topic
// value, so losing one changes the output.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <kvc/rope.hpp>

#include "workload.hpp"

namespace quality {

// splitmix64 with Box-Muller normals: the same numbers on every platform and library.
class rng {
 public:
  explicit rng(std::uint64_t seed) noexcept : s_(seed) {}
  std::uint64_t next() noexcept {
    std::uint64_t z = (s_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() noexcept { return static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0); }
  int below(int n) noexcept { return std::min(n - 1, static_cast<int>(uniform() * n)); }
  float normal() noexcept {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    const double u1 = 1.0 - uniform(), u2 = uniform();
    const double r = std::sqrt(-2.0 * std::log(u1)), a = 6.283185307179586 * u2;
    spare_ = static_cast<float>(r * std::sin(a));
    has_spare_ = true;
    return static_cast<float>(r * std::cos(a));
  }

 private:
  std::uint64_t s_;
  float spare_ = 0.0f;
  bool has_spare_ = false;
};

inline std::uint64_t seed_of(std::uint64_t a, std::uint64_t b, std::uint64_t c = 0, std::uint64_t d = 0) noexcept {
  rng r(a * 0x100000001B3ull ^ (b << 40) ^ (c << 20) ^ d);
  r.next();
  return r.next();
}

enum class head_kind { local, diffuse, needle, blind };

inline const char* to_string(head_kind k) noexcept {
  switch (k) {
    case head_kind::local:
      return "local";
    case head_kind::diffuse:
      return "diffuse";
    case head_kind::needle:
      return "needle";
    case head_kind::blind:
      return "blind";
  }
  return "?";
}

struct synthetic_config {
  int layers = 4, q_heads = 16, kv_heads = 4, head_dim = 128;
  int context = 2048, heldout = 32, window = 64;
  kvc::rope_spec rope{500000.0, -1, kvc::rope_layout::half_split};  // Llama 3
};

struct suite_def {
  const char* name;
  const char* description;
  std::uint64_t seed;
  // Stream i = layer * num_kv_heads + kv_head is of kind pattern[i % period].
  head_kind pattern[8];
  int period;
};

inline constexpr suite_def synthetic_suites[] = {
    {"local", "local heads: recent tokens through RoPE, plus sinks", 101, {head_kind::local}, 1},
    {"diffuse", "topic heads: broad attention to the tokens of matching topics", 102, {head_kind::diffuse}, 1},
    {"needle", "retrieval heads; the observed queries ask for the needles", 103, {head_kind::needle}, 1},
    {"blind", "retrieval heads; the needles are asked for only after compression", 104, {head_kind::blind}, 1},
    {"mixed",
     "per layer: 1 local, 2 topic and 1 retrieval head (seen or blind), alternating",
     105,
     {head_kind::local, head_kind::diffuse, head_kind::diffuse, head_kind::needle, head_kind::local, head_kind::diffuse,
      head_kind::blind, head_kind::diffuse},
     8},
};

namespace detail {

constexpr int sinks = 4, topics = 12, needles_per_stream = 4;
constexpr float sink_logit_min = 3.5f, sink_logit_max = 5.5f, local_sink_logit_min = 12.0f,
                local_sink_logit_max = 15.0f, local_logit_min = 16.0f, local_logit_max = 22.0f, needle_logit = 12.0f,
                observed_needle_logit = 9.0f, outlier = 8.0f, outlier_jitter = 0.15f, key_noise = 0.5f,
                query_noise = 0.5f, local_topic_share = 0.4f, topic_value = 0.8f, value_noise = 0.5f,
                needle_value = 2.0f;

// Dimensions of RoPE pairs [first, last).
inline std::vector<int> band(const kvc::rope_spec& r, int d, int first, int last) {
  std::vector<int> dims;
  for (int i = first; i < last; ++i) {
    int a, b;
    kvc::rope_pair(r, d, i, a, b);
    dims.push_back(a);
    dims.push_back(b);
  }
  return dims;
}

// A random unit vector supported on `dims`, as a dense [d] vector.
inline std::vector<float> unit_on(const std::vector<int>& dims, int d, rng& g) {
  std::vector<float> u(static_cast<std::size_t>(d), 0.0f);
  double n = 0.0;
  for (int i : dims) {
    u[static_cast<std::size_t>(i)] = g.normal();
    n += static_cast<double>(u[static_cast<std::size_t>(i)]) * u[static_cast<std::size_t>(i)];
  }
  const float inv = n > 0.0 ? static_cast<float>(1.0 / std::sqrt(n)) : 0.0f;
  for (float& x : u) x *= inv;
  return u;
}

// A unit vector with equal energy in each RoPE pair of [first, last), at random phases: a
// query and a key that share it score sum_i cos((m - n) theta_i) / (last - first).
inline std::vector<float> even_pairs(const kvc::rope_spec& r, int d, int first, int last, rng& g) {
  std::vector<float> u(static_cast<std::size_t>(d), 0.0f);
  const float norm = 1.0f / std::sqrt(static_cast<float>(last - first));
  for (int i = first; i < last; ++i) {
    int a, b;
    kvc::rope_pair(r, d, i, a, b);
    const double phase = 6.283185307179586 * g.uniform();
    u[static_cast<std::size_t>(a)] = norm * static_cast<float>(std::cos(phase));
    u[static_cast<std::size_t>(b)] = norm * static_cast<float>(std::sin(phase));
  }
  return u;
}

inline void axpy(float a, const std::vector<float>& x, float* y) {
  for (std::size_t i = 0; i < x.size(); ++i) y[i] += a * x[i];
}

}  // namespace detail

inline head_kind kind_of(const suite_def& s, const synthetic_config& c, int layer, int kv_head) noexcept {
  return s.pattern[(layer * c.kv_heads + kv_head) % s.period];
}

inline workload make_suite(const suite_def& s, const synthetic_config& c) {
  namespace D = detail;
  workload w;
  w.name = s.name;
  w.description = s.description;
  w.shape = {c.layers, c.q_heads, c.kv_heads, c.head_dim};
  w.rope = c.rope;
  w.context = c.context;
  w.tokens = c.context + c.heldout;
  w.window = c.window;
  const int d = c.head_dim, T = w.tokens, ctx = c.context, W = c.window, g = w.shape.group_size();
  const int pairs = c.rope.dims(d) / 2;
  const float amp = std::sqrt(static_cast<float>(d));
  const int positional_pairs = std::max(1, pairs / 2);
  const std::vector<int> semantic = D::band(c.rope, d, pairs * 5 / 8, std::max(pairs * 5 / 8 + 1, pairs - 2));
  const std::vector<int> outliers = D::band(c.rope, d, std::max(0, pairs - 2), pairs);

  // The topic of every token: segments of random length, shared by every stream.
  rng timeline(seed_of(s.seed, 1));
  std::vector<int> topic(static_cast<std::size_t>(T));
  std::vector<int> segment_topics;
  for (int t = 0; t < T;) {
    const int lo = std::max(4, ctx / 64), hi = std::max(lo + 1, ctx / 8);
    const int len = lo + timeline.below(hi - lo + 1);
    const int tp = timeline.below(D::topics);
    if (t < ctx) segment_topics.push_back(tp);
    for (int i = t; i < std::min(T, t + len); ++i) topic[static_cast<std::size_t>(i)] = tp;
    t += len;
  }
  const int current[3] = {segment_topics.back(),
                          segment_topics.size() > 1 ? segment_topics[segment_topics.size() - 2] : 0,
                          timeline.below(D::topics)};

  w.q.assign(static_cast<std::size_t>(c.layers), std::vector<float>(static_cast<std::size_t>(T) * c.q_heads * d));
  w.k.assign(static_cast<std::size_t>(c.layers), std::vector<float>(static_cast<std::size_t>(T) * c.kv_heads * d));
  w.v = w.k;
  for (int layer = 0; layer < c.layers; ++layer) {
    const float topic_logit = 2.0f + 3.0f * (c.layers > 1 ? static_cast<float>(layer) / (c.layers - 1) : 0.0f);
    for (int h = 0; h < c.kv_heads; ++h) {
      const head_kind kind = kind_of(s, c, layer, h);
      rng r(seed_of(s.seed, 2, static_cast<std::uint64_t>(layer), static_cast<std::uint64_t>(h)));
      std::vector<std::vector<float>> topic_dir, needle_dir;
      for (int i = 0; i < D::topics; ++i) topic_dir.push_back(D::unit_on(semantic, d, r));
      for (int i = 0; i < D::needles_per_stream; ++i) needle_dir.push_back(D::unit_on(semantic, d, r));
      const std::vector<float> sink_dir = D::unit_on(semantic, d, r);
      const std::vector<float> local_dir = D::even_pairs(c.rope, d, 0, positional_pairs, r);
      std::vector<float> outlier_offset(static_cast<std::size_t>(d), 0.0f), value_mean(static_cast<std::size_t>(d));
      for (int i : outliers) outlier_offset[static_cast<std::size_t>(i)] = r.uniform() < 0.5 ? -D::outlier : D::outlier;
      for (float& x : value_mean) x = r.normal();
      std::vector<std::vector<float>> topic_value(static_cast<std::size_t>(D::topics));
      for (auto& tv : topic_value) {
        tv.resize(static_cast<std::size_t>(d));
        for (float& x : tv) x = D::topic_value * r.normal();
      }

      // Needles: distinct positions in the middle of the context.
      std::vector<int> needle_pos;
      const bool has_needles = kind == head_kind::needle || kind == head_kind::blind;
      if (has_needles) {
        const int lo = D::sinks + 8, hi = std::max(lo + D::needles_per_stream, ctx - W - 32);
        while (static_cast<int>(needle_pos.size()) < D::needles_per_stream) {
          const int p = lo + r.below(hi - lo);
          if (std::find(needle_pos.begin(), needle_pos.end(), p) == needle_pos.end()) needle_pos.push_back(p);
        }
        for (int i = 0; i < D::needles_per_stream; ++i) {
          needle nd;
          nd.layer = layer;
          nd.kv_head = h;
          nd.position = needle_pos[static_cast<std::size_t>(i)];
          for (int j = i; j < c.heldout; j += D::needles_per_stream) nd.queries.push_back(j);
          w.needles.push_back(nd);
        }
      }

      // Keys and values.
      for (int t = 0; t < T; ++t) {
        float* k = w.k[static_cast<std::size_t>(layer)].data() + (static_cast<std::size_t>(t) * c.kv_heads + h) * d;
        float* v = w.v[static_cast<std::size_t>(layer)].data() + (static_cast<std::size_t>(t) * c.kv_heads + h) * d;
        const auto nit = std::find(needle_pos.begin(), needle_pos.end(), t);
        const int needle_index = nit == needle_pos.end() ? -1 : static_cast<int>(nit - needle_pos.begin());
        if (t < D::sinks) {
          for (int e = 0; e < d; ++e) k[e] = 0.3f * r.normal();
          D::axpy(amp, sink_dir, k);
          D::axpy(0.3f, outlier_offset, k);
          for (int e = 0; e < d; ++e) v[e] = 0.1f * r.normal();
        } else {
          for (int e = 0; e < d; ++e) k[e] = D::key_noise * r.normal();
          D::axpy(amp,
                  needle_index >= 0 ? needle_dir[static_cast<std::size_t>(needle_index)]
                                    : topic_dir[static_cast<std::size_t>(topic[static_cast<std::size_t>(t)])],
                  k);
          if (kind == head_kind::local) D::axpy(amp, local_dir, k);
          D::axpy(1.0f + D::outlier_jitter * r.normal(), outlier_offset, k);
          const std::vector<float>& tv = topic_value[static_cast<std::size_t>(topic[static_cast<std::size_t>(t)])];
          for (int e = 0; e < d; ++e)
            v[e] = value_mean[static_cast<std::size_t>(e)] +
                   (needle_index >= 0 ? D::needle_value * r.normal() : tv[static_cast<std::size_t>(e)]) +
                   D::value_noise * r.normal();
        }
        kvc::rope_rotate(c.rope, d, t, k);
      }

      // Queries of the group's heads.
      for (int j = 0; j < g; ++j) {
        const int qh = h * g + j;
        rng qr(seed_of(s.seed, 3, static_cast<std::uint64_t>(layer), static_cast<std::uint64_t>(qh)));
        const bool local = kind == head_kind::local;
        const float u = static_cast<float>(qr.uniform());
        const float sink_logit = local
                                     ? D::local_sink_logit_min + (D::local_sink_logit_max - D::local_sink_logit_min) * u
                                     : D::sink_logit_min + (D::sink_logit_max - D::sink_logit_min) * u;
        const float local_logit =
            D::local_logit_min + (D::local_logit_max - D::local_logit_min) * static_cast<float>(qr.uniform());
        for (int t = 0; t < T; ++t) {
          float* q = w.q[static_cast<std::size_t>(layer)].data() + (static_cast<std::size_t>(t) * c.q_heads + qh) * d;
          for (int e = 0; e < d; ++e) q[e] = D::query_noise * qr.normal();
          D::axpy(sink_logit, sink_dir, q);
          int tp = topic[static_cast<std::size_t>(t)];
          if (t >= ctx - W) tp = qr.uniform() < 0.75 ? current[qr.below(3)] : qr.below(D::topics);
          D::axpy(topic_logit * (local ? D::local_topic_share : 1.0f), topic_dir[static_cast<std::size_t>(tp)], q);
          if (local) D::axpy(local_logit, local_dir, q);
          if (has_needles && t >= ctx)
            D::axpy(D::needle_logit, needle_dir[static_cast<std::size_t>((t - ctx) % D::needles_per_stream)], q);
          if (kind == head_kind::needle && t >= ctx - W && t < ctx)
            D::axpy(D::observed_needle_logit,
                    needle_dir[static_cast<std::size_t>((t - ctx + W) % D::needles_per_stream)], q);
          kvc::rope_rotate(c.rope, d, t, q);
        }
      }
    }
  }
  return w;
}

}  // namespace quality
