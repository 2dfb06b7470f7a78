// UcxTransport: the Transport interface over UCX ucp.
//
// One ucp context + one worker per transport. Data moves with one-sided RMA
// (ucp_put_nbx / ucp_get_nbx against unpacked rkeys); notifications are
// active messages (eager, so the target handler always sees the bytes).
// Endpoints use UCP_ERR_HANDLING_MODE_PEER so a dead peer fails the
// endpoint's requests instead of leaving them pending forever.
//
// Which wires UCX may use is the caller's choice (options.tls, the same
// syntax as UCX_TLS; empty means UCX's default or the environment's
// UCX_TLS). Findings with UCX 1.22 (libucx-cu13 wheel) on one host are in
// transfer/transport/README.md.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "transfer/transport/transport.h"

namespace relaykv {

struct UcxTransportOptions {
  static UcxTransportOptions WithTls(std::string tls, bool peer_error_handling = true) {
    UcxTransportOptions o;
    o.tls = std::move(tls);
    o.peer_error_handling = peer_error_handling;
    return o;
  }
  // e.g. "tcp", "posix,sysv,cma" (shared memory), "tcp,cuda_copy".
  std::string tls;
  // Extra ucp config (name without the UCX_ prefix, value), applied after tls.
  std::vector<std::pair<std::string, std::string>> config;
  // UCP_ERR_HANDLING_MODE_PEER on every endpoint: a dead peer fails requests
  // with Unavailable. UCX 1.22 then drops transports without peer-failure
  // support (posix/sysv shm; cma has no AM) and falls back to tcp, so a pure
  // shared-memory path needs this off. Off, a dead peer is only noticed by
  // the caller's deadline (DeadlineExceeded) or by a transport that fails
  // on its own (cma on a dead pid).
  bool peer_error_handling = true;
  // UCX tcp segment size (UCX_TCP_TX_SEG_SIZE and _RX_): tcp put/get are
  // emulated with messages of at most this size, so the 8K default caps a
  // loopback put at ~0.7 GB/s; 1M measured 2.4 GB/s (write) and 3.5 GB/s
  // (read) here. Every peer must use the same value (a receiver's segments
  // must hold a sender's). Empty keeps UCX's default; the environment
  // variables, when set, win.
  std::string tcp_segment_size = "1M";
  // How long the destructor of an Endpoint waits for a graceful close.
  std::chrono::milliseconds close_timeout{1000};
  // Read/Write against a peer region that UCX can map into this process
  // (host memory the peer got from AllocateMemory, on this host, with
  // posix/sysv among the transports) copy through the mapping, as plain
  // memcpy, instead of going through UCX's protocols (which use a cma
  // syscall per transfer for large ones). Local buffers must then be host
  // memory: use it where they always are (store clients). A peer that died
  // leaves its mapping intact, so mapped writes and reads still succeed;
  // the death shows on the next message (Notify) or on a side channel.
  bool map_peer_memory = false;
  // Ask UCX for a wakeup file descriptor (EventFd/Arm), so a server can sleep
  // in poll() beside its sockets instead of spinning on Progress(). Off by
  // default: with it, UCX keeps only transports that can raise events.
  bool wakeup = false;
};

class UcxTransport final : public Transport {
 public:
  static Result<std::unique_ptr<UcxTransport>> Create(const UcxTransportOptions& options = {});
  ~UcxTransport() override;

  std::string_view name() const override { return "ucx"; }
  Result<std::unique_ptr<MemoryRegistration>> RegisterMemory(void* addr, size_t length,
                                                             MemoryKind kind) override;
  // Host memory UCX allocates and registers in one step, owned by the
  // registration. With shared-memory transports enabled it comes from a
  // sysv/posix segment that same-host peers map into their own address
  // space, so their puts and gets are plain copies; memory from
  // RegisterMemory can only be reached through a cma syscall per operation.
  // Elsewhere it behaves like registered heap memory. A sysv segment is
  // made private to this user (mode 0600), so same-host peers must run as
  // the same user to map it (as cma already requires).
  Result<std::unique_ptr<MemoryRegistration>> AllocateMemory(size_t length);
  // Read/Write calls that went through a mapping (map_peer_memory).
  uint64_t mapped_operations() const;
  Result<std::string> LocalAddress() override;
  Result<std::unique_ptr<Endpoint>> Connect(std::string_view peer_address) override;
  Result<std::string> WaitNotification(std::chrono::milliseconds timeout) override;
  bool Progress() override;

  // Only with options.wakeup. The fd turns readable when the worker has
  // something to progress. Before sleeping on it, drain Progress() and call
  // Arm(): false means events arrived meanwhile, so progress again first.
  Result<int> EventFd();
  bool Arm();

  // Shared with endpoints, requests and registrations (they hold it so the
  // worker and context outlive them).
  struct Core;

 private:
  explicit UcxTransport(std::shared_ptr<Core> core) : core_(std::move(core)) {}
  std::shared_ptr<Core> core_;
};

}  // namespace relaykv
