// After construction, append() (including page sealing and copy-on-write), attend() and
// compress() (evict with knorm / streaming scores and uniform budgets, on shared pages
// too) never call the system allocator.
//
// This file replaces the global operator new / delete (every standard form: plain,
// array, nothrow, aligned, sized) with versions that forward to malloc / free and count
// calls made by a thread while it is armed. create(), create_sequence() and fork() may
// allocate (the pool, the workspace, page tables sized for max_context), so they run
// before arming.
//
// Eigen's own allocator calls std::malloc and is not seen by this counter. kvc's hot paths
// use Eigen only through Map, which never allocates. EIGEN_RUNTIME_NO_MALLOC is not used
// here: it acts only through eigen_assert, which NDEBUG compiles out, and defining it in
// one translation unit of this multi-file test program would give Eigen's inline
// functions two different definitions.
#include <gtest/gtest.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <vector>

#include <kvc/budget/adakv.hpp>
#include <kvc/budget/byte_cap.hpp>
#include <kvc/budget/pyramid.hpp>
#include <kvc/kvc.hpp>
#include <kvc/policies/decode_schedule.hpp>

namespace {

thread_local bool armed = false;
std::atomic<long> allocations{0}, deallocations{0};

void* counted_alloc(std::size_t n, std::size_t align) noexcept {
  if (armed) allocations.fetch_add(1, std::memory_order_relaxed);
  if (n == 0) n = 1;
  if (align <= alignof(std::max_align_t)) return std::malloc(n);
  void* p = nullptr;
  if (align < sizeof(void*)) align = sizeof(void*);
  return posix_memalign(&p, align, n) == 0 ? p : nullptr;
}

void counted_free(void* p) noexcept {
  if (p == nullptr) return;
  if (armed) deallocations.fetch_add(1, std::memory_order_relaxed);
  std::free(p);
}

void* checked(void* p) {
  if (p == nullptr) {
#if defined(__cpp_exceptions)
    throw std::bad_alloc();
#else
    std::abort();
#endif
  }
  return p;
}

// Counts what the calling thread allocates between construction and stop().
class allocation_counter {
 public:
  allocation_counter() : a0_(allocations.load()), d0_(deallocations.load()) { armed = true; }
  ~allocation_counter() { armed = false; }
  void stop() { armed = false; }
  long allocations_seen() const { return allocations.load() - a0_; }
  long deallocations_seen() const { return deallocations.load() - d0_; }

 private:
  long a0_, d0_;
};

}  // namespace

void* operator new(std::size_t n) { return checked(counted_alloc(n, 0)); }
void* operator new[](std::size_t n) { return checked(counted_alloc(n, 0)); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return counted_alloc(n, 0); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return counted_alloc(n, 0); }
void* operator new(std::size_t n, std::align_val_t a) { return checked(counted_alloc(n, static_cast<std::size_t>(a))); }
void* operator new[](std::size_t n, std::align_val_t a) {
  return checked(counted_alloc(n, static_cast<std::size_t>(a)));
}
void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return counted_alloc(n, static_cast<std::size_t>(a));
}
void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return counted_alloc(n, static_cast<std::size_t>(a));
}
void operator delete(void* p) noexcept { counted_free(p); }
void operator delete[](void* p) noexcept { counted_free(p); }
void operator delete(void* p, std::size_t) noexcept { counted_free(p); }
void operator delete[](void* p, std::size_t) noexcept { counted_free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { counted_free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { counted_free(p); }
void operator delete(void* p, std::align_val_t) noexcept { counted_free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { counted_free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { counted_free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { counted_free(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { counted_free(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { counted_free(p); }

namespace {

// The counter sees every form of operator new / delete while armed, and nothing after stop().
TEST(NoAlloc, CounterSeesEveryForm) {
  allocation_counter c;
  int* a = new int(1);
  int* b = new int[3];
  int* n = new (std::nothrow) int(2);
  struct alignas(128) wide {
    char x[128];
  };
  wide* w = new wide;
  wide* wa = new wide[2];
  void* r = ::operator new (24, std::align_val_t{64});
  std::vector<double> v(10);
  const long allocated = c.allocations_seen();
  delete a;
  delete[] b;
  delete n;
  delete w;
  delete[] wa;
  ::operator delete (r, std::align_val_t{64});
  v = std::vector<double>();
  const long freed = c.deallocations_seen();
  c.stop();
  int* after = new int(3);
  delete after;
  EXPECT_EQ(allocated, 7);
  EXPECT_EQ(freed, 7);
  EXPECT_EQ(c.allocations_seen(), 7);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(w) % 128, 0u);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(r) % 64, 0u);
}

constexpr int L = 2, KVH = 2, QH = 8, D = 64, P = 16;

// The cache every test here builds: 2 layers, GQA 4, head_dim 64, 16-token pages, 8 MiB.
kvc::cache_config small_config() {
  kvc::cache_config cfg;
  cfg.shape.num_layers = L;
  cfg.shape.num_q_heads = QH;
  cfg.shape.num_kv_heads = KVH;
  cfg.shape.head_dim = D;
  cfg.page_tokens = P;
  cfg.max_context = 1024;
  cfg.capacity_bytes = std::size_t{8} << 20;
  return cfg;
}

template <class Codec>
void run_hot_paths() {
  using cache_t = kvc::paged_kv_cache<Codec>;
  kvc::cache_config cfg = small_config();
  auto created = cache_t::create(cfg);
  ASSERT_TRUE(created.ok()) << created.status().message();
  cache_t& cache = *created;

  // Inputs, sized up front: 200 tokens per layer, queries for up to 20 positions.
  const int n = 200, nq = 20;
  std::vector<float> k(static_cast<std::size_t>(n) * KVH * D), v(k.size());
  for (std::size_t i = 0; i < k.size(); ++i) {
    k[i] = static_cast<float>((i * 37) % 101) / 50.0f - 1.0f;
    v[i] = static_cast<float>((i * 53) % 97) / 48.0f - 1.0f;
  }
  std::vector<std::int32_t> pos(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) pos[static_cast<std::size_t>(i)] = 3 * i;
  std::vector<float> q(static_cast<std::size_t>(nq) * QH * D, 0.25f), out(q.size());
  std::vector<std::int32_t> qpos(static_cast<std::size_t>(nq));
  for (int i = 0; i < nq; ++i) qpos[static_cast<std::size_t>(i)] = 30 * i;

  const kvc::seq_id a = cache.create_sequence();
  auto append = [&](kvc::seq_id id, int layer, int from, int count) {
    const std::size_t off = static_cast<std::size_t>(from) * KVH * D;
    return cache.append(id, layer, k.data() + off, v.data() + off, pos.data() + from, count);
  };
  // 45 tokens per layer: two sealed pages and an open page that forks will share.
  for (int l = 0; l < L; ++l) ASSERT_TRUE(append(a, l, 0, 45).ok());
  auto b = cache.fork(a), c = cache.fork(a);
  ASSERT_TRUE(b.ok() && c.ok());
  const kvc::cache_stats before = cache.stats();

  using kvc::budget::uniform;
  const kvc::evict<kvc::score::knorm, uniform> knorm_half({}, uniform::keep_fraction(0.5));
  const kvc::evict<kvc::score::streaming, uniform> streaming_20(kvc::score::streaming{4}, uniform::tokens(20));
  const kvc::evict<kvc::score::streaming, uniform> streaming_30(kvc::score::streaming{2},
                                                                uniform::compression_ratio(0.3));

  std::vector<kvc::status> results(64);  // reserved before arming; filled by assignment
  std::vector<std::int64_t> freed(8, -1);
  std::size_t r = 0;
  allocation_counter counter;
  for (int l = 0; l < L; ++l) {
    results[r++] = append(*b, l, 45, 1);   // copy-on-write of the shared open page
    results[r++] = append(a, l, 45, 30);   // copy-on-write, sealing within the call
    results[r++] = append(*b, l, 46, 70);  // several pages sealed in one call
  }
  for (int l = 0; l < L; ++l) {
    results[r++] = cache.attend(a, l, q.data(), qpos.data(), 1, out.data());    // decode
    results[r++] = cache.attend(*b, l, q.data(), qpos.data(), nq, out.data());  // multi-query
  }
  {
    auto rep = cache.compress(a, knorm_half);
    results[r++] = rep.ok() ? kvc::ok_status() : rep.status();
    freed[0] = rep.ok() ? rep->pages_freed : -1;
  }
  {
    auto rep = cache.compress(*c, streaming_20);  // every page of c is shared with a's old pages
    results[r++] = rep.ok() ? kvc::ok_status() : rep.status();
    freed[1] = rep.ok() ? rep->pages_freed : -1;
  }
  {
    auto rep = cache.compress(*b, 1, streaming_30);  // one layer
    results[r++] = rep.ok() ? kvc::ok_status() : rep.status();
  }
  for (int l = 0; l < L; ++l) {
    results[r++] = append(a, l, 75, 40);  // after compress: partial sealed pages in the stream
    results[r++] = cache.attend(a, l, q.data(), qpos.data(), nq, out.data());
    results[r++] = cache.attend(*c, l, q.data(), qpos.data(), nq, out.data());
  }
  {
    auto rep = cache.compress(a, knorm_half);
    results[r++] = rep.ok() ? kvc::ok_status() : rep.status();
  }
  counter.stop();

  for (std::size_t i = 0; i < r; ++i) EXPECT_TRUE(results[i].ok()) << "call " << i << ": " << results[i].message();
  EXPECT_EQ(counter.allocations_seen(), 0) << "system allocations in append / attend / compress";
  EXPECT_EQ(counter.deallocations_seen(), 0);
  // The calls did the work that could have allocated.
  EXPECT_GT(freed[0], 0);
  EXPECT_EQ(freed[1], 0) << "the sealed pages c dropped are still held by b";
  EXPECT_EQ(cache.view(*c, 0, 0)->size(), 20);
  EXPECT_EQ(cache.view(a, 0, 1)->size(), 39);  // 75 tokens -> round(37.5) = 38, + 40 = 78 -> 39
  EXPECT_GT(cache.stats().sealed_pages, before.sealed_pages);
}

// f16 seals by encoding into a separate sealed page (and attend reads it in place).
TEST(NoAlloc, HotPathsF16) { run_hot_paths<kvc::codec::f16>(); }
// f32 seals by relabelling the open page.
TEST(NoAlloc, HotPathsF32) { run_hot_paths<kvc::codec::f32>(); }
// bf16 seals by encoding, like f16, through the bfloat16 conversion.
TEST(NoAlloc, HotPathsBF16) { run_hot_paths<kvc::codec::bf16>(); }
// gear<kivi<2>> seals and re-encodes with the cache's encode scratch, and attends on the codes.
TEST(NoAlloc, HotPathsGear) { run_hot_paths<kvc::codec::gear<kvc::codec::kivi<2>>>(); }

// KIVI 2-bit: compaction re-encodes per-channel key pages from the pages their rows came
// from, with scratch from the workspace.
TEST(NoAlloc, HotPathsKivi) { run_hot_paths<kvc::codec::kivi<2>>(); }

}  // namespace

// ---------------------------------------------------------------- observation and budgets

namespace {

// A scorer that reads everything observation records: the observed queries and the
// attention statistics (loaded by compress_context::load into the workspace, or pointed to).
struct observing_scorer {
  static constexpr const char* name = "observing";
  static constexpr kvc::stream_fields fields =
      kvc::stream_fields::keys | kvc::stream_fields::queries | kvc::stream_fields::attention;
  kvc::status score(const kvc::stream_data& s, kvc::workspace& /*ws*/, float* out) const noexcept {
    const float q0 = s.n_queries > 0 ? s.query(s.n_queries - 1, 0)[0] : 0.0f;
    for (int i = 0; i < s.size(); ++i)
      out[i] = s.attention_sum[i] + s.last_attention[i] + 0.001f * s.attention_count[i] + q0 * s.keys[i * s.head_dim()];
    return kvc::ok_status();
  }
};

// With observation on (a query window and attention tracking), append, attend (decode and
// a multi-query call longer than the window, on shared pages too), compress with policies
// that load the observations, every scorer, the pyramid, adakv and byte_cap budgets, and
// decode_schedule::on_step (compressing and not) make no system allocation.
TEST(NoAlloc, ObservationBudgetsAndSchedule) {
  using cache_t = kvc::paged_kv_cache<kvc::codec::f16>;
  kvc::cache_config cfg = small_config();
  cfg.observe.query_window = 8;
  cfg.observe.track_attention = true;
  auto created = cache_t::create(cfg);
  ASSERT_TRUE(created.ok()) << created.status().message();
  cache_t& cache = *created;

  const int n = 300, nq = 20;
  std::vector<float> k(static_cast<std::size_t>(n) * KVH * D), v(k.size());
  for (std::size_t i = 0; i < k.size(); ++i) {
    k[i] = static_cast<float>((i * 37) % 101) / 50.0f - 1.0f;
    v[i] = static_cast<float>((i * 53) % 97) / 48.0f - 1.0f;
  }
  std::vector<std::int32_t> pos(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) pos[static_cast<std::size_t>(i)] = i;
  std::vector<float> q(static_cast<std::size_t>(nq) * QH * D), out(q.size());
  for (std::size_t i = 0; i < q.size(); ++i) q[i] = static_cast<float>((i * 29) % 89) / 44.0f - 1.0f;
  std::vector<std::int32_t> qpos(static_cast<std::size_t>(nq));

  const kvc::seq_id a = cache.create_sequence();
  auto append = [&](kvc::seq_id id, int layer, int from, int count) {
    const std::size_t off = static_cast<std::size_t>(from) * KVH * D;
    return cache.append(id, layer, k.data() + off, v.data() + off, pos.data() + from, count);
  };
  auto attend = [&](kvc::seq_id id, int layer, std::int32_t last, int count) {
    for (int i = 0; i < count; ++i) qpos[static_cast<std::size_t>(i)] = last - count + 1 + i;
    return cache.attend(id, layer, q.data(), qpos.data(), count, out.data());
  };
  for (int l = 0; l < L; ++l) ASSERT_TRUE(append(a, l, 0, 45).ok());
  auto b = cache.fork(a);
  ASSERT_TRUE(b.ok());

  using kvc::budget::uniform;
  const kvc::evict<observing_scorer, uniform> observing({}, uniform::keep_fraction(0.7));
  const kvc::evict<kvc::score::knorm, kvc::budget::pyramid> pyramid({}, kvc::budget::pyramid::keep_fraction(0.8, 4));
  const kvc::evict<kvc::score::knorm, kvc::budget::adakv> adakv({}, kvc::budget::adakv::keep_fraction(0.8));
  const kvc::evict<kvc::score::knorm, kvc::budget::byte_cap> capped({}, kvc::budget::byte_cap(30000));
  kvc::decode_schedule<kvc::evict<kvc::score::knorm, uniform>> schedule(
      kvc::evict<kvc::score::knorm, uniform>({}, uniform::tokens(40)), 8);
  schedule.reset(45);

  std::vector<kvc::status> results(64);  // reserved before arming; filled by assignment
  std::size_t r = 0;
  kvc::status step_failure;
  int compressed = 0;
  const auto keep = [&](const auto& rep) { results[r++] = rep.ok() ? kvc::ok_status() : rep.status(); };
  allocation_counter counter;
  for (int l = 0; l < L; ++l) {
    results[r++] = attend(a, l, 44, nq);   // 20 queries, more than the window of 8
    results[r++] = attend(*b, l, 44, 1);   // decode on shared pages
    results[r++] = append(*b, l, 45, 30);  // copy-on-write of the shared open page, sealing
    results[r++] = attend(*b, l, 74, 3);
  }
  keep(cache.compress(a, observing));
  keep(cache.compress(*b, pyramid));
  keep(cache.compress(*b, 1, adakv));
  // Every scorer that reads observations or does linear algebra, on the fork.
  const auto fraction = uniform::keep_fraction(0.95);
  keep(cache.compress(*b, kvc::evict<kvc::score::snapkv, uniform>({}, fraction)));
  keep(cache.compress(*b, kvc::evict<kvc::score::h2o, uniform>({}, fraction)));
  keep(cache.compress(*b, kvc::evict<kvc::score::tova, uniform>({}, fraction)));
  keep(cache.compress(*b, kvc::evict<kvc::score::qfilter, uniform>({}, fraction)));
  keep(cache.compress(*b, kvc::evict<kvc::score::keydiff, uniform>({}, fraction)));
  keep(cache.compress(*b, kvc::evict<kvc::score::expected_attention, uniform>({}, fraction)));
  keep(cache.compress(*b, kvc::evict<kvc::score::leverage, uniform>({}, fraction)));
  keep(cache.compress(*b, kvc::evict<kvc::score::compactor, uniform>({}, fraction)));
  for (int l = 0; l < L; ++l) results[r++] = append(a, l, 45, 40);
  keep(cache.compress(a, capped));
  for (int step = 0; step < 40; ++step) {
    for (int l = 0; l < L; ++l) {
      kvc::status st = append(a, l, 85 + step, 1);
      if (!st.ok() && step_failure.ok()) step_failure = st;
      st = attend(a, l, 85 + step, 1);
      if (!st.ok() && step_failure.ok()) step_failure = st;
    }
    auto s = schedule.on_step(cache, a);
    if (!s.ok() && step_failure.ok()) step_failure = s.status();
    if (s.ok() && s->compressed) ++compressed;
  }
  counter.stop();

  for (std::size_t i = 0; i < r; ++i) EXPECT_TRUE(results[i].ok()) << "call " << i << ": " << results[i].message();
  EXPECT_TRUE(step_failure.ok()) << step_failure.message();
  EXPECT_EQ(counter.allocations_seen(), 0) << "system allocations with observation on";
  EXPECT_EQ(counter.deallocations_seen(), 0);
  EXPECT_EQ(compressed, 5) << "40 decode steps, every 8";
  EXPECT_LE(cache.view(a, 0, 0)->size(), 40 + 8);
}

}  // namespace
