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

// Which per-token fields a policy needs dequantized. Positions and log-weights are
// always provided.
enum class stream_fields : unsigned { none = 0, keys = 1, values = 2, keys_and_values = 3 };

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

  int size() const noexcept { return info.n_tokens; }
  int head_dim() const noexcept { return shape->head_dim; }
  const_row_map key_matrix() const noexcept { return const_row_map(keys, info.n_tokens, shape->head_dim); }
  const_row_map value_matrix() const noexcept { return const_row_map(values, info.n_tokens, shape->head_dim); }
};

KVC_NAMESPACE_END
