// kvc/status.hpp: kvc::status and kvc::result<T>, the error values of the library.
//
// kvc never throws. Every call that can fail on its input returns a [[nodiscard]]
// status (or a result<T>) and leaves the cache exactly as it was when it fails.
// A status carries a code an engine can branch on and a message that names the
// offending argument; the message lives inline (no allocation on any path).
#pragma once

#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <optional>
#include <utility>

#include "kvc/detail/assert.hpp"
#include "kvc/version.hpp"

KVC_NAMESPACE_BEGIN

enum class status_code {
  ok = 0,
  invalid_argument,     // a null pointer, a count out of range, a bad config field
  shape_mismatch,       // a tensor whose extents or strides do not match the cache shape
  unknown_sequence,     // a seq_id never created, or already released
  out_of_range,         // a layer or kv_head index outside the shape, a value a codec cannot hold
  non_finite,           // NaN or infinity in keys, values, queries or scores
  position_order,       // positions not strictly increasing within a stream
  pool_exhausted,       // not enough free pages for the whole operation
  context_full,         // a stream would hold more than cache_config::max_context tokens
  invalid_budget,       // a budget parameter outside its documented range
  workspace_exhausted,  // the compress workspace is too small for this policy and sequence
  unsupported,          // a valid request that this build or codec does not implement
};

inline constexpr const char* to_string(status_code c) noexcept {
  switch (c) {
    case status_code::ok:
      return "ok";
    case status_code::invalid_argument:
      return "invalid_argument";
    case status_code::shape_mismatch:
      return "shape_mismatch";
    case status_code::unknown_sequence:
      return "unknown_sequence";
    case status_code::out_of_range:
      return "out_of_range";
    case status_code::non_finite:
      return "non_finite";
    case status_code::position_order:
      return "position_order";
    case status_code::pool_exhausted:
      return "pool_exhausted";
    case status_code::context_full:
      return "context_full";
    case status_code::invalid_budget:
      return "invalid_budget";
    case status_code::workspace_exhausted:
      return "workspace_exhausted";
    case status_code::unsupported:
      return "unsupported";
  }
  return "unknown";
}

class [[nodiscard]] status {
 public:
  static constexpr std::size_t max_message = 200;

  constexpr status() noexcept = default;

  // printf-style message; truncated to max_message - 1 characters.
#if defined(__GNUC__)
  __attribute__((format(printf, 2, 3)))
#endif
  static status
  error(status_code code, const char* fmt, ...) noexcept {
    KVC_ASSERT(code != status_code::ok);
    status s;
    s.code_ = code;
    std::va_list args;
    va_start(args, fmt);
    std::vsnprintf(s.message_, max_message, fmt, args);
    va_end(args);
    return s;
  }

  constexpr bool ok() const noexcept { return code_ == status_code::ok; }
  constexpr explicit operator bool() const noexcept { return ok(); }
  constexpr status_code code() const noexcept { return code_; }
  const char* message() const noexcept { return ok() ? "ok" : message_; }

 private:
  status_code code_ = status_code::ok;
  char message_[max_message] = {};
};

inline status ok_status() noexcept { return status(); }

// A value or the status that explains its absence.
template <class T>
class [[nodiscard]] result {
 public:
  result(T value) : value_(std::move(value)) {}  // NOLINT: implicit by design
  result(kvc::status s) : status_(s) {           // NOLINT: implicit by design
    KVC_ASSERT(!s.ok());
  }

  bool ok() const noexcept { return value_.has_value(); }
  explicit operator bool() const noexcept { return ok(); }
  const kvc::status& status() const noexcept { return status_; }

  T& value() & {
    KVC_ASSERT(ok());
    return *value_;
  }
  const T& value() const& {
    KVC_ASSERT(ok());
    return *value_;
  }
  T&& value() && {
    KVC_ASSERT(ok());
    return std::move(*value_);
  }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

 private:
  kvc::status status_;
  std::optional<T> value_;
};

KVC_NAMESPACE_END

// Propagate a failed status from an expression that yields kvc::status.
#define KVC_RETURN_IF_ERROR(expr)                      \
  do {                                                 \
    ::kvc::status kvc_status_tmp_ = (expr);            \
    if (!kvc_status_tmp_.ok()) return kvc_status_tmp_; \
  } while (0)
