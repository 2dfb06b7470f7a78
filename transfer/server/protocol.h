// Control protocol between store clients and a store server.
//
// Large records never travel here: a client reserves space over this
// channel, writes the record with one-sided transport operations into the
// server's registered segment, then seals it here; a reader leases a record
// here and reads it the same way. A small record rides inside one message
// (kPut, kRead), since each round trip here costs more than moving it (a
// loopback TCP round trip is tens of µs). Requests are answered in order, so
// a client may send one (kRelease) and read its reply later. The channel is a
// TCP stream of frames:
//
//   frame    := u32 body_length (little-endian, <= kMaxFrameBytes) body
//   request  := u8 Op, fields
//   response := u8 StatusCode, then the op's reply fields when OK, else a message
//
// Fields are little-endian integers and length-prefixed strings (u32 length).
// The first request on a connection must be kHello with the deployment token;
// everything a connection reserved or leased is dropped when it closes, so a
// dead client cannot pin memory.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "transfer/common/net.h"
#include "transfer/common/status.h"

namespace relaykv::wire {

// Version 2 added kPut and kRead; a version-2 server still serves version 1.
inline constexpr uint32_t kProtocolVersion = 2;
inline constexpr uint32_t kMinProtocolVersion = 1;
// Largest record carried inside a control message (kPut, kRead). Over UCX
// tcp, one message beats reserve + put + flush + seal up to a few MB (and
// loses nothing at 16 MB); a connection buffers at most one frame.
inline constexpr uint32_t kMaxInlineBytes = 4u << 20;
// Room for the other fields of a message.
inline constexpr uint32_t kMaxFrameBytes = kMaxInlineBytes + 4096;

enum class Op : uint8_t {
  kHello = 1,    // u32 version, str token, str client name
                 //   → str server name, str transport, str transport address,
                 //     u32 n, n × str segment descriptor, u64 capacity
  kReserve = 2,  // str ns, u64 id, u64 size, u32 ttl_ms (0: server default)
                 //   → u64 handle, u32 segment, u64 offset
                 //   AlreadyExists: an identical record is already stored
  kSeal = 3,     // u64 handle → (nothing). The server verifies the record first and
                 //   answers once the directory lists it (Unavailable: stored, but
                 //   the directory is unreachable; it is listed when it is back).
  kAbort = 4,    // u64 handle → (nothing)
  kLease = 5,    // str ns, u64 id → u64 lease, u32 segment, u64 offset, u64 size
  kRelease = 6,  // u64 lease → (nothing)
  kDelete = 7,   // str ns, u64 id → (nothing)
  kStats = 8,    // → str "key value" lines
  // Version 2. A small record costs one round trip this way, against two
  // (reserve, seal) plus the one-sided write and its flush.
  kPut = 9,  // str ns, u64 id, u32 ttl_ms, str record (<= kMaxInlineBytes)
             //   → (nothing), answered as kSeal is; AlreadyExists as kReserve
  // Version 2: kLease, or the record itself when it is small enough.
  kRead = 10,  // str ns, u64 id, u64 inline_limit
               //   → u8 form; form 0: u64 lease, u32 segment, u64 offset,
               //     u64 size (then kRelease); form 1: str record (no lease)
};
// kRead's reply forms.
inline constexpr uint8_t kReadLeased = 0;
inline constexpr uint8_t kReadInline = 1;
std::string_view OpName(Op op);

class Writer {
 public:
  Writer& U8(uint8_t v);
  Writer& U32(uint32_t v);
  Writer& U64(uint64_t v);
  Writer& Str(std::string_view v);
  // Body → frame (length prefix added). The rvalue form hands over the
  // buffer without copying it (records travel in frames).
  std::string Frame() const&;
  std::string Frame() &&;

 private:
  // The frame being built: room for the length prefix, then the body.
  std::string frame_ = std::string(sizeof(uint32_t), '\0');
};

// Reads fields off a body; any read past the end poisons the reader and
// Finish() returns InvalidArgument (so handlers check once, at the end).
class Reader {
 public:
  explicit Reader(std::string_view body) : rest_(body) {}
  uint8_t U8();
  uint32_t U32();
  uint64_t U64();
  std::string Str();
  // A length-prefixed field left in place: valid while the body is.
  std::string_view View();
  // OK when every read fit and nothing is left over.
  Status Finish(std::string_view what) const;
  bool ok() const { return ok_; }

 private:
  bool Take(void* out, size_t n);
  std::string_view rest_;
  bool ok_ = true;
};

// A response body carrying `status` (OK bodies are built with OkReply()).
std::string ErrorReply(const Status& status);
Writer OkReply();
// Splits a response body: OK → the reply fields; otherwise the carried error
// (with `context` in front, and the code the server sent).
Result<std::string> ParseReply(std::string_view body, std::string_view context);
// The same without copying the fields: the status, and then the fields of
// an OK body in place.
Status ReplyStatus(std::string_view body, std::string_view context);
inline std::string_view ReplyFields(std::string_view ok_body) { return ok_body.substr(1); }

// Blocking client-side framing on a connected socket; every call bounded by
// `timeout`. A closed or reset peer is Unavailable, a timeout DeadlineExceeded.
Status SendFrame(int fd, std::string_view frame, std::chrono::milliseconds timeout);
// `spin`: see net::RecvExact.
Result<std::string> RecvFrame(int fd, std::chrono::milliseconds timeout,
                              std::chrono::microseconds spin = std::chrono::microseconds(0));

// TCP helpers live in transfer/common/net.h; the wire names stay for callers.
using net::ConnectTcp;
using net::SplitHostPort;

}  // namespace relaykv::wire
