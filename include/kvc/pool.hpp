// kvc/pool.hpp: the page pool, one fixed block of memory carved into pages.
//
// The arena is split into slabs of `slots_per_slab` sealed pages (the codec's size),
// enough for one open, float page. An open page takes a whole slab; sealed pages share
// them; a slab whose sealed slots are all free goes
// back to the slab free list, so memory moves freely between open and sealed pages
// and nothing fragments for good. Page ids are slot ids: slab * slots_per_slab + i;
// an open page is slot 0 of its slab.
//
// Every operation is O(slots_per_slab) at worst (a constant of the configuration) and
// never calls the system allocator after construction. Each page has a reference
// count: forked sequences share pages, and a page returns to the pool when its last
// holder lets go. The pool itself is not synchronised; paged_kv_cache locks around it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <vector>

#include "kvc/detail/assert.hpp"
#include "kvc/version.hpp"

KVC_NAMESPACE_BEGIN

using page_id = std::int32_t;
inline constexpr page_id no_page = -1;

namespace detail {

inline constexpr std::size_t page_alignment = 64;

constexpr std::size_t align_up(std::size_t n, std::size_t a = page_alignment) noexcept { return (n + a - 1) / a * a; }

struct aligned_free {
  void operator()(std::byte* p) const noexcept { ::operator delete[](p, std::align_val_t{page_alignment}); }
};

}  // namespace detail

// What a pool can still hand out; also used to dry-run an operation before doing it.
struct pool_counts {
  std::int64_t free_slabs = 0;
  std::int64_t free_sealed_slots = 0;  // free slots in slabs already split for sealed pages
  std::int64_t slots_per_slab = 1;

  // Each returns false, changing nothing, when the pool cannot satisfy it.
  bool take_open() noexcept {
    if (free_slabs == 0) return false;
    --free_slabs;
    return true;
  }
  bool take_sealed() noexcept {
    if (free_sealed_slots > 0) {
      --free_sealed_slots;
      return true;
    }
    if (free_slabs == 0) return false;
    --free_slabs;
    free_sealed_slots += slots_per_slab - 1;
    return true;
  }
  void give_open() noexcept { ++free_slabs; }
};

class page_pool {
 public:
  page_pool() = default;

  // A slab is the smallest whole number of (64-byte aligned) sealed pages that holds one
  // open page, so sealed pages pack without gaps and an open page wastes less than one
  // sealed page. capacity_bytes is rounded down to whole slabs.
  static constexpr std::int32_t slots_for(std::size_t open_page_bytes, std::size_t sealed_page_bytes) noexcept {
    const std::size_t open = detail::align_up(open_page_bytes), sealed = detail::align_up(sealed_page_bytes);
    return static_cast<std::int32_t>((open + sealed - 1) / sealed);
  }
  static constexpr std::size_t slab_bytes_for(std::size_t open_page_bytes, std::size_t sealed_page_bytes) noexcept {
    return static_cast<std::size_t>(slots_for(open_page_bytes, sealed_page_bytes)) *
           detail::align_up(sealed_page_bytes);
  }

  page_pool(std::size_t capacity_bytes, std::size_t open_page_bytes, std::size_t sealed_page_bytes)
      : slab_bytes_(slab_bytes_for(open_page_bytes, sealed_page_bytes)),
        sealed_bytes_(detail::align_up(sealed_page_bytes)),
        slots_per_slab_(slots_for(open_page_bytes, sealed_page_bytes)),
        num_slabs_(static_cast<std::int32_t>(capacity_bytes / slab_bytes_)) {
    KVC_ASSERT(sealed_bytes_ <= slab_bytes_);
    const std::size_t slots = static_cast<std::size_t>(num_slabs_) * static_cast<std::size_t>(slots_per_slab_);
    if (num_slabs_ > 0)
      arena_.reset(static_cast<std::byte*>(::operator new[](static_cast<std::size_t>(num_slabs_) * slab_bytes_,
                                                            std::align_val_t{detail::page_alignment})));
    refcount_.assign(slots, 0);
    next_.assign(slots, no_page);
    prev_.assign(slots, no_page);
    slab_used_.assign(static_cast<std::size_t>(num_slabs_), 0);
    slab_kind_.assign(static_cast<std::size_t>(num_slabs_), slab_free);
    // Free slabs are chained through next_ of their slot 0.
    for (std::int32_t s = num_slabs_ - 1; s >= 0; --s) push_slab(s);
  }

  page_pool(page_pool&&) noexcept = default;
  page_pool& operator=(page_pool&&) noexcept = default;

  std::size_t slab_bytes() const noexcept { return slab_bytes_; }
  std::size_t open_page_bytes() const noexcept { return slab_bytes_; }  // an open page holds a slab
  std::size_t sealed_page_bytes() const noexcept { return sealed_bytes_; }
  std::int32_t slots_per_slab() const noexcept { return slots_per_slab_; }
  std::int32_t num_slabs() const noexcept { return num_slabs_; }
  std::size_t capacity_bytes() const noexcept { return static_cast<std::size_t>(num_slabs_) * slab_bytes_; }

  pool_counts counts() const noexcept { return {free_slabs_, free_sealed_, slots_per_slab_}; }
  std::int64_t open_pages_in_use() const noexcept { return open_in_use_; }
  std::int64_t sealed_pages_in_use() const noexcept { return sealed_in_use_; }
  std::int64_t free_slabs() const noexcept { return free_slabs_; }
  // Bytes of pages in use (open pages at slab size, sealed pages at their own size).
  std::size_t bytes_in_use() const noexcept {
    return static_cast<std::size_t>(open_in_use_) * slab_bytes_ +
           static_cast<std::size_t>(sealed_in_use_) * sealed_bytes_;
  }
  // Bytes of slabs not free, including unused sealed slots inside them.
  std::size_t bytes_reserved() const noexcept {
    return static_cast<std::size_t>(num_slabs_ - free_slabs_) * slab_bytes_;
  }

  // Allocation returns no_page when the pool is exhausted. New pages have refcount 1.
  page_id alloc_open() noexcept {
    if (free_slab_head_ == no_page) return no_page;
    const std::int32_t s = pop_slab();
    slab_kind_[static_cast<std::size_t>(s)] = slab_open;
    const page_id p = s * slots_per_slab_;
    refcount_[static_cast<std::size_t>(p)] = 1;
    ++open_in_use_;
    return p;
  }

  page_id alloc_sealed() noexcept {
    if (free_sealed_head_ == no_page) {
      if (free_slab_head_ == no_page) return no_page;
      const std::int32_t s = pop_slab();
      slab_kind_[static_cast<std::size_t>(s)] = slab_sealed;
      for (std::int32_t i = slots_per_slab_ - 1; i >= 0; --i) push_sealed(s * slots_per_slab_ + i);
    }
    const page_id p = free_sealed_head_;
    unlink_sealed(p);
    const std::size_t s = static_cast<std::size_t>(p / slots_per_slab_);
    ++slab_used_[s];
    refcount_[static_cast<std::size_t>(p)] = 1;
    ++sealed_in_use_;
    return p;
  }

  // Turns an open page into a sealed page without moving it. Only valid when sealed
  // pages take a whole slab (slots_per_slab() == 1), i.e. the codecs store float.
  void relabel_sealed(page_id p) noexcept {
    const std::size_t s = static_cast<std::size_t>(p / slots_per_slab_);
    KVC_ASSERT(slots_per_slab_ == 1 && slab_kind_[s] == slab_open);
    slab_kind_[s] = slab_sealed;
    slab_used_[s] = 1;
    --open_in_use_;
    ++sealed_in_use_;
  }

  void retain(page_id p) noexcept {
    KVC_ASSERT(refcount_[static_cast<std::size_t>(p)] > 0);
    ++refcount_[static_cast<std::size_t>(p)];
  }

  // Drops one reference; the page returns to the pool at zero. Returns true if freed.
  bool release(page_id p) noexcept {
    std::int32_t& rc = refcount_[static_cast<std::size_t>(p)];
    KVC_ASSERT(rc > 0);
    if (--rc > 0) return false;
    const std::int32_t s = p / slots_per_slab_;
    if (slab_kind_[static_cast<std::size_t>(s)] == slab_open) {
      --open_in_use_;
      slab_kind_[static_cast<std::size_t>(s)] = slab_free;
      push_slab(s);
      return true;
    }
    KVC_ASSERT(slab_kind_[static_cast<std::size_t>(s)] == slab_sealed);
    --sealed_in_use_;
    push_sealed(p);
    if (--slab_used_[static_cast<std::size_t>(s)] == 0) {
      for (std::int32_t i = 0; i < slots_per_slab_; ++i) unlink_sealed(s * slots_per_slab_ + i);
      slab_kind_[static_cast<std::size_t>(s)] = slab_free;
      push_slab(s);
    }
    return true;
  }

  std::int32_t refcount(page_id p) const noexcept { return refcount_[static_cast<std::size_t>(p)]; }
  bool is_open(page_id p) const noexcept {
    return slab_kind_[static_cast<std::size_t>(p / slots_per_slab_)] == slab_open;
  }

  std::byte* data(page_id p) noexcept { return arena_.get() + offset(p); }
  const std::byte* data(page_id p) const noexcept { return arena_.get() + offset(p); }

 private:
  static constexpr std::uint8_t slab_free = 0, slab_open = 1, slab_sealed = 2;

  std::size_t offset(page_id p) const noexcept {
    KVC_ASSERT(p >= 0 && p < num_slabs_ * slots_per_slab_);
    const std::size_t s = static_cast<std::size_t>(p / slots_per_slab_);
    const std::size_t i = static_cast<std::size_t>(p % slots_per_slab_);
    return s * slab_bytes_ + i * sealed_bytes_;
  }

  void push_slab(std::int32_t s) noexcept {
    next_[static_cast<std::size_t>(s * slots_per_slab_)] =
        free_slab_head_ == no_page ? no_page : free_slab_head_ * slots_per_slab_;
    free_slab_head_ = s;
    ++free_slabs_;
  }
  std::int32_t pop_slab() noexcept {
    const std::int32_t s = free_slab_head_;
    const page_id nxt = next_[static_cast<std::size_t>(s * slots_per_slab_)];
    free_slab_head_ = nxt == no_page ? no_page : nxt / slots_per_slab_;
    --free_slabs_;
    return s;
  }
  // Doubly linked list of free sealed slots, so a slab's slots can be unlinked in O(1) each.
  void push_sealed(page_id p) noexcept {
    prev_[static_cast<std::size_t>(p)] = no_page;
    next_[static_cast<std::size_t>(p)] = free_sealed_head_;
    if (free_sealed_head_ != no_page) prev_[static_cast<std::size_t>(free_sealed_head_)] = p;
    free_sealed_head_ = p;
    ++free_sealed_;
  }
  void unlink_sealed(page_id p) noexcept {
    const page_id n = next_[static_cast<std::size_t>(p)], v = prev_[static_cast<std::size_t>(p)];
    if (v != no_page)
      next_[static_cast<std::size_t>(v)] = n;
    else
      free_sealed_head_ = n;
    if (n != no_page) prev_[static_cast<std::size_t>(n)] = v;
    next_[static_cast<std::size_t>(p)] = prev_[static_cast<std::size_t>(p)] = no_page;
    --free_sealed_;
  }

  std::size_t slab_bytes_ = 0;
  std::size_t sealed_bytes_ = 0;
  std::int32_t slots_per_slab_ = 1;
  std::int32_t num_slabs_ = 0;
  std::unique_ptr<std::byte[], detail::aligned_free> arena_;
  std::vector<std::int32_t> refcount_;   // [slots]
  std::vector<page_id> next_, prev_;     // [slots] free-list links
  std::vector<std::int32_t> slab_used_;  // [slabs] sealed slots in use
  std::vector<std::uint8_t> slab_kind_;  // [slabs]
  std::int32_t free_slab_head_ = no_page;
  page_id free_sealed_head_ = no_page;
  std::int64_t free_slabs_ = 0, free_sealed_ = 0, open_in_use_ = 0, sealed_in_use_ = 0;
};

KVC_NAMESPACE_END
