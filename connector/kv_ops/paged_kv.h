// Moving KV between an instance's paged cache and a record's contiguous payload.
//
// Export gathers a request's tokens out of the paged blocks into the record
// payload; import scatters a record's tokens into other blocks of another
// cache. The physical layout of the cache is whatever its strides say (see
// PagedKvCache); the payload is always dense, so these two functions are the
// only place where the two meet. CUDA versions live in kv_ops_cuda.h.
#pragma once

#include <cstdint>
#include <span>

#include "transfer/common/status.h"
#include "transfer/record/kv_layout.h"

namespace relaykv {

// Layers [begin, end). The default covers every layer of the layout.
struct LayerRange {
  static constexpr int32_t kToLast = -1;

  int32_t begin = 0;
  int32_t end = kToLast;  // kToLast: up to and including the last layer

  static LayerRange All() { return {}; }
  static LayerRange Single(int32_t layer) { return {layer, layer + 1}; }
};

// Resolves kToLast against `num_layers`; an empty or out-of-range range is an
// InvalidArgument naming it.
Result<LayerRange> ResolveLayerRange(LayerRange range, int32_t num_layers);

// A record's K/V payload: one dense buffer laid out as
//   [layer][K then V][token][kv_head][head_dim]
// for `num_tokens` tokens. Non-owning.
struct KvPayload {
  void* data = nullptr;
  int32_t num_tokens = 0;
  KvLayout layout;
  bool on_device = false;  // device-accessible memory: only the CUDA kernels may touch it

  // Elements of one token's K (or V) in one layer: heads × head_size.
  int64_t RowElements() const { return int64_t{layout.num_kv_heads} * layout.head_size; }
  int64_t Elements() const { return int64_t{layout.num_layers} * 2 * num_tokens * RowElements(); }
  int64_t Bytes() const { return Elements() * DTypeSize(layout.dtype); }
  // Element offset of token `token`'s row of layer `layer`, K (kv = 0) or V (kv = 1).
  int64_t RowOffset(int32_t layer, int32_t kv, int64_t token) const {
    return ((int64_t{layer} * 2 + kv) * num_tokens + token) * RowElements();
  }

  Status Validate() const;
};

// Copies sequence tokens [seq_begin, seq_begin + count) of every layer in
// `layers`, K and V, from the paged cache into payload tokens
// [dst_token_begin, dst_token_begin + count). Token i of the sequence lives in
// block block_table[i / block_size], slot i % block_size. Everything is checked
// before the first byte moves; bad input is an InvalidArgument that names the
// problem. The cache and the payload must not overlap.
Status GatherKv(const PagedKvCache& src, std::span<const int32_t> block_table, int32_t seq_begin,
                int32_t count, const KvPayload& dst, int32_t dst_token_begin,
                LayerRange layers = LayerRange::All());

// The inverse of GatherKv: payload tokens [src_token_begin, +count) go to
// sequence tokens [seq_begin, +count) of the paged cache.
Status ScatterKv(const KvPayload& src, int32_t src_token_begin, int32_t count,
                 const PagedKvCache& dst, std::span<const int32_t> block_table, int32_t seq_begin,
                 LayerRange layers = LayerRange::All());

// Checks that sequence tokens [seq_begin, seq_begin + count) of `cache` are
// addressable through `block_table`: cache valid, range non-negative, table
// long enough, every block id it uses in [0, num_blocks), and the memory on the
// side the caller can touch (`on_device` must equal `device`).
Status ValidatePagedRange(const PagedKvCache& cache, std::span<const int32_t> block_table,
                          int32_t seq_begin, int32_t count, bool device);

// Checks that payload tokens [token_begin, token_begin + count) exist and that
// the payload lives where the caller can touch it.
Status ValidatePayloadRange(const KvPayload& payload, int32_t token_begin, int32_t count,
                            bool device);

// Everything GatherKv/ScatterKv (and their CUDA versions) check before moving
// a byte: both ranges above, equal layouts and a valid layer range.
// Returns the resolved layer range.
Result<LayerRange> ValidateKvTransfer(const PagedKvCache& cache,
                                      std::span<const int32_t> block_table, int32_t seq_begin,
                                      int32_t count, const KvPayload& payload,
                                      int32_t payload_token_begin, LayerRange layers, bool device);

}  // namespace relaykv
