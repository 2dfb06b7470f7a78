"""relaykv as a vLLM V1 KV connector plugin.

Load with ``kv_connector_module_path="relaykv.vllm"`` and ``kv_connector="RelayKVConnector"``;
vLLM's factory imports this module and takes the class by that name.
"""

from __future__ import annotations

from relaykv.vllm.connector import (
    RelayKVConfig,
    RelayKVConnector,
    RelayKVConnectorMetadata,
    RelayLoad,
    parse_extra_config,
)

__all__ = ["RelayKVConfig", "RelayKVConnector", "RelayKVConnectorMetadata", "RelayLoad", "parse_extra_config"]
