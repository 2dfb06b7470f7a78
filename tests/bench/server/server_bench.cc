// Store server export/import bandwidth and fixed cost, through a real
// relaykv-store process on loopback.
//
// For records of ~1 MB, 16 MB and 256 MB it reports, in one run:
//   memcpy and raw TCP socket copy of the same bytes (baselines.h);
//   put (export: reserve, one-sided write, flush, seal with the server's
//   verification) and get (import: lease, one-sided read, release sent
//   without waiting) over UCX tcp and UCX shared memory, and for the ~1 MB
//   record also inline (one put or read message carrying the bytes; rows
//   with "inline": true);
// and the fixed cost of a small (~9 KB) record: put and get median µs, with
// the record inside the control messages (the default), one-sided, and
// inline without spinning for replies ("spin": false).
// One JSON object per line on stdout.
#include <cstdio>
#include <regex>
#include <span>
#include <string>
#include <vector>

#include "baselines.h"
#include "bench_util.h"
#include "tests/cpp/testing/processes.h"
#include "transfer/record/record.h"
#include "transfer/server/protocol.h"
#include "transfer/server/store_client.h"

namespace relaykv {
namespace {

using bench::JsonLine;
using bench::Median;
using bench::NowSeconds;

constexpr const char* kToken = "bench-token";

// A big-model-like layout: 32 layers x 8 KV heads x 128 dims, fp16
// (128 KiB of K+V per token).
RecordMeta BigMeta() {
  RecordMeta m;
  m.model_fingerprint = 1;
  m.layout = KvLayout{32, 8, 128, DType::kFloat16};
  m.rope.theta = 500000.f;
  m.tenant = "bench";
  return m;
}
RecordMeta SmallMeta() {
  RecordMeta m = BigMeta();
  m.layout = KvLayout{2, 2, 64, DType::kFloat16};
  return m;
}

RecordBuffer MakeRecord(const RecordMeta& meta, int32_t tokens, int32_t seed) {
  std::vector<int32_t> ids(tokens), pos(tokens);
  for (int32_t i = 0; i < tokens; ++i) ids[i] = seed * 100000 + i, pos[i] = i;
  RecordBuffer buf;
  buf.Resize(*RecordSize(meta, tokens));
  auto w = RecordWriter::Create(meta, ids, pos, buf.data(), buf.size());
  std::memset(w->payload(), seed & 0xff, w->geometry().section(RecordSection::kKv).size);
  w->Seal();
  return buf;
}

struct Server {
  testing::ChildProcess proc;
  std::string control;
};

bool StartServer(Server& s, const std::string& tls, bool shared_segments) {
  std::vector<std::string> args = {
      RELAYKV_STORE_BINARY, "--listen", "127.0.0.1:0", "--metrics-listen", "", "--capacity", "1GiB",
      "--ucx-tls",          tls};
  if (!shared_segments) args.push_back("--no-shared-segments");
  if (!s.proc.Start(args, {{"RELAYKV_TOKEN", kToken}})) return false;
  auto line = s.proc.WaitLine("relaykv-store ready", std::chrono::seconds(60));
  std::smatch m;
  if (!line || !std::regex_search(*line, m, std::regex("control=(\\S+)"))) return false;
  s.control = m[1];
  return true;
}

// Clients measured side by side on one server.
struct Way {
  StoreClient* client;
  std::vector<double> put, get;
};

// `rounds` rounds of put + get of `rec`, the ways interleaved so that each
// sees the same machine; the first `warmup` rounds are not recorded. Every
// get must return the bytes put.
Status RoundTrips(std::span<Way> ways, const std::string& ns, const RecordBuffer& rec, int rounds,
                  int warmup, uint64_t& next_id) {
  RecordBuffer out;
  for (int i = 0; i < rounds; ++i) {
    for (Way& w : ways) {
      const uint64_t id = next_id++;
      double t0 = NowSeconds();
      RELAYKV_RETURN_IF_ERROR(w.client->Put(ns, id, rec.bytes()));
      const double t_put = NowSeconds() - t0;
      t0 = NowSeconds();
      RELAYKV_RETURN_IF_ERROR(w.client->Get(ns, id, &out));
      const double t_get = NowSeconds() - t0;
      if (out.size() != rec.size() || std::memcmp(out.data(), rec.data(), rec.size()) != 0) {
        return DataLoss("read back different bytes");
      }
      if (i >= warmup) w.put.push_back(t_put), w.get.push_back(t_get);
    }
  }
  return Status::Ok();
}

void BenchStore(const char* path, const std::string& tls, bool peer_errors,
                bool shared_segments = true) {
  // RELAYKV_BENCH_ONLY=<path> runs one row set (profiling one path alone).
  if (const char* only = std::getenv("RELAYKV_BENCH_ONLY"); only && std::string(only) != path)
    return;
  Server server;
  if (!StartServer(server, tls, shared_segments)) {
    JsonLine("server").Str("path", path).Str("error", "store server did not start").Print();
    return;
  }
  StoreClientOptions o;
  o.token = kToken;
  o.ucx_tls = tls;
  o.ucx_peer_error_handling = peer_errors;
  o.timeout = std::chrono::seconds(60);
  // The default client (records up to 64 KiB inline), beside clients that
  // never and always (up to the protocol's cap) send records inline: what
  // the default's choice is measured against, in the same run.
  auto client = StoreClient::Connect(server.control, o);
  // A fourth sleeps for every reply at once (no reply_spin).
  StoreClientOptions one_sided_options = o, inline_options = o, sleeping_options = o;
  one_sided_options.inline_bytes = 0;
  inline_options.inline_bytes = wire::kMaxInlineBytes;
  sleeping_options.reply_spin = std::chrono::microseconds(0);
  auto one_sided = StoreClient::Connect(server.control, one_sided_options);
  auto all_inline = StoreClient::Connect(server.control, inline_options);
  auto sleeping = StoreClient::Connect(server.control, sleeping_options);
  for (auto* c : {&client, &one_sided, &all_inline, &sleeping}) {
    if (!c->ok()) {
      JsonLine("server").Str("path", path).Str("error", c->status().ToString()).Print();
      return;
    }
  }
  const RecordMeta big = BigMeta();
  const std::string ns = RecordNamespaceKey(big);
  uint64_t next_id = 1;
  for (uint64_t target : bench::kSizes) {
    const auto tokens = static_cast<int32_t>(target / (2 * 32 * big.layout.TokenBytes()));
    const RecordBuffer rec = MakeRecord(big, tokens, 1);
    // Every size here is above the default's limit; the ones that fit a
    // message are also measured inline.
    std::vector<Way> ways = {{client->get(), {}, {}}};
    const bool fits = rec.size() <= wire::kMaxInlineBytes;
    if (fits) ways.push_back({all_inline->get(), {}, {}});
    // The first round warms up.
    if (Status s = RoundTrips(ways, ns, rec, bench::Reps(target) + 1, 1, next_id); !s.ok()) {
      JsonLine("server").Str("path", path).Str("error", s.ToString()).Print();
      return;
    }
    for (const Way& w : ways) {
      const bool in = w.client == all_inline->get();
      for (auto [op, v] : {std::pair{"put", &w.put}, std::pair{"get", &w.get}}) {
        const double secs = Median(*v);
        JsonLine("server")
            .Str("path", path)
            .Str("op", op)
            .Bool("inline", in)
            .Int("bytes", static_cast<int64_t>(rec.size()))
            .Int("reps", static_cast<int64_t>(v->size()))
            .Num("median_ms", secs * 1e3)
            .Num("gbps", static_cast<double>(rec.size()) / secs / 1e9)
            .Print();
      }
    }
  }
  // Fixed cost: a record of a few KB, where the round trips dominate; carried
  // inside the control messages (the default) and one-sided, side by side.
  const RecordMeta small = SmallMeta();
  const std::string small_ns = RecordNamespaceKey(small);
  const RecordBuffer rec = MakeRecord(small, 8, 2);
  Way ways[] = {{client->get(), {}, {}}, {one_sided->get(), {}, {}}, {sleeping->get(), {}, {}}};
  if (Status s = RoundTrips(ways, small_ns, rec, 220, 20, next_id); !s.ok()) {
    JsonLine("server").Str("path", path).Str("error", s.ToString()).Print();
    return;
  }
  for (Way& w : ways) {
    for (auto [op, v] : {std::pair{"put_small", &w.put}, std::pair{"get_small", &w.get}}) {
      JsonLine("server")
          .Str("path", path)
          .Str("op", op)
          .Bool("inline", w.client != one_sided->get())
          .Bool("spin", w.client != sleeping->get())
          .Int("bytes", static_cast<int64_t>(rec.size()))
          .Int("reps", static_cast<int64_t>(v->size()))
          .Num("p50_us", Median(*v) * 1e6)
          .Num("p90_us", bench::Percentile(*v, 0.9) * 1e6)
          .Print();
    }
  }
}

}  // namespace
}  // namespace relaykv

int main() {
  using namespace relaykv;  // NOLINT
  {
    auto src = bench::Buffer(bench::kMax);
    auto dst = bench::Buffer(bench::kMax);
    std::memset(src->base(), 7, bench::kMax);
    bench::BenchMemcpy("server", reinterpret_cast<uint8_t*>(src->base()),
                       reinterpret_cast<uint8_t*>(dst->base()));
    bench::BenchRawTcp("server", reinterpret_cast<uint8_t*>(src->base()));
  }
  BenchStore("store_ucx_tcp", "tcp", true);
  // UCX keeps posix/sysv shm only without peer failure detection (transport
  // README). Private segments: UCX moves the bytes with cma; shared (sysv)
  // segments: the client copies through its mapping of them.
  BenchStore("store_ucx_shm_private", "posix,sysv,cma", false, false);
  BenchStore("store_ucx_shm", "posix,sysv,cma", false);
  // With peer failure detection UCX keeps only tcp, but the client still maps
  // the shared segments: bytes by memcpy, control and flushes over tcp.
  BenchStore("store_ucx_tcp_sysv", "tcp,sysv", true);
  return 0;
}
