"""Fails, naming the difference, when the installed vLLM's KVConnectorBase_V1 API moves away from the
one relaykv.vllm was written against (vLLM 0.32.0)."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

pytestmark = pytest.mark.vllm

base = pytest.importorskip("vllm.distributed.kv_transfer.kv_connector.v1.base",
                           reason="vLLM is not installed: the connector API cannot be checked")

# Every public member of KVConnectorBase_V1 in vLLM 0.32.0: kind and parameter names in order.
EXPECTED: dict[str, tuple[str, tuple[str, ...]]] = {
    "__init__": ("method", ("self", "vllm_config", "role", "kv_cache_config")),
    "_get_connector_metadata": ("method", ("self",)),
    "bind_connector_metadata": ("method", ("self", "connector_metadata")),
    "bind_gpu_block_pool": ("method", ("self", "gpu_block_pool")),
    "bind_kv_cache_manager": ("method", ("self", "kv_cache_manager")),
    "build_connector_meta": ("method", ("self", "scheduler_output")),
    "build_connector_worker_meta": ("method", ("self",)),
    "build_kv_connector_stats": ("classmethod", ("cls", "data")),
    "build_prom_metrics": ("classmethod", ("cls", "vllm_config", "metric_types", "labelnames",
                                           "per_engine_labelvalues")),
    "clear_connector_metadata": ("method", ("self",)),
    "finish_forward": ("method", ("self",)),
    "get_block_ids_with_load_errors": ("method", ("self",)),
    "get_external_cache_hit_sources": ("method", ("self", "request", "num_external_tokens")),
    "get_finished": ("method", ("self", "finished_req_ids")),
    "get_finished_count": ("method", ("self",)),
    "get_handshake_metadata": ("method", ("self",)),
    "get_kv_connector_kv_cache_events": ("method", ("self",)),
    "get_kv_connector_stats": ("method", ("self",)),
    "get_loaded_kv_cache_group_ids": ("method", ("self", "request")),
    "get_mem_pool_context": ("method", ("self",)),
    "get_num_new_matched_tokens": ("method", ("self", "request", "num_computed_tokens")),
    "get_required_kvcache_layout": ("classmethod", ("cls", "vllm_config")),
    "get_transfer_results": ("method", ("self", "finished_req_ids")),
    "handle_preemptions": ("method", ("self", "kv_connector_metadata")),
    "has_connector_metadata": ("method", ("self",)),
    "has_pending_block_frees": ("method", ("self",)),
    "has_pending_push_work": ("method", ("self",)),
    "on_new_request": ("method", ("self", "request")),
    "register_finished_partial_tail": ("method", ("self", "request", "block_ids", "partial_tail_offloads")),
    "register_kv_caches": ("method", ("self", "kv_caches")),
    "request_finished": ("method", ("self", "request", "block_ids")),
    "requires_kv_delivery": ("property", ()),
    "requires_piecewise_for_cudagraph": ("classmethod", ("cls", "extra_config")),
    "reset_cache": ("method", ("self",)),
    "reset_capture_state": ("method", ("self",)),
    "role": ("property", ()),
    "save_kv_layer": ("method", ("self", "layer_name", "kv_layer", "attn_metadata", "kwargs")),
    "set_host_xfer_buffer_ops": ("method", ("self", "copy_operation")),
    "set_xfer_handshake_metadata": ("method", ("self", "metadata")),
    "set_xfer_handshake_metadata_pp_aware": ("method", ("self", "metadata")),
    "shutdown": ("method", ("self",)),
    "start_load_kv": ("method", ("self", "forward_context", "kwargs")),
    "supports_divergent_local_hybrid_hits": ("property", ()),
    "take_events": ("method", ("self",)),
    "update_connector_output": ("method", ("self", "connector_output")),
    "update_state_after_alloc": ("method", ("self", "request", "blocks", "num_external_tokens")),
    "wait_for_layer_load": ("method", ("self", "layer_name")),
    "wait_for_save": ("method", ("self",)),
}

EXPECTED_ABSTRACT = {"build_connector_meta", "get_num_new_matched_tokens", "save_kv_layer", "start_load_kv",
                     "update_state_after_alloc", "wait_for_layer_load", "wait_for_save"}

# What RelayKVConnector overrides: these must exist in the base with exactly these parameters.
RELAYKV_OVERRIDES = ("__init__", "get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta",
                     "request_finished", "start_load_kv", "wait_for_layer_load", "save_kv_layer", "wait_for_save")


def describe(cls: type) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Kind and parameter names of every public member defined on cls itself (plus __init__)."""
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    for name, v in vars(cls).items():
        if name.startswith("__") and name != "__init__":
            continue
        if isinstance(v, property):
            out[name] = ("property", ())
            continue
        kind, fn = "method", v
        if isinstance(v, classmethod):
            kind, fn = "classmethod", v.__func__
        elif isinstance(v, staticmethod):
            kind, fn = "staticmethod", v.__func__
        elif not callable(v):
            continue
        out[name] = (kind, tuple(inspect.signature(fn).parameters))
    return out


def diff(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    lines = [f"removed from vLLM: {n} {expected[n]}" for n in sorted(set(expected) - set(actual))]
    lines += [f"new in vLLM: {n} {actual[n]}" for n in sorted(set(actual) - set(expected))]
    lines += [f"changed: {n}: relaykv expects {expected[n]}, vLLM has {actual[n]}"
              for n in sorted(set(expected) & set(actual)) if expected[n] != actual[n]]
    return lines


def test_diff_names_each_difference() -> None:
    # The comparison itself must be able to fail: a renamed parameter and a lost method are reported.
    actual = dict(EXPECTED)
    actual["request_finished"] = ("method", ("self", "request", "blocks"))
    del actual["wait_for_save"]
    d = diff(EXPECTED, actual)
    assert any("changed: request_finished" in x and "'blocks'" in x for x in d), d
    assert any("removed from vLLM: wait_for_save" in x for x in d), d


def test_base_class_api_matches_vllm_0_32() -> None:
    import vllm

    d = diff(EXPECTED, describe(base.KVConnectorBase_V1))
    assert not d, (f"vLLM {vllm.__version__}'s KVConnectorBase_V1 differs from the API relaykv.vllm implements "
                   "(vLLM 0.32.0):\n  " + "\n  ".join(d))


def test_abstract_methods_are_the_expected_ones() -> None:
    got = set(base.KVConnectorBase_V1.__abstractmethods__)
    assert got == EXPECTED_ABSTRACT, (f"abstract methods changed: new {sorted(got - EXPECTED_ABSTRACT)}, "
                                      f"gone {sorted(EXPECTED_ABSTRACT - got)}")


def test_relaykv_overrides_match_the_base_signatures() -> None:
    from relaykv.vllm import RelayKVConnector

    ours, theirs = describe(RelayKVConnector), describe(base.KVConnectorBase_V1)
    bad = [f"{n}: relaykv {ours.get(n)}, vLLM {theirs.get(n)}" for n in RELAYKV_OVERRIDES if ours.get(n) != theirs.get(n)]
    assert not bad, "RelayKVConnector overrides differ from vLLM's base:\n  " + "\n  ".join(bad)
    assert not RelayKVConnector.__abstractmethods__, f"unimplemented: {sorted(RelayKVConnector.__abstractmethods__)}"


def test_factory_loads_the_class_by_module_path() -> None:
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from relaykv.vllm import RelayKVConnector

    cfg = KVTransferConfig(kv_connector="RelayKVConnector", kv_connector_module_path="relaykv.vllm",
                           kv_role="kv_both")
    assert KVConnectorFactory.get_connector_class(cfg) is RelayKVConnector
