#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "connector/kv_ops/kv_ops_cuda.h"
#include "connector/kv_ops/rope.h"

namespace relaykv {
namespace {

Status CudaError(cudaError_t err, std::string_view what) {
  std::string msg = std::string(what) + " failed: " + cudaGetErrorName(err) + " (" +
                    cudaGetErrorString(err) + ")";
  switch (err) {
    case cudaErrorMemoryAllocation:
      return ResourceExhausted(std::move(msg));
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
      return Unavailable(std::move(msg));
    default:
      return Internal(std::move(msg));
  }
}

#define RELAYKV_CUDA_TRY(expr)                                                        \
  do {                                                                                \
    const cudaError_t relaykv_cuda_err_ = (expr);                                     \
    if (relaykv_cuda_err_ != cudaSuccess) return CudaError(relaykv_cuda_err_, #expr); \
  } while (0)

// ---------------------------------------------------------------------------
// Device side.

// Where token t's K or V row of a layer starts; the device twin of
// kv_ops_internal::TokenRows. A payload is a "cache" without a block table.
struct DevRows {
  char* const* k_base = nullptr;  // device array, indexed by absolute layer
  char* const* v_base = nullptr;
  const int32_t* block_table = nullptr;  // null: token t is row t
  int32_t block_size = 1;
  int64_t block_stride = 0;  // elements
  int64_t slot_stride = 0;
  int64_t head_stride = 0;
  int64_t dim_stride = 1;
};

__device__ __forceinline__ char* RowPtr(const DevRows& r, int32_t layer, int32_t kv, int64_t t,
                                        int64_t elem_size) {
  char* base = kv == 0 ? r.k_base[layer] : r.v_base[layer];
  if (r.block_table == nullptr) return base + t * r.slot_stride * elem_size;
  const int64_t block = r.block_table[t / r.block_size];
  return base + (block * r.block_stride + (t % r.block_size) * r.slot_stride) * elem_size;
}

struct CopyArgs {
  DevRows cache;
  DevRows payload;
  int64_t cache_begin = 0;  // token index into `cache` (relative to the uploaded table)
  int64_t payload_begin = 0;
  int32_t count = 0;
  int32_t layer_begin = 0;
  int32_t num_heads = 0;
  int32_t units_per_head = 0;  // head_size / elems_per_unit
  int32_t elems_per_unit = 1;
  int32_t elem_size = 2;
};

// blockIdx.y = (layer - layer_begin) * 2 + (K or V); blockDim.y tokens per
// block; threads along x walk one token row in units of `Unit` (16 bytes when
// the layout allows, one element otherwise). Consecutive threads touch
// consecutive units of a head, so both sides coalesce whenever dims are dense.
template <typename Unit, bool kGather>
__global__ void CopyKernel(CopyArgs a) {
  const int64_t t = int64_t{blockIdx.x} * blockDim.y + threadIdx.y;
  if (t >= a.count) return;
  const int32_t layer = a.layer_begin + static_cast<int32_t>(blockIdx.y >> 1);
  const int32_t kv = static_cast<int32_t>(blockIdx.y & 1);
  char* c = RowPtr(a.cache, layer, kv, a.cache_begin + t, a.elem_size);
  char* p = RowPtr(a.payload, layer, kv, a.payload_begin + t, a.elem_size);
  const int32_t units = a.num_heads * a.units_per_head;
  for (int32_t u = threadIdx.x; u < units; u += blockDim.x) {
    const int32_t h = u / a.units_per_head;
    const int64_t d = int64_t{u - h * a.units_per_head} * a.elems_per_unit;
    // Units wider than one element are only chosen when dim_stride is 1.
    Unit* cu = reinterpret_cast<Unit*>(c + (h * a.cache.head_stride + d * a.cache.dim_stride) *
                                               a.elem_size);
    Unit* pu = reinterpret_cast<Unit*>(p + (h * a.payload.head_stride + d) * a.elem_size);
    if constexpr (kGather) {
      *pu = *cu;
    } else {
      *cu = *pu;
    }
  }
}

template <typename T>
__device__ __forceinline__ float ToFloat(T v);
template <>
__device__ __forceinline__ float ToFloat<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float ToFloat<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float ToFloat<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ float FromFloat<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half FromFloat<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

struct RotateArgs {
  DevRows rows;
  int64_t begin = 0;
  int32_t count = 0;
  int32_t layer_begin = 0;
  int32_t num_heads = 0;
  int32_t half = 0;  // rotary_dim / 2
  bool neox = true;
  const float* cos = nullptr;  // [rows][half]
  const float* sin = nullptr;
  const int32_t* token_row = nullptr;  // per token, -1 = untouched; null: every token uses row 0
};

// blockIdx.y = layer - layer_begin; blockDim.y tokens per block; threads along x
// walk the (head, pair) grid of one token's K row.
template <typename T>
__global__ void RotateKernel(RotateArgs a) {
  const int64_t t = int64_t{blockIdx.x} * blockDim.y + threadIdx.y;
  if (t >= a.count) return;
  const int32_t row = a.token_row == nullptr ? 0 : a.token_row[t];
  if (row < 0) return;
  const int32_t layer = a.layer_begin + static_cast<int32_t>(blockIdx.y);
  char* base = RowPtr(a.rows, layer, /*kv=*/0, a.begin + t, sizeof(T));
  const float* cos_row = a.cos + int64_t{row} * a.half;
  const float* sin_row = a.sin + int64_t{row} * a.half;
  const int32_t pairs = a.num_heads * a.half;
  for (int32_t u = threadIdx.x; u < pairs; u += blockDim.x) {
    const int32_t h = u / a.half;
    const int32_t j = u - h * a.half;
    const int64_t i0 = a.neox ? j : 2 * j;
    const int64_t i1 = a.neox ? j + a.half : 2 * j + 1;
    T* px = reinterpret_cast<T*>(base) + h * a.rows.head_stride + i0 * a.rows.dim_stride;
    T* py = reinterpret_cast<T*>(base) + h * a.rows.head_stride + i1 * a.rows.dim_stride;
    const float x = ToFloat(*px);
    const float y = ToFloat(*py);
    const float c = cos_row[j];
    const float s = sin_row[j];
    // Explicit rounding steps: no FMA contraction, so the result matches the
    // CPU path, which computes the same products and sums in plain fp32.
    *px = FromFloat<T>(__fsub_rn(__fmul_rn(x, c), __fmul_rn(y, s)));
    *py = FromFloat<T>(__fadd_rn(__fmul_rn(x, s), __fmul_rn(y, c)));
  }
}

// ---------------------------------------------------------------------------
// Host side.

// Everything a kernel needs from the host (layer base pointers, the used part
// of the block table, cos/sin), packed into one buffer and uploaded with one
// copy. The device buffer is freed in stream order, after the kernel.
class DeviceBlob {
 public:
  explicit DeviceBlob(cudaStream_t stream) : stream_(stream) {}
  DeviceBlob(const DeviceBlob&) = delete;
  DeviceBlob& operator=(const DeviceBlob&) = delete;
  ~DeviceBlob() {
    if (device_ != nullptr) cudaFreeAsync(device_, stream_);
  }

  // Appends `n` items; returns their offset in the blob.
  template <typename T>
  size_t Add(const T* items, size_t n) {
    const size_t offset = (host_.size() + 15) / 16 * 16;
    host_.resize(offset + n * sizeof(T));
    if (n > 0) std::memcpy(host_.data() + offset, items, n * sizeof(T));
    return offset;
  }

  // The copy reads pageable memory, which the driver stages before
  // cudaMemcpyAsync returns, so `host_` may die with this object.
  Status Upload() {
    if (host_.empty()) return Status::Ok();
    RELAYKV_CUDA_TRY(cudaMallocAsync(&device_, host_.size(), stream_));
    RELAYKV_CUDA_TRY(
        cudaMemcpyAsync(device_, host_.data(), host_.size(), cudaMemcpyHostToDevice, stream_));
    return Status::Ok();
  }

  template <typename T>
  const T* At(size_t offset) const {
    return reinterpret_cast<const T*>(static_cast<const char*>(device_) + offset);
  }

 private:
  cudaStream_t stream_;
  std::vector<char> host_;
  void* device_ = nullptr;
};

// Offsets (in the blob) of per-layer K and V bases.
struct BaseOffsets {
  size_t k = 0;
  size_t v = 0;
};

BaseOffsets AddCacheBases(DeviceBlob& blob, const PagedKvCache& cache) {
  return {blob.Add(cache.k_base.data(), cache.k_base.size()),
          blob.Add(cache.v_base.data(), cache.v_base.size())};
}

BaseOffsets AddPayloadBases(DeviceBlob& blob, const KvPayload& payload) {
  const int64_t es = DTypeSize(payload.layout.dtype);
  std::vector<void*> k, v;
  for (int32_t l = 0; l < payload.layout.num_layers; ++l) {
    k.push_back(static_cast<char*>(payload.data) + payload.RowOffset(l, 0, 0) * es);
    v.push_back(static_cast<char*>(payload.data) + payload.RowOffset(l, 1, 0) * es);
  }
  return {blob.Add(k.data(), k.size()), blob.Add(v.data(), v.size())};
}

// The part of the block table sequence tokens [seq_begin, +count) use; the
// kernels address tokens relative to its first block.
struct TableSlice {
  size_t offset = 0;
  int64_t token_shift = 0;  // subtract from sequence token indices
};

TableSlice AddTableSlice(DeviceBlob& blob, const PagedKvCache& cache,
                         std::span<const int32_t> table, int32_t seq_begin, int32_t count) {
  const int64_t first = seq_begin / cache.block_size;
  const int64_t last = (int64_t{seq_begin} + count - 1) / cache.block_size;
  return {blob.Add(table.data() + first, static_cast<size_t>(last - first + 1)),
          first * cache.block_size};
}

DevRows CacheRows(const DeviceBlob& blob, const PagedKvCache& cache, BaseOffsets bases,
                  const TableSlice& slice) {
  DevRows r;
  r.k_base = blob.At<char*>(bases.k);
  r.v_base = blob.At<char*>(bases.v);
  r.block_table = blob.At<int32_t>(slice.offset);
  r.block_size = cache.block_size;
  r.block_stride = cache.block_stride;
  r.slot_stride = cache.slot_stride;
  r.head_stride = cache.head_stride;
  r.dim_stride = cache.dim_stride;
  return r;
}

DevRows PayloadRows(const DeviceBlob& blob, const KvPayload& payload, BaseOffsets bases) {
  DevRows r;
  r.k_base = blob.At<char*>(bases.k);
  r.v_base = blob.At<char*>(bases.v);
  r.slot_stride = payload.RowElements();
  r.head_stride = payload.layout.head_size;
  r.dim_stride = 1;
  return r;
}

bool Aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// Device code dereferences typed pointers, so every base must sit on an
// element boundary (the CPU path, which copies bytes, does not care).
Status CheckElementAlignment(const PagedKvCache& cache, LayerRange layers) {
  const int64_t es = DTypeSize(cache.layout.dtype);
  for (int32_t l = layers.begin; l < layers.end; ++l) {
    if (!Aligned(cache.k_base[l], es) || !Aligned(cache.v_base[l], es)) {
      return InvalidArgument("paged cache layer " + std::to_string(l) +
                             " base is not aligned to its " + std::to_string(es) +
                             "-byte elements");
    }
  }
  return Status::Ok();
}

Status CheckPayloadAlignment(const KvPayload& payload) {
  const int64_t es = DTypeSize(payload.layout.dtype);
  if (!Aligned(payload.data, es)) {
    return InvalidArgument("payload data is not aligned to its " + std::to_string(es) +
                           "-byte elements");
  }
  return Status::Ok();
}

// on_device is the caller's word; catching plain host memory here turns a
// kernel fault (which poisons the context) into a clear error.
Status CheckDeviceAccessible(const void* p, std::string_view what) {
  cudaPointerAttributes attr{};
  RELAYKV_CUDA_TRY(cudaPointerGetAttributes(&attr, p));
  if (attr.type == cudaMemoryTypeUnregistered) {
    return InvalidArgument(std::string(what) +
                           " says on_device=true but points to host memory that CUDA does not "
                           "know (allocate it with cudaMalloc, or pin and map it)");
  }
  return Status::Ok();
}

// Widest unit (16, 8 or 4 bytes) every address of the copy is aligned to;
// 0 when only element-wise copies are safe.
int32_t VectorUnitBytes(const PagedKvCache& cache, const KvPayload& payload, LayerRange layers) {
  const int64_t es = DTypeSize(cache.layout.dtype);
  if (cache.dim_stride != 1) return 0;
  for (int64_t unit : {16, 8, 4}) {
    if (unit <= es) break;
    bool ok = (cache.layout.head_size * es) % unit == 0 && (cache.head_stride * es) % unit == 0 &&
              (cache.slot_stride * es) % unit == 0 && (cache.block_stride * es) % unit == 0 &&
              Aligned(payload.data, unit);
    for (int32_t l = layers.begin; ok && l < layers.end; ++l) {
      ok = Aligned(cache.k_base[l], unit) && Aligned(cache.v_base[l], unit);
    }
    if (ok) return static_cast<int32_t>(unit);
  }
  return 0;
}

// Threads per block: x along one token row (`units` items), y over tokens,
// about 256 in all.
dim3 RowBlock(int32_t units) {
  const int32_t x = std::min(256, std::max(32, (units + 31) / 32 * 32));
  return dim3(x, std::max(1, 256 / x));
}

template <bool kGather>
Status LaunchCopy(const CopyArgs& args, int32_t unit_bytes, int32_t num_layer_pairs,
                  cudaStream_t stream) {
  const int32_t units = args.num_heads * args.units_per_head;
  const dim3 block = RowBlock(units);
  const dim3 grid((args.count + block.y - 1) / block.y, num_layer_pairs);
  switch (unit_bytes) {
    case 16:
      CopyKernel<uint4, kGather><<<grid, block, 0, stream>>>(args);
      break;
    case 8:
      CopyKernel<uint2, kGather><<<grid, block, 0, stream>>>(args);
      break;
    case 4:
      CopyKernel<uint32_t, kGather><<<grid, block, 0, stream>>>(args);
      break;
    default:
      CopyKernel<uint16_t, kGather><<<grid, block, 0, stream>>>(args);
      break;
  }
  RELAYKV_CUDA_TRY(cudaGetLastError());
  return Status::Ok();
}

template <bool kGather>
Status CopyCuda(const PagedKvCache& cache, std::span<const int32_t> block_table, int32_t seq_begin,
                int32_t count, const KvPayload& payload, int32_t payload_token_begin,
                LayerRange layers, void* stream_ptr) {
  RELAYKV_ASSIGN_OR_RETURN(const LayerRange resolved,
                           ValidateKvTransfer(cache, block_table, seq_begin, count, payload,
                                              payload_token_begin, layers, /*device=*/true));
  if (count == 0) return Status::Ok();
  RELAYKV_RETURN_IF_ERROR(CheckElementAlignment(cache, resolved));
  RELAYKV_RETURN_IF_ERROR(CheckPayloadAlignment(payload));
  RELAYKV_RETURN_IF_ERROR(CheckDeviceAccessible(payload.data, "payload"));
  RELAYKV_RETURN_IF_ERROR(CheckDeviceAccessible(cache.k_base[resolved.begin], "paged cache"));

  auto stream = static_cast<cudaStream_t>(stream_ptr);
  DeviceBlob blob(stream);
  const BaseOffsets cache_bases = AddCacheBases(blob, cache);
  const BaseOffsets payload_bases = AddPayloadBases(blob, payload);
  const TableSlice slice = AddTableSlice(blob, cache, block_table, seq_begin, count);
  RELAYKV_RETURN_IF_ERROR(blob.Upload());

  const int64_t es = DTypeSize(cache.layout.dtype);
  const int32_t vector_bytes = VectorUnitBytes(cache, payload, resolved);
  const int32_t unit_bytes = vector_bytes > 0 ? vector_bytes : static_cast<int32_t>(es);
  CopyArgs args;
  args.cache = CacheRows(blob, cache, cache_bases, slice);
  args.payload = PayloadRows(blob, payload, payload_bases);
  args.cache_begin = seq_begin - slice.token_shift;
  args.payload_begin = payload_token_begin;
  args.count = count;
  args.layer_begin = resolved.begin;
  args.num_heads = cache.layout.num_kv_heads;
  args.elems_per_unit = static_cast<int32_t>(unit_bytes / es);
  args.units_per_head = cache.layout.head_size / args.elems_per_unit;
  args.elem_size = static_cast<int32_t>(es);
  return LaunchCopy<kGather>(args, unit_bytes, (resolved.end - resolved.begin) * 2, stream);
}

Status LaunchRotate(const RotateArgs& args, DType dtype, int32_t num_layers, cudaStream_t stream) {
  const dim3 block = RowBlock(args.num_heads * args.half);
  const dim3 grid((args.count + block.y - 1) / block.y, num_layers);
  switch (dtype) {
    case DType::kFloat32:
      RotateKernel<float><<<grid, block, 0, stream>>>(args);
      break;
    case DType::kFloat16:
      RotateKernel<__half><<<grid, block, 0, stream>>>(args);
      break;
    case DType::kBFloat16:
      RotateKernel<__nv_bfloat16><<<grid, block, 0, stream>>>(args);
      break;
  }
  RELAYKV_CUDA_TRY(cudaGetLastError());
  return Status::Ok();
}

// Adds the rotation table to the blob and fills the table fields of `args`
// once the blob is uploaded. `uniform`: every token has the same delta, so no
// per-token row index is uploaded.
struct TableOffsets {
  size_t cos = 0;
  size_t sin = 0;
  size_t token_row = 0;
};

TableOffsets AddRotationTable(DeviceBlob& blob, const RotationTable& table, bool uniform) {
  TableOffsets o;
  o.cos = blob.Add(table.cos.data(), table.cos.size());
  o.sin = blob.Add(table.sin.data(), table.sin.size());
  if (!uniform) o.token_row = blob.Add(table.token_row.data(), table.token_row.size());
  return o;
}

void FillTableArgs(RotateArgs& args, const DeviceBlob& blob, const TableOffsets& o,
                   const RotationTable& table, bool uniform) {
  args.half = table.half_rotary;
  args.cos = blob.At<float>(o.cos);
  args.sin = blob.At<float>(o.sin);
  args.token_row = uniform ? nullptr : blob.At<int32_t>(o.token_row);
}

// The per-token deltas of a call. A uniform call (one delta for every token)
// builds and uploads one table row and no per-token index, whatever the count.
struct Deltas {
  int32_t count = 0;
  std::span<const int64_t> values;  // one (uniform) or `count`
  bool uniform = false;
};

Result<Deltas> PerTokenDeltas(std::span<const int64_t> deltas) {
  if (deltas.size() > static_cast<size_t>(INT32_MAX)) {
    return InvalidArgument("too many per-token deltas: " + std::to_string(deltas.size()));
  }
  return Deltas{static_cast<int32_t>(deltas.size()), deltas, /*uniform=*/false};
}

// `delta` must outlive the returned value.
Result<Deltas> UniformDelta(int32_t count, const int64_t& delta) {
  if (count < 0) return InvalidArgument("token count must be >= 0, got " + std::to_string(count));
  return Deltas{count, std::span<const int64_t>(&delta, 1), /*uniform=*/true};
}

Status RotatePayloadCuda(const KvPayload& payload, int32_t token_begin, const Deltas& deltas,
                         const RopeParams& rope, LayerRange layers, void* stream_ptr) {
  const int32_t count = deltas.count;
  const bool uniform = deltas.uniform;
  RELAYKV_RETURN_IF_ERROR(ValidatePayloadRange(payload, token_begin, count, /*device=*/true));
  RELAYKV_ASSIGN_OR_RETURN(const LayerRange resolved,
                           ResolveLayerRange(layers, payload.layout.num_layers));
  RELAYKV_ASSIGN_OR_RETURN(const RotationTable table,
                           BuildRotationTable(rope, payload.layout.head_size, deltas.values));
  if (count == 0 || table.NothingToDo()) return Status::Ok();
  RELAYKV_RETURN_IF_ERROR(CheckPayloadAlignment(payload));
  RELAYKV_RETURN_IF_ERROR(CheckDeviceAccessible(payload.data, "payload"));

  auto stream = static_cast<cudaStream_t>(stream_ptr);
  DeviceBlob blob(stream);
  const BaseOffsets bases = AddPayloadBases(blob, payload);
  const TableOffsets table_offsets = AddRotationTable(blob, table, uniform);
  RELAYKV_RETURN_IF_ERROR(blob.Upload());

  RotateArgs args;
  args.rows = PayloadRows(blob, payload, bases);
  args.begin = token_begin;
  args.count = count;
  args.layer_begin = resolved.begin;
  args.num_heads = payload.layout.num_kv_heads;
  args.neox = rope.style == RopeStyle::kNeox;
  FillTableArgs(args, blob, table_offsets, table, uniform);
  return LaunchRotate(args, payload.layout.dtype, resolved.end - resolved.begin, stream);
}

Status RotatePagedCuda(const PagedKvCache& cache, std::span<const int32_t> block_table,
                       int32_t seq_begin, const Deltas& deltas, const RopeParams& rope,
                       LayerRange layers, void* stream_ptr) {
  const int32_t count = deltas.count;
  const bool uniform = deltas.uniform;
  RELAYKV_RETURN_IF_ERROR(
      ValidatePagedRange(cache, block_table, seq_begin, count, /*device=*/true));
  RELAYKV_ASSIGN_OR_RETURN(const LayerRange resolved,
                           ResolveLayerRange(layers, cache.layout.num_layers));
  RELAYKV_ASSIGN_OR_RETURN(const RotationTable table,
                           BuildRotationTable(rope, cache.layout.head_size, deltas.values));
  if (count == 0 || table.NothingToDo()) return Status::Ok();
  RELAYKV_RETURN_IF_ERROR(CheckElementAlignment(cache, resolved));
  RELAYKV_RETURN_IF_ERROR(CheckDeviceAccessible(cache.k_base[resolved.begin], "paged cache"));

  auto stream = static_cast<cudaStream_t>(stream_ptr);
  DeviceBlob blob(stream);
  const BaseOffsets bases = AddCacheBases(blob, cache);
  const TableSlice slice = AddTableSlice(blob, cache, block_table, seq_begin, count);
  const TableOffsets table_offsets = AddRotationTable(blob, table, uniform);
  RELAYKV_RETURN_IF_ERROR(blob.Upload());

  RotateArgs args;
  args.rows = CacheRows(blob, cache, bases, slice);
  args.begin = seq_begin - slice.token_shift;
  args.count = count;
  args.layer_begin = resolved.begin;
  args.num_heads = cache.layout.num_kv_heads;
  args.neox = rope.style == RopeStyle::kNeox;
  FillTableArgs(args, blob, table_offsets, table, uniform);
  return LaunchRotate(args, cache.layout.dtype, resolved.end - resolved.begin, stream);
}

}  // namespace

Result<int> CudaDeviceCount() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    // The runtime keeps this error as the "last error"; clear it so it does
    // not surface in an unrelated later check.
    cudaGetLastError();
    return Unavailable(cudaGetErrorString(err));
  }
  if (n == 0) return Unavailable("no CUDA-capable device is detected");
  return n;
}

Status GatherKvCuda(const PagedKvCache& src, std::span<const int32_t> block_table,
                    int32_t seq_begin, int32_t count, const KvPayload& dst, int32_t dst_token_begin,
                    LayerRange layers, void* stream) {
  return CopyCuda<true>(src, block_table, seq_begin, count, dst, dst_token_begin, layers, stream);
}

Status ScatterKvCuda(const KvPayload& src, int32_t src_token_begin, int32_t count,
                     const PagedKvCache& dst, std::span<const int32_t> block_table,
                     int32_t seq_begin, LayerRange layers, void* stream) {
  return CopyCuda<false>(dst, block_table, seq_begin, count, src, src_token_begin, layers, stream);
}

Status RerotateKCuda(const KvPayload& payload, int32_t token_begin, int32_t count,
                     const RopeParams& rope, int64_t delta, LayerRange layers, void* stream) {
  RELAYKV_ASSIGN_OR_RETURN(const Deltas deltas, UniformDelta(count, delta));
  return RotatePayloadCuda(payload, token_begin, deltas, rope, layers, stream);
}

Status RerotateKCuda(const PagedKvCache& cache, std::span<const int32_t> block_table,
                     int32_t seq_begin, int32_t count, const RopeParams& rope, int64_t delta,
                     LayerRange layers, void* stream) {
  RELAYKV_ASSIGN_OR_RETURN(const Deltas deltas, UniformDelta(count, delta));
  return RotatePagedCuda(cache, block_table, seq_begin, deltas, rope, layers, stream);
}

Status RerotateKPerTokenCuda(const KvPayload& payload, int32_t token_begin,
                             std::span<const int64_t> deltas, const RopeParams& rope,
                             LayerRange layers, void* stream) {
  RELAYKV_ASSIGN_OR_RETURN(const Deltas d, PerTokenDeltas(deltas));
  return RotatePayloadCuda(payload, token_begin, d, rope, layers, stream);
}

Status RerotateKPerTokenCuda(const PagedKvCache& cache, std::span<const int32_t> block_table,
                             int32_t seq_begin, std::span<const int64_t> deltas,
                             const RopeParams& rope, LayerRange layers, void* stream) {
  RELAYKV_ASSIGN_OR_RETURN(const Deltas d, PerTokenDeltas(deltas));
  return RotatePagedCuda(cache, block_table, seq_begin, d, rope, layers, stream);
}

// ---------------------------------------------------------------------------
// Host payload <-> device cache.

namespace {

// Makes the device holding `p` current for its lifetime, and restores the previous one.
class DeviceOf {
 public:
  static Result<DeviceOf> For(const void* p, std::string_view what) {
    cudaPointerAttributes attr{};
    RELAYKV_CUDA_TRY(cudaPointerGetAttributes(&attr, p));
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) {
      return InvalidArgument(std::string(what) + " is not in device memory");
    }
    DeviceOf out;
    RELAYKV_CUDA_TRY(cudaGetDevice(&out.previous_));
    if (attr.device != out.previous_) RELAYKV_CUDA_TRY(cudaSetDevice(attr.device));
    out.active_ = true;
    return std::move(out);
  }
  DeviceOf(DeviceOf&& o) noexcept
      : previous_(o.previous_), active_(std::exchange(o.active_, false)) {}
  DeviceOf& operator=(DeviceOf&&) = delete;
  ~DeviceOf() {
    if (active_) cudaSetDevice(previous_);
  }

 private:
  DeviceOf() = default;
  int previous_ = 0;
  bool active_ = false;
};

struct CudaFree {
  void operator()(void* p) const { cudaFree(p); }
};
using DeviceMemory = std::unique_ptr<void, CudaFree>;

Result<DeviceMemory> AllocateDevice(size_t bytes) {
  void* p = nullptr;
  RELAYKV_CUDA_TRY(cudaMalloc(&p, bytes == 0 ? 1 : bytes));
  return DeviceMemory(p);
}

// The 2L (layer, K/V) row blocks of `count` tokens: one strided 2-D copy between a
// payload of `a_tokens` tokens (from a_begin) and one of `b_tokens` (from b_begin).
Status CopyPayloadRows(void* b, int32_t b_tokens, int32_t b_begin, const void* a, int32_t a_tokens,
                       int32_t a_begin, int32_t count, const KvLayout& layout,
                       cudaMemcpyKind kind) {
  const size_t row =
      static_cast<size_t>(layout.num_kv_heads) * layout.head_size * DTypeSize(layout.dtype);
  RELAYKV_CUDA_TRY(cudaMemcpy2DAsync(static_cast<char*>(b) + row * b_begin, row * b_tokens,
                                     static_cast<const char*>(a) + row * a_begin, row * a_tokens,
                                     row * count, static_cast<size_t>(layout.num_layers) * 2, kind,
                                     nullptr));
  return Status::Ok();
}

// Runs work(staged) with a `count`-token payload staged on the device that holds
// `cache`, between two device synchronisations: before, since the cache may be
// in use on any stream; after, also when `work` fails, so that what it queued
// finishes before the caller's host memory and the staging buffer go.
template <typename Work>
Status WithDeviceStaging(const PagedKvCache& cache, int32_t count, Work work) {
  RELAYKV_ASSIGN_OR_RETURN(DeviceOf device, DeviceOf::For(cache.k_base[0], "paged cache"));
  KvPayload staged{nullptr, count, cache.layout, /*on_device=*/true};
  RELAYKV_ASSIGN_OR_RETURN(DeviceMemory mem, AllocateDevice(static_cast<size_t>(staged.Bytes())));
  staged.data = mem.get();
  RELAYKV_CUDA_TRY(cudaDeviceSynchronize());
  const Status queued = work(staged);
  const cudaError_t synced = cudaDeviceSynchronize();
  RELAYKV_RETURN_IF_ERROR(queued);
  RELAYKV_CUDA_TRY(synced);
  return Status::Ok();
}

}  // namespace

Status ImportToDeviceCache(const KvPayload& host_src, int32_t src_token_begin, int32_t count,
                           const PagedKvCache& dst, std::span<const int32_t> block_table,
                           int32_t seq_begin, const RopeParams& rope,
                           std::span<const int64_t> deltas) {
  RELAYKV_RETURN_IF_ERROR(ValidatePayloadRange(host_src, src_token_begin, count, /*device=*/false));
  RELAYKV_RETURN_IF_ERROR(ValidatePagedRange(dst, block_table, seq_begin, count, /*device=*/true));
  if (!(host_src.layout == dst.layout)) {
    return InvalidArgument("payload layout " + host_src.layout.ToString() +
                           " differs from the cache's " + dst.layout.ToString());
  }
  if (deltas.size() != 1 && deltas.size() != static_cast<size_t>(count)) {
    return InvalidArgument("need one delta or one per token, got " + std::to_string(deltas.size()));
  }
  if (count == 0) return Status::Ok();
  return WithDeviceStaging(dst, count, [&](const KvPayload& staged) -> Status {
    RELAYKV_RETURN_IF_ERROR(CopyPayloadRows(staged.data, count, 0, host_src.data,
                                            host_src.num_tokens, src_token_begin, count, dst.layout,
                                            cudaMemcpyHostToDevice));
    RELAYKV_RETURN_IF_ERROR(ScatterKvCuda(staged, 0, count, dst, block_table, seq_begin));
    if (deltas.size() == 1) {
      return RerotateKCuda(dst, block_table, seq_begin, count, rope, deltas[0], LayerRange::All());
    }
    return RerotateKPerTokenCuda(dst, block_table, seq_begin, deltas, rope);
  });
}

Status ExportFromDeviceCache(const PagedKvCache& src, std::span<const int32_t> block_table,
                             int32_t seq_begin, int32_t count, const KvPayload& host_dst,
                             int32_t dst_token_begin) {
  RELAYKV_RETURN_IF_ERROR(ValidatePagedRange(src, block_table, seq_begin, count, /*device=*/true));
  RELAYKV_RETURN_IF_ERROR(ValidatePayloadRange(host_dst, dst_token_begin, count, /*device=*/false));
  if (!(host_dst.layout == src.layout)) {
    return InvalidArgument("payload layout " + host_dst.layout.ToString() +
                           " differs from the cache's " + src.layout.ToString());
  }
  if (count == 0) return Status::Ok();
  return WithDeviceStaging(src, count, [&](const KvPayload& staged) -> Status {
    RELAYKV_RETURN_IF_ERROR(GatherKvCuda(src, block_table, seq_begin, count, staged, 0));
    return CopyPayloadRows(host_dst.data, host_dst.num_tokens, dst_token_begin, staged.data, count,
                           0, count, src.layout, cudaMemcpyDeviceToHost);
  });
}

}  // namespace relaykv
