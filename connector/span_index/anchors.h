// Content-defined anchor selection (minimizers) shared by records and queries.
// Private to the span index.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

namespace relaykv::span_internal {

struct Anchor {
  int32_t pos;   // first token of the k-gram, relative to the sequence passed
  uint32_t key;  // the k-gram's hash reduced to 32 bits, never 0
};

using KgramHash = std::function<uint64_t(std::span<const int32_t>)>;

// The 32 bits of a k-gram hash that order k-grams and key the posting table.
// 0 is kept free to mark empty table slots.
inline uint32_t KeyOfHash(uint64_t hash) {
  const uint32_t key = static_cast<uint32_t>(hash >> 32);
  return key != 0 ? key : 1;
}

class AnchorSelector {
 public:
  // k and w must be >= 1 (SpanIndexOptions::Validate checks it).
  AnchorSelector(int32_t k, int32_t w, KgramHash hash_override);

  // Replaces *out with the anchors of `tokens` in increasing position order:
  // for every window of w consecutive k-grams, the k-gram of minimum key
  // (leftmost on ties), each position once. A choice that depends only on the
  // window's content is what makes equal runs choose equal anchors.
  // Sequences with fewer than w + k - 1 tokens have no full window and no anchors.
  void Select(std::span<const int32_t> tokens, std::vector<Anchor>* out) const;

  int32_t k() const { return k_; }
  int32_t w() const { return w_; }

 private:
  // (key << 32 | position) per k-gram: the minimum of these over a window is
  // its leftmost minimum-key k-gram.
  void PackedKeys(std::span<const int32_t> tokens, std::vector<uint64_t>* packed) const;

  int32_t k_;
  int32_t w_;
  uint64_t base_pow_k_;  // kBase^k, to drop the outgoing token of the rolling hash
  KgramHash hash_override_;
};

}  // namespace relaykv::span_internal
