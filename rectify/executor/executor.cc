// The only translation unit of the executor that includes ATen's operators:
// keep it that way, each one costs a long compile on the 2-core CI machine.
#include "rectify/executor/executor.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <tuple>
#include <utility>

namespace relaykv::rectify {
namespace {

std::string ShapeString(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(sizes[i]);
  }
  return s + "]";
}

std::string DtypeString(at::ScalarType t) { return std::string(c10::toString(t)); }

// torch reports misuse by throwing; the executor's callers get a Status.
template <typename Fn>
auto GuardTorch(const char* what, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const c10::OutOfMemoryError& e) {
    return ResourceExhausted(std::string(what) + ": " + e.what_without_backtrace());
  } catch (const c10::Error& e) {
    return Internal(std::string(what) + ": torch error: " + e.what_without_backtrace());
  } catch (const std::exception& e) {
    return Internal(std::string(what) + ": " + e.what());
  }
}

struct LayerWeights {
  at::Tensor input_norm, post_norm;
  at::Tensor qkv_w, qkv_b;  // vLLM's fused projection, when that is what was given
  at::Tensor q_w, k_w, v_w, q_b, k_b, v_b;
  at::Tensor o_w, o_b;
  at::Tensor q_norm, k_norm;
  at::Tensor gate_up_w, gate_up_b;  // fused, when given
  at::Tensor gate_w, up_w, gate_b, up_b;
  at::Tensor down_w, down_b;
  int32_t window = 0;
};

// Hands out weights by name, checking shape, dtype and device, and remembers
// which names were used so leftovers can be reported.
class WeightReader {
 public:
  explicit WeightReader(const WeightMap& weights) : weights_(weights) {}

  bool Has(const std::string& name) const { return weights_.count(name) != 0; }

  Result<at::Tensor> Take(const std::string& name, std::vector<int64_t> shape) {
    auto it = weights_.find(name);
    if (it == weights_.end()) return NotFound("weight '" + name + "' is missing");
    used_.insert(name);
    const at::Tensor& t = it->second;
    if (!t.defined()) return InvalidArgument("weight '" + name + "' is an undefined tensor");
    if (t.sizes() != at::IntArrayRef(shape)) {
      return InvalidArgument("weight '" + name + "' has shape " + ShapeString(t.sizes()) +
                             ", the config expects " + ShapeString(shape));
    }
    if (!at::isFloatingType(t.scalar_type())) {
      return InvalidArgument("weight '" + name + "' has dtype " + DtypeString(t.scalar_type()) +
                             "; weights must be float32, float16 or bfloat16");
    }
    if (!device_) {
      device_ = t.device();
      dtype_ = t.scalar_type();
    } else if (t.device() != *device_ || t.scalar_type() != dtype_) {
      return InvalidArgument("weight '" + name + "' is " + DtypeString(t.scalar_type()) + " on " +
                             t.device().str() + " but the others are " + DtypeString(dtype_) +
                             " on " + device_->str() + "; all weights share one dtype and device");
    }
    return t;
  }

  // Optional weights: absent is fine when `wanted` is false, an error when true.
  Result<at::Tensor> TakeIf(bool wanted, const std::string& name, std::vector<int64_t> shape) {
    if (!wanted) {
      if (Has(name)) {
        return InvalidArgument("weight '" + name +
                               "' is present but the config does not use it (check the bias / "
                               "qk_norm flags of the ModelConfig)");
      }
      return at::Tensor();
    }
    return Take(name, std::move(shape));
  }

  std::vector<std::string> Unused() const {
    std::vector<std::string> out;
    for (const auto& [name, t] : weights_) {
      if (!used_.count(name)) out.push_back(name);
    }
    std::sort(out.begin(), out.end());
    return out;
  }

  at::Device device() const { return device_.value_or(at::kCPU); }
  at::ScalarType dtype() const { return dtype_; }

 private:
  const WeightMap& weights_;
  std::set<std::string> used_;
  std::optional<at::Device> device_;
  at::ScalarType dtype_ = at::kFloat;
};

// Rows of a paged cache, addressed both ways: flat (block * block_size + slot)
// for caches whose block and slot dims merge into one, (block, slot) pairs
// for any other strides.
struct CacheIndex {
  at::Tensor flat;
  at::Tensor block;
  at::Tensor slot;
};

// [num_blocks * block_size, heads, dim] view when the block and slot dims merge.
at::Tensor FlatRows(const at::Tensor& cache) {
  if (cache.size(0) > 1 && cache.stride(0) != cache.size(1) * cache.stride(1)) return {};
  return cache.as_strided({cache.size(0) * cache.size(1), cache.size(2), cache.size(3)},
                          {cache.stride(1), cache.stride(2), cache.stride(3)},
                          cache.storage_offset());
}

at::Tensor GatherRows(const at::Tensor& cache, const CacheIndex& idx) {
  at::Tensor flat = FlatRows(cache);
  if (flat.defined()) return flat.index_select(0, idx.flat);
  return cache.index({idx.block, idx.slot});
}

void ScatterRows(const at::Tensor& cache, const CacheIndex& idx, const at::Tensor& values) {
  at::Tensor src = values.to(cache.scalar_type());
  at::Tensor flat = FlatRows(cache);
  if (flat.defined()) {
    flat.index_copy_(0, idx.flat, src);
  } else {
    at::Tensor target = cache;  // a handle to the same storage
    target.index_put_({idx.block, idx.slot}, src);
  }
}

struct SeqInfo {
  int64_t q_begin = 0;
  int64_t q_len = 0;
  int64_t ctx_len = 0;
  // Computes exactly positions 0..ctx_len-1 in order: its keys are its own
  // fresh rows, nothing is read from the cache (plain prefill).
  bool full = false;
  // Its only query is its last context position: every key is visible.
  bool tail_one = false;
  int64_t ctx_base = -1;  // row of its position 0 in the gathered context; -1: not gathered
};

struct AttentionGroup {
  int64_t seq = 0;
  at::Tensor rows;      // device: rows of the computed tokens
  at::Tensor out_rows;  // device: rows of the observation output
  at::Tensor qpos;      // device: their positions
};

// Everything about a batch that does not depend on the layer, built once per
// Forward: addresses, masks, padding.
struct Plan {
  int64_t num_tokens = 0;
  int64_t num_seqs = 0;
  std::vector<SeqInfo> seqs;
  at::Tensor positions;      // device int64 [T]
  CacheIndex write;          // cache rows of the computed tokens
  bool gather = false;       // some keys come from the cache
  CacheIndex context;        // cache rows of the gathered context
  bool overlay_all = false;  // every computed row is overlaid, in row order
  at::Tensor overlay_src;    // computed rows whose fresh K/V replace...
  at::Tensor overlay_dst;    // ...these rows of the gathered context
  // Decode-like batches run as one padded attention call instead of a loop.
  bool padded = false;
  int64_t t_max = 0;
  int64_t c_max = 0;
  bool pad_identity = false;  // every sequence has t_max queries
  at::Tensor pad_index;       // device: row r -> its row in [num_seqs * t_max]
  std::map<int32_t, std::vector<at::Tensor>> seq_masks;  // per window; undefined: none needed
  std::map<int32_t, at::Tensor> padded_masks;            // per window
  std::vector<AttentionGroup> attention_groups;
  int64_t attention_rows = 0;
  int64_t attention_ctx = 0;
};

at::Tensor CpuLong(const std::vector<int64_t>& v) {
  return at::tensor(at::ArrayRef<int64_t>(v), at::TensorOptions().dtype(at::kLong));
}

// Keys visible from query positions qpos [n] among positions [0, ctx): bool [n, ctx].
at::Tensor VisibleKeys(const at::Tensor& qpos, int64_t ctx, int32_t window) {
  at::Tensor key = at::arange(ctx, qpos.options()).unsqueeze(0);
  at::Tensor q = qpos.unsqueeze(1);
  at::Tensor m = key <= q;
  if (window > 0) m = m.logical_and(key > q - window);
  return m;
}

Status CheckLayerList(const std::vector<int32_t>& layers, int32_t first, int32_t last,
                      const char* what) {
  std::set<int32_t> seen;
  for (int32_t l : layers) {
    if (l < first || l > last) {
      return InvalidArgument(std::string(what) + " names layer " + std::to_string(l) +
                             ", outside the call's range [" + std::to_string(first) + ", " +
                             std::to_string(last) + "]");
    }
    if (!seen.insert(l).second) {
      return InvalidArgument(std::string(what) + " names layer " + std::to_string(l) + " twice");
    }
  }
  return Status::Ok();
}

Result<at::Tensor> CpuIndexTensor(const at::Tensor& t, const char* what) {
  if (!t.defined()) return at::Tensor();
  if (t.dim() != 1) {
    return InvalidArgument(std::string(what) + " must be 1-D, got shape " + ShapeString(t.sizes()));
  }
  if (!t.device().is_cpu()) return InvalidArgument(std::string(what) + " must be a CPU tensor");
  if (!at::isIntegralType(t.scalar_type(), /*includeBool=*/false)) {
    return InvalidArgument(std::string(what) + " must hold integers, got " +
                           DtypeString(t.scalar_type()));
  }
  return t.to(at::kLong).contiguous();
}

}  // namespace

struct ModelExecutor::Impl {
  ModelConfig config;
  at::Device device = at::kCPU;
  at::ScalarType dtype = at::kFloat;
  at::Tensor embed;
  at::Tensor final_norm;
  at::Tensor lm_head;
  std::vector<LayerWeights> layers;
  at::Tensor inv_freq;  // float32 [rotary_dim / 2] on the device
  int64_t rotary_dim = 0;
  double scale = 1.0;

  Status Load(const WeightMap& weights);
  Result<Plan> BuildPlan(const ForwardInput& in, int64_t num_blocks, int64_t block_size,
                         const std::set<int32_t>& windows) const;
  Result<ForwardOutput> Forward(const ForwardInput& in,
                                const std::vector<LayerKvCache>& kv_cache) const;

  // Rotation angles [T, rotary_dim / 2], float32 like transformers and vLLM.
  at::Tensor Angles(const at::Tensor& positions) const {
    return positions.to(at::kFloat).unsqueeze(1) * inv_freq.unsqueeze(0);
  }

  Result<at::Tensor> EmbedTokens(const at::Tensor& ids, int64_t expected_rows) const {
    if (!ids.defined()) {
      return InvalidArgument("token_ids is required when the forward starts at layer 0");
    }
    if (ids.dim() != 1 || (expected_rows >= 0 && ids.size(0) != expected_rows) ||
        !at::isIntegralType(ids.scalar_type(), /*includeBool=*/false)) {
      return InvalidArgument("token_ids must be an integer tensor [" +
                             (expected_rows >= 0 ? std::to_string(expected_rows) : "T") +
                             "], got " + DtypeString(ids.scalar_type()) + " " +
                             ShapeString(ids.sizes()));
    }
    // A device tensor is not checked: that would cost a synchronisation.
    if (ids.device().is_cpu() && ids.numel() > 0 &&
        (ids.min().item<int64_t>() < 0 || ids.max().item<int64_t>() >= config.vocab_size)) {
      return InvalidArgument(
          "token_ids must lie in [0, vocab_size=" + std::to_string(config.vocab_size) + ")");
    }
    return at::embedding(embed, ids.to(device, at::kLong));
  }

  at::Tensor LogitsOf(const at::Tensor& h) const {
    return at::linear(RmsNorm(h, final_norm), lm_head).to(at::kFloat);
  }

  // Like transformers: normalise in float32, cast back, then scale.
  at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& w) const {
    at::Tensor xf = x.to(at::kFloat);
    at::Tensor var = xf.pow(2).mean(-1, /*keepdim=*/true);
    return w * (xf * at::rsqrt(var + config.rms_norm_eps)).to(x.scalar_type());
  }

  // x [T, heads, head_size]; cos/sin [T, 1, rotary_dim / 2] in x's dtype.
  // Same products and sums as transformers' x*cos + rotate_half(x)*sin, written
  // straight into one output instead of through six temporaries.
  at::Tensor ApplyRope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) const {
    const int64_t half = rotary_dim / 2;
    at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
    if (config.rope.style == RopeStyle::kNeox) {
      const at::Tensor a = x.narrow(-1, 0, half), b = x.narrow(-1, half, half);
      at::Tensor oa = out.narrow(-1, 0, half), ob = out.narrow(-1, half, half);
      at::mul_out(oa, a, cos).sub_(b * sin);
      at::mul_out(ob, b, cos).add_(a * sin);
    } else {
      const at::Tensor pairs = x.narrow(-1, 0, rotary_dim).unflatten(-1, {half, 2});
      const at::Tensor a = pairs.select(-1, 0), b = pairs.select(-1, 1);
      at::Tensor opairs = out.narrow(-1, 0, rotary_dim).unflatten(-1, {half, 2});
      at::Tensor oa = opairs.select(-1, 0), ob = opairs.select(-1, 1);
      at::mul_out(oa, a, cos).sub_(b * sin);
      at::mul_out(ob, b, cos).add_(a * sin);
    }
    if (rotary_dim < config.head_size) {
      const int64_t rest = config.head_size - rotary_dim;
      out.narrow(-1, rotary_dim, rest).copy_(x.narrow(-1, rotary_dim, rest));
    }
    return out;
  }

  // Attention of q [n, H, d] over keys k, v [ctx, kv_heads, d]; mask bool
  // [n, ctx] or undefined with `causal` (n == ctx) or full visibility.
  at::Tensor Attend(const at::Tensor& q, at::Tensor k, at::Tensor v, const at::Tensor& mask,
                    bool causal) const {
    at::Tensor qt = q.transpose(0, 1).unsqueeze(0);
    k = k.transpose(0, 1).unsqueeze(0);
    v = v.transpose(0, 1).unsqueeze(0);
    bool gqa = config.num_heads != config.num_kv_heads;
    if (gqa && mask.defined() && device.is_cuda()) {
      // CUDA's masked kernels do not take grouped heads; expanding beats the math fallback.
      const int64_t g = config.num_heads / config.num_kv_heads;
      k = k.repeat_interleave(g, 1);
      v = v.repeat_interleave(g, 1);
      gqa = false;
    }
    std::optional<at::Tensor> m;
    if (mask.defined()) m = mask;
    at::Tensor out = at::scaled_dot_product_attention(qt, k, v, m, 0.0, causal, scale, gqa);
    return out.squeeze(0).transpose(0, 1);  // [n, H, d]
  }

  // Explicit softmax(QK^T) of chosen rows, the influence signal.
  at::Tensor AttentionProbs(const Plan& plan, const at::Tensor& q,
                            const std::function<at::Tensor(int64_t)>& keys_of,
                            int32_t window) const {
    const int64_t H = config.num_heads;
    at::Tensor probs =
        at::zeros({plan.attention_rows, H, plan.attention_ctx}, q.options().dtype(at::kFloat));
    for (const AttentionGroup& grp : plan.attention_groups) {
      const int64_t ctx = plan.seqs[grp.seq].ctx_len;
      const int64_t r = grp.rows.size(0);
      const at::Tensor scores =
          MaskedScores(q, grp.rows, grp.qpos, KeysForScores(keys_of, grp.seq), window)
              .permute({1, 0, 2, 3})
              .reshape({r, H, ctx});
      probs.narrow(2, 0, ctx).index_copy_(0, grp.out_rows, at::softmax(scores, -1));
    }
    return probs;
  }

  // Keys of a sequence as MaskedScores takes them: float32 [kv_heads, d, ctx].
  static at::Tensor KeysForScores(const std::function<at::Tensor(int64_t)>& keys_of, int64_t seq) {
    return keys_of(seq).to(at::kFloat).permute({1, 2, 0});
  }

  // Scaled QK^T of `rows` (positions `qpos`) against keys [kv_heads, d, ctx],
  // float32, invisible keys at -inf: [kv_heads, rows, group, ctx].
  at::Tensor MaskedScores(const at::Tensor& q, const at::Tensor& rows, const at::Tensor& qpos,
                          const at::Tensor& keys, int32_t window) const {
    const int64_t kvh = config.num_kv_heads, d = config.head_size;
    const int64_t g = config.num_heads / kvh;
    const int64_t r = rows.size(0), ctx = keys.size(2);
    at::Tensor qr = q.index_select(0, rows).to(at::kFloat);  // [r, H, d]
    qr = qr.view({r, kvh, g, d}).permute({1, 0, 2, 3}).reshape({kvh, r * g, d});
    at::Tensor scores = at::bmm(qr, keys).mul_(scale).view({kvh, r, g, ctx});
    const at::Tensor visible = VisibleKeys(qpos, ctx, window).view({1, r, 1, ctx});
    return scores.masked_fill_(visible.logical_not(), -std::numeric_limits<float>::infinity());
  }

  // The column sums of AttentionProbs that influence scoring reads, in blocks
  // of rows: memory is O(block * heads * C) instead of O(A * heads * C).
  std::pair<at::Tensor, at::Tensor> AttentionKeyMass(
      const Plan& plan, const at::Tensor& q, const std::function<at::Tensor(int64_t)>& keys_of,
      int32_t window) const {
    constexpr int64_t kBlock = 128;
    const auto opts = q.options().dtype(at::kFloat);
    at::Tensor mass = at::zeros({plan.num_seqs, plan.attention_ctx}, opts);
    at::Tensor followers = at::zeros({plan.num_seqs, plan.attention_ctx}, opts);
    for (const AttentionGroup& grp : plan.attention_groups) {
      const int64_t ctx = plan.seqs[grp.seq].ctx_len;
      const at::Tensor keys = KeysForScores(keys_of, grp.seq);
      const at::Tensor key_pos = at::arange(ctx, grp.qpos.options());
      at::Tensor mass_s = mass[grp.seq].narrow(0, 0, ctx);
      at::Tensor followers_s = followers[grp.seq].narrow(0, 0, ctx);
      for (int64_t b = 0; b < grp.rows.size(0); b += kBlock) {
        const int64_t r = std::min(kBlock, grp.rows.size(0) - b);
        const at::Tensor qpos = grp.qpos.narrow(0, b, r);
        const at::Tensor scores = MaskedScores(q, grp.rows.narrow(0, b, r), qpos, keys, window);
        const at::Tensor head_mean =
            at::softmax(scores, -1).sum({0, 2}).div_(config.num_heads);     // [r, ctx]
        const at::Tensor later = key_pos.unsqueeze(0) < qpos.unsqueeze(1);  // [r, ctx]
        mass_s.add_(head_mean.mul_(later).sum(0));
        followers_s.add_(later.sum(0).to(at::kFloat));
      }
    }
    return {mass, followers};
  }
};

Status ModelExecutor::Impl::Load(const WeightMap& weights) {
  const ModelConfig& c = config;
  const int64_t hidden = c.hidden_size, inter = c.intermediate_size;
  const int64_t q_size = int64_t{c.num_heads} * c.head_size;
  const int64_t kv_size = int64_t{c.num_kv_heads} * c.head_size;
  WeightReader r(weights);
  RELAYKV_ASSIGN_OR_RETURN(embed, r.Take("model.embed_tokens.weight", {c.vocab_size, hidden}));
  RELAYKV_ASSIGN_OR_RETURN(final_norm, r.Take("model.norm.weight", {hidden}));
  if (r.Has("lm_head.weight") || !c.tie_word_embeddings) {
    // A tied model's state dict may still list lm_head (the same storage).
    RELAYKV_ASSIGN_OR_RETURN(lm_head, r.Take("lm_head.weight", {c.vocab_size, hidden}));
  } else {
    lm_head = embed;
  }
  layers.resize(c.num_layers);
  for (int32_t i = 0; i < c.num_layers; ++i) {
    LayerWeights& w = layers[i];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    const std::string a = p + "self_attn.";
    const std::string m = p + "mlp.";
    RELAYKV_ASSIGN_OR_RETURN(w.input_norm, r.Take(p + "input_layernorm.weight", {hidden}));
    RELAYKV_ASSIGN_OR_RETURN(w.post_norm, r.Take(p + "post_attention_layernorm.weight", {hidden}));
    if (r.Has(a + "qkv_proj.weight")) {
      const int64_t n = q_size + 2 * kv_size;
      RELAYKV_ASSIGN_OR_RETURN(w.qkv_w, r.Take(a + "qkv_proj.weight", {n, hidden}));
      RELAYKV_ASSIGN_OR_RETURN(w.qkv_b, r.TakeIf(c.qkv_bias, a + "qkv_proj.bias", {n}));
    } else {
      RELAYKV_ASSIGN_OR_RETURN(w.q_w, r.Take(a + "q_proj.weight", {q_size, hidden}));
      RELAYKV_ASSIGN_OR_RETURN(w.k_w, r.Take(a + "k_proj.weight", {kv_size, hidden}));
      RELAYKV_ASSIGN_OR_RETURN(w.v_w, r.Take(a + "v_proj.weight", {kv_size, hidden}));
      RELAYKV_ASSIGN_OR_RETURN(w.q_b, r.TakeIf(c.qkv_bias, a + "q_proj.bias", {q_size}));
      RELAYKV_ASSIGN_OR_RETURN(w.k_b, r.TakeIf(c.qkv_bias, a + "k_proj.bias", {kv_size}));
      RELAYKV_ASSIGN_OR_RETURN(w.v_b, r.TakeIf(c.qkv_bias, a + "v_proj.bias", {kv_size}));
    }
    RELAYKV_ASSIGN_OR_RETURN(w.o_w, r.Take(a + "o_proj.weight", {hidden, q_size}));
    RELAYKV_ASSIGN_OR_RETURN(w.o_b, r.TakeIf(c.o_bias, a + "o_proj.bias", {hidden}));
    RELAYKV_ASSIGN_OR_RETURN(w.q_norm, r.TakeIf(c.qk_norm, a + "q_norm.weight", {c.head_size}));
    RELAYKV_ASSIGN_OR_RETURN(w.k_norm, r.TakeIf(c.qk_norm, a + "k_norm.weight", {c.head_size}));
    if (r.Has(m + "gate_up_proj.weight")) {
      RELAYKV_ASSIGN_OR_RETURN(w.gate_up_w, r.Take(m + "gate_up_proj.weight", {2 * inter, hidden}));
      RELAYKV_ASSIGN_OR_RETURN(w.gate_up_b,
                               r.TakeIf(c.mlp_bias, m + "gate_up_proj.bias", {2 * inter}));
    } else {
      RELAYKV_ASSIGN_OR_RETURN(w.gate_w, r.Take(m + "gate_proj.weight", {inter, hidden}));
      RELAYKV_ASSIGN_OR_RETURN(w.up_w, r.Take(m + "up_proj.weight", {inter, hidden}));
      RELAYKV_ASSIGN_OR_RETURN(w.gate_b, r.TakeIf(c.mlp_bias, m + "gate_proj.bias", {inter}));
      RELAYKV_ASSIGN_OR_RETURN(w.up_b, r.TakeIf(c.mlp_bias, m + "up_proj.bias", {inter}));
    }
    RELAYKV_ASSIGN_OR_RETURN(w.down_w, r.Take(m + "down_proj.weight", {hidden, inter}));
    RELAYKV_ASSIGN_OR_RETURN(w.down_b, r.TakeIf(c.mlp_bias, m + "down_proj.bias", {hidden}));
    w.window = c.LayerWindow(i);
  }
  const std::vector<std::string> unused = r.Unused();
  if (!unused.empty()) {
    std::string list;
    for (size_t i = 0; i < unused.size() && i < 5; ++i) list += (i ? ", '" : "'") + unused[i] + "'";
    if (unused.size() > 5) list += ", ... (" + std::to_string(unused.size()) + " in all)";
    return InvalidArgument("weights not used by " + c.ToString() + ": " + list);
  }
  device = r.device();
  dtype = r.dtype();
  rotary_dim = c.rope.rotary_dim == 0 ? c.head_size : c.rope.rotary_dim;
  // float32 like transformers and vLLM, so the same positions give the same angles.
  const std::vector<double> inv = c.rope.InverseFrequencies(c.head_size);
  inv_freq = at::tensor(at::ArrayRef<double>(inv), at::TensorOptions().dtype(at::kDouble))
                 .to(at::kFloat)
                 .to(device);
  scale = 1.0 / std::sqrt(static_cast<double>(c.head_size));
  return Status::Ok();
}

Result<Plan> ModelExecutor::Impl::BuildPlan(const ForwardInput& in, int64_t num_blocks,
                                            int64_t block_size,
                                            const std::set<int32_t>& windows) const {
  Plan p;
  const int64_t B = static_cast<int64_t>(in.query_lens.size());
  if (B == 0) return InvalidArgument("forward: the batch has no sequences (query_lens is empty)");
  if (static_cast<int64_t>(in.context_lens.size()) != B) {
    return InvalidArgument("forward: context_lens has " + std::to_string(in.context_lens.size()) +
                           " entries, query_lens " + std::to_string(B));
  }
  RELAYKV_ASSIGN_OR_RETURN(at::Tensor pos, CpuIndexTensor(in.positions, "forward: positions"));
  if (!pos.defined()) return InvalidArgument("forward: positions is required");
  const int64_t T = pos.size(0);
  const at::Tensor& bt_in = in.block_tables;
  if (!bt_in.defined() || bt_in.dim() != 2 || bt_in.size(0) != B || !bt_in.device().is_cpu() ||
      !at::isIntegralType(bt_in.scalar_type(), false)) {
    return InvalidArgument(
        "forward: block_tables must be an integer CPU tensor [num_seqs=" + std::to_string(B) +
        ", max_blocks]" + (bt_in.defined() ? ", got " + ShapeString(bt_in.sizes()) : ""));
  }
  const at::Tensor bt = bt_in.to(at::kLong);
  p.num_tokens = T;
  p.num_seqs = B;
  p.seqs.resize(B);
  int64_t total = 0;
  for (int64_t s = 0; s < B; ++s) {
    SeqInfo& q = p.seqs[s];
    q.q_begin = total;
    q.q_len = in.query_lens[s];
    q.ctx_len = in.context_lens[s];
    if (q.q_len < 1) {
      return InvalidArgument("forward: sequence " + std::to_string(s) +
                             " computes no token (query_lens must be >= 1)");
    }
    if (q.ctx_len < 1 || q.ctx_len > bt.size(1) * block_size) {
      return InvalidArgument("forward: sequence " + std::to_string(s) + " has context_len " +
                             std::to_string(q.ctx_len) + "; its block table holds " +
                             std::to_string(bt.size(1) * block_size) + " positions");
    }
    total += q.q_len;
    p.t_max = std::max(p.t_max, q.q_len);
    p.c_max = std::max(p.c_max, q.ctx_len);
  }
  if (total != T) {
    return InvalidArgument("forward: query_lens sum to " + std::to_string(total) + " but " +
                           std::to_string(T) + " positions were given");
  }
  const at::Tensor qlens = CpuLong(in.query_lens);
  const at::Tensor clens = CpuLong(in.context_lens);
  const at::Tensor seq_of_row = at::repeat_interleave(at::arange(B, at::kLong), qlens);
  const at::Tensor bad = (pos < 0).logical_or(pos >= clens.index_select(0, seq_of_row));
  if (bad.any().item<bool>()) {
    const int64_t r = bad.nonzero()[0][0].item<int64_t>();
    const int64_t s = seq_of_row[r].item<int64_t>();
    return InvalidArgument("forward: row " + std::to_string(r) + " (sequence " + std::to_string(s) +
                           ") has position " + std::to_string(pos[r].item<int64_t>()) +
                           " outside its context [0, " + std::to_string(in.context_lens[s]) + ")");
  }
  if (T > 1) {
    const at::Tensor key = std::get<0>((seq_of_row * p.c_max + pos).sort());
    if (key.narrow(0, 1, T - 1).eq(key.narrow(0, 0, T - 1)).any().item<bool>()) {
      return InvalidArgument("forward: a sequence lists the same position twice");
    }
  }
  // Rows in the cache; every block id used is checked before any write.
  auto address = [&](const at::Tensor& seq, const at::Tensor& ps,
                     const char* what) -> Result<CacheIndex> {
    at::Tensor block = bt.index({seq, at::floor_divide(ps, block_size)});
    if (block.numel() > 0 &&
        (block.min().item<int64_t>() < 0 || block.max().item<int64_t>() >= num_blocks)) {
      return InvalidArgument(std::string("forward: block_tables send ") + what +
                             " to a block outside [0, " + std::to_string(num_blocks) + ")");
    }
    at::Tensor slot = at::remainder(ps, block_size);
    CacheIndex idx;
    idx.flat = (block * block_size + slot).to(device);
    idx.block = block.to(device);
    idx.slot = slot.to(device);
    return idx;
  };
  RELAYKV_ASSIGN_OR_RETURN(p.write, address(seq_of_row, pos, "computed tokens"));
  p.positions = pos.to(device);

  const int64_t exact_cost = [&] {
    int64_t c = 0;
    for (const SeqInfo& q : p.seqs) c += q.q_len * q.ctx_len;
    return c;
  }();
  // One padded call beats a loop of small ones when every sequence has few
  // queries (decode); the padding must not cost much more than the work.
  p.padded = B > 1 && (p.t_max == 1 || (p.t_max <= 16 && B * p.t_max * p.c_max <= 4 * exact_cost));

  const int64_t* pos_data = pos.data_ptr<int64_t>();
  std::vector<int64_t> ctx_base(B, -1);
  at::Tensor ctx_seq, ctx_pos;
  if (p.padded) {
    for (int64_t s = 0; s < B; ++s) ctx_base[s] = s * p.c_max;
    ctx_seq = at::arange(B, at::kLong).repeat_interleave(p.c_max);
    ctx_pos = at::arange(p.c_max, at::kLong).repeat({B});
    // Padding keys point at position 0 of their own sequence: real, finite
    // values, so a masked-out key never brings NaN from stale memory.
    ctx_pos = at::where(ctx_pos < clens.index_select(0, ctx_seq), ctx_pos, at::zeros_like(ctx_pos));
  } else {
    std::vector<at::Tensor> seqs_list, pos_list;
    int64_t base = 0;
    for (int64_t s = 0; s < B; ++s) {
      SeqInfo& q = p.seqs[s];
      q.tail_one = q.q_len == 1 && pos_data[q.q_begin] == q.ctx_len - 1;
      q.full = q.q_len == q.ctx_len &&
               pos.narrow(0, q.q_begin, q.q_len).equal(at::arange(q.q_len, at::kLong));
      if (q.full) continue;
      ctx_base[s] = base;
      seqs_list.push_back(at::full({q.ctx_len}, s, at::kLong));
      pos_list.push_back(at::arange(q.ctx_len, at::kLong));
      base += q.ctx_len;
    }
    if (!seqs_list.empty()) {
      ctx_seq = at::cat(seqs_list);
      ctx_pos = at::cat(pos_list);
    }
  }
  for (int64_t s = 0; s < B; ++s) p.seqs[s].ctx_base = ctx_base[s];
  if (ctx_seq.defined()) {
    p.gather = true;
    RELAYKV_ASSIGN_OR_RETURN(p.context, address(ctx_seq, ctx_pos, "context positions"));
    const at::Tensor base_t = CpuLong(ctx_base);
    const at::Tensor row_base = base_t.index_select(0, seq_of_row);
    const at::Tensor gathered = row_base >= 0;
    p.overlay_all = gathered.all().item<bool>();
    const at::Tensor src = p.overlay_all ? at::arange(T, at::kLong) : gathered.nonzero().squeeze(1);
    p.overlay_src = src.to(device);
    p.overlay_dst = (row_base.index_select(0, src) + pos.index_select(0, src)).to(device);
  }

  if (p.padded) {
    const at::Tensor q_begin = at::cumsum(qlens, 0) - qlens;
    const at::Tensor within = at::arange(T, at::kLong) - q_begin.index_select(0, seq_of_row);
    p.pad_identity = (qlens == p.t_max).all().item<bool>();
    const at::Tensor pad_index = seq_of_row * p.t_max + within;
    p.pad_index = pad_index.to(device);
    // Padding queries sit at position 0: they see one real key and stay finite.
    at::Tensor qpos = at::zeros({B * p.t_max}, at::kLong).index_copy_(0, pad_index, pos);
    qpos = qpos.to(device).view({B, p.t_max});
    const at::Tensor key = at::arange(p.c_max, qpos.options()).view({1, 1, p.c_max});
    for (int32_t w : windows) {
      at::Tensor m = key <= qpos.unsqueeze(2);
      if (w > 0) m = m.logical_and(key > qpos.unsqueeze(2) - w);
      p.padded_masks[w] = m.unsqueeze(1);  // [B, 1, t_max, c_max]
    }
  } else {
    for (int32_t w : windows) {
      std::vector<at::Tensor>& masks = p.seq_masks[w];
      masks.resize(B);
      for (int64_t s = 0; s < B; ++s) {
        const SeqInfo& q = p.seqs[s];
        const bool window_irrelevant = w == 0 || q.ctx_len <= w;
        if ((q.full || q.tail_one) && window_irrelevant) continue;  // causal / everything
        masks[s] = VisibleKeys(p.positions.narrow(0, q.q_begin, q.q_len), q.ctx_len, w);
      }
    }
  }

  if (in.observe.attention_rows.defined() && !in.observe.attention_layers.empty()) {
    RELAYKV_ASSIGN_OR_RETURN(at::Tensor rows,
                             CpuIndexTensor(in.observe.attention_rows, "observe.attention_rows"));
    if (rows.numel() > 0 && (rows.min().item<int64_t>() < 0 || rows.max().item<int64_t>() >= T)) {
      return InvalidArgument("observe.attention_rows must lie in [0, " + std::to_string(T) + ")");
    }
    p.attention_rows = rows.size(0);
    const at::Tensor row_seq = seq_of_row.index_select(0, rows);
    const at::Tensor counts = at::bincount(row_seq, {}, B);
    const int64_t* count = counts.data_ptr<int64_t>();
    for (int64_t s = 0; s < B; ++s) {
      if (count[s] == 0) continue;
      AttentionGroup g;
      g.seq = s;
      const at::Tensor out_rows = (row_seq == s).nonzero().squeeze(1);
      const at::Tensor r = rows.index_select(0, out_rows);
      g.rows = r.to(device);
      g.out_rows = out_rows.to(device);
      g.qpos = pos.index_select(0, r).to(device);
      p.attention_groups.push_back(std::move(g));
      p.attention_ctx = std::max(p.attention_ctx, p.seqs[s].ctx_len);
    }
  }
  return p;
}

Result<ForwardOutput> ModelExecutor::Impl::Forward(
    const ForwardInput& in, const std::vector<LayerKvCache>& kv_cache) const {
  const ModelConfig& c = config;
  const int32_t L = c.num_layers;
  const int32_t first = in.first_layer;
  const int32_t last = in.last_layer < 0 ? L - 1 : in.last_layer;
  if (first < 0 || first > last || last >= L) {
    return InvalidArgument("forward: layer range [" + std::to_string(first) + ", " +
                           std::to_string(last) + "] is not inside [0, " + std::to_string(L - 1) +
                           "]");
  }
  RELAYKV_RETURN_IF_ERROR(CheckLayerList(in.observe.kv_layers, first, last, "observe.kv_layers"));
  RELAYKV_RETURN_IF_ERROR(
      CheckLayerList(in.observe.attention_layers, first, last, "observe.attention_layers"));
  RELAYKV_RETURN_IF_ERROR(
      CheckLayerList(in.observe.hidden_layers, first, last, "observe.hidden_layers"));
  if (!in.observe.attention_layers.empty() && !in.observe.attention_rows.defined()) {
    return InvalidArgument("observe.attention_layers is set but observe.attention_rows is not");
  }
  if (static_cast<int32_t>(kv_cache.size()) != L) {
    return InvalidArgument("forward: kv_cache has " + std::to_string(kv_cache.size()) +
                           " layers, the model " + std::to_string(L));
  }
  int64_t num_blocks = -1, block_size = -1;
  for (int32_t l = first; l <= last; ++l) {
    for (const at::Tensor* t : {&kv_cache[l].k, &kv_cache[l].v}) {
      const char* kv = t == &kv_cache[l].k ? "K" : "V";
      if (!t->defined() || t->dim() != 4 || t->size(2) != c.num_kv_heads ||
          t->size(3) != c.head_size) {
        return InvalidArgument("forward: layer " + std::to_string(l) + " " + kv +
                               " cache must be [num_blocks, block_size, " +
                               std::to_string(c.num_kv_heads) + ", " + std::to_string(c.head_size) +
                               "]" + (t->defined() ? ", got " + ShapeString(t->sizes()) : ""));
      }
      if (num_blocks < 0) {
        num_blocks = t->size(0);
        block_size = t->size(1);
      } else if (t->size(0) != num_blocks || t->size(1) != block_size) {
        return InvalidArgument("forward: layer " + std::to_string(l) + " " + kv +
                               " cache has a different block geometry than layer " +
                               std::to_string(first));
      }
      if (t->device() != device || !at::isFloatingType(t->scalar_type())) {
        return InvalidArgument("forward: layer " + std::to_string(l) + " " + kv + " cache is " +
                               DtypeString(t->scalar_type()) + " on " + t->device().str() +
                               "; it must be floating point on the weights' device " +
                               device.str());
      }
    }
  }
  if (block_size < 1) return InvalidArgument("forward: block_size must be >= 1");
  std::set<int32_t> windows;
  for (int32_t l = first; l <= last; ++l) windows.insert(layers[l].window);
  RELAYKV_ASSIGN_OR_RETURN(Plan plan, BuildPlan(in, num_blocks, block_size, windows));
  const int64_t T = plan.num_tokens;
  const int64_t H = c.num_heads, kvh = c.num_kv_heads, d = c.head_size;

  at::Tensor logits_rows;
  if (in.logits_rows.defined()) {
    RELAYKV_ASSIGN_OR_RETURN(logits_rows, CpuIndexTensor(in.logits_rows, "forward: logits_rows"));
    if (logits_rows.numel() > 0) {
      if (last != L - 1) {
        return InvalidArgument("forward: logits_rows needs last_layer to be the final layer (" +
                               std::to_string(L - 1) + "), got " + std::to_string(last));
      }
      if (logits_rows.min().item<int64_t>() < 0 || logits_rows.max().item<int64_t>() >= T) {
        return InvalidArgument("forward: logits_rows must lie in [0, " + std::to_string(T) + ")");
      }
    }
  }

  at::Tensor h;
  if (first == 0) {
    if (in.hidden_states.defined()) {
      return InvalidArgument(
          "forward: hidden_states is the input of first_layer > 0; layer 0 "
          "starts from token_ids");
    }
    RELAYKV_ASSIGN_OR_RETURN(h, EmbedTokens(in.token_ids, T));
  } else {
    const at::Tensor& hs = in.hidden_states;
    if (!hs.defined() || hs.dim() != 2 || hs.size(0) != T || hs.size(1) != c.hidden_size) {
      return InvalidArgument("forward: first_layer " + std::to_string(first) +
                             " needs hidden_states [" + std::to_string(T) + ", " +
                             std::to_string(c.hidden_size) + "]" +
                             (hs.defined() ? ", got " + ShapeString(hs.sizes()) : ""));
    }
    h = hs.to(device, dtype);
  }

  // cos/sin once per call, shared by all layers (float32 angles, like transformers).
  const at::Tensor angles = Angles(plan.positions);
  // YaRN scales cos and sin (in float32, before the cast), like transformers.
  const double cs_scale = config.rope.CosSinScale();
  at::Tensor cos32 = angles.cos(), sin32 = angles.sin();
  if (cs_scale != 1.0) {
    cos32.mul_(cs_scale);
    sin32.mul_(cs_scale);
  }
  const at::Tensor cos = cos32.to(dtype).unsqueeze(1);
  const at::Tensor sin = sin32.to(dtype).unsqueeze(1);

  // The residual stream is updated in place (large CPU allocations are not
  // cached and cost page faults), except while it is the caller's tensor.
  bool h_shared = first > 0;
  std::set<int32_t> no_write(in.skip_write_layers.begin(), in.skip_write_layers.end());
  const std::set<int32_t> obs_kv(in.observe.kv_layers.begin(), in.observe.kv_layers.end());
  const std::set<int32_t> obs_attn(in.observe.attention_layers.begin(),
                                   in.observe.attention_layers.end());
  const std::set<int32_t> obs_hidden(in.observe.hidden_layers.begin(),
                                     in.observe.hidden_layers.end());
  std::map<int32_t, KvObservation> kv_obs;
  std::map<int32_t, AttentionObservation> attn_obs;
  std::map<int32_t, HiddenObservation> hidden_obs;

  for (int32_t l = first; l <= last; ++l) {
    const LayerWeights& w = layers[l];
    const LayerKvCache& cache = kv_cache[l];
    at::Tensor x = RmsNorm(h, w.input_norm);
    at::Tensor q, k, v;
    if (w.qkv_w.defined()) {
      at::Tensor qkv = at::linear(x, w.qkv_w, w.qkv_b);
      q = qkv.narrow(1, 0, H * d);
      k = qkv.narrow(1, H * d, kvh * d);
      v = qkv.narrow(1, (H + kvh) * d, kvh * d);
    } else {
      q = at::linear(x, w.q_w, w.q_b);
      k = at::linear(x, w.k_w, w.k_b);
      v = at::linear(x, w.v_w, w.v_b);
    }
    q = q.view({T, H, d});
    k = k.view({T, kvh, d});
    v = v.view({T, kvh, d});
    if (c.qk_norm) {
      q = RmsNorm(q, w.q_norm);
      k = RmsNorm(k, w.k_norm);
    }
    q = ApplyRope(q, cos, sin);
    k = ApplyRope(k, cos, sin);

    if (obs_kv.count(l)) {
      kv_obs[l] =
          KvObservation{l, k, v, GatherRows(cache.k, plan.write), GatherRows(cache.v, plan.write)};
    }
    at::Tensor ctx_k, ctx_v;
    if (plan.gather) {
      ctx_k = GatherRows(cache.k, plan.context).to(dtype);
      ctx_v = GatherRows(cache.v, plan.context).to(dtype);
      // Computed tokens see their own fresh K/V, written to the cache or not.
      ctx_k.index_copy_(0, plan.overlay_dst,
                        plan.overlay_all ? k : k.index_select(0, plan.overlay_src));
      ctx_v.index_copy_(0, plan.overlay_dst,
                        plan.overlay_all ? v : v.index_select(0, plan.overlay_src));
    }
    if (in.write_kv && !no_write.count(l)) {
      ScatterRows(cache.k, plan.write, k);
      ScatterRows(cache.v, plan.write, v);
    }
    // Keys of one sequence in position order.
    auto keys_of = [&](int64_t s) {
      const SeqInfo& q = plan.seqs[s];
      return q.ctx_base < 0 ? k.narrow(0, q.q_begin, q.ctx_len)
                            : ctx_k.narrow(0, q.ctx_base, q.ctx_len);
    };
    auto values_of = [&](int64_t s) {
      const SeqInfo& q = plan.seqs[s];
      return q.ctx_base < 0 ? v.narrow(0, q.q_begin, q.ctx_len)
                            : ctx_v.narrow(0, q.ctx_base, q.ctx_len);
    };

    at::Tensor attn;  // [T, H, d]
    if (plan.padded) {
      const int64_t B = plan.num_seqs;
      at::Tensor qp =
          plan.pad_identity
              ? q
              : at::zeros({B * plan.t_max, H, d}, q.options()).index_copy_(0, plan.pad_index, q);
      qp = qp.view({B, plan.t_max, H, d}).transpose(1, 2);
      at::Tensor kp = ctx_k.view({B, plan.c_max, kvh, d}).transpose(1, 2);
      at::Tensor vp = ctx_v.view({B, plan.c_max, kvh, d}).transpose(1, 2);
      bool gqa = H != kvh;
      if (gqa && device.is_cuda()) {
        kp = kp.repeat_interleave(H / kvh, 1);
        vp = vp.repeat_interleave(H / kvh, 1);
        gqa = false;
      }
      at::Tensor out = at::scaled_dot_product_attention(qp, kp, vp, plan.padded_masks.at(w.window),
                                                        0.0, false, scale, gqa);
      out = out.transpose(1, 2).reshape({B * plan.t_max, H, d});
      attn = plan.pad_identity ? out : out.index_select(0, plan.pad_index);
    } else {
      const std::vector<at::Tensor>& masks = plan.seq_masks.at(w.window);
      if (plan.num_seqs == 1) {
        const SeqInfo& s0 = plan.seqs[0];
        attn = Attend(q, keys_of(0), values_of(0), masks[0], s0.full && !masks[0].defined());
      } else {
        attn = at::empty({T, H, d}, q.options());
        for (int64_t s = 0; s < plan.num_seqs; ++s) {
          const SeqInfo& sq = plan.seqs[s];
          attn.narrow(0, sq.q_begin, sq.q_len)
              .copy_(Attend(q.narrow(0, sq.q_begin, sq.q_len), keys_of(s), values_of(s), masks[s],
                            sq.full && !masks[s].defined()));
        }
      }
    }
    if (obs_attn.count(l)) {
      AttentionObservation& obs = attn_obs[l];
      obs.layer = l;
      if (in.observe.attention_key_mass) {
        std::tie(obs.key_mass, obs.key_followers) = AttentionKeyMass(plan, q, keys_of, w.window);
      } else {
        obs.probs = AttentionProbs(plan, q, keys_of, w.window);
      }
    }

    at::Tensor o = at::linear(attn.reshape({T, H * d}), w.o_w, w.o_b);
    if (h_shared) {
      h = h + o;
      h_shared = false;
    } else {
      h.add_(o);
    }
    x = RmsNorm(h, w.post_norm);
    at::Tensor gate, up;
    if (w.gate_up_w.defined()) {
      at::Tensor gu = at::linear(x, w.gate_up_w, w.gate_up_b);
      gate = gu.narrow(1, 0, c.intermediate_size);
      up = gu.narrow(1, c.intermediate_size, c.intermediate_size);
    } else {
      gate = at::linear(x, w.gate_w, w.gate_b);
      up = at::linear(x, w.up_w, w.up_b);
    }
    h.add_(at::linear(at::silu_(gate).mul_(up), w.down_w, w.down_b));
    if (obs_hidden.count(l)) hidden_obs[l] = HiddenObservation{l, h.clone()};
  }

  ForwardOutput out;
  out.hidden_states = h;
  if (logits_rows.defined() && logits_rows.numel() > 0) {
    out.logits = LogitsOf(h.index_select(0, logits_rows.to(device)));
  }
  for (int32_t l : in.observe.kv_layers) out.kv.push_back(std::move(kv_obs[l]));
  for (int32_t l : in.observe.attention_layers) out.attention.push_back(std::move(attn_obs[l]));
  for (int32_t l : in.observe.hidden_layers) out.hidden.push_back(std::move(hidden_obs[l]));
  return out;
}

Result<LayerKvCache> SplitVllmLayerCache(const at::Tensor& kv) {
  if (!kv.defined() || kv.dim() != 5 || kv.size(0) != 2) {
    return InvalidArgument(
        "a vLLM layer cache is [2, num_blocks, block_size, kv_heads, head_size]" +
        (kv.defined() ? ", got " + ShapeString(kv.sizes()) : std::string()));
  }
  return GuardTorch("SplitVllmLayerCache", [&]() -> Result<LayerKvCache> {
    return LayerKvCache{kv[0], kv[1]};
  });
}

Result<std::vector<at::Tensor>> AllocateVllmKvCache(const ModelConfig& config, int64_t num_blocks,
                                                    int32_t block_size, at::ScalarType dtype,
                                                    at::Device device) {
  RELAYKV_RETURN_IF_ERROR(config.Validate());
  if (num_blocks < 1 || block_size < 1) {
    return InvalidArgument("a KV cache needs num_blocks >= 1 and block_size >= 1, got " +
                           std::to_string(num_blocks) + " and " + std::to_string(block_size));
  }
  if (!at::isFloatingType(dtype)) {
    return InvalidArgument("a KV cache holds floating point values, not " + DtypeString(dtype));
  }
  return GuardTorch("AllocateVllmKvCache", [&]() -> Result<std::vector<at::Tensor>> {
    std::vector<at::Tensor> layers;
    for (int32_t l = 0; l < config.num_layers; ++l) {
      layers.push_back(at::zeros({2, num_blocks, block_size, config.num_kv_heads, config.head_size},
                                 at::TensorOptions().dtype(dtype).device(device)));
    }
    return layers;
  });
}

ModelExecutor::ModelExecutor(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ModelExecutor::~ModelExecutor() = default;

Result<std::unique_ptr<ModelExecutor>> ModelExecutor::Create(const ModelConfig& config,
                                                             const WeightMap& weights) {
  RELAYKV_RETURN_IF_ERROR(config.Validate());
  auto impl = std::make_unique<Impl>();
  impl->config = config;
  RELAYKV_RETURN_IF_ERROR(GuardTorch("ModelExecutor::Create", [&] { return impl->Load(weights); }));
  return std::unique_ptr<ModelExecutor>(new ModelExecutor(std::move(impl)));
}

const ModelConfig& ModelExecutor::config() const { return impl_->config; }
at::Device ModelExecutor::device() const { return impl_->device; }
at::ScalarType ModelExecutor::dtype() const { return impl_->dtype; }

Result<ForwardOutput> ModelExecutor::Forward(const ForwardInput& input,
                                             const std::vector<LayerKvCache>& kv_cache) const {
  return GuardTorch("ModelExecutor::Forward", [&] {
    at::NoGradGuard no_grad;
    return impl_->Forward(input, kv_cache);
  });
}

Result<at::Tensor> ModelExecutor::Embed(const at::Tensor& token_ids) const {
  return GuardTorch("ModelExecutor::Embed", [&] {
    at::NoGradGuard no_grad;
    return impl_->EmbedTokens(token_ids, -1);
  });
}

Result<at::Tensor> ModelExecutor::Logits(const at::Tensor& hidden_states) const {
  return GuardTorch("ModelExecutor::Logits", [&]() -> Result<at::Tensor> {
    const ModelConfig& c = impl_->config;
    if (!hidden_states.defined() || hidden_states.dim() != 2 ||
        hidden_states.size(1) != c.hidden_size) {
      return InvalidArgument("Logits: hidden_states must be [N, " + std::to_string(c.hidden_size) +
                             "]");
    }
    at::NoGradGuard no_grad;
    return impl_->LogitsOf(hidden_states.to(impl_->device, impl_->dtype));
  });
}

}  // namespace relaykv::rectify
