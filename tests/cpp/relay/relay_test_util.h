// Inputs both relay test binaries build: block tables and token ids.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

namespace relaykv::testing {

// `n` distinct block ids out of [0, num_blocks), in a seeded random order (as
// an allocator hands them out).
inline std::vector<int32_t> ShuffledBlocks(int32_t num_blocks, int32_t n, uint32_t seed) {
  std::vector<int32_t> v(static_cast<size_t>(num_blocks));
  std::iota(v.begin(), v.end(), 0);
  std::shuffle(v.begin(), v.end(), std::mt19937(seed));
  v.resize(static_cast<size_t>(n));
  return v;
}

// `n` token ids from `base` on, spread out so that different bases rarely collide.
inline std::vector<int32_t> Tokens(int32_t n, int32_t base) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int32_t i = 0; i < n; ++i) t[i] = base + (i * 7919) % 5003;
  return t;
}

}  // namespace relaykv::testing
