// tests/reference/stream_model.hpp: the documented behaviour of one stream as a plain
// list of tokens.
//
// Tokens arrive in an open page of `page_tokens` slots and are stored exactly; when the
// open page fills, its tokens are sealed, i.e. rounded by the codec. compress() keeps the
// tokens a mask selects, in order, and packs the sealed ones into full pages (the last one
// may be partial); tokens of the open page stay unsealed. Nothing is ever rounded twice.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace kvc_ref {

struct stream_model {
  using rounding = float (*)(float);

  struct token {
    std::int32_t position;
    std::vector<float> key, value;  // as stored: rounded once sealed
  };

  int page_tokens = 0;
  int head_dim = 0;
  rounding round_key = nullptr, round_value = nullptr;
  std::vector<token> tokens;
  int open = 0;                   // tokens at the end that are still in the open page
  std::vector<int> sealed_pages;  // tokens per sealed page, in order
  std::int64_t appended = 0;

  stream_model() = default;
  stream_model(int p, int d, rounding rk, rounding rv) : page_tokens(p), head_dim(d), round_key(rk), round_value(rv) {}

  void append(std::int32_t position, const float* key, const float* value) {
    tokens.push_back({position, std::vector<float>(key, key + head_dim), std::vector<float>(value, value + head_dim)});
    ++appended;
    if (++open < page_tokens) return;
    for (std::size_t t = tokens.size() - static_cast<std::size_t>(page_tokens); t < tokens.size(); ++t) {
      for (float& x : tokens[t].key) x = round_key(x);
      for (float& x : tokens[t].value) x = round_value(x);
    }
    sealed_pages.push_back(page_tokens);
    open = 0;
  }

  // keep: [size()], nonzero = keep.
  void compress(const std::vector<std::uint8_t>& keep) {
    std::vector<token> kept;
    const std::size_t first_open = tokens.size() - static_cast<std::size_t>(open);
    int kept_sealed = 0, kept_open = 0;
    for (std::size_t t = 0; t < tokens.size(); ++t) {
      if (keep[t] == 0) continue;
      kept.push_back(tokens[t]);
      (t < first_open ? kept_sealed : kept_open) += 1;
    }
    tokens = kept;
    open = kept_open;
    sealed_pages.clear();
    for (int left = kept_sealed; left > 0; left -= page_tokens)
      sealed_pages.push_back(left < page_tokens ? left : page_tokens);
  }

  std::size_t size() const { return tokens.size(); }
  // Tokens per page, sealed pages first, then the open page if it holds any.
  std::vector<int> page_sizes() const {
    std::vector<int> p = sealed_pages;
    if (open > 0) p.push_back(open);
    return p;
  }
};

}  // namespace kvc_ref
