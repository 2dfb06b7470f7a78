// Real child processes for tests that need them: a store server, a
// redis-server. Each child is SIGKILLed when its handle goes away, and by the
// kernel if the test process dies first (PR_SET_PDEATHSIG), so no test run
// leaves servers behind.
#pragma once

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

namespace relaykv::testing {

// A loopback port nobody listens on right now (bind to 0, read, close).
inline int FreeLoopbackPort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  int port = -1;
  socklen_t len = sizeof(addr);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  ::close(fd);
  return port;
}

class ChildProcess {
 public:
  ChildProcess() = default;
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  ~ChildProcess() { Kill(); }

  // Runs argv[0] (a path) with its stdout on a pipe this handle reads, and
  // stderr inherited (so a failing child explains itself in the test log).
  ::testing::AssertionResult Start(const std::vector<std::string>& argv,
                                   const std::vector<std::pair<std::string, std::string>>& env = {},
                                   bool quiet = false) {
    int out[2];
    if (::pipe2(out, O_CLOEXEC) != 0) return ::testing::AssertionFailure() << "pipe failed";
    pid_ = ::fork();
    if (pid_ < 0) return ::testing::AssertionFailure() << "fork failed";
    if (pid_ == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      ::dup2(out[1], STDOUT_FILENO);
      if (quiet) {
        // Nobody reads a quiet child's output: a full pipe would stall it.
        const int devnull = ::open("/dev/null", O_WRONLY);
        if (devnull >= 0) {
          ::dup2(devnull, STDOUT_FILENO);
          ::dup2(devnull, STDERR_FILENO);
        }
      }
      for (const auto& [k, v] : env) ::setenv(k.c_str(), v.c_str(), 1);
      std::vector<char*> args;
      for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      ::execv(args[0], args.data());
      _exit(127);
    }
    ::close(out[1]);
    out_ = out[0];
    return ::testing::AssertionSuccess();
  }

  // Reads stdout until a line starting with `prefix`; nullopt on timeout or EOF.
  std::optional<std::string> WaitLine(
      std::string_view prefix, std::chrono::milliseconds timeout = std::chrono::seconds(20)) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      for (size_t nl; (nl = buf_.find('\n')) != std::string::npos;) {
        std::string line = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        if (line.starts_with(prefix)) return line;
      }
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0 || out_ < 0) return std::nullopt;
      pollfd p{out_, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
      char chunk[4096];
      const ssize_t n = ::read(out_, chunk, sizeof(chunk));
      if (n <= 0) return std::nullopt;
      buf_.append(chunk, static_cast<size_t>(n));
    }
  }

  void Signal(int sig) {
    if (pid_ > 0) ::kill(pid_, sig);
  }
  // Waits for exit; the exit status (as waitpid reports it) or nullopt on timeout.
  std::optional<int> Wait(std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (pid_ > 0) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return status;
      }
      if (std::chrono::steady_clock::now() >= deadline) return std::nullopt;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return std::nullopt;
  }
  void Kill() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
      pid_ = -1;
    }
    if (out_ >= 0) ::close(out_);
    out_ = -1;
    buf_.clear();
  }
  bool running() const { return pid_ > 0; }

 private:
  pid_t pid_ = -1;
  int out_ = -1;
  std::string buf_;
};

inline bool RedisPings(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return false;
  timeval tv{0, 200000};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  bool ok = false;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      ::send(fd, "PING\r\n", 6, MSG_NOSIGNAL) == 6) {
    char buf[16] = {};
    ok = ::recv(fd, buf, sizeof(buf) - 1, 0) >= 5 && std::string(buf).starts_with("+PONG");
  }
  ::close(fd);
  return ok;
}

// A real redis-server on loopback, without persistence (a restart loses
// everything, like a crashed Redis without a volume).
class RedisServer {
 public:
  static std::string Path() {
    const char* env = std::getenv("RELAYKV_REDIS_SERVER");
    return env != nullptr ? env : "/usr/bin/redis-server";
  }
  static std::optional<std::string> MissingReason() {
    if (::access(Path().c_str(), X_OK) != 0) {
      return "redis-server not found at " + Path() +
             " (install redis-server or set RELAYKV_REDIS_SERVER)";
    }
    return std::nullopt;
  }

  // Starts on `port` (a free one when 0) and waits until it answers PING.
  ::testing::AssertionResult Start(int port = 0) {
    if (port == 0) port = FreeLoopbackPort();
    if (port <= 0) return ::testing::AssertionFailure() << "no free loopback port";
    port_ = port;
    auto started = proc_.Start({Path(), "--save", "", "--appendonly", "no", "--port",
                                std::to_string(port), "--bind", "127.0.0.1"},
                               {}, /*quiet=*/true);
    if (!started) return started;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (std::chrono::steady_clock::now() < deadline) {
      if (RedisPings(port)) return ::testing::AssertionSuccess();
      if (proc_.Wait(std::chrono::milliseconds(0)).has_value()) {
        return ::testing::AssertionFailure()
               << "redis-server exited at start (port " << port << " taken?)";
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    proc_.Kill();
    return ::testing::AssertionFailure() << "redis-server did not answer PING within 10 s";
  }
  void Kill() { proc_.Kill(); }
  void Signal(int sig) { proc_.Signal(sig); }
  int port() const { return port_; }
  std::string url() const { return "redis://127.0.0.1:" + std::to_string(port_) + "/0"; }

 private:
  ChildProcess proc_;
  int port_ = 0;
};

}  // namespace relaykv::testing
