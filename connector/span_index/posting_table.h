// Anchor key -> postings (record slot, offset): a flat open-addressing
// multimap with linear probing. Private to the span index.
//
// Why not std::unordered_map<key, std::vector<Posting>>: with millions of
// anchors, one node and one vector per key cost two dependent cache misses per
// probe and several times the memory. Here a key's postings sit next to each other, so a
// probe is usually one cache line, and a query can prefetch all its probes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>

namespace relaykv::span_internal {

// The key is 32 bits of the anchor hash (see KeyOfHash); a key collision only
// costs a verification that fails, never a wrong span.
struct Posting {
  uint32_t key;  // 0 = empty
  uint32_t slot;
  int32_t offset;
};

// A zero-filled array of postings. Large ones ask for transparent huge pages:
// probes land on random addresses of a table of hundreds of MB, and with 4 KiB
// pages nearly every probe would also miss the TLB.
class PostingArray {
 public:
  PostingArray() = default;
  explicit PostingArray(size_t size);
  ~PostingArray();
  PostingArray(PostingArray&& other) noexcept { swap(other); }
  PostingArray& operator=(PostingArray&& other) noexcept {
    swap(other);
    return *this;
  }
  PostingArray(const PostingArray&) = delete;
  PostingArray& operator=(const PostingArray&) = delete;

  Posting& operator[](size_t i) { return data_[i]; }
  const Posting& operator[](size_t i) const { return data_[i]; }
  size_t size() const { return size_; }
  size_t bytes() const { return bytes_; }
  void swap(PostingArray& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(size_, other.size_);
    std::swap(bytes_, other.bytes_);
  }

 private:
  Posting* data_ = nullptr;
  size_t size_ = 0;
  size_t bytes_ = 0;
};

class PostingTable {
 public:
  PostingTable();

  // Adds a posting. When `key` already has `cap` postings, the one whose slot
  // has the smallest age_of(slot) (the oldest record) is replaced instead.
  template <typename AgeOf>
  void Add(uint32_t key, uint32_t slot, int32_t offset, int32_t cap, const AgeOf& age_of);

  // Removes one posting equal to (key, slot, offset); false if none (it may
  // have been replaced under the cap).
  bool Erase(uint32_t key, uint32_t slot, int32_t offset);

  const Posting* HomeAddress(uint32_t key) const { return &slots_[Home(key)]; }

  template <typename Fn>
  void ForEach(uint32_t key, const Fn& fn) const {
    for (size_t i = Home(key);; i = (i + 1) & mask_) {
      const Posting& p = slots_[i];
      if (p.key == 0) return;
      if (p.key == key) fn(p);
    }
  }

  size_t size() const { return size_; }
  size_t MemoryBytes() const { return slots_.bytes(); }

 private:
  size_t Home(uint32_t key) const {
    // Fibonacci hashing: robust even when the test hook makes keys regular.
    return static_cast<size_t>(static_cast<uint32_t>(key * 2654435769u) >> shift_);
  }
  void Grow();

  PostingArray slots_;
  size_t mask_ = 0;
  int shift_ = 0;
  size_t size_ = 0;
};

template <typename AgeOf>
void PostingTable::Add(uint32_t key, uint32_t slot, int32_t offset, int32_t cap,
                       const AgeOf& age_of) {
  // Keep the load at or below 3/4: probes for absent keys (most of a query's
  // anchors) stay short.
  if ((size_ + 1) * 4 > slots_.size() * 3) Grow();
  size_t i = Home(key);
  int32_t count = 0;
  for (; slots_[i].key != 0; i = (i + 1) & mask_) {
    if (slots_[i].key == key) ++count;
  }
  if (count < cap) {
    slots_[i] = Posting{key, slot, offset};
    ++size_;
    return;
  }
  Posting* oldest = nullptr;
  auto oldest_age = age_of(slot);
  for (size_t j = Home(key); slots_[j].key != 0; j = (j + 1) & mask_) {
    if (slots_[j].key != key) continue;
    const auto age = age_of(slots_[j].slot);
    if (oldest == nullptr || age < oldest_age) {
      oldest = &slots_[j];
      oldest_age = age;
    }
  }
  oldest->slot = slot;
  oldest->offset = offset;
}

}  // namespace relaykv::span_internal
