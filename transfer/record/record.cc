#include "transfer/record/record.h"

#include <xxhash.h>

#include <bit>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <limits>
#include <type_traits>

#include "transfer/common/check.h"

namespace relaykv {

// Fields are read and written with memcpy in host order, which is the format's
// order only on little-endian hosts.
static_assert(std::endian::native == std::endian::little,
              "relaykv records are little-endian; a big-endian host needs byte swapping here");
static_assert(sizeof(size_t) == sizeof(uint64_t), "relaykv records need a 64-bit host");

namespace {

namespace hf = record_header;

constexpr uint64_t kSeed = 0;
constexpr uint64_t kMaxTotalSize = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());

template <typename T>
T Load(const uint8_t* p) {
  static_assert(std::is_trivially_copyable_v<T>);
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

template <typename T>
void Store(uint8_t* p, T v) {
  static_assert(std::is_trivially_copyable_v<T>);
  std::memcpy(p, &v, sizeof(T));
}

std::string Hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "0x%016" PRIx64, v);
  return buf;
}

std::string Str(uint64_t v) { return std::to_string(v); }

std::string FloatStr(float f) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.9g", static_cast<double>(f));
  return buf;
}

// Tenants are arbitrary bytes; keep messages printable.
std::string Quoted(std::string_view s) {
  std::string out = "'";
  for (unsigned char c : s) {
    if (c >= 0x20 && c < 0x7f && c != '\'' && c != '\\') {
      out += static_cast<char>(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02x", c);
      out += buf;
    }
  }
  out += "'";
  return out;
}

// What the geometry depends on; filled from a RecordMeta or from a header.
struct Shape {
  KvLayout layout;  // already validated
  uint64_t num_tokens = 0;
  uint64_t tenant_size = 0;
  uint64_t num_hidden = 0;
  uint64_t hidden_size = 0;
};

// Overflow-checked; a header can claim any sizes, and a wrapped product would
// let a small buffer pass the bounds checks.
class CheckedMath {
 public:
  uint64_t Mul(uint64_t a, uint64_t b) {
    uint64_t r;
    if (__builtin_mul_overflow(a, b, &r)) overflow_ = true;
    return r;
  }
  uint64_t Add(uint64_t a, uint64_t b) {
    uint64_t r;
    if (__builtin_add_overflow(a, b, &r)) overflow_ = true;
    return r;
  }
  uint64_t AlignUp(uint64_t x) {
    return Add(x, kRecordSectionAlignment - 1) & ~uint64_t{kRecordSectionAlignment - 1};
  }
  bool overflow() const { return overflow_; }

 private:
  bool overflow_ = false;
};

Result<RecordGeometry> GeometryFor(const Shape& s) {
  CheckedMath m;
  const uint64_t layers = static_cast<uint64_t>(s.layout.num_layers);
  const uint64_t dsize = static_cast<uint64_t>(DTypeSize(s.layout.dtype));
  const uint64_t token_bytes = static_cast<uint64_t>(s.layout.TokenBytes());
  const uint64_t side = m.Mul(s.num_tokens, token_bytes);
  const uint64_t layer_stride = m.Mul(side, 2);
  const uint64_t hidden_token = m.Mul(s.hidden_size, dsize);
  const uint64_t hidden_ckpt = m.Mul(s.num_tokens, hidden_token);
  const uint64_t sizes[kNumRecordSections] = {
      s.tenant_size,
      m.Mul(s.num_hidden, 4),
      m.Mul(m.Add(m.Add(1, m.Mul(2, layers)), s.num_hidden), 8),
      m.Mul(s.num_tokens, 4),
      m.Mul(s.num_tokens, 4),
      m.Mul(layer_stride, layers),
      m.Mul(hidden_ckpt, s.num_hidden),
  };
  RecordGeometry g;
  uint64_t cursor = kRecordHeaderSize;
  for (size_t i = 0; i < kNumRecordSections; ++i) {
    g.sections[i] = {cursor, sizes[i]};
    cursor = m.AlignUp(m.Add(cursor, sizes[i]));
  }
  if (m.overflow() || cursor > kMaxTotalSize) {
    return InvalidArgument("record of " + Str(s.num_tokens) + " tokens with " +
                           s.layout.ToString() + " and " + Str(s.num_hidden) +
                           " hidden checkpoints of size " + Str(s.hidden_size) +
                           " exceeds the format's size limit of 2^63 bytes");
  }
  g.total_size = cursor;
  // Every value below is <= total_size <= INT64_MAX, so the casts are exact.
  g.num_layers = s.layout.num_layers;
  g.num_tokens = static_cast<int32_t>(s.num_tokens);
  g.num_hidden = static_cast<int32_t>(s.num_hidden);
  g.kv_token_stride = static_cast<int64_t>(token_bytes);
  g.kv_side_bytes = static_cast<int64_t>(side);
  g.kv_layer_stride = static_cast<int64_t>(layer_stride);
  g.hidden_token_stride = static_cast<int64_t>(hidden_token);
  g.hidden_checkpoint_bytes = static_cast<int64_t>(hidden_ckpt);
  return g;
}

Status CheckNumTokens(uint64_t n) {
  if (n == 0) return InvalidArgument("a record needs at least one token, got 0");
  if (n > static_cast<uint64_t>(std::numeric_limits<int32_t>::max())) {
    return InvalidArgument("num_tokens " + Str(n) + " exceeds the limit of 2147483647");
  }
  return Status::Ok();
}

// Slot of a section's checksum in the checksum table.
int32_t TokensSlot() { return 0; }
int32_t KSlot(int32_t layer) { return 1 + 2 * layer; }
int32_t VSlot(int32_t layer) { return 2 + 2 * layer; }
int32_t HiddenSlot(const RecordGeometry& g, int32_t index) { return 1 + 2 * g.num_layers + index; }

uint64_t Hash(const uint8_t* p, uint64_t n, uint64_t seed = kSeed) {
  return XXH64(p, static_cast<size_t>(n), seed);
}

// Tokens and positions are one unit (a span is matched on both), so they
// share one checksum: the positions' hash is seeded with the tokens' hash.
uint64_t TokensChecksum(const uint8_t* rec, const RecordGeometry& g) {
  const RecordExtent& t = g.section(RecordSection::kTokens);
  const RecordExtent& p = g.section(RecordSection::kPositions);
  return Hash(rec + p.offset, p.size, Hash(rec + t.offset, t.size));
}

uint64_t MetaChecksum(const uint8_t* rec, const RecordGeometry& g) {
  const uint64_t begin = g.section(RecordSection::kTenant).offset;
  const uint64_t end = g.section(RecordSection::kTokens).offset;
  return Hash(rec + begin, end - begin);
}

void EncodeHeader(const RecordMeta& meta, const RecordGeometry& g, uint8_t* p) {
  std::memset(p, 0, kRecordHeaderSize);
  std::memcpy(p + hf::kMagic, kRecordMagic, sizeof(kRecordMagic));
  Store<uint32_t>(p + hf::kVersion, kRecordFormatVersion);
  Store<uint32_t>(p + hf::kHeaderSize, static_cast<uint32_t>(kRecordHeaderSize));
  Store<uint64_t>(p + hf::kFlags,
                  meta.rope.scaling == RopeScaling::kYarn ? kRecordFlagRopeYarn : 0);
  Store<uint64_t>(p + hf::kModelFingerprint, meta.model_fingerprint);
  Store<int32_t>(p + hf::kNumLayers, meta.layout.num_layers);
  Store<int32_t>(p + hf::kNumKvHeads, meta.layout.num_kv_heads);
  Store<int32_t>(p + hf::kHeadSize, meta.layout.head_size);
  Store<uint8_t>(p + hf::kDType, static_cast<uint8_t>(meta.layout.dtype));
  Store<uint8_t>(p + hf::kRopeStyle, static_cast<uint8_t>(meta.rope.style));
  Store<uint8_t>(p + hf::kRopeScaling, static_cast<uint8_t>(meta.rope.scaling));
  Store<float>(p + hf::kRopeTheta, meta.rope.theta);
  Store<int32_t>(p + hf::kRopeRotaryDim, meta.rope.rotary_dim);
  Store<float>(p + hf::kRopeFactor, meta.rope.factor);
  Store<float>(p + hf::kRopeLowFreqFactor, meta.rope.low_freq_factor);
  Store<float>(p + hf::kRopeHighFreqFactor, meta.rope.high_freq_factor);
  Store<int32_t>(p + hf::kRopeOriginalMaxPosition, meta.rope.original_max_position);
  // Zero for every other scaling, so their headers are what they were before YaRN.
  if (meta.rope.scaling == RopeScaling::kYarn) {
    Store<uint8_t>(p + hf::kRopeYarnTruncate, meta.rope.truncate ? 1 : 0);
    Store<float>(p + hf::kRopeBetaFast, meta.rope.beta_fast);
    Store<float>(p + hf::kRopeBetaSlow, meta.rope.beta_slow);
    Store<float>(p + hf::kRopeAttentionFactor, meta.rope.attention_factor);
  }
  Store<uint32_t>(p + hf::kNumTokens, static_cast<uint32_t>(g.num_tokens));
  Store<uint32_t>(p + hf::kTenantSize, static_cast<uint32_t>(meta.tenant.size()));
  Store<uint32_t>(p + hf::kNumHidden, static_cast<uint32_t>(meta.hidden_layers.size()));
  Store<uint32_t>(p + hf::kHiddenSize, static_cast<uint32_t>(meta.hidden_size));
  for (size_t i = 0; i < kNumRecordSections; ++i) {
    Store<uint64_t>(p + hf::kSections + 16 * i, g.sections[i].offset);
    Store<uint64_t>(p + hf::kSections + 16 * i + 8, g.sections[i].size);
  }
  Store<uint64_t>(p + hf::kTotalSize, g.total_size);
}

Status Truncated(uint64_t needed, size_t got, std::string_view what = "") {
  return DataLoss("record truncated: needs " + std::string(what) + Str(needed) + " bytes, got " +
                  Str(got));
}

bool AllZero(const uint8_t* p, uint64_t n) {
  for (uint64_t i = 0; i < n; ++i) {
    if (p[i] != 0) return false;
  }
  return true;
}

}  // namespace

std::string_view RecordSectionName(RecordSection section) {
  switch (section) {
    case RecordSection::kTenant:
      return "tenant";
    case RecordSection::kHiddenLayers:
      return "hidden_layers";
    case RecordSection::kChecksums:
      return "checksums";
    case RecordSection::kTokens:
      return "tokens";
    case RecordSection::kPositions:
      return "positions";
    case RecordSection::kKv:
      return "kv";
    case RecordSection::kHidden:
      return "hidden";
  }
  return "unknown";
}

Status RecordMeta::Validate() const {
  RELAYKV_RETURN_IF_ERROR(layout.Validate());
  RELAYKV_RETURN_IF_ERROR(rope.Validate(layout.head_size));
  if (tenant.size() > kRecordMaxTenantSize) {
    return InvalidArgument("tenant is " + Str(tenant.size()) + " bytes, at most " +
                           Str(kRecordMaxTenantSize) + " allowed");
  }
  if (hidden_layers.size() > static_cast<size_t>(layout.num_layers) + 1) {
    return InvalidArgument(Str(hidden_layers.size()) + " hidden checkpoints for " +
                           Str(layout.num_layers) + " layers; at most num_layers + 1 allowed");
  }
  for (size_t i = 0; i < hidden_layers.size(); ++i) {
    const int32_t l = hidden_layers[i];
    if (l < 0 || l > layout.num_layers) {
      return InvalidArgument("hidden checkpoint " + Str(i) + " is at layer " + std::to_string(l) +
                             ", outside [0, " + std::to_string(layout.num_layers) + "]");
    }
    if (i > 0 && l <= hidden_layers[i - 1]) {
      return InvalidArgument("hidden checkpoint layers must be strictly increasing: " +
                             std::to_string(hidden_layers[i - 1]) + " then " + std::to_string(l));
    }
  }
  if (hidden_layers.empty()) {
    if (hidden_size != 0) {
      return InvalidArgument("hidden_size must be 0 when there are no hidden checkpoints, got " +
                             std::to_string(hidden_size));
    }
  } else if (hidden_size <= 0 || hidden_size > kRecordMaxHiddenSize) {
    return InvalidArgument("hidden_size must be in [1, " + std::to_string(kRecordMaxHiddenSize) +
                           "] with hidden checkpoints, got " + std::to_string(hidden_size));
  }
  return Status::Ok();
}

Result<RecordGeometry> ComputeRecordGeometry(const RecordMeta& meta, int32_t num_tokens) {
  RELAYKV_RETURN_IF_ERROR(meta.Validate());
  if (num_tokens <= 0) {
    return InvalidArgument("a record needs at least one token, got " + std::to_string(num_tokens));
  }
  Shape s;
  s.layout = meta.layout;
  s.num_tokens = static_cast<uint64_t>(num_tokens);
  s.tenant_size = meta.tenant.size();
  s.num_hidden = meta.hidden_layers.size();
  s.hidden_size = static_cast<uint64_t>(meta.hidden_size);
  return GeometryFor(s);
}

Result<size_t> RecordSize(const RecordMeta& meta, int32_t num_tokens) {
  RELAYKV_ASSIGN_OR_RETURN(RecordGeometry g, ComputeRecordGeometry(meta, num_tokens));
  return static_cast<size_t>(g.total_size);
}

// ---------------------------------------------------------------------------
// Writing

Result<RecordWriter> RecordWriter::Create(const RecordMeta& meta, std::span<const int32_t> tokens,
                                          std::span<const int32_t> positions, void* buffer,
                                          size_t buffer_size) {
  if (tokens.size() != positions.size()) {
    return InvalidArgument("record has " + Str(tokens.size()) + " tokens but " +
                           Str(positions.size()) + " positions");
  }
  RELAYKV_RETURN_IF_ERROR(CheckNumTokens(tokens.size()));
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0) {
      return InvalidArgument("token " + Str(i) + " has negative id " + std::to_string(tokens[i]));
    }
    if (positions[i] < 0) {
      return InvalidArgument("token " + Str(i) + " has negative position " +
                             std::to_string(positions[i]));
    }
  }
  RELAYKV_ASSIGN_OR_RETURN(RecordGeometry g,
                           ComputeRecordGeometry(meta, static_cast<int32_t>(tokens.size())));
  if (buffer == nullptr) return InvalidArgument("record buffer is null");
  if (reinterpret_cast<uintptr_t>(buffer) % kRecordBufferAlignment != 0) {
    return InvalidArgument("record buffer is not " + Str(kRecordBufferAlignment) + "-byte aligned");
  }
  if (buffer_size < g.total_size) {
    return InvalidArgument("record buffer of " + Str(buffer_size) +
                           " bytes is too small for a record of " + Str(g.total_size) + " bytes");
  }

  uint8_t* p = static_cast<uint8_t*>(buffer);
  // Everything before the KV payload is metadata, tokens and padding; the
  // payload itself is left for the caller so it is written exactly once.
  const RecordExtent& kv = g.section(RecordSection::kKv);
  const RecordExtent& hidden = g.section(RecordSection::kHidden);
  std::memset(p, 0, kv.offset);
  std::memset(p + kv.end(), 0, hidden.offset - kv.end());
  std::memset(p + hidden.end(), 0, g.total_size - hidden.end());
  EncodeHeader(meta, g, p);
  if (!meta.tenant.empty()) {
    std::memcpy(p + g.section(RecordSection::kTenant).offset, meta.tenant.data(),
                meta.tenant.size());
  }
  if (!meta.hidden_layers.empty()) {
    std::memcpy(p + g.section(RecordSection::kHiddenLayers).offset, meta.hidden_layers.data(),
                meta.hidden_layers.size() * sizeof(int32_t));
  }
  std::memcpy(p + g.section(RecordSection::kTokens).offset, tokens.data(), tokens.size_bytes());
  std::memcpy(p + g.section(RecordSection::kPositions).offset, positions.data(),
              positions.size_bytes());
  return RecordWriter(p, g);
}

uint8_t* RecordWriter::K(int32_t layer) {
  RELAYKV_CHECK(layer >= 0 && layer < geometry_.num_layers);
  return buf_ + geometry_.KOffset(layer);
}

uint8_t* RecordWriter::V(int32_t layer) {
  RELAYKV_CHECK(layer >= 0 && layer < geometry_.num_layers);
  return buf_ + geometry_.VOffset(layer);
}

uint8_t* RecordWriter::hidden(int32_t index) {
  RELAYKV_CHECK(index >= 0 && index < geometry_.num_hidden);
  return buf_ + geometry_.HiddenOffset(index);
}

uint64_t RecordWriter::Seal() {
  const RecordGeometry& g = geometry_;
  uint8_t* table = buf_ + g.section(RecordSection::kChecksums).offset;
  auto put = [&](int32_t slot, uint64_t sum) { Store<uint64_t>(table + 8 * slot, sum); };
  put(TokensSlot(), TokensChecksum(buf_, g));
  for (int32_t l = 0; l < g.num_layers; ++l) {
    put(KSlot(l), Hash(buf_ + g.KOffset(l), g.kv_side_bytes));
    put(VSlot(l), Hash(buf_ + g.VOffset(l), g.kv_side_bytes));
  }
  for (int32_t i = 0; i < g.num_hidden; ++i) {
    put(HiddenSlot(g, i), Hash(buf_ + g.HiddenOffset(i), g.hidden_checkpoint_bytes));
  }
  Store<uint64_t>(buf_ + hf::kMetaChecksum, MetaChecksum(buf_, g));
  const uint64_t header_sum = Hash(buf_, hf::kHeaderChecksum);
  Store<uint64_t>(buf_ + hf::kHeaderChecksum, header_sum);
  return header_sum;
}

Result<std::vector<uint8_t>> BuildRecord(const RecordMeta& meta, std::span<const int32_t> tokens,
                                         std::span<const int32_t> positions,
                                         std::span<const uint8_t> kv_payload,
                                         std::span<const uint8_t> hidden_payload) {
  RELAYKV_RETURN_IF_ERROR(CheckNumTokens(tokens.size()));
  RELAYKV_ASSIGN_OR_RETURN(RecordGeometry g,
                           ComputeRecordGeometry(meta, static_cast<int32_t>(tokens.size())));
  const RecordExtent& kv = g.section(RecordSection::kKv);
  const RecordExtent& hidden = g.section(RecordSection::kHidden);
  if (kv_payload.size() != kv.size) {
    return InvalidArgument("kv payload is " + Str(kv_payload.size()) + " bytes, expected " +
                           Str(kv.size) + " for " + Str(tokens.size()) + " tokens of " +
                           meta.layout.ToString());
  }
  if (hidden_payload.size() != hidden.size) {
    return InvalidArgument("hidden payload is " + Str(hidden_payload.size()) + " bytes, expected " +
                           Str(hidden.size) + " for " + Str(meta.hidden_layers.size()) +
                           " checkpoints of " + Str(tokens.size()) + " tokens x hidden_size " +
                           std::to_string(meta.hidden_size));
  }
  std::vector<uint8_t> out(static_cast<size_t>(g.total_size));
  RELAYKV_ASSIGN_OR_RETURN(RecordWriter w,
                           RecordWriter::Create(meta, tokens, positions, out.data(), out.size()));
  if (!kv_payload.empty()) std::memcpy(w.payload(), kv_payload.data(), kv_payload.size());
  if (!hidden_payload.empty()) {
    std::memcpy(out.data() + hidden.offset, hidden_payload.data(), hidden_payload.size());
  }
  (void)w.Seal();
  return out;
}

// ---------------------------------------------------------------------------
// Reading

Result<RecordHeader> ParseRecordHeader(const void* data, size_t size) {
  if (data == nullptr && size > 0) return InvalidArgument("record data is null");
  const uint8_t* p = static_cast<const uint8_t*>(data);
  if (size < sizeof(kRecordMagic)) return Truncated(kRecordHeaderSize, size, "at least ");
  if (std::memcmp(p + hf::kMagic, kRecordMagic, sizeof(kRecordMagic)) != 0) {
    return InvalidArgument(
        "not a relaykv record: bad magic " +
        Quoted(std::string_view(reinterpret_cast<const char*>(p), sizeof(kRecordMagic))) +
        ", expected 'RLYKVREC'");
  }
  if (size < hf::kVersion + 4) return Truncated(kRecordHeaderSize, size, "at least ");
  // The version is read before the header checksum: a newer version may
  // checksum a different header, and deserves a message about versions.
  const uint32_t version = Load<uint32_t>(p + hf::kVersion);
  if (version > kRecordFormatVersion) {
    return InvalidArgument("record format version " + Str(version) +
                           " is newer than this reader supports (version " +
                           Str(kRecordFormatVersion) + "); upgrade relaykv on the reading side");
  }
  if (version != kRecordFormatVersion) {
    return InvalidArgument("record format version " + Str(version) +
                           " is not supported (this reader reads version " +
                           Str(kRecordFormatVersion) + ")");
  }
  if (size < kRecordHeaderSize) return Truncated(kRecordHeaderSize, size, "at least ");
  const uint64_t stored_sum = Load<uint64_t>(p + hf::kHeaderChecksum);
  const uint64_t computed_sum = Hash(p, hf::kHeaderChecksum);
  if (stored_sum != computed_sum) {
    return DataLoss("record header checksum mismatch (stored " + Hex(stored_sum) + ", computed " +
                    Hex(computed_sum) + ")");
  }

  // From here on the header is what its writer wrote; a bad field means a
  // writer that does not follow the format, not corruption in transit.
  RecordHeader h;
  h.version = version;
  h.header_checksum = stored_sum;
  const uint32_t header_size = Load<uint32_t>(p + hf::kHeaderSize);
  if (header_size != kRecordHeaderSize) {
    return InvalidArgument("record header_size is " + Str(header_size) + ", version " +
                           Str(version) + " headers are " + Str(kRecordHeaderSize) + " bytes");
  }
  h.flags = Load<uint64_t>(p + hf::kFlags);
  const uint64_t unknown = h.flags & kRecordRequiredFlagsMask & ~kRecordKnownRequiredFlags;
  if (unknown != 0) {
    return InvalidArgument("record requires features this reader does not know (flags " +
                           Hex(unknown) + ")");
  }
  if (!AllZero(p + hf::kReserved1, hf::kHeaderChecksum - hf::kReserved1)) {
    return InvalidArgument("record header has nonzero reserved bytes");
  }
  h.model_fingerprint = Load<uint64_t>(p + hf::kModelFingerprint);
  h.layout.num_layers = Load<int32_t>(p + hf::kNumLayers);
  h.layout.num_kv_heads = Load<int32_t>(p + hf::kNumKvHeads);
  h.layout.head_size = Load<int32_t>(p + hf::kHeadSize);
  h.layout.dtype = static_cast<DType>(p[hf::kDType]);
  h.rope.style = static_cast<RopeStyle>(p[hf::kRopeStyle]);
  h.rope.scaling = static_cast<RopeScaling>(p[hf::kRopeScaling]);
  h.rope.theta = Load<float>(p + hf::kRopeTheta);
  h.rope.rotary_dim = Load<int32_t>(p + hf::kRopeRotaryDim);
  h.rope.factor = Load<float>(p + hf::kRopeFactor);
  h.rope.low_freq_factor = Load<float>(p + hf::kRopeLowFreqFactor);
  h.rope.high_freq_factor = Load<float>(p + hf::kRopeHighFreqFactor);
  h.rope.original_max_position = Load<int32_t>(p + hf::kRopeOriginalMaxPosition);
  if ((h.rope.scaling == RopeScaling::kYarn) != ((h.flags & kRecordFlagRopeYarn) != 0)) {
    return InvalidArgument("record header: rope.scaling yarn and the YaRN flag disagree");
  }
  if (h.rope.scaling == RopeScaling::kYarn) {
    if (p[hf::kRopeYarnTruncate] > 1) {
      return InvalidArgument("record header rope.truncate must be 0 or 1");
    }
    h.rope.truncate = p[hf::kRopeYarnTruncate] == 1;
    h.rope.beta_fast = Load<float>(p + hf::kRopeBetaFast);
    h.rope.beta_slow = Load<float>(p + hf::kRopeBetaSlow);
    h.rope.attention_factor = Load<float>(p + hf::kRopeAttentionFactor);
  } else if (p[hf::kRopeYarnTruncate] != 0 ||
             !AllZero(p + hf::kRopeBetaFast, hf::kReserved1 - hf::kRopeBetaFast)) {
    return InvalidArgument("record header has YaRN fields set but rope.scaling is not yarn");
  }
  RELAYKV_RETURN_IF_ERROR(h.layout.Validate().WithContext("record header"));
  RELAYKV_RETURN_IF_ERROR(h.rope.Validate(h.layout.head_size).WithContext("record header"));

  const uint32_t num_tokens = Load<uint32_t>(p + hf::kNumTokens);
  const uint32_t tenant_size = Load<uint32_t>(p + hf::kTenantSize);
  const uint32_t num_hidden = Load<uint32_t>(p + hf::kNumHidden);
  const uint32_t hidden_size = Load<uint32_t>(p + hf::kHiddenSize);
  RELAYKV_RETURN_IF_ERROR(CheckNumTokens(num_tokens).WithContext("record header"));
  if (tenant_size > kRecordMaxTenantSize) {
    return InvalidArgument("record header: tenant_size " + Str(tenant_size) + " exceeds " +
                           Str(kRecordMaxTenantSize));
  }
  if (num_hidden > static_cast<uint32_t>(h.layout.num_layers) + 1) {
    return InvalidArgument("record header: " + Str(num_hidden) + " hidden checkpoints for " +
                           Str(h.layout.num_layers) + " layers");
  }
  if ((num_hidden == 0) != (hidden_size == 0) ||
      hidden_size > static_cast<uint32_t>(kRecordMaxHiddenSize)) {
    return InvalidArgument("record header: hidden_size " + Str(hidden_size) + " is invalid with " +
                           Str(num_hidden) + " hidden checkpoints");
  }
  h.num_tokens = static_cast<int32_t>(num_tokens);
  h.tenant_size = static_cast<int32_t>(tenant_size);
  h.num_hidden = static_cast<int32_t>(num_hidden);
  h.hidden_size = static_cast<int32_t>(hidden_size);

  // Version 1 places sections canonically, so the stored table must equal
  // the one the shape implies; this is what bounds every later read.
  Shape shape{h.layout, num_tokens, tenant_size, num_hidden, hidden_size};
  RELAYKV_ASSIGN_OR_RETURN(h.geometry, GeometryFor(shape));
  for (size_t i = 0; i < kNumRecordSections; ++i) {
    const RecordExtent stored{Load<uint64_t>(p + hf::kSections + 16 * i),
                              Load<uint64_t>(p + hf::kSections + 16 * i + 8)};
    const RecordExtent& expected = h.geometry.sections[i];
    if (stored != expected) {
      return InvalidArgument(
          "record header: " + std::string(RecordSectionName(static_cast<RecordSection>(i))) +
          " section is at [" + Str(stored.offset) + ", +" + Str(stored.size) + "), expected [" +
          Str(expected.offset) + ", +" + Str(expected.size) + ") for this shape");
    }
  }
  const uint64_t total = Load<uint64_t>(p + hf::kTotalSize);
  if (total != h.geometry.total_size) {
    return InvalidArgument("record header: total_size is " + Str(total) + ", expected " +
                           Str(h.geometry.total_size) + " for this shape");
  }
  h.meta_checksum = Load<uint64_t>(p + hf::kMetaChecksum);
  return h;
}

Result<RecordView> ParseRecord(const void* data, size_t size, ParseOptions options) {
  if (data != nullptr && reinterpret_cast<uintptr_t>(data) % kRecordBufferAlignment != 0) {
    return InvalidArgument("record buffer is not " + Str(kRecordBufferAlignment) + "-byte aligned");
  }
  RELAYKV_ASSIGN_OR_RETURN(RecordHeader h, ParseRecordHeader(data, size));
  const RecordGeometry& g = h.geometry;
  if (size < g.total_size) return Truncated(g.total_size, size);
  if (size > g.total_size) {
    return InvalidArgument("record buffer is " + Str(size) +
                           " bytes but the record's total_size is " + Str(g.total_size) + " (" +
                           Str(size - g.total_size) + " trailing bytes)");
  }
  // Every section now lies inside [0, size): the geometry ends at total_size.
  const uint8_t* p = static_cast<const uint8_t*>(data);
  const uint64_t meta_sum = MetaChecksum(p, g);
  if (meta_sum != h.meta_checksum) {
    return DataLoss(
        "record metadata checksum mismatch (tenant, hidden layer list, checksum "
        "table; stored " +
        Hex(h.meta_checksum) + ", computed " + Hex(meta_sum) + ")");
  }
  // Padding is covered by no data checksum, so an unchecked nonzero byte there
  // would be corruption that goes unnoticed.
  for (size_t i = 0; i < kNumRecordSections; ++i) {
    const uint64_t from = g.sections[i].end();
    const uint64_t to = i + 1 < kNumRecordSections ? g.sections[i + 1].offset : g.total_size;
    if (!AllZero(p + from, to - from)) {
      return DataLoss("nonzero padding after the " +
                      std::string(RecordSectionName(static_cast<RecordSection>(i))) +
                      " section (bytes [" + Str(from) + ", " + Str(to) + "))");
    }
  }

  RecordView v;
  v.data_ = p;
  v.size_ = size;
  v.header_ = h;
  v.meta_.model_fingerprint = h.model_fingerprint;
  v.meta_.layout = h.layout;
  v.meta_.rope = h.rope;
  const RecordExtent& tenant = g.section(RecordSection::kTenant);
  v.meta_.tenant.assign(reinterpret_cast<const char*>(p + tenant.offset), tenant.size);
  const RecordExtent& hl = g.section(RecordSection::kHiddenLayers);
  v.meta_.hidden_layers.resize(static_cast<size_t>(h.num_hidden));
  if (h.num_hidden > 0) std::memcpy(v.meta_.hidden_layers.data(), p + hl.offset, hl.size);
  v.meta_.hidden_size = h.hidden_size;
  RELAYKV_RETURN_IF_ERROR(v.meta_.Validate().WithContext("record metadata"));

  const uint64_t tokens_sum = TokensChecksum(p, g);
  const uint64_t stored_tokens_sum = v.StoredChecksum(TokensSlot());
  if (tokens_sum != stored_tokens_sum) {
    return DataLoss("tokens/positions checksum mismatch (stored " + Hex(stored_tokens_sum) +
                    ", computed " + Hex(tokens_sum) + ")");
  }
  const std::span<const int32_t> tokens = v.tokens();
  const std::span<const int32_t> positions = v.positions();
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0) {
      return InvalidArgument("record token " + Str(i) + " has negative id " +
                             std::to_string(tokens[i]));
    }
    if (positions[i] < 0) {
      return InvalidArgument("record token " + Str(i) + " has negative position " +
                             std::to_string(positions[i]));
    }
  }
  if (options.verify_payload_checksums) RELAYKV_RETURN_IF_ERROR(v.VerifyPayloadChecksums());
  return v;
}

uint64_t RecordView::StoredChecksum(int32_t slot) const {
  RELAYKV_CHECK(slot >= 0 && slot < header_.geometry.num_checksums());
  return Load<uint64_t>(data_ + header_.geometry.section(RecordSection::kChecksums).offset +
                        8 * static_cast<uint64_t>(slot));
}

std::span<const int32_t> RecordView::tokens() const {
  // ParseRecord checked the buffer's alignment; the section offset is 64-aligned.
  return {reinterpret_cast<const int32_t*>(data_ +
                                           header_.geometry.section(RecordSection::kTokens).offset),
          static_cast<size_t>(header_.num_tokens)};
}

std::span<const int32_t> RecordView::positions() const {
  return {reinterpret_cast<const int32_t*>(
              data_ + header_.geometry.section(RecordSection::kPositions).offset),
          static_cast<size_t>(header_.num_tokens)};
}

const uint8_t* RecordView::payload() const {
  return data_ + header_.geometry.section(RecordSection::kKv).offset;
}

const uint8_t* RecordView::K(int32_t layer) const {
  RELAYKV_CHECK(layer >= 0 && layer < header_.geometry.num_layers);
  return data_ + header_.geometry.KOffset(layer);
}

const uint8_t* RecordView::V(int32_t layer) const {
  RELAYKV_CHECK(layer >= 0 && layer < header_.geometry.num_layers);
  return data_ + header_.geometry.VOffset(layer);
}

const uint8_t* RecordView::hidden(int32_t index) const {
  RELAYKV_CHECK(index >= 0 && index < header_.geometry.num_hidden);
  return data_ + header_.geometry.HiddenOffset(index);
}

Status RecordView::VerifyLayerChecksums(int32_t layer) const {
  if (layer < 0 || layer >= header_.geometry.num_layers) {
    return InvalidArgument("layer " + std::to_string(layer) + " is outside [0, " +
                           std::to_string(header_.geometry.num_layers) + ")");
  }
  const int64_t n = header_.geometry.kv_side_bytes;
  const struct {
    const char* name;
    const uint8_t* bytes;
    int32_t slot;
  } sides[] = {{"K", K(layer), KSlot(layer)}, {"V", V(layer), VSlot(layer)}};
  for (const auto& side : sides) {
    const uint64_t computed = Hash(side.bytes, static_cast<uint64_t>(n));
    const uint64_t stored = StoredChecksum(side.slot);
    if (computed != stored) {
      return DataLoss("layer " + std::to_string(layer) + " " + side.name +
                      " checksum mismatch (stored " + Hex(stored) + ", computed " + Hex(computed) +
                      ")");
    }
  }
  return Status::Ok();
}

Status RecordView::VerifyHiddenChecksum(int32_t index) const {
  if (index < 0 || index >= header_.geometry.num_hidden) {
    return InvalidArgument("hidden checkpoint " + std::to_string(index) + " is outside [0, " +
                           std::to_string(header_.geometry.num_hidden) + ")");
  }
  const uint64_t computed =
      Hash(hidden(index), static_cast<uint64_t>(header_.geometry.hidden_checkpoint_bytes));
  const uint64_t stored = StoredChecksum(HiddenSlot(header_.geometry, index));
  if (computed != stored) {
    return DataLoss("hidden checkpoint " + std::to_string(index) + " (layer " +
                    std::to_string(meta_.hidden_layers[static_cast<size_t>(index)]) +
                    ") checksum mismatch (stored " + Hex(stored) + ", computed " + Hex(computed) +
                    ")");
  }
  return Status::Ok();
}

Status RecordView::VerifyPayloadChecksums() const {
  for (int32_t l = 0; l < header_.geometry.num_layers; ++l) {
    RELAYKV_RETURN_IF_ERROR(VerifyLayerChecksums(l));
  }
  for (int32_t i = 0; i < header_.geometry.num_hidden; ++i) {
    RELAYKV_RETURN_IF_ERROR(VerifyHiddenChecksum(i));
  }
  return Status::Ok();
}

// ---------------------------------------------------------------------------
// Compatibility

Status CheckCompatible(const RecordView& record, uint64_t model_fingerprint, const KvLayout& layout,
                       const RopeParams& rope, std::string_view tenant) {
  const RecordMeta& m = record.meta();
  // The tenant first: a record of another tenant is refused whatever else matches.
  if (m.tenant != tenant) {
    return PermissionDenied("record tenant mismatch: record " + Quoted(m.tenant) + ", expected " +
                            Quoted(tenant));
  }
  if (m.model_fingerprint != model_fingerprint) {
    return FailedPrecondition("record model_fingerprint mismatch: record " +
                              Hex(m.model_fingerprint) + ", expected " + Hex(model_fingerprint));
  }
  auto mismatch = [](std::string_view field, const std::string& got, const std::string& want) {
    return FailedPrecondition("record " + std::string(field) + " mismatch: record " + got +
                              ", expected " + want);
  };
  const KvLayout& rl = m.layout;
  if (rl.num_layers != layout.num_layers) {
    return mismatch("layout.num_layers", std::to_string(rl.num_layers),
                    std::to_string(layout.num_layers));
  }
  if (rl.num_kv_heads != layout.num_kv_heads) {
    return mismatch("layout.num_kv_heads", std::to_string(rl.num_kv_heads),
                    std::to_string(layout.num_kv_heads));
  }
  if (rl.head_size != layout.head_size) {
    return mismatch("layout.head_size", std::to_string(rl.head_size),
                    std::to_string(layout.head_size));
  }
  if (rl.dtype != layout.dtype) {
    return mismatch("layout.dtype", std::string(DTypeName(rl.dtype)),
                    std::string(DTypeName(layout.dtype)));
  }
  // Compared by effect: fields a scaling mode does not use are not compared,
  // and rotary_dim 0 means head_size.
  const RopeParams& rr = m.rope;
  if (rr.theta != rope.theta) {
    return mismatch("rope.theta", FloatStr(rr.theta), FloatStr(rope.theta));
  }
  const int32_t rd = rr.rotary_dim == 0 ? rl.head_size : rr.rotary_dim;
  const int32_t want_rd = rope.rotary_dim == 0 ? layout.head_size : rope.rotary_dim;
  if (rd != want_rd) {
    return mismatch("rope.rotary_dim", std::to_string(rd), std::to_string(want_rd));
  }
  if (rr.style != rope.style) {
    return mismatch("rope.style", std::string(RopeStyleName(rr.style)),
                    std::string(RopeStyleName(rope.style)));
  }
  if (rr.scaling != rope.scaling) {
    return mismatch("rope.scaling", std::string(RopeScalingName(rr.scaling)),
                    std::string(RopeScalingName(rope.scaling)));
  }
  if (rr.scaling != RopeScaling::kNone && rr.factor != rope.factor) {
    return mismatch("rope.factor", FloatStr(rr.factor), FloatStr(rope.factor));
  }
  if (rr.scaling == RopeScaling::kLlama3) {
    if (rr.low_freq_factor != rope.low_freq_factor) {
      return mismatch("rope.low_freq_factor", FloatStr(rr.low_freq_factor),
                      FloatStr(rope.low_freq_factor));
    }
    if (rr.high_freq_factor != rope.high_freq_factor) {
      return mismatch("rope.high_freq_factor", FloatStr(rr.high_freq_factor),
                      FloatStr(rope.high_freq_factor));
    }
  }
  if ((rr.scaling == RopeScaling::kLlama3 || rr.scaling == RopeScaling::kYarn) &&
      rr.original_max_position != rope.original_max_position) {
    return mismatch("rope.original_max_position", std::to_string(rr.original_max_position),
                    std::to_string(rope.original_max_position));
  }
  if (rr.scaling == RopeScaling::kYarn) {
    if (rr.beta_fast != rope.beta_fast) {
      return mismatch("rope.beta_fast", FloatStr(rr.beta_fast), FloatStr(rope.beta_fast));
    }
    if (rr.beta_slow != rope.beta_slow) {
      return mismatch("rope.beta_slow", FloatStr(rr.beta_slow), FloatStr(rope.beta_slow));
    }
    if (rr.attention_factor != rope.attention_factor) {
      return mismatch("rope.attention_factor", FloatStr(rr.attention_factor),
                      FloatStr(rope.attention_factor));
    }
    if (rr.truncate != rope.truncate) {
      return mismatch("rope.truncate", rr.truncate ? "true" : "false",
                      rope.truncate ? "true" : "false");
    }
  }
  return Status::Ok();
}

std::string RecordNamespaceKey(uint64_t model_fingerprint, uint64_t layout_fingerprint,
                               std::string_view tenant) {
  char buf[48];
  std::snprintf(buf, sizeof(buf), "kv1/%016llx/%016llx/",
                static_cast<unsigned long long>(model_fingerprint),
                static_cast<unsigned long long>(layout_fingerprint));
  std::string out(buf);
  out.append(tenant);
  return out;
}

std::string RecordNamespaceKey(const RecordMeta& meta) {
  return RecordNamespaceKey(meta.model_fingerprint, meta.layout.Fingerprint(), meta.tenant);
}

}  // namespace relaykv
