// bench/bench_scorers.cpp: scoring throughput of every kvc::score:: scorer, single thread.
//
// One iteration scores one stream (one KV head of one layer) of n tokens: it calls
// Scorer::score() on a kvc::stream_data that holds the stream as compress() would load it
// (float keys and values [n][128], positions, log-weights, the observed queries of the
// KV head's group of 4 query heads, attention statistics, key norms as a cache with
// observe.key_norms keeps them). The rate is token-heads per second: n divided by the time
// of one call. Data is synthetic (Gaussian keys with a few large channels, values, queries
// correlated with the keys), generated once per size.
//
// The workspace a scorer may use is allocated outside the timed region, as the cache
// allocates its own once at create().
//
// Two rows measure this machine in the same run, so that each scorer's figure can be read
// against what bounds it: `bound_read_keys` is one pass over the float keys (a sum, n * 512
// bytes), the memory-read bound of any scorer that must read every key once; `bound_fma`
// is the single-thread peak of fused multiply-adds (independent accumulators in
// registers), reported as fma/s, the bound of the scorers whose cost is arithmetic.
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <vector>

#include <kvc/kvc.hpp>

namespace {

constexpr int head_dim = 128;
constexpr int q_heads = 32;
constexpr int kv_heads = 8;
constexpr int group = q_heads / kv_heads;
constexpr int observed = 64;  // observed queries (the window of SnapKV-like scorers)

// One stream as compress() would present it.
struct stream_fixture {
  kvc::model_shape shape{1, q_heads, kv_heads, head_dim};
  kvc::rope_spec rope;
  std::vector<float> keys, values, queries, attention_sum, attention_count, last_attention, log_weights, key_norms;
  std::vector<std::int32_t> positions, query_positions;
  kvc::stream_data data;

  explicit stream_fixture(int n) {
    std::mt19937 rng(1234u + static_cast<unsigned>(n));
    std::normal_distribution<float> normal;
    const std::size_t d = head_dim;
    keys.resize(static_cast<std::size_t>(n) * d);
    values.resize(keys.size());
    for (std::size_t i = 0; i < keys.size(); ++i) {
      const std::size_t c = i % d;
      keys[i] = normal(rng) * (c % 32 == 3 ? 8.0f : 1.0f);  // a few outlier channels
      values[i] = normal(rng);
    }
    positions.resize(static_cast<std::size_t>(n));
    log_weights.assign(static_cast<std::size_t>(n), 0.0f);
    for (int i = 0; i < n; ++i) positions[static_cast<std::size_t>(i)] = i;
    queries.resize(static_cast<std::size_t>(observed) * group * d);
    query_positions.resize(observed);
    for (int j = 0; j < observed; ++j) {
      query_positions[static_cast<std::size_t>(j)] = n - observed + j;
      const float* k = &keys[static_cast<std::size_t>(n - observed + j) * d];
      for (int g = 0; g < group; ++g)
        for (std::size_t c = 0; c < d; ++c)
          queries[(static_cast<std::size_t>(j) * group + static_cast<std::size_t>(g)) * d + c] =
              0.5f * k[c] + normal(rng);
    }
    key_norms.resize(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i)
      key_norms[static_cast<std::size_t>(i)] = std::sqrt(
          kvc::detail::dot(&keys[static_cast<std::size_t>(i) * d], &keys[static_cast<std::size_t>(i) * d], head_dim));
    attention_sum.resize(static_cast<std::size_t>(n));
    attention_count.resize(static_cast<std::size_t>(n));
    last_attention.resize(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) {
      attention_count[static_cast<std::size_t>(i)] = static_cast<float>(n - i);
      attention_sum[static_cast<std::size_t>(i)] = std::abs(normal(rng)) / static_cast<float>(n);
      last_attention[static_cast<std::size_t>(i)] = std::abs(normal(rng)) / static_cast<float>(n);
    }
    data.shape = &shape;
    data.info = {0, 0, n};
    data.positions = positions.data();
    data.log_weights = log_weights.data();
    data.keys = keys.data();
    data.values = values.data();
    data.queries = queries.data();
    data.query_positions = query_positions.data();
    data.n_queries = observed;
    data.attention_sum = attention_sum.data();
    data.attention_count = attention_count.data();
    data.last_attention = last_attention.data();
    data.key_norms = key_norms.data();
    data.rope = &rope;
  }
};

const stream_fixture& fixture(int n) {
  static std::map<int, std::unique_ptr<stream_fixture>> cache;
  auto& f = cache[n];
  if (!f) f = std::make_unique<stream_fixture>(n);
  return *f;
}

template <class Scorer>
void run_scorer(benchmark::State& state, const Scorer& scorer) {
  const int n = static_cast<int>(state.range(0));
  const stream_fixture& f = fixture(n);
  kvc::workspace ws(std::size_t{256} << 20);
  std::vector<float> scores(static_cast<std::size_t>(n));
  for (auto _ : state) {
    const kvc::status s = scorer.score(f.data, ws, scores.data());
    if (!s.ok()) {
      state.SkipWithError(s.message());
      break;
    }
    benchmark::DoNotOptimize(scores.data());
    benchmark::ClobberMemory();
  }
  state.counters["token-heads/s"] =
      benchmark::Counter(static_cast<double>(n) * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}

void sizes(benchmark::internal::Benchmark* b) {
  for (int n : {4096, 16384, 32768}) b->Arg(n);
  b->ArgName("tokens")->Unit(benchmark::kMicrosecond);
}

// The oracle needs future queries per layer: the observed ones stand in for them.
void oracle_scorer(benchmark::State& state) {
  const stream_fixture& f = fixture(static_cast<int>(state.range(0)));
  // The oracle reads [n][num_q_heads][d] rows; spread the group's observed queries over all heads.
  static std::vector<float> q;
  q.assign(static_cast<std::size_t>(observed) * q_heads * head_dim, 0.0f);
  for (int j = 0; j < observed; ++j)
    for (int h = 0; h < q_heads; ++h)
      for (int c = 0; c < head_dim; ++c)
        q[(static_cast<std::size_t>(j) * q_heads + static_cast<std::size_t>(h)) * head_dim +
          static_cast<std::size_t>(c)] =
            f.queries[(static_cast<std::size_t>(j) * group + static_cast<std::size_t>(h % group)) * head_dim +
                      static_cast<std::size_t>(c)];
  const kvc::score::future_queries layer{q.data(), f.query_positions.data(), observed};
  kvc::score::oracle scorer;
  scorer.layers = kvc::span<const kvc::score::future_queries>(&layer, 1);
  run_scorer(state, scorer);
}

// What compress() does for knorm when the cache does not keep key norms: one norm per
// stored key (here from the float keys).
void knorm_from_keys(benchmark::State& state) {
  const int n = static_cast<int>(state.range(0));
  const stream_fixture& f = fixture(n);
  std::vector<float> norms(static_cast<std::size_t>(n));
  for (auto _ : state) {
    for (int i = 0; i < n; ++i) {
      const float* k = f.keys.data() + static_cast<std::size_t>(i) * head_dim;
      norms[static_cast<std::size_t>(i)] = std::sqrt(kvc::detail::dot(k, k, head_dim));
    }
    benchmark::DoNotOptimize(norms.data());
    benchmark::ClobberMemory();
  }
  state.counters["token-heads/s"] =
      benchmark::Counter(static_cast<double>(n) * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}

// One pass over the keys: the memory-read bound of a scorer that reads each key once.
void bound_read_keys(benchmark::State& state) {
  const int n = static_cast<int>(state.range(0));
  const stream_fixture& f = fixture(n);
  const std::size_t count = static_cast<std::size_t>(n) * head_dim;
  for (auto _ : state) {
    float acc[32] = {};
    const float* k = f.keys.data();
    for (std::size_t i = 0; i < count; i += 32)
      for (int j = 0; j < 32; ++j) acc[j] += k[i + static_cast<std::size_t>(j)];
    benchmark::DoNotOptimize(acc);
  }
  state.counters["token-heads/s"] =
      benchmark::Counter(static_cast<double>(n) * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["GB/s"] =
      benchmark::Counter(static_cast<double>(count) * sizeof(float) * 1e-9 * static_cast<double>(state.iterations()),
                         benchmark::Counter::kIsRate);
}

// Peak fused multiply-adds per second on one thread: 96 independent accumulators that
// the compiler keeps in vector registers.
void bound_fma(benchmark::State& state) {
  constexpr int lanes = 96, steps = 4096;
  float acc[lanes];
  for (int j = 0; j < lanes; ++j) acc[j] = 1.0f + 1e-3f * static_cast<float>(j);
  float a = 0.999f, b = 1e-4f;
  benchmark::DoNotOptimize(a);
  benchmark::DoNotOptimize(b);
  for (auto _ : state) {
    for (int t = 0; t < steps; ++t)
      for (int j = 0; j < lanes; ++j) acc[j] = std::fma(acc[j], a, b);
    benchmark::DoNotOptimize(acc);
  }
  state.counters["fma/s"] = benchmark::Counter(
      static_cast<double>(lanes) * steps * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}

}  // namespace

BENCHMARK(bound_read_keys)->Apply(sizes);
BENCHMARK(bound_fma);
BENCHMARK(knorm_from_keys)->Apply(sizes);
BENCHMARK_CAPTURE(run_scorer, streaming, kvc::score::streaming{})->Apply(sizes);
BENCHMARK_CAPTURE(run_scorer, knorm, kvc::score::knorm{})->Apply(sizes);
BENCHMARK_CAPTURE(run_scorer, random, kvc::score::random{})->Apply(sizes);
BENCHMARK(oracle_scorer)->Apply(sizes);
BENCHMARK_CAPTURE(run_scorer, expected_attention, kvc::score::expected_attention{})->Apply(sizes);
BENCHMARK_CAPTURE(run_scorer, leverage, kvc::score::leverage{})->Apply(sizes);
BENCHMARK_CAPTURE(run_scorer, compactor, kvc::score::compactor{})->Apply(sizes);
BENCHMARK_CAPTURE(run_scorer, snapkv, kvc::score::snapkv{})->Apply(sizes);
BENCHMARK_CAPTURE(run_scorer, h2o, kvc::score::h2o{})->Apply(sizes);
BENCHMARK_CAPTURE(run_scorer, tova, kvc::score::tova{})->Apply(sizes);
BENCHMARK_CAPTURE(run_scorer, qfilter, kvc::score::qfilter{})->Apply(sizes);
BENCHMARK_CAPTURE(run_scorer, keydiff, kvc::score::keydiff{})->Apply(sizes);

BENCHMARK_MAIN();
