// Clients of store servers.
//
// StoreClient talks to one server: the control protocol for the books, its
// own UCX worker for the bytes (one-sided put into / get from the server's
// registered segment). DistributedStore sits on top: it finds servers and
// records through the directory, spreads puts over the live servers and
// keeps one StoreClient per server, reconnecting after failures.
//
// Both are safe to call from several threads (calls are serialised per
// server connection). Every remote wait is bounded by options.timeout.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "transfer/common/status.h"
#include "transfer/directory/directory.h"

namespace relaykv {

// Heap bytes aligned for record parsing (records are read in place and want
// 64-byte alignment); page-aligned so transports can register it cheaply.
class RecordBuffer {
 public:
  RecordBuffer() = default;
  // Grows (never shrinks) the allocation; contents are not preserved.
  void Resize(size_t size);
  uint8_t* data() { return data_.get(); }
  const uint8_t* data() const { return data_.get(); }
  size_t size() const { return size_; }
  std::span<const std::byte> bytes() const {
    return {reinterpret_cast<const std::byte*>(data_.get()), size_};
  }

 private:
  struct Free {
    void operator()(uint8_t* p) const;
  };
  std::unique_ptr<uint8_t, Free> data_;
  size_t size_ = 0;
  size_t capacity_ = 0;
};

struct StoreClientOptions {
  std::string token;
  std::string client_name = "relaykv";
  // Bounds each control round trip and each one-sided transfer.
  std::chrono::milliseconds timeout{5000};
  // UCX wires (UCX_TLS syntax); empty: UCX's default or the environment's.
  std::string ucx_tls;
  // UCX peer failure detection (see UcxTransportOptions::peer_error_handling):
  // on by default; off lets UCX use shared memory (posix/sysv) on one host,
  // where a dead server is then noticed by `timeout` only.
  bool ucx_peer_error_handling = true;
  // Record TTL asked of the server on put (0: the server's default).
  std::chrono::milliseconds record_ttl{0};
  // Records up to this size travel inside the control messages: one round
  // trip per put or get instead of two or three (reserve, seal and, over UCX
  // tcp, a flush; a UCX tcp get is a round trip of its own). Measured on
  // loopback (tests/bench/server): a 9 KB put is 1.3-2.2x faster inline,
  // a get 1.1-2.3x (most over UCX tcp); at 1 MB inline is 1.3x slower than
  // one-sided over UCX tcp and 2-5.4x slower where one-sided is a local copy
  // (cma or a mapping), so the default stays small. 0: never inline; at
  // most wire::kMaxInlineBytes (4 MiB), for deployments whose control round
  // trips cost more than that many bytes of socket copy.
  uint64_t inline_bytes = 64 * 1024;
  // How long a call polls the control socket for its reply before it sleeps
  // (net::RecvExact): most replies come within it, and a sleeping thread's
  // wakeup can cost more than the round trip itself. 0: sleep at once.
  std::chrono::microseconds reply_spin{100};
};

class StoreClient {
 public:
  // Connects, says hello with the token (PermissionDenied when refused) and
  // connects the transport to the server.
  static Result<std::unique_ptr<StoreClient>> Connect(std::string_view control_address,
                                                      const StoreClientOptions& options);
  ~StoreClient();

  const std::string& server_name() const;
  uint64_t capacity_bytes() const;
  // False after a connection or transport failure; the owner reconnects.
  bool healthy() const;
  // Reads and writes copied through a mapping of the server's shared
  // segments (same host, sysv among the UCX wires) rather than moved by UCX.
  uint64_t mapped_transfers() const;
  // Puts and gets whose record travelled inside the control messages.
  uint64_t inline_transfers() const;

  // Stores `record` (a complete record) under (ns, id): reserve, one-sided
  // write, flush, seal (or one message when small). AlreadyExists when the server already holds it.
  // A record the server cannot verify comes back as its error (DataLoss, ...).
  Status Put(std::string_view ns, uint64_t id, std::span<const std::byte> record);
  // Reads record (ns, id) into `out` under a lease, or inline when small.
  // The release is sent before return and its reply read with the next
  // call's, so a get costs one round trip. NotFound when the server does not hold it.
  Status Get(std::string_view ns, uint64_t id, RecordBuffer* out);
  Status Delete(std::string_view ns, uint64_t id);
  // "key value" lines from the server.
  Result<std::string> Stats();

  struct Impl;

 private:
  explicit StoreClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

struct DistributedStoreOptions {
  std::string directory = "embedded";
  DirectoryOptions directory_options;
  StoreClientOptions client;
  // How long the list of live servers (for placing puts) is reused.
  std::chrono::milliseconds server_refresh{1000};
};

class DistributedStore {
 public:
  static Result<std::unique_ptr<DistributedStore>> Open(const DistributedStoreOptions& options);
  ~DistributedStore();

  // Places the record on a live server chosen by rendezvous hashing of
  // (ns, id), so the same record always lands on the same server while the
  // set of servers is stable. Unavailable when no server is alive.
  Status Put(std::string_view ns, uint64_t id, std::span<const std::byte> record);
  // NotFound when the directory has no live holder for it (evicted, never
  // stored, holder dead) or the holder no longer has it.
  Status Get(std::string_view ns, uint64_t id, RecordBuffer* out);

  Directory& directory() { return *directory_; }

 private:
  explicit DistributedStore(DistributedStoreOptions options) : options_(std::move(options)) {}
  // The connection to `server`, connecting (or reconnecting) when needed.
  Result<std::shared_ptr<StoreClient>> ClientFor(const ServerInfo& server);
  void DropClient(const std::string& name);
  Result<std::vector<ServerInfo>> Servers();

  DistributedStoreOptions options_;
  std::unique_ptr<Directory> directory_;
  std::mutex mu_;
  std::map<std::string, std::shared_ptr<StoreClient>> clients_;
  std::vector<ServerInfo> servers_;
  std::chrono::steady_clock::time_point servers_at_{};
};

}  // namespace relaykv
