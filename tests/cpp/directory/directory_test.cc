// One contract suite for every Directory backend (embedded, Redis), plus
// Redis outage tests and URL parsing. Redis tests run against a real
// redis-server started per test on a free loopback port (no persistence);
// where redis-server is missing they skip, naming why.
#include "transfer/directory/directory.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "tests/cpp/testing/processes.h"

namespace relaykv {
namespace {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

// Sends one inline command to the Redis on 127.0.0.1:port and returns the
// first chunk of its reply ("" when it cannot be reached).
std::string RawCommand(int port, std::string_view command) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return "";
  timeval tv{0, 200000};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  std::string reply;
  const std::string line = std::string(command) + "\r\n";
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      send(fd, line.data(), line.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(line.size())) {
    char buf[256];
    const ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n > 0) reply.assign(buf, static_cast<size_t>(n));
  }
  close(fd);
  return reply;
}

using ::relaykv::testing::FreeLoopbackPort;
using ::relaykv::testing::RedisServer;

ServerInfo Server(std::string name, uint64_t bytes_used = 0) {
  ServerInfo s;
  s.name = std::move(name);
  s.control_address = "10.0.0.1:7000";
  s.transport = "ucx";
  s.transport_address = std::string("ucx\0addr", 8);
  s.capacity_bytes = 1ull << 40;
  s.bytes_used = bytes_used;
  return s;
}

RecordEntry Record(std::string ns, uint64_t id, std::string server) {
  RecordEntry e;
  e.ns = std::move(ns);
  e.id = id;
  e.server = std::move(server);
  e.length = 4096 + id;
  e.seq_begin = static_cast<int32_t>(id % 1000);
  e.tokens = {1, 2, 3, static_cast<int32_t>(id)};
  return e;
}

enum class Backend { kEmbedded, kRedis };

class DirectoryContractTest : public ::testing::TestWithParam<Backend> {
 protected:
  // Leases in these tests. Redis runs on the real clock, so its margins are
  // generous enough for a loaded machine; the embedded clock is manual.
  static constexpr milliseconds kTtl{600};

  void SetUp() override {
    if (IsRedis()) {
      if (auto why = RedisServer::MissingReason()) GTEST_SKIP() << *why;
      ASSERT_TRUE(redis_.Start());
    }
    dir_ = Open();
    ASSERT_NE(dir_, nullptr);
  }

  bool IsRedis() const { return GetParam() == Backend::kRedis; }

  std::unique_ptr<Directory> Open(DirectoryOptions options = {}) {
    Result<std::unique_ptr<Directory>> d = [&] {
      if (IsRedis()) {
        options.timeout = milliseconds(2000);
        return OpenDirectory(redis_.url(), options);
      }
      options.clock = [this] { return Clock::time_point(milliseconds(now_ms_.load())); };
      return OpenDirectory("embedded", options);
    }();
    EXPECT_TRUE(d.ok()) << d.status().ToString();
    return d.ok() ? std::move(d).value() : nullptr;
  }

  void Advance(milliseconds ms) {
    if (IsRedis()) {
      std::this_thread::sleep_for(ms);
    } else {
      now_ms_ += ms.count();
    }
  }

  std::optional<RecordEntry> Find(std::string_view ns, uint64_t id) {
    auto r = dir_->FindRecord(ns, id);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? *r : std::nullopt;
  }
  std::vector<RecordEntry> List(std::string_view ns) {
    auto r = dir_->ListRecords(ns);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? *r : std::vector<RecordEntry>{};
  }
  EventBatch Events(std::string_view ns, uint64_t after, size_t max = 1000) {
    auto r = dir_->EventsSince(ns, after, max);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? *r : EventBatch{};
  }
  std::vector<std::string> LiveNames() {
    auto r = dir_->LiveServers();
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    std::vector<std::string> names;
    if (r.ok()) {
      for (const ServerInfo& s : *r) names.push_back(s.name);
    }
    return names;
  }

  std::atomic<int64_t> now_ms_{1000000};
  RedisServer redis_;
  std::unique_ptr<Directory> dir_;  // last: destroyed before the clock it reads
};

TEST_P(DirectoryContractTest, AnnounceHeartbeatAndExpiry) {
  EXPECT_EQ(dir_->AnnounceServer(Server("s1"), milliseconds(0)).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(dir_->AnnounceServer(Server("s1"), milliseconds(-5)).code(),
            StatusCode::kInvalidArgument);

  ASSERT_TRUE(dir_->AnnounceServer(Server("s2"), kTtl / 4).ok());
  ASSERT_TRUE(dir_->AnnounceServer(Server("s1"), kTtl).ok());
  EXPECT_EQ(LiveNames(), (std::vector<std::string>{"s1", "s2"}));  // sorted by name

  Advance(kTtl / 2);
  EXPECT_EQ(LiveNames(), (std::vector<std::string>{"s1"}));  // s2's lease ran out
  // Heartbeat with fresh usage; then wait until s1's first lease would have
  // ended, well inside the second (margins of kTtl / 4 for the real clock).
  ASSERT_TRUE(dir_->AnnounceServer(Server("s1", 777), kTtl).ok());
  Advance(kTtl * 3 / 4);
  EXPECT_EQ(LiveNames(), (std::vector<std::string>{"s1"}));
  auto s1 = dir_->FindServer("s1");
  ASSERT_TRUE(s1.ok()) << s1.status().ToString();
  ASSERT_TRUE(s1->has_value());
  EXPECT_EQ(**s1, Server("s1", 777));
  auto s2 = dir_->FindServer("s2");
  ASSERT_TRUE(s2.ok());
  EXPECT_FALSE(s2->has_value());

  Advance(kTtl + milliseconds(100));
  EXPECT_TRUE(LiveNames().empty());
  auto gone = dir_->FindServer("s1");
  ASSERT_TRUE(gone.ok());
  EXPECT_FALSE(gone->has_value());
  auto unknown = dir_->FindServer("never");
  ASSERT_TRUE(unknown.ok());
  EXPECT_FALSE(unknown->has_value());
}

TEST_P(DirectoryContractTest, ExpiryHidesRecordsAtOnce) {
  ASSERT_TRUE(dir_->AnnounceServer(Server("s1"), kTtl).ok());
  ASSERT_TRUE(dir_->PublishRecord(Record("ns", 1, "s1")).ok());
  EXPECT_EQ(Find("ns", 1), Record("ns", 1, "s1"));
  Advance(kTtl + milliseconds(100));
  EXPECT_FALSE(Find("ns", 1).has_value());
  EXPECT_TRUE(List("ns").empty());
  // Events do not filter by liveness.
  EXPECT_EQ(Events("ns", 0).events.size(), 1u);
}

TEST_P(DirectoryContractTest, WithdrawHidesRecordsAtOnce) {
  ASSERT_TRUE(dir_->AnnounceServer(Server("s1"), std::chrono::minutes(1)).ok());
  ASSERT_TRUE(dir_->AnnounceServer(Server("s2"), std::chrono::minutes(1)).ok());
  ASSERT_TRUE(dir_->PublishRecord(Record("ns", 1, "s1")).ok());
  ASSERT_TRUE(dir_->PublishRecord(Record("ns", 2, "s2")).ok());
  EXPECT_EQ(List("ns").size(), 2u);

  ASSERT_TRUE(dir_->WithdrawServer("s1").ok());
  EXPECT_FALSE(Find("ns", 1).has_value());
  EXPECT_EQ(List("ns"), (std::vector<RecordEntry>{Record("ns", 2, "s2")}));
  EXPECT_EQ(LiveNames(), (std::vector<std::string>{"s2"}));
  auto s1 = dir_->FindServer("s1");
  ASSERT_TRUE(s1.ok());
  EXPECT_FALSE(s1->has_value());
  EXPECT_TRUE(dir_->WithdrawServer("unknown").ok());
}

TEST_P(DirectoryContractTest, PublishRequiresLiveHolder) {
  EXPECT_EQ(dir_->PublishRecord(Record("ns", 1, "ghost")).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(dir_->PublishRecord(Record("", 1, "s1")).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(dir_->PublishRecord(Record("ns", 1, "")).code(), StatusCode::kInvalidArgument);
  ASSERT_TRUE(dir_->AnnounceServer(Server("s1"), kTtl).ok());
  EXPECT_TRUE(dir_->PublishRecord(Record("ns", 1, "s1")).ok());
  Advance(kTtl + milliseconds(100));
  EXPECT_EQ(dir_->PublishRecord(Record("ns", 2, "s1")).code(), StatusCode::kFailedPrecondition);
  ASSERT_TRUE(dir_->AnnounceServer(Server("s3"), std::chrono::minutes(1)).ok());
  ASSERT_TRUE(dir_->WithdrawServer("s3").ok());
  EXPECT_EQ(dir_->PublishRecord(Record("ns", 3, "s3")).code(), StatusCode::kFailedPrecondition);
  // Failed publishes leave no trace.
  EXPECT_EQ(Events("ns", 0).last_seq, 1u);
  EXPECT_FALSE(Find("ns", 2).has_value());
}

TEST_P(DirectoryContractTest, NewHolderReplacesAndStaleRemovalIsNoop) {
  ASSERT_TRUE(dir_->AnnounceServer(Server("old"), std::chrono::minutes(1)).ok());
  ASSERT_TRUE(dir_->AnnounceServer(Server("new"), std::chrono::minutes(1)).ok());
  ASSERT_TRUE(dir_->PublishRecord(Record("ns", 7, "old")).ok());
  RecordEntry replacement = Record("ns", 7, "new");
  replacement.tokens = {9, 9};
  replacement.length = 1;
  ASSERT_TRUE(dir_->PublishRecord(replacement).ok());
  EXPECT_EQ(Find("ns", 7), replacement);
  EXPECT_EQ(List("ns"), (std::vector<RecordEntry>{replacement}));

  // The previous holder evicts its copy late: the new entry must survive.
  ASSERT_TRUE(dir_->RemoveRecord("ns", 7, "old").ok());
  EXPECT_EQ(Find("ns", 7), replacement);
  EXPECT_EQ(Events("ns", 0).last_seq, 2u);
  // Removing what is not there is a no-op too.
  ASSERT_TRUE(dir_->RemoveRecord("ns", 8, "new").ok());
  ASSERT_TRUE(dir_->RemoveRecord("other", 7, "new").ok());
  EXPECT_EQ(Events("ns", 0).last_seq, 2u);

  ASSERT_TRUE(dir_->RemoveRecord("ns", 7, "new").ok());
  EXPECT_FALSE(Find("ns", 7).has_value());
  EXPECT_TRUE(List("ns").empty());
  EventBatch b = Events("ns", 2);
  ASSERT_EQ(b.events.size(), 1u);
  EXPECT_EQ(b.events[0].seq, 3u);
  EXPECT_EQ(b.events[0].kind, DirectoryEvent::Kind::kRemoved);
  EXPECT_EQ(b.events[0].entry.ns, "ns");
  EXPECT_EQ(b.events[0].entry.id, 7u);
  EXPECT_EQ(b.events[0].entry.server, "new");
}

TEST_P(DirectoryContractTest, NamespacesAreIsolated) {
  ASSERT_TRUE(dir_->AnnounceServer(Server("s"), std::chrono::minutes(1)).ok());
  // "a" is a prefix of "a:1" and of "a*": neither may leak into "a".
  for (const char* ns : {"a", "a:1", "a*", "b"}) {
    ASSERT_TRUE(dir_->PublishRecord(Record(ns, 1, "s")).ok()) << ns;
  }
  ASSERT_TRUE(dir_->PublishRecord(Record("a", 2, "s")).ok());
  EXPECT_EQ(List("a"), (std::vector<RecordEntry>{Record("a", 1, "s"), Record("a", 2, "s")}));
  EXPECT_EQ(List("a:1"), (std::vector<RecordEntry>{Record("a:1", 1, "s")}));
  EXPECT_EQ(List("a*"), (std::vector<RecordEntry>{Record("a*", 1, "s")}));
  EXPECT_TRUE(List("c").empty());
  EXPECT_FALSE(Find("c", 1).has_value());
  EXPECT_EQ(Events("a", 0).last_seq, 2u);
  EXPECT_EQ(Events("b", 0).last_seq, 1u);
  EXPECT_EQ(Events("c", 0).last_seq, 0u);

  ASSERT_TRUE(dir_->RemoveRecord("a:1", 1, "s").ok());
  EXPECT_EQ(Find("a", 1), Record("a", 1, "s"));
  EXPECT_FALSE(Find("a:1", 1).has_value());
  EXPECT_EQ(Events("a", 0).last_seq, 2u);
  EXPECT_EQ(Events("a:1", 0).last_seq, 2u);
}

TEST_P(DirectoryContractTest, EventsInOrderFromSeqOne) {
  EventBatch empty = Events("ns", 0);
  EXPECT_TRUE(empty.events.empty());
  EXPECT_FALSE(empty.truncated);
  EXPECT_EQ(empty.last_seq, 0u);

  ASSERT_TRUE(dir_->AnnounceServer(Server("s"), std::chrono::minutes(1)).ok());
  for (uint64_t id : {30, 10, 20}) ASSERT_TRUE(dir_->PublishRecord(Record("ns", id, "s")).ok());
  ASSERT_TRUE(dir_->RemoveRecord("ns", 10, "s").ok());

  EventBatch all = Events("ns", 0);
  EXPECT_FALSE(all.truncated);
  EXPECT_EQ(all.last_seq, 4u);
  ASSERT_EQ(all.events.size(), 4u);
  const uint64_t ids[] = {30, 10, 20};
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(all.events[i].seq, i + 1);
    EXPECT_EQ(all.events[i].kind, DirectoryEvent::Kind::kAdded);
    EXPECT_EQ(all.events[i].entry, Record("ns", ids[i], "s"));
  }
  RecordEntry removed;
  removed.ns = "ns";
  removed.id = 10;
  removed.server = "s";
  EXPECT_EQ(all.events[3], (DirectoryEvent{4, DirectoryEvent::Kind::kRemoved, removed}));

  EventBatch tail = Events("ns", 2);
  ASSERT_EQ(tail.events.size(), 2u);
  EXPECT_EQ(tail.events[0].seq, 3u);
  EXPECT_EQ(tail.events[1].seq, 4u);
  EventBatch one = Events("ns", 1, 1);
  ASSERT_EQ(one.events.size(), 1u);
  EXPECT_EQ(one.events[0].seq, 2u);
  EXPECT_EQ(one.last_seq, 4u);
  EventBatch none = Events("ns", 1, 0);
  EXPECT_TRUE(none.events.empty());
  EXPECT_FALSE(none.truncated);
  EventBatch caught_up = Events("ns", 4);
  EXPECT_TRUE(caught_up.events.empty());
  EXPECT_FALSE(caught_up.truncated);
  EXPECT_EQ(caught_up.last_seq, 4u);
  // ListRecords is sorted by id whatever the publish order.
  EXPECT_EQ(List("ns"), (std::vector<RecordEntry>{Record("ns", 20, "s"), Record("ns", 30, "s")}));
}

TEST_P(DirectoryContractTest, TrimmedEventsReportTruncatedAndListResyncs) {
  DirectoryOptions options;
  options.max_events = 3;
  dir_ = Open(options);
  ASSERT_NE(dir_, nullptr);
  ASSERT_TRUE(dir_->AnnounceServer(Server("s"), std::chrono::minutes(1)).ok());
  for (uint64_t id = 1; id <= 5; ++id) ASSERT_TRUE(dir_->PublishRecord(Record("ns", id, "s")).ok());

  // Seqs 3..5 are kept: readers at 0 or 1 missed trimmed events.
  for (uint64_t after : {0, 1}) {
    EventBatch b = Events("ns", after);
    EXPECT_TRUE(b.truncated) << after;
    EXPECT_EQ(b.last_seq, 5u);
  }
  // The reader resynchronises from ListRecords and continues from last_seq.
  std::vector<RecordEntry> snapshot = List("ns");
  ASSERT_EQ(snapshot.size(), 5u);
  for (uint64_t id = 1; id <= 5; ++id) EXPECT_EQ(snapshot[id - 1], Record("ns", id, "s"));

  EventBatch b = Events("ns", 2);
  EXPECT_FALSE(b.truncated);
  ASSERT_EQ(b.events.size(), 3u);
  EXPECT_EQ(b.events.front().seq, 3u);
  EXPECT_EQ(b.events.back().seq, 5u);
  ASSERT_TRUE(dir_->RemoveRecord("ns", 1, "s").ok());
  EventBatch after_remove = Events("ns", 2);
  EXPECT_TRUE(after_remove.truncated);  // seq 3 is gone now
  EventBatch latest = Events("ns", 5);
  ASSERT_EQ(latest.events.size(), 1u);
  EXPECT_EQ(latest.events[0].kind, DirectoryEvent::Kind::kRemoved);

  // A reader ahead of the namespace (its history was lost) must resync too.
  EXPECT_TRUE(Events("ns", 100).truncated);
  EXPECT_TRUE(Events("fresh", 3).truncated);
}

TEST_P(DirectoryContractTest, FieldsAreBinarySafe) {
  const std::string ns("m\0del:*?[x]\xff\n", 14);
  ServerInfo info = Server(std::string("srv\0one\r\n", 9), 5);
  info.control_address = std::string("h\0st:1", 6);
  info.transport = std::string("u\0x", 3);
  info.transport_address.clear();
  for (int i = 0; i < 256; ++i) info.transport_address.push_back(static_cast<char>(i));
  info.capacity_bytes = std::numeric_limits<uint64_t>::max();
  ASSERT_TRUE(dir_->AnnounceServer(info, std::chrono::minutes(1)).ok());

  auto found = dir_->FindServer(info.name);
  ASSERT_TRUE(found.ok()) << found.status().ToString();
  ASSERT_TRUE(found->has_value());
  EXPECT_EQ(**found, info);
  auto live = dir_->LiveServers();
  ASSERT_TRUE(live.ok());
  EXPECT_EQ(*live, (std::vector<ServerInfo>{info}));
  auto truncated_name = dir_->FindServer("srv");
  ASSERT_TRUE(truncated_name.ok());
  EXPECT_FALSE(truncated_name->has_value());

  RecordEntry e = Record(ns, std::numeric_limits<uint64_t>::max(), info.name);
  e.tokens = {0, -1, std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max(),
              0x3a3a3a3a};
  e.seq_begin = -7;
  e.length = std::numeric_limits<uint64_t>::max();
  ASSERT_TRUE(dir_->PublishRecord(e).ok());
  RecordEntry empty_tokens = Record(ns, 0, info.name);
  empty_tokens.tokens.clear();
  ASSERT_TRUE(dir_->PublishRecord(empty_tokens).ok());

  EXPECT_EQ(Find(ns, e.id), e);
  EXPECT_EQ(Find(ns, 0), empty_tokens);
  EXPECT_FALSE(Find("m", e.id).has_value());
  EXPECT_EQ(List(ns), (std::vector<RecordEntry>{empty_tokens, e}));
  EventBatch b = Events(ns, 0);
  ASSERT_EQ(b.events.size(), 2u);
  EXPECT_EQ(b.events[0].entry, e);
  EXPECT_EQ(b.events[1].entry, empty_tokens);

  ASSERT_TRUE(dir_->RemoveRecord(ns, e.id, info.name).ok());
  EXPECT_FALSE(Find(ns, e.id).has_value());
  EventBatch removed = Events(ns, 2);
  ASSERT_EQ(removed.events.size(), 1u);
  EXPECT_EQ(removed.events[0].entry.server, info.name);
  EXPECT_EQ(removed.events[0].entry.ns, ns);
}

TEST_P(DirectoryContractTest, ConcurrentPublishersGetUniqueIncreasingSeqs) {
  constexpr int kThreads = 4;
  constexpr uint64_t kPerThread = 50;
  ASSERT_TRUE(dir_->AnnounceServer(Server("s"), std::chrono::minutes(1)).ok());
  std::vector<std::unique_ptr<Directory>> own(kThreads);
  for (auto& d : own) {
    // Redis: one connection per thread, like separate processes. Embedded:
    // the instance is shared (it is process-local by definition).
    if (IsRedis()) {
      d = Open();
      ASSERT_NE(d, nullptr);
    }
  }
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      Directory* d = IsRedis() ? own[t].get() : dir_.get();
      for (uint64_t i = 0; i < kPerThread; ++i) {
        const uint64_t id = t * 1000 + i;
        if (!d->PublishRecord(Record("ns", id, "s")).ok()) ++failures;
        if (i % 5 == 4 && !d->RemoveRecord("ns", id, "s").ok()) ++failures;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);

  constexpr uint64_t kTotal = kThreads * (kPerThread + kPerThread / 5);
  EventBatch b = Events("ns", 0, 100000);
  EXPECT_FALSE(b.truncated);
  EXPECT_EQ(b.last_seq, kTotal);
  ASSERT_EQ(b.events.size(), kTotal);
  std::vector<uint64_t> last_seq_of_thread(kThreads, 0);
  std::vector<int64_t> last_id_of_thread(kThreads, -1);
  for (size_t i = 0; i < b.events.size(); ++i) {
    const DirectoryEvent& ev = b.events[i];
    EXPECT_EQ(ev.seq, i + 1);
    const int t = static_cast<int>(ev.entry.id / 1000);
    ASSERT_LT(t, kThreads);
    // Each thread's events appear in the order it issued them.
    EXPECT_GT(ev.seq, last_seq_of_thread[t]);
    last_seq_of_thread[t] = ev.seq;
    if (ev.kind == DirectoryEvent::Kind::kAdded) {
      EXPECT_GT(static_cast<int64_t>(ev.entry.id), last_id_of_thread[t]);
      last_id_of_thread[t] = static_cast<int64_t>(ev.entry.id);
    }
  }
  EXPECT_EQ(List("ns").size(), kThreads * (kPerThread - kPerThread / 5));
}

std::string BackendName(const ::testing::TestParamInfo<Backend>& info) {
  return info.param == Backend::kRedis ? "redis" : "embedded";
}

INSTANTIATE_TEST_SUITE_P(Embedded, DirectoryContractTest, ::testing::Values(Backend::kEmbedded),
                         BackendName);
// Test names start with "Redis": ctest gives them the extra label "redis".
INSTANTIATE_TEST_SUITE_P(Redis, DirectoryContractTest, ::testing::Values(Backend::kRedis),
                         BackendName);

TEST(OpenDirectoryTest, EmbeddedForms) {
  for (const char* url : {"", "embedded"}) {
    auto d = OpenDirectory(url);
    ASSERT_TRUE(d.ok()) << d.status().ToString();
    EXPECT_EQ((*d)->url(), "embedded");
  }
}

TEST(OpenDirectoryTest, RedisUrlParsesWithoutConnecting) {
  for (const char* url : {"redis://127.0.0.1:1", "redis://127.0.0.1:1/3", "redis://localhost",
                          "redis://[::1]:6379/0"}) {
    auto d = OpenDirectory(url);
    ASSERT_TRUE(d.ok()) << url << ": " << d.status().ToString();
    EXPECT_EQ((*d)->url(), url);
  }
}

TEST(OpenDirectoryTest, BadUrlsAreInvalidArgumentNamingAcceptedForms) {
  for (const char* url : {"redis:/x", "memcached://h:1", "Embedded", "redis://", "redis://:6379",
                          "redis://h:port", "redis://h:70000", "redis://h:0", "redis://h:1/db",
                          "redis://h:1/-1", "redis://user:pw@h:1", "redis://[::1"}) {
    auto d = OpenDirectory(url);
    ASSERT_FALSE(d.ok()) << url;
    EXPECT_EQ(d.status().code(), StatusCode::kInvalidArgument) << url;
    EXPECT_NE(d.status().message().find("redis://host:port[/db]"), std::string_view::npos)
        << d.status().ToString();
    EXPECT_NE(d.status().message().find(url), std::string_view::npos) << d.status().ToString();
  }
}

TEST(OpenDirectoryTest, UnreachableRedisIsUnavailableNamingUrl) {
  const std::string url = "redis://127.0.0.1:" + std::to_string(FreeLoopbackPort());
  auto d = OpenDirectory(url);
  ASSERT_TRUE(d.ok());
  Status s = (*d)->AnnounceServer(Server("s"), milliseconds(100));
  EXPECT_EQ(s.code(), StatusCode::kUnavailable);
  EXPECT_NE(s.message().find(url), std::string_view::npos) << s.ToString();
  auto l = (*d)->ListRecords("ns");
  EXPECT_EQ(l.status().code(), StatusCode::kUnavailable);
}

class RedisDirectoryTest : public ::testing::Test {
 protected:
  static constexpr milliseconds kTimeout{300};
  // Generous: a call makes at most a connect and a few round trips, each
  // bounded by kTimeout, but the machine may be busy.
  static constexpr auto kBound = std::chrono::seconds(5);

  void SetUp() override {
    if (auto why = RedisServer::MissingReason()) GTEST_SKIP() << *why;
    ASSERT_TRUE(redis_.Start());
    DirectoryOptions options;
    options.timeout = kTimeout;
    auto d = OpenDirectory(redis_.url(), options);
    ASSERT_TRUE(d.ok()) << d.status().ToString();
    dir_ = std::move(d).value();
  }

  // Runs every call once; each must return Unavailable naming the URL, in time.
  void ExpectEveryCallUnavailable() {
    auto check = [&](const char* what, auto&& call) {
      const auto start = Clock::now();
      Status s = call();
      const auto took = Clock::now() - start;
      EXPECT_EQ(s.code(), StatusCode::kUnavailable) << what << ": " << s.ToString();
      EXPECT_NE(s.message().find(dir_->url()), std::string_view::npos) << s.ToString();
      EXPECT_LT(took, kBound) << what << " hung";
    };
    check("AnnounceServer", [&] { return dir_->AnnounceServer(Server("s"), kTtl); });
    check("WithdrawServer", [&] { return dir_->WithdrawServer("s"); });
    check("LiveServers", [&] { return dir_->LiveServers().status(); });
    check("FindServer", [&] { return dir_->FindServer("s").status(); });
    check("PublishRecord", [&] { return dir_->PublishRecord(Record("ns", 1, "s")); });
    check("RemoveRecord", [&] { return dir_->RemoveRecord("ns", 1, "s"); });
    check("FindRecord", [&] { return dir_->FindRecord("ns", 1).status(); });
    check("ListRecords", [&] { return dir_->ListRecords("ns").status(); });
    check("EventsSince", [&] { return dir_->EventsSince("ns", 0, 10).status(); });
  }

  static constexpr milliseconds kTtl{std::chrono::minutes(1)};
  RedisServer redis_;
  std::unique_ptr<Directory> dir_;
};

TEST_F(RedisDirectoryTest, KilledServerIsUnavailableThenRecoversAfterRestart) {
  ASSERT_TRUE(dir_->AnnounceServer(Server("s"), kTtl).ok());
  ASSERT_TRUE(dir_->PublishRecord(Record("ns", 1, "s")).ok());
  ASSERT_TRUE(dir_->PublishRecord(Record("ns", 2, "s")).ok());

  const int port = redis_.port();
  redis_.Kill();
  ExpectEveryCallUnavailable();
  ExpectEveryCallUnavailable();  // still down: reconnect attempts fail cleanly

  ASSERT_TRUE(redis_.Start(port));
  // Same object, no reopen. Persistence is off, so the data is gone: the
  // server announces again and readers see that their history was lost.
  auto lost = dir_->FindRecord("ns", 1);
  ASSERT_TRUE(lost.ok()) << lost.status().ToString();
  EXPECT_FALSE(lost->has_value());
  auto events = dir_->EventsSince("ns", 2, 10);
  ASSERT_TRUE(events.ok());
  EXPECT_TRUE(events->truncated);
  EXPECT_EQ(dir_->PublishRecord(Record("ns", 1, "s")).code(), StatusCode::kFailedPrecondition);
  ASSERT_TRUE(dir_->AnnounceServer(Server("s"), kTtl).ok());
  ASSERT_TRUE(dir_->PublishRecord(Record("ns", 1, "s")).ok());
  auto found = dir_->FindRecord("ns", 1);
  ASSERT_TRUE(found.ok());
  EXPECT_EQ(*found, Record("ns", 1, "s"));
}

// A dead holder's record keys do not stay in Redis forever: the first
// LiveServers after its TTL (or its withdrawal) deletes what it still held,
// and leaves a record another server republished.
TEST_F(RedisDirectoryTest, DeadOrWithdrawnHoldersRecordKeysAreReaped) {
  Directory* dir = dir_.get();
  ASSERT_TRUE(dir->AnnounceServer(Server("dying"), milliseconds(300)).ok());
  ASSERT_TRUE(dir->AnnounceServer(Server("leaving"), milliseconds(60000)).ok());
  ASSERT_TRUE(dir->AnnounceServer(Server("heir"), milliseconds(60000)).ok());
  for (uint64_t id = 1; id <= 3; ++id)
    ASSERT_TRUE(dir->PublishRecord(Record("ns", id, "dying")).ok());
  ASSERT_TRUE(dir->PublishRecord(Record("ns", 4, "leaving")).ok());
  ASSERT_TRUE(dir->PublishRecord(Record("ns", 3, "heir")).ok());  // taken over
  const int port = redis_.port();
  auto exists = [port](const std::string& key) {
    return RawCommand(port, "EXISTS " + key).starts_with(":1");
  };
  ASSERT_TRUE(exists("relaykv:rec:ns:1"));
  ASSERT_TRUE(exists("relaykv:held:dying"));
  std::this_thread::sleep_for(milliseconds(450));
  ASSERT_TRUE(dir->LiveServers().ok());
  EXPECT_FALSE(exists("relaykv:rec:ns:1"));
  EXPECT_FALSE(exists("relaykv:rec:ns:2"));
  EXPECT_FALSE(exists("relaykv:held:dying"));
  EXPECT_TRUE(exists("relaykv:rec:ns:3"));  // the heir's copy stays
  ASSERT_TRUE(dir->WithdrawServer("leaving").ok());
  EXPECT_FALSE(exists("relaykv:rec:ns:4"));
  auto list = dir->ListRecords("ns");
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ((*list)[0].server, "heir");
  EXPECT_EQ(RawCommand(port, "SCARD relaykv:ids:ns").substr(0, 2), ":1");
}

TEST_F(RedisDirectoryTest, DatabasesAndKeyPrefixesAreSeparate) {
  ASSERT_TRUE(dir_->AnnounceServer(Server("s"), kTtl).ok());
  ASSERT_TRUE(dir_->PublishRecord(Record("ns", 1, "s")).ok());
  DirectoryOptions other_prefix;
  other_prefix.key_prefix = "other";
  const std::string db3 = "redis://127.0.0.1:" + std::to_string(redis_.port()) + "/3";
  for (auto [url, options] :
       {std::pair{redis_.url(), other_prefix}, std::pair{db3, DirectoryOptions{}}}) {
    auto d = OpenDirectory(url, options);
    ASSERT_TRUE(d.ok()) << d.status().ToString();
    auto live = (*d)->LiveServers();
    ASSERT_TRUE(live.ok()) << url << ": " << live.status().ToString();
    EXPECT_TRUE(live->empty()) << url << " " << options.key_prefix;
    auto rec = (*d)->FindRecord("ns", 1);
    ASSERT_TRUE(rec.ok());
    EXPECT_FALSE(rec->has_value());
    EXPECT_EQ((*d)->PublishRecord(Record("ns", 1, "s")).code(), StatusCode::kFailedPrecondition);
  }
}

TEST_F(RedisDirectoryTest, MissingDatabaseIsUnavailableNamingUrl) {
  // redis-server has 16 databases by default.
  const std::string url = "redis://127.0.0.1:" + std::to_string(redis_.port()) + "/99";
  auto d = OpenDirectory(url);
  ASSERT_TRUE(d.ok());
  Status s = (*d)->AnnounceServer(Server("s"), kTtl);
  EXPECT_EQ(s.code(), StatusCode::kUnavailable);
  EXPECT_NE(s.message().find(url), std::string_view::npos) << s.ToString();
  EXPECT_NE(s.message().find("SELECT"), std::string_view::npos) << s.ToString();
}

TEST_F(RedisDirectoryTest, FlushedScriptCacheIsReloaded) {
  ASSERT_TRUE(dir_->AnnounceServer(Server("s"), kTtl).ok());
  ASSERT_TRUE(RawCommand(redis_.port(), "SCRIPT FLUSH").starts_with("+OK"));
  Status s = dir_->PublishRecord(Record("ns", 1, "s"));
  ASSERT_TRUE(s.ok()) << s.ToString();
  auto found = dir_->FindRecord("ns", 1);
  ASSERT_TRUE(found.ok()) << found.status().ToString();
  EXPECT_EQ(*found, Record("ns", 1, "s"));
}

TEST_F(RedisDirectoryTest, HungServerTimesOutThenRecovers) {
  ASSERT_TRUE(dir_->AnnounceServer(Server("s"), kTtl).ok());
  ASSERT_TRUE(dir_->PublishRecord(Record("ns", 1, "s")).ok());
  // A stopped process keeps its socket: connects queue in the backlog and
  // replies never come, so only the timeouts end each call.
  redis_.Signal(SIGSTOP);
  Status s = dir_->FindRecord("ns", 1).status();
  EXPECT_NE(s.message().find("timeout"), std::string_view::npos) << s.ToString();
  ExpectEveryCallUnavailable();
  redis_.Signal(SIGCONT);
  // Replies to the timed-out commands may still arrive on the old
  // connections; the object must have dropped them and read fresh ones.
  auto found = dir_->FindRecord("ns", 1);
  ASSERT_TRUE(found.ok()) << found.status().ToString();
  EXPECT_EQ(*found, Record("ns", 1, "s"));
  auto live = dir_->LiveServers();
  ASSERT_TRUE(live.ok());
  EXPECT_EQ(live->size(), 1u);
}

}  // namespace
}  // namespace relaykv
