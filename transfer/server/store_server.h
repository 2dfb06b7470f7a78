// StoreServer: a store server process's engine (`relaykv-store` wraps it).
//
// Owns an EmbeddedStore whose segments are registered with a transport
// (UCX), so clients write and read record bytes one-sided while the server
// keeps the books over the control protocol (transfer/server/protocol.h).
//
// One event-loop thread serves the control sockets, the metrics endpoint and
// the transport's progress (it sleeps in poll() on the sockets and the
// transport's wakeup fd). A second thread talks to the directory, so a slow
// or dead directory never stalls transfers (a seal's answer waits for its
// record to be listed, so a writer that got OK can send readers to it; only
// that connection waits): it announces the server with a
// TTL and re-announces every heartbeat, publishes sealed records and removes
// evicted, expired or deleted ones. When the directory comes back after an
// outage (a restarted Redis has lost everything), the next successful
// heartbeat republishes every record the server holds.
//
// The server verifies every record at seal (format, header and metadata
// checksums, namespace; payload checksums with verify_payload) and refuses
// corrupt ones, so the directory never publishes tokens a record does not hold.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "transfer/common/status.h"
#include "transfer/store/embedded_store.h"

namespace relaykv {

struct StoreServerOptions {
  // Incarnation name prefix; the server appends a random suffix.
  std::string name = "store";
  std::string listen = "127.0.0.1:0";  // control socket; port 0 picks one
  // Announced control address; empty: the listen address (with the bound
  // port, and this host's name when listening on 0.0.0.0).
  std::string advertise;
  std::string metrics_listen;  // "host:port" for /metrics, /healthz, /readyz; empty: off
  StoreOptions store;          // capacity, watermarks, segments, default TTL
  std::string directory = "embedded";
  std::chrono::milliseconds heartbeat{1000};
  // Writes and reads need this token in the hello; empty refuses to start
  // unless allow_unauthenticated.
  std::string token;
  bool allow_unauthenticated = false;
  std::string ucx_tls;  // empty: UCX's default / UCX_TLS
  // Segments are allocated by UCX: sysv shared memory when the server's UCX
  // has it (the default wires do), which clients on this host map and copy
  // through (UcxTransportOptions::map_peer_memory) instead of a cma syscall
  // per transfer; off-host clients see no difference. Off: private mmap'd
  // memory.
  bool shared_segments = true;
  std::chrono::milliseconds directory_timeout{500};
  // Seal always verifies a record's header, metadata, tokens and namespace
  // (what the directory publishes). Payload checksums cost a pass over the
  // bytes (run on the directory thread, so other clients are not held up),
  // and every importer verifies them anyway (a corrupt payload becomes a
  // counted recompute there), so they are checked at seal only when asked.
  bool verify_payload = false;

  Status Validate() const;
};

struct StoreServerInfo {
  std::string name;
  std::string control_address;  // as announced
  std::string metrics_address;  // bound address, empty when off
};

class StoreServer {
 public:
  // Binds the sockets, maps and registers the segments; does not serve yet.
  static Result<std::unique_ptr<StoreServer>> Create(StoreServerOptions options);
  ~StoreServer();

  // Starts the event loop and the directory thread.
  Status Start();
  // Graceful: withdraws from the directory, closes every connection (their
  // reservations are aborted, leases released), joins the threads. Idempotent.
  void Shutdown();

  const StoreServerInfo& info() const;
  StoreStats Stats() const;
  // Prometheus text exposition of the server's metrics.
  std::string MetricsText() const;

  struct Impl;

 private:
  explicit StoreServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace relaykv
