// kvc/policies/decode_schedule.hpp: kvc::decode_schedule, compression during generation,
// so that a sequence of any length runs in bounded memory.
//
// An engine calls on_step(cache, seq) after each decode step, once the step's tokens are
// appended to every layer. Whenever at least `every` tokens have been appended since the
// schedule last compressed (since 0 for a new schedule), it compresses the whole sequence
// with its policy, which re-scores every stream and shrinks it back to the policy's target:
//   kvc::evict<Scorer, kvc::budget::uniform>  with uniform::tokens(T): T tokens per stream;
//   kvc::evict<Scorer, kvc::budget::byte_cap> with byte_cap(B): B bytes for the sequence.
// With one token per step the schedule compresses exactly every `every` steps, so a stream
// holds at most T + every tokens, and its pages at most (T + every) / page_tokens + 2 (the
// packed sealed pages, one partial sealed page and the open page). A step that appends
// several tokens (or a prompt) is counted in full: a prompt of at least `every` tokens is
// compressed on the first call.
//
//   auto sched = kvc::decode_schedule(kvc::evict(kvc::score::knorm{}, kvc::budget::uniform::tokens(512)), 64);
//   for (;;) {                                   // one decode step
//     for (int l = 0; l < layers; ++l) { cache.append(seq, l, ...); cache.attend(seq, l, ...); }
//     auto step = sched.on_step(cache, seq);     // kvc::result<kvc::decode_step>
//     if (!step.ok()) ...;                       // the policy's or the pool's status
//     if (step->compressed) ...;                 // step->report: tokens and bytes before and after
//   }
//
// A schedule holds the state of one sequence (the appended count at its last compress):
// keep one per sequence; copy it for a fork. on_step makes no system allocation (it looks
// up the sequence and, when due, runs compress()). If the compress fails, nothing changes
// and the next call tries again.
#pragma once

#include <cstdint>
#include <utility>

#include "kvc/cache.hpp"
#include "kvc/policies/policy.hpp"
#include "kvc/status.hpp"
#include "kvc/version.hpp"
#include "kvc/workspace.hpp"

KVC_NAMESPACE_BEGIN

// What one on_step did.
struct decode_step {
  bool compressed = false;
  std::int64_t appended = 0;  // tokens appended to the sequence so far (the least over its layers)
  compress_report report;     // when compressed: tokens and bytes before and after
};

template <class Policy>
class decode_schedule {
 public:
  // Compresses with `policy` every `every` appended tokens (every >= 1; on_step reports
  // status_code::invalid_argument otherwise).
  decode_schedule(Policy policy, std::int64_t every) : policy_(std::move(policy)), every_(every) {}

  const Policy& policy() const noexcept { return policy_; }
  std::int64_t every() const noexcept { return every_; }
  // The appended count at the last compress (0 before the first).
  std::int64_t last_compress() const noexcept { return last_; }
  // Counts from `appended` tokens on, e.g. to leave a prompt whole until `every` more arrive.
  void reset(std::int64_t appended = 0) noexcept { last_ = appended; }

  // Cache: a kvc::paged_kv_cache. Compresses when due, in the cache's own workspace.
  template <class Cache>
  result<decode_step> on_step(Cache& cache, seq_id seq) {
    return step(cache, seq, nullptr);
  }
  // The same, compressing in the caller's workspace (one per thread).
  template <class Cache>
  result<decode_step> on_step(Cache& cache, seq_id seq, workspace& ws) {
    return step(cache, seq, &ws);
  }

 private:
  template <class Cache>
  result<decode_step> step(Cache& cache, seq_id seq, workspace* ws) {
    static_assert(is_policy_for_v<Policy, typename Cache::compress_context>,
                  "kvc::decode_schedule<Policy>: Policy needs `kvc::status plan(Context&)`; see "
                  "kvc/policies/policy.hpp (e.g. kvc::evict<kvc::score::knorm, kvc::budget::uniform>)");
    if (every_ < 1)
      return status::error(status_code::invalid_argument, "decode_schedule: every is %lld, must be >= 1",
                           static_cast<long long>(every_));
    decode_step r;
    const int layers = cache.shape().num_layers;
    for (int l = 0; l < layers; ++l) {
      auto v = cache.view(seq, l, 0);
      if (!v.ok()) return v.status();
      const std::int64_t a = v->appended();
      if (l == 0 || a < r.appended) r.appended = a;
    }
    if (r.appended - last_ < every_) return r;
    auto rep = ws != nullptr ? cache.compress(seq, all_layers, policy_, *ws) : cache.compress(seq, policy_);
    if (!rep.ok()) return rep.status();
    r.compressed = true;
    r.report = *rep;
    last_ = r.appended;
    return r;
  }

  Policy policy_;
  std::int64_t every_;
  std::int64_t last_ = 0;
};

KVC_NAMESPACE_END
