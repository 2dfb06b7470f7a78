// EmbeddedStore: records held in this process's memory segments.
//
// A put is three steps: Reserve() space (evicting least-recently-used records
// when the store is full), write the payload through the returned WriteHandle
// with no lock held, Seal() to publish it. A get takes a ReadLease that pins
// the record against eviction and deletion until the lease is released.
//
// The store server (transfer/server/) wraps this same class: it registers segment(i)
// with UCX and hands remote peers (segment, offset) so they write and read
// the bytes with one-sided operations, while this class keeps the books.
//
// Invariants (mu_ guards all bookkeeping; payload bytes are never touched
// under it):
//   * A record is in exactly one state: pending (reserved, owned by one
//     WriteHandle, invisible to Get/Contains/Delete, never evicted), sealed
//     (visible; evictable only while it has no lease), or removed (deleted or
//     expired while leased: invisible, its id free for reuse, its bytes still
//     allocated until the last lease goes).
//   * Bytes of a pending or leased record are never reallocated. The writer's
//     stores happen-before any reader's loads because Seal() and Get() both
//     take mu_; a lease release and a later reuse of the range are ordered the
//     same way.
//   * Eviction takes only sealed, unleased records, least recently used first;
//     "used" means sealed, or released by its last lease.
//   * The store must outlive every WriteHandle and ReadLease it handed out;
//     destroying it earlier is a bug and aborts with a message.
//   * The removal listener runs after mu_ is released, on the thread whose call
//     removed the record; it may call back into the store.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "transfer/common/status.h"
#include "transfer/store/segment_allocator.h"

namespace relaykv {

using RecordId = uint64_t;

enum class RemovalReason : uint8_t {
  kEvicted,  // LRU eviction to make room
  kDeleted,  // Delete()
  kExpired,  // its TTL ran out
};
std::string_view RemovalReasonName(RemovalReason reason);

// Called once for every record that stops being visible (evicted, deleted,
// expired), so indexes over the store (the span index) can drop it.
// It runs outside the store's lock, possibly on several threads at once, and
// must not throw. Because it runs after the lock is released, a record removed
// and then put again under the same id by another thread may be reported
// after the new put was sealed; ids derived from record contents make that
// harmless, and a stale index entry only costs a miss (then recompute).
using RemovalListener = std::function<void(RecordId, RemovalReason)>;
using StoreClock = std::function<std::chrono::steady_clock::time_point()>;

struct StoreOptions {
  // Total bytes of payload memory, split evenly across num_segments (each
  // segment rounded down to `alignment`). A record must fit in one segment.
  uint64_t capacity_bytes = 0;
  // When a reservation would take usage above high_watermark × capacity,
  // LRU records are evicted until usage (with the reservation) is at or under
  // low_watermark × capacity, so that eviction runs in batches rather than on
  // every put. Watermarks are triggers, not limits: a reservation that fits
  // is granted even when leased records keep usage above the high mark.
  double high_watermark = 0.90;
  double low_watermark = 0.80;
  // Power of two; every record starts at a multiple of it (4096 suits RDMA
  // registration and O_DIRECT, 64 a cache line).
  uint64_t alignment = 64;
  // Several segments let a store server register memory in pieces (per NUMA
  // node, per GPU); the largest record is then one segment.
  uint32_t num_segments = 1;
  FitPolicy fit_policy = FitPolicy::kBestFit;
  MemoryKind memory_kind = MemoryKind::kHost;
  // Touch every page at creation so the first puts do not pay page faults.
  bool prefault = false;
  // Makes segment `index` of `bytes` bytes (kind memory_kind, aligned to
  // `alignment`, prefaulted when asked); empty: Segment::Create. A store
  // server uses it to take its segments from its transport.
  std::function<Result<std::unique_ptr<Segment>>(uint64_t bytes, uint32_t index)> segment_factory;
  // TTL for records reserved without one; zero means they never expire.
  std::chrono::nanoseconds default_ttl{0};
  // Time source for TTLs; empty means std::chrono::steady_clock. Tests inject
  // a manual clock.
  StoreClock clock;
  RemovalListener on_removal;

  // Names the offending key and what was expected.
  Status Validate() const;
};

struct StoreStats {
  uint64_t capacity_bytes = 0;
  uint64_t bytes_used = 0;          // allocated (aligned) bytes of every state
  uint64_t payload_bytes = 0;       // requested bytes of sealed, visible records
  uint64_t largest_free_bytes = 0;  // largest contiguous free range, any segment
  uint64_t records = 0;             // sealed, visible records
  uint64_t pending = 0;             // reservations not yet sealed or aborted
  uint64_t leased_records = 0;      // visible records with at least one lease
  uint64_t leases = 0;              // outstanding leases, removed records' included
  uint64_t removed_leased = 0;      // removed records waiting for their last lease
  uint64_t hits = 0;
  uint64_t misses = 0;
  uint64_t evictions = 0;
  uint64_t expirations = 0;
  uint64_t puts = 0;           // sealed reservations
  uint64_t deletes = 0;        // successful Delete() calls
  uint64_t rejected_puts = 0;  // Reserve() calls that returned an error
  uint64_t aborted_puts = 0;   // reservations dropped without Seal()
};

class EmbeddedStore;
namespace store_internal {
struct Record;
}  // namespace store_internal

// Exclusive write access to one reserved record. Move-only. Destroying (or
// Abort()ing) it before Seal() drops the reservation and frees the space.
class WriteHandle {
 public:
  WriteHandle() = default;
  WriteHandle(WriteHandle&& other) noexcept { *this = std::move(other); }
  WriteHandle& operator=(WriteHandle&& other) noexcept;
  WriteHandle(const WriteHandle&) = delete;
  WriteHandle& operator=(const WriteHandle&) = delete;
  ~WriteHandle() { Abort(); }

  // False once moved from, sealed or aborted.
  bool valid() const { return store_ != nullptr; }
  RecordId id() const { return id_; }
  std::byte* data() const { return data_; }
  uint64_t size() const { return size_; }
  // Where the bytes live, for peers that address the segment remotely.
  uint32_t segment() const { return segment_; }
  uint64_t offset() const { return offset_; }

  // Publishes the record: Get() sees it from now on. The handle becomes empty.
  // FailedPrecondition when the handle is empty.
  Status Seal();
  // Drops the reservation; a no-op on an empty handle.
  void Abort();

 private:
  friend class EmbeddedStore;
  EmbeddedStore* store_ = nullptr;
  store_internal::Record* record_ = nullptr;
  RecordId id_ = 0;
  std::byte* data_ = nullptr;
  uint64_t size_ = 0;
  uint32_t segment_ = 0;
  uint64_t offset_ = 0;
};

// Shared read access to one sealed record. Move-only; each Get() makes one.
// While any lease is held the bytes stay valid and unchanged, even if the
// record is deleted or expires meanwhile.
class ReadLease {
 public:
  ReadLease() = default;
  ReadLease(ReadLease&& other) noexcept { *this = std::move(other); }
  ReadLease& operator=(ReadLease&& other) noexcept;
  ReadLease(const ReadLease&) = delete;
  ReadLease& operator=(const ReadLease&) = delete;
  ~ReadLease() { Release(); }

  bool valid() const { return store_ != nullptr; }
  RecordId id() const { return id_; }
  const std::byte* data() const { return data_; }
  uint64_t size() const { return size_; }
  uint32_t segment() const { return segment_; }
  uint64_t offset() const { return offset_; }

  // Gives the lease back early; a no-op on an empty lease.
  void Release();

 private:
  friend class EmbeddedStore;
  EmbeddedStore* store_ = nullptr;
  store_internal::Record* record_ = nullptr;
  RecordId id_ = 0;
  const std::byte* data_ = nullptr;
  uint64_t size_ = 0;
  uint32_t segment_ = 0;
  uint64_t offset_ = 0;
};

class EmbeddedStore {
 public:
  static Result<std::unique_ptr<EmbeddedStore>> Create(StoreOptions options);
  ~EmbeddedStore();
  EmbeddedStore(const EmbeddedStore&) = delete;
  EmbeddedStore& operator=(const EmbeddedStore&) = delete;

  // Reserves `bytes` for record `id`, evicting LRU records if needed.
  //   InvalidArgument    bytes == 0
  //   AlreadyExists      id is sealed or being written
  //   ResourceExhausted  bytes exceed the capacity (or one segment), or the
  //                      space is held by leased records and pending writes
  // The two-argument form uses options.default_ttl; a ttl <= 0 never expires.
  // A TTL counts from Seal().
  Result<WriteHandle> Reserve(RecordId id, uint64_t bytes);
  Result<WriteHandle> Reserve(RecordId id, uint64_t bytes, std::chrono::nanoseconds ttl);

  // Leases a sealed record and makes it the most recently used. NotFound
  // (counted as a miss) when absent, evicted, expired or not yet sealed.
  Result<ReadLease> Get(RecordId id);

  // True when Get(id) would hit now; counts nothing and does not touch LRU.
  bool Contains(RecordId id) const;

  // Removes a sealed record: it is invisible at once and its id may be reused.
  // If it is leased, its bytes are freed when the last lease is released.
  //   NotFound            absent (or already evicted / expired)
  //   FailedPrecondition  still being written (abort the WriteHandle instead)
  Status Delete(RecordId id);

  // Removes every record whose TTL has run out; returns how many. Expired
  // records are also reclaimed lazily by Reserve/Get/Delete, so calling this
  // is only needed to return their space promptly on an idle store.
  size_t ReclaimExpired();

  StoreStats Stats() const;

  uint64_t capacity_bytes() const { return capacity_bytes_; }
  // The largest record a Reserve() can ever grant (one segment).
  uint64_t max_record_bytes() const { return segment_bytes_; }
  size_t num_segments() const { return segments_.size(); }
  // Segment memory is fixed for the store's lifetime: safe to register with a
  // transport once, without the lock.
  const Segment& segment(size_t i) const { return *segments_[i]; }
  const StoreOptions& options() const { return options_; }

 private:
  friend class WriteHandle;
  friend class ReadLease;
  using Record = store_internal::Record;
  using TimePoint = std::chrono::steady_clock::time_point;
  struct Removal {
    RecordId id;
    RemovalReason reason;
  };

  EmbeddedStore(StoreOptions options, uint64_t segment_bytes,
                std::vector<std::unique_ptr<Segment>> segments,
                std::vector<SegmentAllocator> allocators);

  TimePoint Now() const;
  void Notify(const std::vector<Removal>& removed) const;

  Result<WriteHandle> ReserveLocked(RecordId id, uint64_t bytes, std::chrono::nanoseconds ttl,
                                    std::vector<Removal>& removed);
  Result<ReadLease> GetLocked(RecordId id, std::vector<Removal>& removed);
  Status DeleteLocked(RecordId id, std::vector<Removal>& removed);
  // Segment whose allocator fits `bytes` most tightly; -1 when none does.
  int PickSegmentLocked(uint64_t bytes) const;
  bool EvictOneLocked(std::vector<Removal>& removed);
  void ReclaimExpiredLocked(std::vector<Removal>& removed);
  // Makes a sealed record invisible; frees it now or at its last release.
  void RemoveVisibleLocked(Record* record, RemovalReason reason, std::vector<Removal>& removed);
  void FreeLocked(Record* record);

  // Called by the handles.
  Status Seal(Record* record);
  void Abort(Record* record);
  void Release(Record* record);

  const StoreOptions options_;
  const uint64_t segment_bytes_;
  const uint64_t capacity_bytes_;
  const uint64_t high_bytes_;
  const uint64_t low_bytes_;
  const std::vector<std::unique_ptr<Segment>> segments_;

  mutable std::mutex mu_;
  std::vector<SegmentAllocator> allocators_;  // one per segment
  uint64_t bytes_used_ = 0;
  // Pending and sealed records by id; removed-but-leased ones move to
  // removed_leased_ so that their id can be reused at once.
  std::unordered_map<RecordId, std::unique_ptr<Record>> records_;
  std::unordered_map<const Record*, std::unique_ptr<Record>> removed_leased_;
  // Sealed, visible records: unleased ones in LRU order (front = least
  // recent), leased ones parked in pinned_. Records move between the two by
  // splice, so Get and release never allocate.
  std::list<Record*> lru_;
  std::list<Record*> pinned_;
  uint64_t evictable_bytes_ = 0;  // allocated bytes of the records in lru_
  // Sealed, visible records with a TTL, soonest expiry first.
  std::multimap<TimePoint, Record*> expiry_;
  StoreStats counters_;  // the counting fields only; the rest is derived
};

}  // namespace relaykv
