// kvc/workspace.hpp: a bump arena for compress-time scratch.
//
// Sized once; alloc() hands out aligned blocks and returns nullptr when full, so a
// policy can report status_code::workspace_exhausted instead of allocating. mark() and
// rewind() free everything allocated since a mark. An engine that compresses several
// sequences at once passes one workspace per thread to paged_kv_cache::compress.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>

#include "kvc/version.hpp"

KVC_NAMESPACE_BEGIN

class workspace {
 public:
  static constexpr std::size_t alignment = 64;

  workspace() = default;
  explicit workspace(std::size_t bytes)
      : data_(static_cast<std::byte*>(::operator new[](bytes == 0 ? alignment : bytes, std::align_val_t{alignment}))),
        capacity_(bytes) {}

  std::size_t capacity() const noexcept { return capacity_; }
  std::size_t used() const noexcept { return used_; }
  std::size_t high_water() const noexcept { return high_water_; }

  // n elements of T, aligned to 64 bytes, uninitialised; nullptr if they do not fit.
  template <class T>
  T* alloc(std::size_t n) noexcept {
    static_assert(alignof(T) <= alignment, "kvc::workspace: over-aligned types are not supported");
    const std::size_t start = (used_ + alignment - 1) / alignment * alignment;
    if (start > capacity_ || n > (capacity_ - start) / sizeof(T)) return nullptr;
    used_ = start + n * sizeof(T);
    if (used_ > high_water_) high_water_ = used_;
    return reinterpret_cast<T*>(data_.get() + start);
  }

  std::size_t mark() const noexcept { return used_; }
  void rewind(std::size_t m) noexcept { used_ = m < used_ ? m : used_; }
  void reset() noexcept { used_ = 0; }

 private:
  struct deleter {
    void operator()(std::byte* p) const noexcept { ::operator delete[](p, std::align_val_t{alignment}); }
  };
  std::unique_ptr<std::byte[], deleter> data_;
  std::size_t capacity_ = 0;
  std::size_t used_ = 0;
  std::size_t high_water_ = 0;
};

// Rewinds a workspace to where it was when the scope began.
class workspace_scope {
 public:
  explicit workspace_scope(workspace& ws) noexcept : ws_(ws), mark_(ws.mark()) {}
  ~workspace_scope() { ws_.rewind(mark_); }
  workspace_scope(const workspace_scope&) = delete;
  workspace_scope& operator=(const workspace_scope&) = delete;

 private:
  workspace& ws_;
  std::size_t mark_;
};

KVC_NAMESPACE_END
