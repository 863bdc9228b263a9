// kvc/config.hpp: the model shape and the cache configuration.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kvc/status.hpp"
#include "kvc/version.hpp"

KVC_NAMESPACE_BEGIN

// The largest head_dim and page_tokens kvc accepts; attention keeps per-tile scratch
// of this size on the stack.
inline constexpr int max_head_dim = 512;
inline constexpr int max_page_tokens = 4096;
inline constexpr int max_query_window = 4096;

struct model_shape {
  int num_layers = 0;
  int num_q_heads = 0;
  int num_kv_heads = 0;  // GQA group = num_q_heads / num_kv_heads
  int head_dim = 0;

  constexpr int group_size() const noexcept { return num_kv_heads > 0 ? num_q_heads / num_kv_heads : 0; }
  constexpr int streams_per_sequence() const noexcept { return num_layers * num_kv_heads; }
};

// The model's rotary position embedding, for policies that reason about queries at
// other positions (keys are stored after RoPE). Pair i of the rotated dimensions turns by
// position * theta^(-2i / rotary_dims).
enum class rope_layout {
  half_split,   // pairs (i, i + rotary_dims / 2): GPT-NeoX, Hugging Face Llama
  interleaved,  // pairs (2i, 2i + 1): GPT-J, the original Llama code
};

struct rope_spec {
  double theta = 10000.0;
  int rotary_dims = -1;  // the first rotary_dims dimensions rotate; -1: all of head_dim (even part); 0: no RoPE
  rope_layout layout = rope_layout::half_split;

  constexpr int dims(int head_dim) const noexcept { return rotary_dims < 0 ? head_dim / 2 * 2 : rotary_dims; }
};

// What attend() records for policies; off by default, and free when off.
struct observation_config {
  // The last query_window queries of every (sequence, layer), all query heads, with their
  // positions (SnapKV, TOVA, expected attention, Q-filters). 0: none.
  int query_window = 0;
  // Per retained token: attention summed over the queries that attended it, the number of
  // those queries, and the latest query's attention, each averaged over the KV head's query
  // group (H2O). Costs a second pass over the keys in attend and 12 bytes per token of
  // max_context per stream.
  bool track_attention = false;
  // Per retained token: the L2 norm of its key as appended (full precision, before the
  // page codec rounds it), kept in step with eviction, so that scorers that rank by key
  // norm (K-norm) need not load the keys at compress time. Costs one pass over each
  // appended key and 4 bytes per token of max_context per stream. When off, compress()
  // computes the norms from the stored keys for scorers that ask (stream_fields::key_norms).
  bool key_norms = false;
};

struct cache_config {
  model_shape shape;
  // Tokens per page. Each page belongs to one (sequence, layer, kv_head) stream.
  int page_tokens = 16;
  // Byte capacity of the page pool, allocated once at construction.
  std::size_t capacity_bytes = 0;
  // The most tokens one stream may retain at once. create_sequence() and fork()
  // reserve page tables for this many tokens, so append never grows them.
  int max_context = 32768;
  // Scratch for compress() (scores, keep masks, one stream's dequantized keys and
  // values). 0 sizes it from the shape and max_context; see default_workspace_bytes.
  std::size_t workspace_bytes = 0;
  rope_spec rope;
  observation_config observe;
};

// Scratch that compress() needs for one sequence at max_context with the built-in
// policies: one score and one keep flag per token of every stream, plus one
// stream's keys and values in float, plus a margin for scorer scratch.
inline std::size_t default_workspace_bytes(const cache_config& c) noexcept {
  const std::size_t streams = static_cast<std::size_t>(c.shape.streams_per_sequence());
  const std::size_t ctx = static_cast<std::size_t>(c.max_context);
  const std::size_t d = static_cast<std::size_t>(c.shape.head_dim);
  const std::size_t w = static_cast<std::size_t>(c.observe.query_window);
  const std::size_t per_stream = ctx * (sizeof(float) + sizeof(std::uint8_t) + 3 * sizeof(std::int32_t)) + 1024;
  // One stream loaded: keys, values, positions, log-weights, three attention statistics,
  // key norms, and the observed queries of a whole layer.
  const std::size_t one_stream = ctx * (2 * d + 6) * sizeof(float) + d * d * sizeof(double) +
                                 w * (static_cast<std::size_t>(c.shape.num_q_heads) * d + 1) * sizeof(float);
  // Re-encoding one page's keys and values during compaction (quantized codecs): the rows in
  // float and where each came from (two 32-bit numbers a row), each block 64-byte aligned.
  const std::size_t rebuild = 2 * static_cast<std::size_t>(c.page_tokens) * d * sizeof(float) +
                              8 * static_cast<std::size_t>(c.page_tokens) + 128;
  return streams * per_stream + one_stream + rebuild + (std::size_t{1} << 20);
}

inline status validate(const cache_config& c) noexcept {
  const model_shape& s = c.shape;
  if (s.num_layers < 1)
    return status::error(status_code::invalid_argument, "cache_config: num_layers is %d, must be >= 1", s.num_layers);
  if (s.num_kv_heads < 1)
    return status::error(status_code::invalid_argument, "cache_config: num_kv_heads is %d, must be >= 1",
                         s.num_kv_heads);
  if (s.num_q_heads < 1 || s.num_q_heads % s.num_kv_heads != 0)
    return status::error(status_code::invalid_argument,
                         "cache_config: num_q_heads %d must be a positive multiple of num_kv_heads %d", s.num_q_heads,
                         s.num_kv_heads);
  if (s.head_dim < 1 || s.head_dim > max_head_dim)
    return status::error(status_code::invalid_argument, "cache_config: head_dim %d outside [1, %d]", s.head_dim,
                         max_head_dim);
  if (c.page_tokens < 1 || c.page_tokens > max_page_tokens)
    return status::error(status_code::invalid_argument, "cache_config: page_tokens %d outside [1, %d]", c.page_tokens,
                         max_page_tokens);
  const int rd = c.rope.dims(s.head_dim);
  if (rd < 0 || rd > s.head_dim || rd % 2 != 0)
    return status::error(status_code::invalid_argument,
                         "cache_config: rope.rotary_dims %d must be -1 or an even number in [0, head_dim %d]",
                         c.rope.rotary_dims, s.head_dim);
  if (!(c.rope.theta > 1.0) || !(c.rope.theta < 1e12))
    return status::error(status_code::invalid_argument, "cache_config: rope.theta %g outside (1, 1e12)", c.rope.theta);
  if (c.observe.query_window < 0 || c.observe.query_window > max_query_window)
    return status::error(status_code::invalid_argument, "cache_config: observe.query_window %d outside [0, %d]",
                         c.observe.query_window, max_query_window);
  if (c.max_context < 1)
    return status::error(status_code::invalid_argument, "cache_config: max_context is %d, must be >= 1", c.max_context);
  return ok_status();
}

KVC_NAMESPACE_END
