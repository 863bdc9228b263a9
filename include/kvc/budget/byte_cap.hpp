// kvc/budget/byte_cap.hpp: a byte budget for the streams in scope (a whole sequence when
// compress() runs over all layers). It picks per-stream token counts so that the pages the
// streams hold after compaction take at most `bytes`, and stops only when no stream can
// keep one more token within the cap: as close to the cap as page granularity allows.
//
// Bytes after compaction. A stream keeping its k best tokens (budget.hpp's order) keeps
// s(k) of the tokens in its sealed pages and o(k) = k - s(k) of those in its open page, and
// then holds (paged_kv_cache::compress)
//   bytes(k) = ceil(s(k) / P) * sealed_page_bytes + (o(k) > 0 ? open_page_bytes : 0),
// with P = page_tokens. bytes(k) never decreases with k, because the kept sets are nested.
//
// Counts. First a water level: the largest T with sum_i bytes_i(min(n_i, T)) <= bytes.
// Then, in rounds over the streams in order, each stream takes its next tokens while they
// cost nothing (they fit a page it already holds) and at most one that costs a new page,
// if the bytes left pay for it. The rounds end when no stream can grow: then every stream
// either keeps all its tokens or its next token would need more bytes than are left.
//
//   byte_cap(bytes)
// Needs the scores, the page layout and a scratch workspace in the request (kvc::evict
// passes all three from paged_kv_cache::compress; a request without the page layout gets
// status_code::unsupported). The ranking takes 4 bytes per token plus 4 per stream.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "kvc/budget/budget.hpp"
#include "kvc/workspace.hpp"

KVC_NAMESPACE_BEGIN
namespace budget {

class byte_cap {
 public:
  constexpr explicit byte_cap(std::size_t bytes) noexcept : bytes_(bytes) {}

  constexpr std::size_t bytes() const noexcept { return bytes_; }

  // What a stream holds after compaction when it keeps s of its sealed tokens and o of its
  // open-page tokens.
  static std::size_t stream_bytes(std::int64_t s, std::int64_t o, const budget_request& r) noexcept {
    const std::int64_t p = r.page_tokens;
    return static_cast<std::size_t>((s + p - 1) / p) * r.sealed_page_bytes + (o > 0 ? r.open_page_bytes : 0);
  }

  status allocate(const budget_request& r, std::int32_t* keep) const noexcept {
    if (r.num_streams == 0) return ok_status();
    if (r.sealed_tokens == nullptr)
      return status::error(status_code::unsupported,
                           "byte_cap: the budget request carries no page layout; use the budget through kvc::evict "
                           "on a paged_kv_cache");
    if (r.page_tokens < 1)
      return status::error(status_code::invalid_argument, "byte_cap: page_tokens %d in the request", r.page_tokens);
    if (r.scores == nullptr)
      return status::error(status_code::invalid_argument, "byte_cap: the budget request carries no scores");
    if (r.scratch == nullptr)
      return status::error(status_code::invalid_argument, "byte_cap: the budget request carries no scratch workspace");

    // Everything fits: no ranking needed.
    std::size_t all = 0;
    for (int i = 0; i < r.num_streams; ++i)
      all += stream_bytes(r.sealed_tokens[i], r.streams[i].n_tokens - r.sealed_tokens[i], r);
    if (all <= bytes_) {
      for (int i = 0; i < r.num_streams; ++i) keep[i] = r.streams[i].n_tokens;
      return ok_status();
    }

    // sealed_in[i][k]: how many of stream i's k best tokens lie in sealed pages, [n_i + 1].
    workspace& ws = *r.scratch;
    workspace_scope scope(ws);
    std::int32_t** sealed_in = ws.alloc<std::int32_t*>(static_cast<std::size_t>(r.num_streams));
    if (sealed_in == nullptr) return full(ws);
    std::int32_t max_n = 0;
    for (int i = 0; i < r.num_streams; ++i) {
      const std::int32_t n = r.streams[i].n_tokens;
      max_n = std::max(max_n, n);
      std::int32_t* a = ws.alloc<std::int32_t>(static_cast<std::size_t>(n) + 1);
      if (a == nullptr) return full(ws);
      sealed_in[i] = a;
      for (std::int32_t t = 0; t < n; ++t) a[t] = t;
      const float* s = r.scores[i];
      std::sort(a, a + n, [s](std::int32_t x, std::int32_t y) { return detail::ranks_before(s, x, y); });
      // In place: entry j + 1 counts the sealed tokens among the first j + 1 ranked.
      const std::int32_t sealed = r.sealed_tokens[i];
      std::int32_t count = 0, next = n > 0 ? a[0] : 0;
      a[0] = 0;
      for (std::int32_t j = 0; j < n; ++j) {
        const std::int32_t token = next;
        if (j + 1 < n) next = a[j + 1];
        count += token < sealed ? 1 : 0;
        a[j + 1] = count;
      }
    }
    const auto cost = [&](int i, std::int32_t k) { return stream_bytes(sealed_in[i][k], k - sealed_in[i][k], r); };
    const auto level_bytes = [&](std::int32_t t) {
      std::size_t b = 0;
      for (int i = 0; i < r.num_streams; ++i) b += cost(i, std::min(t, r.streams[i].n_tokens));
      return b;
    };

    // The water level: level_bytes(lo) <= bytes_ < level_bytes(hi).
    std::int32_t lo = 0, hi = max_n;
    while (hi - lo > 1) {
      const std::int32_t mid = lo + (hi - lo) / 2;
      if (level_bytes(mid) <= bytes_)
        lo = mid;
      else
        hi = mid;
    }
    std::size_t used = 0;
    for (int i = 0; i < r.num_streams; ++i) {
      keep[i] = std::min(lo, r.streams[i].n_tokens);
      used += cost(i, keep[i]);
    }

    // Rounds: free tokens, and at most one new page per stream per round.
    for (bool grew = true; grew;) {
      grew = false;
      for (int i = 0; i < r.num_streams; ++i) {
        bool paid = false;
        while (keep[i] < r.streams[i].n_tokens) {
          const std::size_t now = cost(i, keep[i]), then = cost(i, keep[i] + 1);
          if (then == now) {
            ++keep[i];
          } else if (!paid && then - now <= bytes_ - used) {
            used += then - now;
            ++keep[i];
            paid = true;
          } else {
            break;
          }
          grew = true;
        }
      }
    }
    return ok_status();
  }

 private:
  static status full(const workspace& ws) noexcept {
    return status::error(status_code::workspace_exhausted,
                         "byte_cap: workspace of %zu bytes is full; raise cache_config::workspace_bytes",
                         ws.capacity());
  }
  std::size_t bytes_;
};

}  // namespace budget
KVC_NAMESPACE_END
