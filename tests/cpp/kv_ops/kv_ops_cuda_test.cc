// The CUDA kernels against the CPU versions (which kv_ops_test checks against
// plain reference loops): gather and scatter bit for bit, RoPE within one unit
// in the last place. Every test skips, naming the reason, without a device.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "connector/kv_ops/kv_ops_cuda.h"
#include "connector/kv_ops/paged_kv.h"
#include "connector/kv_ops/rope.h"
#include "tests/cpp/kv_ops/kv_ops_test_util.h"
#include "tests/cpp/testing/cuda_device.h"

namespace relaykv {
namespace {

using testing::AllShapes;
using testing::FirstDifference;
using testing::kAllPhys;
using testing::MakeCache;
using testing::MakePayload;
using testing::MakeTable;
using testing::Phys;
using testing::PhysName;
using testing::Shape;
using testing::TestCache;
using testing::TestPayload;
using testing::Ulp;

#define ASSERT_CUDA(expr)                                                      \
  do {                                                                         \
    const cudaError_t err_ = (expr);                                           \
    ASSERT_EQ(err_, cudaSuccess) << #expr << ": " << cudaGetErrorString(err_); \
  } while (0)

// Test set-up that cannot go on (no memory, broken device) ends the binary
// with the reason rather than letting every later check fail obscurely.
void Check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "kv_ops_cuda_test: %s failed: %s\n", what, cudaGetErrorString(err));
    std::abort();
  }
}

// Device memory of a fixed size.
class DeviceBytes {
 public:
  DeviceBytes() = default;
  explicit DeviceBytes(size_t n) : size_(n) { Check(cudaMalloc(&ptr_, n), "cudaMalloc"); }
  DeviceBytes(const DeviceBytes&) = delete;
  DeviceBytes& operator=(const DeviceBytes&) = delete;
  ~DeviceBytes() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  uint8_t* get() const { return static_cast<uint8_t*>(ptr_); }
  size_t size() const { return size_; }

 private:
  void* ptr_ = nullptr;
  size_t size_ = 0;
};

// A TestCache mirrored on the device: same offsets, on_device = true.
struct DeviceCache {
  DeviceBytes bytes;
  PagedKvCache cache;

  explicit DeviceCache(const TestCache& host) : bytes(host.storage.size()) {
    cache = host.cache;
    cache.on_device = true;
    for (size_t l = 0; l < cache.k_base.size(); ++l) {
      cache.k_base[l] = bytes.get() + host.ByteOffset(host.cache.k_base[l]);
      cache.v_base[l] = bytes.get() + host.ByteOffset(host.cache.v_base[l]);
    }
    Check(cudaMemcpy(bytes.get(), host.storage.data(), host.storage.size(), cudaMemcpyHostToDevice),
          "cudaMemcpy");
  }
  std::vector<uint8_t> Download() const {
    std::vector<uint8_t> out(bytes.size());
    Check(cudaMemcpy(out.data(), bytes.get(), out.size(), cudaMemcpyDeviceToHost), "cudaMemcpy");
    return out;
  }
};

// A TestPayload mirrored on the device, optionally `misalign` bytes past a
// 256-byte boundary (to force the element-wise kernel path).
struct DevicePayload {
  DeviceBytes bytes;
  KvPayload payload;

  explicit DevicePayload(const TestPayload& host, size_t misalign = 0)
      : bytes(host.storage.size() + misalign) {
    payload = host.payload;
    payload.on_device = true;
    payload.data = bytes.get() + misalign;
    Check(
        cudaMemcpy(payload.data, host.storage.data(), host.storage.size(), cudaMemcpyHostToDevice),
        "cudaMemcpy");
  }
  std::vector<uint8_t> Download() const {
    std::vector<uint8_t> out(payload.Bytes());
    Check(cudaMemcpy(out.data(), payload.data, out.size(), cudaMemcpyDeviceToHost), "cudaMemcpy");
    return out;
  }
};

// Largest distance between two buffers of `dtype` values, in units in the
// last place; -1 when their sizes differ.
double MaxUlps(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b, DType dtype) {
  if (a.size() != b.size()) return -1;
  const int64_t es = DTypeSize(dtype);
  double worst = 0;
  for (size_t off = 0; off < a.size(); off += es) {
    const double x = LoadAsFloat(a.data() + off, dtype);
    const double y = LoadAsFloat(b.data() + off, dtype);
    worst = std::max(worst, std::fabs(x - y) / Ulp(dtype, y));
  }
  return worst;
}

constexpr int32_t kLayers = 3;

struct Scenario {
  TestCache cache;
  std::vector<int32_t> table;
  int32_t seq_begin;
  int32_t count;
};

Scenario MakeScenario(const Shape& s, DType dtype, Phys phys, uint64_t seed) {
  const int32_t seq_len = 45;
  const int64_t blocks_needed = (seq_len + s.block_size - 1) / s.block_size;
  Scenario sc;
  sc.cache = MakeCache(KvLayout{kLayers, s.num_kv_heads, s.head_size, dtype}, s.block_size,
                       blocks_needed + 3, phys, seed);
  sc.table = MakeTable(seq_len, s.block_size, sc.cache.cache.num_blocks, seed % 2 == 0, seed + 1);
  sc.seq_begin = s.block_size == 1 ? 5 : s.block_size / 2 + 1;
  sc.count = seq_len - sc.seq_begin - 2;
  return sc;
}

class KvOpsCudaTest : public ::testing::TestWithParam<testing::LayoutCase> {
 protected:
  void SetUp() override { RELAYKV_SKIP_WITHOUT_CUDA_DEVICE(); }
  Phys phys() const { return GetParam().phys; }
  DType dtype() const { return GetParam().dtype; }
};

INSTANTIATE_TEST_SUITE_P(Layouts, KvOpsCudaTest, ::testing::ValuesIn(testing::AllLayoutCases()));

TEST_P(KvOpsCudaTest, GatherEqualsCpu) {
  uint64_t seed = 1;
  for (const Shape& s : AllShapes()) {
    for (size_t misalign : {size_t{0}, static_cast<size_t>(DTypeSize(dtype()))}) {
      SCOPED_TRACE(s.ToString() + " payload misalign " + std::to_string(misalign));
      Scenario sc = MakeScenario(s, dtype(), phys(), seed++);
      TestPayload want = MakePayload(sc.cache.cache.layout, sc.count + 6, seed++);
      DeviceCache dc(sc.cache);
      DevicePayload dp(want, misalign);
      const LayerRange layers = seed % 3 == 0 ? LayerRange{1, 3} : LayerRange::All();
      ASSERT_TRUE(
          GatherKv(sc.cache.cache, sc.table, sc.seq_begin, sc.count, want.payload, 4, layers).ok());
      const Status st =
          GatherKvCuda(dc.cache, sc.table, sc.seq_begin, sc.count, dp.payload, 4, layers);
      ASSERT_TRUE(st.ok()) << st.ToString();
      ASSERT_CUDA(cudaDeviceSynchronize());
      ASSERT_EQ(FirstDifference(dp.Download(), want.storage), -1);
    }
  }
}

TEST_P(KvOpsCudaTest, ScatterEqualsCpu) {
  uint64_t seed = 100;
  for (const Shape& s : AllShapes()) {
    SCOPED_TRACE(s.ToString());
    Scenario sc = MakeScenario(s, dtype(), phys(), seed++);
    TestPayload src = MakePayload(sc.cache.cache.layout, sc.count + 3, seed++);
    DeviceCache dc(sc.cache);
    DevicePayload dp(src);
    ASSERT_TRUE(ScatterKv(src.payload, 2, sc.count, sc.cache.cache, sc.table, sc.seq_begin).ok());
    const Status st = ScatterKvCuda(dp.payload, 2, sc.count, dc.cache, sc.table, sc.seq_begin);
    ASSERT_TRUE(st.ok()) << st.ToString();
    ASSERT_CUDA(cudaDeviceSynchronize());
    ASSERT_EQ(FirstDifference(dc.Download(), sc.cache.storage), -1);
  }
}

TEST_P(KvOpsCudaTest, RerotationMatchesCpu) {
  uint64_t seed = 200;
  for (const Shape& s : AllShapes()) {
    for (RopeStyle style : {RopeStyle::kNeox, RopeStyle::kInterleaved}) {
      SCOPED_TRACE(s.ToString() + (style == RopeStyle::kNeox ? " neox" : " interleaved"));
      RopeParams rope;
      rope.style = style;
      rope.rotary_dim = seed % 2 == 0 ? 0 : s.head_size / 2;
      Scenario sc = MakeScenario(s, dtype(), phys(), seed++);
      DeviceCache dc(sc.cache);
      ASSERT_TRUE(
          RerotateK(sc.cache.cache, sc.table, sc.seq_begin, sc.count, rope, -733, {1, 3}).ok());
      Status st = RerotateKCuda(dc.cache, sc.table, sc.seq_begin, sc.count, rope, -733, {1, 3});
      ASSERT_TRUE(st.ok()) << st.ToString();
      ASSERT_CUDA(cudaDeviceSynchronize());
      EXPECT_LE(MaxUlps(dc.Download(), sc.cache.storage, dtype()), 1.0);

      TestPayload p = MakePayload(sc.cache.cache.layout, sc.count, seed++);
      DevicePayload dp(p);
      ASSERT_TRUE(RerotateK(p.payload, 1, sc.count - 1, rope, 4099).ok());
      st = RerotateKCuda(dp.payload, 1, sc.count - 1, rope, 4099);
      ASSERT_TRUE(st.ok()) << st.ToString();
      ASSERT_CUDA(cudaDeviceSynchronize());
      EXPECT_LE(MaxUlps(dp.Download(), p.storage, dtype()), 1.0);
    }
  }
}

TEST_P(KvOpsCudaTest, PerTokenRerotationMatchesCpu) {
  const Shape s{3, 64, 16};
  Scenario sc = MakeScenario(s, dtype(), phys(), 300);
  std::vector<int64_t> deltas(sc.count);
  for (int32_t i = 0; i < sc.count; ++i) deltas[i] = i < 10 ? 50 : i < 14 ? 0 : -2000 + i / 7;
  RopeParams rope;
  rope.rotary_dim = 32;
  DeviceCache dc(sc.cache);
  ASSERT_TRUE(RerotateKPerToken(sc.cache.cache, sc.table, sc.seq_begin, deltas, rope).ok());
  Status st = RerotateKPerTokenCuda(dc.cache, sc.table, sc.seq_begin, deltas, rope);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_CUDA(cudaDeviceSynchronize());
  EXPECT_LE(MaxUlps(dc.Download(), sc.cache.storage, dtype()), 1.0);

  TestPayload p = MakePayload(sc.cache.cache.layout, sc.count, 301);
  DevicePayload dp(p);
  ASSERT_TRUE(RerotateKPerToken(p.payload, 0, deltas, rope).ok());
  st = RerotateKPerTokenCuda(dp.payload, 0, deltas, rope);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_CUDA(cudaDeviceSynchronize());
  EXPECT_LE(MaxUlps(dp.Download(), p.storage, dtype()), 1.0);
}

class KvOpsCudaMiscTest : public ::testing::Test {
 protected:
  void SetUp() override { RELAYKV_SKIP_WITHOUT_CUDA_DEVICE(); }
};

TEST_F(KvOpsCudaMiscTest, RunsOnAStreamAndRoundTrips) {
  cudaStream_t stream = nullptr;
  ASSERT_CUDA(cudaStreamCreate(&stream));
  const KvLayout layout{4, 8, 128, DType::kBFloat16};
  TestCache a = MakeCache(layout, 16, 40, Phys::kNhd, 400);
  TestCache b = MakeCache(layout, 16, 50, Phys::kHnd, 401);
  const std::vector<int32_t> ta = MakeTable(300, 16, 40, false, 402);
  const std::vector<int32_t> tb = MakeTable(307, 16, 50, false, 403);
  TestPayload p = MakePayload(layout, 300, 404);
  DeviceCache da(a), db(b);
  DevicePayload dp(p);
  ASSERT_TRUE(GatherKvCuda(da.cache, ta, 0, 300, dp.payload, 0, {}, stream).ok());
  ASSERT_TRUE(ScatterKvCuda(dp.payload, 0, 300, db.cache, tb, 7, {}, stream).ok());
  ASSERT_TRUE(RerotateKCuda(db.cache, tb, 7, 300, RopeParams{}, 0, {}, stream).ok());
  DevicePayload dp2(p);
  ASSERT_TRUE(GatherKvCuda(db.cache, tb, 7, 300, dp2.payload, 0, {}, stream).ok());
  ASSERT_CUDA(cudaStreamSynchronize(stream));
  ASSERT_CUDA(cudaStreamDestroy(stream));
  ASSERT_EQ(FirstDifference(dp.Download(), dp2.Download()), -1);
  ASSERT_TRUE(GatherKv(a.cache, ta, 0, 300, p.payload, 0).ok());
  ASSERT_EQ(FirstDifference(dp.Download(), p.storage), -1);
}

TEST_F(KvOpsCudaMiscTest, BadInputIsRejectedBeforeAnyLaunch) {
  const KvLayout layout{2, 3, 64, DType::kFloat16};
  TestCache host = MakeCache(layout, 16, 4, Phys::kNhd, 500);
  TestPayload hp = MakePayload(layout, 40, 501);
  DeviceCache dc(host);
  DevicePayload dp(hp);
  const std::vector<int32_t> table = {3, 1, 0};
  auto expect_invalid = [](const Status& s, std::string_view needle) {
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
    EXPECT_NE(s.message().find(needle), std::string_view::npos) << s.ToString();
  };
  // Host memory handed to the CUDA path, flagged honestly...
  expect_invalid(GatherKvCuda(host.cache, table, 0, 10, dp.payload, 0), "on_device=false");
  expect_invalid(GatherKvCuda(dc.cache, table, 0, 10, hp.payload, 0), "on_device=false");
  // ...or not.
  KvPayload lying = hp.payload;
  lying.on_device = true;
  expect_invalid(GatherKvCuda(dc.cache, table, 0, 10, lying, 0), "host memory");
  expect_invalid(GatherKvCuda(dc.cache, std::vector<int32_t>{3, 9, 0}, 0, 40, dp.payload, 0),
                 "block_table[1] = 9");
  expect_invalid(ScatterKvCuda(dp.payload, 0, 40, dc.cache, std::vector<int32_t>{3}, 0),
                 "block table has 1 entries");
  expect_invalid(RerotateKCuda(dc.cache, table, 0, 10, RopeParams{}, 1, {2, 3}), "layer range");
  PagedKvCache odd = dc.cache;
  odd.k_base[1] = static_cast<uint8_t*>(odd.k_base[1]) + 1;
  expect_invalid(ScatterKvCuda(dp.payload, 0, 10, odd, table, 0), "aligned");
  ASSERT_CUDA(cudaDeviceSynchronize());
  EXPECT_EQ(FirstDifference(dc.Download(), host.storage), -1);
}

// Not a pass/fail check: prints the kernels' bandwidth next to a device-to-
// device cudaMemcpy of the same bytes, for the shape of a mid-size model.
TEST_F(KvOpsCudaMiscTest, ReportsThroughput) {
  const KvLayout layout{32, 8, 128, DType::kBFloat16};
  const int32_t tokens = 4096, block_size = 16;
  const int64_t num_blocks = tokens / block_size;
  const std::vector<int32_t> table = MakeTable(tokens, block_size, num_blocks, false, 600);
  KvPayload payload{nullptr, tokens, layout, true};
  const size_t bytes = payload.Bytes();
  DeviceBytes cache_bytes(bytes), payload_bytes(bytes);
  ASSERT_NE(cache_bytes.get(), nullptr);
  ASSERT_NE(payload_bytes.get(), nullptr);
  payload.data = payload_bytes.get();
  PagedKvCache cache;
  cache.layout = layout;
  cache.block_size = block_size;
  cache.num_blocks = num_blocks;
  const int64_t kv_elems = num_blocks * block_size * payload.RowElements();
  for (int32_t l = 0; l < layout.num_layers; ++l) {
    cache.k_base.push_back(cache_bytes.get() + 2 * l * kv_elems * 2);
    cache.v_base.push_back(cache_bytes.get() + (2 * l + 1) * kv_elems * 2);
  }
  cache.block_stride = block_size * payload.RowElements();
  cache.slot_stride = payload.RowElements();
  cache.head_stride = layout.head_size;
  cache.on_device = true;

  cudaEvent_t start, stop;
  ASSERT_CUDA(cudaEventCreate(&start));
  ASSERT_CUDA(cudaEventCreate(&stop));
  auto time_ms = [&](auto&& fn) {
    fn();  // warm-up
    cudaEventRecord(start);
    const int reps = 5;
    for (int i = 0; i < reps; ++i) fn();
    cudaEventRecord(stop);
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    return ms / reps;
  };
  const float gather_ms =
      time_ms([&] { EXPECT_TRUE(GatherKvCuda(cache, table, 0, tokens, payload, 0).ok()); });
  const float scatter_ms =
      time_ms([&] { EXPECT_TRUE(ScatterKvCuda(payload, 0, tokens, cache, table, 0).ok()); });
  const float rope_ms =
      time_ms([&] { EXPECT_TRUE(RerotateKCuda(cache, table, 0, tokens, RopeParams{}, 17).ok()); });
  const float memcpy_ms = time_ms(
      [&] { cudaMemcpyAsync(payload.data, cache_bytes.get(), bytes, cudaMemcpyDeviceToDevice); });
  ASSERT_CUDA(cudaDeviceSynchronize());
  auto gbps = [&](float ms) { return bytes / (ms * 1e-3) / 1e9; };
  std::printf(
      "{\"bench\":\"kv_ops_cuda\",\"bytes\":%zu,\"gather_gbps\":%.1f,\"scatter_gbps\":%.1f,"
      "\"memcpy_d2d_gbps\":%.1f,\"rerotate_k_gbps\":%.1f}\n",
      bytes, gbps(gather_ms), gbps(scatter_ms), gbps(memcpy_ms), gbps(rope_ms) / 2);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
}

}  // namespace
}  // namespace relaykv
