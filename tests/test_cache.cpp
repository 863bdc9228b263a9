// The page pool and the container: pool bookkeeping against a brute-force model, append and
// sealing, positions and log-weights, fork and copy-on-write, compress with hand-made
// masks, and stats() against the page layout the documentation gives. Stored contents are
// checked against tests/reference/stream_model.hpp, which restates the documented
// behaviour of a stream as a plain token list.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <kvc/kvc.hpp>

#include "reference/rounding.hpp"
#include "reference/snapshot.hpp"
#include "reference/stream_model.hpp"

namespace {

std::size_t al64(std::size_t n) { return (n + 63) / 64 * 64; }

// A one-byte test codec (fixed point in steps of 1/16 over [-8, 7.9375]): small enough that
// several sealed pages share one slab.
struct fixed8 : kvc::detail::row_codec<fixed8, std::int8_t> {
  static constexpr const char* name = "fixed8";
  static constexpr bool identity = false;
  static constexpr double relative_error = 0.0;
  static constexpr double absolute_error = 1.0 / 32.0;
  static constexpr float max_abs = 7.9375f;

  static void encode_span(const float* src, std::int8_t* dst, std::size_t n) noexcept {
    for (std::size_t i = 0; i < n; ++i) dst[i] = static_cast<std::int8_t>(std::lrint(src[i] * 16.0f));
  }
  static void decode_span(const std::int8_t* src, float* dst, std::size_t n) noexcept {
    for (std::size_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]) / 16.0f;
  }
};
static_assert(kvc::is_codec_v<fixed8>);

// Bytes per stored element and the rounding each codec documents.
template <class C>
struct codec_info;
template <>
struct codec_info<kvc::codec::f32> {
  static constexpr std::size_t bytes = 4;
  static float round(float x) { return x; }
};
template <>
struct codec_info<kvc::codec::f16> {
  static constexpr std::size_t bytes = 2;
  static float round(float x) { return static_cast<float>(kvc_ref::round16(x, kvc_ref::binary16)); }
};
template <>
struct codec_info<kvc::codec::bf16> {
  static constexpr std::size_t bytes = 2;
  static float round(float x) { return static_cast<float>(kvc_ref::round16(x, kvc_ref::bfloat16)); }
};
template <>
struct codec_info<fixed8> {
  static constexpr std::size_t bytes = 1;
  static float round(float x) {  // an int8 has no negative zero
    const double q = std::nearbyint(static_cast<double>(x) * 16.0);
    return q == 0.0 ? 0.0f : static_cast<float>(q / 16.0);
  }
};

// The documented page layout: each region rounded up to 64 bytes.
//   open:   float keys [P][d] | float values [P][d] | int32 positions [P] | float log-weights [P]
//   sealed: key payload        | value payload        | int32 positions [P] | float log-weights [P]
std::size_t open_bytes(int p, int d) {
  const std::size_t P = static_cast<std::size_t>(p), D = static_cast<std::size_t>(d);
  return 2 * al64(P * D * 4) + 2 * al64(P * 4);
}
template <class K, class V>
std::size_t sealed_bytes(int p, int d) {
  const std::size_t P = static_cast<std::size_t>(p), D = static_cast<std::size_t>(d);
  return al64(P * D * codec_info<K>::bytes) + al64(P * D * codec_info<V>::bytes) + 2 * al64(P * 4);
}
// A slab is the fewest whole sealed pages that hold one open page; an open page takes a slab.
template <class K, class V>
std::size_t slab_bytes(int p, int d) {
  const std::size_t S = sealed_bytes<K, V>(p, d);
  return (open_bytes(p, d) + S - 1) / S * S;
}

constexpr int L = 2, KVH = 2, QH = 4, D = 16, P = 8;

template <class K = kvc::codec::f16, class V = K>
kvc::cache_config make_config(std::size_t slabs, int page_tokens = P, int max_context = 1024) {
  kvc::cache_config c;
  c.shape.num_layers = L;
  c.shape.num_q_heads = QH;
  c.shape.num_kv_heads = KVH;
  c.shape.head_dim = D;
  c.page_tokens = page_tokens;
  c.max_context = max_context;
  c.capacity_bytes = slabs * slab_bytes<K, V>(page_tokens, D);
  return c;
}

// Tokens for one layer: k, v [n][KVH][D] in [-4, 4], positions strictly increasing.
struct tokens {
  std::vector<float> k, v;
  std::vector<std::int32_t> pos;
  int size() const { return static_cast<int>(pos.size()); }
};

tokens make_tokens(std::mt19937_64& rng, int n, std::int32_t first_pos) {
  std::uniform_real_distribution<float> u(-4.0f, 4.0f);
  tokens t;
  t.k.resize(static_cast<std::size_t>(n) * KVH * D);
  t.v.resize(t.k.size());
  for (float& x : t.k) x = u(rng);
  for (float& x : t.v) x = u(rng);
  std::int32_t p = first_pos;
  for (int i = 0; i < n; ++i) {
    t.pos.push_back(p);
    p += 1 + static_cast<std::int32_t>(rng() % 3);
  }
  return t;
}

const float* key_row(const tokens& t, int i, int h) { return &t.k[(static_cast<std::size_t>(i) * KVH + h) * D]; }
const float* value_row(const tokens& t, int i, int h) { return &t.v[(static_cast<std::size_t>(i) * KVH + h) * D]; }

// A sequence as the documentation describes it: one stream model per (layer, kv_head).
struct seq_model {
  std::vector<kvc_ref::stream_model> streams;
  std::int32_t next_pos[L] = {0, 0};

  seq_model() = default;
  seq_model(kvc_ref::stream_model::rounding rk, kvc_ref::stream_model::rounding rv) {
    for (int i = 0; i < L * KVH; ++i) streams.emplace_back(P, D, rk, rv);
  }
  kvc_ref::stream_model& stream(int layer, int h) { return streams[static_cast<std::size_t>(layer * KVH + h)]; }
};

// Appends tokens [from, from + count) of t to the cache and to the model.
template <class Cache>
void append_range(Cache& cache, kvc::seq_id id, int layer, const tokens& t, int from, int count, seq_model* model) {
  const std::size_t off = static_cast<std::size_t>(from) * KVH * D;
  const kvc::status s = cache.append(id, layer, t.k.data() + off, t.v.data() + off, t.pos.data() + from, count);
  ASSERT_TRUE(s.ok()) << s.message();
  if (model == nullptr) return;
  for (int i = from; i < from + count; ++i)
    for (int h = 0; h < KVH; ++h)
      model->stream(layer, h).append(t.pos[static_cast<std::size_t>(i)], key_row(t, i, h), value_row(t, i, h));
}

// Appends n new tokens to every layer, in random chunks.
template <class Cache>
void append_random(Cache& cache, kvc::seq_id id, int n, std::mt19937_64& rng, seq_model& model) {
  for (int l = 0; l < L; ++l) {
    const tokens t = make_tokens(rng, n, model.next_pos[l]);
    model.next_pos[l] = t.pos.empty() ? model.next_pos[l] : t.pos.back() + 1;
    for (int i = 0; i < n;) {
      const int m = std::min(n - i, 1 + static_cast<int>(rng() % (2 * P)));
      append_range(cache, id, l, t, i, m, &model);
      i += m;
    }
  }
}

bool same_bits(const float* a, const float* b, std::size_t n) { return std::memcmp(a, b, n * sizeof(float)) == 0; }

// Every stream of the sequence holds exactly what the model says: tokens, their stored
// (rounded or exact) keys and values, zero log-weights, and the page structure.
template <class Cache>
void expect_matches_model(const Cache& cache, kvc::seq_id id, const seq_model& m) {
  for (int l = 0; l < L; ++l) {
    for (int h = 0; h < KVH; ++h) {
      SCOPED_TRACE("layer " + std::to_string(l) + " kv_head " + std::to_string(h));
      const kvc_ref::stream_model& s = m.streams[static_cast<std::size_t>(l * KVH + h)];
      auto v = cache.view(id, l, h);
      ASSERT_TRUE(v.ok());
      ASSERT_EQ(static_cast<std::size_t>(v->size()), s.size());
      EXPECT_EQ(v->appended(), s.appended);
      const kvc::row_matrix keys = v->keys(), values = v->values();
      const std::vector<std::int32_t> pos = v->positions();
      const std::vector<float> lw = v->log_weights();
      for (std::size_t t = 0; t < s.size(); ++t) {
        ASSERT_EQ(pos[t], s.tokens[t].position) << t;
        ASSERT_EQ(lw[t], 0.0f) << t;
        ASSERT_TRUE(same_bits(keys.data() + t * D, s.tokens[t].key.data(), D)) << "key of token " << t;
        ASSERT_TRUE(same_bits(values.data() + t * D, s.tokens[t].value.data(), D)) << "value of token " << t;
      }
      const std::vector<int> pages = s.page_sizes();
      ASSERT_EQ(v->page_count(), static_cast<int>(pages.size()));
      for (int i = 0; i < v->page_count(); ++i) {
        EXPECT_EQ(v->page_tokens(i), pages[static_cast<std::size_t>(i)]) << "page " << i;
        EXPECT_EQ(v->page_sealed(i), static_cast<std::size_t>(i) < s.sealed_pages.size()) << "page " << i;
      }
    }
  }
}

// stats() and every page's refcount, recomputed from the sequences' page tables and the
// documented layout: a slab is ceil(open / sealed) sealed pages, an open page takes a
// whole slab, page id = slab * slots_per_slab + slot.
template <class K, class V, class Cache>
void expect_accounting(const Cache& cache, const std::vector<kvc::seq_id>& live) {
  const int p = cache.config().page_tokens, d = cache.shape().head_dim;
  const std::size_t O = slab_bytes<K, V>(p, d), S = sealed_bytes<K, V>(p, d);
  const std::int64_t slots = static_cast<std::int64_t>(O / S);
  std::map<kvc::page_id, int> refs;  // page -> references over all live page tables
  std::map<kvc::page_id, bool> sealed;
  std::int64_t retained = 0, appended = 0;
  for (kvc::seq_id id : live) {
    ASSERT_TRUE(cache.contains(id));
    auto st = cache.stats(id);
    ASSERT_TRUE(st.ok());
    std::int64_t seq_open = 0, seq_sealed = 0, seq_retained = 0, seq_appended = 0;
    for (int l = 0; l < L; ++l) {
      for (int h = 0; h < KVH; ++h) {
        auto v = cache.view(id, l, h);
        ASSERT_TRUE(v.ok());
        for (int i = 0; i < v->page_count(); ++i) {
          ++refs[v->page(i)];
          sealed[v->page(i)] = v->page_sealed(i);
          (v->page_sealed(i) ? seq_sealed : seq_open) += 1;
        }
        const std::size_t si = static_cast<std::size_t>(l * KVH + h);
        EXPECT_EQ(st->stream_tokens[si], v->size());
        EXPECT_EQ(st->stream_appended[si], v->appended());
        seq_retained += v->size();
        seq_appended += v->appended();
      }
    }
    EXPECT_EQ(st->open_pages, seq_open);
    EXPECT_EQ(st->sealed_pages, seq_sealed);
    EXPECT_EQ(st->bytes, static_cast<std::size_t>(seq_open) * O + static_cast<std::size_t>(seq_sealed) * S);
    EXPECT_EQ(st->tokens_retained, seq_retained);
    EXPECT_EQ(st->tokens_appended, seq_appended);
    EXPECT_EQ(st->dense_f16_bytes, static_cast<std::size_t>(seq_appended) * 4 * static_cast<std::size_t>(d));
    retained += seq_retained;
    appended += seq_appended;
  }
  // Refcounts equal the number of page-table entries naming the page.
  for (kvc::seq_id id : live)
    for (int l = 0; l < L; ++l)
      for (int h = 0; h < KVH; ++h) {
        auto v = cache.view(id, l, h);
        for (int i = 0; i < v->page_count(); ++i) EXPECT_EQ(v->page_refcount(i), refs[v->page(i)]);
      }
  std::int64_t open_pages = 0, sealed_pages = 0;
  std::set<std::int64_t> slabs;
  for (const auto& [page, is_sealed] : sealed) {
    (is_sealed ? sealed_pages : open_pages) += 1;
    if (!is_sealed) {
      EXPECT_EQ(page % slots, 0) << "an open page is slot 0 of its slab";
    }
    slabs.insert(page / slots);
  }
  const kvc::cache_stats s = cache.stats();
  const std::int64_t total = static_cast<std::int64_t>(cache.config().capacity_bytes / O);
  EXPECT_EQ(s.total_slabs, total);
  EXPECT_EQ(s.capacity_bytes, static_cast<std::size_t>(total) * O);
  EXPECT_EQ(s.open_pages, open_pages);
  EXPECT_EQ(s.sealed_pages, sealed_pages);
  EXPECT_EQ(s.bytes_in_use, static_cast<std::size_t>(open_pages) * O + static_cast<std::size_t>(sealed_pages) * S);
  EXPECT_EQ(s.bytes_reserved, slabs.size() * O);
  EXPECT_EQ(s.free_slabs, total - static_cast<std::int64_t>(slabs.size()));
  EXPECT_EQ(s.sequences, static_cast<std::int64_t>(live.size()));
  EXPECT_EQ(s.tokens_retained, retained);
  EXPECT_EQ(s.tokens_appended, appended);
  EXPECT_EQ(s.dense_f16_bytes, static_cast<std::size_t>(appended) * 4 * static_cast<std::size_t>(d));
  if (appended > 0) {
    EXPECT_DOUBLE_EQ(s.fraction_of_dense_f16(),
                     static_cast<double>(s.bytes_in_use) / static_cast<double>(s.dense_f16_bytes));
  }
}

// The pool holds nothing: every slab free, no bytes in use.
template <class Cache>
void expect_pool_empty(const Cache& cache) {
  const kvc::cache_stats s = cache.stats();
  EXPECT_EQ(s.free_slabs, s.total_slabs);
  EXPECT_EQ(s.bytes_in_use, 0u);
  EXPECT_EQ(s.bytes_reserved, 0u);
  EXPECT_EQ(s.open_pages, 0);
  EXPECT_EQ(s.sealed_pages, 0);
}

// A hand-made policy: keeps exactly what a predetermined mask per stream in scope says,
// and records what the context showed it.
struct mask_policy {
  std::vector<std::vector<std::uint8_t>> masks;  // [stream in scope][retained token]
  std::vector<kvc::stream_info>* seen = nullptr;

  template <class Ctx>
  kvc::status plan(Ctx& ctx) const {
    if (ctx.num_streams() != static_cast<int>(masks.size()))
      return kvc::status::error(kvc::status_code::invalid_argument, "mask_policy: %d streams, %zu masks",
                                ctx.num_streams(), masks.size());
    for (int i = 0; i < ctx.num_streams(); ++i) {
      const kvc::stream_info info = ctx.info(i);
      if (seen != nullptr) seen->push_back(info);
      const std::vector<std::uint8_t>& m = masks[static_cast<std::size_t>(i)];
      if (info.n_tokens != static_cast<int>(m.size()))
        return kvc::status::error(kvc::status_code::invalid_argument, "mask_policy: stream %d size", i);
      std::copy(m.begin(), m.end(), ctx.keep(i));
    }
    return kvc::ok_status();
  }
};

// Random masks for the streams of `layer` (or all layers), keeping each token with
// probability keep_num / 8.
template <class Cache>
std::vector<std::vector<std::uint8_t>> random_masks(const Cache& cache, kvc::seq_id id, int layer, std::mt19937_64& rng,
                                                    unsigned keep_num = 5) {
  std::vector<std::vector<std::uint8_t>> masks;
  for (int l = 0; l < L; ++l) {
    if (layer != kvc::all_layers && l != layer) continue;
    for (int h = 0; h < KVH; ++h) {
      std::vector<std::uint8_t> m(static_cast<std::size_t>(cache.view(id, l, h)->size()));
      for (auto& k : m) k = rng() % 8 < keep_num;
      masks.push_back(m);
    }
  }
  return masks;
}

void apply_masks(seq_model& m, int layer, const std::vector<std::vector<std::uint8_t>>& masks) {
  std::size_t i = 0;
  for (int l = 0; l < L; ++l) {
    if (layer != kvc::all_layers && l != layer) continue;
    for (int h = 0; h < KVH; ++h) m.stream(l, h).compress(masks[i++]);
  }
}

// Retained tokens, bytes and pages of every stream, read through view().
struct stream_sizes {
  std::vector<std::int32_t> tokens;
  std::vector<std::size_t> bytes;
};
template <class K, class V, class Cache>
stream_sizes sizes_of(const Cache& cache, kvc::seq_id id) {
  stream_sizes s;
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < KVH; ++h) {
      auto v = cache.view(id, l, h);
      s.tokens.push_back(v->size());
      std::size_t b = 0;
      for (int i = 0; i < v->page_count(); ++i)
        b += v->page_sealed(i) ? sealed_bytes<K, V>(P, D) : slab_bytes<K, V>(P, D);
      s.bytes.push_back(b);
    }
  return s;
}

// The report's per-scope totals and per-stream spans agree with view() before and after.
void expect_report(const kvc::compress_report& r, const stream_sizes& before, const stream_sizes& after, int layer) {
  std::int64_t tb = 0, ta = 0;
  std::size_t bb = 0, ba = 0;
  for (int si = 0; si < L * KVH; ++si) {
    if (layer != kvc::all_layers && si / KVH != layer) continue;
    const std::size_t i = static_cast<std::size_t>(si);
    tb += before.tokens[i];
    ta += after.tokens[i];
    bb += before.bytes[i];
    ba += after.bytes[i];
  }
  EXPECT_EQ(r.tokens_before, tb);
  EXPECT_EQ(r.tokens_after, ta);
  EXPECT_EQ(r.bytes_before, bb);
  EXPECT_EQ(r.bytes_after, ba);
  ASSERT_EQ(r.stream_tokens_before.size(), static_cast<std::size_t>(L * KVH));
  ASSERT_EQ(r.stream_tokens_after.size(), static_cast<std::size_t>(L * KVH));
  for (std::size_t i = 0; i < before.tokens.size(); ++i) {
    EXPECT_EQ(r.stream_tokens_before[i], before.tokens[i]) << i;
    EXPECT_EQ(r.stream_tokens_after[i], after.tokens[i]) << i;
  }
}

std::int64_t pages_in_use(const kvc::cache_stats& s) { return s.open_pages + s.sealed_pages; }

// ================================================================== page pool

// Slab and slot geometry, hand-worked: open 1000 -> 1024 and sealed 300 -> 320 bytes after
// 64-byte alignment; ceil(1024 / 320) = 4 sealed slots make a 1280-byte slab, which an open
// page takes whole; 10740 bytes round down to 8 slabs.
TEST(Pool, GeometryFromSizes) {
  kvc::page_pool pool(10 * 1024 + 500, 1000, 300);
  EXPECT_EQ(pool.slab_bytes(), 1280u);
  EXPECT_EQ(pool.open_page_bytes(), 1280u);
  EXPECT_EQ(pool.sealed_page_bytes(), 320u);
  EXPECT_EQ(pool.slots_per_slab(), 4);
  EXPECT_EQ(pool.num_slabs(), 8);
  EXPECT_EQ(pool.capacity_bytes(), 8u * 1280u);
  EXPECT_EQ(pool.free_slabs(), 8);
  EXPECT_EQ(pool.bytes_in_use(), 0u);
  EXPECT_EQ(pool.bytes_reserved(), 0u);
}

// Hand-worked: two slabs of three sealed slots. A slab leaves the sealed side only when
// all three of its slots are free, and then serves an open page.
TEST(Pool, SlabsMoveBetweenOpenAndSealedPages) {
  kvc::page_pool pool(2 * 192, 192, 64);
  ASSERT_EQ(pool.slots_per_slab(), 3);
  const kvc::page_id a = pool.alloc_open(), b = pool.alloc_open();
  ASSERT_NE(a, kvc::no_page);
  ASSERT_NE(b, kvc::no_page);
  EXPECT_EQ(pool.alloc_open(), kvc::no_page);
  EXPECT_EQ(pool.alloc_sealed(), kvc::no_page);
  EXPECT_EQ(pool.bytes_in_use(), 2u * 192u);
  EXPECT_TRUE(pool.release(a));
  kvc::page_id s[3];
  for (auto& x : s) {
    x = pool.alloc_sealed();
    ASSERT_NE(x, kvc::no_page);
    EXPECT_FALSE(pool.is_open(x));
    EXPECT_EQ(x / 3, a / 3) << "sealed slots come from the freed slab";
  }
  EXPECT_EQ(pool.alloc_sealed(), kvc::no_page);
  EXPECT_EQ(pool.sealed_pages_in_use(), 3);
  EXPECT_EQ(pool.bytes_in_use(), 192u + 3u * 64u);
  EXPECT_EQ(pool.bytes_reserved(), 2u * 192u);
  EXPECT_TRUE(pool.release(s[0]));
  EXPECT_TRUE(pool.release(s[2]));
  EXPECT_EQ(pool.alloc_open(), kvc::no_page) << "one slot still holds the slab";
  EXPECT_EQ(pool.free_slabs(), 0);
  EXPECT_EQ(pool.counts().free_sealed_slots, 2);
  EXPECT_TRUE(pool.release(s[1]));
  EXPECT_EQ(pool.free_slabs(), 1);
  EXPECT_EQ(pool.counts().free_sealed_slots, 0);
  const kvc::page_id c = pool.alloc_open();
  ASSERT_NE(c, kvc::no_page);
  EXPECT_TRUE(pool.is_open(c));
  EXPECT_EQ(c, a);
  EXPECT_TRUE(pool.release(b));
  EXPECT_TRUE(pool.release(c));
  EXPECT_EQ(pool.free_slabs(), 2);
  EXPECT_EQ(pool.bytes_in_use(), 0u);
}

// retain() adds a holder; a page returns to the pool only when its last holder releases it.
TEST(Pool, RefcountsHoldPages) {
  kvc::page_pool pool(4 * 256, 256, 128);
  const kvc::page_id p = pool.alloc_sealed();
  EXPECT_EQ(pool.refcount(p), 1);
  pool.retain(p);
  pool.retain(p);
  EXPECT_EQ(pool.refcount(p), 3);
  EXPECT_FALSE(pool.release(p));
  EXPECT_FALSE(pool.release(p));
  EXPECT_EQ(pool.sealed_pages_in_use(), 1);
  EXPECT_TRUE(pool.release(p));
  EXPECT_EQ(pool.sealed_pages_in_use(), 0);
  EXPECT_EQ(pool.free_slabs(), 4);
}

// Thousands of random alloc / retain / release operations against a brute-force model of
// which slots are live: allocation succeeds exactly when the model has room, never hands
// out a live page, pages never overlap in memory (each keeps a byte pattern), and every
// counter equals the model's.
TEST(Pool, RandomOperationsMatchModel) {
  for (const auto& sizes : std::vector<std::pair<std::size_t, std::size_t>>{{256, 64}, {320, 128}, {128, 128}}) {
    const std::size_t open = sizes.first, sealed = sizes.second;
    SCOPED_TRACE("open " + std::to_string(open) + " sealed " + std::to_string(sealed));
    const std::int32_t slabs = 7;
    const std::size_t slab = (open + sealed - 1) / sealed * sealed;  // whole sealed pages
    kvc::page_pool pool(static_cast<std::size_t>(slabs) * slab, open, sealed);
    const std::int32_t slots = pool.slots_per_slab();
    ASSERT_EQ(slots, static_cast<std::int32_t>(slab / sealed));
    struct page_info {
      int refcount;
      bool open;
    };
    std::map<kvc::page_id, page_info> live;  // the model: every live page, its holders and kind
    std::map<kvc::page_id, std::uint8_t> tag;
    std::mt19937_64 rng(static_cast<std::uint64_t>(open + sealed));
    // Pages in slab s, and whether it holds an open page.
    auto slab_state = [&](std::int32_t s, int& used, bool& is_open) {
      used = 0;
      is_open = false;
      for (const auto& [p, info] : live)
        if (p / slots == s) {
          ++used;
          is_open = info.open;
        }
    };
    auto model_free = [&](std::int64_t& free_slabs, std::int64_t& free_slots) {
      free_slabs = free_slots = 0;
      for (std::int32_t s = 0; s < slabs; ++s) {
        int used;
        bool is_open;
        slab_state(s, used, is_open);
        free_slabs += used == 0;
        if (used > 0 && !is_open) free_slots += slots - used;
      }
    };
    auto check_counters = [&] {
      std::int64_t free_slabs, free_slots, n_open = 0, n_sealed = 0;
      model_free(free_slabs, free_slots);
      for (const auto& [p, info] : live) (info.open ? n_open : n_sealed) += 1;
      ASSERT_EQ(pool.free_slabs(), free_slabs);
      ASSERT_EQ(pool.counts().free_slabs, free_slabs);
      ASSERT_EQ(pool.counts().free_sealed_slots, free_slots);
      ASSERT_EQ(pool.open_pages_in_use(), n_open);
      ASSERT_EQ(pool.sealed_pages_in_use(), n_sealed);
      ASSERT_EQ(pool.bytes_in_use(),
                static_cast<std::size_t>(n_open) * slab + static_cast<std::size_t>(n_sealed) * sealed);
      ASSERT_EQ(pool.bytes_reserved(), static_cast<std::size_t>(slabs - free_slabs) * slab);
      for (const auto& [p, info] : live) {
        ASSERT_EQ(pool.refcount(p), info.refcount);
        ASSERT_EQ(pool.is_open(p), info.open);
        const std::byte* d = pool.data(p);
        ASSERT_EQ(reinterpret_cast<std::uintptr_t>(d) % 64, 0u);
        for (std::size_t i = 0; i < (info.open ? open : sealed); ++i)
          ASSERT_EQ(static_cast<std::uint8_t>(d[i]), tag[p]) << "page " << p << " overwritten";
      }
    };
    std::uint8_t next_tag = 1;
    for (int step = 0; step < 3000; ++step) {
      const unsigned op = static_cast<unsigned>(rng() % 10);
      std::int64_t free_slabs, free_slots;
      model_free(free_slabs, free_slots);
      kvc::page_id fresh = kvc::no_page;
      bool fresh_open = false;
      if (op < 3) {  // alloc_open: possible iff a slab is free
        fresh = pool.alloc_open();
        fresh_open = true;
        ASSERT_EQ(fresh != kvc::no_page, free_slabs > 0);
        if (fresh == kvc::no_page) continue;
        ASSERT_EQ(fresh % slots, 0);
        int used;
        bool is_open;
        slab_state(fresh / slots, used, is_open);
        ASSERT_EQ(used, 0) << "an open page needs a whole free slab";
      } else if (op < 6) {  // alloc_sealed: possible iff a sealed slab has a free slot or a slab is free
        kvc::pool_counts dry = pool.counts();
        const bool dry_ok = dry.take_sealed();
        fresh = pool.alloc_sealed();
        ASSERT_EQ(fresh != kvc::no_page, free_slabs > 0 || free_slots > 0);
        ASSERT_EQ(dry_ok, fresh != kvc::no_page) << "pool_counts::take_sealed predicts alloc_sealed";
        if (fresh == kvc::no_page) continue;
        int used;
        bool is_open;
        slab_state(fresh / slots, used, is_open);
        ASSERT_FALSE(is_open) << "a sealed page in a slab that holds an open page";
        if (free_slots > 0) {
          ASSERT_GT(used, 0) << "a new slab was split while a split one had room";
        }
      } else if (op < 7 && !live.empty()) {  // retain
        auto it = std::next(live.begin(), static_cast<std::ptrdiff_t>(rng() % live.size()));
        pool.retain(it->first);
        ++it->second.refcount;
        continue;
      } else if (!live.empty()) {  // release
        auto it = std::next(live.begin(), static_cast<std::ptrdiff_t>(rng() % live.size()));
        const kvc::page_id p = it->first;
        const bool last = --it->second.refcount == 0;
        ASSERT_EQ(pool.release(p), last);
        if (last) {
          live.erase(it);
          tag.erase(p);
        }
        check_counters();
        continue;
      } else {
        continue;
      }
      // A new page: never one that is live; give it its own byte pattern.
      ASSERT_EQ(live.count(fresh), 0u) << "handed out a live page";
      ASSERT_EQ(pool.refcount(fresh), 1);
      live[fresh] = {1, fresh_open};
      tag[fresh] = next_tag;
      next_tag = static_cast<std::uint8_t>(next_tag % 250 + 1);
      std::memset(pool.data(fresh), tag[fresh], fresh_open ? open : sealed);
      check_counters();
    }
    for (auto& [p, info] : live)
      while (info.refcount-- > 0) pool.release(p);
    EXPECT_EQ(pool.free_slabs(), slabs);
    EXPECT_EQ(pool.bytes_in_use(), 0u);
  }
}

// Allocation and release take constant time: 200k of each on a pool of 200k slabs (any
// per-operation scan of the pool would take minutes) finish in well under five seconds.
TEST(Pool, AllocAndFreeAreConstantTime) {
  const std::int32_t n = 200000;
  kvc::page_pool pool(static_cast<std::size_t>(n) * 256, 256, 64);
  std::vector<kvc::page_id> pages;
  pages.reserve(static_cast<std::size_t>(n) * 4);
  std::mt19937_64 rng(5);
  const auto t0 = std::chrono::steady_clock::now();
  for (std::int32_t i = 0; i < n / 2; ++i) pages.push_back(pool.alloc_open());
  while (true) {
    const kvc::page_id p = pool.alloc_sealed();
    if (p == kvc::no_page) break;
    pages.push_back(p);
  }
  const std::size_t allocated = pages.size();
  std::shuffle(pages.begin(), pages.end(), rng);
  for (kvc::page_id p : pages) pool.release(p);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(allocated, static_cast<std::size_t>(n / 2) + static_cast<std::size_t>(n / 2) * 4);
  EXPECT_EQ(pool.free_slabs(), n);
  EXPECT_LT(seconds, 5.0);
}

// ================================================================== container, per codec

template <class K, class V>
struct codecs {
  using key = K;
  using value = V;
};

template <class Pair>
class Container : public ::testing::Test {
 protected:
  using K = typename Pair::key;
  using V = typename Pair::value;
  using cache_t = kvc::paged_kv_cache<K, V>;

  static cache_t make(std::size_t slabs, int page_tokens = P) {
    auto c = cache_t::create(make_config<K, V>(slabs, page_tokens));
    EXPECT_TRUE(c.ok()) << c.status().message();
    return std::move(c.value());
  }
  static seq_model model() { return seq_model(&codec_info<K>::round, &codec_info<V>::round); }
  static void accounting(const cache_t& c, const std::vector<kvc::seq_id>& live) { expect_accounting<K, V>(c, live); }
  static stream_sizes sizes(const cache_t& c, kvc::seq_id id) { return sizes_of<K, V>(c, id); }
};

using codec_pairs = ::testing::Types<codecs<kvc::codec::f32, kvc::codec::f32>, codecs<kvc::codec::f16, kvc::codec::f16>,
                                     codecs<kvc::codec::bf16, kvc::codec::bf16>, codecs<fixed8, fixed8>,
                                     codecs<kvc::codec::f16, fixed8>>;
struct pair_names {
  template <class T>
  static std::string GetName(int) {
    return std::string(T::key::name) + "_" + T::value::name;
  }
};
TYPED_TEST_SUITE(Container, codec_pairs, pair_names);

// open_page_bytes, sealed_page_bytes and the page layout offsets equal the documented
// layout computed here; the pool is capacity / open_page_bytes slabs.
TYPED_TEST(Container, PageLayoutIsDocumentedLayout) {
  using K = typename TestFixture::K;
  using V = typename TestFixture::V;
  for (const int p : {1, 5, 8, 16}) {
    for (const int d : {1, 6, 16, 64}) {
      kvc::cache_config cfg = make_config<K, V>(3, p);
      cfg.shape.head_dim = d;
      cfg.capacity_bytes = 3 * slab_bytes<K, V>(p, d) + 17;
      auto c = kvc::paged_kv_cache<K, V>::create(cfg);
      ASSERT_TRUE(c.ok()) << c.status().message();
      EXPECT_EQ(c->open_page_bytes(), (slab_bytes<K, V>(p, d)));
      EXPECT_EQ(c->sealed_page_bytes(), (sealed_bytes<K, V>(p, d)));
      const std::size_t P_ = static_cast<std::size_t>(p), D_ = static_cast<std::size_t>(d);
      const kvc::page_layout& o = c->open_layout();
      EXPECT_EQ(o.keys, 0u);
      EXPECT_EQ(o.values, al64(P_ * D_ * 4));
      EXPECT_EQ(o.positions, 2 * al64(P_ * D_ * 4));
      EXPECT_EQ(o.log_weights, o.positions + al64(P_ * 4));
      EXPECT_EQ(o.bytes, open_bytes(p, d));
      const kvc::page_layout& s = c->sealed_layout();
      EXPECT_EQ(s.values, al64(P_ * D_ * codec_info<K>::bytes));
      EXPECT_EQ(s.positions, s.values + al64(P_ * D_ * codec_info<V>::bytes));
      EXPECT_EQ(s.bytes, (sealed_bytes<K, V>(p, d)));
      const kvc::cache_stats st = c->stats();
      EXPECT_EQ(st.total_slabs, 3);
      EXPECT_EQ(st.capacity_bytes, (3 * slab_bytes<K, V>(p, d)));
      EXPECT_EQ(st.free_slabs, 3);
    }
  }
}

// Token by token: the newest page stays open and exact until it holds page_tokens
// tokens, then it is sealed and decodes to the codec's rounding of the input; positions,
// zero log-weights, appended counts and the pool accounting follow.
TYPED_TEST(Container, AppendSealsFullPages) {
  auto cache = TestFixture::make(64);
  const kvc::seq_id id = cache.create_sequence();
  seq_model m = TestFixture::model();
  std::mt19937_64 rng(1);
  const tokens t0 = make_tokens(rng, 3 * P + 3, 10), t1 = make_tokens(rng, 2 * P, 0);
  bool slab_shared = false;
  for (int i = 0; i < t0.size(); ++i) {
    append_range(cache, id, 0, t0, i, 1, &m);
    if (i < t1.size()) append_range(cache, id, 1, t1, i, 1, &m);
    expect_matches_model(cache, id, m);
    TestFixture::accounting(cache, {id});
    const kvc::cache_stats s = cache.stats();
    const std::size_t sealed_slabs =
        s.bytes_reserved / cache.open_page_bytes() - static_cast<std::size_t>(s.open_pages);
    slab_shared |= sealed_slabs < static_cast<std::size_t>(s.sealed_pages);
  }
  // Full pages sealed, the partial one open, and sealed keys really are rounded.
  auto v = cache.view(id, 0, 1);
  ASSERT_EQ(v->page_count(), 4);
  EXPECT_TRUE(v->page_sealed(2));
  EXPECT_FALSE(v->page_sealed(3));
  EXPECT_EQ(v->page_tokens(3), 3);
  const kvc::row_matrix keys = v->keys();
  for (int e = 0; e < D; ++e) {
    EXPECT_EQ(keys(0, e), codec_info<typename TestFixture::K>::round(key_row(t0, 0, 1)[e]));
    EXPECT_EQ(keys(3 * P + 2, e), key_row(t0, 3 * P + 2, 1)[e]);
  }
  const bool shares = cache.open_page_bytes() / cache.sealed_page_bytes() > 1;
  EXPECT_EQ(slab_shared, shares) << "sealed pages share slabs exactly when more than one fits";
}

// Appending in chunks of any size (crossing pages within one call) stores exactly what
// appending one token at a time stores.
TYPED_TEST(Container, ChunkedAppendEqualsTokenByToken) {
  auto a = TestFixture::make(64), b = TestFixture::make(64);
  const kvc::seq_id ia = a.create_sequence(), ib = b.create_sequence();
  std::mt19937_64 rng(2);
  const tokens t = make_tokens(rng, 5 * P + 1, 0);
  for (int i = 0; i < t.size(); ++i) append_range(a, ia, 0, t, i, 1, nullptr);
  const int chunks[] = {3, 2 * P + 1, 1, P, P + 2};  // sums to 5P + 1 with the tail below
  int at = 0;
  for (const int c : chunks) {
    append_range(b, ib, 0, t, at, c, nullptr);
    at += c;
  }
  append_range(b, ib, 0, t, at, t.size() - at, nullptr);
  for (int h = 0; h < KVH; ++h) {
    const auto sa = kvc_ref::snapshot_stream(a, ia, 0, h), sb = kvc_ref::snapshot_stream(b, ib, 0, h);
    EXPECT_TRUE(same_bits(sa.keys.data(), sb.keys.data(), sa.keys.size()));
    EXPECT_TRUE(same_bits(sa.values.data(), sb.values.data(), sa.values.size()));
    EXPECT_EQ(sa.positions, sb.positions);
    EXPECT_EQ(sa.page_tokens, sb.page_tokens);
    EXPECT_EQ(sa.sealed, sb.sealed);
  }
}

// fork() shares every page (refcount 2, same ids, no new pages); the first write to the
// shared open page copies it, sealed pages stay shared, and the parent never changes.
TYPED_TEST(Container, ForkSharesPagesAndCopiesOnWrite) {
  auto cache = TestFixture::make(64);
  const kvc::seq_id parent = cache.create_sequence();
  seq_model m = TestFixture::model();
  std::mt19937_64 rng(3);
  const tokens t = make_tokens(rng, 2 * P + 3, 0);  // two sealed pages and an open one with 3 tokens
  append_range(cache, parent, 0, t, 0, t.size(), &m);
  const kvc::cache_stats before_fork = cache.stats();
  auto child = cache.fork(parent);
  ASSERT_TRUE(child.ok());
  EXPECT_NE(*child, parent);
  const auto parent_snap = kvc_ref::snapshot_sequence(cache, parent);
  const auto child_snap = kvc_ref::snapshot_sequence(cache, *child);
  EXPECT_EQ(pages_in_use(cache.stats()), pages_in_use(before_fork)) << "fork allocates no pages";
  for (std::size_t s = 0; s < parent_snap.streams.size(); ++s) {
    EXPECT_EQ(parent_snap.streams[s].pages, child_snap.streams[s].pages);
    EXPECT_EQ(child_snap.streams[s].keys, parent_snap.streams[s].keys);
    for (int rc : child_snap.streams[s].refcounts) EXPECT_EQ(rc, 2);
  }
  TestFixture::accounting(cache, {parent, *child});

  // Write to the child: one token into the shared open page.
  seq_model cm = m;
  const tokens more = make_tokens(rng, P, t.pos.back() + 1);
  append_range(cache, *child, 0, more, 0, 1, &cm);
  EXPECT_EQ(kvc_ref::sequence_diff(kvc_ref::snapshot_sequence(cache, parent), parent_snap, false), "");
  for (int h = 0; h < KVH; ++h) {
    auto pv = cache.view(parent, 0, h), cv = cache.view(*child, 0, h);
    ASSERT_EQ(cv->page_count(), 3);
    EXPECT_EQ(cv->page(0), pv->page(0));
    EXPECT_EQ(cv->page(1), pv->page(1));
    EXPECT_EQ(cv->page_refcount(0), 2);
    EXPECT_NE(cv->page(2), pv->page(2)) << "the shared open page was copied";
    EXPECT_EQ(cv->page_refcount(2), 1);
    EXPECT_EQ(pv->page_refcount(2), 1);
  }
  expect_matches_model(cache, *child, cm);
  expect_matches_model(cache, parent, m);
  // Fill the child's open page so it seals; then write to the parent.
  append_range(cache, *child, 0, more, 1, P - 1, &cm);
  const auto child_snap2 = kvc_ref::snapshot_sequence(cache, *child);
  append_range(cache, parent, 0, more, 0, P, &m);  // the same positions: sequences are independent
  EXPECT_EQ(kvc_ref::sequence_diff(kvc_ref::snapshot_sequence(cache, *child), child_snap2, false), "");
  expect_matches_model(cache, *child, cm);
  expect_matches_model(cache, parent, m);
  TestFixture::accounting(cache, {parent, *child});

  ASSERT_TRUE(cache.release(*child).ok());
  for (int h = 0; h < KVH; ++h) {
    auto pv = cache.view(parent, 0, h);
    for (int i = 0; i < pv->page_count(); ++i) EXPECT_EQ(pv->page_refcount(i), 1);
  }
  TestFixture::accounting(cache, {parent});
  ASSERT_TRUE(cache.release(parent).ok());
  expect_pool_empty(cache);
}

// compress() with a predetermined mask keeps exactly the masked tokens in position
// order, with the bytes they had (nothing re-rounded), packs sealed pages, returns emptied
// pages to the pool, and reports the right totals.
TYPED_TEST(Container, CompressKeepsExactlyTheMaskedTokens) {
  auto cache = TestFixture::make(128);
  const kvc::seq_id id = cache.create_sequence();
  seq_model m = TestFixture::model();
  std::mt19937_64 rng(4);
  append_random(cache, id, 7 * P + 5, rng, m);
  const kvc::cache_stats before = cache.stats();
  const stream_sizes sb = TestFixture::sizes(cache, id);
  const auto masks = random_masks(cache, id, kvc::all_layers, rng);
  std::vector<kvc::stream_info> seen;
  auto r = cache.compress(id, mask_policy{masks, &seen});
  ASSERT_TRUE(r.ok()) << r.status().message();
  apply_masks(m, kvc::all_layers, masks);
  expect_matches_model(cache, id, m);
  TestFixture::accounting(cache, {id});
  expect_report(*r, sb, TestFixture::sizes(cache, id), kvc::all_layers);
  EXPECT_EQ(r->pages_freed, pages_in_use(before) - pages_in_use(cache.stats()));
  EXPECT_GT(r->pages_freed, 0);
  ASSERT_EQ(seen.size(), static_cast<std::size_t>(L * KVH));
  for (int i = 0; i < L * KVH; ++i) {  // streams in (layer, kv_head) order
    EXPECT_EQ(seen[static_cast<std::size_t>(i)].layer, i / KVH);
    EXPECT_EQ(seen[static_cast<std::size_t>(i)].kv_head, i % KVH);
    EXPECT_EQ(seen[static_cast<std::size_t>(i)].n_tokens, sb.tokens[static_cast<std::size_t>(i)]);
  }
}

// Many rounds of appending and compressing (all layers or one), leaving partial sealed
// pages in the middle of streams, always match the model; the pool ends empty.
TYPED_TEST(Container, RepeatedCompressAndAppendCycles) {
  auto cache = TestFixture::make(256);
  const kvc::seq_id id = cache.create_sequence();
  seq_model m = TestFixture::model();
  std::mt19937_64 rng(5);
  for (int round = 0; round < 12; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    append_random(cache, id, 1 + static_cast<int>(rng() % (3 * P)), rng, m);
    const int layer = round % 3 == 2 ? kvc::all_layers : static_cast<int>(rng() % L);
    const stream_sizes sb = TestFixture::sizes(cache, id);
    const kvc::cache_stats before = cache.stats();
    const auto masks = random_masks(cache, id, layer, rng, 3 + static_cast<unsigned>(round % 5));
    auto r = cache.compress(id, layer, mask_policy{masks});
    ASSERT_TRUE(r.ok()) << r.status().message();
    apply_masks(m, layer, masks);
    expect_matches_model(cache, id, m);
    TestFixture::accounting(cache, {id});
    expect_report(*r, sb, TestFixture::sizes(cache, id), layer);
    EXPECT_EQ(r->pages_freed, pages_in_use(before) - pages_in_use(cache.stats()));
  }
  ASSERT_TRUE(cache.release(id).ok());
  expect_pool_empty(cache);
}

// compress(seq, layer, policy) shows the policy only that layer's streams and leaves every
// other layer byte-for-byte alone.
TYPED_TEST(Container, CompressOneLayerOnly) {
  auto cache = TestFixture::make(128);
  const kvc::seq_id id = cache.create_sequence();
  seq_model m = TestFixture::model();
  std::mt19937_64 rng(6);
  append_random(cache, id, 4 * P + 2, rng, m);
  const auto before = kvc_ref::snapshot_sequence(cache, id);
  const auto masks = random_masks(cache, id, 1, rng, 2);
  std::vector<kvc::stream_info> seen;
  auto r = cache.compress(id, 1, mask_policy{masks, &seen});
  ASSERT_TRUE(r.ok()) << r.status().message();
  ASSERT_EQ(seen.size(), static_cast<std::size_t>(KVH));
  for (int h = 0; h < KVH; ++h) {
    EXPECT_EQ(seen[static_cast<std::size_t>(h)].layer, 1);
    EXPECT_EQ(seen[static_cast<std::size_t>(h)].kv_head, h);
  }
  const auto after = kvc_ref::snapshot_sequence(cache, id);
  for (int h = 0; h < KVH; ++h)
    EXPECT_EQ(kvc_ref::detail::stream_diff(before.streams[static_cast<std::size_t>(h)],
                                           after.streams[static_cast<std::size_t>(h)]),
              "")
        << "layer 0 changed";
  apply_masks(m, 1, masks);
  expect_matches_model(cache, id, m);
  EXPECT_EQ(r->tokens_before, before.streams[2].positions.size() + before.streams[3].positions.size());
}

// Compressing a fork whose pages are all shared copies what it rewrites (the parent is
// untouched, nothing is freed, the unchanged prefix stays shared), and releasing both
// sequences in either order returns the pool to empty.
TYPED_TEST(Container, CompressForkedSharedPages) {
  for (const bool release_parent_first : {false, true}) {
    auto cache = TestFixture::make(128);
    const kvc::seq_id parent = cache.create_sequence();
    seq_model m = TestFixture::model();
    std::mt19937_64 rng(7);
    append_random(cache, parent, 5 * P + 4, rng, m);
    auto child = cache.fork(parent);
    ASSERT_TRUE(child.ok());
    seq_model cm = m;
    const auto parent_snap = kvc_ref::snapshot_sequence(cache, parent);
    const kvc::cache_stats before = cache.stats();
    // Keep the first two pages whole, then thin out the rest (including the open page).
    auto masks = random_masks(cache, *child, kvc::all_layers, rng, 4);
    for (auto& mk : masks) std::fill(mk.begin(), mk.begin() + 2 * P, std::uint8_t{1});
    auto r = cache.compress(*child, mask_policy{masks});
    ASSERT_TRUE(r.ok()) << r.status().message();
    apply_masks(cm, kvc::all_layers, masks);
    EXPECT_EQ(kvc_ref::sequence_diff(kvc_ref::snapshot_sequence(cache, parent), parent_snap, false), "");
    expect_matches_model(cache, *child, cm);
    expect_matches_model(cache, parent, m);
    EXPECT_EQ(r->pages_freed, 0);
    std::int64_t new_pages = 0;
    for (int l = 0; l < L; ++l)
      for (int h = 0; h < KVH; ++h) {
        auto cv = cache.view(*child, l, h), pv = cache.view(parent, l, h);
        EXPECT_EQ(cv->page(0), pv->page(0));
        EXPECT_EQ(cv->page(1), pv->page(1));
        EXPECT_EQ(cv->page_refcount(0), 2);
        for (int i = 2; i < cv->page_count(); ++i) {
          EXPECT_EQ(cv->page_refcount(i), 1);
          for (int j = 0; j < pv->page_count(); ++j) EXPECT_NE(cv->page(i), pv->page(j));
          ++new_pages;
        }
      }
    EXPECT_EQ(pages_in_use(cache.stats()), pages_in_use(before) + new_pages);
    TestFixture::accounting(cache, {parent, *child});
    // Writes after the compress still stay apart.
    append_random(cache, *child, P + 1, rng, cm);
    append_random(cache, parent, 2, rng, m);
    expect_matches_model(cache, *child, cm);
    expect_matches_model(cache, parent, m);
    TestFixture::accounting(cache, {parent, *child});
    ASSERT_TRUE(cache.release(release_parent_first ? parent : *child).ok());
    const kvc::seq_id left = release_parent_first ? *child : parent;
    expect_matches_model(cache, left, release_parent_first ? cm : m);
    TestFixture::accounting(cache, {left});
    ASSERT_TRUE(cache.release(left).ok());
    expect_pool_empty(cache);
  }
}

// Forks of forks, each written, compressed and released in a random order: every sequence
// matches its own model throughout and the pool ends exactly where it started.
TYPED_TEST(Container, ForkTreeEndsWithEmptyPool) {
  auto cache = TestFixture::make(512);
  const kvc::cache_stats start = cache.stats();
  std::mt19937_64 rng(8);
  std::vector<kvc::seq_id> ids{cache.create_sequence()};
  std::vector<seq_model> models{TestFixture::model()};
  append_random(cache, ids[0], 3 * P + 1, rng, models[0]);
  for (int step = 0; step < 24; ++step) {
    const std::size_t i = static_cast<std::size_t>(rng() % ids.size());
    switch (rng() % 4) {
      case 0: {
        auto f = cache.fork(ids[i]);
        ASSERT_TRUE(f.ok());
        ids.push_back(*f);
        models.push_back(models[i]);
        break;
      }
      case 1:
        append_random(cache, ids[i], 1 + static_cast<int>(rng() % (2 * P)), rng, models[i]);
        break;
      case 2: {
        const auto masks = random_masks(cache, ids[i], kvc::all_layers, rng);
        ASSERT_TRUE(cache.compress(ids[i], mask_policy{masks}).ok());
        apply_masks(models[i], kvc::all_layers, masks);
        break;
      }
      default:
        if (ids.size() > 1) {
          ASSERT_TRUE(cache.release(ids[i]).ok());
          ids.erase(ids.begin() + static_cast<std::ptrdiff_t>(i));
          models.erase(models.begin() + static_cast<std::ptrdiff_t>(i));
        }
    }
    for (std::size_t j = 0; j < ids.size(); ++j) expect_matches_model(cache, ids[j], models[j]);
    TestFixture::accounting(cache, ids);
  }
  while (!ids.empty()) {
    const std::size_t i = static_cast<std::size_t>(rng() % ids.size());
    ASSERT_TRUE(cache.release(ids[i]).ok());
    ids.erase(ids.begin() + static_cast<std::ptrdiff_t>(i));
  }
  expect_pool_empty(cache);
  EXPECT_EQ(cache.stats().free_slabs, start.free_slabs);
  EXPECT_EQ(cache.stats().sequences, 0);
  EXPECT_EQ(cache.stats().tokens_retained, 0);
}

// Keep-all leaves a never-compressed sequence byte-for-byte as it was (same pages);
// drop-all empties every stream and returns all its pages; positions still have to
// increase afterwards.
TYPED_TEST(Container, CompressKeepAllAndDropAll) {
  auto cache = TestFixture::make(64);
  const kvc::seq_id id = cache.create_sequence();
  seq_model m = TestFixture::model();
  std::mt19937_64 rng(9);
  append_random(cache, id, 3 * P + 2, rng, m);
  const auto snap = kvc_ref::snapshot(cache, {id});
  auto r = cache.compress(id, mask_policy{random_masks(cache, id, kvc::all_layers, rng, 8)});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(kvc_ref::snapshot_diff(kvc_ref::snapshot(cache, {id}), snap), "");
  EXPECT_EQ(r->pages_freed, 0);
  EXPECT_EQ(r->tokens_after, r->tokens_before);

  const std::int64_t pages = pages_in_use(cache.stats());
  r = cache.compress(id, mask_policy{random_masks(cache, id, kvc::all_layers, rng, 0)});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->pages_freed, pages);
  EXPECT_EQ(r->tokens_after, 0);
  EXPECT_EQ(r->bytes_after, 0u);
  expect_pool_empty(cache);
  for (auto& st : m.streams) st.compress(std::vector<std::uint8_t>(st.size(), 0));
  expect_matches_model(cache, id, m);
  EXPECT_EQ(cache.stats().tokens_appended, L * KVH * (3 * P + 2)) << "appended counts survive eviction";

  const tokens old = make_tokens(rng, 1, 0);
  EXPECT_EQ(cache.append(id, 0, old.k.data(), old.v.data(), old.pos.data(), 1).code(),
            kvc::status_code::position_order);
  append_random(cache, id, P + 1, rng, m);
  expect_matches_model(cache, id, m);
}

// Checks, from inside plan(), that the context shows each stream as view() does.
template <class Cache>
struct context_probe {
  const Cache* cache;
  kvc::seq_id id;
  int checked = 0;
  template <class Ctx>
  kvc::status plan(Ctx& ctx) {
    EXPECT_EQ(&ctx.shape(), &cache->shape());
    for (int i = 0; i < ctx.num_streams(); ++i) {
      const kvc::stream_info info = ctx.info(i);
      const auto snap = kvc_ref::snapshot_stream(*cache, id, info.layer, info.kv_head);
      kvc::stream_data all, none;
      EXPECT_TRUE(ctx.load(i, kvc::stream_fields::keys_and_values, all).ok());
      EXPECT_TRUE(ctx.load(i, kvc::stream_fields::none, none).ok());
      EXPECT_EQ(all.size(), info.n_tokens);
      EXPECT_EQ(all.head_dim(), D);
      EXPECT_TRUE(same_bits(all.keys, snap.keys.data(), snap.keys.size()));
      EXPECT_TRUE(same_bits(all.values, snap.values.data(), snap.values.size()));
      EXPECT_TRUE(std::equal(snap.positions.begin(), snap.positions.end(), all.positions));
      EXPECT_TRUE(same_bits(all.log_weights, snap.log_weights.data(), snap.log_weights.size()));
      EXPECT_EQ(all.key_matrix()(1, 2), snap.keys[1 * D + 2]);
      EXPECT_EQ(none.keys, nullptr);
      EXPECT_EQ(none.values, nullptr);
      EXPECT_TRUE(std::equal(snap.positions.begin(), snap.positions.end(), none.positions));
      for (int t = 0; t < info.n_tokens; ++t) EXPECT_EQ(ctx.keep(i)[t], 1);
      ++checked;
    }
    return kvc::ok_status();
  }
};

// The context hands the policy each stream's positions, log-weights and dequantized keys
// and values (exactly what view() shows), only the fields asked for, and keep flags that
// start at 1.
TYPED_TEST(Container, PolicyContextShowsStreams) {
  auto cache = TestFixture::make(64);
  const kvc::seq_id id = cache.create_sequence();
  seq_model m = TestFixture::model();
  std::mt19937_64 rng(10);
  append_random(cache, id, 2 * P + 3, rng, m);
  context_probe<typename TestFixture::cache_t> p{&cache, id};
  ASSERT_TRUE(cache.compress(id, p).ok());
  EXPECT_EQ(p.checked, L * KVH);
}

// ================================================================== sequences and positions

using f16_cache = kvc::paged_kv_cache<kvc::codec::f16>;

// Ids are distinct and never reused: a released id stays unknown after its slot is reused.
TEST(Sequences, IdsAreNeverReused) {
  auto cache = f16_cache::create(make_config(16));
  ASSERT_TRUE(cache.ok());
  std::set<kvc::seq_id> seen;
  kvc::seq_id last = cache->create_sequence();
  seen.insert(last);
  for (int i = 0; i < 20; ++i) {
    ASSERT_TRUE(cache->release(last).ok());
    EXPECT_FALSE(cache->contains(last));
    last = i % 2 == 0 ? cache->create_sequence() : *cache->fork(cache->create_sequence());
    EXPECT_TRUE(seen.insert(last).second) << "id reused";
    EXPECT_TRUE(cache->contains(last));
    EXPECT_NE(last, kvc::seq_id::invalid);
  }
}

// Positions must increase within a (sequence, layer) only: other layers and other
// sequences keep their own order, and gaps are allowed.
TEST(Sequences, PositionsAreOrderedPerLayer) {
  auto cache = f16_cache::create(make_config(16));
  ASSERT_TRUE(cache.ok());
  const kvc::seq_id a = cache->create_sequence(), b = cache->create_sequence();
  std::mt19937_64 rng(11);
  const tokens high = make_tokens(rng, 3, 1000), low = make_tokens(rng, 3, 0);
  append_range(*cache, a, 0, high, 0, 3, nullptr);
  append_range(*cache, a, 1, low, 0, 3, nullptr);  // layer 1 starts below layer 0
  append_range(*cache, b, 0, low, 0, 3, nullptr);  // so does another sequence
  EXPECT_EQ(cache->view(a, 0, 0)->positions(), high.pos);
  EXPECT_EQ(cache->view(a, 1, 1)->positions(), low.pos);
  EXPECT_EQ(cache->view(b, 0, 1)->positions(), low.pos);
  EXPECT_EQ(cache->append(a, 0, low.k.data(), low.v.data(), low.pos.data(), 1).code(),
            kvc::status_code::position_order);
}

// A capacity that is not a multiple of the page size is rounded down to whole slabs,
// and exactly that many open pages fit.
TEST(Sequences, PoolHoldsCapacityOverPageBytes) {
  kvc::cache_config cfg = make_config(5);
  cfg.capacity_bytes += slab_bytes<kvc::codec::f16, kvc::codec::f16>(P, D) - 1;
  auto cache = f16_cache::create(cfg);
  ASSERT_TRUE(cache.ok());
  EXPECT_EQ(cache->stats().total_slabs, 5);
  std::mt19937_64 rng(12);
  const tokens t = make_tokens(rng, 1, 0);
  std::vector<kvc::seq_id> ids;
  for (int i = 0; i < 2; ++i) {  // two sequences, one token in each of 2 streams: 4 open pages
    ids.push_back(cache->create_sequence());
    append_range(*cache, ids.back(), 0, t, 0, 1, nullptr);
  }
  const kvc::seq_id third = cache->create_sequence();
  EXPECT_EQ(cache->append(third, 0, t.k.data(), t.v.data(), t.pos.data(), 1).code(), kvc::status_code::pool_exhausted)
      << "needs 2 open pages, 1 slab is free";
  EXPECT_EQ(cache->stats().free_slabs, 1);
}

}  // namespace
