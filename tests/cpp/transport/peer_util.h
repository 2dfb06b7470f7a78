// Two-process plumbing for the transport tests and benchmark: a framed side
// channel over a socketpair (how address and descriptor blobs travel), the
// byte pattern both sides check, and a handle on the peer child process
// (transport_peer) that is killed and reaped on every path.
#pragma once

#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <ostream>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "transfer/common/status.h"

namespace relaykv::testing {

// Byte i of a region filled with `seed`; position-dependent so a shifted or
// partial copy is caught, not only a missing one.
inline uint8_t PatternByte(uint64_t i, uint32_t seed) {
  return static_cast<uint8_t>((i * 131u) ^ (i >> 9) ^ (seed * 0x9e3779b1u >> 7));
}
inline void FillPattern(uint8_t* p, uint64_t n, uint64_t base, uint32_t seed) {
  for (uint64_t i = 0; i < n; ++i) p[i] = PatternByte(base + i, seed);
}
// Index of the first wrong byte, or -1.
inline int64_t CheckPattern(const uint8_t* p, uint64_t n, uint64_t base, uint32_t seed) {
  for (uint64_t i = 0; i < n; ++i) {
    if (p[i] != PatternByte(base + i, seed)) return static_cast<int64_t>(i);
  }
  return -1;
}

inline bool WriteAll(int fd, const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

// Frame: u32 length, bytes.
inline Status SendFrame(int fd, std::string_view msg) {
  const uint32_t n = static_cast<uint32_t>(msg.size());
  if (!WriteAll(fd, &n, sizeof(n)) || !WriteAll(fd, msg.data(), msg.size())) {
    return Unavailable("side channel: send failed");
  }
  return Status::Ok();
}

inline Status ReadExact(int fd, void* data, size_t n,
                        std::chrono::steady_clock::time_point deadline) {
  char* p = static_cast<char*>(data);
  while (n > 0) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return DeadlineExceeded("side channel: read timed out");
    pollfd pfd{fd, POLLIN, 0};
    int pr = ::poll(&pfd, 1, static_cast<int>(left.count()));
    if (pr < 0 && errno == EINTR) continue;
    if (pr <= 0) continue;
    ssize_t r = ::read(fd, p, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return Unavailable("side channel: peer closed");
    p += r;
    n -= static_cast<size_t>(r);
  }
  return Status::Ok();
}

inline Result<std::string> RecvFrame(int fd, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  uint32_t n = 0;
  RELAYKV_RETURN_IF_ERROR(ReadExact(fd, &n, sizeof(n), deadline));
  if (n > (64u << 20)) return DataLoss("side channel: frame too large");
  std::string out(n, '\0');
  RELAYKV_RETURN_IF_ERROR(ReadExact(fd, out.data(), n, deadline));
  return out;
}

// A peer that cannot start tells its parent why ("ERR <status>") and exits 2.
inline int FailToParent(int fd, const Status& s) {
  (void)SendFrame(fd, "ERR " + s.ToString());
  return 2;
}

// One UCX configuration of the two-process tests: UCX_TLS and whether
// endpoints use peer error handling (shared memory needs it off).
struct UcxCase {
  const char* name;
  const char* tls;
  bool peer_errors;
  // The peer's region: "host" (registered mmap memory) or "ucx" (allocated
  // by UCX, which the initiator then copies through a mapping).
  const char* memory = "host";
  bool mapped() const { return std::string_view(memory) == "ucx"; }
};
inline void PrintTo(const UcxCase& c, std::ostream* os) {
  *os << c.name << " (UCX_TLS=" << c.tls << (c.mapped() ? ", peer memory from UCX)" : ")");
}

// The peer child: transport_peer <fd> <tls> <bytes> peer|nopeer host|cuda. It answers with frames
// "OK" (or "ERR <why>"), its transport address, its region's descriptor.
class PeerProcess {
 public:
  static Result<std::unique_ptr<PeerProcess>> Spawn(const std::string& exe, const std::string& tls,
                                                    uint64_t bytes, bool peer_errors = true,
                                                    const std::string& memory = "host") {
    return SpawnWith(exe, {tls, std::to_string(bytes), peer_errors ? "peer" : "nopeer", memory});
  }

  // Any peer executable that takes the socket's fd first, then `args`, and
  // answers with the same three frames.
  static Result<std::unique_ptr<PeerProcess>> SpawnWith(const std::string& exe,
                                                        const std::vector<std::string>& args) {
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) return Internal("socketpair failed");
    std::vector<std::string> argv_s{exe, std::to_string(sv[1])};
    argv_s.insert(argv_s.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (auto& a : argv_s) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_t pid = ::fork();
    if (pid < 0) return Internal("fork failed");
    if (pid == 0) {
      ::close(sv[0]);
      ::execv(exe.c_str(), argv.data());
      _exit(127);
    }
    ::close(sv[1]);
    std::unique_ptr<PeerProcess> p(new PeerProcess(pid, sv[0]));
    auto hello = RecvFrame(p->fd_, std::chrono::seconds(10));
    if (!hello.ok()) return hello.status().WithContext("peer did not start");
    if (hello->compare("OK") != 0) return Unavailable("peer failed to start: " + *hello);
    RELAYKV_ASSIGN_OR_RETURN(p->address_, RecvFrame(p->fd_, std::chrono::seconds(5)));
    RELAYKV_ASSIGN_OR_RETURN(p->descriptor_, RecvFrame(p->fd_, std::chrono::seconds(5)));
    return p;
  }

  ~PeerProcess() {
    if (pid_ > 0) {
      (void)SendFrame(fd_, "exit");
      // Give it a moment to close its endpoints cleanly, then make sure.
      for (int i = 0; i < 300 && !Reaped(); ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
      if (!Reaped()) {
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, nullptr, 0);
      }
    }
    ::close(fd_);
  }

  void Kill() {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

  Status Send(std::string_view msg) { return SendFrame(fd_, msg); }
  Result<std::string> Recv(std::chrono::milliseconds timeout) { return RecvFrame(fd_, timeout); }
  const std::string& address() const { return address_; }
  const std::string& descriptor() const { return descriptor_; }

 private:
  PeerProcess(pid_t pid, int fd) : pid_(pid), fd_(fd) {}
  bool Reaped() {
    if (pid_ <= 0) return true;
    if (::waitpid(pid_, nullptr, WNOHANG) == pid_) {
      pid_ = -1;
      return true;
    }
    return false;
  }

  pid_t pid_;
  int fd_;
  std::string address_;
  std::string descriptor_;
};

}  // namespace relaykv::testing
