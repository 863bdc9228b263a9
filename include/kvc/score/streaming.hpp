// kvc/score/streaming.hpp: StreamingLLM (Xiao et al., "Efficient Streaming Language
// Models with Attention Sinks", 2023, Sec. 3.2): keep the first `sinks` tokens (the
// attention sinks) and the most recent tokens; with a budget of k tokens the kept set is
// the sinks plus a recent window of k - sinks tokens.
//
// Scores, by retained index i of n: i for the window candidates (recency), and
// n + (sinks - i) for the sinks, which outranks every non-sink and, when the budget is
// smaller than the sink count, prefers the earliest sinks. Exact for n < 2^24.
#pragma once

#include "kvc/score/scorer.hpp"

KVC_NAMESPACE_BEGIN
namespace score {

struct streaming {
  static constexpr const char* name = "streaming";
  static constexpr stream_fields fields = stream_fields::none;
  int sinks = 4;

  status score(const stream_data& s, workspace& /*ws*/, float* out) const noexcept {
    if (sinks < 0) return status::error(status_code::invalid_argument, "streaming: sinks is %d, must be >= 0", sinks);
    const int n = s.size();
    for (int i = 0; i < n; ++i) out[i] = static_cast<float>(i < sinks ? n + (sinks - i) : i);
    return ok_status();
  }
};

}  // namespace score
KVC_NAMESPACE_END
