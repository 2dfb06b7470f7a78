// CUDA versions of GatherKv, ScatterKv (paged_kv.h) and RerotateK (rope.h).
//
// Same arguments, same checks and the same results as the CPU versions (bit
// for bit for gather and scatter; RoPE uses the same float cos/sin table and
// unfused fp32 math, so it agrees to the last bit in practice, and the tests
// allow one unit in the last place). Differences:
//   * The cache and the payload must be device-accessible and say so
//     (on_device = true): device memory, or mapped pinned host memory.
//   * Each call enqueues work on `stream` (a cudaStream_t; null is the legacy
//     default stream) and returns without waiting for it. Host inputs (block
//     table, deltas) are copied before the call returns, so the caller may
//     reuse them at once; the cache and payload must stay alive until the
//     stream reaches the work.
//   * Cost of the host block table: each call packs the per-layer base
//     pointers, the part of the block table it uses and (RoPE) the cos/sin
//     table into one small buffer, takes it from the stream-ordered pool
//     (cudaMallocAsync), copies it with one cudaMemcpyAsync and frees it on the
//     stream. That is a few microseconds and a few kilobytes (8 bytes per
//     layer and base, 4 per block used, 8 per rotary pair and distinct delta,
//     4 per token for per-token deltas). The source is pageable host memory,
//     which the driver stages before the call returns and for which it may
//     wait on earlier work in `stream`. Batch a request's tokens into one call
//     rather than one per block.
//   * Errors of the kernels themselves surface, as usual in CUDA, at the next
//     synchronising call.
//
// No CUDA header is needed to include this file.
#pragma once

#include <cstdint>
#include <span>

#include "connector/kv_ops/paged_kv.h"
#include "transfer/common/status.h"
#include "transfer/record/kv_layout.h"
#include "transfer/record/rope_params.h"

namespace relaykv {

// Visible CUDA devices. Where there is no driver or no device, an Unavailable
// status whose message is cudaGetErrorString's reason.
Result<int> CudaDeviceCount();

Status GatherKvCuda(const PagedKvCache& src, std::span<const int32_t> block_table,
                    int32_t seq_begin, int32_t count, const KvPayload& dst, int32_t dst_token_begin,
                    LayerRange layers = LayerRange::All(), void* stream = nullptr);

Status ScatterKvCuda(const KvPayload& src, int32_t src_token_begin, int32_t count,
                     const PagedKvCache& dst, std::span<const int32_t> block_table,
                     int32_t seq_begin, LayerRange layers = LayerRange::All(),
                     void* stream = nullptr);

Status RerotateKCuda(const KvPayload& payload, int32_t token_begin, int32_t count,
                     const RopeParams& rope, int64_t delta, LayerRange layers = LayerRange::All(),
                     void* stream = nullptr);

Status RerotateKCuda(const PagedKvCache& cache, std::span<const int32_t> block_table,
                     int32_t seq_begin, int32_t count, const RopeParams& rope, int64_t delta,
                     LayerRange layers = LayerRange::All(), void* stream = nullptr);

Status RerotateKPerTokenCuda(const KvPayload& payload, int32_t token_begin,
                             std::span<const int64_t> deltas, const RopeParams& rope,
                             LayerRange layers = LayerRange::All(), void* stream = nullptr);

Status RerotateKPerTokenCuda(const PagedKvCache& cache, std::span<const int32_t> block_table,
                             int32_t seq_begin, std::span<const int64_t> deltas,
                             const RopeParams& rope, LayerRange layers = LayerRange::All(),
                             void* stream = nullptr);

// A record's payload lives in host memory (a store segment or a read buffer);
// these two move part of it to or from a device-resident cache through a
// device staging buffer on the cache's device. Both wait for the device to be
// idle first (the cache may have been written or read by work on any stream,
// e.g. the serving engine's forward) and for their own work before returning,
// so the host payload may be released or reused right away.

// Payload tokens [src_token_begin, +count) → sequence tokens [seq_begin, +count)
// of `dst`, then K re-rotated by deltas[i] for token i (one delta: uniform).
Status ImportToDeviceCache(const KvPayload& host_src, int32_t src_token_begin, int32_t count,
                           const PagedKvCache& dst, std::span<const int32_t> block_table,
                           int32_t seq_begin, const RopeParams& rope,
                           std::span<const int64_t> deltas);

// Sequence tokens [seq_begin, +count) of `src` → payload tokens
// [dst_token_begin, +count) of a host payload.
Status ExportFromDeviceCache(const PagedKvCache& src, std::span<const int32_t> block_table,
                             int32_t seq_begin, int32_t count, const KvPayload& host_dst,
                             int32_t dst_token_begin);

}  // namespace relaykv
