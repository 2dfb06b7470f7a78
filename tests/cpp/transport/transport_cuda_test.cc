// UCX between two processes with GPU memory on both sides: the initiator's
// buffer and the target's registered region are cudaMalloc'd, so the bytes
// move GPU to GPU (cuda_ipc on one host) or through UCX's staging (tcp with
// cuda_copy). Skips, naming the reason, where no CUDA device is usable.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "tests/cpp/testing/cuda_device.h"
#include "tests/cpp/transport/peer_util.h"
#include "transfer/transport/ucx_transport.h"

namespace relaykv {
namespace {

using std::chrono::seconds;
using testing::CheckPattern;
using testing::FillPattern;

using testing::DeviceBuffer;

using testing::UcxCase;

class UcxCudaTwoProcessTest : public ::testing::TestWithParam<UcxCase> {
 protected:
  static constexpr uint64_t kRegion = (64ull << 20) + 4096;

  void SetUp() override {
    RELAYKV_SKIP_WITHOUT_CUDA_DEVICE();
    ASSERT_CUDA_OK(cudaSetDevice(0));
    uint8_t* p = nullptr;
    ASSERT_CUDA_OK(cudaMalloc(reinterpret_cast<void**>(&p), kRegion));
    local_.reset(p);
    auto t =
        UcxTransport::Create(UcxTransportOptions::WithTls(GetParam().tls, GetParam().peer_errors));
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    transport_ = std::move(*t);
    auto reg = transport_->RegisterMemory(local_.get(), kRegion, MemoryKind::kCudaDevice);
    ASSERT_TRUE(reg.ok()) << reg.status().ToString();
    local_reg_ = std::move(*reg);
    auto peer = testing::PeerProcess::Spawn(RELAYKV_TRANSPORT_PEER, GetParam().tls, kRegion,
                                            GetParam().peer_errors, "cuda");
    ASSERT_TRUE(peer.ok()) << peer.status().ToString();
    peer_ = std::move(*peer);
    ASSERT_TRUE(peer_->Send(*transport_->LocalAddress()).ok());
    auto remote = RemoteDescriptor::Parse(peer_->descriptor());
    ASSERT_TRUE(remote.ok()) << remote.status().ToString();
    remote_ = *remote;
    auto ep = transport_->Connect(peer_->address());
    ASSERT_TRUE(ep.ok()) << ep.status().ToString();
    ep_ = std::move(*ep);
  }
  void TearDown() override {
    ep_.reset();
    peer_.reset();
    local_reg_.reset();
    transport_.reset();
    local_.reset();
  }

  // Device bytes [0, n) of the local buffer := pattern(base, seed).
  void FillLocal(uint64_t n, uint64_t base, uint32_t seed) {
    ASSERT_CUDA_OK(testing::FillDevice(
        local_.get(), n, [&](uint8_t* p, uint64_t m) { FillPattern(p, m, base, seed); }));
  }
  int64_t CheckLocal(uint64_t n, uint64_t base, uint32_t seed) {
    std::vector<uint8_t> host(n);
    if (cudaMemcpy(host.data(), local_.get(), n, cudaMemcpyDeviceToHost) != cudaSuccess) return 0;
    return CheckPattern(host.data(), n, base, seed);
  }
  std::string Verify(uint64_t off, uint64_t n, uint32_t seed) {
    auto note = ep_->Notify("verify " + std::to_string(off) + " " + std::to_string(n) + " " +
                            std::to_string(seed));
    if (!note.ok()) return note.status().ToString();
    if (Status s = (*note)->Wait(seconds(10)); !s.ok()) return s.ToString();
    auto reply = transport_->WaitNotification(seconds(20));
    return reply.ok() ? *reply : reply.status().ToString();
  }

  DeviceBuffer local_;
  std::unique_ptr<UcxTransport> transport_;
  std::unique_ptr<MemoryRegistration> local_reg_;
  std::unique_ptr<testing::PeerProcess> peer_;
  std::unique_ptr<Endpoint> ep_;
  RemoteDescriptor remote_;
};

TEST_P(UcxCudaTwoProcessTest, TheTargetAdvertisesDeviceMemory) {
  EXPECT_EQ(remote_.kind, MemoryKind::kCudaDevice);
  EXPECT_EQ(remote_.length, kRegion);
  EXPECT_EQ(local_reg_->kind(), MemoryKind::kCudaDevice);
}

TEST_P(UcxCudaTwoProcessTest, DeviceToDeviceWriteNotifyReadAllSizes) {
  uint32_t seed = 200;
  for (uint64_t size : {uint64_t{1}, uint64_t{4096}, uint64_t{65539}, uint64_t{1} << 20,
                        uint64_t{16} << 20, uint64_t{64} << 20}) {
    SCOPED_TRACE("size " + std::to_string(size));
    const uint64_t off = size < (1 << 20) ? 4093 : 0;
    ASSERT_CUDA_OK(cudaMemset(local_.get(), 0xee, size));
    ASSERT_CUDA_OK(cudaDeviceSynchronize());  // before UCX's streams write the same bytes
    auto r = ep_->Read(local_.get(), size, remote_, off);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    Status rs = (*r)->Wait(seconds(30));
    ASSERT_TRUE(rs.ok()) << rs.ToString();
    ASSERT_EQ(CheckLocal(size, off, 7), -1) << "read brought wrong bytes";

    ++seed;
    FillLocal(size, off, seed);
    auto w = ep_->Write(local_.get(), size, remote_, off);
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    Status ws = (*w)->Wait(seconds(30));
    ASSERT_TRUE(ws.ok()) << ws.ToString();
    ASSERT_EQ(Verify(off, size, seed), "ok");

    FillLocal(size, off, 7);  // restore the peer's bytes for the next size's read
    auto back = ep_->Write(local_.get(), size, remote_, off);
    ASSERT_TRUE(back.ok() && (*back)->Wait(seconds(30)).ok());
  }
}

// A host exporter writing into a GPU store region (and reading back into host
// memory): the two memory kinds of one transfer differ.
TEST_P(UcxCudaTwoProcessTest, HostMemoryToDeviceRegionAndBack) {
  const uint64_t size = 16 << 20;
  std::vector<uint8_t> host(size);
  FillPattern(host.data(), size, 0, 77);
  auto w = ep_->Write(host.data(), size, remote_, 0);
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  Status ws = (*w)->Wait(seconds(30));
  ASSERT_TRUE(ws.ok()) << ws.ToString();
  ASSERT_EQ(Verify(0, size, 77), "ok");
  std::vector<uint8_t> back(size, 0);
  auto r = ep_->Read(back.data(), size, remote_, 0);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  Status rs = (*r)->Wait(seconds(30));
  ASSERT_TRUE(rs.ok()) << rs.ToString();
  EXPECT_EQ(CheckPattern(back.data(), size, 0, 77), -1);
}

// cuda_ipc maps the peer's allocation into this process: GPU to GPU without
// the host. tcp+cuda_copy stages through host memory, the path between nodes
// without GPUDirect RDMA.
// Where cuda_ipc is unreachable (separate containers, other visible devices)
// UCX falls back to the staged path without an error; UCX_PROTO_INFO=y shows
// which one ran.
INSTANTIATE_TEST_SUITE_P(Ucx, UcxCudaTwoProcessTest,
                         ::testing::Values(UcxCase{"cuda_ipc", "cuda_ipc,cuda_copy,tcp", false},
                                           UcxCase{"tcp_staged", "tcp,cuda_copy", true}),
                         [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace relaykv
