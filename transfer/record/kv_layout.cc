#include "transfer/record/kv_layout.h"

#include <xxhash.h>

namespace relaykv {

Status KvLayout::Validate() const {
  if (num_layers <= 0 || num_layers > 1024) {
    return InvalidArgument("layout.num_layers must be in [1, 1024], got " +
                           std::to_string(num_layers));
  }
  if (num_kv_heads <= 0 || num_kv_heads > 1024) {
    return InvalidArgument("layout.num_kv_heads must be in [1, 1024], got " +
                           std::to_string(num_kv_heads));
  }
  if (head_size <= 0 || head_size > 4096 || head_size % 2 != 0) {
    return InvalidArgument("layout.head_size must be even and in [2, 4096], got " +
                           std::to_string(head_size));
  }
  const auto d = static_cast<uint8_t>(dtype);
  if (d > static_cast<uint8_t>(DType::kBFloat16)) {
    return InvalidArgument("layout.dtype has unknown code " + std::to_string(d));
  }
  return Status::Ok();
}

uint64_t KvLayout::Fingerprint() const {
  // Explicit little-endian packing so the hash does not depend on struct padding.
  uint8_t buf[13];
  auto put32 = [&](int off, int32_t v) {
    for (int i = 0; i < 4; ++i)
      buf[off + i] = static_cast<uint8_t>(static_cast<uint32_t>(v) >> (8 * i));
  };
  put32(0, num_layers);
  put32(4, num_kv_heads);
  put32(8, head_size);
  buf[12] = static_cast<uint8_t>(dtype);
  return XXH64(buf, sizeof(buf), /*seed=*/0x6b766c61796f7574ULL);
}

std::string KvLayout::ToString() const {
  return "KvLayout(layers=" + std::to_string(num_layers) +
         ", kv_heads=" + std::to_string(num_kv_heads) + ", head_size=" + std::to_string(head_size) +
         ", dtype=" + std::string(DTypeName(dtype)) + ")";
}

Status PagedKvCache::Validate() const {
  RELAYKV_RETURN_IF_ERROR(layout.Validate());
  if (block_size <= 0) {
    return InvalidArgument("paged cache block_size must be positive, got " +
                           std::to_string(block_size));
  }
  if (num_blocks <= 0) return InvalidArgument("paged cache has no blocks");
  if (static_cast<int32_t>(k_base.size()) != layout.num_layers ||
      static_cast<int32_t>(v_base.size()) != layout.num_layers) {
    return InvalidArgument("paged cache needs one K and one V base per layer: layout has " +
                           std::to_string(layout.num_layers) + " layers, got " +
                           std::to_string(k_base.size()) + " K and " +
                           std::to_string(v_base.size()) + " V bases");
  }
  for (int32_t l = 0; l < layout.num_layers; ++l) {
    if (k_base[l] == nullptr || v_base[l] == nullptr) {
      return InvalidArgument("paged cache layer " + std::to_string(l) + " has a null base");
    }
  }
  if (block_stride <= 0 || slot_stride <= 0 || head_stride <= 0 || dim_stride <= 0) {
    return InvalidArgument("paged cache strides must be positive");
  }
  return Status::Ok();
}

}  // namespace relaykv
