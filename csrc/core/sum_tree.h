// Sum/min segment tree over a power-of-two number of leaves, used for prioritized replay.
//
//   index 1 = root; node i has children 2i and 2i+1; leaves live at [capacity, 2*capacity).
//   sum_[i] = sum of the leaves under i;  min_[i] = min of the leaves under i (+inf if empty).
//
// A leaf value of 0 means "not sampleable" (an empty slot); its min entry is +inf so that
// empty slots never become the minimum used to normalize importance weights.
#pragma once

#include <cstdint>
#include <vector>

namespace alignkit {

class SumTree {
 public:
  // capacity is rounded up to a power of two (at least 1). O(capacity).
  explicit SumTree(int64_t capacity = 1);

  int64_t capacity() const { return capacity_; }

  // Set leaf `index` to `value` (> 0 for a live entry, 0 to clear it). O(log n).
  void set(int64_t index, double value);
  double get(int64_t index) const { return sum_[capacity_ + index]; }

  // Sum over all leaves. O(1).
  double total() const { return sum_[1]; }
  // Smallest positive leaf (+inf when none is set). O(1).
  double min() const { return min_[1]; }

  // Leaf index i such that prefix(i) <= u < prefix(i + 1), skipping zero leaves; u is in
  // [0, total()). Never returns an empty leaf while total() > 0. O(log n).
  int64_t find_prefix(double u) const;

  // Clear every leaf. O(capacity).
  void reset();

 private:
  int64_t capacity_;
  std::vector<double> sum_;
  std::vector<double> min_;
};

}  // namespace alignkit
