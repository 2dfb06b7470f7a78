// libFuzzer target for the record parser (clang, ASan + UBSan).
//
// Each input is parsed three ways: as given, as given without payload
// verification, and after this harness recomputed its checksums from its own
// (untrusted) header. The third is what lets mutations get past the checksums
// and reach the field validation and the accessors behind them. Whatever
// parses is then read through every accessor (so ASan sees any out-of-bounds
// pointer the view hands out) and checked against invariants that must hold
// for any accepted record; a broken invariant traps.
#include <xxhash.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "transfer/record/record.h"

namespace relaykv {
namespace {

namespace hf = record_header;

#define FUZZ_ASSERT(cond)          \
  do {                             \
    if (!(cond)) __builtin_trap(); \
  } while (0)

template <typename T>
T Get(const uint8_t* p, size_t off) {
  T v;
  std::memcpy(&v, p + off, sizeof(T));
  return v;
}

template <typename T>
void Put(uint8_t* p, size_t off, T v) {
  std::memcpy(p + off, &v, sizeof(T));
}

bool InBounds(uint64_t off, uint64_t len, uint64_t size) {
  return off <= size && len <= size - off;
}

// Rewrites every checksum the header's section table lets us locate. Reads
// only what lies inside the buffer: the header is fuzzer-controlled too.
void FixChecksums(std::vector<uint8_t>& b) {
  if (b.size() < kRecordHeaderSize) return;
  uint8_t* p = b.data();
  const uint64_t size = b.size();
  RecordExtent s[kNumRecordSections];
  for (size_t i = 0; i < kNumRecordSections; ++i) {
    s[i] = {Get<uint64_t>(p, hf::kSections + 16 * i), Get<uint64_t>(p, hf::kSections + 16 * i + 8)};
  }
  const RecordExtent& table = s[static_cast<size_t>(RecordSection::kChecksums)];
  const RecordExtent& tokens = s[static_cast<size_t>(RecordSection::kTokens)];
  const RecordExtent& positions = s[static_cast<size_t>(RecordSection::kPositions)];
  const RecordExtent& kv = s[static_cast<size_t>(RecordSection::kKv)];
  const RecordExtent& hidden = s[static_cast<size_t>(RecordSection::kHidden)];
  if (InBounds(table.offset, table.size, size)) {
    const uint64_t slots = table.size / 8;
    auto put = [&](uint64_t slot, uint64_t sum) {
      if (slot < slots) Put<uint64_t>(p, table.offset + 8 * slot, sum);
    };
    if (InBounds(tokens.offset, tokens.size, size) &&
        InBounds(positions.offset, positions.size, size)) {
      put(0, XXH64(p + positions.offset, positions.size, XXH64(p + tokens.offset, tokens.size, 0)));
    }
    const int32_t layers = Get<int32_t>(p, hf::kNumLayers);
    if (layers > 0 && layers <= 1024 && InBounds(kv.offset, kv.size, size)) {
      const uint64_t side = kv.size / (2 * static_cast<uint64_t>(layers));
      for (int32_t l = 0; l < layers; ++l) {
        const uint64_t k = kv.offset + 2 * side * static_cast<uint64_t>(l);
        put(1 + 2 * static_cast<uint64_t>(l), XXH64(p + k, side, 0));
        put(2 + 2 * static_cast<uint64_t>(l), XXH64(p + k + side, side, 0));
      }
      const uint32_t num_hidden = Get<uint32_t>(p, hf::kNumHidden);
      if (num_hidden > 0 && num_hidden <= 1025 && InBounds(hidden.offset, hidden.size, size)) {
        const uint64_t each = hidden.size / num_hidden;
        for (uint32_t i = 0; i < num_hidden; ++i) {
          put(1 + 2 * static_cast<uint64_t>(layers) + i,
              XXH64(p + hidden.offset + each * i, each, 0));
        }
      }
    }
  }
  const uint64_t meta_begin = s[0].offset;
  const uint64_t meta_end = tokens.offset;
  if (meta_begin <= meta_end && meta_end <= size) {
    Put<uint64_t>(p, hf::kMetaChecksum, XXH64(p + meta_begin, meta_end - meta_begin, 0));
  }
  Put<uint64_t>(p, hf::kHeaderChecksum, XXH64(p, hf::kHeaderChecksum, 0));
}

volatile uint64_t g_sink;

uint64_t Sum(const uint8_t* p, int64_t n) {
  uint64_t acc = 0;
  for (int64_t i = 0; i < n; ++i) acc = acc * 31 + p[i];
  return acc;
}

// Reads every byte every accessor exposes and checks what an accepted record
// promises about itself.
void Exercise(const RecordView& v, const uint8_t* data, size_t size) {
  const RecordGeometry& g = v.geometry();
  const RecordMeta& m = v.meta();
  FUZZ_ASSERT(v.data() == data && v.size() == size && g.total_size == size);
  FUZZ_ASSERT(v.num_tokens() > 0 && g.num_layers == m.layout.num_layers);
  FUZZ_ASSERT(m.Validate().ok());
  uint64_t acc = 0;
  for (int32_t t : v.tokens()) acc += static_cast<uint32_t>(t);
  for (int32_t p : v.positions()) acc += static_cast<uint32_t>(p);
  FUZZ_ASSERT(v.tokens().size() == static_cast<size_t>(v.num_tokens()));
  FUZZ_ASSERT(v.payload() == v.K(0));
  for (int32_t l = 0; l < g.num_layers; ++l) {
    acc += Sum(v.K(l), g.kv_side_bytes);
    acc += Sum(v.V(l), g.kv_side_bytes);
  }
  for (int32_t i = 0; i < v.num_hidden(); ++i) acc += Sum(v.hidden(i), g.hidden_checkpoint_bytes);
  for (char c : m.tenant) acc += static_cast<unsigned char>(c);
  g_sink = acc;

  FUZZ_ASSERT(CheckCompatible(v, m.model_fingerprint, m.layout, m.rope, m.tenant).ok());
  auto header = ParseRecordHeader(data, kRecordHeaderSize);
  FUZZ_ASSERT(header.ok() && header->header_checksum == v.checksum());
  FUZZ_ASSERT(RecordSize(m, v.num_tokens()).ok() && *RecordSize(m, v.num_tokens()) == size);

  // The format is canonical: rebuilding an accepted record from its parts
  // gives the same bytes (optional flags aside, which the writer leaves 0).
  if (v.header().flags == 0 && v.VerifyPayloadChecksums().ok()) {
    const RecordExtent& hidden = g.section(RecordSection::kHidden);
    auto rebuilt =
        BuildRecord(m, v.tokens(), v.positions(),
                    std::span<const uint8_t>(v.payload(), g.section(RecordSection::kKv).size),
                    std::span<const uint8_t>(data + hidden.offset, hidden.size));
    FUZZ_ASSERT(rebuilt.ok() && rebuilt->size() == size &&
                std::memcmp(rebuilt->data(), data, size) == 0);
  }
}

void CheckError(const Status& s) {
  FUZZ_ASSERT(!s.ok() && !s.message().empty());
  FUZZ_ASSERT(s.code() == StatusCode::kDataLoss || s.code() == StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace relaykv

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace relaykv;  // NOLINT(build/namespaces)
  auto verified = ParseRecord(data, size);
  if (verified.ok()) {
    Exercise(*verified, data, size);
  } else {
    CheckError(verified.status());
  }
  auto lazy = ParseRecord(data, size, ParseOptions{.verify_payload_checksums = false});
  if (lazy.ok()) {
    Exercise(*lazy, data, size);
    FUZZ_ASSERT(verified.ok() == lazy->VerifyPayloadChecksums().ok());
  } else {
    CheckError(lazy.status());
    FUZZ_ASSERT(!verified.ok());
  }

  // An exact-size heap copy, so ASan still sees reads past the end.
  std::vector<uint8_t> fixed(data, data + size);
  FixChecksums(fixed);
  auto repaired = ParseRecord(fixed.data(), fixed.size());
  if (repaired.ok()) {
    Exercise(*repaired, fixed.data(), fixed.size());
  } else {
    CheckError(repaired.status());
  }
  return 0;
}
