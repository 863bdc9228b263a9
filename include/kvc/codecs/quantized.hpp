// kvc/codecs/quantized.hpp: low-bit page codecs (KIVI, Liu et al., "KIVI: A Tuning-Free
// Asymmetric 2bit Quantization for KV Cache", ICML 2024, Sec. 3-4) and symmetric int8.
//
//   codec::kivi_channel<Bits, R, Grids>
//                                    keys: each channel quantized over the tokens of a sealed
//                                    page (the page is KIVI's group along tokens); with
//                                    Grids > 1 a page that compaction refills keeps up to
//                                    Grids grids, one per run of rows (see Eviction)
//   codec::kivi_token<Bits, Group>   values: each token quantized in groups of Group channels
//   codec::kivi<Bits, Group, R, Grids>
//                                    the pair, for paged_kv_cache<kivi<2>> (keys per channel,
//                                    values per token); key and value widths may differ:
//                                    paged_kv_cache<kivi<2>, kivi<4>> takes the keys of the
//                                    first and the values of the second
//   codec::int8                      symmetric, one float scale per (token, head)
//
// Asymmetric min-max quantization to B bits (KIVI Eq. 1): z = min x, s = (max x - min x) /
// (2^B - 1) over the group, code = round((x - z) / s), x~ = z + s code; z and s are stored as
// binary16 and the codes are computed against the stored values (detail/quant.hpp), bit-packed
// (detail/quant.hpp gives the layout). The open page of a stream stays float: KIVI's
// full-precision residual window.
//
// rotation::hadamard (kivi_channel, kivi_token and int8 as key codecs) rotates each key by the
// orthonormal Walsh-Hadamard matrix H / sqrt(d) before quantizing (head_dim a power of two);
// attention rotates the query the same way, so q.k is unchanged but for quantization, and
// decoding rotates back. It spreads outlier channels over all channels, which helps per-token
// quantization.
//
// Bytes per token per head, head_dim d, page_tokens P (stats() counts exactly these):
//   kivi_channel<B>:  d B / 8 codes + 4 d / P (binary16 scale and zero per channel per page)
//   kivi_channel<B, R, G>: d B / 8 + (4 d G + 2 (G - 1), padded to 8) / P (G grids, and the
//                     first row of each grid after the first)
//   kivi_token<B, G>: d B / 8 codes + 4 ceil(d / G) (binary16 scale and zero per group)
//   int8:             d codes + 4 (float scale)
// e.g. d = 128, P = 64: kivi_channel<2> 40, <4> 72 (three grids: 56.125, 88.125; two:
// 48.125, 80.125); kivi_token<2, 32> 48, <4, 32> 80; int8 132 (f16: 256). The page payload is
// rounded up to 64 bytes in the page layout. Grids cost 4 d / P bytes a token each: 8 at
// P = 64, 32 at P = 16, so they suit large pages.
//
// Attention reads the codes in place (fused, no dequantized copy): the cache calls
// prepare_queries once per page and run of query rows, key_logits and accumulate_values per
// chunk of up to 64 tokens (detail/code_kernels.hpp). With AVX2, 2-, 4- and 8-bit codes at
// head_dim 32..256 (a multiple of 32) are multiplied in 16-bit integers: the query times the
// key scales and the attention weights times the value scales are rounded to 2^-16 of their
// row's largest term, which moves attention outputs by about 1e-4 relative at most (against
// 1e-2 to 0.5 for the quantization itself). codec::weights8<kivi<B>> (weights8.hpp) stores
// the same pages and rounds those weights to 8 bits instead, for 2- and 4-bit codes: faster
// kernels, outputs moved by about 3e-2 relative (key_logits and accumulate_values take the
// precision as their WeightBits template argument, 16 by default).
//
// Error: |x~ - x| <= s / 2 per element of a group (s its step), plus the binary16 rounding of
// z; relative_error / absolute_error (the per-element contract of codec.hpp) do not bound it,
// so quantized codecs report relative_error 0, absolute_error +inf and range_error =
// 1 / (2 (2^B - 1)): |x~ - x| <= range_error (max - min) of its group, up to binary16 rounding.
//
// Eviction. kivi_token and int8 rows carry their own parameters and move between pages as
// bytes: no added error. kivi_channel keys share their page's parameters, so compaction
// re-encodes each page whose rows change (kivi_channel::reencode, with the pages the rows
// came from). Compaction keeps pages dense and in position order, so a page is refilled
// from runs of rows, each run quantized on one grid of the page it came from. With Grids > 1
// each run keeps its own grid while the runs number at most Grids; beyond that the
// neighbouring runs whose joining adds the least squared error are joined first. Then, for
// each grid and channel by channel, the page keeps the grid (scale, zero) that one of the
// runs was quantized on, or takes the min-max grid of the rows, whichever gives the least
// squared error over them. Rows quantized on the grid kept keep their codes bit for bit; the
// others are quantized once more (error within s / 2 of the new grid, or their clamping
// error). A page filled from one page keeps its grid and codes. With one grid, a page that
// mixes the rows of pages with different grids still adds error, a key being quantized
// again whenever it lands in a page that keeps another page's grid: 10 rounds evicting 10%
// each end with 1.07x (kivi<2>) to 1.24x (kivi<2> keys, kivi<4> values) the attention error
// of one round evicting the same tokens (1.16x to 1.46x when every changed page took a fresh
// min-max grid). A round evicting a tenth refills a page from two or three runs, so with
// three grids nearly every key keeps its codes: 1.001x to 1.011x, and one round's error
// itself falls (by 18% for kivi<2> keys with kivi<4> values, against one grid); two
// grids give 1.02x to 1.105x (tests/test_quantized.cpp). Grids cost bytes (above) and
// compaction time (1.04x to 1.36x one grid's, bench/README.md); attention reads a page's
// grids only when it has more than one, and a chunk of rows that crosses grids in two parts.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

#include "kvc/codecs/codec.hpp"
#include "kvc/codecs/detail/code_kernels.hpp"
#include "kvc/codecs/detail/quant.hpp"
#include "kvc/config.hpp"
#include "kvc/detail/attention.hpp"
#include "kvc/detail/half.hpp"
#include "kvc/version.hpp"

KVC_NAMESPACE_BEGIN
namespace codec {

enum class rotation { none, hadamard };

}  // namespace codec

namespace detail {
namespace qcodec {

// The payload starts are aligned to 8 bytes inside a page.
constexpr std::size_t align8(std::size_t n) noexcept { return (n + 7u) & ~std::size_t{7}; }

// x rotated when R is hadamard (into buf, returned), else x itself.
template <codec::rotation R>
inline const float* rotated(const float* x, int d, float* buf) noexcept {
  if constexpr (R == codec::rotation::hadamard) {
    std::memcpy(buf, x, sizeof(float) * static_cast<std::size_t>(d));
    hadamard_rotate(buf, d);
    return buf;
  } else {
    (void)d;
    (void)buf;
    return x;
  }
}

template <codec::rotation R>
inline void unrotate_rows(float* x, int n, int d) noexcept {
  if constexpr (R == codec::rotation::hadamard) {
    hadamard_rotate_rows(x, n, d);
  } else {
    (void)x, (void)n, (void)d;
  }
}

// Moves rows [src_first, src_first + n) of a per-token array of `row` bytes a token that
// starts `offset` bytes into a page to rows [dst_first, ...) of another (or the same) page.
inline void move_rows(const std::byte* src, int src_first, std::byte* dst, int dst_first, int n, std::size_t offset,
                      std::size_t row) noexcept {
  std::memmove(dst + offset + static_cast<std::size_t>(dst_first) * row,
               src + offset + static_cast<std::size_t>(src_first) * row, static_cast<std::size_t>(n) * row);
}

// What every quantized codec shares: rows_f32 as a decoded copy, attention on the codes
// (fused), and the error contract described above (range_error, not per element).
template <class Derived>
struct quantized_base {
  static constexpr bool identity = false;
  static constexpr bool fused = true;
  static constexpr double relative_error = 0.0;
  static constexpr double absolute_error = std::numeric_limits<double>::infinity();

  static const float* rows_f32(const std::byte* page, int first, int n, int d, int page_tokens,
                               float* scratch) noexcept {
    Derived::decode(page, first, n, d, page_tokens, scratch);
    return scratch;
  }
};

// One of four names by bit width.
template <int Bits>
constexpr const char* by_bits(const char* b2, const char* b3, const char* b4, const char* b8) noexcept {
  return Bits == 2 ? b2 : Bits == 3 ? b3 : Bits == 4 ? b4 : b8;
}

// The names of kivi_channel<Bits, R, Grids> and kivi<Bits, Group, R, Grids>: "+grids3" after
// the name with one grid.
constexpr const char* grids_suffix(int grids) noexcept {
  return grids == 2 ? "+grids2" : grids == 3 ? "+grids3" : grids == 4 ? "+grids4" : "";
}
template <int Bits, bool Hadamard, int Grids>
struct channel_name {
  static constexpr const char* head =
      Hadamard ? by_bits<Bits>("kivi_channel<2>+hadamard", "kivi_channel<3>+hadamard", "kivi_channel<4>+hadamard",
                               "kivi_channel<8>+hadamard")
               : by_bits<Bits>("kivi_channel<2>", "kivi_channel<3>", "kivi_channel<4>", "kivi_channel<8>");
  static constexpr std::size_t size = length(head) + length(grids_suffix(Grids)) + 1;
  static constexpr text<size> value = joined<size>(head, grids_suffix(Grids), "");
};
template <int Bits, int Grids>
struct pair_name {
  static constexpr const char* head = by_bits<Bits>("kivi<2>", "kivi<3>", "kivi<4>", "kivi<8>");
  static constexpr std::size_t size = length(head) + length(grids_suffix(Grids)) + 1;
  static constexpr text<size> value = joined<size>(head, grids_suffix(Grids), "");
};

}  // namespace qcodec
}  // namespace detail

namespace codec {

// ---------------------------------------------------------------- kivi_channel

// KIVI keys: channel c of a sealed page's rows has one scale and zero per grid. With one grid
// (the default): [scale f16 d] [zero f16 d], then the packed code rows [P][packed_bytes(d, B)].
// With Grids > 1 the rows of a page are up to Grids runs, run k quantized on grid k:
// [scale f16 d] [zero f16 d] for each grid, then the first row of grids 1 .. Grids - 1
// (uint16 [Grids - 1]; grid k holds rows [first_k, first_k+1), first_0 = 0, first_Grids = P,
// an unused grid is empty), padded to 8 bytes, then the code rows. Sealing writes one grid;
// only compaction (reencode) fills the others.
template <int Bits, rotation R = rotation::none, int Grids = 1>
struct kivi_channel : detail::qcodec::quantized_base<kivi_channel<Bits, R, Grids>> {
  static_assert(Bits == 2 || Bits == 3 || Bits == 4 || Bits == 8, "kivi_channel: Bits must be 2, 3, 4 or 8");
  static_assert(Grids >= 1 && Grids <= 4, "kivi_channel: Grids must be 1, 2, 3 or 4");
  static constexpr const char* name = detail::qcodec::channel_name<Bits, R == rotation::hadamard, Grids>::value.c;
  static constexpr int bits = Bits;
  static constexpr int grids = Grids;
  static constexpr rotation rotate = R;
  static constexpr bool token_granular = false;  // a page's rows share its channel parameters
  static constexpr double range_error = 0.5 / ((1 << Bits) - 1);
  static constexpr float max_abs = 65504.0f;

  static constexpr std::size_t row_bytes(int d) noexcept { return detail::packed_bytes(d, Bits); }
  static constexpr std::size_t grid_bytes(int d) noexcept { return 4 * static_cast<std::size_t>(d); }
  static constexpr std::size_t codes_offset(int d) noexcept {
    return detail::qcodec::align8(Grids * grid_bytes(d) + 2 * static_cast<std::size_t>(Grids - 1));
  }
  static constexpr std::size_t page_bytes(int page_tokens, int d) noexcept {
    return codes_offset(d) + static_cast<std::size_t>(page_tokens) * row_bytes(d);
  }
  // Grid k's scales and zero points (binary16 bits, [d] each); scales(page), zeros(page, d): grid 0's.
  static const std::uint16_t* grid_scales(const std::byte* page, int d, int k) noexcept {
    return reinterpret_cast<const std::uint16_t*>(page + static_cast<std::size_t>(k) * grid_bytes(d));
  }
  static std::uint16_t* grid_scales(std::byte* page, int d, int k) noexcept {
    return reinterpret_cast<std::uint16_t*>(page + static_cast<std::size_t>(k) * grid_bytes(d));
  }
  static const std::uint16_t* grid_zeros(const std::byte* page, int d, int k) noexcept {
    return grid_scales(page, d, k) + d;
  }
  static const std::uint16_t* scales(const std::byte* page) noexcept {
    return reinterpret_cast<const std::uint16_t*>(page);
  }
  static std::uint16_t* scales(std::byte* page) noexcept { return reinterpret_cast<std::uint16_t*>(page); }
  static const std::uint16_t* zeros(const std::byte* page, int d) noexcept { return scales(page) + d; }
  static std::uint16_t* zeros(std::byte* page, int d) noexcept { return scales(page) + d; }
  static const std::uint8_t* codes(const std::byte* page, int d) noexcept {
    return reinterpret_cast<const std::uint8_t*>(page + codes_offset(d));
  }
  // The first row of grid k, k in [0, Grids]: 0 for k = 0, page_tokens for k = Grids.
  static int grid_first(const std::byte* page, int d, int page_tokens, int k) noexcept {
    if (k <= 0) return 0;
    if (k >= Grids) return page_tokens;
    std::uint16_t f;
    std::memcpy(&f, page + first_offset(d, k), sizeof f);
    return f;
  }
  // The grid that row `row` of a page is quantized on.
  static int grid_of(const std::byte* page, int d, int page_tokens, int row) noexcept {
    int k = 0;
    while (k + 1 < Grids && grid_first(page, d, page_tokens, k + 1) <= row) ++k;
    return k;
  }

  // Rows [0, n) of a page from float [n][d]: parameters over those n rows, in grid 0.
  static void encode(const float* src, int n, int d, int page_tokens, std::byte* page) noexcept {
    std::uint16_t* scale = scales(page);
    std::uint16_t* zero = zeros(page, d);
    std::uint8_t* out = reinterpret_cast<std::uint8_t*>(page + codes_offset(d));
    if constexpr (R == rotation::none) {
      detail::quantize_rows_per_channel(src, n, d, Bits, out, scale, zero);
    } else {
      // Two passes, one row rotated at a time: the channel ranges, then the codes.
      alignas(32) float buf[max_head_dim_rows];
      alignas(32) float lo[max_head_dim_rows], hi[max_head_dim_rows];
      for (int c = 0; c < d; ++c) {
        lo[c] = std::numeric_limits<float>::infinity();
        hi[c] = -std::numeric_limits<float>::infinity();
      }
      for (int t = 0; t < n; ++t) {
        const float* x = detail::qcodec::rotated<R>(src + static_cast<std::size_t>(t) * d, d, buf);
        for (int c = 0; c < d; ++c) {
          lo[c] = x[c] < lo[c] ? x[c] : lo[c];
          hi[c] = x[c] > hi[c] ? x[c] : hi[c];
        }
      }
      for (int c = 0; c < d; ++c) {
        const detail::minmax m = n > 0 ? detail::minmax_from_range(lo[c], hi[c], Bits) : detail::minmax{0, 0};
        scale[c] = m.scale;
        zero[c] = m.zero;
      }
      for (int t = 0; t < n; ++t) {
        const float* x = detail::qcodec::rotated<R>(src + static_cast<std::size_t>(t) * d, d, buf);
        detail::quantize_rows_per_channel_fixed(x, t, 1, d, Bits, scale, zero, out);
      }
    }
    set_unused_grids(page, d, page_tokens, 1);
  }
  static void decode(const std::byte* page, int first, int n, int d, int page_tokens, float* dst) noexcept {
    for (int k = 0; k < Grids; ++k) {
      const int lo = grid_first(page, d, page_tokens, k), hi = grid_first(page, d, page_tokens, k + 1);
      const int a = first > lo ? first : lo, b = first + n < hi ? first + n : hi;
      if (a < b)
        detail::dequantize_rows_per_channel(codes(page, d) + static_cast<std::size_t>(a) * row_bytes(d), b - a, d, Bits,
                                            grid_scales(page, d, k), grid_zeros(page, d, k),
                                            dst + static_cast<std::size_t>(a - first) * d);
    }
    detail::qcodec::unrotate_rows<R>(dst, n, d);
  }
  // Not token granular: the cache re-encodes pages whose rows change (see paged_kv_cache).
  static void copy_rows(const std::byte*, int, std::byte*, int, int, int, int) noexcept {}

  // Compaction's encode (codec.hpp): the n kept rows of a changed page, decoded, with the
  // pages they came from. The rows fall into runs, each quantized on one grid of one source
  // page. With Grids > 1, runs become the page's grids while there are at most Grids of them;
  // beyond that, neighbouring runs are joined, the pair whose joining adds the least squared
  // error first, until Grids remain. Then, for each grid and channel by channel, the page
  // takes whichever grid (scale, zero) gives the least squared error over the grid's rows,
  // among the grids those rows were quantized on and the min-max grid of the rows; a row that
  // was quantized on the chosen grid keeps its code (copied, bit for bit) and counts no
  // error, the others are quantized once more against it, clamped codes counting their
  // clamping error. So a page filled from runs that fit its grids keeps every code, and a row
  // re-quantized once stays exact while its run keeps the grid: eviction in many small rounds
  // does not quantize the same keys over and over.
  static void reencode(float* rows, int n, int d, int page_tokens, const std::byte* const* sources, int n_sources,
                       const detail::row_origin* origin, std::byte* page) noexcept {
    if (n < 1) {
      encode(rows, n, d, page_tokens, page);
      return;
    }
    // The grids are in the rotated space; H / sqrt(d) is its own inverse, so this rotates.
    detail::qcodec::unrotate_rows<R>(rows, n, d);
    const int ns = n_sources < 0                              ? 0
                   : n_sources < detail::max_reencode_sources ? n_sources
                                                              : detail::max_reencode_sources;
    // from[r]: the grid row r was quantized on, o Grids + k for grid k of sources[o]; -1 for
    // a row of a page not passed.
    std::int8_t from[max_page_tokens];
    for (int r = 0; r < n; ++r) {
      const int o = origin[r].source;
      from[r] = static_cast<std::int8_t>(
          o >= 0 && o < ns ? o * Grids + grid_of(sources[o], d, page_tokens, origin[r].row) : -1);
    }
    // The runs, then (Grids > 1) joined to at most Grids parts: part p is rows
    // [start[p], start[p + 1]).
    int start[max_runs + 1], np = 0;
    if (Grids == 1) {
      start[np++] = 0;
    } else {
      for (int r = 0; r < n; ++r)
        if ((r == 0 || from[r] != from[r - 1]) && np < max_runs) start[np++] = r;
    }
    start[np] = n;
    if (np > Grids) join_runs(rows, d, sources, from, start, np);
    // The choice is held here until the codes are written: a source may be `page` itself.
    alignas(32) std::uint16_t scale[Grids][max_head_dim_rows], zero[Grids][max_head_dim_rows];
    std::uint8_t* out = reinterpret_cast<std::uint8_t*>(page + codes_offset(d));
    for (int p = 0; p < np; ++p) {
      const int a = start[p], m = start[p + 1] - a;
      const candidates cand(sources, d, from + a, m);
      choose_grids(rows + static_cast<std::size_t>(a) * d, m, d, cand, from + a, scale[p], zero[p]);
      alignas(32) float sf[max_head_dim_rows], zf[max_head_dim_rows];
      detail::half_to_float(scale[p], sf, static_cast<std::size_t>(d));
      detail::half_to_float(zero[p], zf, static_cast<std::size_t>(d));
      // keep[j][c]: channel c took candidate j's grid, so j's rows keep their codes there.
      bool keep[max_candidates][max_head_dim_rows];
      bool any[max_candidates] = {};
      for (int j = 0; j < cand.n; ++j)
        for (int c = 0; c < d; ++c) {
          keep[j][c] = cand.scale[j][c] == scale[p][c] && cand.zero[j][c] == zero[p][c];
          any[j] = any[j] || keep[j][c];
        }
      std::uint8_t prior[max_head_dim_rows], code[max_head_dim_rows];
      // Row by row upwards: a row of `page` itself is read before the slot it is in is written.
      for (int r = a; r < a + m; ++r) {
        const int j = cand.index(from[r]);
        detail::quantize_codes(rows + static_cast<std::size_t>(r) * d, d, sf, zf, Bits, code);
        if (j >= 0 && any[j]) {
          detail::unpack_codes(
              codes(sources[origin[r].source], d) + static_cast<std::size_t>(origin[r].row) * row_bytes(d), d, Bits,
              prior);
          for (int c = 0; c < d; ++c) code[c] = keep[j][c] ? prior[c] : code[c];
        }
        detail::pack_codes(code, d, Bits, out + static_cast<std::size_t>(r) * row_bytes(d));
      }
    }
    for (int p = 0; p < np; ++p) {
      std::memcpy(grid_scales(page, d, p), scale[p], sizeof(std::uint16_t) * static_cast<std::size_t>(d));
      std::memcpy(grid_scales(page, d, p) + d, zero[p], sizeof(std::uint16_t) * static_cast<std::size_t>(d));
      if (p > 0) set_first(page, d, p, start[p]);
    }
    set_unused_grids(page, d, page_tokens, np);
  }

  // Fused attention. For each of the nq query rows q[g] and each grid k the page uses: the
  // rotated q times each channel's scale, and the rotated q . zero (the page's parameters are
  // widened once). Grid 0's products go to w [nq][d]; bias holds the other grids' products
  // ([Grids - 1][nq][d]) and then the dot products with the zeros ([nq][Grids]).
  static void prepare_queries(const std::byte* page, int d, int page_tokens, const float* const* q, int nq, float* w,
                              float* bias) noexcept {
    for (int k = 0; k < Grids; ++k) {
      if (k > 0 && grid_first(page, d, page_tokens, k) >= grid_first(page, d, page_tokens, k + 1)) continue;
      alignas(32) float buf[max_head_dim_rows], sf[max_head_dim_rows], zf[max_head_dim_rows];
      detail::half_to_float(grid_scales(page, d, k), sf, static_cast<std::size_t>(d));
      detail::half_to_float(grid_zeros(page, d, k), zf, static_cast<std::size_t>(d));
      float* wk = grid_weights(w, bias, nq, d, k);
      for (int g = 0; g < nq; ++g) {
        const float* x = detail::qcodec::rotated<R>(q[g], d, buf);
        // Through a local copy, so that the compiler need not fear that w aliases x.
        alignas(32) float wl[max_head_dim_rows];
        for (int c = 0; c < d; ++c) wl[c] = x[c] * sf[c];
        std::memcpy(wk + static_cast<std::size_t>(g) * d, wl, sizeof(float) * static_cast<std::size_t>(d));
        grid_bias(bias, nq, d)[g * Grids + k] = detail::dot(x, zf, d);
      }
    }
  }
  // out[g * T + t] = q_g . k~_{first + t}, from the prepared w [nq][d] and bias.
  // WeightBits: the precision the integer kernels round w to (codec::weights8 asks for 8).
  template <int WeightBits = 16>
  static void key_logits(const std::byte* page, int first, int T, int d, int page_tokens, const float* w,
                         const float* bias, int nq, float* out) noexcept {
    const float* b = grid_bias(bias, nq, d);
    // Grid by grid: a chunk on one grid straight into out, one that crosses grids in parts
    // through a buffer.
    float part[8 * 64];
    for (int a = first, k = Grids == 1 ? 0 : grid_of(page, d, page_tokens, first); a < first + T; ++k) {
      const int hi = grid_first(page, d, page_tokens, k + 1);
      const int m = (hi < first + T ? hi : first + T) - a;
      if (m <= 0) continue;
      float* o = m == T ? out : part;
      detail::dot_code_rows<Bits, WeightBits>(grid_weights(w, bias, nq, d, k), nq,
                                              codes(page, d) + static_cast<std::size_t>(a) * row_bytes(d), row_bytes(d),
                                              m, d, o);
      for (int g = 0; g < nq; ++g)
        for (int t = 0; t < m; ++t) out[g * T + (a - first) + t] = o[g * m + t] + b[g * Grids + k];
      a += m;
    }
  }
  static constexpr int bias_floats(int d) noexcept { return Grids + (Grids - 1) * d; }
  // True where key_logits runs the integer code kernels (16-bit query rows; code_kernels.hpp).
  static constexpr bool integer_attention(int d) noexcept { return detail::integer_code_kernels<Bits>(d); }

 private:
  static constexpr int max_head_dim_rows = 512;
  static constexpr int max_page_tokens = kvc::max_page_tokens;
  // Runs of rows from one grid: each of the max_reencode_sources sources' Grids grids, and
  // rows from pages not passed.
  static constexpr int max_runs = detail::max_reencode_sources * Grids + 1;
  // The grids one part of a page chooses among, besides its rows' own min-max grid.
  static constexpr int max_candidates = max_runs < 8 ? max_runs : 8;

  // Where prepare_queries puts grid k's q s rows ([nq][d]) and the q . zero of all grids
  // ([nq][Grids]); F is float or const float.
  template <class F>
  static F* grid_weights(F* w, F* bias, int nq, int d, int k) noexcept {
    return k == 0 ? w : bias + static_cast<std::size_t>(k - 1) * nq * d;
  }
  template <class F>
  static F* grid_bias(F* bias, int nq, int d) noexcept {
    return bias + static_cast<std::size_t>(Grids - 1) * nq * d;
  }
  // Where the first row of grid k (0 < k < Grids) is stored, after the grids.
  static constexpr std::size_t first_offset(int d, int k) noexcept {
    return Grids * grid_bytes(d) + 2 * static_cast<std::size_t>(k - 1);
  }
  static void set_first(std::byte* page, int d, int k, int row) noexcept {
    const auto f = static_cast<std::uint16_t>(row);
    std::memcpy(page + first_offset(d, k), &f, sizeof f);
  }
  // Grids [used, Grids) empty, with zero parameters.
  static void set_unused_grids(std::byte* page, int d, int page_tokens, int used) noexcept {
    for (int k = used < 1 ? 1 : used; k < Grids; ++k) {
      std::memset(grid_scales(page, d, k), 0, grid_bytes(d));
      set_first(page, d, k, page_tokens);
    }
  }

  // The distinct grids that a part's rows were quantized on (from[] values >= 0, in order of
  // first appearance; the first max_candidates of them).
  struct candidates {
    int n = 0;
    std::int8_t grid[max_candidates];
    const std::uint16_t* scale[max_candidates];
    const std::uint16_t* zero[max_candidates];
    candidates(const std::byte* const* sources, int d, const std::int8_t* from, int m) noexcept {
      for (int r = 0; r < m && n < max_candidates; ++r) {
        if (from[r] < 0 || index(from[r]) >= 0) continue;
        const std::byte* src = sources[from[r] / Grids];
        grid[n] = from[r];
        scale[n] = grid_scales(src, d, from[r] % Grids);
        zero[n] = grid_zeros(src, d, from[r] % Grids);
        ++n;
      }
    }
    // The candidate of grid f, or -1.
    int index(std::int8_t f) const noexcept {
      for (int j = 0; j < n; ++j)
        if (grid[j] == f) return j;
      return -1;
    }
  };

  // Joins neighbouring parts of rows x [n][d] (start[0..np], np > Grids) until Grids remain,
  // each time the pair whose joining adds the least to the squared error of choose_grids.
  static void join_runs(const float* x, int d, const std::byte* const* sources, const std::int8_t* from, int* start,
                        int& np) noexcept {
    auto cost = [&](int a, int b) {
      const candidates cand(sources, d, from + a, b - a);
      return choose_grids(x + static_cast<std::size_t>(a) * d, b - a, d, cand, from + a, nullptr, nullptr);
    };
    double own[max_runs], joined[max_runs];  // joined[p]: parts p and p + 1 as one
    for (int p = 0; p < np; ++p) own[p] = cost(start[p], start[p + 1]);
    for (int p = 0; p + 1 < np; ++p) joined[p] = cost(start[p], start[p + 2]);
    while (np > Grids) {
      int best = 0;
      for (int p = 1; p + 1 < np; ++p)
        if (joined[p] - own[p] - own[p + 1] < joined[best] - own[best] - own[best + 1]) best = p;
      own[best] = joined[best];
      for (int p = best + 1; p < np; ++p) {
        start[p] = start[p + 1];
        own[p] = own[p + 1];
        joined[p] = joined[p + 1];
      }
      --np;
      if (best > 0) joined[best - 1] = cost(start[best - 1], start[best + 1]);
      if (best + 1 < np) joined[best] = cost(start[best], start[best + 2]);
    }
  }

  // The choice for n >= 1 rows x [n][d] whose row r was quantized on grid from[r]: 32
  // channels at a time, candidate j < cand.n is that grid, candidate cand.n the min-max grid of
  // the rows; a grid is compared by its bits, (scale << 16) | zero. Writes scale and zero
  // (when not null) and returns the squared error of the choice.
  static double choose_grids(const float* x, int n, int d, const candidates& cand, const std::int8_t* from,
                             std::uint16_t* scale, std::uint16_t* zero) noexcept {
    constexpr int mc = max_candidates + 1;
    const int nc = cand.n;
    std::uint32_t grid[mc][32];
    float s[mc][32], z[mc][32];
    double cost[mc][32];
    float counted[mc][mc][32];
    double total = 0.0;
    for (int c0 = 0; c0 < d; c0 += 32) {
      const int m = d - c0 < 32 ? d - c0 : 32;
      std::uint16_t own_scale[32], own_zero[32];  // the rows' min-max grid
      detail::channel_minmax(x, n, d, c0, m, Bits, own_scale, own_zero);
      for (int k = 0; k <= nc; ++k) {
        for (int i = 0; i < m; ++i) {
          const std::uint16_t sk = k < nc ? cand.scale[k][c0 + i] : own_scale[i];
          const std::uint16_t zk = k < nc ? cand.zero[k][c0 + i] : own_zero[i];
          grid[k][i] = static_cast<std::uint32_t>(sk) << 16 | zk;
          s[k][i] = detail::half_to_float_scalar(sk);
          z[k][i] = detail::half_to_float_scalar(zk);
          cost[k][i] = 0.0;
        }
      }
      // counted[o + 1][k][i] is 0 where candidate k has the bits of candidate o's grid (o = -1:
      // a row of no candidate), so that a row of o keeps its code: no error. Else 1.
      for (int o = -1; o < nc; ++o)
        for (int k = 0; k <= nc; ++k)
          for (int i = 0; i < m; ++i) counted[o + 1][k][i] = o >= 0 && grid[o][i] == grid[k][i] ? 0.0f : 1.0f;
      for (int r = 0; r < n; ++r) {
        const float* xr = x + static_cast<std::size_t>(r) * d + c0;
        const int o = cand.index(from[r]);
        for (int k = 0; k <= nc; ++k) {
          if (k == o) continue;  // the row's own grid: no error in any channel
          detail::add_grid_errors(xr, m, s[k], z[k], counted[o + 1][k], Bits, cost[k]);
        }
      }
      for (int i = 0; i < m; ++i) {
        int best = 0;  // ties go to the first: a source's grid before the min-max one
        for (int k = 1; k <= nc; ++k) best = cost[k][i] < cost[best][i] ? k : best;
        total += cost[best][i];
        if (scale != nullptr) {
          scale[c0 + i] = static_cast<std::uint16_t>(grid[best][i] >> 16);
          zero[c0 + i] = static_cast<std::uint16_t>(grid[best][i] & 0xFFFFu);
        }
      }
    }
    return total;
  }
};

// ---------------------------------------------------------------- kivi_token

// KIVI values: token t's channels in groups of Group, one scale and zero per group:
// [codes P][packed_bytes(d, B)] then [scale f16 P][ng] [zero f16 P][ng], ng = ceil(d / Group).
template <int Bits, int Group = 32, rotation R = rotation::none>
struct kivi_token : detail::qcodec::quantized_base<kivi_token<Bits, Group, R>> {
  static_assert(Bits == 2 || Bits == 3 || Bits == 4 || Bits == 8, "kivi_token: Bits must be 2, 3, 4 or 8");
  static_assert(Group >= 32 && Group % 32 == 0, "kivi_token: Group must be a positive multiple of 32");
  static constexpr const char* name =
      R == rotation::none
          ? detail::qcodec::by_bits<Bits>("kivi_token<2>", "kivi_token<3>", "kivi_token<4>", "kivi_token<8>")
          : detail::qcodec::by_bits<Bits>("kivi_token<2>+hadamard", "kivi_token<3>+hadamard", "kivi_token<4>+hadamard",
                                          "kivi_token<8>+hadamard");
  static constexpr int bits = Bits;
  static constexpr int group = Group;
  static constexpr rotation rotate = R;
  static constexpr bool token_granular = true;  // each row carries its own parameters
  static constexpr double range_error = 0.5 / ((1 << Bits) - 1);
  static constexpr float max_abs = 65504.0f;

  static constexpr int groups(int d) noexcept { return (d + Group - 1) / Group; }
  static constexpr std::size_t row_bytes(int d) noexcept { return detail::packed_bytes(d, Bits); }
  static constexpr std::size_t params_offset(int page_tokens, int d) noexcept {
    return detail::qcodec::align8(static_cast<std::size_t>(page_tokens) * row_bytes(d));
  }
  static constexpr std::size_t page_bytes(int page_tokens, int d) noexcept {
    return params_offset(page_tokens, d) +
           4 * static_cast<std::size_t>(page_tokens) * static_cast<std::size_t>(groups(d));
  }
  static std::uint16_t* scales(std::byte* page, int P, int d) noexcept {
    return reinterpret_cast<std::uint16_t*>(page + params_offset(P, d));
  }
  static const std::uint16_t* scales(const std::byte* page, int P, int d) noexcept {
    return reinterpret_cast<const std::uint16_t*>(page + params_offset(P, d));
  }
  static const std::uint16_t* zeros(const std::byte* page, int P, int d) noexcept {
    return scales(page, P, d) + static_cast<std::size_t>(P) * groups(d);
  }

  static void encode(const float* src, int n, int d, int page_tokens, std::byte* page) noexcept {
    std::uint8_t* out = reinterpret_cast<std::uint8_t*>(page);
    std::uint16_t* scale = scales(page, page_tokens, d);
    std::uint16_t* zero = scale + static_cast<std::size_t>(page_tokens) * groups(d);
    alignas(32) float buf[512];
    for (int t = 0; t < n; ++t) {
      const float* x = detail::qcodec::rotated<R>(src + static_cast<std::size_t>(t) * d, d, buf);
      const std::size_t g0 = static_cast<std::size_t>(t) * groups(d);
      detail::quantize_rows_grouped(x, 1, d, Group, Bits, out + static_cast<std::size_t>(t) * row_bytes(d), scale + g0,
                                    zero + g0);
    }
  }
  static void decode(const std::byte* page, int first, int n, int d, int page_tokens, float* dst) noexcept {
    const std::size_t g0 = static_cast<std::size_t>(first) * groups(d);
    detail::dequantize_rows_grouped(reinterpret_cast<const std::uint8_t*>(page) + first * row_bytes(d), n, d, Group,
                                    Bits, scales(page, page_tokens, d) + g0, zeros(page, page_tokens, d) + g0, dst);
    detail::qcodec::unrotate_rows<R>(dst, n, d);
  }
  static void copy_rows(const std::byte* src, int src_first, std::byte* dst, int dst_first, int n, int d,
                        int page_tokens) noexcept {
    if (n <= 0) return;
    const std::size_t params = 2 * static_cast<std::size_t>(groups(d));  // binary16 bytes a token, each array
    const std::size_t scales_at = params_offset(page_tokens, d);
    const std::size_t zeros_at = scales_at + static_cast<std::size_t>(page_tokens) * params;
    detail::qcodec::move_rows(src, src_first, dst, dst_first, n, 0, row_bytes(d));
    detail::qcodec::move_rows(src, src_first, dst, dst_first, n, scales_at, params);
    detail::qcodec::move_rows(src, src_first, dst, dst_first, n, zeros_at, params);
  }

  // Fused attention as keys: w[g] = rotated q[g], bias[g][k] = sum of w[g] over group k.
  static void prepare_queries(const std::byte* /*page*/, int d, int /*page_tokens*/, const float* const* q, int nq,
                              float* w, float* bias) noexcept {
    alignas(32) float buf[512];
    for (int g = 0; g < nq; ++g) {
      const float* x = detail::qcodec::rotated<R>(q[g], d, buf);
      float* wg = w + static_cast<std::size_t>(g) * d;
      float* bg = bias + static_cast<std::size_t>(g) * groups(d);
      for (int k = 0; k < groups(d); ++k) bg[k] = 0.0f;
      for (int c = 0; c < d; ++c) {
        wg[c] = x[c];
        bg[c / Group] += x[c];
      }
    }
  }
  static constexpr int bias_floats(int d) noexcept { return groups(d); }
  // True where key_logits (one group of min(Group, d) channels at a time) or accumulate_values
  // run the integer code kernels (16-bit weights; code_kernels.hpp).
  static constexpr bool integer_attention(int d) noexcept {
    return detail::integer_code_kernels<Bits>(d, Group) || detail::integer_code_kernels<Bits>(Group < d ? Group : d) ||
           (d > Group && d % Group != 0 && detail::integer_code_kernels<Bits>(d % Group));
  }
  // T <= fused_tokens tokens per call. WeightBits as for kivi_channel::key_logits.
  template <int WeightBits = 16>
  static void key_logits(const std::byte* page, int first, int T, int d, int page_tokens, const float* w,
                         const float* bias, int nq, float* out) noexcept {
    const int ng = groups(d);
    const std::uint8_t* rows = reinterpret_cast<const std::uint8_t*>(page) + first * row_bytes(d);
    const std::uint16_t* s = scales(page, page_tokens, d) + static_cast<std::size_t>(first) * ng;
    const std::uint16_t* z = zeros(page, page_tokens, d) + static_cast<std::size_t>(first) * ng;
    alignas(32) float wk[8 * Group];
    float part[8 * 64];
    for (int i = 0; i < nq * T; ++i) out[i] = 0.0f;
    for (int k = 0; k < ng; ++k) {
      const int c0 = k * Group, len = d - c0 < Group ? d - c0 : Group;
      for (int g0 = 0; g0 < nq; g0 += 8) {
        const int gn = nq - g0 < 8 ? nq - g0 : 8;
        for (int g = 0; g < gn; ++g)
          std::memcpy(wk + g * len, w + static_cast<std::size_t>(g0 + g) * d + c0, sizeof(float) * len);
        // Group k's codes start at a block boundary (Group is a multiple of 32).
        detail::dot_code_rows<Bits, WeightBits>(wk, gn, rows + detail::packed_bytes(c0, Bits), row_bytes(d), T, len,
                                                part);
        for (int g = 0; g < gn; ++g)
          for (int t = 0; t < T; ++t) {
            const std::size_t i = static_cast<std::size_t>(t) * ng + k;
            out[(g0 + g) * T + t] += detail::half_to_float_scalar(s[i]) * part[g * T + t] +
                                     detail::half_to_float_scalar(z[i]) * bias[(g0 + g) * ng + k];
          }
      }
    }
  }
  // acc[g * d + c] += sum_t p[g * T + t] v~_{first + t, c}, T <= 64. WeightBits: the
  // precision the integer kernels round p s to (codec::weights8 asks for 8).
  template <int WeightBits = 16>
  static void accumulate_values(const std::byte* page, int first, int T, int d, int page_tokens, const float* p, int nq,
                                float* acc) noexcept {
    static_assert(R == rotation::none, "kivi_token: rotated values are not supported (attention would rotate back)");
    const std::size_t n = static_cast<std::size_t>(T) * static_cast<std::size_t>(groups(d));
    const std::size_t i0 = static_cast<std::size_t>(first) * static_cast<std::size_t>(groups(d));
    alignas(32) float s[64 * 16], z[64 * 16];
    detail::half_to_float(scales(page, page_tokens, d) + i0, s, n);
    detail::half_to_float(zeros(page, page_tokens, d) + i0, z, n);
    detail::accumulate_code_rows<Bits, WeightBits>(p, nq,
                                                   reinterpret_cast<const std::uint8_t*>(page) + first * row_bytes(d),
                                                   row_bytes(d), T, d, Group, s, z, acc);
  }
};

// ---------------------------------------------------------------- int8

// Symmetric int8 per (token, head): scale = max |x| / 127, code = round(x / scale) in
// [-127, 127]; [codes int8 P][d] then [scale float P].
template <rotation R = rotation::none>
struct int8_rows : detail::qcodec::quantized_base<int8_rows<R>> {
  static constexpr const char* name = R == rotation::none ? "int8" : "int8+hadamard";
  static constexpr int bits = 8;
  static constexpr rotation rotate = R;
  static constexpr bool token_granular = true;
  // |x~ - x| <= scale / 2 = max |x| / 254 of its row: range_error of a symmetric range 2 max |x|.
  static constexpr double range_error = 0.25 / 127.0;
  static constexpr float max_abs = std::numeric_limits<float>::max() / 2;

  static constexpr std::size_t scales_offset(int page_tokens, int d) noexcept {
    return detail::qcodec::align8(static_cast<std::size_t>(page_tokens) * static_cast<std::size_t>(d));
  }
  static constexpr std::size_t page_bytes(int page_tokens, int d) noexcept {
    return scales_offset(page_tokens, d) + 4 * static_cast<std::size_t>(page_tokens);
  }
  static const std::int8_t* codes(const std::byte* page) noexcept { return reinterpret_cast<const std::int8_t*>(page); }
  static const float* row_scales(const std::byte* page, int P, int d) noexcept {
    return reinterpret_cast<const float*>(page + scales_offset(P, d));
  }

  static void encode(const float* src, int n, int d, int page_tokens, std::byte* page) noexcept {
    std::int8_t* out = reinterpret_cast<std::int8_t*>(page);
    float* sc = reinterpret_cast<float*>(page + scales_offset(page_tokens, d));
    alignas(32) float buf[512];
    for (int t = 0; t < n; ++t) {
      const float* x = detail::qcodec::rotated<R>(src + static_cast<std::size_t>(t) * d, d, buf);
      detail::quantize_rows_int8(x, 1, d, out + static_cast<std::size_t>(t) * d, sc + t);
    }
  }
  static void decode(const std::byte* page, int first, int n, int d, int page_tokens, float* dst) noexcept {
    detail::dequantize_rows_int8(codes(page) + static_cast<std::size_t>(first) * d,
                                 row_scales(page, page_tokens, d) + first, n, d, dst);
    detail::qcodec::unrotate_rows<R>(dst, n, d);
  }
  static void copy_rows(const std::byte* src, int src_first, std::byte* dst, int dst_first, int n, int d,
                        int page_tokens) noexcept {
    if (n <= 0) return;
    detail::qcodec::move_rows(src, src_first, dst, dst_first, n, 0, static_cast<std::size_t>(d));
    detail::qcodec::move_rows(src, src_first, dst, dst_first, n, scales_offset(page_tokens, d), sizeof(float));
  }

  static void prepare_queries(const std::byte* /*page*/, int d, int /*page_tokens*/, const float* const* q, int nq,
                              float* w, float* /*bias*/) noexcept {
    alignas(32) float buf[512];
    for (int g = 0; g < nq; ++g) {
      const float* x = detail::qcodec::rotated<R>(q[g], d, buf);
      std::memcpy(w + static_cast<std::size_t>(g) * d, x, sizeof(float) * static_cast<std::size_t>(d));
    }
  }
  static constexpr int bias_floats(int /*d*/) noexcept { return 1; }
  static void key_logits(const std::byte* page, int first, int T, int d, int page_tokens, const float* w,
                         const float* /*bias*/, int nq, float* out) noexcept {
    detail::dot_int8_rows(w, nq, codes(page) + static_cast<std::size_t>(first) * d, static_cast<std::size_t>(d), T, d,
                          out);
    const float* sc = row_scales(page, page_tokens, d) + first;
    for (int g = 0; g < nq; ++g)
      for (int t = 0; t < T; ++t) out[g * T + t] *= sc[t];
  }
  static void accumulate_values(const std::byte* page, int first, int T, int d, int page_tokens, const float* p, int nq,
                                float* acc) noexcept {
    static_assert(R == rotation::none, "int8: rotated values are not supported (attention would rotate back)");
    detail::accumulate_int8_rows(p, nq, codes(page) + static_cast<std::size_t>(first) * d, static_cast<std::size_t>(d),
                                 T, d, row_scales(page, page_tokens, d) + first, acc);
  }
};

using int8 = int8_rows<>;

// ---------------------------------------------------------------- kivi

// KIVI's recipe as one name: keys per channel (kivi_channel<Bits, R, Grids>), values per token in
// groups of Group (kivi_token<Bits, Group>). paged_kv_cache takes key from its key codec
// argument and value from its value codec argument.
template <int Bits, int Group = 32, rotation R = rotation::none, int Grids = 1>
struct kivi {
  using key = kivi_channel<Bits, R, Grids>;
  using value = kivi_token<Bits, Group>;
  static constexpr const char* name = detail::qcodec::pair_name<Bits, Grids>::value.c;
  static constexpr int bits = Bits;
};

}  // namespace codec
KVC_NAMESPACE_END
