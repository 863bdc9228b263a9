// paged_kv_cache::compress with a policy type that has no plan() must not compile
// (static_assert in kvc/cache.hpp, kvc::is_policy_for_v).
#include <kvc/budget/uniform.hpp>
#include <kvc/cache.hpp>
#include <kvc/policies/evict.hpp>
#include <kvc/score/streaming.hpp>

namespace {

using cache_type = kvc::paged_kv_cache<kvc::codec::f32>;

struct no_plan {  // looks like a policy, but has no `status plan(Context&)`
  kvc::status run(cache_type::compress_context&) const { return kvc::ok_status(); }
};

using good_policy = kvc::evict<kvc::score::streaming, kvc::budget::uniform>;

static_assert(!kvc::is_policy_for_v<no_plan, cache_type::compress_context>, "the trait must reject no_plan");
static_assert(kvc::is_policy_for_v<good_policy, cache_type::compress_context>, "the trait must accept evict");

}  // namespace

bool compress_once(cache_type& cache, kvc::seq_id seq) {
#ifdef KVC_FAILTEST_SHOULD_FAIL
  auto report = cache.compress(seq, no_plan{});
#else
  auto report = cache.compress(seq, good_policy(kvc::score::streaming{}, kvc::budget::uniform::tokens(8)));
#endif
  return report.ok();
}
