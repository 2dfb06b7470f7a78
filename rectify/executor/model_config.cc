#include "rectify/executor/model_config.h"

#include <algorithm>
#include <array>
#include <cctype>

namespace relaykv::rectify {
namespace {

struct ArchName {
  Architecture arch;
  std::string_view model_type;
  std::string_view class_name;
};

constexpr std::array<ArchName, 4> kArchitectures = {{
    {Architecture::kLlama, "llama", "LlamaForCausalLM"},
    {Architecture::kMistral, "mistral", "MistralForCausalLM"},
    {Architecture::kQwen2, "qwen2", "Qwen2ForCausalLM"},
    {Architecture::kQwen3, "qwen3", "Qwen3ForCausalLM"},
}};

std::string Lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

}  // namespace

std::string_view ArchitectureName(Architecture a) {
  for (const ArchName& n : kArchitectures) {
    if (n.arch == a) return n.model_type;
  }
  return "unknown";
}

Result<Architecture> ParseArchitecture(std::string_view name) {
  const std::string lower = Lower(name);
  for (const ArchName& n : kArchitectures) {
    if (lower == n.model_type || lower == Lower(n.class_name)) return n.arch;
  }
  return InvalidArgument("unsupported architecture '" + std::string(name) +
                         "'; supported: " + SupportedArchitectures());
}

std::string SupportedArchitectures() {
  std::string out;
  for (const ArchName& n : kArchitectures) {
    if (!out.empty()) out += ", ";
    out += std::string(n.model_type) + " (" + std::string(n.class_name) + ")";
  }
  return out;
}

Status ModelConfig::Validate() const {
  if (ArchitectureName(architecture) == "unknown") {
    return InvalidArgument("model.architecture has an unknown code; supported: " +
                           SupportedArchitectures());
  }
  const std::pair<const char*, int32_t> positive[] = {
      {"vocab_size", vocab_size},
      {"hidden_size", hidden_size},
      {"intermediate_size", intermediate_size},
      {"num_layers", num_layers},
      {"num_heads", num_heads},
      {"num_kv_heads", num_kv_heads},
      {"head_size", head_size},
  };
  for (const auto& [key, value] : positive) {
    if (value <= 0) {
      return InvalidArgument(std::string("model.") + key + " must be > 0, got " +
                             std::to_string(value));
    }
  }
  if (num_heads % num_kv_heads != 0) {
    return InvalidArgument("model.num_heads (" + std::to_string(num_heads) +
                           ") must be a multiple of model.num_kv_heads (" +
                           std::to_string(num_kv_heads) + ")");
  }
  if (!(rms_norm_eps > 0.f)) return InvalidArgument("model.rms_norm_eps must be > 0");
  RELAYKV_RETURN_IF_ERROR(rope.Validate(head_size).WithContext("model.rope"));
  if (architecture == Architecture::kQwen3 && !qk_norm) {
    return InvalidArgument("a qwen3 model needs qk_norm = true (Qwen3 normalises q and k heads)");
  }
  if (architecture != Architecture::kQwen3 && qk_norm) {
    return InvalidArgument("qk_norm is only part of qwen3 models, not " +
                           std::string(ArchitectureName(architecture)));
  }
  if (sliding_window < 0) {
    return InvalidArgument("model.sliding_window must be >= 0 (0: none), got " +
                           std::to_string(sliding_window));
  }
  for (int32_t l : sliding_window_layers) {
    if (l < 0 || l >= num_layers) {
      return InvalidArgument("model.sliding_window_layers names layer " + std::to_string(l) +
                             " outside [0, " + std::to_string(num_layers) + ")");
    }
  }
  if (!sliding_window_layers.empty() && sliding_window == 0) {
    return InvalidArgument("model.sliding_window_layers is set but model.sliding_window is 0");
  }
  return Status::Ok();
}

int32_t ModelConfig::LayerWindow(int32_t layer) const {
  if (sliding_window == 0) return 0;
  if (sliding_window_layers.empty()) return sliding_window;
  return std::find(sliding_window_layers.begin(), sliding_window_layers.end(), layer) !=
                 sliding_window_layers.end()
             ? sliding_window
             : 0;
}

std::string ModelConfig::ToString() const {
  std::string s = "ModelConfig(" + std::string(ArchitectureName(architecture)) +
                  ", layers=" + std::to_string(num_layers) +
                  ", hidden=" + std::to_string(hidden_size) +
                  ", intermediate=" + std::to_string(intermediate_size) +
                  ", heads=" + std::to_string(num_heads) + "/" + std::to_string(num_kv_heads) +
                  ", head_size=" + std::to_string(head_size) +
                  ", vocab=" + std::to_string(vocab_size) + ", " + rope.ToString();
  if (tie_word_embeddings) s += ", tied";
  if (qkv_bias) s += ", qkv_bias";
  if (o_bias) s += ", o_bias";
  if (mlp_bias) s += ", mlp_bias";
  if (qk_norm) s += ", qk_norm";
  if (sliding_window > 0) s += ", window=" + std::to_string(sliding_window);
  return s + ")";
}

}  // namespace relaykv::rectify
