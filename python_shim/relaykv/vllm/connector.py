"""RelayKVConnector: relaykv behind vLLM's KVConnectorBase_V1 (scheduler side).

The claim logic is the reference engine's (relaykv.engine.relay_connector.usable_spans):
a connector can only extend the computed prefix, so the claim runs from
num_computed_tokens to the end of the last usable span, gaps included, and the
worker materializes the whole range (imports the spans, computes the gaps).

Status: the scheduler side is complete. The worker side (register_kv_caches,
start_load_kv materialization with the model's own layers, export on finish) is
not written yet: constructing the WORKER role raises NotImplementedError, so a
vLLM engine fails at start with that message instead of running with wrong KV.

Prefix cache: vLLM 0.32 has no per-connector "approximate KV" flag. After a
synchronous external load, Scheduler.schedule passes delay_cache_blocks=False to
KVCacheManager.allocate_slots, so blocks filled by this connector are registered
in vLLM's prefix cache under the prompt's token hashes as if a full prefill had
computed them; with an async load they are cached once the load finishes. Relay
KV is approximate (rotated, partly rectified), so exact-prefix reuse of those
blocks is only as good as the rectification; see the report in issue 7.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from relaykv import _relaykv as core
from relaykv.engine.relay_connector import usable_spans

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

STRATEGIES = ("naive", "relay")


@dataclasses.dataclass(frozen=True)
class RelayKVConfig:
    tenant: str = ""
    store_capacity_bytes: int = 1 << 30
    min_span_tokens: int = 16
    strategy: str = "naive"
    profile_path: str | None = None


def _bad(key: str, expected: str, got: object) -> ValueError:
    return ValueError(f"relaykv: kv_connector_extra_config[{key!r}]: expected {expected}, got {got!r}")


def _positive_int(key: str, v: object) -> int:
    # bool is an int subclass; True as a capacity is a typo, not 1 byte.
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise _bad(key, "a positive integer", v)
    return v


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
    return RelayKVConfig(tenant, cap, min_span, strategy, profile)


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
class RelayKVConnectorMetadata(KVConnectorMetadata):
    loads: list[RelayLoad] = dataclasses.field(default_factory=list)


def _rope_params(hf_config: Any, head_size: int) -> core.RopeParams:
    # vLLM normalizes rope settings into rope_parameters on recent transformers; older configs carry rope_theta.
    params = getattr(hf_config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return core.RopeParams(theta=float(theta), rotary_dim=head_size)


def relay_from_vllm_config(vllm_config: VllmConfig, cfg: RelayKVConfig) -> core.KvRelay:
    """The KvRelay identity from the served model: records only match the same model, layout and RoPE."""
    mc = vllm_config.model_config
    pc = vllm_config.parallel_config
    head_size = mc.get_head_size()
    dtype = str(mc.dtype).removeprefix("torch.")
    layout = core.KvLayout(mc.get_num_layers(pc), mc.get_num_kv_heads(pc), head_size, dtype)
    fingerprint = core.xxh64(f"{mc.model}|{dtype}".encode())
    try:
        return core.KvRelay(fingerprint, layout, _rope_params(mc.hf_config, head_size), cfg.tenant,
                            cfg.store_capacity_bytes, cfg.min_span_tokens)
    except core.RelayKVError as exc:
        # The core checks the span index and store options (e.g. min_span_tokens against its k-gram
        # window); its message names the option, which is also the extra_config key.
        raise ValueError(f"relaykv: kv_connector_extra_config rejected by the relay core: {exc}") from exc


class RelayKVConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config, role, kv_cache_config)
        # Validate before anything else so a bad key fails the engine at start, naming the key.
        self.config = parse_extra_config(self._kv_transfer_config.kv_connector_extra_config)
        if role == KVConnectorRole.WORKER:
            raise NotImplementedError(
                "relaykv.vllm: the worker side of RelayKVConnector (register_kv_caches, start_load_kv "
                "materialization, export on finish) is not implemented yet; only the scheduler side is")
        self.relay = relay_from_vllm_config(vllm_config, self.config)
        self._claims: dict[str, tuple[int, int, list[core.Span]]] = {}
        self._pending_loads: list[RelayLoad] = []

    # -- scheduler side ------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        tokens = list(request.prompt_token_ids or [])
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
        # Full-attention models have one KV cache group; its block ids hold every position.
        block_ids = list(blocks.get_block_ids()[0])
        self._pending_loads.append(RelayLoad(request.request_id, list(request.prompt_token_ids or []),
                                             block_ids, start, end, spans))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> RelayKVConnectorMetadata:
        meta = RelayKVConnectorMetadata(self._pending_loads)
        self._pending_loads = []
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._claims.pop(request.request_id, None)
        # Export on finish needs the worker side; until it exists no save is ever pending,
        # so vLLM frees the blocks at once.
        return False, None

    # -- worker side (unreachable: the WORKER role refuses construction above) -------------
    def _worker_missing(self) -> NotImplementedError:
        return NotImplementedError("relaykv.vllm: RelayKVConnector worker side is not implemented yet")

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        raise self._worker_missing()

    def wait_for_layer_load(self, layer_name: str) -> None:
        raise self._worker_missing()

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        raise self._worker_missing()

    def wait_for_save(self) -> None:
        raise self._worker_missing()


__all__ = ["RelayKVConfig", "RelayKVConnector", "RelayKVConnectorMetadata", "RelayLoad", "parse_extra_config"]
