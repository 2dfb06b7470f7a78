"""The KV connector interface of the reference engine: vLLM V1's KVConnectorBase_V1, by name and call order.

One class serves both roles; the engine makes one instance per role, as vLLM
does (scheduler process, worker process), and they talk only through the
metadata object that build_connector_meta returns and the worker binds.

Per engine step, in order (where vLLM 0.32 calls each in brackets):

scheduler  get_num_new_matched_tokens  new request, after the local prefix-cache lookup
                                       [Scheduler.schedule, waiting loop]
           update_state_after_alloc    after its blocks are allocated [Scheduler.schedule]
           build_connector_meta        once per step, after scheduling [Scheduler.schedule]
worker     bind_connector_metadata, start_load_kv(forward_context)
                                       [KVConnectorModelRunnerMixin._get_kv_connector_output]
           wait_for_layer_load(layer)  before each layer's attention [attention layer]
           save_kv_layer(layer, ...)   after each layer's attention [attention layer]
           wait_for_save, get_finished(finished_req_ids), get_block_ids_with_load_errors,
           clear_connector_metadata    after the forward [same context manager]
scheduler  request_finished(request, block_ids) when a request stops [Scheduler._free_request]
           update_connector_output(output) with the worker's finished sets
                                       [Scheduler._update_from_kv_xfer_finished]

The executor runs all layers in one C++ call, so the engine calls
wait_for_layer_load for every layer before it and save_kv_layer for every layer
after it: a connector that does its work there sees complete KV, only earlier.
register_kv_caches is called once, when the engine starts.

get_num_new_matched_tokens may answer (n, True): the request's blocks are
allocated, update_state_after_alloc is called, and the request then waits
(WAITING_FOR_REMOTE_KVS) without computing until the worker's get_finished lists
it as received. Blocks reported by get_block_ids_with_load_errors are recomputed
(vLLM's kv_load_failure_policy=recompute): the request goes back to its first bad
block and registers nothing more in the prefix cache.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from relaykv.engine.request import Request
    from relaykv.model.executor import Executor, KvCache


class KVConnectorRole(enum.Enum):
    SCHEDULER = 0
    WORKER = 1


class KVConnectorMetadata:
    """What the scheduler side tells the worker side for one step; connectors subclass it."""


@dataclasses.dataclass
class SchedulerOutput:
    """The parts of vLLM's SchedulerOutput a connector reads."""

    scheduled_new_reqs: list[Request]  # first scheduled this step (or again after preemption)
    scheduled_cached_reqs: list[Request]
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    block_ids: dict[str, list[int]]
    finished_req_ids: set[str]  # finished since the previous step
    kv_connector_metadata: KVConnectorMetadata | None = None


@dataclasses.dataclass
class ForwardContext:
    """What start_load_kv gets. vLLM's ForwardContext carries attention metadata; the
    reference engine hands over its executor and cache, the way a worker-side connector
    reaches the model to compute gap tokens."""

    executor: Executor
    kv_cache: KvCache
    attn_metadata: Any = None


@dataclasses.dataclass
class KVConnectorOutput:
    finished_sending: set[str] = dataclasses.field(default_factory=set)
    finished_recving: set[str] = dataclasses.field(default_factory=set)
    invalid_block_ids: set[int] = dataclasses.field(default_factory=set)


class KVConnectorBase:
    """No-op defaults for every hook; subclasses override what they need."""

    # Whether KV the connector provides equals what a full prefill computes. The engine
    # registers no block from the first external token on in its prefix cache unless it does.
    provides_exact_kv: bool = False

    def __init__(self, role: KVConnectorRole):
        self.role = role
        self._metadata: KVConnectorMetadata | None = None

    # -- worker side ---------------------------------------------------------------------
    def bind_connector_metadata(self, metadata: KVConnectorMetadata) -> None:
        self._metadata = metadata

    def clear_connector_metadata(self) -> None:
        self._metadata = None

    def _get_connector_metadata(self) -> KVConnectorMetadata:
        assert self._metadata is not None, "no connector metadata bound"
        return self._metadata

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        pass

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        pass

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        pass

    def wait_for_save(self) -> None:
        pass

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """(finished sending, finished receiving) request ids of async transfers."""
        return None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return set()

    # -- scheduler side ------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return 0, False

    def update_state_after_alloc(self, request: Request, blocks: list[int], num_external_tokens: int) -> None:
        pass

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return KVConnectorMetadata()

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        pass

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return False, None


class NoOpConnector(KVConnectorBase):
    provides_exact_kv = True


def layer_name(i: int) -> str:
    """vLLM's attention layer names for Llama-family models."""
    return f"model.layers.{i}.self_attn.attn"


__all__ = [
    "ForwardContext",
    "KVConnectorBase",
    "KVConnectorMetadata",
    "KVConnectorOutput",
    "KVConnectorRole",
    "NoOpConnector",
    "SchedulerOutput",
    "layer_name",
]
