// examples/quickstart.cpp: kvc in one file.
//
// A toy decoder loop with a random stand-in for the model, doing what an engine does
// with kvc:
//   1. describe the model and size the page pool (kvc::cache_config),
//   2. prefill: append every layer's keys and values for a 2048-token prompt,
//   3. compress: keep half of every (layer, KV head) stream, chosen by a policy,
//   4. decode: each step appends one token per layer and attends with its query.
// It runs three caches side by side, uncompressed, StreamingLLM and K-norm, and prints
// their memory and how far each compressed cache's attention output is from the full one.
// The errors come from toy data built to have sinks, recency and low-norm key tokens:
// they show how to measure a policy, not how it does on a real model.
//
// The program exits non-zero if any kvc call fails or a result is implausible, so it
// doubles as a test (ctest -R example.quickstart).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include <kvc/kvc.hpp>

namespace {

constexpr int prompt_tokens = 2048;
constexpr int decode_steps = 64;

// Every kvc call that can fail returns a kvc::status (or a kvc::result holding one).
// An engine must look at it; here any failure ends the program with its message.
void check(const kvc::status& s, const char* what) {
  if (s.ok()) return;
  std::fprintf(stderr, "quickstart: %s failed: %s: %s\n", what, kvc::to_string(s.code()), s.message());
  std::exit(1);
}

void require(bool ok, const char* what) {
  if (ok) return;
  std::fprintf(stderr, "quickstart: sanity check failed: %s\n", what);
  std::exit(1);
}

// The "model": random tensors with the structure real attention has. Each (layer, KV
// head) has a topic direction that its queries look for. Keys are noise plus a rotating
// positional part shared with the queries (as with RoPE, nearby tokens score higher).
// The first token and about 1 in 64 others are important: their keys point at the
// topic and have a small norm, as attention sinks and key tokens do in real models.
// Values are noise around a per-head mean (real value vectors are far from zero-mean).
class toy_model {
 public:
  explicit toy_model(const kvc::model_shape& shape) : shape_(shape), rng_(2024) {
    const std::size_t n = static_cast<std::size_t>(shape.num_layers) * shape.num_kv_heads * shape.head_dim;
    topic_.resize(n);
    value_mean_.resize(n);
    for (float& x : value_mean_) x = normal_(rng_);
    for (int i = 0; i < shape.num_layers * shape.num_kv_heads; ++i) {
      float* u = &topic_[static_cast<std::size_t>(i) * shape.head_dim];
      double norm = 0.0;
      for (int e = 0; e < shape.head_dim; ++e) {
        u[e] = normal_(rng_);
        norm += u[e] * u[e];
      }
      for (int e = 0; e < shape.head_dim; ++e) u[e] /= static_cast<float>(std::sqrt(norm));
    }
  }

  // Keys and values of one token of one layer, k and v: [num_kv_heads][head_dim].
  void token(int layer, std::int32_t pos, float* k, float* v) {
    const int d = shape_.head_dim;
    const bool important = pos == 0 || uniform_(rng_) < 1.0f / 64.0f;
    for (int h = 0; h < shape_.num_kv_heads; ++h) {
      const float* u = topic(layer, h);
      const float* m = &value_mean_[(static_cast<std::size_t>(layer) * shape_.num_kv_heads + h) * d];
      for (int e = 0; e < d; ++e) {
        k[h * d + e] = important ? 6.0f * u[e] + 0.3f * normal_(rng_) : normal_(rng_);
        v[h * d + e] = m[e] + normal_(rng_);
      }
      add_position(pos, 2.0f, k + h * d);
    }
  }

  // The query of one layer at position pos, q: [num_q_heads][head_dim].
  void query(int layer, std::int32_t pos, float* q) {
    const int d = shape_.head_dim, g = shape_.group_size();
    for (int qh = 0; qh < shape_.num_q_heads; ++qh) {
      const float* u = topic(layer, qh / g);
      for (int e = 0; e < d; ++e) q[qh * d + e] = 12.0f * u[e] + 0.5f * normal_(rng_);
      add_position(pos, 2.0f, q + qh * d);
    }
  }

 private:
  const float* topic(int layer, int kv_head) const {
    return &topic_[(static_cast<std::size_t>(layer) * shape_.num_kv_heads + kv_head) * shape_.head_dim];
  }
  // Eight rotating pairs of dimensions with periods from 12 to 1600 tokens.
  static void add_position(std::int32_t pos, float scale, float* x) {
    for (int i = 0; i < 8; ++i) {
      const double angle = pos * 0.5 * std::pow(0.5, 0.1 + 0.9 * i);
      x[2 * i] += scale * static_cast<float>(std::cos(angle));
      x[2 * i + 1] += scale * static_cast<float>(std::sin(angle));
    }
  }

  kvc::model_shape shape_;
  std::vector<float> topic_;       // [num_layers][num_kv_heads][head_dim], unit vectors
  std::vector<float> value_mean_;  // [num_layers][num_kv_heads][head_dim]
  std::mt19937 rng_;
  std::normal_distribution<float> normal_{0.0f, 1.0f};
  std::uniform_real_distribution<float> uniform_{0.0f, 1.0f};
};

// Keys and values are stored as IEEE half precision (the f16 codec) once a page fills.
using cache_t = kvc::paged_kv_cache<kvc::codec::f16>;

double mib(std::size_t bytes) { return static_cast<double>(bytes) / (1024.0 * 1024.0); }

}  // namespace

int main() {
  // ---- 1. The model's shape and the cache configuration.
  kvc::cache_config config;
  config.shape.num_layers = 4;
  config.shape.num_q_heads = 8;   // query heads
  config.shape.num_kv_heads = 2;  // KV heads: a GQA group of 4 query heads shares one
  config.shape.head_dim = 64;
  config.page_tokens = 64;  // tokens per page; each page holds one (layer, KV head) stream
  config.max_context = prompt_tokens + decode_steps;
  // The pool is allocated once, here; append, attend and compress never allocate. Size it
  // for the uncompressed cache in f16: per token and stream, 2 bytes per key and value
  // element plus 8 bytes of position and log-weight; plus, per stream, room for the
  // newest page, which stays float until it fills. A full pool is reported as
  // status_code::pool_exhausted, never a crash.
  const std::size_t n_streams = static_cast<std::size_t>(config.shape.streams_per_sequence());
  const std::size_t d = static_cast<std::size_t>(config.shape.head_dim);
  const std::size_t page = static_cast<std::size_t>(config.page_tokens);
  config.capacity_bytes =
      n_streams * (static_cast<std::size_t>(config.max_context) * (2 * d * 2 + 8) + page * (2 * d * sizeof(float) + 8));

  // Three caches: the reference and one per policy. (An engine serving many requests
  // keeps one cache and one sequence per request; fork() shares a prefix between them.)
  const char* names[3] = {"uncompressed", "streaming", "knorm"};
  std::vector<cache_t> caches;
  std::vector<kvc::seq_id> seqs;
  for (int c = 0; c < 3; ++c) {
    kvc::result<cache_t> created = cache_t::create(config);
    check(created.status(), "create");
    caches.push_back(std::move(created).value());
    seqs.push_back(caches.back().create_sequence());
  }

  // ---- 2. Prefill: keys and values arrive after RoPE, [n_tokens][num_kv_heads][head_dim].
  const kvc::model_shape& shape = config.shape;
  const std::size_t token_floats = static_cast<std::size_t>(shape.num_kv_heads) * shape.head_dim;
  toy_model model(shape);
  std::vector<float> k(prompt_tokens * token_floats), v(prompt_tokens * token_floats);
  std::vector<std::int32_t> positions(prompt_tokens);
  for (int i = 0; i < prompt_tokens; ++i) positions[i] = i;
  for (int layer = 0; layer < shape.num_layers; ++layer) {
    for (int i = 0; i < prompt_tokens; ++i) model.token(layer, i, &k[i * token_floats], &v[i * token_floats]);
    for (int c = 0; c < 3; ++c)
      check(caches[c].append(seqs[c], layer, k.data(), v.data(), positions.data(), prompt_tokens), "append");
  }
  kvc::cache_stats before[3], after[3];
  for (int c = 0; c < 3; ++c) before[c] = caches[c].stats();

  // ---- 3. Compress. A policy is a value: evict<Scorer, Budget> scores every token of
  // every stream and keeps each stream's top half. StreamingLLM keeps the first tokens
  // (attention sinks) and the most recent ones; K-norm keeps the keys with the lowest norm.
  const auto half = kvc::budget::uniform::keep_fraction(0.5);
  check(caches[1].compress(seqs[1], kvc::evict(kvc::score::streaming{}, half)).status(), "compress (streaming)");
  check(caches[2].compress(seqs[2], kvc::evict(kvc::score::knorm{}, half)).status(), "compress (knorm)");
  for (int c = 0; c < 3; ++c) after[c] = caches[c].stats();

  // ---- 4. Decode: per step and layer, append the new token to each cache, then attend
  // with its query, [n_queries][num_q_heads][head_dim], and compare with the full cache.
  const std::size_t q_floats = static_cast<std::size_t>(shape.num_q_heads) * shape.head_dim;
  std::vector<float> q(q_floats), out[3];
  for (auto& o : out) o.resize(q_floats);
  double error_sum[3] = {0.0, 0.0, 0.0};
  for (int step = 0; step < decode_steps; ++step) {
    const std::int32_t pos = prompt_tokens + step;
    for (int layer = 0; layer < shape.num_layers; ++layer) {
      model.token(layer, pos, k.data(), v.data());
      model.query(layer, pos, q.data());
      for (int c = 0; c < 3; ++c) {
        check(caches[c].append(seqs[c], layer, k.data(), v.data(), &pos, 1), "append (decode)");
        check(caches[c].attend(seqs[c], layer, q.data(), &pos, 1, out[c].data()), "attend");
      }
      // Relative L2 error of the attention output over all query heads of the layer.
      for (int c = 1; c < 3; ++c) {
        double diff = 0.0, norm = 0.0;
        for (std::size_t i = 0; i < q_floats; ++i) {
          diff += (out[c][i] - out[0][i]) * static_cast<double>(out[c][i] - out[0][i]);
          norm += out[0][i] * static_cast<double>(out[0][i]);
        }
        error_sum[c] += std::sqrt(diff / norm);
      }
    }
  }

  // ---- Report.
  std::printf("kvc quickstart: %d layers, %d query / %d KV heads, head_dim %d, f16 pages of %d tokens\n",
              shape.num_layers, shape.num_q_heads, shape.num_kv_heads, shape.head_dim, config.page_tokens);
  std::printf("prefill %d tokens, compress to 50%%, decode %d steps\n\n", prompt_tokens, decode_steps);
  std::printf("%-13s %17s %19s %15s %12s\n", "", "tokens retained", "MiB in use", "x dense f16", "attention");
  std::printf("%-13s %8s %8s %9s %9s %7s %7s %12s\n", "cache", "before", "after", "before", "after", "before", "after",
              "rel. error");
  double error[3] = {0.0, 0.0, 0.0};
  for (int c = 0; c < 3; ++c) {
    error[c] = error_sum[c] / (decode_steps * shape.num_layers);
    std::printf("%-13s %8lld %8lld %9.2f %9.2f %7.3f %7.3f ", names[c],
                static_cast<long long>(before[c].tokens_retained), static_cast<long long>(after[c].tokens_retained),
                mib(before[c].bytes_in_use), mib(after[c].bytes_in_use), before[c].fraction_of_dense_f16(),
                after[c].fraction_of_dense_f16());
    if (c == 0)
      std::printf("%12s\n", "-");
    else
      std::printf("%12.4f\n", error[c]);
  }

  // ---- Sanity checks, so that the test fails when something is off.
  const std::int64_t streams = shape.streams_per_sequence();
  require(after[0].tokens_retained == streams * prompt_tokens, "the uncompressed cache lost tokens");
  require(before[0].fraction_of_dense_f16() > 0.99 && before[0].fraction_of_dense_f16() < 1.05,
          "an f16 cache should take about the dense f16 size");
  for (int c = 1; c < 3; ++c) {
    require(after[c].tokens_retained == streams * prompt_tokens / 2, "compress did not keep exactly half");
    const double ratio = static_cast<double>(after[c].bytes_in_use) / static_cast<double>(before[c].bytes_in_use);
    require(ratio > 0.45 && ratio < 0.55, "memory after compress is not about half");
    require(std::isfinite(error[c]) && error[c] > 0.0 && error[c] < 1.0, "attention error is not in (0, 1)");
  }
  return 0;
}
