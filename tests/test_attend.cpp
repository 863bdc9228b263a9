// paged_kv_cache::attend against dense softmax attention in double precision
// (tests/reference/dense_attention.hpp), over codecs, GQA groups, head sizes, page sizes,
// stream lengths around page boundaries and in the thousands, decode and multi-query
// (causal) calls, strided inputs, and streams with holes left by compress().
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <kvc/kvc.hpp>

#include "reference/dense_attention.hpp"

namespace {

// Key and value codecs; long_case picks which of the long-stream shapes the pair runs.
template <class K, class V, int LongCase>
struct codec_pair {
  using key = K;
  using value = V;
  static constexpr int long_case = LongCase;
};

template <class Pair>
using cache_of = kvc::paged_kv_cache<typename Pair::key, typename Pair::value>;

struct shape_case {
  int group, head_dim, page_tokens, n_tokens;
  int layers = 2;
};

constexpr int kv_heads = 2;

std::size_t align64(std::size_t n) { return (n + 63) / 64 * 64; }

kvc::cache_config make_config(const shape_case& c) {
  kvc::cache_config cfg;
  cfg.shape.num_layers = c.layers;
  cfg.shape.num_kv_heads = kv_heads;
  cfg.shape.num_q_heads = kv_heads * c.group;
  cfg.shape.head_dim = c.head_dim;
  cfg.page_tokens = c.page_tokens;
  cfg.max_context = c.n_tokens + 4 * c.page_tokens;
  const std::size_t P = static_cast<std::size_t>(c.page_tokens), d = static_cast<std::size_t>(c.head_dim);
  const std::size_t open_page = 2 * align64(P * d * 4) + 2 * align64(P * 4);
  // Every stream's pages, with room for forks that copy on write.
  cfg.capacity_bytes =
      2 * static_cast<std::size_t>(c.layers) * kv_heads * (static_cast<std::size_t>(c.n_tokens) / P + 3) * open_page;
  return cfg;
}

// One layer's appended tokens: k, v [n][kv_heads][d], positions [n].
struct layer_tokens {
  std::vector<float> k, v;
  std::vector<std::int32_t> pos;
};

layer_tokens random_tokens(std::mt19937_64& rng, int n, int d, std::int32_t first_pos) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> norm_scale(0.25f, 2.0f);
  layer_tokens t;
  t.k.resize(static_cast<std::size_t>(n) * kv_heads * d);
  t.v.resize(t.k.size());
  for (std::size_t r = 0; r < t.k.size() / d; ++r) {
    const float ks = norm_scale(rng), vs = norm_scale(rng);  // key and value norms vary by token
    for (int e = 0; e < d; ++e) {
      t.k[r * d + e] = ks * normal(rng);
      t.v[r * d + e] = vs * normal(rng);
    }
  }
  std::int32_t p = first_pos;
  for (int i = 0; i < n; ++i) {
    t.pos.push_back(p);
    p += 2 + static_cast<std::int32_t>(rng() % 3);  // gaps of 2..4 leave room for interleaved queries
  }
  return t;
}

// Appends in chunks of random size, so pages fill and seal across calls.
template <class Cache>
void append_in_chunks(Cache& cache, kvc::seq_id id, int layer, const layer_tokens& t, int max_chunk,
                      std::mt19937_64& rng) {
  const int d = cache.shape().head_dim;
  const int n = static_cast<int>(t.pos.size());
  for (int i = 0; i < n;) {
    const int m = std::min(n - i, 1 + static_cast<int>(rng() % static_cast<unsigned>(max_chunk)));
    const std::size_t off = static_cast<std::size_t>(i) * kv_heads * d;
    ASSERT_TRUE(cache.append(id, layer, t.k.data() + off, t.v.data() + off, t.pos.data() + i, m).ok());
    i += m;
  }
}

// The retained tokens as the cache decodes them (view), in double.
template <class Cache>
std::vector<kvc_ref::kv_stream> streams_from_view(const Cache& cache, kvc::seq_id id, int layer) {
  std::vector<kvc_ref::kv_stream> out;
  for (int h = 0; h < cache.shape().num_kv_heads; ++h) {
    auto v = cache.view(id, layer, h);
    EXPECT_TRUE(v.ok());
    kvc_ref::kv_stream s;
    const kvc::row_matrix keys = v->keys(), values = v->values();
    s.keys.assign(keys.data(), keys.data() + keys.size());
    s.values.assign(values.data(), values.data() + values.size());
    s.positions = v->positions();
    const std::vector<float> w = v->log_weights();
    s.log_weights.assign(w.begin(), w.end());
    out.push_back(std::move(s));
  }
  return out;
}

// The appended tokens before any rounding, restricted to keep[t] (all when empty).
std::vector<kvc_ref::kv_stream> streams_from_input(const layer_tokens& t, int d,
                                                   const std::vector<std::vector<std::uint8_t>>& keep = {}) {
  std::vector<kvc_ref::kv_stream> out(kv_heads);
  for (int h = 0; h < kv_heads; ++h) {
    kvc_ref::kv_stream& s = out[static_cast<std::size_t>(h)];
    for (std::size_t i = 0; i < t.pos.size(); ++i) {
      if (!keep.empty() && keep[static_cast<std::size_t>(h)][i] == 0) continue;
      const std::size_t row = (i * kv_heads + static_cast<std::size_t>(h)) * d;
      s.keys.insert(s.keys.end(), t.k.begin() + static_cast<std::ptrdiff_t>(row),
                    t.k.begin() + static_cast<std::ptrdiff_t>(row) + d);
      s.values.insert(s.values.end(), t.v.begin() + static_cast<std::ptrdiff_t>(row),
                      t.v.begin() + static_cast<std::ptrdiff_t>(row) + d);
      s.positions.push_back(t.pos[i]);
      s.log_weights.push_back(0.0);
    }
  }
  return out;
}

struct query_set {
  std::string name;
  std::vector<std::int32_t> pos;
};

// Decode (one query after every token), interleaved (queries between, at, before and after
// cached positions, in shuffled order, one seeing nothing) and prefill (queries at the
// positions of the newest tokens, enough rows for several row blocks).
std::vector<query_set> query_sets(const std::vector<std::int32_t>& cached, int group, std::mt19937_64& rng) {
  std::vector<query_set> sets;
  const std::int32_t first = cached.front(), last = cached.back();
  sets.push_back({"decode", {last + 1}});
  query_set mixed{"interleaved", {first - 1, first, last, last + 7}};
  for (int i = 0; i < 6; ++i) {
    const std::int32_t p = cached[rng() % cached.size()];
    mixed.pos.push_back(p + static_cast<std::int32_t>(rng() % 2));  // at a cached position or just after it
  }
  std::shuffle(mixed.pos.begin(), mixed.pos.end(), rng);
  sets.push_back(mixed);
  const std::size_t m = std::min<std::size_t>(cached.size(), static_cast<std::size_t>(70 / group + 1));
  sets.push_back({"prefill", std::vector<std::int32_t>(cached.end() - static_cast<std::ptrdiff_t>(m), cached.end())});
  return sets;
}

// Queries see a token when its position is <= theirs; a row with nothing visible is zero.
bool sees_any(const kvc_ref::kv_stream& s, std::int32_t qpos) {
  return std::any_of(s.positions.begin(), s.positions.end(), [qpos](std::int32_t p) { return p <= qpos; });
}

double norm(const double* x, int d) {
  double s = 0.0;
  for (int e = 0; e < d; ++e) s += x[e] * x[e];
  return std::sqrt(s);
}

// Checks one attend() output against (a) the reference on the stored (decoded) tokens and
// (b) the reference on the original tokens, within the codec bound derived below.
template <class Pair>
void check_output(const std::vector<float>& q, const std::vector<std::int32_t>& qpos, const std::vector<float>& out,
                  int num_q_heads, int d, const std::vector<kvc_ref::kv_stream>& stored,
                  const std::vector<kvc_ref::kv_stream>& original) {
  using K = typename Pair::key;
  using V = typename Pair::value;
  const std::vector<double> qd(q.begin(), q.end());
  const std::vector<double> want = kvc_ref::dense_attention(qd, qpos, num_q_heads, d, stored);
  const int group = num_q_heads / kv_heads;

  // (a) Kernel exactness: relative L2 error over the whole output below 1e-5, and rows
  // that see no token exactly zero.
  double err2 = 0.0, ref2 = 0.0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    err2 += (out[i] - want[i]) * (out[i] - want[i]);
    ref2 += want[i] * want[i];
  }
  EXPECT_LE(std::sqrt(err2), 1e-5 * std::sqrt(ref2)) << "relative L2 error vs the reference on stored data";
  for (std::size_t i = 0; i < qpos.size(); ++i)
    for (int h = 0; h < num_q_heads; ++h)
      if (!sees_any(stored[static_cast<std::size_t>(h / group)], qpos[i])) {
        for (int e = 0; e < d; ++e)
          ASSERT_EQ(out[(i * num_q_heads + static_cast<std::size_t>(h)) * d + static_cast<std::size_t>(e)], 0.0f);
      }

  // (b) Against the unrounded tokens. Per element the codecs promise
  //   |x~ - x| <= u |x| + a   (u = relative_error, a = absolute_error),
  // so ||k~_i - k_i|| <= u ||k_i|| + a sqrt(d), and the same for values with their codec.
  // Logits s_i = q.k_i / sqrt(d) (q is not rounded) then move by at most
  //   eps_i = |q.(k~_i - k_i)| / sqrt(d) <= ||q|| (u_K ||k_i|| + a_K sqrt(d)) / sqrt(d).
  // With E = max_i eps_i and a_i = p_i e^(s~_i - s_i) (p = softmax(s), p~ = a / sum a):
  //   ||p~ - p||_1 <= ||a / sum a - a||_1 + ||a - p||_1 = |1 - sum a| + sum p_i |e^(d_i) - 1|
  //                <= 2 sum p_i |e^(d_i) - 1| <= 2 (e^E - 1).
  // Then o~ - o = sum p_i (v~_i - v_i) + sum (p~_i - p_i) v~_i, and ||v~_i|| <= (1 + u_V) ||v_i|| + a_V sqrt(d):
  //   ||o~ - o|| <= Vmax (u_V + 2 (e^E - 1)(1 + u_V)) + a_V sqrt(d) (1 + 2 (e^E - 1)),
  // Vmax = max_i ||v_i||, all maxima over the tokens the row sees; plus the float kernel's
  // own error, bounded by (a) well inside 2e-5 Vmax.
  const std::vector<double> exact = kvc_ref::dense_attention(qd, qpos, num_q_heads, d, original);
  const double uk = K::relative_error, ak = K::absolute_error, uv = V::relative_error, av = V::absolute_error;
  const double sd = std::sqrt(static_cast<double>(d));
  // Running maxima of ||k_i|| and ||v_i|| over each stream's first tokens (positions increase).
  std::vector<std::vector<double>> kmax(original.size()), vmax_upto(original.size());
  for (std::size_t h = 0; h < original.size(); ++h) {
    const kvc_ref::kv_stream& s = original[h];
    double km = 0.0, vm = 0.0;
    for (std::size_t t = 0; t < s.size(); ++t) {
      km = std::max(km, norm(&s.keys[t * d], d));
      vm = std::max(vm, norm(&s.values[t * d], d));
      kmax[h].push_back(km);
      vmax_upto[h].push_back(vm);
    }
  }
  for (std::size_t i = 0; i < qpos.size(); ++i) {
    for (int h = 0; h < num_q_heads; ++h) {
      const std::size_t kvh = static_cast<std::size_t>(h / group);
      const kvc_ref::kv_stream& s = original[kvh];
      const std::size_t row = (i * num_q_heads + static_cast<std::size_t>(h)) * d;
      const std::size_t seen = static_cast<std::size_t>(
          std::upper_bound(s.positions.begin(), s.positions.end(), qpos[i]) - s.positions.begin());
      if (seen == 0) continue;  // zero output, checked exactly above
      const double E = norm(&qd[row], d) * (uk * kmax[kvh][seen - 1] + ak * sd) / sd;
      const double vmax = vmax_upto[kvh][seen - 1];
      const double bound = vmax * (uv + 2 * std::expm1(E) * (1 + uv)) + av * sd * (1 + 2 * std::expm1(E)) + 2e-5 * vmax;
      double err = 0.0;
      for (int e = 0; e < d; ++e) err += (out[row + e] - exact[row + e]) * (out[row + e] - exact[row + e]);
      ASSERT_LE(std::sqrt(err), bound) << "query " << i << " head " << h << " E " << E << " Vmax " << vmax;
    }
  }
}

// Runs every query set on every layer and checks it.
template <class Pair>
void check_all_queries(cache_of<Pair>& cache, kvc::seq_id id, const std::vector<layer_tokens>& data,
                       const std::vector<std::vector<std::vector<std::uint8_t>>>& keep, std::mt19937_64& rng) {
  const int d = cache.shape().head_dim, qh = cache.shape().num_q_heads;
  for (int l = 0; l < cache.shape().num_layers; ++l) {
    const auto stored = streams_from_view(cache, id, l);
    const auto original =
        streams_from_input(data[static_cast<std::size_t>(l)], d,
                           keep.empty() ? std::vector<std::vector<std::uint8_t>>{} : keep[static_cast<std::size_t>(l)]);
    for (const query_set& qs : query_sets(data[static_cast<std::size_t>(l)].pos, qh / kv_heads, rng)) {
      SCOPED_TRACE("layer " + std::to_string(l) + ", " + qs.name);
      const std::size_t n = qs.pos.size() * static_cast<std::size_t>(qh) * d;
      std::normal_distribution<float> normal(0.0f, rng() % 2 == 0 ? 1.0f : 2.5f);  // 2.5: peaked attention
      std::vector<float> q(n);
      for (float& x : q) x = normal(rng);
      std::vector<float> out(n, std::numeric_limits<float>::quiet_NaN());  // every row must be written
      ASSERT_TRUE(cache.attend(id, l, q.data(), qs.pos.data(), static_cast<int>(qs.pos.size()), out.data()).ok());
      check_output<Pair>(q, qs.pos, out, qh, d, stored, original);
    }
  }
}

template <class Pair>
void run_case(const shape_case& c, std::uint64_t seed) {
  SCOPED_TRACE("group " + std::to_string(c.group) + ", head_dim " + std::to_string(c.head_dim) + ", page_tokens " +
               std::to_string(c.page_tokens) + ", tokens " + std::to_string(c.n_tokens));
  std::mt19937_64 rng(seed);
  auto cache = cache_of<Pair>::create(make_config(c));
  ASSERT_TRUE(cache.ok()) << cache.status().message();
  const kvc::seq_id id = cache->create_sequence();
  std::vector<layer_tokens> data;
  for (int l = 0; l < c.layers; ++l) {
    data.push_back(random_tokens(rng, c.n_tokens, c.head_dim, static_cast<std::int32_t>(rng() % 5)));
    append_in_chunks(*cache, id, l, data.back(), c.n_tokens > 500 ? 400 : 2 * c.page_tokens + 1, rng);
  }
  check_all_queries<Pair>(*cache, id, data, {}, rng);
}

template <class Pair>
class Attend : public ::testing::Test {};
using codec_pairs =
    ::testing::Types<codec_pair<kvc::codec::f32, kvc::codec::f32, 0>, codec_pair<kvc::codec::f16, kvc::codec::f16, 1>,
                     codec_pair<kvc::codec::bf16, kvc::codec::bf16, 2>,
                     codec_pair<kvc::codec::f16, kvc::codec::bf16, 0>>;
struct pair_names {
  template <class T>
  static std::string GetName(int) {
    return std::string(T::key::name) + "_" + T::value::name;
  }
};
TYPED_TEST_SUITE(Attend, codec_pairs, pair_names);

// Lengths P-1, P, P+1 (open page only, exactly one sealed page, sealed + open) over
// GQA groups 1, 4, 8, head_dim 64, 128 and page_tokens 16, 32, 64.
TYPED_TEST(Attend, MatchesReferenceAroundPageBoundaries) {
  std::uint64_t seed = 100;
  for (const int group : {1, 4, 8})
    for (const int d : {64, 128})
      for (const int P : {16, 32, 64})
        for (const int n : {P - 1, P, P + 1}) run_case<TypeParam>({group, d, P, n}, ++seed);
}

// Page sizes that are not multiples of the kernel's tile, head sizes that are not
// multiples of its vector width, and a GQA group of 3.
TYPED_TEST(Attend, MatchesReferenceOddShapes) {
  std::uint64_t seed = 500;
  for (const int P : {1, 5, 24})
    for (const int d : {8, 40, 100})
      for (const int group : {1, 3}) run_case<TypeParam>({group, d, P, 3 * P + 2}, ++seed);
}

// A few thousand tokens: many sealed pages, several row blocks per KV head. Each codec
// pair runs one of the shapes (the kernel's page walk does not depend on the codec).
TYPED_TEST(Attend, MatchesReferenceLongStreams) {
  const shape_case cases[] = {{4, 128, 16, 2500, 1}, {8, 64, 64, 2500, 1}, {1, 128, 32, 2500, 1}};
  run_case<TypeParam>(cases[TypeParam::long_case], 1);
}

// A hand-made policy: keeps exactly the tokens a predetermined mask marks.
struct mask_policy {
  const std::vector<std::vector<std::uint8_t>>* masks;  // [stream in scope][token]
  template <class Ctx>
  kvc::status plan(Ctx& ctx) const {
    for (int i = 0; i < ctx.num_streams(); ++i) {
      const std::vector<std::uint8_t>& m = (*masks)[static_cast<std::size_t>(i)];
      if (static_cast<int>(m.size()) != ctx.info(i).n_tokens)
        return kvc::status::error(kvc::status_code::invalid_argument, "mask size");
      std::copy(m.begin(), m.end(), ctx.keep(i));
    }
    return kvc::ok_status();
  }
};

// After compress() leaves partial sealed pages in the middle of streams, and after a fork
// shares and then copies pages, attend still equals the reference over what is retained.
TYPED_TEST(Attend, MatchesReferenceAfterCompressAndFork) {
  std::mt19937_64 rng(7);
  const shape_case c{4, 64, 16, 300};
  auto cache = cache_of<TypeParam>::create(make_config(c));
  ASSERT_TRUE(cache.ok()) << cache.status().message();
  const kvc::seq_id id = cache->create_sequence();
  std::vector<layer_tokens> data;
  for (int l = 0; l < c.layers; ++l) {
    data.push_back(random_tokens(rng, c.n_tokens, c.head_dim, 0));
    append_in_chunks(*cache, id, l, data.back(), 40, rng);
  }
  // keep[layer][head][token]: about 60% kept, scattered, the first token of every stream dropped.
  std::vector<std::vector<std::vector<std::uint8_t>>> keep(static_cast<std::size_t>(c.layers));
  std::vector<std::vector<std::uint8_t>> flat;
  for (int l = 0; l < c.layers; ++l)
    for (int h = 0; h < kv_heads; ++h) {
      std::vector<std::uint8_t> m(static_cast<std::size_t>(c.n_tokens));
      for (auto& k : m) k = rng() % 5 < 3;
      m[0] = 0;
      keep[static_cast<std::size_t>(l)].push_back(m);
      flat.push_back(m);
    }
  auto rep = cache->compress(id, mask_policy{&flat});
  ASSERT_TRUE(rep.ok()) << rep.status().message();
  bool partial_in_middle = false;
  for (int h = 0; h < kv_heads; ++h) {
    auto v = cache->view(id, 0, h);
    for (int i = 0; i + 1 < v->page_count(); ++i) partial_in_middle |= v->page_tokens(i) < c.page_tokens;
  }
  EXPECT_TRUE(partial_in_middle) << "the case should leave a partial sealed page before the last page";
  check_all_queries<TypeParam>(*cache, id, data, keep, rng);

  // Fork; the child drops more tokens and appends new ones; both must answer from their own tokens.
  auto child = cache->fork(id);
  ASSERT_TRUE(child.ok());
  std::vector<layer_tokens> child_data = data;
  std::vector<std::vector<std::vector<std::uint8_t>>> child_keep = keep;
  std::vector<std::vector<std::uint8_t>> flat2;
  for (int l = 0; l < c.layers; ++l)
    for (int h = 0; h < kv_heads; ++h) {
      std::vector<std::uint8_t>& k = child_keep[static_cast<std::size_t>(l)][static_cast<std::size_t>(h)];
      std::vector<std::uint8_t> m;
      for (std::size_t t = 0; t < k.size(); ++t) {
        if (k[t] == 0) continue;
        const std::uint8_t keep_it = rng() % 4 != 0;
        m.push_back(keep_it);
        k[t] = keep_it;
      }
      flat2.push_back(m);
    }
  ASSERT_TRUE(cache->compress(*child, mask_policy{&flat2}).ok());
  for (int l = 0; l < c.layers; ++l) {
    layer_tokens extra = random_tokens(rng, 37, c.head_dim, data[static_cast<std::size_t>(l)].pos.back() + 1);
    append_in_chunks(*cache, *child, l, extra, 10, rng);
    layer_tokens& cd = child_data[static_cast<std::size_t>(l)];
    cd.k.insert(cd.k.end(), extra.k.begin(), extra.k.end());
    cd.v.insert(cd.v.end(), extra.v.begin(), extra.v.end());
    cd.pos.insert(cd.pos.end(), extra.pos.begin(), extra.pos.end());
    for (auto& k : child_keep[static_cast<std::size_t>(l)]) k.insert(k.end(), extra.pos.size(), 1);
  }
  check_all_queries<TypeParam>(*cache, *child, child_data, child_keep, rng);
  check_all_queries<TypeParam>(*cache, id, data, keep, rng);
}

// A layer that holds no tokens gives zero output for every query.
TYPED_TEST(Attend, EmptyStreamGivesZeros) {
  auto cache = cache_of<TypeParam>::create(make_config({2, 64, 16, 64}));
  ASSERT_TRUE(cache.ok());
  const kvc::seq_id id = cache->create_sequence();
  std::mt19937_64 rng(3);
  append_in_chunks(*cache, id, 0, random_tokens(rng, 20, 64, 0), 8, rng);  // layer 1 stays empty
  const int qh = cache->shape().num_q_heads;
  std::vector<float> q(static_cast<std::size_t>(3) * qh * 64, 1.0f);
  std::vector<float> out(q.size(), std::numeric_limits<float>::quiet_NaN());
  const std::int32_t pos[3] = {0, 100, 1000};
  ASSERT_TRUE(cache->attend(id, 1, q.data(), pos, 3, out.data()).ok());
  for (float x : out) ASSERT_EQ(x, 0.0f);
}

// Strided views (K and V slices of a fused QKV buffer, head-major buffers, padded head
// strides) store the same tokens and give bit-identical outputs as contiguous buffers.
TYPED_TEST(Attend, StridedInputsMatchContiguous) {
  const int g = 4, d = 64, P = 16, n = 70, qh = kv_heads * g;
  const int nq = 5;
  std::mt19937_64 rng(11);
  const layer_tokens t = random_tokens(rng, n, d, 3);
  std::normal_distribution<float> normal(0.0f, 1.5f);
  std::vector<float> q(static_cast<std::size_t>(nq) * qh * d);
  for (float& x : q) x = normal(rng);
  const std::int32_t qpos[nq] = {t.pos[10], t.pos[n - 1] + 1, 0, t.pos[40] + 1, t.pos[P]};

  // Fused per token: [q heads | k heads | v heads] x d, for the keys and values and the queries.
  const int fused_heads = qh + 2 * kv_heads;
  std::vector<float> fused(static_cast<std::size_t>(std::max(n, nq)) * fused_heads * d, -7.0f);
  for (int i = 0; i < n; ++i)
    for (int h = 0; h < kv_heads; ++h)
      for (int e = 0; e < d; ++e) {
        const std::size_t src = (static_cast<std::size_t>(i) * kv_heads + h) * d + e;
        fused[(static_cast<std::size_t>(i) * fused_heads + qh + h) * d + e] = t.k[src];
        fused[(static_cast<std::size_t>(i) * fused_heads + qh + kv_heads + h) * d + e] = t.v[src];
      }
  for (int i = 0; i < nq; ++i)
    for (int h = 0; h < qh; ++h)
      for (int e = 0; e < d; ++e)
        fused[(static_cast<std::size_t>(i) * fused_heads + h) * d + e] =
            q[(static_cast<std::size_t>(i) * qh + h) * d + e];
  // Head-major [heads][n][d] copies, with 8 floats of padding after every head's block.
  const std::int64_t hm_stride = static_cast<std::int64_t>(n) * d + 8;
  std::vector<float> khm(static_cast<std::size_t>(kv_heads * hm_stride)), vhm(khm.size());
  for (int i = 0; i < n; ++i)
    for (int h = 0; h < kv_heads; ++h)
      for (int e = 0; e < d; ++e) {
        const std::size_t src = (static_cast<std::size_t>(i) * kv_heads + h) * d + e;
        khm[static_cast<std::size_t>(h * hm_stride + i * d + e)] = t.k[src];
        vhm[static_cast<std::size_t>(h * hm_stride + i * d + e)] = t.v[src];
      }

  auto make = [&] {
    auto c = cache_of<TypeParam>::create(make_config({g, d, P, n}));
    EXPECT_TRUE(c.ok());
    return std::move(c.value());
  };
  auto dense = make(), fused_cache = make(), head_major = make();
  const kvc::seq_id a = dense.create_sequence(), b = fused_cache.create_sequence(), c = head_major.create_sequence();
  using ct = kvc::const_tensor3<float>;
  const std::int64_t fs = static_cast<std::int64_t>(fused_heads) * d;
  for (int i0 = 0; i0 < n; i0 += 23) {  // several calls, so chunks start mid-page
    const int m = std::min(23, n - i0);
    const std::size_t off = static_cast<std::size_t>(i0) * kv_heads * d;
    ASSERT_TRUE(dense.append(a, 0, t.k.data() + off, t.v.data() + off, t.pos.data() + i0, m).ok());
    const float* fk = fused.data() + static_cast<std::size_t>(i0) * fs + static_cast<std::size_t>(qh) * d;
    const float* fv = fk + static_cast<std::size_t>(kv_heads) * d;
    ASSERT_TRUE(
        fused_cache
            .append(b, 0, ct{fk, {m, kv_heads, d}, {fs, d, 1}}, ct{fv, {m, kv_heads, d}, {fs, d, 1}}, t.pos.data() + i0)
            .ok());
    const float* hk = khm.data() + static_cast<std::size_t>(i0) * d;
    const float* hv = vhm.data() + static_cast<std::size_t>(i0) * d;
    ASSERT_TRUE(head_major
                    .append(c, 0, ct{hk, {m, kv_heads, d}, {d, hm_stride, 1}},
                            ct{hv, {m, kv_heads, d}, {d, hm_stride, 1}}, t.pos.data() + i0)
                    .ok());
  }
  for (int h = 0; h < kv_heads; ++h) {
    const kvc::row_matrix ka = dense.view(a, 0, h)->keys(), va = dense.view(a, 0, h)->values();
    EXPECT_TRUE(ka == fused_cache.view(b, 0, h)->keys());
    EXPECT_TRUE(va == fused_cache.view(b, 0, h)->values());
    EXPECT_TRUE(ka == head_major.view(c, 0, h)->keys());
    EXPECT_TRUE(va == head_major.view(c, 0, h)->values());
  }

  std::vector<float> out_dense(q.size());
  ASSERT_TRUE(dense.attend(a, 0, q.data(), qpos, nq, out_dense.data()).ok());
  // Queries from the fused buffer, output into a padded head-major buffer.
  const std::int64_t out_hs = static_cast<std::int64_t>(nq) * d + 16;
  std::vector<float> out_hm(static_cast<std::size_t>(qh * out_hs), -3.0f);
  ASSERT_TRUE(fused_cache
                  .attend(b, 0, ct{fused.data(), {nq, qh, d}, {fs, d, 1}}, qpos,
                          kvc::tensor3<float>{out_hm.data(), {nq, qh, d}, {d, out_hs, 1}})
                  .ok());
  // Head-major queries, contiguous output.
  std::vector<float> qhm(static_cast<std::size_t>(qh) * nq * d);
  for (int i = 0; i < nq; ++i)
    for (int h = 0; h < qh; ++h)
      for (int e = 0; e < d; ++e)
        qhm[(static_cast<std::size_t>(h) * nq + i) * d + e] = q[(static_cast<std::size_t>(i) * qh + h) * d + e];
  std::vector<float> out_c(q.size());
  ASSERT_TRUE(head_major
                  .attend(c, 0, ct{qhm.data(), {nq, qh, d}, {d, static_cast<std::int64_t>(nq) * d, 1}}, qpos,
                          kvc::tensor3<float>::contiguous(out_c.data(), nq, qh, d))
                  .ok());
  for (int i = 0; i < nq; ++i)
    for (int h = 0; h < qh; ++h)
      for (int e = 0; e < d; ++e) {
        const float want = out_dense[(static_cast<std::size_t>(i) * qh + h) * d + e];
        ASSERT_EQ(out_hm[static_cast<std::size_t>(h * out_hs + i * d + e)], want) << i << " " << h << " " << e;
        ASSERT_EQ(out_c[(static_cast<std::size_t>(i) * qh + h) * d + e], want);
      }
  for (int h = 0; h < qh; ++h)  // the padding between heads is not written
    for (int e = nq * d; e < out_hs; ++e) ASSERT_EQ(out_hm[static_cast<std::size_t>(h * out_hs + e)], -3.0f);
  // And the contiguous answer is the reference answer.
  check_output<TypeParam>(q, std::vector<std::int32_t>(qpos, qpos + nq), out_dense, qh, d,
                          streams_from_view(dense, a, 0), streams_from_input(t, d));
}

}  // namespace
