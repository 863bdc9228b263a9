#include <gtest/gtest.h>

#include <kvc/kvc.hpp>

TEST(Smoke, CreatesACache) {
  kvc::cache_config cfg;
  cfg.shape = {1, 2, 1, 8};
  cfg.capacity_bytes = 1 << 20;
  cfg.max_context = 64;
  auto cache = kvc::paged_kv_cache<kvc::codec::f32>::create(cfg);
  ASSERT_TRUE(cache.ok()) << cache.status().message();
}
