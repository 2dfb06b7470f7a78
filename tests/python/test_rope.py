"""RoPE variants against transformers' own: frequencies, the cos/sin factor, and re-rotation of imported K."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from relaykv import core
from relaykv.model.config import model_config_from_hf

HEAD = 64

# transformers rope_parameters → each variant the executor and the relay handle.
VARIANTS = {
    "default": dict(rope_type="default", rope_theta=10000.0),
    "linear": dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
    "llama3": dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=8192),
    "yarn": dict(rope_type="yarn", rope_theta=1000000.0, factor=4.0, original_max_position_embeddings=32768),
    "yarn-untruncated": dict(rope_type="yarn", rope_theta=10000.0, factor=8.0,
                             original_max_position_embeddings=4096, truncate=False),
    "yarn-betas": dict(rope_type="yarn", rope_theta=10000.0, factor=16.0, original_max_position_embeddings=2048,
                       beta_fast=8.0, beta_slow=2.0),
    "yarn-mscale": dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=4096,
                        mscale=0.707, mscale_all_dim=0.707),
    "yarn-attention-factor": dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                  original_max_position_embeddings=4096, attention_factor=1.5),
    "yarn-partial": dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=4096,
                         partial_rotary_factor=0.5),
}


def llama_config(rope_parameters: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    # The extended context YaRN is configured for (transformers warns when it disagrees with factor).
    longest = int(rope_parameters.get("factor", 1.0) * rope_parameters.get("original_max_position_embeddings", 8192))
    return LlamaConfig(vocab_size=64, hidden_size=HEAD * 2, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=longest,
                       rope_parameters=dict(rope_parameters))


def hf_rope(config: Any) -> tuple[torch.Tensor, float]:
    """transformers' inverse frequencies and cos/sin factor for `config`."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope_type](config)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_frequencies_and_cos_sin_factor_equal_transformers(variant):
    config = llama_config(VARIANTS[variant])
    rope = model_config_from_hf(config).rope
    want_inv, want_factor = hf_rope(config)
    got_inv = torch.tensor(rope.inverse_frequencies(HEAD), dtype=torch.float64)
    assert got_inv.shape == want_inv.shape
    # transformers computes in float32; relaykv in float64 and rounds once, at the executor's cast.
    assert torch.allclose(got_inv.float(), want_inv.float(), rtol=2e-6, atol=0), (got_inv, want_inv)
    assert rope.attention_factor == pytest.approx(want_factor, rel=1e-6)
    if variant.startswith("yarn"):
        assert rope.scaling == "yarn"
        # The variant really scales something: some frequencies kept, some divided.
        plain = core.RopeParams(theta=rope.theta, rotary_dim=rope.rotary_dim)
        ratio = torch.tensor(plain.inverse_frequencies(HEAD)) / got_inv
        assert ratio.min() == pytest.approx(1.0) and ratio.max() == pytest.approx(rope.factor)


def test_yarn_without_the_original_context_is_refused_with_a_message():
    from relaykv.model.config import UnsupportedModelError

    config = llama_config(dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                               original_max_position_embeddings=4096))
    config.rope_parameters.pop("original_max_position_embeddings")
    with pytest.raises(UnsupportedModelError, match="original_max_position_embeddings"):
        model_config_from_hf(config)


def test_imported_k_under_yarn_equals_transformers_k_at_the_new_position():
    """A record of K rotated (and scaled) by transformers' YaRN at [10, 50), imported at [23, 63)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = llama_config(dict(rope_type="yarn", rope_theta=10000.0, factor=8.0,
                               original_max_position_embeddings=64))
    rope = model_config_from_hf(config).rope
    assert rope.attention_factor > 1.2  # the scale is in every stored K, and must stay as it is
    rotary = LlamaRotaryEmbedding(config)
    layers, heads, block, blocks, n = 2, 1, 8, 12, 40

    def rotated(k: torch.Tensor, first: int) -> torch.Tensor:  # [n, H, D] at positions first..first+n
        cos, sin = rotary(k, torch.arange(first, first + n)[None])
        x = k.transpose(0, 1)[None]
        out, _ = apply_rotary_pos_emb(x, x, cos, sin)
        return out[0].transpose(0, 1)

    torch.manual_seed(0)
    raw = [torch.randn(n, heads, HEAD) for _ in range(layers)]
    relay = core.KvRelay(11, core.KvLayout(layers, heads, HEAD, "float32"), rope, "t", 1 << 22)
    caches = [torch.zeros(2, blocks, block, heads, HEAD) for _ in range(layers)]
    src = core.PagedCache([c[0] for c in caches], [c[1] for c in caches])
    table = list(range(blocks))
    pos = torch.arange(10, 10 + n)
    for c, k in zip(caches, raw):
        c[0][pos // block, pos % block] = rotated(k, 10)
    answer = list(range(300, 300 + n))
    relay.export(src, table, answer, 10)

    prompt = list(range(700, 723)) + answer
    (span,) = relay.lookup(prompt)
    dst_caches = [torch.zeros(2, blocks, block, heads, HEAD) for _ in range(layers)]
    dst = core.PagedCache([c[0] for c in dst_caches], [c[1] for c in dst_caches])
    assert relay.import_span(span, prompt, dst, table)["position_delta"] == 13
    new = torch.arange(23, 23 + n)
    for c, k in zip(dst_caches, raw):
        got = c[0][new // block, new % block]
        assert torch.allclose(got, rotated(k, 23), atol=2e-5)
        assert not torch.allclose(got, rotated(k, 10), atol=1e-2)  # it did move
