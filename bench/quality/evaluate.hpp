// bench/quality/evaluate.hpp: the evaluation protocol and its metrics (README.md has the
// prose version).
//
// A base sequence receives the first `context` tokens of every layer, then attend() runs the
// queries of the last `window` of them: the cache records them (observe.query_window =
// window) and their attention (observe.track_attention), which is all a policy sees of the
// queries. For every row, a fork of the base is compressed and the held-out queries
// (positions context..tokens-1) attend it; a fork of the f32 base that is never compressed
// gives the reference outputs. Forks share the base's pages, so the base is filled once;
// compress() copies the pages it changes.
//
// Policy rows (policies.hpp): every policy at every ratio, on one f32 paged_kv_cache (f32
// pages store the keys exactly, so only eviction differs between the caches).
// Codec rows (mixes.hpp): one cache and base per page codec; at every byte budget, eviction
// on f16 pages, a codec alone, and codecs that also evict, all held to the same bytes.
//
// Metrics, per row (S streams = layers x KV heads, R = held-out queries x the query group =
// rows per stream):
//   rel_error    ||o - o_full|| / ||o_full|| over the query heads of one layer, for every
//                held-out query and layer, averaged (o: attend() on the compressed fork,
//                o_full: on the uncompressed f32 fork);
//   mass_kept    the attention probability the full cache gives the retained tokens,
//                sum over kept i of p_full(row, i), averaged over every row of every stream;
//   recall       |kept & kept_oracle| / |kept_oracle| per stream, averaged; kept_oracle is
//                what oracle / uniform keeps at the same ratio (policy rows only);
//   needle_kept  planted needles still in the cache (synthetic retrieval heads);
//   needle_hit   rows of a held-out query that looks for a needle whose attention argmax on
//                the compressed cache (its keys as stored, plus log-weights) is that needle;
//   bytes        codec rows: the pages of the compressed fork (stats()), over the f16 base's;
//   error_bound  codec rows that only quantize: a bound on rel_error from the codecs' error
//                contracts (quantization_bound()).
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

#include "mixes.hpp"
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
  std::string codec = "f32";  // of the cache's sealed pages, keys and values
  double ratio = 0.0;         // codec rows: the fraction of tokens evicted, 1 - kept
  double kept = 0.0;          // retained tokens / cached tokens, over the whole sequence
  double rel_error = 0.0, mass_kept = 0.0, recall = 0.0;
  double needle_kept = std::numeric_limits<double>::quiet_NaN(), needle_hit = std::numeric_limits<double>::quiet_NaN();
  double compress_ms = 0.0;
  // Codec rows only, as fractions of the f16 base's bytes: the budget, the compressed fork's
  // pages, and the largest page of the row's cache (byte_cap stops within one of the
  // budget); the bound on rel_error of a codec alone.
  double byte_budget = std::numeric_limits<double>::quiet_NaN(), bytes = std::numeric_limits<double>::quiet_NaN();
  double page_bytes = std::numeric_limits<double>::quiet_NaN();
  double error_bound = std::numeric_limits<double>::quiet_NaN();
  std::string error;                        // the failed status of compress, if any
  std::vector<std::int32_t> stream_tokens;  // retained per stream, [layer * num_kv_heads + kv_head]
  bool codec_row() const { return !std::isnan(byte_budget); }
  bool evicts() const { return scorer != no_eviction; }
  std::string policy() const {
    if (!codec_row()) return scorer + "/" + budget;
    return evicts() ? codec + " + " + scorer : codec + " alone";
  }
  static constexpr const char* no_eviction = "none";  // scorer and budget of a codec alone
};

struct eval_options {
  std::vector<double> ratios;
  int threads = 1;
  int page_tokens = 32;
  bool prefill_attend = false;  // observe every cached query, not only the window
  bool codec_rows = false;      // also the rows of mixes.hpp
  // Fractions of the f16 base's bytes; empty: every codec's own size and half the smallest.
  std::vector<double> byte_budgets;
  std::vector<std::string> mix_scorers = default_mix_scorers();
};

// What the full cache does, for the report and the checks.
struct reference_info {
  double needle_hit = std::numeric_limits<double>::quiet_NaN();  // argmax on the full cache finds the needle
  double sink_mass = 0.0;                                        // held-out attention on positions 0-3
  double top_mass = 0.0;                                         // held-out attention on each row's top 5% of tokens
  double seconds = 0.0;                                          // the whole evaluation
};

namespace detail {

// The sum of term(e) for e < d, in four interleaved partial sums (which vectorize).
template <class Term>
inline float sum4(int d, Term term) noexcept {
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
  int e = 0;
  for (; e + 4 <= d; e += 4) {
    s0 += term(e);
    s1 += term(e + 1);
    s2 += term(e + 2);
    s3 += term(e + 3);
  }
  for (; e < d; ++e) s0 += term(e);
  return (s0 + s1) + (s2 + s3);
}

inline float dot(const float* a, const float* b, int d) noexcept {
  return sum4(d, [a, b](int e) { return a[e] * b[e]; });
}

// ||a - b||^2.
inline float dist2(const float* a, const float* b, int d) noexcept {
  return sum4(d, [a, b](int e) {
    const float x = a[e] - b[e];
    return x * x;
  });
}

// Held-out query rows of one stream that look for a needle, with its position.
struct needle_row {
  int query = 0, head = 0;  // held-out query index, query head (global)
  int position = 0;         // of the needle
};

inline int stream_of(const kvc::model_shape& s, int layer, int kv_head) noexcept {
  return layer * s.num_kv_heads + kv_head;
}

}  // namespace detail

// One cache of a codec, holding the workload's base sequence.
template <class Cache>
struct bench {
  explicit bench(const char* codec_name = kvc::codec::f32::name) : codec(codec_name) {}
  const char* codec;  // the codec the cache was given (a pair's own name)
  std::unique_ptr<Cache> cache;
  kvc::seq_id base = kvc::seq_id::invalid;
  std::size_t bytes = 0;  // of the base sequence (stats())
  // Per stream, the logits of its needle rows on the base's keys as stored, [row][position].
  std::vector<std::vector<float>> needle_logits;
};

// Compresses a fork; empty: leave it as it is.
template <class Cache>
using compress_fn = std::function<kvc::status(Cache&, kvc::seq_id, kvc::workspace&)>;

using kept_sets_t = std::vector<std::vector<std::uint8_t>>;  // [streams][context]: retained

class evaluation {
 public:
  evaluation(const workload& w, eval_options opt) : w_(w), opt_(std::move(opt)) {}

  // Runs every policy at every ratio, then the codec rows if asked; rows come in (policy,
  // ratio) order, then in (byte budget, codec, scorer) order.
  kvc::status run(const std::vector<policy>& policies, std::vector<result_row>& rows, reference_info& info) {
    const auto start = std::chrono::steady_clock::now();
    KVC_RETURN_IF_ERROR(check_workload());
    positions_.resize(static_cast<std::size_t>(w_.tokens));
    for (int i = 0; i < w_.tokens; ++i) positions_[static_cast<std::size_t>(i)] = i;
    heldout_.resize(static_cast<std::size_t>(shape().num_layers));
    for (int l = 0; l < shape().num_layers; ++l)
      heldout_[static_cast<std::size_t>(l)] = {w_.q_at(l, w_.context), positions_.data() + w_.context, w_.heldout()};
    const int g = shape().group_size();
    needle_rows_.assign(static_cast<std::size_t>(streams()), {});
    for (const needle& nd : w_.needles)
      for (int q : nd.queries)
        for (int j = 0; j < g; ++j)
          needle_rows_[static_cast<std::size_t>(detail::stream_of(shape(), nd.layer, nd.kv_head))].push_back(
              {q, nd.kv_head * g + j, nd.position});
    KVC_RETURN_IF_ERROR(make_bench(f32_));
    KVC_RETURN_IF_ERROR(reference(info));
    if (!policies.empty()) {
      KVC_RETURN_IF_ERROR(oracle_sets());
      run_policies(policies, rows);
    }
    if (opt_.codec_rows) KVC_RETURN_IF_ERROR(run_codecs(rows));
    info.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return kvc::ok_status();
  }

 private:
  using job = std::function<result_row(kvc::workspace&)>;

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

  // Runs the jobs on opt_.threads threads, each with its own workspace; appends their rows
  // in job order.
  void run_jobs(const std::vector<job>& jobs, std::size_t workspace_bytes, std::vector<result_row>& rows) const {
    std::vector<result_row> out(jobs.size());
    std::atomic<std::size_t> next{0};
    const auto worker = [&]() {
      kvc::workspace ws(workspace_bytes);
      for (std::size_t j; (j = next.fetch_add(1)) < jobs.size();) out[j] = jobs[j](ws);
    };
    const int n_threads = std::max(1, std::min<int>(opt_.threads, static_cast<int>(jobs.size())));
    std::vector<std::thread> pool;
    for (int t = 1; t < n_threads; ++t) pool.emplace_back(worker);
    worker();
    for (std::thread& t : pool) t.join();
    for (result_row& r : out) rows.push_back(std::move(r));
  }

  void run_policies(const std::vector<policy>& policies, std::vector<result_row>& rows) const {
    std::vector<job> jobs;
    for (const policy& p : policies)
      for (std::size_t r = 0; r < opt_.ratios.size(); ++r)
        jobs.push_back([this, &p, r](kvc::workspace& ws) {
          result_row row;
          row.scorer = p.scorer;
          row.budget = p.budget;
          row.ratio = opt_.ratios[r];
          policy_setup setup;
          setup.ratio = row.ratio;
          setup.heldout = span_of_heldout();
          setup.sequence_bytes = f32_.bytes;
          const compress_fn<cache_t> compress = [&p, setup](cache_t& c, kvc::seq_id id, kvc::workspace& w) {
            return p.compress(c, id, setup, w);
          };
          return evaluate(f32_, compress, &oracle_kept_[r], ws, std::move(row));
        });
    run_jobs(jobs, f32_.cache->config().workspace_bytes, rows);
  }

  // A cache of Cache's codecs holding the base sequence.
  template <class Cache>
  kvc::status make_bench(bench<Cache>& b) const {
    kvc::cache_config c;
    c.shape = shape();
    c.page_tokens = opt_.page_tokens;
    c.max_context = w_.context;
    c.rope = w_.rope;
    c.observe.query_window = w_.window;
    c.observe.track_attention = true;
    // Scratch for the heavier scorers (covariances, sketches): twice the default.
    c.workspace_bytes = 2 * kvc::default_workspace_bytes(c);
    // The base, the reference fork, and per thread one fork whose pages may all be copied:
    // per stream its sealed pages in slabs of slots, and a slab for an open page.
    const auto open = kvc::make_page_layout<kvc::codec::f32, kvc::codec::f32>(c.page_tokens, c.shape.head_dim);
    const auto sealed =
        kvc::make_page_layout<typename Cache::key_codec, typename Cache::value_codec>(c.page_tokens, c.shape.head_dim);
    const std::size_t slots = static_cast<std::size_t>(kvc::page_pool::slots_for(open.bytes, sealed.bytes));
    const std::size_t pages = static_cast<std::size_t>((w_.context + c.page_tokens - 1) / c.page_tokens) + 2;
    const std::size_t slabs = static_cast<std::size_t>(streams()) * ((pages + slots - 1) / slots + 1) *
                              static_cast<std::size_t>(std::max(1, opt_.threads) + 2);
    c.capacity_bytes = kvc::page_pool::slab_bytes_for(open.bytes, sealed.bytes) * slabs;
    kvc::result<Cache> r = Cache::create(c);
    if (!r.ok()) return r.status();
    b.cache = std::make_unique<Cache>(std::move(r).value());

    b.base = b.cache->create_sequence();
    const int first = opt_.prefill_attend ? 0 : w_.context - w_.window;
    const std::size_t qrow = static_cast<std::size_t>(shape().num_q_heads * shape().head_dim);
    std::vector<float> out(static_cast<std::size_t>(w_.context - first) * qrow);
    for (int l = 0; l < shape().num_layers; ++l) {
      KVC_RETURN_IF_ERROR(
          b.cache->append(b.base, l, w_.k_at(l, 0, 0), w_.v_at(l, 0, 0), positions_.data(), w_.context));
      KVC_RETURN_IF_ERROR(
          b.cache->attend(b.base, l, w_.q_at(l, first), positions_.data() + first, w_.context - first, out.data()));
    }
    kvc::result<kvc::sequence_stats> st = b.cache->stats(b.base);
    if (!st.ok()) return st.status();
    b.bytes = st->bytes;
    // The base holds every position in order, so its token i is position i.
    b.needle_logits.assign(static_cast<std::size_t>(streams()), {});
    std::vector<std::int32_t> pos;
    std::vector<float> lw;
    for (int l = 0; l < shape().num_layers; ++l)
      for (int h = 0; h < shape().num_kv_heads; ++h)
        KVC_RETURN_IF_ERROR(stored_logits(*b.cache, b.base, l, h,
                                          b.needle_logits[static_cast<std::size_t>(detail::stream_of(shape(), l, h))],
                                          pos, lw));
    return kvc::ok_status();
  }

  // For the needle rows of stream (l, h), if any: q.k / sqrt(d) on the keys sequence id
  // stores (decoded), [row][retained token], with the retained positions and log-weights.
  template <class Cache>
  kvc::status stored_logits(const Cache& cache, kvc::seq_id id, int l, int h, std::vector<float>& logits,
                            std::vector<std::int32_t>& pos, std::vector<float>& lw) const {
    const auto& nr = needle_rows_[static_cast<std::size_t>(detail::stream_of(shape(), l, h))];
    if (nr.empty()) return kvc::ok_status();
    kvc::result<typename Cache::stream_view> v = cache.view(id, l, h);
    if (!v.ok()) return v.status();
    const int d = shape().head_dim;
    const double scale = 1.0 / std::sqrt(static_cast<double>(d));
    const std::size_t n = static_cast<std::size_t>(v->size());
    std::vector<float> keys(n * static_cast<std::size_t>(d));
    pos.resize(n);
    lw.resize(n);
    v->copy(keys.data(), nullptr, pos.data(), lw.data());
    logits.resize(nr.size() * n);
    for (std::size_t k = 0; k < nr.size(); ++k) {
      const float* q = w_.q_at(l, w_.context + nr[k].query) + static_cast<std::size_t>(nr[k].head) * d;
      for (std::size_t i = 0; i < n; ++i)
        logits[k * n + i] = static_cast<float>(detail::dot(q, keys.data() + i * d, d) * scale);
    }
    return kvc::ok_status();
  }

  // Held-out outputs [layer][query][q_head][d] of a sequence.
  template <class Cache>
  kvc::status attend_heldout(Cache& cache, kvc::seq_id id, std::vector<float>& out) const {
    const std::size_t per_layer =
        static_cast<std::size_t>(w_.heldout()) * static_cast<std::size_t>(shape().num_q_heads * shape().head_dim);
    out.assign(per_layer * static_cast<std::size_t>(shape().num_layers), 0.0f);
    for (int l = 0; l < shape().num_layers; ++l)
      KVC_RETURN_IF_ERROR(cache.attend(id, l, w_.q_at(l, w_.context), positions_.data() + w_.context, w_.heldout(),
                                       out.data() + per_layer * static_cast<std::size_t>(l)));
    return kvc::ok_status();
  }

  // Calls f(layer, kv_head, held-out query, q, p, arg) for every held-out query of every
  // stream, layer by layer and stream by stream: q [g][d] holds the query heads of the KV
  // head's group, p[j * context + i] the full cache's attention from head j on cached token i
  // (softmax of q_j.k_i / sqrt(d) in double), arg[j] the token of head j's largest logit.
  template <class F>
  void for_each_query(F&& f) const {
    const int d = shape().head_dim, g = shape().group_size(), n = w_.context;
    const std::size_t un = static_cast<std::size_t>(n);
    const double scale = 1.0 / std::sqrt(static_cast<double>(d));
    std::vector<double> p(static_cast<std::size_t>(g) * un), mx(static_cast<std::size_t>(g));
    std::vector<int> arg(static_cast<std::size_t>(g));
    for (int l = 0; l < shape().num_layers; ++l)
      for (int h = 0; h < shape().num_kv_heads; ++h)
        for (int qi = 0; qi < w_.heldout(); ++qi) {
          const float* q = w_.q_at(l, w_.context + qi) + static_cast<std::size_t>(h * g) * d;
          std::fill(mx.begin(), mx.end(), -std::numeric_limits<double>::infinity());
          std::fill(arg.begin(), arg.end(), 0);
          for (int i = 0; i < n; ++i) {
            const float* k = w_.k_at(l, i, h);
            for (std::size_t j = 0; j < mx.size(); ++j) {
              const double x = detail::dot(q + j * static_cast<std::size_t>(d), k, d) * scale;
              p[j * un + static_cast<std::size_t>(i)] = x;
              if (x > mx[j]) mx[j] = x, arg[j] = i;
            }
          }
          for (std::size_t j = 0; j < mx.size(); ++j) {
            double* pj = p.data() + j * un;
            double sum = 0.0;
            for (std::size_t i = 0; i < un; ++i) sum += (pj[i] = std::exp(pj[i] - mx[j]));
            for (std::size_t i = 0; i < un; ++i) pj[i] /= sum;
          }
          f(l, h, qi, q, static_cast<const std::vector<double>&>(p), static_cast<const std::vector<int>&>(arg));
        }
  }

  // Full-cache outputs, and per stream the mean held-out attention of every cached token.
  kvc::status reference(reference_info& info) {
    kvc::result<kvc::seq_id> full = f32_.cache->fork(f32_.base);
    if (!full.ok()) return full.status();
    KVC_RETURN_IF_ERROR(attend_heldout(*f32_.cache, *full, full_out_));
    KVC_RETURN_IF_ERROR(f32_.cache->release(*full));

    const int g = shape().group_size(), n = w_.context;
    const int rows = w_.heldout() * g;
    weights_.assign(static_cast<std::size_t>(streams()), std::vector<double>(static_cast<std::size_t>(n), 0.0));
    std::vector<double> sorted;
    double sink = 0.0, top = 0.0;
    std::int64_t hits = 0, needle_total = 0;
    const int top_k = std::max(1, n / 20);
    for_each_query([&](int l, int h, int qi, const float*, const std::vector<double>& p, const std::vector<int>& arg) {
      const int s = detail::stream_of(shape(), l, h);
      std::vector<double>& wt = weights_[static_cast<std::size_t>(s)];
      for (int j = 0; j < g; ++j) {
        const double* pj = p.data() + static_cast<std::size_t>(j) * static_cast<std::size_t>(n);
        for (int i = 0; i < n; ++i) wt[static_cast<std::size_t>(i)] += pj[i] / rows;
        for (int i = 0; i < std::min(n, 4); ++i) sink += pj[i];
        sorted.assign(pj, pj + n);
        std::nth_element(sorted.begin(), sorted.begin() + (top_k - 1), sorted.end(), std::greater<double>());
        for (int i = 0; i < top_k; ++i) top += sorted[static_cast<std::size_t>(i)];
        for (const detail::needle_row& r : needle_rows_[static_cast<std::size_t>(s)])
          if (r.query == qi && r.head == h * g + j) {
            ++needle_total;
            hits += arg[static_cast<std::size_t>(j)] == r.position ? 1 : 0;
          }
      }
    });
    const double all_rows = static_cast<double>(rows) * streams();
    info.sink_mass = sink / all_rows;
    info.top_mass = top / all_rows;
    if (needle_total > 0) info.needle_hit = static_cast<double>(hits) / static_cast<double>(needle_total);
    return kvc::ok_status();
  }

  // What oracle / uniform keeps at each ratio: the sets recall is counted against.
  kvc::status oracle_sets() {
    kvc::workspace ws(f32_.cache->config().workspace_bytes);
    oracle_kept_.assign(opt_.ratios.size(), {});
    for (std::size_t r = 0; r < opt_.ratios.size(); ++r) {
      kvc::result<kvc::seq_id> id = f32_.cache->fork(f32_.base);
      if (!id.ok()) return id.status();
      kvc::score::oracle o;
      o.layers = span_of_heldout();
      KVC_RETURN_IF_ERROR(f32_.cache
                              ->compress(*id, kvc::all_layers,
                                         kvc::evict(o, kvc::budget::uniform::compression_ratio(opt_.ratios[r])), ws)
                              .status());
      KVC_RETURN_IF_ERROR(kept_sets(*f32_.cache, *id, oracle_kept_[r]));
      KVC_RETURN_IF_ERROR(f32_.cache->release(*id));
    }
    return kvc::ok_status();
  }

  kvc::span<const kvc::score::future_queries> span_of_heldout() const noexcept {
    return {heldout_.data(), heldout_.size()};
  }

  // Per stream, a flag per cached token: retained by sequence id.
  template <class Cache>
  kvc::status kept_sets(const Cache& cache, kvc::seq_id id, kept_sets_t& kept) const {
    kept.assign(static_cast<std::size_t>(streams()),
                std::vector<std::uint8_t>(static_cast<std::size_t>(w_.context), 0));
    for (int l = 0; l < shape().num_layers; ++l)
      for (int h = 0; h < shape().num_kv_heads; ++h) {
        kvc::result<typename Cache::stream_view> v = cache.view(id, l, h);
        if (!v.ok()) return v.status();
        for (std::int32_t p : v->positions())
          kept[static_cast<std::size_t>(detail::stream_of(shape(), l, h))][static_cast<std::size_t>(p)] = 1;
      }
    return kvc::ok_status();
  }

  // The row's metrics on a compressed fork of b's base; a failure goes to row.error.
  template <class Cache>
  result_row evaluate(const bench<Cache>& b, const compress_fn<Cache>& compress, const kept_sets_t* oracle,
                      kvc::workspace& ws, result_row row) const {
    row.suite = w_.name;
    const kvc::status st = measure(b, compress, oracle, ws, row);
    if (!st.ok()) row.error = st.message();
    return row;
  }

  template <class Cache>
  kvc::status measure(const bench<Cache>& b, const compress_fn<Cache>& compress, const kept_sets_t* oracle,
                      kvc::workspace& ws, result_row& row) const {
    Cache& cache = *b.cache;
    kvc::result<kvc::seq_id> fork = cache.fork(b.base);
    if (!fork.ok()) return fork.status();
    const kvc::seq_id id = *fork;
    struct releaser {
      Cache& c;
      kvc::seq_id id;
      ~releaser() { static_cast<void>(c.release(id)); }
    } release{cache, id};

    const auto t0 = std::chrono::steady_clock::now();
    if (compress) KVC_RETURN_IF_ERROR(compress(cache, id, ws));
    row.compress_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();

    kvc::result<kvc::sequence_stats> st = cache.stats(id);
    if (!st.ok()) return st.status();
    row.stream_tokens = st->stream_tokens;
    row.kept = static_cast<double>(st->tokens_retained) / (static_cast<double>(streams()) * w_.context);
    if (row.codec_row()) row.bytes = static_cast<double>(st->bytes) / static_cast<double>(unit_bytes_);

    // Attention mass, recall and needles, stream by stream.
    kept_sets_t kept;
    KVC_RETURN_IF_ERROR(kept_sets(cache, id, kept));
    double mass = 0.0, recall = 0.0;
    std::int64_t needles = 0, needles_kept = 0, needle_rows = 0, needle_hits = 0;
    for (int s = 0; s < streams(); ++s) {
      const std::vector<std::uint8_t>& k = kept[static_cast<std::size_t>(s)];
      std::int64_t both = 0, in_oracle = 0;
      for (int i = 0; i < w_.context; ++i) {
        const std::size_t u = static_cast<std::size_t>(i);
        if (k[u] != 0) mass += weights_[static_cast<std::size_t>(s)][u];
        if (oracle == nullptr) continue;
        const std::uint8_t o = (*oracle)[static_cast<std::size_t>(s)][u];
        in_oracle += o;
        both += o & k[u];
      }
      recall += in_oracle == 0 ? 1.0 : static_cast<double>(both) / static_cast<double>(in_oracle);
    }
    for (const needle& nd : w_.needles) {
      ++needles;
      needles_kept += kept[static_cast<std::size_t>(detail::stream_of(shape(), nd.layer, nd.kv_head))]
                          [static_cast<std::size_t>(nd.position)];
    }
    // A needle row's logits on the compressed cache: q.k / sqrt(d) on its keys as stored,
    // plus their log-weights. Codecs whose rows move as bytes keep the base's keys (logits
    // computed once, in make_bench); re-encoded keys are read back from the fork.
    std::vector<float> logits, lw;
    std::vector<std::int32_t> pos;
    for (int l = 0; l < shape().num_layers; ++l)
      for (int h = 0; h < shape().num_kv_heads; ++h) {
        const int s = detail::stream_of(shape(), l, h);
        const auto& nr = needle_rows_[static_cast<std::size_t>(s)];
        if (nr.empty()) continue;
        if (Cache::reencode_keys) {
          KVC_RETURN_IF_ERROR(stored_logits(cache, id, l, h, logits, pos, lw));
        } else {
          kvc::result<typename Cache::stream_view> v = cache.view(id, l, h);
          if (!v.ok()) return v.status();
          pos.resize(static_cast<std::size_t>(v->size()));
          lw.resize(pos.size());
          v->copy(nullptr, nullptr, pos.data(), lw.data());
        }
        const std::size_t n = pos.size();
        for (std::size_t k = 0; k < nr.size(); ++k) {
          double best = -std::numeric_limits<double>::infinity();
          std::int32_t arg = -1;
          for (std::size_t i = 0; i < n; ++i) {
            const float logit =
                Cache::reencode_keys
                    ? logits[k * n + i]
                    : b.needle_logits[static_cast<std::size_t>(s)]
                                     [k * static_cast<std::size_t>(w_.context) + static_cast<std::size_t>(pos[i])];
            const double x = logit + lw[i];
            if (x > best) best = x, arg = pos[i];
          }
          ++needle_rows;
          needle_hits += arg == nr[k].position ? 1 : 0;
        }
      }
    row.mass_kept = mass / streams();
    row.recall = oracle == nullptr ? std::numeric_limits<double>::quiet_NaN() : recall / streams();
    if (needles > 0) row.needle_kept = static_cast<double>(needles_kept) / static_cast<double>(needles);
    if (needle_rows > 0) row.needle_hit = static_cast<double>(needle_hits) / static_cast<double>(needle_rows);

    // Output error of the held-out queries.
    std::vector<float> out;
    KVC_RETURN_IF_ERROR(attend_heldout(cache, id, out));
    const std::size_t per_query = static_cast<std::size_t>(shape().num_q_heads * shape().head_dim);
    double err = 0.0;
    const std::size_t n_queries = static_cast<std::size_t>(shape().num_layers) * static_cast<std::size_t>(w_.heldout());
    for (std::size_t i = 0; i < n_queries; ++i) {
      double diff = 0.0, norm = 0.0;
      for (std::size_t e = i * per_query; e < (i + 1) * per_query; ++e) {
        const double a = out[e], b0 = full_out_[e];
        diff += (a - b0) * (a - b0);
        norm += b0 * b0;
      }
      err += norm > 0.0 ? std::sqrt(diff / norm) : 0.0;
    }
    row.rel_error = err / static_cast<double>(n_queries);
    return kvc::ok_status();
  }

  // ------------------------------------------------------------------ codec rows

  // A cache per codec of codec_table(), then the rows of plan_mixes(), codec by codec.
  kvc::status run_codecs(std::vector<result_row>& rows) {
    auto benches = std::apply(
        [](auto... c) {
          return std::make_tuple(bench<kvc::paged_kv_cache<typename decltype(c)::type>>(decltype(c)::type::name)...);
        },
        codec_table());
    kvc::status st = kvc::ok_status();
    std::vector<std::size_t> full;
    std::apply(
        [&](auto&... b) { static_cast<void>((((st = make_bench(b)).ok() && (full.push_back(b.bytes), true)) && ...)); },
        benches);
    KVC_RETURN_IF_ERROR(st);
    for (std::size_t c = 1; c < full.size(); ++c)
      if (full[c] >= full[c - 1])
        return kvc::status::error(kvc::status_code::invalid_argument,
                                  "codec_table: codec %zu takes %zu bytes, codec %zu %zu: list the largest first", c,
                                  full[c], c - 1, full[c - 1]);
    unit_bytes_ = full[0];
    std::vector<std::size_t> budgets;
    for (double f : opt_.byte_budgets)
      budgets.push_back(static_cast<std::size_t>(std::floor(f * static_cast<double>(unit_bytes_))));
    if (budgets.empty()) {
      budgets = full;
      budgets.push_back(full.back() / 2);
    }
    const std::vector<mix> plan = plan_mixes(budgets, full, opt_.mix_scorers);

    // Rows in plan order, filled codec by codec (each codec's jobs on its own cache).
    std::vector<result_row> out(plan.size());
    int codec = 0;
    std::apply(
        [&](auto&... b) {
          const auto run_codec = [&](auto& bc) {
            std::vector<job> jobs;
            std::vector<std::size_t> slots;
            for (std::size_t i = 0; i < plan.size(); ++i)
              if (plan[i].codec == codec) {
                jobs.push_back(codec_job(bc, plan[i]));
                slots.push_back(i);
              }
            std::vector<result_row> done;
            run_jobs(jobs, bc.cache->config().workspace_bytes, done);
            for (std::size_t k = 0; k < done.size(); ++k) out[slots[k]] = std::move(done[k]);
            ++codec;
          };
          (run_codec(b), ...);
        },
        benches);
    for (result_row& r : out) rows.push_back(std::move(r));
    return kvc::ok_status();
  }

  template <class Cache>
  job codec_job(const bench<Cache>& b, const mix& m) const {
    return [this, &b, m](kvc::workspace& ws) {
      result_row row;
      row.codec = b.codec;
      row.scorer = m.scorer.empty() ? result_row::no_eviction : m.scorer;
      row.budget = m.scorer.empty() ? result_row::no_eviction : "byte_cap";
      row.byte_budget = static_cast<double>(m.budget) / static_cast<double>(unit_bytes_);
      row.page_bytes = static_cast<double>(b.cache->open_page_bytes()) / static_cast<double>(unit_bytes_);
      compress_fn<Cache> compress;
      if (!m.scorer.empty()) compress = evict_to<Cache>(m.scorer, m.budget);
      row = evaluate(b, compress, nullptr, ws, std::move(row));
      row.ratio = 1.0 - row.kept;
      if (m.scorer.empty() && row.error.empty()) row.error_bound = quantization_bound<Cache>();
      return row;
    };
  }

  // evict(scorer, byte_cap(bytes)) over the whole sequence, the scorer named in scorer_table().
  template <class Cache>
  compress_fn<Cache> evict_to(const std::string& scorer, std::size_t bytes) const {
    policy_setup setup;
    setup.heldout = span_of_heldout();
    compress_fn<Cache> out;
    std::apply(
        [&](const auto&... s) {
          const auto pick = [&](const auto& sc) {
            if (scorer != sc.name) return;
            out = [sc, setup, bytes](Cache& c, kvc::seq_id id, kvc::workspace& ws) {
              return c.compress(id, kvc::all_layers, kvc::evict(sc.make(setup), kvc::budget::byte_cap(bytes)), ws)
                  .status();
            };
          };
          (pick(s), ...);
        },
        scorer_table());
    return out;
  }

  // A bound on rel_error of Cache's base sequence (every token kept, only quantized). Per
  // held-out row, with key errors |dk| <= ek and value errors |dv| <= ev per element
  // (element_error_bounds), each logit moves by at most delta_t = sum_c |q_c| ek_tc / sqrt(d).
  // Then p~_t / p_t = e^(dl_t) / Z with Z = sum_s p_s e^(dl_s) in [A, B], A = sum p e^-delta,
  // B = sum p e^delta, and, as sum (p~ - p) = 0, for any vector c (here o_full):
  //   ||o~ - o|| <= sum_t p~_t ||dv_t|| + sum_t |p~_t - p_t| ||v_t - c||
  //              <= sum_t p_t (e^delta_t / A) ||ev_t|| + sum_t p_t u_t ||v_t - c||,
  //   u_t = max(e^delta_t / A - 1, 1 - e^-delta_t / B).
  // Per layer and held-out query: the root sum of squares over the query heads, over
  // ||o_full||; averaged as rel_error is, then widened by 0.1% + 1e-5 for float arithmetic.
  template <class Cache>
  double quantization_bound() const {
    const int d = shape().head_dim, n = w_.context, P = opt_.page_tokens, g = shape().group_size();
    const int sealed = n / P * P;  // the base's full pages are sealed; the rest is float
    const std::size_t ud = static_cast<std::size_t>(d), un = static_cast<std::size_t>(n),
                      ug = static_cast<std::size_t>(g);
    const std::size_t stride = static_cast<std::size_t>(shape().num_kv_heads) * ud;
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    std::vector<float> ek(un * ud), ev(un * ud), dv(un), aq(ug * ud);
    std::vector<double> delta(un * ug), a(ug), b(ug), bound(ug);
    const std::size_t layer_queries = static_cast<std::size_t>(shape().num_layers) * w_.heldout();
    std::vector<double> num(layer_queries, 0.0), den(layer_queries, 0.0);
    int stream = -1;
    for_each_query([&](int l, int h, int qi, const float* q, const std::vector<double>& p, const std::vector<int>&) {
      if (detail::stream_of(shape(), l, h) != stream) {
        stream = detail::stream_of(shape(), l, h);
        element_error_bounds<typename Cache::key_codec>(w_.k_at(l, 0, h), stride, n, sealed, d, P, ek.data());
        element_error_bounds<typename Cache::value_codec>(w_.v_at(l, 0, h), stride, n, sealed, d, P, ev.data());
        for (std::size_t t = 0; t < un; ++t) dv[t] = std::sqrt(detail::dot(&ev[t * ud], &ev[t * ud], d));
      }
      const std::size_t k = static_cast<std::size_t>(l) * w_.heldout() + static_cast<std::size_t>(qi);
      const float* o = full_out_.data() + (k * shape().num_q_heads + static_cast<std::size_t>(h * g)) * ud;  // [g][d]
      for (std::size_t c = 0; c < ug * ud; ++c) aq[c] = std::fabs(q[c]) * scale;
      std::fill(a.begin(), a.end(), 0.0);
      std::fill(b.begin(), b.end(), 0.0);
      std::fill(bound.begin(), bound.end(), 0.0);
      for (std::size_t t = 0; t < un; ++t)
        for (std::size_t j = 0; j < ug; ++j) {
          const double dl = detail::dot(&aq[j * ud], &ek[t * ud], d), pt = p[j * un + t];
          delta[t * ug + j] = dl;
          a[j] += pt * std::exp(-dl);
          b[j] += pt * std::exp(dl);
        }
      for (std::size_t t = 0; t < un; ++t) {
        const float* v = w_.v_at(l, static_cast<int>(t), h);
        for (std::size_t j = 0; j < ug; ++j) {
          const double dl = delta[t * ug + j], up = std::exp(dl) / a[j];
          const double u = std::max(up - 1.0, 1.0 - std::exp(-dl) / b[j]);
          bound[j] += p[j * un + t] * (up * dv[t] + u * std::sqrt(detail::dist2(v, o + j * ud, d)));
        }
      }
      for (std::size_t j = 0; j < ug; ++j) {
        num[k] += bound[j] * bound[j];
        den[k] += detail::dot(o + j * ud, o + j * ud, d);
      }
    });
    double sum = 0.0;
    for (std::size_t k = 0; k < layer_queries; ++k) sum += den[k] > 0.0 ? std::sqrt(num[k] / den[k]) : 0.0;
    return sum / static_cast<double>(layer_queries) * 1.001 + 1e-5;
  }

  const workload& w_;
  eval_options opt_;
  bench<cache_t> f32_;
  std::vector<std::int32_t> positions_;                       // 0..tokens-1
  std::vector<kvc::score::future_queries> heldout_;           // [layers]
  std::size_t unit_bytes_ = 0;                                // the f16 base's bytes: the unit of codec rows
  std::vector<float> full_out_;                               // [layers][heldout][q_heads][d]
  std::vector<std::vector<double>> weights_;                  // [streams][context]
  std::vector<std::vector<detail::needle_row>> needle_rows_;  // [streams]
  std::vector<kept_sets_t> oracle_kept_;                      // [ratios]
};

}  // namespace quality
