// RedisDirectory: the directory in a Redis server, shared by every process
// and machine of a deployment.
//
// Key schema (P = DirectoryOptions::key_prefix; names and namespaces are
// stored as raw bytes, Redis keys are binary-safe):
//   P:server:{name}   hash of ServerInfo fields, PEXPIRE ttl (the lease)
//   P:servers         set of announced names; members whose hash expired are
//                     removed lazily by LiveServers
//   P:rec:{ns}:{id}   hash: server, length, seq_begin, tokens (int32 LE blob)
//   P:ids:{ns}        set of the ids in ns (decimal), so ListRecords reads one
//                     namespace without SCANning every key (a SCAN pattern
//                     would also have to escape glob bytes in ns)
//   P:seq:{ns}        event counter
//   P:events:{ns}     sorted set scored by seq; member "<seq>:" + packed event
//                     (the seq makes every member unique)
// Every call that reads or writes more than one key runs as one Lua script,
// so a publish cannot interleave with a removal or with the holder's expiry.
//
// One connection, guarded by a mutex. Any failure (refused, timeout, I/O,
// error reply) returns Unavailable naming the URL; a connection-level failure
// drops the connection and the next call reconnects, so the object recovers
// by itself when Redis comes back.
#pragma once

#include <hiredis/hiredis.h>

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "transfer/directory/directory.h"

namespace relaykv {

class RedisDirectory final : public Directory {
 public:
  // Parses the URL only: Redis need not be up yet.
  static Result<std::unique_ptr<RedisDirectory>> Open(std::string_view url,
                                                      const DirectoryOptions& options);

  std::string url() const override { return url_; }

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
  struct ContextDeleter {
    void operator()(redisContext* c) const { redisFree(c); }
  };
  struct ReplyDeleter {
    void operator()(redisReply* r) const { freeReplyObject(r); }
  };
  using ContextPtr = std::unique_ptr<redisContext, ContextDeleter>;
  using ReplyPtr = std::unique_ptr<redisReply, ReplyDeleter>;

  enum Script : size_t {
    kAnnounce,
    kWithdraw,
    kLiveServers,
    kPublish,
    kRemove,
    kFindRecord,
    kListRecords,
    kEventsSince,
    kNumScripts,
  };

  RedisDirectory(std::string url, std::string host, int port, int db,
                 const DirectoryOptions& options);

  // Caller holds mu_.
  Status ConnectLocked();
  Result<ReplyPtr> CommandLocked(const std::vector<std::string>& argv);
  // Runs script `s` (EVALSHA, falling back to EVAL when Redis lost it).
  Result<ReplyPtr> Eval(Script s, const std::vector<std::string>& keys,
                        const std::vector<std::string>& args);
  Status Fail(std::string_view what) const;

  std::string Key(std::string_view kind, std::string_view rest) const;
  std::string RecordKey(std::string_view ns, uint64_t id) const;
  // ZREMRANGEBYRANK stop index that keeps the newest max_events ("" = keep all).
  std::string TrimStop() const;

  const std::string url_;
  const std::string host_;
  const int port_;
  const int db_;
  const DirectoryOptions options_;

  std::mutex mu_;
  ContextPtr ctx_;                 // null while disconnected
  std::vector<std::string> shas_;  // per Script, loaded on connect
};

}  // namespace relaykv
