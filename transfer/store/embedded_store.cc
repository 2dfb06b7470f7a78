#include "transfer/store/embedded_store.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

#include "transfer/common/check.h"

namespace relaykv {

namespace store_internal {

struct Record {
  enum class State : uint8_t { kPending, kSealed, kRemoved };

  RecordId id = 0;
  uint32_t segment = 0;
  uint64_t offset = 0;
  uint64_t size = 0;       // as requested
  uint64_t allocated = 0;  // as aligned by the allocator
  State state = State::kPending;
  uint32_t leases = 0;
  std::chrono::nanoseconds ttl{0};  // applied at Seal()
  // Position in lru_ (no lease) or pinned_ (leased); valid while kSealed.
  std::list<Record*>::iterator lru_pos;
  // Position in expiry_; valid while kSealed and has_expiry.
  bool has_expiry = false;
  std::multimap<std::chrono::steady_clock::time_point, Record*>::iterator expiry_pos;
};

}  // namespace store_internal

namespace {
using State = store_internal::Record::State;

std::string Bytes(uint64_t n) { return std::to_string(n); }
}  // namespace

std::string_view RemovalReasonName(RemovalReason reason) {
  switch (reason) {
    case RemovalReason::kEvicted:
      return "evicted";
    case RemovalReason::kDeleted:
      return "deleted";
    case RemovalReason::kExpired:
      return "expired";
  }
  return "unknown";
}

Status StoreOptions::Validate() const {
  if (capacity_bytes == 0) {
    return InvalidArgument("StoreOptions.capacity_bytes must be > 0");
  }
  if (alignment == 0 || (alignment & (alignment - 1)) != 0) {
    return InvalidArgument("StoreOptions.alignment must be a power of two, got " +
                           std::to_string(alignment));
  }
  if (num_segments == 0) {
    return InvalidArgument("StoreOptions.num_segments must be >= 1");
  }
  if (capacity_bytes / num_segments < alignment) {
    return InvalidArgument("StoreOptions.capacity_bytes " + Bytes(capacity_bytes) + " split into " +
                           std::to_string(num_segments) +
                           " segments leaves less than one alignment unit (" +
                           std::to_string(alignment) + " bytes) per segment");
  }
  if (!(high_watermark > 0.0 && high_watermark <= 1.0)) {
    return InvalidArgument("StoreOptions.high_watermark must be in (0, 1], got " +
                           std::to_string(high_watermark));
  }
  if (!(low_watermark > 0.0 && low_watermark <= high_watermark)) {
    return InvalidArgument("StoreOptions.low_watermark must be in (0, high_watermark=" +
                           std::to_string(high_watermark) + "], got " +
                           std::to_string(low_watermark));
  }
  if (default_ttl.count() < 0) {
    return InvalidArgument("StoreOptions.default_ttl must be >= 0 (0: never expires)");
  }
  return Status::Ok();
}

// ---------------------------------------------------------------------------
// Handles

WriteHandle& WriteHandle::operator=(WriteHandle&& other) noexcept {
  if (this != &other) {
    Abort();
    store_ = std::exchange(other.store_, nullptr);
    record_ = std::exchange(other.record_, nullptr);
    id_ = other.id_;
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    segment_ = other.segment_;
    offset_ = other.offset_;
  }
  return *this;
}

Status WriteHandle::Seal() {
  if (store_ == nullptr) {
    return FailedPrecondition("write handle is empty (moved from, sealed or aborted)");
  }
  EmbeddedStore* store = std::exchange(store_, nullptr);
  data_ = nullptr;
  return store->Seal(std::exchange(record_, nullptr));
}

void WriteHandle::Abort() {
  if (store_ == nullptr) return;
  EmbeddedStore* store = std::exchange(store_, nullptr);
  data_ = nullptr;
  store->Abort(std::exchange(record_, nullptr));
}

ReadLease& ReadLease::operator=(ReadLease&& other) noexcept {
  if (this != &other) {
    Release();
    store_ = std::exchange(other.store_, nullptr);
    record_ = std::exchange(other.record_, nullptr);
    id_ = other.id_;
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    segment_ = other.segment_;
    offset_ = other.offset_;
  }
  return *this;
}

void ReadLease::Release() {
  if (store_ == nullptr) return;
  EmbeddedStore* store = std::exchange(store_, nullptr);
  data_ = nullptr;
  store->Release(std::exchange(record_, nullptr));
}

// ---------------------------------------------------------------------------
// EmbeddedStore

Result<std::unique_ptr<EmbeddedStore>> EmbeddedStore::Create(StoreOptions options) {
  RELAYKV_RETURN_IF_ERROR(options.Validate());
  const uint64_t segment_bytes =
      (options.capacity_bytes / options.num_segments) & ~(options.alignment - 1);
  std::vector<std::unique_ptr<Segment>> segments;
  std::vector<SegmentAllocator> allocators;
  for (uint32_t i = 0; i < options.num_segments; ++i) {
    auto segment = options.segment_factory ? options.segment_factory(segment_bytes, i)
                                           : Segment::Create(segment_bytes, options.alignment,
                                                             options.memory_kind, options.prefault);
    if (!segment.ok()) {
      return segment.status().WithContext("store segment " + std::to_string(i) + " of " +
                                          std::to_string(options.num_segments));
    }
    if ((*segment)->size() < segment_bytes || (*segment)->kind() != options.memory_kind) {
      return Internal("store segment " + std::to_string(i) +
                      ": the segment factory returned the wrong size or kind");
    }
    segments.push_back(std::move(segment).value());
    RELAYKV_ASSIGN_OR_RETURN(
        SegmentAllocator allocator,
        SegmentAllocator::Create(segment_bytes, options.alignment, options.fit_policy));
    allocators.push_back(std::move(allocator));
  }
  return std::unique_ptr<EmbeddedStore>(new EmbeddedStore(
      std::move(options), segment_bytes, std::move(segments), std::move(allocators)));
}

EmbeddedStore::EmbeddedStore(StoreOptions options, uint64_t segment_bytes,
                             std::vector<std::unique_ptr<Segment>> segments,
                             std::vector<SegmentAllocator> allocators)
    : options_(std::move(options)),
      segment_bytes_(segment_bytes),
      capacity_bytes_(segment_bytes * segments.size()),
      // Rounded, not truncated, so 0.9 × 10240 is 9216 whatever the last bit.
      high_bytes_(static_cast<uint64_t>(
          std::llround(options_.high_watermark * static_cast<double>(capacity_bytes_)))),
      low_bytes_(static_cast<uint64_t>(
          std::llround(options_.low_watermark * static_cast<double>(capacity_bytes_)))),
      segments_(std::move(segments)),
      allocators_(std::move(allocators)) {}

EmbeddedStore::~EmbeddedStore() {
  std::lock_guard<std::mutex> lock(mu_);
  RELAYKV_CHECK_MSG(counters_.pending == 0 && counters_.leases == 0,
                    "EmbeddedStore destroyed while WriteHandles or ReadLeases are outstanding");
}

EmbeddedStore::TimePoint EmbeddedStore::Now() const {
  return options_.clock ? options_.clock() : std::chrono::steady_clock::now();
}

void EmbeddedStore::Notify(const std::vector<Removal>& removed) const {
  if (!options_.on_removal) return;
  for (const Removal& r : removed) options_.on_removal(r.id, r.reason);
}

Result<WriteHandle> EmbeddedStore::Reserve(RecordId id, uint64_t bytes) {
  return Reserve(id, bytes, options_.default_ttl);
}

Result<WriteHandle> EmbeddedStore::Reserve(RecordId id, uint64_t bytes,
                                           std::chrono::nanoseconds ttl) {
  std::vector<Removal> removed;
  Result<WriteHandle> result = [&] {
    std::lock_guard<std::mutex> lock(mu_);
    Result<WriteHandle> r = ReserveLocked(id, bytes, ttl, removed);
    if (!r.ok()) ++counters_.rejected_puts;
    return r;
  }();
  Notify(removed);
  return result;
}

Result<WriteHandle> EmbeddedStore::ReserveLocked(RecordId id, uint64_t bytes,
                                                 std::chrono::nanoseconds ttl,
                                                 std::vector<Removal>& removed) {
  ReclaimExpiredLocked(removed);
  if (bytes == 0) return InvalidArgument("record " + std::to_string(id) + " has 0 bytes");
  if (bytes > capacity_bytes_) {
    return ResourceExhausted("record of " + Bytes(bytes) + " bytes exceeds store capacity " +
                             Bytes(capacity_bytes_));
  }
  if (bytes > segment_bytes_) {
    return ResourceExhausted("record of " + Bytes(bytes) + " bytes exceeds the segment size " +
                             Bytes(segment_bytes_) + " (store capacity " + Bytes(capacity_bytes_) +
                             " in " + std::to_string(segments_.size()) + " segments)");
  }
  if (auto it = records_.find(id); it != records_.end()) {
    return AlreadyExists(
        "record " + std::to_string(id) +
        (it->second->state == State::kPending ? " is already being written" : " already exists"));
  }
  const uint64_t aligned = allocators_[0].AlignUp(bytes);
  const uint64_t free_bytes = capacity_bytes_ - bytes_used_;

  auto cannot_fit = [&](std::string_view why) {
    return ResourceExhausted("cannot fit record " + std::to_string(id) + " of " + Bytes(bytes) +
                             " bytes: " + std::string(why) + " (" + Bytes(bytes_used_) + " of " +
                             Bytes(capacity_bytes_) + " bytes used, " + Bytes(evictable_bytes_) +
                             " evictable, " + std::to_string(pinned_.size()) + " records leased, " +
                             std::to_string(counters_.pending) + " reservations pending, " +
                             std::to_string(removed_leased_.size()) +
                             " removed records awaiting their last lease)");
  };
  // Fail before evicting anything when even evicting everything evictable
  // could not make room: the records would be lost for nothing.
  if (aligned > free_bytes + evictable_bytes_) {
    return cannot_fit("the rest is held by leased records and pending writes");
  }
  if (bytes_used_ + aligned > high_bytes_) {
    while (bytes_used_ + aligned > low_bytes_ && EvictOneLocked(removed)) {
    }
  }
  int segment = PickSegmentLocked(aligned);
  while (segment < 0) {
    // Enough bytes in total but no contiguous range yet (fragmentation, or a
    // segment boundary): keep evicting in LRU order until one appears.
    if (!EvictOneLocked(removed)) {
      return cannot_fit(
          "no contiguous free range is large enough and no unleased record is left "
          "to evict");
    }
    segment = PickSegmentLocked(aligned);
  }
  Result<uint64_t> offset = allocators_[segment].Allocate(bytes);
  RELAYKV_CHECK(offset.ok());  // PickSegmentLocked said it fits

  auto record = std::make_unique<Record>();
  record->id = id;
  record->segment = static_cast<uint32_t>(segment);
  record->offset = *offset;
  record->size = bytes;
  record->allocated = aligned;
  record->ttl = ttl;
  bytes_used_ += aligned;
  ++counters_.pending;

  WriteHandle handle;
  handle.store_ = this;
  handle.record_ = record.get();
  handle.id_ = id;
  handle.data_ = segments_[segment]->base() + *offset;
  handle.size_ = bytes;
  handle.segment_ = record->segment;
  handle.offset_ = *offset;
  records_.emplace(id, std::move(record));
  return handle;
}

int EmbeddedStore::PickSegmentLocked(uint64_t bytes) const {
  int best = -1;
  for (size_t i = 0; i < allocators_.size(); ++i) {
    if (!allocators_[i].Fits(bytes)) continue;
    if (best < 0 || allocators_[i].largest_free() < allocators_[best].largest_free()) {
      best = static_cast<int>(i);
    }
  }
  return best;
}

bool EmbeddedStore::EvictOneLocked(std::vector<Removal>& removed) {
  if (lru_.empty()) return false;
  RemoveVisibleLocked(lru_.front(), RemovalReason::kEvicted, removed);
  return true;
}

void EmbeddedStore::ReclaimExpiredLocked(std::vector<Removal>& removed) {
  if (expiry_.empty()) return;  // the common case reads no clock
  const TimePoint now = Now();
  while (!expiry_.empty() && expiry_.begin()->first <= now) {
    RemoveVisibleLocked(expiry_.begin()->second, RemovalReason::kExpired, removed);
  }
}

void EmbeddedStore::RemoveVisibleLocked(Record* record, RemovalReason reason,
                                        std::vector<Removal>& removed) {
  RELAYKV_CHECK(record->state == State::kSealed);
  if (record->leases == 0) {
    lru_.erase(record->lru_pos);
    evictable_bytes_ -= record->allocated;
  } else {
    pinned_.erase(record->lru_pos);
  }
  if (record->has_expiry) {
    expiry_.erase(record->expiry_pos);
    record->has_expiry = false;
  }
  counters_.payload_bytes -= record->size;
  --counters_.records;
  switch (reason) {
    case RemovalReason::kEvicted:
      ++counters_.evictions;
      break;
    case RemovalReason::kDeleted:
      ++counters_.deletes;
      break;
    case RemovalReason::kExpired:
      ++counters_.expirations;
      break;
  }
  removed.push_back({record->id, reason});

  auto node = records_.extract(record->id);
  RELAYKV_CHECK(!node.empty() && node.mapped().get() == record);
  if (record->leases == 0) {
    FreeLocked(record);  // node's unique_ptr destroys the record
  } else {
    record->state = State::kRemoved;
    removed_leased_.emplace(record, std::move(node.mapped()));
  }
}

void EmbeddedStore::FreeLocked(Record* record) {
  Status s = allocators_[record->segment].Free(record->offset);
  RELAYKV_CHECK_MSG(s.ok(), "store freed a range its allocator does not know");
  bytes_used_ -= record->allocated;
}

Status EmbeddedStore::Seal(Record* record) {
  std::lock_guard<std::mutex> lock(mu_);
  RELAYKV_CHECK(record->state == State::kPending);
  record->state = State::kSealed;
  record->lru_pos = lru_.insert(lru_.end(), record);
  evictable_bytes_ += record->allocated;
  if (record->ttl.count() > 0) {
    const TimePoint now = Now();
    // A TTL too long to represent (nanoseconds::max() and the like) means never.
    if (record->ttl < TimePoint::max() - now) {
      record->expiry_pos = expiry_.emplace(now + record->ttl, record);
      record->has_expiry = true;
    }
  }
  --counters_.pending;
  ++counters_.puts;
  ++counters_.records;
  counters_.payload_bytes += record->size;
  return Status::Ok();
}

void EmbeddedStore::Abort(Record* record) {
  std::lock_guard<std::mutex> lock(mu_);
  RELAYKV_CHECK(record->state == State::kPending);
  --counters_.pending;
  ++counters_.aborted_puts;
  FreeLocked(record);
  records_.erase(record->id);  // destroys the record
}

Result<ReadLease> EmbeddedStore::Get(RecordId id) {
  std::vector<Removal> removed;
  Result<ReadLease> result = [&] {
    std::lock_guard<std::mutex> lock(mu_);
    return GetLocked(id, removed);
  }();
  Notify(removed);
  return result;
}

Result<ReadLease> EmbeddedStore::GetLocked(RecordId id, std::vector<Removal>& removed) {
  ReclaimExpiredLocked(removed);
  auto it = records_.find(id);
  if (it == records_.end() || it->second->state != State::kSealed) {
    ++counters_.misses;
    return NotFound("record " + std::to_string(id) + " is not in the store");
  }
  Record* record = it->second.get();
  ++counters_.hits;
  if (record->leases == 0) {
    pinned_.splice(pinned_.end(), lru_, record->lru_pos);
    evictable_bytes_ -= record->allocated;
  }
  ++record->leases;
  ++counters_.leases;

  ReadLease lease;
  lease.store_ = this;
  lease.record_ = record;
  lease.id_ = id;
  lease.data_ = segments_[record->segment]->base() + record->offset;
  lease.size_ = record->size;
  lease.segment_ = record->segment;
  lease.offset_ = record->offset;
  return lease;
}

void EmbeddedStore::Release(Record* record) {
  std::lock_guard<std::mutex> lock(mu_);
  RELAYKV_CHECK(record->leases > 0);
  --record->leases;
  --counters_.leases;
  if (record->leases != 0) return;
  if (record->state == State::kSealed) {
    // Released records count as just used: back in at the MRU end.
    lru_.splice(lru_.end(), pinned_, record->lru_pos);
    evictable_bytes_ += record->allocated;
  } else {
    RELAYKV_CHECK(record->state == State::kRemoved);
    FreeLocked(record);
    removed_leased_.erase(record);  // destroys the record
  }
}

bool EmbeddedStore::Contains(RecordId id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = records_.find(id);
  if (it == records_.end() || it->second->state != State::kSealed) return false;
  return !it->second->has_expiry || it->second->expiry_pos->first > Now();
}

Status EmbeddedStore::Delete(RecordId id) {
  std::vector<Removal> removed;
  Status status = [&] {
    std::lock_guard<std::mutex> lock(mu_);
    return DeleteLocked(id, removed);
  }();
  Notify(removed);
  return status;
}

Status EmbeddedStore::DeleteLocked(RecordId id, std::vector<Removal>& removed) {
  ReclaimExpiredLocked(removed);
  auto it = records_.find(id);
  if (it == records_.end()) {
    return NotFound("record " + std::to_string(id) + " is not in the store");
  }
  if (it->second->state == State::kPending) {
    return FailedPrecondition("record " + std::to_string(id) +
                              " is still being written; abort its WriteHandle instead");
  }
  RemoveVisibleLocked(it->second.get(), RemovalReason::kDeleted, removed);
  return Status::Ok();
}

size_t EmbeddedStore::ReclaimExpired() {
  std::vector<Removal> removed;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ReclaimExpiredLocked(removed);
  }
  Notify(removed);
  return removed.size();
}

StoreStats EmbeddedStore::Stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  StoreStats s = counters_;
  s.capacity_bytes = capacity_bytes_;
  s.bytes_used = bytes_used_;
  s.largest_free_bytes = 0;
  for (const SegmentAllocator& a : allocators_) {
    s.largest_free_bytes = std::max(s.largest_free_bytes, a.largest_free());
  }
  s.leased_records = pinned_.size();
  s.removed_leased = removed_leased_.size();
  return s;
}

}  // namespace relaykv
