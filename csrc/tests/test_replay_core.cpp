// Unit test of the replay buffer core (no Python). Exit status 0 = all checks passed.
// Run under ASan + UBSan by tests/test_replay_buffer_core.py (see CMakeLists.txt here).
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "core/replay_buffer.h"
#include "core/sum_tree.h"
#include "core/token_budget.h"

using namespace alignkit;

static int failures = 0;

// Interpose fsync (the core is linked into this executable) to count directory syncs in save().
static std::atomic<int> dir_fsyncs{0};
extern "C" int fsync(int fd) {
  struct stat st;
  if (::fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) ++dir_fsyncs;
  return static_cast<int>(::syscall(SYS_fsync, fd));
}
#define CHECK(cond)                                                      \
  do {                                                                   \
    if (!(cond)) {                                                       \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                        \
    }                                                                    \
  } while (0)

template <typename E>
static bool throws(const std::function<void()>& f) {
  try {
    f();
  } catch (const E&) {
    return true;
  } catch (...) {
    return false;
  }
  return false;
}

// Schema: tokens int32, logprobs float32 (per token); group int64, version int64 (per sequence).
static std::unique_ptr<ReplayBuffer> make(int64_t capacity, int64_t capacity_sequences = 0) {
  Schema s;
  s.token_fields = {{"tokens", DType::kInt32, {}}, {"logprobs", DType::kFloat32, {}}};
  s.sequence_fields = {{"group", DType::kInt64, {}}, {"version", DType::kInt64, {}}};
  s.group_field = 0;
  s.version_field = 1;
  return std::make_unique<ReplayBuffer>(s, BufferConfig{capacity, capacity_sequences, 1.0, 7});
}

// Add one sequence whose tokens are value*1000 + t and logprobs -t.
static int64_t add_one(ReplayBuffer& rb, int64_t len, int32_t value, int64_t group = 0, int64_t version = 0) {
  std::vector<int32_t> tok(static_cast<size_t>(len));
  std::vector<float> lp(static_cast<size_t>(len));
  for (int64_t t = 0; t < len; ++t) {
    tok[static_cast<size_t>(t)] = value * 1000 + static_cast<int32_t>(t);
    lp[static_cast<size_t>(t)] = -static_cast<float>(t);
  }
  const int64_t start = 0;
  AddRequest r;
  r.num_sequences = 1;
  r.starts = &start;
  r.lengths = &len;
  r.token_fields = {{tok.data(), len}, {lp.data(), len}};
  r.sequence_fields = {{&group, 1}, {&version, 1}};
  return rb.add(r)[0];
}

static void test_sum_tree() {
  SumTree t(5);
  CHECK(t.capacity() == 8);
  t.set(0, 1.0);
  t.set(3, 2.0);
  t.set(7, 4.0);
  CHECK(t.total() == 7.0);
  CHECK(t.min() == 1.0);
  CHECK(t.find_prefix(0.5) == 0);
  CHECK(t.find_prefix(1.5) == 3);
  CHECK(t.find_prefix(6.999) == 7);
  CHECK(t.find_prefix(7.0) == 7);  // rounding past the end never lands on an empty leaf
  t.set(0, 0.0);
  CHECK(t.min() == 2.0);
  CHECK(t.find_prefix(0.0) == 3);
  CHECK(throws<std::out_of_range>([&] { t.set(8, 1.0); }));
}

static void test_ffd() {
  auto bins = first_fit_decreasing({5, 3, 8, 2, 2}, 10, false);
  // 8 -> bin0, 5 -> bin1, 3 -> bin1, 2 -> bin0, 2 -> bin1? (5+3+2=10 fits) order: 8,5,3,2,2
  CHECK(bins.size() == 2);
  for (const auto& b : bins) {
    int64_t s = 0;
    for (int64_t i : b) s += std::vector<int64_t>{5, 3, 8, 2, 2}[static_cast<size_t>(i)];
    CHECK(s <= 10);
  }
  auto padded = first_fit_decreasing({4, 4, 4, 1}, 8, true);  // at most 2 rows of 4
  CHECK(padded.size() == 2);
  CHECK(throws<std::invalid_argument>([] { first_fit_decreasing({11}, 10, false); }));
  CHECK(throws<std::invalid_argument>([] { first_fit_decreasing({0}, 10, false); }));
  // (count + 1) * first must not overflow: three 2**62 rows never share a 2**62-token bin.
  const int64_t big = int64_t{1} << 62;
  CHECK(first_fit_decreasing({big, big, big}, big, true).size() == 3);
  CHECK(first_fit_decreasing({big, big, big}, big, false).size() == 3);
  CHECK(first_fit_decreasing({big, big, 1}, std::numeric_limits<int64_t>::max(), true).size() == 3);
  CHECK(first_fit_decreasing({big, big - 1, 1}, std::numeric_limits<int64_t>::max(), false).size() == 2);
  CHECK(first_fit_decreasing({big, big - 1}, std::numeric_limits<int64_t>::max(), false).size() == 1);
  CHECK(throws<std::invalid_argument>([&] { first_fit_decreasing({big + 1}, big, true); }));
}

static void test_gather_into_length_bounds() {
  auto rb = make(16);
  for (int i = 0; i < 4; ++i) add_one(*rb, 4, i);
  GatherSpec padded;
  std::vector<int32_t> tok(1);
  std::vector<float> lp(1);
  std::vector<int64_t> g(4), v(4);
  std::vector<uint8_t> mask(1);
  OutputPointers out;
  out.token_fields = {tok.data(), lp.data()};
  out.sequence_fields = {g.data(), v.data()};
  out.attention_mask = mask.data();
  // 4 * 2**62 wraps to 0: must be rejected before anything is written.
  CHECK(throws<std::invalid_argument>([&] { rb->gather_into({0, 1, 2, 3}, padded, int64_t{1} << 62, out); }));
  CHECK(throws<std::invalid_argument>([&] { rb->gather_into({0}, padded, 17, out); }));  // > capacity_tokens
  CHECK(throws<std::invalid_argument>([&] { rb->gather_into({0}, padded, -1, out); }));
}

static std::string reheader(std::string image) {
  // Recompute the payload CRC (bytes 24..27) after editing the payload.
  auto crc = [](const uint8_t* p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; ++i) {
      c ^= p[i];
      for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
    }
    return c ^ 0xFFFFFFFFu;
  };
  const uint32_t c = crc(reinterpret_cast<const uint8_t*>(image.data()) + 32, image.size() - 32);
  std::memcpy(&image[24], &c, 4);
  return image;
}

static void test_crafted_files() {
  auto rb = make(64);
  for (int i = 0; i < 3; ++i) add_one(*rb, 4, i);
  const std::string bytes = rb->to_bytes();
  CHECK(ReplayBuffer::from_bytes(reheader(bytes))->size() == 3);  // reheader is faithful
  // Payload layout: 2 token + 2 sequence fields (u32 count; u32 len + name + i32 dtype + 8 pad each),
  // then i32 group, i32 version, i64 capacity, i64 capacity_sequences, f64 alpha, u64 seed,
  // i64 first_id, i64 next_id, f64 max_priority.
  size_t o = 32 + 4 + (4 + 6 + 12) + (4 + 8 + 12) + 4 + (4 + 5 + 12) + (4 + 7 + 12) + 8;
  const size_t cap_at = o, first_at = o + 32, next_at = o + 40, maxp_at = o + 48;
  int64_t v = 0;
  std::memcpy(&v, &bytes[cap_at], 8);
  CHECK(v == 64);
  auto with = [&](size_t at, const void* p) {
    std::string b = bytes;
    std::memcpy(&b[at], p, 8);
    return reheader(b);
  };
  auto rejected = [&](const std::string& b) {
    return throws<std::invalid_argument>([&] { ReplayBuffer::from_bytes(b); });
  };
  for (int64_t cap : {int64_t{0}, int64_t{-1}, int64_t{1} << 41, std::numeric_limits<int64_t>::max()}) {
    CHECK(rejected(with(cap_at, &cap)));
  }
  // 2 fields x 2**40 x 4 bytes is more than any test machine, but the rings are allocated for the
  // 12 stored tokens only: the largest capacity loads.
  const int64_t huge_cap = kMaxCapacityTokens;
  {
    auto huge = ReplayBuffer::from_bytes(with(cap_at, &huge_cap));
    CHECK(huge->size() == 3 && huge->num_tokens() == 12 && huge->config().capacity_tokens == huge_cap);
  }
  const int64_t top = std::numeric_limits<int64_t>::max();
  {
    std::string b = bytes;
    const int64_t first = top - 3;
    std::memcpy(&b[first_at], &first, 8);
    std::memcpy(&b[next_at], &top, 8);
    CHECK(rejected(reheader(b)));
  }
  const int64_t three = 3;
  CHECK(rejected(with(first_at, &three)));  // first_id 3 == next_id 3 but 3 sequences stored
  for (double p : {std::numeric_limits<double>::infinity(), std::nan(""), 0.0, -1.0}) {
    CHECK(rejected(with(maxp_at, &p)));
  }
}

static void test_save_syncs_directory() {
  auto rb = make(64);
  add_one(*rb, 4, 1);
  char dir[] = "/tmp/ak-core-save-XXXXXX";
  CHECK(::mkdtemp(dir) != nullptr);
  const std::string path = std::string(dir) + "/buf.akrb";
  const int before = dir_fsyncs.load();
  rb->save(path);
  CHECK(dir_fsyncs.load() > before);
  CHECK(ReplayBuffer::load(path)->size() == 1);
  std::remove(path.c_str());
  ::rmdir(dir);
}

static void test_fifo_wrap_and_gather() {
  auto rb = make(10);
  CHECK(add_one(*rb, 4, 1) == 0);
  CHECK(add_one(*rb, 4, 2) == 1);
  CHECK(rb->num_tokens() == 8);
  CHECK(add_one(*rb, 5, 3) == 2);  // evicts id 0, wraps around the ring end
  CHECK(rb->size() == 2 && rb->num_tokens() == 9 && rb->first_id() == 1);
  GatherSpec padded;
  padded.pad_values = {PadBytes{0xFF, 0xFF, 0xFF, 0xFF}, PadBytes{}};
  Batch b = rb->gather({2, 1}, padded, false);
  CHECK(b.max_length == 5 && b.lengths[0] == 5 && b.lengths[1] == 4);
  const auto* tok = reinterpret_cast<const int32_t*>(b.token_fields[0].data());
  for (int t = 0; t < 5; ++t) CHECK(tok[t] == 3000 + t);
  for (int t = 0; t < 4; ++t) CHECK(tok[5 + t] == 2000 + t);
  CHECK(tok[9] == -1);
  CHECK(b.attention_mask.data()[9] == 0 && b.attention_mask.data()[8] == 1);
  GatherSpec packed;
  packed.layout = Layout::kPacked;
  Batch p = rb->gather({1, 2}, packed, false);
  const auto* cu = reinterpret_cast<const int32_t*>(p.cu_seqlens.data());
  CHECK(cu[0] == 0 && cu[1] == 4 && cu[2] == 9);
  const auto* pos = reinterpret_cast<const int64_t*>(p.position_ids.data());
  CHECK(pos[3] == 3 && pos[4] == 0 && pos[8] == 4);
  const auto* lp = reinterpret_cast<const float*>(p.token_fields[1].data());
  CHECK(lp[8] == -4.0f);
  // Caller-owned destinations, padded wider than the longest row (T = 7).
  std::vector<int32_t> tok7(2 * 7);
  std::vector<float> lp7(2 * 7);
  std::vector<int64_t> g(2), v(2);
  std::vector<uint8_t> mask7(2 * 7);
  OutputPointers out;
  out.token_fields = {tok7.data(), lp7.data()};
  out.sequence_fields = {g.data(), v.data()};
  out.attention_mask = mask7.data();
  GatherSpec left = padded;
  left.pad_left = true;
  rb->gather_into({2, 1}, left, 7, out);
  CHECK(tok7[0] == -1 && tok7[1] == -1 && tok7[2] == 3000 && tok7[6] == 3004);
  CHECK(tok7[7 + 2] == -1 && tok7[7 + 3] == 2000 && mask7[7 + 2] == 0 && mask7[7 + 3] == 1);
  CHECK(throws<std::invalid_argument>([&] { rb->gather_into({2, 1}, left, 4, out); }));
  CHECK(throws<std::out_of_range>([&] { rb->gather_into({0}, left, 7, out); }));
  CHECK(throws<std::out_of_range>([&] { rb->gather({0}, padded, false); }));
  CHECK(rb->gather({0, 1}, padded, true).ids.size() == 1);
  CHECK(throws<std::invalid_argument>([&] { add_one(*rb, 11, 4); }));
  rb->clear();
  CHECK(rb->size() == 0 && rb->num_tokens() == 0);
  CHECK(add_one(*rb, 10, 5) == 3);  // ids keep counting; a full-capacity sequence fits
}

static void test_sampling_and_groups() {
  auto rb = make(1000, 50);
  for (int i = 0; i < 60; ++i) add_one(*rb, 1 + i % 7, i, i / 4, i / 10);
  CHECK(rb->size() == 50 && rb->first_id() == 10);
  SampleSpec s;
  s.batch_size = 50;
  s.replace = false;
  Batch b = rb->sample(s, GatherSpec{}, 0.0);
  std::set<int64_t> seen(b.ids.begin(), b.ids.end());
  CHECK(seen.size() == 50 && *seen.begin() == 10 && *seen.rbegin() == 59);
  s.batch_size = 51;
  CHECK(throws<std::invalid_argument>([&] { rb->sample(s, GatherSpec{}, 0.0); }));
  CHECK(throws<TimeoutError>([&] { rb->sample(s, GatherSpec{}, 0.01); }));
  s.batch_size = 5;
  s.filter_version = true;
  s.min_version = 5;
  b = rb->sample(s, GatherSpec{}, 0.0);
  for (int64_t id : b.ids) CHECK(id >= 50);
  GroupSpec g;
  g.num_groups = 3;
  g.min_group_size = 4;
  b = rb->sample_groups(g, GatherSpec{}, 0.0);
  CHECK(b.ids.size() == 12);
  const auto* groups = reinterpret_cast<const int64_t*>(b.sequence_fields[0].data());
  for (size_t i = 0; i < 12; ++i) CHECK(groups[i] == groups[i / 4 * 4]);
  // Prioritized: one id with all the mass.
  std::vector<int64_t> ids(50);
  std::iota(ids.begin(), ids.end(), 10);
  std::vector<double> p(50, 1e-9);
  p[7] = 1e9;
  rb->update_priorities(ids.data(), p.data(), 50, false);
  SampleSpec ps;
  ps.batch_size = 20;
  ps.strategy = Strategy::kPrioritized;
  ps.beta = 1.0;
  b = rb->sample(ps, GatherSpec{}, 0.0);
  for (size_t i = 0; i < b.ids.size(); ++i) {
    CHECK(b.ids[i] == 17);
    CHECK(std::abs(b.weights[i] - 1e-18) < 1e-20);
  }
  const double bad = std::nan("");
  CHECK(throws<std::invalid_argument>([&] { rb->update_priorities(ids.data(), &bad, 1, false); }));
  const int64_t gone = 3;
  const double one = 1.0;
  CHECK(throws<std::out_of_range>([&] { rb->update_priorities(&gone, &one, 1, false); }));
  rb->update_priorities(&gone, &one, 1, true);
}

static void test_serialization() {
  auto rb = make(64);
  for (int i = 0; i < 20; ++i) add_one(*rb, 1 + i % 5, i, i % 3, i);
  std::string bytes = rb->to_bytes();
  auto copy = ReplayBuffer::from_bytes(bytes);
  CHECK(copy->size() == rb->size() && copy->first_id() == rb->first_id() && copy->num_tokens() == rb->num_tokens());
  GatherSpec packed;
  packed.layout = Layout::kPacked;
  std::vector<int64_t> ids;
  for (int64_t id = rb->first_id(); id < rb->next_id(); ++id) ids.push_back(id);
  Batch a = rb->gather(ids, packed, false), b = copy->gather(ids, packed, false);
  CHECK(std::memcmp(a.token_fields[0].data(), b.token_fields[0].data(), a.token_fields[0].nbytes()) == 0);
  SampleSpec s;
  s.batch_size = 8;
  CHECK(rb->sample(s, packed, 0).ids == copy->sample(s, packed, 0).ids);  // RNG state restored
  std::string corrupt = bytes;
  corrupt[bytes.size() / 2] ^= 0x10;
  CHECK(throws<std::invalid_argument>([&] { ReplayBuffer::from_bytes(corrupt); }));
  CHECK(throws<std::invalid_argument>([&] { ReplayBuffer::from_bytes(bytes.substr(0, bytes.size() - 3)); }));
  CHECK(throws<std::invalid_argument>([&] { ReplayBuffer::from_bytes(bytes.substr(0, 10)); }));
  CHECK(throws<std::invalid_argument>([&] { ReplayBuffer::from_bytes("garbage"); }));
}

static void test_concurrency() {
  auto rb = make(1 << 14);
  constexpr int kProducers = 4, kPerProducer = 2000;
  std::atomic<bool> bad{false};
  std::vector<std::thread> threads;
  for (int p = 0; p < kProducers; ++p) {
    threads.emplace_back([&, p] {
      for (int i = 0; i < kPerProducer; ++i) add_one(*rb, 1 + (i % 9), p * 100000 + i);
    });
  }
  threads.emplace_back([&] {
    SampleSpec s;
    s.batch_size = 16;
    s.min_available = 16;
    for (int k = 0; k < 300; ++k) {
      Batch b = rb->sample(s, GatherSpec{}, 5.0);
      const auto* tok = reinterpret_cast<const int32_t*>(b.token_fields[0].data());
      for (size_t r = 0; r < b.ids.size(); ++r) {
        const int32_t base = tok[r * static_cast<size_t>(b.max_length)] / 1000 * 1000;
        for (int64_t t = 0; t < b.lengths[r]; ++t) {
          if (tok[r * static_cast<size_t>(b.max_length) + static_cast<size_t>(t)] != base + t) bad = true;
        }
      }
    }
  });
  for (auto& t : threads) t.join();
  CHECK(!bad);
}

// The rings start empty and grow with the live tokens; a growth re-lays a wrapped ring out from 0.
static void test_lazy_ring_growth() {
  auto huge = make(kMaxCapacityTokens);  // 2 fields x 2**40 tokens: only possible because nothing is reserved
  CHECK(add_one(*huge, 3, 1) == 0);
  auto rb = make(100000, 2);
  for (int i = 0; i < 3; ++i) add_one(*rb, 1500, i);  // ring of 4096 tokens: id 2 wraps past its end
  CHECK(rb->first_id() == 1 && rb->num_tokens() == 3000);
  CHECK(add_one(*rb, 6000, 3) == 3);  // 1500 + 6000 live tokens > 4096: grows while id 2 is wrapped
  CHECK(rb->first_id() == 2 && rb->num_tokens() == 7500);
  GatherSpec packed;
  packed.layout = Layout::kPacked;
  Batch b = rb->gather({2, 3}, packed, false);
  const auto* tok = reinterpret_cast<const int32_t*>(b.token_fields[0].data());
  const auto* lp = reinterpret_cast<const float*>(b.token_fields[1].data());
  bool ok = true;
  for (int t = 0; t < 1500; ++t) ok = ok && tok[t] == 2000 + t && lp[t] == -static_cast<float>(t);
  for (int t = 0; t < 6000; ++t) ok = ok && tok[1500 + t] == 3000 + t;
  CHECK(ok);
  auto copy = ReplayBuffer::from_bytes(rb->to_bytes());
  Batch c = copy->gather({2, 3}, packed, false);
  CHECK(std::memcmp(b.token_fields[0].data(), c.token_fields[0].data(), b.token_fields[0].nbytes()) == 0);
  // A batch too large to reserve is OutOfMemory, not std::length_error / std::bad_alloc.
  SampleSpec s;
  s.batch_size = int64_t{1} << 61;
  CHECK(throws<OutOfMemory>([&] { rb->sample(s, GatherSpec{}, 0.0); }));
}

static void test_load_directory() {
  CHECK(throws<FileError>([] { ReplayBuffer::load("/tmp"); }));
  try {
    ReplayBuffer::load("/tmp");
  } catch (const FileError& e) {
    CHECK(std::string(e.what()).find("is a directory") != std::string::npos);
  }
}

static void test_bad_schema() {
  Schema s;
  CHECK(throws<std::invalid_argument>([&] { ReplayBuffer(s, BufferConfig{10, 0, 1.0, 0}); }));
  s.token_fields = {{"a", DType::kInt32, {}}, {"a", DType::kInt32, {}}};
  CHECK(throws<std::invalid_argument>([&] { ReplayBuffer(s, BufferConfig{10, 0, 1.0, 0}); }));
  s.token_fields = {{"a", DType::kInt32, {}}};
  CHECK(throws<std::invalid_argument>([&] { ReplayBuffer(s, BufferConfig{0, 0, 1.0, 0}); }));
  CHECK(throws<std::invalid_argument>([&] { ReplayBuffer(s, BufferConfig{kMaxCapacityTokens + 1, 0, 1.0, 0}); }));
  s.sequence_fields = {{"score", DType::kFloat32, {}}};
  s.group_field = 0;  // float group field
  CHECK(throws<std::invalid_argument>([&] { ReplayBuffer(s, BufferConfig{10, 0, 1.0, 0}); }));
  CHECK(throws<std::invalid_argument>([] { dtype_from_code(42); }));
}

int main() {
  test_sum_tree();
  test_ffd();
  test_fifo_wrap_and_gather();
  test_sampling_and_groups();
  test_serialization();
  test_concurrency();
  test_bad_schema();
  test_gather_into_length_bounds();
  test_crafted_files();
  test_save_syncs_directory();
  test_lazy_ring_growth();
  test_load_directory();
  if (failures != 0) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("test_replay_core: all checks passed\n");
  return 0;
}
