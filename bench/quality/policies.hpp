// bench/quality/policies.hpp: what the quality evaluation compares. Every scorer runs with
// every budget, as kvc::evict<Scorer, Budget>; adding one is one line in a table below.
//
// A scorer line builds the scorer from the setup (the oracle reads the held-out queries
// from it); a budget line builds the budget for the setup's compression ratio (the
// fraction of tokens to remove). The scorer named "oracle" is the reference every other
// is measured against, and the pair oracle / uniform gives the kept sets that recall is
// counted against (see README.md).
#pragma once

#include <cstddef>
#include <cstdint>
#include <tuple>

#include <kvc/budget/adakv.hpp>
#include <kvc/budget/byte_cap.hpp>
#include <kvc/budget/pyramid.hpp>
#include <kvc/budget/uniform.hpp>
#include <kvc/score/compactor.hpp>
#include <kvc/score/expected_attention.hpp>
#include <kvc/score/h2o.hpp>
#include <kvc/score/keydiff.hpp>
#include <kvc/score/knorm.hpp>
#include <kvc/score/leverage.hpp>
#include <kvc/score/oracle.hpp>
#include <kvc/score/qfilter.hpp>
#include <kvc/score/random.hpp>
#include <kvc/score/snapkv.hpp>
#include <kvc/score/streaming.hpp>
#include <kvc/score/tova.hpp>
#include <kvc/tensor.hpp>

namespace quality {

// What a scorer or budget may be built from.
struct policy_setup {
  double ratio = 0.0;                                   // fraction of the cached tokens to remove
  kvc::span<const kvc::score::future_queries> heldout;  // [num_layers]: the queries that come later
  std::size_t sequence_bytes = 0;                       // pages the uncompressed sequence holds
};

template <class Make>
struct entry {
  const char* name;
  Make make;  // policy_setup -> scorer or budget
};

template <class Make>
entry<Make> line(const char* name, Make make) {
  return {name, make};
}

// Scorers, with the options the evaluation uses (each header documents its own).
inline auto scorer_table() {
  return std::make_tuple(
      line("oracle",
           [](const policy_setup& s) {
             kvc::score::oracle o;
             o.layers = s.heldout;
             return o;
           }),
      line("streaming", [](const policy_setup&) { return kvc::score::streaming{}; }),
      line("random", [](const policy_setup&) { return kvc::score::random{}; }),
      line("knorm", [](const policy_setup&) { return kvc::score::knorm{}; }),
      line("keydiff", [](const policy_setup&) { return kvc::score::keydiff{}; }),
      line("snapkv", [](const policy_setup&) { return kvc::score::snapkv{}; }),
      line("h2o", [](const policy_setup&) { return kvc::score::h2o{}; }),
      line("tova", [](const policy_setup&) { return kvc::score::tova{}; }),
      line("expected_attention", [](const policy_setup&) { return kvc::score::expected_attention{}; }),
      line("leverage", [](const policy_setup&) { return kvc::score::leverage{}; }),
      line("compactor", [](const policy_setup&) { return kvc::score::compactor{}; }),
      line("qfilter", [](const policy_setup&) { return kvc::score::qfilter{}; }));
}

// Budgets at the setup's compression ratio.
inline auto budget_table() {
  return std::make_tuple(
      line("uniform", [](const policy_setup& s) { return kvc::budget::uniform::compression_ratio(s.ratio); }),
      line("pyramid", [](const policy_setup& s) { return kvc::budget::pyramid::compression_ratio(s.ratio); }),
      line("adakv", [](const policy_setup& s) { return kvc::budget::adakv::compression_ratio(s.ratio); }),
      line("adakv_pyramid",
           [](const policy_setup& s) { return kvc::budget::adakv(kvc::budget::pyramid::compression_ratio(s.ratio)); }),
      line("byte_cap", [](const policy_setup& s) {
        return kvc::budget::byte_cap(static_cast<std::size_t>((1.0 - s.ratio) * static_cast<double>(s.sequence_bytes)));
      }));
}

}  // namespace quality
