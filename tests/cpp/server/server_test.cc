// The store server as a real process (relaykv-store), reached by StoreClient
// and DistributedStore over TCP + UCX on loopback; Redis tests start a real
// redis-server and kill it.
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <memory>
#include <regex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "tests/cpp/testing/processes.h"
#include "transfer/record/record.h"
#include "transfer/server/protocol.h"
#include "transfer/server/store_client.h"

namespace relaykv {
namespace {

using namespace std::chrono_literals;
using ::relaykv::testing::ChildProcess;
using ::relaykv::testing::RedisServer;

constexpr const char* kToken = "s3cret-token";

RecordMeta Meta(std::string tenant = "team-a") {
  RecordMeta m;
  m.model_fingerprint = 0x5eedULL;
  m.layout = KvLayout{4, 2, 64, DType::kFloat16};
  m.rope.theta = 10000.f;
  m.tenant = std::move(tenant);
  return m;
}

// A complete, sealed record of `n` tokens whose bytes depend on `seed`.
RecordBuffer MakeRecord(const RecordMeta& meta, int32_t n, int32_t seed) {
  std::vector<int32_t> tokens(n), positions(n);
  for (int32_t i = 0; i < n; ++i) {
    tokens[i] = 1000 + seed * 7 + i;
    positions[i] = 5 + i;
  }
  RecordBuffer buf;
  buf.Resize(*RecordSize(meta, n));
  auto w = RecordWriter::Create(meta, tokens, positions, buf.data(), buf.size());
  EXPECT_TRUE(w.ok()) << w.status().ToString();
  const size_t payload = static_cast<size_t>(w->geometry().section(RecordSection::kKv).size);
  for (size_t i = 0; i < payload; ++i) w->payload()[i] = static_cast<uint8_t>(i * 31 + seed);
  w->Seal();
  return buf;
}

std::string Ns(const RecordMeta& m) { return RecordNamespaceKey(m); }

// A relaykv-store child process.
class StoreProcess {
 public:
  ::testing::AssertionResult Start(std::vector<std::string> extra = {},
                                   std::string directory = "embedded") {
    std::vector<std::string> argv = {RELAYKV_STORE_BINARY,
                                     "--name",
                                     "test",
                                     "--listen",
                                     "127.0.0.1:0",
                                     "--metrics-listen",
                                     "127.0.0.1:0",
                                     "--capacity",
                                     "16MiB",
                                     "--heartbeat-ms",
                                     "100",
                                     "--directory",
                                     directory};
    argv.insert(argv.end(), extra.begin(), extra.end());
    auto started = proc_.Start(argv, {{"RELAYKV_TOKEN", kToken}});
    if (!started) return started;
    auto line = proc_.WaitLine("relaykv-store ready");
    if (!line) return ::testing::AssertionFailure() << "store server did not become ready";
    std::smatch m;
    if (!std::regex_search(*line, m, std::regex("name=(\\S+) control=(\\S+) metrics=(\\S+)"))) {
      return ::testing::AssertionFailure() << "unparseable ready line: " << *line;
    }
    name_ = m[1];
    control_ = m[2];
    metrics_ = m[3];
    return ::testing::AssertionSuccess();
  }
  ChildProcess& proc() { return proc_; }
  const std::string& name() const { return name_; }
  const std::string& control() const { return control_; }
  const std::string& metrics() const { return metrics_; }

 private:
  ChildProcess proc_;
  std::string name_, control_, metrics_;
};

StoreClientOptions ClientOptions(std::string token = kToken) {
  StoreClientOptions o;
  o.token = std::move(token);
  o.timeout = 3000ms;
  return o;
}

// HTTP GET on the metrics endpoint: status line + body.
std::string HttpGet(const std::string& host_port, const std::string& path) {
  auto fd = wire::ConnectTcp(host_port, 2000ms);
  if (!fd.ok()) return "connect failed: " + fd.status().ToString();
  const std::string req = "GET " + path + " HTTP/1.1\r\nHost: x\r\n\r\n";
  (void)::send(*fd, req.data(), req.size(), MSG_NOSIGNAL);
  std::string out;
  char buf[4096];
  for (;;) {
    pollfd p{*fd, POLLIN, 0};
    if (::poll(&p, 1, 2000) <= 0) break;
    const ssize_t n = ::recv(*fd, buf, sizeof(buf), 0);
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  ::close(*fd);
  return out;
}

// The value of a metric line "name value" (or name{labels} value).
double MetricValue(const std::string& text, const std::string& series) {
  const size_t at = text.find("\n" + series + " ");
  if (at == std::string::npos) return -1;
  return std::stod(text.substr(at + series.size() + 2));
}

// sysv shared-memory segments attached to this process.
size_t SysvAttachments() {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  size_t n = 0;
  while (std::getline(maps, line)) n += line.find(" /SYSV") != std::string::npos;
  return n;
}

// A raw control connection's hello with `version`: the server's reply.
Result<std::string> RawHello(int fd, uint32_t version = wire::kProtocolVersion) {
  wire::Writer hello;
  hello.U8(static_cast<uint8_t>(wire::Op::kHello)).U32(version).Str(kToken).Str("raw");
  RELAYKV_RETURN_IF_ERROR(wire::SendFrame(fd, hello.Frame(), 2000ms));
  RELAYKV_ASSIGN_OR_RETURN(std::string body, wire::RecvFrame(fd, 2000ms));
  return wire::ParseReply(body, "hello");
}

class StoreServerTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_TRUE(server_.Start()); }
  std::unique_ptr<StoreClient> Client() {
    auto c = StoreClient::Connect(server_.control(), ClientOptions());
    EXPECT_TRUE(c.ok()) << c.status().ToString();
    return c.ok() ? std::move(*c) : nullptr;
  }
  StoreProcess server_;
};

TEST_F(StoreServerTest, PutThenGetReturnsTheSameBytes) {
  auto client = Client();
  ASSERT_NE(client, nullptr);
  EXPECT_EQ(client->server_name(), server_.name());
  const RecordMeta meta = Meta();
  const RecordBuffer rec = MakeRecord(meta, 300, 1);
  ASSERT_TRUE(client->Put(Ns(meta), 42, rec.bytes()).ok());
  RecordBuffer got;
  Status s = client->Get(Ns(meta), 42, &got);
  ASSERT_TRUE(s.ok()) << s.ToString();
  ASSERT_EQ(got.size(), rec.size());
  EXPECT_EQ(std::memcmp(got.data(), rec.data(), rec.size()), 0);
  auto view = ParseRecord(got.data(), got.size());
  ASSERT_TRUE(view.ok()) << view.status().ToString();
  EXPECT_EQ(view->num_tokens(), 300);
}

// Small records ride inside the control messages (one round trip each way);
// larger ones are copied one-sided, here through the mapped segment.
TEST_F(StoreServerTest, SmallRecordsTravelInlineLargeOnesOneSided) {
  StoreClientOptions o = ClientOptions();
  o.ucx_tls = "tcp,sysv";
  auto client = StoreClient::Connect(server_.control(), o);
  ASSERT_TRUE(client.ok()) << client.status().ToString();
  const RecordMeta meta = Meta();
  const RecordBuffer small = MakeRecord(meta, 16, 1);
  const RecordBuffer large = MakeRecord(meta, 64, 2);
  ASSERT_LE(small.size(), o.inline_bytes);
  ASSERT_GT(large.size(), o.inline_bytes);
  RecordBuffer got;
  ASSERT_TRUE((*client)->Put(Ns(meta), 1, small.bytes()).ok());
  ASSERT_TRUE((*client)->Get(Ns(meta), 1, &got).ok());
  ASSERT_EQ(got.size(), small.size());
  EXPECT_EQ(std::memcmp(got.data(), small.data(), small.size()), 0);
  EXPECT_EQ((*client)->inline_transfers(), 2u);
  EXPECT_EQ((*client)->mapped_transfers(), 0u);
  ASSERT_TRUE((*client)->Put(Ns(meta), 2, large.bytes()).ok());
  ASSERT_TRUE((*client)->Get(Ns(meta), 2, &got).ok());
  ASSERT_EQ(got.size(), large.size());
  EXPECT_EQ(std::memcmp(got.data(), large.data(), large.size()), 0);
  EXPECT_EQ((*client)->inline_transfers(), 2u);
  EXPECT_EQ((*client)->mapped_transfers(), 2u);
  // What one path wrote the other reads.
  auto other = [&](uint64_t inline_bytes) {
    StoreClientOptions p = o;
    p.inline_bytes = inline_bytes;
    return StoreClient::Connect(server_.control(), p);
  };
  auto one_sided = other(0);
  ASSERT_TRUE(one_sided.ok());
  ASSERT_TRUE((*one_sided)->Get(Ns(meta), 1, &got).ok());
  EXPECT_EQ(std::memcmp(got.data(), small.data(), small.size()), 0);
  auto all_inline = other(wire::kMaxInlineBytes);
  ASSERT_TRUE(all_inline.ok());
  ASSERT_TRUE((*all_inline)->Get(Ns(meta), 2, &got).ok());
  EXPECT_EQ(std::memcmp(got.data(), large.data(), large.size()), 0);
  EXPECT_EQ((*one_sided)->inline_transfers(), 0u);
  EXPECT_EQ((*all_inline)->inline_transfers(), 1u);
}

TEST_F(StoreServerTest, InlineLimitIsInclusiveAndZeroTurnsItOff) {
  const RecordMeta meta = Meta();
  const RecordBuffer rec = MakeRecord(meta, 8, 4);
  uint64_t id = 0;
  for (uint64_t limit : {uint64_t{rec.size()}, uint64_t{rec.size() - 1}, uint64_t{0}}) {
    SCOPED_TRACE(limit);
    StoreClientOptions o = ClientOptions();
    o.ucx_tls = "tcp,sysv";
    o.inline_bytes = limit;
    auto client = StoreClient::Connect(server_.control(), o);
    ASSERT_TRUE(client.ok()) << client.status().ToString();
    RecordBuffer got;
    ASSERT_TRUE((*client)->Put(Ns(meta), ++id, rec.bytes()).ok());
    ASSERT_TRUE((*client)->Get(Ns(meta), id, &got).ok());
    ASSERT_EQ(got.size(), rec.size());
    EXPECT_EQ(std::memcmp(got.data(), rec.data(), rec.size()), 0);
    const bool inline_path = limit >= rec.size();
    EXPECT_EQ((*client)->inline_transfers(), inline_path ? 2u : 0u);
    EXPECT_EQ((*client)->mapped_transfers(), inline_path ? 0u : 2u);
  }
}

// A record near the protocol's cap crosses the socket in many pieces both
// ways (the server's partial reads and sends), twice in a row on one
// connection.
TEST_F(StoreServerTest, MultiMegabyteInlineRecordsArriveWhole) {
  StoreClientOptions o = ClientOptions();
  o.inline_bytes = wire::kMaxInlineBytes;
  auto client = StoreClient::Connect(server_.control(), o);
  ASSERT_TRUE(client.ok()) << client.status().ToString();
  const RecordMeta meta = Meta();
  for (int32_t seed : {11, 12}) {
    const RecordBuffer rec = MakeRecord(meta, 1900, seed);
    ASSERT_GT(rec.size(), 3u << 20);
    ASSERT_LE(rec.size(), wire::kMaxInlineBytes);
    RecordBuffer got;
    ASSERT_TRUE((*client)->Put(Ns(meta), static_cast<uint64_t>(seed), rec.bytes()).ok());
    ASSERT_TRUE((*client)->Get(Ns(meta), static_cast<uint64_t>(seed), &got).ok());
    ASSERT_EQ(got.size(), rec.size());
    EXPECT_EQ(std::memcmp(got.data(), rec.data(), rec.size()), 0);
  }
  EXPECT_EQ((*client)->inline_transfers(), 4u);
}

TEST(StoreClientStart, InlineLimitBeyondAFrameIsRefused) {
  StoreClientOptions o = ClientOptions();
  o.inline_bytes = wire::kMaxInlineBytes + 1;
  // Refused before any connection is tried (nothing listens there).
  auto client = StoreClient::Connect("127.0.0.1:1", o);
  ASSERT_FALSE(client.ok());
  EXPECT_EQ(client.status().code(), StatusCode::kInvalidArgument) << client.status().ToString();
}

// Both put paths check the record the same way before anything is listed.
TEST_F(StoreServerTest, InlineAndOneSidedPutsAreVerifiedAlike) {
  const RecordMeta meta = Meta();
  uint64_t id = 100;
  for (uint64_t limit : {uint64_t{wire::kMaxInlineBytes}, uint64_t{0}}) {
    SCOPED_TRACE(limit);
    StoreClientOptions o = ClientOptions();
    o.inline_bytes = limit;
    auto client = StoreClient::Connect(server_.control(), o);
    ASSERT_TRUE(client.ok()) << client.status().ToString();
    RecordBuffer got;
    RecordBuffer corrupt = MakeRecord(meta, 8, 5);
    corrupt.data()[40] ^= 0x40;  // inside the header
    EXPECT_EQ((*client)->Put(Ns(meta), ++id, corrupt.bytes()).code(), StatusCode::kDataLoss);
    EXPECT_EQ((*client)->Get(Ns(meta), id, &got).code(), StatusCode::kNotFound);
    const RecordBuffer other_tenant = MakeRecord(Meta("team-b"), 8, 6);
    EXPECT_EQ((*client)->Put(Ns(meta), ++id, other_tenant.bytes()).code(),
              StatusCode::kInvalidArgument);
    EXPECT_EQ((*client)->Get(Ns(meta), id, &got).code(), StatusCode::kNotFound);
    const RecordBuffer rec = MakeRecord(meta, 8, 7);
    ASSERT_TRUE((*client)->Put(Ns(meta), ++id, rec.bytes()).ok());
    EXPECT_EQ((*client)->Put(Ns(meta), id, rec.bytes()).code(), StatusCode::kAlreadyExists);
    // Only the one successful put counts.
    EXPECT_EQ((*client)->inline_transfers(), limit > 0 ? 1u : 0u);
  }
}

// A get sends its release without waiting for the answer; the answers are
// read with the next call's, which must still get its own reply.
TEST_F(StoreServerTest, ReleasesAreNotWaitedForYetLeaveNoLease) {
  StoreClientOptions o = ClientOptions();
  o.inline_bytes = 0;
  auto client = StoreClient::Connect(server_.control(), o);
  ASSERT_TRUE(client.ok());
  const RecordMeta meta = Meta();
  const RecordBuffer rec = MakeRecord(meta, 32, 8);
  ASSERT_TRUE((*client)->Put(Ns(meta), 1, rec.bytes()).ok());
  RecordBuffer got;
  for (int i = 0; i < 5; ++i) ASSERT_TRUE((*client)->Get(Ns(meta), 1, &got).ok()) << i;
  auto stats = (*client)->Stats();
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  EXPECT_NE(stats->find("leases 0"), std::string::npos) << *stats;
  EXPECT_NE(stats->find("records 1"), std::string::npos) << *stats;
  ASSERT_TRUE((*client)->Get(Ns(meta), 1, &got).ok());
  EXPECT_TRUE((*client)->Delete(Ns(meta), 1).ok());
  EXPECT_EQ((*client)->Get(Ns(meta), 1, &got).code(), StatusCode::kNotFound);
  EXPECT_TRUE((*client)->healthy());
}

// Version 2 added kPut and kRead; version-1 clients are still served.
TEST_F(StoreServerTest, ProtocolVersionsOneAndTwoAreServedOthersRefused) {
  const RecordMeta meta = Meta();
  auto client = Client();
  ASSERT_NE(client, nullptr);
  ASSERT_TRUE(client->Put(Ns(meta), 4, MakeRecord(meta, 8, 9).bytes()).ok());
  for (uint32_t version : {0u, 1u, 2u, 3u}) {
    SCOPED_TRACE(version);
    auto fd = wire::ConnectTcp(server_.control(), 2000ms);
    ASSERT_TRUE(fd.ok());
    auto reply = RawHello(*fd, version);
    if (version == 1 || version == 2) {
      ASSERT_TRUE(reply.ok()) << reply.status().ToString();
      wire::Writer lease;
      lease.U8(static_cast<uint8_t>(wire::Op::kLease)).Str(Ns(meta)).U64(4);
      ASSERT_TRUE(wire::SendFrame(*fd, lease.Frame(), 2000ms).ok());
      EXPECT_TRUE(wire::ParseReply(*wire::RecvFrame(*fd, 2000ms), "lease").ok());
    } else {
      EXPECT_EQ(reply.status().code(), StatusCode::kFailedPrecondition)
          << reply.status().ToString();
    }
    ::close(*fd);
  }
}

// Shared segments (the default) are sysv memory a client on this host maps:
// with sysv among its wires, even with UCX's peer failure detection (which
// leaves tcp as the only UCX lane), put and get copy through the mapping.
// Private segments are moved by UCX. The bytes are the same either way.
TEST(StoreServerSegments, SharedSegmentsAreCopiedThroughAMappingPrivateOnesAreNot) {
  struct Case {
    const char* what;
    std::vector<std::string> flags;
    bool mapped;
  };
  const Case cases[] = {
      {"shared segments", {}, true},
      {"private segments", {"--no-shared-segments"}, false},
      // A server whose UCX has no sysv gets ordinary memory from UCX.
      {"server on tcp only", {"--ucx-tls", "tcp"}, false},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    const bool shared = c.mapped;
    StoreProcess server;
    ASSERT_TRUE(server.Start(c.flags));
    StoreClientOptions o = ClientOptions();
    o.ucx_tls = "tcp,sysv";
    o.inline_bytes = 0;  // always one-sided
    auto client = StoreClient::Connect(server.control(), o);
    ASSERT_TRUE(client.ok()) << client.status().ToString();
    const RecordMeta meta = Meta();
    const RecordBuffer rec = MakeRecord(meta, 500, 3);
    ASSERT_TRUE((*client)->Put(Ns(meta), 5, rec.bytes()).ok());
    RecordBuffer got;
    Status s = (*client)->Get(Ns(meta), 5, &got);
    ASSERT_TRUE(s.ok()) << s.ToString();
    ASSERT_EQ(got.size(), rec.size());
    EXPECT_EQ(std::memcmp(got.data(), rec.data(), rec.size()), 0);
    EXPECT_EQ((*client)->mapped_transfers(), shared ? 2u : 0u);
  }
}

TEST_F(StoreServerTest, SecondClientReadsWhatTheFirstWrote) {
  auto writer = Client();
  auto reader = Client();
  ASSERT_TRUE(writer && reader);
  const RecordMeta meta = Meta();
  const RecordBuffer rec = MakeRecord(meta, 64, 2);
  ASSERT_TRUE(writer->Put(Ns(meta), 7, rec.bytes()).ok());
  RecordBuffer got;
  ASSERT_TRUE(reader->Get(Ns(meta), 7, &got).ok());
  EXPECT_EQ(std::memcmp(got.data(), rec.data(), rec.size()), 0);
}

TEST_F(StoreServerTest, WrongTokenIsRefusedAndCounted) {
  auto c = StoreClient::Connect(server_.control(), ClientOptions("wrong"));
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), StatusCode::kPermissionDenied) << c.status().ToString();
  const std::string metrics = HttpGet(server_.metrics(), "/metrics");
  EXPECT_EQ(MetricValue(metrics, "relaykv_store_auth_failures_total"), 1) << metrics;
}

TEST_F(StoreServerTest, RequestsBeforeHelloAreRefused) {
  auto fd = wire::ConnectTcp(server_.control(), 2000ms);
  ASSERT_TRUE(fd.ok());
  wire::Writer w;
  w.U8(static_cast<uint8_t>(wire::Op::kLease)).Str("ns").U64(1);
  ASSERT_TRUE(wire::SendFrame(*fd, w.Frame(), 2000ms).ok());
  auto body = wire::RecvFrame(*fd, 2000ms);
  ASSERT_TRUE(body.ok());
  EXPECT_EQ(wire::ParseReply(*body, "lease").status().code(), StatusCode::kPermissionDenied);
  ::close(*fd);
}

// Sends a frame header announcing `len` bytes: the server must answer
// InvalidArgument and close the connection.
void ExpectRefusedAndClosed(int fd, uint32_t len) {
  ASSERT_TRUE(
      wire::SendFrame(fd, std::string_view(reinterpret_cast<const char*>(&len), 4), 2000ms).ok());
  auto body = wire::RecvFrame(fd, 2000ms);
  ASSERT_TRUE(body.ok()) << body.status().ToString();
  EXPECT_EQ(wire::ParseReply(*body, "oversized").status().code(), StatusCode::kInvalidArgument);
  char c;
  pollfd p{fd, POLLIN, 0};
  ASSERT_EQ(::poll(&p, 1, 2000), 1);
  EXPECT_EQ(::recv(fd, &c, 1, 0), 0);  // closed by the server
}

// A frame announced beyond the limit is refused before it is buffered:
// before the token anything larger than a hello, after it anything beyond
// the protocol's frame size.
TEST_F(StoreServerTest, OversizedFrameIsRefusedAndTheConnectionClosed) {
  for (bool authed : {false, true}) {
    SCOPED_TRACE(authed);
    auto fd = wire::ConnectTcp(server_.control(), 2000ms);
    ASSERT_TRUE(fd.ok());
    uint32_t len = 1u << 20;  // fine for a record, not for a hello
    if (authed) {
      ASSERT_TRUE(RawHello(*fd).ok());
      len = wire::kMaxFrameBytes + 1;
    }
    ExpectRefusedAndClosed(*fd, len);
    ::close(*fd);
  }
}

TEST_F(StoreServerTest, CorruptHeaderIsRejectedAtSealAndNeverServed) {
  auto client = Client();
  ASSERT_NE(client, nullptr);
  const RecordMeta meta = Meta();
  RecordBuffer rec = MakeRecord(meta, 100, 3);
  rec.data()[40] ^= 0x40;  // inside the header
  Status s = client->Put(Ns(meta), 9, rec.bytes());
  EXPECT_EQ(s.code(), StatusCode::kDataLoss) << s.ToString();
  RecordBuffer got;
  EXPECT_EQ(client->Get(Ns(meta), 9, &got).code(), StatusCode::kNotFound);
}

TEST_F(StoreServerTest, CorruptPayloadIsLeftToTheImporterByDefault) {
  auto client = Client();
  ASSERT_NE(client, nullptr);
  const RecordMeta meta = Meta();
  RecordBuffer rec = MakeRecord(meta, 100, 3);
  rec.data()[rec.size() - 100] ^= 0x40;  // inside the KV payload
  ASSERT_TRUE(client->Put(Ns(meta), 9, rec.bytes()).ok());
  RecordBuffer got;
  ASSERT_TRUE(client->Get(Ns(meta), 9, &got).ok());
  auto view = ParseRecord(got.data(), got.size());
  EXPECT_EQ(view.status().code(), StatusCode::kDataLoss);  // what every import runs
}

TEST(StoreServerVerify, VerifyPayloadRejectsCorruptPayloadAtSeal) {
  StoreProcess server;
  ASSERT_TRUE(server.Start({"--verify-payload"}));
  auto client = StoreClient::Connect(server.control(), ClientOptions());
  ASSERT_TRUE(client.ok());
  const RecordMeta meta = Meta();
  RecordBuffer rec = MakeRecord(meta, 100, 3);
  rec.data()[rec.size() - 100] ^= 0x40;
  EXPECT_EQ((*client)->Put(Ns(meta), 9, rec.bytes()).code(), StatusCode::kDataLoss);
  RecordBuffer got;
  EXPECT_EQ((*client)->Get(Ns(meta), 9, &got).code(), StatusCode::kNotFound);
}

TEST_F(StoreServerTest, RecordMustMatchItsNamespace) {
  auto client = Client();
  ASSERT_NE(client, nullptr);
  const RecordBuffer rec = MakeRecord(Meta("team-a"), 32, 4);
  Status s = client->Put(Ns(Meta("team-b")), 1, rec.bytes());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
}

TEST_F(StoreServerTest, TenantsDoNotSeeEachOthersRecords) {
  auto client = Client();
  ASSERT_NE(client, nullptr);
  const RecordBuffer rec = MakeRecord(Meta("team-a"), 32, 5);
  ASSERT_TRUE(client->Put(Ns(Meta("team-a")), 11, rec.bytes()).ok());
  RecordBuffer got;
  EXPECT_EQ(client->Get(Ns(Meta("team-b")), 11, &got).code(), StatusCode::kNotFound);
  EXPECT_TRUE(client->Get(Ns(Meta("team-a")), 11, &got).ok());
}

TEST_F(StoreServerTest, DuplicatePutIsAlreadyExists) {
  auto client = Client();
  ASSERT_NE(client, nullptr);
  const RecordMeta meta = Meta();
  const RecordBuffer rec = MakeRecord(meta, 32, 6);
  ASSERT_TRUE(client->Put(Ns(meta), 5, rec.bytes()).ok());
  EXPECT_EQ(client->Put(Ns(meta), 5, rec.bytes()).code(), StatusCode::kAlreadyExists);
}

TEST_F(StoreServerTest, FullStoreEvictsLeastRecentlyUsedAndCountsIt) {
  auto client = Client();
  ASSERT_NE(client, nullptr);
  const RecordMeta meta = Meta();
  // ~1 MiB records into a 16 MiB store: the first ones must go.
  const int32_t tokens = (1 << 20) / static_cast<int32_t>(2 * 4 * meta.layout.TokenBytes());
  for (uint64_t id = 1; id <= 24; ++id) {
    const RecordBuffer rec = MakeRecord(meta, tokens, static_cast<int32_t>(id));
    Status s = client->Put(Ns(meta), id, rec.bytes());
    ASSERT_TRUE(s.ok()) << id << ": " << s.ToString();
  }
  RecordBuffer got;
  EXPECT_EQ(client->Get(Ns(meta), 1, &got).code(), StatusCode::kNotFound);
  EXPECT_TRUE(client->Get(Ns(meta), 24, &got).ok());
  const std::string metrics = HttpGet(server_.metrics(), "/metrics");
  EXPECT_GT(MetricValue(metrics, "relaykv_store_evictions_total"), 0) << metrics;
  EXPECT_EQ(MetricValue(metrics, "relaykv_store_puts_total"), 24) << metrics;
}

TEST_F(StoreServerTest, TooLargeRecordIsResourceExhausted) {
  auto client = Client();
  ASSERT_NE(client, nullptr);
  const RecordMeta meta = Meta();
  const RecordBuffer rec = MakeRecord(meta, 20000, 7);  // > 16 MiB
  EXPECT_EQ(client->Put(Ns(meta), 1, rec.bytes()).code(), StatusCode::kResourceExhausted);
}

TEST_F(StoreServerTest, AClientThatDiesDropsItsLeases) {
  auto client = Client();
  ASSERT_NE(client, nullptr);
  const RecordMeta meta = Meta();
  ASSERT_TRUE(client->Put(Ns(meta), 3, MakeRecord(meta, 16, 8).bytes()).ok());
  {
    // A raw connection that leases and vanishes without releasing.
    auto fd = wire::ConnectTcp(server_.control(), 2000ms);
    ASSERT_TRUE(fd.ok());
    ASSERT_TRUE(RawHello(*fd).ok());
    wire::Writer lease;
    lease.U8(static_cast<uint8_t>(wire::Op::kLease)).Str(Ns(meta)).U64(3);
    ASSERT_TRUE(wire::SendFrame(*fd, lease.Frame(), 2000ms).ok());
    ASSERT_TRUE(wire::ParseReply(*wire::RecvFrame(*fd, 2000ms), "lease").ok());
    auto stats = client->Stats();
    ASSERT_TRUE(stats.ok());
    EXPECT_NE(stats->find("leases 1"), std::string::npos) << *stats;
    ::close(*fd);
  }
  const auto deadline = std::chrono::steady_clock::now() + 5s;
  std::string stats;
  while (std::chrono::steady_clock::now() < deadline) {
    stats = *client->Stats();
    if (stats.find("leases 0") != std::string::npos) break;
    std::this_thread::sleep_for(10ms);
  }
  EXPECT_NE(stats.find("leases 0"), std::string::npos) << stats;
}

TEST_F(StoreServerTest, MetricsHealthAndReadiness) {
  EXPECT_NE(HttpGet(server_.metrics(), "/healthz").find("200 OK"), std::string::npos);
  // The embedded directory always answers, so the server announces at once.
  std::string ready;
  for (int i = 0; i < 100; ++i) {
    ready = HttpGet(server_.metrics(), "/readyz");
    if (ready.find("200 OK") != std::string::npos) break;
    std::this_thread::sleep_for(20ms);
  }
  EXPECT_NE(ready.find("200 OK"), std::string::npos) << ready;
  const std::string m = HttpGet(server_.metrics(), "/metrics");
  EXPECT_NE(m.find("# TYPE relaykv_store_capacity_bytes gauge"), std::string::npos) << m;
  EXPECT_EQ(MetricValue(m, "relaykv_store_capacity_bytes"), 16 << 20);
  EXPECT_NE(HttpGet(server_.metrics(), "/nope").find("404"), std::string::npos);
}

TEST_F(StoreServerTest, ServerDeathDuringUseFailsFastNotHangs) {
  StoreClientOptions o = ClientOptions();
  o.ucx_tls = "tcp,sysv";  // maps the server's segment
  auto connected = StoreClient::Connect(server_.control(), o);
  ASSERT_TRUE(connected.ok()) << connected.status().ToString();
  auto client = std::move(*connected);
  const RecordMeta meta = Meta();
  ASSERT_TRUE(client->Put(Ns(meta), 1, MakeRecord(meta, 64, 9).bytes()).ok());
  ASSERT_EQ(client->mapped_transfers(), 1u);
  const size_t attached = SysvAttachments();
  server_.proc().Kill();
  const auto t0 = std::chrono::steady_clock::now();
  RecordBuffer got;
  Status s = client->Get(Ns(meta), 1, &got);
  EXPECT_FALSE(s.ok());
  EXPECT_TRUE(s.code() == StatusCode::kUnavailable || s.code() == StatusCode::kDeadlineExceeded)
      << s.ToString();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 4s);
  EXPECT_FALSE(client->healthy());
  // The dead server's segment is no longer attached here (it would keep its
  // memory alive), and later calls fail at once.
  EXPECT_LT(SysvAttachments(), attached);
  EXPECT_EQ(client->Put(Ns(meta), 2, MakeRecord(meta, 8, 1).bytes()).code(),
            StatusCode::kUnavailable);
  EXPECT_EQ(client->Get(Ns(meta), 1, &got).code(), StatusCode::kUnavailable);
}

TEST(StoreServerStart, RefusesToStartWithoutAToken) {
  ChildProcess p;
  ASSERT_TRUE(p.Start({RELAYKV_STORE_BINARY, "--listen", "127.0.0.1:0", "--metrics-listen", "",
                       "--capacity", "1MiB"},
                      {}, /*quiet=*/true));
  auto status = p.Wait(20s);
  ASSERT_TRUE(status.has_value());
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 2);
}

TEST(StoreServerStart, BadCapacityNamesTheFlag) {
  ChildProcess p;
  ASSERT_TRUE(p.Start({RELAYKV_STORE_BINARY, "--capacity", "lots"}, {{"RELAYKV_TOKEN", "t"}}));
  auto status = p.Wait(20s);
  ASSERT_TRUE(status.has_value());
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 2);
}

// ---- with a Redis directory -----------------------------------------------------

class RedisStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (auto why = RedisServer::MissingReason()) GTEST_SKIP() << *why;
    ASSERT_TRUE(redis_.Start());
  }
  std::unique_ptr<DistributedStore> Open() {
    DistributedStoreOptions o;
    o.directory = redis_.url();
    o.client = ClientOptions();
    o.server_refresh = 0ms;
    auto s = DistributedStore::Open(o);
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    return s.ok() ? std::move(*s) : nullptr;
  }
  // Waits until `pred` holds (directory state changes are asynchronous).
  template <typename Pred>
  bool Eventually(Pred pred, std::chrono::milliseconds limit = 5s) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < deadline) {
      if (pred()) return true;
      std::this_thread::sleep_for(20ms);
    }
    return pred();
  }
  RedisServer redis_;
};

TEST_F(RedisStoreTest, PutAndGetThroughTheDirectory) {
  StoreProcess a, b;
  ASSERT_TRUE(a.Start({}, redis_.url()));
  ASSERT_TRUE(b.Start({}, redis_.url()));
  auto store = Open();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(Eventually([&] {
    auto live = store->directory().LiveServers();
    return live.ok() && live->size() == 2;
  }));
  const RecordMeta meta = Meta();
  std::vector<RecordBuffer> recs;
  for (int i = 0; i < 8; ++i) {
    recs.push_back(MakeRecord(meta, 50, i));
    Status s = store->Put(Ns(meta), 100 + i, recs.back().bytes());
    ASSERT_TRUE(s.ok()) << s.ToString();
  }
  // Records spread over both servers and are found by a second client.
  auto other = Open();
  std::set<std::string> holders;
  for (int i = 0; i < 8; ++i) {
    ASSERT_TRUE(Eventually([&] {
      auto e = other->directory().FindRecord(Ns(meta), 100 + i);
      return e.ok() && e->has_value();
    }));
    holders.insert((*other->directory().FindRecord(Ns(meta), 100 + i))->server);
    RecordBuffer got;
    Status s = other->Get(Ns(meta), 100 + i, &got);
    ASSERT_TRUE(s.ok()) << s.ToString();
    EXPECT_EQ(std::memcmp(got.data(), recs[i].data(), got.size()), 0);
    // The directory also carries the tokens, for remote span indexes.
    EXPECT_EQ((*other->directory().FindRecord(Ns(meta), 100 + i))->tokens.size(), 50u);
  }
  EXPECT_EQ(holders.size(), 2u);
}

TEST_F(RedisStoreTest, APutIsListedWhenItReturns) {
  // A writer that got OK may at once send a reader on another machine to the
  // record: no waiting for the server's directory thread to catch up.
  StoreProcess a;
  ASSERT_TRUE(a.Start({}, redis_.url()));
  auto writer = Open();
  auto reader = Open();
  ASSERT_TRUE(Eventually([&] {
    auto live = writer->directory().LiveServers();
    return live.ok() && live->size() == 1;
  }));
  const RecordMeta meta = Meta();
  for (int i = 0; i < 20; ++i) {
    ASSERT_TRUE(writer->Put(Ns(meta), 500 + i, MakeRecord(meta, 30, i).bytes()).ok());
    auto e = reader->directory().FindRecord(Ns(meta), 500 + i);
    ASSERT_TRUE(e.ok() && e->has_value()) << "record " << i << " not listed on return";
    RecordBuffer got;
    ASSERT_TRUE(reader->Get(Ns(meta), 500 + i, &got).ok());
  }
}

TEST_F(RedisStoreTest, SealDuringDirectoryOutageIsUnavailableThenListedOnRecovery) {
  StoreProcess a;
  ASSERT_TRUE(a.Start({}, redis_.url()));
  auto store = Open();
  ASSERT_TRUE(Eventually([&] {
    auto live = store->directory().LiveServers();
    return live.ok() && live->size() == 1;
  }));
  // A client on the server itself: it needs no directory to reach it.
  auto client = StoreClient::Connect(a.control(), ClientOptions());
  ASSERT_TRUE(client.ok()) << client.status().ToString();
  const int port = redis_.port();
  redis_.Kill();
  const RecordMeta meta = Meta();
  const auto t0 = std::chrono::steady_clock::now();
  Status s = (*client)->Put(Ns(meta), 77, MakeRecord(meta, 40, 3).bytes());
  EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s.ToString();
  EXPECT_NE(s.message().find("directory"), std::string::npos) << s.ToString();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 3s);
  // The record was stored; once Redis is back the server lists it.
  ASSERT_TRUE(redis_.Start(port));
  EXPECT_TRUE(Eventually(
      [&] {
        auto e = store->directory().FindRecord(Ns(meta), 77);
        return e.ok() && e->has_value();
      },
      10s));
  RecordBuffer got;
  EXPECT_TRUE(store->Get(Ns(meta), 77, &got).ok());
}

TEST_F(RedisStoreTest, DeadServersRecordsVanishAfterItsHeartbeat) {
  StoreProcess a;
  ASSERT_TRUE(a.Start({}, redis_.url()));
  auto store = Open();
  const RecordMeta meta = Meta();
  ASSERT_TRUE(Eventually([&] {
    return store->directory().FindServer(a.name()).ok() &&
           store->directory().FindServer(a.name())->has_value();
  }));
  ASSERT_TRUE(store->Put(Ns(meta), 1, MakeRecord(meta, 40, 1).bytes()).ok());
  ASSERT_TRUE(Eventually([&] {
    auto e = store->directory().FindRecord(Ns(meta), 1);
    return e.ok() && e->has_value();
  }));
  a.proc().Kill();  // no goodbye: only the TTL (3 x 100 ms) removes it
  EXPECT_TRUE(Eventually(
      [&] {
        auto e = store->directory().FindRecord(Ns(meta), 1);
        return e.ok() && !e->has_value();
      },
      3s));
  RecordBuffer got;
  EXPECT_EQ(store->Get(Ns(meta), 1, &got).code(), StatusCode::kNotFound);
}

TEST_F(RedisStoreTest, GracefulShutdownWithdrawsAtOnce) {
  StoreProcess a;
  ASSERT_TRUE(a.Start({"--heartbeat-ms", "5000"}, redis_.url()));
  auto store = Open();
  ASSERT_TRUE(Eventually([&] {
    auto s = store->directory().FindServer(a.name());
    return s.ok() && s->has_value();
  }));
  a.proc().Signal(SIGTERM);
  ASSERT_TRUE(a.proc().Wait(10s).has_value());
  auto s = store->directory().FindServer(a.name());
  ASSERT_TRUE(s.ok());
  EXPECT_FALSE(s->has_value());  // long before the 15 s TTL
}

TEST_F(RedisStoreTest, DirectoryOutageFallsBackAndRecovers) {
  StoreProcess a;
  ASSERT_TRUE(a.Start({}, redis_.url()));
  auto store = Open();
  const RecordMeta meta = Meta();
  ASSERT_TRUE(Eventually([&] {
    auto live = store->directory().LiveServers();
    return live.ok() && live->size() == 1;
  }));
  ASSERT_TRUE(store->Put(Ns(meta), 1, MakeRecord(meta, 40, 1).bytes()).ok());
  ASSERT_TRUE(Eventually([&] {
    auto e = store->directory().FindRecord(Ns(meta), 1);
    return e.ok() && e->has_value();
  }));
  const int port = redis_.port();
  redis_.Kill();
  RecordBuffer got;
  const auto t0 = std::chrono::steady_clock::now();
  Status s = store->Get(Ns(meta), 1, &got);
  EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s.ToString();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s);
  EXPECT_TRUE(Eventually([&] {
    const std::string m = HttpGet(a.metrics(), "/metrics");
    return MetricValue(m, "relaykv_store_directory_up") == 0;
  }));
  EXPECT_NE(HttpGet(a.metrics(), "/readyz").find("503"), std::string::npos);
  // A restarted Redis has lost everything; the server re-announces and
  // republishes what it holds.
  ASSERT_TRUE(redis_.Start(port));
  EXPECT_TRUE(Eventually([&] { return store->Get(Ns(meta), 1, &got).ok(); }, 10s));
  EXPECT_EQ(MetricValue(HttpGet(a.metrics(), "/metrics"), "relaykv_store_directory_up"), 1);
}

}  // namespace
}  // namespace relaykv
