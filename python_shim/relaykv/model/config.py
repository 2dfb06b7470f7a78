"""transformers configs → the executor's ModelConfig.

The executor runs the Llama family only; everything else is refused here with
a message naming what is supported, before any weight is touched.
"""

from __future__ import annotations

import math
from typing import Any

from relaykv import _relaykv as core

# transformers model_type → the class name users see in errors and configs.
SUPPORTED_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class UnsupportedModelError(ValueError):
    """A model the executor cannot run (architecture, activation or RoPE variant)."""


def _supported() -> str:
    return ", ".join(f"{k} ({v})" for k, v in SUPPORTED_ARCHITECTURES.items())


def check_supported(model_type: str | None, architectures: list[str] | None = None) -> None:
    """Raises UnsupportedModelError unless the model type is one the executor runs."""
    if model_type not in SUPPORTED_ARCHITECTURES:
        shown = model_type if not architectures else f"{model_type} ({', '.join(architectures)})"
        raise UnsupportedModelError(
            f"unsupported architecture '{shown}': the relaykv executor runs {_supported()}"
        )


def _rope(hf: Any, head_dim: int) -> core.RopeParams:
    params = dict(getattr(hf, "rope_parameters", None) or {})
    legacy = getattr(hf, "rope_scaling", None)
    if not params and isinstance(legacy, dict):
        params = dict(legacy)
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in _ROPE_TYPES:
        raise UnsupportedModelError(
            f"unsupported RoPE type '{rope_type}': the executor supports {', '.join(_ROPE_TYPES)}"
        )
    theta = float(params.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))
    partial = float(params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0)))
    rotary_dim = int(head_dim * partial)
    kwargs: dict[str, Any] = dict(theta=theta, rotary_dim=0 if rotary_dim == head_dim else rotary_dim)
    if rope_type == "linear":
        kwargs.update(scaling="linear", factor=float(params["factor"]))
    elif rope_type == "llama3":
        kwargs.update(
            scaling="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position=int(
                params.get("original_max_position_embeddings", hf.max_position_embeddings)
            ),
        )
    elif rope_type == "yarn":
        kwargs.update(_yarn(hf, params))
    return core.RopeParams(**kwargs)


def _yarn(hf: Any, params: dict[str, Any]) -> dict[str, Any]:
    """YaRN's fields, with the defaults and the attention factor transformers derives."""
    original = params.get("original_max_position_embeddings")
    if original is None:
        raise UnsupportedModelError("yarn RoPE needs original_max_position_embeddings in rope_parameters")
    factor = params.get("factor")
    if factor is None:  # DeepSeek-style configs give the lengths instead of the factor
        factor = hf.max_position_embeddings / original
    factor = float(factor)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    return dict(
        scaling="yarn",
        factor=factor,
        original_max_position=int(original),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=float(attention_factor),
        truncate=bool(params.get("truncate", True)),
    )


def model_config_from_hf(hf: Any) -> core.ModelConfig:
    """The executor's ModelConfig for a transformers config (LlamaConfig, Qwen3Config, ...)."""
    model_type = getattr(hf, "model_type", None)
    check_supported(model_type, getattr(hf, "architectures", None))
    act = getattr(hf, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedModelError(
            f"unsupported MLP activation '{act}': the executor runs SwiGLU (silu) MLPs only"
        )
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    c = core.ModelConfig()
    c.architecture = model_type
    c.vocab_size = hf.vocab_size
    c.hidden_size = hf.hidden_size
    c.intermediate_size = hf.intermediate_size
    c.num_layers = hf.num_hidden_layers
    c.num_heads = hf.num_attention_heads
    c.num_kv_heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    c.head_size = head_dim
    c.rms_norm_eps = float(hf.rms_norm_eps)
    c.rope = _rope(hf, head_dim)
    c.tie_word_embeddings = bool(getattr(hf, "tie_word_embeddings", False))
    attention_bias = bool(getattr(hf, "attention_bias", False))
    if model_type == "llama":
        c.qkv_bias = c.o_bias = attention_bias
        c.mlp_bias = bool(getattr(hf, "mlp_bias", False))
    elif model_type == "qwen2":
        c.qkv_bias = True  # Qwen2 always biases q/k/v, never o_proj
    elif model_type == "qwen3":
        c.qkv_bias = c.o_bias = attention_bias
        c.qk_norm = True
    window = getattr(hf, "sliding_window", None)
    layer_types = getattr(hf, "layer_types", None)
    if window:
        if model_type == "mistral" or layer_types is None:
            c.sliding_window = int(window)
        else:
            sliding = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
            if sliding:
                c.sliding_window = int(window)
                c.sliding_window_layers = sliding
    c.validate()
    return c
