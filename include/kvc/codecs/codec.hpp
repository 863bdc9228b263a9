// kvc/codecs/codec.hpp: what a page codec is, and the shared base of codecs that
// store each token's row independently.
//
// A codec says how the key (or value) payload of a sealed page is stored. The open
// (newest) page of a stream is always float; sealing encodes it with the codec.
// A codec is a type with static members only:
//
//   name                          printable name
//   identity                      true when the sealed payload is the open float layout
//   token_granular                true when one token's row can move between pages as bytes
//   relative_error, absolute_error  per element, |decode(encode(x)) - x| <= rel*|x| + abs
//   max_abs                       the largest magnitude the codec can represent
//   page_bytes(page_tokens, head_dim)                  payload bytes of one sealed page
//   encode(src, n, head_dim, page_tokens, page)        rows [0, n) of a page from float [n][head_dim]
//        (or the form with scratch, below)
//   decode(page, first, n, head_dim, page_tokens, dst) rows [first, first + n) into float [n][head_dim]
//   rows_f32(page, first, n, head_dim, page_tokens, scratch)
//        float rows [first, first + n): a pointer into the page when identity, else
//        decoded into scratch ([n][head_dim]) and scratch returned
//   copy_rows(src, src_first, dst, dst_first, n, head_dim, page_tokens)
//        moves encoded rows between pages (or within one, towards lower slots)
//
// Optional:
//   elements                      a detail::element_type other than none when the sealed
//        payload is plain [page_tokens][head_dim] elements of that type: attend() then
//        reads the rows in place (converting in registers) instead of calling rows_f32
//   fused = true, with                attend() computes from the page's codes directly:
//        prepare_queries(page, head_dim, page_tokens, q, nq, w, bias)   once per page for nq <= 8
//                                       query rows q[g] (w [nq][head_dim], bias nq bias_floats(head_dim)
//                                       floats, laid out as the codec chooses)
//        key_logits(page, first, T, head_dim, page_tokens, w, bias, nq, out)
//                                       out[g * T + t] = q_g . k~_{first + t}, T <= 64
//        accumulate_values(page, first, T, head_dim, page_tokens, p, nq, acc)
//                                       acc[g * head_dim + c] += sum_t p[g * T + t] v~_{first + t, c}, T <= 64
//        bias_floats(head_dim)          constexpr, not decreasing in head_dim: the cache sizes
//                                       bias for max_head_dim
//        integer_attention(head_dim)    constexpr, optional: true where these members round
//                                       the query rows times the key scales, or the weights
//                                       times the value scales, to 16-bit integers (the integer
//                                       code kernels; detail::integer_attention_v says false
//                                       without it)
//        key_logits<WeightBits>, accumulate_values<WeightBits>
//                                       optional: the same members as templates over the
//                                       precision of those weights (16 or 8; default 16), which
//                                       codec::weights8 (weights8.hpp) calls with 8
//   token_granular = false            rows of a sealed page cannot move alone (they share
//        parameters): compaction decodes the kept rows of each changed page and encodes
//        them again, with reencode when the codec has it (copy_rows is then never called)
//   reencode(rows, n, head_dim, page_tokens, sources, n_sources, origin, page)
//        with token_granular = false: compaction calls it instead of encode for a page whose
//        rows changed, so a codec can keep the parameters of groups that did not change and
//        move their codes as they are (kivi_channel). rows [n][head_dim] are the kept rows,
//        decoded, in scratch the codec may overwrite; sources[0..n_sources) are the key (or
//        value) payloads of up to detail::max_reencode_sources pages they came from, and
//        origin[i] says that row i was row origin[i].row of sources[origin[i].source]
//        (source -1: a page not passed). A source may be `page` itself, intact until the
//        codec writes it; a row of `page` moves to a slot at or before its own
//        (origin[i].row >= i there)
//   key, value                        member types: a codec pair (codec::kivi) whose `key`
//        type is used when it is paged_kv_cache's key codec and `value` when it is the
//        value codec
//   encode_scratch_floats(page_tokens, head_dim), with
//        encode(src, n, head_dim, page_tokens, page, scratch)
//                                       a codec whose encoding needs float working memory
//        (codec::gear) takes scratch [encode_scratch_floats(...)] (contents irrelevant) from
//        the caller; it may provide this form instead of the one without scratch. The cache
//        owns one such buffer, sized at create() for its key and value codecs, and encodes
//        under its pool lock (detail::encode_page below; detail::encode_scratch_floats_of).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>

#include "kvc/version.hpp"

KVC_NAMESPACE_BEGIN
namespace detail {

// Element types attend()'s kernel can read straight from a page; see `elements` above.
enum class element_type { none, f32, f16, bf16 };

constexpr std::size_t element_bytes(element_type e) noexcept {
  return e == element_type::f32 ? 4 : e == element_type::none ? 0 : 2;
}

template <class T, class = void>
struct elements_of : std::integral_constant<element_type, element_type::none> {};
template <class T>
struct elements_of<T, std::void_t<decltype(T::elements)>> : std::integral_constant<element_type, T::elements> {};

// T::encode(src, n, head_dim, page_tokens, page): encoding without scratch.
template <class T, class = void>
struct plain_encode : std::false_type {};
template <class T>
struct plain_encode<
    T, std::void_t<decltype(T::encode(static_cast<const float*>(nullptr), 0, 1, 1, static_cast<std::byte*>(nullptr)))>>
    : std::true_type {};

// T::encode_scratch_floats(page_tokens, head_dim) and T::encode(..., page, scratch).
template <class T, class = void>
struct scratch_encode : std::false_type {};
template <class T>
struct scratch_encode<T,
                      std::void_t<decltype(T::encode_scratch_floats(1, 1)),
                                  decltype(T::encode(static_cast<const float*>(nullptr), 0, 1, 1,
                                                     static_cast<std::byte*>(nullptr), static_cast<float*>(nullptr)))>>
    : std::true_type {};

template <class T>
inline constexpr bool scratch_encode_v = scratch_encode<T>::value;

// Scratch floats C's encode needs for a page (0 for codecs that need none).
template <class C>
inline std::size_t encode_scratch_floats_of(int page_tokens, int head_dim) noexcept {
  if constexpr (scratch_encode_v<C>) {
    return static_cast<std::size_t>(C::encode_scratch_floats(page_tokens, head_dim));
  } else {
    (void)page_tokens, (void)head_dim;
    return 0;
  }
}

// Encodes rows [0, n) of a page with C, passing scratch (encode_scratch_floats_of floats)
// to codecs that take it.
template <class C>
inline void encode_page(const float* src, int n, int head_dim, int page_tokens, std::byte* page,
                        float* scratch) noexcept {
  if constexpr (scratch_encode_v<C>) {
    C::encode(src, n, head_dim, page_tokens, page, scratch);
  } else {
    (void)scratch;
    C::encode(src, n, head_dim, page_tokens, page);
  }
}

// Where a row handed to a codec's reencode came from: row `row` of its sources[source].
struct row_origin {
  std::int32_t source;
  std::int32_t row;
};

// The most source pages compaction passes to reencode for one page: the first ones its rows
// come from. A round that evicts a tenth of a stream fills each page from two, one that
// evicts two thirds from about three; rows from further pages come with source -1.
inline constexpr int max_reencode_sources = 4;

template <class T, class = void>
struct is_codec_impl : std::false_type {};

template <class T>
struct is_codec_impl<
    T,
    std::void_t<decltype(T::name), decltype(T::identity), decltype(T::token_granular), decltype(T::relative_error),
                decltype(T::absolute_error), decltype(T::max_abs), decltype(T::page_bytes(1, 1)),
                std::enable_if_t<plain_encode<T>::value || scratch_encode<T>::value>,
                decltype(T::decode(static_cast<const std::byte*>(nullptr), 0, 0, 1, 1, static_cast<float*>(nullptr))),
                decltype(T::rows_f32(static_cast<const std::byte*>(nullptr), 0, 0, 1, 1, static_cast<float*>(nullptr))),
                decltype(T::copy_rows(static_cast<const std::byte*>(nullptr), 0, static_cast<std::byte*>(nullptr), 0, 0,
                                      1, 1))>> : std::true_type {};

// Base for codecs whose sealed payload is [page_tokens][head_dim] elements of
// Storage, one independent row per token. Derived provides encode_row_span(src, dst, count)
// and decode_row_span(src, dst, count) over flat element arrays.
template <class Derived, class Storage>
struct row_codec {
  using storage = Storage;
  static constexpr bool token_granular = true;

  static constexpr std::size_t row_bytes(int head_dim) noexcept {
    return static_cast<std::size_t>(head_dim) * sizeof(Storage);
  }
  static constexpr std::size_t page_bytes(int page_tokens, int head_dim) noexcept {
    return static_cast<std::size_t>(page_tokens) * row_bytes(head_dim);
  }
  static void encode(const float* src, int n, int head_dim, int /*page_tokens*/, std::byte* page) noexcept {
    Derived::encode_span(src, reinterpret_cast<Storage*>(page), static_cast<std::size_t>(n) * head_dim);
  }
  static void decode(const std::byte* page, int first, int n, int head_dim, int /*page_tokens*/, float* dst) noexcept {
    Derived::decode_span(reinterpret_cast<const Storage*>(page) + static_cast<std::size_t>(first) * head_dim, dst,
                         static_cast<std::size_t>(n) * head_dim);
  }
  static const float* rows_f32(const std::byte* page, int first, int n, int head_dim, int page_tokens,
                               float* scratch) noexcept {
    if constexpr (Derived::identity) {
      (void)n;
      (void)page_tokens;
      (void)scratch;
      return reinterpret_cast<const float*>(page) + static_cast<std::size_t>(first) * head_dim;
    } else {
      decode(page, first, n, head_dim, page_tokens, scratch);
      return scratch;
    }
  }
  static void copy_rows(const std::byte* src, int src_first, std::byte* dst, int dst_first, int n, int head_dim,
                        int /*page_tokens*/) noexcept {
    if (n <= 0) return;
    std::memmove(dst + static_cast<std::size_t>(dst_first) * row_bytes(head_dim),
                 src + static_cast<std::size_t>(src_first) * row_bytes(head_dim),
                 static_cast<std::size_t>(n) * row_bytes(head_dim));
  }
};

}  // namespace detail

namespace detail {
// T::token_granular for codecs, false for anything else (keeps diagnostics to one message).
template <class T, bool = is_codec_impl<T>::value>
struct token_granular_impl : std::false_type {};
template <class T>
struct token_granular_impl<T, true> : std::bool_constant<T::token_granular> {};
template <class T>
inline constexpr bool token_granular_v = token_granular_impl<T>::value;

// The key grids a page of T holds: T::grids where T has it (kivi_channel), else 1.
template <class T, class = void>
struct grids_impl : std::integral_constant<int, 1> {};
template <class T>
struct grids_impl<T, std::void_t<decltype(T::grids)>> : std::integral_constant<int, T::grids> {};
template <class T>
inline constexpr int grids_v = grids_impl<T>::value;
}  // namespace detail

namespace detail {
// The codec used for keys (values) when C is given as the key (value) codec: C::key
// (C::value) for a codec pair, C itself otherwise.
template <class C, class = void>
struct key_role {
  using type = C;
};
template <class C>
struct key_role<C, std::void_t<typename C::key>> {
  using type = typename C::key;
};
template <class C, class = void>
struct value_role {
  using type = C;
};
template <class C>
struct value_role<C, std::void_t<typename C::value>> {
  using type = typename C::value;
};
template <class C>
using key_role_t = typename key_role<C>::type;
// True when C is a codec pair (has both key and value member types).
template <class C, class = void>
struct is_codec_pair : std::false_type {};
template <class C>
struct is_codec_pair<C, std::void_t<typename C::key, typename C::value>> : std::true_type {};
template <class C>
using value_role_t = typename value_role<C>::type;

// True when T has the optional reencode member (see above).
template <class T, class = void>
struct has_reencode : std::false_type {};
template <class T>
struct has_reencode<T, std::void_t<decltype(T::reencode(
                           static_cast<float*>(nullptr), 0, 1, 1, static_cast<const std::byte* const*>(nullptr), 0,
                           static_cast<const row_origin*>(nullptr), static_cast<std::byte*>(nullptr)))>>
    : std::true_type {};
template <class T>
inline constexpr bool has_reencode_v = has_reencode<T>::value;

template <class T, class = void>
struct fused_impl : std::false_type {};
template <class T>
struct fused_impl<T, std::void_t<decltype(T::fused)>> : std::bool_constant<T::fused> {};
// True when attend() reads T's pages through its fused members.
template <class T>
inline constexpr bool fused_v = fused_impl<T>::value;

template <class T, class = void>
struct has_integer_attention : std::false_type {};
template <class T>
struct has_integer_attention<T, std::void_t<decltype(T::integer_attention(1))>> : std::true_type {};
// True when T's fused attention at head_dim d rounds its weights to 16 bits (see
// integer_attention above); false for codecs without the member.
template <class T>
constexpr bool integer_attention_v(int d) noexcept {
  if constexpr (has_integer_attention<T>::value)
    return T::integer_attention(d);
  else
    return (void)d, false;
}
}  // namespace detail

namespace detail {
// Constant strings, for the names of codec wrappers ("gear<kivi<2>>") and variants.
template <std::size_t N>
struct text {
  char c[N];
};

constexpr std::size_t length(const char* s) noexcept {
  std::size_t n = 0;
  while (s[n] != '\0') ++n;
  return n;
}

// a, b and c one after the other; N = length(a) + length(b) + length(c) + 1.
template <std::size_t N>
constexpr text<N> joined(const char* a, const char* b, const char* c) noexcept {
  text<N> t{};
  std::size_t i = 0;
  for (const char* s : {a, b, c})
    for (std::size_t j = 0; s[j] != '\0'; ++j) t.c[i++] = s[j];
  t.c[i] = '\0';
  return t;
}

// head + inner + ">"; N = length(head) + length(inner) + 2.
template <std::size_t N>
constexpr text<N> wrapped_name(const char* head, const char* inner) noexcept {
  return joined<N>(head, inner, ">");
}
}  // namespace detail

// True when T satisfies the codec interface above.
template <class T>
inline constexpr bool is_codec_v = detail::is_codec_impl<T>::value;

KVC_NAMESPACE_END
