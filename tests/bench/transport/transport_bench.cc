// Transport bandwidth and fixed cost between two processes on loopback.
//
// For 1 MB, 16 MB and 256 MB it reports, in one run:
//   raw memcpy (one process)       the ceiling for any same-host copy;
//   raw TCP socket copy            a child process receives the bytes over
//                                  127.0.0.1 and acks; the ceiling for tcp;
//   UCX write / read, tcp and shm  one-sided put/get into a transport_peer
//                                  child's registered region;
// and, per UCX wire, the fixed cost of a 4 KB record: write + notify
// (flush, active message) + the peer's reply, median µs.
// One JSON object per line on stdout.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "bench_util.h"
#include "tests/cpp/transport/peer_util.h"
#include "transfer/store/segment_allocator.h"
#include "transfer/transport/ucx_transport.h"

namespace relaykv {
namespace {

using bench::JsonLine;
using bench::Median;
using bench::NowSeconds;

constexpr uint64_t kSizes[] = {1ull << 20, 16ull << 20, 256ull << 20};
constexpr uint64_t kMax = 256ull << 20;

int Reps(uint64_t size) { return size <= (1u << 20) ? 40 : size <= (16u << 20) ? 10 : 3; }

void Report(const char* path, const char* op, uint64_t size, const std::vector<double>& secs) {
  const double s = Median(secs);
  JsonLine("transport")
      .Str("path", path)
      .Str("op", op)
      .Int("bytes", static_cast<int64_t>(size))
      .Int("reps", static_cast<int64_t>(secs.size()))
      .Num("median_ms", s * 1e3)
      .Num("gbps", static_cast<double>(size) / s / 1e9)
      .Print();
}

std::unique_ptr<Segment> Buffer(uint64_t bytes) {
  auto s = Segment::Create(bytes, 4096, MemoryKind::kHost, /*populate=*/true);
  if (!s.ok()) {
    std::fprintf(stderr, "%s\n", s.status().ToString().c_str());
    std::exit(1);
  }
  return std::move(*s);
}

void BenchMemcpy(uint8_t* src, uint8_t* dst) {
  for (uint64_t size : kSizes) {
    std::vector<double> t;
    std::memcpy(dst, src, size);  // warm
    for (int i = 0; i < Reps(size); ++i) {
      const double t0 = NowSeconds();
      std::memcpy(dst, src, size);
      bench::DoNotOptimize(dst[size - 1]);
      t.push_back(NowSeconds() - t0);
    }
    Report("memcpy", "copy", size, t);
  }
}

// Runs before any UCX state exists, so forking is plain.
void BenchRawTcp(const uint8_t* src) {
  int lfd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t alen = sizeof(a);
  if (::bind(lfd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 || ::listen(lfd, 1) != 0 ||
      ::getsockname(lfd, reinterpret_cast<sockaddr*>(&a), &alen) != 0) {
    std::perror("raw tcp listen");
    return;
  }
  pid_t pid = ::fork();
  if (pid == 0) {  // sink: read framed payloads, ack each with one byte
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) _exit(1);
    std::vector<uint8_t> sink(kMax);
    while (true) {
      uint64_t n = 0;
      if (!testing::ReadExact(fd, &n, sizeof(n),
                              std::chrono::steady_clock::now() + std::chrono::seconds(30))
               .ok() ||
          n == 0) {
        _exit(0);
      }
      if (!testing::ReadExact(fd, sink.data(), n,
                              std::chrono::steady_clock::now() + std::chrono::seconds(30))
               .ok()) {
        _exit(2);
      }
      const char ack = 1;
      if (!testing::WriteAll(fd, &ack, 1)) _exit(3);
    }
  }
  int fd = ::accept(lfd, nullptr, nullptr);
  ::close(lfd);
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  for (uint64_t size : kSizes) {
    std::vector<double> t;
    for (int i = 0; i < Reps(size) + 1; ++i) {
      const double t0 = NowSeconds();
      char ack = 0;
      testing::WriteAll(fd, &size, sizeof(size));
      testing::WriteAll(fd, src, size);
      if (!testing::ReadExact(fd, &ack, 1,
                              std::chrono::steady_clock::now() + std::chrono::seconds(30))
               .ok()) {
        std::fprintf(stderr, "raw tcp: no ack\n");
        break;
      }
      if (i > 0) t.push_back(NowSeconds() - t0);  // first one warms the socket buffers
    }
    Report("raw_tcp", "copy", size, t);
  }
  const uint64_t zero = 0;
  testing::WriteAll(fd, &zero, sizeof(zero));
  ::close(fd);
  ::waitpid(pid, nullptr, 0);
}

void BenchUcx(const char* path, const char* tls, bool peer_errors, uint8_t* buf) {
  auto transport = UcxTransport::Create(UcxTransportOptions::WithTls(tls, peer_errors));
  auto peer = testing::PeerProcess::Spawn(RELAYKV_TRANSPORT_PEER, tls, kMax, peer_errors);
  if (!transport.ok() || !peer.ok()) {
    JsonLine("transport")
        .Str("path", path)
        .Str("error", transport.ok() ? peer.status().ToString() : transport.status().ToString())
        .Print();
    return;
  }
  (void)(*peer)->Send(*(*transport)->LocalAddress());
  auto remote = RemoteDescriptor::Parse((*peer)->descriptor());
  auto ep = (*transport)->Connect((*peer)->address());
  if (!remote.ok() || !ep.ok()) {
    JsonLine("transport").Str("path", path).Str("error", ep.status().ToString()).Print();
    return;
  }
  // Registering the source too lets UCX use zero-copy without a lookup per op.
  auto local_reg = (*transport)->RegisterMemory(buf, kMax, MemoryKind::kHost);
  const auto timeout = std::chrono::seconds(30);
  for (const char* op : {"write", "read"}) {
    const bool write = std::strcmp(op, "write") == 0;
    for (uint64_t size : kSizes) {
      std::vector<double> t;
      for (int i = 0; i < Reps(size) + 1; ++i) {
        const double t0 = NowSeconds();
        auto req = write ? (*ep)->Write(buf, size, *remote, 0) : (*ep)->Read(buf, size, *remote, 0);
        Status s = req.ok() ? (*req)->Wait(timeout) : req.status();
        if (s.ok() && write) {
          // A put is complete locally before it is visible remotely; flush so
          // the time covers delivery.
          auto f = (*ep)->Flush();
          s = f.ok() ? (*f)->Wait(timeout) : f.status();
        }
        if (!s.ok()) {
          JsonLine("transport").Str("path", path).Str("op", op).Str("error", s.ToString()).Print();
          return;
        }
        if (i > 0) t.push_back(NowSeconds() - t0);
      }
      Report(path, op, size, t);
    }
  }
  // Fixed cost of a small record: 4 KB write, notify, the peer's reply.
  std::vector<double> rtt;
  for (int i = 0; i < 300; ++i) {
    const double t0 = NowSeconds();
    auto w = (*ep)->Write(buf, 4096, *remote, 0);
    auto n = (*ep)->Notify("ping");
    Status s = w.ok() ? (*w)->Wait(timeout) : w.status();
    if (s.ok()) s = n.ok() ? (*n)->Wait(timeout) : n.status();
    auto pong = (*transport)->WaitNotification(timeout);
    if (!s.ok() || !pong.ok()) {
      JsonLine("transport")
          .Str("path", path)
          .Str("op", "rtt")
          .Str("error", s.ok() ? pong.status().ToString() : s.ToString())
          .Print();
      return;
    }
    if (i >= 20) rtt.push_back(NowSeconds() - t0);
  }
  JsonLine("transport")
      .Str("path", path)
      .Str("op", "write_notify_rtt")
      .Int("bytes", 4096)
      .Int("reps", static_cast<int64_t>(rtt.size()))
      .Num("p50_us", Median(rtt) * 1e6)
      .Num("p90_us", bench::Percentile(rtt, 0.9) * 1e6)
      .Print();
  ep->reset();
}

}  // namespace
}  // namespace relaykv

int main() {
  using namespace relaykv;  // NOLINT
  auto src = Buffer(kMax);
  auto dst = Buffer(kMax);
  testing::FillPattern(reinterpret_cast<uint8_t*>(src->base()), kMax, 0, 1);
  BenchMemcpy(reinterpret_cast<uint8_t*>(src->base()), reinterpret_cast<uint8_t*>(dst->base()));
  BenchRawTcp(reinterpret_cast<uint8_t*>(src->base()));
  dst.reset();
  BenchUcx("ucx_tcp", "tcp", true, reinterpret_cast<uint8_t*>(src->base()));
  BenchUcx("ucx_shm", "posix,sysv,cma", false, reinterpret_cast<uint8_t*>(src->base()));
  return 0;
}
