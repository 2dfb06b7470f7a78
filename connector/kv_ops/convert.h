// Private to kv_ops: element loads and stores in fp32 for the rotation loops.
//
// The portable conversions come from dtype.h. fp16 also has an F16C version:
// the same round-to-nearest-even results for every non-NaN value (kv_ops_test
// checks all of them against dtype.h), several times faster than the
// bit-twiddling one, which otherwise costs more than the rotation itself.
// NaNs keep their payload bits under F16C and lose them under dtype.h.
#pragma once

#include <cstdint>
#include <cstring>

#include "transfer/common/dtype.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define RELAYKV_KV_OPS_F16C 1
#endif

namespace relaykv::kv_ops_internal {

template <DType kT>
struct PortableConvert {
  static float Load(const char* p) {
    if constexpr (kT == DType::kFloat32) {
      float f;
      std::memcpy(&f, p, 4);
      return f;
    } else {
      uint16_t h;
      std::memcpy(&h, p, 2);
      return kT == DType::kFloat16 ? HalfToFloat(h) : BFloat16ToFloat(h);
    }
  }
  static void Store(char* p, float f) {
    if constexpr (kT == DType::kFloat32) {
      std::memcpy(p, &f, 4);
    } else {
      const uint16_t h = kT == DType::kFloat16 ? FloatToHalf(f) : FloatToBFloat16(f);
      std::memcpy(p, &h, 2);
    }
  }
};

#ifdef RELAYKV_KV_OPS_F16C
// Call only where HaveF16c(); inlined only into functions compiled for F16C.
struct F16cHalf {
  [[gnu::target("f16c")]] static float Load(const char* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return _cvtsh_ss(h);
  }
  [[gnu::target("f16c")]] static void Store(char* p, float f) {
    const uint16_t h = _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    std::memcpy(p, &h, 2);
  }
};

inline bool HaveF16c() {
  static const bool have = __builtin_cpu_supports("f16c");
  return have;
}
#endif

}  // namespace relaykv::kv_ops_internal
