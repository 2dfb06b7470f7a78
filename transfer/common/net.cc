#include "transfer/common/net.h"

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>
#include <optional>

namespace relaykv::net {

using Clock = std::chrono::steady_clock;

void UniqueFd::reset() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

bool TokenEquals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  }
  return diff == 0;
}

namespace {
int RemainingMs(Clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  return left.count() < 0 ? 0 : static_cast<int>(left.count());
}
}  // namespace

Status WaitFd(int fd, short events, Clock::time_point deadline, std::string_view what) {
  for (;;) {
    pollfd p{fd, events, 0};
    const int r = ::poll(&p, 1, RemainingMs(deadline));
    if (r > 0) return Status::Ok();
    if (r == 0) return DeadlineExceeded(std::string(what) + ": timed out");
    if (errno != EINTR) return Unavailable(std::string(what) + ": poll: " + std::strerror(errno));
  }
}

Status SendAll(int fd, std::string_view data, Clock::time_point deadline) {
  while (!data.empty()) {
    const ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      data.remove_prefix(static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      RELAYKV_RETURN_IF_ERROR(WaitFd(fd, POLLOUT, deadline, "send"));
      continue;
    }
    return Unavailable(std::string("send: ") + (n < 0 ? std::strerror(errno) : "closed"));
  }
  return Status::Ok();
}

Status RecvExact(int fd, char* out, size_t n, Clock::time_point deadline,
                 std::chrono::microseconds spin) {
  std::optional<Clock::time_point> spin_until;
  while (n > 0) {
    const ssize_t r = ::recv(fd, out, n, MSG_DONTWAIT);
    if (r > 0) {
      out += r;
      n -= static_cast<size_t>(r);
      continue;
    }
    if (r == 0) return Unavailable("connection closed by peer");
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      if (spin.count() > 0) {
        const auto now = Clock::now();
        if (!spin_until) spin_until = std::min(now + spin, deadline);
        if (now < *spin_until) {
#if defined(__x86_64__) || defined(__i386__)
          __builtin_ia32_pause();
#endif
          continue;
        }
      }
      RELAYKV_RETURN_IF_ERROR(WaitFd(fd, POLLIN, deadline, "recv"));
      continue;
    }
    return Unavailable(std::string("recv: ") + std::strerror(errno));
  }
  return Status::Ok();
}

Status SplitHostPort(std::string_view host_port, std::string* host, uint16_t* port) {
  const size_t colon = host_port.rfind(':');
  if (colon == std::string_view::npos || colon == 0 || colon + 1 == host_port.size()) {
    return InvalidArgument("expected host:port, got '" + std::string(host_port) + "'");
  }
  unsigned long p = 0;
  for (char c : host_port.substr(colon + 1)) {
    if (c < '0' || c > '9' || p > 65535) {
      return InvalidArgument("bad port in '" + std::string(host_port) + "'");
    }
    p = p * 10 + static_cast<unsigned long>(c - '0');
  }
  if (p == 0 || p > 65535) return InvalidArgument("bad port in '" + std::string(host_port) + "'");
  *host = std::string(host_port.substr(0, colon));
  *port = static_cast<uint16_t>(p);
  return Status::Ok();
}

Result<int> ConnectTcp(std::string_view host_port, std::chrono::milliseconds timeout) {
  std::string host;
  uint16_t port = 0;
  RELAYKV_RETURN_IF_ERROR(SplitHostPort(host_port, &host, &port));
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const int gai = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res);
  if (gai != 0) {
    return Unavailable("resolve '" + host + "': " + ::gai_strerror(gai));
  }
  std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> guard(res, &::freeaddrinfo);
  UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (fd.get() < 0) return Internal(std::string("socket: ") + std::strerror(errno));
  if (::connect(fd.get(), res->ai_addr, res->ai_addrlen) != 0) {
    if (errno != EINPROGRESS) {
      return Unavailable("connect " + std::string(host_port) + ": " + std::strerror(errno));
    }
    RELAYKV_RETURN_IF_ERROR(
        WaitFd(fd.get(), POLLOUT, Clock::now() + timeout, "connect " + std::string(host_port)));
    int err = 0;
    socklen_t len = sizeof(err);
    ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0) {
      return Unavailable("connect " + std::string(host_port) + ": " + std::strerror(err));
    }
  }
  const int one = 1;
  ::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  return fd.release();
}

Result<UniqueFd> ListenTcp(std::string_view host_port, std::string* bound) {
  // Port 0 is allowed here (the kernel picks one), so not SplitHostPort.
  const size_t colon = host_port.rfind(':');
  if (colon == std::string_view::npos) {
    return InvalidArgument("listen address: expected host:port, got '" + std::string(host_port) +
                           "'");
  }
  std::string host(host_port.substr(0, colon));
  const std::string port_str(host_port.substr(colon + 1));
  char* end = nullptr;
  const unsigned long p = std::strtoul(port_str.c_str(), &end, 10);
  if (port_str.empty() || *end != '\0' || p > 65535) {
    return InvalidArgument("listen address: bad port in '" + std::string(host_port) + "'");
  }
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(p));
  if (host.empty() || host == "0.0.0.0" || host == "*") {
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    host = "0.0.0.0";
  } else if (::inet_pton(AF_INET, host.c_str(), &addr.sin_addr) != 1) {
    addrinfo hints{};
    hints.ai_family = AF_INET;
    addrinfo* res = nullptr;
    if (::getaddrinfo(host.c_str(), nullptr, &hints, &res) != 0 || res == nullptr) {
      return InvalidArgument("listen address: cannot resolve '" + host + "'");
    }
    addr.sin_addr = reinterpret_cast<sockaddr_in*>(res->ai_addr)->sin_addr;
    ::freeaddrinfo(res);
  }
  UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (fd.get() < 0) return Internal(std::string("socket: ") + std::strerror(errno));
  const int one = 1;
  ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    return Unavailable("bind " + std::string(host_port) + ": " + std::strerror(errno));
  }
  if (::listen(fd.get(), 128) != 0) {
    return Unavailable("listen " + std::string(host_port) + ": " + std::strerror(errno));
  }
  socklen_t len = sizeof(addr);
  ::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&addr), &len);
  *bound = host + ":" + std::to_string(ntohs(addr.sin_port));
  return fd;
}

std::string PrimaryIpv4() {
  ifaddrs* list = nullptr;
  if (::getifaddrs(&list) != 0) return "127.0.0.1";
  std::unique_ptr<ifaddrs, decltype(&::freeifaddrs)> guard(list, &::freeifaddrs);
  for (ifaddrs* i = list; i != nullptr; i = i->ifa_next) {
    if (i->ifa_addr == nullptr || i->ifa_addr->sa_family != AF_INET) continue;
    if ((i->ifa_flags & IFF_UP) == 0 || (i->ifa_flags & IFF_LOOPBACK) != 0) continue;
    char buf[INET_ADDRSTRLEN];
    const auto* sin = reinterpret_cast<const sockaddr_in*>(i->ifa_addr);
    if (::inet_ntop(AF_INET, &sin->sin_addr, buf, sizeof(buf)) != nullptr) return buf;
  }
  return "127.0.0.1";
}

}  // namespace relaykv::net
