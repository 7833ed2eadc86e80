// Token-budget minibatching: first-fit decreasing bin packing of sequence lengths.
#pragma once

#include <cstdint>
#include <vector>

namespace alignkit {

// Split items (given by their lengths) into bins so that each bin's cost stays <= max_tokens:
//   packed (padded == false): cost = sum of lengths in the bin;
//   padded (padded == true):  cost = (items in the bin) * (longest item in the bin).
// Items are placed longest first into the first bin that still fits (first-fit decreasing),
// so every bin is at most 11/9 OPT + 6/9 bins. Returns, per bin, the item indices (each bin
// ordered longest first). Throws std::invalid_argument for max_tokens <= 0, a length <= 0,
// or an item longer than max_tokens. O(n log n): sorting plus a max-segment tree over the
// bins' remaining capacities to find the first bin that fits in O(log n).
std::vector<std::vector<int64_t>> first_fit_decreasing(const std::vector<int64_t>& lengths, int64_t max_tokens,
                                                       bool padded);

}  // namespace alignkit
