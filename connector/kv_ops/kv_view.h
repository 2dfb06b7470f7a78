// Private to kv_ops: one way to address "token t's K or V row of layer l",
// whether the tokens sit in paged blocks or in a dense payload, so the copy and
// rotation loops are written once.
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "connector/kv_ops/paged_kv.h"
#include "transfer/record/kv_layout.h"

namespace relaykv::kv_ops_internal {

struct TokenRows {
  std::vector<char*> k_base;  // per layer, bytes
  std::vector<char*> v_base;
  const int32_t* block_table = nullptr;  // null: token t is row t (a payload)
  int32_t block_size = 1;
  // In elements, like PagedKvCache.
  int64_t block_stride = 0;
  int64_t slot_stride = 0;
  int64_t head_stride = 0;
  int64_t dim_stride = 1;
  int64_t elem_size = 2;
  int64_t head_size = 0;
  int64_t num_heads = 0;
  int64_t row_elements = 0;  // heads × head_size

  static TokenRows FromCache(const PagedKvCache& cache, std::span<const int32_t> block_table) {
    TokenRows r;
    for (int32_t l = 0; l < cache.layout.num_layers; ++l) {
      r.k_base.push_back(static_cast<char*>(cache.k_base[l]));
      r.v_base.push_back(static_cast<char*>(cache.v_base[l]));
    }
    r.block_table = block_table.data();
    r.block_size = cache.block_size;
    r.block_stride = cache.block_stride;
    r.slot_stride = cache.slot_stride;
    r.head_stride = cache.head_stride;
    r.dim_stride = cache.dim_stride;
    r.elem_size = DTypeSize(cache.layout.dtype);
    r.head_size = cache.layout.head_size;
    r.num_heads = cache.layout.num_kv_heads;
    r.row_elements = r.num_heads * r.head_size;
    return r;
  }

  static TokenRows FromPayload(const KvPayload& payload) {
    TokenRows r;
    r.elem_size = DTypeSize(payload.layout.dtype);
    char* base = static_cast<char*>(payload.data);
    for (int32_t l = 0; l < payload.layout.num_layers; ++l) {
      r.k_base.push_back(base + payload.RowOffset(l, 0, 0) * r.elem_size);
      r.v_base.push_back(base + payload.RowOffset(l, 1, 0) * r.elem_size);
    }
    r.head_size = payload.layout.head_size;
    r.num_heads = payload.layout.num_kv_heads;
    r.row_elements = payload.RowElements();
    r.slot_stride = r.row_elements;
    r.head_stride = payload.layout.head_size;
    r.dim_stride = 1;
    return r;
  }

  // The (head 0, dim 0) element of token t's row.
  char* Row(int32_t layer, int32_t kv, int64_t t) const {
    char* base = kv == 0 ? k_base[layer] : v_base[layer];
    if (block_table == nullptr) return base + t * slot_stride * elem_size;
    const int64_t block = block_table[t / block_size];
    return base + (block * block_stride + (t % block_size) * slot_stride) * elem_size;
  }

  // One token's heads × dims form one dense run.
  bool RowIsDense() const { return dim_stride == 1 && head_stride == head_size; }
  // Consecutive rows also follow each other without a gap.
  bool RowsArePacked() const { return RowIsDense() && slot_stride == row_elements; }

  // How many tokens from t on (at most `max`) sit at equal slot strides, so a
  // run of them is one strided block of memory. Reads only table entries of
  // tokens below t + max.
  int64_t ContiguousRun(int64_t t, int64_t max) const {
    if (block_table == nullptr) return max;
    int64_t run = std::min<int64_t>(block_size - t % block_size, max);
    if (block_stride == int64_t{block_size} * slot_stride) {
      // Physically adjacent blocks continue the run (common right after a
      // fresh allocation, when a block manager hands out ascending ids).
      int64_t b = t / block_size;
      while (run < max && block_table[b + 1] == block_table[b] + 1) {
        ++b;
        run = std::min<int64_t>(run + block_size, max);
      }
    }
    return run;
  }
};

}  // namespace relaykv::kv_ops_internal
