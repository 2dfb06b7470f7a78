// NcclTransport: the Transport interface over NCCL point-to-point, for GPU
// memory between instances.
//
// NCCL has no one-sided operations, so each connection is a two-rank
// communicator plus a TCP control socket, and one-sided Read/Write are
// requests the target serves: the initiator sends a 64-byte header over the
// socket (op, registration, offset, length) and posts its ncclSend (Write) or
// ncclRecv (Read); the target, inside its Progress()/WaitNotification(),
// reads the header, checks it against its own registrations and posts the
// matching ncclRecv/ncclSend on the connection's stream. Headers travel out
// of band so that no NCCL receive sits posted waiting for the next request:
// a waiting NCCL kernel would make every cudaFree in the target process
// block until the peer sent something.
//
// Ordering: the target serves one connection's headers in order on one
// stream. A notification is delivered to WaitNotification only after every
// transfer before it completed, and Flush() likewise; the target then
// acknowledges over the socket, which is when Notify()/Flush() requests
// complete (so an endpoint closed after them loses nothing).
//
// Connection set-up: the target's LocalAddress() blob is the host:port of its
// control socket, one address for any number of peers, so it can be
// published in the directory like a UCX worker address. Connect(blob) opens
// the control socket, makes an ncclUniqueId, sends it in a hello and starts
// a non-blocking ncclCommInitRankConfig as rank 0 of 2; the target's
// Progress() accepts the socket, reads the hello and joins as rank 1.
// Connect waits for the communicator (options.connect_timeout).
//
// Only GPU memory is registered (MemoryKind::kCudaDevice); host memory is
// Unimplemented (use UCX). The local buffer of Read/Write must be device
// memory of this transport's device (checked). A registration must lie
// within one allocation; its length is trusted.
//
// Failure: waits poll the operation's CUDA event, the communicator's
// asynchronous error and the control socket, so a peer that died is
// Unavailable as soon as its socket closes. A header that points outside the
// target's registrations ends that connection (the target aborts the
// communicator): bytes never land outside registered memory. Destroying an
// endpoint aborts its communicator, cancelling what is still in flight.
//
// Waits on the initiator side also drive this transport's own Progress(), so
// two instances that are each other's target do not wait on each other.
//
// One GPU, two processes (tests): NCCL refuses two ranks of one communicator
// on the same GPU unless they believe they are on different hosts; giving
// the processes different NCCL_HOSTID values makes them talk over NCCL's
// network transport, which is how the tests run on a one-GPU machine.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <string_view>

#include "transfer/transport/transport.h"

namespace relaykv {

inline constexpr size_t kMaxNcclTokenBytes = 64;

struct NcclTransportOptions {
  int device = 0;  // CUDA device ordinal; buffers must live on it
  // Host the control socket listens on, and the one written into address
  // blobs ("" = the first non-loopback IPv4 address, else 127.0.0.1).
  std::string listen_host = "0.0.0.0";
  std::string advertise_host;
  // How long Connect() waits for the control socket and the communicator.
  std::chrono::milliseconds connect_timeout{30000};
  // Shared secret every peer presents in its hello; a target serves only
  // peers whose token equals its own (both empty: no check). At most
  // kMaxNcclTokenBytes.
  std::string token;
  // Limit on each NCCL enqueue that has to wait for NCCL's lazy connection
  // set-up, and on each control-socket write.
  std::chrono::milliseconds op_timeout{30000};
};

class NcclTransport final : public Transport {
 public:
  // Unavailable (naming the CUDA runtime's reason) without a usable device.
  static Result<std::unique_ptr<NcclTransport>> Create(const NcclTransportOptions& options = {});
  ~NcclTransport() override;

  std::string_view name() const override { return "nccl"; }
  Result<std::unique_ptr<MemoryRegistration>> RegisterMemory(void* addr, size_t length,
                                                             MemoryKind kind) override;
  // The control socket's address (see above); the same for every call.
  Result<std::string> LocalAddress() override;
  Result<std::unique_ptr<Endpoint>> Connect(std::string_view peer_address) override;
  Result<std::string> WaitNotification(std::chrono::milliseconds timeout) override;
  bool Progress() override;

  // Connections this transport serves (target side), for tests and metrics.
  size_t served_peers() const;

  struct Core;

 private:
  explicit NcclTransport(std::shared_ptr<Core> core) : core_(std::move(core)) {}
  std::shared_ptr<Core> core_;
};

// The address blob, parsed: "RKVN", u32 version, u16 port, u8 host length,
// host. InvalidArgument when malformed.
struct NcclAddress {
  uint16_t port = 0;
  std::string host;

  std::string Pack() const;
  static Result<NcclAddress> Parse(std::string_view blob);
};

}  // namespace relaykv
