// Replay buffer for variable-length token sequences (no Python types; bound in bindings.cpp).
//
// Storage layout (capacity C tokens; one ring of R <= C tokens per per-token field, struct of arrays):
//
//   field "tokens"   [ ..seq 7.. | seq 8 | seq 9 |   free   | ..seq 7 (wrapped head).. ]
//   field "logprobs" [ same offsets, own dtype ........................................ ]
//                      ^0          ^head_offset_ (oldest live sequence)              ^R-1
//
//   A sequence occupies `length` consecutive ring slots starting at `offset`; it may wrap past
//   R-1 to 0 (read/written as at most two memcpy). Live sequences form one FIFO run, so the
//   total stored tokens never exceed C and adding evicts whole oldest sequences. No gaps.
//
//   The rings are allocated lazily: R (ring_tokens_, the same for every field) starts at 0 and
//   grows, doubling up to C, when an add would hold more live tokens than R; a growth copies the
//   live tokens to offset 0 of the new rings (the only compaction). Memory follows the tokens
//   actually stored, so C may be as large as kMaxCapacityTokens without reserving C tokens, and a
//   failed growth throws OutOfMemory with the buffer unchanged.
//
//   Per-sequence metadata (offset, length, version, group, priority) and the per-sequence
//   field values (one packed row of `row_bytes_` per sequence) live in a growable ring indexed
//   by id & mask: ids are 0, 1, 2, ... in insertion order, so live ids are the contiguous range
//   [first_id_, next_id_) and id -> slot is O(1). The same slot is the sequence's leaf in the
//   prioritized sum-tree (which grows with the ring).
//
// Thread safety and lock order: one mutex `mu_` guards all mutable state; `cv_` (with mu_)
// wakes blocked samplers after adds. Lock order: the GIL is never acquired while mu_ is held
// (the core never calls into Python), and the bindings release the GIL before every call that
// takes mu_, so no thread holds both: copies and waits run without the GIL. schema() and
// config() are immutable after construction and need no lock.
#pragma once

#include <array>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/sum_tree.h"

namespace alignkit {

// Largest capacity_tokens (2**40): ring offsets times an itemsize (<= 8) stay far inside int64.
constexpr int64_t kMaxCapacityTokens = int64_t{1} << 40;

enum class DType : int32_t {
  kBool = 0,
  kInt8 = 1,
  kUInt8 = 2,
  kInt16 = 3,
  kInt32 = 4,
  kInt64 = 5,
  kFloat16 = 6,
  kFloat32 = 7,
  kFloat64 = 8,
};
constexpr int32_t kNumDTypes = 9;

DType dtype_from_code(int32_t code);  // throws std::invalid_argument for an unknown code
int64_t dtype_itemsize(DType dtype);
bool dtype_is_integer(DType dtype);
const char* dtype_name(DType dtype);

using PadBytes = std::array<uint8_t, 8>;  // a pad value, in the field's dtype (little end first)

struct FieldSpec {
  std::string name;
  DType dtype = DType::kFloat32;
  PadBytes pad{};  // default pad value for padded batches
};

struct Schema {
  std::vector<FieldSpec> token_fields;     // one value per token
  std::vector<FieldSpec> sequence_fields;  // one value per sequence
  int32_t group_field = -1;                // index into sequence_fields (integer dtype), or -1
  int32_t version_field = -1;              // index into sequence_fields (integer dtype), or -1
};

struct BufferConfig {
  int64_t capacity_tokens = 0;     // max live tokens per field, in [1, kMaxCapacityTokens]
  int64_t capacity_sequences = 0;  // max live sequences, 0 = bounded only by tokens
  double alpha = 1.0;              // prioritized replay exponent: P(i) ~ p_i^alpha
  uint64_t seed = 0;
};

// Raised by a wait that ran out of time (bound to Python's TimeoutError).
class TimeoutError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Raised when the memory for the rings or a batch cannot be allocated (bound to MemoryError);
// the message says what was being allocated and how large it was.
class OutOfMemory : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Raised when a file cannot be opened, written or renamed (bound to Python's OSError).
class FileError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct FieldInput {
  const void* data = nullptr;
  int64_t num_elements = 0;  // elements readable from data
};

// A batch of sequences to add. Sequence b of token field f is the `lengths[b]` elements at
// `token_fields[f].data + (b * row_stride + starts[b]) * itemsize` (row_stride = T for a padded
// (B, T) input, 0 for packed input with starts = cu_seqlens[:-1]).
struct AddRequest {
  int64_t num_sequences = 0;
  int64_t row_stride = 0;
  const int64_t* starts = nullptr;
  const int64_t* lengths = nullptr;
  std::vector<FieldInput> token_fields;     // schema order
  std::vector<FieldInput> sequence_fields;  // schema order, num_sequences values each
  const double* priorities = nullptr;       // optional, num_sequences values (> 0, finite)
};

// A malloc'd block whose ownership the bindings hand to NumPy (zero-copy).
class OwnedBuffer {
 public:
  OwnedBuffer() = default;
  explicit OwnedBuffer(size_t nbytes);
  ~OwnedBuffer();
  OwnedBuffer(OwnedBuffer&& other) noexcept;
  OwnedBuffer& operator=(OwnedBuffer&& other) noexcept;
  OwnedBuffer(const OwnedBuffer&) = delete;
  OwnedBuffer& operator=(const OwnedBuffer&) = delete;

  uint8_t* data() const { return data_; }
  size_t nbytes() const { return nbytes_; }
  uint8_t* release();  // caller frees with std::free

 private:
  uint8_t* data_ = nullptr;
  size_t nbytes_ = 0;
};

enum class Layout { kPadded = 0, kPacked = 1 };

struct GatherSpec {
  Layout layout = Layout::kPadded;
  bool pad_left = false;
  std::vector<PadBytes> pad_values;  // per token field; empty = the schema's pads
  bool ids_only = false;             // return ids, lengths and weights only (no copy)
};

// Caller-owned destinations for gather_into (e.g. pinned host memory), laid out as in Batch.
struct OutputPointers {
  std::vector<void*> token_fields;     // padded (B, length) / packed (length,)
  std::vector<void*> sequence_fields;  // (B,)
  void* attention_mask = nullptr;      // padded: (B, length) bool
  void* cu_seqlens = nullptr;          // packed: (B + 1,) int32
  void* position_ids = nullptr;        // packed: (length,) int64
};

struct Batch {
  Layout layout = Layout::kPadded;
  bool ids_only = false;     // only ids, lengths and weights are set
  int64_t max_length = 0;    // T of a padded batch / max_seqlen of a packed one
  int64_t total_tokens = 0;  // sum of lengths
  std::vector<int64_t> ids;
  std::vector<int64_t> lengths;
  std::vector<double> weights;                // importance weights (prioritized sampling only)
  std::vector<OwnedBuffer> token_fields;      // padded (B, T) / packed (N,)
  std::vector<OwnedBuffer> sequence_fields;   // (B,)
  OwnedBuffer attention_mask;                 // padded: (B, T) bool
  OwnedBuffer cu_seqlens;                     // packed: (B + 1,) int32
  OwnedBuffer position_ids;                   // packed: (N,) int64
};

enum class Strategy { kUniform = 0, kPrioritized = 1 };

struct SampleSpec {
  int64_t batch_size = 1;
  Strategy strategy = Strategy::kUniform;
  bool replace = true;
  double beta = 0.4;           // importance-weight exponent (prioritized)
  bool filter_version = false;  // staleness filter: only sequences with version >= min_version
  int64_t min_version = 0;
  int64_t min_available = 0;  // wait until this many eligible sequences exist (0 = just enough)
};

struct GroupSpec {
  int64_t num_groups = 1;
  int64_t min_group_size = 1;  // only groups with at least this many live members
  bool filter_version = false;  // every member must have version >= min_version
  int64_t min_version = 0;
};

struct Snapshot {
  std::vector<int64_t> ids;
  std::vector<int64_t> lengths;
};

class ReplayBuffer {
 public:
  ReplayBuffer(Schema schema, BufferConfig config);

  const Schema& schema() const { return schema_; }
  const BufferConfig& config() const { return config_; }

  // Validates the whole request first (all or nothing), then appends, evicting whole oldest
  // sequences as needed. Returns the new ids (a sequence of a large batch may evict an earlier
  // one of the same batch). O(tokens + n log n).
  std::vector<int64_t> add(const AddRequest& request);

  // Draws ids and copies them into a batch under one lock (no eviction in between).
  // timeout_s == 0: fail at once (std::invalid_argument) when too few sequences are eligible;
  // timeout_s > 0: wait up to that long for them, then throw TimeoutError.
  Batch sample(const SampleSpec& spec, const GatherSpec& gather, double timeout_s);

  // Draws `num_groups` distinct groups uniformly among eligible ones and returns all their live
  // members, group after group. Same timeout contract as sample().
  Batch sample_groups(const GroupSpec& spec, const GatherSpec& gather, double timeout_s);

  // Copies the given ids. A missing (evicted / never added) id throws std::out_of_range,
  // or is skipped when skip_missing.
  Batch gather(const std::vector<int64_t>& ids, const GatherSpec& gather, bool skip_missing);

  // Copies the given ids into caller-owned memory. padded: `length` is the row width T and must
  // be >= the longest sequence (rows are padded to it); packed: `length` must equal the total
  // tokens. A missing id throws std::out_of_range and nothing is written.
  void gather_into(const std::vector<int64_t>& ids, const GatherSpec& gather, int64_t length,
                   const OutputPointers& out);

  // Set raw priorities p (> 0, finite); the tree stores p^alpha. O(n log N).
  void update_priorities(const int64_t* ids, const double* priorities, int64_t n, bool ignore_missing);
  std::vector<double> priorities(const std::vector<int64_t>& ids);  // raw p of live ids

  // Eligible live ids (and lengths) in insertion order, or shuffled with the buffer's RNG.
  Snapshot snapshot(bool filter_version, int64_t min_version, bool shuffle);

  int64_t size();
  int64_t num_tokens();
  int64_t first_id();  // oldest live id (== next_id when empty)
  int64_t next_id();
  void clear();

  // Versioned, checksummed binary image. save() writes `path + ".tmp.<unique>"` then renames it
  // over path (an interrupted save never corrupts an existing file).
  void save(const std::string& path);
  std::string to_bytes();
  static std::unique_ptr<ReplayBuffer> load(const std::string& path);
  static std::unique_ptr<ReplayBuffer> from_bytes(const std::string& bytes);

 private:
  struct Record {
    int64_t offset = 0;  // ring offset of the first token
    int64_t length = 0;
    int64_t version = 0;
    int64_t group = 0;
    double priority = 1.0;  // raw p (tree holds p^alpha)
  };
  struct Group {
    std::deque<int64_t> ids;  // ascending (FIFO)
    size_t key_index = 0;     // position in group_keys_
  };
  class Writer;

  // All private helpers expect mu_ held.
  int64_t count_locked() const { return next_id_ - first_id_; }
  Record& record_locked(int64_t id) { return records_[static_cast<size_t>(id & record_mask_)]; }
  uint8_t* row_locked(int64_t id) { return rows_.data() + static_cast<size_t>(id & record_mask_) * row_bytes_; }
  bool live_locked(int64_t id) const { return id >= first_id_ && id < next_id_; }
  void check_live_locked(int64_t id) const;
  void evict_oldest_locked();
  void grow_records_locked();
  void append_locked(const AddRequest& r, int64_t b, int64_t version, int64_t group, double priority);
  double tree_value(double priority) const;
  int64_t project_add_locked(const AddRequest& r) const;
  void reserve_ring_locked(int64_t tokens);
  std::vector<int64_t> eligible_ids_locked(bool filter_version, int64_t min_version) const;
  std::vector<std::vector<int64_t>> eligible_groups_locked(const GroupSpec& spec) const;
  void wait_locked(std::unique_lock<std::mutex>& lock, double timeout_s, int64_t need,
                   const std::function<int64_t()>& available, const std::string& what);
  Batch gather_locked(const std::vector<int64_t>& ids, const GatherSpec& spec);
  void write_locked(const std::vector<int64_t>& ids, const std::vector<int64_t>& lengths, int64_t length,
                    const GatherSpec& spec, const OutputPointers& out);
  void serialize_locked(Writer& w);
  static std::unique_ptr<ReplayBuffer> deserialize(const uint8_t* data, size_t size);
  int64_t read_int_field(const uint8_t* src, int64_t b, int32_t field) const;

  Schema schema_;
  BufferConfig config_;
  std::vector<int64_t> token_itemsize_;
  std::vector<int64_t> seq_itemsize_;
  std::vector<int64_t> seq_row_offset_;
  int64_t row_bytes_ = 0;

  std::mutex mu_;
  std::condition_variable cv_;

  std::vector<std::unique_ptr<uint8_t[]>> arenas_;  // per token field, ring_tokens_ elements
  int64_t ring_tokens_ = 0;                          // R: allocated ring size (<= capacity_tokens)
  int64_t head_offset_ = 0;                          // ring offset of the oldest live token
  int64_t num_tokens_ = 0;

  std::vector<Record> records_;  // ring of power-of-two size, slot = id & record_mask_
  std::vector<uint8_t> rows_;    // per-sequence field values, row_bytes_ per slot
  int64_t record_mask_ = 0;
  int64_t first_id_ = 0;
  int64_t next_id_ = 0;

  SumTree tree_;
  double max_priority_ = 1.0;

  std::unordered_map<int64_t, Group> groups_;
  std::vector<int64_t> group_keys_;

  std::mt19937_64 rng_;
};

}  // namespace alignkit
