#include "connector/kv_ops/paged_kv.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "connector/kv_ops/kv_view.h"

#if defined(__x86_64__)
#include <emmintrin.h>
#define RELAYKV_KV_OPS_STREAM_STORES 1
#endif

namespace relaykv {
namespace {

using kv_ops_internal::TokenRows;

std::string RangeString(int64_t begin, int64_t count) {
  // Appends rather than "[" + ...: GCC 12 warns falsely (-Wrestrict) on the latter.
  std::string s = "[";
  s += std::to_string(begin);
  s += ", ";
  s += std::to_string(begin + count);
  s += ")";
  return s;
}

template <int64_t kElem>
void CopyStridedElements(const char* src, int64_t src_stride, char* dst, int64_t dst_stride,
                         int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(dst + i * dst_stride * kElem, src + i * src_stride * kElem, kElem);
  }
}

// Copies far larger than the caches go around them: non-temporal stores skip
// the read-for-ownership of every destination line, which is what lets one big
// memcpy beat a loop of block-sized ones. Below the threshold the destination
// may well be read again soon (and is cheap to keep), so plain memcpy is used.
constexpr int64_t kStreamThresholdBytes = int64_t{16} << 20;

#ifdef RELAYKV_KV_OPS_STREAM_STORES
constexpr bool kHaveStreamStores = true;

void StreamCopy(char* d, const char* s, int64_t n) {
  int64_t head = static_cast<int64_t>((16 - reinterpret_cast<uintptr_t>(d) % 16) % 16);
  head = std::min(head, n);
  std::memcpy(d, s, head);
  d += head;
  s += head;
  n -= head;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 32));
    const __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 48), e);
  }
  std::memcpy(d + i, s + i, n - i);
}
#else
constexpr bool kHaveStreamStores = false;
#endif

void CopyRun(char* d, const char* s, int64_t n, bool stream) {
#ifdef RELAYKV_KV_OPS_STREAM_STORES
  if (stream) return StreamCopy(d, s, n);
#endif
  std::memcpy(d, s, n);
}

// Streaming stores are weakly ordered: make them visible before returning.
void FenceStreamStores() {
#ifdef RELAYKV_KV_OPS_STREAM_STORES
  _mm_sfence();
#endif
}

// One token's heads × dims, for layouts where the row is not one dense run.
void CopyRowStrided(const TokenRows& src, const char* s, const TokenRows& dst, char* d) {
  const int64_t es = src.elem_size;
  const bool dims_dense = src.dim_stride == 1 && dst.dim_stride == 1;
  for (int64_t h = 0; h < src.num_heads; ++h) {
    const char* sh = s + h * src.head_stride * es;
    char* dh = d + h * dst.head_stride * es;
    if (dims_dense) {
      std::memcpy(dh, sh, src.head_size * es);
    } else if (es == 4) {
      CopyStridedElements<4>(sh, src.dim_stride, dh, dst.dim_stride, src.head_size);
    } else {
      CopyStridedElements<2>(sh, src.dim_stride, dh, dst.dim_stride, src.head_size);
    }
  }
}

// Tokens [src_begin, +count) of `src` to [dst_begin, +count) of `dst`, for
// every layer in `layers`, K and V. Both sides are already validated.
void CopyTokens(const TokenRows& src, int64_t src_begin, const TokenRows& dst, int64_t dst_begin,
                int64_t count, LayerRange layers) {
  const int64_t row_bytes = src.row_elements * src.elem_size;
  // Packed rows on both sides: a run of slots that is contiguous on both sides
  // is one memcpy, so a whole block (or several adjacent blocks) moves at once.
  const bool packed = src.RowsArePacked() && dst.RowsArePacked();
  const bool dense = src.RowIsDense() && dst.RowIsDense();
  const bool stream = kHaveStreamStores && packed &&
                      count * row_bytes * 2 * (layers.end - layers.begin) >= kStreamThresholdBytes;
  for (int32_t l = layers.begin; l < layers.end; ++l) {
    for (int32_t kv = 0; kv < 2; ++kv) {
      int64_t i = 0;
      while (i < count) {
        const char* s = src.Row(l, kv, src_begin + i);
        char* d = dst.Row(l, kv, dst_begin + i);
        int64_t n = 1;
        if (packed) {
          n = src.ContiguousRun(src_begin + i, count - i);
          n = dst.ContiguousRun(dst_begin + i, n);
          CopyRun(d, s, n * row_bytes, stream);
        } else if (dense) {
          std::memcpy(d, s, row_bytes);
        } else {
          CopyRowStrided(src, s, dst, d);
        }
        i += n;
      }
    }
  }
  if (stream) FenceStreamStores();
}

}  // namespace

Result<LayerRange> ResolveLayerRange(LayerRange range, int32_t num_layers) {
  const int32_t end = range.end == LayerRange::kToLast ? num_layers : range.end;
  if (range.begin < 0 || end <= range.begin || end > num_layers) {
    return InvalidArgument("layer range [" + std::to_string(range.begin) + ", " +
                           std::to_string(range.end) + ") is empty or outside the " +
                           std::to_string(num_layers) + " layers of the layout");
  }
  return LayerRange{range.begin, end};
}

Status KvPayload::Validate() const {
  RELAYKV_RETURN_IF_ERROR(layout.Validate().WithContext("payload"));
  if (num_tokens < 0) {
    return InvalidArgument("payload num_tokens must be >= 0, got " + std::to_string(num_tokens));
  }
  if (data == nullptr && num_tokens > 0) return InvalidArgument("payload data is null");
  return Status::Ok();
}

Status ValidatePagedRange(const PagedKvCache& cache, std::span<const int32_t> block_table,
                          int32_t seq_begin, int32_t count, bool device) {
  RELAYKV_RETURN_IF_ERROR(cache.Validate());
  if (cache.on_device != device) {
    return InvalidArgument(cache.on_device
                               ? "paged cache is in device memory (on_device=true); use the CUDA "
                                 "version (kv_ops_cuda.h)"
                               : "paged cache is in host memory (on_device=false); use the CPU "
                                 "version (paged_kv.h, rope.h)");
  }
  if (seq_begin < 0 || count < 0) {
    return InvalidArgument("sequence range " + RangeString(seq_begin, count) +
                           " must not be negative");
  }
  if (count == 0) return Status::Ok();
  const int64_t first_block = seq_begin / cache.block_size;
  const int64_t last_block = (int64_t{seq_begin} + count - 1) / cache.block_size;
  if (last_block >= static_cast<int64_t>(block_table.size())) {
    return InvalidArgument("block table has " + std::to_string(block_table.size()) +
                           " entries but sequence tokens " + RangeString(seq_begin, count) +
                           " need " + std::to_string(last_block + 1) + " (block_size " +
                           std::to_string(cache.block_size) + ")");
  }
  for (int64_t b = first_block; b <= last_block; ++b) {
    if (block_table[b] < 0 || block_table[b] >= cache.num_blocks) {
      return InvalidArgument("block_table[" + std::to_string(b) +
                             "] = " + std::to_string(block_table[b]) + " is outside [0, " +
                             std::to_string(cache.num_blocks) + ")");
    }
  }
  return Status::Ok();
}

Status ValidatePayloadRange(const KvPayload& payload, int32_t token_begin, int32_t count,
                            bool device) {
  RELAYKV_RETURN_IF_ERROR(payload.Validate());
  if (payload.on_device != device) {
    return InvalidArgument(payload.on_device
                               ? "payload is in device memory (on_device=true); use the CUDA "
                                 "version (kv_ops_cuda.h)"
                               : "payload is in host memory (on_device=false); the CUDA version "
                                 "needs device-accessible memory");
  }
  if (token_begin < 0 || count < 0 || int64_t{token_begin} + count > payload.num_tokens) {
    return InvalidArgument("payload tokens " + RangeString(token_begin, count) +
                           " are outside the payload's " + std::to_string(payload.num_tokens) +
                           " tokens");
  }
  return Status::Ok();
}

Result<LayerRange> ValidateKvTransfer(const PagedKvCache& cache,
                                      std::span<const int32_t> block_table, int32_t seq_begin,
                                      int32_t count, const KvPayload& payload,
                                      int32_t payload_token_begin, LayerRange layers, bool device) {
  if (!(cache.layout == payload.layout)) {
    return InvalidArgument("payload layout " + payload.layout.ToString() +
                           " differs from the paged cache's " + cache.layout.ToString());
  }
  RELAYKV_RETURN_IF_ERROR(ValidatePagedRange(cache, block_table, seq_begin, count, device));
  RELAYKV_RETURN_IF_ERROR(ValidatePayloadRange(payload, payload_token_begin, count, device));
  return ResolveLayerRange(layers, cache.layout.num_layers);
}

Status GatherKv(const PagedKvCache& src, std::span<const int32_t> block_table, int32_t seq_begin,
                int32_t count, const KvPayload& dst, int32_t dst_token_begin, LayerRange layers) {
  RELAYKV_ASSIGN_OR_RETURN(
      const LayerRange resolved,
      ValidateKvTransfer(src, block_table, seq_begin, count, dst, dst_token_begin, layers,
                         /*device=*/false));
  if (count == 0) return Status::Ok();
  CopyTokens(TokenRows::FromCache(src, block_table), seq_begin, TokenRows::FromPayload(dst),
             dst_token_begin, count, resolved);
  return Status::Ok();
}

Status ScatterKv(const KvPayload& src, int32_t src_token_begin, int32_t count,
                 const PagedKvCache& dst, std::span<const int32_t> block_table, int32_t seq_begin,
                 LayerRange layers) {
  RELAYKV_ASSIGN_OR_RETURN(
      const LayerRange resolved,
      ValidateKvTransfer(dst, block_table, seq_begin, count, src, src_token_begin, layers,
                         /*device=*/false));
  if (count == 0) return Status::Ok();
  CopyTokens(TokenRows::FromPayload(src), src_token_begin, TokenRows::FromCache(dst, block_table),
             seq_begin, count, resolved);
  return Status::Ok();
}

}  // namespace relaykv
