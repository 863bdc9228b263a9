// bench/quality/evaluate.hpp: the evaluation protocol and its metrics (README.md has the
// prose version).
//
// One f32 paged_kv_cache per workload (f32 pages store the keys exactly, so only eviction
// differs between the caches). A base sequence receives the first `context` tokens of every
// layer, then attend() runs the queries of the last `window` of them: the cache records them
// (observe.query_window = window) and their attention (observe.track_attention), which is
// all a policy sees of the queries. For every policy and ratio, a fork of the base is
// compressed and the held-out queries (positions context..tokens-1) attend it; a fork that
// is never compressed gives the reference outputs. Forks share the base's pages, so the
// base is filled once; compress() copies the pages it changes.
//
// Metrics, per policy and ratio (S streams = layers x KV heads, R = held-out queries x the
// query group = rows per stream):
//   rel_error    ||o - o_full|| / ||o_full|| over the query heads of one layer, for every
//                held-out query and layer, averaged (o: attend() on the compressed fork);
//   mass_kept    the attention probability the full cache gives the retained tokens,
//                sum over kept i of p_full(row, i), averaged over every row of every stream;
//   recall       |kept & kept_oracle| / |kept_oracle| per stream, averaged; kept_oracle is
//                what oracle / uniform keeps at the same ratio;
//   needle_kept  planted needles still in the cache (synthetic retrieval heads);
//   needle_hit   rows of a held-out query that looks for a needle whose attention argmax on
//                the compressed cache is that needle.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include <kvc/cache.hpp>
#include <kvc/codecs/f32.hpp>
#include <kvc/policies/evict.hpp>

#include "policies.hpp"
#include "workload.hpp"

namespace quality {

using cache_t = kvc::paged_kv_cache<kvc::codec::f32>;

struct policy {
  std::string scorer, budget;
  std::function<kvc::status(cache_t&, kvc::seq_id, const policy_setup&, kvc::workspace&)> compress;
  std::string name() const { return scorer + "/" + budget; }
};

// Every scorer of scorer_table() with every budget of budget_table().
inline std::vector<policy> all_policies() {
  std::vector<policy> out;
  const auto budgets = budget_table();
  std::apply(
      [&](const auto&... s) {
        const auto with_budgets = [&](const auto& sc) {
          std::apply(
              [&](const auto&... b) {
                (out.push_back(policy{
                     sc.name, b.name,
                     [sc, b](cache_t& c, kvc::seq_id id, const policy_setup& setup, kvc::workspace& ws) -> kvc::status {
                       return c.compress(id, kvc::all_layers, kvc::evict(sc.make(setup), b.make(setup)), ws).status();
                     }}),
                 ...);
              },
              budgets);
        };
        (with_budgets(s), ...);
      },
      scorer_table());
  return out;
}

struct result_row {
  std::string suite, scorer, budget;
  double ratio = 0.0;
  double kept = 0.0;  // retained tokens / cached tokens, over the whole sequence
  double rel_error = 0.0, mass_kept = 0.0, recall = 0.0;
  double needle_kept = std::numeric_limits<double>::quiet_NaN(), needle_hit = std::numeric_limits<double>::quiet_NaN();
  double compress_ms = 0.0;
  std::string error;                        // the failed status of compress, if any
  std::vector<std::int32_t> stream_tokens;  // retained per stream, [layer * num_kv_heads + kv_head]
  std::string policy() const { return scorer + "/" + budget; }
};

struct eval_options {
  std::vector<double> ratios;
  int threads = 1;
  int page_tokens = 32;
  bool prefill_attend = false;  // observe every cached query, not only the window
};

// What the full cache does, for the report and the checks.
struct reference_info {
  double needle_hit = std::numeric_limits<double>::quiet_NaN();  // argmax on the full cache finds the needle
  double sink_mass = 0.0;                                        // held-out attention on positions 0-3
  double top_mass = 0.0;                                         // held-out attention on each row's top 5% of tokens
  double seconds = 0.0;                                          // the whole evaluation
};

namespace detail {

inline float dot(const float* a, const float* b, int d) noexcept {
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
  int e = 0;
  for (; e + 4 <= d; e += 4) {
    s0 += a[e] * b[e];
    s1 += a[e + 1] * b[e + 1];
    s2 += a[e + 2] * b[e + 2];
    s3 += a[e + 3] * b[e + 3];
  }
  for (; e < d; ++e) s0 += a[e] * b[e];
  return (s0 + s1) + (s2 + s3);
}

// Held-out query rows of one stream that look for a needle, with its position.
struct needle_row {
  int query = 0, head = 0;    // held-out query index, query head (global)
  int position = 0;           // of the needle
  std::vector<float> logits;  // [context] q.k / sqrt(d) on the full cache
};

inline int stream_of(const kvc::model_shape& s, int layer, int kv_head) noexcept {
  return layer * s.num_kv_heads + kv_head;
}

}  // namespace detail

class evaluation {
 public:
  evaluation(const workload& w, eval_options opt) : w_(w), opt_(std::move(opt)) {}

  // Runs every policy at every ratio; rows come in (policy, ratio) order.
  kvc::status run(const std::vector<policy>& policies, std::vector<result_row>& rows, reference_info& info) {
    const auto start = std::chrono::steady_clock::now();
    KVC_RETURN_IF_ERROR(check_workload());
    KVC_RETURN_IF_ERROR(build_cache());
    KVC_RETURN_IF_ERROR(fill_base());
    KVC_RETURN_IF_ERROR(reference(info));
    KVC_RETURN_IF_ERROR(oracle_sets());

    const std::size_t jobs = policies.size() * opt_.ratios.size();
    std::vector<result_row> out(jobs);
    std::atomic<std::size_t> next{0};
    const auto worker = [&]() {
      kvc::workspace ws(cache_->config().workspace_bytes);
      for (std::size_t j; (j = next.fetch_add(1)) < jobs;)
        out[j] = evaluate(policies[j / opt_.ratios.size()], opt_.ratios[j % opt_.ratios.size()], ws);
    };
    const int n_threads = std::max(1, std::min<int>(opt_.threads, static_cast<int>(jobs)));
    std::vector<std::thread> pool;
    for (int t = 1; t < n_threads; ++t) pool.emplace_back(worker);
    worker();
    for (std::thread& t : pool) t.join();
    for (result_row& r : out) rows.push_back(std::move(r));
    info.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return kvc::ok_status();
  }

 private:
  const kvc::model_shape& shape() const noexcept { return w_.shape; }
  int streams() const noexcept { return shape().streams_per_sequence(); }

  kvc::status check_workload() const {
    if (w_.context < 1 || w_.heldout() < 1)
      return kvc::status::error(kvc::status_code::invalid_argument,
                                "%s: need at least one cached and one held-out token (context %d of %d tokens)",
                                w_.name.c_str(), w_.context, w_.tokens);
    if (w_.window < 1 || w_.window > w_.context)
      return kvc::status::error(kvc::status_code::invalid_argument, "%s: window %d outside [1, context %d]",
                                w_.name.c_str(), w_.window, w_.context);
    return kvc::ok_status();
  }

  kvc::status build_cache() {
    kvc::cache_config c;
    c.shape = shape();
    c.page_tokens = opt_.page_tokens;
    c.max_context = w_.context;
    c.rope = w_.rope;
    c.observe.query_window = w_.window;
    c.observe.track_attention = true;
    // Scratch for the heavier scorers (covariances, sketches): twice the default.
    c.workspace_bytes = 2 * kvc::default_workspace_bytes(c);
    // The base, the reference fork, and per thread one fork whose pages may all be copied.
    const auto layout = kvc::make_page_layout<kvc::codec::f32, kvc::codec::f32>(c.page_tokens, c.shape.head_dim);
    const std::size_t page = kvc::page_pool::slab_bytes_for(layout.bytes, layout.bytes);
    const std::size_t pages = static_cast<std::size_t>(streams()) *
                              (static_cast<std::size_t>((w_.context + c.page_tokens - 1) / c.page_tokens) + 2);
    c.capacity_bytes = page * pages * static_cast<std::size_t>(std::max(1, opt_.threads) + 2);
    kvc::result<cache_t> r = cache_t::create(c);
    if (!r.ok()) return r.status();
    cache_ = std::make_unique<cache_t>(std::move(r).value());
    return kvc::ok_status();
  }

  kvc::status fill_base() {
    base_ = cache_->create_sequence();
    std::vector<std::int32_t> pos(static_cast<std::size_t>(w_.tokens));
    for (int i = 0; i < w_.tokens; ++i) pos[static_cast<std::size_t>(i)] = i;
    const int first = opt_.prefill_attend ? 0 : w_.context - w_.window;
    const std::size_t qrow = static_cast<std::size_t>(shape().num_q_heads * shape().head_dim);
    std::vector<float> out(static_cast<std::size_t>(w_.context - first) * qrow);
    for (int l = 0; l < shape().num_layers; ++l) {
      KVC_RETURN_IF_ERROR(cache_->append(base_, l, w_.k_at(l, 0, 0), w_.v_at(l, 0, 0), pos.data(), w_.context));
      KVC_RETURN_IF_ERROR(
          cache_->attend(base_, l, w_.q_at(l, first), pos.data() + first, w_.context - first, out.data()));
    }
    positions_ = std::move(pos);
    heldout_.resize(static_cast<std::size_t>(shape().num_layers));
    for (int l = 0; l < shape().num_layers; ++l)
      heldout_[static_cast<std::size_t>(l)] = {w_.q_at(l, w_.context), positions_.data() + w_.context, w_.heldout()};
    kvc::result<kvc::sequence_stats> st = cache_->stats(base_);
    if (!st.ok()) return st.status();
    sequence_bytes_ = st->bytes;
    return kvc::ok_status();
  }

  // Held-out outputs [layer][query][q_head][d] of a sequence.
  kvc::status attend_heldout(kvc::seq_id id, std::vector<float>& out) const {
    const std::size_t per_layer =
        static_cast<std::size_t>(w_.heldout()) * static_cast<std::size_t>(shape().num_q_heads * shape().head_dim);
    out.assign(per_layer * static_cast<std::size_t>(shape().num_layers), 0.0f);
    for (int l = 0; l < shape().num_layers; ++l)
      KVC_RETURN_IF_ERROR(cache_->attend(id, l, w_.q_at(l, w_.context), positions_.data() + w_.context, w_.heldout(),
                                         out.data() + per_layer * static_cast<std::size_t>(l)));
    return kvc::ok_status();
  }

  // Full-cache outputs, and per stream the mean held-out attention of every cached token.
  kvc::status reference(reference_info& info) {
    kvc::result<kvc::seq_id> full = cache_->fork(base_);
    if (!full.ok()) return full.status();
    KVC_RETURN_IF_ERROR(attend_heldout(*full, full_out_));
    KVC_RETURN_IF_ERROR(cache_->release(*full));

    const int d = shape().head_dim, g = shape().group_size(), n = w_.context;
    const double scale = 1.0 / std::sqrt(static_cast<double>(d));
    const int rows = w_.heldout() * g;
    weights_.assign(static_cast<std::size_t>(streams()), std::vector<double>(static_cast<std::size_t>(n), 0.0));
    needle_rows_.assign(static_cast<std::size_t>(streams()), {});
    for (const needle& nd : w_.needles)
      for (int q : nd.queries)
        for (int j = 0; j < g; ++j)
          needle_rows_[static_cast<std::size_t>(detail::stream_of(shape(), nd.layer, nd.kv_head))].push_back(
              {q, nd.kv_head * g + j, nd.position, {}});
    std::vector<double> p(static_cast<std::size_t>(n)), sorted;
    std::vector<float> logits(static_cast<std::size_t>(n));
    double sink = 0.0, top = 0.0;
    std::int64_t hits = 0, needle_total = 0;
    const int top_k = std::max(1, n / 20);
    for (int l = 0; l < shape().num_layers; ++l)
      for (int h = 0; h < shape().num_kv_heads; ++h) {
        const int s = detail::stream_of(shape(), l, h);
        std::vector<double>& wt = weights_[static_cast<std::size_t>(s)];
        for (int qi = 0; qi < w_.heldout(); ++qi)
          for (int j = 0; j < g; ++j) {
            const float* q = w_.q_at(l, w_.context + qi) + static_cast<std::size_t>(h * g + j) * d;
            double mx = -std::numeric_limits<double>::infinity();
            int arg = 0;
            for (int i = 0; i < n; ++i) {
              p[static_cast<std::size_t>(i)] = detail::dot(q, w_.k_at(l, i, h), d) * scale;
              logits[static_cast<std::size_t>(i)] = static_cast<float>(p[static_cast<std::size_t>(i)]);
              if (p[static_cast<std::size_t>(i)] > mx) mx = p[static_cast<std::size_t>(i)], arg = i;
            }
            double sum = 0.0;
            for (double& x : p) sum += (x = std::exp(x - mx));
            for (int i = 0; i < n; ++i) wt[static_cast<std::size_t>(i)] += p[static_cast<std::size_t>(i)] / sum / rows;
            for (int i = 0; i < std::min(n, 4); ++i) sink += p[static_cast<std::size_t>(i)] / sum;
            sorted = p;
            std::nth_element(sorted.begin(), sorted.begin() + (top_k - 1), sorted.end(), std::greater<double>());
            for (int i = 0; i < top_k; ++i) top += sorted[static_cast<std::size_t>(i)] / sum;
            for (detail::needle_row& r : needle_rows_[static_cast<std::size_t>(s)])
              if (r.query == qi && r.head == h * g + j) {
                ++needle_total;
                hits += arg == r.position ? 1 : 0;
                r.logits = logits;
              }
          }
      }
    const double all_rows = static_cast<double>(rows) * streams();
    info.sink_mass = sink / all_rows;
    info.top_mass = top / all_rows;
    if (needle_total > 0) info.needle_hit = static_cast<double>(hits) / static_cast<double>(needle_total);
    return kvc::ok_status();
  }

  // What oracle / uniform keeps at each ratio: the sets recall is counted against.
  kvc::status oracle_sets() {
    kvc::workspace ws(cache_->config().workspace_bytes);
    oracle_kept_.assign(opt_.ratios.size(), {});
    for (std::size_t r = 0; r < opt_.ratios.size(); ++r) {
      kvc::result<kvc::seq_id> id = cache_->fork(base_);
      if (!id.ok()) return id.status();
      kvc::score::oracle o;
      o.layers = span_of_heldout();
      KVC_RETURN_IF_ERROR(cache_
                              ->compress(*id, kvc::all_layers,
                                         kvc::evict(o, kvc::budget::uniform::compression_ratio(opt_.ratios[r])), ws)
                              .status());
      KVC_RETURN_IF_ERROR(kept_sets(*id, oracle_kept_[r]));
      KVC_RETURN_IF_ERROR(cache_->release(*id));
    }
    return kvc::ok_status();
  }

  kvc::span<const kvc::score::future_queries> span_of_heldout() const noexcept {
    return {heldout_.data(), heldout_.size()};
  }

  // Per stream, a flag per cached token: retained by sequence id.
  kvc::status kept_sets(kvc::seq_id id, std::vector<std::vector<std::uint8_t>>& kept) const {
    kept.assign(static_cast<std::size_t>(streams()),
                std::vector<std::uint8_t>(static_cast<std::size_t>(w_.context), 0));
    for (int l = 0; l < shape().num_layers; ++l)
      for (int h = 0; h < shape().num_kv_heads; ++h) {
        kvc::result<cache_t::stream_view> v = cache_->view(id, l, h);
        if (!v.ok()) return v.status();
        for (std::int32_t p : v->positions())
          kept[static_cast<std::size_t>(detail::stream_of(shape(), l, h))][static_cast<std::size_t>(p)] = 1;
      }
    return kvc::ok_status();
  }

  result_row evaluate(const policy& p, double ratio, kvc::workspace& ws) const {
    result_row row;
    row.suite = w_.name;
    row.scorer = p.scorer;
    row.budget = p.budget;
    row.ratio = ratio;
    const kvc::status st = measure(p, ratio, ws, row);
    if (!st.ok()) row.error = st.message();
    return row;
  }

  kvc::status measure(const policy& p, double ratio, kvc::workspace& ws, result_row& row) const {
    kvc::result<kvc::seq_id> fork = cache_->fork(base_);
    if (!fork.ok()) return fork.status();
    const kvc::seq_id id = *fork;
    struct releaser {
      cache_t& c;
      kvc::seq_id id;
      ~releaser() { static_cast<void>(c.release(id)); }
    } release{*cache_, id};

    policy_setup setup;
    setup.ratio = ratio;
    setup.heldout = span_of_heldout();
    setup.sequence_bytes = sequence_bytes_;
    const auto t0 = std::chrono::steady_clock::now();
    KVC_RETURN_IF_ERROR(p.compress(*cache_, id, setup, ws));
    row.compress_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();

    kvc::result<kvc::sequence_stats> st = cache_->stats(id);
    if (!st.ok()) return st.status();
    row.stream_tokens = st->stream_tokens;
    row.kept = static_cast<double>(st->tokens_retained) / (static_cast<double>(streams()) * w_.context);

    // Attention mass, recall and needles, stream by stream.
    std::vector<std::vector<std::uint8_t>> kept;
    KVC_RETURN_IF_ERROR(kept_sets(id, kept));
    const std::vector<std::vector<std::uint8_t>>& oracle = oracle_kept_[ratio_index(ratio)];
    double mass = 0.0, recall = 0.0;
    std::int64_t needles = 0, needles_kept = 0, needle_rows = 0, needle_hits = 0;
    for (int s = 0; s < streams(); ++s) {
      const std::vector<std::uint8_t>& k = kept[static_cast<std::size_t>(s)];
      const std::vector<std::uint8_t>& o = oracle[static_cast<std::size_t>(s)];
      std::int64_t both = 0, in_oracle = 0;
      for (int i = 0; i < w_.context; ++i) {
        const std::size_t u = static_cast<std::size_t>(i);
        if (k[u] != 0) mass += weights_[static_cast<std::size_t>(s)][u];
        in_oracle += o[u];
        both += o[u] & k[u];
      }
      recall += in_oracle == 0 ? 1.0 : static_cast<double>(both) / static_cast<double>(in_oracle);
    }
    for (const needle& nd : w_.needles) {
      ++needles;
      needles_kept += kept[static_cast<std::size_t>(detail::stream_of(shape(), nd.layer, nd.kv_head))]
                          [static_cast<std::size_t>(nd.position)];
    }
    for (int l = 0; l < shape().num_layers; ++l)
      for (int h = 0; h < shape().num_kv_heads; ++h) {
        const auto& nr = needle_rows_[static_cast<std::size_t>(detail::stream_of(shape(), l, h))];
        if (nr.empty()) continue;
        // Eviction leaves the retained keys as they were, so a row's logits on the
        // compressed cache are its full-cache logits on the retained positions (plus their
        // log-weights).
        kvc::result<cache_t::stream_view> v = cache_->view(id, l, h);
        if (!v.ok()) return v.status();
        const std::vector<std::int32_t> pos = v->positions();
        const std::vector<float> lw = v->log_weights();
        for (const detail::needle_row& r : nr) {
          double best = -std::numeric_limits<double>::infinity();
          std::int32_t arg = -1;
          for (std::size_t i = 0; i < pos.size(); ++i) {
            const double x = r.logits[static_cast<std::size_t>(pos[i])] + lw[i];
            if (x > best) best = x, arg = pos[i];
          }
          ++needle_rows;
          needle_hits += arg == r.position ? 1 : 0;
        }
      }
    row.mass_kept = mass / streams();
    row.recall = recall / streams();
    if (needles > 0) row.needle_kept = static_cast<double>(needles_kept) / static_cast<double>(needles);
    if (needle_rows > 0) row.needle_hit = static_cast<double>(needle_hits) / static_cast<double>(needle_rows);

    // Output error of the held-out queries.
    std::vector<float> out;
    KVC_RETURN_IF_ERROR(attend_heldout(id, out));
    const std::size_t per_query = static_cast<std::size_t>(shape().num_q_heads * shape().head_dim);
    double err = 0.0;
    const std::size_t n_queries = static_cast<std::size_t>(shape().num_layers) * static_cast<std::size_t>(w_.heldout());
    for (std::size_t i = 0; i < n_queries; ++i) {
      double diff = 0.0, norm = 0.0;
      for (std::size_t e = i * per_query; e < (i + 1) * per_query; ++e) {
        const double a = out[e], b = full_out_[e];
        diff += (a - b) * (a - b);
        norm += b * b;
      }
      err += norm > 0.0 ? std::sqrt(diff / norm) : 0.0;
    }
    row.rel_error = err / static_cast<double>(n_queries);
    return kvc::ok_status();
  }

  std::size_t ratio_index(double ratio) const noexcept {
    for (std::size_t i = 0; i < opt_.ratios.size(); ++i)
      if (opt_.ratios[i] == ratio) return i;
    return 0;
  }

  const workload& w_;
  eval_options opt_;
  std::unique_ptr<cache_t> cache_;
  kvc::seq_id base_ = kvc::seq_id::invalid;
  std::vector<std::int32_t> positions_;                              // 0..tokens-1
  std::vector<kvc::score::future_queries> heldout_;                  // [layers]
  std::size_t sequence_bytes_ = 0;                                   // of the base sequence
  std::vector<float> full_out_;                                      // [layers][heldout][q_heads][d]
  std::vector<std::vector<double>> weights_;                         // [streams][context]
  std::vector<std::vector<detail::needle_row>> needle_rows_;         // [streams]
  std::vector<std::vector<std::vector<std::uint8_t>>> oracle_kept_;  // [ratios][streams][context]
};

}  // namespace quality
