"""The reference engine: block pool, scheduler with chunked prefill and batched decode, KV connectors."""

from relaykv.engine.block_manager import BlockManager, block_hashes, hash_block
from relaykv.engine.connector import (
    ForwardContext,
    KVConnectorBase,
    KVConnectorMetadata,
    KVConnectorOutput,
    KVConnectorRole,
    NoOpConnector,
    SchedulerOutput,
)
from relaykv.engine.engine import Engine, EngineConfig
from relaykv.engine.relay_connector import RelayConnector, Strategy, StrategyInput, naive_strategy
from relaykv.engine.request import Request, RequestOutput, RequestStatus, SamplingParams

__all__ = [
    "BlockManager",
    "Engine",
    "EngineConfig",
    "ForwardContext",
    "KVConnectorBase",
    "KVConnectorMetadata",
    "KVConnectorOutput",
    "KVConnectorRole",
    "NoOpConnector",
    "RelayConnector",
    "Request",
    "RequestOutput",
    "RequestStatus",
    "SamplingParams",
    "SchedulerOutput",
    "Strategy",
    "StrategyInput",
    "block_hashes",
    "hash_block",
    "naive_strategy",
]
