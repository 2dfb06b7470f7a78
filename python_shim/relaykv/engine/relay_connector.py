"""RelayConnector: the KV connector over core.KvRelay (export decoding KV, claim and materialize spans).

Scheduler side: a new request's tokens are looked up in the span index; the
connector claims the contiguous range from the first uncomputed token to the end
of the last usable span (always leaving the last prompt token to compute), since
a connector can only extend the computed prefix. When a request finishes, its
prompt and generated tokens' KV is exported before its blocks are freed
(delay_free until the worker reports the save done), except the positions it
imported: relay KV is approximate, and its producer's own record is the better
source for that text (see exact_runs).

Worker side, in start_load_kv: the spans are imported into the request's blocks
(K re-rotated to the new positions), a strategy picks imported tokens to
recompute, and the gap tokens, the picked ones and those of any span whose
import failed are computed in full with the executor, before the step's forward.
A failed import never leaves wrong KV: its tokens are computed and counted.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from relaykv import _relaykv as core
from relaykv.engine.connector import (
    ForwardContext,
    KVConnectorBase,
    KVConnectorMetadata,
    KVConnectorRole,
    SchedulerOutput,
)
from relaykv.engine.request import Request


@dataclasses.dataclass
class StrategyInput:
    """What a rectification strategy sees, after the imports, before any computing."""

    forward_context: ForwardContext
    token_ids: list[int]  # the request's tokens
    block_ids: list[int]
    start: int  # first claimed position
    end: int  # one past the last claimed position
    spans: list[core.Span]  # imported successfully, in position order
    gaps: list[int]  # claimed positions no imported span covers (failed imports included)


# The hook, called after the imports. Either it returns the imported positions to recompute;
# the connector then computes them and the gaps in full, in one forward. Or it materializes
# the claim itself (every gap through every layer, plus whatever rectification it does, e.g.
# layer-major over the executor in inp.forward_context) and returns None.
Strategy = Callable[[StrategyInput], Sequence[int] | None]


def naive_strategy(_: StrategyInput) -> Sequence[int]:
    """Trusts every imported token: recompute nothing."""
    return ()


@dataclasses.dataclass
class LoadSpec:
    request_id: str
    token_ids: list[int]
    block_ids: list[int]
    start: int
    end: int
    spans: list[core.Span]


@dataclasses.dataclass
class SaveSpec:
    request_id: str
    token_ids: list[int]  # tokens whose KV is in the blocks, from position 0
    block_ids: list[int]
    # [begin, end) position runs to export, one record each (exact_runs); None: all of token_ids.
    runs: list[tuple[int, int]] | None = None


@dataclasses.dataclass
class RelayConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = dataclasses.field(default_factory=list)
    saves: list[SaveSpec] = dataclasses.field(default_factory=list)


def usable_spans(spans: Sequence[core.Span], num_computed: int, limit: int) -> list[core.Span]:
    """Spans clipped to [num_computed, limit): what is already computed is not claimed again,
    and positions from `limit` on (the last prompt token) are computed by the forward."""
    out = []
    for s in spans:
        lo, hi = max(s.dst_offset, num_computed), min(s.dst_offset + s.length, limit)
        if hi > lo:
            out.append(core.Span(s.record_id, s.src_offset + lo - s.dst_offset, lo, hi - lo))
    return out


def exact_runs(num_tokens: int, imported: Sequence[tuple[int, int]], min_tokens: int) -> list[tuple[int, int]]:
    """The position runs of [0, num_tokens) outside every imported [begin, end) range that
    are at least min_tokens long: what a finished request exports.

    Imported KV was re-rotated and at most partly rectified. Exporting it again would
    publish a second, approximate copy of text whose producer already exported its own
    decoding KV, and a later lookup could pick the copy; so it stays out, as do runs too
    short to be found by the span index. Tokens computed after an import are kept: they
    are this request's own KV, computed the way its producer's decoding KV always is."""
    runs, at = [], 0
    for lo, hi in sorted(imported):
        runs.append((at, min(lo, num_tokens)))
        at = max(at, hi)
    runs.append((at, num_tokens))
    return [(lo, hi) for lo, hi in runs if hi - lo >= min_tokens]


class RelayConnector(KVConnectorBase):
    """One class for both roles; both instances share the KvRelay (in vLLM they would share
    the store through the relay's directory instead)."""

    provides_exact_kv = False  # imported spans are approximate: keep them out of the prefix cache

    def __init__(self, role: KVConnectorRole, relay: core.KvRelay, *, strategy: Strategy = naive_strategy,
                 export_on_finish: bool = True, min_export_tokens: int = 16):
        super().__init__(role)
        self.relay = relay
        self.strategy = strategy
        self.export_on_finish = export_on_finish
        self.min_export_tokens = min_export_tokens
        self.metrics: collections.Counter[str] = collections.Counter()
        # scheduler side
        self._claims: dict[str, tuple[int, int, list[core.Span]]] = {}
        self._pending_loads: list[LoadSpec] = []
        self._pending_saves: list[SaveSpec] = []
        self._imported: dict[str, list[tuple[int, int]]] = {}  # request → span ranges it imported
        # worker side
        self._paged: core.PagedCache | None = None
        self._saved: set[str] = set()

    @classmethod
    def factory(cls, relay: core.KvRelay, **kwargs: Any) -> Callable[[KVConnectorRole], RelayConnector]:
        return lambda role: cls(role, relay, **kwargs)

    # -- scheduler side ------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        tokens = request.all_token_ids
        try:
            found = self.relay.lookup(tokens)
        except core.RelayKVError:
            self.metrics["lookup_failures"] += 1
            return 0, False
        spans = usable_spans(found, num_computed_tokens, len(tokens) - 1)
        if not spans:
            return 0, False
        end = spans[-1].dst_offset + spans[-1].length
        self._claims[request.request_id] = (num_computed_tokens, end, spans)
        return end - num_computed_tokens, False

    def update_state_after_alloc(self, request: Request, blocks: list[int], num_external_tokens: int) -> None:
        claim = self._claims.pop(request.request_id, None)
        if claim is None or num_external_tokens == 0:
            return
        start, end, spans = claim
        assert end - start == num_external_tokens, "the engine allocated a different claim"
        # Counted here, not at lookup: a request the pool cannot take yet is looked up again.
        self.metrics["claimed_tokens"] += num_external_tokens
        # One claim per (re)allocation: a preempted request starts over.
        self._imported[request.request_id] = [(s.dst_offset, s.dst_offset + s.length) for s in spans]
        self._pending_loads.append(LoadSpec(request.request_id, request.all_token_ids, list(blocks), start, end, spans))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> RelayConnectorMetadata:
        meta = RelayConnectorMetadata(self._pending_loads, self._pending_saves)
        self._pending_loads, self._pending_saves = [], []
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._claims.pop(request.request_id, None)
        imported = self._imported.pop(request.request_id, [])
        # The last sampled token was never fed back: its KV is not in the cache.
        tokens = request.all_token_ids[: request.num_computed_tokens]
        runs = exact_runs(len(tokens), imported, self.min_export_tokens)
        if not self.export_on_finish or not runs:
            return False, None
        self._pending_saves.append(SaveSpec(request.request_id, tokens, list(block_ids), runs))
        return True, None  # blocks stay until the worker reports the export done

    # -- worker side ---------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layers = list(kv_caches.values())
        self._paged = core.PagedCache([t[0] for t in layers], [t[1] for t in layers])

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, RelayConnectorMetadata)
        for load in meta.loads:
            self._materialize(load, forward_context)

    def _materialize(self, load: LoadSpec, ctx: ForwardContext) -> None:
        assert self._paged is not None, "register_kv_caches was not called"
        imported: list[core.Span] = []
        compute: set[int] = set()
        for span in load.spans:
            try:
                self.relay.import_span(span, load.token_ids, self._paged, load.block_ids)
                imported.append(span)
                self.metrics["imported_tokens"] += span.length
            except core.RelayKVError:
                # Evicted, corrupt, mismatched: compute these tokens instead, never keep wrong KV.
                compute.update(range(span.dst_offset, span.dst_offset + span.length))
                self.metrics["import_failures"] += 1
                self.metrics["fallback_tokens"] += span.length
        covered = {p for s in load.spans for p in range(s.dst_offset, s.dst_offset + s.length)}
        self.metrics["gap_tokens"] += sum(1 for p in range(load.start, load.end) if p not in covered)
        gaps = sorted(compute | {p for p in range(load.start, load.end) if p not in covered})
        picked = self.strategy(StrategyInput(ctx, load.token_ids, load.block_ids, load.start, load.end,
                                             imported, gaps))
        if picked is None:  # the strategy materialized the claim itself
            return
        chosen = set(picked) - compute
        self.metrics["recomputed_tokens"] += len(chosen)
        positions = sorted(chosen | set(gaps))
        if positions:
            # Non-contiguous positions in one call: causal masking is by position, so each one
            # attends to the imported KV and to the computed tokens before it.
            ctx.executor.forward(
                ctx.kv_cache,
                query_lens=[len(positions)],
                context_lens=[load.end],
                block_tables=[load.block_ids],
                positions=positions,
                token_ids=[load.token_ids[p] for p in positions],
            )

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, RelayConnectorMetadata)
        for save in meta.saves:
            for lo, hi in [(0, len(save.token_ids))] if save.runs is None else save.runs:
                try:
                    self.relay.export(self._paged, save.block_ids, save.token_ids[lo:hi], lo)
                    self.metrics["exports"] += 1
                    self.metrics["exported_tokens"] += hi - lo
                except core.RelayKVError:
                    self.metrics["export_failures"] += 1
            self._saved.add(save.request_id)  # done either way: the blocks can go

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        done, self._saved = self._saved, set()
        return (done or None), None


__all__ = [
    "LoadSpec",
    "RelayConnector",
    "RelayConnectorMetadata",
    "SaveSpec",
    "exact_runs",
    "Strategy",
    "StrategyInput",
    "naive_strategy",
    "usable_spans",
]
