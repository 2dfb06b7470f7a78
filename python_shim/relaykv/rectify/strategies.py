"""Prefill strategies over one executor and one import path.

Every strategy imports the same spans the same way (scatter into paged blocks,
K re-rotated by the position offset, gaps and tail computed in full) and
differs only in which (token × layer) entries of the imported spans it
recomputes. The work is layer-major so that a token recomputed at layer l has
its own hidden state entering l:

    stage 1  layers [first, det]   rows: gaps ∪ (all span tokens)   -> observe deviation/influence
    select   R ⊆ span tokens (selector.py)
    stage 2  layers [det+1, end]   rows: gaps ∪ R
    stage 3  layers [end+1, L-1]   rows: gaps

(det_layer may lie before start_layer; R then also keeps its fresh KV in
(det_layer, start_layer), which it computes on the way anyway.)

Stage 1 computes every token through layers [0, det] behind the new prefix, so
under `scheme="layer0"` the KV it writes there is exactly full prefill's.
`keep_detection_kv=True` (the default) keeps it for every span token instead of
putting the imported KV back: same work, closer cache. CacheBlend keeps its
fully recomputed check layers the same way. `keep_detection_kv=False` restores
the imported KV outside R × [start, end] (label suffix "-restore"), so the two
can be measured side by side.

`scheme="layer0"` starts span tokens from their embeddings (first = 0); with
`scheme="hidden"` they start at start_layer from hidden states the exporter
saved at a checkpoint (the output of layer start_layer - 1), and gap rows are
computed alone through layers [0, start_layer). After the forward, span tokens
keep the imported KV everywhere outside R × [min(det+1, start), end_layer] (and,
with keep_detection_kv under layer0, outside [0, det]), so the cache that
decoding continues on is exactly what the strategy defines.
Imported KV is never offered to the prefix cache as exact.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch

from relaykv import _relaykv as core
from relaykv.rectify import selector

STRATEGIES = ("full", "prefix", "naive", "cacheblend", "epic", "relay")


@dataclasses.dataclass
class Strategy:
    name: str
    start_layer: int = 1
    det_layer: int = 1
    end_layer: int = -1  # -1: last layer
    tau_dev: float = 1.5
    tau_inf: float = 1.5
    suffix_tokens: int = 8
    budget: float | None = None  # max fraction of span tokens recomputed (relay), or None
    ratio: float = 0.15  # cacheblend's fixed recompute ratio
    first_k: int = 32  # epic's recomputed tokens per chunk
    scheme: str = "layer0"  # "layer0" or "hidden"
    use_prefix_cache: bool = True
    variant: str = ""  # tells apart configurations of one family in a benchmark (e.g. "det3")
    keep_detection_kv: bool = True  # layer0: span tokens keep stage 1's exact KV in [0, det]

    def label(self) -> str:
        """Unique per configuration the benchmark compares: family[-scheme][-variant][@budget]."""
        restore = "" if self.keep_detection_kv else "-restore"
        if self.name == "cacheblend":
            return f"cacheblend{restore}@{self.ratio:.2f}"
        if self.name == "epic":
            return f"epic@{self.first_k}"
        base = self.name if self.scheme == "layer0" else f"{self.name}-{self.scheme}"
        base = f"{base}-{self.variant}" if self.variant else base
        base += restore
        return base if self.name != "relay" or self.budget is None else f"{base}@{self.budget:.2f}"


def from_profile(profile: dict[str, Any], **overrides: Any) -> Strategy:
    """The relay strategy a layer-range profile describes (its keys), with overrides."""
    keys = ("start_layer", "det_layer", "end_layer", "tau_dev", "tau_inf", "suffix_tokens", "scheme")
    return Strategy("relay", **{**{k: profile[k] for k in keys if k in profile}, **overrides})


@dataclasses.dataclass
class PrefillResult:
    logits: torch.Tensor
    seq: Any
    ttft_ms: float
    reuse_rate: float
    recompute_ratio: float
    info: dict


@dataclasses.dataclass
class _Layout:
    """Which prompt positions are computed (gaps), which were imported (span) and from where."""

    computed: torch.Tensor  # positions, sorted
    span_pos: torch.Tensor  # positions, sorted
    span_ids: torch.Tensor  # span index of each span position
    span_src: list[tuple[int, int, int, int]]  # (record_id, src_offset, dst_offset, length)
    prefix_len: int


def prefill(inst: Any, ids: Sequence[int], strategy: Strategy) -> PrefillResult:
    """Prefills `ids` into a fresh sequence of `inst` with `strategy`; times the whole of it."""
    ids = list(ids)
    n = len(ids)
    L = inst.executor.num_layers
    seq = inst.new_sequence(n + 64)
    t0 = time.perf_counter()
    if strategy.name == "full":
        logits = inst.prefill(seq, ids, 0)
        return PrefillResult(logits, seq, _ms(t0), 0.0, 1.0, {"imported_tokens": 0})
    lay = _reuse(inst, seq, ids, strategy)
    runner = _Runner(inst, seq, ids, lay, strategy)
    logits, chosen = runner.run()
    ms = _ms(t0)
    recomputed = int(chosen.numel())
    span_n = int(lay.span_pos.numel())
    # reuse_rate as the design defines it: token × layer entries taken from imports and not
    # computed here. Entries from an exact prefix-cache hit are reported apart (prefix_rate).
    not_computed = n * L - runner.entries
    prefix_entries = lay.prefix_len * L
    reuse = (not_computed - prefix_entries) / (n * L)
    info = {"imported_tokens": span_n, "prefix_tokens": lay.prefix_len, "recomputed_tokens": recomputed,
            "prefix_rate": prefix_entries / (n * L),
            "spans": len(lay.span_src), "span_positions": lay.span_pos.tolist(),
            "recomputed_positions": chosen.tolist()}
    return PrefillResult(logits, seq, ms, reuse, recomputed / max(1, span_n), info)


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def _reuse(inst: Any, seq: Any, ids: list[int], strategy: Strategy) -> _Layout:
    """Exact prefix hit first (copied KV), then relay spans (imported, approximate)."""
    n = len(ids)
    prefix_len = inst.prefix_lookup(ids, seq) if strategy.use_prefix_cache or strategy.name == "prefix" else 0
    covered = torch.zeros(n, dtype=torch.bool)
    covered[:prefix_len] = True
    span_ids = torch.full((n,), -1, dtype=torch.long)
    src: list[tuple[int, int, int, int]] = []
    if strategy.name != "prefix":
        for span in inst.relay.lookup(ids):
            begin = max(span.dst_offset, prefix_len)
            # The last prompt token is always computed: its logits are the first output.
            end = min(span.dst_offset + span.length, n - 1)
            if end <= begin:
                continue
            cut = core.Span(span.record_id, span.src_offset + begin - span.dst_offset, begin, end - begin)
            try:
                inst.relay.import_span(cut, ids, seq.paged, seq.table)
            except core.RelayKVError:
                continue  # failure policy: the tokens are computed as a gap
            span_ids[begin:end] = len(src)
            src.append((cut.record_id, cut.src_offset, cut.dst_offset, cut.length))
    is_span = span_ids >= 0
    pos = torch.arange(n)
    return _Layout(pos[~is_span & ~covered], pos[is_span], span_ids[is_span], src, prefix_len)


class _Runner:
    """Runs the three stages for one prompt; counts computed token × layer entries."""

    def __init__(self, inst: Any, seq: Any, ids: list[int], lay: _Layout, strategy: Strategy):
        self.inst, self.seq, self.lay, self.s = inst, seq, lay, strategy
        self.ex = inst.executor
        self.ids = torch.as_tensor(ids)
        self.n = len(ids)
        self.L = self.ex.num_layers
        self.end = self.L - 1 if strategy.end_layer < 0 else min(strategy.end_layer, self.L - 1)
        self.entries = 0

    def fwd(self, rows: torch.Tensor, first: int, last: int, hidden: torch.Tensor | None = None,
            **kw: Any):
        self.entries += int(rows.numel()) * (last - first + 1)
        return self.ex.forward(
            self.seq.cache, query_lens=[int(rows.numel())], context_lens=[self.n],
            block_tables=[self.seq.table], positions=rows,
            token_ids=self.ids[rows] if first == 0 else None,
            hidden_states=hidden if first > 0 else None,
            first_layer=first, last_layer=last,
            logits_rows=[int(rows.numel()) - 1] if last == self.L - 1 else None, **kw)

    def run(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Last-row logits and the span positions recomputed in the profiled layers."""
        name = self.s.name
        gaps, span = self.lay.computed, self.lay.span_pos
        if name in ("prefix", "naive") or span.numel() == 0:
            return self.fwd(gaps, 0, self.L - 1).logits[0], span[:0]
        if name == "epic":
            chosen = span[selector.first_tokens_mask(self.lay.span_ids, self.s.first_k)]
            rows = torch.sort(torch.cat([gaps, chosen])).values
            return self.fwd(rows, 0, self.L - 1).logits[0], chosen
        return self._rectify(gaps, span)

    def _rectify(self, gaps: torch.Tensor, span: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.s
        start = 0 if s.name == "cacheblend" else s.start_layer
        first = start if s.scheme == "hidden" else 0
        # det may come before start (the profiler picks the earliest layer that ranks tokens
        # well): R is then computed from det + 1 on, and keeps its fresh KV from there.
        det = max(s.det_layer, first)
        hidden_in = None
        if first > 0:
            h_gaps = self.fwd(gaps, 0, first - 1).hidden_states
            h_span = self.inst.checkpoint_rows(self.lay.span_src, self.ids.tolist(), first - 1)
            hidden_in = torch.cat([h_gaps, h_span])
        rows = torch.cat([gaps, span])
        order = torch.argsort(rows)
        rows = rows[order]
        if hidden_in is not None:
            hidden_in = hidden_in[order]
        is_span = torch.zeros(self.n, dtype=torch.bool)
        is_span[span] = True
        span_rows = torch.nonzero(is_span[rows]).squeeze(1)  # row index of each span token
        want_attn = s.name == "relay"
        out = self.fwd(rows, first, det, hidden_in, observe_kv_layers=range(first, det + 1),
                       observe_attention_layers=[det] if want_attn else [],
                       attention_rows=torch.arange(rows.numel()) if want_attn else None,
                       attention_key_mass=want_attn)
        obs = out.kv[det]
        dev = selector.deviation(obs.fresh_v[span_rows], obs.cached_v[span_rows])
        if s.name == "cacheblend":
            mask = selector.top_ratio(dev, s.ratio)
        else:
            mass, followers = out.attention_mass[det]
            infl = selector.influence_from_mass(mass[0], followers[0], span)
            budget = None if s.budget is None else int(s.budget * span.numel())
            mask = selector.select_relay(dev, infl, self.lay.span_ids, tau_dev=s.tau_dev, tau_inf=s.tau_inf,
                                         suffix_tokens=s.suffix_tokens, budget=budget)
        self._restore(out, rows, span_rows, mask, first, det, start)
        chosen = span[mask]
        keep = ~is_span[rows]
        keep[span_rows[mask]] = True
        h = out.hidden_states[keep]
        rows2 = rows[keep]
        if det == self.L - 1:
            return out.logits[0], chosen
        if self.end > det:
            out2 = self.fwd(rows2, det + 1, self.end, h)
            if self.end == self.L - 1:
                return out2.logits[0], chosen
            h = out2.hidden_states
        g = ~is_span[rows2]
        first3 = max(self.end, det) + 1
        out3 = self.fwd(rows2[g], first3, self.L - 1, h[g])
        return out3.logits[0], chosen

    def _restore(self, out: Any, rows: torch.Tensor, span_rows: torch.Tensor, mask: torch.Tensor,
                 first: int, det: int, start: int) -> None:
        """Span tokens keep the imported KV outside R × [start, end] (stage 1 wrote fresh KV)."""
        if self.s.keep_detection_kv and first == 0:
            return  # layer0: stage 1's KV in [0, det] is exact, kept for every span token
        cache, table = self.seq.cache, self.seq.table
        span_pos = rows[span_rows]
        for layer in range(first, det + 1):
            keep = ~mask if start <= layer <= self.end else torch.ones_like(mask)
            if not bool(keep.any()):
                continue
            o = out.kv[layer]
            idx = span_rows[keep]
            cache.scatter(table, span_pos[keep], o.cached_k[idx][None], o.cached_v[idx][None], layers=[layer])
