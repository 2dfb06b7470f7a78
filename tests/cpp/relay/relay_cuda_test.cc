// KvRelay with device-resident caches: the record stays in host memory, the
// cache lives on the GPU. Results must equal the host path's: V bit for bit,
// K within one unit in the last place (the CUDA RoPE kernel's documented bound).
// Every test skips, naming the reason, where there is no CUDA device.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "connector/kv_ops/paged_kv.h"
#include "connector/relay/kv_relay.h"
#include "tests/cpp/relay/relay_test_util.h"
#include "tests/cpp/testing/cuda_device.h"
#include "transfer/common/dtype.h"

namespace relaykv {
namespace {

constexpr int32_t kLayers = 3;
constexpr int32_t kHeads = 2;
constexpr int32_t kHeadSize = 32;
constexpr int32_t kBlockSize = 16;
constexpr int32_t kBlocks = 12;

KvLayout Layout() { return KvLayout{kLayers, kHeads, kHeadSize, DType::kFloat16}; }

InstanceIdentity Identity() {
  InstanceIdentity id;
  id.model_fingerprint = 0x5eed;
  id.layout = Layout();
  id.rope.theta = 10000.f;
  id.tenant = "gpu";
  return id;
}

// A vLLM-flash-layout cache ([layer][K/V][block][slot][head][dim]) in host
// memory and, on request, a device twin with the same strides.
struct Cache {
  std::vector<uint16_t> host;
  void* device = nullptr;
  PagedKvCache view;

  Cache() {
    const int64_t side = int64_t{kBlocks} * kBlockSize * kHeads * kHeadSize;
    host.resize(static_cast<size_t>(kLayers * 2 * side));
    view.layout = Layout();
    view.block_size = kBlockSize;
    view.num_blocks = kBlocks;
    view.block_stride = int64_t{kBlockSize} * kHeads * kHeadSize;
    view.slot_stride = int64_t{kHeads} * kHeadSize;
    view.head_stride = kHeadSize;
    view.dim_stride = 1;
    Point(host.data(), false);
  }
  ~Cache() {
    if (device != nullptr) cudaFree(device);
  }
  Cache(const Cache&) = delete;
  Cache& operator=(const Cache&) = delete;

  void Point(void* base, bool on_device) {
    const int64_t side = int64_t{kBlocks} * kBlockSize * kHeads * kHeadSize;
    view.k_base.clear();
    view.v_base.clear();
    auto* p = static_cast<uint16_t*>(base);
    for (int32_t l = 0; l < kLayers; ++l) {
      view.k_base.push_back(p + l * 2 * side);
      view.v_base.push_back(p + l * 2 * side + side);
    }
    view.on_device = on_device;
  }
  void Fill(uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> dist(0.f, 1.f);
    for (uint16_t& x : host) x = FloatToHalf(dist(rng));
  }
  // Moves the view onto the GPU (a copy of the host bytes).
  void ToDevice() {
    ASSERT_EQ(cudaMalloc(&device, host.size() * 2), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(device, host.data(), host.size() * 2, cudaMemcpyHostToDevice),
              cudaSuccess);
    Point(device, true);
  }
  void ToHost() {
    ASSERT_EQ(cudaMemcpy(host.data(), device, host.size() * 2, cudaMemcpyDeviceToHost),
              cudaSuccess);
  }
};

std::vector<int32_t> Table(int32_t n, uint32_t seed) {
  return testing::ShuffledBlocks(kBlocks, n, seed);
}

using testing::Tokens;

// [layer][K/V][token][head][dim] of sequence tokens [begin, +count), host cache.
std::vector<uint16_t> Rows(const PagedKvCache& cache, const std::vector<int32_t>& table,
                           int32_t begin, int32_t count) {
  std::vector<uint16_t> out(static_cast<size_t>(kLayers) * 2 * count * kHeads * kHeadSize);
  const KvPayload p{out.data(), count, Layout(), false};
  EXPECT_TRUE(GatherKv(cache, table, begin, count, p, 0).ok());
  return out;
}

// V equal bit for bit, K within one unit in the last place.
void ExpectSameKv(const std::vector<uint16_t>& got, const std::vector<uint16_t>& want,
                  int32_t count) {
  ASSERT_EQ(got.size(), want.size());
  const size_t side = static_cast<size_t>(count) * kHeads * kHeadSize;
  for (int32_t l = 0; l < kLayers; ++l) {
    const size_t k = static_cast<size_t>(l) * 2 * side, v = k + side;
    for (size_t i = 0; i < side; ++i) {
      ASSERT_LE(std::abs(int{got[k + i]} - int{want[k + i]}), 1) << "layer " << l << " K " << i;
      ASSERT_EQ(got[v + i], want[v + i]) << "layer " << l << " V " << i;
    }
  }
}

StoreOptions Store() {
  StoreOptions o;
  o.capacity_bytes = 8 << 20;
  return o;
}

TEST(RelayCudaTest, ImportIntoADeviceCacheEqualsTheHostImport) {
  RELAYKV_SKIP_WITHOUT_CUDA_DEVICE();
  auto relay = KvRelay::Create(Identity(), Store());
  ASSERT_TRUE(relay.ok()) << relay.status().ToString();
  Cache src;
  src.Fill(1);
  const std::vector<int32_t> src_table = Table(5, 2), dst_table = Table(6, 3);
  const std::vector<int32_t> answer = Tokens(50, 100);
  ASSERT_TRUE((*relay)->Export(src.view, src_table, answer, /*seq_begin=*/7).ok());
  std::vector<int32_t> prompt = Tokens(19, 9000);
  prompt.insert(prompt.end(), answer.begin(), answer.end());
  const auto spans = (*relay)->Lookup(prompt);
  ASSERT_EQ(spans.size(), 1u);

  Cache on_host, on_gpu;
  ASSERT_NO_FATAL_FAILURE(on_gpu.ToDevice());
  auto a = (*relay)->Import(spans[0], prompt, on_host.view, dst_table);
  auto b = (*relay)->Import(spans[0], prompt, on_gpu.view, dst_table);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_EQ(b->position_delta, 19 - 7);
  ASSERT_NO_FATAL_FAILURE(on_gpu.ToHost());
  Cache gpu_bytes;  // the device cache's bytes read through a host view
  gpu_bytes.host = on_gpu.host;
  gpu_bytes.Point(gpu_bytes.host.data(), false);
  ExpectSameKv(Rows(gpu_bytes.view, dst_table, 19, 50), Rows(on_host.view, dst_table, 19, 50), 50);
  // Nothing outside the span was written.
  EXPECT_EQ(gpu_bytes.host, on_host.host);
}

TEST(RelayCudaTest, ExportFromADeviceCacheEqualsTheHostExport) {
  RELAYKV_SKIP_WITHOUT_CUDA_DEVICE();
  auto from_host = KvRelay::Create(Identity(), Store());
  auto from_gpu = KvRelay::Create(Identity(), Store());
  ASSERT_TRUE(from_host.ok() && from_gpu.ok());
  Cache src;
  src.Fill(4);
  Cache src_gpu;
  src_gpu.host = src.host;
  ASSERT_NO_FATAL_FAILURE(src_gpu.ToDevice());
  const std::vector<int32_t> table = Table(6, 5);
  const std::vector<int32_t> answer = Tokens(70, 300);
  ASSERT_TRUE((*from_host)->Export(src.view, table, answer, 11).ok());
  auto exp = (*from_gpu)->Export(src_gpu.view, table, answer, 11);
  ASSERT_TRUE(exp.ok()) << exp.status().ToString();
  // Both records, imported the same way into host caches, give the same bytes.
  std::vector<int32_t> prompt = Tokens(11, 1);
  prompt.insert(prompt.end(), answer.begin(), answer.end());
  Cache x, y;
  const auto sx = (*from_host)->Lookup(prompt), sy = (*from_gpu)->Lookup(prompt);
  ASSERT_EQ(sx.size(), 1u);
  ASSERT_EQ(sy.size(), 1u);
  ASSERT_TRUE((*from_host)->Import(sx[0], prompt, x.view, table).ok());
  ASSERT_TRUE((*from_gpu)->Import(sy[0], prompt, y.view, table).ok());
  EXPECT_EQ(x.host, y.host);
  EXPECT_EQ(Rows(y.view, table, 11, 70), Rows(src.view, table, 11, 70));
}

TEST(RelayCudaTest, HostMemoryMarkedOnDeviceIsRefusedNotTouched) {
  RELAYKV_SKIP_WITHOUT_CUDA_DEVICE();
  auto relay = KvRelay::Create(Identity(), Store());
  ASSERT_TRUE(relay.ok());
  Cache src;
  src.Fill(6);
  const std::vector<int32_t> table = Table(3, 7);
  const std::vector<int32_t> answer = Tokens(30, 50);
  ASSERT_TRUE((*relay)->Export(src.view, table, answer, 0).ok());
  Cache liar;  // host bytes that claim to be on the device
  liar.view.on_device = true;
  const auto spans = (*relay)->Lookup(answer);
  ASSERT_EQ(spans.size(), 1u);
  auto r = (*relay)->Import(spans[0], answer, liar.view, table);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << r.status().ToString();
  EXPECT_NE(r.status().message().find("not in device memory"), std::string::npos)
      << r.status().ToString();
  auto e = (*relay)->Export(liar.view, table, Tokens(30, 9), 0);
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.status().message().find("not in device memory"), std::string::npos)
      << e.status().ToString();
}

}  // namespace
}  // namespace relaykv
