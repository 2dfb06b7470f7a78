#include "connector/span_index/posting_table.h"

#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "transfer/common/check.h"

namespace relaykv::span_internal {
namespace {
constexpr int kInitialBits = 10;
constexpr size_t kHugePage = size_t{2} << 20;
}  // namespace

PostingArray::PostingArray(size_t size) : size_(size) {
  bytes_ = size * sizeof(Posting);
  if (bytes_ >= kHugePage) {
    bytes_ = (bytes_ + kHugePage - 1) / kHugePage * kHugePage;
    data_ = static_cast<Posting*>(std::aligned_alloc(kHugePage, bytes_));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    // Only a hint: without THP the table works the same, a little slower.
    if (data_ != nullptr) madvise(data_, bytes_, MADV_HUGEPAGE);
#endif
  } else {
    data_ = static_cast<Posting*>(std::malloc(bytes_));
  }
  if (data_ == nullptr) throw std::bad_alloc();
  std::memset(static_cast<void*>(data_), 0, bytes_);  // key 0: empty
}

PostingArray::~PostingArray() { std::free(data_); }

PostingTable::PostingTable()
    : slots_(size_t{1} << kInitialBits),
      mask_((size_t{1} << kInitialBits) - 1),
      shift_(32 - kInitialBits) {}

void PostingTable::Grow() {
  RELAYKV_CHECK(shift_ > 0);  // 2^32 slots: far beyond any realistic index
  PostingArray old(slots_.size() * 2);
  old.swap(slots_);  // `old` now holds the current entries
  mask_ = slots_.size() - 1;
  --shift_;
  for (size_t j = 0; j < old.size(); ++j) {
    const Posting& p = old[j];
    if (p.key == 0) continue;
    size_t i = Home(p.key);
    while (slots_[i].key != 0) i = (i + 1) & mask_;
    slots_[i] = p;
  }
}

bool PostingTable::Erase(uint32_t key, uint32_t slot, int32_t offset) {
  size_t i = Home(key);
  for (;; i = (i + 1) & mask_) {
    const Posting& p = slots_[i];
    if (p.key == 0) return false;
    if (p.key == key && p.slot == slot && p.offset == offset) break;
  }
  // Backward-shift deletion: no tombstones, so probes stay as short as the
  // load factor says even after millions of evictions.
  for (size_t j = i;;) {
    j = (j + 1) & mask_;
    if (slots_[j].key == 0) break;
    const size_t home = Home(slots_[j].key);
    // The entry at j may move to the hole at i only if i lies on its probe path
    // (cyclically between its home and j).
    if (((j - home) & mask_) >= ((j - i) & mask_)) {
      slots_[i] = slots_[j];
      i = j;
    }
  }
  slots_[i].key = 0;
  --size_;
  return true;
}

}  // namespace relaykv::span_internal
