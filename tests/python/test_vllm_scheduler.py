"""RelayKVConnector under the real vLLM scheduler on CPU (vLLM's own connector unit-test pattern:
a CPU VllmConfig over a tiny model config, real Requests, Scheduler.schedule())."""

from __future__ import annotations

import copy
import math
import types
from typing import Any

import pytest

pytestmark = pytest.mark.vllm

pytest.importorskip("vllm", reason="vLLM is not installed: the scheduler tests need it")

import torch  # noqa: E402
from transformers import LlamaConfig  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.config import (  # noqa: E402
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

from relaykv import core  # noqa: E402
from relaykv.vllm import RelayKVConnector, RelayKVConnectorMetadata  # noqa: E402

# A tiny Llama: 2 layers, 2 KV heads of 16 dims (hidden 64 / 4 heads), float32.
LAYERS, KV_HEADS, HEAD, BLOCK, NUM_BLOCKS = 2, 2, 16, 16, 64
EXTRA = {"tenant": "t", "min_span_tokens": 16, "store_capacity_bytes": 1 << 24, "strategy": "naive"}


@pytest.fixture(scope="module")
def vllm_config(tmp_path_factory: pytest.TempPathFactory) -> VllmConfig:
    model_dir = tmp_path_factory.mktemp("tiny-llama")
    LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                num_attention_heads=4, num_key_value_heads=KV_HEADS, max_position_embeddings=512,
                rope_theta=10000.0, torch_dtype="float32").save_pretrained(model_dir)
    cfg = VllmConfig(
        model_config=ModelConfig(model=str(model_dir), skip_tokenizer_init=True, dtype="float32",
                                 max_model_len=512, seed=0),
        scheduler_config=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=512, max_model_len=512,
                                         is_encoder_decoder=False),
        cache_config=CacheConfig(block_size=BLOCK, gpu_memory_utilization=0.9, cache_dtype="auto",
                                 enable_prefix_caching=True),
        kv_transfer_config=KVTransferConfig(kv_connector="RelayKVConnector", kv_connector_module_path="relaykv.vllm",
                                            kv_role="kv_both", kv_connector_extra_config=dict(EXTRA)),
        device_config=DeviceConfig("cpu"),
    )
    # The engine sets this after profiling memory; vLLM's own scheduler tests set it by hand too.
    cfg.cache_config.num_gpu_blocks = NUM_BLOCKS
    return cfg


def kv_cache_config() -> KVCacheConfig:
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=KV_HEADS, head_size=HEAD, dtype=torch.float32)
    names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    return KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(names, spec)])


def make_scheduler(vllm_config: VllmConfig) -> Scheduler:
    return Scheduler(vllm_config=vllm_config, kv_cache_config=kv_cache_config(),
                     structured_output_manager=StructuredOutputManager(vllm_config), block_size=BLOCK,
                     log_stats=False)


init_none_hash(sha256)
HASHER = get_request_block_hasher(BLOCK, sha256)


def make_request(rid: str, prompt: list[int]) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=4), None, block_hasher=HASHER)


def export_answer(relay: core.KvRelay, answer: list[int], seq_begin: int) -> int:
    """Puts another instance's decoding KV of `answer` (at positions seq_begin...) into the relay."""
    nb = math.ceil((seq_begin + len(answer)) / BLOCK)
    torch.manual_seed(0)
    layers = [torch.randn(2, nb, BLOCK, KV_HEADS, HEAD) for _ in range(LAYERS)]
    paged = core.PagedCache([x[0] for x in layers], [x[1] for x in layers])
    return int(relay.export(paged, list(range(nb)), answer, seq_begin)["record_id"])


def relay_connector(sched: Scheduler) -> RelayKVConnector:
    conn = sched.connector
    assert isinstance(conn, RelayKVConnector), f"vLLM built {type(conn).__name__}, not RelayKVConnector"
    return conn


def test_stored_span_is_claimed_allocated_and_listed(vllm_config: VllmConfig) -> None:
    sched = make_scheduler(vllm_config)
    conn = relay_connector(sched)
    answer = list(range(100, 140))  # 40 tokens decoded by another agent at positions [10, 50)
    rid_rec = export_answer(conn.relay, answer, 10)
    prompt = list(range(500, 523)) + answer + [7, 8, 9]  # quoted after 23 tokens of our own: positions [23, 63)
    sched.add_request(make_request("quote", prompt))

    out = sched.schedule()

    # Claim [0, 63): the gap before the span is part of it (only the computed prefix can be extended);
    # the last 3 prompt tokens are computed by the forward.
    assert out.num_scheduled_tokens == {"quote": 3}
    # What the worker is told is already computed when the step starts (vLLM then advances the
    # request's own counter by the 3 scheduled tokens at schedule time).
    assert out.scheduled_new_reqs[0].num_computed_tokens == 63
    meta = out.kv_connector_metadata
    assert isinstance(meta, RelayKVConnectorMetadata)
    assert len(meta.loads) == 1
    load = meta.loads[0]
    assert (load.request_id, load.start, load.end) == ("quote", 0, 63)
    assert load.spans == [core.Span(rid_rec, 0, 23, 40)]
    want_blocks = list(sched.kv_cache_manager.get_blocks("quote").get_block_ids()[0])
    assert load.block_ids == want_blocks and len(want_blocks) == math.ceil(len(prompt) / BLOCK)
    assert out.scheduled_new_reqs[0].block_ids[0] == want_blocks
    # The metadata is handed over once: the next step carries no load.
    assert sched.connector.build_connector_meta(out).loads == []  # type: ignore[union-attr]


def test_a_request_that_imported_exports_only_its_own_runs(vllm_config: VllmConfig) -> None:
    sched = make_scheduler(vllm_config)
    conn = relay_connector(sched)
    answer = list(range(100, 140))
    export_answer(conn.relay, answer, 10)
    prompt = list(range(500, 523)) + answer + [7, 8, 9]  # the answer is imported at [23, 63)
    sched.add_request(make_request("quote", prompt))
    out = sched.schedule()
    assert out.scheduled_new_reqs[0].num_computed_tokens == 63
    req = sched.requests["quote"]
    req.append_output_token_ids(list(range(900, 930)))  # as if it had decoded 30 tokens
    req.num_computed_tokens = len(prompt) + 29  # the last sampled token is never fed back
    blocks = list(sched.kv_cache_manager.get_blocks("quote").get_block_ids()[0])
    blocks += [0] * (math.ceil(req.num_computed_tokens / BLOCK) - len(blocks))
    delay, _ = conn.request_finished(req, blocks)
    assert delay
    (save,) = conn.build_connector_meta(out).saves
    # Its own prefix [0, 23) and what it computed after the span [63, 95); the import stays out.
    n = len(save.token_ids)  # what is in the blocks (vLLM may count tokens still in flight)
    assert n >= 63 + 16 and save.token_ids == (prompt + list(range(900, 930)))[:n]
    assert save.runs == [(0, 23), (63, n)]


def test_a_local_prefix_hit_is_not_exported_again(vllm_config: VllmConfig) -> None:
    # vLLM caches blocks a connector filled like computed ones; a later request that hits them
    # must not publish that (possibly approximate) KV as its own.
    conn = relay_connector(make_scheduler(vllm_config))
    answer = list(range(100, 140))
    export_answer(conn.relay, answer, 10)
    prompt = list(range(600, 632)) + answer + [7, 8, 9]  # [0, 32) hit the local prefix cache
    req = make_request("hit", prompt)
    n, _ = conn.get_num_new_matched_tokens(req, 32)
    assert n == 72 - 32
    blocks = types.SimpleNamespace(get_block_ids=lambda: ([0, 1, 2, 3, 4],))
    conn.update_state_after_alloc(req, blocks, n)
    req.append_output_token_ids(list(range(900, 920)))
    req.num_computed_tokens = len(prompt) + 19
    delay, params = conn.request_finished(req, list(range(6)))
    assert delay
    (save,) = conn.build_connector_meta(None).saves  # type: ignore[arg-type]
    n_kv = len(save.token_ids)
    assert save.runs == [(72, n_kv)]  # neither the cached [0, 32) nor the imported [32, 72)
    assert params == {"relaykv": {"export_tokens": n_kv - 72}}


def test_nothing_stored_gets_zero(vllm_config: VllmConfig) -> None:
    sched = make_scheduler(vllm_config)
    prompt = list(range(200, 260))
    sched.add_request(make_request("fresh", prompt))
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"fresh": len(prompt)}
    meta = out.kv_connector_metadata
    assert isinstance(meta, RelayKVConnectorMetadata) and meta.loads == []
    assert relay_connector(sched).request_finished(sched.requests["fresh"], []) == (False, None)


def test_claim_starts_after_the_local_prefix_hit(vllm_config: VllmConfig) -> None:
    sched = make_scheduler(vllm_config)
    conn = relay_connector(sched)
    answer = list(range(300, 340))
    export_answer(conn.relay, answer, 0)
    prompt = list(range(600, 623)) + answer + [1]
    req = make_request("partly-cached", prompt)
    # As if vLLM's prefix cache already holds 32 tokens: only [32, 63) is claimed.
    assert conn.get_num_new_matched_tokens(req, 32) == (31, False)
    # A span wholly inside the computed prefix is not claimed again.
    assert conn.get_num_new_matched_tokens(req, 63) == (0, False)


@pytest.mark.parametrize(
    ("extra", "key", "expected"),
    [
        ({"strategy": "fast"}, "strategy", "one of ['naive', 'relay']"),
        ({"store_capacity_bytes": -1}, "store_capacity_bytes", "a positive integer"),
        ({"min_span_tokens": "8"}, "min_span_tokens", "a positive integer"),
        ({"tenant": 3}, "tenant", "a string"),
        ({"profile_path": "/nonexistent/profile.json"}, "profile_path", "existing profile file"),
        ({"strategy": "relay"}, "profile_path", "when strategy is 'relay'"),
        ({"tennant": "t"}, "tennant", "unknown key"),
        # Passes the type check, refused by the span index (k-gram window): the core's message names it.
        ({"min_span_tokens": 8}, "min_span_tokens", "expected >= "),
    ],
)
def test_bad_config_names_the_key(vllm_config: VllmConfig, extra: dict[str, Any], key: str, expected: str) -> None:
    # Shallow copies: a fresh VllmConfig would re-run its whole validation for each case.
    cfg = copy.copy(vllm_config)
    cfg.kv_transfer_config = copy.copy(vllm_config.kv_transfer_config)
    cfg.kv_transfer_config.kv_connector_extra_config = {**EXTRA, **extra}
    with pytest.raises(ValueError) as err:
        KVConnectorFactory.create_connector(cfg, KVConnectorRole.SCHEDULER, kv_cache_config())
    assert key in str(err.value) and expected in str(err.value), str(err.value)


def test_worker_role_constructs(vllm_config: VllmConfig) -> None:
    # The worker side exists now (tests/python/test_vllm_worker.py); both roles share the embedded relay.
    worker = KVConnectorFactory.create_connector(vllm_config, KVConnectorRole.WORKER, kv_cache_config())
    sched = KVConnectorFactory.create_connector(vllm_config, KVConnectorRole.SCHEDULER, kv_cache_config())
    assert isinstance(worker, RelayKVConnector) and worker.relay is sched.relay  # type: ignore[attr-defined]


def test_vllm_registers_imported_blocks_in_its_prefix_cache(vllm_config: VllmConfig) -> None:
    # Records what vLLM 0.32 does, so a change is noticed: after a synchronous external load it caches
    # the claimed full blocks under the prompt's token hashes as if a full prefill had computed them.
    # Relay KV is approximate, so a later identical prompt reuses it as exact prefix-cache content.
    sched = make_scheduler(vllm_config)
    conn = relay_connector(sched)
    answer = list(range(700, 740))
    export_answer(conn.relay, answer, 10)
    prompt = list(range(800, 823)) + answer + [7, 8, 9]
    sched.add_request(make_request("first", prompt))
    sched.schedule()
    _, hit, *_ = sched.kv_cache_manager.get_computed_blocks(make_request("again", prompt))
    assert hit == (66 // BLOCK) * BLOCK, f"vLLM's prefix-cache hit on imported blocks is now {hit} tokens"
