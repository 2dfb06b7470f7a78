#include "transfer/record/rope_params.h"

#include <xxhash.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numbers>

namespace relaykv {

std::string_view RopeStyleName(RopeStyle style) {
  switch (style) {
    case RopeStyle::kNeox:
      return "neox";
    case RopeStyle::kInterleaved:
      return "interleaved";
  }
  return "unknown";
}

std::string_view RopeScalingName(RopeScaling scaling) {
  switch (scaling) {
    case RopeScaling::kNone:
      return "none";
    case RopeScaling::kLinear:
      return "linear";
    case RopeScaling::kLlama3:
      return "llama3";
    case RopeScaling::kYarn:
      return "yarn";
  }
  return "unknown";
}

Status RopeParams::Validate(int32_t head_size) const {
  if (!(theta > 1.f) || !std::isfinite(theta)) {
    return InvalidArgument("rope.theta must be a finite value > 1, got " + std::to_string(theta));
  }
  const int32_t rd = rotary_dim == 0 ? head_size : rotary_dim;
  if (rd <= 0 || rd > head_size || rd % 2 != 0) {
    return InvalidArgument("rope.rotary_dim must be even and in (0, head_size=" +
                           std::to_string(head_size) + "], got " + std::to_string(rotary_dim));
  }
  if (static_cast<uint8_t>(style) > 1) return InvalidArgument("rope.style has an unknown code");
  if (static_cast<uint8_t>(scaling) > 3) return InvalidArgument("rope.scaling has an unknown code");
  if (scaling != RopeScaling::kNone && !(factor > 0.f)) {
    return InvalidArgument("rope.factor must be > 0 when scaling is set");
  }
  if (scaling == RopeScaling::kLlama3) {
    if (!(high_freq_factor > low_freq_factor) || original_max_position <= 0) {
      return InvalidArgument(
          "llama3 rope scaling needs high_freq_factor > low_freq_factor and "
          "original_max_position > 0");
    }
  }
  if (scaling == RopeScaling::kYarn) {
    // The ramp's ends are log(original_max_position / (2 pi beta)); both must be defined.
    if (original_max_position <= 0 || !(beta_fast > 0.f) || !(beta_slow > 0.f) ||
        !std::isfinite(beta_fast) || !std::isfinite(beta_slow)) {
      return InvalidArgument(
          "yarn rope scaling needs original_max_position > 0 and finite beta_fast, beta_slow > 0");
    }
    if (!(attention_factor > 0.f) || !std::isfinite(attention_factor)) {
      return InvalidArgument("yarn rope.attention_factor must be finite and > 0, got " +
                             std::to_string(attention_factor));
    }
  }
  return Status::Ok();
}

std::vector<double> RopeParams::InverseFrequencies(int32_t head_size) const {
  const int32_t rd = rotary_dim == 0 ? head_size : rotary_dim;
  std::vector<double> inv(rd / 2);
  for (int32_t i = 0; i < rd / 2; ++i) {
    inv[i] = 1.0 / std::pow(static_cast<double>(theta), (2.0 * i) / rd);
  }
  if (scaling == RopeScaling::kLinear) {
    for (double& f : inv) f /= factor;
  } else if (scaling == RopeScaling::kLlama3) {
    const double low_wavelen = original_max_position / static_cast<double>(low_freq_factor);
    const double high_wavelen = original_max_position / static_cast<double>(high_freq_factor);
    for (double& f : inv) {
      const double wavelen = 2.0 * std::numbers::pi / f;
      if (wavelen < high_wavelen) continue;  // high frequency: unchanged
      if (wavelen > low_wavelen) {
        f /= factor;
      } else {
        const double smooth = (original_max_position / wavelen - low_freq_factor) /
                              (high_freq_factor - low_freq_factor);
        f = (1.0 - smooth) * f / factor + smooth * f;
      }
    }
  } else if (scaling == RopeScaling::kYarn) {
    // Dimensions turning fewer than beta_slow times over the original context
    // are interpolated (divided by factor), more than beta_fast times kept, and
    // a linear ramp blends the ones between (YaRN, arXiv 2309.00071).
    const double log_theta = std::log(static_cast<double>(theta));
    auto correction_dim = [&](double rotations) {
      return rd * std::log(original_max_position / (rotations * 2.0 * std::numbers::pi)) /
             (2.0 * log_theta);
    };
    double low = correction_dim(beta_fast);
    double high = correction_dim(beta_slow);
    if (truncate) {
      low = std::floor(low);
      high = std::ceil(high);
    }
    low = std::max(low, 0.0);
    high = std::min(high, static_cast<double>(rd - 1));
    if (low == high) high += 0.001;
    for (int32_t i = 0; i < rd / 2; ++i) {
      const double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
      const double keep = 1.0 - ramp;  // weight of the unscaled frequency
      inv[i] = inv[i] / factor * (1.0 - keep) + inv[i] * keep;
    }
  }
  return inv;
}

uint64_t RopeParams::Fingerprint() const {
  uint8_t buf[26];
  std::memcpy(buf + 0, &theta, 4);
  std::memcpy(buf + 4, &rotary_dim, 4);
  buf[8] = static_cast<uint8_t>(style);
  buf[9] = static_cast<uint8_t>(scaling);
  std::memcpy(buf + 10, &factor, 4);
  std::memcpy(buf + 14, &low_freq_factor, 4);
  std::memcpy(buf + 18, &high_freq_factor, 4);
  std::memcpy(buf + 22, &original_max_position, 4);
  // YaRN's fields are hashed only for YaRN, so other fingerprints are unchanged.
  if (scaling != RopeScaling::kYarn) return XXH64(buf, sizeof(buf), /*seed=*/0x726f7065ULL);
  uint8_t yarn[sizeof(buf) + 13];
  std::memcpy(yarn, buf, sizeof(buf));
  std::memcpy(yarn + 26, &beta_fast, 4);
  std::memcpy(yarn + 30, &beta_slow, 4);
  std::memcpy(yarn + 34, &attention_factor, 4);
  yarn[38] = truncate ? 1 : 0;
  return XXH64(yarn, sizeof(yarn), /*seed=*/0x726f7065ULL);
}

std::string RopeParams::ToString() const {
  return "RopeParams(theta=" + std::to_string(theta) +
         ", rotary_dim=" + std::to_string(rotary_dim) +
         ", style=" + std::string(RopeStyleName(style)) +
         ", scaling=" + std::string(RopeScalingName(scaling)) + ")";
}

}  // namespace relaykv
