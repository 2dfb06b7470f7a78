// Copy baselines shared by the transfer benchmarks: memcpy and a raw TCP
// socket copy to a child process, measured in the same run as the thing
// compared with them (ratios are only meaningful side by side).
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <vector>

#include "bench_util.h"
#include "tests/cpp/transport/peer_util.h"
#include "transfer/store/segment_allocator.h"

namespace relaykv::bench {

inline constexpr uint64_t kSizes[] = {1ull << 20, 16ull << 20, 256ull << 20};
inline constexpr uint64_t kMax = 256ull << 20;

inline int Reps(uint64_t size) { return size <= (1u << 20) ? 40 : size <= (16u << 20) ? 10 : 3; }

// One JSON line for `bench_name` (the benchmark file it belongs to).
inline void Report(const char* bench_name, const char* path, const char* op, uint64_t size,
                   const std::vector<double>& secs) {
  const double s = Median(secs);
  JsonLine(bench_name)
      .Str("path", path)
      .Str("op", op)
      .Int("bytes", static_cast<int64_t>(size))
      .Int("reps", static_cast<int64_t>(secs.size()))
      .Num("median_ms", s * 1e3)
      .Num("gbps", static_cast<double>(size) / s / 1e9)
      .Print();
}

inline std::unique_ptr<Segment> Buffer(uint64_t bytes) {
  auto s = Segment::Create(bytes, 4096, MemoryKind::kHost, /*populate=*/true);
  if (!s.ok()) {
    std::fprintf(stderr, "%s\n", s.status().ToString().c_str());
    std::exit(1);
  }
  return std::move(*s);
}

inline void BenchMemcpy(const char* bench_name, uint8_t* src, uint8_t* dst) {
  for (uint64_t size : kSizes) {
    std::vector<double> t;
    std::memcpy(dst, src, size);  // warm
    for (int i = 0; i < Reps(size); ++i) {
      const double t0 = NowSeconds();
      std::memcpy(dst, src, size);
      bench::DoNotOptimize(dst[size - 1]);
      t.push_back(NowSeconds() - t0);
    }
    Report(bench_name, "memcpy", "copy", size, t);
  }
}

// Runs before any UCX state exists, so forking is plain.
inline void BenchRawTcp(const char* bench_name, const uint8_t* src) {
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
      if (!::relaykv::testing::ReadExact(
               fd, &n, sizeof(n), std::chrono::steady_clock::now() + std::chrono::seconds(30))
               .ok() ||
          n == 0) {
        _exit(0);
      }
      if (!::relaykv::testing::ReadExact(
               fd, sink.data(), n, std::chrono::steady_clock::now() + std::chrono::seconds(30))
               .ok()) {
        _exit(2);
      }
      const char ack = 1;
      if (!::relaykv::testing::WriteAll(fd, &ack, 1)) _exit(3);
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
      ::relaykv::testing::WriteAll(fd, &size, sizeof(size));
      ::relaykv::testing::WriteAll(fd, src, size);
      if (!::relaykv::testing::ReadExact(
               fd, &ack, 1, std::chrono::steady_clock::now() + std::chrono::seconds(30))
               .ok()) {
        std::fprintf(stderr, "raw tcp: no ack\n");
        break;
      }
      if (i > 0) t.push_back(NowSeconds() - t0);  // first one warms the socket buffers
    }
    Report(bench_name, "raw_tcp", "copy", size, t);
  }
  const uint64_t zero = 0;
  ::relaykv::testing::WriteAll(fd, &zero, sizeof(zero));
  ::close(fd);
  ::waitpid(pid, nullptr, 0);
}

}  // namespace relaykv::bench
