"""The reference engine: block manager, scheduler (chunked prefill, batched decode), connector order,
RelayConnector claim-and-materialize with fallback. CPU, tiny random models."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from relaykv import _relaykv as core
from relaykv.engine import (
    BlockManager,
    Engine,
    EngineConfig,
    KVConnectorBase,
    KVConnectorMetadata,
    KVConnectorRole,
    RelayConnector,
    SamplingParams,
    StrategyInput,
    block_hashes,
)
from relaykv.engine.relay_connector import exact_runs
from relaykv.model.executor import Executor, greedy_generate
from relaykv.model.tiny import tiny_model
from relaykv.relay_chain import model_fingerprint

EOS = 2  # the tiny models' eos_token_id


@pytest.fixture(scope="module")
def executor() -> Executor:
    return Executor.from_hf(tiny_model("llama", seed=3))


def rand_ids(n: int, seed: int) -> list[int]:
    # Token ids 3.. keep EOS out of prompts.
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# -- block manager ----------------------------------------------------------------------------

def test_alloc_free_refcounts_and_pool_exhaustion():
    bm = BlockManager(num_blocks=6, block_size=4)
    a = bm.allocate_slots("a", 9)  # 3 blocks
    assert a is not None and len(a) == 3 and bm.num_free_blocks == 3
    assert bm.allocate_slots("a", 12) == a  # still fits in 3 blocks: nothing new
    assert len(bm.allocate_slots("a", 13)) == 4
    assert bm.allocate_slots("b", 12) is None and "b" not in bm.req_blocks  # short: unchanged
    assert bm.num_free_blocks == 2
    bm.free("a")
    assert bm.num_free_blocks == 6 and all(b.ref_cnt == 0 for b in bm.blocks)
    with pytest.raises(ValueError):
        BlockManager(0, 4)


def test_prefix_cache_hits_share_blocks_and_chain_on_the_parent():
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(10, 22))  # 3 full blocks
    blocks = bm.allocate_slots("a", len(tokens))
    bm.cache_full_blocks("a", tokens, len(tokens))
    # The last token is never a hit: its logits are needed. 12 tokens -> 2 usable blocks.
    assert bm.get_computed_blocks(tokens) == blocks[:2]
    assert bm.get_computed_blocks(tokens + [1]) == blocks
    # Same second block behind a different first block: no hit (hashes chain on the parent).
    assert bm.get_computed_blocks([99, 98, 97, 96] + tokens[4:] + [1]) == []
    # Cached: [X, B] (request "xb"). Query [A, B']: A hits (request "a"), B' is "xb"'s second
    # block by content but behind another parent, so it must not hit.
    xb = [99, 98, 97, 96] + [50, 51, 52, 53]
    bm.allocate_slots("xb", 8)
    bm.cache_full_blocks("xb", xb, 8)
    assert bm.get_computed_blocks(tokens[:4] + xb[4:] + [1]) == blocks[:1]
    bm.free("xb")
    hits = bm.get_computed_blocks(tokens + [5, 6])
    b = bm.allocate_slots("b", 14, hits)
    assert b[:3] == blocks and bm.blocks[blocks[0]].ref_cnt == 2
    bm.free("a")
    assert bm.blocks[blocks[0]].ref_cnt == 1 and bm.num_free_blocks == 8 - 4
    bm.free("b")
    assert bm.num_free_blocks == 8


def test_lru_reuses_uncached_first_then_least_recently_freed_cached():
    bm = BlockManager(num_blocks=4, block_size=2)
    old, new = [1, 2, 3, 4], [5, 6, 7, 8]
    bm.allocate_slots("old", 4)
    bm.cache_full_blocks("old", old, 4)
    bm.free("old")
    bm.allocate_slots("new", 4)
    bm.cache_full_blocks("new", new, 4)
    bm.free("new")
    assert len(bm.get_computed_blocks(old + [0])) == 2 and len(bm.get_computed_blocks(new + [0])) == 2
    # A 2-block request must evict: the least recently freed prefix ("old") goes, "new" stays.
    bm.allocate_slots("x", 4)
    assert bm.get_computed_blocks(old + [0]) == [] and len(bm.get_computed_blocks(new + [0])) == 2
    assert bm.stats["evictions"] == 2
    # A hit on a free cached block takes it out of the free queue (and keeps it).
    hits = bm.get_computed_blocks(new + [0])
    assert bm.allocate_slots("y", 5, hits) is None  # needs 3, only the 2 hits exist
    assert bm.allocate_slots("y", 4, hits) == hits and bm.num_free_blocks == 0


def test_not_cacheable_blocks_are_never_registered():
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(100, 116))
    bm.allocate_slots("imp", 16)
    bm.mark_not_cacheable("imp", 5)  # approximate KV from token 5 on: block 0 is the last exact one
    bm.cache_full_blocks("imp", tokens, 16)
    assert len(bm.get_computed_blocks(tokens + [0])) == 1
    bm.free("imp")
    assert len(bm.get_computed_blocks(tokens + [0])) == 1
    assert block_hashes(tokens, 4) == block_hashes(tokens + [1, 2], 4)


# -- engine -----------------------------------------------------------------------------------

PROMPT_LENS = (5, 37, 70, 16, 23)


def test_batched_chunked_greedy_equals_greedy_generate(executor):
    prompts = [rand_ids(n, seed=i) for i, n in enumerate(PROMPT_LENS)]
    ref = [greedy_generate(executor, p, 10, eos_token_id=EOS) for p in prompts]
    batches = []
    real_forward = executor.forward

    def spy(*a: Any, **kw: Any):
        batches.append(len(kw["query_lens"]))
        return real_forward(*a, **kw)

    executor.forward = spy
    try:
        cfg = EngineConfig(num_blocks=64, block_size=8, max_num_batched_tokens=24)
        eng = Engine(executor, cfg, eos_token_ids=EOS)
        outs = eng.generate(prompts, SamplingParams(max_tokens=10))
        one = Engine(executor, EngineConfig(num_blocks=64, block_size=8, max_num_batched_tokens=24,
                                            max_num_seqs=1), eos_token_ids=EOS)
        singles = one.generate(prompts, SamplingParams(max_tokens=10))
    finally:
        del executor.forward
    assert [o.output_token_ids for o in outs] == ref
    assert [o.output_token_ids for o in singles] == ref
    assert max(batches) == len(prompts)  # every running request decoded in one forward
    assert eng.stats["steps"] < one.stats["steps"]
    assert all(o.ttft_s > 0 and o.e2e_s >= o.ttft_s for o in outs)
    assert eng.blocks.num_free_blocks == 64  # everything freed


def test_prefix_cache_hit_in_engine_gives_the_same_output(executor):
    prompt = rand_ids(40, seed=11)
    eng = Engine(executor, EngineConfig(num_blocks=32, block_size=8), eos_token_ids=EOS)
    first = eng.generate([prompt], SamplingParams(max_tokens=6))[0]
    again = eng.generate([prompt + [7]], SamplingParams(max_tokens=6))[0]
    assert first.num_cached_tokens == 0 and again.num_cached_tokens == 40
    assert again.output_token_ids == greedy_generate(executor, prompt + [7], 6, eos_token_id=EOS)


def test_preemption_under_a_small_pool_keeps_outputs_exact(executor):
    prompts = [rand_ids(n, seed=20 + i) for i, n in enumerate((30, 30, 30))]
    ref = [greedy_generate(executor, p, 20, eos_token_id=EOS) for p in prompts]
    eng = Engine(executor, EngineConfig(num_blocks=14, block_size=8, enable_prefix_caching=False),
                 eos_token_ids=EOS)
    outs = eng.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True))
    assert eng.stats["preemptions"] > 0
    for o, r in zip(outs, ref):
        assert o.output_token_ids[: len(r)] == r


def test_sampling_seed_top_p_and_stop_conditions(executor):
    prompt = rand_ids(12, seed=5)
    eng = Engine(executor, EngineConfig(num_blocks=32, block_size=8), eos_token_ids=EOS)
    hot = lambda seed: SamplingParams(max_tokens=15, temperature=1.5, seed=seed, ignore_eos=True)  # noqa: E731
    a, b, c = eng.generate([prompt] * 3, [hot(1), hot(1), hot(2)])
    assert a.output_token_ids == b.output_token_ids != c.output_token_ids
    greedy = greedy_generate(executor, prompt, 15)
    tiny_p = eng.generate([prompt], SamplingParams(max_tokens=15, temperature=1.0, top_p=1e-6, ignore_eos=True))
    assert tiny_p[0].output_token_ids == greedy  # top_p -> 0 keeps only the argmax
    stop_at = greedy[4]
    out = eng.generate([prompt], SamplingParams(max_tokens=15, stop_token_ids=[stop_at], ignore_eos=True))[0]
    assert out.output_token_ids == greedy[: greedy.index(stop_at) + 1] and out.finish_reason == "stop"
    out = eng.generate([prompt], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert len(out.output_token_ids) == 3 and out.finish_reason == "length"


# -- connector call order ---------------------------------------------------------------------

class SpyConnector(KVConnectorBase):
    """Records every hook; delays the free of finished requests until get_finished reports them."""

    def __init__(self, role: KVConnectorRole, log: list[str]):
        super().__init__(role)
        self.log = log
        self.side = "S" if role is KVConnectorRole.SCHEDULER else "W"

    def _rec(self, name: str) -> None:
        self.log.append(f"{self.side}.{name}")

    def register_kv_caches(self, kv_caches):
        self._rec("register_kv_caches")

    def bind_connector_metadata(self, metadata):
        self._rec("bind_connector_metadata")
        super().bind_connector_metadata(metadata)

    def clear_connector_metadata(self):
        self._rec("clear_connector_metadata")
        super().clear_connector_metadata()

    def start_load_kv(self, forward_context, **kw):
        self._rec("start_load_kv")

    def wait_for_layer_load(self, layer_name):
        self._rec("wait_for_layer_load")

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kw):
        self._rec("save_kv_layer")

    def wait_for_save(self):
        self._rec("wait_for_save")

    def get_finished(self, finished_req_ids):
        self._rec(f"get_finished{sorted(finished_req_ids)}")
        return (set(finished_req_ids) or None), None

    def get_block_ids_with_load_errors(self):
        self._rec("get_block_ids_with_load_errors")
        return set()

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        self._rec("get_num_new_matched_tokens")
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        self._rec("update_state_after_alloc")

    def build_connector_meta(self, scheduler_output):
        self._rec("build_connector_meta")
        return KVConnectorMetadata()

    def update_connector_output(self, connector_output):
        self._rec("update_connector_output")

    def request_finished(self, request, block_ids):
        self._rec("request_finished")
        return True, None


def test_connector_hooks_are_called_in_vllms_order(executor):
    log: list[str] = []
    cfg = EngineConfig(num_blocks=16, block_size=8, max_num_batched_tokens=12)
    eng = Engine(executor, cfg, connector_factory=lambda role: SpyConnector(role, log), eos_token_ids=EOS)
    eng.generate([rand_ids(20, seed=9)], SamplingParams(max_tokens=2, ignore_eos=True))
    L = executor.num_layers

    def worker(finished: str = "[]", forward: bool = True) -> list[str]:
        layers = ["W.wait_for_layer_load"] * L + ["W.save_kv_layer"] * L if forward else []
        return ["W.bind_connector_metadata", "W.start_load_kv", *layers, "W.wait_for_save",
                f"W.get_finished{finished}", "W.get_block_ids_with_load_errors", "W.clear_connector_metadata"]

    expected = [
        "W.register_kv_caches",
        # step 1: admit (prefix lookup, connector claim, allocate), first 12-token chunk
        "S.get_num_new_matched_tokens", "S.update_state_after_alloc", "S.build_connector_meta",
        *worker(), "S.update_connector_output",
        # step 2: last 8 prompt tokens, first token sampled
        "S.build_connector_meta", *worker(), "S.update_connector_output",
        # step 3: one decode, max_tokens reached: request_finished before the output update
        "S.build_connector_meta", *worker(), "S.request_finished", "S.update_connector_output",
        # step 4: nothing to run; the worker is told of the finished request and reports it sent
        "S.build_connector_meta", *worker("['req-0']", forward=False), "S.update_connector_output",
    ]
    assert log == expected
    assert not eng.has_unfinished() and eng.blocks.num_free_blocks == 16


# -- RelayConnector ---------------------------------------------------------------------------

def make_relay(executor: Executor) -> core.KvRelay:
    cfg = executor.config
    layout = core.KvLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_size, "float32")
    return core.KvRelay(model_fingerprint(cfg, executor.weights), layout, cfg.rope, "test", 1 << 26)


def engine(executor: Executor, relay: core.KvRelay | None = None, **kw: Any) -> Engine:
    factory = RelayConnector.factory(relay, **kw) if relay is not None else None
    return Engine(executor, EngineConfig(num_blocks=48, block_size=8, max_num_batched_tokens=32),
                  connector_factory=factory, eos_token_ids=EOS)


def agent_a(executor: Executor, relay: core.KvRelay) -> tuple[list[int], list[int]]:
    """Agent A answers on its own instance; its decoding KV is exported when it finishes."""
    eng_a = engine(executor, relay)
    a_prompt = rand_ids(30, seed=100)
    out = eng_a.generate([a_prompt], SamplingParams(max_tokens=40, ignore_eos=True))[0]
    m = eng_a.worker_connector.metrics
    assert m["exports"] == 1 and m["exported_tokens"] == 30 + 40 - 1
    assert eng_a.blocks.num_free_blocks == 48  # freed once the export was reported done
    return a_prompt, out.output_token_ids


def b_prompt(a_output: list[int]) -> list[int]:
    # B quotes 32 tokens of A's answer behind its own 20-token prefix, then asks on.
    return rand_ids(20, seed=200) + a_output[:32] + rand_ids(6, seed=201)


def test_relay_connector_claims_and_imports_a_previous_agents_output(executor):
    relay = make_relay(executor)
    _, a_out = agent_a(executor, relay)
    prompt = b_prompt(a_out)
    eng_b = engine(executor, relay)
    out = eng_b.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    m = eng_b.worker_connector.metrics
    assert out.num_external_tokens == 52  # from the first token to the end of the span
    assert m["imported_tokens"] == 32 and m["gap_tokens"] == 20 and m["import_failures"] == 0
    assert eng_b.sched_connector.metrics["claimed_tokens"] == 52
    assert relay.metrics()["imports"] == 1
    assert len(out.output_token_ids) == 8
    # Imported KV is approximate: nothing from the claim on may be found as an exact prefix.
    assert eng_b.blocks.get_computed_blocks(prompt + [3]) == []
    plain = engine(executor)
    plain.generate([prompt], SamplingParams(max_tokens=1))
    assert len(plain.blocks.get_computed_blocks(prompt + [3])) == len(prompt) // 8


def test_exact_runs_leave_out_imported_ranges_and_short_runs():
    assert exact_runs(100, [], 16) == [(0, 100)]
    assert exact_runs(100, [(20, 52)], 16) == [(0, 20), (52, 100)]
    assert exact_runs(65, [(20, 52)], 16) == [(0, 20)]  # 13 tokens after the span: too short
    assert exact_runs(100, [(40, 60), (10, 30)], 16) == [(60, 100)]  # unsorted; 10- and 10-token runs drop
    assert exact_runs(100, [(0, 30), (25, 50), (70, 100)], 16) == [(50, 70)]  # overlapping ranges merge
    assert exact_runs(50, [(0, 50)], 1) == []
    assert exact_runs(10, [], 16) == []


def test_a_request_that_imported_exports_only_what_it_computed(executor):
    relay = make_relay(executor)
    _, a_out = agent_a(executor, relay)
    a_record = {s.record_id for s in relay.lookup(a_out[:32])}
    assert len(a_record) == 1
    prompt = b_prompt(a_out)
    eng_b = engine(executor, relay)
    out = eng_b.generate([prompt], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    m = eng_b.worker_connector.metrics
    # B's prefix [0, 20) and its own tail [52, 77): two records; the imported [20, 52) stays out.
    assert m["imported_tokens"] == 32
    assert m["exports"] == 2 and m["exported_tokens"] == 20 + (len(prompt) + 20 - 1 - 52)
    # A later agent quoting A's text still gets A's decoding KV, not B's re-rotated copy of it.
    c_prompt = rand_ids(11, seed=300) + a_out[:32] + out.output_token_ids[:19]
    spans = relay.lookup(c_prompt)
    quoted_a = [s for s in spans if s.dst_offset < 43]  # A's text sits at [11, 43) in C's prompt
    assert quoted_a and all(s.record_id in a_record for s in quoted_a)
    # B's own answer is found in B's tail record.
    assert any(s.record_id not in a_record and s.dst_offset >= 43 for s in spans)


def test_relay_connector_falls_back_to_computing_when_the_record_is_gone(executor):
    relay = make_relay(executor)
    _, a_out = agent_a(executor, relay)
    prompt = b_prompt(a_out)
    want = engine(executor).generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0]

    eng_b = engine(executor, relay)
    lookup = relay.lookup

    class Evicting:  # the record disappears between the scheduler's lookup and the worker's import
        def __getattr__(self, name: str) -> Any:
            return getattr(relay, name)

        def lookup(self, tokens: list[int]) -> list[core.Span]:
            spans = lookup(tokens)
            for s in spans:
                relay.delete(s.record_id)
            return spans

    eng_b.sched_connector.relay = Evicting()
    out = eng_b.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    m = eng_b.worker_connector.metrics
    assert out.num_external_tokens == 52
    assert m["import_failures"] == 1 and m["fallback_tokens"] == 32 and m["imported_tokens"] == 0
    assert relay.metrics()["import_failures"]["not_found"] == 1
    assert out.output_token_ids == want.output_token_ids


def test_strategy_hook_recomputing_every_imported_token_restores_full_prefill(executor):
    relay = make_relay(executor)
    _, a_out = agent_a(executor, relay)
    prompt = b_prompt(a_out)
    want = engine(executor).generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    # The naive default leaves KV that differs from full prefill (so the comparison below can fail).
    # Done first: once B finishes it exports its own exact KV, which later lookups would prefer.
    k_full, k_naive = (_k_after_prefill(executor, r, prompt) for r in (None, relay))
    assert (k_full - k_naive).abs().max() > 1e-2
    seen: list[StrategyInput] = []

    def everything(inp: StrategyInput) -> list[int]:
        seen.append(inp)
        return [p for s in inp.spans for p in range(s.dst_offset, s.dst_offset + s.length)]

    eng_b = engine(executor, relay, strategy=everything)
    out = eng_b.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert len(seen) == 1 and seen[0].start == 0 and seen[0].end == 52 and seen[0].gaps == list(range(20))
    assert eng_b.worker_connector.metrics["recomputed_tokens"] == 32
    assert out.output_token_ids == want.output_token_ids


def test_a_strategy_may_materialize_the_claim_itself(executor):
    relay = make_relay(executor)
    _, a_out = agent_a(executor, relay)
    prompt = b_prompt(a_out)
    # The naive default first (it computes the gaps itself), before B's own export exists.
    # The tail (after the claim) attends to the gaps: its KV shows whether they were computed.
    tail = range(52, len(prompt))
    k_default = _k_after_prefill(executor, relay, prompt, tail)
    calls: list[list[int]] = []

    def own_gaps(inp: StrategyInput) -> None:
        calls.append(inp.gaps)
        inp.forward_context.executor.forward(
            inp.forward_context.kv_cache, query_lens=[len(inp.gaps)], context_lens=[inp.end],
            block_tables=[inp.block_ids], positions=inp.gaps, token_ids=[inp.token_ids[p] for p in inp.gaps])
        return None

    k_own = _k_after_prefill(executor, relay, prompt, tail, strategy=own_gaps)
    assert calls == [list(range(20))]
    assert torch.allclose(k_own, k_default, atol=1e-5)
    # Materializing nothing leaves the gaps empty: the KV differs (so the check above can fail).
    k_none = _k_after_prefill(executor, relay, prompt, tail, strategy=lambda inp: None)
    assert not torch.allclose(k_none, k_default, atol=1e-3)


def _k_after_prefill(executor: Executor, relay: core.KvRelay | None, prompt: list[int],
                     positions: range = range(20, 52), **kw: Any) -> torch.Tensor:
    """Last layer's K at `positions` (default: B's quoted tokens), right after a one-step prefill."""
    factory = RelayConnector.factory(relay, **kw) if relay is not None else None
    eng = Engine(executor, EngineConfig(num_blocks=48, block_size=8, max_num_batched_tokens=128),
                 connector_factory=factory, eos_token_ids=EOS)
    rid = eng.add_request(prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    eng.step()
    k, _ = eng.kv_cache.gather(eng.blocks.req_blocks[rid], positions, layers=[executor.num_layers - 1])
    return k


class CorruptingConnector(KVConnectorBase):
    """Zeroes one block of a request after the first step's forward and reports it as a load error,
    as a connector whose async load went wrong would; the engine must recompute from there."""

    def __init__(self, role: KVConnectorRole):
        super().__init__(role)
        self.cache: list[torch.Tensor] = []
        self.bad: set[int] = set()
        self.block: int | None = None

    def register_kv_caches(self, kv_caches):
        self.cache = list(kv_caches.values())

    def build_connector_meta(self, scheduler_output):
        meta = KVConnectorMetadata()
        meta.block_ids = scheduler_output.block_ids  # type: ignore[attr-defined]
        return meta

    def wait_for_save(self):
        blocks = self._get_connector_metadata().block_ids  # type: ignore[attr-defined]
        if self.block is None and blocks:
            self.block = next(iter(blocks.values()))[1]
            for layer in self.cache:
                layer[:, self.block] = 0
            self.bad = {self.block}

    def get_block_ids_with_load_errors(self):
        bad, self.bad = self.bad, set()
        return bad


def test_blocks_reported_with_load_errors_are_recomputed(executor):
    prompt = rand_ids(30, seed=31)
    want = greedy_generate(executor, prompt, 8)
    eng = Engine(executor, EngineConfig(num_blocks=16, block_size=8, max_num_batched_tokens=16),
                 connector_factory=CorruptingConnector, eos_token_ids=EOS)
    out = eng.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert eng.worker_connector.block is not None
    assert out.output_token_ids == want
    assert eng.blocks.get_computed_blocks(prompt) == []  # a request that lost KV registers no prefix


class CharTokenizer:
    """Token t decodes to one letter; enough for stop strings."""

    eos_token_id = EOS

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + t % 26) for t in ids if not (skip_special_tokens and t == EOS))


def test_stop_strings_cut_the_text(executor):
    prompt = rand_ids(12, seed=5)
    greedy = greedy_generate(executor, prompt, 12)
    text = CharTokenizer().decode(greedy)
    stop = text[5:7]
    eng = Engine(executor, EngineConfig(num_blocks=16, block_size=8), tokenizer=CharTokenizer())
    out = eng.generate([prompt], SamplingParams(max_tokens=12, stop=[stop], ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.text == text[: text.index(stop)]
    assert len(out.output_token_ids) == text.index(stop) + len(stop)


class AsyncLoader(KVConnectorBase):
    """Claims the first 16 tokens of every new request as an async load, 'loads' them by computing
    them exactly with the executor, and reports them received one step later."""

    provides_exact_kv = True

    def __init__(self, role: KVConnectorRole, log: list[str]):
        super().__init__(role)
        self.log = log
        self.pending: list[tuple[str, list[int], list[int]]] = []
        self.in_flight: set[str] = set()

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        return (16, True) if num_computed_tokens == 0 and request.num_tokens > 16 else (0, False)

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        if num_external_tokens:
            self.log.append(f"alloc {request.request_id} {num_external_tokens}")
            self.pending.append((request.request_id, request.all_token_ids[:16], list(blocks)))

    def build_connector_meta(self, scheduler_output):
        meta = KVConnectorMetadata()
        meta.loads, self.pending = self.pending, []  # type: ignore[attr-defined]
        self.log.append(f"step {sorted(scheduler_output.num_scheduled_tokens)}")
        return meta

    def start_load_kv(self, forward_context, **kw):
        for rid, tokens, blocks in self._get_connector_metadata().loads:  # type: ignore[attr-defined]
            forward_context.executor.prefill(forward_context.kv_cache, tokens, blocks)
            self.in_flight.add(rid)

    def get_finished(self, finished_req_ids):
        # Reported the step after the load started, as an async transfer would be.
        done = {r for r in self.in_flight if r in getattr(self, "_seen", set())}
        self._seen = self.in_flight - done
        self.in_flight -= done
        return None, (done or None)


def test_async_loads_wait_for_remote_kvs_then_run(executor):
    prompts = [rand_ids(n, seed=40 + n) for n in (30, 12, 45)]
    ref = [greedy_generate(executor, p, 6, eos_token_id=EOS) for p in prompts]
    log: list[str] = []
    eng = Engine(executor, EngineConfig(num_blocks=32, block_size=8),
                 connector_factory=lambda role: AsyncLoader(role, log), eos_token_ids=EOS)
    ids = [eng.add_request(p, SamplingParams(max_tokens=6)) for p in prompts]
    done = {}
    for _ in range(50):  # bounded: a load never reported received would otherwise wait forever
        done.update((o.request_id, o) for o in eng.step())
        if not eng.has_unfinished():
            break
    assert set(done) == set(ids), f"unfinished: {set(ids) - set(done)}"
    outs = [done[i] for i in ids]
    assert [o.output_token_ids for o in outs] == ref
    assert [o.num_external_tokens for o in outs] == [16, 0, 16]
    # Step 1 computes only the short prompt; the two async ones join two steps later.
    assert log[:3] == ["alloc req-0 16", "alloc req-2 16", "step ['req-1']"]
    assert log[3:5] == ["step ['req-1']", "step ['req-0', 'req-1', 'req-2']"]
