// Directory: where the store's metadata lives, shared by every instance and
// store server of a deployment.
//
// It answers three questions: which store servers are alive (and how to reach
// them), which server holds a record, and what changed since a reader last
// looked (so each instance keeps its own span index in step with records
// other instances exported).
//
// Liveness is a lease: a server announces itself with a TTL and re-announces
// (heartbeat) well within it. Once a server's TTL runs out, every record it
// held disappears from FindRecord and ListRecords at once, without anyone
// cleaning up: readers never get pointed at memory that is gone.
//
// Records are published by the store server that holds them (after the bytes
// are sealed) and removed by it (eviction, expiry, delete), so the directory
// never lists a record that a live server does not have. A record entry names
// its namespace: lookups in one namespace never see another's (the namespace
// string carries model, layout and tenant).
//
// Two implementations pass one test suite: embedded (this process only, the
// default on one machine) and Redis (shared across processes and machines).
// Every call returns Unavailable when the backend cannot be reached, and the
// next call tries again: callers treat that as "no reuse right now", never as
// an error that stops serving.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "transfer/common/status.h"

namespace relaykv {

struct ServerInfo {
  // Unique per server incarnation (a restarted server takes a new name, so
  // its predecessor's records cannot be mistaken for its own).
  std::string name;
  // host:port of the server's control socket.
  std::string control_address;
  // Transport kind ("ucx") and the server's transport address blob (binary).
  std::string transport;
  std::string transport_address;
  uint64_t capacity_bytes = 0;
  // Refreshed with each heartbeat; informational (placement, dashboards).
  uint64_t bytes_used = 0;

  bool operator==(const ServerInfo&) const = default;
};

struct RecordEntry {
  std::string ns;               // namespace key (model, layout, tenant)
  uint64_t id = 0;              // record id, unique within ns
  std::string server;           // ServerInfo::name of the holder
  uint64_t length = 0;          // record bytes
  int32_t seq_begin = 0;        // position of tokens[0] in the exporting sequence
  std::vector<int32_t> tokens;  // the record's token ids, for span indexes

  bool operator==(const RecordEntry&) const = default;
};

struct DirectoryEvent {
  enum class Kind : uint8_t { kAdded = 0, kRemoved = 1 };
  uint64_t seq = 0;  // strictly increasing per namespace, starting at 1
  Kind kind = Kind::kAdded;
  // kAdded: the full entry. kRemoved: ns, id and server only.
  RecordEntry entry;

  bool operator==(const DirectoryEvent&) const = default;
};

struct EventBatch {
  std::vector<DirectoryEvent> events;  // ascending seq, all > after_seq
  // Events after `after_seq` were already trimmed, or `after_seq` is beyond
  // `last_seq` (the backend lost its history, e.g. Redis restarted without
  // persistence): the reader must rebuild from ListRecords() and continue
  // from `last_seq`. `events` is empty then.
  bool truncated = false;
  // Highest seq the namespace has issued (0 when none).
  uint64_t last_seq = 0;
};

struct DirectoryOptions {
  // Redis: connect and per-command timeout.
  std::chrono::milliseconds timeout{500};
  // Key prefix, so several deployments can share one Redis.
  std::string key_prefix = "relaykv";
  // Events kept per namespace; older ones are trimmed (readers that fall
  // further behind resynchronise through ListRecords).
  uint64_t max_events = 100000;
  // Embedded only: time source for server TTLs (tests inject a manual clock);
  // empty means steady_clock.
  std::function<std::chrono::steady_clock::time_point()> clock;
};

class Directory {
 public:
  virtual ~Directory() = default;
  // "embedded" or "redis://host:port/db".
  virtual std::string url() const = 0;

  // Creates or refreshes (heartbeat) a server entry that lives for `ttl`.
  // ttl <= 0 or an empty name is InvalidArgument.
  virtual Status AnnounceServer(const ServerInfo& info, std::chrono::milliseconds ttl) = 0;
  // Graceful shutdown: the server and its records vanish now. Unknown name: OK.
  virtual Status WithdrawServer(std::string_view name) = 0;
  // Servers whose TTL has not run out, sorted by name.
  virtual Result<std::vector<ServerInfo>> LiveServers() = 0;
  // nullopt when unknown or expired.
  virtual Result<std::optional<ServerInfo>> FindServer(std::string_view name) = 0;

  // Atomically: checks the holder is alive (FailedPrecondition otherwise),
  // stores the entry (replacing one with the same ns/id, e.g. after the
  // previous holder died) and appends an kAdded event. Empty ns or server is
  // InvalidArgument.
  virtual Status PublishRecord(const RecordEntry& entry) = 0;
  // Atomically removes the entry and appends a kRemoved event, but only when
  // `server` still holds it (a late removal from a previous holder must not
  // drop the new one); otherwise a no-op returning OK.
  virtual Status RemoveRecord(std::string_view ns, uint64_t id, std::string_view server) = 0;
  // nullopt when missing or its holder's TTL ran out.
  virtual Result<std::optional<RecordEntry>> FindRecord(std::string_view ns, uint64_t id) = 0;
  // Every record of `ns` whose holder is alive, sorted by id.
  virtual Result<std::vector<RecordEntry>> ListRecords(std::string_view ns) = 0;
  // Up to `max_events` events of `ns` with seq > after_seq. Events do not
  // filter by liveness (a reader checks FindRecord or the server before use).
  virtual Result<EventBatch> EventsSince(std::string_view ns, uint64_t after_seq,
                                         size_t max_events) = 0;
};

// "embedded" (or empty) → in-process; "redis://host:port[/db]" → Redis.
// Anything else is InvalidArgument naming the accepted forms. Opening Redis
// does not require it to be up: calls report Unavailable until it is.
Result<std::unique_ptr<Directory>> OpenDirectory(std::string_view url,
                                                 const DirectoryOptions& options = {});

}  // namespace relaykv
