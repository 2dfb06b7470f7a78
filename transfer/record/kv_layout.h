// How KV is shaped (logical layout) and where it lives in a paged cache
// (physical layout by strides).
//
// The logical layout travels inside every record; two instances may exchange
// records only when their logical layouts agree. The physical layout belongs to
// one instance's cache and never leaves it: gather and scatter translate between
// it and the record's contiguous [layer][K|V][token][head][dim] payload.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "transfer/common/dtype.h"
#include "transfer/common/status.h"

namespace relaykv {

struct KvLayout {
  int32_t num_layers = 0;
  int32_t num_kv_heads = 0;
  int32_t head_size = 0;
  DType dtype = DType::kFloat16;

  Status Validate() const;
  // Bytes of K (or V) for one token in one layer.
  int64_t TokenBytes() const { return int64_t{num_kv_heads} * head_size * DTypeSize(dtype); }
  // Stable 64-bit hash of the fields above; part of every record's namespace.
  uint64_t Fingerprint() const;
  std::string ToString() const;
  bool operator==(const KvLayout&) const = default;
};

// A non-owning view of one instance's paged KV cache.
//
// Element (layer l, K or V, block b, slot s, head h, dim d) lives at
//   base[l] + b*block_stride + s*slot_stride + h*head_stride + d*dim_stride
// (strides in elements, base = k_base or v_base). This covers vLLM's
// [2, blocks, slots, heads, dim] per-layer tensors, the HND variant
// [blocks, 2, heads, slots, dim], K|V packed along the last dim
// (v_base = k_base + head_size), and per-layer views into one shared buffer.
struct PagedKvCache {
  KvLayout layout;
  int32_t block_size = 0;  // tokens per block
  int64_t num_blocks = 0;
  std::vector<void*> k_base;  // one per layer
  std::vector<void*> v_base;  // one per layer
  int64_t block_stride = 0;
  int64_t slot_stride = 0;
  int64_t head_stride = 0;
  int64_t dim_stride = 1;
  bool on_device = false;  // CUDA memory: only the CUDA kernels may touch it

  Status Validate() const;
  // True when one token's heads × dims form one dense run (fast copy path).
  bool TokenRowIsDense() const { return dim_stride == 1 && head_stride == layout.head_size; }
};

}  // namespace relaykv
