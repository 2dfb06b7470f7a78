#include "connector/kv_ops/rope.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <unordered_map>

#include "connector/kv_ops/convert.h"
#include "connector/kv_ops/kv_view.h"

namespace relaykv {
namespace {

#ifdef RELAYKV_KV_OPS_F16C
using kv_ops_internal::F16cHalf;
using kv_ops_internal::HaveF16c;
#endif
using kv_ops_internal::PortableConvert;
using kv_ops_internal::TokenRows;

template <typename Convert, int64_t kEs>
[[gnu::always_inline]] inline void RotateTokens(const TokenRows& rows, int64_t begin, int64_t count,
                                                const RotationTable& table, RopeStyle style,
                                                LayerRange layers) {
  const int64_t half = table.half_rotary;
  // Pair j is (j, j + half) in neox style and (2j, 2j + 1) interleaved.
  const int64_t first_step = (style == RopeStyle::kNeox ? 1 : 2) * rows.dim_stride * kEs;
  const int64_t partner = (style == RopeStyle::kNeox ? half : 1) * rows.dim_stride * kEs;
  for (int32_t l = layers.begin; l < layers.end; ++l) {
    for (int64_t i = 0; i < count; ++i) {
      const int32_t r = table.token_row[i];
      if (r < 0) continue;
      const float* c = table.cos.data() + int64_t{r} * half;
      const float* s = table.sin.data() + int64_t{r} * half;
      char* row = rows.Row(l, /*kv=*/0, begin + i);
      for (int64_t h = 0; h < rows.num_heads; ++h) {
        char* head = row + h * rows.head_stride * kEs;
        for (int64_t j = 0; j < half; ++j) {
          char* px = head + j * first_step;
          char* py = px + partner;
          const float x = Convert::Load(px);
          const float y = Convert::Load(py);
          Convert::Store(px, x * c[j] - y * s[j]);
          Convert::Store(py, x * s[j] + y * c[j]);
        }
      }
    }
  }
}

#ifdef RELAYKV_KV_OPS_F16C
// flatten: the loop and the conversions are inlined here, where F16C is enabled.
[[gnu::target("f16c"), gnu::flatten]] void RotateHalfF16c(const TokenRows& rows, int64_t begin,
                                                          int64_t count, const RotationTable& table,
                                                          RopeStyle style, LayerRange layers) {
  RotateTokens<F16cHalf, 2>(rows, begin, count, table, style, layers);
}
#endif

void Rotate(const TokenRows& rows, DType dtype, int64_t begin, int64_t count,
            const RotationTable& table, RopeStyle style, LayerRange layers) {
  switch (dtype) {
    case DType::kFloat32:
      return RotateTokens<PortableConvert<DType::kFloat32>, 4>(rows, begin, count, table, style,
                                                               layers);
    case DType::kFloat16:
#ifdef RELAYKV_KV_OPS_F16C
      if (HaveF16c()) return RotateHalfF16c(rows, begin, count, table, style, layers);
#endif
      return RotateTokens<PortableConvert<DType::kFloat16>, 2>(rows, begin, count, table, style,
                                                               layers);
    case DType::kBFloat16:
      return RotateTokens<PortableConvert<DType::kBFloat16>, 2>(rows, begin, count, table, style,
                                                                layers);
  }
}

Status CheckDeltaCount(std::span<const int64_t> deltas) {
  if (deltas.size() > static_cast<size_t>(INT32_MAX)) {
    return InvalidArgument("too many per-token deltas: " + std::to_string(deltas.size()));
  }
  return Status::Ok();
}

Status RerotatePayload(const KvPayload& payload, int32_t token_begin,
                       std::span<const int64_t> deltas, const RopeParams& rope, LayerRange layers) {
  RELAYKV_RETURN_IF_ERROR(CheckDeltaCount(deltas));
  const auto count = static_cast<int32_t>(deltas.size());
  RELAYKV_RETURN_IF_ERROR(ValidatePayloadRange(payload, token_begin, count, /*device=*/false));
  RELAYKV_ASSIGN_OR_RETURN(const LayerRange resolved,
                           ResolveLayerRange(layers, payload.layout.num_layers));
  RELAYKV_ASSIGN_OR_RETURN(const RotationTable table,
                           BuildRotationTable(rope, payload.layout.head_size, deltas));
  if (table.NothingToDo()) return Status::Ok();
  Rotate(TokenRows::FromPayload(payload), payload.layout.dtype, token_begin, count, table,
         rope.style, resolved);
  return Status::Ok();
}

Status RerotatePaged(const PagedKvCache& cache, std::span<const int32_t> block_table,
                     int32_t seq_begin, std::span<const int64_t> deltas, const RopeParams& rope,
                     LayerRange layers) {
  RELAYKV_RETURN_IF_ERROR(CheckDeltaCount(deltas));
  const auto count = static_cast<int32_t>(deltas.size());
  RELAYKV_RETURN_IF_ERROR(
      ValidatePagedRange(cache, block_table, seq_begin, count, /*device=*/false));
  RELAYKV_ASSIGN_OR_RETURN(const LayerRange resolved,
                           ResolveLayerRange(layers, cache.layout.num_layers));
  RELAYKV_ASSIGN_OR_RETURN(const RotationTable table,
                           BuildRotationTable(rope, cache.layout.head_size, deltas));
  if (table.NothingToDo()) return Status::Ok();
  Rotate(TokenRows::FromCache(cache, block_table), cache.layout.dtype, seq_begin, count, table,
         rope.style, resolved);
  return Status::Ok();
}

}  // namespace

Result<RotationTable> BuildRotationTable(const RopeParams& rope, int32_t head_size,
                                         std::span<const int64_t> deltas) {
  RELAYKV_RETURN_IF_ERROR(rope.Validate(head_size));
  const std::vector<double> inv_freq = rope.InverseFrequencies(head_size);
  RotationTable table;
  table.half_rotary = static_cast<int32_t>(inv_freq.size());
  table.token_row.resize(deltas.size(), -1);
  // Spans of one import share a delta, so most lookups hit the previous token's.
  std::unordered_map<int64_t, int32_t> row_of;
  int64_t last_delta = 0;  // never a key: zero deltas get no row
  int32_t last_row = -1;
  for (size_t i = 0; i < deltas.size(); ++i) {
    const int64_t delta = deltas[i];
    if (delta == 0) continue;
    if (delta != last_delta) {
      auto [it, inserted] = row_of.try_emplace(delta, table.num_rows);
      if (inserted) {
        for (double f : inv_freq) {
          const double angle = static_cast<double>(delta) * f;
          table.cos.push_back(static_cast<float>(std::cos(angle)));
          table.sin.push_back(static_cast<float>(std::sin(angle)));
        }
        ++table.num_rows;
      }
      last_delta = delta;
      last_row = it->second;
    }
    table.token_row[i] = last_row;
  }
  return table;
}

Status RerotateK(const KvPayload& payload, int32_t token_begin, int32_t count,
                 const RopeParams& rope, int64_t delta, LayerRange layers) {
  if (count < 0) return InvalidArgument("token count must be >= 0, got " + std::to_string(count));
  return RerotatePayload(payload, token_begin, std::vector<int64_t>(count, delta), rope, layers);
}

Status RerotateK(const PagedKvCache& cache, std::span<const int32_t> block_table, int32_t seq_begin,
                 int32_t count, const RopeParams& rope, int64_t delta, LayerRange layers) {
  if (count < 0) return InvalidArgument("token count must be >= 0, got " + std::to_string(count));
  return RerotatePaged(cache, block_table, seq_begin, std::vector<int64_t>(count, delta), rope,
                       layers);
}

Status RerotateKPerToken(const KvPayload& payload, int32_t token_begin,
                         std::span<const int64_t> deltas, const RopeParams& rope,
                         LayerRange layers) {
  return RerotatePayload(payload, token_begin, deltas, rope, layers);
}

Status RerotateKPerToken(const PagedKvCache& cache, std::span<const int32_t> block_table,
                         int32_t seq_begin, std::span<const int64_t> deltas, const RopeParams& rope,
                         LayerRange layers) {
  return RerotatePaged(cache, block_table, seq_begin, deltas, rope, layers);
}

}  // namespace relaykv
