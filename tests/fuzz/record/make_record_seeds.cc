// Writes a small seed corpus of valid records for record_fuzz.
//
// Usage: make_record_seeds <corpus dir>. The directory is emptied first, so
// every fuzz run starts from the same seeds (libFuzzer adds what it finds to
// it). Seeds stay small: the fuzzer's default input length follows them.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "transfer/common/dtype.h"
#include "transfer/record/record.h"

namespace relaykv {
namespace {

struct Seed {
  std::string name;
  RecordMeta meta;
  int32_t num_tokens;
};

std::vector<Seed> Seeds() {
  std::vector<Seed> seeds;
  {
    Seed s{"fp16_plain", {}, 4};
    s.meta.model_fingerprint = 0x1111;
    s.meta.layout = KvLayout{2, 1, 4, DType::kFloat16};
    seeds.push_back(s);
  }
  {
    Seed s{"bf16_hidden_tenant", {}, 3};
    s.meta.model_fingerprint = 0x2222;
    s.meta.layout = KvLayout{3, 2, 2, DType::kBFloat16};
    s.meta.tenant = "tenant-b";
    s.meta.hidden_layers = {0, 3};
    s.meta.hidden_size = 4;
    seeds.push_back(s);
  }
  {
    Seed s{"fp32_one_token_llama3", {}, 1};
    s.meta.layout = KvLayout{1, 1, 8, DType::kFloat32};
    s.meta.rope.theta = 500000.f;
    s.meta.rope.scaling = RopeScaling::kLlama3;
    s.meta.rope.factor = 8.f;
    s.meta.rope.rotary_dim = 4;
    s.meta.hidden_layers = {1};
    s.meta.hidden_size = 2;
    seeds.push_back(s);
  }
  {
    Seed s{"fp16_interleaved_linear", {}, 6};
    s.meta.layout = KvLayout{2, 2, 2, DType::kFloat16};
    s.meta.rope.style = RopeStyle::kInterleaved;
    s.meta.rope.scaling = RopeScaling::kLinear;
    s.meta.rope.factor = 2.f;
    s.meta.tenant = std::string("\x00\xff", 2);
    seeds.push_back(s);
  }
  {
    Seed s{"fp32_yarn_untruncated", {}, 2};
    s.meta.layout = KvLayout{2, 1, 8, DType::kFloat32};
    s.meta.rope.theta = 1000000.f;
    s.meta.rope.scaling = RopeScaling::kYarn;
    s.meta.rope.factor = 4.f;
    s.meta.rope.original_max_position = 256;
    s.meta.rope.attention_factor = 1.1386f;
    s.meta.rope.truncate = false;
    seeds.push_back(s);
  }
  return seeds;
}

int Run(const std::filesystem::path& dir) {
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    std::fprintf(stderr, "make_record_seeds: cannot create %s: %s\n", dir.c_str(),
                 ec.message().c_str());
    return 1;
  }
  for (const Seed& s : Seeds()) {
    std::vector<int32_t> tokens, positions;
    for (int32_t t = 0; t < s.num_tokens; ++t) {
      tokens.push_back(100 + 7 * t);
      positions.push_back(10 + t);
    }
    auto geometry = ComputeRecordGeometry(s.meta, s.num_tokens);
    if (!geometry.ok()) {
      std::fprintf(stderr, "make_record_seeds: %s: %s\n", s.name.c_str(),
                   geometry.status().ToString().c_str());
      return 1;
    }
    const DType dt = s.meta.layout.dtype;
    const int64_t ds = DTypeSize(dt);
    std::vector<uint8_t> kv(geometry->section(RecordSection::kKv).size);
    std::vector<uint8_t> hidden(geometry->section(RecordSection::kHidden).size);
    for (size_t i = 0; i + ds <= kv.size(); i += ds) {
      StoreFromFloat(kv.data() + i, dt, static_cast<float>(i % 17) - 8.f);
    }
    for (size_t i = 0; i + ds <= hidden.size(); i += ds) {
      StoreFromFloat(hidden.data() + i, dt, static_cast<float>(i % 13) * 0.5f);
    }
    auto record = BuildRecord(s.meta, tokens, positions, kv, hidden);
    if (!record.ok()) {
      std::fprintf(stderr, "make_record_seeds: %s: %s\n", s.name.c_str(),
                   record.status().ToString().c_str());
      return 1;
    }
    std::ofstream out(dir / (s.name + ".rec"), std::ios::binary);
    out.write(reinterpret_cast<const char*>(record->data()),
              static_cast<std::streamsize>(record->size()));
    if (!out) {
      std::fprintf(stderr, "make_record_seeds: cannot write %s\n", s.name.c_str());
      return 1;
    }
  }
  return 0;
}

}  // namespace
}  // namespace relaykv

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <corpus dir>\n", argv[0]);
    return 2;
  }
  return relaykv::Run(argv[1]);
}
