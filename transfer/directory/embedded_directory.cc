#include "transfer/directory/embedded_directory.h"

#include <utility>

namespace relaykv {

EmbeddedDirectory::EmbeddedDirectory(const DirectoryOptions& options)
    : max_events_(options.max_events), clock_(options.clock) {}

EmbeddedDirectory::TimePoint EmbeddedDirectory::Now() const {
  return clock_ ? clock_() : std::chrono::steady_clock::now();
}

bool EmbeddedDirectory::IsAliveLocked(std::string_view name, TimePoint now) const {
  auto it = servers_.find(name);
  return it != servers_.end() && now < it->second.expires_at;
}

void EmbeddedDirectory::AppendEventLocked(Namespace& ns, DirectoryEvent event) {
  event.seq = ++ns.last_seq;
  ns.events.push_back(std::move(event));
  while (ns.events.size() > max_events_) ns.events.pop_front();
}

Status EmbeddedDirectory::AnnounceServer(const ServerInfo& info, std::chrono::milliseconds ttl) {
  if (info.name.empty()) return InvalidArgument("AnnounceServer: empty server name");
  if (ttl <= std::chrono::milliseconds::zero()) {
    return InvalidArgument("AnnounceServer: ttl must be > 0, got " + std::to_string(ttl.count()) +
                           " ms");
  }
  const TimePoint now = Now();
  std::lock_guard<std::mutex> lock(mu_);
  servers_.insert_or_assign(info.name, Server{info, now + ttl});
  return Status::Ok();
}

Status EmbeddedDirectory::WithdrawServer(std::string_view name) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = servers_.find(name);
  if (it != servers_.end()) servers_.erase(it);
  return Status::Ok();
}

Result<std::vector<ServerInfo>> EmbeddedDirectory::LiveServers() {
  const TimePoint now = Now();
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<ServerInfo> live;
  for (auto it = servers_.begin(); it != servers_.end();) {
    if (now < it->second.expires_at) {
      live.push_back(it->second.info);
      ++it;
    } else {
      it = servers_.erase(it);
    }
  }
  return live;  // std::map iterates in name order
}

Result<std::optional<ServerInfo>> EmbeddedDirectory::FindServer(std::string_view name) {
  const TimePoint now = Now();
  std::lock_guard<std::mutex> lock(mu_);
  auto it = servers_.find(name);
  if (it == servers_.end() || !(now < it->second.expires_at)) return std::optional<ServerInfo>();
  return std::optional<ServerInfo>(it->second.info);
}

Status EmbeddedDirectory::PublishRecord(const RecordEntry& entry) {
  if (entry.ns.empty()) return InvalidArgument("PublishRecord: empty namespace");
  if (entry.server.empty()) return InvalidArgument("PublishRecord: empty server name");
  const TimePoint now = Now();
  std::lock_guard<std::mutex> lock(mu_);
  if (!IsAliveLocked(entry.server, now)) {
    return FailedPrecondition("PublishRecord: holder '" + entry.server +
                              "' is not a live server (never announced, withdrawn or expired)");
  }
  Namespace& ns = namespaces_[entry.ns];
  ns.records.insert_or_assign(entry.id, entry);
  AppendEventLocked(ns, DirectoryEvent{0, DirectoryEvent::Kind::kAdded, entry});
  return Status::Ok();
}

Status EmbeddedDirectory::RemoveRecord(std::string_view ns, uint64_t id, std::string_view server) {
  std::lock_guard<std::mutex> lock(mu_);
  auto ns_it = namespaces_.find(ns);
  if (ns_it == namespaces_.end()) return Status::Ok();
  auto rec_it = ns_it->second.records.find(id);
  if (rec_it == ns_it->second.records.end() || rec_it->second.server != server) {
    return Status::Ok();
  }
  ns_it->second.records.erase(rec_it);
  RecordEntry removed;
  removed.ns = std::string(ns);
  removed.id = id;
  removed.server = std::string(server);
  AppendEventLocked(ns_it->second,
                    DirectoryEvent{0, DirectoryEvent::Kind::kRemoved, std::move(removed)});
  return Status::Ok();
}

Result<std::optional<RecordEntry>> EmbeddedDirectory::FindRecord(std::string_view ns, uint64_t id) {
  const TimePoint now = Now();
  std::lock_guard<std::mutex> lock(mu_);
  auto ns_it = namespaces_.find(ns);
  if (ns_it == namespaces_.end()) return std::optional<RecordEntry>();
  auto rec_it = ns_it->second.records.find(id);
  if (rec_it == ns_it->second.records.end() || !IsAliveLocked(rec_it->second.server, now)) {
    return std::optional<RecordEntry>();
  }
  return std::optional<RecordEntry>(rec_it->second);
}

Result<std::vector<RecordEntry>> EmbeddedDirectory::ListRecords(std::string_view ns) {
  const TimePoint now = Now();
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<RecordEntry> out;
  auto ns_it = namespaces_.find(ns);
  if (ns_it == namespaces_.end()) return out;
  for (const auto& [id, entry] : ns_it->second.records) {
    if (IsAliveLocked(entry.server, now)) out.push_back(entry);
  }
  return out;  // std::map iterates in id order
}

Result<EventBatch> EmbeddedDirectory::EventsSince(std::string_view ns, uint64_t after_seq,
                                                  size_t max_events) {
  std::lock_guard<std::mutex> lock(mu_);
  EventBatch batch;
  auto ns_it = namespaces_.find(ns);
  if (ns_it == namespaces_.end()) {
    // Nothing was ever issued here; a reader ahead of that lost its history.
    batch.truncated = after_seq > 0;
    return batch;
  }
  const Namespace& n = ns_it->second;
  batch.last_seq = n.last_seq;
  const uint64_t first_kept = n.events.empty() ? n.last_seq + 1 : n.events.front().seq;
  batch.truncated = after_seq + 1 < first_kept || after_seq > n.last_seq;
  if (batch.truncated || n.events.empty()) return batch;
  // Seqs in the deque are contiguous, so the first event after after_seq is
  // found by offset.
  for (size_t i = static_cast<size_t>(after_seq + 1 - first_kept);
       i < n.events.size() && batch.events.size() < max_events; ++i) {
    batch.events.push_back(n.events[i]);
  }
  return batch;
}

}  // namespace relaykv
