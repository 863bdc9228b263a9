// codec::gear over a key codec with more than one grid a page must not compile
// (static_assert in kvc/codecs/gear.hpp): gear encodes every changed page afresh, so the
// extra grids would only cost bytes.
#include <cstddef>

#include <kvc/codecs/gear.hpp>
#include <kvc/codecs/quantized.hpp>

namespace {

#ifdef KVC_FAILTEST_SHOULD_FAIL
using base = kvc::codec::kivi_channel<2, kvc::codec::rotation::none, 3>;
#else
using base = kvc::codec::kivi_channel<2>;
#endif

}  // namespace

std::size_t page_bytes() { return kvc::codec::gear<base>::page_bytes(64, 128); }
