// tests/reference/snapshot.hpp: everything a caller can observe about a paged_kv_cache,
// captured through its public interface, and a byte-exact comparison of two captures.
// Used to prove that a call left the cache as it was (failed calls) or left one sequence
// alone while another changed (forks).
#pragma once

#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include <kvc/kvc.hpp>

namespace kvc_ref {

struct stream_snapshot {
  std::vector<float> keys, values;  // [n][head_dim], dequantized
  std::vector<std::int32_t> positions;
  std::vector<float> log_weights;
  std::vector<kvc::page_id> pages;
  std::vector<int> refcounts, page_tokens, sealed;
  std::int64_t appended = 0;
};

struct sequence_snapshot {
  kvc::seq_id id{};
  bool live = false;
  std::vector<stream_snapshot> streams;  // [layer * num_kv_heads + kv_head]
  kvc::sequence_stats stats;
};

struct cache_snapshot {
  std::vector<sequence_snapshot> sequences;
  kvc::cache_stats stats;
};

template <class Cache>
stream_snapshot snapshot_stream(const Cache& cache, kvc::seq_id id, int layer, int kv_head) {
  stream_snapshot s;
  auto v = cache.view(id, layer, kv_head);
  if (!v.ok()) return s;
  const kvc::row_matrix k = v->keys(), val = v->values();
  s.keys.assign(k.data(), k.data() + k.size());
  s.values.assign(val.data(), val.data() + val.size());
  s.positions = v->positions();
  s.log_weights = v->log_weights();
  for (int i = 0; i < v->page_count(); ++i) {
    s.pages.push_back(v->page(i));
    s.refcounts.push_back(v->page_refcount(i));
    s.page_tokens.push_back(v->page_tokens(i));
    s.sealed.push_back(v->page_sealed(i) ? 1 : 0);
  }
  s.appended = v->appended();
  return s;
}

template <class Cache>
sequence_snapshot snapshot_sequence(const Cache& cache, kvc::seq_id id) {
  sequence_snapshot s;
  s.id = id;
  s.live = cache.contains(id);
  if (!s.live) return s;
  for (int l = 0; l < cache.shape().num_layers; ++l)
    for (int h = 0; h < cache.shape().num_kv_heads; ++h) s.streams.push_back(snapshot_stream(cache, id, l, h));
  auto st = cache.stats(id);
  if (st.ok()) s.stats = *st;
  return s;
}

template <class Cache>
cache_snapshot snapshot(const Cache& cache, const std::vector<kvc::seq_id>& ids) {
  cache_snapshot s;
  for (kvc::seq_id id : ids) s.sequences.push_back(snapshot_sequence(cache, id));
  s.stats = cache.stats();
  return s;
}

namespace detail {

template <class T>
bool same_bytes(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

inline std::string stream_diff(const stream_snapshot& a, const stream_snapshot& b, bool refcounts = true) {
  if (!same_bytes(a.keys, b.keys)) return "keys";
  if (!same_bytes(a.values, b.values)) return "values";
  if (!same_bytes(a.positions, b.positions)) return "positions";
  if (!same_bytes(a.log_weights, b.log_weights)) return "log-weights";
  if (a.pages != b.pages) return "page ids";
  if (refcounts && a.refcounts != b.refcounts) return "page refcounts";
  if (a.page_tokens != b.page_tokens) return "page token counts";
  if (a.sealed != b.sealed) return "sealed flags";
  if (a.appended != b.appended) return "appended count";
  return "";
}

inline std::string stats_diff(const kvc::sequence_stats& a, const kvc::sequence_stats& b) {
  if (a.stream_tokens != b.stream_tokens || a.stream_appended != b.stream_appended) return "stream counts";
  if (a.tokens_retained != b.tokens_retained || a.tokens_appended != b.tokens_appended) return "token totals";
  if (a.open_pages != b.open_pages || a.sealed_pages != b.sealed_pages) return "page counts";
  if (a.bytes != b.bytes || a.dense_f16_bytes != b.dense_f16_bytes) return "bytes";
  return "";
}

inline std::string stats_diff(const kvc::cache_stats& a, const kvc::cache_stats& b) {
  std::ostringstream o;
  if (a.capacity_bytes != b.capacity_bytes) o << " capacity_bytes";
  if (a.bytes_in_use != b.bytes_in_use) o << " bytes_in_use";
  if (a.bytes_reserved != b.bytes_reserved) o << " bytes_reserved";
  if (a.open_pages != b.open_pages) o << " open_pages";
  if (a.sealed_pages != b.sealed_pages) o << " sealed_pages";
  if (a.free_slabs != b.free_slabs) o << " free_slabs";
  if (a.total_slabs != b.total_slabs) o << " total_slabs";
  if (a.sequences != b.sequences) o << " sequences";
  if (a.tokens_retained != b.tokens_retained) o << " tokens_retained";
  if (a.tokens_appended != b.tokens_appended) o << " tokens_appended";
  if (a.dense_f16_bytes != b.dense_f16_bytes) o << " dense_f16_bytes";
  return o.str();
}

}  // namespace detail

// Empty when equal, else what differs first (for the failure message). Without
// `refcounts`, page refcounts are left out: they change when another sequence that shares
// the page lets go of it.
inline std::string sequence_diff(const sequence_snapshot& a, const sequence_snapshot& b, bool refcounts = true) {
  if (a.id != b.id) return "different sequence ids";
  if (a.live != b.live) return "liveness";
  if (a.streams.size() != b.streams.size()) return "stream count";
  for (std::size_t i = 0; i < a.streams.size(); ++i) {
    const std::string d = detail::stream_diff(a.streams[i], b.streams[i], refcounts);
    if (!d.empty()) return "stream " + std::to_string(i) + ": " + d;
  }
  const std::string d = detail::stats_diff(a.stats, b.stats);
  return d.empty() ? "" : "sequence stats: " + d;
}

inline std::string snapshot_diff(const cache_snapshot& a, const cache_snapshot& b) {
  if (a.sequences.size() != b.sequences.size()) return "sequence count";
  for (std::size_t i = 0; i < a.sequences.size(); ++i) {
    const std::string d = sequence_diff(a.sequences[i], b.sequences[i]);
    if (!d.empty()) return "sequence #" + std::to_string(i) + ": " + d;
  }
  const std::string d = detail::stats_diff(a.stats, b.stats);
  return d.empty() ? "" : "cache stats:" + d;
}

}  // namespace kvc_ref
