// nccl_peer <fd> <bytes> <hostid>: the target side of the two-process NCCL
// transport tests. Sets NCCL_HOSTID to <hostid> (so a second process on the
// same GPU counts as another host; see nccl_transport.h) and NCCL_NET=Socket
// (no InfiniBand card is picked up by accident), cudaMallocs a region
// of <bytes> bytes filled with PatternByte(i, 7), registers it and hands its
// address and descriptor to the parent over the socket <fd>. Then it serves
// the transport and answers each notification over the socket:
//   "verify <offset> <length> <seed>" -> "ok", "bad <index>" or "error <why>"
//   anything else                      -> "got <message>"
// Over the socket, the parent's "peers" asks for the number of connections
// served, "verify ..." checks the region directly (as above); "exit" or a
// closed socket ends it.
#include <cuda_runtime.h>
#include <poll.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "tests/cpp/transport/peer_util.h"
#include "transfer/transport/nccl_transport.h"

using namespace relaykv;  // NOLINT: a tiny executable
using relaykv::testing::FailToParent;
using relaykv::testing::RecvFrame;
using relaykv::testing::SendFrame;

namespace {

std::string Verify(const uint8_t* region, uint64_t bytes, const std::string& note) {
  std::istringstream in(note);
  std::string verb;
  uint64_t off = 0, len = 0;
  uint32_t seed = 0;
  in >> verb >> off >> len >> seed;
  if (off > bytes || len > bytes - off) return "bad request";
  std::vector<uint8_t> host(len);
  // The bytes arrived on the transport's own stream, which the notification
  // followed; the region is otherwise idle.
  if (cudaError_t e = cudaMemcpy(host.data(), region + off, len, cudaMemcpyDeviceToHost);
      e != cudaSuccess) {
    return std::string("error cudaMemcpy: ") + cudaGetErrorString(e);
  }
  const int64_t bad = relaykv::testing::CheckPattern(host.data(), len, off, seed);
  return bad < 0 ? "ok" : "bad " + std::to_string(bad);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s <fd> <bytes> <hostid>\n", argv[0]);
    return 64;
  }
  const int fd = std::atoi(argv[1]);
  const uint64_t bytes = std::strtoull(argv[2], nullptr, 10);
  ::setenv("NCCL_HOSTID", argv[3], 1);
  ::setenv("NCCL_NET", "Socket", 1);

  auto transport = NcclTransport::Create();
  if (!transport.ok()) return FailToParent(fd, transport.status());
  uint8_t* region = nullptr;
  if (cudaError_t e = cudaMalloc(reinterpret_cast<void**>(&region), bytes); e != cudaSuccess) {
    return FailToParent(fd, Unavailable(std::string("cudaMalloc: ") + cudaGetErrorString(e)));
  }
  std::unique_ptr<uint8_t, decltype(&cudaFree)> owned(region, &cudaFree);
  {
    std::vector<uint8_t> host(bytes);
    relaykv::testing::FillPattern(host.data(), bytes, 0, 7);
    if (cudaMemcpy(region, host.data(), bytes, cudaMemcpyHostToDevice) != cudaSuccess) {
      return FailToParent(fd, Internal("fill failed"));
    }
  }
  auto reg = (*transport)->RegisterMemory(region, bytes, MemoryKind::kCudaDevice);
  if (!reg.ok()) return FailToParent(fd, reg.status());
  auto addr = (*transport)->LocalAddress();
  if (!addr.ok()) return FailToParent(fd, addr.status());
  if (!SendFrame(fd, "OK").ok() || !SendFrame(fd, *addr).ok() ||
      !SendFrame(fd, (*reg)->descriptor()).ok()) {
    return 3;
  }
  while (true) {
    auto note = (*transport)->WaitNotification(std::chrono::milliseconds(1));
    if (note.ok()) {
      const std::string reply =
          note->rfind("verify ", 0) == 0 ? Verify(region, bytes, *note) : "got " + *note;
      if (!SendFrame(fd, reply).ok()) return 5;
      continue;
    }
    pollfd pfd{fd, POLLIN, 0};
    if (::poll(&pfd, 1, 0) > 0) {
      auto cmd = RecvFrame(fd, std::chrono::seconds(1));
      if (!cmd.ok() || *cmd == "exit") break;
      if (*cmd == "peers") {
        if (!SendFrame(fd, std::to_string((*transport)->served_peers())).ok()) return 7;
      } else if (cmd->rfind("verify ", 0) == 0) {
        if (!SendFrame(fd, Verify(region, bytes, *cmd)).ok()) return 8;
      }
    }
  }
  return 0;
}
