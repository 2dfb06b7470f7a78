// The export/import data flow end to end on one instance: gather from one
// paged layout, store, index, look up behind a new prefix, verify, scatter into
// another layout at other blocks and re-rotate.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "connector/kv_ops/paged_kv.h"
#include "connector/kv_ops/rope.h"
#include "connector/relay/kv_relay.h"
#include "tests/cpp/relay/relay_test_util.h"
#include "transfer/record/record.h"

namespace relaykv {
namespace {

constexpr int32_t kLayers = 4;
constexpr int32_t kHeads = 3;
constexpr int32_t kHeadSize = 16;
constexpr int32_t kBlockSize = 8;
constexpr int32_t kBlocks = 32;

KvLayout Layout() { return KvLayout{kLayers, kHeads, kHeadSize, DType::kFloat16}; }

InstanceIdentity Identity(std::string tenant = "t0", uint64_t model = 0xabcdef) {
  InstanceIdentity id;
  id.model_fingerprint = model;
  id.layout = Layout();
  id.rope.theta = 10000.f;
  id.tenant = std::move(tenant);
  return id;
}

// Owns the bytes of a paged cache in one of two physical layouts.
struct OwnedCache {
  std::vector<uint16_t> bytes;
  PagedKvCache view;

  // NHD: per layer [2, blocks, slots, heads, dim] (vLLM's flash layout).
  static OwnedCache Nhd() {
    OwnedCache c;
    const int64_t side = int64_t{kBlocks} * kBlockSize * kHeads * kHeadSize;
    c.bytes.resize(static_cast<size_t>(kLayers * 2 * side));
    c.view.layout = Layout();
    c.view.block_size = kBlockSize;
    c.view.num_blocks = kBlocks;
    for (int32_t l = 0; l < kLayers; ++l) {
      c.view.k_base.push_back(c.bytes.data() + l * 2 * side);
      c.view.v_base.push_back(c.bytes.data() + l * 2 * side + side);
    }
    c.view.block_stride = int64_t{kBlockSize} * kHeads * kHeadSize;
    c.view.slot_stride = int64_t{kHeads} * kHeadSize;
    c.view.head_stride = kHeadSize;
    c.view.dim_stride = 1;
    return c;
  }

  // HND with K|V side by side per block: [blocks, 2, heads, slots, dim].
  static OwnedCache Hnd() {
    OwnedCache c;
    const int64_t block = int64_t{2} * kHeads * kBlockSize * kHeadSize;
    const int64_t layer = block * kBlocks;
    c.bytes.resize(static_cast<size_t>(kLayers * layer));
    c.view.layout = Layout();
    c.view.block_size = kBlockSize;
    c.view.num_blocks = kBlocks;
    for (int32_t l = 0; l < kLayers; ++l) {
      c.view.k_base.push_back(c.bytes.data() + l * layer);
      c.view.v_base.push_back(c.bytes.data() + l * layer + block / 2);
    }
    c.view.block_stride = block;
    c.view.slot_stride = kHeadSize;
    c.view.head_stride = int64_t{kBlockSize} * kHeadSize;
    c.view.dim_stride = 1;
    return c;
  }

  void FillRandom(uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> dist(0.f, 1.f);
    for (uint16_t& x : bytes) x = FloatToHalf(dist(rng));
  }
};

std::vector<int32_t> Shuffled(int32_t n, uint32_t seed) {
  return testing::ShuffledBlocks(kBlocks, n, seed);
}

using testing::Tokens;

std::vector<uint16_t> GatherAll(const PagedKvCache& cache, std::span<const int32_t> table,
                                int32_t begin, int32_t count) {
  std::vector<uint16_t> out(static_cast<size_t>(kLayers) * 2 * count * kHeads * kHeadSize);
  const KvPayload p{out.data(), count, Layout(), false};
  EXPECT_TRUE(GatherKv(cache, table, begin, count, p, 0).ok());
  return out;
}

StoreOptions SmallStore(uint64_t bytes = 8 << 20) {
  StoreOptions o;
  o.capacity_bytes = bytes;
  return o;
}

class RelayTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto r = KvRelay::Create(Identity(), SmallStore());
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    relay_ = std::move(r).value();
    src_ = OwnedCache::Nhd();
    src_.FillRandom(1);
    src_table_ = Shuffled(12, 2);
  }

  std::unique_ptr<KvRelay> relay_;
  OwnedCache src_;
  std::vector<int32_t> src_table_;
};

TEST_F(RelayTest, ExportThenImportBehindANewPrefixAtAnotherPosition) {
  // Agent A: the answer occupies positions [5, 45) of A's sequence.
  const std::vector<int32_t> answer = Tokens(40, 100);
  auto exp = relay_->Export(src_.view, src_table_, answer, /*seq_begin=*/5);
  ASSERT_TRUE(exp.ok()) << exp.status().ToString();
  EXPECT_FALSE(exp->deduplicated);

  // Agent B: 23 tokens of its own prefix, the answer, then a question.
  std::vector<int32_t> prompt = Tokens(23, 9000);
  prompt.insert(prompt.end(), answer.begin(), answer.end());
  const std::vector<int32_t> tail = Tokens(9, 20000);
  prompt.insert(prompt.end(), tail.begin(), tail.end());

  const auto spans = relay_->Lookup(prompt);
  ASSERT_EQ(spans.size(), 1u);
  EXPECT_EQ(spans[0], (Span{exp->record_id, 0, 23, 40}));

  OwnedCache dst = OwnedCache::Hnd();
  const std::vector<int32_t> dst_table = Shuffled(10, 3);
  auto imp = relay_->Import(spans[0], prompt, dst.view, dst_table);
  ASSERT_TRUE(imp.ok()) << imp.status().ToString();
  EXPECT_EQ(imp->tokens, 40);
  EXPECT_EQ(imp->position_delta, 23 - 5);

  // Reference: A's KV with K rotated by the same delta.
  std::vector<uint16_t> want = GatherAll(src_.view, src_table_, 5, 40);
  const KvPayload want_p{want.data(), 40, Layout(), false};
  ASSERT_TRUE(RerotateK(want_p, 0, 40, Identity().rope, 18).ok());
  const std::vector<uint16_t> got = GatherAll(dst.view, dst_table, 23, 40);
  ASSERT_EQ(got.size(), want.size());
  EXPECT_TRUE(std::equal(got.begin(), got.end(), want.begin()));
  // V is moved untouched.
  const std::vector<uint16_t> src_raw = GatherAll(src_.view, src_table_, 5, 40);
  const size_t side = static_cast<size_t>(40) * kHeads * kHeadSize;
  for (int32_t l = 0; l < kLayers; ++l) {
    const size_t v = (static_cast<size_t>(l) * 2 + 1) * side;
    EXPECT_TRUE(std::equal(got.begin() + v, got.begin() + v + side, src_raw.begin() + v)) << l;
  }

  const RelayMetrics m = relay_->Metrics();
  EXPECT_EQ(m.exports, 1u);
  EXPECT_EQ(m.imports, 1u);
  EXPECT_EQ(m.import_tokens, 40u);
  EXPECT_EQ(m.lookup_tokens_matched, 40u);
}

TEST_F(RelayTest, SameContentExportsOnce) {
  const std::vector<int32_t> answer = Tokens(20, 7);
  auto a = relay_->Export(src_.view, src_table_, answer, 0);
  auto b = relay_->Export(src_.view, src_table_, answer, 0);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->record_id, b->record_id);
  EXPECT_TRUE(b->deduplicated);
  EXPECT_EQ(relay_->Metrics().export_dedup, 1u);
  EXPECT_EQ(relay_->store_stats().records, 1u);
}

TEST_F(RelayTest, EvictedRecordIsNotFoundAndCounted) {
  const std::vector<int32_t> answer = Tokens(32, 1);
  auto exp = relay_->Export(src_.view, src_table_, answer, 0);
  ASSERT_TRUE(exp.ok());
  const auto spans = relay_->Lookup(answer);
  ASSERT_EQ(spans.size(), 1u);
  ASSERT_TRUE(relay_->store()->Delete(exp->record_id).ok());
  // The store told the index.
  EXPECT_TRUE(relay_->Lookup(answer).empty());
  OwnedCache dst = OwnedCache::Nhd();
  auto imp = relay_->Import(spans[0], answer, dst.view, Shuffled(4, 9));
  ASSERT_FALSE(imp.ok());
  EXPECT_EQ(imp.status().code(), StatusCode::kNotFound);
  EXPECT_EQ(relay_->Metrics().import_failures[static_cast<size_t>(ImportFailure::kNotFound)], 1u);
}

TEST_F(RelayTest, CorruptRecordIsRejected) {
  const std::vector<int32_t> answer = Tokens(32, 1);
  auto exp = relay_->Export(src_.view, src_table_, answer, 0);
  ASSERT_TRUE(exp.ok());
  {
    auto lease = relay_->store()->Get(exp->record_id);
    ASSERT_TRUE(lease.ok());
    // A bit flip in the last layer's V, as a bad NIC or memory would cause.
    auto* bytes = const_cast<std::byte*>(lease->data());
    bytes[lease->size() - 100] ^= std::byte{0x10};
  }
  OwnedCache dst = OwnedCache::Nhd();
  auto imp = relay_->Import(Span{exp->record_id, 0, 0, 32}, answer, dst.view, Shuffled(4, 9));
  ASSERT_FALSE(imp.ok());
  EXPECT_EQ(imp.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(imp.status().ToString().find("checksum"), std::string::npos);
  EXPECT_EQ(relay_->Metrics().import_failures[static_cast<size_t>(ImportFailure::kCorrupt)], 1u);
}

TEST_F(RelayTest, RecordOfAnotherModelIsRefused) {
  // A record made by an instance of another model, placed in this store.
  RecordMeta meta;
  meta.model_fingerprint = 0x1234;  // not ours
  meta.layout = Layout();
  meta.rope = Identity().rope;
  meta.tenant = "t0";
  const std::vector<int32_t> toks = Tokens(16, 3);
  std::vector<int32_t> pos(16);
  std::iota(pos.begin(), pos.end(), 0);
  std::vector<uint8_t> kv(static_cast<size_t>(kLayers) * 2 * 16 * kHeads * kHeadSize * 2);
  auto rec = BuildRecord(meta, toks, pos, kv);
  ASSERT_TRUE(rec.ok()) << rec.status().ToString();
  auto h = relay_->store()->Reserve(77, rec->size());
  ASSERT_TRUE(h.ok());
  std::memcpy(h->data(), rec->data(), rec->size());
  ASSERT_TRUE(h->Seal().ok());

  OwnedCache dst = OwnedCache::Nhd();
  auto imp = relay_->Import(Span{77, 0, 0, 16}, toks, dst.view, Shuffled(2, 9));
  ASSERT_FALSE(imp.ok());
  EXPECT_EQ(imp.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(relay_->Metrics().import_failures[static_cast<size_t>(ImportFailure::kMismatch)], 1u);
}

TEST_F(RelayTest, TokensThatNoLongerMatchAreRefused) {
  const std::vector<int32_t> answer = Tokens(32, 1);
  auto exp = relay_->Export(src_.view, src_table_, answer, 0);
  ASSERT_TRUE(exp.ok());
  std::vector<int32_t> other = answer;
  other[10] += 1;
  OwnedCache dst = OwnedCache::Nhd();
  auto imp = relay_->Import(Span{exp->record_id, 0, 0, 32}, other, dst.view, Shuffled(4, 9));
  ASSERT_FALSE(imp.ok());
  EXPECT_EQ(imp.status().code(), StatusCode::kAborted);
}

TEST_F(RelayTest, OtherTenantsSeeNothing) {
  auto other = KvRelay::Create(Identity("t1"), SmallStore());
  ASSERT_TRUE(other.ok());
  const std::vector<int32_t> answer = Tokens(32, 1);
  ASSERT_TRUE(relay_->Export(src_.view, src_table_, answer, 0).ok());
  EXPECT_EQ(relay_->Lookup(answer).size(), 1u);
  EXPECT_TRUE((*other)->Lookup(answer).empty());
}

TEST_F(RelayTest, BadRequestsAreRejectedWithoutTouchingTheCache) {
  const std::vector<int32_t> answer = Tokens(32, 1);
  auto exp = relay_->Export(src_.view, src_table_, answer, 0);
  ASSERT_TRUE(exp.ok());
  OwnedCache dst = OwnedCache::Nhd();
  const std::vector<uint16_t> before = dst.bytes;
  // Destination block table too short for the span.
  auto imp = relay_->Import(Span{exp->record_id, 0, 0, 32}, answer, dst.view, Shuffled(2, 9));
  ASSERT_FALSE(imp.ok());
  EXPECT_EQ(imp.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(dst.bytes, before);
  // A cache of another layout.
  OwnedCache wrong = OwnedCache::Nhd();
  wrong.view.layout.dtype = DType::kBFloat16;
  EXPECT_EQ(relay_->Export(wrong.view, src_table_, answer, 0).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(relay_->Metrics().export_failures, 1u);
}

TEST_F(RelayTest, HiddenCheckpointsTravelWithTheRecord) {
  const std::vector<int32_t> answer = Tokens(40, 100);
  constexpr int32_t kHidden = 24;
  // Two checkpoints (entering layers 1 and 3), [checkpoint][token][hidden] half floats.
  std::vector<uint16_t> rows(2 * answer.size() * kHidden);
  for (size_t i = 0; i < rows.size(); ++i)
    rows[i] = FloatToHalf(static_cast<float>(i % 977) / 97.f);
  HiddenCheckpoints hidden;
  hidden.layers = {1, 3};
  hidden.hidden_size = kHidden;
  hidden.data = {reinterpret_cast<const uint8_t*>(rows.data()), rows.size() * sizeof(uint16_t)};
  auto exp = relay_->Export(src_.view, src_table_, answer, 5, &hidden);
  ASSERT_TRUE(exp.ok()) << exp.status().ToString();
  // The same tokens without checkpoints are another record: no dedup into one without rows.
  auto plain = relay_->Export(src_.view, src_table_, answer, 5);
  ASSERT_TRUE(plain.ok());
  EXPECT_NE(plain->record_id, exp->record_id);
  EXPECT_FALSE(plain->deduplicated);

  std::vector<int32_t> prompt = Tokens(11, 9000);
  prompt.insert(prompt.end(), answer.begin(), answer.end());
  const Span span{exp->record_id, 4, 11 + 4, 30};
  auto got = relay_->ReadHidden(span, prompt, 3);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  ASSERT_EQ(got->size(), size_t{30} * kHidden * sizeof(uint16_t));
  const auto* want = reinterpret_cast<const uint8_t*>(rows.data() + (answer.size() + 4) * kHidden);
  EXPECT_EQ(std::memcmp(got->data(), want, got->size()), 0);

  EXPECT_EQ(relay_->ReadHidden(span, prompt, 2).status().code(), StatusCode::kNotFound);
  const Span no_rows{plain->record_id, 4, 11 + 4, 30};
  EXPECT_EQ(relay_->ReadHidden(no_rows, prompt, 1).status().code(), StatusCode::kNotFound);
  std::vector<int32_t> wrong = prompt;
  wrong[20] += 1;
  EXPECT_EQ(relay_->ReadHidden(span, wrong, 1).status().code(), StatusCode::kAborted);
  // KV import of the record with checkpoints works as before.
  OwnedCache dst = OwnedCache::Nhd();
  EXPECT_TRUE(relay_->Import(span, prompt, dst.view, Shuffled(8, 5)).ok());
}

TEST_F(RelayTest, HiddenCheckpointsOfTheWrongSizeAreRejected) {
  const std::vector<int32_t> answer = Tokens(40, 100);
  std::vector<uint16_t> rows(40 * 8 - 1);
  HiddenCheckpoints hidden;
  hidden.layers = {2};
  hidden.hidden_size = 8;
  hidden.data = {reinterpret_cast<const uint8_t*>(rows.data()), rows.size() * sizeof(uint16_t)};
  auto exp = relay_->Export(src_.view, src_table_, answer, 5, &hidden);
  EXPECT_EQ(exp.status().code(), StatusCode::kInvalidArgument);
  hidden.layers = {kLayers + 1};  // past the last layer's output
  rows.resize(40 * 8);
  hidden.data = {reinterpret_cast<const uint8_t*>(rows.data()), rows.size() * sizeof(uint16_t)};
  EXPECT_EQ(relay_->Export(src_.view, src_table_, answer, 5, &hidden).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(relay_->Metrics().export_failures, 2u);
}

TEST(RelayEvictionTest, EvictionDropsSpansFromTheIndex) {
  // Room for only a few records: older exports are evicted and never offered.
  auto r = KvRelay::Create(Identity(), SmallStore(64 << 10));
  ASSERT_TRUE(r.ok());
  OwnedCache src = OwnedCache::Nhd();
  src.FillRandom(5);
  const std::vector<int32_t> table = Shuffled(12, 2);
  std::vector<std::vector<int32_t>> answers;
  for (int i = 0; i < 12; ++i) {
    answers.push_back(Tokens(64, 1000 * (i + 1)));
    ASSERT_TRUE((*r)->Export(src.view, table, answers.back(), 0).ok()) << i;
  }
  const StoreStats st = (*r)->store_stats();
  ASSERT_GT(st.evictions, 0u);
  EXPECT_TRUE((*r)->Lookup(answers.front()).empty());
  EXPECT_EQ((*r)->Lookup(answers.back()).size(), 1u);
  EXPECT_EQ((*r)->index().num_records(), st.records);
}

}  // namespace
}  // namespace relaykv
