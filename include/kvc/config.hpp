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

struct model_shape {
  int num_layers = 0;
  int num_q_heads = 0;
  int num_kv_heads = 0;  // GQA group = num_q_heads / num_kv_heads
  int head_dim = 0;

  constexpr int group_size() const noexcept { return num_kv_heads > 0 ? num_q_heads / num_kv_heads : 0; }
  constexpr int streams_per_sequence() const noexcept { return num_layers * num_kv_heads; }
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
};

// Scratch that compress() needs for one sequence at max_context with the built-in
// policies: one score and one keep flag per token of every stream, plus one
// stream's keys and values in float, plus a margin for scorer scratch.
inline std::size_t default_workspace_bytes(const cache_config& c) noexcept {
  const std::size_t streams = static_cast<std::size_t>(c.shape.streams_per_sequence());
  const std::size_t ctx = static_cast<std::size_t>(c.max_context);
  const std::size_t d = static_cast<std::size_t>(c.shape.head_dim);
  const std::size_t per_stream = ctx * (sizeof(float) + sizeof(std::uint8_t) + 3 * sizeof(std::int32_t)) + 1024;
  const std::size_t one_stream = ctx * (2 * d + 4) * sizeof(float) + d * d * sizeof(double);
  return streams * per_stream + one_stream + (std::size_t{1} << 20);
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
  if (c.max_context < 1)
    return status::error(status_code::invalid_argument, "cache_config: max_context is %d, must be >= 1", c.max_context);
  return ok_status();
}

KVC_NAMESPACE_END
