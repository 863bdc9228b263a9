// kvc::paged_kv_cache<KeyCodec> with a KeyCodec that is not a codec must not compile
// (static_assert in kvc/cache.hpp).
#include <cstdint>

#include <kvc/cache.hpp>
#include <kvc/codecs/f16.hpp>

namespace {

struct not_a_codec {  // a storage type, but none of the codec members
  using storage = std::uint16_t;
};

static_assert(!kvc::is_codec_v<not_a_codec>, "the trait must reject not_a_codec");
static_assert(kvc::is_codec_v<kvc::codec::f16>, "the trait must accept f16");

#ifdef KVC_FAILTEST_SHOULD_FAIL
using codec = not_a_codec;
#else
using codec = kvc::codec::f16;
#endif

}  // namespace

std::size_t page_bytes() {
  kvc::cache_config config;
  config.shape = {1, 1, 1, 8};
  config.capacity_bytes = std::size_t{1} << 16;
  auto cache = kvc::paged_kv_cache<codec>::create(config);
  return cache ? cache->sealed_page_bytes() : 0;
}
