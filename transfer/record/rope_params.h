// Rotary position embedding parameters, as carried in a record header.
//
// A record's K was rotated at its source positions with these parameters; the
// importer re-rotates by the position delta and must use the same frequencies,
// so a mismatch is a reason to refuse the record.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "transfer/common/status.h"

namespace relaykv {

enum class RopeStyle : uint8_t {
  kNeox = 0,         // pairs (i, i + rotary_dim/2): Llama, Qwen, Mistral in HF layout
  kInterleaved = 1,  // pairs (2i, 2i+1): GPT-J style
};

enum class RopeScaling : uint8_t {
  kNone = 0,
  kLinear = 1,  // inv_freq / factor
  kLlama3 = 2,  // Llama 3.x frequency-dependent scaling
  kYarn = 3,    // YaRN (Qwen2.5/Qwen3 long context): ramp between interpolation and extrapolation
};

// "neox"/"interleaved" and "none"/"linear"/"llama3"/"yarn", as configs and
// messages spell them; "unknown" for a code outside the enum.
std::string_view RopeStyleName(RopeStyle style);
std::string_view RopeScalingName(RopeScaling scaling);

struct RopeParams {
  float theta = 10000.f;
  int32_t rotary_dim = 0;  // <= head_size; 0 means head_size
  RopeStyle style = RopeStyle::kNeox;
  RopeScaling scaling = RopeScaling::kNone;
  float factor = 1.f;
  float low_freq_factor = 1.f;
  float high_freq_factor = 4.f;
  int32_t original_max_position = 8192;
  // YaRN only. attention_factor multiplies cos and sin, so it is part of every
  // stored K; a re-rotation is a pure rotation and leaves it as it is.
  float beta_fast = 32.f;
  float beta_slow = 1.f;
  float attention_factor = 1.f;
  bool truncate = true;  // round the ramp's ends to whole dimensions, as transformers and vLLM do

  // The factor on cos/sin when the model applies RoPE (1 unless YaRN).
  float CosSinScale() const { return scaling == RopeScaling::kYarn ? attention_factor : 1.f; }

  Status Validate(int32_t head_size) const;
  // rotary_dim/2 inverse frequencies (radians per position), in double so a
  // re-rotation by thousands of positions keeps full precision.
  std::vector<double> InverseFrequencies(int32_t head_size) const;
  uint64_t Fingerprint() const;
  std::string ToString() const;
  bool operator==(const RopeParams&) const = default;
};

}  // namespace relaykv
