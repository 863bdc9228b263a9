// Bad input: every rejected call returns the documented status code with a message that
// names the problem, and leaves the cache byte-for-byte as it was (every stream's keys,
// values, positions, log-weights, page ids, refcounts and token counts, and stats(), as
// captured by tests/reference/snapshot.hpp).
#include <gtest/gtest.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <kvc/kvc.hpp>

#include "reference/snapshot.hpp"

namespace {

using cache_t = kvc::paged_kv_cache<kvc::codec::f16>;
using ct = kvc::const_tensor3<float>;
using code = kvc::status_code;

constexpr int L = 2, KVH = 2, QH = 4, D = 8, P = 4, MAX_CONTEXT = 1000;

// An open page (float keys and values, positions, log-weights: 128 + 128 + 64 + 64 bytes)
// takes a slab of ceil(384 / 256) = 2 sealed f16 pages (64 + 64 + 64 + 64 bytes).
std::size_t open_page_bytes() {
  const std::size_t open = 2 * ((P * D * 4 + 63) / 64 * 64) + 2 * 64;
  const std::size_t sealed = 2 * ((P * D * 2 + 63) / 64 * 64) + 2 * 64;
  return (open + sealed - 1) / sealed * sealed;
}

kvc::cache_config make_config(std::size_t slabs) {
  kvc::cache_config c;
  c.shape.num_layers = L;
  c.shape.num_q_heads = QH;
  c.shape.num_kv_heads = KVH;
  c.shape.head_dim = D;
  c.page_tokens = P;
  c.max_context = MAX_CONTEXT;
  c.capacity_bytes = slabs * open_page_bytes();
  return c;
}

// Deterministic finite data: [n][heads][D].
std::vector<float> rows(int n, int heads, float base) {
  std::vector<float> x(static_cast<std::size_t>(n) * heads * D);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = base + 0.01f * static_cast<float>(i % 97) - 0.4f;
  return x;
}
std::vector<std::int32_t> positions_from(std::int32_t first, int n) {
  std::vector<std::int32_t> p(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) p[static_cast<std::size_t>(i)] = first + i;
  return p;
}

kvc::status status_of(const kvc::status& s) { return s; }
template <class T>
kvc::status status_of(const kvc::result<T>& r) {
  return r.ok() ? kvc::ok_status() : r.status();
}

// Budgets wrapped into an eviction policy.
using knorm_uniform = kvc::evict<kvc::score::knorm, kvc::budget::uniform>;

// Drops the first token of every stream.
struct drop_first {
  template <class Ctx>
  kvc::status plan(Ctx& ctx) const {
    for (int i = 0; i < ctx.num_streams(); ++i)
      if (ctx.info(i).n_tokens > 0) ctx.keep(i)[0] = 0;
    return kvc::ok_status();
  }
};

// Marks every token for eviction, then fails.
struct failing {
  template <class Ctx>
  kvc::status plan(Ctx& ctx) const {
    for (int i = 0; i < ctx.num_streams(); ++i)
      for (int t = 0; t < ctx.info(i).n_tokens; ++t) ctx.keep(i)[t] = 0;
    return kvc::status::error(kvc::status_code::unsupported, "failing policy: refused");
  }
};

// Two live sequences that share pages (a and its fork b, both written after the fork),
// and one released id.
class Errors : public ::testing::Test {
 protected:
  void SetUp() override { build(make_config(64)); }

  void build(const kvc::cache_config& cfg) {
    auto c = cache_t::create(cfg);
    ASSERT_TRUE(c.ok()) << c.status().message();
    cache_.emplace(std::move(c.value()));
    a_ = cache().create_sequence();
    for (int l = 0; l < L; ++l) append_ok(a_, l, 10, 0);
    auto b = cache().fork(a_);
    ASSERT_TRUE(b.ok());
    b_ = *b;
    append_ok(b_, 0, 3, 100);
    append_ok(a_, 1, 2, 50);
    gone_ = cache().create_sequence();
    append_ok(gone_, 0, 5, 0);
    ASSERT_TRUE(cache().release(gone_).ok());
    ids_ = {a_, b_, gone_};
  }

  cache_t& cache() { return *cache_; }

  void append_ok(kvc::seq_id id, int layer, int n, std::int32_t first) {
    const auto k = rows(n, KVH, 0.5f), v = rows(n, KVH, -0.25f);
    const auto p = positions_from(first, n);
    const kvc::status s = cache().append(id, layer, k.data(), v.data(), p.data(), n);
    ASSERT_TRUE(s.ok()) << s.message();
  }

  kvc_ref::cache_snapshot snap() { return kvc_ref::snapshot(cache(), ids_); }

  // A sequence id that was never handed out.
  static kvc::seq_id never_created() { return static_cast<kvc::seq_id>(0x0000000500000077ull); }

  std::optional<cache_t> cache_;
  kvc::seq_id a_{}, b_{}, gone_{};
  std::vector<kvc::seq_id> ids_;
};

void expect_status(const kvc::status& s, code c, const std::string& text) {
  EXPECT_EQ(s.code(), c) << "got " << kvc::to_string(s.code()) << ": " << s.message();
  EXPECT_NE(std::string(s.message()).find(text), std::string::npos)
      << "message \"" << s.message() << "\" does not mention \"" << text << "\"";
}

// Runs `expr`, checks its status and that the cache did not change.
#define EXPECT_REJECTED(expr, want_code, text)                                     \
  do {                                                                             \
    const kvc_ref::cache_snapshot before_ = snap();                                \
    const kvc::status status_ = status_of(expr);                                   \
    expect_status(status_, want_code, text);                                       \
    EXPECT_EQ(kvc_ref::snapshot_diff(snap(), before_), "") << "the cache changed"; \
  } while (0)

// ------------------------------------------------------------------ shapes and strides

// Keys with the wrong number of heads: shape_mismatch, naming both shapes.
TEST_F(Errors, AppendKeysWrongExtents) {
  const auto k = rows(3, KVH + 1, 0.0f), v = rows(3, KVH, 0.0f);
  const auto p = positions_from(200, 3);
  EXPECT_REJECTED(cache().append(a_, 0, ct{k.data(), {3, KVH + 1, D}, {(KVH + 1) * D, D, 1}},
                                 ct::contiguous(v.data(), 3, KVH, D), p.data()),
                  code::shape_mismatch, "append: keys has shape [3][3][8], expected [3][2][8]");
}

// Values with fewer tokens than the keys: shape_mismatch.
TEST_F(Errors, AppendValuesWrongTokenCount) {
  const auto k = rows(3, KVH, 0.0f), v = rows(3, KVH, 0.0f);
  const auto p = positions_from(200, 3);
  EXPECT_REJECTED(
      cache().append(a_, 0, ct::contiguous(k.data(), 3, KVH, D), ct::contiguous(v.data(), 2, KVH, D), p.data()),
      code::shape_mismatch, "append: values has shape [2][2][8], expected [3][2][8]");
}

// A head_dim that does not match the cache: shape_mismatch.
TEST_F(Errors, AppendWrongHeadDim) {
  const auto k = rows(3, KVH, 0.0f);
  const auto p = positions_from(200, 3);
  EXPECT_REJECTED(cache().append(a_, 0, ct{k.data(), {3, KVH, D / 2}, {KVH * D, D, 1}},
                                 ct{k.data(), {3, KVH, D / 2}, {KVH * D, D, 1}}, p.data()),
                  code::shape_mismatch, "expected [3][2][8]");
}

// Token and head strides that make rows alias each other: shape_mismatch.
TEST_F(Errors, AppendOverlappingStrides) {
  const auto k = rows(3, KVH, 0.0f);
  const auto p = positions_from(200, 3);
  EXPECT_REJECTED(
      cache().append(a_, 0, ct{k.data(), {3, KVH, D}, {D, D, 1}}, ct::contiguous(k.data(), 3, KVH, D), p.data()),
      code::shape_mismatch, "append: keys: strides [8][8][1] make rows overlap");
  // A head stride shorter than a row overlaps too.
  EXPECT_REJECTED(cache().append(a_, 0, ct::contiguous(k.data(), 3, KVH, D),
                                 ct{k.data(), {3, KVH, D}, {KVH * D, D - 1, 1}}, p.data()),
                  code::shape_mismatch, "append: values: strides [16][7][1] make rows overlap");
}

// A head_dim stride other than 1: shape_mismatch.
TEST_F(Errors, AppendNonUnitInnerStride) {
  const auto k = rows(3, 2 * KVH, 0.0f);
  const auto p = positions_from(200, 3);
  EXPECT_REJECTED(cache().append(a_, 0, ct{k.data(), {3, KVH, D}, {2 * KVH * D, 2 * D, 2}},
                                 ct{k.data(), {3, KVH, D}, {2 * KVH * D, 2 * D, 1}}, p.data()),
                  code::shape_mismatch, "append: keys: head_dim stride is 2, must be 1");
}

// Queries with the KV head count instead of the query head count: shape_mismatch; out untouched.
TEST_F(Errors, AttendQueriesWrongExtents) {
  const auto q = rows(2, QH, 0.0f);
  std::vector<float> out(q.size(), 7.0f);
  const auto p = positions_from(5, 2);
  EXPECT_REJECTED(cache().attend(a_, 0, ct{q.data(), {2, KVH, D}, {QH * D, D, 1}}, p.data(),
                                 kvc::tensor3<float>::contiguous(out.data(), 2, QH, D)),
                  code::shape_mismatch, "attend: queries has shape [2][2][8], expected [2][4][8]");
  for (float x : out) ASSERT_EQ(x, 7.0f);
}

// An output view with a different number of rows than the queries: shape_mismatch.
TEST_F(Errors, AttendOutWrongExtents) {
  const auto q = rows(2, QH, 0.0f);
  std::vector<float> out(q.size(), 7.0f);
  const auto p = positions_from(5, 2);
  EXPECT_REJECTED(cache().attend(a_, 0, ct::contiguous(q.data(), 2, QH, D), p.data(),
                                 kvc::tensor3<float>::contiguous(out.data(), 1, QH, D)),
                  code::shape_mismatch, "attend: out has shape [1][4][8], expected [2][4][8]");
  for (float x : out) ASSERT_EQ(x, 7.0f);
}

// Output strides that alias rows: shape_mismatch, out untouched.
TEST_F(Errors, AttendOutOverlappingStrides) {
  const auto q = rows(2, QH, 0.0f);
  std::vector<float> out(q.size(), 7.0f);
  const auto p = positions_from(5, 2);
  EXPECT_REJECTED(cache().attend(a_, 0, ct::contiguous(q.data(), 2, QH, D), p.data(),
                                 kvc::tensor3<float>{out.data(), {2, QH, D}, {D, D, 1}}),
                  code::shape_mismatch, "attend: out: strides [8][8][1] make rows overlap");
  for (float x : out) ASSERT_EQ(x, 7.0f);
}

// Negative token / query counts: invalid_argument.
TEST_F(Errors, NegativeCounts) {
  const auto k = rows(1, KVH, 0.0f);
  const auto p = positions_from(200, 1);
  EXPECT_REJECTED(cache().append(a_, 0, k.data(), k.data(), p.data(), -1), code::invalid_argument,
                  "n_tokens -1 outside [0, max_context 1000]");
  std::vector<float> out(QH * D);
  EXPECT_REJECTED(cache().attend(a_, 0, k.data(), p.data(), -2, out.data()), code::invalid_argument,
                  "attend: n_queries -2 is negative");
}

// ------------------------------------------------------------------ unknown and released sequences

// append on a never-created, the invalid and a released id: unknown_sequence.
TEST_F(Errors, UnknownSequenceAppend) {
  const auto k = rows(1, KVH, 0.0f);
  const auto p = positions_from(500, 1);
  for (kvc::seq_id id : {never_created(), kvc::seq_id::invalid, gone_})
    EXPECT_REJECTED(
        cache().append(id, 0, k.data(), k.data(), p.data(), 1), code::unknown_sequence,
        "append: sequence " + std::to_string(static_cast<unsigned long long>(id)) + " is unknown or released");
}

// attend on unknown ids: unknown_sequence, out untouched.
TEST_F(Errors, UnknownSequenceAttend) {
  const auto q = rows(1, QH, 0.0f);
  std::vector<float> out(q.size(), 7.0f);
  const auto p = positions_from(500, 1);
  for (kvc::seq_id id : {never_created(), kvc::seq_id::invalid, gone_})
    EXPECT_REJECTED(cache().attend(id, 0, q.data(), p.data(), 1, out.data()), code::unknown_sequence,
                    "attend: sequence");
  for (float x : out) ASSERT_EQ(x, 7.0f);
}

// compress on unknown ids: unknown_sequence.
TEST_F(Errors, UnknownSequenceCompress) {
  for (kvc::seq_id id : {never_created(), kvc::seq_id::invalid, gone_})
    EXPECT_REJECTED(cache().compress(id, knorm_uniform({}, kvc::budget::uniform::keep_fraction(0.5))),
                    code::unknown_sequence, "compress: sequence");
}

// fork of unknown ids: unknown_sequence, and no sequence is created.
TEST_F(Errors, UnknownSequenceFork) {
  for (kvc::seq_id id : {never_created(), kvc::seq_id::invalid, gone_})
    EXPECT_REJECTED(cache().fork(id), code::unknown_sequence, "fork: sequence");
}

// release of unknown ids (including a second release): unknown_sequence.
TEST_F(Errors, UnknownSequenceRelease) {
  for (kvc::seq_id id : {never_created(), kvc::seq_id::invalid, gone_})
    EXPECT_REJECTED(cache().release(id), code::unknown_sequence, "release: sequence");
}

// view of unknown ids: unknown_sequence.
TEST_F(Errors, UnknownSequenceView) {
  for (kvc::seq_id id : {never_created(), kvc::seq_id::invalid, gone_})
    EXPECT_REJECTED(cache().view(id, 0, 0), code::unknown_sequence, "view: sequence");
}

// stats of unknown ids: unknown_sequence.
TEST_F(Errors, UnknownSequenceStats) {
  for (kvc::seq_id id : {never_created(), kvc::seq_id::invalid, gone_})
    EXPECT_REJECTED(cache().stats(id), code::unknown_sequence, "stats: sequence");
}

// ------------------------------------------------------------------ indices

// Layers outside [0, num_layers) for append, attend, compress and view: out_of_range.
TEST_F(Errors, LayerOutOfRange) {
  const auto k = rows(1, KVH, 0.0f), q = rows(1, QH, 0.0f);
  const auto p = positions_from(500, 1);
  std::vector<float> out(q.size());
  auto range = [](int layer) { return "layer " + std::to_string(layer) + " outside [0, 2)"; };
  for (int layer : {-1, L, 1000}) {
    EXPECT_REJECTED(cache().append(a_, layer, k.data(), k.data(), p.data(), 1), code::out_of_range,
                    "append: " + range(layer));
    EXPECT_REJECTED(cache().attend(a_, layer, q.data(), p.data(), 1, out.data()), code::out_of_range,
                    "attend: " + range(layer));
    EXPECT_REJECTED(cache().view(a_, layer, 0), code::out_of_range, "view: " + range(layer));
  }
  for (int layer : {-2, L, 1000}) {  // -1 is kvc::all_layers
    EXPECT_REJECTED(cache().compress(a_, layer, knorm_uniform({}, kvc::budget::uniform::keep_fraction(0.5))),
                    code::out_of_range, "compress: " + range(layer));
  }
}

// KV heads outside [0, num_kv_heads) for view: out_of_range.
TEST_F(Errors, KvHeadOutOfRange) {
  EXPECT_REJECTED(cache().view(a_, 0, KVH), code::out_of_range, "view: kv_head 2 outside [0, 2)");
  EXPECT_REJECTED(cache().view(a_, 0, -1), code::out_of_range, "view: kv_head -1 outside [0, 2)");
}

// ------------------------------------------------------------------ values

// NaN in the keys: non_finite, naming the element.
TEST_F(Errors, NaNKeys) {
  auto k = rows(2, KVH, 0.0f);
  const auto v = rows(2, KVH, 0.0f);
  k[(1 * KVH + 0) * D + 3] = std::numeric_limits<float>::quiet_NaN();
  const auto p = positions_from(200, 2);
  EXPECT_REJECTED(cache().append(a_, 0, k.data(), v.data(), p.data(), 2), code::non_finite,
                  "keys[1][0][3] is not finite");
}

// Infinity in the keys: non_finite.
TEST_F(Errors, InfiniteKeys) {
  auto k = rows(2, KVH, 0.0f);
  const auto v = rows(2, KVH, 0.0f);
  k[(0 * KVH + 1) * D + 0] = -std::numeric_limits<float>::infinity();
  const auto p = positions_from(200, 2);
  EXPECT_REJECTED(cache().append(a_, 0, k.data(), v.data(), p.data(), 2), code::non_finite,
                  "keys[0][1][0] is not finite");
}

// NaN in the values: non_finite.
TEST_F(Errors, NaNValues) {
  const auto k = rows(2, KVH, 0.0f);
  auto v = rows(2, KVH, 0.0f);
  v[(1 * KVH + 1) * D + 7] = std::numeric_limits<float>::quiet_NaN();
  const auto p = positions_from(200, 2);
  EXPECT_REJECTED(cache().append(a_, 0, k.data(), v.data(), p.data(), 2), code::non_finite,
                  "values[1][1][7] is not finite");
}

// Infinity in the values: non_finite.
TEST_F(Errors, InfiniteValues) {
  const auto k = rows(2, KVH, 0.0f);
  auto v = rows(2, KVH, 0.0f);
  v[2] = std::numeric_limits<float>::infinity();
  const auto p = positions_from(200, 2);
  EXPECT_REJECTED(cache().append(a_, 0, k.data(), v.data(), p.data(), 2), code::non_finite,
                  "values[0][0][2] is not finite");
}

// NaN and infinity in the queries: non_finite, out untouched.
TEST_F(Errors, NonFiniteQueries) {
  auto q = rows(2, QH, 0.0f);
  std::vector<float> out(q.size(), 7.0f);
  const auto p = positions_from(20, 2);
  q[(1 * QH + 3) * D + 5] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_REJECTED(cache().attend(a_, 0, q.data(), p.data(), 2, out.data()), code::non_finite,
                  "attend: queries[1][3][5] is not finite");
  q[(1 * QH + 3) * D + 5] = 0.0f;
  q[1] = std::numeric_limits<float>::infinity();
  EXPECT_REJECTED(cache().attend(a_, 0, q.data(), p.data(), 2, out.data()), code::non_finite,
                  "attend: queries[0][0][1] is not finite");
  for (float x : out) ASSERT_EQ(x, 7.0f);
}

// Values beyond the f16 range (and keys below -65504): out_of_range; 65504 itself fits.
TEST_F(Errors, ValuesOutOfF16Range) {
  auto k = rows(2, KVH, 0.0f), v = rows(2, KVH, 0.0f);
  const auto p = positions_from(200, 2);
  v[D + 1] = 70000.0f;
  EXPECT_REJECTED(cache().append(a_, 0, k.data(), v.data(), p.data(), 2), code::out_of_range,
                  "values[0][1][1] = 70000 exceeds the f16 range (65504)");
  v[D + 1] = 0.0f;
  k[(1 * KVH + 1) * D] = -65536.0f;
  EXPECT_REJECTED(cache().append(a_, 0, k.data(), v.data(), p.data(), 2), code::out_of_range,
                  "keys[1][1][0] = -65536 exceeds the f16 range");
  k[(1 * KVH + 1) * D] = -65504.0f;
  v[0] = 65504.0f;
  EXPECT_TRUE(cache().append(a_, 0, k.data(), v.data(), p.data(), 2).ok()) << "the largest half is accepted";
}

// ------------------------------------------------------------------ positions

// A position lower than the one before it in the same call: position_order.
TEST_F(Errors, PositionsBackwardsWithinCall) {
  const auto k = rows(3, KVH, 0.0f);
  const std::vector<std::int32_t> p = {200, 202, 201};
  EXPECT_REJECTED(cache().append(a_, 0, k.data(), k.data(), p.data(), 3), code::position_order,
                  "positions[2] = 201 does not follow 202 (layer 0)");
}

// A position repeated within a call: position_order.
TEST_F(Errors, PositionsRepeatWithinCall) {
  const auto k = rows(3, KVH, 0.0f);
  const std::vector<std::int32_t> p = {200, 201, 201};
  EXPECT_REJECTED(cache().append(a_, 0, k.data(), k.data(), p.data(), 3), code::position_order,
                  "positions[2] = 201 does not follow 201");
}

// A first position below the layer's last one: position_order.
TEST_F(Errors, PositionsBackwardsAcrossCalls) {
  const auto k = rows(1, KVH, 0.0f);
  const std::vector<std::int32_t> p = {5};  // layer 1 of a ends at 51
  EXPECT_REJECTED(cache().append(a_, 1, k.data(), k.data(), p.data(), 1), code::position_order,
                  "positions[0] = 5 does not follow 51 (layer 1)");
}

// A first position equal to the layer's last one: position_order.
TEST_F(Errors, PositionsRepeatAcrossCalls) {
  const auto k = rows(1, KVH, 0.0f);
  const std::vector<std::int32_t> p = {102};  // layer 0 of b ends at 102
  EXPECT_REJECTED(cache().append(b_, 0, k.data(), k.data(), p.data(), 1), code::position_order,
                  "positions[0] = 102 does not follow 102 (layer 0)");
}

// ------------------------------------------------------------------ capacity

// Configs that cannot hold one page, and other invalid fields: invalid_argument from create().
TEST(ErrorsCreate, BadConfig) {
  kvc::cache_config c = make_config(1);
  c.capacity_bytes = open_page_bytes() - 1;
  auto r = cache_t::create(c);
  ASSERT_FALSE(r.ok());
  expect_status(r.status(), code::invalid_argument,
                "capacity_bytes " + std::to_string(open_page_bytes() - 1) + " is smaller than one page (" +
                    std::to_string(open_page_bytes()) + " bytes for page_tokens 4, head_dim 8)");
  struct bad {
    void (*edit)(kvc::cache_config&);
    const char* text;
  };
  const bad cases[] = {
      {[](kvc::cache_config& x) { x.shape.num_layers = 0; }, "num_layers is 0"},
      {[](kvc::cache_config& x) { x.shape.num_kv_heads = 0; }, "num_kv_heads is 0"},
      {[](kvc::cache_config& x) { x.shape.num_q_heads = 3; }, "num_q_heads 3 must be a positive multiple"},
      {[](kvc::cache_config& x) { x.shape.head_dim = 513; }, "head_dim 513 outside [1, 512]"},
      {[](kvc::cache_config& x) { x.page_tokens = 0; }, "page_tokens 0 outside"},
      {[](kvc::cache_config& x) { x.max_context = 0; }, "max_context is 0"},
  };
  for (const bad& b : cases) {
    kvc::cache_config x = make_config(8);
    b.edit(x);
    auto rb = cache_t::create(x);
    ASSERT_FALSE(rb.ok()) << b.text;
    expect_status(rb.status(), code::invalid_argument, b.text);
  }
}

// An append whose pages fit for the first KV head but not the second: pool_exhausted,
// and not even the first head's tokens are stored.
TEST_F(Errors, AppendExhaustsPool) {
  const std::int64_t free_slabs = cache().stats().free_slabs;
  // n = P * (F + 20) tokens (F free slabs) make about F + 20 sealed f16 pages per head, two
  // to a slab. Half-used slabs left by the fixture's few sealed pages (at most 20) give at
  // most 20 free slots, so one head needs at most (F + 20) / 2 + 1 <= F slabs and fits,
  // while both heads need at least (2 (F + 20) - 20) / 2 = F + 10 > F and do not.
  ASSERT_GE(free_slabs, 30);
  const int n = P * static_cast<int>(free_slabs + 20);
  const auto k = rows(n, KVH, 0.0f);
  const auto p = positions_from(1000, n);
  EXPECT_REJECTED(cache().append(a_, 0, k.data(), k.data(), p.data(), n), code::pool_exhausted,
                  "append: page pool exhausted at stream (layer 0, kv_head 1)");
}

// Copy-on-write during compress when the pool is full: pool_exhausted, nothing changes.
TEST_F(Errors, CompressExhaustsPool) {
  // Fill the pool from a third sequence, one token at a time, until an append fails.
  const kvc::seq_id filler = cache().create_sequence();
  ids_.push_back(filler);
  const auto k = rows(1, KVH, 0.0f);
  for (std::int32_t pos = 0;; ++pos) {
    const kvc::status s = cache().append(filler, 1, k.data(), k.data(), &pos, 1);
    if (!s.ok()) {
      ASSERT_EQ(s.code(), code::pool_exhausted) << s.message();
      break;
    }
  }
  // b shares its sealed pages with a: dropping b's first token rewrites (copies) them.
  EXPECT_REJECTED(cache().compress(b_, drop_first{}), code::pool_exhausted,
                  "compress: copy-on-write of shared pages needs more pages than the pool has free");
}

// More tokens than max_context in one stream: context_full, naming the stream.
TEST_F(Errors, ContextFull) {
  const int n = MAX_CONTEXT - 5;  // a's layer 0 holds 10
  const auto k = rows(n, KVH, 0.0f);
  const auto p = positions_from(1000, n);
  EXPECT_REJECTED(cache().append(a_, 0, k.data(), k.data(), p.data(), n), code::context_full,
                  "append: stream (layer 0, kv_head 0) would hold 1005 tokens, max_context is 1000");
}

// ------------------------------------------------------------------ compress

// keep_fraction(1.5): invalid_budget.
TEST_F(Errors, BudgetKeepFractionAboveOne) {
  EXPECT_REJECTED(cache().compress(a_, knorm_uniform({}, kvc::budget::uniform::keep_fraction(1.5))),
                  code::invalid_budget, "uniform: keep fraction 1.5 outside [0, 1]");
}

// keep_fraction(NaN): invalid_budget.
TEST_F(Errors, BudgetKeepFractionNaN) {
  EXPECT_REJECTED(cache().compress(a_, knorm_uniform({}, kvc::budget::uniform::keep_fraction(std::nan("")))),
                  code::invalid_budget, "uniform: keep fraction nan outside [0, 1]");
}

// compression_ratio(-0.1): invalid_budget.
TEST_F(Errors, BudgetCompressionRatioNegative) {
  EXPECT_REJECTED(cache().compress(a_, knorm_uniform({}, kvc::budget::uniform::compression_ratio(-0.1))),
                  code::invalid_budget, "uniform: compression ratio -0.1 outside [0, 1]");
}

// tokens(-1): invalid_budget.
TEST_F(Errors, BudgetTokensNegative) {
  EXPECT_REJECTED(cache().compress(a_, knorm_uniform({}, kvc::budget::uniform::tokens(-1))), code::invalid_budget,
                  "uniform: token budget -1 is negative");
}

// A workspace too small for the keep masks: workspace_exhausted, naming the setting.
TEST_F(Errors, WorkspaceTooSmall) {
  kvc::cache_config c = make_config(64);
  c.workspace_bytes = 64;
  build(c);
  EXPECT_REJECTED(cache().compress(a_, knorm_uniform({}, kvc::budget::uniform::keep_fraction(0.5))),
                  code::workspace_exhausted, "workspace of 64 bytes is full");
}

// A policy that fails after writing keep flags: its status comes back and nothing is applied.
TEST_F(Errors, PolicyErrorAppliesNothing) {
  EXPECT_REJECTED(cache().compress(a_, failing{}), code::unsupported, "failing policy: refused");
}

// ------------------------------------------------------------------ pointers

// Null keys: invalid_argument.
TEST_F(Errors, NullKeys) {
  const auto v = rows(2, KVH, 0.0f);
  const auto p = positions_from(200, 2);
  EXPECT_REJECTED(cache().append(a_, 0, nullptr, v.data(), p.data(), 2), code::invalid_argument,
                  "append: keys is a null pointer");
}

// Null values: invalid_argument.
TEST_F(Errors, NullValues) {
  const auto k = rows(2, KVH, 0.0f);
  const auto p = positions_from(200, 2);
  EXPECT_REJECTED(cache().append(a_, 0, k.data(), nullptr, p.data(), 2), code::invalid_argument,
                  "append: values is a null pointer");
}

// Null positions: invalid_argument.
TEST_F(Errors, NullPositions) {
  const auto k = rows(2, KVH, 0.0f);
  EXPECT_REJECTED(cache().append(a_, 0, k.data(), k.data(), nullptr, 2), code::invalid_argument,
                  "append: positions is a null pointer");
}

// Null queries: invalid_argument.
TEST_F(Errors, NullQueries) {
  std::vector<float> out(QH * D, 7.0f);
  const auto p = positions_from(20, 1);
  EXPECT_REJECTED(cache().attend(a_, 0, nullptr, p.data(), 1, out.data()), code::invalid_argument,
                  "attend: queries is a null pointer");
  for (float x : out) ASSERT_EQ(x, 7.0f);
}

// Null output: invalid_argument.
TEST_F(Errors, NullOut) {
  const auto q = rows(1, QH, 0.0f);
  const auto p = positions_from(20, 1);
  EXPECT_REJECTED(cache().attend(a_, 0, q.data(), p.data(), 1, nullptr), code::invalid_argument,
                  "attend: out is a null pointer");
}

// Null query positions: invalid_argument.
TEST_F(Errors, NullQueryPositions) {
  const auto q = rows(1, QH, 0.0f);
  std::vector<float> out(q.size(), 7.0f);
  EXPECT_REJECTED(cache().attend(a_, 0, q.data(), nullptr, 1, out.data()), code::invalid_argument,
                  "attend: q_positions is a null pointer");
  for (float x : out) ASSERT_EQ(x, 7.0f);
}

// Output that is, or partly overlaps, the queries: invalid_argument, queries untouched.
TEST_F(Errors, OutOverlapsQueries) {
  auto q = rows(3, QH, 0.0f);
  q.resize(q.size() + D);
  const std::vector<float> q0 = q;
  const auto p = positions_from(20, 3);
  EXPECT_REJECTED(cache().attend(a_, 0, q.data(), p.data(), 3, q.data()), code::invalid_argument,
                  "attend: out overlaps the queries");
  EXPECT_REJECTED(cache().attend(a_, 0, q.data(), p.data(), 3, q.data() + D), code::invalid_argument,
                  "attend: out overlaps the queries");
  EXPECT_EQ(q, q0);
}

}  // namespace
