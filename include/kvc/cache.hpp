// kvc/cache.hpp: kvc::paged_kv_cache, the paged KV cache every policy plugs into.
//
// Memory. One page pool, allocated by create(). A page holds up to page_tokens tokens
// of ONE stream (sequence, layer, kv_head). The newest page of a stream is open: float
// keys and values, written by append(). When it fills it is sealed: encoded with the
// key and value codecs into a (smaller) sealed page. After create(), append(),
// attend() and compress() never call the system allocator; create_sequence() and
// fork() reserve page tables for cache_config::max_context tokens per stream.
//
// Page layout, each region aligned to 64 bytes (P = page_tokens, d = head_dim):
//   open:   keys  float [P][d] | values float [P][d] | positions int32 [P] | log-weights float [P]
//   sealed: KeyCodec payload   | ValueCodec payload  | positions int32 [P] | log-weights float [P]
// open_page_bytes() and sealed_page_bytes() give the totals; stats() counts them.
//
// Streams. A stream is a list of pages in position order: sealed pages, each holding
// 1..P tokens, then at most one open page. Positions are strictly increasing within
// each (sequence, layer); keys arrive after RoPE, so eviction never re-rotates.
//
// Errors. Every call that can fail on input returns kvc::status (or kvc::result) and
// leaves the cache byte-for-byte unchanged when it fails: arguments are validated and
// page needs dry-run against the pool before anything is written.
//
// Threads. Different sequences may be appended, attended and compressed from different
// threads at once; calls on one sequence need external synchronisation. The pool and
// the sequence table are locked internally; attend() takes no pool lock. compress()
// without a workspace argument uses the cache's own workspace under a lock; pass one
// workspace per thread to compress sequences in parallel. kvc starts no threads.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "kvc/codecs/codec.hpp"
#include "kvc/codecs/f32.hpp"
#include "kvc/config.hpp"
#include "kvc/detail/assert.hpp"
#include "kvc/detail/attention.hpp"
#include "kvc/policies/policy.hpp"
#include "kvc/pool.hpp"
#include "kvc/status.hpp"
#include "kvc/stream.hpp"
#include "kvc/tensor.hpp"
#include "kvc/version.hpp"
#include "kvc/workspace.hpp"

KVC_NAMESPACE_BEGIN

// A sequence handle. Never reused: a released id stays unknown.
enum class seq_id : std::uint64_t { invalid = 0 };

// Pass as `layer` to compress every layer of a sequence.
inline constexpr int all_layers = -1;

struct page_layout {
  std::size_t keys = 0, values = 0, positions = 0, log_weights = 0, bytes = 0;  // byte offsets, total
};

template <class KeyCodec, class ValueCodec>
constexpr page_layout make_page_layout(int page_tokens, int head_dim) noexcept {
  page_layout l;
  const std::size_t p = static_cast<std::size_t>(page_tokens);
  l.keys = 0;
  l.values = detail::align_up(KeyCodec::page_bytes(page_tokens, head_dim));
  l.positions = l.values + detail::align_up(ValueCodec::page_bytes(page_tokens, head_dim));
  l.log_weights = l.positions + detail::align_up(p * sizeof(std::int32_t));
  l.bytes = l.log_weights + detail::align_up(p * sizeof(float));
  return l;
}

struct compress_report {
  std::int64_t tokens_before = 0, tokens_after = 0;  // over the streams in scope
  std::size_t bytes_before = 0, bytes_after = 0;     // pages those streams hold, shared pages in full
  std::int64_t pages_freed = 0;                      // pages returned to the pool
  // Retained tokens per stream of the sequence, [layer * num_kv_heads + kv_head], before
  // and after. Valid until the next compress() or release() of the same sequence.
  span<const std::int32_t> stream_tokens_before, stream_tokens_after;
};

struct cache_stats {
  std::size_t capacity_bytes = 0;  // the pool
  std::size_t bytes_in_use = 0;    // open pages * open_page_bytes + sealed pages * sealed_page_bytes
  std::size_t bytes_reserved = 0;  // slabs not free (bytes_in_use plus unused sealed slots in them)
  std::int64_t open_pages = 0, sealed_pages = 0, free_slabs = 0, total_slabs = 0;
  std::int64_t sequences = 0;
  std::int64_t tokens_retained = 0;  // over all streams of live sequences
  std::int64_t tokens_appended = 0;  // tokens those streams ever received (forks inherit)
  // What the same tokens_appended would take in a dense fp16 cache: 2 (K, V) * 2 bytes * head_dim each.
  std::size_t dense_f16_bytes = 0;
  // bytes_in_use / dense_f16_bytes: below 1 is smaller than dense fp16.
  double fraction_of_dense_f16() const noexcept {
    return dense_f16_bytes == 0 ? 0.0 : static_cast<double>(bytes_in_use) / static_cast<double>(dense_f16_bytes);
  }
};

struct sequence_stats {
  std::vector<std::int32_t> stream_tokens;    // [layer * num_kv_heads + kv_head] retained
  std::vector<std::int64_t> stream_appended;  // same index, tokens ever appended
  std::int64_t tokens_retained = 0, tokens_appended = 0;
  std::int64_t open_pages = 0, sealed_pages = 0;  // pages referenced, shared ones included
  std::size_t bytes = 0;                          // bytes of those pages
  std::size_t dense_f16_bytes = 0;
  double fraction_of_dense_f16() const noexcept {
    return dense_f16_bytes == 0 ? 0.0 : static_cast<double>(bytes) / static_cast<double>(dense_f16_bytes);
  }
};

namespace detail {

struct stream_state {
  std::int32_t n_pages = 0;   // sealed pages, then at most one open page
  std::int32_t n_tokens = 0;  // retained
  std::int64_t appended = 0;  // ever appended
};

struct sequence {
  std::uint32_t generation = 0;
  bool live = false;
  std::int32_t page_capacity = 0;                         // page-table entries per stream
  std::vector<page_id> pages;                             // [streams][page_capacity]
  std::vector<stream_state> streams;                      // [layers * kv_heads]
  std::vector<std::int32_t> last_position;                // [layers]
  std::vector<std::int32_t> report_before, report_after;  // [streams]

  // Observation (cache_config::observe), empty when off.
  std::vector<float> queries;              // [layers][query_window][num_q_heads][head_dim], a ring per layer
  std::vector<std::int32_t> query_pos;     // [layers][query_window]
  std::vector<std::int64_t> queries_seen;  // [layers] queries recorded so far
  std::vector<float> attention;            // [streams][3][max_context]: sum, count, last
  std::vector<float> key_norms;            // [streams][max_context]: ||k|| as appended

  page_id* table(int s) noexcept { return pages.data() + static_cast<std::size_t>(s) * page_capacity; }
  const page_id* table(int s) const noexcept { return pages.data() + static_cast<std::size_t>(s) * page_capacity; }
};

struct cache_locks {
  std::mutex sequences, pool, workspace;
};

// Compaction's scratch for the page being filled, when a codec re-encodes pages: its kept
// rows decoded (keys, then values, each [page_tokens][head_dim]), the pages they came from
// (the first max_reencode_sources distinct ones) and, for each row, which one and where.
struct page_rebuild {
  float* rows = nullptr;
  row_origin* origin = nullptr;  // [page_tokens]
  page_id sources[max_reencode_sources] = {};
  int n_sources = 0;
};

// Per-stream compaction plan, computed under the pool lock.
struct stream_plan {
  std::int32_t unchanged = 0;   // leading sealed pages that stay as they are
  std::int32_t sealed_old = 0;  // sealed pages before
  std::int32_t sealed_new = 0;  // sealed pages after
  std::int32_t kept_sealed = 0;
  page_id open = no_page;
  std::int32_t open_count = 0, kept_open = 0;
};

}  // namespace detail

template <class KeySpec, class ValueSpec = KeySpec>
class paged_kv_cache {
  // A codec pair (codec::kivi) gives its key codec to keys and its value codec to values.
  using KeyCodec = detail::key_role_t<KeySpec>;
  using ValueCodec = detail::value_role_t<ValueSpec>;
  static_assert(is_codec_v<KeyCodec>,
                "kvc::paged_kv_cache: KeyCodec does not satisfy the codec interface in kvc/codecs/codec.hpp "
                "(use kvc::codec::f32, f16 or bf16, or provide every member listed there)");
  static_assert(is_codec_v<ValueCodec>,
                "kvc::paged_kv_cache: ValueCodec does not satisfy the codec interface in kvc/codecs/codec.hpp");

 public:
  using key_codec = KeyCodec;
  using value_codec = ValueCodec;
  static constexpr bool seal_in_place = KeyCodec::identity && ValueCodec::identity;
  // Sealed pages whose attention runs on the codes (codecs with fused members).
  static constexpr bool fused_pages = detail::fused_v<KeyCodec> && detail::fused_v<ValueCodec>;
  // Sealed rows that cannot move alone: compaction re-encodes the pages it changes.
  static constexpr bool reencode_keys = !detail::token_granular_v<KeyCodec>;
  static constexpr bool reencode_values = !detail::token_granular_v<ValueCodec>;

  class compress_context;
  class stream_view;

  // Validates the config and allocates the pool and the workspace.
  static result<paged_kv_cache> create(const cache_config& config) {
    KVC_RETURN_IF_ERROR(validate(config));
    const page_layout open = make_page_layout<codec::f32, codec::f32>(config.page_tokens, config.shape.head_dim);
    const page_layout sealed = make_page_layout<KeyCodec, ValueCodec>(config.page_tokens, config.shape.head_dim);
    if (sealed.bytes > open.bytes)
      return status::error(status_code::unsupported,
                           "cache_config: sealed pages (%zu bytes) larger than open pages (%zu)", sealed.bytes,
                           open.bytes);
    const std::size_t slab = page_pool::slab_bytes_for(open.bytes, sealed.bytes);
    if (config.capacity_bytes < slab)
      return status::error(status_code::invalid_argument,
                           "cache_config: capacity_bytes %zu is smaller than one page (%zu bytes for page_tokens %d, "
                           "head_dim %d)",
                           config.capacity_bytes, slab, config.page_tokens, config.shape.head_dim);
    const std::size_t slots =
        config.capacity_bytes / slab * static_cast<std::size_t>(page_pool::slots_for(open.bytes, sealed.bytes));
    if (slots > static_cast<std::size_t>(std::numeric_limits<page_id>::max()))
      return status::error(status_code::invalid_argument,
                           "cache_config: capacity_bytes %zu makes %zu pages, more than page ids can name",
                           config.capacity_bytes, slots);
    paged_kv_cache c;
    c.config_ = config;
    if (c.config_.workspace_bytes == 0) c.config_.workspace_bytes = default_workspace_bytes(config);
    c.open_ = open;
    c.sealed_ = sealed;
    c.pool_ = page_pool(config.capacity_bytes, open.bytes, sealed.bytes);
    c.page_count_.assign(slots, 0);
    c.workspace_ = workspace(c.config_.workspace_bytes);
    c.encode_scratch_.assign(
        std::max(detail::encode_scratch_floats_of<KeyCodec>(config.page_tokens, config.shape.head_dim),
                 detail::encode_scratch_floats_of<ValueCodec>(config.page_tokens, config.shape.head_dim)),
        0.0f);
    c.locks_ = std::make_unique<detail::cache_locks>();
    c.scale_ = 1.0f / std::sqrt(static_cast<float>(config.shape.head_dim));
    return result<paged_kv_cache>(std::move(c));
  }

  paged_kv_cache(paged_kv_cache&&) noexcept = default;
  paged_kv_cache& operator=(paged_kv_cache&&) noexcept = default;

  const cache_config& config() const noexcept { return config_; }
  const model_shape& shape() const noexcept { return config_.shape; }
  std::size_t open_page_bytes() const noexcept { return pool_.open_page_bytes(); }
  std::size_t sealed_page_bytes() const noexcept { return pool_.sealed_page_bytes(); }
  const page_layout& open_layout() const noexcept { return open_; }
  const page_layout& sealed_layout() const noexcept { return sealed_; }

  // ---------------------------------------------------------------- sequences

  seq_id create_sequence() {
    std::lock_guard<std::mutex> lock(locks_->sequences);
    const std::size_t slot = free_slot();
    detail::sequence& s = *seqs_[slot];
    const int n_streams = shape().streams_per_sequence();
    s.page_capacity = config_.max_context / config_.page_tokens + 3;
    s.pages.assign(static_cast<std::size_t>(n_streams) * static_cast<std::size_t>(s.page_capacity), no_page);
    s.streams.assign(static_cast<std::size_t>(n_streams), detail::stream_state{});
    s.last_position.assign(static_cast<std::size_t>(shape().num_layers), std::numeric_limits<std::int32_t>::min());
    s.report_before.assign(static_cast<std::size_t>(n_streams), 0);
    s.report_after.assign(static_cast<std::size_t>(n_streams), 0);
    const std::size_t layers = static_cast<std::size_t>(shape().num_layers);
    const std::size_t w = static_cast<std::size_t>(config_.observe.query_window);
    s.queries.assign(layers * w * static_cast<std::size_t>(shape().num_q_heads * shape().head_dim), 0.0f);
    s.query_pos.assign(layers * w, 0);
    s.queries_seen.assign(w > 0 ? layers : 0, 0);
    s.attention.assign(config_.observe.track_attention
                           ? static_cast<std::size_t>(n_streams) * 3 * static_cast<std::size_t>(config_.max_context)
                           : 0,
                       0.0f);
    s.key_norms.assign(config_.observe.key_norms
                           ? static_cast<std::size_t>(n_streams) * static_cast<std::size_t>(config_.max_context)
                           : 0,
                       0.0f);
    s.live = true;
    return make_id(slot, s.generation);
  }

  // A new sequence that shares every page of `parent`; the first write to a shared
  // page copies it (copy-on-write).
  result<seq_id> fork(seq_id parent) {
    std::lock_guard<std::mutex> lock(locks_->sequences);
    detail::sequence* p = find_locked(parent);
    if (p == nullptr) return unknown(parent, "fork");
    const std::size_t slot = free_slot();
    detail::sequence& s = *seqs_[slot];
    s.page_capacity = p->page_capacity;
    s.pages = p->pages;
    s.streams = p->streams;
    s.last_position = p->last_position;
    s.queries = p->queries;
    s.query_pos = p->query_pos;
    s.queries_seen = p->queries_seen;
    s.attention = p->attention;
    s.key_norms = p->key_norms;
    s.report_before.assign(p->streams.size(), 0);
    s.report_after.assign(p->streams.size(), 0);
    {
      std::lock_guard<std::mutex> pool_lock(locks_->pool);
      for (std::size_t i = 0; i < s.streams.size(); ++i) {
        const page_id* t = s.table(static_cast<int>(i));
        for (std::int32_t j = 0; j < s.streams[i].n_pages; ++j) pool_.retain(t[j]);
      }
    }
    s.live = true;
    return make_id(slot, s.generation);
  }

  // Drops the sequence's references; pages no other sequence holds return to the pool.
  status release(seq_id id) {
    std::lock_guard<std::mutex> lock(locks_->sequences);
    detail::sequence* s = find_locked(id);
    if (s == nullptr) return unknown(id, "release");
    {
      std::lock_guard<std::mutex> pool_lock(locks_->pool);
      for (std::size_t i = 0; i < s->streams.size(); ++i) {
        const page_id* t = s->table(static_cast<int>(i));
        for (std::int32_t j = 0; j < s->streams[i].n_pages; ++j) pool_.release(t[j]);
        s->streams[i] = detail::stream_state{};
      }
    }
    s->live = false;
    ++s->generation;
    if (s->generation == 0) s->generation = 1;  // ids never use generation 0
    free_slots_.push_back(static_cast<std::size_t>(id_slot(id)));
    return ok_status();
  }

  bool contains(seq_id id) const {
    std::lock_guard<std::mutex> lock(locks_->sequences);
    return find_locked(id) != nullptr;
  }

  // ---------------------------------------------------------------- append

  // k, v: [n_tokens][num_kv_heads][head_dim] after RoPE; positions: [n_tokens].
  status append(seq_id id, int layer, const float* k, const float* v, const std::int32_t* positions, int n_tokens) {
    const model_shape& sh = shape();
    return append(id, layer, const_tensor3<float>::contiguous(k, n_tokens, sh.num_kv_heads, sh.head_dim),
                  const_tensor3<float>::contiguous(v, n_tokens, sh.num_kv_heads, sh.head_dim), positions);
  }

  // Strided form: k and v may be slices of a larger buffer (e.g. fused QKV).
  status append(seq_id id, int layer, const_tensor3<float> k, const_tensor3<float> v, const std::int32_t* positions) {
    detail::sequence* s = find(id);
    if (s == nullptr) return unknown(id, "append");
    KVC_RETURN_IF_ERROR(check_layer(layer, "append"));
    const model_shape& sh = shape();
    const std::int64_t n = k.extents[0];
    if (n < 0 || n > config_.max_context)
      return status::error(status_code::invalid_argument, "append: n_tokens %lld outside [0, max_context %d]",
                           static_cast<long long>(n), config_.max_context);
    KVC_RETURN_IF_ERROR(detail::check_tensor(k, "append: keys", n, sh.num_kv_heads, sh.head_dim));
    KVC_RETURN_IF_ERROR(detail::check_tensor(v, "append: values", n, sh.num_kv_heads, sh.head_dim));
    if (n == 0) return ok_status();
    if (positions == nullptr)
      return status::error(status_code::invalid_argument, "append: positions is a null pointer");
    std::int32_t prev = s->last_position[static_cast<std::size_t>(layer)];
    for (std::int64_t i = 0; i < n; ++i) {
      if (positions[i] <= prev)
        return status::error(status_code::position_order,
                             "append: positions[%lld] = %d does not follow %d (layer %d); positions must strictly "
                             "increase",
                             static_cast<long long>(i), positions[i], prev, layer);
      prev = positions[i];
    }
    KVC_RETURN_IF_ERROR(check_values(k, "keys", KeyCodec::max_abs, KeyCodec::name));
    KVC_RETURN_IF_ERROR(check_values(v, "values", ValueCodec::max_abs, ValueCodec::name));

    const int first = layer * sh.num_kv_heads;
    std::lock_guard<std::mutex> lock(locks_->pool);
    // Dry run: the same page events as below, on counters only.
    pool_counts c = pool_.counts();
    for (int h = 0; h < sh.num_kv_heads; ++h) {
      const detail::stream_state& st = s->streams[static_cast<std::size_t>(first + h)];
      if (st.n_tokens + n > config_.max_context)
        return status::error(status_code::context_full,
                             "append: stream (layer %d, kv_head %d) would hold %lld tokens, max_context is %d", layer,
                             h, static_cast<long long>(st.n_tokens + n), config_.max_context);
      KVC_RETURN_IF_ERROR(dry_run_append(*s, first + h, n, c));
    }
    for (int h = 0; h < sh.num_kv_heads; ++h) append_stream(*s, first + h, h, k, v, positions, n);
    s->last_position[static_cast<std::size_t>(layer)] = positions[n - 1];
    return ok_status();
  }

  // ---------------------------------------------------------------- attend

  // q, out: [n_queries][num_q_heads][head_dim]; q_positions: [n_queries]. Each query
  // attends to the retained tokens of its KV head with position <= its own. A query
  // that sees no token gets a zero output.
  status attend(seq_id id, int layer, const float* q, const std::int32_t* q_positions, int n_queries, float* out) {
    const model_shape& sh = shape();
    return attend(id, layer, const_tensor3<float>::contiguous(q, n_queries, sh.num_q_heads, sh.head_dim), q_positions,
                  tensor3<float>::contiguous(out, n_queries, sh.num_q_heads, sh.head_dim));
  }

  status attend(seq_id id, int layer, const_tensor3<float> q, const std::int32_t* q_positions, tensor3<float> out) {
    detail::sequence* s = find(id);
    if (s == nullptr) return unknown(id, "attend");
    KVC_RETURN_IF_ERROR(check_layer(layer, "attend"));
    const model_shape& sh = shape();
    const std::int64_t n = q.extents[0];
    if (n < 0)
      return status::error(status_code::invalid_argument, "attend: n_queries %lld is negative",
                           static_cast<long long>(n));
    KVC_RETURN_IF_ERROR(detail::check_tensor(q, "attend: queries", n, sh.num_q_heads, sh.head_dim));
    KVC_RETURN_IF_ERROR(detail::check_tensor(out, "attend: out", n, sh.num_q_heads, sh.head_dim));
    if (n == 0) return ok_status();
    if (q_positions == nullptr)
      return status::error(status_code::invalid_argument, "attend: q_positions is a null pointer");
    KVC_RETURN_IF_ERROR(check_values(q, "attend: queries", std::numeric_limits<float>::max(), "float"));
    if (overlaps(q, out))
      return status::error(status_code::invalid_argument, "attend: out overlaps the queries; pass a separate buffer");

    const int d = sh.head_dim, g = sh.group_size();
    const bool track = config_.observe.track_attention;
    detail::row_block b;
    for (int h = 0; h < sh.num_kv_heads; ++h) {
      const int si = layer * sh.num_kv_heads + h;
      const detail::stream_state& st = s->streams[static_cast<std::size_t>(si)];
      const page_id* table = s->table(si);
      const std::int64_t rows = n * g;
      if (track) std::fill_n(attention_of(*s, si, 2), st.n_tokens, 0.0f);
      for (std::int64_t r0 = 0; r0 < rows; r0 += detail::attn_rows) {
        b.n = static_cast<int>(std::min<std::int64_t>(detail::attn_rows, rows - r0));
        for (int r = 0; r < b.n; ++r) {
          const std::int64_t i = (r0 + r) / g, j = (r0 + r) % g;
          b.q[r] = q.row(i, h * g + j);
          b.acc[r] = out.row(i, h * g + j);
          b.q_pos[r] = q_positions[i];
        }
        b.reset(d);
        for (std::int32_t pi = 0; pi < st.n_pages; ++pi)
          if (!attend_page(b, table[pi], pi + 1 < st.n_pages ? table[pi + 1] : no_page)) break;
        if (track) track_attention(*s, si, b, r0, n);
        b.finish(d);
      }
    }
    if (config_.observe.query_window > 0) record_queries(*s, layer, q, q_positions);
    return ok_status();
  }

  // ---------------------------------------------------------------- compress

  // Runs `policy` over every stream of the sequence (or of one layer), then applies all
  // decisions together. Kept tokens stay in position order; emptied pages return to
  // the pool. On failure (policy error, pool exhausted for copy-on-write pages) nothing
  // changes.
  template <class Policy>
  result<compress_report> compress(seq_id id, Policy&& policy) {
    return compress(id, all_layers, std::forward<Policy>(policy));
  }

  template <class Policy>
  result<compress_report> compress(seq_id id, int layer, Policy&& policy) {
    std::lock_guard<std::mutex> lock(locks_->workspace);
    return compress(id, layer, std::forward<Policy>(policy), workspace_);
  }

  template <class Policy>
  result<compress_report> compress(seq_id id, int layer, Policy&& policy, workspace& ws) {
    using P = std::remove_reference_t<Policy>;
    static_assert(is_policy_for_v<P, compress_context>,
                  "kvc::paged_kv_cache::compress: Policy needs `kvc::status plan(Context&)`; see "
                  "kvc/policies/policy.hpp (e.g. kvc::evict<kvc::score::knorm, kvc::budget::uniform>)");
    detail::sequence* s = find(id);
    if (s == nullptr) return unknown(id, "compress");
    if (layer != all_layers) KVC_RETURN_IF_ERROR(check_layer(layer, "compress"));
    const model_shape& sh = shape();
    const int first = layer == all_layers ? 0 : layer * sh.num_kv_heads;
    const int count = layer == all_layers ? sh.streams_per_sequence() : sh.num_kv_heads;

    workspace_scope scope(ws);
    std::int64_t* offsets = ws.alloc<std::int64_t>(static_cast<std::size_t>(count) + 1);
    if (offsets == nullptr) return exhausted(ws, "compress: keep-mask offsets");
    offsets[0] = 0;
    for (int i = 0; i < count; ++i)
      offsets[i + 1] = offsets[i] + s->streams[static_cast<std::size_t>(first + i)].n_tokens;
    std::uint8_t* keep = ws.alloc<std::uint8_t>(static_cast<std::size_t>(offsets[count]));
    if (keep == nullptr) return exhausted(ws, "compress: keep masks");
    std::memset(keep, 1, static_cast<std::size_t>(offsets[count]));

    compress_context ctx(*this, *s, first, count, ws, keep, offsets);
    if constexpr (is_policy_for_v<P, compress_context>) KVC_RETURN_IF_ERROR(policy.plan(ctx));

    detail::stream_plan* plans = ws.alloc<detail::stream_plan>(static_cast<std::size_t>(count));
    page_id* old_pages = ws.alloc<page_id>(static_cast<std::size_t>(s->page_capacity));
    if (plans == nullptr || old_pages == nullptr) return exhausted(ws, "compress: plans");
    // Kept rows of one page, in float, and where they came from, for codecs whose pages are
    // re-encoded.
    const std::size_t page_floats =
        static_cast<std::size_t>(config_.page_tokens) * static_cast<std::size_t>(sh.head_dim);
    detail::page_rebuild rebuild;
    if constexpr (reencode_keys || reencode_values) {
      rebuild.rows = ws.alloc<float>(2 * page_floats);
      rebuild.origin = ws.alloc<detail::row_origin>(static_cast<std::size_t>(config_.page_tokens));
      if (rebuild.rows == nullptr || rebuild.origin == nullptr)
        return exhausted(ws, "compress: re-encoding quantized pages");
    }

    std::lock_guard<std::mutex> lock(locks_->pool);
    pool_counts c = pool_.counts();
    for (int i = 0; i < count; ++i) {
      plans[i] = plan_stream(*s, first + i, keep + offsets[i]);
      if (!dry_run_compress(*s, first + i, plans[i], c))
        return status::error(status_code::pool_exhausted,
                             "compress: copy-on-write of shared pages needs more pages than the pool has free "
                             "(%lld slabs free)",
                             static_cast<long long>(pool_.free_slabs()));
    }
    compress_report rep;
    for (int i = 0; i < sh.streams_per_sequence(); ++i) {
      const std::int32_t t = s->streams[static_cast<std::size_t>(i)].n_tokens;
      s->report_before[static_cast<std::size_t>(i)] = t;
    }
    for (int i = 0; i < count; ++i) {
      rep.tokens_before += s->streams[static_cast<std::size_t>(first + i)].n_tokens;
      rep.bytes_before += stream_bytes(*s, first + i);
      rep.pages_freed += apply_stream(*s, first + i, plans[i], keep + offsets[i], old_pages, rebuild);
      rep.tokens_after += s->streams[static_cast<std::size_t>(first + i)].n_tokens;
      rep.bytes_after += stream_bytes(*s, first + i);
    }
    for (int i = 0; i < sh.streams_per_sequence(); ++i)
      s->report_after[static_cast<std::size_t>(i)] = s->streams[static_cast<std::size_t>(i)].n_tokens;
    rep.stream_tokens_before = span<const std::int32_t>(s->report_before.data(), s->report_before.size());
    rep.stream_tokens_after = span<const std::int32_t>(s->report_after.data(), s->report_after.size());
    return rep;
  }

  // ---------------------------------------------------------------- inspection

  result<stream_view> view(seq_id id, int layer, int kv_head) const {
    const detail::sequence* s = find(id);
    if (s == nullptr) return unknown(id, "view");
    KVC_RETURN_IF_ERROR(check_layer(layer, "view"));
    if (kv_head < 0 || kv_head >= shape().num_kv_heads)
      return status::error(status_code::out_of_range, "view: kv_head %d outside [0, %d)", kv_head,
                           shape().num_kv_heads);
    return stream_view(this, s, layer, kv_head);
  }

  cache_stats stats() const {
    std::lock_guard<std::mutex> lock(locks_->sequences);
    std::lock_guard<std::mutex> pool_lock(locks_->pool);
    cache_stats r;
    r.capacity_bytes = pool_.capacity_bytes();
    r.bytes_in_use = pool_.bytes_in_use();
    r.bytes_reserved = pool_.bytes_reserved();
    r.open_pages = pool_.open_pages_in_use();
    r.sealed_pages = pool_.sealed_pages_in_use();
    r.free_slabs = pool_.free_slabs();
    r.total_slabs = pool_.num_slabs();
    for (const auto& sp : seqs_) {
      if (!sp->live) continue;
      ++r.sequences;
      for (const detail::stream_state& st : sp->streams) {
        r.tokens_retained += st.n_tokens;
        r.tokens_appended += st.appended;
      }
    }
    r.dense_f16_bytes = dense_f16_bytes(r.tokens_appended);
    return r;
  }

  result<sequence_stats> stats(seq_id id) const {
    const detail::sequence* s = find(id);
    if (s == nullptr) return unknown(id, "stats");
    sequence_stats r;
    const int n_streams = shape().streams_per_sequence();
    r.stream_tokens.resize(static_cast<std::size_t>(n_streams));
    r.stream_appended.resize(static_cast<std::size_t>(n_streams));
    for (int i = 0; i < n_streams; ++i) {
      const detail::stream_state& st = s->streams[static_cast<std::size_t>(i)];
      r.stream_tokens[static_cast<std::size_t>(i)] = st.n_tokens;
      r.stream_appended[static_cast<std::size_t>(i)] = st.appended;
      r.tokens_retained += st.n_tokens;
      r.tokens_appended += st.appended;
      const page_id* t = s->table(i);
      for (std::int32_t j = 0; j < st.n_pages; ++j) (pool_.is_open(t[j]) ? r.open_pages : r.sealed_pages) += 1;
    }
    r.bytes = static_cast<std::size_t>(r.open_pages) * open_page_bytes() +
              static_cast<std::size_t>(r.sealed_pages) * sealed_page_bytes();
    r.dense_f16_bytes = dense_f16_bytes(r.tokens_appended);
    return r;
  }

  // ------------------------------------------------------------ nested types

  // What compress() hands a policy; see kvc/policies/policy.hpp.
  class compress_context {
   public:
    const model_shape& shape() const noexcept { return cache_->shape(); }
    int num_streams() const noexcept { return count_; }
    stream_info info(int i) const noexcept {
      const int si = first_ + i;
      return {si / shape().num_kv_heads, si % shape().num_kv_heads,
              seq_->streams[static_cast<std::size_t>(si)].n_tokens};
    }
    workspace& scratch() noexcept { return ws_; }
    std::uint8_t* keep(int i) noexcept { return keep_ + offsets_[i]; }

    // Where stream i's tokens lie, for budgets that count bytes: its first sealed_tokens(i)
    // tokens are in sealed pages, the rest in its open page.
    int sealed_tokens(int i) const noexcept {
      const int si = first_ + i;
      const detail::stream_state& st = seq_->streams[static_cast<std::size_t>(si)];
      if (st.n_pages == 0) return 0;
      const page_id last = seq_->table(si)[st.n_pages - 1];
      return cache_->pool_.is_open(last) ? st.n_tokens - cache_->page_count_[static_cast<std::size_t>(last)]
                                         : st.n_tokens;
    }
    int page_tokens() const noexcept { return cache_->config().page_tokens; }
    std::size_t open_page_bytes() const noexcept { return cache_->open_page_bytes(); }
    std::size_t sealed_page_bytes() const noexcept { return cache_->sealed_page_bytes(); }

    // Copies stream i into scratch memory (freed when the policy rewinds the workspace
    // or compress() returns).
    status load(int i, stream_fields fields, stream_data& out) {
      KVC_ASSERT(i >= 0 && i < count_);
      const stream_info inf = info(i);
      const cache_config& cfg = cache_->config();
      if (has_field(fields, stream_fields::queries) && cfg.observe.query_window == 0)
        return status::error(status_code::invalid_argument,
                             "compress: the policy needs observed queries; set cache_config::observe.query_window");
      if (has_field(fields, stream_fields::attention) && !cfg.observe.track_attention)
        return status::error(status_code::invalid_argument,
                             "compress: the policy needs attention statistics; set "
                             "cache_config::observe.track_attention");
      const std::size_t n = static_cast<std::size_t>(inf.n_tokens), d = static_cast<std::size_t>(shape().head_dim);
      out = stream_data{};
      if (has_field(fields, stream_fields::queries)) {
        const std::size_t w = static_cast<std::size_t>(cfg.observe.query_window);
        const std::int64_t seen = seq_->queries_seen[static_cast<std::size_t>(inf.layer)];
        const std::size_t n_obs = static_cast<std::size_t>(std::min<std::int64_t>(seen, cfg.observe.query_window));
        const std::size_t g = static_cast<std::size_t>(shape().group_size()),
                          qh = static_cast<std::size_t>(shape().num_q_heads);
        float* q = ws_.alloc<float>(n_obs * g * d);
        std::int32_t* qp = ws_.alloc<std::int32_t>(n_obs);
        if (n_obs > 0 && (q == nullptr || qp == nullptr)) return exhausted(ws_, "compress: loading observed queries");
        for (std::size_t j = 0; j < n_obs; ++j) {
          const std::size_t slot =
              static_cast<std::size_t>(inf.layer) * w +
              static_cast<std::size_t>(seen - static_cast<std::int64_t>(n_obs) + static_cast<std::int64_t>(j)) % w;
          std::memcpy(q + j * g * d, seq_->queries.data() + (slot * qh + static_cast<std::size_t>(inf.kv_head) * g) * d,
                      g * d * sizeof(float));
          qp[j] = seq_->query_pos[slot];
        }
        out.queries = q;
        out.query_positions = qp;
        out.n_queries = static_cast<int>(n_obs);
      }
      if (has_field(fields, stream_fields::attention)) {
        const int si = first_ + i;
        out.attention_sum = cache_->attention_of(*seq_, si, 0);
        out.attention_count = cache_->attention_of(*seq_, si, 1);
        out.last_attention = cache_->attention_of(*seq_, si, 2);
      }
      // Kept norms cost nothing to hand over, so scorers that can use them (keydiff) get
      // them whenever the cache keeps them.
      if (cfg.observe.key_norms) {
        out.key_norms = cache_->key_norms_of(*seq_, first_ + i);
      } else if (has_field(fields, stream_fields::key_norms)) {
        float* kn = ws_.alloc<float>(n);
        if (n > 0 && kn == nullptr) return exhausted(ws_, "compress: computing key norms");
        workspace_scope page_scope(ws_);
        float* page = ws_.alloc<float>(static_cast<std::size_t>(cfg.page_tokens) * d);
        if (n > 0 && page == nullptr) return exhausted(ws_, "compress: computing key norms");
        cache_->stored_key_norms(*seq_, first_ + i, page, kn);
        out.key_norms = kn;
      }
      std::int32_t* pos = ws_.alloc<std::int32_t>(n);
      float* lw = ws_.alloc<float>(n);
      float* k = has_field(fields, stream_fields::keys) ? ws_.alloc<float>(n * d) : nullptr;
      float* v = has_field(fields, stream_fields::values) ? ws_.alloc<float>(n * d) : nullptr;
      if ((n > 0 && (pos == nullptr || lw == nullptr)) ||
          (has_field(fields, stream_fields::keys) && n > 0 && k == nullptr) ||
          (has_field(fields, stream_fields::values) && n > 0 && v == nullptr))
        return exhausted(ws_, "compress: loading a stream");
      cache_->copy_stream(*seq_, first_ + i, k, v, pos, lw);
      out.shape = &shape();
      out.info = inf;
      out.positions = pos;
      out.log_weights = lw;
      out.keys = k;
      out.values = v;
      out.rope = &cfg.rope;
      return ok_status();
    }

   private:
    friend class paged_kv_cache;
    compress_context(const paged_kv_cache& c, const detail::sequence& s, int first, int count, workspace& ws,
                     std::uint8_t* keep, const std::int64_t* offsets) noexcept
        : cache_(&c), seq_(&s), first_(first), count_(count), ws_(ws), keep_(keep), offsets_(offsets) {}
    const paged_kv_cache* cache_;
    const detail::sequence* seq_;
    int first_, count_;
    workspace& ws_;
    std::uint8_t* keep_;
    const std::int64_t* offsets_;
  };

  // Read-only copies of one stream's retained tokens, for tests and tools. Valid until
  // the sequence is next modified or released.
  class stream_view {
   public:
    int size() const noexcept { return st().n_tokens; }
    std::int64_t appended() const noexcept { return st().appended; }
    int page_count() const noexcept { return st().n_pages; }
    // Tokens in page i, whether it is sealed, and how many sequences share it.
    int page_tokens(int i) const noexcept { return cache_->page_count_[static_cast<std::size_t>(page(i))]; }
    bool page_sealed(int i) const noexcept { return !cache_->pool_.is_open(page(i)); }
    int page_refcount(int i) const {
      std::lock_guard<std::mutex> lock(cache_->locks_->pool);
      return cache_->pool_.refcount(page(i));
    }
    page_id page(int i) const noexcept { return seq_->table(stream_index())[i]; }

    row_matrix keys() const { return matrix(true); }     // [size][head_dim], dequantized
    row_matrix values() const { return matrix(false); }  // [size][head_dim], dequantized
    std::vector<std::int32_t> positions() const {
      std::vector<std::int32_t> p(static_cast<std::size_t>(size()));
      cache_->copy_stream(*seq_, stream_index(), nullptr, nullptr, p.data(), nullptr);
      return p;
    }
    std::vector<float> log_weights() const {
      std::vector<float> w(static_cast<std::size_t>(size()));
      cache_->copy_stream(*seq_, stream_index(), nullptr, nullptr, nullptr, w.data());
      return w;
    }
    // Everything at once into caller buffers; any pointer may be null.
    void copy(float* keys, float* values, std::int32_t* positions, float* log_weights) const {
      cache_->copy_stream(*seq_, stream_index(), keys, values, positions, log_weights);
    }

   private:
    friend class paged_kv_cache;
    stream_view(const paged_kv_cache* c, const detail::sequence* s, int layer, int head) noexcept
        : cache_(c), seq_(s), layer_(layer), head_(head) {}
    int stream_index() const noexcept { return layer_ * cache_->shape().num_kv_heads + head_; }
    const detail::stream_state& st() const noexcept { return seq_->streams[static_cast<std::size_t>(stream_index())]; }
    row_matrix matrix(bool keys) const {
      row_matrix m(size(), cache_->shape().head_dim);
      cache_->copy_stream(*seq_, stream_index(), keys ? m.data() : nullptr, keys ? nullptr : m.data(), nullptr,
                          nullptr);
      return m;
    }
    const paged_kv_cache* cache_;
    const detail::sequence* seq_;
    int layer_, head_;
  };

 private:
  paged_kv_cache() = default;

  // ----------------------------------------------------------- sequence table

  static seq_id make_id(std::size_t slot, std::uint32_t generation) noexcept {
    return static_cast<seq_id>((static_cast<std::uint64_t>(generation) << 32) | static_cast<std::uint64_t>(slot));
  }
  static std::uint32_t id_slot(seq_id id) noexcept {
    return static_cast<std::uint32_t>(static_cast<std::uint64_t>(id));
  }
  static std::uint32_t id_generation(seq_id id) noexcept {
    return static_cast<std::uint32_t>(static_cast<std::uint64_t>(id) >> 32);
  }

  std::size_t free_slot() {
    if (!free_slots_.empty()) {
      const std::size_t slot = free_slots_.back();
      free_slots_.pop_back();
      return slot;
    }
    seqs_.push_back(std::make_unique<detail::sequence>());
    seqs_.back()->generation = 1;
    return seqs_.size() - 1;
  }

  detail::sequence* find_locked(seq_id id) const noexcept {
    const std::size_t slot = id_slot(id);
    if (slot >= seqs_.size()) return nullptr;
    detail::sequence* s = seqs_[slot].get();
    return s->live && s->generation == id_generation(id) ? s : nullptr;
  }
  detail::sequence* find(seq_id id) const {
    std::lock_guard<std::mutex> lock(locks_->sequences);
    return find_locked(id);
  }

  static status unknown(seq_id id, const char* op) noexcept {
    return status::error(status_code::unknown_sequence, "%s: sequence %llu is unknown or released", op,
                         static_cast<unsigned long long>(id));
  }
  static status exhausted(const workspace& ws, const char* what) noexcept {
    return status::error(status_code::workspace_exhausted,
                         "%s: workspace of %zu bytes is full (%zu in use); raise cache_config::workspace_bytes", what,
                         ws.capacity(), ws.used());
  }
  status check_layer(int layer, const char* op) const noexcept {
    if (layer < 0 || layer >= shape().num_layers)
      return status::error(status_code::out_of_range, "%s: layer %d outside [0, %d)", op, layer, shape().num_layers);
    return ok_status();
  }

  static status check_values(const_tensor3<float> t, const char* what, float max_abs, const char* codec_name) noexcept {
    for (std::int64_t i = 0; i < t.extents[0]; ++i)
      for (std::int64_t j = 0; j < t.extents[1]; ++j) {
        const float* r = t.row(i, j);
        // A branch-free pass over the row (it vectorises); the slow search only on failure.
        unsigned bad = 0;
        for (std::int64_t e = 0; e < t.extents[2]; ++e) bad |= static_cast<unsigned>(!(std::fabs(r[e]) <= max_abs));
        if (bad == 0) continue;
        for (std::int64_t e = 0; e < t.extents[2]; ++e) {
          if (std::fabs(r[e]) <= max_abs) continue;
          if (!std::isfinite(r[e]))
            return status::error(status_code::non_finite, "%s[%lld][%lld][%lld] is not finite (%g)", what,
                                 static_cast<long long>(i), static_cast<long long>(j), static_cast<long long>(e),
                                 static_cast<double>(r[e]));
          return status::error(status_code::out_of_range, "%s[%lld][%lld][%lld] = %g exceeds the %s range (%g)", what,
                               static_cast<long long>(i), static_cast<long long>(j), static_cast<long long>(e),
                               static_cast<double>(r[e]), codec_name, static_cast<double>(max_abs));
        }
      }
    return ok_status();
  }

  static bool overlaps(const_tensor3<float> a, tensor3<float> b) noexcept {
    auto extent = [](const float* p, const std::array<std::int64_t, 3>& e, const std::array<std::int64_t, 3>& st) {
      const float* lo = p;
      const float* hi = p + (e[0] - 1) * st[0] + (e[1] - 1) * st[1] + e[2];
      return std::make_pair(lo, hi);
    };
    const auto ra = extent(a.data, a.extents, a.strides);
    const auto rb = extent(b.data, b.extents, b.strides);
    return std::less<const float*>()(ra.first, rb.second) && std::less<const float*>()(rb.first, ra.second);
  }

  std::size_t dense_f16_bytes(std::int64_t tokens) const noexcept {
    return static_cast<std::size_t>(tokens) * 2u * 2u * static_cast<std::size_t>(shape().head_dim);
  }

  // Attention statistic w (0 sum, 1 count, 2 last) of stream si: [max_context]. Seq is
  // detail::sequence, const or not.
  template <class Seq>
  auto attention_of(Seq& s, int si, int w) const noexcept {
    return s.attention.data() + (static_cast<std::size_t>(si) * 3 + static_cast<std::size_t>(w)) *
                                    static_cast<std::size_t>(config_.max_context);
  }

  // ||k|| of each retained token of stream si, as appended: [max_context].
  template <class Seq>
  auto key_norms_of(Seq& s, int si) const noexcept {
    return s.key_norms.data() + static_cast<std::size_t>(si) * static_cast<std::size_t>(config_.max_context);
  }

  // Calls f(page, count, base, open, row) for the pages of stream si in order, row being the
  // stream index of the page's first token.
  template <class F>
  void for_each_page(const detail::sequence& s, int si, F&& f) const noexcept {
    const page_id* t = s.table(si);
    std::size_t row = 0;
    for (std::int32_t j = 0; j < s.streams[static_cast<std::size_t>(si)].n_pages; ++j) {
      const page_id p = t[j];
      const int cnt = page_count_[static_cast<std::size_t>(p)];
      f(p, cnt, pool_.data(p), pool_.is_open(p), row);
      row += static_cast<std::size_t>(cnt);
    }
  }

  // ||k|| of each retained token of stream si from its stored keys, decoded one page at a
  // time into page ([page_tokens][head_dim]); out: [n_tokens].
  void stored_key_norms(const detail::sequence& s, int si, float* page, float* out) const noexcept {
    const int d = shape().head_dim, P = config_.page_tokens;
    for_each_page(s, si, [&](page_id, int cnt, const std::byte* base, bool open, std::size_t row) {
      const float* k = open ? codec::f32::rows_f32(base + open_.keys, 0, cnt, d, P, page)
                            : KeyCodec::rows_f32(base + sealed_.keys, 0, cnt, d, P, page);
      for (int r = 0; r < cnt; ++r)
        out[row + static_cast<std::size_t>(r)] =
            std::sqrt(detail::dot(k + static_cast<std::size_t>(r) * d, k + static_cast<std::size_t>(r) * d, d));
    });
  }

  std::size_t stream_bytes(const detail::sequence& s, int si) const noexcept {
    std::size_t b = 0;
    const page_id* t = s.table(si);
    for (std::int32_t j = 0; j < s.streams[static_cast<std::size_t>(si)].n_pages; ++j)
      b += pool_.is_open(t[j]) ? open_page_bytes() : sealed_page_bytes();
    return b;
  }

  // ---------------------------------------------------------------- pages

  const page_layout& layout_of(page_id p) const noexcept { return pool_.is_open(p) ? open_ : sealed_; }
  std::int32_t* positions_of(page_id p) noexcept {
    return reinterpret_cast<std::int32_t*>(pool_.data(p) + layout_of(p).positions);
  }
  const std::int32_t* positions_of(page_id p) const noexcept {
    return reinterpret_cast<const std::int32_t*>(pool_.data(p) + layout_of(p).positions);
  }
  const float* log_weights_of(page_id p) const noexcept {
    return reinterpret_cast<const float*>(pool_.data(p) + layout_of(p).log_weights);
  }
  float* open_keys(page_id p) noexcept { return reinterpret_cast<float*>(pool_.data(p) + open_.keys); }
  float* open_values(page_id p) noexcept { return reinterpret_cast<float*>(pool_.data(p) + open_.values); }

  // Copies n rows (with sidecars) between two pages of the same kind.
  void copy_page_rows(page_id src, int src_first, page_id dst, int dst_first, int n) noexcept {
    if (n <= 0) return;
    const int d = shape().head_dim, P = config_.page_tokens;
    const page_layout& l = layout_of(src);
    KVC_ASSERT(pool_.is_open(src) == pool_.is_open(dst));
    const std::byte* s = pool_.data(src);
    std::byte* t = pool_.data(dst);
    if (pool_.is_open(src)) {
      codec::f32::copy_rows(s + l.keys, src_first, t + l.keys, dst_first, n, d, P);
      codec::f32::copy_rows(s + l.values, src_first, t + l.values, dst_first, n, d, P);
    } else {
      KeyCodec::copy_rows(s + l.keys, src_first, t + l.keys, dst_first, n, d, P);
      ValueCodec::copy_rows(s + l.values, src_first, t + l.values, dst_first, n, d, P);
    }
    std::memmove(t + l.positions + sizeof(std::int32_t) * static_cast<std::size_t>(dst_first),
                 s + l.positions + sizeof(std::int32_t) * static_cast<std::size_t>(src_first),
                 sizeof(std::int32_t) * static_cast<std::size_t>(n));
    std::memmove(t + l.log_weights + sizeof(float) * static_cast<std::size_t>(dst_first),
                 s + l.log_weights + sizeof(float) * static_cast<std::size_t>(src_first),
                 sizeof(float) * static_cast<std::size_t>(n));
  }

  // Dequantized copy of a stream; any output may be null.
  void copy_stream(const detail::sequence& s, int si, float* keys, float* values, std::int32_t* pos,
                   float* log_w) const noexcept {
    const int d = shape().head_dim, P = config_.page_tokens;
    for_each_page(s, si, [&](page_id, int cnt, const std::byte* base, bool open, std::size_t row) {
      const page_layout& l = open ? open_ : sealed_;
      if (keys != nullptr) {
        float* dst = keys + row * static_cast<std::size_t>(d);
        if (open)
          codec::f32::decode(base + l.keys, 0, cnt, d, P, dst);
        else
          KeyCodec::decode(base + l.keys, 0, cnt, d, P, dst);
      }
      if (values != nullptr) {
        float* dst = values + row * static_cast<std::size_t>(d);
        if (open)
          codec::f32::decode(base + l.values, 0, cnt, d, P, dst);
        else
          ValueCodec::decode(base + l.values, 0, cnt, d, P, dst);
      }
      if (pos != nullptr)
        std::memcpy(pos + row, base + l.positions, sizeof(std::int32_t) * static_cast<std::size_t>(cnt));
      if (log_w != nullptr)
        std::memcpy(log_w + row, base + l.log_weights, sizeof(float) * static_cast<std::size_t>(cnt));
    });
  }

  // A sealed page of fused codecs: for each run of up to 8 query rows whose outputs are
  // adjacent (the heads of one GQA group), the key codec turns each chunk of up to 64 tokens'
  // codes into logits for all of them and the value codec adds p * v from the value codes;
  // the online softmax is attend_tile's, per chunk. False once the page starts after every query.
  // The next page is asked for at the steps of each chunk (next_page_fetch): the start, the
  // queries' preparation, the logits, each query row's softmax, the values.
  bool attend_page_fused(detail::row_block& b, page_id p, page_id next) const noexcept {
    const int d = shape().head_dim, P = config_.page_tokens;
    const int cnt = page_count_[static_cast<std::size_t>(p)];
    const std::byte* base = pool_.data(p);
    const std::int32_t* pos = reinterpret_cast<const std::int32_t*>(base + sealed_.positions);
    const float* lw = reinterpret_cast<const float*>(base + sealed_.log_weights);
    const float sc = scale_;
    if (cnt == 0) return true;
    if (pos[0] > b.max_pos) return false;
    constexpr int max_run = 8, chunk = 64;
    next_page_fetch fetch{*this, next, (P + chunk - 1) / chunk};
    fetch.upto(1);
    const std::byte* kp = base + sealed_.keys;
    const std::byte* vp = base + sealed_.values;
    constexpr float ninf = -std::numeric_limits<float>::infinity();
    alignas(64) float w[max_run * max_head_dim];
    constexpr int bias_row = KeyCodec::bias_floats(max_head_dim);  // the most any head_dim takes
    KVC_ASSERT(KeyCodec::bias_floats(d) <= bias_row);
    alignas(64) float bias[max_run * bias_row];
    alignas(64) float s[max_run * chunk];
    for (int r0 = 0; r0 < b.n;) {
      int len = 1;
      while (r0 + len < b.n && len < max_run && b.acc[r0 + len] == b.acc[r0] + static_cast<std::ptrdiff_t>(len) * d)
        ++len;
      std::int32_t run_max = b.q_pos[r0];
      for (int g = 1; g < len; ++g) run_max = std::max(run_max, b.q_pos[r0 + g]);
      KeyCodec::prepare_queries(kp, d, P, b.q + r0, len, w, bias);
      fetch.upto(2);
      for (int t0 = 0; t0 < cnt && pos[t0] <= run_max; t0 += chunk) {
        const int T = std::min(chunk, cnt - t0);
        KeyCodec::key_logits(kp, t0, T, d, P, w, bias, len, s);
        const int step0 = t0 / chunk * next_steps;  // steps of the chunks before
        fetch.upto(step0 + 3);
        bool any = false;
        for (int g = 0; g < len; ++g) {
          const int r = r0 + g;
          float* sr = s + g * T;
          const float mx = detail::mask_logits(sr, pos + t0, lw + t0, T, b.q_pos[r], sc);
          if (mx == ninf) {
            for (int t = 0; t < T; ++t) sr[t] = 0.0f;
            continue;
          }
          any = true;
          const float m_new = mx > b.m[r] ? mx : b.m[r];
          const float corr = detail::exp_nonpositive(b.m[r] - m_new);
          const float sum = detail::exp_shifted_sum(sr, T, m_new);
          b.l[r] = b.l[r] * corr + sum;
          b.m[r] = m_new;
          if (corr != 1.0f)
            for (int e = 0; e < d; ++e) b.acc[r][e] *= corr;
          fetch.upto(step0 + 4 + std::min(g, next_steps - 5));
        }
        fetch.upto(step0 + next_steps);
        if (any) ValueCodec::accumulate_values(vp, t0, T, d, P, s, len, b.acc[r0]);
      }
      r0 += len;
    }
    fetch.all();
    return true;
  }

  // Fused pages ask for the next page in slices spread over their work, not all at once: a
  // whole page's requests (10 KiB for kivi<4> at head_dim 128 and 64 tokens) outnumber the
  // misses a core keeps in flight, and the requests past those wait or are dropped. A slice
  // at each of next_steps steps of a chunk took 6% to 16% off attention from memory over
  // pages of 64 and 256 tokens, against two parts (bench/README.md, "Quantized attend").
  static constexpr int next_steps = 8;

  // The next sealed page's lines, in the order a page is read (positions and log-weights,
  // then keys, then values), asked for a slice at a time: slice i once step i + 1 of the page
  // loop has begun, next_steps steps a chunk. A page under 4 KiB, whose lines fit the misses
  // in flight, goes in two parts as early as they are of use: positions, log-weights and keys
  // at step 1, values at step 3 (after the logits); in slices it was no faster.
  struct next_page_fetch {
    const paged_kv_cache& c;
    page_id page;
    int slices = 2;
    std::size_t per = 0;  // lines a slice; 0: the two parts of a small page
    int done = 0;         // slices (parts) asked for

    next_page_fetch(const paged_kv_cache& cache, page_id p, int chunks) noexcept : c(cache), page(p) {
      const page_layout& l = c.sealed_;
      if (l.bytes - l.keys < 4096) return;
      slices = next_steps * chunks;
      const std::size_t lines = (l.bytes - l.keys + 63) / 64;
      per = (lines + static_cast<std::size_t>(slices) - 1) / static_cast<std::size_t>(slices);
    }
    void upto(int step) noexcept {
      const page_layout& l = c.sealed_;
      if (per == 0) {
        if (done == 0 && step >= 1) {
          c.prefetch_page(page, l.positions, l.bytes, true);
          c.prefetch_page(page, l.keys, l.values, true);
          done = 1;
        }
        if (done == 1 && step >= 3) {
          c.prefetch_page(page, l.values, l.positions, true);
          done = 2;
        }
        return;
      }
      // Offsets in the reading order: [0, head) positions and log-weights, then keys and values.
      const std::size_t head = l.bytes - l.positions, total = l.bytes - l.keys;
      for (; done < step && done < slices; ++done) {
        const std::size_t a = std::min(total, per * 64 * static_cast<std::size_t>(done));
        const std::size_t z = std::min(total, a + per * 64);
        if (a < head) c.prefetch_page(page, l.positions + a, l.positions + std::min(z, head), a == 0);
        if (z > head) c.prefetch_page(page, l.keys + (std::max(a, head) - head), l.keys + (z - head), a <= head);
      }
    }
    void all() noexcept { upto(std::numeric_limits<int>::max()); }
  };

  // Hints bytes [from, to) of sealed page p (if any) into cache while the current page is read.
  // A prefetch that misses the TLB may be dropped (Zen 3 drops them): the first line of each
  // 4 KiB page, and the first line asked for where walk_first, is fetched as for writing,
  // which walks the page table.
  void prefetch_page(page_id p, std::size_t from, std::size_t to, bool walk_first) const noexcept {
#if defined(__GNUC__) || defined(__clang__)
    if (p == no_page || pool_.is_open(p)) return;
    const char* c = reinterpret_cast<const char*>(pool_.data(p));
    for (std::size_t off = from & ~std::size_t{63}; off < to; off += 64) {
      const char* at = c + off;
      if ((walk_first && off == (from & ~std::size_t{63})) || (reinterpret_cast<std::uintptr_t>(at) & 4095) == 0)
        __builtin_prefetch(at, 1, 3);
      else
        __builtin_prefetch(at, 0, 3);
    }
#else
    (void)p, (void)from, (void)to, (void)walk_first;
#endif
  }

  // Runs one page through the tile kernel; false once pages start after every query.
  // `next` is the stream's following page (or no_page), prefetched while p is worked on.
  bool attend_page(detail::row_block& b, page_id p, page_id next) const noexcept {
    if constexpr (fused_pages)
      if (!pool_.is_open(p)) return attend_page_fused(b, p, next);
    const int d = shape().head_dim, P = config_.page_tokens;
    const int cnt = page_count_[static_cast<std::size_t>(p)];
    const std::byte* base = pool_.data(p);
    const bool open = pool_.is_open(p);
    const page_layout& l = open ? open_ : sealed_;
    const std::int32_t* pos = reinterpret_cast<const std::int32_t*>(base + l.positions);
    const float* lw = reinterpret_cast<const float*>(base + l.log_weights);
    // Sealed rows the kernel reads in place (f32, and f16 / bf16 where the SIMD kernel
    // widens them in registers) skip the decode into scratch.
    constexpr detail::element_type ke = detail::elements_of<KeyCodec>::value;
    constexpr detail::element_type ve = detail::elements_of<ValueCodec>::value;
    constexpr bool in_place = detail::reads_in_place(ke) && detail::reads_in_place(ve);
    alignas(64) float kbuf[in_place ? 1 : detail::attn_tile * max_head_dim];
    alignas(64) float vbuf[in_place ? 1 : detail::attn_tile * max_head_dim];
    for (int t0 = 0; t0 < cnt; t0 += detail::attn_tile) {
      if (pos[t0] > b.max_pos) return false;
      const int T = std::min(detail::attn_tile, cnt - t0);
      const detail::tile_prefetch pf = t0 + T < cnt ? tile_at(p, t0 + T) : tile_at(next, 0);
      if (open) {
        detail::attend_tile(b, reinterpret_cast<const float*>(base + l.keys) + static_cast<std::size_t>(t0) * d,
                            reinterpret_cast<const float*>(base + l.values) + static_cast<std::size_t>(t0) * d,
                            pos + t0, lw + t0, T, d, scale_, pf);
      } else if constexpr (in_place) {
        const std::size_t row0 = static_cast<std::size_t>(t0) * static_cast<std::size_t>(d);
        detail::attend_tile_in_place<ke, ve>(b, base + l.keys + row0 * detail::element_bytes(ke),
                                             base + l.values + row0 * detail::element_bytes(ve), pos + t0, lw + t0, T,
                                             d, scale_, pf);
      } else {
        detail::attend_tile(b, KeyCodec::rows_f32(base + l.keys, t0, T, d, P, kbuf),
                            ValueCodec::rows_f32(base + l.values, t0, T, d, P, vbuf), pos + t0, lw + t0, T, d, scale_,
                            pf);
      }
    }
    return true;
  }

  // Second pass for cache_config::observe.track_attention, once a block's softmax maxima and
  // denominators are final: adds each row's attention probabilities (mean over the query
  // group) to the stream's statistics. Rows start at r0 of the call's n queries * group.
  void track_attention(detail::sequence& s, int si, const detail::row_block& b, std::int64_t r0,
                       std::int64_t n) const noexcept {
    const int d = shape().head_dim, P = config_.page_tokens, g = shape().group_size();
    const float inv_g = 1.0f / static_cast<float>(g);
    float* sum = attention_of(s, si, 0);
    float* count = attention_of(s, si, 1);
    float* last = attention_of(s, si, 2);
    const page_id* table = s.table(si);
    alignas(64) float kbuf[detail::attn_tile * max_head_dim];
    std::int64_t index = 0;  // token index within the stream
    for (std::int32_t pi = 0; pi < s.streams[static_cast<std::size_t>(si)].n_pages; ++pi) {
      const page_id p = table[pi];
      const int cnt = page_count_[static_cast<std::size_t>(p)];
      const std::byte* base = pool_.data(p);
      const bool open = pool_.is_open(p);
      const page_layout& l = open ? open_ : sealed_;
      const std::int32_t* pos = reinterpret_cast<const std::int32_t*>(base + l.positions);
      const float* lw = reinterpret_cast<const float*>(base + l.log_weights);
      for (int t0 = 0; t0 < cnt; t0 += detail::attn_tile) {
        const int T = std::min(detail::attn_tile, cnt - t0);
        const float* k = open ? codec::f32::rows_f32(base + l.keys, t0, T, d, P, kbuf)
                              : KeyCodec::rows_f32(base + l.keys, t0, T, d, P, kbuf);
        for (int r = 0; r < b.n; ++r) {
          if (!(b.l[r] > 0.0f)) continue;
          const std::int64_t query = (r0 + r) / g;
          const bool first_head = (r0 + r) % g == 0, last_query = query == n - 1;
          const float inv_l = 1.0f / b.l[r];
          for (int t = 0; t < T; ++t) {
            if (pos[t0 + t] > b.q_pos[r]) continue;
            const float a =
                detail::exp_nonpositive(detail::dot(b.q[r], k + static_cast<std::size_t>(t) * d, d) * scale_ +
                                        lw[t0 + t] - b.m[r]) *
                inv_l * inv_g;
            const std::size_t i = static_cast<std::size_t>(index + t0 + t);
            sum[i] += a;
            if (first_head) count[i] += 1.0f;
            if (last_query) last[i] += a;
          }
        }
      }
      index += cnt;
    }
  }

  // Keeps the last query_window queries of the call in the layer's ring.
  void record_queries(detail::sequence& s, int layer, const_tensor3<float> q,
                      const std::int32_t* q_positions) const noexcept {
    const std::int64_t w = config_.observe.query_window, n = q.extents[0];
    const std::size_t qh = static_cast<std::size_t>(shape().num_q_heads),
                      d = static_cast<std::size_t>(shape().head_dim);
    std::int64_t& seen = s.queries_seen[static_cast<std::size_t>(layer)];
    for (std::int64_t i = std::max<std::int64_t>(0, n - w); i < n; ++i, ++seen) {
      const std::size_t slot = static_cast<std::size_t>(layer * w + seen % w);
      for (std::size_t h = 0; h < qh; ++h)
        std::memcpy(s.queries.data() + (slot * qh + h) * d, q.row(i, static_cast<std::int64_t>(h)), d * sizeof(float));
      s.query_pos[slot] = q_positions[i];
    }
  }

  // Where the tile of page p that starts at row `first` lies (empty for no_page).
  detail::tile_prefetch tile_at(page_id p, int first) const noexcept {
    detail::tile_prefetch r;
    if (p == no_page) return r;
    const int d = shape().head_dim;
    const std::size_t P = static_cast<std::size_t>(config_.page_tokens), f = static_cast<std::size_t>(first);
    const std::size_t n =
        static_cast<std::size_t>(std::min(detail::attn_tile, page_count_[static_cast<std::size_t>(p)] - first));
    const std::byte* base = pool_.data(p);
    const bool open = pool_.is_open(p);
    const page_layout& l = open ? open_ : sealed_;
    // Rows lie at equal strides in row codecs; for other codecs this is the proportional slice.
    const std::size_t kb =
        open ? codec::f32::page_bytes(config_.page_tokens, d) : KeyCodec::page_bytes(config_.page_tokens, d);
    const std::size_t vb =
        open ? codec::f32::page_bytes(config_.page_tokens, d) : ValueCodec::page_bytes(config_.page_tokens, d);
    r.keys = base + l.keys + kb * f / P;
    r.key_bytes = kb * n / P;
    r.values = base + l.values + vb * f / P;
    r.value_bytes = vb * n / P;
    r.positions = base + l.positions + sizeof(std::int32_t) * f;
    r.log_weights = base + l.log_weights + sizeof(float) * f;
    return r;
  }

  // ---------------------------------------------------------------- append internals

  // Mirrors append_stream's page events on counters. Fails without side effects.
  status dry_run_append(const detail::sequence& s, int si, std::int64_t n, pool_counts& c) const noexcept {
    const int P = config_.page_tokens;
    const detail::stream_state& st = s.streams[static_cast<std::size_t>(si)];
    const page_id* t = s.table(si);
    bool has_open = st.n_pages > 0 && pool_.is_open(t[st.n_pages - 1]);
    std::int64_t count = has_open ? page_count_[static_cast<std::size_t>(t[st.n_pages - 1])] : 0;
    std::int32_t pages = st.n_pages;
    if (has_open && pool_.refcount(t[st.n_pages - 1]) > 1 && !c.take_open()) return pool_full(si);
    while (n > 0) {
      if (!has_open) {
        if (!c.take_open()) return pool_full(si);
        if (++pages > s.page_capacity) return table_full(si);
        has_open = true;
        count = 0;
      }
      const std::int64_t m = std::min<std::int64_t>(P - count, n);
      count += m;
      n -= m;
      if (count == P) {
        if (!seal_in_place) {
          if (!c.take_sealed()) return pool_full(si);
          c.give_open();
        }
        has_open = false;
      }
    }
    return ok_status();
  }

  status pool_full(int si) const noexcept {
    return status::error(status_code::pool_exhausted,
                         "append: page pool exhausted at stream (layer %d, kv_head %d): %lld of %d slabs free; "
                         "compress or release sequences, or raise capacity_bytes",
                         si / shape().num_kv_heads, si % shape().num_kv_heads,
                         static_cast<long long>(pool_.free_slabs()), pool_.num_slabs());
  }
  status table_full(int si) const noexcept {
    return status::error(status_code::context_full,
                         "append: stream (layer %d, kv_head %d) has no page-table room left (max_context %d)",
                         si / shape().num_kv_heads, si % shape().num_kv_heads, config_.max_context);
  }

  void append_stream(detail::sequence& s, int si, int head, const_tensor3<float> k, const_tensor3<float> v,
                     const std::int32_t* positions, std::int64_t n) noexcept {
    const int P = config_.page_tokens, d = shape().head_dim;
    detail::stream_state& st = s.streams[static_cast<std::size_t>(si)];
    page_id* t = s.table(si);
    const std::size_t row_bytes = sizeof(float) * static_cast<std::size_t>(d);
    std::int64_t i = 0;
    while (i < n) {
      page_id open = st.n_pages > 0 && pool_.is_open(t[st.n_pages - 1]) ? t[st.n_pages - 1] : no_page;
      if (open == no_page) {
        open = pool_.alloc_open();
        KVC_ASSERT(open != no_page);
        page_count_[static_cast<std::size_t>(open)] = 0;
        t[st.n_pages++] = open;
      } else if (pool_.refcount(open) > 1) {  // copy-on-write
        const page_id fresh = pool_.alloc_open();
        KVC_ASSERT(fresh != no_page);
        const int cnt = page_count_[static_cast<std::size_t>(open)];
        copy_page_rows(open, 0, fresh, 0, cnt);
        page_count_[static_cast<std::size_t>(fresh)] = cnt;
        pool_.release(open);
        open = fresh;
        t[st.n_pages - 1] = open;
      }
      const int c = page_count_[static_cast<std::size_t>(open)];
      const int m = static_cast<int>(std::min<std::int64_t>(P - c, n - i));
      float* kd = open_keys(open);
      float* vd = open_values(open);
      std::int32_t* pd = positions_of(open);
      float* wd = reinterpret_cast<float*>(pool_.data(open) + open_.log_weights);
      for (int r = 0; r < m; ++r) {
        std::memcpy(kd + static_cast<std::size_t>(c + r) * d, k.row(i + r, head), row_bytes);
        std::memcpy(vd + static_cast<std::size_t>(c + r) * d, v.row(i + r, head), row_bytes);
        pd[c + r] = positions[i + r];
        wd[c + r] = 0.0f;
      }
      page_count_[static_cast<std::size_t>(open)] = c + m;
      if (config_.observe.track_attention)
        for (int w = 0; w < 3; ++w) std::fill_n(attention_of(s, si, w) + st.n_tokens, m, 0.0f);
      if (config_.observe.key_norms) {
        float* kn = key_norms_of(s, si) + st.n_tokens;
        for (int r = 0; r < m; ++r) kn[r] = std::sqrt(detail::dot(k.row(i + r, head), k.row(i + r, head), d));
      }
      i += m;
      st.n_tokens += m;
      st.appended += m;
      if (c + m == P) seal(t[st.n_pages - 1]);
    }
  }

  // Encodes a full open page into a sealed one (or relabels it when both codecs are f32).
  void seal(page_id& p) noexcept {
    if constexpr (seal_in_place) {
      pool_.relabel_sealed(p);
    } else {
      const int P = config_.page_tokens, d = shape().head_dim;
      const page_id q = pool_.alloc_sealed();
      KVC_ASSERT(q != no_page);
      const std::byte* src = pool_.data(p);
      std::byte* dst = pool_.data(q);
      detail::encode_page<KeyCodec>(reinterpret_cast<const float*>(src + open_.keys), P, d, P, dst + sealed_.keys,
                                    encode_scratch_.data());
      detail::encode_page<ValueCodec>(reinterpret_cast<const float*>(src + open_.values), P, d, P, dst + sealed_.values,
                                      encode_scratch_.data());
      std::memcpy(dst + sealed_.positions, src + open_.positions, sizeof(std::int32_t) * static_cast<std::size_t>(P));
      std::memcpy(dst + sealed_.log_weights, src + open_.log_weights, sizeof(float) * static_cast<std::size_t>(P));
      page_count_[static_cast<std::size_t>(q)] = P;
      pool_.release(p);
      p = q;
    }
  }

  // ---------------------------------------------------------------- compress internals

  detail::stream_plan plan_stream(const detail::sequence& s, int si, const std::uint8_t* keep) const noexcept {
    const int P = config_.page_tokens;
    const detail::stream_state& st = s.streams[static_cast<std::size_t>(si)];
    const page_id* t = s.table(si);
    detail::stream_plan pl;
    const bool has_open = st.n_pages > 0 && pool_.is_open(t[st.n_pages - 1]);
    pl.sealed_old = has_open ? st.n_pages - 1 : st.n_pages;
    std::int64_t g = 0;
    bool prefix = true;
    for (std::int32_t j = 0; j < pl.sealed_old; ++j) {
      const int cnt = page_count_[static_cast<std::size_t>(t[j])];
      int kept = 0;
      for (int r = 0; r < cnt; ++r) kept += keep[g + r] != 0;
      g += cnt;
      pl.kept_sealed += kept;
      if (prefix && cnt == P && kept == P)
        ++pl.unchanged;
      else
        prefix = false;
    }
    pl.sealed_new = pl.unchanged + (pl.kept_sealed - pl.unchanged * P + P - 1) / P;
    if (has_open) {
      pl.open = t[st.n_pages - 1];
      pl.open_count = page_count_[static_cast<std::size_t>(pl.open)];
      for (int r = 0; r < pl.open_count; ++r) pl.kept_open += keep[g + r] != 0;
    }
    return pl;
  }

  bool dry_run_compress(const detail::sequence& s, int si, const detail::stream_plan& pl,
                        pool_counts& c) const noexcept {
    const page_id* t = s.table(si);
    for (std::int32_t j = pl.unchanged; j < pl.sealed_new; ++j)
      if (pool_.refcount(t[j]) > 1 && !c.take_sealed()) return false;
    if (pl.kept_open > 0 && pl.kept_open < pl.open_count && pool_.refcount(pl.open) > 1 && !c.take_open()) return false;
    return true;
  }

  // Applies one stream's plan; returns the number of pages returned to the pool.
  // rebuild: scratch when a codec re-encodes its pages.
  std::int64_t apply_stream(detail::sequence& s, int si, const detail::stream_plan& pl, const std::uint8_t* keep,
                            page_id* src, detail::page_rebuild& rebuild) noexcept {
    const int P = config_.page_tokens;
    detail::stream_state& st = s.streams[static_cast<std::size_t>(si)];
    page_id* t = s.table(si);
    std::int64_t freed = 0;
    std::copy(t, t + st.n_pages, src);
    // Destinations: pages that only this sequence holds are rewritten in place (every
    // kept token moves to a slot at or before its own), shared ones are copied.
    for (std::int32_t j = pl.unchanged; j < pl.sealed_new; ++j) {
      if (pool_.refcount(src[j]) > 1) {
        t[j] = pool_.alloc_sealed();
        KVC_ASSERT(t[j] != no_page);
      }
    }
    std::int64_t g = static_cast<std::int64_t>(pl.unchanged) * P;    // keep index of the first token of page j
    std::int64_t dst = static_cast<std::int64_t>(pl.unchanged) * P;  // next destination slot, over the sealed pages
    for (std::int32_t j = pl.unchanged; j < pl.sealed_old; ++j) {
      const int cnt = page_count_[static_cast<std::size_t>(src[j])];
      int r = 0;
      while (r < cnt) {
        if (keep[g + r] == 0) {
          ++r;
          continue;
        }
        // A run of kept rows that stays inside one destination page.
        const int room = P - static_cast<int>(dst % P);
        int len = 1;
        while (r + len < cnt && len < room && keep[g + r + len] != 0) ++len;
        if constexpr (reencode_keys || reencode_values) gather_rows(src[j], r, static_cast<int>(dst % P), len, rebuild);
        copy_page_rows(src[j], r, t[dst / P], static_cast<int>(dst % P), len);
        dst += len;
        r += len;
        // A destination page is complete once every row bound for it is gathered: its
        // source pages all lie at or after it in the table (a kept row never moves to a
        // later slot), so none of them has been written yet.
        if constexpr (reencode_keys || reencode_values)
          if (dst % P == 0) reencode(t[dst / P - 1], P, rebuild);
      }
      g += cnt;
    }
    if constexpr (reencode_keys || reencode_values)
      if (dst % P != 0) reencode(t[dst / P], static_cast<int>(dst % P), rebuild);
    for (std::int32_t j = pl.unchanged; j < pl.sealed_new; ++j)
      page_count_[static_cast<std::size_t>(t[j])] =
          j + 1 < pl.sealed_new ? P : static_cast<int>(pl.kept_sealed - static_cast<std::int64_t>(j) * P);
    for (std::int32_t j = pl.unchanged; j < pl.sealed_old; ++j)
      if (j >= pl.sealed_new || t[j] != src[j]) freed += pool_.release(src[j]) ? 1 : 0;
    std::int32_t n_pages = pl.sealed_new;
    if (pl.open != no_page) {
      page_id open = pl.open;
      if (pl.kept_open == 0) {
        freed += pool_.release(open) ? 1 : 0;
        open = no_page;
      } else if (pl.kept_open < pl.open_count) {
        if (pool_.refcount(open) > 1) {
          const page_id fresh = pool_.alloc_open();
          KVC_ASSERT(fresh != no_page);
          compact_open(open, fresh, keep + g);
          pool_.release(open);
          open = fresh;
        } else {
          compact_open(open, open, keep + g);
        }
        page_count_[static_cast<std::size_t>(open)] = pl.kept_open;
      }
      if (open != no_page) t[n_pages++] = open;
    }
    if (config_.observe.track_attention) {
      for (int w = 0; w < 3; ++w) {
        float* a = attention_of(s, si, w);
        std::int32_t out = 0;
        for (std::int32_t i = 0; i < st.n_tokens; ++i)
          if (keep[i] != 0) a[out++] = a[i];
      }
    }
    if (config_.observe.key_norms) {
      float* a = key_norms_of(s, si);
      std::int32_t out = 0;
      for (std::int32_t i = 0; i < st.n_tokens; ++i)
        if (keep[i] != 0) a[out++] = a[i];
    }
    st.n_pages = n_pages;
    st.n_tokens = pl.kept_sealed + (pl.open != no_page ? pl.kept_open : 0);
    return freed;
  }

  // Decodes rows [first, first + n) of sealed page src that codecs re-encode into
  // rebuild.rows at row `at`, and records where they came from.
  void gather_rows(page_id src, int first, int at, int n, detail::page_rebuild& rebuild) const noexcept {
    const int d = shape().head_dim, P = config_.page_tokens;
    const std::byte* base = pool_.data(src);
    const std::size_t off = static_cast<std::size_t>(at) * static_cast<std::size_t>(d);
    if constexpr (reencode_keys) KeyCodec::decode(base + sealed_.keys, first, n, d, P, rebuild.rows + off);
    if constexpr (reencode_values)
      ValueCodec::decode(base + sealed_.values, first, n, d, P,
                         rebuild.rows + static_cast<std::size_t>(P) * static_cast<std::size_t>(d) + off);
    int k = 0;
    while (k < rebuild.n_sources && rebuild.sources[k] != src) ++k;
    if (k == rebuild.n_sources) {
      if (k < detail::max_reencode_sources)
        rebuild.sources[rebuild.n_sources++] = src;
      else
        k = -1;
    }
    for (int i = 0; i < n; ++i) rebuild.origin[at + i] = detail::row_origin{k, first + i};
  }

  // Encodes the first n gathered rows into sealed page p (its other payload is in place),
  // through the codec's reencode when it has one, and starts the next page's sources.
  void reencode(page_id p, int n, detail::page_rebuild& rebuild) noexcept {
    const int d = shape().head_dim, P = config_.page_tokens;
    std::byte* base = pool_.data(p);
    if constexpr (reencode_keys) reencode_payload<KeyCodec>(rebuild.rows, n, sealed_.keys, rebuild, base);
    if constexpr (reencode_values)
      reencode_payload<ValueCodec>(rebuild.rows + static_cast<std::size_t>(P) * static_cast<std::size_t>(d), n,
                                   sealed_.values, rebuild, base);
    rebuild.n_sources = 0;
  }

  // One payload (at `offset` in each page) of reencode.
  template <class Codec>
  void reencode_payload(float* rows, int n, std::size_t offset, const detail::page_rebuild& rebuild,
                        std::byte* page) noexcept {
    const int d = shape().head_dim, P = config_.page_tokens;
    if constexpr (detail::has_reencode_v<Codec>) {
      const std::byte* sources[detail::max_reencode_sources];
      for (int k = 0; k < rebuild.n_sources; ++k) sources[k] = pool_.data(rebuild.sources[k]) + offset;
      Codec::reencode(rows, n, d, P, sources, rebuild.n_sources, rebuild.origin, page + offset);
    } else {
      (void)rebuild;
      detail::encode_page<Codec>(rows, n, d, P, page + offset, encode_scratch_.data());
    }
  }

  void compact_open(page_id src, page_id dst, const std::uint8_t* keep) noexcept {
    const int cnt = page_count_[static_cast<std::size_t>(src)];
    int out = 0;
    for (int r = 0; r < cnt;) {
      if (keep[r] == 0) {
        ++r;
        continue;
      }
      int len = 1;
      while (r + len < cnt && keep[r + len] != 0) ++len;
      copy_page_rows(src, r, dst, out, len);
      out += len;
      r += len;
    }
  }

  cache_config config_;
  page_layout open_, sealed_;
  page_pool pool_;
  std::vector<std::int32_t> page_count_;  // [pages] tokens in each page
  std::vector<std::unique_ptr<detail::sequence>> seqs_;
  std::vector<std::size_t> free_slots_;
  workspace workspace_;
  // Working memory of codecs whose encode takes scratch (codec.hpp), for seal() and
  // compaction's re-encoding; both run under the pool lock, which guards it.
  std::vector<float> encode_scratch_;
  std::unique_ptr<detail::cache_locks> locks_;
  float scale_ = 1.0f;
};

KVC_NAMESPACE_END
