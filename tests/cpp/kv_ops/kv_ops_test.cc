#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "connector/kv_ops/convert.h"
#include "connector/kv_ops/paged_kv.h"
#include "connector/kv_ops/rope.h"
#include "tests/cpp/kv_ops/kv_ops_test_util.h"

namespace relaykv {
namespace {

using testing::AllShapes;
using testing::FirstDifference;
using testing::kAllPhys;
using testing::MakeCache;
using testing::MakePayload;
using testing::MakeTable;
using testing::Phys;
using testing::PhysName;
using testing::Shape;
using testing::TestCache;
using testing::TestPayload;
using testing::Ulp;

constexpr int32_t kLayers = 3;

KvLayout LayoutFor(const Shape& s, DType dtype) {
  return KvLayout{kLayers, s.num_kv_heads, s.head_size, dtype};
}

// A sequence of `seq_len` tokens in a cache with spare blocks; ranges used by
// the tests start mid-block.
struct Scenario {
  TestCache cache;
  std::vector<int32_t> table;
  int32_t seq_begin;
  int32_t count;
};

Scenario MakeScenario(const Shape& s, DType dtype, Phys phys, bool ascending, uint64_t seed) {
  const int32_t seq_len = 45;
  const int64_t blocks_needed = (seq_len + s.block_size - 1) / s.block_size;
  Scenario sc;
  sc.cache = MakeCache(LayoutFor(s, dtype), s.block_size, blocks_needed + 3, phys, seed);
  sc.table = MakeTable(seq_len, s.block_size, sc.cache.cache.num_blocks, ascending, seed + 1);
  sc.seq_begin = s.block_size == 1 ? 5 : s.block_size / 2 + 1;  // mid-block
  sc.count = seq_len - sc.seq_begin - 2;
  return sc;
}

class KvOpsTest : public ::testing::TestWithParam<testing::LayoutCase> {
 protected:
  Phys phys() const { return GetParam().phys; }
  DType dtype() const { return GetParam().dtype; }
};

INSTANTIATE_TEST_SUITE_P(Layouts, KvOpsTest, ::testing::ValuesIn(testing::AllLayoutCases()));

TEST_P(KvOpsTest, GatherMatchesReference) {
  uint64_t seed = 1;
  for (const Shape& s : AllShapes()) {
    for (bool ascending : {false, true}) {
      for (LayerRange layers : {LayerRange::All(), LayerRange{1, 2}}) {
        SCOPED_TRACE(s.ToString() + (ascending ? " ascending" : " shuffled") + " layers " +
                     std::to_string(layers.begin) + ".." + std::to_string(layers.end));
        Scenario sc = MakeScenario(s, dtype(), phys(), ascending, seed++);
        TestPayload got = MakePayload(sc.cache.cache.layout, sc.count + 6, seed++);
        TestPayload want = got.Clone();
        ASSERT_TRUE(
            GatherKv(sc.cache.cache, sc.table, sc.seq_begin, sc.count, got.payload, 4, layers)
                .ok());
        const int32_t end = layers.end == LayerRange::kToLast ? kLayers : layers.end;
        testing::ReferenceGather(sc.cache.cache, sc.table, sc.seq_begin, sc.count, want.payload, 4,
                                 layers.begin, end);
        ASSERT_EQ(FirstDifference(got.storage, want.storage), -1);
      }
    }
  }
}

TEST_P(KvOpsTest, ScatterMatchesReferenceAndTouchesNothingElse) {
  uint64_t seed = 100;
  for (const Shape& s : AllShapes()) {
    for (bool ascending : {false, true}) {
      for (LayerRange layers : {LayerRange::All(), LayerRange{0, 2}}) {
        SCOPED_TRACE(s.ToString() + (ascending ? " ascending" : " shuffled"));
        Scenario sc = MakeScenario(s, dtype(), phys(), ascending, seed++);
        TestPayload src = MakePayload(sc.cache.cache.layout, sc.count + 3, seed++);
        TestCache want = sc.cache.Clone();
        ASSERT_TRUE(
            ScatterKv(src.payload, 2, sc.count, sc.cache.cache, sc.table, sc.seq_begin, layers)
                .ok());
        const int32_t end = layers.end == LayerRange::kToLast ? kLayers : layers.end;
        testing::ReferenceScatter(src.payload, 2, sc.count, want.cache, sc.table, sc.seq_begin,
                                  layers.begin, end);
        ASSERT_EQ(FirstDifference(sc.cache.storage, want.storage), -1);
      }
    }
  }
}

TEST_P(KvOpsTest, GatherThenScatterToOtherBlocksRoundTrips) {
  uint64_t seed = 200;
  for (const Shape& s : AllShapes()) {
    SCOPED_TRACE(s.ToString());
    Scenario a = MakeScenario(s, dtype(), phys(), /*ascending=*/false, seed++);
    TestPayload p1 = MakePayload(a.cache.cache.layout, a.count, seed++);
    ASSERT_TRUE(GatherKv(a.cache.cache, a.table, a.seq_begin, a.count, p1.payload, 0).ok());
    // Into another physical layout, at other blocks and another sequence offset.
    const Phys other = phys() == Phys::kNhd ? Phys::kHnd : Phys::kNhd;
    TestCache b =
        MakeCache(a.cache.cache.layout, s.block_size, a.cache.cache.num_blocks + 5, other, seed++);
    const int32_t b_begin = 3;
    const std::vector<int32_t> b_table =
        MakeTable(b_begin + a.count, s.block_size, b.cache.num_blocks, false, seed++);
    ASSERT_TRUE(ScatterKv(p1.payload, 0, a.count, b.cache, b_table, b_begin).ok());
    TestPayload p2 = MakePayload(a.cache.cache.layout, a.count, seed++);
    ASSERT_TRUE(GatherKv(b.cache, b_table, b_begin, a.count, p2.payload, 0).ok());
    ASSERT_EQ(FirstDifference(p1.storage, p2.storage), -1);
  }
}

TEST_P(KvOpsTest, PagedRerotationEqualsPayloadRerotationAndTouchesOnlyK) {
  uint64_t seed = 300;
  for (const Shape& s : AllShapes()) {
    for (RopeStyle style : {RopeStyle::kNeox, RopeStyle::kInterleaved}) {
      SCOPED_TRACE(s.ToString() + (style == RopeStyle::kNeox ? " neox" : " interleaved"));
      RopeParams rope;
      rope.style = style;
      rope.rotary_dim = s.head_size / 2;  // partial rotary
      Scenario sc = MakeScenario(s, dtype(), phys(), /*ascending=*/false, seed++);
      const LayerRange layers{1, 3};
      // Expected: gather, rotate the payload, scatter back into a copy.
      TestPayload p = MakePayload(sc.cache.cache.layout, sc.count, seed++);
      ASSERT_TRUE(GatherKv(sc.cache.cache, sc.table, sc.seq_begin, sc.count, p.payload, 0).ok());
      ASSERT_TRUE(RerotateK(p.payload, 0, sc.count, rope, -1234, layers).ok());
      TestCache want = sc.cache.Clone();
      ASSERT_TRUE(ScatterKv(p.payload, 0, sc.count, want.cache, sc.table, sc.seq_begin).ok());

      ASSERT_TRUE(
          RerotateK(sc.cache.cache, sc.table, sc.seq_begin, sc.count, rope, -1234, layers).ok());
      ASSERT_EQ(FirstDifference(sc.cache.storage, want.storage), -1);
    }
  }
}

// Copies of tens of megabytes take the streaming-store path; it must be as
// exact as the small ones, whatever the alignment of either side.
TEST(LargeCopyTest, StreamingPathIsExact) {
  const KvLayout layout{2, 8, 128, DType::kFloat32};  // 4 KiB rows
  const int32_t block_size = 16, tokens = 1500;       // ~24 MiB of K and V
  TestCache cache = MakeCache(layout, block_size, tokens / block_size + 4, Phys::kNhd, 1200);
  // Shuffled, but with an ascending run in the middle so runs span blocks.
  std::vector<int32_t> table =
      MakeTable(tokens + 7, block_size, cache.cache.num_blocks, false, 1201);
  std::sort(table.begin() + 20, table.begin() + 60);
  for (size_t misalign : {size_t{0}, size_t{6}}) {
    SCOPED_TRACE("payload misalign " + std::to_string(misalign));
    TestPayload a = MakePayload(layout, tokens + misalign, 1202);
    KvPayload shifted = a.payload;  // same tokens, data moved off 16-byte alignment
    shifted.num_tokens = tokens;
    shifted.data = a.storage.data() + misalign;
    TestPayload want = MakePayload(layout, tokens, 1203);
    ASSERT_TRUE(GatherKv(cache.cache, table, 7, tokens, shifted, 0).ok());
    testing::ReferenceGather(cache.cache, table, 7, tokens, want.payload, 0, 0, 2);
    ASSERT_EQ(std::memcmp(shifted.data, want.storage.data(), want.storage.size()), 0);

    TestCache scattered = cache.Clone();
    TestCache reference = cache.Clone();
    ASSERT_TRUE(ScatterKv(shifted, 0, tokens, scattered.cache, table, 3).ok());
    testing::ReferenceScatter(want.payload, 0, tokens, reference.cache, table, 3, 0, 2);
    ASSERT_EQ(FirstDifference(scattered.storage, reference.storage), -1);
  }
}

// --- RoPE against an independent formulation -------------------------------

// Reference rotation by `delta` in double of one head vector (stride 1).
std::vector<double> ReferenceRotate(std::span<const double> x, const RopeParams& rope,
                                    double delta) {
  const int32_t d = static_cast<int32_t>(x.size());
  const int32_t rd = rope.rotary_dim == 0 ? d : rope.rotary_dim;
  const std::vector<double> inv = rope.InverseFrequencies(d);
  std::vector<double> out(x.begin(), x.end());
  for (int32_t i = 0; i < rd / 2; ++i) {
    const int32_t a = rope.style == RopeStyle::kNeox ? i : 2 * i;
    const int32_t b = rope.style == RopeStyle::kNeox ? i + rd / 2 : 2 * i + 1;
    const double c = std::cos(delta * inv[i]), s = std::sin(delta * inv[i]);
    out[a] = x[a] * c - x[b] * s;
    out[b] = x[a] * s + x[b] * c;
  }
  return out;
}

// HF-style rotation to an absolute position: x·cos(pθ) + rotate_half(x)·sin(pθ)
// with the frequency vector duplicated (neox) or repeated per pair
// (interleaved); written from the model-side formula, not from the pair loop.
std::vector<double> AbsoluteRope(std::span<const double> x, const RopeParams& rope, int64_t pos) {
  const int32_t d = static_cast<int32_t>(x.size());
  const int32_t rd = rope.rotary_dim == 0 ? d : rope.rotary_dim;
  const std::vector<double> inv = rope.InverseFrequencies(d);
  std::vector<double> freq(rd), rot(rd);
  for (int32_t k = 0; k < rd; ++k) {
    if (rope.style == RopeStyle::kNeox) {
      freq[k] = inv[k % (rd / 2)];
      rot[k] = k < rd / 2 ? -x[k + rd / 2] : x[k - rd / 2];
    } else {
      freq[k] = inv[k / 2];
      rot[k] = k % 2 == 0 ? -x[k + 1] : x[k - 1];
    }
  }
  std::vector<double> out(x.begin(), x.end());
  for (int32_t k = 0; k < rd; ++k) {
    const double angle = static_cast<double>(pos) * freq[k];
    out[k] = x[k] * std::cos(angle) + rot[k] * std::sin(angle);
  }
  return out;
}

class RopeTest : public ::testing::TestWithParam<testing::DTypeCase> {};

INSTANTIATE_TEST_SUITE_P(DTypes, RopeTest, ::testing::ValuesIn(testing::AllDTypeCases()));

TEST_P(RopeTest, PayloadMatchesDoubleReference) {
  const DType dtype = GetParam().dtype;
  uint64_t seed = 400;
  for (int32_t heads : {1, 3, 8}) {
    for (int32_t head_size : {64, 128}) {
      for (RopeStyle style : {RopeStyle::kNeox, RopeStyle::kInterleaved}) {
        for (int32_t rotary_dim : {0, head_size / 4}) {
          for (int64_t delta : {int64_t{1}, int64_t{-7}, int64_t{4093}, int64_t{-100000}}) {
            SCOPED_TRACE("heads=" + std::to_string(heads) + " d=" + std::to_string(head_size) +
                         " rd=" + std::to_string(rotary_dim) + " delta=" + std::to_string(delta) +
                         (style == RopeStyle::kNeox ? " neox" : " interleaved"));
            RopeParams rope;
            rope.theta = 10000.f;
            rope.style = style;
            rope.rotary_dim = rotary_dim;
            const KvLayout layout{3, heads, head_size, dtype};
            TestPayload p = MakePayload(layout, 9, seed++);
            const std::vector<uint8_t> before = p.storage;
            ASSERT_TRUE(RerotateK(p.payload, 2, 5, rope, delta, LayerRange{1, 3}).ok());
            const int64_t es = DTypeSize(dtype);
            for (int32_t l = 0; l < 3; ++l) {
              for (int32_t t = 0; t < 9; ++t) {
                const bool in_range = l >= 1 && t >= 2 && t < 7;
                for (int32_t kv = 0; kv < 2; ++kv) {
                  for (int32_t h = 0; h < heads; ++h) {
                    const int64_t off = (p.payload.RowOffset(l, kv, t) + h * head_size) * es;
                    if (!in_range || kv == 1) {  // untouched, bit for bit
                      ASSERT_EQ(
                          std::memcmp(p.storage.data() + off, before.data() + off, head_size * es),
                          0)
                          << "l=" << l << " t=" << t << " kv=" << kv;
                      continue;
                    }
                    std::vector<double> x(head_size);
                    for (int32_t d = 0; d < head_size; ++d) {
                      x[d] = LoadAsFloat(before.data() + off + d * es, dtype);
                    }
                    const std::vector<double> want = ReferenceRotate(x, rope, delta);
                    const int32_t rd = rotary_dim == 0 ? head_size : rotary_dim;
                    for (int32_t d = 0; d < head_size; ++d) {
                      const uint8_t* got_p = p.storage.data() + off + d * es;
                      if (d >= rd) {  // partial rotary: the tail keeps its bytes
                        ASSERT_EQ(std::memcmp(got_p, before.data() + off + d * es, es), 0)
                            << "tail dim " << d;
                        continue;
                      }
                      const double got = LoadAsFloat(got_p, dtype);
                      const double tol = (dtype == DType::kFloat32 ? 8 : 1) * Ulp(dtype, want[d]);
                      ASSERT_NEAR(got, want[d], tol)
                          << "l=" << l << " t=" << t << " h=" << h << " d=" << d;
                    }
                  }
                }
              }
            }
          }
        }
      }
    }
  }
}

TEST_P(RopeTest, ZeroDeltaIsIdentityBitForBit) {
  const DType dtype = GetParam().dtype;
  for (Phys phys : kAllPhys) {
    TestCache c = MakeCache(KvLayout{2, 3, 64, dtype}, 16, 6, phys, 500);
    const std::vector<uint8_t> before = c.storage;
    const std::vector<int32_t> table = {4, 0, 2, 5};
    ASSERT_TRUE(RerotateK(c.cache, table, 3, 50, RopeParams{}, 0).ok());
    const std::vector<int64_t> zeros(50, 0);
    ASSERT_TRUE(RerotateKPerToken(c.cache, table, 3, zeros, RopeParams{}).ok());
    EXPECT_EQ(FirstDifference(c.storage, before), -1) << PhysName(phys);
  }
  TestPayload p = MakePayload(KvLayout{2, 3, 64, dtype}, 10, 501);
  // -0 paired with a negative partner is where x·cos0 − y·sin0 would not give
  // back the same bits (-0 − -0 = +0).
  StoreFromFloat(testing::PayloadPtr(p.payload, 0, 0, 0, 0, 0), dtype, -0.f);
  StoreFromFloat(testing::PayloadPtr(p.payload, 0, 0, 0, 0, 32), dtype, -1.f);
  const std::vector<uint8_t> before = p.storage;
  ASSERT_TRUE(RerotateK(p.payload, 0, 10, RopeParams{}, 0).ok());
  EXPECT_EQ(FirstDifference(p.storage, before), -1);
}

TEST_P(RopeTest, TwoRotationsAddUp) {
  const DType dtype = GetParam().dtype;
  for (RopeStyle style : {RopeStyle::kNeox, RopeStyle::kInterleaved}) {
    RopeParams rope;
    rope.style = style;
    const KvLayout layout{2, 3, 128, dtype};
    TestPayload a = MakePayload(layout, 12, 600);
    TestPayload b = a.Clone();
    ASSERT_TRUE(RerotateK(a.payload, 0, 12, rope, 517).ok());
    ASSERT_TRUE(RerotateK(a.payload, 0, 12, rope, -2090).ok());
    ASSERT_TRUE(RerotateK(b.payload, 0, 12, rope, 517 - 2090).ok());
    const int64_t es = DTypeSize(dtype);
    for (int64_t off = 0; off < a.payload.Bytes(); off += es) {
      const double x = LoadAsFloat(a.storage.data() + off, dtype);
      const double y = LoadAsFloat(b.storage.data() + off, dtype);
      // Two roundings against one: a few units in the last place.
      const double tol = (dtype == DType::kFloat32 ? 16 : 3) * Ulp(dtype, y);
      ASSERT_NEAR(x, y, tol) << "element " << off / es;
    }
  }
}

TEST(RopeAbsoluteTest, RotatingByDeltaMovesKToTheNewPosition) {
  // K stored at position p (fp32, from the HF-style formula), re-rotated by d,
  // must equal the HF-style K at position p + d: R(p+d)x == R(d)R(p)x.
  for (RopeStyle style : {RopeStyle::kNeox, RopeStyle::kInterleaved}) {
    for (int32_t rotary_dim : {0, 32}) {
      for (RopeScaling scaling : {RopeScaling::kNone, RopeScaling::kLlama3}) {
        RopeParams rope;
        rope.theta = 500000.f;
        rope.style = style;
        rope.rotary_dim = rotary_dim;
        rope.scaling = scaling;
        rope.factor = 8.f;
        const int32_t heads = 3, head_size = 64, tokens = 6;
        const KvLayout layout{1, heads, head_size, DType::kFloat32};
        TestPayload p = MakePayload(layout, tokens, 700);
        std::mt19937_64 rng(701);
        std::uniform_real_distribution<double> dist(-1.0, 1.0);
        const int64_t positions[tokens] = {0, 1, 17, 250, 1000, 4095};
        const int64_t delta = 1500;
        std::vector<std::vector<double>> want;
        for (int32_t t = 0; t < tokens; ++t) {
          for (int32_t h = 0; h < heads; ++h) {
            std::vector<double> x(head_size);
            for (double& v : x) v = dist(rng);
            const std::vector<double> at_p = AbsoluteRope(x, rope, positions[t]);
            for (int32_t d = 0; d < head_size; ++d) {
              StoreFromFloat(testing::PayloadPtr(p.payload, 0, 0, t, h, d), DType::kFloat32,
                             static_cast<float>(at_p[d]));
            }
            want.push_back(AbsoluteRope(x, rope, positions[t] + delta));
          }
        }
        ASSERT_TRUE(RerotateK(p.payload, 0, tokens, rope, delta).ok());
        for (int32_t t = 0; t < tokens; ++t) {
          for (int32_t h = 0; h < heads; ++h) {
            for (int32_t d = 0; d < head_size; ++d) {
              const float got =
                  LoadAsFloat(testing::PayloadPtr(p.payload, 0, 0, t, h, d), DType::kFloat32);
              ASSERT_NEAR(got, want[t * heads + h][d], 2e-6)
                  << "style=" << static_cast<int>(style) << " rd=" << rotary_dim << " t=" << t
                  << " h=" << h << " d=" << d;
            }
          }
        }
      }
    }
  }
}

TEST(RopeAbsoluteTest, NeoxAndInterleavedDiffer) {
  // Guards the test above against a pairing bug that both styles share.
  RopeParams neox, inter;
  inter.style = RopeStyle::kInterleaved;
  const KvLayout layout{1, 1, 64, DType::kFloat32};
  TestPayload a = MakePayload(layout, 1, 800);
  TestPayload b = a.Clone();
  ASSERT_TRUE(RerotateK(a.payload, 0, 1, neox, 3).ok());
  ASSERT_TRUE(RerotateK(b.payload, 0, 1, inter, 3).ok());
  EXPECT_NE(FirstDifference(a.storage, b.storage), -1);
}

TEST_P(RopeTest, PerTokenDeltasEqualOneCallPerSpan) {
  const DType dtype = GetParam().dtype;
  RopeParams rope;
  rope.rotary_dim = 32;
  for (Phys phys : kAllPhys) {
    SCOPED_TRACE(PhysName(phys));
    TestCache a = MakeCache(KvLayout{3, 3, 64, dtype}, 16, 8, phys, 900);
    TestCache b = a.Clone();
    const std::vector<int32_t> table = {7, 1, 4, 0, 6};
    // Three spans at different offsets and a gap (delta 0) between them.
    std::vector<int64_t> deltas;
    for (int i = 0; i < 20; ++i) deltas.push_back(100);
    for (int i = 0; i < 7; ++i) deltas.push_back(0);
    for (int i = 0; i < 30; ++i) deltas.push_back(-40);
    for (int i = 0; i < 10; ++i) deltas.push_back(100);
    ASSERT_TRUE(RerotateKPerToken(a.cache, table, 9, deltas, rope).ok());
    ASSERT_TRUE(RerotateK(b.cache, table, 9, 20, rope, 100).ok());
    ASSERT_TRUE(RerotateK(b.cache, table, 9 + 27, 30, rope, -40).ok());
    ASSERT_TRUE(RerotateK(b.cache, table, 9 + 57, 10, rope, 100).ok());
    EXPECT_EQ(FirstDifference(a.storage, b.storage), -1);
  }
}

TEST(RotationTableTest, OneRowPerDistinctDelta) {
  RopeParams rope;
  const std::vector<int64_t> deltas = {5, 5, 0, -3, 5, -3, 0};
  auto table = BuildRotationTable(rope, 64, deltas);
  ASSERT_TRUE(table.ok());
  EXPECT_EQ(table->num_rows, 2);
  EXPECT_EQ(table->half_rotary, 32);
  EXPECT_EQ(table->token_row, (std::vector<int32_t>{0, 0, -1, 1, 0, 1, -1}));
  EXPECT_FLOAT_EQ(table->cos[0], static_cast<float>(std::cos(5.0)));
  EXPECT_FLOAT_EQ(table->sin[32], static_cast<float>(std::sin(-3.0)));
}

TEST(ConvertTest, F16cAgreesWithDtypeH) {
#ifdef RELAYKV_KV_OPS_F16C
  if (!kv_ops_internal::HaveF16c()) GTEST_SKIP() << "CPU has no F16C";
  using kv_ops_internal::F16cHalf;
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const auto bits = static_cast<uint16_t>(h);
    char buf[2];
    std::memcpy(buf, &bits, 2);
    const float want = HalfToFloat(bits);
    if (std::isnan(want)) continue;
    ASSERT_EQ(F16cHalf::Load(buf), want) << h;
  }
  // Every float bit pattern in steps of 4093 (odd, so all low-bit and
  // rounding patterns occur), plus ties and the edges of the half range.
  auto check_store = [](uint32_t bits) {
    float f;
    std::memcpy(&f, &bits, 4);
    if (std::isnan(f)) return;
    char buf[2];
    F16cHalf::Store(buf, f);
    uint16_t got;
    std::memcpy(&got, buf, 2);
    ASSERT_EQ(got, FloatToHalf(f)) << "float bits " << bits;
  };
  for (uint64_t b = 0; b <= 0xffffffffULL; b += 4093) check_store(static_cast<uint32_t>(b));
  for (uint32_t b : {0x33000000u, 0x33000001u, 0x387fe000u, 0x38800000u, 0x477fe000u, 0x477ff000u,
                     0x477fefffu, 0x3f801000u, 0x3f803000u, 0x7f800000u}) {
    check_store(b);
    check_store(b | 0x80000000u);
  }
#else
  GTEST_SKIP() << "no F16C path on this architecture";
#endif
}

// --- bad input ---------------------------------------------------------------

class BadInputTest : public ::testing::Test {
 protected:
  void SetUp() override {
    cache_ = MakeCache(KvLayout{2, 3, 64, DType::kFloat16}, 16, 4, Phys::kNhd, 1000);
    payload_ = MakePayload(cache_.cache.layout, 40, 1001);
    cache_before_ = cache_.storage;
    payload_before_ = payload_.storage;
  }
  void TearDown() override {
    // A rejected call must not have written anything.
    EXPECT_EQ(FirstDifference(cache_.storage, cache_before_), -1);
    EXPECT_EQ(FirstDifference(payload_.storage, payload_before_), -1);
  }
  static void ExpectInvalid(const Status& s, std::string_view needle) {
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
    EXPECT_NE(s.message().find(needle), std::string_view::npos) << s.ToString();
  }

  TestCache cache_;
  TestPayload payload_;
  std::vector<uint8_t> cache_before_, payload_before_;
  std::vector<int32_t> table_ = {3, 1, 0};
};

TEST_F(BadInputTest, BlockIdOutOfRange) {
  std::vector<int32_t> table = {3, 4, 0};
  ExpectInvalid(GatherKv(cache_.cache, table, 0, 40, payload_.payload, 0), "block_table[1] = 4");
  table = {3, -1, 0};
  ExpectInvalid(ScatterKv(payload_.payload, 0, 40, cache_.cache, table, 0), "block_table[1] = -1");
  ExpectInvalid(RerotateK(cache_.cache, table, 0, 40, RopeParams{}, 5), "outside [0, 4)");
  // An entry the range does not use may hold anything.
  EXPECT_TRUE(GatherKv(cache_.cache, table, 0, 16, payload_.payload, 0).ok());
  payload_before_ = payload_.storage;
}

TEST_F(BadInputTest, ShortTable) {
  ExpectInvalid(GatherKv(cache_.cache, table_, 10, 40, payload_.payload, 0),
                "block table has 3 entries");
  ExpectInvalid(
      RerotateKPerToken(cache_.cache, table_, 10, std::vector<int64_t>(40, 1), RopeParams{}),
      "block table has 3 entries");
}

TEST_F(BadInputTest, LayoutMismatch) {
  KvPayload other = payload_.payload;
  other.layout.dtype = DType::kBFloat16;
  ExpectInvalid(GatherKv(cache_.cache, table_, 0, 10, other, 0), "differs");
  other = payload_.payload;
  other.layout.num_kv_heads = 1;
  ExpectInvalid(ScatterKv(other, 0, 10, cache_.cache, table_, 0), "differs");
}

TEST_F(BadInputTest, DeviceCacheOnCpuPath) {
  PagedKvCache dev = cache_.cache;
  dev.on_device = true;
  ExpectInvalid(GatherKv(dev, table_, 0, 10, payload_.payload, 0), "on_device=true");
  ExpectInvalid(ScatterKv(payload_.payload, 0, 10, dev, table_, 0), "on_device=true");
  ExpectInvalid(RerotateK(dev, table_, 0, 10, RopeParams{}, 3), "on_device=true");
  KvPayload dev_payload = payload_.payload;
  dev_payload.on_device = true;
  ExpectInvalid(RerotateK(dev_payload, 0, 10, RopeParams{}, 3), "on_device=true");
}

TEST_F(BadInputTest, RangesOutsideThePayloadOrNegative) {
  ExpectInvalid(GatherKv(cache_.cache, table_, 0, 10, payload_.payload, 35), "payload tokens");
  ExpectInvalid(ScatterKv(payload_.payload, -1, 10, cache_.cache, table_, 0), "payload tokens");
  ExpectInvalid(GatherKv(cache_.cache, table_, -2, 10, payload_.payload, 0), "negative");
  ExpectInvalid(GatherKv(cache_.cache, table_, 0, -1, payload_.payload, 0), "negative");
  ExpectInvalid(RerotateK(payload_.payload, 30, 11, RopeParams{}, 2), "payload tokens");
}

TEST_F(BadInputTest, LayerRange) {
  ExpectInvalid(GatherKv(cache_.cache, table_, 0, 10, payload_.payload, 0, LayerRange{1, 3}),
                "layer range");
  ExpectInvalid(GatherKv(cache_.cache, table_, 0, 10, payload_.payload, 0, LayerRange{1, 1}),
                "layer range");
  ExpectInvalid(RerotateK(payload_.payload, 0, 10, RopeParams{}, 1, LayerRange{-1, 1}),
                "layer range");
}

TEST_F(BadInputTest, BadCacheOrRope) {
  PagedKvCache c = cache_.cache;
  c.k_base.pop_back();
  ExpectInvalid(GatherKv(c, table_, 0, 10, payload_.payload, 0), "one K and one V base");
  c = cache_.cache;
  c.slot_stride = 0;
  ExpectInvalid(GatherKv(c, table_, 0, 10, payload_.payload, 0), "strides");
  RopeParams rope;
  rope.rotary_dim = 66;
  ExpectInvalid(RerotateK(payload_.payload, 0, 10, rope, 1), "rotary_dim");
  KvPayload null_payload = payload_.payload;
  null_payload.data = nullptr;
  ExpectInvalid(GatherKv(cache_.cache, table_, 0, 10, null_payload, 0), "null");
}

TEST_F(BadInputTest, EmptyRangeIsANoOp) {
  EXPECT_TRUE(GatherKv(cache_.cache, table_, 48, 0, payload_.payload, 40).ok());
  EXPECT_TRUE(ScatterKv(payload_.payload, 0, 0, cache_.cache, {}, 0).ok());
  EXPECT_TRUE(RerotateK(cache_.cache, {}, 0, 0, RopeParams{}, 9).ok());
}

}  // namespace
}  // namespace relaykv
