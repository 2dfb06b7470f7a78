#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <thread>

#include "transfer/common/dtype.h"
#include "transfer/common/net.h"
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

// Qwen3's long-context setting (factor 4 over 32,768 positions, theta 1e6,
// head 128): low = floor(128 ln(32768 / 64 pi) / 2 ln 1e6) = 23 and
// high = ceil(128 ln(32768 / 2 pi) / 2 ln 1e6) = 40. Dimensions below 23 keep
// their frequency, those from 40 are divided by 4, the ones between blend.
TEST(RopeParamsTest, YarnRampsBetweenKeptAndScaledFrequencies) {
  RopeParams p;
  p.theta = 1000000.f;
  p.scaling = RopeScaling::kYarn;
  p.factor = 4.f;
  p.original_max_position = 32768;
  ASSERT_TRUE(p.Validate(128).ok());
  const auto inv = p.InverseFrequencies(128);
  auto base = [](int i) { return std::pow(1000000.0, -2.0 * i / 128); };
  for (int i = 0; i <= 23; ++i) EXPECT_NEAR(inv[i], base(i), 1e-15) << i;
  for (int i = 40; i < 64; ++i) EXPECT_NEAR(inv[i], base(i) / 4, 1e-18) << i;
  const double ramp = (30 - 23) / 17.0;  // dimension 30 of the ramp [23, 40]
  EXPECT_NEAR(inv[30], base(30) / 4 * ramp + base(30) * (1 - ramp), 1e-15);
  // Without truncation the ramp is [23.60, 39.65]: dimension 24 is 0.025 of the
  // way along it instead of 1/17.
  RopeParams untruncated = p;
  untruncated.truncate = false;
  const double ramp24 = (24 - 23.5959476083381) / (39.6508807104171 - 23.5959476083381);
  EXPECT_NEAR(untruncated.InverseFrequencies(128)[24],
              base(24) / 4 * ramp24 + base(24) * (1 - ramp24), 1e-12);
  EXPECT_EQ(p.CosSinScale(), 1.f);  // attention_factor is what the caller sets
  p.attention_factor = 1.25f;
  EXPECT_EQ(p.CosSinScale(), 1.25f);
}

TEST(RopeParamsTest, YarnFieldsAreValidatedAndFingerprintedOnlyForYarn) {
  RopeParams p;
  p.scaling = RopeScaling::kYarn;
  p.factor = 4.f;
  ASSERT_TRUE(p.Validate(64).ok());
  RopeParams bad = p;
  bad.beta_slow = 0.f;
  EXPECT_FALSE(bad.Validate(64).ok());
  bad = p;
  bad.attention_factor = 0.f;
  EXPECT_FALSE(bad.Validate(64).ok());
  bad = p;
  bad.original_max_position = 0;
  EXPECT_FALSE(bad.Validate(64).ok());
  RopeParams other = p;
  other.beta_fast = 16.f;
  EXPECT_NE(other.Fingerprint(), p.Fingerprint());
  other = p;
  other.truncate = false;
  EXPECT_NE(other.Fingerprint(), p.Fingerprint());
  // Other scalings ignore the YaRN fields, in the fingerprint as in the frequencies.
  RopeParams plain, plain_other;
  plain_other.beta_fast = 16.f;
  plain_other.attention_factor = 2.f;
  EXPECT_EQ(plain.Fingerprint(), plain_other.Fingerprint());
  EXPECT_EQ(plain.InverseFrequencies(64), plain_other.InverseFrequencies(64));
  EXPECT_EQ(plain_other.CosSinScale(), 1.f);
}

}  // namespace
}  // namespace relaykv

// ---- net::RecvExact spin ------------------------------------------------------

namespace relaykv {
namespace {

using namespace std::chrono_literals;

struct SocketPair {
  SocketPair() { EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0); }
  ~SocketPair() {
    ::close(fds[0]);
    ::close(fds[1]);
  }
  int fds[2] = {-1, -1};
};

// Bytes that arrive while the receiver spins, and bytes that arrive after
// the spin ran out (the receiver then sleeps in poll), are both received.
TEST(NetTest, RecvExactWithSpinReceivesEarlyAndLateBytes) {
  for (auto delay : {0ms, 20ms}) {
    SCOPED_TRACE(delay.count());
    SocketPair p;
    std::thread sender([&] {
      std::this_thread::sleep_for(delay);
      ASSERT_EQ(::send(p.fds[1], "abc", 3, 0), 3);
      std::this_thread::sleep_for(delay);
      ASSERT_EQ(::send(p.fds[1], "def", 3, 0), 3);
    });
    char got[6] = {};
    Status s = net::RecvExact(p.fds[0], got, sizeof(got), std::chrono::steady_clock::now() + 5s,
                              std::chrono::microseconds(100));
    sender.join();
    ASSERT_TRUE(s.ok()) << s.ToString();
    EXPECT_EQ(std::string(got, sizeof(got)), "abcdef");
  }
}

// A spin longer than the deadline still ends at the deadline.
TEST(NetTest, RecvExactSpinDoesNotOutlastTheDeadline) {
  SocketPair p;
  char c;
  const auto t0 = std::chrono::steady_clock::now();
  Status s = net::RecvExact(p.fds[0], &c, 1, t0 + 50ms, std::chrono::microseconds(10'000'000));
  EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s.ToString();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 2s);
}

// A peer that closes while the receiver spins is Unavailable, not a hang.
TEST(NetTest, RecvExactSpinSeesAClosedPeer) {
  auto p = std::make_unique<SocketPair>();
  ::shutdown(p->fds[1], SHUT_WR);
  char c;
  Status s = net::RecvExact(p->fds[0], &c, 1, std::chrono::steady_clock::now() + 5s,
                            std::chrono::microseconds(100));
  EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s.ToString();
}

}  // namespace
}  // namespace relaykv
