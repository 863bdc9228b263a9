// A program that uses kvc the way an engine would, built by the package.* tests against an
// installed kvc (find_package) and against the source tree (add_subdirectory).
#include <kvc/kvc.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

namespace {

int fail(const char* what, const kvc::status& s) {
  std::fprintf(stderr, "kvc_consumer: %s: %s (%s)\n", what, s.message(), kvc::to_string(s.code()));
  return 1;
}

}  // namespace

int main() {
#ifdef KVC_PACKAGE_VERSION
  if (std::strcmp(KVC_PACKAGE_VERSION, KVC_VERSION_STRING) != 0) {
    std::fprintf(stderr, "kvc_consumer: package version %s, headers say %s\n", KVC_PACKAGE_VERSION, KVC_VERSION_STRING);
    return 1;
  }
#endif
  kvc::cache_config config;
  config.shape = {/*num_layers=*/1, /*num_q_heads=*/4, /*num_kv_heads=*/2, /*head_dim=*/8};
  config.page_tokens = 4;
  config.capacity_bytes = std::size_t{1} << 20;
  config.max_context = 64;
  auto cache = kvc::paged_kv_cache<kvc::codec::f32>::create(config);
  if (!cache) return fail("create", cache.status());

  const int n = 10, kv_heads = 2, q_heads = 4, d = 8;
  std::vector<float> k(n * kv_heads * d), v(n * kv_heads * d), q(q_heads * d), out(q_heads * d);
  std::vector<std::int32_t> positions(n);
  for (int t = 0; t < n; ++t) positions[t] = t;
  for (std::size_t i = 0; i < k.size(); ++i) {
    k[i] = std::sin(0.37f * static_cast<float>(i));
    v[i] = std::cos(0.21f * static_cast<float>(i));
  }
  for (std::size_t i = 0; i < q.size(); ++i) q[i] = std::sin(0.11f * static_cast<float>(i) + 1.0f);

  const kvc::seq_id seq = cache->create_sequence();
  kvc::status s = cache->append(seq, 0, k.data(), v.data(), positions.data(), n);
  if (!s) return fail("append", s);
  const std::int32_t q_position = n - 1;
  s = cache->attend(seq, 0, q.data(), &q_position, 1, out.data());
  if (!s) return fail("attend", s);

  // Dense softmax(q.k / sqrt(d)) v for every query head, against its KV head.
  double max_err = 0.0;
  for (int h = 0; h < q_heads; ++h) {
    const int kvh = h / (q_heads / kv_heads);
    std::vector<double> logits(n);
    double m = -1e300, sum = 0.0;
    for (int t = 0; t < n; ++t) {
      double dot = 0.0;
      for (int j = 0; j < d; ++j) dot += double{q[h * d + j]} * k[(t * kv_heads + kvh) * d + j];
      logits[t] = dot / std::sqrt(double{d});
      m = std::max(m, logits[t]);
    }
    for (int t = 0; t < n; ++t) sum += std::exp(logits[t] - m);
    for (int j = 0; j < d; ++j) {
      double ref = 0.0;
      for (int t = 0; t < n; ++t) ref += std::exp(logits[t] - m) / sum * v[(t * kv_heads + kvh) * d + j];
      max_err = std::max(max_err, std::abs(ref - double{out[h * d + j]}));
    }
  }
  if (!(max_err < 1e-5)) {
    std::fprintf(stderr, "kvc_consumer: attend differs from dense attention by %g\n", max_err);
    return 1;
  }

  auto report = cache->compress(seq, kvc::evict<kvc::score::knorm, kvc::budget::uniform>(
                                         kvc::score::knorm{}, kvc::budget::uniform::keep_fraction(0.5)));
  if (!report) return fail("compress", report.status());
  if (report->tokens_before != n * kv_heads || report->tokens_after != n * kv_heads / 2) {
    std::fprintf(stderr, "kvc_consumer: compress kept %lld of %lld tokens, expected %d\n",
                 static_cast<long long>(report->tokens_after), static_cast<long long>(report->tokens_before),
                 n * kv_heads / 2);
    return 1;
  }
  std::printf("kvc %s: append, attend (max error %.2g) and compress work\n", KVC_VERSION_STRING, max_err);
  return 0;
}
