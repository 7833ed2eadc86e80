#include "core/token_budget.h"

#include <algorithm>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>

namespace alignkit {

namespace {

// Max-segment tree over bin slots; key(bin) >= length  <=>  the item fits into the bin.
class MaxTree {
 public:
  explicit MaxTree(int64_t n) {
    while (size_ < n) size_ <<= 1;
    key_.assign(static_cast<size_t>(2 * size_), 0);
  }
  // O(log n)
  void set(int64_t i, int64_t v) {
    int64_t p = size_ + i;
    key_[p] = v;
    for (p >>= 1; p >= 1; p >>= 1) key_[p] = std::max(key_[2 * p], key_[2 * p + 1]);
  }
  // Leftmost leaf with key >= need, or -1. O(log n)
  int64_t leftmost_at_least(int64_t need) const {
    if (key_[1] < need) return -1;
    int64_t p = 1;
    while (p < size_) p = key_[2 * p] >= need ? 2 * p : 2 * p + 1;
    return p - size_;
  }

 private:
  int64_t size_ = 1;
  std::vector<int64_t> key_;
};

}  // namespace

std::vector<std::vector<int64_t>> first_fit_decreasing(const std::vector<int64_t>& lengths, int64_t max_tokens,
                                                       bool padded) {
  if (max_tokens <= 0) {
    throw std::invalid_argument("max_tokens must be positive, got " + std::to_string(max_tokens));
  }
  const int64_t n = static_cast<int64_t>(lengths.size());
  for (int64_t i = 0; i < n; ++i) {
    if (lengths[i] <= 0) {
      throw std::invalid_argument("sequence lengths must be positive, got " + std::to_string(lengths[i]) +
                                  " at position " + std::to_string(i));
    }
    if (lengths[i] > max_tokens) {
      throw std::invalid_argument("a sequence of " + std::to_string(lengths[i]) +
                                  " tokens does not fit in max_tokens=" + std::to_string(max_tokens));
    }
  }
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  // Stable so equal lengths keep their input order (deterministic output).
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });

  std::vector<std::vector<int64_t>> bins;
  std::vector<int64_t> used;   // packed: tokens in the bin
  std::vector<int64_t> first;  // padded: longest (= first placed) length in the bin
  MaxTree tree(std::max<int64_t>(n, 1));
  auto key_of = [&](size_t b) -> int64_t {
    if (!padded) return max_tokens - used[b];
    // (count + 1) * first[b] <= max_tokens, by division so huge lengths cannot overflow.
    const int64_t count = static_cast<int64_t>(bins[b].size());
    return first[b] <= max_tokens / (count + 1) ? max_tokens : 0;
  };
  for (int64_t item : order) {
    const int64_t len = lengths[item];
    int64_t b = tree.leftmost_at_least(len);
    if (b < 0) {
      b = static_cast<int64_t>(bins.size());
      bins.emplace_back();
      used.push_back(0);
      first.push_back(len);
    }
    bins[b].push_back(item);
    // Packed: the tree only offers bins with max_tokens - used[b] >= len, so this stays <= max_tokens.
    // Padded: count * first[b] <= max_tokens bounds it too; saturate anyway rather than overflow.
    if (__builtin_add_overflow(used[b], len, &used[b])) used[b] = std::numeric_limits<int64_t>::max();
    tree.set(b, key_of(static_cast<size_t>(b)));
  }
  return bins;
}

}  // namespace alignkit
