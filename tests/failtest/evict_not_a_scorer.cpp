// kvc::evict<Scorer, Budget> with a Scorer that is not a scorer must not compile
// (static_assert in kvc/policies/evict.hpp).
#include <kvc/budget/uniform.hpp>
#include <kvc/policies/evict.hpp>
#include <kvc/score/knorm.hpp>

namespace {

struct not_a_scorer {  // no name, no fields, no score()
  float weight = 1.0f;
};

static_assert(!kvc::is_scorer_v<not_a_scorer>, "the trait must reject not_a_scorer");
static_assert(kvc::is_scorer_v<kvc::score::knorm>, "the trait must accept knorm");

#ifdef KVC_FAILTEST_SHOULD_FAIL
using scorer = not_a_scorer;
#else
using scorer = kvc::score::knorm;
#endif

}  // namespace

kvc::evict<scorer, kvc::budget::uniform> make_policy() {
  return kvc::evict<scorer, kvc::budget::uniform>(scorer{}, kvc::budget::uniform::keep_fraction(0.5));
}
