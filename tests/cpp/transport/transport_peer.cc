// transport_peer <fd> <tls> <bytes> peer|nopeer: the target side of the two-process
// transport tests and benchmark. Registers a region of <bytes> bytes filled
// with PatternByte(i, 7), hands its address and descriptor to the parent over
// the socket <fd>, receives the parent's address, then serves: it drives UCX
// progress (tcp RMA is emulated by the target's CPU) and answers
// notifications over UCX:
//   "verify <offset> <length> <seed>" -> "ok" or "bad <index>"
//   "ping"                             -> "pong"
// It exits when the parent sends "exit" or closes the socket.
#include <poll.h>

#include <cstdio>
#include <cstdlib>
#include <sstream>

#include "tests/cpp/transport/peer_util.h"
#include "transfer/store/segment_allocator.h"
#include "transfer/transport/ucx_transport.h"

using namespace relaykv;  // NOLINT: a tiny executable
using relaykv::testing::RecvFrame;
using relaykv::testing::SendFrame;

namespace {

int Fail(int fd, const Status& s) {
  (void)SendFrame(fd, "ERR " + s.ToString());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s <fd> <tls> <bytes> peer|nopeer\n", argv[0]);
    return 64;
  }
  const int fd = std::atoi(argv[1]);
  const std::string tls = argv[2];
  const uint64_t bytes = std::strtoull(argv[3], nullptr, 10);

  auto transport =
      UcxTransport::Create(UcxTransportOptions::WithTls(tls, std::string(argv[4]) == "peer"));
  if (!transport.ok()) return Fail(fd, transport.status());
  auto segment = Segment::Create(bytes, 4096, MemoryKind::kHost, /*populate=*/true);
  if (!segment.ok()) return Fail(fd, segment.status());
  auto* base = reinterpret_cast<uint8_t*>((*segment)->base());
  relaykv::testing::FillPattern(base, bytes, 0, 7);
  auto reg = (*transport)->RegisterMemory(base, bytes, MemoryKind::kHost);
  if (!reg.ok()) return Fail(fd, reg.status());
  auto addr = (*transport)->LocalAddress();
  if (!addr.ok()) return Fail(fd, addr.status());
  if (!SendFrame(fd, "OK").ok() || !SendFrame(fd, *addr).ok() ||
      !SendFrame(fd, (*reg)->descriptor()).ok()) {
    return 3;
  }
  auto parent_addr = RecvFrame(fd, std::chrono::seconds(10));
  if (!parent_addr.ok()) return 4;
  std::unique_ptr<Endpoint> back;  // connected on the first reply

  while (true) {
    if (!(*transport)->Progress()) std::this_thread::yield();
    auto note = (*transport)->WaitNotification(std::chrono::milliseconds(0));
    if (note.ok()) {
      std::string reply;
      if (*note == "ping") {
        reply = "pong";
      } else {
        std::istringstream in(*note);
        std::string verb;
        uint64_t off = 0, len = 0;
        uint32_t seed = 0;
        in >> verb >> off >> len >> seed;
        if (verb != "verify" || off + len > bytes) {
          reply = "bad request";
        } else {
          int64_t bad = relaykv::testing::CheckPattern(base + off, len, off, seed);
          reply = bad < 0 ? "ok" : "bad " + std::to_string(bad);
        }
      }
      if (!back) {
        auto ep = (*transport)->Connect(*parent_addr);
        if (!ep.ok()) return 5;
        back = std::move(*ep);
      }
      auto req = back->Notify(reply);
      if (!req.ok() || !(*req)->Wait(std::chrono::seconds(5)).ok()) return 6;
      continue;
    }
    pollfd pfd{fd, POLLIN, 0};
    if (::poll(&pfd, 1, 0) > 0) {
      auto cmd = RecvFrame(fd, std::chrono::seconds(1));
      if (!cmd.ok() || *cmd == "exit") break;
    }
  }
  return 0;
}
