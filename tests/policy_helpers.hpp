// tests/policy_helpers.hpp: what the policy tests share. A mirror of every token the
// test appended (so references never read data back from the library), snapshots of a
// cache's streams, brute-force references, and small custom scorers, budgets and
// policies that probe evict and compress.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <map>
#include <random>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include <kvc/kvc.hpp>

#define POLICY_ASSERT_OK(expr)                                             \
  do {                                                                     \
    const ::kvc::status policy_st_ = (expr);                               \
    ASSERT_TRUE(policy_st_.ok()) << #expr << ": " << policy_st_.message(); \
  } while (0)

namespace policy_test {

// ------------------------------------------------------------------ caches

inline kvc::cache_config make_config(kvc::model_shape shape, int page_tokens, int max_context = 512) {
  kvc::cache_config c;
  c.shape = shape;
  c.page_tokens = page_tokens;
  c.max_context = max_context;
  c.capacity_bytes = std::size_t{16} << 20;
  return c;
}

template <class Cache>
Cache make_cache(const kvc::cache_config& config) {
  auto r = Cache::create(config);
  if (!r.ok()) {
    ADD_FAILURE() << "create: " << r.status().message();
    std::abort();
  }
  return std::move(r).value();
}

// ------------------------------------------------------------------ data

// Values that f32, f16 and bf16 all store exactly: multiples of 1/32 in [-4, 4]
// (at most 8 significant bits). With head_dim <= 16 every partial sum of squares is
// a multiple of 2^-10 below 2^8, also exact in float, so float and double agree on
// the order of key norms.
inline float snap(float x) { return std::round(std::clamp(x, -4.0f, 4.0f) * 32.0f) / 32.0f; }

struct token {
  std::int32_t position = 0;
  std::vector<float> key, value;  // [head_dim]
};

// The test's own record of every stream: [layer * num_kv_heads + kv_head], in position order.
class mirror {
 public:
  explicit mirror(const kvc::model_shape& shape)
      : shape_(shape), streams_(static_cast<std::size_t>(shape.streams_per_sequence())) {}

  // k, v: [n][num_kv_heads][head_dim]; positions: [n].
  void append(int layer, const std::vector<float>& k, const std::vector<float>& v,
              const std::vector<std::int32_t>& positions) {
    const int d = shape_.head_dim, h = shape_.num_kv_heads;
    for (std::size_t i = 0; i < positions.size(); ++i)
      for (int j = 0; j < h; ++j) {
        const std::size_t off = (i * static_cast<std::size_t>(h) + static_cast<std::size_t>(j)) * d;
        token t;
        t.position = positions[i];
        t.key.assign(k.begin() + off, k.begin() + off + d);
        t.value.assign(v.begin() + off, v.begin() + off + d);
        stream(layer, j).push_back(std::move(t));
      }
  }

  std::vector<token>& stream(int layer, int kv_head) {
    return streams_[static_cast<std::size_t>(layer * shape_.num_kv_heads + kv_head)];
  }
  const std::vector<token>& stream(int layer, int kv_head) const {
    return streams_[static_cast<std::size_t>(layer * shape_.num_kv_heads + kv_head)];
  }

  // Keeps the tokens at the given retained indices (increasing).
  void keep(int layer, int kv_head, const std::vector<int>& indices) {
    std::vector<token>& s = stream(layer, kv_head);
    std::vector<token> kept;
    for (int i : indices) kept.push_back(s[static_cast<std::size_t>(i)]);
    s = std::move(kept);
  }

  const kvc::model_shape& shape() const { return shape_; }

 private:
  kvc::model_shape shape_;
  std::vector<std::vector<token>> streams_;
};

// Appends n tokens to one layer of both the cache and the mirror, at positions
// first, first + step, ...; keys and values are snapped Gaussians.
template <class Cache>
kvc::status append_random(Cache& cache, mirror& m, kvc::seq_id seq, int layer, std::int32_t first, int n,
                          std::mt19937& rng, std::int32_t step = 1) {
  const kvc::model_shape& sh = cache.shape();
  const std::size_t count = static_cast<std::size_t>(n) * sh.num_kv_heads * sh.head_dim;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> k(count), v(count);
  for (float& x : k) x = snap(normal(rng));
  for (float& x : v) x = snap(normal(rng));
  std::vector<std::int32_t> pos(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) pos[static_cast<std::size_t>(i)] = first + i * step;
  const kvc::status st = cache.append(seq, layer, k.data(), v.data(), pos.data(), n);
  if (st.ok()) m.append(layer, k, v, pos);
  return st;
}

// ------------------------------------------------------------------ snapshots

struct stream_snapshot {
  std::vector<std::int32_t> positions;
  std::vector<float> log_weights, keys, values;  // keys, values: [n][head_dim]
  bool operator==(const stream_snapshot& o) const {
    return positions == o.positions && log_weights == o.log_weights && keys == o.keys && values == o.values;
  }
};

template <class Cache>
stream_snapshot snapshot_stream(const Cache& cache, kvc::seq_id seq, int layer, int kv_head) {
  stream_snapshot s;
  auto v = cache.view(seq, layer, kv_head);
  if (!v.ok()) {
    ADD_FAILURE() << "view: " << v.status().message();
    return s;
  }
  const std::size_t n = static_cast<std::size_t>(v->size()), d = static_cast<std::size_t>(cache.shape().head_dim);
  s.positions.resize(n);
  s.log_weights.resize(n);
  s.keys.resize(n * d);
  s.values.resize(n * d);
  v->copy(s.keys.data(), s.values.data(), s.positions.data(), s.log_weights.data());
  return s;
}

// Every stream of a sequence, [layer * num_kv_heads + kv_head], plus the pool's byte count.
struct cache_snapshot {
  std::vector<stream_snapshot> streams;
  std::size_t bytes_in_use = 0;
  std::int64_t tokens_retained = 0;
  bool operator==(const cache_snapshot& o) const {
    return streams == o.streams && bytes_in_use == o.bytes_in_use && tokens_retained == o.tokens_retained;
  }
};

template <class Cache>
cache_snapshot snapshot(const Cache& cache, kvc::seq_id seq) {
  cache_snapshot s;
  const kvc::model_shape& sh = cache.shape();
  for (int l = 0; l < sh.num_layers; ++l)
    for (int h = 0; h < sh.num_kv_heads; ++h) s.streams.push_back(snapshot_stream(cache, seq, l, h));
  const kvc::cache_stats st = cache.stats();
  s.bytes_in_use = st.bytes_in_use;
  s.tokens_retained = st.tokens_retained;
  return s;
}

// The cache's stream equals exactly these tokens: same positions in the same order,
// the original keys and values bit for bit, log-weight 0 (nothing was merged).
template <class Cache>
::testing::AssertionResult stream_equals(const Cache& cache, kvc::seq_id seq, int layer, int kv_head,
                                         const std::vector<token>& expected) {
  auto v = cache.view(seq, layer, kv_head);
  if (!v.ok()) return ::testing::AssertionFailure() << "view: " << v.status().message();
  const std::vector<std::int32_t> pos = v->positions();
  const std::vector<float> lw = v->log_weights();
  const kvc::row_matrix keys = v->keys(), values = v->values();
  auto where = [&] {
    return " in stream (layer " + std::to_string(layer) + ", kv_head " + std::to_string(kv_head) + ")";
  };
  if (pos.size() != expected.size())
    return ::testing::AssertionFailure() << pos.size() << " tokens retained, expected " << expected.size() << where();
  for (std::size_t i = 0; i < pos.size(); ++i) {
    const token& t = expected[i];
    if (pos[i] != t.position)
      return ::testing::AssertionFailure()
             << "token " << i << " has position " << pos[i] << ", expected " << t.position << where();
    if (lw[i] != 0.0f) return ::testing::AssertionFailure() << "token " << i << " has log-weight " << lw[i] << where();
    for (std::size_t j = 0; j < t.key.size(); ++j)
      if (keys(static_cast<Eigen::Index>(i), static_cast<Eigen::Index>(j)) != t.key[j] ||
          values(static_cast<Eigen::Index>(i), static_cast<Eigen::Index>(j)) != t.value[j])
        return ::testing::AssertionFailure() << "token " << i << " (position " << t.position
                                             << ") changed its key or value at element " << j << where();
  }
  return ::testing::AssertionSuccess();
}

// Every stream of the sequence equals the mirror.
template <class Cache>
::testing::AssertionResult cache_equals(const Cache& cache, kvc::seq_id seq, const mirror& m) {
  const kvc::model_shape& sh = cache.shape();
  for (int l = 0; l < sh.num_layers; ++l)
    for (int h = 0; h < sh.num_kv_heads; ++h) {
      ::testing::AssertionResult r = stream_equals(cache, seq, l, h, m.stream(l, h));
      if (!r) return r;
    }
  return ::testing::AssertionSuccess();
}

// ------------------------------------------------------------------ references

// Brute-force top-k: sorts every (score, index) pair, best first, ties towards the
// higher index, and returns the first k indices in increasing order.
inline std::vector<int> brute_top_k(const std::vector<double>& scores, int k) {
  std::vector<std::pair<double, int>> pairs;
  for (std::size_t i = 0; i < scores.size(); ++i) pairs.emplace_back(scores[i], static_cast<int>(i));
  std::sort(pairs.begin(), pairs.end(), [](const auto& a, const auto& b) { return a > b; });
  std::vector<int> kept;
  for (int i = 0; i < k && i < static_cast<int>(pairs.size()); ++i)
    kept.push_back(pairs[static_cast<std::size_t>(i)].second);
  std::sort(kept.begin(), kept.end());
  return kept;
}

// The tokens of `s` at the given indices.
inline std::vector<token> pick(const std::vector<token>& s, const std::vector<int>& indices) {
  std::vector<token> r;
  for (int i : indices) r.push_back(s[static_cast<std::size_t>(i)]);
  return r;
}

// K-norm score, -||k||_2, in double from the appended keys.
inline std::vector<double> knorm_reference(const std::vector<token>& s) {
  std::vector<double> r;
  for (const token& t : s) {
    double acc = 0.0;
    for (float x : t.key) acc += static_cast<double>(x) * x;
    r.push_back(-std::sqrt(acc));
  }
  return r;
}

// StreamingLLM's kept set for n tokens and a budget of k: the first min(sinks, k)
// tokens and the k - min(sinks, k) most recent ones.
inline std::vector<int> streaming_reference(int n, int k, int sinks) {
  k = std::min(k, n);
  const int s = std::min(sinks, k);
  std::vector<int> kept;
  for (int i = 0; i < n; ++i)
    if (i < s || i >= n - (k - s)) kept.push_back(i);
  return kept;
}

// ------------------------------------------------------------------ probes

// Wraps a scorer and records the scores it gives each (layer, kv_head).
template <class Inner>
struct recording {
  static constexpr const char* name = Inner::name;
  static constexpr kvc::stream_fields fields = Inner::fields;
  Inner inner;
  std::map<std::pair<int, int>, std::vector<float>>* out = nullptr;

  kvc::status score(const kvc::stream_data& s, kvc::workspace& ws, float* scores) const {
    const kvc::status st = inner.score(s, ws, scores);
    if (st.ok() && out != nullptr) (*out)[{s.info.layer, s.info.kv_head}].assign(scores, scores + s.size());
    return st;
  }
};

// A scorer defined by a function of (layer, kv_head, position).
struct function_scorer {
  static constexpr const char* name = "function";
  static constexpr kvc::stream_fields fields = kvc::stream_fields::none;
  std::function<float(int, int, std::int32_t)> f;

  kvc::status score(const kvc::stream_data& s, kvc::workspace& /*ws*/, float* scores) const {
    for (int i = 0; i < s.size(); ++i) scores[i] = f(s.info.layer, s.info.kv_head, s.positions[i]);
    return kvc::ok_status();
  }
};

// A budget defined by a function of the stream.
struct function_budget {
  std::function<std::int32_t(const kvc::stream_info&)> f;

  kvc::status allocate(const kvc::budget_request& r, std::int32_t* keep) const {
    for (int i = 0; i < r.num_streams; ++i) keep[i] = f(r.streams[i]);
    return kvc::ok_status();
  }
};

// A policy that keeps the tokens for which pred(layer, kv_head, position) holds, and
// records which streams compress() put in scope.
struct keep_if {
  std::function<bool(int, int, std::int32_t)> pred;
  std::vector<kvc::stream_info>* seen = nullptr;

  template <class Context>
  kvc::status plan(Context& ctx) const {
    for (int i = 0; i < ctx.num_streams(); ++i) {
      kvc::workspace_scope scope(ctx.scratch());
      kvc::stream_data s;
      KVC_RETURN_IF_ERROR(ctx.load(i, kvc::stream_fields::none, s));
      if (seen != nullptr) seen->push_back(ctx.info(i));
      std::uint8_t* keep = ctx.keep(i);
      for (int t = 0; t < s.size(); ++t) keep[t] = pred(s.info.layer, s.info.kv_head, s.positions[t]) ? 1 : 0;
    }
    return kvc::ok_status();
  }
};

// Applies keep_if's predicate to the mirror.
inline void mirror_keep_if(mirror& m, const std::function<bool(int, int, std::int32_t)>& pred) {
  const kvc::model_shape& sh = m.shape();
  for (int l = 0; l < sh.num_layers; ++l)
    for (int h = 0; h < sh.num_kv_heads; ++h) {
      std::vector<int> idx;
      const std::vector<token>& s = m.stream(l, h);
      for (std::size_t i = 0; i < s.size(); ++i)
        if (pred(l, h, s[i].position)) idx.push_back(static_cast<int>(i));
      m.keep(l, h, idx);
    }
}

}  // namespace policy_test
