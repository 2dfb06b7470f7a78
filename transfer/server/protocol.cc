#include "transfer/server/protocol.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>

namespace relaykv::wire {
namespace {

using Clock = std::chrono::steady_clock;

int RemainingMs(Clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  return left.count() < 0 ? 0 : static_cast<int>(left.count());
}

// Waits for `events` on fd until the deadline.
Status WaitFd(int fd, short events, Clock::time_point deadline, std::string_view what) {
  for (;;) {
    pollfd p{fd, events, 0};
    const int r = ::poll(&p, 1, RemainingMs(deadline));
    if (r > 0) return Status::Ok();
    if (r == 0) return DeadlineExceeded(std::string(what) + ": timed out");
    if (errno != EINTR) return Unavailable(std::string(what) + ": poll: " + std::strerror(errno));
  }
}

}  // namespace

std::string_view OpName(Op op) {
  switch (op) {
    case Op::kHello:
      return "hello";
    case Op::kReserve:
      return "reserve";
    case Op::kSeal:
      return "seal";
    case Op::kAbort:
      return "abort";
    case Op::kLease:
      return "lease";
    case Op::kRelease:
      return "release";
    case Op::kDelete:
      return "delete";
    case Op::kStats:
      return "stats";
  }
  return "unknown";
}

Writer& Writer::U8(uint8_t v) {
  body_.push_back(static_cast<char>(v));
  return *this;
}
Writer& Writer::U32(uint32_t v) {
  body_.append(reinterpret_cast<const char*>(&v), sizeof(v));
  return *this;
}
Writer& Writer::U64(uint64_t v) {
  body_.append(reinterpret_cast<const char*>(&v), sizeof(v));
  return *this;
}
Writer& Writer::Str(std::string_view v) {
  U32(static_cast<uint32_t>(v.size()));
  body_.append(v);
  return *this;
}
std::string Writer::Frame() const {
  std::string out;
  const auto n = static_cast<uint32_t>(body_.size());
  out.reserve(sizeof(n) + body_.size());
  out.append(reinterpret_cast<const char*>(&n), sizeof(n));
  out.append(body_);
  return out;
}

bool Reader::Take(void* out, size_t n) {
  if (!ok_ || rest_.size() < n) {
    ok_ = false;
    std::memset(out, 0, n);
    return false;
  }
  std::memcpy(out, rest_.data(), n);
  rest_.remove_prefix(n);
  return true;
}
uint8_t Reader::U8() {
  uint8_t v;
  Take(&v, sizeof(v));
  return v;
}
uint32_t Reader::U32() {
  uint32_t v;
  Take(&v, sizeof(v));
  return v;
}
uint64_t Reader::U64() {
  uint64_t v;
  Take(&v, sizeof(v));
  return v;
}
std::string Reader::Str() {
  const uint32_t n = U32();
  if (!ok_ || rest_.size() < n) {
    ok_ = false;
    return {};
  }
  std::string out(rest_.substr(0, n));
  rest_.remove_prefix(n);
  return out;
}
Status Reader::Finish(std::string_view what) const {
  if (!ok_) return InvalidArgument(std::string(what) + ": message too short");
  if (!rest_.empty()) {
    return InvalidArgument(std::string(what) + ": " + std::to_string(rest_.size()) +
                           " unexpected trailing bytes");
  }
  return Status::Ok();
}

std::string ErrorReply(const Status& status) {
  Writer w;
  w.U8(static_cast<uint8_t>(status.ok() ? StatusCode::kInternal : status.code()));
  w.Str(status.ok() ? "error reply without an error" : status.message());
  return w.Frame();
}

Writer OkReply() {
  Writer w;
  w.U8(static_cast<uint8_t>(StatusCode::kOk));
  return w;
}

Result<std::string> ParseReply(std::string_view body, std::string_view context) {
  if (body.empty()) return InvalidArgument(std::string(context) + ": empty reply");
  const auto code = static_cast<uint8_t>(body[0]);
  if (code == static_cast<uint8_t>(StatusCode::kOk)) return std::string(body.substr(1));
  Reader r(body.substr(1));
  std::string msg = r.Str();
  if (!r.Finish("error reply").ok() || code > static_cast<uint8_t>(StatusCode::kAborted)) {
    return InvalidArgument(std::string(context) + ": malformed error reply");
  }
  return Status(static_cast<StatusCode>(code), std::string(context) + ": server: " + msg);
}

Status SendFrame(int fd, std::string_view frame, std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  while (!frame.empty()) {
    const ssize_t n = ::send(fd, frame.data(), frame.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      frame.remove_prefix(static_cast<size_t>(n));
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

namespace {
Status RecvExact(int fd, char* out, size_t n, Clock::time_point deadline) {
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
      RELAYKV_RETURN_IF_ERROR(WaitFd(fd, POLLIN, deadline, "recv"));
      continue;
    }
    return Unavailable(std::string("recv: ") + std::strerror(errno));
  }
  return Status::Ok();
}
}  // namespace

Result<std::string> RecvFrame(int fd, std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  uint32_t n = 0;
  RELAYKV_RETURN_IF_ERROR(RecvExact(fd, reinterpret_cast<char*>(&n), sizeof(n), deadline));
  if (n > kMaxFrameBytes) {
    return InvalidArgument("frame of " + std::to_string(n) + " bytes exceeds the limit");
  }
  std::string body(n, '\0');
  RELAYKV_RETURN_IF_ERROR(RecvExact(fd, body.data(), n, deadline));
  return body;
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
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return Internal(std::string("socket: ") + std::strerror(errno));
  auto close_on_error = [fd](Status s) {
    ::close(fd);
    return s;
  };
  if (::connect(fd, res->ai_addr, res->ai_addrlen) != 0) {
    if (errno != EINPROGRESS) {
      return close_on_error(
          Unavailable("connect " + std::string(host_port) + ": " + std::strerror(errno)));
    }
    Status w = WaitFd(fd, POLLOUT, Clock::now() + timeout, "connect " + std::string(host_port));
    if (!w.ok()) return close_on_error(w);
    int err = 0;
    socklen_t len = sizeof(err);
    ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0) {
      return close_on_error(
          Unavailable("connect " + std::string(host_port) + ": " + std::strerror(err)));
    }
  }
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  return fd;
}

}  // namespace relaykv::wire
