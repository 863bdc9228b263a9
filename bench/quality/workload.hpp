// bench/quality/workload.hpp: one sequence's queries, keys and values for every layer, as
// the quality evaluation consumes them, whether generated (synthetic.hpp) or loaded from a
// dump of a real model (.npy files, see README.md), and the dump format itself.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include <kvc/config.hpp>
#include <kvc/io/npy.hpp>
#include <kvc/status.hpp>

namespace quality {

// A token planted in one stream that some held-out queries must find (synthetic suites).
struct needle {
  int layer = 0, kv_head = 0;
  int position = 0;          // its position in the cached prefix
  std::vector<int> queries;  // held-out queries looking for it (0 = the first, at position `context`)
};

// Positions are 0..tokens-1 in every layer. The first `context` tokens are cached and
// compressed; the queries of the last `window` of them are the observations; the queries
// at positions context..tokens-1 are held out.
struct workload {
  std::string name, description;
  kvc::model_shape shape;
  kvc::rope_spec rope;
  int tokens = 0, context = 0, window = 0;
  // Per layer, after RoPE: q [tokens][num_q_heads][head_dim], k and v [tokens][num_kv_heads][head_dim].
  std::vector<std::vector<float>> q, k, v;
  std::vector<needle> needles;

  int heldout() const noexcept { return tokens - context; }
  const float* q_at(int layer, int t) const noexcept {
    return q[static_cast<std::size_t>(layer)].data() +
           static_cast<std::size_t>(t) * static_cast<std::size_t>(shape.num_q_heads * shape.head_dim);
  }
  const float* k_at(int layer, int t, int h) const noexcept {
    return k[static_cast<std::size_t>(layer)].data() +
           (static_cast<std::size_t>(t) * static_cast<std::size_t>(shape.num_kv_heads) + static_cast<std::size_t>(h)) *
               static_cast<std::size_t>(shape.head_dim);
  }
  const float* v_at(int layer, int t, int h) const noexcept {
    return v[static_cast<std::size_t>(layer)].data() +
           (static_cast<std::size_t>(t) * static_cast<std::size_t>(shape.num_kv_heads) + static_cast<std::size_t>(h)) *
               static_cast<std::size_t>(shape.head_dim);
  }
};

inline std::string layer_file(const std::string& dir, char what, int layer) {
  return dir + "/" + what + "_" + std::to_string(layer) + ".npy";
}

inline bool file_exists(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) return false;
  std::fclose(f);
  return true;
}

// Reads q_<l>.npy, k_<l>.npy and v_<l>.npy for l = 0, 1, ... until k_<l>.npy is missing
// (at most max_layers layers; 0: all). Shapes must agree across files and layers.
inline kvc::status load_dump(const std::string& dir, int max_layers, workload& w) {
  w = workload{};
  for (int layer = 0; max_layers <= 0 || layer < max_layers; ++layer) {
    if (!file_exists(layer_file(dir, 'k', layer))) break;
    kvc::io::npy_array a[3];
    const char names[3] = {'q', 'k', 'v'};
    for (int i = 0; i < 3; ++i) {
      const std::string path = layer_file(dir, names[i], layer);
      kvc::result<kvc::io::npy_array> r = kvc::io::read_npy(path.c_str());
      if (!r.ok()) return r.status();
      a[i] = std::move(r).value();
      if (a[i].rank() != 3)
        return kvc::status::error(kvc::status_code::shape_mismatch,
                                  "dump: %s has shape %s, expected [tokens, heads, head_dim]", path.c_str(),
                                  a[i].shape_string().c_str());
    }
    const std::int64_t t = a[1].shape[0], hq = a[0].shape[1], hkv = a[1].shape[1], d = a[1].shape[2];
    if (a[0].shape[0] != t || a[2].shape[0] != t || a[0].shape[2] != d || a[2].shape != a[1].shape)
      return kvc::status::error(kvc::status_code::shape_mismatch,
                                "dump: layer %d shapes disagree: q %s, k %s, v %s (want q [T, Hq, d], k and v [T, Hkv, "
                                "d])",
                                layer, a[0].shape_string().c_str(), a[1].shape_string().c_str(),
                                a[2].shape_string().c_str());
    if (layer == 0) {
      w.tokens = static_cast<int>(t);
      w.shape.num_q_heads = static_cast<int>(hq);
      w.shape.num_kv_heads = static_cast<int>(hkv);
      w.shape.head_dim = static_cast<int>(d);
    } else if (t != w.tokens || hq != w.shape.num_q_heads || hkv != w.shape.num_kv_heads || d != w.shape.head_dim) {
      return kvc::status::error(kvc::status_code::shape_mismatch,
                                "dump: layer %d has q %s, k %s; layer 0 had %d tokens, %d q heads, %d kv heads, "
                                "head_dim %d",
                                layer, a[0].shape_string().c_str(), a[1].shape_string().c_str(), w.tokens,
                                w.shape.num_q_heads, w.shape.num_kv_heads, w.shape.head_dim);
    }
    w.q.push_back(std::move(a[0].data));
    w.k.push_back(std::move(a[1].data));
    w.v.push_back(std::move(a[2].data));
  }
  w.shape.num_layers = static_cast<int>(w.k.size());
  if (w.shape.num_layers == 0)
    return kvc::status::error(kvc::status_code::invalid_argument, "dump: no %s in %s", "k_0.npy", dir.c_str());
  if (w.shape.num_kv_heads < 1 || w.shape.num_q_heads % w.shape.num_kv_heads != 0)
    return kvc::status::error(kvc::status_code::shape_mismatch,
                              "dump: %d query heads is not a multiple of %d kv heads (GQA)", w.shape.num_q_heads,
                              w.shape.num_kv_heads);
  return kvc::ok_status();
}

// Writes w as a dump that load_dump reads back (all `tokens` positions).
inline kvc::status save_dump(const workload& w, const std::string& dir) {
  const std::int64_t t = w.tokens, d = w.shape.head_dim;
  for (int layer = 0; layer < w.shape.num_layers; ++layer) {
    const std::int64_t qs[3] = {t, w.shape.num_q_heads, d}, ks[3] = {t, w.shape.num_kv_heads, d};
    const std::size_t l = static_cast<std::size_t>(layer);
    KVC_RETURN_IF_ERROR(kvc::io::write_npy(layer_file(dir, 'q', layer).c_str(), w.q[l].data(), qs, 3));
    KVC_RETURN_IF_ERROR(kvc::io::write_npy(layer_file(dir, 'k', layer).c_str(), w.k[l].data(), ks, 3));
    KVC_RETURN_IF_ERROR(kvc::io::write_npy(layer_file(dir, 'v', layer).c_str(), w.v[l].data(), ks, 3));
  }
  return kvc::ok_status();
}

}  // namespace quality
