#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "transfer/common/dtype.h"
#include "transfer/common/status.h"
#include "transfer/record/kv_layout.h"
#include "transfer/record/rope_params.h"

namespace relaykv {
namespace {

TEST(StatusTest, OkCarriesNothing) {
  Status s;
  EXPECT_TRUE(s.ok());
  EXPECT_EQ(s.ToString(), "OK");
}

TEST(StatusTest, ErrorNamesCodeAndOrigin) {
  Status s = DataLoss("layer 3 checksum mismatch");
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kDataLoss);
  EXPECT_NE(s.ToString().find("DATA_LOSS: layer 3 checksum mismatch"), std::string::npos);
  EXPECT_NE(s.ToString().find("tests/cpp/common_test.cc:"), std::string::npos);
  Status c = s.WithContext("import of record 7");
  EXPECT_EQ(c.code(), StatusCode::kDataLoss);
  EXPECT_EQ(c.message(), "import of record 7: layer 3 checksum mismatch");
  EXPECT_EQ(c.line(), s.line());
}

Result<int> Half(int x) {
  if (x % 2) return InvalidArgument("odd");
  return x / 2;
}
Result<int> Quarter(int x) {
  RELAYKV_ASSIGN_OR_RETURN(int h, Half(x));
  RELAYKV_ASSIGN_OR_RETURN(int q, Half(h));
  return q;
}

TEST(ResultTest, PropagatesErrors) {
  EXPECT_EQ(*Quarter(8), 2);
  EXPECT_EQ(Quarter(6).status().code(), StatusCode::kInvalidArgument);
  Result<int> r = Status::Ok();  // misuse becomes an error, never a fake value
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInternal);
}

TEST(DTypeTest, HalfRoundTripsExactlyRepresentableValues) {
  for (float f : {0.f, -0.f, 1.f, -2.5f, 65504.f, 6.103515625e-05f, 5.960464477539063e-08f}) {
    EXPECT_EQ(HalfToFloat(FloatToHalf(f)), f) << f;
  }
  EXPECT_TRUE(std::isinf(HalfToFloat(FloatToHalf(1e6f))));
  EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(std::numeric_limits<float>::quiet_NaN()))));
}

TEST(DTypeTest, HalfRoundsToNearestEven) {
  // 1 + 2^-11 is exactly between 1 and 1 + 2^-10: ties to even (1.0).
  EXPECT_EQ(HalfToFloat(FloatToHalf(1.f + std::ldexp(1.f, -11))), 1.f);
  // 1 + 3*2^-11 lies between 1+2^-10 and 1+2^-9: ties to even (1 + 2^-9).
  EXPECT_EQ(HalfToFloat(FloatToHalf(1.f + 3 * std::ldexp(1.f, -11))), 1.f + std::ldexp(1.f, -9));
  // Every half value survives half -> float -> half.
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = HalfToFloat(static_cast<uint16_t>(h));
    if (std::isnan(f)) continue;
    EXPECT_EQ(FloatToHalf(f), h) << h;
  }
}

TEST(DTypeTest, BFloat16RoundTrip) {
  for (uint32_t b = 0; b < 0x10000; b += 7) {
    const float f = BFloat16ToFloat(static_cast<uint16_t>(b));
    if (std::isnan(f)) continue;
    EXPECT_EQ(FloatToBFloat16(f), b);
  }
  EXPECT_EQ(BFloat16ToFloat(FloatToBFloat16(1.00390625f)), 1.f);  // tie to even
}

TEST(DTypeTest, ParseNamesTheChoices) {
  EXPECT_EQ(*ParseDType("torch.bfloat16"), DType::kBFloat16);
  EXPECT_EQ(*ParseDType("half"), DType::kFloat16);
  auto bad = ParseDType("int8");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().ToString().find("float32, float16, bfloat16"), std::string::npos);
}

TEST(KvLayoutTest, ValidatesAndFingerprints) {
  KvLayout a{30, 3, 64, DType::kFloat16};
  EXPECT_TRUE(a.Validate().ok());
  KvLayout b = a;
  b.dtype = DType::kBFloat16;
  EXPECT_NE(a.Fingerprint(), b.Fingerprint());
  EXPECT_EQ(a.Fingerprint(), KvLayout(a).Fingerprint());
  KvLayout bad = a;
  bad.head_size = 63;
  EXPECT_NE(bad.Validate().ToString().find("head_size"), std::string::npos);
}

TEST(RopeParamsTest, InverseFrequencies) {
  RopeParams p;
  p.theta = 10000.f;
  auto inv = p.InverseFrequencies(64);
  ASSERT_EQ(inv.size(), 32u);
  EXPECT_DOUBLE_EQ(inv[0], 1.0);
  EXPECT_NEAR(inv[1], std::pow(10000.0, -2.0 / 64), 1e-15);
  p.rotary_dim = 32;
  EXPECT_EQ(p.InverseFrequencies(64).size(), 16u);
  RopeParams lin = p;
  lin.scaling = RopeScaling::kLinear;
  lin.factor = 4.f;
  EXPECT_NEAR(lin.InverseFrequencies(64)[3], p.InverseFrequencies(64)[3] / 4, 1e-15);
  RopeParams too_wide;
  too_wide.rotary_dim = 66;
  EXPECT_FALSE(too_wide.Validate(64).ok());
}

TEST(RopeParamsTest, Llama3ScalingMatchesReferenceFormula) {
  RopeParams p;
  p.theta = 500000.f;
  p.scaling = RopeScaling::kLlama3;
  p.factor = 8.f;
  p.low_freq_factor = 1.f;
  p.high_freq_factor = 4.f;
  p.original_max_position = 8192;
  ASSERT_TRUE(p.Validate(128).ok());
  auto inv = p.InverseFrequencies(128);
  // Highest frequency is unchanged, lowest is divided by the factor.
  EXPECT_DOUBLE_EQ(inv.front(), 1.0);
  const double base_last = std::pow(500000.0, -126.0 / 128);
  EXPECT_NEAR(inv.back(), base_last / 8, 1e-18);
}

}  // namespace
}  // namespace relaykv
