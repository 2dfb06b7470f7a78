// A Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) that computes any set
// of a sequence's tokens over any layer range, against KV held in a paged cache.
//
// Rectification recomputes a few tokens of an imported span in a few layers
// while every other token keeps the KV that was imported for it. So unlike a
// serving engine's forward, the unit of work here is (tokens × layers):
//
//   * the computed tokens of a sequence are any positions (not only a tail);
//   * attention of a token at position p reads every cache position <= p of its
//     sequence (within its context length), computed in this call or not;
//   * the layer range [first_layer, last_layer] is the caller's: the input of
//     first_layer is the embedding when it is 0, else hidden states the caller
//     kept from an earlier call, and the output is the residual stream after
//     last_layer (plus logits of chosen rows when last_layer is the final one);
//   * per layer, a caller can look at the fresh K/V of the computed tokens next
//     to what the cache held for them, at the attention weights chosen query
//     rows give each key, and at the hidden states.
//
// Everything runs as torch ops on the device of the weights (CPU or CUDA), in
// the weights' dtype, with torch's intra-op thread setting; attention uses the
// fused scaled_dot_product_attention and only observed rows pay for an
// explicit softmax(QK^T). Errors, including torch's, come back as a Status.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "rectify/executor/model_config.h"
#include "transfer/common/status.h"

namespace relaykv::rectify {

// HF parameter names ("model.layers.0.self_attn.q_proj.weight") to tensors,
// which the executor keeps by reference: no copy is made. vLLM's fused
// "qkv_proj" and "gate_up_proj" are accepted too (split into views).
using WeightMap = std::unordered_map<std::string, at::Tensor>;

// One layer's paged K and V, each [num_blocks, block_size, num_kv_heads,
// head_size] with any strides, so views of vLLM's per-layer tensors, of the
// HND variant or of K|V packed along the last dim all fit.
struct LayerKvCache {
  at::Tensor k;
  at::Tensor v;
};

// Views K and V of vLLM's per-layer [2, num_blocks, block_size, kv_heads,
// head_size] cache tensor (no copy).
Result<LayerKvCache> SplitVllmLayerCache(const at::Tensor& kv);

// Allocates a zeroed cache in vLLM's layout: one [2, num_blocks, block_size,
// kv_heads, head_size] tensor per layer.
Result<std::vector<at::Tensor>> AllocateVllmKvCache(const ModelConfig& config, int64_t num_blocks,
                                                    int32_t block_size, at::ScalarType dtype,
                                                    at::Device device);

// What to look at during a forward. Layers must lie in the call's range.
struct ObserveSpec {
  // Fresh K (after RoPE) and V of every computed token, and what the cache
  // held at those slots before this call wrote them.
  std::vector<int32_t> kv_layers;
  // Attention weights (softmax over keys, per head) of attention_rows.
  std::vector<int32_t> attention_layers;
  at::Tensor attention_rows;  // int64 [A] on CPU: rows of the computed tokens
  // Instead of the weights, only what influence scoring needs: per sequence
  // and key position, the head-mean weight summed over the observed rows
  // after that position, and how many such rows there are. Computed a block
  // of rows at a time, so the [A, heads, C] weights never exist at once.
  bool attention_key_mass = false;
  // The residual stream after these layers, for every computed token.
  std::vector<int32_t> hidden_layers;
};

struct ForwardInput {
  // Sequence i computes query_lens[i] >= 1 tokens: rows [sum(query_lens[:i]),
  // sum(query_lens[:i+1])) of the token-major tensors below (T rows in all).
  std::vector<int64_t> query_lens;
  // Sequence i attends to its positions [0, context_lens[i]). Positions not
  // computed in this call must already hold valid KV in the cache.
  std::vector<int64_t> context_lens;
  // int32 or int64 [num_seqs, max_blocks] on CPU: position p of sequence i
  // lives in block block_tables[i][p / block_size], slot p % block_size.
  at::Tensor block_tables;
  // int64 (or int32) [T] on CPU: position of each computed token in its
  // sequence; any order, no position twice in one sequence, < context_lens.
  at::Tensor positions;
  at::Tensor token_ids;      // integer [T]; needed when first_layer == 0
  at::Tensor hidden_states;  // [T, hidden_size]: input of first_layer when > 0
  int32_t first_layer = 0;
  int32_t last_layer = -1;  // -1: the final layer
  // The fresh K/V of the computed tokens go into the cache in every layer of
  // the range (attention uses them either way), except in skip_write_layers,
  // or nowhere when write_kv is false.
  bool write_kv = true;
  std::vector<int32_t> skip_write_layers;
  // int64 [R] on CPU: rows whose next-token logits to return (final norm +
  // lm_head, float32). Needs last_layer to be the final layer.
  at::Tensor logits_rows;
  ObserveSpec observe;
};

struct KvObservation {
  int32_t layer = 0;
  at::Tensor fresh_k;   // [T, kv_heads, head_size], model dtype, RoPE applied
  at::Tensor fresh_v;   // [T, kv_heads, head_size]
  at::Tensor cached_k;  // [T, kv_heads, head_size], cache dtype, before this call's write
  at::Tensor cached_v;
};

struct AttentionObservation {
  int32_t layer = 0;
  // float32 [A, num_heads, C]: probs[a, h, j] is the weight row a gives key
  // position j of its sequence; C is the largest context among the rows'
  // sequences; masked and out-of-context entries are 0.
  at::Tensor probs;
  // With observe.attention_key_mass (probs is then undefined), float32
  // [num_seqs, C]: key_mass[s, j] sums the head-mean weight that observed
  // rows of sequence s at positions > j give position j; key_followers[s, j]
  // counts those rows.
  at::Tensor key_mass;
  at::Tensor key_followers;
};

struct HiddenObservation {
  int32_t layer = 0;
  at::Tensor hidden;  // [T, hidden_size] after the layer
};

struct ForwardOutput {
  at::Tensor hidden_states;       // [T, hidden_size] after last_layer (before the final norm)
  at::Tensor logits;              // float32 [R, vocab]; undefined when no rows were asked
  std::vector<KvObservation> kv;  // in the order of observe.kv_layers
  std::vector<AttentionObservation> attention;  // in the order of observe.attention_layers
  std::vector<HiddenObservation> hidden;        // in the order of observe.hidden_layers
};

class ModelExecutor {
 public:
  // Checks every weight's presence, shape, dtype and device against config;
  // names that the config does not use are an error too (a wrong config
  // should not load silently). The device and dtype are those of the weights.
  static Result<std::unique_ptr<ModelExecutor>> Create(const ModelConfig& config,
                                                       const WeightMap& weights);
  ~ModelExecutor();
  ModelExecutor(const ModelExecutor&) = delete;
  ModelExecutor& operator=(const ModelExecutor&) = delete;

  const ModelConfig& config() const;
  at::Device device() const;
  at::ScalarType dtype() const;

  // kv_cache has one entry per model layer (only those in the range are
  // touched), all on the executor's device with the same block geometry. The
  // cache may hold another floating dtype than the weights; KV is converted.
  Result<ForwardOutput> Forward(const ForwardInput& input,
                                const std::vector<LayerKvCache>& kv_cache) const;

  // The input of layer 0 for token ids [T] -> [T, hidden_size].
  Result<at::Tensor> Embed(const at::Tensor& token_ids) const;
  // Final norm + lm_head of hidden states after the final layer -> float32 [N, vocab].
  Result<at::Tensor> Logits(const at::Tensor& hidden_states) const;

 private:
  struct Impl;
  explicit ModelExecutor(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace relaykv::rectify
