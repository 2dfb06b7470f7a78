"""The relay through the Python bindings, on torch tensors in vLLM's layouts."""

from __future__ import annotations

import math

import pytest
import torch

import relaykv
from relaykv import core

L, H, D, BS, NB = 4, 3, 16, 8, 24


def rope_rotate(k: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Reference neox RoPE on [T, H, D] at absolute positions, in float64."""
    half = k.shape[-1] // 2
    inv = 1.0 / theta ** (torch.arange(half, dtype=torch.float64) * 2 / k.shape[-1])
    ang = positions.double()[:, None] * inv[None, :]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = k[..., :half].double(), k[..., half:].double()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def nhd_cache(dtype=torch.float32):
    """vLLM's flash layout: per layer [2, num_blocks, block_size, heads, dim]."""
    layers = [torch.zeros(2, NB, BS, H, D, dtype=dtype) for _ in range(L)]
    return layers, core.PagedCache([x[0] for x in layers], [x[1] for x in layers])


def packed_cache(dtype=torch.float32):
    """K|V packed along the last dim inside one shared buffer: [L, NB, BS, H, 2D]."""
    buf = torch.zeros(L, NB, BS, H, 2 * D, dtype=dtype)
    return buf, core.PagedCache([buf[l, ..., :D] for l in range(L)], [buf[l, ..., D:] for l in range(L)])


def rows(cache_layer: torch.Tensor, table: list[int], positions: range) -> torch.Tensor:
    pos = torch.as_tensor(list(positions))
    return cache_layer[torch.as_tensor(table)[pos // BS], pos % BS]


@pytest.fixture
def relay():
    layout = core.KvLayout(L, H, D, "float32")
    return core.KvRelay(7, layout, relaykv.RopeParams(theta=10000.0), "t", 1 << 24)


def test_export_import_rotates_k_to_the_new_position(relay):
    torch.manual_seed(0)
    src_layers, src = nhd_cache()
    theta = 10000.0
    # A's answer at positions [10, 50): K is rotated at those positions as a model would.
    src_table = list(range(NB))
    raw_k = [torch.randn(40, H, D) for _ in range(L)]
    vs = [torch.randn(40, H, D) for _ in range(L)]
    for l in range(L):
        pos = torch.arange(10, 50)
        src_layers[l][0][torch.as_tensor(src_table)[pos // BS], pos % BS] = rope_rotate(raw_k[l], pos, theta).float()
        src_layers[l][1][torch.as_tensor(src_table)[pos // BS], pos % BS] = vs[l]
    answer = list(range(1000, 1040))
    info = relay.export(src, src_table, answer, 10)
    assert info["bytes"] > 40 * L * 2 * H * D * 4 and not info["deduplicated"]

    # B quotes it after 23 tokens of its own.
    prompt = list(range(5000, 5023)) + answer + [7, 8, 9]
    spans = relay.lookup(prompt)
    assert spans == [core.Span(info["record_id"], 0, 23, 40)]

    dst_buf, dst = packed_cache()
    dst_table = list(reversed(range(NB)))
    res = relay.import_span(spans[0], prompt, dst, dst_table)
    assert res["tokens"] == 40 and res["position_delta"] == 13
    for l in range(L):
        got_k = rows(dst_buf[l][..., :D], dst_table, range(23, 63)).double()
        got_v = rows(dst_buf[l][..., D:], dst_table, range(23, 63))
        want_k = rope_rotate(raw_k[l], torch.arange(23, 63), theta)
        assert torch.allclose(got_k, want_k, atol=2e-5), l
        assert torch.equal(got_v, vs[l])
    m = relay.metrics()
    assert m["exports"] == 1 and m["imports"] == 1 and m["import_tokens"] == 40


def test_failures_raise_typed_errors_and_are_counted(relay):
    layers, cache = nhd_cache()
    answer = list(range(300, 340))
    info = relay.export(cache, list(range(NB)), answer, 0)
    # Prompt tokens that differ from the record: refused, never imported.
    wrong = list(answer)
    wrong[5] += 1
    with pytest.raises(core.AbortedError):
        relay.import_span(core.Span(info["record_id"], 0, 0, 40), wrong, cache, list(range(NB)))
    relay.delete(info["record_id"])
    with pytest.raises(core.NotFoundError) as e:
        relay.import_span(core.Span(info["record_id"], 0, 0, 40), answer, cache, list(range(NB)))
    assert e.value.code == "NOT_FOUND"
    assert isinstance(e.value, KeyError) and isinstance(e.value, relaykv.RelayKVError)
    assert relay.lookup(answer) == []
    failures = relay.metrics()["import_failures"]
    assert failures["token_mismatch"] == 1 and failures["not_found"] == 1


def test_bad_caches_are_rejected_with_a_message():
    k = [torch.zeros(NB, BS, H, D) for _ in range(L)]
    with pytest.raises(core.InvalidArgumentError, match="one K and one V"):
        core.PagedCache(k, k[:-1])
    with pytest.raises(core.InvalidArgumentError, match="float32, float16 or bfloat16"):
        core.PagedCache([x.int() for x in k], [x.int() for x in k])
    mixed = list(k)
    mixed[2] = torch.zeros(NB, BS, H, D, dtype=torch.float16)
    with pytest.raises(core.InvalidArgumentError, match="layer 2"):
        core.PagedCache(mixed, k)


def test_layout_mismatch_between_cache_and_instance(relay):
    layers, cache = nhd_cache(torch.float16)
    with pytest.raises(core.InvalidArgumentError, match="differs from this instance"):
        relay.export(cache, list(range(NB)), list(range(40)), 0)
    assert relay.metrics()["export_failures"] == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_round_trip(dtype):
    layout = core.KvLayout(L, H, D, str(dtype).replace("torch.", ""))
    relay = core.KvRelay(1, layout, relaykv.RopeParams(), "", 1 << 24)
    layers, cache = nhd_cache(dtype)
    for x in layers:
        x.normal_()
    answer = list(range(64))
    relay.export(cache, list(range(NB)), answer, 0)
    [span] = relay.lookup(answer)
    buf, dst = packed_cache(dtype)
    relay.import_span(span, answer, dst, list(range(NB)))  # delta 0: bytes move unchanged
    for l in range(L):
        assert torch.equal(buf[l, ..., :D].reshape(-1, H, D)[:64], layers[l][0].reshape(-1, H, D)[:64])
        assert torch.equal(buf[l, ..., D:].reshape(-1, H, D)[:64], layers[l][1].reshape(-1, H, D)[:64])
    assert math.isclose(relay.store_stats()["records"], 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not core.built_with_cuda, reason="relaykv was built without CUDA")
def test_cuda_caches_export_and_import_like_host_caches(relay):
    """A cache on the GPU (vLLM's flash layout) exports and imports through the same calls;
    the bytes equal the host path's (V exactly, K within the RoPE kernels' last-bit bound)."""
    torch.manual_seed(3)
    host_layers, host = nhd_cache()
    for x in host_layers:
        x.normal_()
    gpu_layers = [x.cuda() for x in host_layers]
    gpu = core.PagedCache([x[0] for x in gpu_layers], [x[1] for x in gpu_layers])
    table = list(range(NB))
    answer = list(range(2000, 2040))
    exported = relay.export(gpu, table, answer, 10)  # gathered on the GPU, copied to the record
    prompt = list(range(5000, 5023)) + answer
    (span,) = relay.lookup(prompt)
    assert span.record_id == exported["record_id"]
    out_gpu = [torch.zeros_like(x) for x in gpu_layers]
    out_host = [torch.zeros_like(x) for x in host_layers]
    dst_table = list(reversed(range(NB)))
    relay.import_span(span, prompt, core.PagedCache([x[0] for x in out_gpu], [x[1] for x in out_gpu]), dst_table)
    relay.import_span(span, prompt, core.PagedCache([x[0] for x in out_host], [x[1] for x in out_host]),
                      dst_table)
    for l in range(L):
        got = out_gpu[l].cpu()
        assert torch.equal(got[1], out_host[l][1]), l
        assert torch.allclose(got[0], out_host[l][0], atol=1e-6, rtol=1e-6), l
    # The exported record holds the host cache's bytes: V at the original positions unchanged.
    assert torch.equal(rows(out_host[0][1], dst_table, range(23, 63)), rows(host_layers[0][1], table, range(10, 50)))
