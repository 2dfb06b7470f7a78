#include "transfer/common/dtype.h"

#include <string>

namespace relaykv {

std::string_view DTypeName(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

Result<DType> ParseDType(std::string_view s) {
  if (s.starts_with("torch.")) s.remove_prefix(6);
  if (s == "float32" || s == "float" || s == "fp32") return DType::kFloat32;
  if (s == "float16" || s == "half" || s == "fp16") return DType::kFloat16;
  if (s == "bfloat16" || s == "bf16") return DType::kBFloat16;
  return InvalidArgument("unsupported dtype '" + std::string(s) +
                         "'; expected one of float32, float16, bfloat16");
}

}  // namespace relaykv
