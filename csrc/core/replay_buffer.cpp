#include "core/replay_buffer.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

namespace alignkit {

// ---------------------------------------------------------------------------------------------
// dtypes

DType dtype_from_code(int32_t code) {
  if (code < 0 || code >= kNumDTypes) {
    throw std::invalid_argument("unknown dtype code " + std::to_string(code));
  }
  return static_cast<DType>(code);
}

int64_t dtype_itemsize(DType dtype) {
  switch (dtype) {
    case DType::kBool:
    case DType::kInt8:
    case DType::kUInt8:
      return 1;
    case DType::kInt16:
    case DType::kFloat16:
      return 2;
    case DType::kInt32:
    case DType::kFloat32:
      return 4;
    case DType::kInt64:
    case DType::kFloat64:
      return 8;
  }
  throw std::invalid_argument("unknown dtype");
}

bool dtype_is_integer(DType dtype) {
  switch (dtype) {
    case DType::kBool:
    case DType::kInt8:
    case DType::kUInt8:
    case DType::kInt16:
    case DType::kInt32:
    case DType::kInt64:
      return true;
    default:
      return false;
  }
}

const char* dtype_name(DType dtype) {
  static const char* names[kNumDTypes] = {"bool",    "int8",    "uint8",   "int16",  "int32",
                                          "int64",   "float16", "float32", "float64"};
  return names[static_cast<int32_t>(dtype)];
}

// ---------------------------------------------------------------------------------------------
// OwnedBuffer

OwnedBuffer::OwnedBuffer(size_t nbytes) : nbytes_(nbytes) {
  data_ = static_cast<uint8_t*>(std::malloc(nbytes == 0 ? 1 : nbytes));
  if (data_ == nullptr) {
    throw OutOfMemory("replay buffer: out of memory allocating a batch buffer of " + std::to_string(nbytes) + " bytes");
  }
}
OwnedBuffer::~OwnedBuffer() { std::free(data_); }
OwnedBuffer::OwnedBuffer(OwnedBuffer&& other) noexcept : data_(other.data_), nbytes_(other.nbytes_) {
  other.data_ = nullptr;
  other.nbytes_ = 0;
}
OwnedBuffer& OwnedBuffer::operator=(OwnedBuffer&& other) noexcept {
  if (this != &other) {
    std::free(data_);
    data_ = other.data_;
    nbytes_ = other.nbytes_;
    other.data_ = nullptr;
    other.nbytes_ = 0;
  }
  return *this;
}
uint8_t* OwnedBuffer::release() {
  uint8_t* p = data_;
  data_ = nullptr;
  nbytes_ = 0;
  return p;
}

// ---------------------------------------------------------------------------------------------
// helpers

namespace {

std::string str(int64_t v) { return std::to_string(v); }

// rows * cols * itemsize as a byte count, or OutOfMemory when the product overflows (a batch that
// large could never be allocated).
size_t batch_bytes(int64_t rows, int64_t cols, int64_t itemsize) {
  int64_t n = 0;
  if (__builtin_mul_overflow(rows, cols, &n) || __builtin_mul_overflow(n, itemsize, &n)) {
    throw OutOfMemory("replay buffer: a batch of " + str(rows) + " x " + str(cols) + " elements of " + str(itemsize) +
                      " bytes overflows int64 (it could never be allocated)");
  }
  return static_cast<size_t>(n);
}

// v.reserve(n), with OutOfMemory (saying what for) instead of std::length_error / std::bad_alloc.
template <typename T>
void reserve_or_throw(std::vector<T>& v, int64_t n, const std::string& what) {
  try {
    v.reserve(static_cast<size_t>(n));
  } catch (const std::length_error&) {
    throw OutOfMemory("replay buffer: out of memory reserving " + str(n) + " entries for " + what);
  } catch (const std::bad_alloc&) {
    throw OutOfMemory("replay buffer: out of memory reserving " + str(n) + " entries for " + what);
  }
}

// Fill `count` elements of `itemsize` bytes with the pad value.
void fill_pad(uint8_t* dst, int64_t count, int64_t itemsize, const PadBytes& pad) {
  if (count <= 0) return;
  bool zero = true;
  for (int64_t i = 0; i < itemsize; ++i) zero = zero && pad[static_cast<size_t>(i)] == 0;
  if (zero || itemsize == 1) {
    std::memset(dst, pad[0], static_cast<size_t>(count * itemsize));
    return;
  }
  switch (itemsize) {
    case 2: {
      uint16_t v;
      std::memcpy(&v, pad.data(), 2);
      for (int64_t i = 0; i < count; ++i) std::memcpy(dst + 2 * i, &v, 2);
      break;
    }
    case 4: {
      uint32_t v;
      std::memcpy(&v, pad.data(), 4);
      for (int64_t i = 0; i < count; ++i) std::memcpy(dst + 4 * i, &v, 4);
      break;
    }
    default: {
      uint64_t v;
      std::memcpy(&v, pad.data(), 8);
      for (int64_t i = 0; i < count; ++i) std::memcpy(dst + 8 * i, &v, 8);
      break;
    }
  }
}

int64_t read_integer(const uint8_t* p, DType dtype) {
  switch (dtype) {
    case DType::kBool:
    case DType::kUInt8:
      return *p;
    case DType::kInt8: {
      int8_t v;
      std::memcpy(&v, p, 1);
      return v;
    }
    case DType::kInt16: {
      int16_t v;
      std::memcpy(&v, p, 2);
      return v;
    }
    case DType::kInt32: {
      int32_t v;
      std::memcpy(&v, p, 4);
      return v;
    }
    case DType::kInt64: {
      int64_t v;
      std::memcpy(&v, p, 8);
      return v;
    }
    default:
      throw std::invalid_argument("not an integer dtype");
  }
}

// Draw k distinct indices of [0, n) in random order: sparse Fisher-Yates, O(k) expected.
std::vector<int64_t> draw_distinct(std::mt19937_64& rng, int64_t n, int64_t k) {
  std::vector<int64_t> out;
  out.reserve(static_cast<size_t>(k));
  std::unordered_map<int64_t, int64_t> swapped;
  auto at = [&](int64_t i) {
    auto it = swapped.find(i);
    return it == swapped.end() ? i : it->second;
  };
  for (int64_t i = 0; i < k; ++i) {
    std::uniform_int_distribution<int64_t> dist(i, n - 1);
    const int64_t j = dist(rng);
    const int64_t vi = at(i);
    const int64_t vj = at(j);
    out.push_back(vj);
    swapped[j] = vi;
  }
  return out;
}

uint32_t crc32(const uint8_t* data, size_t n, uint32_t crc = 0) {
  static uint32_t table[256];
  static bool init = [] {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      table[i] = c;
    }
    return true;
  }();
  (void)init;
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = table[(crc ^ data[i]) & 0xFFu] ^ (crc >> 8);
  return ~crc;
}

constexpr char kMagic[8] = {'A', 'K', 'R', 'E', 'P', 'L', 'A', 'Y'};
constexpr uint32_t kFormatVersion = 1;
constexpr uint32_t kHeaderBytes = 32;
constexpr uint32_t kEndianMarker = 0x01020304u;
// Smallest ring a first add allocates (capped at capacity_tokens): small buffers grow in few steps.
constexpr int64_t kMinRingTokens = 4096;
// Ids loaded from a file leave at least 2**40 ids of headroom so ++next_id_ cannot overflow.
constexpr int64_t kMaxLoadedId = std::numeric_limits<int64_t>::max() - (int64_t{1} << 40);

}  // namespace

// ---------------------------------------------------------------------------------------------
// construction

ReplayBuffer::ReplayBuffer(Schema schema, BufferConfig config)
    : schema_(std::move(schema)), config_(config), tree_(16), rng_(config.seed) {
  if (config_.capacity_tokens <= 0) {
    throw std::invalid_argument("capacity_tokens must be positive, got " + str(config_.capacity_tokens));
  }
  if (config_.capacity_tokens > kMaxCapacityTokens) {
    throw std::invalid_argument("capacity_tokens must be at most 2**40 (" + str(kMaxCapacityTokens) + "), got " +
                                str(config_.capacity_tokens));
  }
  if (config_.capacity_sequences < 0) {
    throw std::invalid_argument("capacity_sequences must be >= 0 (0 = unbounded), got " +
                                str(config_.capacity_sequences));
  }
  if (!std::isfinite(config_.alpha) || config_.alpha < 0.0) {
    throw std::invalid_argument("alpha must be finite and >= 0, got " + std::to_string(config_.alpha));
  }
  if (schema_.token_fields.empty()) throw std::invalid_argument("the schema needs at least one per-token field");
  std::unordered_set<std::string> names;
  for (const auto* fields : {&schema_.token_fields, &schema_.sequence_fields}) {
    for (const FieldSpec& f : *fields) {
      if (f.name.empty()) throw std::invalid_argument("field names must be non-empty");
      if (!names.insert(f.name).second) throw std::invalid_argument("duplicate field name '" + f.name + "'");
      dtype_from_code(static_cast<int32_t>(f.dtype));
    }
  }
  const int32_t nseq = static_cast<int32_t>(schema_.sequence_fields.size());
  for (auto [index, role] : {std::pair{schema_.group_field, "group"}, std::pair{schema_.version_field, "version"}}) {
    if (index < -1 || index >= nseq) {
      throw std::invalid_argument(std::string(role) + " field index " + str(index) + " is out of range");
    }
    if (index >= 0 && !dtype_is_integer(schema_.sequence_fields[static_cast<size_t>(index)].dtype)) {
      throw std::invalid_argument(std::string(role) + " field '" +
                                  schema_.sequence_fields[static_cast<size_t>(index)].name +
                                  "' must have an integer dtype");
    }
  }
  for (const FieldSpec& f : schema_.token_fields) token_itemsize_.push_back(dtype_itemsize(f.dtype));
  arenas_.resize(schema_.token_fields.size());  // allocated by the first add (reserve_ring_locked)
  for (const FieldSpec& f : schema_.sequence_fields) {
    seq_itemsize_.push_back(dtype_itemsize(f.dtype));
    seq_row_offset_.push_back(row_bytes_);
    row_bytes_ += seq_itemsize_.back();
  }
  const int64_t initial = 16;
  records_.resize(static_cast<size_t>(initial));
  rows_.resize(static_cast<size_t>(initial * row_bytes_));
  record_mask_ = initial - 1;
  tree_ = SumTree(initial);
}

// ---------------------------------------------------------------------------------------------
// ring maintenance (mu_ held)

void ReplayBuffer::check_live_locked(int64_t id) const {
  if (!live_locked(id)) {
    std::string range = first_id_ == next_id_ ? "the buffer is empty"
                                              : "live ids are [" + str(first_id_) + ", " + str(next_id_) + ")";
    throw std::out_of_range("id " + str(id) + " is not in the buffer (" +
                            (id >= 0 && id < first_id_ ? "evicted" : "never added") + "; " + range + ")");
  }
}

double ReplayBuffer::tree_value(double priority) const {
  return config_.alpha == 0.0 ? 1.0 : std::pow(priority, config_.alpha);
}

namespace {
// Sum-tree totals are projected in a scaled domain (x 2^-64) so that the projection itself never
// overflows; the margin covers the rounding of the tree's pairwise sums against the exact sum.
constexpr int kTotalScaleExp = -64;
const double kScaledTotalLimit = std::ldexp(std::numeric_limits<double>::max(), kTotalScaleExp) * (1.0 - 1e-9);

double scaled(double v) { return std::ldexp(v, kTotalScaleExp); }

// A priority is storable when p is finite and > 0 and p^alpha is finite and > 0 (no overflow to
// inf, no underflow to 0: a zero leaf would never be sampled and a zero total has nothing to draw).
void check_priority(double p, double value, const char* name, const std::string& where) {
  if (!std::isfinite(p) || p <= 0.0) {
    throw std::invalid_argument(std::string(name) + " must be finite and > 0, got " + std::to_string(p) + where);
  }
  if (!std::isfinite(value) || !(value > 0.0)) {
    std::ostringstream os;
    os << name << " " << p << " raised to alpha " << (value > 0.0 ? "overflows to inf" : "underflows to 0") << where;
    throw std::invalid_argument(os.str());
  }
}

[[noreturn]] void throw_total_overflow(const char* name) {
  throw std::invalid_argument(std::string(name) +
                              ": the sum of priorities^alpha over the buffer would overflow (not finite); "
                              "the buffer is unchanged");
}
}  // namespace

// O(log N) for the tree update; O(1) otherwise.
void ReplayBuffer::evict_oldest_locked() {
  const int64_t id = first_id_;
  Record& rec = record_locked(id);
  head_offset_ = (rec.offset + rec.length) % ring_tokens_;
  num_tokens_ -= rec.length;
  tree_.set(id & record_mask_, 0.0);
  if (schema_.group_field >= 0) {
    auto it = groups_.find(rec.group);
    if (it != groups_.end()) {
      Group& g = it->second;
      if (!g.ids.empty() && g.ids.front() == id) g.ids.pop_front();
      if (g.ids.empty()) {
        const size_t pos = g.key_index;
        const int64_t last = group_keys_.back();
        group_keys_[pos] = last;
        groups_[last].key_index = pos;
        group_keys_.pop_back();
        groups_.erase(rec.group);
      }
    }
  }
  ++first_id_;
  if (first_id_ == next_id_) head_offset_ = 0;
}

// Doubles the metadata ring and the sum-tree. O(live sequences), amortized O(1) per add.
void ReplayBuffer::grow_records_locked() {
  const int64_t new_cap = 2 * (record_mask_ + 1);
  const int64_t new_mask = new_cap - 1;
  std::vector<Record> records(static_cast<size_t>(new_cap));
  std::vector<uint8_t> rows(static_cast<size_t>(new_cap * row_bytes_));
  SumTree tree(new_cap);
  for (int64_t id = first_id_; id < next_id_; ++id) {
    const Record& rec = record_locked(id);
    records[static_cast<size_t>(id & new_mask)] = rec;
    if (row_bytes_ > 0) {
      std::memcpy(rows.data() + (id & new_mask) * row_bytes_, row_locked(id), static_cast<size_t>(row_bytes_));
    }
    tree.set(id & new_mask, tree_value(rec.priority));
  }
  records_.swap(records);
  rows_.swap(rows);
  tree_ = std::move(tree);
  record_mask_ = new_mask;
}

int64_t ReplayBuffer::read_int_field(const uint8_t* src, int64_t b, int32_t field) const {
  const DType dtype = schema_.sequence_fields[static_cast<size_t>(field)].dtype;
  return read_integer(src + b * seq_itemsize_[static_cast<size_t>(field)], dtype);
}

void ReplayBuffer::append_locked(const AddRequest& r, int64_t b, int64_t version, int64_t group,
                                 double priority) {
  const int64_t len = r.lengths[b];
  while (num_tokens_ + len > config_.capacity_tokens || (config_.capacity_sequences > 0 && count_locked() >= config_.capacity_sequences)) {
    evict_oldest_locked();
  }
  if (count_locked() > record_mask_) grow_records_locked();
  const int64_t id = next_id_;
  // reserve_ring_locked made the ring hold every live token of this add: nothing live is overwritten.
  const int64_t ring = ring_tokens_;
  const int64_t offset = (head_offset_ + num_tokens_) % ring;
  // Copy each field into the ring: at most two memcpy (the run may wrap past the end).
  const int64_t first_part = std::min(len, ring - offset);
  for (size_t f = 0; f < arenas_.size(); ++f) {
    const int64_t isz = token_itemsize_[f];
    const uint8_t* src =
        static_cast<const uint8_t*>(r.token_fields[f].data) + (b * r.row_stride + r.starts[b]) * isz;
    uint8_t* arena = arenas_[f].get();
    std::memcpy(arena + offset * isz, src, static_cast<size_t>(first_part * isz));
    if (len > first_part) std::memcpy(arena, src + first_part * isz, static_cast<size_t>((len - first_part) * isz));
  }
  Record& rec = record_locked(id);
  rec.offset = offset;
  rec.length = len;
  rec.version = version;
  rec.group = group;
  rec.priority = priority;
  uint8_t* row = row_locked(id);
  for (size_t f = 0; f < seq_itemsize_.size(); ++f) {
    const int64_t isz = seq_itemsize_[f];
    std::memcpy(row + seq_row_offset_[f], static_cast<const uint8_t*>(r.sequence_fields[f].data) + b * isz,
                static_cast<size_t>(isz));
  }
  tree_.set(id & record_mask_, tree_value(priority));
  if (schema_.group_field >= 0) {
    auto [it, inserted] = groups_.try_emplace(group);
    if (inserted) {
      it->second.key_index = group_keys_.size();
      group_keys_.push_back(group);
    }
    it->second.ids.push_back(id);
  }
  ++next_id_;
  num_tokens_ += len;
}

// ---------------------------------------------------------------------------------------------
// add

// Replays the evictions and appends of add(r) on the sum-tree total (nothing is modified) and
// throws if the total would stop being finite at any step. Returns the most live tokens the
// buffer holds during the add (what the rings must hold). O(n + evictions).
int64_t ReplayBuffer::project_add_locked(const AddRequest& r) const {
  const int64_t n = r.num_sequences;
  const int64_t cap = config_.capacity_tokens;
  double total = scaled(tree_.total());
  int64_t tokens = num_tokens_, first = first_id_, next = next_id_, peak = num_tokens_;
  auto new_value = [&](int64_t b) {
    return tree_value(r.priorities != nullptr ? r.priorities[b] : max_priority_);
  };
  for (int64_t b = 0; b < n; ++b) {
    const int64_t len = r.lengths[b];
    while (tokens + len > cap || (config_.capacity_sequences > 0 && next - first >= config_.capacity_sequences)) {
      if (first < next_id_) {
        tokens -= records_[static_cast<size_t>(first & record_mask_)].length;
        total -= scaled(tree_.get(first & record_mask_));
      } else {
        tokens -= r.lengths[first - next_id_];
        total -= scaled(new_value(first - next_id_));
      }
      ++first;
    }
    tokens += len;
    peak = std::max(peak, tokens);
    ++next;
    total += scaled(new_value(b));
    if (!(total <= kScaledTotalLimit)) throw_total_overflow("priority");
  }
  return peak;
}

// Grows every ring to at least `tokens` (doubling, capped at capacity_tokens) and copies the live
// tokens to offset 0 of the new rings. All or nothing: OutOfMemory leaves the buffer unchanged.
// O(live tokens + live sequences); amortized O(1) per added token.
void ReplayBuffer::reserve_ring_locked(int64_t tokens) {
  if (tokens <= ring_tokens_) return;
  const int64_t cap = config_.capacity_tokens;
  const int64_t doubled = ring_tokens_ > cap / 2 ? cap : 2 * ring_tokens_;
  const int64_t size = std::min(cap, std::max({tokens, doubled, kMinRingTokens}));
  std::vector<std::unique_ptr<uint8_t[]>> arenas(arenas_.size());
  for (size_t f = 0; f < arenas.size(); ++f) {
    const auto bytes = static_cast<size_t>(size * token_itemsize_[f]);
    arenas[f].reset(new (std::nothrow) uint8_t[bytes]);
    if (arenas[f] == nullptr) {
      throw OutOfMemory("replay buffer: out of memory growing the ring of per-token field '" +
                        schema_.token_fields[f].name + "' to " + str(size) + " tokens (" +
                        std::to_string(bytes) + " bytes; capacity_tokens=" + str(cap) + "); the buffer is unchanged");
    }
    if (num_tokens_ > 0) {
      const int64_t isz = token_itemsize_[f];
      const int64_t first = std::min(num_tokens_, ring_tokens_ - head_offset_);
      std::memcpy(arenas[f].get(), arenas_[f].get() + head_offset_ * isz, static_cast<size_t>(first * isz));
      std::memcpy(arenas[f].get() + first * isz, arenas_[f].get(), static_cast<size_t>((num_tokens_ - first) * isz));
    }
  }
  int64_t offset = 0;
  for (int64_t id = first_id_; id < next_id_; ++id) {
    Record& rec = record_locked(id);
    rec.offset = offset;
    offset += rec.length;
  }
  arenas_.swap(arenas);
  ring_tokens_ = size;
  head_offset_ = 0;
}

std::vector<int64_t> ReplayBuffer::add(const AddRequest& r) {
  const int64_t n = r.num_sequences;
  const int64_t cap = config_.capacity_tokens;
  if (n < 0) throw std::invalid_argument("the number of sequences must be >= 0, got " + str(n));
  if (r.token_fields.size() != schema_.token_fields.size() ||
      r.sequence_fields.size() != schema_.sequence_fields.size()) {
    throw std::invalid_argument("add: expected " + str(static_cast<int64_t>(schema_.token_fields.size())) +
                                " per-token and " + str(static_cast<int64_t>(schema_.sequence_fields.size())) +
                                " per-sequence fields");
  }
  if (n > 0 && (r.starts == nullptr || r.lengths == nullptr)) throw std::invalid_argument("add: missing lengths");
  if (r.row_stride < 0) throw std::invalid_argument("add: row stride must be >= 0");
  for (int64_t b = 0; b < n; ++b) {
    const int64_t start = r.starts[b];
    const int64_t len = r.lengths[b];
    if (len <= 0) {
      throw std::invalid_argument("lengths must be positive (empty sequences cannot be stored), got " + str(len) +
                                  " for sequence " + str(b));
    }
    if (len > cap) {
      throw std::invalid_argument("sequence " + str(b) + " has " + str(len) +
                                  " tokens, more than capacity_tokens=" + str(cap));
    }
    if (start < 0) throw std::invalid_argument("sequence " + str(b) + " starts at a negative offset " + str(start));
    if (r.row_stride > 0 && start > r.row_stride - len) {
      throw std::invalid_argument("sequence " + str(b) + " (start " + str(start) + ", length " + str(len) +
                                  ") does not fit in a row of " + str(r.row_stride) + " tokens");
    }
    for (size_t f = 0; f < r.token_fields.size(); ++f) {
      const int64_t avail = r.token_fields[f].num_elements;
      // b * row_stride <= avail is checked first so nothing below overflows.
      if (r.token_fields[f].data == nullptr || (r.row_stride > 0 && b > avail / r.row_stride) ||
          start > avail - b * r.row_stride || len > avail - b * r.row_stride - start) {
        throw std::invalid_argument("field '" + schema_.token_fields[f].name + "' has " + str(avail) +
                                    " elements, too few for sequence " + str(b) + " (start " + str(start) +
                                    ", length " + str(len) + ")");
      }
    }
  }
  for (size_t f = 0; f < r.sequence_fields.size(); ++f) {
    if (r.sequence_fields[f].num_elements < n || (n > 0 && r.sequence_fields[f].data == nullptr)) {
      throw std::invalid_argument("field '" + schema_.sequence_fields[f].name + "' has " +
                                  str(r.sequence_fields[f].num_elements) + " values for " + str(n) + " sequences");
    }
  }
  if (r.priorities != nullptr) {
    for (int64_t b = 0; b < n; ++b) {
      const double p = r.priorities[b];
      check_priority(p, tree_value(p), "priority", " for sequence " + str(b));
    }
  }
  std::vector<int64_t> versions(static_cast<size_t>(n), 0), groups(static_cast<size_t>(n), 0);
  for (int64_t b = 0; b < n; ++b) {
    if (schema_.version_field >= 0) {
      versions[static_cast<size_t>(b)] = read_int_field(
          static_cast<const uint8_t*>(r.sequence_fields[static_cast<size_t>(schema_.version_field)].data), b,
          schema_.version_field);
    }
    if (schema_.group_field >= 0) {
      groups[static_cast<size_t>(b)] = read_int_field(
          static_cast<const uint8_t*>(r.sequence_fields[static_cast<size_t>(schema_.group_field)].data), b,
          schema_.group_field);
    }
  }

  std::vector<int64_t> ids(static_cast<size_t>(n));
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (n > std::numeric_limits<int64_t>::max() - next_id_) {
      throw std::invalid_argument("add: sequence ids exhausted (next id " + str(next_id_) + ")");
    }
    reserve_ring_locked(project_add_locked(r));
    for (int64_t b = 0; b < n; ++b) {
      const double p = r.priorities != nullptr ? r.priorities[b] : max_priority_;
      if (r.priorities != nullptr) max_priority_ = std::max(max_priority_, p);
      ids[static_cast<size_t>(b)] = next_id_;
      append_locked(r, b, versions[static_cast<size_t>(b)], groups[static_cast<size_t>(b)], p);
    }
  }
  cv_.notify_all();
  return ids;
}

// ---------------------------------------------------------------------------------------------
// sampling

std::vector<int64_t> ReplayBuffer::eligible_ids_locked(bool filter_version, int64_t min_version) const {
  std::vector<int64_t> out;
  for (int64_t id = first_id_; id < next_id_; ++id) {
    if (!filter_version || records_[static_cast<size_t>(id & record_mask_)].version >= min_version) out.push_back(id);
  }
  return out;
}

// O(live sequences): scans every group.
std::vector<std::vector<int64_t>> ReplayBuffer::eligible_groups_locked(const GroupSpec& spec) const {
  std::vector<std::vector<int64_t>> out;
  for (int64_t key : group_keys_) {
    const Group& g = groups_.at(key);
    if (static_cast<int64_t>(g.ids.size()) < spec.min_group_size) continue;
    bool ok = true;
    if (spec.filter_version) {
      for (int64_t id : g.ids) {
        ok = ok && records_[static_cast<size_t>(id & record_mask_)].version >= spec.min_version;
      }
    }
    if (ok) out.emplace_back(g.ids.begin(), g.ids.end());
  }
  return out;
}

void ReplayBuffer::wait_locked(std::unique_lock<std::mutex>& lock, double timeout_s, int64_t need,
                               const std::function<int64_t()>& available, const std::string& what) {
  if (available() >= need) return;
  auto message = [&] {
    return what + " needs " + str(need) + " eligible, the buffer has " + str(available()) + " (" +
           str(count_locked()) + " sequences stored)";
  };
  if (!(timeout_s > 0.0)) {
    if (count_locked() == 0) throw std::invalid_argument(what + ": the buffer is empty");
    throw std::invalid_argument(message());
  }
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(std::min(timeout_s, 1e6)));
  while (available() < need) {
    if (cv_.wait_until(lock, deadline) == std::cv_status::timeout && available() < need) {
      throw TimeoutError(message());
    }
  }
}

Batch ReplayBuffer::sample(const SampleSpec& spec, const GatherSpec& gather, double timeout_s) {
  if (spec.batch_size <= 0) throw std::invalid_argument("batch_size must be positive, got " + str(spec.batch_size));
  if (!std::isfinite(spec.beta) || spec.beta < 0.0) {
    throw std::invalid_argument("beta must be finite and >= 0, got " + std::to_string(spec.beta));
  }
  if (spec.strategy == Strategy::kPrioritized && !spec.replace) {
    throw std::invalid_argument("replace=False is not supported with prioritized sampling");
  }
  if (spec.filter_version && schema_.version_field < 0) {
    throw std::invalid_argument("min_version needs a version field in the schema");
  }
  std::unique_lock<std::mutex> lock(mu_);
  const bool filter = spec.filter_version;
  const int64_t need = std::max(spec.min_available, spec.replace ? int64_t{1} : spec.batch_size);
  auto available = [&]() -> int64_t {
    if (!filter) return count_locked();
    int64_t c = 0;
    for (int64_t id = first_id_; id < next_id_ && c < need; ++id) {
      c += records_[static_cast<size_t>(id & record_mask_)].version >= spec.min_version;
    }
    return c;
  };
  wait_locked(lock, timeout_s, need, available,
              "sample(batch_size=" + str(spec.batch_size) + (spec.replace ? "" : ", replace=False") +
                  (filter ? ", min_version=" + str(spec.min_version) : "") + ")");

  std::vector<int64_t> ids;
  std::vector<double> weights;
  reserve_or_throw(ids, spec.batch_size, "sample(batch_size=" + str(spec.batch_size) + ")");
  if (spec.strategy == Strategy::kPrioritized) {
    reserve_or_throw(weights, spec.batch_size, "sample(batch_size=" + str(spec.batch_size) + ") weights");
  }
  if (spec.strategy == Strategy::kUniform) {
    std::vector<int64_t> elig;
    if (filter) elig = eligible_ids_locked(true, spec.min_version);
    const int64_t n = filter ? static_cast<int64_t>(elig.size()) : count_locked();
    auto id_at = [&](int64_t i) { return filter ? elig[static_cast<size_t>(i)] : first_id_ + i; };
    if (spec.replace) {
      std::uniform_int_distribution<int64_t> dist(0, n - 1);
      for (int64_t k = 0; k < spec.batch_size; ++k) ids.push_back(id_at(dist(rng_)));
    } else {
      for (int64_t i : draw_distinct(rng_, n, spec.batch_size)) ids.push_back(id_at(i));
    }
  } else if (!filter) {
    // O(k log N): k independent draws from the sum-tree. w_i = (N P_i)^-beta / max_j (N P_j)^-beta
    // = (P_min / P_i)^beta (Schaul et al. 2016, PER), normalized over the whole buffer.
    const double total = tree_.total();
    const double pmin = tree_.min();
    if (!(total > 0.0) || !std::isfinite(total)) {
      throw std::invalid_argument("prioritized sampling: the sum of priorities^alpha is " + std::to_string(total) +
                                  " (must be finite and > 0)");
    }
    std::uniform_real_distribution<double> dist(0.0, total);
    for (int64_t k = 0; k < spec.batch_size; ++k) {
      const int64_t leaf = tree_.find_prefix(dist(rng_));
      const int64_t id = first_id_ + ((leaf - first_id_) & record_mask_);
      ids.push_back(id);
      weights.push_back(std::pow(pmin / tree_.get(leaf), spec.beta));
    }
  } else {
    // Staleness-filtered prioritized sampling: O(N) prefix sums over the eligible ids.
    std::vector<int64_t> elig = eligible_ids_locked(true, spec.min_version);
    std::vector<double> cum(elig.size());
    double total = 0.0, pmin = std::numeric_limits<double>::infinity();
    for (size_t i = 0; i < elig.size(); ++i) {
      const double v = tree_.get(elig[i] & record_mask_);
      total += v;
      cum[i] = total;
      pmin = std::min(pmin, v);
    }
    if (!(total > 0.0) || !std::isfinite(total)) {
      throw std::invalid_argument("prioritized sampling: the sum of priorities^alpha over the eligible sequences is " +
                                  std::to_string(total) + " (must be finite and > 0)");
    }
    std::uniform_real_distribution<double> dist(0.0, total);
    for (int64_t k = 0; k < spec.batch_size; ++k) {
      size_t i = static_cast<size_t>(std::upper_bound(cum.begin(), cum.end(), dist(rng_)) - cum.begin());
      i = std::min(i, elig.size() - 1);
      ids.push_back(elig[i]);
      weights.push_back(std::pow(pmin / tree_.get(elig[i] & record_mask_), spec.beta));
    }
  }
  Batch batch = gather_locked(ids, gather);
  batch.weights = std::move(weights);
  return batch;
}

Batch ReplayBuffer::sample_groups(const GroupSpec& spec, const GatherSpec& gather, double timeout_s) {
  if (schema_.group_field < 0) throw std::invalid_argument("sample_groups needs a group field in the schema");
  if (spec.num_groups <= 0) throw std::invalid_argument("num_groups must be positive, got " + str(spec.num_groups));
  if (spec.min_group_size <= 0) {
    throw std::invalid_argument("min_group_size must be positive, got " + str(spec.min_group_size));
  }
  if (spec.filter_version && schema_.version_field < 0) {
    throw std::invalid_argument("min_version needs a version field in the schema");
  }
  std::unique_lock<std::mutex> lock(mu_);
  auto available = [&]() -> int64_t { return static_cast<int64_t>(eligible_groups_locked(spec).size()); };
  wait_locked(lock, timeout_s, spec.num_groups, available,
              "sample_groups(num_groups=" + str(spec.num_groups) + ", min_group_size=" + str(spec.min_group_size) +
                  ")");
  std::vector<std::vector<int64_t>> groups = eligible_groups_locked(spec);
  std::vector<int64_t> ids;
  for (int64_t g : draw_distinct(rng_, static_cast<int64_t>(groups.size()), spec.num_groups)) {
    const auto& members = groups[static_cast<size_t>(g)];
    ids.insert(ids.end(), members.begin(), members.end());
  }
  return gather_locked(ids, gather);
}

Batch ReplayBuffer::gather(const std::vector<int64_t>& ids, const GatherSpec& spec, bool skip_missing) {
  std::lock_guard<std::mutex> lock(mu_);
  if (skip_missing) {
    std::vector<int64_t> live;
    live.reserve(ids.size());
    for (int64_t id : ids) {
      if (live_locked(id)) live.push_back(id);
    }
    return gather_locked(live, spec);
  }
  return gather_locked(ids, spec);
}

Batch ReplayBuffer::gather_locked(const std::vector<int64_t>& ids, const GatherSpec& spec) {
  const size_t nfields = schema_.token_fields.size();
  if (!spec.pad_values.empty() && spec.pad_values.size() != nfields) {
    throw std::invalid_argument("expected one pad value per token field");
  }
  for (int64_t id : ids) check_live_locked(id);
  const int64_t B = static_cast<int64_t>(ids.size());
  Batch batch;
  batch.layout = spec.layout;
  batch.ids_only = spec.ids_only;
  batch.ids = ids;
  batch.lengths.resize(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = record_locked(ids[static_cast<size_t>(b)]).length;
    batch.lengths[static_cast<size_t>(b)] = len;
    batch.max_length = std::max(batch.max_length, len);
    batch.total_tokens += len;
  }
  if (spec.ids_only) return batch;
  const bool padded = spec.layout == Layout::kPadded;
  const int64_t length = padded ? batch.max_length : batch.total_tokens;
  if (!padded && length > std::numeric_limits<int32_t>::max()) {
    throw std::invalid_argument("a packed batch of " + str(length) + " tokens overflows int32 cu_seqlens");
  }
  OutputPointers out;
  for (size_t f = 0; f < nfields; ++f) {
    batch.token_fields.emplace_back(batch_bytes(padded ? B : 1, length, token_itemsize_[f]));
    out.token_fields.push_back(batch.token_fields.back().data());
  }
  for (size_t f = 0; f < seq_itemsize_.size(); ++f) {
    batch.sequence_fields.emplace_back(batch_bytes(B, 1, seq_itemsize_[f]));
    out.sequence_fields.push_back(batch.sequence_fields.back().data());
  }
  if (padded) {
    batch.attention_mask = OwnedBuffer(batch_bytes(B, length, 1));
    out.attention_mask = batch.attention_mask.data();
  } else {
    batch.cu_seqlens = OwnedBuffer(batch_bytes(B + 1, 1, 4));
    batch.position_ids = OwnedBuffer(batch_bytes(length, 1, 8));
    out.cu_seqlens = batch.cu_seqlens.data();
    out.position_ids = batch.position_ids.data();
  }
  write_locked(ids, batch.lengths, length, spec, out);
  return batch;
}

void ReplayBuffer::gather_into(const std::vector<int64_t>& ids, const GatherSpec& spec, int64_t length,
                               const OutputPointers& out) {
  if (out.token_fields.size() != schema_.token_fields.size() ||
      out.sequence_fields.size() != schema_.sequence_fields.size()) {
    throw std::invalid_argument("gather_into: one destination per field is required");
  }
  const bool padded = spec.layout == Layout::kPadded;
  if (padded ? out.attention_mask == nullptr : (out.cu_seqlens == nullptr || out.position_ids == nullptr)) {
    throw std::invalid_argument("gather_into: missing attention_mask / cu_seqlens / position_ids destination");
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (!spec.pad_values.empty() && spec.pad_values.size() != schema_.token_fields.size()) {
    throw std::invalid_argument("expected one pad value per token field");
  }
  for (int64_t id : ids) check_live_locked(id);
  std::vector<int64_t> lengths;
  int64_t max_length = 0, total = 0;
  for (int64_t id : ids) {
    lengths.push_back(record_locked(id).length);
    max_length = std::max(max_length, lengths.back());
    if (__builtin_add_overflow(total, lengths.back(), &total)) {
      throw std::invalid_argument("gather_into: the total number of tokens overflows int64");
    }
  }
  if (length < 0) throw std::invalid_argument("gather_into: length must be >= 0, got " + str(length));
  if (padded && length < max_length) {
    throw std::invalid_argument("gather_into: padded length " + str(length) + " is shorter than the longest sequence (" +
                                str(max_length) + ")");
  }
  // No stored sequence is longer than the ring, so a longer padded row is only padding (and a huge
  // one would make B * length overflow in the writers below).
  if (padded && length > config_.capacity_tokens) {
    throw std::invalid_argument("gather_into: padded length " + str(length) + " exceeds capacity_tokens=" +
                                str(config_.capacity_tokens));
  }
  int64_t padded_size = 0;
  if (padded && __builtin_mul_overflow(static_cast<int64_t>(ids.size()), length, &padded_size)) {
    throw std::invalid_argument("gather_into: " + str(static_cast<int64_t>(ids.size())) + " rows x length " +
                                str(length) + " overflows int64");
  }
  if (!padded && length != total) {
    throw std::invalid_argument("gather_into: packed length " + str(length) + " != total tokens " + str(total));
  }
  if (!padded && total > std::numeric_limits<int32_t>::max()) {
    throw std::invalid_argument("a packed batch of " + str(total) + " tokens overflows int32 cu_seqlens");
  }
  write_locked(ids, lengths, length, spec, out);
}

// One pass per output element: each is either copied once from the ring or written as padding.
void ReplayBuffer::write_locked(const std::vector<int64_t>& ids, const std::vector<int64_t>& lengths,
                                int64_t length, const GatherSpec& spec, const OutputPointers& out) {
  const size_t nfields = schema_.token_fields.size();
  const int64_t B = static_cast<int64_t>(ids.size());
  const int64_t ring = ring_tokens_;
  // Copy `len` tokens of field f starting at ring offset `offset` to dst (at most two memcpy).
  auto copy_out = [&](size_t f, int64_t offset, int64_t len, uint8_t* dst) {
    const int64_t isz = token_itemsize_[f];
    const uint8_t* arena = arenas_[f].get();
    const int64_t first = std::min(len, ring - offset);
    std::memcpy(dst, arena + offset * isz, static_cast<size_t>(first * isz));
    if (len > first) std::memcpy(dst + first * isz, arena, static_cast<size_t>((len - first) * isz));
  };
  if (spec.layout == Layout::kPadded) {
    const int64_t T = length;
    for (size_t f = 0; f < nfields; ++f) {
      const int64_t isz = token_itemsize_[f];
      const PadBytes& pad = spec.pad_values.empty() ? schema_.token_fields[f].pad : spec.pad_values[f];
      auto* base = static_cast<uint8_t*>(out.token_fields[f]);
      for (int64_t b = 0; b < B; ++b) {
        const Record& rec = record_locked(ids[static_cast<size_t>(b)]);
        uint8_t* row = base + b * T * isz;
        const int64_t npad = T - rec.length;
        if (spec.pad_left) {
          fill_pad(row, npad, isz, pad);
          copy_out(f, rec.offset, rec.length, row + npad * isz);
        } else {
          copy_out(f, rec.offset, rec.length, row);
          fill_pad(row + rec.length * isz, npad, isz, pad);
        }
      }
    }
    auto* mask = static_cast<uint8_t*>(out.attention_mask);
    for (int64_t b = 0; b < B; ++b) {
      uint8_t* row = mask + b * T;
      const int64_t len = lengths[static_cast<size_t>(b)];
      if (spec.pad_left) {
        std::memset(row, 0, static_cast<size_t>(T - len));
        std::memset(row + (T - len), 1, static_cast<size_t>(len));
      } else {
        std::memset(row, 1, static_cast<size_t>(len));
        std::memset(row + len, 0, static_cast<size_t>(T - len));
      }
    }
  } else {
    for (size_t f = 0; f < nfields; ++f) {
      const int64_t isz = token_itemsize_[f];
      auto* base = static_cast<uint8_t*>(out.token_fields[f]);
      int64_t pos = 0;
      for (int64_t b = 0; b < B; ++b) {
        const Record& rec = record_locked(ids[static_cast<size_t>(b)]);
        copy_out(f, rec.offset, rec.length, base + pos * isz);
        pos += rec.length;
      }
    }
    auto* cu = static_cast<int32_t*>(out.cu_seqlens);
    auto* pos_ids = static_cast<int64_t*>(out.position_ids);
    cu[0] = 0;
    int64_t pos = 0;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t len = lengths[static_cast<size_t>(b)];
      for (int64_t t = 0; t < len; ++t) pos_ids[pos + t] = t;
      pos += len;
      cu[b + 1] = static_cast<int32_t>(pos);
    }
  }
  for (size_t f = 0; f < seq_itemsize_.size(); ++f) {
    const int64_t isz = seq_itemsize_[f];
    auto* base = static_cast<uint8_t*>(out.sequence_fields[f]);
    for (int64_t b = 0; b < B; ++b) {
      std::memcpy(base + b * isz, row_locked(ids[static_cast<size_t>(b)]) + seq_row_offset_[f],
                  static_cast<size_t>(isz));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// priorities, snapshot, size

void ReplayBuffer::update_priorities(const int64_t* ids, const double* priorities, int64_t n, bool ignore_missing) {
  for (int64_t i = 0; i < n; ++i) {
    const double p = priorities[i];
    check_priority(p, tree_value(p), "priorities", " at position " + str(i));
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (!ignore_missing) {
    for (int64_t i = 0; i < n; ++i) check_live_locked(ids[i]);
  }
  {
    // Project the new total (duplicate ids: the last update wins) before changing anything.
    std::unordered_map<int64_t, double> pending;
    double total = scaled(tree_.total());
    for (int64_t i = 0; i < n; ++i) {
      if (!live_locked(ids[i])) continue;
      const int64_t leaf = ids[i] & record_mask_;
      auto it = pending.find(leaf);
      const double old_value = it != pending.end() ? it->second : tree_.get(leaf);
      const double value = tree_value(priorities[i]);
      pending[leaf] = value;
      total += scaled(value) - scaled(old_value);
    }
    if (!(total <= kScaledTotalLimit)) throw_total_overflow("priorities");
  }
  for (int64_t i = 0; i < n; ++i) {
    if (!live_locked(ids[i])) continue;
    record_locked(ids[i]).priority = priorities[i];
    tree_.set(ids[i] & record_mask_, tree_value(priorities[i]));  // O(log N)
    max_priority_ = std::max(max_priority_, priorities[i]);
  }
}

std::vector<double> ReplayBuffer::priorities(const std::vector<int64_t>& ids) {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<double> out;
  for (int64_t id : ids) {
    check_live_locked(id);
    out.push_back(record_locked(id).priority);
  }
  return out;
}

Snapshot ReplayBuffer::snapshot(bool filter_version, int64_t min_version, bool shuffle) {
  if (filter_version && schema_.version_field < 0) {
    throw std::invalid_argument("min_version needs a version field in the schema");
  }
  std::lock_guard<std::mutex> lock(mu_);
  Snapshot snap;
  snap.ids = eligible_ids_locked(filter_version, min_version);
  if (shuffle) std::shuffle(snap.ids.begin(), snap.ids.end(), rng_);
  for (int64_t id : snap.ids) snap.lengths.push_back(record_locked(id).length);
  return snap;
}

int64_t ReplayBuffer::size() {
  std::lock_guard<std::mutex> lock(mu_);
  return count_locked();
}
int64_t ReplayBuffer::num_tokens() {
  std::lock_guard<std::mutex> lock(mu_);
  return num_tokens_;
}
int64_t ReplayBuffer::first_id() {
  std::lock_guard<std::mutex> lock(mu_);
  return first_id_;
}
int64_t ReplayBuffer::next_id() {
  std::lock_guard<std::mutex> lock(mu_);
  return next_id_;
}

void ReplayBuffer::clear() {
  std::lock_guard<std::mutex> lock(mu_);
  while (first_id_ < next_id_) evict_oldest_locked();
  head_offset_ = 0;
}

// ---------------------------------------------------------------------------------------------
// persistence
//
// File = 32-byte header + payload (host byte order; the header's endian marker rejects a file
// from a machine of the other byte order):
//   header:  magic "AKREPLAY" | u32 format version | u32 header bytes | u64 payload bytes |
//            u32 CRC-32 of the payload | u32 endian marker 0x01020304
//   payload: schema (fields: name, dtype, pad) | config | first/next id, max priority, RNG state |
//            count, tokens | per record: length, priority | per sequence field: count values |
//            per token field: the live tokens, oldest first

class ReplayBuffer::Writer {
 public:
  template <typename T>
  void pod(const T& v) {
    bytes(&v, sizeof(T));
  }
  void bytes(const void* p, size_t n) { out.append(static_cast<const char*>(p), n); }
  void string(const std::string& s) {
    pod(static_cast<uint32_t>(s.size()));
    bytes(s.data(), s.size());
  }
  std::string out;
};

namespace {
class Reader {
 public:
  Reader(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  template <typename T>
  T pod() {
    T v;
    std::memcpy(&v, take(sizeof(T)), sizeof(T));
    return v;
  }
  const uint8_t* take(size_t n) {
    if (n > size_ - pos_) throw std::invalid_argument("corrupt replay buffer file: payload ends early");
    const uint8_t* p = data_ + pos_;
    pos_ += n;
    return p;
  }
  std::string string() {
    const uint32_t n = pod<uint32_t>();
    const uint8_t* p = take(n);
    return std::string(reinterpret_cast<const char*>(p), n);
  }
  bool done() const { return pos_ == size_; }
  size_t remaining() const { return size_ - pos_; }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};
}  // namespace

void ReplayBuffer::serialize_locked(Writer& w) {
  for (const auto* fields : {&schema_.token_fields, &schema_.sequence_fields}) {
    w.pod(static_cast<uint32_t>(fields->size()));
    for (const FieldSpec& f : *fields) {
      w.string(f.name);
      w.pod(static_cast<int32_t>(f.dtype));
      w.bytes(f.pad.data(), f.pad.size());
    }
  }
  w.pod(schema_.group_field);
  w.pod(schema_.version_field);
  w.pod(config_.capacity_tokens);
  w.pod(config_.capacity_sequences);
  w.pod(config_.alpha);
  w.pod(config_.seed);
  w.pod(first_id_);
  w.pod(next_id_);
  w.pod(max_priority_);
  std::ostringstream rng_state;
  rng_state << rng_;
  w.string(rng_state.str());
  w.pod(count_locked());
  w.pod(num_tokens_);
  for (int64_t id = first_id_; id < next_id_; ++id) {
    w.pod(record_locked(id).length);
    w.pod(record_locked(id).priority);
  }
  for (size_t f = 0; f < seq_itemsize_.size(); ++f) {
    for (int64_t id = first_id_; id < next_id_; ++id) {
      w.bytes(row_locked(id) + seq_row_offset_[f], static_cast<size_t>(seq_itemsize_[f]));
    }
  }
  for (size_t f = 0; f < arenas_.size() && num_tokens_ > 0; ++f) {
    const int64_t isz = token_itemsize_[f];
    const int64_t first = std::min(num_tokens_, ring_tokens_ - head_offset_);
    w.bytes(arenas_[f].get() + head_offset_ * isz, static_cast<size_t>(first * isz));
    w.bytes(arenas_[f].get(), static_cast<size_t>((num_tokens_ - first) * isz));
  }
}

std::string ReplayBuffer::to_bytes() {
  Writer w;
  w.out.resize(kHeaderBytes);
  {
    std::lock_guard<std::mutex> lock(mu_);
    serialize_locked(w);
  }
  const uint64_t payload = w.out.size() - kHeaderBytes;
  const uint32_t crc = crc32(reinterpret_cast<const uint8_t*>(w.out.data()) + kHeaderBytes, payload);
  char* h = &w.out[0];
  std::memcpy(h, kMagic, 8);
  std::memcpy(h + 8, &kFormatVersion, 4);
  std::memcpy(h + 12, &kHeaderBytes, 4);
  std::memcpy(h + 16, &payload, 8);
  std::memcpy(h + 24, &crc, 4);
  std::memcpy(h + 28, &kEndianMarker, 4);
  return std::move(w.out);
}

std::unique_ptr<ReplayBuffer> ReplayBuffer::from_bytes(const std::string& bytes) {
  return deserialize(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
}

std::unique_ptr<ReplayBuffer> ReplayBuffer::deserialize(const uint8_t* data, size_t size) {
  if (size < 8 || std::memcmp(data, kMagic, 8) != 0) {
    throw std::invalid_argument("not an alignkit replay buffer file (bad magic bytes)");
  }
  if (size < kHeaderBytes) {
    throw std::invalid_argument("corrupt replay buffer file: truncated header (" + str(static_cast<int64_t>(size)) +
                                " bytes)");
  }
  uint32_t version, header_bytes, crc, endian;
  uint64_t payload;
  std::memcpy(&version, data + 8, 4);
  std::memcpy(&header_bytes, data + 12, 4);
  std::memcpy(&payload, data + 16, 8);
  std::memcpy(&crc, data + 24, 4);
  std::memcpy(&endian, data + 28, 4);
  if (version != kFormatVersion) {
    throw std::invalid_argument("unsupported replay buffer format version " + std::to_string(version) +
                                " (this build reads version " + std::to_string(kFormatVersion) + ")");
  }
  if (endian != kEndianMarker) throw std::invalid_argument("replay buffer file was written with another byte order");
  if (header_bytes != kHeaderBytes) throw std::invalid_argument("corrupt replay buffer file: bad header size");
  if (payload != size - kHeaderBytes) {
    throw std::invalid_argument("corrupt replay buffer file: " +
                                std::string(payload > size - kHeaderBytes ? "truncated" : "trailing data") +
                                " (header says " + std::to_string(payload + kHeaderBytes) + " bytes, found " +
                                std::to_string(size) + ")");
  }
  if (crc32(data + kHeaderBytes, payload) != crc) {
    throw std::invalid_argument("corrupt replay buffer file: checksum mismatch");
  }
  Reader r(data + kHeaderBytes, payload);
  Schema schema;
  for (auto* fields : {&schema.token_fields, &schema.sequence_fields}) {
    const uint32_t n = r.pod<uint32_t>();
    if (n > 4096) throw std::invalid_argument("corrupt replay buffer file: implausible field count");
    for (uint32_t i = 0; i < n; ++i) {
      FieldSpec f;
      f.name = r.string();
      f.dtype = dtype_from_code(r.pod<int32_t>());
      std::memcpy(f.pad.data(), r.take(8), 8);
      fields->push_back(std::move(f));
    }
  }
  schema.group_field = r.pod<int32_t>();
  schema.version_field = r.pod<int32_t>();
  BufferConfig config;
  config.capacity_tokens = r.pod<int64_t>();
  config.capacity_sequences = r.pod<int64_t>();
  config.alpha = r.pod<double>();
  config.seed = r.pod<uint64_t>();
  const int64_t first_id = r.pod<int64_t>();
  const int64_t next_id = r.pod<int64_t>();
  const double max_priority = r.pod<double>();
  const std::string rng_state = r.string();
  const int64_t count = r.pod<int64_t>();
  const int64_t num_tokens = r.pod<int64_t>();
  // Validate everything the file claims before allocating anything from it. The rings are
  // allocated lazily (for the tokens stored, not for capacity_tokens), so a crafted (CRC-correct)
  // file cannot reserve more memory than its own payload holds.
  if (config.capacity_tokens <= 0 || config.capacity_tokens > kMaxCapacityTokens) {
    throw std::invalid_argument("corrupt replay buffer file: capacity_tokens " + str(config.capacity_tokens) +
                                " is not in [1, 2**40]");
  }
  if (first_id < 0 || next_id < first_id || next_id > kMaxLoadedId) {
    throw std::invalid_argument("corrupt replay buffer file: implausible ids (first " + str(first_id) + ", next " +
                                str(next_id) + ")");
  }
  if (!std::isfinite(max_priority) || !(max_priority > 0.0)) {
    throw std::invalid_argument("corrupt replay buffer file: max_priority must be finite and > 0, got " +
                                std::to_string(max_priority));
  }
  if (count != next_id - first_id || num_tokens < 0 || num_tokens > config.capacity_tokens ||
      config.capacity_sequences < 0 || (config.capacity_sequences > 0 && count > config.capacity_sequences) ||
      count > num_tokens) {
    throw std::invalid_argument("corrupt replay buffer file: inconsistent counters");
  }
  {
    // The rest of the payload is exactly: (length, priority) per sequence, the per-sequence field
    // columns, and num_tokens tokens per per-token field. Check it without overflow.
    uint64_t row_bytes = 0, token_bytes = 0, need = 0, part = 0;
    for (const FieldSpec& f : schema.sequence_fields) row_bytes += static_cast<uint64_t>(dtype_itemsize(f.dtype));
    for (const FieldSpec& f : schema.token_fields) token_bytes += static_cast<uint64_t>(dtype_itemsize(f.dtype));
    const auto ucount = static_cast<uint64_t>(count), utokens = static_cast<uint64_t>(num_tokens);
    const bool overflow = __builtin_mul_overflow(ucount, uint64_t{16} + row_bytes, &need) ||
                          __builtin_mul_overflow(utokens, token_bytes, &part) ||
                          __builtin_add_overflow(need, part, &need);
    if (overflow || need != r.remaining()) {
      throw std::invalid_argument("corrupt replay buffer file: " + str(count) + " sequences / " + str(num_tokens) +
                                  " tokens need " + (overflow ? std::string("more than 2**64") : std::to_string(need)) +
                                  " more payload bytes, found " + std::to_string(r.remaining()));
    }
  }
  auto buf = std::make_unique<ReplayBuffer>(std::move(schema), config);
  std::vector<int64_t> lengths(static_cast<size_t>(count)), starts(static_cast<size_t>(count));
  std::vector<double> prios(static_cast<size_t>(count));
  int64_t total = 0;
  for (int64_t i = 0; i < count; ++i) {
    lengths[static_cast<size_t>(i)] = r.pod<int64_t>();
    prios[static_cast<size_t>(i)] = r.pod<double>();
    starts[static_cast<size_t>(i)] = total;
    if (lengths[static_cast<size_t>(i)] <= 0 || lengths[static_cast<size_t>(i)] > num_tokens - total) {
      throw std::invalid_argument("corrupt replay buffer file: bad sequence length");
    }
    total += lengths[static_cast<size_t>(i)];
  }
  if (total != num_tokens) throw std::invalid_argument("corrupt replay buffer file: token count mismatch");
  AddRequest req;
  req.num_sequences = count;
  req.starts = starts.data();
  req.lengths = lengths.data();
  req.priorities = prios.data();
  for (int64_t isz : buf->seq_itemsize_) {
    req.sequence_fields.push_back({r.take(static_cast<size_t>(count * isz)), count});
  }
  for (int64_t isz : buf->token_itemsize_) {
    req.token_fields.push_back({r.take(static_cast<size_t>(num_tokens * isz)), num_tokens});
  }
  if (!r.done()) throw std::invalid_argument("corrupt replay buffer file: unexpected trailing payload");
  {
    std::lock_guard<std::mutex> lock(buf->mu_);
    buf->first_id_ = buf->next_id_ = first_id;
  }
  buf->add(req);  // validates every length/priority again; nothing is evicted (all fit)
  std::lock_guard<std::mutex> lock(buf->mu_);
  if (buf->first_id_ != first_id || buf->next_id_ != next_id) {
    throw std::invalid_argument("corrupt replay buffer file: sequences do not fit the capacity");
  }
  buf->max_priority_ = max_priority;
  std::istringstream in(rng_state);
  in >> buf->rng_;
  if (in.fail()) throw std::invalid_argument("corrupt replay buffer file: bad RNG state");
  return buf;
}

void ReplayBuffer::save(const std::string& path) {
  const std::string bytes = to_bytes();  // under mu_; the disk write below is not
  static std::atomic<uint64_t> counter{0};
  const std::string tmp = path + ".tmp." + std::to_string(static_cast<unsigned long long>(getpid())) + "." +
                          std::to_string(counter.fetch_add(1));
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) throw FileError("cannot open '" + tmp + "' for writing: " + std::strerror(errno));
  const bool ok = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size() && std::fflush(f) == 0 &&
                  ::fsync(fileno(f)) == 0;
  const int err = errno;
  const bool closed = std::fclose(f) == 0;
  if (!ok || !closed) {
    std::remove(tmp.c_str());
    throw FileError("cannot write '" + tmp + "': " + std::strerror(ok ? errno : err));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    std::remove(tmp.c_str());
    throw FileError("cannot rename '" + tmp + "' to '" + path + "': " + std::strerror(e));
  }
  // Make the rename itself durable: fsync the directory that holds the new entry.
  const size_t slash = path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) throw FileError("cannot open directory '" + dir + "' to sync it: " + std::strerror(errno));
  const bool synced = ::fsync(dfd) == 0 || errno == EINVAL || errno == ENOTSUP || errno == EROFS;
  const int derr = errno;
  ::close(dfd);
  if (!synced) throw FileError("cannot sync directory '" + dir + "': " + std::strerror(derr));
}

std::unique_ptr<ReplayBuffer> ReplayBuffer::load(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
    throw FileError("cannot load '" + path + "': it is a directory, not a replay buffer file");
  }
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) throw FileError("cannot open '" + path + "': " + std::strerror(errno));
  std::string bytes;
  char chunk[1 << 16];
  size_t n;
  while ((n = std::fread(chunk, 1, sizeof(chunk), f)) > 0) bytes.append(chunk, n);
  const int err = errno;
  const bool failed = std::ferror(f) != 0;
  std::fclose(f);
  if (failed) throw FileError("cannot read '" + path + "': " + std::strerror(err));
  return from_bytes(bytes);
}

}  // namespace alignkit
