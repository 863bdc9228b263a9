// kvc/budget/uniform.hpp: the same budget for every stream, as a fraction of its
// retained tokens or as a token count.
//
//   keep_fraction(f)      keep round(n * f) of n tokens, f in [0, 1]
//   compression_ratio(c)  keep_fraction(1 - c): c is the fraction removed, c in [0, 1]
//   tokens(k)             keep min(n, k) tokens, k >= 0
#pragma once

#include <cmath>
#include <cstdint>

#include "kvc/budget/budget.hpp"

KVC_NAMESPACE_BEGIN
namespace budget {

class uniform {
 public:
  static constexpr uniform keep_fraction(double f) noexcept { return uniform(kind::fraction, f, 0); }
  static constexpr uniform compression_ratio(double c) noexcept { return uniform(kind::compression, c, 0); }
  static constexpr uniform tokens(std::int64_t k) noexcept { return uniform(kind::count, 0.0, k); }

  status allocate(const budget_request& r, std::int32_t* keep) const noexcept {
    if (kind_ == kind::count) {
      if (count_ < 0)
        return status::error(status_code::invalid_budget, "uniform: token budget %lld is negative",
                             static_cast<long long>(count_));
      for (int i = 0; i < r.num_streams; ++i) {
        const std::int64_t n = r.streams[i].n_tokens;
        keep[i] = static_cast<std::int32_t>(n < count_ ? n : count_);
      }
      return ok_status();
    }
    if (!(value_ >= 0.0 && value_ <= 1.0))
      return status::error(status_code::invalid_budget, "uniform: %s %g outside [0, 1]",
                           kind_ == kind::fraction ? "keep fraction" : "compression ratio", value_);
    const double f = kind_ == kind::fraction ? value_ : 1.0 - value_;
    for (int i = 0; i < r.num_streams; ++i)
      keep[i] = static_cast<std::int32_t>(std::llround(static_cast<double>(r.streams[i].n_tokens) * f));
    return ok_status();
  }

 private:
  enum class kind { fraction, compression, count };
  constexpr uniform(kind k, double v, std::int64_t c) noexcept : kind_(k), value_(v), count_(c) {}
  kind kind_;
  double value_;
  std::int64_t count_;
};

}  // namespace budget
KVC_NAMESPACE_END
