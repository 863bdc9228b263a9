// Tests of kvc::decode_schedule: generation of any length in bounded memory. Long decode
// runs (one token per layer per step, attend, on_step) check that the bytes and tokens a
// sequence holds stay under bounds computed from the target and the period alone, that
// the pool never runs out, and that compresses happen exactly every N appended tokens.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include <kvc/budget/byte_cap.hpp>
#include <kvc/kvc.hpp>
#include <kvc/policies/decode_schedule.hpp>

#include "policy_helpers.hpp"

namespace {

using cache_t = kvc::paged_kv_cache<kvc::codec::f16>;
constexpr kvc::model_shape shape{2, 4, 2, 16};  // layers, q heads, kv heads, head_dim
constexpr int P = 8;
constexpr int streams = 2 * 2;

// The pool's slab (what an open page takes) and sealed page, before any cache exists.
std::size_t slab_bytes() {
  return kvc::page_pool::slab_bytes_for(kvc::make_page_layout<kvc::codec::f32, kvc::codec::f32>(P, 16).bytes,
                                        kvc::make_page_layout<kvc::codec::f16, kvc::codec::f16>(P, 16).bytes);
}

cache_t make_cache(std::size_t capacity) {
  kvc::cache_config c = policy_test::make_config(shape, P, 256);
  c.capacity_bytes = capacity;
  return policy_test::make_cache<cache_t>(c);
}

// Feeds a sequence: a prompt, then decode steps of one token per layer, each attended by
// one query, each followed by on_step. Calls check(step, appended, phase) where phase is
// "stepping" (after the step's appends) or "settled" (after on_step).
class generator {
 public:
  generator(cache_t& cache, kvc::seq_id seq, unsigned seed) : cache_(cache), seq_(seq), rng_(seed) {}

  kvc::status append(int n) {
    const std::size_t count = static_cast<std::size_t>(n) * 2 * 16;
    k_.resize(count);
    v_.resize(count);
    pos_.resize(static_cast<std::size_t>(n));
    for (int l = 0; l < shape.num_layers; ++l) {
      for (float& x : k_) x = policy_test::snap(normal_(rng_));
      for (float& x : v_) x = policy_test::snap(normal_(rng_));
      for (int i = 0; i < n; ++i) pos_[static_cast<std::size_t>(i)] = next_ + i;
      KVC_RETURN_IF_ERROR(cache_.append(seq_, l, k_.data(), v_.data(), pos_.data(), n));
      q_.assign(4 * 16, 0.0f);
      for (float& x : q_) x = normal_(rng_);
      out_.resize(q_.size());
      const std::int32_t qpos = next_ + n - 1;
      KVC_RETURN_IF_ERROR(cache_.attend(seq_, l, q_.data(), &qpos, 1, out_.data()));
    }
    next_ += n;
    return kvc::ok_status();
  }

 private:
  cache_t& cache_;
  kvc::seq_id seq_;
  std::mt19937 rng_;
  std::normal_distribution<float> normal_{0.0f, 1.0f};
  std::vector<float> k_, v_, q_, out_;
  std::vector<std::int32_t> pos_;
  std::int32_t next_ = 0;
};

struct footprint {
  std::size_t bytes = 0;
  int max_tokens = 0, min_tokens = 0;
};

footprint measure(const cache_t& cache, kvc::seq_id seq) {
  footprint f;
  auto st = cache.stats(seq);
  EXPECT_TRUE(st.ok());
  f.bytes = st->bytes;
  f.max_tokens = *std::max_element(st->stream_tokens.begin(), st->stream_tokens.end());
  f.min_tokens = *std::min_element(st->stream_tokens.begin(), st->stream_tokens.end());
  return f;
}

// A target of T tokens per stream (evict<knorm, uniform::tokens(T)>), every N = 16 tokens,
// over 10,000 decode steps after a 40-token prompt.
//
// Bound, from T and N alone: a compress leaves s tokens in ceil(s / P) packed sealed pages
// and o = T - s in the open page; m appended tokens then add floor((o + m) / P) sealed
// pages and at most one open page, and ceil(s / P) + floor((o + m) / P) <=
// ceil((T + m) / P). With m <= N: at most T + N tokens and ceil((T + N) / P) sealed pages
// plus one open page per stream while stepping; after on_step, m <= N - 1. The pool holds
// only a few slabs more than that, so any growth would exhaust it.
//
// Compresses: the schedule compresses when at least N tokens were appended since its last
// compress (from 0), so after the prompt at appended 41, then 57, 73, ... exactly every N.
TEST(DecodeSchedule, TokenTargetStaysBoundedOver10000Steps) {
  const int T = 48, N = 16, prompt = 40, steps = 10000;
  const std::size_t slab = slab_bytes();
  const std::size_t sealed = kvc::make_page_layout<kvc::codec::f16, kvc::codec::f16>(P, 16).bytes;
  const std::size_t pages = static_cast<std::size_t>((T + N + P - 1) / P) + 1;  // sealed + open, per stream
  cache_t cache = make_cache(streams * (pages + 2) * slab);
  ASSERT_EQ(cache.open_page_bytes(), slab);
  ASSERT_EQ(cache.sealed_page_bytes(), sealed);
  const std::size_t bound_stepping = streams * ((T + N + P - 1) / P * sealed + slab);
  const std::size_t bound_settled = streams * ((T + N - 1 + P - 1) / P * sealed + slab);

  const kvc::seq_id seq = cache.create_sequence();
  generator gen(cache, seq, 1);
  POLICY_ASSERT_OK(gen.append(prompt));
  kvc::decode_schedule schedule(kvc::evict(kvc::score::knorm{}, kvc::budget::uniform::tokens(T)), N);

  std::vector<std::int64_t> compressed_at, expected_at;
  for (std::int64_t a = prompt + 1, last = 0; a <= prompt + steps; ++a)
    if (a - last >= N) expected_at.push_back(last = a);
  std::size_t peak = 0;
  for (int step = 1; step <= steps; ++step) {
    POLICY_ASSERT_OK(gen.append(1));
    const footprint during = measure(cache, seq);
    ASSERT_LE(during.max_tokens, T + N) << "step " << step;
    ASSERT_LE(during.bytes, bound_stepping) << "step " << step;
    auto r = schedule.on_step(cache, seq);
    ASSERT_TRUE(r.ok()) << "step " << step << ": " << r.status().message();
    ASSERT_EQ(r->appended, prompt + step);
    const footprint after = measure(cache, seq);
    if (r->compressed) {
      compressed_at.push_back(r->appended);
      ASSERT_EQ(after.max_tokens, std::min(T, prompt + step)) << "step " << step;
      ASSERT_EQ(after.min_tokens, std::min(T, prompt + step)) << "step " << step;
      ASSERT_EQ(r->report.bytes_after, after.bytes);
    }
    ASSERT_LE(after.max_tokens, T + N - 1) << "step " << step;
    ASSERT_LE(after.bytes, bound_settled) << "step " << step;
    peak = std::max(peak, during.bytes);
  }
  EXPECT_EQ(compressed_at, expected_at);
  EXPECT_EQ(schedule.last_compress(), expected_at.back());
  const kvc::cache_stats st = cache.stats();
  EXPECT_EQ(st.tokens_appended, static_cast<std::int64_t>(streams) * (prompt + steps));
  EXPECT_GT(st.free_slabs, 0);
  EXPECT_LE(peak, bound_stepping);
}

// A byte cap for the sequence (evict<knorm, byte_cap(B)>), every N = 16 tokens, after a
// 60-token prompt larger than the cap. After each compress the sequence holds at most B
// bytes and less than one open page below it (no stream could keep another token); in
// between, N tokens add at most ceil(N / P) sealed pages and one open page per stream.
TEST(DecodeSchedule, ByteCapTargetStaysBounded) {
  const int N = 16, steps = 3000;
  const std::size_t slab = slab_bytes();
  const std::size_t sealed = kvc::make_page_layout<kvc::codec::f16, kvc::codec::f16>(P, 16).bytes;
  const std::size_t cap = 14 * sealed + 2 * slab + 100;
  const std::size_t growth = streams * ((N + P - 1) / P * sealed + slab);
  cache_t cache = make_cache(cap + growth + streams * 3 * slab);
  const kvc::seq_id seq = cache.create_sequence();
  generator gen(cache, seq, 2);
  POLICY_ASSERT_OK(gen.append(60));
  kvc::decode_schedule schedule(kvc::evict(kvc::score::knorm{}, kvc::budget::byte_cap(cap)), N);
  kvc::workspace ws(std::size_t{4} << 20);
  int compresses = 0;
  for (int step = 1; step <= steps; ++step) {
    POLICY_ASSERT_OK(gen.append(1));
    if (compresses > 0) {
      ASSERT_LE(measure(cache, seq).bytes, cap + growth) << "step " << step;
    }
    auto r = step % 2 == 0 ? schedule.on_step(cache, seq) : schedule.on_step(cache, seq, ws);
    ASSERT_TRUE(r.ok()) << "step " << step << ": " << r.status().message();
    if (!r->compressed) continue;
    ++compresses;
    const footprint after = measure(cache, seq);
    ASSERT_LE(after.bytes, cap) << "step " << step;
    ASSERT_LT(cap - after.bytes, slab) << "step " << step << ": the cap is not used";
  }
  EXPECT_EQ(compresses, 1 + (steps - 1) / N);  // at appended 61, 77, ...
}

// When the schedule compresses: a prompt of at least N tokens on the first call; steps of
// several tokens counted in full; reset() restarts the count; a failed compress changes
// nothing and is retried on the next call; bad arguments give a status.
TEST(DecodeSchedule, WhenItCompresses) {
  cache_t cache = make_cache(std::size_t{8} << 20);
  const kvc::seq_id seq = cache.create_sequence();
  generator gen(cache, seq, 3);
  POLICY_ASSERT_OK(gen.append(100));
  kvc::decode_schedule schedule(kvc::evict(kvc::score::knorm{}, kvc::budget::uniform::tokens(30)), 16);
  auto r = schedule.on_step(cache, seq);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->compressed) << "a prompt of 100 >= 16 tokens is compressed at once";
  EXPECT_EQ(r->report.tokens_before, streams * 100);
  EXPECT_EQ(r->report.tokens_after, streams * 30);
  std::int64_t appended = 100, last = 100;
  for (int i = 0; i < 12; ++i) {
    POLICY_ASSERT_OK(gen.append(5));
    appended += 5;
    r = schedule.on_step(cache, seq);
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r->compressed, appended - last >= 16) << "appended " << appended;
    if (r->compressed) last = appended;
  }
  schedule.reset(appended);
  POLICY_ASSERT_OK(gen.append(15));
  r = schedule.on_step(cache, seq);
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->compressed) << "15 tokens since reset()";

  // A policy whose budget is invalid: the compress fails, the cache and the count stay.
  kvc::decode_schedule failing(kvc::evict(kvc::score::knorm{}, kvc::budget::uniform::tokens(-1)), 4);
  const policy_test::cache_snapshot before = policy_test::snapshot(cache, seq);
  auto f = failing.on_step(cache, seq);
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), kvc::status_code::invalid_budget);
  EXPECT_EQ(failing.last_compress(), 0);
  EXPECT_TRUE(policy_test::snapshot(cache, seq) == before);

  kvc::decode_schedule zero(kvc::evict(kvc::score::knorm{}, kvc::budget::uniform::tokens(8)), 0);
  EXPECT_EQ(zero.on_step(cache, seq).status().code(), kvc::status_code::invalid_argument);
  POLICY_ASSERT_OK(cache.release(seq));
  EXPECT_EQ(schedule.on_step(cache, seq).status().code(), kvc::status_code::unknown_sequence);
}

}  // namespace
