#include "connector/span_index/anchors.h"

#include <algorithm>
#include <utility>

namespace relaykv::span_internal {
namespace {

// Polynomial rolling hash mod 2^64 (odd base), then a full-avalanche finaliser:
// the polynomial alone orders k-grams too regularly for minimum selection.
constexpr uint64_t kBase = 0x100000001b3ull * 2 + 1;
constexpr uint64_t kSeed = 0x2545f4914f6cdd1dull;

inline uint64_t Mix(uint64_t x) {
  x ^= kSeed;
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return x;
}

// +1 so that token id 0 still changes the hash.
inline uint64_t TokenValue(int32_t t) { return uint64_t{static_cast<uint32_t>(t)} + 1; }

inline uint64_t Pack(uint64_t hash, size_t pos) {
  return (uint64_t{KeyOfHash(hash)} << 32) | static_cast<uint32_t>(pos);
}

}  // namespace

AnchorSelector::AnchorSelector(int32_t k, int32_t w, KgramHash hash_override)
    : k_(k), w_(w), hash_override_(std::move(hash_override)) {
  base_pow_k_ = 1;
  for (int32_t i = 0; i < k_; ++i) base_pow_k_ *= kBase;
}

void AnchorSelector::PackedKeys(std::span<const int32_t> tokens,
                                std::vector<uint64_t>* packed) const {
  const size_t n = tokens.size();
  const size_t k = static_cast<size_t>(k_);
  const size_t m = n - k + 1;  // caller guarantees n >= k
  packed->resize(m);
  uint64_t* out = packed->data();
  if (hash_override_) {
    for (size_t i = 0; i < m; ++i) out[i] = Pack(hash_override_(tokens.subspan(i, k)), i);
    return;
  }
  const int32_t* t = tokens.data();
  uint64_t h = 0;
  for (size_t i = 0; i < k; ++i) h = h * kBase + TokenValue(t[i]);
  out[0] = Pack(Mix(h), 0);
  for (size_t i = k; i < n; ++i) {
    h = h * kBase + TokenValue(t[i]) - TokenValue(t[i - k]) * base_pow_k_;
    out[i - k + 1] = Pack(Mix(h), i - k + 1);
  }
}

void AnchorSelector::Select(std::span<const int32_t> tokens, std::vector<Anchor>* out) const {
  out->clear();
  const size_t k = static_cast<size_t>(k_);
  const size_t w = static_cast<size_t>(w_);
  if (tokens.size() < k + w - 1) return;

  thread_local std::vector<uint64_t> packed;
  thread_local std::vector<uint64_t> prefix;
  thread_local std::vector<uint64_t> suffix;
  PackedKeys(tokens, &packed);
  const size_t m = packed.size();
  const uint64_t* v = packed.data();
  // Sliding-window minimum without a deque (van Herk / Gil-Werman): cut the
  // sequence into blocks of w; a window spans at most two blocks, so its
  // minimum is (suffix minimum in the first) min (prefix minimum in the
  // second). Branch-free, where a deque mispredicts on every other token.
  prefix.resize(m);
  suffix.resize(m);
  uint64_t* pre = prefix.data();
  uint64_t* suf = suffix.data();
  for (size_t b = 0; b < m; b += w) {
    const size_t e = std::min(b + w, m);
    pre[b] = v[b];
    for (size_t i = b + 1; i < e; ++i) pre[i] = std::min(pre[i - 1], v[i]);
    suf[e - 1] = v[e - 1];
    for (size_t i = e - 1; i > b; --i) suf[i - 1] = std::min(suf[i], v[i - 1]);
  }
  out->reserve(2 * m / (w + 1) + 8);
  uint64_t last = ~uint64_t{0};
  for (size_t j = 0; j + w <= m; ++j) {
    const uint64_t mn = std::min(suf[j], pre[j + w - 1]);
    if (mn != last) {
      last = mn;
      out->push_back(
          Anchor{static_cast<int32_t>(static_cast<uint32_t>(mn)), static_cast<uint32_t>(mn >> 32)});
    }
  }
}

}  // namespace relaykv::span_internal
