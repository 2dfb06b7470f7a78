// NcclTransport. The blob and device checks run everywhere; the transfers run
// between two processes on one GPU (the peer claims another NCCL_HOSTID, so
// NCCL connects them over its socket transport) and skip, naming the reason,
// where no CUDA device is usable.
#include "transfer/transport/nccl_transport.h"

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "tests/cpp/testing/cuda_device.h"
#include "tests/cpp/transport/peer_util.h"

namespace relaykv {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using testing::CheckPattern;
using testing::FillPattern;

NcclAddress Sample() {
  NcclAddress a;
  a.port = 40123;
  a.host = "10.1.2.3";
  return a;
}

TEST(NcclAddress, RoundTripsAndRefusesMalformedBlobs) {
  const std::string blob = Sample().Pack();
  auto back = NcclAddress::Parse(blob);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->port, 40123);
  EXPECT_EQ(back->host, "10.1.2.3");

  EXPECT_EQ(NcclAddress::Parse("").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(NcclAddress::Parse(blob.substr(0, blob.size() - 1)).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(NcclAddress::Parse(blob + "x").status().code(), StatusCode::kInvalidArgument);
  std::string ucx = blob;
  ucx[3] = 'U';  // "RKVU": a UCX address
  EXPECT_EQ(NcclAddress::Parse(ucx).status().code(), StatusCode::kInvalidArgument);
  std::string v1 = blob;
  v1[4] = 2;  // the earlier layout, with a one-time id in the blob
  const Status old = NcclAddress::Parse(v1).status();
  EXPECT_EQ(old.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(old.message().find("version 2"), std::string_view::npos) << old.ToString();
  NcclAddress no_port = Sample();
  no_port.port = 0;
  EXPECT_EQ(NcclAddress::Parse(no_port.Pack()).status().code(), StatusCode::kInvalidArgument);
  NcclAddress no_host = Sample();
  no_host.host.clear();
  EXPECT_EQ(NcclAddress::Parse(no_host.Pack()).status().code(), StatusCode::kInvalidArgument);
}

TEST(NcclTransportCreate, NeedsADeviceAndGpuMemory) {
  const std::string no_device = testing::NoCudaDeviceReason();
  auto t = NcclTransport::Create();
  if (!no_device.empty()) {
    ASSERT_FALSE(t.ok());
    EXPECT_EQ(t.status().code(), StatusCode::kUnavailable);
    EXPECT_NE(t.status().message().find("no CUDA device"), std::string_view::npos)
        << t.status().ToString();
    return;
  }
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_EQ((*t)->name(), "nccl");
  std::vector<uint8_t> host(4096);
  EXPECT_EQ((*t)->RegisterMemory(host.data(), host.size(), MemoryKind::kHost).status().code(),
            StatusCode::kUnimplemented);
  // Host memory passed off as device memory is refused too.
  EXPECT_EQ((*t)->RegisterMemory(host.data(), host.size(), MemoryKind::kCudaDevice).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ((*t)->Connect("RKVU garbage").status().code(), StatusCode::kInvalidArgument);
  // A well-formed blob nobody listens behind: Unavailable, not a hang.
  NcclAddress nobody = Sample();
  nobody.host = "127.0.0.1";
  nobody.port = 1;
  EXPECT_EQ((*t)->Connect(nobody.Pack()).status().code(), StatusCode::kUnavailable);
  NcclTransportOptions far;
  far.device = 4096;
  EXPECT_EQ(NcclTransport::Create(far).status().code(), StatusCode::kUnavailable);
  NcclTransportOptions long_token;
  long_token.token.assign(kMaxNcclTokenBytes + 1, 't');
  EXPECT_EQ(NcclTransport::Create(long_token).status().code(), StatusCode::kInvalidArgument);
}

class NcclTwoProcessTest : public ::testing::Test {
 protected:
  static constexpr uint64_t kRegion = (64ull << 20) + 4096;

  void SetUp() override {
    RELAYKV_SKIP_WITHOUT_CUDA_DEVICE();
    ::setenv("NCCL_HOSTID", "relaykv-nccl-initiator", 1);
    ::setenv("NCCL_NET", "Socket", 1);
    ASSERT_CUDA_OK(cudaSetDevice(0));
    uint8_t* p = nullptr;
    ASSERT_CUDA_OK(cudaMalloc(reinterpret_cast<void**>(&p), kRegion));
    local_.reset(p);
    auto t = NcclTransport::Create();
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    transport_ = std::move(*t);
    auto peer = testing::PeerProcess::SpawnWith(RELAYKV_NCCL_PEER,
                                                {std::to_string(kRegion), "relaykv-nccl-target"});
    ASSERT_TRUE(peer.ok()) << peer.status().ToString();
    peer_ = std::move(*peer);
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
    transport_.reset();
    local_.reset();
  }

  void FillLocal(uint64_t n, uint64_t base, uint32_t seed) {
    ASSERT_CUDA_OK(testing::FillDevice(
        local_.get(), n, [&](uint8_t* p, uint64_t m) { FillPattern(p, m, base, seed); }));
  }

  // The peer's next answer over the side channel.
  std::string Reply() {
    auto r = peer_->Recv(seconds(60));
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? *r : "<" + r.status().ToString() + ">";
  }

  // Write [0, n) of the local buffer to the peer at `offset`, then have the peer check it.
  void WriteAndVerify(Endpoint& ep, uint64_t n, uint64_t offset, uint32_t seed) {
    FillLocal(n, offset, seed);
    auto w = ep.Write(local_.get(), n, remote_, offset);
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    auto note = ep.Notify("verify " + std::to_string(offset) + " " + std::to_string(n) + " " +
                          std::to_string(seed));
    ASSERT_TRUE(note.ok()) << note.status().ToString();
    ASSERT_TRUE((*w)->Wait(seconds(60)).ok());
    ASSERT_TRUE((*note)->Wait(seconds(60)).ok());
    EXPECT_EQ(Reply(), "ok") << n << " bytes at " << offset;
  }

  testing::DeviceBuffer local_;
  std::unique_ptr<NcclTransport> transport_;
  std::unique_ptr<testing::PeerProcess> peer_;
  RemoteDescriptor remote_;
  std::unique_ptr<Endpoint> ep_;
};

TEST_F(NcclTwoProcessTest, WritesLandWhereTheyWereAddressed) {
  uint32_t seed = 11;
  for (uint64_t n : {1ull, 4099ull, 1ull << 20, 64ull << 20}) {
    WriteAndVerify(*ep_, n, kRegion - n - 1, seed++);
    WriteAndVerify(*ep_, n, 0, seed++);
  }
}

TEST_F(NcclTwoProcessTest, ReadsReturnTheTargetsBytes) {
  for (uint64_t n : {1ull, 4099ull, 16ull << 20}) {
    const uint64_t offset = 12345;
    auto r = ep_->Read(local_.get(), n, remote_, offset);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    ASSERT_TRUE((*r)->Wait(seconds(60)).ok());
    std::vector<uint8_t> host(n);
    ASSERT_CUDA_OK(cudaMemcpy(host.data(), local_.get(), n, cudaMemcpyDeviceToHost));
    EXPECT_EQ(CheckPattern(host.data(), n, offset, 7), -1) << n;
  }
}

TEST_F(NcclTwoProcessTest, FlushAndNotificationsFollowEveryEarlierWrite) {
  // 40 different 1 MB chunks at 40 offsets, a flush, then one check per chunk:
  // a write lost, reordered onto another chunk or not yet landed is caught.
  constexpr uint64_t kChunk = 1 << 20;
  ASSERT_CUDA_OK(testing::FillDevice(local_.get(), 40 * kChunk, [](uint8_t* p, uint64_t) {
    for (uint64_t i = 0; i < 40; ++i) {
      FillPattern(p + i * kChunk, kChunk, i * kChunk, static_cast<uint32_t>(100 + i));
    }
  }));
  for (uint64_t i = 0; i < 40; ++i) {
    auto w = ep_->Write(local_.get() + i * kChunk, kChunk, remote_, i * kChunk);
    ASSERT_TRUE(w.ok()) << w.status().ToString();
  }
  auto f = ep_->Flush();
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  ASSERT_TRUE((*f)->Wait(seconds(60)).ok());
  for (uint64_t i = 0; i < 40; ++i) {  // straight from the target's memory, after the flush
    ASSERT_TRUE(peer_
                    ->Send("verify " + std::to_string(i * kChunk) + " " + std::to_string(kChunk) +
                           " " + std::to_string(100 + i))
                    .ok());
    EXPECT_EQ(Reply(), "ok") << "chunk " << i;
  }
  // A notification right behind a write sees it (no flush in between).
  FillLocal(kChunk, 0, 77);
  ASSERT_TRUE(ep_->Write(local_.get(), kChunk, remote_, 0).ok());
  ASSERT_TRUE(ep_->Notify("verify 0 1048576 77").ok());
  EXPECT_EQ(Reply(), "ok");
  auto empty = ep_->Notify("");
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(Reply(), "got ");
}

TEST_F(NcclTwoProcessTest, BadRangesAreRefusedBeforeAnythingMoves) {
  EXPECT_EQ(ep_->Write(local_.get(), 2, remote_, kRegion - 1).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(ep_->Read(local_.get(), 1, remote_, kRegion + 1).status().code(),
            StatusCode::kInvalidArgument);
  RemoteDescriptor host = remote_;
  host.kind = MemoryKind::kHost;
  EXPECT_EQ(ep_->Write(local_.get(), 1, host, 0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ep_->Notify(std::string(kMaxNotificationBytes + 1, 'x')).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_TRUE(ep_->healthy());
  WriteAndVerify(*ep_, 4096, 0, 5);  // the connection still works
}

TEST_F(NcclTwoProcessTest, ATamperedDescriptorEndsTheConnectionNotTheTargetsMemory) {
  // A descriptor whose base the target never registered: the target drops the
  // connection instead of receiving anywhere, and its region keeps its bytes.
  FillLocal(4096, 0, 99);
  RemoteDescriptor forged = remote_;
  forged.addr += 4096;
  auto w = ep_->Write(local_.get(), 4096, forged, 0);
  Status s = w.ok() ? (*w)->Wait(seconds(20)) : w.status();
  if (s.ok()) {
    auto f = ep_->Flush();
    s = f.ok() ? (*f)->Wait(seconds(20)) : f.status();
  }
  EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s.ToString();
  EXPECT_FALSE(ep_->healthy());
  ASSERT_TRUE(peer_->Send("peers").ok());
  EXPECT_EQ(Reply(), "0");
  ASSERT_TRUE(peer_->Send("verify 0 16384 7").ok());  // the pattern it started with
  EXPECT_EQ(Reply(), "ok");
}

TEST_F(NcclTwoProcessTest, OneAddressServesManyPeers) {
  auto second = transport_->Connect(peer_->address());  // the same blob as the first
  ASSERT_TRUE(second.ok()) << second.status().ToString();
  WriteAndVerify(**second, 1 << 20, 4096, 31);
  WriteAndVerify(*ep_, 1 << 20, 8192, 32);
  ASSERT_TRUE(peer_->Send("peers").ok());
  EXPECT_EQ(Reply(), "2");
  second->reset();  // a closed endpoint ends its connection on the target
  std::string peers;
  for (int i = 0; i < 100 && peers != "1"; ++i) {
    std::this_thread::sleep_for(milliseconds(20));
    ASSERT_TRUE(peer_->Send("peers").ok());
    peers = Reply();
  }
  EXPECT_EQ(peers, "1");
  WriteAndVerify(*ep_, 4096, 0, 33);
}

TEST_F(NcclTwoProcessTest, APeerWithTheWrongTokenIsNotServed) {
  // The peer runs with an empty token; this one presents another.
  NcclTransportOptions o;
  o.token = "not-the-deployments-token";
  o.connect_timeout = milliseconds(5000);
  auto stranger = NcclTransport::Create(o);
  ASSERT_TRUE(stranger.ok()) << stranger.status().ToString();
  auto ep = (*stranger)->Connect(peer_->address());
  EXPECT_EQ(ep.status().code(), StatusCode::kUnavailable) << ep.status().ToString();
  ASSERT_TRUE(peer_->Send("peers").ok());
  EXPECT_EQ(Reply(), "1");  // only the fixture's connection
}

TEST_F(NcclTwoProcessTest, PeerDeathIsUnavailableWithinTheTimeoutNotAHang) {
  WriteAndVerify(*ep_, 1 << 20, 0, 41);
  peer_->Kill();
  const auto t0 = std::chrono::steady_clock::now();
  Status last;
  for (int i = 0; i < 20 && last.ok(); ++i) {
    auto w = ep_->Write(local_.get(), 16 << 20, remote_, 0);
    last = w.ok() ? (*w)->Wait(seconds(30)) : w.status();
  }
  const auto took = std::chrono::steady_clock::now() - t0;
  // The control socket closes with the process: Unavailable, not a deadline.
  EXPECT_EQ(last.code(), StatusCode::kUnavailable) << last.ToString();
  EXPECT_FALSE(ep_->healthy());
  EXPECT_LT(took, seconds(30));
}

}  // namespace
}  // namespace relaykv
