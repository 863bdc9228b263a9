// kvc/codecs/f32.hpp: full-precision pages. Bytes per token per head: 4 * head_dim
// (512 at head_dim 128). Sealing an f32 page moves no data.
#pragma once

#include <cfloat>
#include <cstring>

#include "kvc/codecs/codec.hpp"

KVC_NAMESPACE_BEGIN
namespace codec {

struct f32 : detail::row_codec<f32, float> {
  static constexpr const char* name = "f32";
  static constexpr bool identity = true;
  static constexpr detail::element_type elements = detail::element_type::f32;  // read in place by attend()
  static constexpr double relative_error = 0.0;
  static constexpr double absolute_error = 0.0;
  static constexpr float max_abs = FLT_MAX;

  static void encode_span(const float* src, float* dst, std::size_t n) noexcept {
    if (src != dst) std::memcpy(dst, src, n * sizeof(float));
  }
  static void decode_span(const float* src, float* dst, std::size_t n) noexcept {
    std::memcpy(dst, src, n * sizeof(float));
  }
};

}  // namespace codec
KVC_NAMESPACE_END
