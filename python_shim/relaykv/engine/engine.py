"""The reference engine: a scheduler with a token budget over one executor and one block pool.

Each `step()` schedules running requests first (decode, or the next prefill
chunk), then admits waiting ones (local prefix-cache hit, then the connector's
claim), runs every scheduled token of every request in ONE executor.forward
call, samples, applies stop conditions and frees finished requests (unless the
connector delays that until its save is done). Connector hooks are called where
vLLM's V1 engine calls them; see relaykv.engine.connector.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch

from relaykv.engine.block_manager import BlockManager
from relaykv.engine.connector import (
    ForwardContext,
    KVConnectorBase,
    KVConnectorOutput,
    KVConnectorRole,
    NoOpConnector,
    SchedulerOutput,
    layer_name,
)
from relaykv.engine.request import Request, RequestOutput, RequestStatus, SamplingParams
from relaykv.model.executor import Executor

ConnectorFactory = Callable[[KVConnectorRole], KVConnectorBase]


@dataclasses.dataclass
class EngineConfig:
    num_blocks: int = 256
    block_size: int = 16
    max_num_batched_tokens: int = 512  # token budget per step (chunked prefill beyond it)
    max_num_seqs: int = 32
    enable_prefix_caching: bool = True


@dataclasses.dataclass
class _Scheduled:
    req: Request
    num_tokens: int


class Engine:
    def __init__(
        self,
        executor: Executor,
        config: EngineConfig | None = None,
        *,
        connector_factory: ConnectorFactory | None = None,
        tokenizer: Any = None,
        eos_token_ids: Sequence[int] | int | None = None,
    ):
        self.executor = executor
        self.config = config or EngineConfig()
        self.tokenizer = tokenizer
        if eos_token_ids is None and tokenizer is not None:
            eos_token_ids = tokenizer.eos_token_id
        self.eos = {eos_token_ids} if isinstance(eos_token_ids, int) else set(eos_token_ids or ())
        c = self.config
        self.kv_cache = executor.new_kv_cache(c.num_blocks, c.block_size)
        self.blocks = BlockManager(c.num_blocks, c.block_size, enable_prefix_caching=c.enable_prefix_caching)
        factory = connector_factory or (lambda role: NoOpConnector(role))
        self.sched_connector = factory(KVConnectorRole.SCHEDULER)
        self.worker_connector = factory(KVConnectorRole.WORKER)
        self.worker_connector.register_kv_caches(
            {layer_name(i): t for i, t in enumerate(self.kv_cache.layers)})
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_req_ids: set[str] = set()  # reported to the worker next step
        self._delayed_free: dict[str, Request] = {}  # finished, blocks held for the connector
        self.waiting_remote: dict[str, Request] = {}  # blocks allocated, async KV load in flight
        self._finished_recving: set[str] = set()
        self._ids = itertools.count()
        self.stats = {"steps": 0, "forward_tokens": 0, "preemptions": 0}

    # -- API ----------------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        if not prompt_token_ids:
            raise ValueError("empty prompt")
        params = params or SamplingParams()
        need = -(-(len(prompt_token_ids) + params.max_tokens) // self.config.block_size)
        if need > self.config.num_blocks:
            raise ValueError(f"request needs {need} blocks, the pool has {self.config.num_blocks} (num_blocks)")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise ValueError(f"duplicate request id {rid!r}")
        req = Request(rid, list(prompt_token_ids), params)
        if params.temperature > 0:
            req.generator = torch.Generator().manual_seed(params.seed if params.seed is not None else 0)
        self.requests[rid] = req
        self.waiting.append(req)
        return rid

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._delayed_free or self.waiting_remote)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Runs the prompts concurrently to completion; outputs in prompt order."""
        plist = params if isinstance(params, Sequence) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        done: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                done[out.request_id] = out
        return [done[i] for i in ids]

    # -- one step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        self.stats["steps"] += 1
        sched_out, scheduled = self._schedule()
        conn_out, sampled = self._execute(sched_out, scheduled)
        return self._update_from_output(scheduled, sampled, conn_out)

    # -- scheduler ----------------------------------------------------------------------------
    def _schedule(self) -> tuple[SchedulerOutput, list[_Scheduled]]:
        budget = self.config.max_num_batched_tokens
        scheduled: list[_Scheduled] = []
        new_reqs: list[Request] = []
        # Running requests first (vLLM's order): their next chunk or one decode token.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while self.blocks.allocate_slots(req.request_id, req.num_computed_tokens + n) is None:
                victim = self.running.pop()  # lowest priority: the last admitted
                self._preempt(victim)
                if victim is req:
                    break
            else:
                scheduled.append(_Scheduled(req, n))
                budget -= n
                i += 1
                continue
            break
        # Requests whose async load finished go first among the waiting (vLLM: they keep
        # their place; here they were the oldest anyway).
        for rid in sorted(self._finished_recving & self.waiting_remote.keys(), reverse=True):
            req = self.waiting_remote.pop(rid)
            req.status = RequestStatus.WAITING
            self.waiting.appendleft(req)
        self._finished_recving = set()  # reports for requests not waiting (any more) mean nothing
        # Then waiting requests, while budget and sequence slots last.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            admitted = self._admit(req, budget)
            if admitted is None:
                break
            self.waiting.popleft()
            if req.status is RequestStatus.WAITING_FOR_REMOTE_KVS:
                self.waiting_remote[req.request_id] = req  # nothing to compute until it lands
                continue
            self.running.append(req)
            scheduled.append(admitted)
            new_reqs.append(req)
            budget -= admitted.num_tokens
        new_ids = {r.request_id for r in new_reqs}
        sched_out = SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=[s.req for s in scheduled if s.req.request_id not in new_ids],
            num_scheduled_tokens={s.req.request_id: s.num_tokens for s in scheduled},
            total_num_scheduled_tokens=sum(s.num_tokens for s in scheduled),
            block_ids={s.req.request_id: list(self.blocks.req_blocks[s.req.request_id]) for s in scheduled},
            finished_req_ids=self._finished_req_ids,
        )
        self._finished_req_ids = set()
        sched_out.kv_connector_metadata = self.sched_connector.build_connector_meta(sched_out)
        return sched_out, scheduled

    def _admit(self, req: Request, budget: int) -> _Scheduled | None:
        """Local prefix hit, connector claim, allocation; None leaves the request waiting."""
        if req.request_id in self.blocks.req_blocks:  # back from an async load: blocks are there
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if self.blocks.allocate_slots(req.request_id, req.num_computed_tokens + n) is None:
                return None
            req.status = RequestStatus.RUNNING
            return _Scheduled(req, n)
        tokens = req.all_token_ids  # after a preemption, the output is recomputed as prompt
        hits = self.blocks.get_computed_blocks(tokens)
        num_local = len(hits) * self.config.block_size
        ext, load_async = self.sched_connector.get_num_new_matched_tokens(req, num_local)
        if ext is None:  # the connector is not ready to say; ask again next step
            return None
        if num_local + ext >= req.num_tokens:
            raise RuntimeError(f"connector claimed {ext} tokens of {req.request_id}: at least one must be computed")
        # An async load computes nothing this step (vLLM: WAITING_FOR_REMOTE_KVS).
        n = 0 if load_async else min(req.num_tokens - num_local - ext, budget)
        blocks = self.blocks.allocate_slots(req.request_id, num_local + ext + n, hits)
        if blocks is None:
            return None
        if ext and not self.sched_connector.provides_exact_kv:
            self.blocks.mark_not_cacheable(req.request_id, num_local)
        self.sched_connector.update_state_after_alloc(req, list(blocks), ext)
        req.num_computed_tokens = num_local + ext
        if req.num_preemptions == 0:
            req.num_cached_tokens, req.num_external_tokens = num_local, ext
        req.status = RequestStatus.WAITING_FOR_REMOTE_KVS if load_async else RequestStatus.RUNNING
        return _Scheduled(req, n)

    def _preempt(self, req: Request) -> None:
        """Recompute preemption: drop the request's blocks, queue it first."""
        self.blocks.free(req.request_id)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.stats["preemptions"] += 1

    # -- worker -------------------------------------------------------------------------------
    def _execute(self, sched_out: SchedulerOutput, scheduled: list[_Scheduled]
                 ) -> tuple[KVConnectorOutput, dict[str, torch.Tensor]]:
        conn = self.worker_connector
        assert sched_out.kv_connector_metadata is not None
        conn.bind_connector_metadata(sched_out.kv_connector_metadata)
        conn.start_load_kv(ForwardContext(self.executor, self.kv_cache))
        logits: dict[str, torch.Tensor] = {}
        names = [layer_name(i) for i in range(self.executor.num_layers)]
        if scheduled:
            for name in names:
                conn.wait_for_layer_load(name)
            logits = self._forward(sched_out, scheduled)
            for name, layer in zip(names, self.kv_cache.layers):
                conn.save_kv_layer(name, layer, None)
        conn.wait_for_save()
        sending, recving = conn.get_finished(sched_out.finished_req_ids)
        out = KVConnectorOutput(set(sending or ()), set(recving or ()), set(conn.get_block_ids_with_load_errors()))
        conn.clear_connector_metadata()
        return out, logits

    def _forward(self, sched_out: SchedulerOutput, scheduled: list[_Scheduled]) -> dict[str, torch.Tensor]:
        """All scheduled tokens of all requests in one varlen forward; logits for the requests
        whose scheduled tokens reach their end (the others are mid-prefill)."""
        positions: list[int] = []
        token_ids: list[int] = []
        rows: list[int] = []
        sampling: list[str] = []
        for s in scheduled:
            start = s.req.num_computed_tokens
            positions.extend(range(start, start + s.num_tokens))
            token_ids.extend(s.req.all_token_ids[start : start + s.num_tokens])
            if start + s.num_tokens == s.req.num_tokens:
                rows.append(len(positions) - 1)
                sampling.append(s.req.request_id)
        out = self.executor.forward(
            self.kv_cache,
            query_lens=[s.num_tokens for s in scheduled],
            context_lens=[s.req.num_computed_tokens + s.num_tokens for s in scheduled],
            block_tables=[sched_out.block_ids[s.req.request_id] for s in scheduled],
            positions=positions,
            token_ids=token_ids,
            logits_rows=rows or None,
        )
        self.stats["forward_tokens"] += len(positions)
        if not rows:
            return {}
        return dict(zip(sampling, out.logits))

    # -- after the forward --------------------------------------------------------------------
    def _update_from_output(self, scheduled: list[_Scheduled], logits: dict[str, torch.Tensor],
                            conn_out: KVConnectorOutput) -> list[RequestOutput]:
        now = time.perf_counter()
        bad = self._requests_with_load_errors(conn_out.invalid_block_ids)
        finished: list[RequestOutput] = []
        for s in scheduled:
            req = s.req
            if req.request_id in bad:  # kv_load_failure_policy=recompute
                continue
            req.num_computed_tokens += s.num_tokens
            self.blocks.cache_full_blocks(req.request_id, req.all_token_ids, req.num_computed_tokens)
            row = logits.get(req.request_id)
            if row is None:
                continue
            req.output_token_ids.append(self._sample(req, row))
            if req.first_token_time is None:
                req.first_token_time = now
            if self._check_stop(req):
                req.finish_time = now
                self.running.remove(req)
                self._free_request(req)
                finished.append(RequestOutput.of(req))
        self._finished_recving |= conn_out.finished_recving
        for rid in conn_out.finished_sending:
            held = self._delayed_free.pop(rid, None)
            if held is not None:
                self.blocks.free(rid)
        self.sched_connector.update_connector_output(conn_out)
        return finished

    def _requests_with_load_errors(self, invalid: set[int]) -> set[str]:
        """Requests whose blocks failed to load go back to their first bad block."""
        bad: set[str] = set()
        if not invalid:
            return bad
        bs = self.config.block_size
        for req in [*self.running, *self.waiting_remote.values()]:
            blocks = self.blocks.req_blocks.get(req.request_id, [])
            idx = [i for i, b in enumerate(blocks) if b in invalid]
            if idx:
                req.num_computed_tokens = min(req.num_computed_tokens, idx[0] * bs)
                self.blocks.mark_not_cacheable(req.request_id, 0)
                bad.add(req.request_id)
        return bad

    def _free_request(self, req: Request) -> None:
        delay, _params = self.sched_connector.request_finished(req, list(self.blocks.req_blocks[req.request_id]))
        self._finished_req_ids.add(req.request_id)
        del self.requests[req.request_id]
        if delay:
            self._delayed_free[req.request_id] = req
        else:
            self.blocks.free(req.request_id)

    def _sample(self, req: Request, logits: torch.Tensor) -> int:
        p = req.sampling_params
        if p.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / p.temperature, -1)
        if p.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            # Keep the smallest head whose mass reaches top_p (the first token always stays).
            drop = sorted_p.cumsum(-1) - sorted_p >= p.top_p
            sorted_p[drop] = 0
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=req.generator))

    def _check_stop(self, req: Request) -> bool:
        p = req.sampling_params
        last = req.output_token_ids[-1]
        by_string = False
        if (not p.ignore_eos and last in self.eos) or last in set(p.stop_token_ids):
            req.status = RequestStatus.FINISHED_STOPPED
        elif p.stop and self.tokenizer is not None and self._hit_stop_string(req):
            req.status = RequestStatus.FINISHED_STOPPED
            by_string = True  # output_text is already cut before the stop string
        elif len(req.output_token_ids) >= p.max_tokens:
            req.status = RequestStatus.FINISHED_LENGTH
        else:
            return False
        if self.tokenizer is not None and not by_string:
            req.output_text = self.tokenizer.decode(req.output_token_ids, skip_special_tokens=True)
        return True

    def _hit_stop_string(self, req: Request) -> bool:
        text = self.tokenizer.decode(req.output_token_ids, skip_special_tokens=True)
        for stop in req.sampling_params.stop:
            at = text.find(stop)
            if at >= 0:
                req.output_text = text[:at]  # vLLM's default: the stop string is not returned
                return True
        return False


__all__ = ["Engine", "EngineConfig"]
