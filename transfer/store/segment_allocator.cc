#include "transfer/store/segment_allocator.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <iterator>
#include <limits>
#include <string>

#include "transfer/common/check.h"

namespace relaykv {

namespace {
bool IsPowerOfTwo(uint64_t x) { return x != 0 && (x & (x - 1)) == 0; }
}  // namespace

std::string_view FitPolicyName(FitPolicy policy) {
  switch (policy) {
    case FitPolicy::kBestFit:
      return "best_fit";
    case FitPolicy::kFirstFit:
      return "first_fit";
  }
  return "unknown";
}

std::string_view MemoryKindName(MemoryKind kind) {
  switch (kind) {
    case MemoryKind::kHost:
      return "host";
    case MemoryKind::kCudaDevice:
      return "cuda_device";
  }
  return "unknown";
}

// ---------------------------------------------------------------------------
// SegmentAllocator

SegmentAllocator::SegmentAllocator(uint64_t capacity, uint64_t alignment, FitPolicy policy)
    : capacity_(capacity), alignment_(alignment), policy_(policy) {
  InsertFree(0, capacity_);
}

Result<SegmentAllocator> SegmentAllocator::Create(uint64_t capacity, uint64_t alignment,
                                                  FitPolicy policy) {
  if (!IsPowerOfTwo(alignment)) {
    return InvalidArgument("allocator alignment must be a power of two, got " +
                           std::to_string(alignment));
  }
  const uint64_t usable = capacity & ~(alignment - 1);
  if (usable == 0) {
    return InvalidArgument("allocator capacity " + std::to_string(capacity) +
                           " holds no aligned range of " + std::to_string(alignment) + " bytes");
  }
  return SegmentAllocator(usable, alignment, policy);
}

void SegmentAllocator::InsertFree(uint64_t offset, uint64_t size) {
  free_by_offset_.emplace(offset, size);
  free_by_size_.emplace(size, offset);
}

void SegmentAllocator::EraseFree(std::map<uint64_t, uint64_t>::iterator it) {
  free_by_size_.erase({it->second, it->first});
  free_by_offset_.erase(it);
}

uint64_t SegmentAllocator::largest_free() const {
  return free_by_size_.empty() ? 0 : free_by_size_.rbegin()->first;
}

bool SegmentAllocator::Fits(uint64_t bytes) const {
  return bytes != 0 && bytes <= capacity_ && AlignUp(bytes) <= largest_free();
}

Result<uint64_t> SegmentAllocator::Allocate(uint64_t bytes) {
  if (bytes == 0) return InvalidArgument("cannot allocate 0 bytes");
  // Checked before AlignUp so that a huge request cannot wrap around.
  if (bytes > capacity_) {
    return ResourceExhausted("allocation of " + std::to_string(bytes) +
                             " bytes exceeds segment capacity " + std::to_string(capacity_));
  }
  const uint64_t size = AlignUp(bytes);
  std::map<uint64_t, uint64_t>::iterator chosen = free_by_offset_.end();
  if (policy_ == FitPolicy::kBestFit) {
    auto it = free_by_size_.lower_bound({size, 0});
    if (it != free_by_size_.end()) chosen = free_by_offset_.find(it->second);
  } else {
    for (auto it = free_by_offset_.begin(); it != free_by_offset_.end(); ++it) {
      if (it->second >= size) {
        chosen = it;
        break;
      }
    }
  }
  if (chosen == free_by_offset_.end()) {
    return ResourceExhausted("no free range of " + std::to_string(size) +
                             " bytes: " + std::to_string(free_bytes()) + " bytes free in " +
                             std::to_string(free_by_offset_.size()) + " ranges, largest " +
                             std::to_string(largest_free()));
  }
  const uint64_t offset = chosen->first;
  const uint64_t range = chosen->second;
  EraseFree(chosen);
  // Carving from the front keeps the remainder where it was, so a run of
  // allocations fills a range from low to high offsets.
  if (range > size) InsertFree(offset + size, range - size);
  allocated_.emplace(offset, size);
  used_ += size;
  return offset;
}

Status SegmentAllocator::Free(uint64_t offset) {
  auto a = allocated_.find(offset);
  if (a == allocated_.end()) {
    return InvalidArgument("offset " + std::to_string(offset) + " is not an allocated range");
  }
  uint64_t start = offset;
  uint64_t size = a->second;
  allocated_.erase(a);
  used_ -= size;

  // Merge with the free range that ends where this one starts and with the
  // one that starts where it ends; the map keeps both lookups O(log n).
  auto next = free_by_offset_.lower_bound(offset);
  if (next != free_by_offset_.end() && next->first == start + size) {
    size += next->second;
    EraseFree(next);
    next = free_by_offset_.lower_bound(offset);
  }
  if (next != free_by_offset_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == start) {
      start = prev->first;
      size += prev->second;
      EraseFree(prev);
    }
  }
  InsertFree(start, size);
  return Status::Ok();
}

uint64_t SegmentAllocator::AllocatedSize(uint64_t offset) const {
  auto it = allocated_.find(offset);
  return it == allocated_.end() ? 0 : it->second;
}

std::vector<std::pair<uint64_t, uint64_t>> SegmentAllocator::FreeRanges() const {
  return {free_by_offset_.begin(), free_by_offset_.end()};
}

Status SegmentAllocator::CheckInvariants() const {
  if (free_by_offset_.size() != free_by_size_.size()) {
    return Internal("free indexes disagree: " + std::to_string(free_by_offset_.size()) +
                    " by offset, " + std::to_string(free_by_size_.size()) + " by size");
  }
  // Walk free and allocated ranges together in offset order: they must tile
  // [0, capacity) exactly, with no two free ranges adjacent.
  std::map<uint64_t, std::pair<uint64_t, bool>> all;  // offset -> (size, is_free)
  uint64_t free_sum = 0;
  uint64_t used_sum = 0;
  for (const auto& [off, size] : free_by_offset_) {
    if (!free_by_size_.count({size, off})) {
      return Internal("free range at " + std::to_string(off) + " missing from size index");
    }
    all.emplace(off, std::make_pair(size, true));
    free_sum += size;
  }
  for (const auto& [off, size] : allocated_) {
    if (!all.emplace(off, std::make_pair(size, false)).second) {
      return Internal("offset " + std::to_string(off) + " is both free and allocated");
    }
    used_sum += size;
  }
  if (used_sum != used_) {
    return Internal("used bytes " + std::to_string(used_) + " but allocations sum to " +
                    std::to_string(used_sum));
  }
  if (free_sum + used_sum != capacity_) {
    return Internal("free + used = " + std::to_string(free_sum + used_sum) + " != capacity " +
                    std::to_string(capacity_));
  }
  uint64_t expect = 0;
  bool prev_free = false;
  for (const auto& [off, entry] : all) {
    const auto [size, is_free] = entry;
    if (off != expect) {
      return Internal("range at " + std::to_string(off) + " does not start where the previous " +
                      "ended (" + std::to_string(expect) + ")");
    }
    if (size == 0 || off % alignment_ != 0 || size % alignment_ != 0) {
      return Internal("range at " + std::to_string(off) + " of " + std::to_string(size) +
                      " bytes is empty or misaligned");
    }
    if (is_free && prev_free) {
      return Internal("free range at " + std::to_string(off) + " was not coalesced");
    }
    prev_free = is_free;
    expect = off + size;
  }
  if (expect != capacity_) {
    return Internal("ranges end at " + std::to_string(expect) + ", capacity is " +
                    std::to_string(capacity_));
  }
  return Status::Ok();
}

// ---------------------------------------------------------------------------
// Segment

void Segment::Unmap::operator()(std::byte* p) const {
  // mapped_bytes == 0: adopted memory, which its owner frees.
  if (p != nullptr && mapped_bytes != 0) RELAYKV_CHECK(::munmap(p, mapped_bytes) == 0);
}

namespace {

void TouchPages(std::byte* start, uint64_t bytes) {
  const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  for (uint64_t off = 0; off < bytes; off += page) {
    static_cast<volatile std::byte*>(start)[off] = std::byte{0};
  }
}

}  // namespace

Result<std::unique_ptr<Segment>> Segment::Adopt(std::byte* base, uint64_t bytes, uint64_t alignment,
                                                MemoryKind kind, std::shared_ptr<void> owner,
                                                bool populate) {
  if (base == nullptr || bytes == 0) return InvalidArgument("adopted segment: null or empty");
  if (!IsPowerOfTwo(alignment) || reinterpret_cast<uintptr_t>(base) % alignment != 0) {
    return InvalidArgument("adopted segment: base is not aligned to " + std::to_string(alignment));
  }
  if (populate && kind == MemoryKind::kHost) TouchPages(base, bytes);
  auto segment = std::unique_ptr<Segment>(
      new Segment(std::unique_ptr<std::byte, Unmap>(base, Unmap{0}), bytes, kind));
  segment->owner_ = std::move(owner);
  return segment;
}

Result<std::unique_ptr<Segment>> Segment::Create(uint64_t bytes, uint64_t alignment,
                                                 MemoryKind kind, bool populate) {
  if (kind != MemoryKind::kHost) {
    return Unimplemented("segment memory kind '" + std::string(MemoryKindName(kind)) +
                         "' is not built yet; only host segments exist");
  }
  if (bytes == 0) return InvalidArgument("segment size must be > 0");
  if (!IsPowerOfTwo(alignment)) {
    return InvalidArgument("segment alignment must be a power of two, got " +
                           std::to_string(alignment));
  }
  const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  if (bytes > std::numeric_limits<uint64_t>::max() / 2) {
    return InvalidArgument("segment size " + std::to_string(bytes) + " is not mappable");
  }
  const uint64_t mapped = (bytes + page - 1) / page * page;
  // mmap gives page alignment; a larger alignment (e.g. 2 MiB for huge pages)
  // is reached by over-mapping and trimming both ends.
  const uint64_t slack = alignment > page ? alignment : 0;
  void* raw =
      ::mmap(nullptr, mapped + slack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) {
    return ResourceExhausted("mmap of " + std::to_string(mapped + slack) +
                             " bytes failed: " + std::strerror(errno));
  }
  auto* start = static_cast<std::byte*>(raw);
  if (slack != 0) {
    const uint64_t addr = reinterpret_cast<uintptr_t>(raw);
    const uint64_t head = ((addr + alignment - 1) & ~(alignment - 1)) - addr;
    if (head != 0) RELAYKV_CHECK(::munmap(raw, head) == 0);
    const uint64_t tail = slack - head;
    if (tail != 0) RELAYKV_CHECK(::munmap(start + head + mapped, tail) == 0);
    start += head;
  }
  std::unique_ptr<std::byte, Unmap> mem(start, Unmap{mapped});
  // Large KV records are copied in bulk; huge pages cut TLB misses and page
  // faults. Advice only: a kernel without THP ignores it. It has to come
  // before the pages are first touched, hence no MAP_POPULATE above.
  if (mapped >= (uint64_t{2} << 20)) ::madvise(start, mapped, MADV_HUGEPAGE);
  if (populate) TouchPages(start, mapped);
  return std::unique_ptr<Segment>(new Segment(std::move(mem), bytes, kind));
}

}  // namespace relaykv
