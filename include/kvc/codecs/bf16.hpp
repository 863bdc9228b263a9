// kvc/codecs/bf16.hpp: bfloat16 pages. Bytes per token per head: 2 * head_dim
// (256 at head_dim 128). Same range as float, 8 significant bits.
//
// Error bound per element, round to nearest even: |x~ - x| <= 2^-8 |x| in the normal
// range, <= 2^-134 below it. Magnitudes above 3.3895e38 do not fit.
#pragma once

#include <cstdint>

#include "kvc/codecs/codec.hpp"
#include "kvc/detail/half.hpp"

KVC_NAMESPACE_BEGIN
namespace codec {

struct bf16 : detail::row_codec<bf16, std::uint16_t> {
  static constexpr const char* name = "bf16";
  static constexpr bool identity = false;
  static constexpr detail::element_type elements = detail::element_type::bf16;  // read in place by attend()
  static constexpr double relative_error = 1.0 / 256.0;                         // 2^-8
  static constexpr double absolute_error = 4.591774807899561e-41;               // 2^-134
  static constexpr float max_abs = 3.3895313892515355e38f;                      // largest finite bf16

  static void encode_span(const float* src, std::uint16_t* dst, std::size_t n) noexcept {
    detail::float_to_bf16(src, dst, n);
  }
  static void decode_span(const std::uint16_t* src, float* dst, std::size_t n) noexcept {
    detail::bf16_to_float(src, dst, n);
  }
};

}  // namespace codec
KVC_NAMESPACE_END
