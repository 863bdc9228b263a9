// kvc/codecs/f16.hpp: IEEE binary16 pages. Bytes per token per head: 2 * head_dim
// (256 at head_dim 128), half of f32.
//
// Error bound per element, round to nearest even: |x~ - x| <= 2^-11 |x| in the normal
// range (|x| >= 2^-14) and <= 2^-25 below it. Magnitudes above 65504 do not fit:
// append rejects them with status_code::out_of_range.
#pragma once

#include <cstdint>

#include "kvc/codecs/codec.hpp"
#include "kvc/detail/half.hpp"

KVC_NAMESPACE_BEGIN
namespace codec {

struct f16 : detail::row_codec<f16, std::uint16_t> {
  static constexpr const char* name = "f16";
  static constexpr bool identity = false;
  static constexpr detail::element_type elements = detail::element_type::f16;  // read in place by attend()
  static constexpr double relative_error = 1.0 / 2048.0;                       // 2^-11
  static constexpr double absolute_error = 2.98023223876953125e-08;            // 2^-25
  static constexpr float max_abs = 65504.0f;

  static void encode_span(const float* src, std::uint16_t* dst, std::size_t n) noexcept {
    detail::float_to_half(src, dst, n);
  }
  static void decode_span(const std::uint16_t* src, float* dst, std::size_t n) noexcept {
    detail::half_to_float(src, dst, n);
  }
};

}  // namespace codec
KVC_NAMESPACE_END
