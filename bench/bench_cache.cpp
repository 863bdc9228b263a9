// bench/bench_cache.cpp: speed of kvc::paged_kv_cache on a decode-shaped model
// (head_dim 128, 32 query heads, 8 KV heads), single thread.
//
//   read_probe   streaming read of a 1 GiB float buffer (a sum with independent
//                accumulators): this machine's single-thread read bandwidth. It is
//                measured first in main(), and the attend rates are reported against it.
//   attend       one decode query per call, one layer per call; the cache bytes the call
//                reads (key and value payload plus positions and log-weights of every
//                retained token of that layer) per second, and that rate as a fraction
//                of the probe. Successive calls walk round-robin over enough layers that
//                the working set is far larger than the last-level cache, as in decode.
//   append       K/V bytes appended per second (float input, sealing included), one
//                token per call (decode) or 1024 per call (prefill chunks).
//   compress     kvc::evict(knorm, uniform::keep_fraction(0.5)) over one layer; context
//                tokens and token-heads per second. The sequence is refilled outside the
//                timed region before every call.
//   code_kernels the fused kernels of quantized pages alone, on one 64-token page in L1
//                (head_dim 128, the 4 query heads of a GQA group): keys (q.k from the codes)
//                and values (p.v into 4 outputs), ns per token and KV head, for the kernels
//                attend uses (integer kernels for 2, 4 and 8 bits with AVX2) and, in the
//                same run, the float kernels they replace and the byte kernels of
//                codec::weights8 (8-bit weights; 2 and 4 bits).
//   mac_floor    the multiply-add instructions alone that one code kernel needs per token
//                and KV head, operands in registers: the floor under code_kernels.
//
// Every benchmark times itself (manual time, wall clock), so rates are bytes or tokens
// divided by the time spent inside the measured call only.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include <kvc/kvc.hpp>

namespace {

using clock_type = std::chrono::steady_clock;

constexpr int head_dim = 128;
constexpr int q_heads = 32;
constexpr int kv_heads = 8;
constexpr int fill_chunk = 1024;                           // tokens per append when filling a cache
constexpr std::size_t attend_working_set = 256ull << 20;   // bytes read per sweep over the layers, at least
constexpr std::size_t probe_bytes = std::size_t{1} << 30;  // 1 GiB

double seconds_since(clock_type::time_point t0) {
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

// ------------------------------------------------------------------ read probe

std::vector<float>& probe_buffer() {
  static std::vector<float> buf = [] {
    std::vector<float> b(probe_bytes / sizeof(float));
    for (std::size_t i = 0; i < b.size(); ++i) b[i] = static_cast<float>(i & 1023u) * 0.0009765625f;
    return b;
  }();
  return buf;
}

// Sum of n floats with independent accumulators, so that the adds never wait on each
// other and the loop is limited by how fast memory delivers the data.
float stream_sum(const float* p, std::size_t n) {
  std::size_t i = 0;
#if defined(__AVX__)
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  for (; i + 64 <= n; i += 64) {
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i + 8));
    a2 = _mm256_add_ps(a2, _mm256_loadu_ps(p + i + 16));
    a3 = _mm256_add_ps(a3, _mm256_loadu_ps(p + i + 24));
    a4 = _mm256_add_ps(a4, _mm256_loadu_ps(p + i + 32));
    a5 = _mm256_add_ps(a5, _mm256_loadu_ps(p + i + 40));
    a6 = _mm256_add_ps(a6, _mm256_loadu_ps(p + i + 48));
    a7 = _mm256_add_ps(a7, _mm256_loadu_ps(p + i + 56));
  }
  const __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                                 _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, s);
  float total = 0.0f;
  for (float x : lanes) total += x;
#else
  float acc[32] = {};
  for (; i + 32 <= n; i += 32)
    for (int j = 0; j < 32; ++j) acc[j] += p[i + j];
  float total = 0.0f;
  for (float x : acc) total += x;
#endif
  for (; i < n; ++i) total += p[i];
  return total;
}

// Bytes per second of one pass over the probe buffer.
double probe_pass() {
  const std::vector<float>& b = probe_buffer();
  const clock_type::time_point t0 = clock_type::now();
  benchmark::DoNotOptimize(stream_sum(b.data(), b.size()));
  return static_cast<double>(b.size() * sizeof(float)) / seconds_since(t0);
}

double probe_bytes_per_second = 0.0;  // measured in main() before the benchmarks

void BM_read_probe(benchmark::State& state) {
  const std::vector<float>& b = probe_buffer();
  for (auto _ : state) {
    const clock_type::time_point t0 = clock_type::now();
    benchmark::DoNotOptimize(stream_sum(b.data(), b.size()));
    state.SetIterationTime(seconds_since(t0));
  }
  state.counters["read"] =
      benchmark::Counter(static_cast<double>(b.size() * sizeof(float)), benchmark::Counter::kIsIterationInvariantRate,
                         benchmark::Counter::OneK::kIs1000);
}

// ------------------------------------------------------------------ cache setup

// Deterministic uniform values in [-sqrt(3), sqrt(3)) (unit variance): finite and in
// range for every codec. The values do not change the speed of anything measured.
struct rng {
  std::uint64_t s;
  float next() {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return (static_cast<float>(s >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f) * 1.7320508f;
  }
  void fill(std::vector<float>& v) {
    for (float& x : v) x = next();
  }
};

template <class Codec>
struct fixture {
  kvc::paged_kv_cache<Codec> cache;
  kvc::seq_id seq{};
};

// Pool bytes for `streams` streams of `tokens` tokens each, every page counted as an open
// (float) slab: enough for any codec, and the pool only touches the pages it hands out.
std::size_t pool_bytes(int streams, int tokens, int page_tokens) {
  const std::size_t slab =
      kvc::detail::align_up(kvc::make_page_layout<kvc::codec::f32, kvc::codec::f32>(page_tokens, head_dim).bytes);
  const std::size_t pages = static_cast<std::size_t>(tokens / page_tokens + 2);
  return static_cast<std::size_t>(streams) * pages * slab;
}

template <class Codec>
std::unique_ptr<fixture<Codec>> make_cache(int layers, int max_context, int page_tokens) {
  kvc::cache_config cfg;
  cfg.shape = {layers, q_heads, kv_heads, head_dim};
  cfg.page_tokens = page_tokens;
  cfg.max_context = max_context;
  cfg.capacity_bytes = pool_bytes(layers * kv_heads, max_context, page_tokens);
  auto c = kvc::paged_kv_cache<Codec>::create(cfg);
  if (!c.ok()) {
    std::fprintf(stderr, "bench_cache: %s\n", c.status().message());
    return nullptr;
  }
  return std::unique_ptr<fixture<Codec>>(new fixture<Codec>{std::move(c).value(), kvc::seq_id{}});
}

// Appends tokens [0, n) of random keys and values to every layer of `seq`.
template <class Codec>
bool fill(kvc::paged_kv_cache<Codec>& cache, kvc::seq_id seq, int n, std::uint64_t seed) {
  const std::size_t row = static_cast<std::size_t>(kv_heads) * head_dim;
  std::vector<float> k(fill_chunk * row), v(fill_chunk * row);
  std::vector<std::int32_t> pos(fill_chunk);
  rng r{seed * 0x9E3779B97F4A7C15ull + 1};
  for (int layer = 0; layer < cache.shape().num_layers; ++layer) {
    for (int t0 = 0; t0 < n; t0 += fill_chunk) {
      const int m = std::min(fill_chunk, n - t0);
      r.fill(k);
      r.fill(v);
      for (int i = 0; i < m; ++i) pos[static_cast<std::size_t>(i)] = t0 + i;
      const kvc::status st = cache.append(seq, layer, k.data(), v.data(), pos.data(), m);
      if (!st.ok()) {
        std::fprintf(stderr, "bench_cache: append: %s\n", st.message());
        return false;
      }
    }
  }
  return true;
}

// Bytes attend() reads for one layer: per retained token, its key and value rows in the
// page's storage (float in the open page, the codec's otherwise), its position and its
// log-weight.
// Key and value payload of a sealed page per token, position and log-weight included (the
// quantized codecs' scales and zero points are part of the payload).
template <class Codec>
std::size_t sealed_token_bytes(int page_tokens) {
  using K = kvc::detail::key_role_t<Codec>;
  using V = kvc::detail::value_role_t<Codec>;
  return (K::page_bytes(page_tokens, head_dim) + V::page_bytes(page_tokens, head_dim)) /
             static_cast<std::size_t>(page_tokens) +
         sizeof(std::int32_t) + sizeof(float);
}

template <class Codec>
std::size_t layer_bytes_read(const kvc::paged_kv_cache<Codec>& cache, kvc::seq_id seq, int layer, int page_tokens) {
  std::size_t bytes = 0;
  const std::size_t sealed_row = sealed_token_bytes<Codec>(page_tokens);
  const std::size_t open_row = 2 * kvc::codec::f32::row_bytes(head_dim) + sizeof(std::int32_t) + sizeof(float);
  for (int h = 0; h < kv_heads; ++h) {
    auto v = cache.view(seq, layer, h);
    if (!v.ok()) return 0;
    for (int i = 0; i < v->page_count(); ++i)
      bytes += static_cast<std::size_t>(v->page_tokens(i)) * (v->page_sealed(i) ? sealed_row : open_row);
  }
  return bytes;
}

// One fixture alive at a time: building a long-context cache is expensive, and the
// benchmark library calls each benchmark function several times while it sizes the run.
struct fixture_slot {
  std::string key;
  std::shared_ptr<void> value;
};
fixture_slot current_fixture;

template <class T, class Make>
T* cached(const std::string& key, Make make) {
  if (current_fixture.key != key) {
    current_fixture.value.reset();  // free the previous cache before building the next
    current_fixture.key.clear();
    std::shared_ptr<T> made(make());
    if (!made) return nullptr;
    current_fixture.value = made;
    current_fixture.key = key;
  }
  return static_cast<T*>(current_fixture.value.get());
}

// ------------------------------------------------------------------ attend

template <class Codec>
struct attend_fixture {
  std::unique_ptr<fixture<Codec>> f;
  int layers = 0;
  std::size_t bytes_per_layer = 0;
};

template <class Codec>
void BM_attend(benchmark::State& state) {
  const int n_ctx = static_cast<int>(state.range(0));
  const int page_tokens = static_cast<int>(state.range(1));
  const std::string key =
      std::string("attend/") + Codec::name + "/" + std::to_string(n_ctx) + "/" + std::to_string(page_tokens);
  auto* af = cached<attend_fixture<Codec>>(key, [&]() -> attend_fixture<Codec>* {
    // Enough layers that one sweep reads attend_working_set bytes or more.
    const std::size_t per_layer = static_cast<std::size_t>(n_ctx) * kv_heads * sealed_token_bytes<Codec>(page_tokens);
    const int layers = static_cast<int>(std::max<std::size_t>(1, (attend_working_set + per_layer - 1) / per_layer));
    auto f = make_cache<Codec>(layers, n_ctx, page_tokens);
    if (!f) return nullptr;
    f->seq = f->cache.create_sequence();
    if (!fill(f->cache, f->seq, n_ctx, 1)) return nullptr;
    auto* a = new attend_fixture<Codec>{std::move(f), layers, 0};
    a->bytes_per_layer = layer_bytes_read(a->f->cache, a->f->seq, 0, page_tokens);
    return a;
  });
  if (af == nullptr) {
    state.SkipWithError("could not build the cache");
    return;
  }
  std::vector<float> q(static_cast<std::size_t>(q_heads) * head_dim), out(q.size());
  rng r{7};
  r.fill(q);
  const std::int32_t q_pos = n_ctx;  // the next decode position: every token is visible
  int layer = 0;
  double seconds = 0.0;
  for (auto _ : state) {
    const clock_type::time_point t0 = clock_type::now();
    const kvc::status st = af->f->cache.attend(af->f->seq, layer, q.data(), &q_pos, 1, out.data());
    const double dt = seconds_since(t0);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
    if (!st.ok()) {
      state.SkipWithError(st.message());
      break;
    }
    seconds += dt;
    state.SetIterationTime(dt);
    if (++layer == af->layers) layer = 0;
  }
  const double bytes = static_cast<double>(af->bytes_per_layer);
  const double rate = seconds > 0.0 ? bytes * static_cast<double>(state.iterations()) / seconds : 0.0;
  state.counters["read"] =
      benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::OneK::kIs1000);
  state.counters["of_probe"] = probe_bytes_per_second > 0.0 ? rate / probe_bytes_per_second : 0.0;
  state.counters["B/token-head"] = bytes / (static_cast<double>(n_ctx) * kv_heads);
  state.counters["layers"] = af->layers;
}

// ------------------------------------------------------------------ append

template <class Codec>
struct append_fixture {
  std::unique_ptr<fixture<Codec>> f;
  std::vector<float> k, v;  // one chunk of input, reused at every position
};

template <class Codec>
void BM_append(benchmark::State& state) {
  const int n_ctx = static_cast<int>(state.range(0));
  const int chunk = static_cast<int>(state.range(1));
  const std::string key = std::string("append/") + Codec::name + "/" + std::to_string(n_ctx);
  auto* af = cached<append_fixture<Codec>>(key, [&]() -> append_fixture<Codec>* {
    auto f = make_cache<Codec>(1, n_ctx, 16);
    if (!f) return nullptr;
    // Touch every page the benchmark will use once, as a serving engine's warm pool would.
    const kvc::seq_id s = f->cache.create_sequence();
    if (!fill(f->cache, s, n_ctx, 2)) return nullptr;
    if (!f->cache.release(s).ok()) return nullptr;
    auto* a = new append_fixture<Codec>{std::move(f), {}, {}};
    rng r{3};
    a->k.resize(static_cast<std::size_t>(fill_chunk) * kv_heads * head_dim);
    a->v.resize(a->k.size());
    r.fill(a->k);
    r.fill(a->v);
    return a;
  });
  if (af == nullptr) {
    state.SkipWithError("could not build the cache");
    return;
  }
  auto& cache = af->f->cache;
  std::vector<std::int32_t> pos(static_cast<std::size_t>(n_ctx));
  for (int i = 0; i < n_ctx; ++i) pos[static_cast<std::size_t>(i)] = i;
  for (auto _ : state) {
    const kvc::seq_id s = cache.create_sequence();
    const clock_type::time_point t0 = clock_type::now();
    for (int t = 0; t < n_ctx; t += chunk) {
      const kvc::status st = cache.append(s, 0, af->k.data(), af->v.data(), pos.data() + t, std::min(chunk, n_ctx - t));
      if (!st.ok()) {
        state.SkipWithError(st.message());
        break;
      }
    }
    state.SetIterationTime(seconds_since(t0));
    if (!cache.release(s).ok()) state.SkipWithError("release failed");
  }
  const double bytes = static_cast<double>(n_ctx) * kv_heads * head_dim * sizeof(float) * 2;
  state.counters["append"] =
      benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::OneK::kIs1000);
  state.counters["tokens/s"] =
      benchmark::Counter(n_ctx, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::OneK::kIs1000);
}

// ------------------------------------------------------------------ compress

template <class Codec>
void BM_compress(benchmark::State& state) {
  const int n_ctx = static_cast<int>(state.range(0));
  const std::string key = std::string("compress/") + Codec::name + "/" + std::to_string(n_ctx);
  auto* f = cached<fixture<Codec>>(key, [&] { return make_cache<Codec>(1, n_ctx, 16).release(); });
  if (f == nullptr) {
    state.SkipWithError("could not build the cache");
    return;
  }
  const auto policy = kvc::evict(kvc::score::knorm{}, kvc::budget::uniform::keep_fraction(0.5));
  std::int64_t kept = 0, before = 0;
  std::uint64_t seed = 10;
  for (auto _ : state) {
    const kvc::seq_id s = f->cache.create_sequence();
    if (!fill(f->cache, s, n_ctx, ++seed)) {
      state.SkipWithError("fill failed");
      break;
    }
    const clock_type::time_point t0 = clock_type::now();
    auto rep = f->cache.compress(s, policy);
    state.SetIterationTime(seconds_since(t0));
    if (!rep.ok()) {
      state.SkipWithError(rep.status().message());
      break;
    }
    kept += rep->tokens_after;
    before += rep->tokens_before;
    if (!f->cache.release(s).ok()) state.SkipWithError("release failed");
  }
  state.counters["tokens/s"] =
      benchmark::Counter(n_ctx, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::OneK::kIs1000);
  state.counters["token-heads/s"] =
      benchmark::Counter(static_cast<double>(n_ctx) * kv_heads, benchmark::Counter::kIsIterationInvariantRate,
                         benchmark::Counter::OneK::kIs1000);
  state.counters["kept"] = before > 0 ? static_cast<double>(kept) / static_cast<double>(before) : 0.0;
}

// ------------------------------------------------------------------ registration

void attend_args(benchmark::internal::Benchmark* b) {
  for (int page : {16, 64})
    for (int n : {1 << 10, 4 << 10, 16 << 10, 32 << 10, 64 << 10}) b->Args({n, page});
  b->ArgNames({"ctx", "page"})->UseManualTime()->Unit(benchmark::kMicrosecond);
}

// The quantized codecs at the contexts where decode attention is long: 16K to 64K tokens.
void quantized_attend_args(benchmark::internal::Benchmark* b) {
  for (int page : {16, 64})
    for (int n : {16 << 10, 32 << 10, 64 << 10}) b->Args({n, page});
  b->ArgNames({"ctx", "page"})->UseManualTime()->Unit(benchmark::kMicrosecond);
}

// ------------------------------------------------------------------ code kernels

// One page of 64 rows of random B-bit codes (d = 128) and what the kernels read with it.
template <int Bits>
struct code_page {
  static constexpr int rows = 64, d = head_dim, nq = 4, groups = head_dim / 32;
  std::size_t stride = kvc::detail::packed_bytes(d, Bits);
  std::vector<std::uint8_t> codes;
  std::vector<float> w, p, scale, zero, out, acc;
  code_page() {
    rng r{11};
    std::vector<std::uint8_t> c(static_cast<std::size_t>(d));
    codes.resize(rows * stride);
    for (int t = 0; t < rows; ++t) {
      for (auto& x : c) {
        r.next();
        x = static_cast<std::uint8_t>((r.s >> 33) % (1u << Bits));
      }
      kvc::detail::pack_codes(c.data(), d, Bits, codes.data() + static_cast<std::size_t>(t) * stride);
    }
    w.resize(nq * d);
    p.resize(nq * rows);
    scale.resize(rows * groups);
    zero.resize(scale.size());
    r.fill(w);
    r.fill(p);
    r.fill(scale);
    r.fill(zero);
    for (float& x : p) x = std::fabs(x);
    for (float& x : scale) x = std::fabs(x) * 0.1f;
    out.resize(nq * rows);
    acc.assign(nq * d, 0.0f);
  }
};

// Nanoseconds per row of an iteration that handles `rows` rows (one token and KV head each).
benchmark::Counter ns_per_row(int rows) {
  return benchmark::Counter(static_cast<double>(rows) * 1e-9,
                            benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

// Which kernels: 0 the ones attend uses, 1 the float kernels (AVX2 builds), 2 those with 8-bit
// weights (codec::weights8; the byte kernels for 2- and 4-bit codes).
template <int Bits, int Which>
void BM_code_kernels(benchmark::State& state) {
  if (Which == 1 && !kvc::detail::code_kernels_simd) {
    state.SkipWithError("no AVX2 float kernels in this build");
    return;
  }
  constexpr int weight_bits = Which == 2 ? 8 : 16;
  code_page<Bits> pg;
  const bool values = state.range(0) != 0;
  using page_t = code_page<Bits>;
  for (auto _ : state) {
    if (!values) {
      if constexpr (Which != 1) {
        kvc::detail::dot_code_rows<Bits, weight_bits>(pg.w.data(), page_t::nq, pg.codes.data(), pg.stride, page_t::rows,
                                                      page_t::d, pg.out.data());
      } else {
#if KVC_CODE_KERNELS_AVX2
        kvc::detail::code_kernel::avx2::dot_rows_simd<Bits, false>(pg.w.data(), page_t::nq, pg.codes.data(), pg.stride,
                                                                   page_t::rows, page_t::d, pg.out.data());
#endif
      }
      benchmark::DoNotOptimize(pg.out.data());
    } else {
      if constexpr (Which != 1) {
        kvc::detail::accumulate_code_rows<Bits, weight_bits>(pg.p.data(), page_t::nq, pg.codes.data(), pg.stride,
                                                             page_t::rows, page_t::d, 32, pg.scale.data(),
                                                             pg.zero.data(), pg.acc.data());
      } else {
#if KVC_CODE_KERNELS_AVX2
        kvc::detail::code_kernel::avx2::accumulate_rows_simd<Bits, false>(
            pg.p.data(), page_t::nq, pg.codes.data(), pg.stride, page_t::rows, page_t::d, 32, pg.scale.data(),
            pg.zero.data(), pg.acc.data());
#endif
      }
      benchmark::DoNotOptimize(pg.acc.data());
    }
    benchmark::ClobberMemory();
  }
  // Per token and KV head: one row of codes against the 4 query heads of its group.
  state.counters["ns/token-head"] = ns_per_row(page_t::rows);
  const int group = values ? 32 : 0;
  state.counters["integer"] = (Which == 0 && kvc::detail::integer_code_kernels<Bits>(page_t::d, group)) ||
                              (Which == 2 && kvc::detail::byte_code_kernels<Bits>(page_t::d, group));
}

void code_kernel_args(benchmark::internal::Benchmark* b) { b->ArgNames({"values"})->Arg(0)->Arg(1); }

// The floor under BM_code_kernels: a token and KV head takes nq d = 512 multiply-adds for its
// logits and as many for its values. The integer kernels (WeightBits 16) do them as 32
// VPMADDWD (sixteen products each) and 32 VPADDD; the byte kernels (WeightBits 8,
// codec::weights8) as 16 VPMADDUBSW (32 products each) and 16 VPADDW. This times exactly
// those instructions, 64 rows at a time, in eight independent sums with every operand in
// registers: no unpacking, loads or softmax. The float kernels need as many FMAs as
// VPMADDWDs (eight products each, two issued a cycle), so WeightBits 16 bounds them too. ns
// per token and KV head for one kernel (keys or values).
template <int WeightBits>
void BM_mac_floor(benchmark::State& state) {
#if KVC_CODE_KERNELS_AVX2 && (defined(__GNUC__) || defined(__clang__))
  using page_t = code_page<4>;
  constexpr int per_instruction = WeightBits == 16 ? 16 : 32;
  constexpr int ops = page_t::nq * page_t::d / per_instruction;  // per row
  static_assert(ops % 8 == 0, "eight sums");
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  __m256i x = _mm256_set1_epi16(3);
  const __m256i y = _mm256_set1_epi16(5);
  // A new product each time (x is opaque to the compiler): none is hoisted or shared.
  const auto mac = [&x, &y](__m256i& a) {
    if constexpr (WeightBits == 16)
      a = _mm256_add_epi32(a, _mm256_madd_epi16(x, y));
    else
      a = _mm256_add_epi16(a, _mm256_maddubs_epi16(x, y));
    __asm__("" : "+x"(x));
  };
  for (auto _ : state) {
    for (int r = 0; r < page_t::rows; ++r)
      for (int i = 0; i < ops; i += 8) {
        mac(a0), mac(a1), mac(a2), mac(a3), mac(a4), mac(a5), mac(a6), mac(a7);
      }
    benchmark::DoNotOptimize(a0), benchmark::DoNotOptimize(a1), benchmark::DoNotOptimize(a2);
    benchmark::DoNotOptimize(a3), benchmark::DoNotOptimize(a4), benchmark::DoNotOptimize(a5);
    benchmark::DoNotOptimize(a6), benchmark::DoNotOptimize(a7);
  }
  state.counters["ns/token-head"] = ns_per_row(page_t::rows);
#else
  state.SkipWithError("no AVX2 in this build");
#endif
}

void append_args(benchmark::internal::Benchmark* b) {
  for (int chunk : {1, 1024})
    for (int n : {1 << 10, 16 << 10, 64 << 10}) b->Args({n, chunk});
  b->ArgNames({"ctx", "chunk"})->UseManualTime()->Unit(benchmark::kMillisecond);
}

void compress_args(benchmark::internal::Benchmark* b) {
  for (int n : {1 << 10, 4 << 10, 16 << 10, 64 << 10}) b->Args({n});
  b->ArgNames({"ctx"})->UseManualTime()->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_read_probe)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_attend, kvc::codec::f32)->Apply(attend_args);
BENCHMARK_TEMPLATE(BM_attend, kvc::codec::f16)->Apply(attend_args);
BENCHMARK_TEMPLATE(BM_attend, kvc::codec::bf16)->Apply(attend_args);
BENCHMARK_TEMPLATE(BM_attend, kvc::codec::int8)->Apply(quantized_attend_args);
BENCHMARK_TEMPLATE(BM_attend, kvc::codec::kivi<8>)->Apply(quantized_attend_args);
BENCHMARK_TEMPLATE(BM_attend, kvc::codec::kivi<4>)->Apply(quantized_attend_args);
BENCHMARK_TEMPLATE(BM_attend, kvc::codec::kivi<2>)->Apply(quantized_attend_args);
BENCHMARK_TEMPLATE(BM_attend, kvc::codec::kivi<2, 32, kvc::codec::rotation::none, 3>)->Apply(quantized_attend_args);
BENCHMARK_TEMPLATE(BM_attend, kvc::codec::weights8<kvc::codec::kivi<4>>)->Apply(quantized_attend_args);
BENCHMARK_TEMPLATE(BM_attend, kvc::codec::weights8<kvc::codec::kivi<2>>)->Apply(quantized_attend_args);
BENCHMARK_TEMPLATE(BM_attend, kvc::codec::gear<kvc::codec::kivi<4>>)->Apply(quantized_attend_args);
BENCHMARK_TEMPLATE(BM_attend, kvc::codec::gear<kvc::codec::kivi<2>>)->Apply(quantized_attend_args);
BENCHMARK_TEMPLATE(BM_code_kernels, 2, 0)->Apply(code_kernel_args);
BENCHMARK_TEMPLATE(BM_code_kernels, 2, 1)->Apply(code_kernel_args);
BENCHMARK_TEMPLATE(BM_code_kernels, 4, 0)->Apply(code_kernel_args);
BENCHMARK_TEMPLATE(BM_code_kernels, 4, 1)->Apply(code_kernel_args);
BENCHMARK_TEMPLATE(BM_code_kernels, 8, 0)->Apply(code_kernel_args);
BENCHMARK_TEMPLATE(BM_code_kernels, 8, 1)->Apply(code_kernel_args);
BENCHMARK_TEMPLATE(BM_code_kernels, 2, 2)->Apply(code_kernel_args);
BENCHMARK_TEMPLATE(BM_code_kernels, 4, 2)->Apply(code_kernel_args);
BENCHMARK_TEMPLATE(BM_mac_floor, 16);
BENCHMARK_TEMPLATE(BM_mac_floor, 8);
BENCHMARK_TEMPLATE(BM_append, kvc::codec::f32)->Apply(append_args);
BENCHMARK_TEMPLATE(BM_append, kvc::codec::f16)->Apply(append_args);
BENCHMARK_TEMPLATE(BM_append, kvc::codec::bf16)->Apply(append_args);
BENCHMARK_TEMPLATE(BM_compress, kvc::codec::f32)->Apply(compress_args);
BENCHMARK_TEMPLATE(BM_compress, kvc::codec::f16)->Apply(compress_args);
BENCHMARK_TEMPLATE(BM_compress, kvc::codec::bf16)->Apply(compress_args);
BENCHMARK_TEMPLATE(BM_compress, kvc::codec::int8)->Apply(compress_args);
BENCHMARK_TEMPLATE(BM_compress, kvc::codec::kivi<4>)->Apply(compress_args);
BENCHMARK_TEMPLATE(BM_compress, kvc::codec::kivi<2>)->Apply(compress_args);
BENCHMARK_TEMPLATE(BM_compress, kvc::codec::kivi<2, 32, kvc::codec::rotation::none, 3>)->Apply(compress_args);
BENCHMARK_TEMPLATE(BM_compress, kvc::codec::gear<kvc::codec::kivi<2>>)->Apply(compress_args);

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  // The probe first: one pass to fault the buffer in, then the median of nine.
  probe_pass();
  std::vector<double> passes;
  for (int i = 0; i < 9; ++i) passes.push_back(probe_pass());
  std::sort(passes.begin(), passes.end());
  probe_bytes_per_second = passes[passes.size() / 2];
  char text[64];
  std::snprintf(text, sizeof text, "%.2f GB/s (median of 9 passes; best %.2f)", probe_bytes_per_second * 1e-9,
                passes.back() * 1e-9);
  benchmark::AddCustomContext("read_probe", text);
  benchmark::AddCustomContext("kvc", KVC_VERSION_STRING);
  // The probe again after everything else, to show how much the machine drifted meanwhile.
  benchmark::RegisterBenchmark("BM_read_probe_again", BM_read_probe)->UseManualTime()->Unit(benchmark::kMillisecond);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
