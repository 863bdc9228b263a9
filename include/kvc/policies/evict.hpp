// kvc/policies/evict.hpp: kvc::evict<Scorer, Budget>, score every stream, let the
// budget size each stream, keep each stream's top-k.
//
// Ties in score are broken towards the more recent token (higher index), so the kept
// set is a deterministic function of the scores. Scores may be +-inf but not NaN.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "kvc/budget/budget.hpp"
#include "kvc/score/scorer.hpp"
#include "kvc/status.hpp"
#include "kvc/stream.hpp"
#include "kvc/version.hpp"
#include "kvc/workspace.hpp"

KVC_NAMESPACE_BEGIN

namespace detail {

// Sets keep[i] = 1 for the k highest (score, index) pairs, 0 elsewhere. idx: [n] scratch.
inline void keep_top_k(const float* scores, int n, int k, std::uint8_t* keep, std::int32_t* idx) noexcept {
  if (k >= n) {
    std::fill(keep, keep + n, std::uint8_t{1});
    return;
  }
  std::fill(keep, keep + n, std::uint8_t{0});
  if (k <= 0) return;
  for (int i = 0; i < n; ++i) idx[i] = i;
  const auto better = [scores](std::int32_t a, std::int32_t b) {
    return scores[a] > scores[b] || (scores[a] == scores[b] && a > b);
  };
  std::nth_element(idx, idx + (k - 1), idx + n, better);
  for (int i = 0; i < k; ++i) keep[idx[i]] = 1;
}

// Whether a compress context tells where each stream's tokens lie in pages.
template <class C, class = void>
struct has_page_layout : std::false_type {};

template <class C>
struct has_page_layout<C, std::void_t<decltype(std::declval<const C&>().sealed_tokens(0)),
                                      decltype(std::declval<const C&>().page_tokens()),
                                      decltype(std::declval<const C&>().open_page_bytes()),
                                      decltype(std::declval<const C&>().sealed_page_bytes())>> : std::true_type {};

}  // namespace detail

template <class Scorer, class Budget>
class evict {
  static_assert(is_scorer_v<Scorer>,
                "kvc::evict<Scorer, Budget>: Scorer does not satisfy the scorer interface in kvc/score/scorer.hpp "
                "(name, fields, and `status score(const stream_data&, workspace&, float*) const`)");
  static_assert(is_budget_v<Budget>,
                "kvc::evict<Scorer, Budget>: Budget does not satisfy the budget interface in kvc/budget/budget.hpp "
                "(`status allocate(const budget_request&, std::int32_t*) const`)");

 public:
  evict(Scorer scorer, Budget budget) : scorer_(std::move(scorer)), budget_(std::move(budget)) {}

  const Scorer& scorer() const noexcept { return scorer_; }
  const Budget& budget() const noexcept { return budget_; }

  template <class Context>
  status plan(Context& ctx) const {
    workspace& ws = ctx.scratch();
    const int n_streams = ctx.num_streams();
    stream_info* infos = ws.alloc<stream_info>(static_cast<std::size_t>(n_streams));
    float** scores = ws.alloc<float*>(static_cast<std::size_t>(n_streams));
    std::int32_t* keep_counts = ws.alloc<std::int32_t>(static_cast<std::size_t>(n_streams));
    if (n_streams > 0 && (infos == nullptr || scores == nullptr || keep_counts == nullptr)) return full(ws);
    int max_n = 0;
    for (int i = 0; i < n_streams; ++i) {
      infos[i] = ctx.info(i);
      max_n = std::max(max_n, infos[i].n_tokens);
      scores[i] = ws.alloc<float>(static_cast<std::size_t>(infos[i].n_tokens));
      if (infos[i].n_tokens > 0 && scores[i] == nullptr) return full(ws);
    }
    for (int i = 0; i < n_streams; ++i) {
      workspace_scope scope(ws);
      stream_data s;
      KVC_RETURN_IF_ERROR(ctx.load(i, Scorer::fields, s));
      KVC_RETURN_IF_ERROR(scorer_.score(s, ws, scores[i]));
      for (int t = 0; t < infos[i].n_tokens; ++t)
        if (std::isnan(scores[i][t]))
          return status::error(status_code::non_finite,
                               "evict: scorer %s gave NaN to token %d of stream (layer %d, kv_head %d)", Scorer::name,
                               t, infos[i].layer, infos[i].kv_head);
    }
    budget_request req;
    req.shape = &ctx.shape();
    req.num_streams = n_streams;
    req.streams = infos;
    req.scores = scores;
    req.scratch = &ws;
    if constexpr (detail::has_page_layout<Context>::value) {
      std::int32_t* sealed = ws.alloc<std::int32_t>(static_cast<std::size_t>(n_streams));
      if (n_streams > 0 && sealed == nullptr) return full(ws);
      for (int i = 0; i < n_streams; ++i) sealed[i] = ctx.sealed_tokens(i);
      req.sealed_tokens = sealed;
      req.page_tokens = ctx.page_tokens();
      req.open_page_bytes = ctx.open_page_bytes();
      req.sealed_page_bytes = ctx.sealed_page_bytes();
    }
    KVC_RETURN_IF_ERROR(budget_.allocate(req, keep_counts));
    for (int i = 0; i < n_streams; ++i)
      if (keep_counts[i] < 0 || keep_counts[i] > infos[i].n_tokens)
        return status::error(status_code::invalid_budget,
                             "evict: budget kept %d of %d tokens in stream (layer %d, kv_head %d)", keep_counts[i],
                             infos[i].n_tokens, infos[i].layer, infos[i].kv_head);
    std::int32_t* idx = ws.alloc<std::int32_t>(static_cast<std::size_t>(max_n));
    if (max_n > 0 && idx == nullptr) return full(ws);
    for (int i = 0; i < n_streams; ++i)
      detail::keep_top_k(scores[i], infos[i].n_tokens, keep_counts[i], ctx.keep(i), idx);
    return ok_status();
  }

 private:
  static status full(const workspace& ws) noexcept {
    return status::error(status_code::workspace_exhausted,
                         "evict: workspace of %zu bytes is full; raise cache_config::workspace_bytes", ws.capacity());
  }
  Scorer scorer_;
  Budget budget_;
};

KVC_NAMESPACE_END
