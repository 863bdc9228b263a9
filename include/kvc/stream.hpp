// kvc/stream.hpp: what a policy sees of one stream at compress time.
//
// A stream is the ordered tokens one sequence retains for one (layer, kv_head). Before
// a policy runs, the container copies the fields it asks for out of the pages into
// contiguous workspace memory, keys and values dequantized to float.
#pragma once

#include <cstdint>

#include <Eigen/Core>

#include "kvc/config.hpp"
#include "kvc/version.hpp"

KVC_NAMESPACE_BEGIN

// What a policy needs loaded besides positions and log-weights, which always are: keys
// and values (dequantized), the observed queries of the KV head's group, and the tracked
// attention statistics. Combine with |.
enum class stream_fields : unsigned {
  none = 0,
  keys = 1,
  values = 2,
  keys_and_values = 3,
  queries = 4,     // needs cache_config::observe.query_window > 0
  attention = 8,   // needs cache_config::observe.track_attention
  key_norms = 16,  // kept by the cache with cache_config::observe.key_norms, else computed from the stored keys
};

constexpr stream_fields operator|(stream_fields a, stream_fields b) noexcept {
  return static_cast<stream_fields>(static_cast<unsigned>(a) | static_cast<unsigned>(b));
}

constexpr bool has_field(stream_fields set, stream_fields f) noexcept {
  return (static_cast<unsigned>(set) & static_cast<unsigned>(f)) != 0;
}

using row_matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using const_row_map = Eigen::Map<const row_matrix>;

struct stream_info {
  int layer = 0;
  int kv_head = 0;
  int n_tokens = 0;  // retained tokens
};

struct stream_data {
  const model_shape* shape = nullptr;
  stream_info info;
  const std::int32_t* positions = nullptr;  // [n_tokens], strictly increasing
  const float* log_weights = nullptr;       // [n_tokens]
  const float* keys = nullptr;              // [n_tokens][head_dim] post-RoPE, or nullptr if not requested
  const float* values = nullptr;            // [n_tokens][head_dim], or nullptr if not requested

  // stream_fields::queries: the last observed queries of this KV head's query group, oldest
  // first, as attend() received them (after RoPE, at their positions).
  const float* queries = nullptr;                 // [n_queries][group_size][head_dim]
  const std::int32_t* query_positions = nullptr;  // [n_queries]
  int n_queries = 0;

  // stream_fields::attention, per retained token, each averaged over the query group:
  const float* attention_sum = nullptr;    // [n_tokens] attention summed over every query that attended it
  const float* attention_count = nullptr;  // [n_tokens] how many queries could see it (position <= theirs)
  const float* last_attention = nullptr;   // [n_tokens] the latest attend() call's last query's attention

  // ||k_i||_2 per retained token. With cache_config::observe.key_norms the cache keeps them
  // since append (of the key as appended) and sets this for every policy; otherwise it is
  // set only for stream_fields::key_norms, computed at load from the stored (decoded) keys.
  const float* key_norms = nullptr;  // [n_tokens]

  const rope_spec* rope = nullptr;  // the model's RoPE, from cache_config

  int size() const noexcept { return info.n_tokens; }
  int head_dim() const noexcept { return shape->head_dim; }
  const_row_map key_matrix() const noexcept { return const_row_map(keys, info.n_tokens, shape->head_dim); }
  const_row_map value_matrix() const noexcept { return const_row_map(values, info.n_tokens, shape->head_dim); }
  int group_size() const noexcept { return shape->group_size(); }
  // Observed query j for query head g of the group (0 <= g < group_size()).
  const float* query(int j, int g) const noexcept {
    return queries +
           (static_cast<std::size_t>(j) * static_cast<std::size_t>(group_size()) + static_cast<std::size_t>(g)) *
               static_cast<std::size_t>(shape->head_dim);
  }
};

KVC_NAMESPACE_END
