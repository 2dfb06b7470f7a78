// Transport: moves bytes between registered memory regions, in the NIXL spirit.
//
//   1. The target registers memory (RegisterMemory) and sends the packed
//      descriptor blob (address, length, kind, access key) to the initiator
//      over any side channel, together with its transport address
//      (LocalAddress()).
//   2. The initiator connects to that address (Connect) and issues one-sided
//      Read/Write against the descriptor; the target's CPU is not involved in
//      the data path beyond driving its transport's progress.
//   3. Notify() flushes every earlier operation on the endpoint and then sends
//      a small message; when the target sees it (WaitNotification), the bytes
//      written before it are in its memory.
//
// Every wait takes a timeout and turns into DeadlineExceeded; a dead peer turns
// into Unavailable. Nothing here blocks without a deadline.
//
// Threading: a Transport and everything it handed out are driven by one thread
// at a time (the caller serialises). Progress happens only inside calls
// (Wait, WaitNotification, Progress), so a target that only serves one-sided
// operations must call Progress() or WaitNotification() regularly: transports
// without hardware RMA (tcp) emulate it in software on the target.
//
// Lifetimes: requests, endpoints and registrations keep the transport's
// internals alive, so they may be destroyed in any order. A local buffer
// passed to Read/Write must stay valid until its request completed, or until
// the endpoint is destroyed (which cancels whatever is in flight).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "transfer/common/status.h"
#include "transfer/store/segment_allocator.h"  // MemoryKind

namespace relaykv {

// What a peer needs to address a registered region: parsed form of the blob
// MemoryRegistration::descriptor() returns. The access key is opaque and
// transport-specific (UCX packed rkey; a registration id for LocalTransport).
struct RemoteDescriptor {
  uint64_t addr = 0;
  uint64_t length = 0;
  MemoryKind kind = MemoryKind::kHost;
  std::string access_key;

  // Blob layout (little-endian): magic "RKVD", u16 version, u8 kind, u8 pad,
  // u64 addr, u64 length, u32 key length, key bytes. Exact length required.
  std::string Pack() const;
  // Malformed blob (wrong magic, version, kind, length) is InvalidArgument.
  static Result<RemoteDescriptor> Parse(std::string_view blob);
};

// A registered region; unregisters in the destructor.
class MemoryRegistration {
 public:
  virtual ~MemoryRegistration() = default;
  void* addr() const { return addr_; }
  size_t length() const { return length_; }
  MemoryKind kind() const { return kind_; }
  // Packed RemoteDescriptor to hand to peers.
  const std::string& descriptor() const { return descriptor_; }

 protected:
  MemoryRegistration(void* addr, size_t length, MemoryKind kind, std::string descriptor)
      : addr_(addr), length_(length), kind_(kind), descriptor_(std::move(descriptor)) {}

 private:
  void* addr_;
  size_t length_;
  MemoryKind kind_;
  std::string descriptor_;
};

// One in-flight operation. Destroying an unfinished request does not wait
// for it; the operation may still complete or fail later (see Lifetimes).
class TransferRequest {
 public:
  virtual ~TransferRequest() = default;
  // Drives progress until the operation completes or `timeout` passes.
  // OK, the operation's error (Unavailable for a dead peer), or
  // DeadlineExceeded (the operation is still in flight; Wait again or drop
  // the endpoint).
  virtual Status Wait(std::chrono::milliseconds timeout) = 0;
  // One round of progress; true when the operation finished (then Wait(0)
  // returns its status).
  virtual bool Test() = 0;
};

// A connection to one peer transport.
class Endpoint {
 public:
  virtual ~Endpoint() = default;
  // Copies `length` bytes from `local` to remote.addr + offset.
  // offset + length beyond remote.length is InvalidArgument.
  virtual Result<std::unique_ptr<TransferRequest>> Write(const void* local, size_t length,
                                                         const RemoteDescriptor& remote,
                                                         uint64_t offset) = 0;
  // Copies `length` bytes from remote.addr + offset into `local`.
  virtual Result<std::unique_ptr<TransferRequest>> Read(void* local, size_t length,
                                                        const RemoteDescriptor& remote,
                                                        uint64_t offset) = 0;
  // Completes when every operation issued earlier on this endpoint is done
  // at the target.
  virtual Result<std::unique_ptr<TransferRequest>> Flush() = 0;
  // Flushes, then delivers `message` (at most kMaxNotificationBytes) to the
  // peer's WaitNotification. Completion means the message was sent.
  virtual Result<std::unique_ptr<TransferRequest>> Notify(std::string_view message) = 0;
  // False once the peer is known to be gone; every later call fails.
  virtual bool healthy() const = 0;
};

inline constexpr size_t kMaxNotificationBytes = 4096;

class Transport {
 public:
  virtual ~Transport() = default;
  virtual std::string_view name() const = 0;

  // Registers [addr, addr + length). length == 0 or a null addr is
  // InvalidArgument; a kind this transport cannot reach is Unimplemented.
  virtual Result<std::unique_ptr<MemoryRegistration>> RegisterMemory(void* addr, size_t length,
                                                                     MemoryKind kind) = 0;
  // Opaque blob peers pass to Connect.
  virtual Result<std::string> LocalAddress() = 0;
  // A blob that is not a LocalAddress() of this kind of transport is
  // InvalidArgument; an unreachable peer is Unavailable.
  virtual Result<std::unique_ptr<Endpoint>> Connect(std::string_view peer_address) = 0;

  // Next notification sent to this transport by any peer, driving progress
  // until one arrives; DeadlineExceeded when none did within `timeout`.
  virtual Result<std::string> WaitNotification(std::chrono::milliseconds timeout) = 0;
  // One round of progress without waiting; true when something happened.
  virtual bool Progress() = 0;
};

}  // namespace relaykv
