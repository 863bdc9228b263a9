// kvc/score/h2o.hpp: H2O, the heavy-hitter oracle (Zhang et al., "H2O: Heavy-Hitter Oracle
// for Efficient Generative Inference of Large Language Models", NeurIPS 2023,
// arXiv:2306.14048, Sec. 3.2 and Algorithm 1 in Sec. 4.1): a token's importance is the
// attention it has accumulated from the queries that attended it (Algorithm 1's score
// function, the sum over decoding steps of the attention the token received); the heavy
// hitters are kept.
//
// The statistics come from attend() (cache_config::observe.track_attention): per retained
// token, attention_sum (attention summed over every query that attended it, averaged over
// the KV head's query group) and attention_count (how many queries could see it: position
// <= the query's). They follow the token through compress(). With A_{r,i} the group-mean
// attention of query r to token i and R_i the queries that could see token i:
//
//   normalize = true (default):  s_i = (sum_{r in R_i} A_{r,i}) / |R_i|
//   normalize = false:           s_i = sum_{r in R_i} A_{r,i}       (Algorithm 1 as written)
//
// The normalised form is the mean attention per query that could see the token, as in
// kvpress's ObservedAttentionPress (scores divided by the number of queries in the sum): the
// raw sum favours old tokens, which more queries have seen, over tokens appended later. A
// token no query has seen yet (attention_count 0: appended after the last attend()) scores
// +inf, so a fresh token is never evicted before it has been observed. A stream that no
// query has seen at all is an error (invalid_argument): there is nothing to rank by.
//
// Usable at prefill (after attend() ran the prompt's queries) and during decoding (the
// statistics keep accumulating, one query per step). Reads no keys: O(n) per stream.
//
// GQA: attend() tracks the group mean, so the reduction over the group is the mean; the
// max is not available from the tracked statistics. H2O's recent window (the paper keeps
// heavy hitters plus the most recent tokens) is a budget matter: compose with a policy
// that protects recent tokens.
#pragma once

#include <limits>

#include "kvc/score/scorer.hpp"

KVC_NAMESPACE_BEGIN
namespace score {

struct h2o {
  static constexpr const char* name = "h2o";
  static constexpr stream_fields fields = stream_fields::attention;
  bool normalize = true;  // divide the accumulated attention by the number of queries that could see the token

  status score(const stream_data& s, workspace& /*ws*/, float* out) const noexcept {
    const int n = s.size();
    if (n == 0) return ok_status();
    if (s.attention_sum == nullptr || s.attention_count == nullptr)
      return status::error(status_code::invalid_argument,
                           "h2o: stream (layer %d, kv_head %d) has no attention statistics; set "
                           "cache_config::observe.track_attention and attend() before compressing",
                           s.info.layer, s.info.kv_head);
    bool observed = false;
    for (int i = 0; i < n; ++i) {
      const float c = s.attention_count[i];
      observed = observed || c > 0.0f;
      out[i] = !(c > 0.0f) ? std::numeric_limits<float>::infinity()
                           : (normalize ? s.attention_sum[i] / c : s.attention_sum[i]);
    }
    if (!observed)
      return status::error(status_code::invalid_argument,
                           "h2o: no query has attended any token of stream (layer %d, kv_head %d) yet; attend() "
                           "before compressing",
                           s.info.layer, s.info.kv_head);
    return ok_status();
  }
};

}  // namespace score
KVC_NAMESPACE_END
