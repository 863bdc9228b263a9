// tests/quantized_helpers.hpp: what the tests of the quantized page codecs share
// (test_quantized.cpp, test_gear_codec.cpp): a small GQA cache configuration, seeded tokens
// and queries, attention through a cache and the double-precision reference over the rows a
// cache decodes.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <kvc/kvc.hpp>

#include "policy_helpers.hpp"
#include "reference/dense_attention.hpp"

namespace quantized_test {

inline std::size_t align8(std::size_t n) { return (n + 7) / 8 * 8; }
inline std::size_t align64(std::size_t n) { return (n + 63) / 64 * 64; }

inline constexpr int layers = 1, kv_heads = 2, group = 4;

inline kvc::cache_config config(int d, int page_tokens, int max_context = 4096) {
  kvc::cache_config c = policy_test::make_config({layers, kv_heads * group, kv_heads, d}, page_tokens, max_context);
  c.capacity_bytes = std::size_t{32} << 20;
  return c;
}

// n tokens [n][kv_heads][d]: Gaussian keys with two channels 10 times larger (the outlier
// channels KIVI quantizes per channel for), Gaussian values, positions 0..n-1.
struct tokens {
  int n, d;
  std::vector<float> k, v;
  std::vector<std::int32_t> pos;
  tokens(int n_, int d_, unsigned seed) : n(n_), d(d_) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal;
    k.resize(static_cast<std::size_t>(n) * kv_heads * d);
    v.resize(k.size());
    for (std::size_t i = 0; i < k.size(); ++i) {
      const std::size_t c = i % static_cast<std::size_t>(d);
      k[i] = normal(rng) * (c == 3 || c == 17 ? 10.0f : 1.0f);
      v[i] = normal(rng);
    }
    for (int i = 0; i < n; ++i) pos.push_back(i);
  }
};

// Relative L2 distance.
inline double rel(const std::vector<float>& a, const std::vector<double>& ref) {
  double e = 0, r = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    e += (a[i] - ref[i]) * (a[i] - ref[i]);
    r += ref[i] * ref[i];
  }
  return std::sqrt(e / r);
}

// Queries [n_q][kv_heads * group][d] at positions `at`.
inline std::vector<float> queries(int n_q, int d, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.3f);
  std::vector<float> q(static_cast<std::size_t>(n_q) * kv_heads * group * d);
  for (float& x : q) x = normal(rng);
  return q;
}

// The reference over what a cache holds (its decoded rows) or over the float tokens given.
template <class Cache>
std::vector<kvc_ref::kv_stream> decoded(const Cache& cache, kvc::seq_id s) {
  std::vector<kvc_ref::kv_stream> kv(kv_heads);
  for (int h = 0; h < kv_heads; ++h) {
    auto view = cache.view(s, 0, h);
    EXPECT_TRUE(view.ok());
    const auto k = view->keys();
    const auto v = view->values();
    kv[static_cast<std::size_t>(h)].keys.assign(k.data(), k.data() + k.size());
    kv[static_cast<std::size_t>(h)].values.assign(v.data(), v.data() + v.size());
    kv[static_cast<std::size_t>(h)].positions = view->positions();
    const std::vector<float> w = view->log_weights();
    kv[static_cast<std::size_t>(h)].log_weights.assign(w.begin(), w.end());
  }
  return kv;
}

template <class Cache>
std::vector<float> attend(Cache& cache, kvc::seq_id s, const std::vector<float>& q,
                          const std::vector<std::int32_t>& qpos) {
  std::vector<float> out(q.size());
  const kvc::status st = cache.attend(s, 0, q.data(), qpos.data(), static_cast<std::int64_t>(qpos.size()), out.data());
  EXPECT_TRUE(st.ok()) << st.message();
  return out;
}

inline std::vector<double> reference(const std::vector<float>& q, const std::vector<std::int32_t>& qpos, int d,
                                     const std::vector<kvc_ref::kv_stream>& kv) {
  return kvc_ref::dense_attention(std::vector<double>(q.begin(), q.end()), qpos, kv_heads * group, d, kv);
}

// Keep-all-but policy: drops the tokens whose seeded hash falls below `drop` (the random
// scorer with a uniform budget, as a scorer that does not look at the keys).
inline auto drop_fraction(double drop, unsigned seed) {
  return kvc::evict(kvc::score::random{seed}, kvc::budget::uniform::keep_fraction(1.0 - drop));
}

// A (key codec, value codec) pair, for typed tests over codecs.
template <class K, class V>
struct pair {
  using key = K;
  using value = V;
};

template <class T>
struct tag {
  using type = T;
};

// Whether attention on codec C (a key or value role) at head_dim d runs the integer code
// kernels, which round the query rows times the key scales and the attention weights times
// the value scales to 16 bits (2^-16 of each row's largest term; code_kernels.hpp, "Integer
// kernels"): the codec's integer_attention member (codec.hpp).
template <class C>
bool integer_kernels(int d) {
  return kvc::detail::integer_attention_v<C>(d);
}

template <class C, class = void>
struct weights8_of : std::false_type {};
template <class C>
struct weights8_of<C, std::void_t<decltype(C::weight_bits)>> : std::bool_constant<C::weight_bits == 8> {};

// Whether attention on codec C at head_dim d rounds its weights to 8 bits: codec::weights8
// where the byte kernels run (code_kernels.hpp, "Byte kernels"; 2^-8 of each row's largest
// term).
template <class C>
bool byte_kernels(int d) {
  if constexpr (weights8_of<C>::value)
    return kvc::detail::byte_code_kernels<C::bits>(d);
  else
    return (void)d, false;
}

// attend() computes q.k and p.v from the codes page by page (codec key_logits and
// accumulate_values); the result equals softmax attention in double over the rows the
// cache decodes, for a decode query and a causal block of 24 queries (several GQA runs),
// over full, partial and compacted pages: within 2e-6 (float rounding) where the float
// kernels run. Where the integer kernels run, their rounding of q s and p s to 2^-16 of the
// largest term passes through the softmax and the weighted sum of values, whose terms mostly
// cancel (|o| is about a tenth of a typical |v| here): 2^-16 x 10 x 2.5 (keys and values)
// gives the bound 4e-4 (measured 0.6e-4 to 1.5e-4). codec::weights8 rounds them to 2^-8
// where its byte kernels run: 2^-8 x 10 x 2.5 gives 0.1 (measured 0.018 to 0.037).
template <class K, class V>
void fused_attend_equals_attention_over_decoded_rows() {
  using cache_t = kvc::paged_kv_cache<K, V>;
  using key_t = kvc::detail::key_role_t<K>;
  using value_t = kvc::detail::value_role_t<V>;
  for (int d : {64, 128}) {
    SCOPED_TRACE("head_dim " + std::to_string(d));
    const double tol = byte_kernels<key_t>(d) || byte_kernels<value_t>(d)         ? 0.1
                       : integer_kernels<key_t>(d) || integer_kernels<value_t>(d) ? 4e-4
                                                                                  : 2e-6;
    const tokens t(300, d, 21);
    cache_t cache = policy_test::make_cache<cache_t>(config(d, 32));
    const kvc::seq_id s = cache.create_sequence();
    ASSERT_TRUE(cache.append(s, 0, t.k.data(), t.v.data(), t.pos.data(), t.n).ok());
    for (int round = 0; round < 2; ++round) {
      const std::vector<float> q1 = queries(1, d, 3);
      const std::vector<std::int32_t> p1{t.n};
      const double e1 = rel(attend(cache, s, q1, p1), reference(q1, p1, d, decoded(cache, s)));
      EXPECT_LT(e1, tol);
      const std::vector<float> qb = queries(24, d, 4);
      std::vector<std::int32_t> pb;
      for (int i = 0; i < 24; ++i) pb.push_back(150 + 6 * i);  // sees part of the stream
      const double eb = rel(attend(cache, s, qb, pb), reference(qb, pb, d, decoded(cache, s)));
      EXPECT_LT(eb, tol);
      std::printf("fused attend vs decoded rows, %s / %s, d %d, round %d: %.3g, %.3g\n", key_t::name, value_t::name, d,
                  round, e1, eb);
      ASSERT_TRUE(cache.compress(s, drop_fraction(0.3, 11)).ok());  // then on compacted pages
    }
  }
}

}  // namespace quantized_test
