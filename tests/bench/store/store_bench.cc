// Embedded store put/get throughput and latency for 4 KB, 1 MB and 16 MB
// records, each beside a plain memcpy of the same bytes over a working set of
// the same size, in the same run.
//
//   put          Reserve + memcpy into the record + Seal, in steady state
//                (the store is full, so every put also evicts LRU records)
//   get          Get + memcpy out of the record + lease release, random order
//   put_meta /   the same without the memcpy: the store's fixed cost per record
//   get_meta     (bookkeeping only, so its metadata stays warmer in cache)
//   memcpy_put / memcpy of the same bytes into / out of a plain buffer as
//   memcpy_get   large as the store (memcpy_get in random slot order too)
//
// Usage: store_bench [--capacity-mb N] [--quick]
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "bench_util.h"
#include "transfer/store/embedded_store.h"

namespace relaykv {
namespace {

using bench::JsonLine;
using bench::NowSeconds;

}  // namespace

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "store_bench: %s\n", what.c_str());
  std::exit(1);
}

namespace {

struct Timing {
  std::vector<double> us;  // per-op latency
  double total_s = 0;
};

struct Summary {
  double gbps = 0;
};

Summary Report(std::string_view op, uint64_t record_bytes, const Timing& t, double baseline_gbps,
               const StoreStats* stats, bool copies) {
  Summary out;
  const double bytes = static_cast<double>(record_bytes) * static_cast<double>(t.us.size());
  out.gbps = bytes / t.total_s / 1e9;
  JsonLine line("store");
  line.Str("op", op)
      .Int("record_bytes", static_cast<int64_t>(record_bytes))
      .Int("iters", static_cast<int64_t>(t.us.size()))
      .Num("ops_per_s", static_cast<double>(t.us.size()) / t.total_s)
      .Num("p50_us", bench::Median(t.us))
      .Num("p99_us", bench::Percentile(t.us, 0.99));
  if (copies) line.Num("gbps", out.gbps);
  if (copies && baseline_gbps > 0) line.Num("vs_memcpy", out.gbps / baseline_gbps);
  if (stats != nullptr) {
    line.Int("evictions", static_cast<int64_t>(stats->evictions))
        .Int("records", static_cast<int64_t>(stats->records));
  }
  line.Print();
  return out;
}

void RunSize(uint64_t record_bytes, uint64_t capacity, bool quick, std::byte* arena) {
  const uint64_t budget = quick ? (uint64_t{256} << 20) : (uint64_t{4} << 30);
  const uint64_t iters =
      std::max<uint64_t>(quick ? 16 : 64, std::min<uint64_t>(budget / record_bytes, 200000));

  StoreOptions options;
  options.capacity_bytes = capacity;
  options.alignment = 4096;
  options.prefault = true;
  auto created = EmbeddedStore::Create(options);
  if (!created.ok()) Die(created.status().ToString());
  EmbeddedStore& store = **created;

  std::vector<std::byte> src(record_bytes), dst(record_bytes);
  for (uint64_t i = 0; i < record_bytes; ++i) src[i] = std::byte(i * 131 % 251);
  std::memset(dst.data(), 0, dst.size());
  // The baseline cycles through as many slots as the store holds records, so
  // both sides copy to and from memory that is equally cold.
  const uint64_t slots = std::max<uint64_t>(1, capacity * 8 / 10 / record_bytes);

  RecordId next_id = 0;
  auto put_one = [&](bool copy) {
    auto h = store.Reserve(next_id++, record_bytes);
    if (!h.ok()) Die(h.status().ToString());
    if (copy) std::memcpy(h->data(), src.data(), record_bytes);
    if (Status s = h->Seal(); !s.ok()) Die(s.ToString());
  };
  // Warm-up: fill the store past its high watermark so timed puts evict.
  while (store.Stats().evictions == 0 || next_id < 2 * slots) put_one(true);

  auto time_loop = [&](auto&& body) {
    Timing t;
    t.us.reserve(iters);
    const double start = NowSeconds();
    for (uint64_t i = 0; i < iters; ++i) {
      const double t0 = NowSeconds();
      body(i);
      t.us.push_back((NowSeconds() - t0) * 1e6);
    }
    t.total_s = NowSeconds() - start;
    return t;
  };

  const Timing memcpy_put = time_loop([&](uint64_t i) {
    std::memcpy(arena + (i % slots) * record_bytes, src.data(), record_bytes);
  });
  const Summary base_put = Report("memcpy_put", record_bytes, memcpy_put, 0, nullptr, true);
  const Timing put = time_loop([&](uint64_t) { put_one(true); });
  StoreStats stats = store.Stats();
  Report("put", record_bytes, put, base_put.gbps, &stats, true);

  // Reads pick records in a fixed random order, and the memcpy baseline picks
  // its slots the same way: a cache is read in no particular order, and
  // sequential reads would flatter whichever side the prefetcher helps more.
  const uint64_t live = store.Stats().records;
  std::mt19937_64 rng(42);
  std::vector<uint64_t> order(std::max(live, slots));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<uint64_t> live_order, slot_order;
  for (uint64_t k : order) {
    if (k < live) live_order.push_back(k);
    if (k < slots) slot_order.push_back(k);
  }
  auto get_one = [&](uint64_t i, bool copy) {
    const RecordId id = next_id - live + live_order[i % live];
    auto lease = store.Get(id);
    if (!lease.ok()) Die(lease.status().ToString());
    if (copy) std::memcpy(dst.data(), lease->data(), record_bytes);
    bench::DoNotOptimize(dst[record_bytes - 1]);
  };
  const Timing memcpy_get = time_loop([&](uint64_t i) {
    std::memcpy(dst.data(), arena + slot_order[i % slots] * record_bytes, record_bytes);
    bench::DoNotOptimize(dst[record_bytes - 1]);
  });
  const Summary base_get = Report("memcpy_get", record_bytes, memcpy_get, 0, nullptr, true);
  const Timing get = time_loop([&](uint64_t i) { get_one(i, true); });
  stats = store.Stats();
  Report("get", record_bytes, get, base_get.gbps, &stats, true);
  if (std::memcmp(dst.data(), src.data(), record_bytes) != 0) Die("get returned wrong bytes");

  const Timing get_meta = time_loop([&](uint64_t i) { get_one(i, false); });
  const Timing put_meta = time_loop([&](uint64_t) { put_one(false); });
  Report("put_meta", record_bytes, put_meta, 0, nullptr, false);
  Report("get_meta", record_bytes, get_meta, 0, nullptr, false);
}

}  // namespace
}  // namespace relaykv

int main(int argc, char** argv) {
  uint64_t capacity_mb = 256;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--quick") {
      quick = true;
    } else if (arg == "--capacity-mb" && i + 1 < argc) {
      capacity_mb = std::strtoull(argv[++i], nullptr, 10);
    } else {
      std::fprintf(stderr, "usage: store_bench [--capacity-mb N] [--quick]\n");
      return 2;
    }
  }
  const uint64_t capacity = capacity_mb << 20;
  if (capacity < (uint64_t{64} << 20)) {
    std::fprintf(stderr, "store_bench: --capacity-mb must be >= 64 (16 MB records)\n");
    return 2;
  }
  // The baseline buffer is as large as the store and backed the same way (a
  // prefaulted Segment, huge pages where the kernel gives them), so the two
  // sides differ only in what the store does around the memcpy.
  auto arena = relaykv::Segment::Create(capacity, 4096, relaykv::MemoryKind::kHost, true);
  if (!arena.ok()) relaykv::Die(arena.status().ToString());
  for (uint64_t record_bytes : {uint64_t{4} << 10, uint64_t{1} << 20, uint64_t{16} << 20}) {
    relaykv::RunSize(record_bytes, capacity, quick, (*arena)->base());
  }
  return 0;
}
