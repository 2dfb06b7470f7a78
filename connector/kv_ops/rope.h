// Re-rotating K to a new position.
//
// RoPE rotates each (x, y) pair of K by angle p × inv_freq[i]; rotations add,
// so K computed at position p becomes K at position p + delta by one more
// rotation by delta × inv_freq[i]. An import uses this to place a record's
// tokens behind a different prefix without recomputing them. V carries no
// position and is never touched; neither are the dims beyond rotary_dim.
//
// Angles are computed in double once per call (one cos/sin table row per
// distinct delta); the rotation itself runs in fp32 and is stored back in the
// cache dtype with round-to-nearest-even. A delta of 0 leaves the bytes as they
// are. CUDA versions live in kv_ops_cuda.h.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "connector/kv_ops/paged_kv.h"
#include "transfer/common/status.h"
#include "transfer/record/kv_layout.h"
#include "transfer/record/rope_params.h"

namespace relaykv {

// Rotates K of payload tokens [token_begin, token_begin + count) by `delta`
// positions (may be negative), in every layer of `layers`.
Status RerotateK(const KvPayload& payload, int32_t token_begin, int32_t count,
                 const RopeParams& rope, int64_t delta, LayerRange layers = LayerRange::All());

// The same on sequence tokens [seq_begin, seq_begin + count) of a paged cache.
Status RerotateK(const PagedKvCache& cache, std::span<const int32_t> block_table, int32_t seq_begin,
                 int32_t count, const RopeParams& rope, int64_t delta,
                 LayerRange layers = LayerRange::All());

// One delta per token: token_begin + i moves by deltas[i]. An import that
// places several spans at different offsets does them in one pass; the cost
// over RerotateK is one table row per distinct delta.
Status RerotateKPerToken(const KvPayload& payload, int32_t token_begin,
                         std::span<const int64_t> deltas, const RopeParams& rope,
                         LayerRange layers = LayerRange::All());
Status RerotateKPerToken(const PagedKvCache& cache, std::span<const int32_t> block_table,
                         int32_t seq_begin, std::span<const int64_t> deltas, const RopeParams& rope,
                         LayerRange layers = LayerRange::All());

// cos/sin of delta × inv_freq[i] for each distinct non-zero delta of one call.
// Shared by the CPU and CUDA paths so both rotate by the very same floats.
struct RotationTable {
  int32_t half_rotary = 0;         // rotary_dim / 2: pairs per head
  int32_t num_rows = 0;            // distinct non-zero deltas
  std::vector<float> cos;          // [num_rows][half_rotary]
  std::vector<float> sin;          // [num_rows][half_rotary]
  std::vector<int32_t> token_row;  // per token: its row, or -1 (delta 0: untouched)

  bool NothingToDo() const { return num_rows == 0; }
};

// `deltas` has one entry per token. Fails when `rope` does not fit head_size.
Result<RotationTable> BuildRotationTable(const RopeParams& rope, int32_t head_size,
                                         std::span<const int64_t> deltas);

}  // namespace relaykv
