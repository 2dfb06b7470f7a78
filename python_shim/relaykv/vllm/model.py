"""How the worker-side connector reaches the served model's weights, to compute gap tokens.

vLLM's connector API hands the worker KV caches and attention metadata, never
the model. relaykv computes gaps with its own C++ executor over the model's
weights (no copy: the executor keeps references to vLLM's parameter tensors),
so it needs the model's named parameters. Two ways, in order:

1. ``relaykv.vllm.attach_model(model)``: the documented hook. Pass the loaded
   vLLM model (an ``nn.Module``, e.g. ``llm.llm_engine.model_executor.driver_worker
   .worker.model_runner.model``) or any name → tensor mapping with vLLM's or
   transformers' parameter names. Connectors of the process built after the call,
   and those already registered, use it.
2. Discovery at ``register_kv_caches``: vLLM 0.32's model runner calls it from
   ``initialize_kv_cache`` after ``load_model``; the connector looks at the few
   calling frames for an object whose ``model`` attribute is an ``nn.Module``
   containing the very attention layer objects vLLM registered for this config
   (``compilation_config.static_forward_context``). Identity, not names, decides,
   so a wrong module is never taken; when nothing matches, nothing is attached.

On vLLM's CPU platform the linear weights are repacked for oneDNN and emptied
after loading; the connector then reads the checkpoint directory once more
(a second copy of the weights in memory, CPU serving of small models only).

Without a model the connector still imports spans; a claim with a gap it cannot
compute is reported through get_block_ids_with_load_errors and vLLM recomputes it.
Unquantized Llama-family models (Llama, Mistral, Qwen2, Qwen3) with
tensor-parallel size 1 only; anything else is refused with the reason.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Mapping
from typing import Any

import torch

_lock = threading.Lock()
_attached: dict[str, torch.Tensor] | None = None
_generation = 0  # bumped by attach_model so connectors can notice a new model


class ModelUnavailableError(RuntimeError):
    """The worker cannot compute gap tokens: no model reachable in this process."""


class ModelMismatchError(ModelUnavailableError):
    """The model reached is one the executor cannot run, or does not match vLLM's config and cache."""


def _named_tensors(model: Any) -> dict[str, torch.Tensor]:
    if isinstance(model, torch.nn.Module):
        # named_parameters de-duplicates shared tensors: a tied lm_head is listed once, as the embedding.
        return {name: p.detach() for name, p in model.named_parameters()}
    if isinstance(model, Mapping):
        return {str(k): v.detach() for k, v in model.items()}
    raise TypeError(f"relaykv.vllm.attach_model: expected an nn.Module or a name → tensor mapping, got "
                    f"{type(model).__name__}")


def attach_model(model: Any) -> None:
    """Makes `model`'s weights the ones the worker-side connectors of this process compute gaps with."""
    global _attached, _generation
    tensors = _named_tensors(model)
    with _lock:
        _attached = tensors
        _generation += 1


def detach_model() -> None:
    global _attached, _generation
    with _lock:
        _attached = None
        _generation += 1


def attached() -> tuple[int, dict[str, torch.Tensor] | None]:
    with _lock:
        return _generation, _attached


def discover_model(attention_layers: list[Any], max_frames: int = 8) -> torch.nn.Module | None:
    """The calling model runner's model, if it holds exactly these attention layer objects."""
    if not attention_layers:
        return None
    want = {id(layer) for layer in attention_layers}
    frame = inspect.currentframe()
    try:
        for _ in range(max_frames):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                break
            owner = frame.f_locals.get("self")
            for candidate in (getattr(owner, "model", None), getattr(getattr(owner, "model_runner", None),
                                                                       "model", None)):
                # Compiled/graph wrappers keep the module under .runnable / .model.
                for module in (candidate, getattr(candidate, "runnable", None), getattr(candidate, "model", None)):
                    if isinstance(module, torch.nn.Module):
                        mods = {id(m) for m in module.modules()}
                        if want <= mods:
                            return module
    finally:
        del frame
    return None


def emptied(weights: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of linear weights the platform has emptied after repacking them.

    vLLM's CPU platform hands each unquantized linear layer to oneDNN / sgl-kernel
    after loading (layers.utils.dispatch_cpu_unquantized_gemm(remove_weight=True))
    and replaces its weight with an empty tensor, so the module no longer holds it."""
    return sorted(n for n, t in weights.items() if n.endswith(".weight") and t.numel() == 0)


def load_checkpoint(path: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's weights read again from its local checkpoint directory (never from a hub)."""
    import os

    if not os.path.isdir(path):
        raise ModelUnavailableError(
            f"relaykv: the served model's weights are repacked by the platform and '{path}' is not a local "
            "checkpoint directory to read them from; call relaykv.vllm.attach_model(weights)")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return {n: p.detach() for n, p in model.named_parameters()}


def check_weights(weights: Mapping[str, torch.Tensor]) -> None:
    """Refuses quantized or sharded weights before the executor sees them."""
    odd = sorted(n for n, t in weights.items() if not t.is_floating_point() or t.dtype.itemsize == 1)
    if odd:
        raise ModelMismatchError(
            f"relaykv: the model has non-float (quantized) parameters ({odd[:3]}...); the relaykv executor "
            "runs unquantized Llama-family models only")


def build_executor(weights: Mapping[str, torch.Tensor], hf_config: Any) -> Any:
    """A relaykv Executor over `weights` (vLLM's fused qkv_proj/gate_up_proj names are taken as they are)."""
    from relaykv import _relaykv as core
    from relaykv.model.config import UnsupportedModelError
    from relaykv.model.executor import Executor

    check_weights(weights)
    try:
        return Executor.from_state_dict(dict(weights), hf_config)
    except (UnsupportedModelError, core.RelayKVError, ValueError, TypeError) as exc:
        raise ModelMismatchError(f"relaykv: cannot run the served model with the relaykv executor: {exc}") from exc


__all__ = ["ModelMismatchError", "ModelUnavailableError", "attach_model", "attached", "build_executor", "check_weights",
           "emptied", "load_checkpoint",
           "detach_model", "discover_model"]
