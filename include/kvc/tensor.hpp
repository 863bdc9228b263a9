// kvc/tensor.hpp: strided views of the caller's buffers, and a small span.
//
// kvc never owns the engine's tensors. Keys, values, queries and outputs are passed
// as 3-D views [tokens][heads][head_dim] with element strides, so an engine can hand
// over slices of a fused QKV buffer without copying. The last extent must be
// contiguous (stride 1).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <utility>

#include "kvc/status.hpp"
#include "kvc/version.hpp"

KVC_NAMESPACE_BEGIN

template <class T>
class span {
 public:
  constexpr span() noexcept = default;
  constexpr span(T* data, std::size_t size) noexcept : data_(data), size_(size) {}
  constexpr T* data() const noexcept { return data_; }
  constexpr std::size_t size() const noexcept { return size_; }
  constexpr bool empty() const noexcept { return size_ == 0; }
  constexpr T& operator[](std::size_t i) const noexcept { return data_[i]; }
  constexpr T* begin() const noexcept { return data_; }
  constexpr T* end() const noexcept { return data_ + size_; }

 private:
  T* data_ = nullptr;
  std::size_t size_ = 0;
};

// A 3-D view: element (i, j, k) is data[i * strides[0] + j * strides[1] + k * strides[2]].
template <class T>
struct tensor3 {
  T* data = nullptr;
  std::array<std::int64_t, 3> extents{};  // [tokens][heads][head_dim]
  std::array<std::int64_t, 3> strides{};  // in elements

  // A dense row-major [n][heads][dim] buffer.
  static constexpr tensor3 contiguous(T* p, std::int64_t n, std::int64_t heads, std::int64_t dim) noexcept {
    return tensor3{p, {n, heads, dim}, {heads * dim, dim, 1}};
  }
  constexpr T* row(std::int64_t i, std::int64_t j) const noexcept { return data + i * strides[0] + j * strides[1]; }
};

template <class T>
using const_tensor3 = tensor3<const T>;

namespace detail {

// Checks extents against the expected shape and that the strides describe a
// non-overlapping layout with a contiguous last dimension.
template <class T>
status check_tensor(const tensor3<T>& t, const char* what, std::int64_t n, std::int64_t heads,
                    std::int64_t dim) noexcept {
  if (t.extents[0] != n || t.extents[1] != heads || t.extents[2] != dim)
    return status::error(status_code::shape_mismatch, "%s has shape [%lld][%lld][%lld], expected [%lld][%lld][%lld]",
                         what, static_cast<long long>(t.extents[0]), static_cast<long long>(t.extents[1]),
                         static_cast<long long>(t.extents[2]), static_cast<long long>(n), static_cast<long long>(heads),
                         static_cast<long long>(dim));
  if (n == 0) return ok_status();
  if (t.data == nullptr) return status::error(status_code::invalid_argument, "%s is a null pointer", what);
  if (t.strides[2] != 1)
    return status::error(status_code::shape_mismatch, "%s: head_dim stride is %lld, must be 1", what,
                         static_cast<long long>(t.strides[2]));
  // Outer dimensions of extent 1 may carry any stride. The others, ordered by stride,
  // must each step over the whole block below them.
  struct dim_t {
    std::int64_t extent, stride;
  };
  dim_t outer[2] = {{n, t.strides[0]}, {heads, t.strides[1]}};
  if (outer[0].stride > outer[1].stride) std::swap(outer[0], outer[1]);
  std::int64_t block = dim;  // elements spanned by the dimensions inside
  for (const dim_t& o : outer) {
    if (o.extent == 1) continue;
    if (o.stride < block)
      return status::error(status_code::shape_mismatch,
                           "%s: strides [%lld][%lld][1] make rows overlap for shape [%lld][%lld][%lld]", what,
                           static_cast<long long>(t.strides[0]), static_cast<long long>(t.strides[1]),
                           static_cast<long long>(n), static_cast<long long>(heads), static_cast<long long>(dim));
    block = o.stride * o.extent;
  }
  return ok_status();
}

}  // namespace detail

KVC_NAMESPACE_END
