// Shared by the CPU and CUDA kv_ops tests: paged caches in several physical
// layouts over one host buffer, random contents, and plain reference loops that
// address every element through the PagedKvCache formula, one at a time.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <ostream>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "connector/kv_ops/paged_kv.h"
#include "transfer/common/dtype.h"
#include "transfer/record/kv_layout.h"
#include "transfer/record/rope_params.h"

namespace relaykv::testing {

enum class Phys {
  kNhd,         // vLLM flash-attn: per layer [2, blocks, slots, heads, dim]
  kHnd,         // per layer [blocks, 2, heads, slots, dim]
  kKvLastDim,   // per layer [blocks, slots, heads, 2*dim]: K|V packed along the last dim
  kSharedPad,   // NHD per layer, all layers in one buffer with odd padding between them
  kDimStrided,  // per layer [blocks, slots, heads, dim, 2]: K and V interleaved per element
};

inline const char* PhysName(Phys p) {
  switch (p) {
    case Phys::kNhd:
      return "nhd";
    case Phys::kHnd:
      return "hnd";
    case Phys::kKvLastDim:
      return "kv_last_dim";
    case Phys::kSharedPad:
      return "shared_pad";
    case Phys::kDimStrided:
      return "dim_strided";
  }
  return "?";
}

inline constexpr Phys kAllPhys[] = {Phys::kNhd, Phys::kHnd, Phys::kKvLastDim, Phys::kSharedPad,
                                    Phys::kDimStrided};
inline constexpr DType kAllDTypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};

// Test parameters. gtest prints them through PrintTo, and CMake's test
// discovery turns the printed value into the ctest name ("…/nhd_float16").
struct LayoutCase {
  Phys phys;
  DType dtype;
};
inline void PrintTo(const LayoutCase& c, std::ostream* os) {
  *os << PhysName(c.phys) << "_" << DTypeName(c.dtype);
}
inline std::vector<LayoutCase> AllLayoutCases() {
  std::vector<LayoutCase> cases;
  for (Phys p : kAllPhys)
    for (DType d : kAllDTypes) cases.push_back({p, d});
  return cases;
}

struct DTypeCase {
  DType dtype;
};
inline void PrintTo(const DTypeCase& c, std::ostream* os) { *os << DTypeName(c.dtype); }
inline std::vector<DTypeCase> AllDTypeCases() {
  return {{DType::kFloat32}, {DType::kFloat16}, {DType::kBFloat16}};
}

// Random finite values with magnitudes in [2^-7, 2) and random signs, made
// directly from random bits (fast enough to fill every test buffer).
inline void FillRandom(std::span<uint8_t> bytes, DType dtype, uint64_t seed) {
  uint64_t state = seed * 0x9e3779b97f4a7c15ULL + 1;
  auto next = [&state] {  // splitmix64
    uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  };
  const int64_t es = DTypeSize(dtype);
  for (size_t off = 0; off + es <= bytes.size(); off += es) {
    const uint64_t r = next();
    const uint32_t sign = r & 1, exp_step = (r >> 1) & 7;
    if (dtype == DType::kFloat32) {
      const uint32_t bits =
          sign << 31 | (120 + exp_step) << 23 | static_cast<uint32_t>(r >> 8) >> 9;
      std::memcpy(bytes.data() + off, &bits, 4);
    } else if (dtype == DType::kFloat16) {
      const auto bits =
          static_cast<uint16_t>(sign << 15 | (8 + exp_step) << 10 | ((r >> 8) & 0x3ff));
      std::memcpy(bytes.data() + off, &bits, 2);
    } else {
      const auto bits =
          static_cast<uint16_t>(sign << 15 | (120 + exp_step) << 7 | ((r >> 8) & 0x7f));
      std::memcpy(bytes.data() + off, &bits, 2);
    }
  }
}

// A paged cache over a host buffer it owns. `cache` points into `storage`.
struct TestCache {
  std::vector<uint8_t> storage;
  PagedKvCache cache;

  int64_t ByteOffset(const void* p) const {
    return static_cast<const uint8_t*>(p) - storage.data();
  }

  // A deep copy whose cache points into its own storage.
  TestCache Clone() const {
    TestCache c;
    c.storage = storage;
    c.cache = cache;
    for (size_t l = 0; l < cache.k_base.size(); ++l) {
      c.cache.k_base[l] = c.storage.data() + ByteOffset(cache.k_base[l]);
      c.cache.v_base[l] = c.storage.data() + ByteOffset(cache.v_base[l]);
    }
    return c;
  }
};

inline TestCache MakeCache(const KvLayout& layout, int32_t block_size, int64_t num_blocks,
                           Phys phys, uint64_t seed) {
  TestCache t;
  PagedKvCache& c = t.cache;
  c.layout = layout;
  c.block_size = block_size;
  c.num_blocks = num_blocks;
  const int64_t H = layout.num_kv_heads, D = layout.head_size, S = block_size;
  const int64_t kv_elems = num_blocks * S * H * D;  // one of K or V, one layer
  int64_t layer_elems = 2 * kv_elems;
  int64_t pad = 0;
  int64_t v_offset = 0;
  switch (phys) {
    case Phys::kNhd:
    case Phys::kSharedPad:
      c.block_stride = S * H * D;
      c.slot_stride = H * D;
      c.head_stride = D;
      c.dim_stride = 1;
      v_offset = kv_elems;
      pad = phys == Phys::kSharedPad ? 7 : 0;  // odd: layer bases lose 16-byte alignment
      break;
    case Phys::kHnd:
      c.block_stride = 2 * H * S * D;
      c.slot_stride = D;
      c.head_stride = S * D;
      c.dim_stride = 1;
      v_offset = H * S * D;
      break;
    case Phys::kKvLastDim:
      c.block_stride = S * H * 2 * D;
      c.slot_stride = H * 2 * D;
      c.head_stride = 2 * D;
      c.dim_stride = 1;
      v_offset = D;
      break;
    case Phys::kDimStrided:
      c.block_stride = S * H * D * 2;
      c.slot_stride = H * D * 2;
      c.head_stride = D * 2;
      c.dim_stride = 2;
      v_offset = 1;
      break;
  }
  const int64_t es = DTypeSize(layout.dtype);
  t.storage.resize((layout.num_layers * (layer_elems + pad) + pad) * es);
  FillRandom(t.storage, layout.dtype, seed);
  for (int32_t l = 0; l < layout.num_layers; ++l) {
    uint8_t* base = t.storage.data() + (pad + l * (layer_elems + pad)) * es;
    c.k_base.push_back(base);
    c.v_base.push_back(base + v_offset * es);
  }
  return t;
}

// A payload over a host buffer it owns.
struct TestPayload {
  std::vector<uint8_t> storage;
  KvPayload payload;

  TestPayload Clone() const {
    TestPayload c;
    c.storage = storage;
    c.payload = payload;
    c.payload.data = c.storage.data();
    return c;
  }
};

inline TestPayload MakePayload(const KvLayout& layout, int32_t num_tokens, uint64_t seed) {
  TestPayload p;
  p.payload.layout = layout;
  p.payload.num_tokens = num_tokens;
  p.storage.resize(p.payload.Bytes());
  FillRandom(p.storage, layout.dtype, seed);
  p.payload.data = p.storage.data();
  return p;
}

// A block table for `num_tokens` tokens over `num_blocks` blocks: distinct ids,
// shuffled, or ascending runs when `ascending` (so adjacent blocks coalesce).
inline std::vector<int32_t> MakeTable(int64_t num_tokens, int32_t block_size, int64_t num_blocks,
                                      bool ascending, uint64_t seed) {
  const int64_t n = (num_tokens + block_size - 1) / block_size;
  std::vector<int32_t> ids(num_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::mt19937_64 rng(seed);
  if (ascending) {
    const int64_t start = num_blocks > n ? static_cast<int64_t>(rng() % (num_blocks - n + 1)) : 0;
    return std::vector<int32_t>(ids.begin() + start, ids.begin() + start + n);
  }
  std::shuffle(ids.begin(), ids.end(), rng);
  ids.resize(n);
  return ids;
}

// Byte address of one element, straight from the PagedKvCache comment.
inline uint8_t* ElementPtr(const PagedKvCache& c, std::span<const int32_t> table, int32_t layer,
                           int32_t kv, int64_t token, int64_t head, int64_t dim) {
  const int64_t block = table[token / c.block_size];
  const int64_t slot = token % c.block_size;
  auto* base = static_cast<uint8_t*>(kv == 0 ? c.k_base[layer] : c.v_base[layer]);
  return base + (block * c.block_stride + slot * c.slot_stride + head * c.head_stride +
                 dim * c.dim_stride) *
                    DTypeSize(c.layout.dtype);
}

inline uint8_t* PayloadPtr(const KvPayload& p, int32_t layer, int32_t kv, int64_t token,
                           int64_t head, int64_t dim) {
  return static_cast<uint8_t*>(p.data) +
         (p.RowOffset(layer, kv, token) + head * p.layout.head_size + dim) *
             DTypeSize(p.layout.dtype);
}

inline void ReferenceGather(const PagedKvCache& c, std::span<const int32_t> table,
                            int32_t seq_begin, int32_t count, const KvPayload& p, int32_t dst_begin,
                            int32_t layer_begin, int32_t layer_end) {
  const int64_t es = DTypeSize(c.layout.dtype);
  for (int32_t l = layer_begin; l < layer_end; ++l)
    for (int32_t kv = 0; kv < 2; ++kv)
      for (int32_t i = 0; i < count; ++i)
        for (int64_t h = 0; h < c.layout.num_kv_heads; ++h)
          for (int64_t d = 0; d < c.layout.head_size; ++d)
            std::memcpy(PayloadPtr(p, l, kv, dst_begin + i, h, d),
                        ElementPtr(c, table, l, kv, seq_begin + i, h, d), es);
}

inline void ReferenceScatter(const KvPayload& p, int32_t src_begin, int32_t count,
                             const PagedKvCache& c, std::span<const int32_t> table,
                             int32_t seq_begin, int32_t layer_begin, int32_t layer_end) {
  const int64_t es = DTypeSize(c.layout.dtype);
  for (int32_t l = layer_begin; l < layer_end; ++l)
    for (int32_t kv = 0; kv < 2; ++kv)
      for (int32_t i = 0; i < count; ++i)
        for (int64_t h = 0; h < c.layout.num_kv_heads; ++h)
          for (int64_t d = 0; d < c.layout.head_size; ++d)
            std::memcpy(ElementPtr(c, table, l, kv, seq_begin + i, h, d),
                        PayloadPtr(p, l, kv, src_begin + i, h, d), es);
}

// Index of the first differing byte, or -1.
inline int64_t FirstDifference(std::span<const uint8_t> a, std::span<const uint8_t> b) {
  if (a.size() != b.size()) return 0;
  const auto m = std::mismatch(a.begin(), a.end(), b.begin());
  return m.first == a.end() ? -1 : m.first - a.begin();
}

// One shape of the test grid.
struct Shape {
  int32_t num_kv_heads;
  int32_t head_size;
  int32_t block_size;

  std::string ToString() const {
    return "heads=" + std::to_string(num_kv_heads) + " head_size=" + std::to_string(head_size) +
           " block_size=" + std::to_string(block_size);
  }
};

inline std::vector<Shape> AllShapes() {
  std::vector<Shape> shapes;
  for (int32_t h : {1, 3, 8})
    for (int32_t d : {64, 128})
      for (int32_t b : {1, 16, 32}) shapes.push_back({h, d, b});
  return shapes;
}

// One unit in the last place of `dtype` near |v| (at least at 1.0 for values
// near zero, which is loose enough for sums of products of values up to 2).
inline double Ulp(DType dtype, double v) {
  const int mant = dtype == DType::kFloat32 ? 23 : dtype == DType::kFloat16 ? 10 : 7;
  const double a = std::max(std::fabs(v), 1.0);
  return std::ldexp(1.0, std::ilogb(a) - mant);
}

}  // namespace relaykv::testing
