// The shape of a Llama-family decoder, as the executor needs it.
//
// Plain data, no torch types: the profiler, the connector and the bindings
// describe a model with it without pulling libtorch headers in. Whoever loads
// the weights (the Python loader from a transformers config, vLLM's model)
// fills it; the executor checks the weights against it.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "transfer/common/status.h"
#include "transfer/record/rope_params.h"

namespace relaykv::rectify {

// The variants differ only in which optional pieces they carry; the flags of
// ModelConfig say which. The architecture is kept for messages and so that a
// config that contradicts its family fails early.
enum class Architecture : uint8_t {
  kLlama = 0,    // LlamaForCausalLM (SmolLM2): optional attention/MLP bias
  kMistral = 1,  // MistralForCausalLM: sliding window on every layer
  kQwen2 = 2,    // Qwen2ForCausalLM: q/k/v bias, no o_proj bias
  kQwen3 = 3,    // Qwen3ForCausalLM: RMSNorm on each q and k head
};

std::string_view ArchitectureName(Architecture a);  // "llama", "mistral", "qwen2", "qwen3"
// Accepts transformers' model_type ("llama") and class name ("LlamaForCausalLM").
Result<Architecture> ParseArchitecture(std::string_view name);
// "llama (LlamaForCausalLM), mistral (...), ...": for error messages.
std::string SupportedArchitectures();

struct ModelConfig {
  Architecture architecture = Architecture::kLlama;
  int32_t vocab_size = 0;
  int32_t hidden_size = 0;
  int32_t intermediate_size = 0;
  int32_t num_layers = 0;
  int32_t num_heads = 0;     // query heads
  int32_t num_kv_heads = 0;  // divides num_heads (grouped-query attention)
  int32_t head_size = 0;     // may differ from hidden_size / num_heads (Qwen3)
  float rms_norm_eps = 1e-6f;
  RopeParams rope;
  bool tie_word_embeddings = false;  // lm_head reuses model.embed_tokens.weight
  bool qkv_bias = false;             // q_proj/k_proj/v_proj carry a bias
  bool o_bias = false;               // o_proj carries a bias
  bool mlp_bias = false;             // gate/up/down carry a bias
  bool qk_norm = false;              // per-head RMSNorm of q and k before RoPE
  // Keys older than sliding_window positions are not attended (0: no window).
  int32_t sliding_window = 0;
  // Which layers use the window; empty means all of them (Mistral). Qwen2/3
  // name them per layer.
  std::vector<int32_t> sliding_window_layers;

  Status Validate() const;
  // Window of one layer (0: full attention).
  int32_t LayerWindow(int32_t layer) const;
  std::string ToString() const;
};

}  // namespace relaykv::rectify
