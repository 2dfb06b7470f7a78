#include "transfer/record/record.h"

#include <gtest/gtest.h>
#include <xxhash.h>

#include <cstring>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "transfer/common/dtype.h"

namespace relaykv {
namespace {

namespace hf = record_header;

// Small integers survive every dtype exactly, so expected values are exact.
float KvValue(int32_t layer, int32_t kv, int32_t token, int32_t head, int32_t dim) {
  return static_cast<float>((layer * 7 + kv * 3 + token * 5 + head * 11 + dim) % 61 - 30);
}
float HiddenValue(int32_t index, int32_t token, int32_t i) {
  return static_cast<float>((index * 13 + token * 3 + i) % 57 - 28);
}

RecordMeta MakeMeta(DType dtype, bool with_hidden) {
  RecordMeta m;
  m.model_fingerprint = 0x0123456789abcdefULL;
  m.layout = KvLayout{3, 2, 4, dtype};
  m.rope.theta = 10000.f;
  m.tenant = "team-a";
  if (with_hidden) {
    m.hidden_layers = {0, 2};
    m.hidden_size = 6;
  }
  return m;
}

struct Contents {
  std::vector<int32_t> tokens;
  std::vector<int32_t> positions;
  std::vector<uint8_t> kv;      // record order
  std::vector<uint8_t> hidden;  // [checkpoint][token][hidden_size]
};

Contents MakeContents(const RecordMeta& m, int32_t n) {
  Contents c;
  for (int32_t t = 0; t < n; ++t) {
    c.tokens.push_back(1000 + 17 * t);
    c.positions.push_back(40 + t);
  }
  const KvLayout& l = m.layout;
  const int64_t ds = DTypeSize(l.dtype);
  c.kv.resize(
      static_cast<size_t>(int64_t{l.num_layers} * 2 * n * l.num_kv_heads * l.head_size * ds));
  size_t at = 0;
  for (int32_t layer = 0; layer < l.num_layers; ++layer) {
    for (int32_t kv = 0; kv < 2; ++kv) {
      for (int32_t t = 0; t < n; ++t) {
        for (int32_t h = 0; h < l.num_kv_heads; ++h) {
          for (int32_t d = 0; d < l.head_size; ++d) {
            StoreFromFloat(c.kv.data() + at, l.dtype, KvValue(layer, kv, t, h, d));
            at += static_cast<size_t>(ds);
          }
        }
      }
    }
  }
  c.hidden.resize(m.hidden_layers.size() * static_cast<size_t>(n) * m.hidden_size * ds);
  at = 0;
  for (int32_t i = 0; i < static_cast<int32_t>(m.hidden_layers.size()); ++i) {
    for (int32_t t = 0; t < n; ++t) {
      for (int32_t j = 0; j < m.hidden_size; ++j) {
        StoreFromFloat(c.hidden.data() + at, l.dtype, HiddenValue(i, t, j));
        at += static_cast<size_t>(ds);
      }
    }
  }
  return c;
}

std::vector<uint8_t> Build(const RecordMeta& m, const Contents& c) {
  auto r = BuildRecord(m, c.tokens, c.positions, c.kv, c.hidden);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return r.ok() ? *r : std::vector<uint8_t>{};
}

template <typename T>
T Get(const std::vector<uint8_t>& b, size_t off) {
  T v;
  std::memcpy(&v, b.data() + off, sizeof(T));
  return v;
}
template <typename T>
void Put(std::vector<uint8_t>& b, size_t off, T v) {
  std::memcpy(b.data() + off, &v, sizeof(T));
}

// Recomputes the checksums a crafted edit invalidated, so the parser gets past
// them and the field validation behind them is what is tested.
void ResealHeader(std::vector<uint8_t>& b) {
  Put<uint64_t>(b, hf::kHeaderChecksum, XXH64(b.data(), hf::kHeaderChecksum, 0));
}
void ResealMeta(std::vector<uint8_t>& b) {
  const uint64_t begin = Get<uint64_t>(b, hf::kSections + 16 * 0);  // tenant offset
  const uint64_t end = Get<uint64_t>(b, hf::kSections + 16 * 3);    // tokens offset
  Put<uint64_t>(b, hf::kMetaChecksum, XXH64(b.data() + begin, end - begin, 0));
  ResealHeader(b);
}

std::string Msg(const Status& s) { return std::string(s.message()); }

#define EXPECT_STATUS(expr, code_, substr)                            \
  do {                                                                \
    const ::relaykv::Status st_ = (expr);                             \
    EXPECT_EQ(st_.code(), (code_)) << st_.ToString();                 \
    EXPECT_NE(Msg(st_).find(substr), std::string::npos)               \
        << "message '" << Msg(st_) << "' lacks '" << (substr) << "'"; \
  } while (0)

class RecordRoundTrip : public ::testing::TestWithParam<std::tuple<DType, bool>> {};

TEST_P(RecordRoundTrip, ParsesBackWhatWasBuilt) {
  const auto [dtype, with_hidden] = GetParam();
  const RecordMeta m = MakeMeta(dtype, with_hidden);
  const int32_t n = 5;
  const Contents c = MakeContents(m, n);
  const std::vector<uint8_t> bytes = Build(m, c);
  ASSERT_EQ(bytes.size(), *RecordSize(m, n));
  EXPECT_EQ(bytes.size() % kRecordSectionAlignment, 0u);

  auto parsed = ParseRecord(bytes.data(), bytes.size());
  ASSERT_TRUE(parsed.ok()) << parsed.status().ToString();
  const RecordView& v = *parsed;
  EXPECT_EQ(v.meta(), m);
  EXPECT_EQ(v.num_tokens(), n);
  EXPECT_EQ(v.num_hidden(), with_hidden ? 2 : 0);
  EXPECT_EQ(v.size(), bytes.size());
  EXPECT_EQ(v.checksum(), Get<uint64_t>(bytes, hf::kHeaderChecksum));
  EXPECT_EQ(std::vector<int32_t>(v.tokens().begin(), v.tokens().end()), c.tokens);
  EXPECT_EQ(std::vector<int32_t>(v.positions().begin(), v.positions().end()), c.positions);

  const int64_t ds = DTypeSize(dtype);
  EXPECT_EQ(v.kv_token_stride(), 2 * 4 * ds);
  EXPECT_EQ(v.kv_layer_stride(), 2 * n * 2 * 4 * ds);
  EXPECT_EQ(v.payload(), bytes.data() + v.geometry().section(RecordSection::kKv).offset);
  EXPECT_EQ(std::memcmp(v.payload(), c.kv.data(), c.kv.size()), 0);
  for (size_t s = 0; s < kNumRecordSections; ++s) {
    EXPECT_EQ(v.geometry().sections[s].offset % kRecordSectionAlignment, 0u) << s;
  }
  // Element addressing through the accessors, against the value formula.
  for (int32_t layer = 0; layer < 3; ++layer) {
    EXPECT_EQ(v.V(layer), v.K(layer) + v.kv_layer_stride() / 2);
    for (int32_t t = 0; t < n; ++t) {
      for (int32_t h = 0; h < 2; ++h) {
        for (int32_t d = 0; d < 4; ++d) {
          const int64_t off = t * v.kv_token_stride() + (h * 4 + d) * ds;
          ASSERT_EQ(LoadAsFloat(v.K(layer) + off, dtype), KvValue(layer, 0, t, h, d));
          ASSERT_EQ(LoadAsFloat(v.V(layer) + off, dtype), KvValue(layer, 1, t, h, d));
        }
      }
    }
  }
  if (with_hidden) {
    EXPECT_EQ(v.hidden_token_stride(), 6 * ds);
    for (int32_t i = 0; i < 2; ++i) {
      for (int32_t t = 0; t < n; ++t) {
        for (int32_t j = 0; j < 6; ++j) {
          ASSERT_EQ(LoadAsFloat(v.hidden(i) + t * v.hidden_token_stride() + j * ds, dtype),
                    HiddenValue(i, t, j));
        }
      }
    }
  } else {
    EXPECT_EQ(v.geometry().section(RecordSection::kHidden).size, 0u);
  }
  EXPECT_TRUE(v.VerifyPayloadChecksums().ok());
}

INSTANTIATE_TEST_SUITE_P(AllDTypes, RecordRoundTrip,
                         ::testing::Combine(::testing::Values(DType::kFloat32, DType::kFloat16,
                                                              DType::kBFloat16),
                                            ::testing::Bool()),
                         [](const auto& info) {
                           return std::string(DTypeName(std::get<0>(info.param))) +
                                  (std::get<1>(info.param) ? "_hidden" : "_plain");
                         });

TEST(RecordFormatTest, HeaderFieldsSitWhereTheFormatSays) {
  RecordMeta m = MakeMeta(DType::kBFloat16, true);
  m.rope.style = RopeStyle::kInterleaved;
  m.rope.scaling = RopeScaling::kLinear;
  m.rope.factor = 2.f;
  m.rope.rotary_dim = 2;
  const Contents c = MakeContents(m, 3);
  const std::vector<uint8_t> b = Build(m, c);
  EXPECT_EQ(std::memcmp(b.data(), "RLYKVREC", 8), 0);
  EXPECT_EQ(Get<uint32_t>(b, hf::kVersion), 1u);
  EXPECT_EQ(Get<uint32_t>(b, hf::kHeaderSize), 256u);
  EXPECT_EQ(Get<uint64_t>(b, hf::kFlags), 0u);
  EXPECT_EQ(Get<uint64_t>(b, hf::kModelFingerprint), 0x0123456789abcdefULL);
  EXPECT_EQ(Get<int32_t>(b, hf::kNumLayers), 3);
  EXPECT_EQ(Get<int32_t>(b, hf::kNumKvHeads), 2);
  EXPECT_EQ(Get<int32_t>(b, hf::kHeadSize), 4);
  EXPECT_EQ(b[hf::kDType], 2);
  EXPECT_EQ(b[hf::kRopeStyle], 1);
  EXPECT_EQ(b[hf::kRopeScaling], 1);
  EXPECT_EQ(Get<float>(b, hf::kRopeTheta), 10000.f);
  EXPECT_EQ(Get<int32_t>(b, hf::kRopeRotaryDim), 2);
  EXPECT_EQ(Get<float>(b, hf::kRopeFactor), 2.f);
  EXPECT_EQ(Get<uint32_t>(b, hf::kNumTokens), 3u);
  EXPECT_EQ(Get<uint32_t>(b, hf::kTenantSize), 6u);
  EXPECT_EQ(Get<uint32_t>(b, hf::kNumHidden), 2u);
  EXPECT_EQ(Get<uint32_t>(b, hf::kHiddenSize), 6u);
  // Canonical placement: 64-aligned sections in file order.
  const uint64_t expected[kNumRecordSections][2] = {
      {256, 6},                  // tenant
      {320, 8},                  // hidden layer list
      {384, 8 * (1 + 6 + 2)},    // checksum table
      {512, 12},                 // tokens
      {576, 12},                 // positions
      {640, 3 * 2 * 3 * 8 * 2},  // kv: layers x K,V x tokens x (heads*dim) x bf16
      {960, 2 * 3 * 6 * 2},      // hidden (kv ends at 928, aligned up)
  };
  for (size_t s = 0; s < kNumRecordSections; ++s) {
    EXPECT_EQ(Get<uint64_t>(b, hf::kSections + 16 * s), expected[s][0]) << s;
    EXPECT_EQ(Get<uint64_t>(b, hf::kSections + 16 * s + 8), expected[s][1]) << s;
  }
  EXPECT_EQ(Get<uint64_t>(b, hf::kTotalSize), 1088u);  // 960 + 72, aligned up
  EXPECT_EQ(b.size(), 1088u);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(b.data() + 256), 6), "team-a");
  EXPECT_EQ(Get<int32_t>(b, 320), 0);
  EXPECT_EQ(Get<int32_t>(b, 324), 2);
  EXPECT_EQ(Get<int32_t>(b, 512), 1000);
  EXPECT_EQ(Get<int32_t>(b, 576), 40);
  EXPECT_EQ(Get<uint64_t>(b, hf::kHeaderChecksum), XXH64(b.data(), 248, 0));
  // The checksum table's first entry chains positions onto tokens.
  EXPECT_EQ(Get<uint64_t>(b, 384), XXH64(b.data() + 576, 12, XXH64(b.data() + 512, 12, 0)));
  EXPECT_EQ(Get<uint64_t>(b, 384 + 8), XXH64(b.data() + 640, 48, 0));   // layer 0 K
  EXPECT_EQ(Get<uint64_t>(b, 384 + 16), XXH64(b.data() + 688, 48, 0));  // layer 0 V
  EXPECT_EQ(Get<uint64_t>(b, hf::kMetaChecksum), XXH64(b.data() + 256, 512 - 256, 0));
  // A changed format must change this test on purpose.
  EXPECT_EQ(Get<uint64_t>(b, hf::kHeaderChecksum), 0xe4641d9f25587a17ULL)
      << std::hex << Get<uint64_t>(b, hf::kHeaderChecksum);
}

TEST(RecordFormatTest, YarnFieldsRoundTripWhereTheFormatSays) {
  RecordMeta m = MakeMeta(DType::kFloat32, false);
  m.rope.scaling = RopeScaling::kYarn;
  m.rope.factor = 4.f;
  m.rope.original_max_position = 256;
  m.rope.beta_fast = 16.f;
  m.rope.beta_slow = 2.f;
  m.rope.attention_factor = 1.25f;
  m.rope.truncate = false;
  const std::vector<uint8_t> b = Build(m, MakeContents(m, 2));
  EXPECT_EQ(b[hf::kRopeScaling], 3);
  EXPECT_EQ(Get<uint64_t>(b, hf::kFlags), kRecordFlagRopeYarn);
  EXPECT_EQ(b[hf::kRopeYarnTruncate], 0);
  EXPECT_EQ(Get<float>(b, hf::kRopeBetaFast), 16.f);
  EXPECT_EQ(Get<float>(b, hf::kRopeBetaSlow), 2.f);
  EXPECT_EQ(Get<float>(b, hf::kRopeAttentionFactor), 1.25f);
  auto v = ParseRecord(b.data(), b.size());
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_EQ(v->meta().rope, m.rope);
  m.rope.truncate = true;
  const std::vector<uint8_t> t = Build(m, MakeContents(m, 2));
  EXPECT_EQ(t[hf::kRopeYarnTruncate], 1);
  auto vt = ParseRecord(t.data(), t.size());
  ASSERT_TRUE(vt.ok()) << vt.status().ToString();
  EXPECT_EQ(vt->meta().rope, m.rope);
}

TEST(RecordFormatTest, HeaderAloneIsEnoughToLearnTheShape) {
  const RecordMeta m = MakeMeta(DType::kFloat16, true);
  const Contents c = MakeContents(m, 4);
  const std::vector<uint8_t> b = Build(m, c);
  auto h = ParseRecordHeader(b.data(), kRecordHeaderSize);
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  EXPECT_EQ(h->geometry.total_size, b.size());
  EXPECT_EQ(h->num_tokens, 4);
  EXPECT_EQ(h->tenant_size, 6);
  EXPECT_EQ(h->layout, m.layout);
  EXPECT_EQ(h->rope, m.rope);
  EXPECT_EQ(h->geometry.VOffset(1) - h->geometry.KOffset(1), 4u * 2 * 4 * 2);
}

// Flips every byte of a small record in turn; each flip must be caught, and
// the message must name the part that was hit.
TEST(RecordCorruptionTest, EverySingleByteFlipIsDetected) {
  const RecordMeta m = MakeMeta(DType::kFloat16, true);
  const int32_t n = 3;
  const Contents c = MakeContents(m, n);
  const std::vector<uint8_t> good = Build(m, c);
  auto view = ParseRecord(good.data(), good.size());
  ASSERT_TRUE(view.ok());
  const RecordGeometry g = view->geometry();
  const RecordExtent tokens = g.section(RecordSection::kTokens);
  const RecordExtent positions = g.section(RecordSection::kPositions);
  auto in = [](const RecordExtent& e, uint64_t off) { return off >= e.offset && off < e.end(); };

  int checked = 0;
  for (size_t off = 0; off < good.size(); ++off) {
    std::vector<uint8_t> bad = good;
    bad[off] ^= 0x5a;
    const Status s = ParseRecord(bad.data(), bad.size()).status();
    SCOPED_TRACE("offset " + std::to_string(off) + ": " + s.ToString());
    ASSERT_FALSE(s.ok());
    if (off < 8) {
      EXPECT_STATUS(s, StatusCode::kInvalidArgument, "bad magic");
    } else if (off < 12) {
      EXPECT_STATUS(s, StatusCode::kInvalidArgument, "record format version");
    } else if (off < kRecordHeaderSize) {
      EXPECT_STATUS(s, StatusCode::kDataLoss, "record header checksum mismatch");
    } else if (off < tokens.offset) {
      EXPECT_STATUS(s, StatusCode::kDataLoss, "record metadata checksum mismatch");
    } else if (in(tokens, off) || in(positions, off)) {
      EXPECT_STATUS(s, StatusCode::kDataLoss, "tokens/positions checksum mismatch");
    } else if (in(g.section(RecordSection::kKv), off)) {
      const uint64_t rel = off - g.section(RecordSection::kKv).offset;
      const int64_t layer = static_cast<int64_t>(rel) / g.kv_layer_stride;
      const bool is_v = static_cast<int64_t>(rel) % g.kv_layer_stride >= g.kv_side_bytes;
      EXPECT_STATUS(s, StatusCode::kDataLoss,
                    "layer " + std::to_string(layer) + (is_v ? " V" : " K") + " checksum mismatch");
    } else if (in(g.section(RecordSection::kHidden), off)) {
      const uint64_t rel = off - g.section(RecordSection::kHidden).offset;
      const int64_t index = static_cast<int64_t>(rel) / g.hidden_checkpoint_bytes;
      EXPECT_STATUS(s, StatusCode::kDataLoss,
                    "hidden checkpoint " + std::to_string(index) + " (layer " +
                        std::to_string(m.hidden_layers[index]) + ") checksum mismatch");
    } else {
      EXPECT_STATUS(s, StatusCode::kDataLoss, "nonzero padding");
    }
    ++checked;
  }
  EXPECT_EQ(checked, static_cast<int>(good.size()));
}

TEST(RecordCorruptionTest, PayloadCheckCanBeDeferred) {
  const RecordMeta m = MakeMeta(DType::kFloat32, true);
  const Contents c = MakeContents(m, 4);
  std::vector<uint8_t> b = Build(m, c);
  const RecordGeometry g = ParseRecord(b.data(), b.size())->geometry();
  b[g.VOffset(1) + 5] ^= 1;
  b[g.HiddenOffset(1) + 3] ^= 1;
  EXPECT_STATUS(ParseRecord(b.data(), b.size()).status(), StatusCode::kDataLoss,
                "layer 1 V checksum mismatch");
  auto v = ParseRecord(b.data(), b.size(), ParseOptions{.verify_payload_checksums = false});
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_TRUE(v->VerifyLayerChecksums(0).ok());
  EXPECT_STATUS(v->VerifyLayerChecksums(1), StatusCode::kDataLoss, "layer 1 V checksum mismatch");
  EXPECT_TRUE(v->VerifyLayerChecksums(2).ok());
  EXPECT_STATUS(v->VerifyLayerChecksums(3), StatusCode::kInvalidArgument, "outside [0, 3)");
  EXPECT_TRUE(v->VerifyHiddenChecksum(0).ok());
  EXPECT_STATUS(v->VerifyHiddenChecksum(1), StatusCode::kDataLoss,
                "hidden checkpoint 1 (layer 2) checksum mismatch");
  EXPECT_STATUS(v->VerifyPayloadChecksums(), StatusCode::kDataLoss, "layer 1 V");
  // Tokens are always verified: the span index matches on them.
  b[g.section(RecordSection::kTokens).offset] ^= 1;
  EXPECT_STATUS(
      ParseRecord(b.data(), b.size(), ParseOptions{.verify_payload_checksums = false}).status(),
      StatusCode::kDataLoss, "tokens/positions checksum mismatch");
}

TEST(RecordCorruptionTest, EveryTruncationIsRejected) {
  const RecordMeta m = MakeMeta(DType::kBFloat16, true);
  const Contents c = MakeContents(m, 3);
  const std::vector<uint8_t> b = Build(m, c);
  for (size_t len = 0; len < b.size(); ++len) {
    // A fresh allocation of exactly `len` bytes so ASan sees any over-read.
    std::vector<uint8_t> cut(b.begin(), b.begin() + static_cast<std::ptrdiff_t>(len));
    const Status s = ParseRecord(len ? cut.data() : nullptr, len).status();
    SCOPED_TRACE("length " + std::to_string(len));
    if (len < kRecordHeaderSize) {
      EXPECT_STATUS(s, StatusCode::kDataLoss,
                    "record truncated: needs at least 256 bytes, got " + std::to_string(len));
    } else {
      EXPECT_STATUS(s, StatusCode::kDataLoss,
                    "record truncated: needs " + std::to_string(b.size()) + " bytes, got " +
                        std::to_string(len));
    }
  }
}

TEST(RecordCorruptionTest, TrailingBytesAreRejected) {
  const RecordMeta m = MakeMeta(DType::kFloat16, false);
  const Contents c = MakeContents(m, 2);
  std::vector<uint8_t> b = Build(m, c);
  const size_t total = b.size();
  b.resize(total + 1);
  EXPECT_STATUS(ParseRecord(b.data(), b.size()).status(), StatusCode::kInvalidArgument,
                "record buffer is " + std::to_string(total + 1) +
                    " bytes but the record's total_size is " + std::to_string(total) +
                    " (1 trailing bytes)");
  b.resize(total + 4096);
  EXPECT_STATUS(ParseRecord(b.data(), b.size()).status(), StatusCode::kInvalidArgument,
                "4096 trailing bytes");
  EXPECT_TRUE(ParseRecord(b.data(), total).ok());
}

TEST(RecordCorruptionTest, NewerVersionNamesBothVersions) {
  const RecordMeta m = MakeMeta(DType::kFloat16, false);
  std::vector<uint8_t> b = Build(m, MakeContents(m, 2));
  Put<uint32_t>(b, hf::kVersion, 2);
  ResealHeader(b);
  EXPECT_STATUS(ParseRecord(b.data(), b.size()).status(), StatusCode::kInvalidArgument,
                "record format version 2 is newer than this reader supports (version 1)");
  // Even when the header is too short for this reader, the version is named.
  EXPECT_STATUS(ParseRecord(b.data(), 16).status(), StatusCode::kInvalidArgument,
                "record format version 2 is newer");
  Put<uint32_t>(b, hf::kVersion, 0);
  ResealHeader(b);
  EXPECT_STATUS(ParseRecord(b.data(), b.size()).status(), StatusCode::kInvalidArgument,
                "record format version 0 is not supported (this reader reads version 1)");
}

// Records whose checksums are right but whose fields are not: what a buggy or
// hostile writer produces. The parser must refuse them on the field.
class CraftedRecordTest : public ::testing::Test {
 protected:
  void SetUp() override {
    meta_ = MakeMeta(DType::kFloat16, true);
    bytes_ = Build(meta_, MakeContents(meta_, 3));
    ASSERT_TRUE(ParseRecord(bytes_.data(), bytes_.size()).ok());
  }
  Status Parse() { return ParseRecord(bytes_.data(), bytes_.size()).status(); }

  RecordMeta meta_;
  std::vector<uint8_t> bytes_;
};

TEST_F(CraftedRecordTest, InvalidLayout) {
  Put<int32_t>(bytes_, hf::kNumLayers, 0);
  ResealHeader(bytes_);
  EXPECT_STATUS(Parse(), StatusCode::kInvalidArgument, "record header: layout.num_layers");
}

TEST_F(CraftedRecordTest, InvalidDType) {
  bytes_[hf::kDType] = 9;
  ResealHeader(bytes_);
  EXPECT_STATUS(Parse(), StatusCode::kInvalidArgument, "layout.dtype has unknown code 9");
}

TEST_F(CraftedRecordTest, InvalidRope) {
  Put<float>(bytes_, hf::kRopeTheta, 0.5f);
  ResealHeader(bytes_);
  EXPECT_STATUS(Parse(), StatusCode::kInvalidArgument, "record header: rope.theta");
}

TEST_F(CraftedRecordTest, HeaderSize) {
  Put<uint32_t>(bytes_, hf::kHeaderSize, 512);
  ResealHeader(bytes_);
  EXPECT_STATUS(Parse(), StatusCode::kInvalidArgument, "header_size is 512");
}

TEST_F(CraftedRecordTest, RequiredFlagsAreRefusedOptionalOnesIgnored) {
  Put<uint64_t>(bytes_, hf::kFlags, uint64_t{1} << 40);
  ResealHeader(bytes_);
  EXPECT_STATUS(Parse(), StatusCode::kInvalidArgument, "flags 0x0000010000000000");
  Put<uint64_t>(bytes_, hf::kFlags, 1);
  ResealHeader(bytes_);
  EXPECT_TRUE(Parse().ok());
}

TEST_F(CraftedRecordTest, ReservedBytes) {
  bytes_[hf::kReserved1 + 3] = 1;
  ResealHeader(bytes_);
  EXPECT_STATUS(Parse(), StatusCode::kInvalidArgument, "reserved");
}

// The YaRN fields were reserved bytes before; a record that is not YaRN must
// still have them zero, so a reader never silently ignores a set field.
TEST_F(CraftedRecordTest, YarnFieldsOnARecordThatIsNotYarn) {
  bytes_[hf::kRopeYarnTruncate] = 1;
  ResealHeader(bytes_);
  EXPECT_STATUS(Parse(), StatusCode::kInvalidArgument, "YaRN fields set");
  bytes_[hf::kRopeYarnTruncate] = 0;
  Put<float>(bytes_, hf::kRopeAttentionFactor, 1.5f);
  ResealHeader(bytes_);
  EXPECT_STATUS(Parse(), StatusCode::kInvalidArgument, "YaRN fields set");
}

TEST_F(CraftedRecordTest, YarnNeedsItsFlagAndABooleanTruncate) {
  bytes_[hf::kRopeScaling] = 3;
  Put<float>(bytes_, hf::kRopeFactor, 4.f);
  Put<float>(bytes_, hf::kRopeBetaFast, 32.f);
  Put<float>(bytes_, hf::kRopeBetaSlow, 1.f);
  Put<float>(bytes_, hf::kRopeAttentionFactor, 1.f);
  bytes_[hf::kRopeYarnTruncate] = 1;
  ResealHeader(bytes_);
  // YaRN without its required flag: a reader that did not know YaRN would
  // have taken it for another scaling.
  EXPECT_STATUS(Parse(), StatusCode::kInvalidArgument, "YaRN flag disagree");
  Put<uint64_t>(bytes_, hf::kFlags, kRecordFlagRopeYarn);
  ResealHeader(bytes_);
  EXPECT_TRUE(Parse().ok()) << Parse().ToString();
  bytes_[hf::kRopeYarnTruncate] = 2;
  ResealHeader(bytes_);
  EXPECT_STATUS(Parse(), StatusCode::kInvalidArgument, "rope.truncate must be 0 or 1");
  bytes_[hf::kRopeYarnTruncate] = 1;
  Put<float>(bytes_, hf::kRopeBetaSlow, 0.f);
  ResealHeader(bytes_);
  EXPECT_STATUS(Parse(), StatusCode::kInvalidArgument, "record header: yarn rope scaling");
}

TEST_F(CraftedRecordTest, ZeroTokens) {
  Put<uint32_t>(bytes_, hf::kNumTokens, 0);
  ResealHeader(bytes_);
  EXPECT_STATUS(Parse(), StatusCode::kInvalidArgument, "at least one token");
}

TEST_F(CraftedRecordTest, HugeTokenCount) {
  Put<uint32_t>(bytes_, hf::kNumTokens, 0x80000000u);
  ResealHeader(bytes_);
  EXPECT_STATUS(Parse(), StatusCode::kInvalidArgument, "num_tokens 2147483648 exceeds");
}

TEST_F(CraftedRecordTest, SizesThatOverflow) {
  // 1024 layers x 1024 heads x 4096 dims x fp32 x 2^31 tokens does not fit in 64 bits.
  Put<int32_t>(bytes_, hf::kNumLayers, 1024);
  Put<int32_t>(bytes_, hf::kNumKvHeads, 1024);
  Put<int32_t>(bytes_, hf::kHeadSize, 4096);
  bytes_[hf::kDType] = 0;
  Put<uint32_t>(bytes_, hf::kNumTokens, 0x7fffffffu);
  ResealHeader(bytes_);
  EXPECT_STATUS(Parse(), StatusCode::kInvalidArgument, "exceeds the format's size limit");
}

TEST_F(CraftedRecordTest, TenantTooLong) {
  Put<uint32_t>(bytes_, hf::kTenantSize, 300);
  ResealHeader(bytes_);
  EXPECT_STATUS(Parse(), StatusCode::kInvalidArgument, "tenant_size 300 exceeds 255");
}

TEST_F(CraftedRecordTest, HiddenSizeWithoutCheckpoints) {
  Put<uint32_t>(bytes_, hf::kNumHidden, 0);
  ResealHeader(bytes_);
  EXPECT_STATUS(Parse(), StatusCode::kInvalidArgument, "hidden_size 6 is invalid with 0");
}

TEST_F(CraftedRecordTest, TooManyCheckpoints) {
  Put<uint32_t>(bytes_, hf::kNumHidden, 5);
  ResealHeader(bytes_);
  EXPECT_STATUS(Parse(), StatusCode::kInvalidArgument, "5 hidden checkpoints for 3 layers");
}

TEST_F(CraftedRecordTest, SectionMovedOutOfPlace) {
  const size_t tokens_slot = hf::kSections + 16 * static_cast<size_t>(RecordSection::kTokens);
  Put<uint64_t>(bytes_, tokens_slot, Get<uint64_t>(bytes_, tokens_slot) + 64);
  ResealHeader(bytes_);
  EXPECT_STATUS(Parse(), StatusCode::kInvalidArgument, "tokens section is at [576, +12)");
}

TEST_F(CraftedRecordTest, SectionSizeBeyondTheBuffer) {
  const size_t kv_size = hf::kSections + 16 * static_cast<size_t>(RecordSection::kKv) + 8;
  Put<uint64_t>(bytes_, kv_size, ~uint64_t{0});
  ResealHeader(bytes_);
  EXPECT_STATUS(Parse(), StatusCode::kInvalidArgument, "kv section is at");
}

TEST_F(CraftedRecordTest, TotalSize) {
  Put<uint64_t>(bytes_, hf::kTotalSize, bytes_.size() + 64);
  ResealHeader(bytes_);
  EXPECT_STATUS(Parse(), StatusCode::kInvalidArgument, "total_size is");
}

TEST_F(CraftedRecordTest, HiddenLayersOutOfOrder) {
  const uint64_t list = Get<uint64_t>(bytes_, hf::kSections + 16 * 1);
  Put<int32_t>(bytes_, list, 2);
  Put<int32_t>(bytes_, list + 4, 1);
  ResealMeta(bytes_);
  EXPECT_STATUS(Parse(), StatusCode::kInvalidArgument, "strictly increasing: 2 then 1");
}

TEST_F(CraftedRecordTest, HiddenLayerBeyondTheModel) {
  const uint64_t list = Get<uint64_t>(bytes_, hf::kSections + 16 * 1);
  Put<int32_t>(bytes_, list + 4, 4);
  ResealMeta(bytes_);
  EXPECT_STATUS(Parse(), StatusCode::kInvalidArgument, "at layer 4, outside [0, 3]");
}

TEST_F(CraftedRecordTest, NegativeTokenBehindAValidChecksum) {
  const uint64_t tokens = Get<uint64_t>(bytes_, hf::kSections + 16 * 3);
  const uint64_t table = Get<uint64_t>(bytes_, hf::kSections + 16 * 2);
  Put<int32_t>(bytes_, tokens + 4, -7);
  Put<uint64_t>(bytes_, table,
                XXH64(bytes_.data() + tokens + 64, 12, XXH64(bytes_.data() + tokens, 12, 0)));
  ResealMeta(bytes_);
  EXPECT_STATUS(Parse(), StatusCode::kInvalidArgument, "record token 1 has negative id -7");
}

TEST(RecordParseTest, BadMagicAndBadBuffers) {
  const RecordMeta m = MakeMeta(DType::kFloat16, false);
  std::vector<uint8_t> b = Build(m, MakeContents(m, 2));
  std::vector<uint8_t> not_a_record(b.size(), 'x');
  EXPECT_STATUS(ParseRecord(not_a_record.data(), not_a_record.size()).status(),
                StatusCode::kInvalidArgument, "not a relaykv record: bad magic 'xxxxxxxx'");
  EXPECT_STATUS(ParseRecord(nullptr, 100).status(), StatusCode::kInvalidArgument, "null");
  std::vector<uint8_t> shifted(b.size() + 1);
  std::memcpy(shifted.data() + 1, b.data(), b.size());
  EXPECT_STATUS(ParseRecord(shifted.data() + 1, b.size()).status(), StatusCode::kInvalidArgument,
                "not 4-byte aligned");
  // The header alone needs no alignment.
  EXPECT_TRUE(ParseRecordHeader(shifted.data() + 1, b.size()).ok());
}

TEST(RecordWriterTest, WritingIntoACallerBufferEqualsTheBuilder) {
  for (bool with_hidden : {false, true}) {
    const RecordMeta m = MakeMeta(DType::kFloat16, with_hidden);
    const int32_t n = 7;
    const Contents c = MakeContents(m, n);
    const std::vector<uint8_t> built = Build(m, c);
    const size_t size = *RecordSize(m, n);
    ASSERT_EQ(size, built.size());

    // Poisoned, larger than needed: the writer must zero its padding and stay
    // inside the record.
    std::vector<uint8_t> buffer(size + 192, 0xab);
    auto w = RecordWriter::Create(m, c.tokens, c.positions, buffer.data(), buffer.size());
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    EXPECT_EQ(w->size(), size);
    const RecordGeometry& g = w->geometry();
    const auto kv_rows = static_cast<size_t>(g.kv_side_bytes);
    for (int32_t l = 0; l < 3; ++l) {
      std::memcpy(w->K(l), c.kv.data() + (2 * l) * kv_rows, kv_rows);
      std::memcpy(w->V(l), c.kv.data() + (2 * l + 1) * kv_rows, kv_rows);
    }
    for (int32_t i = 0; i < g.num_hidden; ++i) {
      std::memcpy(w->hidden(i), c.hidden.data() + i * g.hidden_checkpoint_bytes,
                  static_cast<size_t>(g.hidden_checkpoint_bytes));
    }
    const uint64_t sum = w->Seal();
    EXPECT_EQ(std::memcmp(buffer.data(), built.data(), size), 0) << "hidden " << with_hidden;
    for (size_t i = size; i < buffer.size(); ++i) ASSERT_EQ(buffer[i], 0xab) << i;
    auto v = ParseRecord(buffer.data(), size);
    ASSERT_TRUE(v.ok()) << v.status().ToString();
    EXPECT_EQ(v->checksum(), sum);
    EXPECT_EQ(w->payload(), buffer.data() + g.section(RecordSection::kKv).offset);

    // Changing the payload and sealing again gives a valid, different record.
    w->K(0)[0] ^= 0xff;
    EXPECT_NE(w->Seal(), sum);
    EXPECT_TRUE(ParseRecord(buffer.data(), size).ok());
  }
}

TEST(RecordWriterTest, RefusesBadInput) {
  const RecordMeta m = MakeMeta(DType::kFloat16, true);
  const Contents c = MakeContents(m, 3);
  const size_t size = *RecordSize(m, 3);
  std::vector<uint8_t> buf(size + 8);
  auto create = [&](const RecordMeta& meta, std::span<const int32_t> t, std::span<const int32_t> p,
                    void* b, size_t n) { return RecordWriter::Create(meta, t, p, b, n).status(); };
  EXPECT_STATUS(create(m, c.tokens, c.positions, buf.data(), size - 1),
                StatusCode::kInvalidArgument,
                "record buffer of " + std::to_string(size - 1) +
                    " bytes is too small for a record of " + std::to_string(size) + " bytes");
  EXPECT_STATUS(create(m, c.tokens, c.positions, buf.data() + 2, size),
                StatusCode::kInvalidArgument, "not 4-byte aligned");
  EXPECT_STATUS(create(m, c.tokens, c.positions, nullptr, size), StatusCode::kInvalidArgument,
                "null");
  EXPECT_STATUS(create(m, c.tokens, std::span(c.positions).first(2), buf.data(), size),
                StatusCode::kInvalidArgument, "3 tokens but 2 positions");
  EXPECT_STATUS(create(m, {}, {}, buf.data(), size), StatusCode::kInvalidArgument,
                "at least one token");
  std::vector<int32_t> neg = c.tokens;
  neg[2] = -1;
  EXPECT_STATUS(create(m, neg, c.positions, buf.data(), size), StatusCode::kInvalidArgument,
                "token 2 has negative id -1");
  EXPECT_STATUS(create(m, c.tokens, neg, buf.data(), size), StatusCode::kInvalidArgument,
                "token 2 has negative position -1");

  RecordMeta bad = m;
  bad.tenant.assign(256, 't');
  EXPECT_STATUS(RecordSize(bad, 3).status(), StatusCode::kInvalidArgument,
                "tenant is 256 bytes, at most 255");
  bad = m;
  bad.hidden_layers = {2, 2};
  EXPECT_STATUS(RecordSize(bad, 3).status(), StatusCode::kInvalidArgument, "strictly increasing");
  bad = m;
  bad.hidden_layers = {-1};
  EXPECT_STATUS(RecordSize(bad, 3).status(), StatusCode::kInvalidArgument, "outside [0, 3]");
  bad = m;
  bad.hidden_layers.clear();
  EXPECT_STATUS(RecordSize(bad, 3).status(), StatusCode::kInvalidArgument,
                "hidden_size must be 0 when there are no hidden checkpoints");
  bad = m;
  bad.hidden_size = 0;
  EXPECT_STATUS(RecordSize(bad, 3).status(), StatusCode::kInvalidArgument,
                "hidden_size must be in");
  bad = m;
  bad.layout.head_size = 3;
  EXPECT_STATUS(RecordSize(bad, 3).status(), StatusCode::kInvalidArgument, "layout.head_size");
  bad = m;
  bad.rope.rotary_dim = 8;
  EXPECT_STATUS(RecordSize(bad, 3).status(), StatusCode::kInvalidArgument, "rope.rotary_dim");
  EXPECT_STATUS(RecordSize(m, 0).status(), StatusCode::kInvalidArgument, "at least one token");

  RecordMeta huge;
  huge.layout = KvLayout{1024, 1024, 4096, DType::kFloat32};
  EXPECT_STATUS(RecordSize(huge, 0x7fffffff).status(), StatusCode::kInvalidArgument,
                "exceeds the format's size limit");
}

TEST(RecordWriterTest, BuilderChecksPayloadSizes) {
  const RecordMeta m = MakeMeta(DType::kFloat16, true);
  Contents c = MakeContents(m, 3);
  c.kv.pop_back();
  EXPECT_STATUS(BuildRecord(m, c.tokens, c.positions, c.kv, c.hidden).status(),
                StatusCode::kInvalidArgument, "kv payload is 287 bytes, expected 288");
  c = MakeContents(m, 3);
  EXPECT_STATUS(BuildRecord(m, c.tokens, c.positions, c.kv).status(), StatusCode::kInvalidArgument,
                "hidden payload is 0 bytes, expected 72");
}

class CompatibleTest : public ::testing::Test {
 protected:
  void SetUp() override {
    meta_ = MakeMeta(DType::kFloat16, false);
    bytes_ = Build(meta_, MakeContents(meta_, 2));
    auto v = ParseRecord(bytes_.data(), bytes_.size());
    ASSERT_TRUE(v.ok());
    view_.emplace(*v);
  }
  Status Check(uint64_t fp, const KvLayout& l, const RopeParams& r, std::string_view tenant) {
    return CheckCompatible(*view_, fp, l, r, tenant);
  }
  Status CheckLayout(const KvLayout& l) {
    return Check(meta_.model_fingerprint, l, meta_.rope, meta_.tenant);
  }
  Status CheckRope(const RopeParams& r) {
    return Check(meta_.model_fingerprint, meta_.layout, r, meta_.tenant);
  }

  RecordMeta meta_;
  std::vector<uint8_t> bytes_;
  std::optional<RecordView> view_;
};

TEST_F(CompatibleTest, SameEverythingIsCompatible) {
  EXPECT_TRUE(Check(meta_.model_fingerprint, meta_.layout, meta_.rope, meta_.tenant).ok());
  RopeParams explicit_dim = meta_.rope;
  explicit_dim.rotary_dim = meta_.layout.head_size;  // 0 means head_size
  explicit_dim.factor = 3.f;                         // unused without scaling
  EXPECT_TRUE(CheckRope(explicit_dim).ok());
}

TEST_F(CompatibleTest, TenantIsAPermissionMatter) {
  EXPECT_STATUS(Check(meta_.model_fingerprint, meta_.layout, meta_.rope, "team-b"),
                StatusCode::kPermissionDenied,
                "record tenant mismatch: record 'team-a', expected 'team-b'");
  EXPECT_STATUS(Check(0, meta_.layout, meta_.rope, std::string("te\x01", 3)),
                StatusCode::kPermissionDenied, "expected 'te\\x01'");
}

TEST_F(CompatibleTest, ModelAndLayoutMismatchesNameTheField) {
  EXPECT_STATUS(Check(42, meta_.layout, meta_.rope, meta_.tenant), StatusCode::kFailedPrecondition,
                "record model_fingerprint mismatch: record 0x0123456789abcdef, expected "
                "0x000000000000002a");
  KvLayout l = meta_.layout;
  l.num_layers = 30;
  EXPECT_STATUS(CheckLayout(l), StatusCode::kFailedPrecondition,
                "record layout.num_layers mismatch: record 3, expected 30");
  l = meta_.layout;
  l.num_kv_heads = 8;
  EXPECT_STATUS(CheckLayout(l), StatusCode::kFailedPrecondition,
                "record layout.num_kv_heads mismatch: record 2, expected 8");
  l = meta_.layout;
  l.head_size = 64;
  EXPECT_STATUS(CheckLayout(l), StatusCode::kFailedPrecondition,
                "record layout.head_size mismatch: record 4, expected 64");
  l = meta_.layout;
  l.dtype = DType::kBFloat16;
  EXPECT_STATUS(CheckLayout(l), StatusCode::kFailedPrecondition,
                "record layout.dtype mismatch: record float16, expected bfloat16");
}

TEST_F(CompatibleTest, RopeMismatchesNameTheField) {
  RopeParams r = meta_.rope;
  r.theta = 500000.f;
  EXPECT_STATUS(CheckRope(r), StatusCode::kFailedPrecondition,
                "record rope.theta mismatch: record 10000, expected 500000");
  r = meta_.rope;
  r.rotary_dim = 2;
  EXPECT_STATUS(CheckRope(r), StatusCode::kFailedPrecondition,
                "record rope.rotary_dim mismatch: record 4, expected 2");
  r = meta_.rope;
  r.style = RopeStyle::kInterleaved;
  EXPECT_STATUS(CheckRope(r), StatusCode::kFailedPrecondition,
                "record rope.style mismatch: record neox, expected interleaved");
  r = meta_.rope;
  r.scaling = RopeScaling::kLlama3;
  EXPECT_STATUS(CheckRope(r), StatusCode::kFailedPrecondition,
                "record rope.scaling mismatch: record none, expected llama3");
}

TEST(CompatibleScalingTest, ScalingParametersAreComparedWhenUsed) {
  RecordMeta m = MakeMeta(DType::kFloat32, false);
  m.rope.scaling = RopeScaling::kLlama3;
  m.rope.factor = 8.f;
  const std::vector<uint8_t> b = Build(m, MakeContents(m, 2));
  auto v = ParseRecord(b.data(), b.size());
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  auto check = [&](const RopeParams& r) {
    return CheckCompatible(*v, m.model_fingerprint, m.layout, r, m.tenant);
  };
  EXPECT_TRUE(check(m.rope).ok());
  RopeParams r = m.rope;
  r.factor = 4.f;
  EXPECT_STATUS(check(r), StatusCode::kFailedPrecondition,
                "record rope.factor mismatch: record 8, expected 4");
  r = m.rope;
  r.low_freq_factor = 0.5f;
  EXPECT_STATUS(check(r), StatusCode::kFailedPrecondition,
                "record rope.low_freq_factor mismatch: record 1, expected 0.5");
  r = m.rope;
  r.high_freq_factor = 2.f;
  EXPECT_STATUS(check(r), StatusCode::kFailedPrecondition,
                "record rope.high_freq_factor mismatch: record 4, expected 2");
  r = m.rope;
  r.original_max_position = 4096;
  EXPECT_STATUS(check(r), StatusCode::kFailedPrecondition,
                "record rope.original_max_position mismatch: record 8192, expected 4096");
}

TEST(CompatibleScalingTest, YarnParametersAreCompared) {
  RecordMeta m = MakeMeta(DType::kFloat32, false);
  m.rope.scaling = RopeScaling::kYarn;
  m.rope.factor = 4.f;
  m.rope.attention_factor = 1.125f;
  const std::vector<uint8_t> b = Build(m, MakeContents(m, 2));
  auto v = ParseRecord(b.data(), b.size());
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  auto check = [&](const RopeParams& r) {
    return CheckCompatible(*v, m.model_fingerprint, m.layout, r, m.tenant);
  };
  EXPECT_TRUE(check(m.rope).ok());
  // One changed field each, and the message that must name it.
  const std::vector<std::pair<std::function<void(RopeParams&)>, std::string>> cases = {
      {[](RopeParams& r) { r.beta_fast = 16.f; },
       "rope.beta_fast mismatch: record 32, expected 16"},
      {[](RopeParams& r) { r.beta_slow = 2.f; }, "rope.beta_slow mismatch: record 1, expected 2"},
      {[](RopeParams& r) { r.attention_factor = 1.f; },
       "rope.attention_factor mismatch: record 1.125, expected 1"},
      {[](RopeParams& r) { r.truncate = false; },
       "rope.truncate mismatch: record true, expected false"},
      {[](RopeParams& r) { r.original_max_position = 4096; },
       "rope.original_max_position mismatch: record 8192, expected 4096"},
      {[](RopeParams& r) { r.scaling = RopeScaling::kLlama3; },
       "rope.scaling mismatch: record yarn, expected llama3"},
  };
  for (const auto& [change, message] : cases) {
    RopeParams r = m.rope;
    change(r);
    EXPECT_STATUS(check(r), StatusCode::kFailedPrecondition, message);
  }
}

}  // namespace
}  // namespace relaykv
