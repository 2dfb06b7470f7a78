// Paged gather/scatter throughput against a plain memcpy of the same bytes,
// measured side by side in one run, and RoPE re-rotation throughput (CPU).
//
// Shapes: SmolLM2-135M (30 layers, 3 KV heads, head 64, fp16) and a Llama-8B
// sized cache (32 layers, 8 KV heads, head 128, bf16), both with 16-token
// blocks in vLLM's NHD layout and a shuffled block table, at 512 and 4,096
// tokens. One JSON line per shape and token count:
//   gather_gbps, scatter_gbps, memcpy_gbps, gather_ratio, scatter_ratio
//   (= op / memcpy), target 0.70, pass, rerotate_gbps (K bytes per second).
//
//   kv_ops_bench [--quick]
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "bench_util.h"
#include "connector/kv_ops/paged_kv.h"
#include "connector/kv_ops/rope.h"

namespace relaykv {
namespace {

struct Shape {
  const char* name;
  KvLayout layout;
  int32_t block_size;
};

constexpr double kTarget = 0.70;

// Runs each op `reps` times, interleaved so that all of them see the same
// machine state, and returns each op's median seconds.
template <typename... Ops>
std::vector<double> MedianSeconds(int reps, Ops&&... ops) {
  std::vector<std::vector<double>> times(sizeof...(Ops));
  for (int r = 0; r < reps; ++r) {
    size_t i = 0;
    (
        [&] {
          const double t0 = bench::NowSeconds();
          ops();
          times[i++].push_back(bench::NowSeconds() - t0);
        }(),
        ...);
  }
  std::vector<double> out;
  for (auto& t : times) out.push_back(bench::Median(t));
  return out;
}

void Run(const Shape& shape, int32_t tokens, bool quick) {
  const KvLayout& layout = shape.layout;
  const int64_t num_blocks = (tokens + shape.block_size - 1) / shape.block_size;
  KvPayload payload{nullptr, tokens, layout, false};
  const int64_t row = payload.RowElements();
  const int64_t es = DTypeSize(layout.dtype);
  const int64_t kv_elems = num_blocks * shape.block_size * row;  // one of K or V, one layer

  // vLLM NHD: per layer [2, blocks, slots, heads, dim], layers back to back, so
  // the cache holds exactly the payload's bytes and a memcpy of the whole cache
  // is the fair baseline.
  std::vector<uint8_t> cache_bytes(layout.num_layers * 2 * kv_elems * es);
  std::vector<uint8_t> payload_bytes(payload.Bytes());
  std::vector<uint8_t> memcpy_dst(payload.Bytes());
  std::mt19937_64 rng(42);
  for (size_t i = 0; i < cache_bytes.size(); i += 2) {
    StoreFromFloat(&cache_bytes[i], layout.dtype,
                   std::uniform_real_distribution<float>(-2, 2)(rng));
  }
  payload.data = payload_bytes.data();

  PagedKvCache cache;
  cache.layout = layout;
  cache.block_size = shape.block_size;
  cache.num_blocks = num_blocks;
  for (int32_t l = 0; l < layout.num_layers; ++l) {
    cache.k_base.push_back(cache_bytes.data() + (2 * l) * kv_elems * es);
    cache.v_base.push_back(cache_bytes.data() + (2 * l + 1) * kv_elems * es);
  }
  cache.block_stride = shape.block_size * row;
  cache.slot_stride = row;
  cache.head_stride = layout.head_size;
  cache.dim_stride = 1;

  std::vector<int32_t> table(num_blocks);
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), rng);

  const int64_t bytes = payload.Bytes();
  // Enough repetitions for a stable median without running for minutes.
  const int reps = quick ? 3 : std::clamp<int>(static_cast<int>(4e9 / bytes), 5, 200);
  bool ok = true;
  auto check = [&](const Status& s) {
    if (!s.ok()) {
      std::fprintf(stderr, "kv_ops_bench: %s\n", s.ToString().c_str());
      ok = false;
    }
  };
  std::memcpy(memcpy_dst.data(), cache_bytes.data(), bytes);  // fault every page in
  check(GatherKv(cache, table, 0, tokens, payload, 0));
  const std::vector<double> t = MedianSeconds(
      reps,
      [&] {
        std::memcpy(memcpy_dst.data(), cache_bytes.data(), bytes);
        bench::DoNotOptimize(memcpy_dst.data());
      },
      [&] { check(GatherKv(cache, table, 0, tokens, payload, 0)); },
      [&] { check(ScatterKv(payload, 0, tokens, cache, table, 0)); });

  // RoPE touches K only: K bytes are read and written once.
  RopeParams rope;
  rope.theta = layout.head_size == 64 ? 100000.f : 500000.f;
  const int rope_reps = quick ? 1 : 3;
  const double rope_s =
      MedianSeconds(rope_reps, [&] { check(RerotateK(cache, table, 0, tokens, rope, 1234)); })[0];

  const double gbps_memcpy = bytes / t[0] / 1e9;
  const double gbps_gather = bytes / t[1] / 1e9;
  const double gbps_scatter = bytes / t[2] / 1e9;
  const double gather_ratio = gbps_gather / gbps_memcpy;
  const double scatter_ratio = gbps_scatter / gbps_memcpy;
  bench::JsonLine("kv_ops")
      .Str("shape", shape.name)
      .Int("layers", layout.num_layers)
      .Int("kv_heads", layout.num_kv_heads)
      .Int("head_size", layout.head_size)
      .Str("dtype", DTypeName(layout.dtype))
      .Int("block_size", shape.block_size)
      .Int("tokens", tokens)
      .Int("bytes", bytes)
      .Int("reps", reps)
      .Num("gather_gbps", gbps_gather)
      .Num("scatter_gbps", gbps_scatter)
      .Num("memcpy_gbps", gbps_memcpy)
      .Num("gather_ratio", gather_ratio)
      .Num("scatter_ratio", scatter_ratio)
      .Num("target", kTarget)
      .Bool("pass", ok && gather_ratio >= kTarget && scatter_ratio >= kTarget)
      .Num("rerotate_gbps", (bytes / 2) / rope_s / 1e9)
      .Print();
}

}  // namespace
}  // namespace relaykv

int main(int argc, char** argv) {
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (std::string_view(argv[i]) == "--quick") {
      quick = true;
    } else {
      std::fprintf(stderr, "usage: kv_ops_bench [--quick]\n");
      return 2;
    }
  }
  using relaykv::DType;
  const relaykv::Shape shapes[] = {
      {"smollm2-135m", {30, 3, 64, DType::kFloat16}, 16},
      {"llama-8b", {32, 8, 128, DType::kBFloat16}, 16},
  };
  for (const auto& shape : shapes) {
    for (int32_t tokens : {512, 4096}) relaykv::Run(shape, tokens, quick);
  }
  return 0;
}
