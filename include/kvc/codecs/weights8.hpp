// kvc/codecs/weights8.hpp: codec::weights8<Base>, Base's pages and bytes with attention that
// multiplies the codes by 8-bit weights.
//
//   codec::weights8<Base>
//
// Base is a low-bit codec whose fused members take the weight precision (kivi_channel,
// kivi_token; quantized.hpp) or a pair of them: weights8<kivi<2>> has key =
// weights8<kivi_channel<2>> and value = weights8<kivi_token<2>>, so
// paged_kv_cache<weights8<kivi<2>>> stores exactly what paged_kv_cache<kivi<2>> stores.
// Encoding, decoding, compaction, stats() and the error of the stored rows are Base's.
//
// What changes is attend(). Base rounds the query times the key scales, and the attention
// weights times the value scales, to 16-bit integers and multiplies them with the codes by
// VPMADDWD (sixteen products an instruction). weights8 rounds them to 8-bit integers instead
// and multiplies by VPMADDUBSW, 32 products an instruction (detail/code_kernels.hpp, "Byte
// kernels"). This is how llama.cpp and others multiply 4-bit weights: with activations
// rounded to 8 bits. It runs with AVX2 for 2- and 4-bit codes at head_dim a multiple of 32
// up to 256 (value groups a multiple of 32); elsewhere (3- and 8-bit codes, other head_dims,
// no AVX2) weights8<Base> computes exactly what Base computes.
//
// Cost in precision: a logit is off by at most (max_c |q_c s_c| / 254) sum_c code_c, and a
// weighted sum of values by (max_t |p_t s_t| / 254) sum_t code_t per chunk of 64 tokens:
// 2^-8 of the largest term per code unit, where Base is off by 2^-16. Measured on Gaussian
// keys and values (tests/test_quantized.cpp), this moves attention outputs by 0.02 to 0.04
// relative to attention over the decoded rows, which adds 4.5% to kivi<4>'s attention error
// against unquantized keys and values (0.095 -> 0.099) and 0.2% to kivi<2>'s (0.47). The
// kernels take 0.5x to 1.0x the time of Base's (the keys about 0.6x): bench/README.md,
// "Quantized attend".
#pragma once

#include <cstddef>
#include <type_traits>

#include "kvc/codecs/codec.hpp"
#include "kvc/codecs/quantized.hpp"
#include "kvc/version.hpp"

KVC_NAMESPACE_BEGIN
namespace codec {

template <class Base>
struct weights8;

}  // namespace codec

namespace detail {
namespace w8codec {

template <class T, class = void>
struct has_key_logits8 : std::false_type {};
template <class T>
struct has_key_logits8<
    T, std::void_t<decltype(T::template key_logits<8>(nullptr, 0, 0, 1, 1, nullptr, nullptr, 0, nullptr))>>
    : std::true_type {};
template <class T, class = void>
struct has_accumulate_values8 : std::false_type {};
template <class T>
struct has_accumulate_values8<
    T, std::void_t<decltype(T::template accumulate_values<8>(nullptr, 0, 0, 1, 1, nullptr, 0, nullptr))>>
    : std::true_type {};

template <class Inner>
struct name_of {
  static constexpr text<length(Inner::name) + 11> value =
      wrapped_name<length(Inner::name) + 11>("weights8<", Inner::name);
};

template <class Pair>
struct pair_of {
  using key = codec::weights8<typename Pair::key>;
  using value = codec::weights8<typename Pair::value>;
  static constexpr const char* name = name_of<Pair>::value.c;
};

template <class Base>
struct page_codec : Base {
  static_assert(is_codec_v<Base>, "codec::weights8: Base must be a page codec or a codec pair (codec.hpp)");
  static_assert(has_key_logits8<Base>::value || has_accumulate_values8<Base>::value,
                "codec::weights8: Base's fused attention must take the weight precision "
                "(kivi_channel, kivi_token or a pair of them)");
  using base = Base;
  static constexpr const char* name = name_of<Base>::value.c;
  static constexpr int weight_bits = 8;

  template <class B = Base>
  static auto key_logits(const std::byte* page, int first, int T, int d, int page_tokens, const float* w,
                         const float* bias, int nq, float* out) noexcept
      -> decltype(B::template key_logits<8>(page, first, T, d, page_tokens, w, bias, nq, out)) {
    B::template key_logits<8>(page, first, T, d, page_tokens, w, bias, nq, out);
  }
  template <class B = Base>
  static auto accumulate_values(const std::byte* page, int first, int T, int d, int page_tokens, const float* p, int nq,
                                float* acc) noexcept
      -> decltype(B::template accumulate_values<8>(page, first, T, d, page_tokens, p, nq, acc)) {
    B::template accumulate_values<8>(page, first, T, d, page_tokens, p, nq, acc);
  }
};

}  // namespace w8codec
}  // namespace detail

namespace codec {

// Base with 8-bit attention weights (see the file comment); a codec pair gives a pair.
template <class Base>
struct weights8 : std::conditional_t<detail::is_codec_pair<Base>::value, detail::w8codec::pair_of<Base>,
                                     detail::w8codec::page_codec<Base>> {};

}  // namespace codec
KVC_NAMESPACE_END
