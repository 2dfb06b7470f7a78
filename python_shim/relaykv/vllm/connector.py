"""RelayKVConnector: relaykv behind vLLM's KVConnectorBase_V1 (scheduler and worker side).

Scheduler side. The claim logic is the reference engine's
(relaykv.engine.relay_connector.usable_spans): a connector can only extend the
computed prefix, so the claim runs from num_computed_tokens to the end of the
last usable span, gaps included. When a request finishes with at least
min_span_tokens tokens in its cache, request_finished delays the block free and
the next step's metadata asks the worker to export those blocks, except the
positions the request imported (relaykv.engine.relay_connector.exact_runs: relay
KV is approximate and its producer exported that text already).

Worker side (start_load_kv, before the forward), per claimed request: import the
spans into the request's blocks (scatter + K re-rotation, KvRelay.import_span),
then compute the gap tokens (claimed positions no span covers) through every
layer with the relaykv executor over the served model's own weights (see
relaykv.vllm.model for how the worker reaches them). Exports run in wait_for_save
and are reported finished in the same step's get_finished, failed or not, so vLLM
frees the blocks.

Failure policy: nothing raises into vLLM's step. A span that cannot be imported
(evicted, corrupt, wrong model/layout/tenant, tokens differ, store unavailable)
or a gap that cannot be computed (no model, executor error) makes the claim valid
only up to the start of the block holding the first bad position; that block and
every later block of the claim are returned by get_block_ids_with_load_errors, so
vLLM (kv_load_failure_policy=recompute) truncates the request there and computes
the rest. Failures are counted by reason.

Strategies: "naive" imports spans as they are (re-rotated K) and computes gaps.
"relay" additionally rectifies the imported spans in the profile's layer range
with relaykv.rectify.strategies (deviation/influence token selection), run over
vLLM's cache through the same executor.

Prefix cache: vLLM 0.32 has no per-connector "approximate KV" flag. After a
synchronous external load, Scheduler.schedule passes delay_cache_blocks=False to
KVCacheManager.allocate_slots, so blocks filled by this connector are registered
in vLLM's prefix cache under the prompt's token hashes as if a full prefill had
computed them. Relay KV is approximate (rotated, partly rectified), so a later
exact-prefix hit on those blocks reuses the KV this request was served with, not
what a full prefill would give; deployments that need exact prefix hits only can
run vLLM with --no-enable-prefix-caching on relay consumers.

CPU note: vLLM's CPU attention ("vec" ISA) keeps K and V in different orders
inside a page; core.PagedCache takes one set of strides, so there spans are staged
through a small buffer (RelayCache below) instead of scattered in place.

GPU note: on a CUDA KV cache (a relaykv built with CUDA) imports copy the span's
rows from the record to a staging buffer on the cache's GPU, then scatter and
re-rotate with the CUDA kernels; exports gather on the GPU and copy back. Each
imported span and each exported run allocates its staging buffer and
synchronises the device before and after (the forward may be in flight on
another stream).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from relaykv import _relaykv as core
from relaykv.engine.relay_connector import exact_runs, usable_spans
from relaykv.vllm import model as model_access
from relaykv.vllm.layout import UnsupportedKvLayoutError, layer_kv_views
from relaykv.vllm.metrics import RelayKVConnectorStats, RelayKVPromMetrics, connector_metrics
from relaykv.vllm.store import EMBEDDED, StoreUnavailableError, open_relay

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

STRATEGIES = ("naive", "relay")


@dataclasses.dataclass(frozen=True)
class RelayKVConfig:
    tenant: str = ""
    store_capacity_bytes: int = 1 << 30
    min_span_tokens: int = 16
    strategy: str = "naive"
    profile_path: str | None = None
    directory: str = EMBEDDED
    store: str | None = None
    token_file: str | None = None
    ucx_tls: str | None = None
    store_inline_bytes: int | None = None


# The store protocol's cap on a record carried inside a control message (wire::kMaxInlineBytes).
MAX_INLINE_BYTES = 4 << 20


def _bad(key: str, expected: str, got: object) -> ValueError:
    return ValueError(f"relaykv: kv_connector_extra_config[{key!r}]: expected {expected}, got {got!r}")


def _positive_int(key: str, v: object) -> int:
    # bool is an int subclass; True as a capacity is a typo, not 1 byte.
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise _bad(key, "a positive integer", v)
    return v


_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")
# What the C++ directory accepts: no TLS (rediss) and no credentials in the URL.
_REDIS_URL = re.compile(r"^redis://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(:\d{1,5})?(/\d+)?$")
_UCX_TLS = re.compile(r"^\^?[a-z0-9_]+(,[a-z0-9_]+)*$")


def parse_extra_config(extra: Mapping[str, Any] | None) -> RelayKVConfig:
    """Validates kv_connector_extra_config; every error names the key and what was expected."""
    extra = dict(extra or {})
    known = {f.name for f in dataclasses.fields(RelayKVConfig)}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise ValueError(f"relaykv: kv_connector_extra_config: unknown key(s) {unknown}; "
                         f"expected a subset of {sorted(known)}")
    cfg = RelayKVConfig()
    tenant = extra.get("tenant", cfg.tenant)
    if not isinstance(tenant, str):
        raise _bad("tenant", "a string", tenant)
    cap = _positive_int("store_capacity_bytes", extra.get("store_capacity_bytes", cfg.store_capacity_bytes))
    min_span = _positive_int("min_span_tokens", extra.get("min_span_tokens", cfg.min_span_tokens))
    strategy = extra.get("strategy", cfg.strategy)
    if strategy not in STRATEGIES:
        raise _bad("strategy", f"one of {list(STRATEGIES)}", strategy)
    profile = extra.get("profile_path", cfg.profile_path)
    if profile is not None and (not isinstance(profile, str) or not os.path.isfile(profile)):
        raise _bad("profile_path", "the path of an existing profile file", profile)
    if strategy == "relay" and profile is None:
        # The relay strategy rectifies the layer range the profile names; without it there is nothing to run.
        raise _bad("profile_path", "a profile file when strategy is 'relay'", profile)
    directory = extra.get("directory", cfg.directory)
    if not isinstance(directory, str) or not (directory == EMBEDDED or _REDIS_URL.match(directory)):
        raise _bad("directory", f"{EMBEDDED!r} or a Redis URL 'redis://host:port/db'", directory)
    store = extra.get("store", cfg.store)
    if store is not None and (not isinstance(store, str) or not _HOST_PORT.match(store)
                              or not 0 < int(_HOST_PORT.match(store).group(2)) < 65536):
        raise _bad("store", "a store server address 'host:port'", store)
    token_file = extra.get("token_file", cfg.token_file)
    if token_file is not None and (not isinstance(token_file, str) or not os.path.isfile(token_file)):
        raise _bad("token_file", "the path of an existing file holding the deployment's token", token_file)
    ucx_tls = extra.get("ucx_tls", cfg.ucx_tls)
    if ucx_tls is not None and (not isinstance(ucx_tls, str) or not _UCX_TLS.match(ucx_tls)):
        raise _bad("ucx_tls", "a UCX_TLS list such as 'tcp,sm' or '^ib'", ucx_tls)
    inline_bytes = extra.get("store_inline_bytes", cfg.store_inline_bytes)
    if inline_bytes is not None and (isinstance(inline_bytes, bool) or not isinstance(inline_bytes, int)
                                     or not 0 <= inline_bytes <= MAX_INLINE_BYTES):
        raise _bad("store_inline_bytes", f"an integer from 0 to {MAX_INLINE_BYTES}", inline_bytes)
    return RelayKVConfig(tenant, cap, min_span, strategy, profile, directory, store, token_file, ucx_tls,
                         inline_bytes)


@dataclasses.dataclass
class RelayLoad:
    """One request's claim: positions [start, end) go into block_ids; spans cover part of it,
    the rest (gaps) the worker computes."""

    request_id: str
    token_ids: list[int]
    block_ids: list[int]
    start: int
    end: int
    spans: list[core.Span]


@dataclasses.dataclass
class RelaySave:
    """A finished request to export: token_ids[i] is at position i, in block_ids."""

    request_id: str
    token_ids: list[int]
    block_ids: list[int]
    # [begin, end) position runs to export, one record each (exact_runs); None: all of token_ids.
    runs: list[tuple[int, int]] | None = None


@dataclasses.dataclass
class RelayKVConnectorMetadata(KVConnectorMetadata):
    loads: list[RelayLoad] = dataclasses.field(default_factory=list)
    saves: list[RelaySave] = dataclasses.field(default_factory=list)


def _rope_params(hf_config: Any, head_size: int) -> core.RopeParams:
    """RoPE as the model applies it (scaling included): re-rotation is only right with the model's own."""
    from relaykv.model.config import UnsupportedModelError, _rope

    try:
        return _rope(hf_config, head_size)
    except (UnsupportedModelError, KeyError) as exc:
        raise ValueError(f"relaykv: the served model's RoPE cannot be re-rotated by relaykv: {exc}") from exc


def relay_from_vllm_config(vllm_config: VllmConfig, cfg: RelayKVConfig) -> core.KvRelay:
    """The KvRelay for the served model: records only match the same model, layout, RoPE and tenant."""
    mc = vllm_config.model_config
    pc = vllm_config.parallel_config
    head_size = mc.get_head_size()
    dtype = str(mc.dtype).removeprefix("torch.")
    layout = core.KvLayout(mc.get_num_layers(pc), mc.get_num_kv_heads(pc), head_size, dtype)
    fingerprint = core.xxh64(f"{mc.model}|{dtype}".encode())
    try:
        return open_relay(fingerprint=fingerprint, layout=layout, rope=_rope_params(mc.hf_config, head_size),
                          tenant=cfg.tenant, capacity_bytes=cfg.store_capacity_bytes,
                          min_span_tokens=cfg.min_span_tokens, directory=cfg.directory, store=cfg.store,
                          token_file=cfg.token_file, ucx_tls=cfg.ucx_tls, inline_bytes=cfg.store_inline_bytes)
    except StoreUnavailableError as exc:
        raise ValueError(str(exc)) from exc
    except core.RelayKVError as exc:
        # The core checks the span index and store options (e.g. min_span_tokens against its k-gram
        # window); its message names the option, which is also the extra_config key.
        raise ValueError(f"relaykv: kv_connector_extra_config rejected by the relay core: {exc}") from exc


def failure_reason(exc: BaseException) -> str:
    """The import_failures_total{reason} label of an exception from the relay or the executor."""
    for cls, reason in ((core.NotFoundError, "not_found"), (core.DataLossError, "corrupt"),
                        (core.FailedPreconditionError, "mismatch"), (core.PermissionDeniedError, "mismatch"),
                        (core.AbortedError, "token_mismatch"), (core.InvalidArgumentError, "invalid"),
                        (core.UnavailableError, "unavailable"), (core.DeadlineExceededError, "unavailable"),
                        (StoreUnavailableError, "unavailable"), (model_access.ModelMismatchError, "mismatch"),
                        (model_access.ModelUnavailableError, "unavailable")):
        if isinstance(exc, cls):
            return reason
    return "other"


class _LoadFailure(Exception):
    def __init__(self, position: int, reason: str, detail: str):
        super().__init__(detail)
        self.position, self.reason = position, reason


class RelayKVConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config, role, kv_cache_config)
        # Validate before anything else so a bad key fails the engine at start, naming the key.
        self.config = parse_extra_config(self._kv_transfer_config.kv_connector_extra_config)
        self.relay = relay_from_vllm_config(vllm_config, self.config)
        self.metrics = connector_metrics()
        self._stats = RelayKVConnectorStats()
        # scheduler side
        self._claims: dict[str, tuple[int, int, list[core.Span]]] = {}
        self._pending_loads: list[RelayLoad] = []
        self._pending_saves: list[RelaySave] = []
        self._exports_in_flight: set[str] = set()
        # request → position ranges it did not compute itself: its local prefix-cache hit (vLLM caches
        # blocks a connector filled like computed ones) and the spans of its last claim.
        self._imported: dict[str, list[tuple[int, int]]] = {}
        self._cached: dict[str, int] = {}
        # worker side
        self._paged: RelayCache | None = None
        self._kv_cache: Any = None  # relaykv.model.executor.KvCache over the same views
        self._block_size = vllm_config.cache_config.block_size
        self._executor: Any = None
        self._executor_key: Any = None
        self._executor_error: Exception | None = None
        self._discovered: torch.nn.Module | None = None
        self._strategy: Any = None
        self._saved: set[str] = set()
        self._load_errors: set[int] = set()
        policy = getattr(self._kv_transfer_config, "kv_load_failure_policy", "recompute")
        if policy != "recompute":
            # Failed loads are reported as invalid blocks; with "fail" vLLM aborts the request instead of
            # recomputing it.
            logger.warning("relaykv: kv_load_failure_policy=%r: a failed relay import fails its request; set "
                           "kv_load_failure_policy='recompute' to have vLLM recompute it", policy)
        if role == KVConnectorRole.WORKER and self.config.strategy == "relay":
            self._strategy = self._relay_strategy(self.config.profile_path)
            num_layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
            if max(self._strategy.start_layer, self._strategy.det_layer) >= num_layers:
                raise _bad("profile_path", f"a profile for a model of {num_layers} layers (start_layer/det_layer "
                           f"below {num_layers})", self.config.profile_path)

    @property
    def requires_kv_delivery(self) -> bool:
        # A dropped export is a future miss, not lost work: a preempted request need not be recomputed for it.
        return False

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: VllmConfig) -> str | None:
        # Views are built from each tensor's strides, so any KVCacheLayout vLLM picks is fine.
        return None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return RelayKVConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig, metric_types: dict, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> RelayKVPromMetrics:
        return RelayKVPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self._stats.is_empty():
            return None
        out, self._stats = self._stats, RelayKVConnectorStats()
        return out

    # -- scheduler side ------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        self._cached[request.request_id] = num_computed_tokens
        if self._exports_in_flight:
            # A request that just finished may hold exactly what this prompt quotes (the relay chain's
            # next agent): ask again once the worker reports its export, one step later.
            return None, False
        tokens = list(request.prompt_token_ids or [])
        self.metrics.lookups.inc()
        try:
            found = self.relay.lookup(tokens)
        except core.RelayKVError:
            # A failed lookup is a miss, never an exception into vLLM's scheduler loop.
            return 0, False
        # Leave the last prompt token to the forward: vLLM needs at least one token to compute.
        spans = usable_spans(found, num_computed_tokens, len(tokens) - 1)
        if not spans:
            self._claims.pop(request.request_id, None)
            return 0, False
        end = spans[-1].dst_offset + spans[-1].length
        self._claims[request.request_id] = (num_computed_tokens, end, spans)
        return end - num_computed_tokens, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        claim = self._claims.pop(request.request_id, None)
        if claim is None or num_external_tokens == 0:
            return
        start, end, spans = claim
        if end - start != num_external_tokens:
            raise RuntimeError(f"relaykv: vLLM allocated {num_external_tokens} external tokens for "
                               f"{request.request_id}, the claim was {end - start}")
        # Counted here, not at lookup: a request the pool cannot take yet is looked up again.
        self.metrics.hit_tokens.inc(num_external_tokens)
        # One claim per (re)allocation: a preempted request starts over.
        self._imported[request.request_id] = [(s.dst_offset, s.dst_offset + s.length) for s in spans]
        # Full-attention models have one KV cache group; its block ids hold every position.
        block_ids = list(blocks.get_block_ids()[0])
        self._pending_loads.append(RelayLoad(request.request_id, list(request.prompt_token_ids or []),
                                             block_ids, start, end, spans))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> RelayKVConnectorMetadata:
        meta = RelayKVConnectorMetadata(self._pending_loads, self._pending_saves)
        self._pending_loads, self._pending_saves = [], []
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._claims.pop(request.request_id, None)
        imported = self._imported.pop(request.request_id, [])
        cached = self._cached.pop(request.request_id, 0)
        if cached:
            imported.append((0, cached))
        # Tokens whose KV is in the blocks: the last sampled token was never fed back, and with async
        # scheduling a step may still be in flight.
        in_flight = getattr(request, "num_in_flight_tokens", 0) or 0
        n = min(request.num_computed_tokens - in_flight, len(block_ids) * self._block_size)
        runs = exact_runs(n, imported, self.config.min_span_tokens)
        if not runs:
            return False, None
        tokens = list(request.all_token_ids[:n])
        self._pending_saves.append(RelaySave(request.request_id, tokens, list(block_ids), runs))
        self._exports_in_flight.add(request.request_id)
        # The blocks stay until the worker's get_finished lists the request (export done or failed).
        return True, {"relaykv": {"export_tokens": sum(hi - lo for lo, hi in runs)}}

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self._exports_in_flight.difference_update(connector_output.finished_sending or ())

    # -- worker side ---------------------------------------------------------------------
    def _attention_backends(self, names: list[str]) -> dict[str, str | None]:
        ctx = getattr(self._vllm_config.compilation_config, "static_forward_context", None) or {}
        out: dict[str, str | None] = {}
        for name in names:
            backend = getattr(ctx.get(name), "attn_backend", None)
            if backend is not None:
                out[name] = backend.get_name()
            elif self._vllm_config.device_config.device_type == "cpu":
                out[name] = "CPU_ATTN"  # the only attention backend of vLLM's CPU platform
            else:
                out[name] = None
        return out

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Builds PagedCache views over vLLM's tensors (no copy); raises at start on a layout it cannot use."""
        mc = self._vllm_config.model_config
        pc = self._vllm_config.parallel_config
        if pc.tensor_parallel_size != 1 or pc.pipeline_parallel_size != 1:
            raise UnsupportedKvLayoutError(
                f"relaykv: tensor_parallel_size={pc.tensor_parallel_size}, pipeline_parallel_size="
                f"{pc.pipeline_parallel_size}: the worker side supports one worker holding every layer and head")
        first = next(iter(kv_caches.values()), None)
        if first is not None and first.device.type not in ("cpu", "cuda"):
            raise UnsupportedKvLayoutError(f"relaykv: the KV cache is on {first.device}; relaykv takes CPU or "
                                           "CUDA caches")
        if first is not None and first.device.type == "cuda" and not core.built_with_cuda:
            raise UnsupportedKvLayoutError(
                f"relaykv: the KV cache is on {first.device} but this relaykv was built without CUDA "
                "(build with nvcc on the path, RELAYKV_WITH_CUDA=ON)")
        ctx = getattr(self._vllm_config.compilation_config, "static_forward_context", None) or {}
        views = layer_kv_views(kv_caches, num_layers=mc.get_num_layers(pc), num_kv_heads=mc.get_num_kv_heads(pc),
                               head_size=mc.get_head_size(), backends=self._attention_backends(list(kv_caches)),
                               cpu_isas={n: getattr(ctx.get(n), "isa", None) for n in kv_caches})
        block_size = int(views[0][0].shape[1])
        if block_size != self._block_size:
            raise UnsupportedKvLayoutError(
                f"relaykv: KV cache blocks hold {block_size} tokens, vLLM's scheduler uses block_size="
                f"{self._block_size}; relaykv needs them equal")
        try:
            self._paged = RelayCache(views)
        except core.RelayKVError as exc:
            raise UnsupportedKvLayoutError(f"relaykv: cannot view vLLM's KV cache: {exc}") from exc
        from relaykv.model.executor import KvCache

        self._kv_cache = KvCache(list(views))
        self._discovered = model_access.discover_model([ctx[n] for n in kv_caches if n in ctx])

    def _get_executor(self) -> Any:
        """The executor over the attached (or discovered) model; rebuilt when attach_model is called again."""
        generation, weights = model_access.attached()
        key = (generation, id(self._discovered))
        if self._executor_key == key:
            if self._executor is None:
                # Building failed for this very model already: do not reload the weights every step.
                raise self._executor_error or model_access.ModelUnavailableError("relaykv: no executor")
            return self._executor
        self._executor, self._executor_key, self._executor_error = None, key, None
        try:
            self._executor = self._build_executor(weights)
        except Exception as exc:
            self._executor_error = exc
            raise
        return self._executor

    def _build_executor(self, weights: dict[str, torch.Tensor] | None) -> Any:
        if weights is None and self._discovered is not None:
            weights = {n: p.detach() for n, p in self._discovered.named_parameters()}
            if model_access.emptied(weights):
                mc = self._vllm_config.model_config
                logger.info("relaykv: the platform repacked the model's linear weights (%s...); reading them "
                            "from %s for the gap executor", model_access.emptied(weights)[0], mc.model)
                weights = model_access.load_checkpoint(mc.model, mc.dtype)
        if weights is None:
            raise model_access.ModelUnavailableError(
                "relaykv: no model to compute gap tokens with; call relaykv.vllm.attach_model(model) in the "
                "worker process (discovery at register_kv_caches found none)")
        executor = model_access.build_executor(weights, self._vllm_config.model_config.hf_config)
        if executor.dtype != self._kv_cache.layers[0][0].dtype:
            raise model_access.ModelMismatchError(
                f"relaykv: the model's dtype {executor.dtype} differs from the KV cache's "
                f"{self._kv_cache.layers[0][0].dtype}")
        return executor

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, RelayKVConnectorMetadata)
        for load in meta.loads:
            self._materialize(load)

    def _fail(self, load: RelayLoad, failure: _LoadFailure) -> None:
        first_bad = max(failure.position, load.start) // self._block_size
        last = -(-load.end // self._block_size)
        self._load_errors.update(load.block_ids[first_bad:last])
        self.metrics.import_failures.labels(reason=failure.reason).inc()
        self._stats.add(f"import_failures_{failure.reason}")
        logger.warning("relaykv: request %s: claim [%d, %d) valid only up to block %d (%s: %s); vLLM recomputes "
                       "the rest", load.request_id, load.start, load.end, first_bad, failure.reason, failure)

    def _materialize(self, load: RelayLoad) -> None:
        t0 = time.perf_counter()
        try:
            if self._paged is None:
                raise _LoadFailure(load.start, "invalid", "register_kv_caches was not called")
            self._materialize_or_raise(load)
            self.metrics.import_seconds.observe(time.perf_counter() - t0)
        except _LoadFailure as failure:
            self._fail(load, failure)
        except Exception as exc:  # noqa: BLE001 - the failure policy: never raise into vLLM's step
            self._fail(load, _LoadFailure(load.start, failure_reason(exc), f"{type(exc).__name__}: {exc}"))

    def _materialize_or_raise(self, load: RelayLoad) -> None:
        spans = sorted(load.spans, key=lambda s: s.dst_offset)
        imported: list[core.Span] = []
        failure: _LoadFailure | None = None
        for span in spans:
            try:
                res = self._paged.import_span(self.relay, span, load.token_ids, load.block_ids)
            except Exception as exc:  # noqa: BLE001 - classified and reported below
                failure = _LoadFailure(span.dst_offset, failure_reason(exc), f"span {span}: {exc}")
                break
            imported.append(span)
            self.metrics.imports.inc()
            self.metrics.bytes.labels(direction="import").inc(res["bytes"])
            self._stats.add("imports")
            self._stats.add("import_tokens", res["tokens"])
            self._stats.add("import_bytes", res["bytes"])
        # Everything before the first bad block must be valid when this returns; from there on vLLM recomputes.
        limit = load.end if failure is None else max(load.start, (failure.position // self._block_size)
                                                     * self._block_size)
        covered = torch.zeros(load.end, dtype=torch.bool)
        for s in imported:
            covered[s.dst_offset: s.dst_offset + s.length] = True
        positions = torch.arange(load.end)
        gaps = positions[(positions >= load.start) & (positions < limit) & ~covered]
        span_pos = positions[(positions < limit) & covered]
        if gaps.numel() or (self._strategy is not None and span_pos.numel()):
            try:
                executor = self._get_executor()
                recomputed = self._compute(executor, load, gaps, imported, limit)
            except Exception as exc:  # noqa: BLE001
                first = int(gaps[0]) if gaps.numel() else load.start
                raise _LoadFailure(first, failure_reason(exc), f"computing gap tokens: {exc}") from exc
            if span_pos.numel():
                self.metrics.rectified_token_ratio.observe(recomputed / int(span_pos.numel()))
            self._stats.add("gap_tokens", int(gaps.numel()))
            self._stats.add("recomputed_tokens", recomputed)
        if failure is not None:
            raise failure

    def _compute(self, executor: Any, load: RelayLoad, gaps: torch.Tensor, imported: list[core.Span],
                 limit: int) -> int:
        """Computes the gaps (and rectifies the spans with the relay strategy); returns span tokens recomputed."""
        if self._strategy is not None and imported:
            return self._rectify(executor, load, gaps, imported, limit)
        ids = torch.as_tensor(load.token_ids[:limit])
        # Non-contiguous positions in one call: causal masking is by position, so each gap token attends
        # to the imported KV and to the gap tokens before it.
        executor.forward(self._kv_cache, query_lens=[int(gaps.numel())], context_lens=[limit],
                         block_tables=[load.block_ids], positions=gaps, token_ids=ids[gaps])
        return 0

    # -- relay strategy ------------------------------------------------------------------
    @staticmethod
    def _relay_strategy(profile_path: str | None) -> Any:
        from relaykv.rectify.strategies import from_profile

        with open(profile_path or "", encoding="utf-8") as f:
            profile = json.load(f)
        # The "hidden" scheme needs the exporter's hidden-state checkpoints, which vLLM's forward does
        # not expose to a connector: span tokens start from their embeddings here.
        return from_profile(profile, scheme="layer0", use_prefix_cache=False)

    def _rectify(self, executor: Any, load: RelayLoad, gaps: torch.Tensor, imported: list[core.Span],
                 limit: int) -> int:
        """relaykv.rectify.strategies' layer-major relay rectification over [0, limit) of vLLM's blocks.

        The strategies runner computes `computed` rows through every layer and ends with a last-row
        logit; here the claim ends at `limit` and vLLM computes what follows, so the rows it computes
        are the gaps plus, when there is none, the last claimed position (recomputed exactly, a token
        of negligible cost that keeps every stage non-empty)."""
        from relaykv.rectify import strategies as st

        ids = load.token_ids[:limit]
        span_ids = torch.full((limit,), -1, dtype=torch.long)
        src = []
        for i, s in enumerate(s for s in imported if s.dst_offset < limit):
            hi = min(s.dst_offset + s.length, limit)
            span_ids[s.dst_offset: hi] = i
            src.append((s.record_id, s.src_offset, s.dst_offset, hi - s.dst_offset))
        computed = gaps
        if computed.numel() == 0:
            computed = torch.tensor([limit - 1])
            span_ids[limit - 1] = -1
        is_span = span_ids >= 0
        positions = torch.arange(limit)
        span_pos = positions[is_span & (positions >= load.start)]
        lay = st._Layout(computed, span_pos, span_ids[span_pos], src, load.start)
        inst = _RunnerInstance(executor)
        seq = _RunnerSequence(self._kv_cache, load.block_ids)
        _, chosen = st._Runner(inst, seq, ids, lay, self._strategy).run()
        return int(chosen.numel())

    def wait_for_layer_load(self, layer_name: str) -> None:
        # start_load_kv finishes every load before the forward starts.
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        # Exports read finished requests' blocks in wait_for_save, not layer by layer.
        return

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, RelayKVConnectorMetadata)
        for save in meta.saves:
            for lo, hi in [(0, len(save.token_ids))] if save.runs is None else save.runs:
                t0 = time.perf_counter()
                try:
                    if self._paged is None:
                        raise RuntimeError("register_kv_caches was not called")
                    res = self._paged.export(self.relay, save.block_ids, save.token_ids[lo:hi], lo)
                    self.metrics.exports.inc()
                    self.metrics.bytes.labels(direction="export").inc(res["bytes"])
                    self.metrics.export_seconds.observe(time.perf_counter() - t0)
                    self._stats.add("exports")
                    self._stats.add("export_bytes", res["bytes"])
                except Exception as exc:  # noqa: BLE001 - a failed export is a future miss; the blocks still go
                    self.metrics.export_failures.inc()
                    self._stats.add("export_failures")
                    logger.warning("relaykv: export of request %s [%d, %d) failed: %s", save.request_id, lo, hi,
                                   exc)
            self._saved.add(save.request_id)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        done, self._saved = self._saved, set()
        return (done or None), None

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        return out


class RelayCache:
    """The relay's view of vLLM's cache: a zero-copy core.PagedCache when K and V share strides.

    core.PagedCache takes one set of strides for K and V. vLLM's CPU backend ("vec" ISA) keeps K
    head_size-major and V token-major inside a page, so there the span goes through a staging buffer
    in the record layout: import = import_span into the staging blocks, then a copy of the span's
    positions into vLLM's views; export = a copy of the request's blocks out, then export."""

    def __init__(self, views: list[tuple[torch.Tensor, torch.Tensor]]):
        self.views = views
        k0, v0 = views[0]
        self.block_size = int(k0.shape[1])
        self.direct = k0.stride() == v0.stride()
        self.paged = core.PagedCache([k for k, _ in views], [v for _, v in views]) if self.direct else None

    def _staging(self, num_blocks: int) -> tuple[torch.Tensor, core.PagedCache]:
        k0 = self.views[0][0]
        buf = torch.empty((len(self.views), 2, num_blocks, *k0.shape[1:]), dtype=k0.dtype, device=k0.device)
        return buf, core.PagedCache([b[0] for b in buf], [b[1] for b in buf])

    def import_span(self, relay: Any, span: core.Span, tokens: list[int], block_ids: list[int]) -> dict:
        if self.paged is not None:
            return relay.import_span(span, tokens, self.paged, block_ids)
        buf, staged = self._staging(len(block_ids))
        res = relay.import_span(span, tokens, staged, list(range(len(block_ids))))
        pos = torch.arange(span.dst_offset, span.dst_offset + span.length)
        rows, slots = pos // self.block_size, pos % self.block_size
        blocks = torch.as_tensor(block_ids)[rows]
        for layer, (k, v) in enumerate(self.views):
            k[blocks, slots] = buf[layer, 0, rows, slots]
            v[blocks, slots] = buf[layer, 1, rows, slots]
        return res

    def export(self, relay: Any, block_ids: list[int], tokens: list[int], seq_begin: int = 0) -> dict:
        """Exports `tokens`, at positions seq_begin.. of the request in block_ids."""
        if self.paged is not None:
            return relay.export(self.paged, block_ids, tokens, seq_begin)
        # Only the blocks the run touches are staged.
        first = seq_begin // self.block_size
        last = (seq_begin + len(tokens) - 1) // self.block_size
        if seq_begin < 0 or last >= len(block_ids):
            raise ValueError(f"export of positions [{seq_begin}, {seq_begin + len(tokens)}): the block table "
                             f"holds {len(block_ids)} blocks of {self.block_size}")
        buf, staged = self._staging(last - first + 1)
        blocks = torch.as_tensor(block_ids[first:last + 1])
        for layer, (k, v) in enumerate(self.views):
            buf[layer, 0] = k[blocks]
            buf[layer, 1] = v[blocks]
        # The staging table maps the run's blocks to 0..; the entries before them are never read.
        table = [0] * first + list(range(last - first + 1))
        return relay.export(staged, table, tokens, seq_begin)


class _RunnerInstance:
    """The slice of the reference engine's instance that relaykv.rectify.strategies' runner reads."""

    def __init__(self, executor: Any):
        self.executor = executor


class _RunnerSequence:
    def __init__(self, cache: Any, table: list[int]):
        self.cache = cache
        self.table = table


__all__ = ["RelayKVConfig", "RelayKVConnector", "RelayKVConnectorMetadata", "RelayLoad", "RelaySave",
           "failure_reason", "parse_extra_config"]
