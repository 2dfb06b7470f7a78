// The executor against a dense reference written independently below, and
// against itself: paged == contiguous, subset == full, layer ranges compose,
// batched == one by one, strided cache layouts == vLLM's layout.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <vector>

#include "rectify/executor/executor.h"
#include "rectify/executor/model_config.h"

namespace relaykv::rectify {
namespace {

struct TinyOptions {
  Architecture arch = Architecture::kLlama;
  bool qkv_bias = false;
  bool o_bias = false;
  bool mlp_bias = false;
  bool qk_norm = false;
  bool tie = false;
  int32_t rotary_dim = 0;
  RopeStyle style = RopeStyle::kNeox;
  RopeScaling scaling = RopeScaling::kNone;
  int32_t window = 0;
  std::vector<int32_t> window_layers;
  int32_t num_layers = 3;
  int32_t num_heads = 4;
  int32_t num_kv_heads = 2;
  int32_t head_size = 16;
  int32_t hidden = 48;  // != num_heads * head_size on purpose
  int32_t vocab = 97;
};

struct Tiny {
  ModelConfig config;
  WeightMap weights;
};

Tiny MakeTiny(const TinyOptions& o, uint64_t seed = 1) {
  at::manual_seed(seed);
  Tiny m;
  ModelConfig& c = m.config;
  c.architecture = o.arch;
  c.vocab_size = o.vocab;
  c.hidden_size = o.hidden;
  c.intermediate_size = 80;
  c.num_layers = o.num_layers;
  c.num_heads = o.num_heads;
  c.num_kv_heads = o.num_kv_heads;
  c.head_size = o.head_size;
  c.rms_norm_eps = 1e-5f;
  c.rope.theta = 10000.f;
  c.rope.rotary_dim = o.rotary_dim;
  c.rope.style = o.style;
  c.rope.scaling = o.scaling;
  if (o.scaling != RopeScaling::kNone) {
    c.rope.factor = 8.f;
    c.rope.original_max_position = 32;
  }
  c.tie_word_embeddings = o.tie;
  c.qkv_bias = o.qkv_bias;
  c.o_bias = o.o_bias;
  c.mlp_bias = o.mlp_bias;
  c.qk_norm = o.qk_norm;
  c.sliding_window = o.window;
  c.sliding_window_layers = o.window_layers;
  auto rnd = [](std::vector<int64_t> shape, double s) { return at::randn(shape) * s; };
  auto norm = [](int64_t n) { return 1.0 + 0.1 * at::randn({n}); };
  const int64_t q = int64_t{o.num_heads} * o.head_size, kv = int64_t{o.num_kv_heads} * o.head_size;
  const int64_t h = o.hidden, i = c.intermediate_size;
  WeightMap& w = m.weights;
  w["model.embed_tokens.weight"] = rnd({o.vocab, h}, 1.0);
  w["model.norm.weight"] = norm(h);
  if (!o.tie) w["lm_head.weight"] = rnd({o.vocab, h}, 0.2);
  for (int32_t l = 0; l < o.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    w[p + "input_layernorm.weight"] = norm(h);
    w[p + "post_attention_layernorm.weight"] = norm(h);
    w[p + "self_attn.q_proj.weight"] = rnd({q, h}, 0.3);
    w[p + "self_attn.k_proj.weight"] = rnd({kv, h}, 0.3);
    w[p + "self_attn.v_proj.weight"] = rnd({kv, h}, 0.3);
    w[p + "self_attn.o_proj.weight"] = rnd({h, q}, 0.15);
    if (o.qkv_bias) {
      w[p + "self_attn.q_proj.bias"] = rnd({q}, 0.1);
      w[p + "self_attn.k_proj.bias"] = rnd({kv}, 0.1);
      w[p + "self_attn.v_proj.bias"] = rnd({kv}, 0.1);
    }
    if (o.o_bias) w[p + "self_attn.o_proj.bias"] = rnd({h}, 0.1);
    if (o.qk_norm) {
      w[p + "self_attn.q_norm.weight"] = norm(o.head_size);
      w[p + "self_attn.k_norm.weight"] = norm(o.head_size);
    }
    w[p + "mlp.gate_proj.weight"] = rnd({i, h}, 0.2);
    w[p + "mlp.up_proj.weight"] = rnd({i, h}, 0.2);
    w[p + "mlp.down_proj.weight"] = rnd({h, i}, 0.15);
    if (o.mlp_bias) {
      w[p + "mlp.gate_proj.bias"] = rnd({i}, 0.1);
      w[p + "mlp.up_proj.bias"] = rnd({i}, 0.1);
      w[p + "mlp.down_proj.bias"] = rnd({h}, 0.1);
    }
  }
  return m;
}

// A dense transformer forward over a whole sequence: explicit scores, full
// mask, expanded KV heads. Written apart from the executor, from the HF math.
at::Tensor ReferenceLogits(const Tiny& m, const at::Tensor& ids) {
  const ModelConfig& c = m.config;
  const WeightMap& w = m.weights;
  const int64_t T = ids.size(0), H = c.num_heads, kvh = c.num_kv_heads, d = c.head_size;
  const int64_t rd = c.rope.rotary_dim ? c.rope.rotary_dim : d;
  auto rms = [&](const at::Tensor& x, const at::Tensor& g) {
    return g * (x * at::rsqrt(x.pow(2).mean(-1, true) + c.rms_norm_eps));
  };
  auto lin = [&](const at::Tensor& x, const std::string& name, bool bias) {
    at::Tensor y = at::matmul(x, w.at(name + ".weight").t());
    return bias ? y + w.at(name + ".bias") : y;
  };
  std::vector<double> inv = c.rope.InverseFrequencies(static_cast<int32_t>(d));
  at::Tensor inv_t = at::tensor(inv, at::kDouble).to(at::kFloat);
  at::Tensor ang = at::arange(T, at::kFloat).unsqueeze(1) * inv_t.unsqueeze(0);
  at::Tensor cs = ang.cos().unsqueeze(1), sn = ang.sin().unsqueeze(1);
  auto rope = [&](const at::Tensor& x) {
    at::Tensor a, b;
    if (c.rope.style == RopeStyle::kNeox) {
      a = x.slice(-1, 0, rd / 2);
      b = x.slice(-1, rd / 2, rd);
      return at::cat({a * cs - b * sn, b * cs + a * sn, x.slice(-1, rd, d)}, -1);
    }
    a = x.slice(-1, 0, rd, 2);
    b = x.slice(-1, 1, rd, 2);
    at::Tensor r = at::stack({a * cs - b * sn, b * cs + a * sn}, -1).flatten(-2);
    return at::cat({r, x.slice(-1, rd, d)}, -1);
  };
  at::Tensor h = w.at("model.embed_tokens.weight").index_select(0, ids);
  at::Tensor t_idx = at::arange(T).unsqueeze(1), s_idx = at::arange(T).unsqueeze(0);
  for (int32_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    at::Tensor x = rms(h, w.at(p + "input_layernorm.weight"));
    at::Tensor q = lin(x, p + "self_attn.q_proj", c.qkv_bias).view({T, H, d});
    at::Tensor k = lin(x, p + "self_attn.k_proj", c.qkv_bias).view({T, kvh, d});
    at::Tensor v = lin(x, p + "self_attn.v_proj", c.qkv_bias).view({T, kvh, d});
    if (c.qk_norm) {
      q = rms(q, w.at(p + "self_attn.q_norm.weight"));
      k = rms(k, w.at(p + "self_attn.k_norm.weight"));
    }
    q = rope(q);
    k = rope(k).repeat_interleave(H / kvh, 1);
    v = v.repeat_interleave(H / kvh, 1);
    at::Tensor scores = at::einsum("thd,shd->hts", {q, k}) / std::sqrt(static_cast<double>(d));
    at::Tensor allowed = s_idx <= t_idx;
    const int32_t win = c.LayerWindow(l);
    if (win > 0) allowed = allowed.logical_and(t_idx - s_idx < win);
    scores = scores.masked_fill(allowed.logical_not(), -INFINITY);
    at::Tensor o = at::einsum("hts,shd->thd", {at::softmax(scores, -1), v}).reshape({T, H * d});
    h = h + lin(o, p + "self_attn.o_proj", c.o_bias);
    x = rms(h, w.at(p + "post_attention_layernorm.weight"));
    at::Tensor mlp =
        at::silu(lin(x, p + "mlp.gate_proj", c.mlp_bias)) * lin(x, p + "mlp.up_proj", c.mlp_bias);
    h = h + lin(mlp, p + "mlp.down_proj", c.mlp_bias);
  }
  const at::Tensor& head =
      c.tie_word_embeddings ? w.at("model.embed_tokens.weight") : w.at("lm_head.weight");
  return at::matmul(rms(h, w.at("model.norm.weight")), head.t());
}

struct Cache {
  std::vector<at::Tensor> raw;  // vLLM layout, one per layer
  std::vector<LayerKvCache> layers;
};

Cache NewCache(const ModelConfig& c, int64_t num_blocks, int32_t block_size,
               at::ScalarType dtype = at::kFloat) {
  Cache cache;
  auto raw = AllocateVllmKvCache(c, num_blocks, block_size, dtype, at::kCPU);
  EXPECT_TRUE(raw.ok()) << raw.status().ToString();
  cache.raw = *raw;
  for (const at::Tensor& t : cache.raw) cache.layers.push_back(*SplitVllmLayerCache(t));
  return cache;
}

std::unique_ptr<ModelExecutor> MakeExecutor(const Tiny& m) {
  auto e = ModelExecutor::Create(m.config, m.weights);
  EXPECT_TRUE(e.ok()) << e.status().ToString();
  return e.ok() ? std::move(*e) : nullptr;
}

at::Tensor Long(const std::vector<int64_t>& v) { return at::tensor(v, at::kLong); }

// One sequence computing `positions` of `ids` (token id per position).
ForwardInput OneSeq(const at::Tensor& ids, const std::vector<int64_t>& positions, int64_t ctx,
                    const at::Tensor& block_table) {
  ForwardInput in;
  in.query_lens = {static_cast<int64_t>(positions.size())};
  in.context_lens = {ctx};
  in.block_tables = block_table.unsqueeze(0);
  in.positions = Long(positions);
  in.token_ids = ids.index_select(0, in.positions);
  in.logits_rows = at::arange(static_cast<int64_t>(positions.size()), at::kLong);
  return in;
}

std::vector<int64_t> Range(int64_t begin, int64_t end) {
  std::vector<int64_t> v(end - begin);
  std::iota(v.begin(), v.end(), begin);
  return v;
}

double MaxDiff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kFloat) - b.to(at::kFloat)).abs().max().item<double>();
}

ForwardOutput RunOk(const ModelExecutor& e, const ForwardInput& in, const Cache& cache) {
  auto out = e.Forward(in, cache.layers);
  EXPECT_TRUE(out.ok()) << out.status().ToString();
  return out.ok() ? std::move(*out) : ForwardOutput{};
}

at::Tensor RandomIds(int64_t n, int64_t vocab, uint64_t seed) {
  at::manual_seed(seed);
  return at::randint(vocab, {n}, at::kLong);
}

// K or V of positions [0, n) of one sequence, [layers, n, kv_heads, d].
at::Tensor SeqKv(const Cache& cache, const at::Tensor& block_table, int64_t n, int32_t kv) {
  std::vector<at::Tensor> per_layer;
  const int64_t bs = cache.raw[0].size(2);
  at::Tensor pos = at::arange(n, at::kLong);
  at::Tensor blocks = block_table.index_select(0, at::floor_divide(pos, bs));
  for (const at::Tensor& t : cache.raw) {
    per_layer.push_back(t[kv].index({blocks, at::remainder(pos, bs)}));
  }
  return at::stack(per_layer);
}

class ArchTest : public ::testing::TestWithParam<int> {};

TinyOptions ArchOptions(int which) {
  TinyOptions o;
  switch (which) {
    case 0:  // Llama: tied embeddings, biases everywhere
      o.tie = true;
      o.qkv_bias = o.o_bias = o.mlp_bias = true;
      break;
    case 1:  // Qwen2: q/k/v bias only
      o.arch = Architecture::kQwen2;
      o.qkv_bias = true;
      break;
    case 2:  // Qwen3: per-head q/k norm, sliding window on one layer
      o.arch = Architecture::kQwen3;
      o.qk_norm = true;
      o.window = 5;
      o.window_layers = {1};
      break;
    case 3:  // Mistral: window on every layer, MHA
      o.arch = Architecture::kMistral;
      o.window = 7;
      o.num_kv_heads = 4;
      break;
    case 4:  // partial, interleaved, llama3-scaled rotary
      o.rotary_dim = 8;
      o.style = RopeStyle::kInterleaved;
      o.scaling = RopeScaling::kLlama3;
      break;
    case 5:  // linear scaling, one KV head
      o.scaling = RopeScaling::kLinear;
      o.num_kv_heads = 1;
      break;
  }
  return o;
}

TEST_P(ArchTest, PrefillMatchesDenseReference) {
  Tiny m = MakeTiny(ArchOptions(GetParam()));
  auto e = MakeExecutor(m);
  ASSERT_NE(e, nullptr);
  const int64_t T = 23;
  at::Tensor ids = RandomIds(T, m.config.vocab_size, 7);
  Cache cache = NewCache(m.config, 8, 4);
  at::Tensor bt = Long({5, 2, 7, 0, 3, 6});
  ForwardOutput out = RunOk(*e, OneSeq(ids, Range(0, T), T, bt), cache);
  ASSERT_TRUE(out.logits.defined());
  at::Tensor ref = ReferenceLogits(m, ids);
  EXPECT_LT(MaxDiff(out.logits, ref), 1e-4 * std::max(1.0, ref.abs().max().item<double>()));
}

TEST_P(ArchTest, ChunkedPrefillAndDecodeMatchFullPrefill) {
  Tiny m = MakeTiny(ArchOptions(GetParam()));
  auto e = MakeExecutor(m);
  ASSERT_NE(e, nullptr);
  const int64_t T = 21;
  at::Tensor ids = RandomIds(T, m.config.vocab_size, 8);
  at::Tensor ref = ReferenceLogits(m, ids);
  Cache cache = NewCache(m.config, 8, 4);
  at::Tensor bt = Long({3, 1, 6, 4, 0, 7});
  std::vector<at::Tensor> rows;
  rows.push_back(RunOk(*e, OneSeq(ids, Range(0, 9), 9, bt), cache).logits);
  rows.push_back(RunOk(*e, OneSeq(ids, Range(9, 16), 16, bt), cache).logits);
  for (int64_t p = 16; p < T; ++p)
    rows.push_back(RunOk(*e, OneSeq(ids, {p}, p + 1, bt), cache).logits);
  EXPECT_LT(MaxDiff(at::cat(rows), ref), 1e-4 * std::max(1.0, ref.abs().max().item<double>()));
}

INSTANTIATE_TEST_SUITE_P(Architectures, ArchTest, ::testing::Range(0, 6));

TEST(ExecutorTest, ScatteredBlocksEqualContiguous) {
  Tiny m = MakeTiny({});
  auto e = MakeExecutor(m);
  const int64_t T = 30;
  at::Tensor ids = RandomIds(T, m.config.vocab_size, 9);
  Cache a = NewCache(m.config, 8, 4), b = NewCache(m.config, 16, 4);
  at::Tensor bt_a = at::arange(8, at::kLong), bt_b = Long({13, 2, 9, 0, 15, 4, 11, 6});
  ForwardOutput oa = RunOk(*e, OneSeq(ids, Range(0, T), T, bt_a), a);
  ForwardOutput ob = RunOk(*e, OneSeq(ids, Range(0, T), T, bt_b), b);
  EXPECT_EQ(MaxDiff(oa.logits, ob.logits), 0.0);
  for (int32_t kv = 0; kv < 2; ++kv) {
    EXPECT_EQ(MaxDiff(SeqKv(a, bt_a, T, kv), SeqKv(b, bt_b, T, kv)), 0.0);
  }
  // Decode on both, after the prefill, reading KV from the scattered blocks.
  at::Tensor next = Long({11});
  ForwardInput da = OneSeq(at::cat({ids, next}), {T}, T + 1, bt_a);
  ForwardInput db = OneSeq(at::cat({ids, next}), {T}, T + 1, bt_b);
  EXPECT_LT(MaxDiff(RunOk(*e, da, a).logits, RunOk(*e, db, b).logits), 1e-6);
}

TEST(ExecutorTest, SubsetForwardEqualsFull) {
  Tiny m = MakeTiny(ArchOptions(2));  // qk norm + a windowed layer
  auto e = MakeExecutor(m);
  const int64_t T = 26;
  at::Tensor ids = RandomIds(T, m.config.vocab_size, 10);
  Cache cache = NewCache(m.config, 8, 4);
  at::Tensor bt = Long({7, 6, 5, 4, 3, 2, 1});
  ForwardInput full_in = OneSeq(ids, Range(0, T), T, bt);
  full_in.observe.hidden_layers = {0, 1, 2};
  ForwardOutput full = RunOk(*e, full_in, cache);
  at::Tensor k_before = SeqKv(cache, bt, T, 0), v_before = SeqKv(cache, bt, T, 1);

  // Spoil the subset's KV in every layer, then recompute just those tokens
  // (unsorted, not contiguous, including the last) against the exact rest.
  const std::vector<int64_t> subset = {17, 3, 4, 25, 11, 12, 13};
  at::Tensor sp = Long(subset);
  at::Tensor blocks = bt.index_select(0, at::floor_divide(sp, 4)), slots = at::remainder(sp, 4);
  for (at::Tensor t : cache.raw) t.index_put_({at::indexing::Slice(), blocks, slots}, 42.0);
  ForwardInput sub_in = OneSeq(ids, subset, T, bt);
  sub_in.observe.hidden_layers = {1};
  ForwardOutput sub = RunOk(*e, sub_in, cache);
  EXPECT_LT(MaxDiff(sub.logits, full.logits.index_select(0, sp)), 1e-4);
  EXPECT_LT(MaxDiff(sub.hidden[0].hidden, full.hidden[1].hidden.index_select(0, sp)), 1e-5);
  EXPECT_LT(MaxDiff(SeqKv(cache, bt, T, 0), k_before), 1e-5);
  EXPECT_LT(MaxDiff(SeqKv(cache, bt, T, 1), v_before), 1e-5);
}

TEST(ExecutorTest, LayerRangesCompose) {
  Tiny m = MakeTiny(ArchOptions(1));
  auto e = MakeExecutor(m);
  const int64_t T = 19;
  at::Tensor ids = RandomIds(T, m.config.vocab_size, 11);
  at::Tensor bt = Long({0, 1, 2, 3, 4});
  Cache whole = NewCache(m.config, 5, 4), parts = NewCache(m.config, 5, 4);
  ForwardOutput ref = RunOk(*e, OneSeq(ids, Range(0, T), T, bt), whole);

  ForwardInput first = OneSeq(ids, Range(0, T), T, bt);
  first.last_layer = 0;
  first.logits_rows = at::Tensor();
  ForwardOutput a = RunOk(*e, first, parts);
  ForwardInput second = OneSeq(ids, Range(0, T), T, bt);
  second.token_ids = at::Tensor();
  second.hidden_states = a.hidden_states;
  second.first_layer = 1;
  ForwardOutput b = RunOk(*e, second, parts);
  EXPECT_LT(MaxDiff(b.logits, ref.logits), 1e-5);
  EXPECT_LT(MaxDiff(b.hidden_states, ref.hidden_states), 1e-5);
  for (int32_t kv = 0; kv < 2; ++kv) {
    EXPECT_LT(MaxDiff(SeqKv(parts, bt, T, kv), SeqKv(whole, bt, T, kv)), 1e-6);
  }
  auto logits = e->Logits(b.hidden_states.narrow(0, T - 1, 1));
  ASSERT_TRUE(logits.ok());
  EXPECT_LT(MaxDiff(*logits, ref.logits.narrow(0, T - 1, 1)), 1e-5);
}

// Sequences batched in one call equal the same sequences run one at a time,
// through every attention path: all-prefill (one call per sequence), decode
// (one padded call), a few uneven queries (padded with padding rows), and a
// chunk next to decodes and a fresh prefill (per-sequence calls, some keys
// gathered from the cache and some fresh).
TEST(ExecutorTest, BatchesEqualSingleSequences) {
  Tiny m = MakeTiny(ArchOptions(2));
  auto e = MakeExecutor(m);
  const int64_t n = 40, bs = 4, per_seq = n / bs;  // positions and blocks per sequence
  const int64_t num_seqs = 4;
  at::manual_seed(3);
  const at::Tensor bt = at::randperm(num_seqs * per_seq, at::kLong).view({num_seqs, per_seq});
  std::vector<at::Tensor> ids;
  for (int64_t s = 0; s < num_seqs; ++s) ids.push_back(RandomIds(n, 97, 20 + s));
  Cache single = NewCache(m.config, num_seqs * per_seq, bs);
  Cache batch = NewCache(m.config, num_seqs * per_seq, bs);

  struct Work {
    int64_t seq, begin, end;
  };
  const std::vector<std::vector<Work>> steps = {
      {{0, 0, 13}, {1, 0, 22}, {2, 0, 7}},
      {{0, 13, 14}, {1, 22, 23}, {2, 7, 8}},
      {{0, 14, 17}, {1, 23, 24}, {2, 8, 10}},
      {{0, 17, 37}, {1, 24, 25}, {3, 0, 19}, {2, 10, 11}},
  };
  for (const std::vector<Work>& step : steps) {
    ForwardInput in;
    std::vector<at::Tensor> pos, tok, want, tables;
    for (const Work& w : step) {
      ForwardInput one = OneSeq(ids[w.seq], Range(w.begin, w.end), w.end, bt[w.seq]);
      want.push_back(RunOk(*e, one, single).logits);
      in.query_lens.push_back(w.end - w.begin);
      in.context_lens.push_back(w.end);
      pos.push_back(one.positions);
      tok.push_back(one.token_ids);
      tables.push_back(bt[w.seq]);
    }
    in.block_tables = at::stack(tables);
    in.positions = at::cat(pos);
    in.token_ids = at::cat(tok);
    in.logits_rows = at::arange(in.positions.size(0), at::kLong);
    ForwardOutput got = RunOk(*e, in, batch);
    EXPECT_LT(MaxDiff(got.logits, at::cat(want)), 1e-4);
  }
  for (int64_t s = 0; s < num_seqs; ++s) {
    for (int32_t kv = 0; kv < 2; ++kv) {
      EXPECT_LT(MaxDiff(SeqKv(batch, bt[s], n, kv), SeqKv(single, bt[s], n, kv)), 1e-5);
    }
  }
}

// K|V packed along the last dim and the HND variant: neither merges blocks
// and slots the way vLLM's layout does, so they take the (block, slot) path.
TEST(ExecutorTest, StridedCacheLayoutsEqualVllmLayout) {
  Tiny m = MakeTiny({});
  auto e = MakeExecutor(m);
  const int64_t T = 17, nb = 6, bs = 4, kvh = m.config.num_kv_heads, d = m.config.head_size;
  at::Tensor ids = RandomIds(T + 1, m.config.vocab_size, 12);
  at::Tensor bt = Long({4, 0, 5, 1, 3});
  Cache vllm = NewCache(m.config, nb, bs);
  std::vector<at::Tensor> packed_raw, hnd_raw;
  std::vector<LayerKvCache> packed, hnd;
  for (int32_t l = 0; l < m.config.num_layers; ++l) {
    at::Tensor p = at::zeros({nb, bs, kvh, 2 * d});
    packed_raw.push_back(p);
    packed.push_back({p.narrow(3, 0, d), p.narrow(3, d, d)});
    at::Tensor h = at::zeros({nb, 2, kvh, bs, d});
    hnd_raw.push_back(h);
    hnd.push_back({h.select(1, 0).transpose(1, 2), h.select(1, 1).transpose(1, 2)});
  }
  for (int64_t n : {T, T + 1}) {
    std::vector<int64_t> p = n == T ? Range(0, T) : std::vector<int64_t>{T};
    ForwardInput in = OneSeq(ids, p, n, bt);
    auto a = e->Forward(in, vllm.layers);
    auto b = e->Forward(in, packed);
    auto c = e->Forward(in, hnd);
    ASSERT_TRUE(a.ok() && b.ok() && c.ok());
    EXPECT_LT(MaxDiff(a->logits, b->logits), 1e-6);
    EXPECT_LT(MaxDiff(a->logits, c->logits), 1e-6);
  }
  for (int32_t l = 0; l < m.config.num_layers; ++l) {
    EXPECT_EQ(MaxDiff(vllm.layers[l].v, packed[l].v), 0.0);
    EXPECT_EQ(MaxDiff(vllm.layers[l].k, hnd[l].k), 0.0);
  }
}

TEST(ExecutorTest, SkippedWritesLeaveCacheAndChangeNothingElse) {
  Tiny m = MakeTiny({});
  auto e = MakeExecutor(m);
  const int64_t T = 12;
  at::Tensor ids = RandomIds(T, m.config.vocab_size, 13);
  at::Tensor bt = Long({0, 1, 2});
  Cache a = NewCache(m.config, 3, 4), b = NewCache(m.config, 3, 4);
  ForwardOutput oa = RunOk(*e, OneSeq(ids, Range(0, T), T, bt), a);
  ForwardInput in = OneSeq(ids, Range(0, T), T, bt);
  in.skip_write_layers = {1};
  ForwardOutput ob = RunOk(*e, in, b);
  EXPECT_EQ(MaxDiff(oa.logits, ob.logits), 0.0);
  EXPECT_EQ(b.raw[1].abs().max().item<double>(), 0.0);
  EXPECT_EQ(MaxDiff(a.raw[0], b.raw[0]), 0.0);
  // A subset computed without writing anywhere still sees its own fresh KV.
  Cache c = NewCache(m.config, 3, 4);
  RunOk(*e, OneSeq(ids, Range(0, T), T, bt), c);
  at::Tensor before = at::stack(c.raw).clone();
  ForwardInput sub = OneSeq(ids, {2, 5, 6}, T, bt);
  sub.write_kv = false;
  ForwardOutput os = RunOk(*e, sub, c);
  EXPECT_EQ(MaxDiff(at::stack(c.raw), before), 0.0);
  EXPECT_LT(MaxDiff(os.logits, oa.logits.index_select(0, Long({2, 5, 6}))), 1e-5);
}

TEST(ExecutorTest, ObservationsReportFreshAndCachedKvAndAttention) {
  Tiny m = MakeTiny(ArchOptions(3));  // Mistral: window 7
  auto e = MakeExecutor(m);
  const int64_t T = 16;
  at::Tensor ids = RandomIds(T, m.config.vocab_size, 14);
  at::Tensor bt = Long({3, 2, 1, 0});
  Cache cache = NewCache(m.config, 4, 4);
  RunOk(*e, OneSeq(ids, Range(0, T), T, bt), cache);
  at::Tensor v_exact = SeqKv(cache, bt, T, 1);
  // Perturb the cached V of positions 4 and 9 in layer 1 (a "reused" cache).
  at::Tensor sp = Long({4, 9});
  at::Tensor blocks = bt.index_select(0, at::floor_divide(sp, 4)), slots = at::remainder(sp, 4);
  cache.raw[1][1].index_put_({blocks, slots}, cache.raw[1][1].index({blocks, slots}) + 0.5);
  at::Tensor v_spoiled = SeqKv(cache, bt, T, 1);

  ForwardInput in = OneSeq(ids, {4, 9, 10}, T, bt);
  in.last_layer = 1;
  in.logits_rows = at::Tensor();
  in.skip_write_layers = {1};
  in.observe.kv_layers = {1};
  in.observe.attention_layers = {1, 0};
  in.observe.attention_rows = Long({2, 0});  // positions 10 and 4
  ForwardOutput out = RunOk(*e, in, cache);
  ASSERT_EQ(out.kv.size(), 1u);
  EXPECT_EQ(out.kv[0].layer, 1);
  EXPECT_LT(MaxDiff(out.kv[0].fresh_v, v_exact[1].index_select(0, Long({4, 9, 10}))), 1e-5);
  EXPECT_EQ(MaxDiff(out.kv[0].cached_v, v_spoiled[1].index_select(0, Long({4, 9, 10}))), 0.0);
  EXPECT_EQ(MaxDiff(SeqKv(cache, bt, T, 1)[1], v_spoiled[1]), 0.0);  // layer 1 not written

  ASSERT_EQ(out.attention.size(), 2u);
  EXPECT_EQ(out.attention[0].layer, 1);
  at::Tensor probs = out.attention[0].probs;  // [2, H, 16]
  ASSERT_EQ(probs.sizes(), at::IntArrayRef({2, m.config.num_heads, T}));
  EXPECT_LT((probs.sum(-1) - 1).abs().max().item<double>(), 1e-5);
  // Row 0 is position 10: window 7 shows keys 4..10 only. Row 1 is position 4.
  EXPECT_EQ(probs[0].slice(-1, 0, 4).abs().max().item<double>(), 0.0);
  EXPECT_EQ(probs[0].slice(-1, 11).abs().max().item<double>(), 0.0);
  EXPECT_GT(probs[0].slice(-1, 4, 11).min().item<double>(), 0.0);
  EXPECT_EQ(probs[1].slice(-1, 5).abs().max().item<double>(), 0.0);
}

TEST(ExecutorTest, BfloatWeightsAndHalfCacheRun) {
  Tiny m = MakeTiny({});
  const int64_t T = 20;
  at::Tensor ids = RandomIds(T, m.config.vocab_size, 15);
  at::Tensor ref = ReferenceLogits(m, ids);
  for (auto& [name, t] : m.weights) t = t.to(at::kBFloat16);
  auto e = MakeExecutor(m);
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->dtype(), at::kBFloat16);
  Cache cache = NewCache(m.config, 5, 4, at::kHalf);
  at::Tensor bt = Long({0, 1, 2, 3, 4});
  ForwardOutput pre = RunOk(*e, OneSeq(ids, Range(0, T - 1), T - 1, bt), cache);
  ForwardOutput dec = RunOk(*e, OneSeq(ids, {T - 1}, T, bt), cache);
  ASSERT_TRUE(dec.logits.defined());
  EXPECT_EQ(dec.logits.scalar_type(), at::kFloat);
  const double scale = ref.abs().max().item<double>();
  EXPECT_LT(MaxDiff(dec.logits, ref.narrow(0, T - 1, 1)), 0.1 * scale);
  EXPECT_LT(MaxDiff(pre.logits, ref.narrow(0, 0, T - 1)), 0.1 * scale);
}

TEST(ExecutorTest, FusedVllmProjectionsEqualSeparate) {
  Tiny m = MakeTiny(ArchOptions(1));
  Tiny fused = m;
  for (int32_t l = 0; l < m.config.num_layers; ++l) {
    const std::string a = "model.layers." + std::to_string(l) + ".self_attn.";
    const std::string p = "model.layers." + std::to_string(l) + ".mlp.";
    for (const char* kind : {"weight", "bias"}) {
      fused.weights[a + "qkv_proj." + kind] =
          at::cat({m.weights[a + "q_proj." + kind], m.weights[a + "k_proj." + kind],
                   m.weights[a + "v_proj." + kind]});
      for (const char* x : {"q_proj.", "k_proj.", "v_proj."}) fused.weights.erase(a + x + kind);
    }
    fused.weights[p + "gate_up_proj.weight"] =
        at::cat({m.weights[p + "gate_proj.weight"], m.weights[p + "up_proj.weight"]});
    fused.weights.erase(p + "gate_proj.weight");
    fused.weights.erase(p + "up_proj.weight");
  }
  auto e1 = MakeExecutor(m), e2 = MakeExecutor(fused);
  ASSERT_NE(e2, nullptr);
  at::Tensor ids = RandomIds(9, m.config.vocab_size, 16);
  Cache c1 = NewCache(m.config, 3, 4), c2 = NewCache(m.config, 3, 4);
  ForwardInput in = OneSeq(ids, Range(0, 9), 9, Long({0, 1, 2}));
  EXPECT_LT(MaxDiff(RunOk(*e1, in, c1).logits, RunOk(*e2, in, c2).logits), 1e-5);
}

TEST(ExecutorTest, CreateRejectsBadWeightsWithTheirNames) {
  Tiny m = MakeTiny({});
  {
    Tiny x = m;
    x.weights.erase("model.layers.1.mlp.up_proj.weight");
    auto e = ModelExecutor::Create(x.config, x.weights);
    ASSERT_FALSE(e.ok());
    EXPECT_EQ(e.status().code(), StatusCode::kNotFound);
    EXPECT_NE(e.status().ToString().find("model.layers.1.mlp.up_proj.weight"), std::string::npos);
  }
  {
    Tiny x = m;
    x.weights["model.layers.0.self_attn.k_proj.weight"] = at::zeros({3, 3});
    auto e = ModelExecutor::Create(x.config, x.weights);
    ASSERT_FALSE(e.ok());
    EXPECT_NE(e.status().ToString().find("k_proj.weight' has shape [3, 3]"), std::string::npos);
  }
  {
    Tiny x = m;
    x.weights["model.layers.0.self_attn.q_proj.bias"] = at::zeros({64});
    auto e = ModelExecutor::Create(x.config, x.weights);
    ASSERT_FALSE(e.ok());
    EXPECT_NE(e.status().ToString().find("q_proj.bias"), std::string::npos);
  }
  {
    Tiny x = m;
    x.weights["model.extra.weight"] = at::zeros({1});
    auto e = ModelExecutor::Create(x.config, x.weights);
    ASSERT_FALSE(e.ok());
    EXPECT_NE(e.status().ToString().find("model.extra.weight"), std::string::npos);
  }
  {
    Tiny x = m;
    x.weights["model.norm.weight"] = x.weights["model.norm.weight"].to(at::kHalf);
    auto e = ModelExecutor::Create(x.config, x.weights);
    ASSERT_FALSE(e.ok());
    EXPECT_NE(e.status().ToString().find("share one dtype"), std::string::npos);
  }
  {
    Tiny x = m;
    x.config.num_kv_heads = 3;
    auto e = ModelExecutor::Create(x.config, x.weights);
    ASSERT_FALSE(e.ok());
    EXPECT_EQ(e.status().code(), StatusCode::kInvalidArgument);
  }
}

TEST(ExecutorTest, ForwardRejectsBadBatchesWithoutTouchingTheCache) {
  Tiny m = MakeTiny({});
  auto e = MakeExecutor(m);
  at::Tensor ids = RandomIds(8, m.config.vocab_size, 17);
  at::Tensor bt = Long({0, 1});
  Cache cache = NewCache(m.config, 2, 4);
  auto expect_invalid = [&](const ForwardInput& in, const char* needle) {
    auto out = e->Forward(in, cache.layers);
    ASSERT_FALSE(out.ok()) << needle;
    EXPECT_EQ(out.status().code(), StatusCode::kInvalidArgument) << out.status().ToString();
    EXPECT_NE(out.status().ToString().find(needle), std::string::npos) << out.status().ToString();
    EXPECT_EQ(at::stack(cache.raw).abs().max().item<double>(), 0.0);
  };
  ForwardInput in = OneSeq(ids, {0, 1, 2}, 3, bt);
  in.positions = Long({0, 1, 3});
  expect_invalid(in, "outside its context");
  in.positions = Long({0, 1, 1});
  expect_invalid(in, "same position twice");
  in = OneSeq(ids, {0, 1, 2}, 6, Long({0, 9}));  // positions 4, 5 of the context
  expect_invalid(in, "outside [0, 2)");
  in = OneSeq(ids, Range(0, 8), 8, bt);
  in.context_lens = {9};
  expect_invalid(in, "block table holds 8");
  in = OneSeq(ids, {0, 1, 2}, 3, bt);
  in.last_layer = 1;
  expect_invalid(in, "logits_rows needs last_layer");
  in = OneSeq(ids, {0, 1, 2}, 3, bt);
  in.observe.kv_layers = {5};
  expect_invalid(in, "observe.kv_layers");
  in = OneSeq(ids, {0, 1, 2}, 3, bt);
  in.first_layer = 1;
  expect_invalid(in, "needs hidden_states");
  in = OneSeq(ids, {0, 1, 2}, 3, bt);
  in.token_ids = Long({0, 1, 500});
  expect_invalid(in, "vocab_size");
  in = OneSeq(ids, {0, 1, 2}, 3, bt);
  std::vector<LayerKvCache> short_cache(cache.layers.begin(), cache.layers.end() - 1);
  auto out = e->Forward(in, short_cache);
  EXPECT_FALSE(out.ok());
}

TEST(ModelConfigTest, ArchitecturesParseAndErrorsNameTheSupportedOnes) {
  EXPECT_EQ(*ParseArchitecture("LlamaForCausalLM"), Architecture::kLlama);
  EXPECT_EQ(*ParseArchitecture("qwen3"), Architecture::kQwen3);
  auto bad = ParseArchitecture("gpt2");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().ToString().find("Qwen2ForCausalLM"), std::string::npos);
  ModelConfig c = MakeTiny({}).config;
  EXPECT_TRUE(c.Validate().ok());
  c.architecture = Architecture::kQwen3;
  EXPECT_FALSE(c.Validate().ok());  // Qwen3 without q/k norm
  c = MakeTiny({}).config;
  c.rope.rotary_dim = 7;
  EXPECT_FALSE(c.Validate().ok());
  c = MakeTiny(ArchOptions(2)).config;
  EXPECT_EQ(c.LayerWindow(0), 0);
  EXPECT_EQ(c.LayerWindow(1), 5);
}

}  // namespace
}  // namespace relaykv::rectify
