// Store memory, split in two so the bookkeeping can outlive any one transport:
//
//   SegmentAllocator  hands out aligned [offset, offset + size) ranges inside
//                     [0, capacity). It owns no memory: the same allocator
//                     describes a host segment, a GPU segment, or a segment a
//                     store server has registered with UCX and serves remotely
//                     (remote peers address records by segment + offset).
//   Segment           owns one aligned allocation (RAII) and says where it is.
//
// Neither class locks: the owner (EmbeddedStore, later the store server)
// serialises calls.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "transfer/common/status.h"

namespace relaykv {

enum class FitPolicy : uint8_t {
  // Smallest free range that fits; O(log n). Keeps large ranges intact for
  // large records, which matters when 4 KB and 16 MB records share a segment.
  kBestFit,
  // Lowest-offset free range that fits; O(number of free ranges). Packs
  // records towards the start of the segment.
  kFirstFit,
};

std::string_view FitPolicyName(FitPolicy policy);

class SegmentAllocator {
 public:
  // `alignment` must be a power of two. Every offset handed out and every
  // range size is a multiple of it; capacity is rounded down to a multiple of
  // it (capacity() reports the rounded value).
  static Result<SegmentAllocator> Create(uint64_t capacity, uint64_t alignment = 64,
                                         FitPolicy policy = FitPolicy::kBestFit);

  // Returns the offset of a free range of AlignUp(bytes) bytes. bytes == 0 is
  // InvalidArgument; no fitting range is ResourceExhausted. Callers that probe
  // in a loop should test Fits() first: building the error costs a string.
  Result<uint64_t> Allocate(uint64_t bytes);
  // Returns the range that Allocate() returned at `offset`, coalescing it with
  // free neighbours. An offset that is not the start of an allocated range is
  // InvalidArgument (and nothing changes).
  Status Free(uint64_t offset);

  // True when Allocate(bytes) would succeed now.
  bool Fits(uint64_t bytes) const;
  // Size of the range allocated at `offset`, 0 when none is.
  uint64_t AllocatedSize(uint64_t offset) const;

  uint64_t AlignUp(uint64_t bytes) const { return (bytes + alignment_ - 1) & ~(alignment_ - 1); }
  uint64_t capacity() const { return capacity_; }
  uint64_t alignment() const { return alignment_; }
  FitPolicy policy() const { return policy_; }
  uint64_t used_bytes() const { return used_; }
  uint64_t free_bytes() const { return capacity_ - used_; }
  uint64_t largest_free() const;
  size_t num_allocations() const { return allocated_.size(); }
  size_t num_free_ranges() const { return free_by_offset_.size(); }

  // Free ranges as (offset, size), ascending by offset; for tests and metrics.
  std::vector<std::pair<uint64_t, uint64_t>> FreeRanges() const;
  // Cross-checks the three indexes (sizes sum up, no overlap, free ranges
  // fully coalesced, everything in range). O(n); for tests.
  Status CheckInvariants() const;

 private:
  SegmentAllocator(uint64_t capacity, uint64_t alignment, FitPolicy policy);

  void InsertFree(uint64_t offset, uint64_t size);
  void EraseFree(std::map<uint64_t, uint64_t>::iterator it);

  uint64_t capacity_;
  uint64_t alignment_;
  FitPolicy policy_;
  uint64_t used_ = 0;
  // Free ranges indexed twice: by offset for coalescing and first-fit, by
  // (size, offset) for best-fit. Both always hold exactly the same ranges.
  std::map<uint64_t, uint64_t> free_by_offset_;
  std::set<std::pair<uint64_t, uint64_t>> free_by_size_;
  std::unordered_map<uint64_t, uint64_t> allocated_;  // offset -> size
};

// Where a segment's memory lives. Only host memory exists today; GPU segments
// arrive with the CUDA/UCX store server and plug in here.
enum class MemoryKind : uint8_t { kHost, kCudaDevice };

std::string_view MemoryKindName(MemoryKind kind);

class Segment {
 public:
  // Maps `bytes` (rounded up to whole pages) aligned to at least
  // max(alignment, page size). `populate` faults every page in now, so the
  // first writes do not pay for page faults (and a store server's UCX
  // registration finds the pages present).
  static Result<std::unique_ptr<Segment>> Create(uint64_t bytes, uint64_t alignment = 64,
                                                 MemoryKind kind = MemoryKind::kHost,
                                                 bool populate = false);

  // Memory something else allocated and frees (a transport's allocation):
  // the segment keeps `owner` alive and never unmaps `base` itself. `base`
  // must be aligned to `alignment` (a power of two); `populate` touches
  // every page now, as in Create.
  static Result<std::unique_ptr<Segment>> Adopt(std::byte* base, uint64_t bytes, uint64_t alignment,
                                                MemoryKind kind, std::shared_ptr<void> owner,
                                                bool populate = false);

  std::byte* base() const { return mem_.get(); }
  // Usable bytes: exactly what was asked for (the mapping may be larger).
  uint64_t size() const { return size_; }
  MemoryKind kind() const { return kind_; }

  Segment(const Segment&) = delete;
  Segment& operator=(const Segment&) = delete;

 private:
  struct Unmap {
    uint64_t mapped_bytes = 0;
    void operator()(std::byte* p) const;
  };
  Segment(std::unique_ptr<std::byte, Unmap> mem, uint64_t size, MemoryKind kind)
      : mem_(std::move(mem)), size_(size), kind_(kind) {}

  std::shared_ptr<void> owner_;  // adopted memory's allocation, else null
  std::unique_ptr<std::byte, Unmap> mem_;
  uint64_t size_;
  MemoryKind kind_;
};

}  // namespace relaykv
