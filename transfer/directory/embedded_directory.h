// EmbeddedDirectory: the directory held in this process, for one machine.
//
// One mutex guards everything; every call is short (map lookups, no I/O).
// Server TTLs run on DirectoryOptions::clock so tests can move time by hand.
// Records of an expired server stay stored but hidden, exactly as in Redis
// (where nothing runs when a lease ends): a server that re-announces in time
// under the same name finds them again, and a new holder replaces them.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <string>

#include "transfer/directory/directory.h"

namespace relaykv {

class EmbeddedDirectory final : public Directory {
 public:
  explicit EmbeddedDirectory(const DirectoryOptions& options = {});

  std::string url() const override { return "embedded"; }

  Status AnnounceServer(const ServerInfo& info, std::chrono::milliseconds ttl) override;
  Status WithdrawServer(std::string_view name) override;
  Result<std::vector<ServerInfo>> LiveServers() override;
  Result<std::optional<ServerInfo>> FindServer(std::string_view name) override;

  Status PublishRecord(const RecordEntry& entry) override;
  Status RemoveRecord(std::string_view ns, uint64_t id, std::string_view server) override;
  Result<std::optional<RecordEntry>> FindRecord(std::string_view ns, uint64_t id) override;
  Result<std::vector<RecordEntry>> ListRecords(std::string_view ns) override;
  Result<EventBatch> EventsSince(std::string_view ns, uint64_t after_seq,
                                 size_t max_events) override;

 private:
  using TimePoint = std::chrono::steady_clock::time_point;

  struct Server {
    ServerInfo info;
    TimePoint expires_at;
  };
  struct Namespace {
    std::map<uint64_t, RecordEntry> records;
    std::deque<DirectoryEvent> events;  // ascending seq, at most max_events
    uint64_t last_seq = 0;
  };

  TimePoint Now() const;
  // Caller holds mu_.
  bool IsAliveLocked(std::string_view name, TimePoint now) const;
  void AppendEventLocked(Namespace& ns, DirectoryEvent event);

  const uint64_t max_events_;
  const std::function<TimePoint()> clock_;

  std::mutex mu_;
  // Expired servers are dropped lazily, when a call comes across them.
  std::map<std::string, Server, std::less<>> servers_;
  std::map<std::string, Namespace, std::less<>> namespaces_;
};

}  // namespace relaykv
