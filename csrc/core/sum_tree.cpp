#include "core/sum_tree.h"

#include <algorithm>
#include <limits>
#include <stdexcept>

namespace alignkit {

namespace {
constexpr double kInf = std::numeric_limits<double>::infinity();

int64_t next_power_of_two(int64_t n) {
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}
}  // namespace

SumTree::SumTree(int64_t capacity)
    : capacity_(next_power_of_two(std::max<int64_t>(capacity, 1))),
      sum_(static_cast<size_t>(2 * capacity_), 0.0),
      min_(static_cast<size_t>(2 * capacity_), kInf) {}

void SumTree::reset() {
  std::fill(sum_.begin(), sum_.end(), 0.0);
  std::fill(min_.begin(), min_.end(), kInf);
}

// O(log n): rewrite the leaf, then recompute each ancestor from its two children (no
// running-sum drift: every internal node is always exactly left + right).
void SumTree::set(int64_t index, double value) {
  if (index < 0 || index >= capacity_) throw std::out_of_range("SumTree::set: leaf index out of range");
  int64_t i = capacity_ + index;
  sum_[i] = value;
  min_[i] = value > 0.0 ? value : kInf;
  for (i >>= 1; i >= 1; i >>= 1) {
    sum_[i] = sum_[2 * i] + sum_[2 * i + 1];
    min_[i] = std::min(min_[2 * i], min_[2 * i + 1]);
  }
}

// O(log n) descent. Going left requires a positive left subtree; when rounding puts u at or
// past the left sum and the right subtree is empty, stay left, so a zero leaf is never returned.
int64_t SumTree::find_prefix(double u) const {
  int64_t i = 1;
  while (i < capacity_) {
    const double left = sum_[2 * i];
    const double right = sum_[2 * i + 1];
    if (left > 0.0 && (u < left || right <= 0.0)) {
      i = 2 * i;
    } else {
      u -= left;
      i = 2 * i + 1;
    }
  }
  return i - capacity_;
}

}  // namespace alignkit
