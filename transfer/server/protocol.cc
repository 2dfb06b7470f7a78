#include "transfer/server/protocol.h"

#include <cstring>
#include <memory>

#include "transfer/common/net.h"

namespace relaykv::wire {

using Clock = std::chrono::steady_clock;

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
    case Op::kPut:
      return "put";
    case Op::kRead:
      return "read";
  }
  return "unknown";
}

Writer& Writer::U8(uint8_t v) {
  frame_.push_back(static_cast<char>(v));
  return *this;
}
Writer& Writer::U32(uint32_t v) {
  frame_.append(reinterpret_cast<const char*>(&v), sizeof(v));
  return *this;
}
Writer& Writer::U64(uint64_t v) {
  frame_.append(reinterpret_cast<const char*>(&v), sizeof(v));
  return *this;
}
Writer& Writer::Str(std::string_view v) {
  U32(static_cast<uint32_t>(v.size()));
  frame_.append(v);
  return *this;
}
std::string Writer::Frame() const& { return Writer(*this).Frame(); }
std::string Writer::Frame() && {
  const auto n = static_cast<uint32_t>(frame_.size() - sizeof(uint32_t));
  std::memcpy(frame_.data(), &n, sizeof(n));
  return std::move(frame_);
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
std::string Reader::Str() { return std::string(View()); }
std::string_view Reader::View() {
  const uint32_t n = U32();
  if (!ok_ || rest_.size() < n) {
    ok_ = false;
    return {};
  }
  std::string_view out = rest_.substr(0, n);
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
  return std::move(w).Frame();
}

Writer OkReply() {
  Writer w;
  w.U8(static_cast<uint8_t>(StatusCode::kOk));
  return w;
}

Status ReplyStatus(std::string_view body, std::string_view context) {
  if (body.empty()) return InvalidArgument(std::string(context) + ": empty reply");
  const auto code = static_cast<uint8_t>(body[0]);
  if (code == static_cast<uint8_t>(StatusCode::kOk)) return Status::Ok();
  Reader r(body.substr(1));
  std::string msg = r.Str();
  if (!r.Finish("error reply").ok() || code > static_cast<uint8_t>(StatusCode::kAborted)) {
    return InvalidArgument(std::string(context) + ": malformed error reply");
  }
  return Status(static_cast<StatusCode>(code), std::string(context) + ": server: " + msg);
}

Result<std::string> ParseReply(std::string_view body, std::string_view context) {
  RELAYKV_RETURN_IF_ERROR(ReplyStatus(body, context));
  return std::string(ReplyFields(body));
}

Status SendFrame(int fd, std::string_view frame, std::chrono::milliseconds timeout) {
  return net::SendAll(fd, frame, Clock::now() + timeout);
}

Result<std::string> RecvFrame(int fd, std::chrono::milliseconds timeout,
                              std::chrono::microseconds spin) {
  const auto deadline = Clock::now() + timeout;
  uint32_t n = 0;
  RELAYKV_RETURN_IF_ERROR(
      net::RecvExact(fd, reinterpret_cast<char*>(&n), sizeof(n), deadline, spin));
  if (n > kMaxFrameBytes) {
    return InvalidArgument("frame of " + std::to_string(n) + " bytes exceeds the limit");
  }
  std::string body(n, '\0');
  RELAYKV_RETURN_IF_ERROR(net::RecvExact(fd, body.data(), n, deadline));
  return body;
}

}  // namespace relaykv::wire
