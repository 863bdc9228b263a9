// kvc/kvc.hpp: everything in one include.
//
//   #include <kvc/kvc.hpp>
//   auto cache = kvc::paged_kv_cache<kvc::codec::f16>::create(config);
//
// kvc is header-only; link the CMake target kvc::kvc (it brings Eigen 3.4).
#pragma once

#include "kvc/budget/adakv.hpp"
#include "kvc/budget/budget.hpp"
#include "kvc/budget/byte_cap.hpp"
#include "kvc/budget/pyramid.hpp"
#include "kvc/budget/uniform.hpp"
#include "kvc/cache.hpp"
#include "kvc/codecs/bf16.hpp"
#include "kvc/codecs/codec.hpp"
#include "kvc/codecs/f16.hpp"
#include "kvc/codecs/f32.hpp"
#include "kvc/codecs/quantized.hpp"
#include "kvc/config.hpp"
#include "kvc/io/npy.hpp"
#include "kvc/policies/decode_schedule.hpp"
#include "kvc/policies/evict.hpp"
#include "kvc/policies/policy.hpp"
#include "kvc/pool.hpp"
#include "kvc/rope.hpp"
#include "kvc/score/compactor.hpp"
#include "kvc/score/expected_attention.hpp"
#include "kvc/score/h2o.hpp"
#include "kvc/score/keydiff.hpp"
#include "kvc/score/knorm.hpp"
#include "kvc/score/leverage.hpp"
#include "kvc/score/oracle.hpp"
#include "kvc/score/qfilter.hpp"
#include "kvc/score/random.hpp"
#include "kvc/score/scorer.hpp"
#include "kvc/score/snapkv.hpp"
#include "kvc/score/streaming.hpp"
#include "kvc/score/tova.hpp"
#include "kvc/status.hpp"
#include "kvc/stream.hpp"
#include "kvc/tensor.hpp"
#include "kvc/version.hpp"
#include "kvc/workspace.hpp"
