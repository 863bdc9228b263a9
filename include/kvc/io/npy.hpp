// kvc/io/npy.hpp: NumPy .npy files of floating-point arrays, for tools that read KV-cache
// dumps (bench/quality reads q_<layer>.npy, k_<layer>.npy, v_<layer>.npy this way).
//
//   kvc::result<kvc::io::npy_array> a = kvc::io::read_npy("k_0.npy");
//   if (!a.ok()) std::fprintf(stderr, "%s\n", a.status().message());
//   // a->shape: {tokens, heads, head_dim}; a->data: tokens * heads * head_dim floats, C order
//
// The format (numpy.lib.format, versions 1.0, 2.0 and 3.0):
//   bytes 0-5   magic "\x93NUMPY"
//   bytes 6-7   major, minor version (1.0, 2.0 or 3.0)
//   then        header length: uint16 little-endian (1.0), uint32 little-endian (2.0, 3.0)
//   then        the header, a Python dict literal padded with spaces and ended by '\n':
//               {'descr': '<f4', 'fortran_order': False, 'shape': (128, 8, 64), }
//               (latin-1 in 1.0 and 2.0, utf-8 in 3.0; only ASCII matters here)
//   then        the data, product(shape) items, nothing after it.
// Read: dtypes '<f4' (float32), '<f2' (float16) and '<f8' (float64), converted to float
// (float64 rounds to nearest); C order only; any rank, 0-d included. Write: float32, v1.0
// (v2.0 when the header needs it). Every failure is a kvc::status whose message names the
// problem first and the file last.
//
// Unlike the cache, these functions allocate (std::vector); they are for tools, not for
// the serving path. They never throw other than std::bad_alloc.
#pragma once

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "kvc/detail/half.hpp"
#include "kvc/status.hpp"
#include "kvc/version.hpp"

KVC_NAMESPACE_BEGIN
namespace io {

struct npy_array {
  std::vector<std::int64_t> shape;  // extents, outermost first; empty for a 0-d array
  std::vector<float> data;          // [shape[0]][shape[1]]...: row-major (C order)

  int rank() const noexcept { return static_cast<int>(shape.size()); }
  std::int64_t size() const noexcept { return static_cast<std::int64_t>(data.size()); }
  // "(3, 4, 5)", as numpy prints a shape.
  std::string shape_string() const {
    std::string s = "(";
    for (std::size_t i = 0; i < shape.size(); ++i) {
      if (i > 0) s += ", ";
      s += std::to_string(shape[i]);
    }
    return s + (shape.size() == 1 ? ",)" : ")");
  }
};

namespace detail {

inline constexpr unsigned char npy_magic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};

// A cursor over the header text with the few pieces of Python literal syntax numpy writes.
class npy_header_parser {
 public:
  npy_header_parser(const char* text, std::size_t size) noexcept : p_(text), end_(text + size) {}

  void skip_space() noexcept {
    while (p_ < end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\n' || *p_ == '\r')) ++p_;
  }
  bool eat(char c) noexcept {
    skip_space();
    if (p_ < end_ && *p_ == c) {
      ++p_;
      return true;
    }
    return false;
  }
  bool peek(char c) noexcept {
    skip_space();
    return p_ < end_ && *p_ == c;
  }
  bool at_end() noexcept {
    skip_space();
    return p_ == end_;
  }
  // A '...' or "..." string without escapes.
  bool string(std::string& out) {
    skip_space();
    if (p_ == end_ || (*p_ != '\'' && *p_ != '"')) return false;
    const char quote = *p_++;
    const char* start = p_;
    while (p_ < end_ && *p_ != quote) {
      if (*p_ == '\\') return false;
      ++p_;
    }
    if (p_ == end_) return false;
    out.assign(start, p_);
    ++p_;
    return true;
  }
  bool boolean(bool& out) noexcept {
    skip_space();
    if (word("True")) {
      out = true;
      return true;
    }
    if (word("False")) {
      out = false;
      return true;
    }
    return false;
  }
  // A tuple of non-negative integers: (), (5,), (2, 3), (2, 3,).
  bool tuple(std::vector<std::int64_t>& out) {
    out.clear();
    if (!eat('(')) return false;
    if (eat(')')) return true;
    for (;;) {
      std::int64_t v = 0;
      if (!integer(v)) return false;
      out.push_back(v);
      if (eat(')')) return true;
      if (!eat(',')) return false;
      if (eat(')')) return true;
    }
  }

 private:
  bool word(const char* w) noexcept {
    const std::size_t n = std::strlen(w);
    if (static_cast<std::size_t>(end_ - p_) < n || std::memcmp(p_, w, n) != 0) return false;
    p_ += n;
    return true;
  }
  bool integer(std::int64_t& out) noexcept {
    skip_space();
    if (p_ == end_ || *p_ < '0' || *p_ > '9') return false;
    std::int64_t v = 0;
    while (p_ < end_ && *p_ >= '0' && *p_ <= '9') {
      const int digit = *p_ - '0';
      if (v > (std::numeric_limits<std::int64_t>::max() - digit) / 10) return false;
      v = v * 10 + digit;
      ++p_;
    }
    if (p_ < end_ && *p_ == 'L') ++p_;  // Python 2 long suffix, in files numpy wrote long ago
    out = v;
    return true;
  }

  const char* p_;
  const char* end_;
};

inline std::uint32_t load_le(const unsigned char* b, int bytes) noexcept {
  std::uint32_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | b[i];
  return v;
}

}  // namespace detail

// Parses a whole .npy file held in memory; `name` (e.g. the path) ends every error message.
inline result<npy_array> parse_npy(const void* bytes, std::size_t size, const char* name = "<memory>") {
  const unsigned char* b = static_cast<const unsigned char*>(bytes);
  if (size < 8 || std::memcmp(b, detail::npy_magic, 6) != 0)
    return status::error(status_code::invalid_argument, "npy: bad magic, not a .npy file (expected \\x93NUMPY): %s",
                         name);
  const int major = b[6], minor = b[7];
  if (major < 1 || major > 3 || minor != 0)
    return status::error(status_code::unsupported, "npy: format version %d.%d unsupported (1.0, 2.0, 3.0 only): %s",
                         major, minor, name);
  const std::size_t len_bytes = major == 1 ? 2 : 4;
  if (size < 6 + 2 + len_bytes) return status::error(status_code::invalid_argument, "npy: truncated header: %s", name);
  const std::size_t header_len = detail::load_le(b + 8, static_cast<int>(len_bytes));
  const std::size_t header_start = 8 + len_bytes;
  if (header_len > size - header_start)
    return status::error(status_code::invalid_argument, "npy: truncated header (%zu bytes declared, %zu present): %s",
                         header_len, size - header_start, name);

  // The header dict: exactly the keys descr, fortran_order and shape, in any order.
  detail::npy_header_parser h(reinterpret_cast<const char*>(b + header_start), header_len);
  std::string descr;
  bool fortran = false, have_descr = false, have_order = false, have_shape = false;
  npy_array a;
  if (!h.eat('{')) return status::error(status_code::invalid_argument, "npy: header is not a dict: %s", name);
  while (!h.eat('}')) {
    std::string key;
    if (!h.string(key) || !h.eat(':'))
      return status::error(status_code::invalid_argument, "npy: malformed header dict: %s", name);
    bool ok = false;
    if (key == "descr") {
      if (h.peek('[') || h.peek('('))
        return status::error(status_code::unsupported,
                             "npy: structured dtype unsupported (float32 '<f4', float16 '<f2', float64 '<f8' only): %s",
                             name);
      ok = h.string(descr);
      have_descr = true;
    } else if (key == "fortran_order") {
      ok = h.boolean(fortran);
      have_order = true;
    } else if (key == "shape") {
      ok = h.tuple(a.shape);
      have_shape = true;
    } else {
      return status::error(status_code::invalid_argument, "npy: unexpected header key '%.40s': %s", key.c_str(), name);
    }
    if (!ok)
      return status::error(status_code::invalid_argument, "npy: malformed value of '%s' in the header: %s", key.c_str(),
                           name);
    if (!h.eat(',')) {
      if (!h.eat('}')) return status::error(status_code::invalid_argument, "npy: malformed header dict: %s", name);
      break;
    }
  }
  if (!h.at_end()) return status::error(status_code::invalid_argument, "npy: text after the header dict: %s", name);
  if (!have_descr || !have_order || !have_shape)
    return status::error(status_code::invalid_argument, "npy: header lacks '%s': %s",
                         !have_descr   ? "descr"
                         : !have_order ? "fortran_order"
                                       : "shape",
                         name);

  int item = 0;
  if (descr == "<f4")
    item = 4;
  else if (descr == "<f2")
    item = 2;
  else if (descr == "<f8")
    item = 8;
  else if (descr == ">f4" || descr == ">f2" || descr == ">f8")
    return status::error(status_code::unsupported,
                         "npy: big-endian dtype '%s' unsupported (save with .astype('<f4')): %s", descr.c_str(), name);
  else
    return status::error(status_code::unsupported,
                         "npy: dtype '%.16s' unsupported (float32 '<f4', float16 '<f2', float64 '<f8' only): %s",
                         descr.c_str(), name);
  if (fortran && a.shape.size() > 1)
    return status::error(status_code::unsupported,
                         "npy: Fortran order unsupported (save numpy.ascontiguousarray(x) instead): %s", name);

  std::size_t count = 1;
  for (const std::int64_t e : a.shape) {
    const std::size_t u = static_cast<std::size_t>(e);
    if (u != 0 && count > std::numeric_limits<std::size_t>::max() / item / u)
      return status::error(status_code::invalid_argument, "npy: shape %s is too large: %s", a.shape_string().c_str(),
                           name);
    count *= u;
  }
  const std::size_t data_start = header_start + header_len;
  const std::size_t need = count * static_cast<std::size_t>(item), have = size - data_start;
  if (have < need)
    return status::error(status_code::invalid_argument, "npy: truncated data (%zu bytes for shape %s, %zu present): %s",
                         need, a.shape_string().c_str(), have, name);
  if (have > need)
    return status::error(status_code::invalid_argument, "npy: %zu extra bytes after the data of shape %s: %s",
                         have - need, a.shape_string().c_str(), name);

  a.data.resize(count);
  const unsigned char* d = b + data_start;
  for (std::size_t i = 0; i < count; ++i) {
    if (item == 4) {
      a.data[i] = kvc::detail::bits_float(detail::load_le(d + 4 * i, 4));
    } else if (item == 2) {
      a.data[i] = kvc::detail::half_to_float_scalar(static_cast<std::uint16_t>(detail::load_le(d + 2 * i, 2)));
    } else {
      const std::uint64_t lo = detail::load_le(d + 8 * i, 4), hi = detail::load_le(d + 8 * i + 4, 4);
      const std::uint64_t u = (hi << 32) | lo;
      double v;
      std::memcpy(&v, &u, sizeof v);
      a.data[i] = static_cast<float>(v);
    }
  }
  return result<npy_array>(std::move(a));
}

// Reads a .npy file.
inline result<npy_array> read_npy(const char* path) {
  std::FILE* f = std::fopen(path, "rb");
  if (f == nullptr)
    return status::error(status_code::invalid_argument, "npy: cannot open (%s): %s", std::strerror(errno), path);
  std::vector<unsigned char> bytes;
  unsigned char buf[1 << 16];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) bytes.insert(bytes.end(), buf, buf + n);
  const bool failed = std::ferror(f) != 0;
  std::fclose(f);
  if (failed) return status::error(status_code::invalid_argument, "npy: read error: %s", path);
  return parse_npy(bytes.data(), bytes.size(), path);
}

// The bytes of a float32 .npy file holding data [shape[0]]...[shape[rank - 1]] in C order.
inline std::vector<unsigned char> format_npy(const float* data, const std::int64_t* shape, int rank) {
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (";
  std::size_t count = 1;
  for (int i = 0; i < rank; ++i) {
    if (i > 0) header += ", ";
    header += std::to_string(shape[i]);
    count *= static_cast<std::size_t>(shape[i]);
  }
  header += rank == 1 ? ",), }" : "), }";
  // Magic, version, length, header and '\n' together a multiple of 64 bytes.
  const bool v2 = header.size() + 1 + 10 > 65535;
  const std::size_t prefix = v2 ? 12 : 10;
  header.append((64 - (prefix + header.size() + 1) % 64) % 64, ' ');
  header += '\n';
  std::vector<unsigned char> out(detail::npy_magic, detail::npy_magic + 6);
  out.push_back(v2 ? 2 : 1);
  out.push_back(0);
  for (std::size_t i = 0; i < prefix - 8; ++i) out.push_back(static_cast<unsigned char>(header.size() >> (8 * i)));
  out.insert(out.end(), header.begin(), header.end());
  out.reserve(out.size() + 4 * count);
  for (std::size_t i = 0; i < count; ++i) {
    const std::uint32_t u = kvc::detail::float_bits(data[i]);
    for (int j = 0; j < 4; ++j) out.push_back(static_cast<unsigned char>(u >> (8 * j)));
  }
  return out;
}

// Writes a float32 .npy file (what numpy.save writes for a C-contiguous float32 array).
inline status write_npy(const char* path, const float* data, const std::int64_t* shape, int rank) {
  for (int i = 0; i < rank; ++i)
    if (shape[i] < 0)
      return status::error(status_code::invalid_argument, "npy: shape[%d] = %lld is negative: %s", i,
                           static_cast<long long>(shape[i]), path);
  const std::vector<unsigned char> bytes = format_npy(data, shape, rank);
  std::FILE* f = std::fopen(path, "wb");
  if (f == nullptr)
    return status::error(status_code::invalid_argument, "npy: cannot create (%s): %s", std::strerror(errno), path);
  const bool wrote = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
  const bool closed = std::fclose(f) == 0;
  if (!wrote || !closed) return status::error(status_code::invalid_argument, "npy: write error: %s", path);
  return ok_status();
}

}  // namespace io
KVC_NAMESPACE_END
