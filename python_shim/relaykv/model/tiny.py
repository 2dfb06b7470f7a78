"""Small random transformers models of each supported architecture, for tests.

transformers initialises weights with std 0.02 and biases at zero; logits of
such a model are all near zero, and a test comparing them would pass whatever
the executor did. These models get O(1) activations instead: every weight is
redrawn with a scale that keeps the residual stream and attention peaked,
biases and norm gains are random too.
"""

from __future__ import annotations

import math
from typing import Any

import torch

TINY_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")


def tiny_config(arch: str, **overrides: Any) -> Any:
    """A transformers config for a few-layer model of `arch` (see TINY_ARCHITECTURES).

    Each architecture turns on what is particular to it, so one test per
    architecture covers every optional piece of the executor: Llama gets tied
    embeddings, attention and MLP biases and llama3 RoPE scaling; Qwen2 q/k/v
    bias and a sliding window on its upper layers; Qwen3 q/k norm, a head
    size unrelated to hidden/heads and YaRN RoPE scaling; Mistral a sliding window and linear RoPE
    scaling.
    """
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common: dict[str, Any] = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if arch == "llama":
        common.update(
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        )
        cls = LlamaConfig
    elif arch == "qwen2":
        common.update(use_sliding_window=True, sliding_window=24, max_window_layers=1,
                      rope_parameters=dict(rope_type="default", rope_theta=1000000.0))
        cls = Qwen2Config
    elif arch == "qwen3":
        # Qwen3's long-context setting: YaRN over a short original context, so
        # the ramp between scaled and unscaled frequencies falls inside the head.
        common.update(head_dim=32, num_key_value_heads=1, max_position_embeddings=1024,
                      rope_parameters=dict(rope_type="yarn", rope_theta=1000000.0, factor=4.0,
                                           original_max_position_embeddings=256))
        cls = Qwen3Config
    elif arch == "mistral":
        common.update(sliding_window=20,
                      rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))
        cls = MistralConfig
    else:
        raise ValueError(f"no tiny config for '{arch}'; choose one of {', '.join(TINY_ARCHITECTURES)}")
    common.update(overrides)
    config = cls(**common)
    config._attn_implementation = "sdpa"
    return config


@torch.no_grad()
def randomize_(model: Any, seed: int = 0) -> Any:
    """Redraws every parameter so the model's outputs depend on all of them."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if name.endswith("norm.weight") or "layernorm" in name:
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        elif name.endswith(".bias"):
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        elif "embed_tokens" in name:
            p.copy_(torch.randn(p.shape, generator=gen))
        else:  # projections: unit-variance outputs for unit-variance inputs, then a bit more
            p.copy_(torch.randn(p.shape, generator=gen) * (1.5 / math.sqrt(p.shape[-1])))
    return model


def tiny_model(arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> Any:
    """A random-initialised transformers causal LM of `arch`, eval mode, on CPU."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    randomize_(model, seed)
    model.to(dtype)
    model.eval()
    model.requires_grad_(False)
    return model


__all__ = ["TINY_ARCHITECTURES", "randomize_", "tiny_config", "tiny_model"]


def save_vllm_tiny_llama(path: str, *, max_positions: int = 1024) -> None:
    """Saves a 2-layer random Llama (seed 0) as a transformers folder a vLLM engine can serve.

    Every process that calls this gets the same weights, so engines in separate
    processes agree on the model (and on its KV). Weights are redrawn with std
    1.5/sqrt(fan_in) so that logits are far from flat and token choices are meaningful.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" not in n:
                p.normal_(0, 1.5 / p.shape[-1] ** 0.5)
    m.save_pretrained(path)
