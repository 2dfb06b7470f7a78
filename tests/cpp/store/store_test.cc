#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "transfer/common/status.h"
#include "transfer/store/embedded_store.h"
#include "transfer/store/segment_allocator.h"

namespace relaykv {
namespace {

using std::chrono::seconds;

bool Contains(std::string_view haystack, std::string_view needle) {
  return haystack.find(needle) != std::string_view::npos;
}

// ---------------------------------------------------------------------------
// SegmentAllocator

TEST(SegmentAllocatorTest, CreateValidatesAndRoundsCapacityDown) {
  EXPECT_EQ(SegmentAllocator::Create(1024, 3).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(SegmentAllocator::Create(1024, 0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(SegmentAllocator::Create(63, 64).status().code(), StatusCode::kInvalidArgument);
  auto a = SegmentAllocator::Create(1000, 64);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  EXPECT_EQ(a->capacity(), 960u);
  EXPECT_EQ(a->free_bytes(), 960u);
  EXPECT_EQ(a->largest_free(), 960u);
  EXPECT_EQ(a->num_free_ranges(), 1u);
}

TEST(SegmentAllocatorTest, AllocatesAlignedRangesAndRejectsBadRequests) {
  auto a = *SegmentAllocator::Create(4096, 64);
  EXPECT_EQ(a.Allocate(0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(a.Allocate(4097).status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(a.Allocate(~uint64_t{0}).status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(*a.Allocate(1), 0u);
  EXPECT_EQ(a.AllocatedSize(0), 64u);
  EXPECT_EQ(*a.Allocate(65), 64u);
  EXPECT_EQ(a.AllocatedSize(64), 128u);
  EXPECT_EQ(a.used_bytes(), 192u);
  EXPECT_EQ(a.num_allocations(), 2u);
  EXPECT_TRUE(a.Fits(4096 - 192));
  EXPECT_FALSE(a.Fits(4096 - 191));
  EXPECT_EQ(*a.Allocate(4096 - 192), 192u);
  EXPECT_EQ(a.free_bytes(), 0u);
  auto full = a.Allocate(1);
  ASSERT_EQ(full.status().code(), StatusCode::kResourceExhausted);
  EXPECT_TRUE(Contains(full.status().message(), "no free range of 64 bytes"));
  EXPECT_TRUE(a.CheckInvariants().ok()) << a.CheckInvariants().ToString();
}

TEST(SegmentAllocatorTest, FreeRejectsUnknownOffsetsAndDoubleFree) {
  auto a = *SegmentAllocator::Create(4096, 64);
  const uint64_t x = *a.Allocate(256);
  EXPECT_EQ(a.Free(x + 64).code(), StatusCode::kInvalidArgument);  // inside, not a start
  EXPECT_EQ(a.Free(1024).code(), StatusCode::kInvalidArgument);    // free space
  EXPECT_TRUE(a.Free(x).ok());
  EXPECT_EQ(a.Free(x).code(), StatusCode::kInvalidArgument);  // double free
  EXPECT_EQ(a.used_bytes(), 0u);
  EXPECT_TRUE(a.CheckInvariants().ok());
}

TEST(SegmentAllocatorTest, CoalescesBothNeighbours) {
  auto a = *SegmentAllocator::Create(192, 64);
  const uint64_t x = *a.Allocate(64), y = *a.Allocate(64), z = *a.Allocate(64);
  EXPECT_EQ(a.num_free_ranges(), 0u);
  ASSERT_TRUE(a.Free(x).ok());
  ASSERT_TRUE(a.Free(z).ok());
  EXPECT_EQ(a.num_free_ranges(), 2u);
  EXPECT_EQ(a.largest_free(), 64u);
  EXPECT_FALSE(a.Fits(128));
  ASSERT_TRUE(a.Free(y).ok());
  using Ranges = std::vector<std::pair<uint64_t, uint64_t>>;
  EXPECT_EQ(a.FreeRanges(), (Ranges{{0, 192}}));
  EXPECT_TRUE(a.CheckInvariants().ok());
}

TEST(SegmentAllocatorTest, BestFitAndFirstFitChooseDifferentHoles) {
  for (FitPolicy policy : {FitPolicy::kBestFit, FitPolicy::kFirstFit}) {
    auto a = *SegmentAllocator::Create(512, 64, policy);
    // Layout: [0,128) hole, [128,256) used, [256,320) hole, [320,512) used.
    const uint64_t h1 = *a.Allocate(128);
    ASSERT_TRUE(a.Allocate(128).ok());
    const uint64_t h2 = *a.Allocate(64);
    ASSERT_TRUE(a.Allocate(192).ok());
    ASSERT_TRUE(a.Free(h1).ok());
    ASSERT_TRUE(a.Free(h2).ok());
    const uint64_t got = *a.Allocate(64);
    EXPECT_EQ(got, policy == FitPolicy::kBestFit ? 256u : 0u) << FitPolicyName(policy);
    EXPECT_TRUE(a.CheckInvariants().ok());
  }
}

// Random allocate/free against a plain model: every range in bounds, aligned,
// disjoint from every other live range; a failure only when no gap fits; and
// everything coalesces back into one range at the end.
void RunAllocatorModel(FitPolicy policy, uint64_t alignment, uint32_t seed) {
  SCOPED_TRACE(std::string(FitPolicyName(policy)) + " alignment " + std::to_string(alignment) +
               " seed " + std::to_string(seed));
  const uint64_t capacity = 256 * alignment + 3;  // not a multiple: the tail is unusable
  auto a = *SegmentAllocator::Create(capacity, alignment, policy);
  ASSERT_EQ(a.capacity(), 256 * alignment);
  std::map<uint64_t, uint64_t> live;  // offset -> aligned size
  std::mt19937 rng(seed);
  auto model_largest_gap = [&] {
    uint64_t prev_end = 0, largest = 0;
    for (const auto& [off, size] : live) {
      largest = std::max(largest, off - prev_end);
      prev_end = off + size;
    }
    return std::max(largest, a.capacity() - prev_end);
  };
  for (int step = 0; step < 20000; ++step) {
    const bool alloc = live.empty() || rng() % 100 < 55;
    if (alloc) {
      const uint64_t bytes = 1 + rng() % (24 * alignment);
      const uint64_t aligned = (bytes + alignment - 1) / alignment * alignment;
      const uint64_t gap = model_largest_gap();
      auto r = a.Allocate(bytes);
      if (!r.ok()) {
        ASSERT_EQ(r.status().code(), StatusCode::kResourceExhausted);
        ASSERT_LT(gap, aligned) << "allocation failed although a gap fits, step " << step;
        continue;
      }
      const uint64_t off = *r;
      ASSERT_EQ(off % alignment, 0u);
      ASSERT_LE(off + aligned, a.capacity());
      auto next = live.lower_bound(off);
      if (next != live.end()) {
        ASSERT_LE(off + aligned, next->first) << "overlap, step " << step;
      }
      if (next != live.begin()) {
        auto prev = std::prev(next);
        ASSERT_LE(prev->first + prev->second, off) << "overlap, step " << step;
      }
      live.emplace(off, aligned);
    } else {
      auto it = live.begin();
      std::advance(it, rng() % live.size());
      ASSERT_TRUE(a.Free(it->first).ok());
      live.erase(it);
    }
    uint64_t used = 0;
    for (const auto& [off, size] : live) used += size;
    ASSERT_EQ(a.used_bytes(), used);
    ASSERT_EQ(a.largest_free(), model_largest_gap());
    if (step % 512 == 0) {
      ASSERT_TRUE(a.CheckInvariants().ok()) << a.CheckInvariants().ToString();
    }
  }
  ASSERT_TRUE(a.CheckInvariants().ok()) << a.CheckInvariants().ToString();
  for (const auto& [off, size] : live) ASSERT_TRUE(a.Free(off).ok());
  EXPECT_EQ(a.num_free_ranges(), 1u);
  EXPECT_EQ(a.largest_free(), a.capacity());
  EXPECT_EQ(a.used_bytes(), 0u);
  EXPECT_TRUE(a.CheckInvariants().ok());
}

TEST(SegmentAllocatorTest, RandomSequencesMatchModel) {
  for (FitPolicy policy : {FitPolicy::kBestFit, FitPolicy::kFirstFit}) {
    for (uint64_t alignment : {uint64_t{64}, uint64_t{4096}}) {
      for (uint32_t seed : {1u, 2u, 3u}) RunAllocatorModel(policy, alignment, seed);
    }
  }
}

TEST(SegmentTest, HostSegmentIsAlignedAndWritable) {
  for (uint64_t alignment : {uint64_t{64}, uint64_t{4096}, uint64_t{2} << 20}) {
    auto s = Segment::Create(3 << 20, alignment, MemoryKind::kHost, /*populate=*/true);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    const Segment& seg = **s;
    EXPECT_EQ(seg.size(), uint64_t{3} << 20);
    EXPECT_EQ(seg.kind(), MemoryKind::kHost);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(seg.base()) % alignment, 0u);
    std::memset(seg.base(), 0xab, seg.size());
    EXPECT_EQ(seg.base()[seg.size() - 1], std::byte{0xab});
  }
  EXPECT_EQ(Segment::Create(0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(Segment::Create(4096, 96).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(Segment::Create(4096, 64, MemoryKind::kCudaDevice).status().code(),
            StatusCode::kUnimplemented);
}

TEST(SegmentTest, AdoptedMemoryIsFreedByItsOwnerNotTheSegment) {
  auto backing = Segment::Create(1 << 20, 4096);
  ASSERT_TRUE(backing.ok());
  std::byte* base = (*backing)->base();
  bool released = false;
  std::shared_ptr<void> owner(nullptr, [&released](void*) { released = true; });
  auto s = Segment::Adopt(base, 1 << 20, 4096, MemoryKind::kHost, owner, /*populate=*/true);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  owner.reset();
  EXPECT_FALSE(released) << "the segment must keep its memory's owner alive";
  EXPECT_EQ((*s)->base(), base);
  EXPECT_EQ((*s)->size(), uint64_t{1} << 20);
  s->reset();
  EXPECT_TRUE(released);
  base[0] = std::byte{1};  // still mapped: the adopted segment did not unmap it
  EXPECT_EQ(Segment::Adopt(base + 64, 4096, 4096, MemoryKind::kHost, nullptr).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(Segment::Adopt(nullptr, 4096, 64, MemoryKind::kHost, nullptr).status().code(),
            StatusCode::kInvalidArgument);
}

// ---------------------------------------------------------------------------
// EmbeddedStore helpers

class ManualClock {
 public:
  std::chrono::steady_clock::time_point Now() const { return now_.load(); }
  void Advance(std::chrono::nanoseconds d) { now_.store(now_.load() + d); }
  StoreClock AsStoreClock() {
    return [this] { return Now(); };
  }

 private:
  std::atomic<std::chrono::steady_clock::time_point> now_{std::chrono::steady_clock::time_point{}};
};

// Records every removal the listener reports.
class RemovalLog {
 public:
  RemovalListener Listener() {
    return [this](RecordId id, RemovalReason reason) {
      std::lock_guard<std::mutex> lock(mu_);
      events_.emplace_back(id, reason);
    };
  }
  std::vector<std::pair<RecordId, RemovalReason>> Take() {
    std::lock_guard<std::mutex> lock(mu_);
    return std::exchange(events_, {});
  }

 private:
  std::mutex mu_;
  std::vector<std::pair<RecordId, RemovalReason>> events_;
};
using Events = std::vector<std::pair<RecordId, RemovalReason>>;

StoreOptions Options(uint64_t capacity, double high = 1.0, double low = 1.0) {
  StoreOptions o;
  o.capacity_bytes = capacity;
  o.high_watermark = high;
  o.low_watermark = low;
  return o;
}

std::unique_ptr<EmbeddedStore> MakeStore(StoreOptions options) {
  auto s = EmbeddedStore::Create(std::move(options));
  EXPECT_TRUE(s.ok()) << s.status().ToString();
  return s.ok() ? std::move(s).value() : nullptr;
}

Status Put(EmbeddedStore& store, RecordId id, uint64_t bytes, uint8_t fill,
           std::optional<std::chrono::nanoseconds> ttl = std::nullopt) {
  auto h = ttl ? store.Reserve(id, bytes, *ttl) : store.Reserve(id, bytes);
  if (!h.ok()) return h.status();
  std::memset(h->data(), fill, h->size());
  return h->Seal();
}

// Reads record `id` and checks every byte equals `fill`.
::testing::AssertionResult HasContent(EmbeddedStore& store, RecordId id, uint8_t fill) {
  auto lease = store.Get(id);
  if (!lease.ok()) return ::testing::AssertionFailure() << lease.status().ToString();
  for (uint64_t i = 0; i < lease->size(); ++i) {
    if (lease->data()[i] != std::byte{fill}) {
      return ::testing::AssertionFailure() << "record " << id << " byte " << i << " differs";
    }
  }
  return ::testing::AssertionSuccess();
}

// ---------------------------------------------------------------------------
// EmbeddedStore

TEST(EmbeddedStoreTest, OptionsAreValidatedByName) {
  auto expect_bad = [](StoreOptions o, std::string_view key) {
    auto s = EmbeddedStore::Create(std::move(o));
    ASSERT_EQ(s.status().code(), StatusCode::kInvalidArgument);
    EXPECT_TRUE(Contains(s.status().message(), key)) << s.status().ToString();
  };
  expect_bad(Options(0), "capacity_bytes");
  expect_bad(Options(1 << 20, 0.5, 0.6), "low_watermark");
  expect_bad(Options(1 << 20, 1.5, 0.6), "high_watermark");
  StoreOptions o = Options(1 << 20);
  o.alignment = 48;
  expect_bad(o, "alignment");
  o = Options(1 << 20);
  o.num_segments = 0;
  expect_bad(o, "num_segments");
  o = Options(1 << 20);
  o.memory_kind = MemoryKind::kCudaDevice;
  EXPECT_EQ(EmbeddedStore::Create(o).status().code(), StatusCode::kUnimplemented);
}

TEST(EmbeddedStoreTest, ReserveWriteSealGetRoundTrip) {
  StoreOptions o = Options(1 << 20);
  o.alignment = 4096;
  auto store = MakeStore(o);
  auto h = store->Reserve(7, 10000);
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  EXPECT_EQ(h->id(), 7u);
  EXPECT_EQ(h->size(), 10000u);
  EXPECT_EQ(h->segment(), 0u);
  EXPECT_EQ(h->data(), store->segment(0).base() + h->offset());
  EXPECT_EQ(reinterpret_cast<uintptr_t>(h->data()) % 4096, 0u);
  for (uint64_t i = 0; i < h->size(); ++i) h->data()[i] = std::byte(i * 31 % 251);
  const uint64_t offset = h->offset();
  ASSERT_TRUE(h->Seal().ok());
  EXPECT_FALSE(h->valid());

  auto lease = store->Get(7);
  ASSERT_TRUE(lease.ok()) << lease.status().ToString();
  EXPECT_EQ(lease->id(), 7u);
  EXPECT_EQ(lease->size(), 10000u);
  EXPECT_EQ(lease->offset(), offset);
  EXPECT_EQ(lease->segment(), 0u);
  for (uint64_t i = 0; i < lease->size(); ++i) {
    ASSERT_EQ(lease->data()[i], std::byte(i * 31 % 251)) << i;
  }
  const StoreStats s = store->Stats();
  EXPECT_EQ(s.records, 1u);
  EXPECT_EQ(s.payload_bytes, 10000u);
  EXPECT_EQ(s.bytes_used, 12288u);  // three 4096-byte units
  EXPECT_EQ(s.leases, 1u);
}

TEST(EmbeddedStoreTest, SegmentFactoryProvidesEverySegment) {
  StoreOptions o = Options(4 << 20);
  o.num_segments = 2;
  o.alignment = 4096;
  std::vector<std::unique_ptr<Segment>> backing;
  std::vector<uint32_t> asked;
  o.segment_factory = [&](uint64_t bytes, uint32_t index) -> Result<std::unique_ptr<Segment>> {
    asked.push_back(index);
    RELAYKV_ASSIGN_OR_RETURN(auto b, Segment::Create(bytes, 4096));
    std::byte* base = b->base();
    backing.push_back(std::move(b));
    return Segment::Adopt(base, bytes, 4096, MemoryKind::kHost, nullptr);
  };
  auto store = MakeStore(o);
  EXPECT_EQ(asked, (std::vector<uint32_t>{0, 1}));
  ASSERT_EQ(store->num_segments(), 2u);
  EXPECT_EQ(store->segment(1).base(), backing[1]->base());
  auto h = store->Reserve(1, 3 << 20);  // too big for a 2 MiB segment
  EXPECT_EQ(h.status().code(), StatusCode::kResourceExhausted);
  h = store->Reserve(1, 1 << 20);
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  EXPECT_TRUE(h->Seal().ok());

  // A factory that hands back less than asked is refused, not trusted.
  o.segment_factory = [](uint64_t bytes, uint32_t) { return Segment::Create(bytes / 2, 4096); };
  auto bad = EmbeddedStore::Create(o);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kInternal) << bad.status().ToString();
}

TEST(EmbeddedStoreTest, UnsealedRecordIsInvisible) {
  auto store = MakeStore(Options(1 << 20));
  auto h = store->Reserve(1, 100);
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(store->Get(1).status().code(), StatusCode::kNotFound);
  EXPECT_FALSE(store->Contains(1));
  EXPECT_EQ(store->Delete(1).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(store->Stats().pending, 1u);
  EXPECT_EQ(store->Stats().records, 0u);
  ASSERT_TRUE(h->Seal().ok());
  EXPECT_TRUE(store->Contains(1));
  EXPECT_TRUE(store->Get(1).ok());
  EXPECT_EQ(store->Stats().misses, 1u);
  EXPECT_EQ(store->Stats().hits, 1u);
}

TEST(EmbeddedStoreTest, DuplicateIdIsAlreadyExists) {
  auto store = MakeStore(Options(1 << 20));
  auto h = store->Reserve(1, 100);
  ASSERT_TRUE(h.ok());
  auto pending_dup = store->Reserve(1, 100);
  EXPECT_EQ(pending_dup.status().code(), StatusCode::kAlreadyExists);
  EXPECT_TRUE(Contains(pending_dup.status().message(), "being written"));
  ASSERT_TRUE(h->Seal().ok());
  EXPECT_EQ(store->Reserve(1, 50).status().code(), StatusCode::kAlreadyExists);
  EXPECT_EQ(store->Stats().rejected_puts, 2u);
  EXPECT_EQ(store->Stats().records, 1u);
}

TEST(EmbeddedStoreTest, OversizedPutFailsClearly) {
  auto store = MakeStore(Options(1 << 20));
  auto r = store->Reserve(1, (1 << 20) + 1);
  ASSERT_EQ(r.status().code(), StatusCode::kResourceExhausted);
  EXPECT_TRUE(
      Contains(r.status().message(), "record of 1048577 bytes exceeds store capacity 1048576"))
      << r.status().ToString();
  EXPECT_EQ(store->Reserve(2, ~uint64_t{0}).status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(store->Reserve(3, 0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Put(*store, 4, 1 << 20, 1).ok());  // exactly the capacity fits
  EXPECT_EQ(store->Stats().rejected_puts, 3u);
}

TEST(EmbeddedStoreTest, RecordMustFitOneSegment) {
  StoreOptions o = Options(8192);
  o.num_segments = 2;
  auto store = MakeStore(o);
  ASSERT_EQ(store->num_segments(), 2u);
  EXPECT_EQ(store->max_record_bytes(), 4096u);
  auto r = store->Reserve(1, 4097);
  ASSERT_EQ(r.status().code(), StatusCode::kResourceExhausted);
  EXPECT_TRUE(Contains(r.status().message(), "exceeds the segment size 4096"));
  auto a = store->Reserve(1, 4096);
  auto b = store->Reserve(2, 4096);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_NE(a->segment(), b->segment());
  EXPECT_EQ(b->data(), store->segment(b->segment()).base() + b->offset());
}

TEST(EmbeddedStoreTest, EvictsLeastRecentlyUsedAndGetProtects) {
  RemovalLog log;
  StoreOptions o = Options(8 * 1024);
  o.on_removal = log.Listener();
  auto store = MakeStore(o);
  for (RecordId id = 1; id <= 8; ++id) ASSERT_TRUE(Put(*store, id, 1024, uint8_t(id)).ok());
  EXPECT_EQ(store->Stats().evictions, 0u);
  ASSERT_TRUE(store->Get(1).ok());  // touch 1: now 2 is the least recent
  ASSERT_TRUE(Put(*store, 9, 1024, 9).ok());
  ASSERT_TRUE(Put(*store, 10, 1024, 10).ok());
  EXPECT_EQ(log.Take(), (Events{{2, RemovalReason::kEvicted}, {3, RemovalReason::kEvicted}}));
  EXPECT_TRUE(store->Contains(1));
  EXPECT_FALSE(store->Contains(2));
  EXPECT_FALSE(store->Contains(3));
  EXPECT_EQ(store->Get(2).status().code(), StatusCode::kNotFound);
  EXPECT_TRUE(HasContent(*store, 1, 1));
  EXPECT_TRUE(HasContent(*store, 10, 10));
  // A 2 KB put takes the two least recent now: 4 and 5.
  ASSERT_TRUE(Put(*store, 11, 2048, 11).ok());
  EXPECT_EQ(log.Take(), (Events{{4, RemovalReason::kEvicted}, {5, RemovalReason::kEvicted}}));
  EXPECT_EQ(store->Stats().evictions, 4u);
}

TEST(EmbeddedStoreTest, LeasedRecordsAreNeverEvicted) {
  RemovalLog log;
  StoreOptions o = Options(8 * 1024);
  o.on_removal = log.Listener();
  auto store = MakeStore(o);
  for (RecordId id = 1; id <= 8; ++id) ASSERT_TRUE(Put(*store, id, 1024, uint8_t(id)).ok());
  std::vector<ReadLease> leases;
  for (RecordId id = 1; id <= 7; ++id) leases.push_back(std::move(store->Get(id)).value());
  // Only 8 is unleased, though it is the most recent.
  ASSERT_TRUE(Put(*store, 9, 1024, 9).ok());
  EXPECT_EQ(log.Take(), (Events{{8, RemovalReason::kEvicted}}));
  leases.push_back(std::move(store->Get(9)).value());

  auto r = store->Reserve(10, 1024);
  ASSERT_EQ(r.status().code(), StatusCode::kResourceExhausted);
  EXPECT_TRUE(Contains(r.status().message(), "held by leased records and pending writes"))
      << r.status().ToString();
  EXPECT_TRUE(Contains(r.status().message(), "8 records leased")) << r.status().ToString();
  EXPECT_TRUE(log.Take().empty());
  EXPECT_EQ(store->Stats().evictions, 1u);
  EXPECT_EQ(store->Stats().records, 8u);

  leases[4].Release();  // record 5
  ASSERT_TRUE(Put(*store, 10, 1024, 10).ok());
  EXPECT_EQ(log.Take(), (Events{{5, RemovalReason::kEvicted}}));
  for (RecordId id : {1, 2, 3, 4, 6, 7, 9}) EXPECT_TRUE(store->Contains(id)) << id;
  for (size_t i = 0; i < leases.size(); ++i) {
    if (!leases[i].valid()) continue;
    const auto fill = std::byte(leases[i].id());
    EXPECT_EQ(leases[i].data()[0], fill);
    EXPECT_EQ(leases[i].data()[1023], fill);
  }
}

TEST(EmbeddedStoreTest, PendingReservationsAreNeverEvicted) {
  auto store = MakeStore(Options(4 * 1024));
  auto a = store->Reserve(1, 2048);
  auto b = store->Reserve(2, 2048);
  ASSERT_TRUE(a.ok() && b.ok());
  auto r = store->Reserve(3, 1024);
  ASSERT_EQ(r.status().code(), StatusCode::kResourceExhausted);
  EXPECT_TRUE(Contains(r.status().message(), "2 reservations pending")) << r.status().ToString();
  a->Abort();
  EXPECT_TRUE(store->Reserve(3, 1024).ok());
}

TEST(EmbeddedStoreTest, FragmentationEvictsUntilARangeIsContiguous) {
  auto store = MakeStore(Options(4 * 1024));
  for (RecordId id = 1; id <= 4; ++id) ASSERT_TRUE(Put(*store, id, 1024, uint8_t(id)).ok());
  auto l1 = std::move(store->Get(1)).value();
  auto l3 = std::move(store->Get(3)).value();
  // 2 KB are evictable (2 and 4) but never contiguous while 3 is leased.
  auto r = store->Reserve(5, 2048);
  ASSERT_EQ(r.status().code(), StatusCode::kResourceExhausted);
  EXPECT_TRUE(Contains(r.status().message(), "no contiguous free range")) << r.status().ToString();
  l3.Release();
  ASSERT_TRUE(Put(*store, 5, 2048, 5).ok());
  EXPECT_TRUE(store->Contains(1));
  EXPECT_TRUE(HasContent(*store, 5, 5));
}

TEST(EmbeddedStoreTest, EvictsFromHighDownToLowWatermark) {
  // 10 KB, high 90% (9216 B), low 50% (5120 B), 1 KB records.
  auto store = MakeStore(Options(10 * 1024, 0.9, 0.5));
  for (RecordId id = 1; id <= 9; ++id) ASSERT_TRUE(Put(*store, id, 1024, uint8_t(id)).ok());
  EXPECT_EQ(store->Stats().evictions, 0u);  // exactly at the high mark: nothing evicted
  EXPECT_EQ(store->Stats().bytes_used, 9216u);
  // Crossing it evicts until usage with the new record is <= 5120: five go.
  ASSERT_TRUE(Put(*store, 10, 1024, 10).ok());
  StoreStats s = store->Stats();
  EXPECT_EQ(s.evictions, 5u);
  EXPECT_EQ(s.bytes_used, 5120u);
  EXPECT_EQ(s.records, 5u);
  for (RecordId id = 1; id <= 5; ++id) EXPECT_FALSE(store->Contains(id)) << id;
  for (RecordId id = 6; id <= 10; ++id) EXPECT_TRUE(store->Contains(id)) << id;
  // Below the high mark again: the next four puts evict nothing.
  for (RecordId id = 11; id <= 14; ++id) ASSERT_TRUE(Put(*store, id, 1024, uint8_t(id)).ok());
  EXPECT_EQ(store->Stats().evictions, 5u);
}

TEST(EmbeddedStoreTest, WatermarksAreTriggersNotLimits) {
  // Everything leased keeps usage above the high mark; a put that fits in the
  // remaining space is still granted.
  auto store = MakeStore(Options(10 * 1024, 0.5, 0.4));
  std::vector<ReadLease> leases;
  for (RecordId id = 1; id <= 8; ++id) {
    ASSERT_TRUE(Put(*store, id, 1024, uint8_t(id)).ok());
    leases.push_back(std::move(store->Get(id)).value());
  }
  EXPECT_EQ(store->Stats().bytes_used, 8192u);
  EXPECT_TRUE(Put(*store, 9, 2048, 9).ok());
  EXPECT_EQ(store->Stats().evictions, 0u);
}

TEST(EmbeddedStoreTest, DeleteWhileLeasedFreesAtLastRelease) {
  RemovalLog log;
  StoreOptions o = Options(1 << 20);
  o.on_removal = log.Listener();
  auto store = MakeStore(o);
  ASSERT_TRUE(Put(*store, 1, 4096, 0xaa).ok());
  auto lease_a = std::move(store->Get(1)).value();
  auto lease_b = std::move(store->Get(1)).value();
  ASSERT_TRUE(store->Delete(1).ok());
  EXPECT_EQ(log.Take(), (Events{{1, RemovalReason::kDeleted}}));
  EXPECT_FALSE(store->Contains(1));
  EXPECT_EQ(store->Get(1).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(store->Delete(1).code(), StatusCode::kNotFound);
  StoreStats s = store->Stats();
  EXPECT_EQ(s.records, 0u);
  EXPECT_EQ(s.removed_leased, 1u);
  EXPECT_EQ(s.bytes_used, 4096u);
  EXPECT_EQ(s.deletes, 1u);

  // The id is free at once; the old bytes stay intact under the leases.
  ASSERT_TRUE(Put(*store, 1, 128, 0x55).ok());
  EXPECT_EQ(store->Stats().bytes_used, 4096u + 128u);
  EXPECT_EQ(lease_a.data()[4095], std::byte{0xaa});
  lease_a.Release();
  EXPECT_EQ(store->Stats().bytes_used, 4096u + 128u);  // lease_b still holds it
  EXPECT_EQ(lease_b.data()[0], std::byte{0xaa});
  lease_b.Release();
  s = store->Stats();
  EXPECT_EQ(s.bytes_used, 128u);
  EXPECT_EQ(s.removed_leased, 0u);
  EXPECT_EQ(s.leases, 0u);
  EXPECT_TRUE(HasContent(*store, 1, 0x55));
  EXPECT_TRUE(store->Delete(1).ok());
  EXPECT_EQ(store->Stats().bytes_used, 0u);
  EXPECT_EQ(store->Delete(99).code(), StatusCode::kNotFound);
}

TEST(EmbeddedStoreTest, UnsealedHandleAbortsAndFreesSpace) {
  auto store = MakeStore(Options(4096));
  {
    auto h = store->Reserve(1, 4096);
    ASSERT_TRUE(h.ok());
    EXPECT_EQ(store->Stats().bytes_used, 4096u);
    EXPECT_EQ(store->Reserve(2, 64).status().code(), StatusCode::kResourceExhausted);
  }
  StoreStats s = store->Stats();
  EXPECT_EQ(s.bytes_used, 0u);
  EXPECT_EQ(s.pending, 0u);
  EXPECT_EQ(s.aborted_puts, 1u);
  EXPECT_EQ(s.largest_free_bytes, 4096u);
  EXPECT_EQ(store->Get(1).status().code(), StatusCode::kNotFound);

  // Moving the handle moves ownership; only the last owner aborts or seals.
  auto h = std::move(store->Reserve(1, 100)).value();
  WriteHandle moved = std::move(h);
  EXPECT_FALSE(h.valid());
  EXPECT_EQ(h.Seal().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(store->Stats().pending, 1u);
  ASSERT_TRUE(moved.Seal().ok());
  EXPECT_EQ(moved.Seal().code(), StatusCode::kFailedPrecondition);
  moved.Abort();  // no-op once sealed
  EXPECT_TRUE(store->Contains(1));

  // Assigning over a live handle aborts the one it replaces.
  auto x = std::move(store->Reserve(2, 100)).value();
  x = std::move(store->Reserve(3, 100)).value();
  EXPECT_EQ(store->Stats().aborted_puts, 2u);
  ASSERT_TRUE(x.Seal().ok());
  EXPECT_FALSE(store->Contains(2));
  EXPECT_TRUE(store->Contains(3));
}

TEST(EmbeddedStoreTest, LeaseMovesKeepOnePin) {
  auto store = MakeStore(Options(2048));
  ASSERT_TRUE(Put(*store, 1, 1024, 1).ok());
  ReadLease a = std::move(store->Get(1)).value();
  ReadLease b = std::move(a);
  EXPECT_FALSE(a.valid());
  a.Release();  // no-op
  EXPECT_EQ(store->Stats().leases, 1u);
  ReadLease c = std::move(store->Get(1)).value();
  EXPECT_EQ(store->Stats().leases, 2u);
  EXPECT_EQ(store->Stats().leased_records, 1u);
  b = std::move(c);  // releases the lease b held
  EXPECT_EQ(store->Stats().leases, 1u);
  EXPECT_EQ(store->Reserve(2, 2048).status().code(), StatusCode::kResourceExhausted);
  b.Release();
  EXPECT_TRUE(store->Reserve(2, 2048).ok());
  EXPECT_EQ(store->Stats().evictions, 1u);
}

TEST(EmbeddedStoreTest, CountersAreExact) {
  auto store = MakeStore(Options(4096, 1.0, 1.0));
  ASSERT_TRUE(Put(*store, 1, 1000, 1).ok());                                           // put
  ASSERT_TRUE(Put(*store, 2, 1000, 2).ok());                                           // put
  EXPECT_EQ(store->Reserve(1, 10).status().code(), StatusCode::kAlreadyExists);        // rejected
  EXPECT_EQ(store->Reserve(9, 5000).status().code(), StatusCode::kResourceExhausted);  // rejected
  { auto h = store->Reserve(3, 10); }                                                  // aborted
  EXPECT_TRUE(store->Get(1).ok());                                                     // hit
  EXPECT_TRUE(store->Get(2).ok());                                                     // hit
  EXPECT_FALSE(store->Get(3).ok());                                                    // miss
  ASSERT_TRUE(store->Delete(2).ok());                                                  // delete
  EXPECT_EQ(store->Delete(2).code(), StatusCode::kNotFound);
  ASSERT_TRUE(Put(*store, 4, 4096 - 1024 + 1, 4).ok());  // evicts 1
  const StoreStats s = store->Stats();
  EXPECT_EQ(s.capacity_bytes, 4096u);
  EXPECT_EQ(s.puts, 3u);
  EXPECT_EQ(s.rejected_puts, 2u);
  EXPECT_EQ(s.aborted_puts, 1u);
  EXPECT_EQ(s.hits, 2u);
  EXPECT_EQ(s.misses, 1u);
  EXPECT_EQ(s.deletes, 1u);
  EXPECT_EQ(s.evictions, 1u);
  EXPECT_EQ(s.expirations, 0u);
  EXPECT_EQ(s.records, 1u);
  EXPECT_EQ(s.payload_bytes, 3073u);
  EXPECT_EQ(s.bytes_used, 3136u);  // 3073 rounded up to 64
  EXPECT_EQ(s.pending, 0u);
  EXPECT_EQ(s.leases, 0u);
}

TEST(EmbeddedStoreTest, TtlExpiresRecordsWithInjectedClock) {
  ManualClock clock;
  RemovalLog log;
  StoreOptions o = Options(1 << 20);
  o.default_ttl = seconds(10);
  o.clock = clock.AsStoreClock();
  o.on_removal = log.Listener();
  auto store = MakeStore(o);
  ASSERT_TRUE(Put(*store, 1, 100, 1).ok());              // default: 10 s
  ASSERT_TRUE(Put(*store, 2, 100, 2, seconds(0)).ok());  // never expires
  ASSERT_TRUE(Put(*store, 3, 100, 3, seconds(5)).ok());
  clock.Advance(seconds(5) - std::chrono::nanoseconds(1));
  EXPECT_TRUE(store->Contains(3));
  clock.Advance(std::chrono::nanoseconds(1));
  EXPECT_FALSE(store->Contains(3));  // expired, not yet reclaimed
  EXPECT_EQ(store->Get(3).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(log.Take(), (Events{{3, RemovalReason::kExpired}}));
  EXPECT_EQ(store->Stats().expirations, 1u);
  EXPECT_EQ(store->Stats().misses, 1u);

  // Expiry while leased: the lease keeps the bytes, new readers miss.
  auto lease = std::move(store->Get(1)).value();
  clock.Advance(seconds(5));
  EXPECT_EQ(store->ReclaimExpired(), 1u);
  EXPECT_EQ(log.Take(), (Events{{1, RemovalReason::kExpired}}));
  EXPECT_EQ(store->Get(1).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(lease.data()[99], std::byte{1});
  EXPECT_EQ(store->Stats().removed_leased, 1u);
  lease.Release();
  EXPECT_EQ(store->Stats().bytes_used, 128u);  // only record 2 is left
  clock.Advance(seconds(1000));
  EXPECT_EQ(store->ReclaimExpired(), 0u);
  EXPECT_TRUE(HasContent(*store, 2, 2));
  // An expired id can be put again.
  ASSERT_TRUE(Put(*store, 3, 100, 33).ok());
  EXPECT_TRUE(HasContent(*store, 3, 33));
  // A TTL beyond what the clock can represent never expires (no overflow).
  ASSERT_TRUE(Put(*store, 4, 100, 4, std::chrono::nanoseconds::max()).ok());
  clock.Advance(seconds(1) * 1000000);
  EXPECT_TRUE(store->Contains(4));
  EXPECT_FALSE(store->Contains(3));
}

TEST(EmbeddedStoreTest, ListenerMayCallBackIntoTheStore) {
  EmbeddedStore* raw = nullptr;
  std::vector<bool> seen_after_removal;
  StoreOptions o = Options(2048);
  o.on_removal = [&](RecordId id, RemovalReason) {
    // Would deadlock if the listener ran under the store's lock.
    seen_after_removal.push_back(raw->Contains(id));
    (void)raw->Stats();
  };
  auto store = MakeStore(o);
  raw = store.get();
  ASSERT_TRUE(Put(*store, 1, 1024, 1).ok());
  ASSERT_TRUE(Put(*store, 2, 1024, 2).ok());
  ASSERT_TRUE(Put(*store, 3, 1024, 3).ok());  // evicts 1
  ASSERT_TRUE(store->Delete(2).ok());
  EXPECT_EQ(seen_after_removal, (std::vector<bool>{false, false}));
}

TEST(EmbeddedStoreDeathTest, DestroyingWithOutstandingLeaseAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        auto store = MakeStore(Options(4096));
        (void)Put(*store, 1, 64, 1);
        auto lease = std::move(store->Get(1)).value();
        store.reset();
      },
      "outstanding");
}

// ---------------------------------------------------------------------------
// Concurrency: random put/get/delete from several threads with every read
// verified byte for byte, twice (at lease start and after yielding), so a
// range reused while leased, a torn write or a use-after-free shows up as a
// content mismatch (and under ASan/TSan as a report).

uint64_t SplitMix(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Layout: [id][seed][size] as 3 × uint64, then a SplitMix stream from seed.
constexpr uint64_t kHeader = 24;

void FillPayload(std::byte* p, uint64_t size, RecordId id, uint64_t seed, uint64_t from,
                 uint64_t to) {
  if (from == 0) {
    std::memcpy(p, &id, 8);
    std::memcpy(p + 8, &seed, 8);
    std::memcpy(p + 16, &size, 8);
    from = kHeader;
  }
  uint64_t state = seed;
  // The stream is word-indexed so that a fill can start mid-record.
  for (uint64_t w = kHeader; w < from; w += 8) SplitMix(state);
  for (uint64_t i = from; i < to; i += 8) {
    const uint64_t v = SplitMix(state);
    std::memcpy(p + i, &v, std::min<uint64_t>(8, to - i));
  }
  (void)size;
}

std::string VerifyPayload(const ReadLease& lease) {
  const std::byte* p = lease.data();
  if (lease.size() < kHeader) return "short record";
  uint64_t id, seed, size;
  std::memcpy(&id, p, 8);
  std::memcpy(&seed, p + 8, 8);
  std::memcpy(&size, p + 16, 8);
  if (id != lease.id())
    return "id " + std::to_string(id) + " in record " + std::to_string(lease.id());
  if (size != lease.size()) return "size mismatch in record " + std::to_string(lease.id());
  uint64_t state = seed;
  for (uint64_t i = kHeader; i < size; i += 8) {
    const uint64_t v = SplitMix(state);
    if (std::memcmp(p + i, &v, std::min<uint64_t>(8, size - i)) != 0) {
      return "byte " + std::to_string(i) + " of record " + std::to_string(id) + " differs";
    }
  }
  return "";
}

TEST(EmbeddedStoreStressTest, ConcurrentPutGetDeleteKeepsContentIntact) {
  constexpr int kThreads = 4;
  constexpr int kOpsPerThread = 4000;
  constexpr RecordId kIds = 96;
  const auto deadline = std::chrono::steady_clock::now() + seconds(60);

  std::atomic<uint64_t> removals{0};
  StoreOptions o = Options(2 << 20, 0.9, 0.7);
  o.on_removal = [&](RecordId, RemovalReason) { removals.fetch_add(1); };
  auto store = MakeStore(o);

  std::atomic<int> failures{0};
  std::atomic<uint64_t> verified{0};
  std::mutex fail_mu;
  std::string first_failure;
  auto fail = [&](std::string what) {
    if (failures.fetch_add(1) == 0) {
      std::lock_guard<std::mutex> lock(fail_mu);
      first_failure = std::move(what);
    }
  };

  auto worker = [&](int t) {
    std::mt19937_64 rng(1000 + t);
    std::vector<ReadLease> held;  // a few long leases held across other ops
    for (int op = 0; op < kOpsPerThread && failures.load() == 0; ++op) {
      if (op % 64 == 0 && std::chrono::steady_clock::now() > deadline) break;
      const RecordId id = rng() % kIds;
      const int kind = static_cast<int>(rng() % 100);
      if (kind < 45) {
        const uint64_t size = kHeader + rng() % (48 * 1024);
        auto h = store->Reserve(id, size);
        if (h.status().code() == StatusCode::kAlreadyExists) {
          // Replace it, often while another thread holds a lease on it.
          (void)store->Delete(id);
          h = store->Reserve(id, size);
        }
        if (!h.ok()) {
          const StatusCode c = h.status().code();
          if (c != StatusCode::kAlreadyExists && c != StatusCode::kResourceExhausted) {
            fail("reserve: " + h.status().ToString());
          }
          continue;
        }
        const uint64_t seed = rng();
        // Write in two halves with a yield between: a reader that could see
        // the record before Seal() would catch it half written.
        const uint64_t mid = kHeader + (size - kHeader) / 2 / 8 * 8;
        FillPayload(h->data(), size, id, seed, 0, mid);
        std::this_thread::yield();
        FillPayload(h->data(), size, id, seed, mid, size);
        if (rng() % 10 == 0) {
          h->Abort();
        } else if (Status s = h->Seal(); !s.ok()) {
          fail("seal: " + s.ToString());
        }
      } else if (kind < 85) {
        auto lease = store->Get(id);
        if (!lease.ok()) {
          if (lease.status().code() != StatusCode::kNotFound) fail(lease.status().ToString());
          continue;
        }
        if (std::string e = VerifyPayload(*lease); !e.empty()) fail("first read: " + e);
        std::this_thread::yield();
        if (std::string e = VerifyPayload(*lease); !e.empty()) fail("second read: " + e);
        verified.fetch_add(1);
        if (rng() % 8 == 0) {
          held.push_back(std::move(lease).value());
          if (held.size() > 3) {
            if (std::string e = VerifyPayload(held.front()); !e.empty()) fail("held: " + e);
            held.erase(held.begin());
          }
        }
      } else {
        Status s = store->Delete(id);
        if (!s.ok() && s.code() != StatusCode::kNotFound &&
            s.code() != StatusCode::kFailedPrecondition) {
          fail("delete: " + s.ToString());
        }
      }
    }
    for (const ReadLease& l : held) {
      if (std::string e = VerifyPayload(l); !e.empty()) fail("held at end: " + e);
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);
  for (std::thread& th : threads) th.join();

  ASSERT_EQ(failures.load(), 0) << first_failure;
  EXPECT_GT(verified.load(), 100u);
  StoreStats s = store->Stats();
  EXPECT_EQ(s.pending, 0u);
  EXPECT_EQ(s.leases, 0u);
  EXPECT_EQ(s.removed_leased, 0u);
  EXPECT_GT(s.evictions, 0u) << "the stress did not reach eviction";
  EXPECT_EQ(removals.load(), s.evictions + s.deletes + s.expirations);

  // What is left is intact and accounted for exactly.
  uint64_t allocated = 0, payload = 0, records = 0;
  for (RecordId id = 0; id < kIds; ++id) {
    auto lease = store->Get(id);
    if (!lease.ok()) continue;
    EXPECT_EQ(VerifyPayload(*lease), "");
    allocated += (lease->size() + 63) / 64 * 64;
    payload += lease->size();
    ++records;
  }
  s = store->Stats();
  EXPECT_EQ(s.bytes_used, allocated);
  EXPECT_EQ(s.payload_bytes, payload);
  EXPECT_EQ(s.records, records);
  for (RecordId id = 0; id < kIds; ++id) (void)store->Delete(id);
  s = store->Stats();
  EXPECT_EQ(s.bytes_used, 0u);
  EXPECT_EQ(s.records, 0u);
  EXPECT_EQ(s.largest_free_bytes, s.capacity_bytes);  // coalesced back to one range
}

}  // namespace
}  // namespace relaykv
