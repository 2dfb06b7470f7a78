// The record: what an export produces and an import consumes.
//
// A record is one self-describing, checksummed byte string. It is written once
// (by RecordWriter, straight into memory a store reserved), never modified after
// Seal(), and read in place by ParseRecord, which trusts nothing in it.
//
// Format version 1. All integers and floats are little-endian. Every section
// starts at a multiple of 64 bytes from the record start, in the order below;
// empty sections sit at the next aligned position with size 0. Bytes between
// sections and after the last one (up to total_size, itself a multiple of 64)
// are zero.
//
//   offset        size            contents
//   0             256             fixed header (field offsets in record_header::)
//   tenant        tenant_size     tenant namespace, raw bytes, <= 255
//   hidden_layers 4 * H           int32 checkpoint layer indices, strictly increasing
//   checksums     8 * (1+2L+H)    uint64 xxhash64, in the order
//                                   [tokens+positions][layer 0 K][layer 0 V]...[hidden 0]...
//   tokens        4 * n           int32 token ids (>= 0)
//   positions     4 * n           int32 positions the K was rotated at (>= 0)
//   kv            2 * L * n * R   [layer][K then V][token][kv_head][head_dim], R = heads*dim*dtype
//   hidden        H * n * S       [checkpoint][token][hidden_size], S = hidden_size*dtype
//
// Integrity is a chain: the header checksum (xxhash64 of header bytes [0, 248))
// covers the meta checksum, which covers everything from the tenant up to the
// tokens (including the checksum table), whose entries cover tokens+positions,
// each layer's K and V, and each hidden checkpoint. So 256 bytes are enough to
// trust the header (a remote reader can learn the record's shape before
// fetching the rest), and the header checksum identifies the whole content.
//
// Compatibility: a reader rejects versions it does not know. Flags bits 0-31
// are optional features (an unknown one is ignored); bits 32-63 are required
// features (an unknown one is rejected). Version 1 defines none of either.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "transfer/common/status.h"
#include "transfer/record/kv_layout.h"
#include "transfer/record/rope_params.h"

namespace relaykv {

inline constexpr uint32_t kRecordFormatVersion = 1;
inline constexpr size_t kRecordHeaderSize = 256;
inline constexpr size_t kRecordSectionAlignment = 64;
// tokens() and positions() are typed views into the buffer, and exporters
// write fp32 KV through the writer's pointers, so buffers must allow int32.
inline constexpr size_t kRecordBufferAlignment = 4;
inline constexpr size_t kRecordMaxTenantSize = 255;
inline constexpr int32_t kRecordMaxHiddenSize = 1 << 20;
inline constexpr char kRecordMagic[8] = {'R', 'L', 'Y', 'K', 'V', 'R', 'E', 'C'};
inline constexpr uint64_t kRecordRequiredFlagsMask = 0xffffffff00000000ULL;
// Required flags this reader knows. A reader from before YaRN refuses such a
// record by this bit, with a message that says why, not by its YaRN fields.
inline constexpr uint64_t kRecordFlagRopeYarn = 1ULL << 32;
inline constexpr uint64_t kRecordKnownRequiredFlags = kRecordFlagRopeYarn;

// Byte offsets of the fixed header's fields (format version 1).
namespace record_header {
inline constexpr size_t kMagic = 0;                     // char[8] "RLYKVREC"
inline constexpr size_t kVersion = 8;                   // uint32
inline constexpr size_t kHeaderSize = 12;               // uint32, 256
inline constexpr size_t kFlags = 16;                    // uint64
inline constexpr size_t kModelFingerprint = 24;         // uint64
inline constexpr size_t kNumLayers = 32;                // int32
inline constexpr size_t kNumKvHeads = 36;               // int32
inline constexpr size_t kHeadSize = 40;                 // int32
inline constexpr size_t kDType = 44;                    // uint8 (DType)
inline constexpr size_t kRopeStyle = 45;                // uint8 (RopeStyle)
inline constexpr size_t kRopeScaling = 46;              // uint8 (RopeScaling)
inline constexpr size_t kRopeYarnTruncate = 47;         // uint8, 0/1 (YaRN), else 0
inline constexpr size_t kRopeTheta = 48;                // float32
inline constexpr size_t kRopeRotaryDim = 52;            // int32
inline constexpr size_t kRopeFactor = 56;               // float32
inline constexpr size_t kRopeLowFreqFactor = 60;        // float32
inline constexpr size_t kRopeHighFreqFactor = 64;       // float32
inline constexpr size_t kRopeOriginalMaxPosition = 68;  // int32
inline constexpr size_t kNumTokens = 72;                // uint32, in [1, INT32_MAX]
inline constexpr size_t kTenantSize = 76;               // uint32, <= 255
inline constexpr size_t kNumHidden = 80;                // uint32, <= num_layers + 1
inline constexpr size_t kHiddenSize = 84;               // uint32, 0 iff no checkpoints
inline constexpr size_t kSections = 88;                 // 7 x {uint64 offset, uint64 size}
inline constexpr size_t kTotalSize = 200;               // uint64
inline constexpr size_t kMetaChecksum = 208;            // uint64
inline constexpr size_t kRopeBetaFast = 216;            // float32 (YaRN), else 0
inline constexpr size_t kRopeBetaSlow = 220;            // float32 (YaRN), else 0
inline constexpr size_t kRopeAttentionFactor = 224;     // float32 (YaRN), else 0
inline constexpr size_t kReserved1 = 228;               // 20 bytes, zero
inline constexpr size_t kHeaderChecksum = 248;          // uint64, xxhash64 of [0, 248)
}  // namespace record_header

// In file order; the index is the slot in the header's section table.
enum class RecordSection : uint8_t {
  kTenant = 0,
  kHiddenLayers,
  kChecksums,
  kTokens,
  kPositions,
  kKv,
  kHidden,
};
inline constexpr size_t kNumRecordSections = 7;
std::string_view RecordSectionName(RecordSection section);

struct RecordExtent {
  uint64_t offset = 0;
  uint64_t size = 0;
  uint64_t end() const { return offset + size; }
  bool operator==(const RecordExtent&) const = default;
};

// Everything about a record except its token count and contents.
struct RecordMeta {
  uint64_t model_fingerprint = 0;
  KvLayout layout;
  RopeParams rope;
  std::string tenant;  // namespace salt; at most kRecordMaxTenantSize bytes
  // Hidden-state checkpoints: index l is the residual stream entering layer l
  // (l == num_layers: the last layer's output). Strictly increasing, in
  // [0, num_layers]. Stored in the layout's dtype.
  std::vector<int32_t> hidden_layers;
  int32_t hidden_size = 0;  // 0 exactly when hidden_layers is empty

  Status Validate() const;
  bool operator==(const RecordMeta&) const = default;
};

// Where every byte of a record goes. Offsets are from the record start.
struct RecordGeometry {
  int32_t num_layers = 0;
  int32_t num_tokens = 0;
  int32_t num_hidden = 0;
  int64_t kv_token_stride = 0;          // bytes of one token's K (or V) in one layer
  int64_t kv_side_bytes = 0;            // bytes of one layer's K (= its V)
  int64_t kv_layer_stride = 0;          // bytes of one layer's K and V
  int64_t hidden_token_stride = 0;      // bytes of one token's hidden state
  int64_t hidden_checkpoint_bytes = 0;  // bytes of one checkpoint
  std::array<RecordExtent, kNumRecordSections> sections{};
  uint64_t total_size = 0;

  const RecordExtent& section(RecordSection s) const { return sections[static_cast<size_t>(s)]; }
  int32_t num_checksums() const { return 1 + 2 * num_layers + num_hidden; }
  uint64_t KOffset(int32_t layer) const {
    return section(RecordSection::kKv).offset + static_cast<uint64_t>(layer) * kv_layer_stride;
  }
  uint64_t VOffset(int32_t layer) const { return KOffset(layer) + kv_side_bytes; }
  uint64_t HiddenOffset(int32_t index) const {
    return section(RecordSection::kHidden).offset +
           static_cast<uint64_t>(index) * hidden_checkpoint_bytes;
  }
};

// Validates `meta` and lays out a record of `num_tokens` (>= 1) tokens.
// InvalidArgument when the meta is invalid or the record would not fit in 2^63 bytes.
Result<RecordGeometry> ComputeRecordGeometry(const RecordMeta& meta, int32_t num_tokens);
// Bytes a record of `num_tokens` tokens needs (what a store must reserve).
Result<size_t> RecordSize(const RecordMeta& meta, int32_t num_tokens);

// The namespace a record is stored and looked up under, shared by the store
// server and the directory: records cross only between equal model, layout
// and tenant. "kv1/<model fp hex>/<layout fp hex>/<tenant>".
std::string RecordNamespaceKey(uint64_t model_fingerprint, uint64_t layout_fingerprint,
                               std::string_view tenant);
// Of a parsed record's meta.
std::string RecordNamespaceKey(const RecordMeta& meta);

// Builds a record in place in caller memory (host memory, e.g. a store
// segment). Create writes header, tenant, hidden layer list, tokens and
// positions and zeroes the padding; the caller then fills the KV and hidden
// payloads through the pointers below and calls Seal(). The record occupies
// the first size() bytes of the buffer; nothing outside them is touched.
class RecordWriter {
 public:
  // `buffer` must be kRecordBufferAlignment-aligned (64-aligned gives aligned
  // payload rows) and hold at least RecordSize(meta, tokens.size()) bytes.
  static Result<RecordWriter> Create(const RecordMeta& meta, std::span<const int32_t> tokens,
                                     std::span<const int32_t> positions, void* buffer,
                                     size_t buffer_size);

  uint8_t* data() { return buf_; }
  size_t size() const { return static_cast<size_t>(geometry_.total_size); }
  const RecordGeometry& geometry() const { return geometry_; }

  // Start of the KV payload ([layer][K then V][token][kv_head][head_dim]).
  uint8_t* payload() { return buf_ + geometry_.section(RecordSection::kKv).offset; }
  uint8_t* K(int32_t layer);       // [token][kv_head][head_dim]
  uint8_t* V(int32_t layer);       // [token][kv_head][head_dim]
  uint8_t* hidden(int32_t index);  // [token][hidden_size]; index into meta.hidden_layers

  // Computes every checksum and returns the header checksum, which identifies
  // the record's content. Sealing again after changing the payload is allowed.
  uint64_t Seal();

 private:
  RecordWriter(uint8_t* buf, const RecordGeometry& geometry) : buf_(buf), geometry_(geometry) {}

  uint8_t* buf_;
  RecordGeometry geometry_;
};

// Builds a sealed record in a vector. `kv_payload` is the whole KV payload in
// record order; `hidden_payload` is [checkpoint][token][hidden_size]. Both
// must have exactly the sizes the geometry gives.
Result<std::vector<uint8_t>> BuildRecord(const RecordMeta& meta, std::span<const int32_t> tokens,
                                         std::span<const int32_t> positions,
                                         std::span<const uint8_t> kv_payload,
                                         std::span<const uint8_t> hidden_payload = {});

// The decoded, validated fixed header.
struct RecordHeader {
  uint32_t version = 0;
  uint64_t flags = 0;
  uint64_t model_fingerprint = 0;
  KvLayout layout;
  RopeParams rope;
  int32_t num_tokens = 0;
  int32_t tenant_size = 0;
  int32_t num_hidden = 0;
  int32_t hidden_size = 0;
  RecordGeometry geometry;  // its sections and total_size are the stored ones
  uint64_t meta_checksum = 0;
  uint64_t header_checksum = 0;
};

// Reads and validates only the fixed header: needs kRecordHeaderSize bytes,
// not the whole record. Errors as ParseRecord's.
Result<RecordHeader> ParseRecordHeader(const void* data, size_t size);

struct ParseOptions {
  // KV and hidden payload checksums. The header, metadata, tokens and
  // positions are always verified; skipping the payload is for callers that
  // verify later (RecordView::VerifyPayloadChecksums) or layer by layer.
  bool verify_payload_checksums = true;
};

// A validated record in someone else's memory. Cheap to copy; valid as long
// as that memory is. Pointers are into the record.
class RecordView {
 public:
  const RecordHeader& header() const { return header_; }
  const RecordMeta& meta() const { return meta_; }
  const RecordGeometry& geometry() const { return header_.geometry; }
  int32_t num_tokens() const { return header_.num_tokens; }
  int32_t num_hidden() const { return header_.num_hidden; }
  // The header checksum: equal records have equal checksums.
  uint64_t checksum() const { return header_.header_checksum; }
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

  std::span<const int32_t> tokens() const;
  std::span<const int32_t> positions() const;
  const uint8_t* payload() const;
  const uint8_t* K(int32_t layer) const;       // [token][kv_head][head_dim]
  const uint8_t* V(int32_t layer) const;       // [token][kv_head][head_dim]
  const uint8_t* hidden(int32_t index) const;  // [token][hidden_size]
  int64_t kv_token_stride() const { return header_.geometry.kv_token_stride; }
  int64_t kv_layer_stride() const { return header_.geometry.kv_layer_stride; }
  int64_t hidden_token_stride() const { return header_.geometry.hidden_token_stride; }

  // DataLoss naming the first section whose checksum does not match.
  Status VerifyLayerChecksums(int32_t layer) const;
  Status VerifyHiddenChecksum(int32_t index) const;
  Status VerifyPayloadChecksums() const;

 private:
  friend Result<RecordView> ParseRecord(const void* data, size_t size, ParseOptions options);
  RecordView() = default;
  uint64_t StoredChecksum(int32_t slot) const;

  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  RecordHeader header_;
  RecordMeta meta_;
};

// Validates a whole record of exactly `size` bytes (trailing bytes are an
// error: a record's size is part of what it says about itself). Every offset
// and length is checked against `size` before memory is read. Errors:
// DataLoss for truncated or corrupted bytes (checksum mismatch, nonzero
// padding), InvalidArgument for something that is not a record this reader
// accepts (bad magic, unknown version, invalid fields behind a valid
// checksum, trailing bytes, misaligned buffer).
Result<RecordView> ParseRecord(const void* data, size_t size, ParseOptions options = {});

// Whether `record` may be imported by a caller with this model, layout, RoPE
// and tenant: PermissionDenied on a tenant mismatch, FailedPrecondition naming
// the first other mismatching field with both values.
Status CheckCompatible(const RecordView& record, uint64_t model_fingerprint, const KvLayout& layout,
                       const RopeParams& rope, std::string_view tenant);

}  // namespace relaykv
