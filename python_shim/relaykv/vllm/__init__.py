"""relaykv as a vLLM V1 KV connector plugin.

Load with ``kv_connector_module_path="relaykv.vllm"`` and ``kv_connector="RelayKVConnector"``;
vLLM's factory imports this module and takes the class by that name.

``attach_model(model)`` gives the worker-side connectors of the process the
served model's weights for computing gap tokens (see relaykv.vllm.model for the
discovery used when it is not called).
"""

from __future__ import annotations

from relaykv.vllm.connector import (
    RelayKVConfig,
    RelayKVConnector,
    RelayKVConnectorMetadata,
    RelayLoad,
    RelaySave,
    parse_extra_config,
)
from relaykv.vllm.layout import UnsupportedKvLayoutError
from relaykv.vllm.model import ModelUnavailableError, attach_model, detach_model

__all__ = [
    "ModelUnavailableError",
    "RelayKVConfig",
    "RelayKVConnector",
    "RelayKVConnectorMetadata",
    "RelayLoad",
    "RelaySave",
    "UnsupportedKvLayoutError",
    "attach_model",
    "detach_model",
    "parse_extra_config",
]
