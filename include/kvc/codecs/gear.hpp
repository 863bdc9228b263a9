// kvc/codecs/gear.hpp: codec::gear<Base>, a quantized page codec with GEAR's residual
// correction (Kang et al. 2024, "GEAR: An Efficient KV Cache Compression Recipe for
// Near-Lossless Generative Inference of LLM", Sec. 3 and Algorithm 1).
//
//   codec::gear<Base, OutlierPerMille = 20, Rank = 2, Steps = 3>
//
// Base is a page codec (kivi_channel, kivi_token, int8, ...) or a codec pair:
// gear<kivi<2>> has key = gear<kivi_channel<2>> and value = gear<kivi_token<2>>, so
// paged_kv_cache<gear<kivi<2>>> is paged_kv_cache<kivi<2>> with the correction on both.
//
// Sealing a page X [P][d] (P = page_tokens; rows [n, P) are zero when fewer are encoded)
// stores Base's page D^ = dequant(quant(X)) and corrects its residual E = X - D^ by a sparse
// part S (the s P d entries of E largest in magnitude, s = OutlierPerMille / 1000, each as
// index and binary16 value) and a low-rank part A B^T of rank r = Rank fitted to E - S by
// Steps steps of subspace (power) iteration; detail/gear.hpp has the fit. The decoded page is
//
//   X~ = D^ + S + A B^T            (GEAR Sec. 3: quantized backbone + low-rank + sparse)
//
// and |X~ - X|_F <= |D^ - X|_F for every page, up to float rounding: the correction never
// makes a page worse than Base alone. GEAR picks the outliers from X before quantizing;
// here they come from the residual, so Base's page is exactly Base's (detail/gear.hpp).
// The residual is taken in the space Base decodes to: for rotated keys (rotation::hadamard)
// that is the original space, D^ already rotated back, so the raw query meets S and A B^T.
//
// Page layout: Base's page_bytes, padded to 8 bytes, then the correction of detail/gear.hpp
// for a [P][d] block: k = ceil(s P d) indices (2 bytes when P d <= 65536, else 4) and k
// binary16 values, A [P][r] and B^T [r][d] in binary16. The sizes are fixed per page, also
// for pages re-encoded with fewer rows. page_bytes is exact and the cache's stats() counts it.
//
// Bytes per token per head (P = page_tokens, d = head_dim, k = ceil(s P d), index 2 or 4):
//   gear<Base>: Base's page padded to 8 bytes, then (k (index + 2) + 2 r (P + d)) / P
// e.g. the correction alone, s = 2%, r = 2:
//                    d = 64         d = 128
//   P = 16           25.25          46.25
//   P = 64           13.125         22.25
// and whole codecs (codes, scales and zero points, outliers, low-rank factors), without the
// cache's 64-byte page alignment:
//                               d = 64, P = 16 / 64      d = 128, P = 16 / 64
//   gear<kivi_channel<2>>        57.25 / 33.125          110.25 / 62.25
//   gear<kivi_token<2>>          49.25 / 37.125           94.25 / 70.25
//   gear<kivi_channel<4>>        73.25 / 49.125          142.25 / 94.25
//   gear<kivi_token<4>>          65.25 / 53.125          126.25 / 102.25
//   gear<int8>                   93.25 / 81.125          178.25 / 154.25
// (Base alone at d = 128, P = 64: kivi_channel<2> 40, kivi_token<2> 48; quantized.hpp.) The
// correction costs more per token on small pages: it is per page.
//
// Encoding needs float scratch, encode_scratch_floats(P, d) = P d for E plus the fit's own
// (detail::gear_scratch_floats): gear provides only the scratch form of encode
// (codec.hpp); paged_kv_cache owns the buffer. The correction is per page, so rows cannot
// move alone (token_granular = false): compaction decodes the kept rows (D^ + S + A B^T)
// and encodes them afresh, Base's parameters and the fit both.
//
// Attention reads the codes (fused, when Base is): Base's prepare_queries, key_logits and
// accumulate_values, plus the correction's terms from the page,
//
//   q . k~_t  = (Base's logit) + q . S_t + (B^T q) . A_t
//   sum_t p_t v~_t = (Base's sum) + sum_t p_t S_t + (sum_t p_t A_t) B^T
//
// with q and B^T q kept in bias after Base's own bias_floats (which gear treats as opaque).
//
// Error contract: relative_error 0, absolute_error +inf, as for Base; the bound is the
// Frobenius one above. max_abs is Base's, capped at 2^64 so that every float of the fit stays
// finite (|E|_F <= sqrt(P d) 2 max_abs); inputs beyond it are rejected like Base's.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "kvc/codecs/codec.hpp"
#include "kvc/codecs/detail/gear.hpp"
#include "kvc/codecs/quantized.hpp"
#include "kvc/config.hpp"
#include "kvc/detail/attention.hpp"
#include "kvc/detail/half.hpp"
#include "kvc/version.hpp"

KVC_NAMESPACE_BEGIN
namespace codec {

template <class Base, int OutlierPerMille = 20, int Rank = 2, int Steps = 3>
struct gear;

}  // namespace codec

namespace detail {
namespace gcodec {

// "gear<" + name + ">" as a constant string.
template <class Inner>
struct name_of {
  static constexpr text<length(Inner::name) + 7> value = wrapped_name<length(Inner::name) + 7>("gear<", Inner::name);
};

constexpr gear_params make_params(int per_mille, int rank, int steps) noexcept {
  gear_params p;
  p.outlier_fraction = static_cast<float>(per_mille) / 1000.0f;
  p.rank = rank;
  p.iters = steps;
  return p;
}

// Query rows and tokens per fused call (codec.hpp: nq <= 8, T <= 64).
inline constexpr int max_queries = 8;
inline constexpr int max_tokens = 64;

// The correction's sections inside a page.
struct correction {
  gear_sections s;
  const std::byte* idx;
  const std::uint16_t* values;  // binary16, [k]
  const std::uint16_t* a;       // binary16, [P][r]
  const std::uint16_t* bt;      // binary16, [r][d]
};

// A codec pair: each half gets the correction.
template <class Pair, int O, int R, int S>
struct pair_of {
  using key = codec::gear<typename Pair::key, O, R, S>;
  using value = codec::gear<typename Pair::value, O, R, S>;
  static constexpr const char* name = name_of<Pair>::value.c;
};

template <class Base, int OutlierPerMille, int Rank, int Steps>
struct page_codec {
  static_assert(is_codec_v<Base>, "codec::gear: Base must be a page codec or a codec pair (codec.hpp)");
  static_assert(OutlierPerMille >= 0 && OutlierPerMille <= 1000, "codec::gear: OutlierPerMille outside [0, 1000]");
  static_assert(Rank >= 0 && Rank <= 64, "codec::gear: Rank outside [0, 64]");
  static_assert(Steps >= 0, "codec::gear: Steps must be >= 0");
  static_assert(grids_v<Base> == 1,
                "codec::gear: Base keeps more than one key grid a page (kivi_channel's Grids), which gear cannot use: "
                "it encodes every changed page afresh; use Grids = 1");

  using base = Base;
  static constexpr gear_params params = make_params(OutlierPerMille, Rank, Steps);
  static constexpr int rank = Rank;
  static constexpr const char* name = name_of<Base>::value.c;
  static constexpr bool identity = false;
  static constexpr bool token_granular = false;  // the correction belongs to the whole page
  static constexpr bool fused = fused_v<Base>;
  static constexpr double relative_error = 0.0;
  static constexpr double absolute_error = std::numeric_limits<double>::infinity();
  static constexpr float max_abs = Base::max_abs < 0x1p64f ? Base::max_abs : 0x1p64f;

  static std::size_t correction_offset(int page_tokens, int d) noexcept {
    return qcodec::align8(Base::page_bytes(page_tokens, d));
  }
  static std::size_t page_bytes(int page_tokens, int d) noexcept {
    return correction_offset(page_tokens, d) + gear_bytes(page_tokens, d, params);
  }
  static std::size_t encode_scratch_floats(int page_tokens, int d) noexcept {
    const std::size_t own = static_cast<std::size_t>(page_tokens) * static_cast<std::size_t>(d) +
                            gear_scratch_floats(page_tokens, d, params);
    const std::size_t inner = encode_scratch_floats_of<Base>(page_tokens, d);
    return own > inner ? own : inner;
  }

  // Rows [0, n) of a page from float [n][d]: Base's encoding, then the fit of its residual
  // over the whole [P][d] block (rows [n, P) zero).
  static void encode(const float* src, int n, int d, int page_tokens, std::byte* page, float* scratch) noexcept {
    encode_page<Base>(src, n, d, page_tokens, page, scratch);
    if (gear_bytes(page_tokens, d, params) == 0) return;
    const std::size_t rows = static_cast<std::size_t>(n) * static_cast<std::size_t>(d);
    const std::size_t block = static_cast<std::size_t>(page_tokens) * static_cast<std::size_t>(d);
    float* e = scratch;
    Base::decode(page, 0, n, d, page_tokens, e);
    for (std::size_t i = 0; i < rows; ++i) e[i] = src[i] - e[i];
    for (std::size_t i = rows; i < block; ++i) e[i] = 0.0f;
    gear_fit(e, page_tokens, d, params, scratch + block, page + correction_offset(page_tokens, d));
  }
  static void decode(const std::byte* page, int first, int n, int d, int page_tokens, float* dst) noexcept {
    Base::decode(page, first, n, d, page_tokens, dst);
    gear_apply_rows(page + correction_offset(page_tokens, d), page_tokens, d, params, first, n, dst);
  }
  static const float* rows_f32(const std::byte* page, int first, int n, int d, int page_tokens,
                               float* scratch) noexcept {
    decode(page, first, n, d, page_tokens, scratch);
    return scratch;
  }
  // Not token granular: the cache re-encodes pages whose rows change.
  static void copy_rows(const std::byte*, int, std::byte*, int, int, int, int) noexcept {}

  // ---------------------------------------------------------------- fused attention
  // Present when Base has the member. bias: Base's nq Base::bias_floats(d) floats, then per
  // query row the raw query [d] and B^T q [r].

  template <class B = Base>
  static constexpr auto bias_floats(int d) noexcept -> decltype(B::bias_floats(d)) {
    return B::bias_floats(d) + d + Rank;
  }
  // Base's kernels give its logits and values; the correction terms are float.
  template <class B = Base>
  static constexpr auto integer_attention(int d) noexcept -> decltype(B::integer_attention(d)) {
    return B::integer_attention(d);
  }

  template <class B = Base>
  static auto prepare_queries(const std::byte* page, int d, int page_tokens, const float* const* q, int nq, float* w,
                              float* bias) noexcept
      -> decltype(B::prepare_queries(page, d, page_tokens, q, nq, w, bias)) {
    B::prepare_queries(page, d, page_tokens, q, nq, w, bias);
    float* extra = bias + static_cast<std::size_t>(nq) * static_cast<std::size_t>(B::bias_floats(d));
    const std::size_t stride = static_cast<std::size_t>(d) + Rank;
    for (int g = 0; g < nq; ++g) std::memcpy(extra + g * stride, q[g], sizeof(float) * static_cast<std::size_t>(d));
    if constexpr (Rank > 0) {
      const correction c = sections(page, page_tokens, d);
      alignas(32) float bt[max_head_dim];
      for (int j = 0; j < Rank; ++j) {
        half_to_float(c.bt + static_cast<std::size_t>(j) * d, bt, static_cast<std::size_t>(d));
        for (int g = 0; g < nq; ++g) extra[g * stride + d + j] = dot(bt, extra + g * stride, d);
      }
    }
  }

  template <class B = Base>
  static auto key_logits(const std::byte* page, int first, int T, int d, int page_tokens, const float* w,
                         const float* bias, int nq, float* out) noexcept
      -> decltype(B::key_logits(page, first, T, d, page_tokens, w, bias, nq, out)) {
    B::key_logits(page, first, T, d, page_tokens, w, bias, nq, out);
    const float* extra = bias + static_cast<std::size_t>(nq) * static_cast<std::size_t>(B::bias_floats(d));
    const std::size_t stride = static_cast<std::size_t>(d) + Rank;
    const correction c = sections(page, page_tokens, d);
    if constexpr (Rank > 0) {
      float a[max_tokens * Rank];
      half_to_float(c.a + static_cast<std::size_t>(first) * Rank, a, static_cast<std::size_t>(T) * Rank);
      for (int g = 0; g < nq; ++g) {
        const float* bq = extra + g * stride + d;
        for (int t = 0; t < T; ++t) {
          float v = 0.0f;
          for (int j = 0; j < Rank; ++j) v += a[t * Rank + j] * bq[j];
          out[g * T + t] += v;
        }
      }
    }
    for_outliers(c, first, T, d, [&](int t, int ch, float v) {
      for (int g = 0; g < nq; ++g) out[g * T + t] += v * extra[g * stride + static_cast<std::size_t>(ch)];
    });
  }

  template <class B = Base>
  static auto accumulate_values(const std::byte* page, int first, int T, int d, int page_tokens, const float* p, int nq,
                                float* acc) noexcept
      -> decltype(B::accumulate_values(page, first, T, d, page_tokens, p, nq, acc)) {
    B::accumulate_values(page, first, T, d, page_tokens, p, nq, acc);
    const correction c = sections(page, page_tokens, d);
    if constexpr (Rank > 0) {
      float a[max_tokens * Rank], pa[max_queries * Rank];
      half_to_float(c.a + static_cast<std::size_t>(first) * Rank, a, static_cast<std::size_t>(T) * Rank);
      for (int g = 0; g < nq; ++g)
        for (int j = 0; j < Rank; ++j) {
          float v = 0.0f;
          for (int t = 0; t < T; ++t) v += p[g * T + t] * a[t * Rank + j];
          pa[g * Rank + j] = v;
        }
      alignas(32) float bt[max_head_dim];
      for (int j = 0; j < Rank; ++j) {
        half_to_float(c.bt + static_cast<std::size_t>(j) * d, bt, static_cast<std::size_t>(d));
        for (int g = 0; g < nq; ++g) {
          const float s = pa[g * Rank + j];
          float* o = acc + static_cast<std::size_t>(g) * d;
          if (s != 0.0f)
            for (int ch = 0; ch < d; ++ch) o[ch] += s * bt[ch];
        }
      }
    }
    for_outliers(c, first, T, d, [&](int t, int ch, float v) {
      for (int g = 0; g < nq; ++g) acc[static_cast<std::size_t>(g) * d + ch] += p[g * T + t] * v;
    });
  }

 private:
  static correction sections(const std::byte* page, int page_tokens, int d) noexcept {
    correction c;
    c.s = gear_sections_of(page_tokens, d, params);
    c.idx = page + correction_offset(page_tokens, d);
    c.values = reinterpret_cast<const std::uint16_t*>(c.idx + c.s.values);
    c.a = reinterpret_cast<const std::uint16_t*>(c.idx + c.s.a);
    c.bt = reinterpret_cast<const std::uint16_t*>(c.idx + c.s.bt);
    return c;
  }

  // f(t, channel, value) for the stored outliers of rows [first, first + T), t from first.
  template <class F>
  static void for_outliers(const correction& c, int first, int T, int d, F&& f) noexcept {
    const std::size_t ud = static_cast<std::size_t>(d);
    const std::size_t lo = static_cast<std::size_t>(first) * ud, hi = lo + static_cast<std::size_t>(T) * ud;
    for (std::size_t e = gear_first_index(c.idx, c.s.index_bytes, c.s.k, lo); e < c.s.k; ++e) {
      const std::size_t i = gear_load_index(c.idx + e * c.s.index_bytes, c.s.index_bytes);
      if (i >= hi) break;
      f(static_cast<int>((i - lo) / ud), static_cast<int>((i - lo) % ud), half_to_float_scalar(c.values[e]));
    }
  }
};

}  // namespace gcodec
}  // namespace detail

namespace codec {

// GEAR over Base (see the file comment); a codec pair gives a pair of corrected codecs.
template <class Base, int OutlierPerMille, int Rank, int Steps>
struct gear : std::conditional_t<detail::is_codec_pair<Base>::value,
                                 detail::gcodec::pair_of<Base, OutlierPerMille, Rank, Steps>,
                                 detail::gcodec::page_codec<Base, OutlierPerMille, Rank, Steps>> {};

}  // namespace codec
KVC_NAMESPACE_END
