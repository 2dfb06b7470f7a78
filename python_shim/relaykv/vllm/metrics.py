"""Connector metrics: Prometheus series (prometheus_client, a vLLM dependency) and vLLM's
KVConnectorStats / KVConnectorPromMetrics hooks.

Two paths, because vLLM's workers and its HTTP frontend are different processes:
the relaykv_connector_* series live in the process that runs the connector (read
them there, or with PROMETHEUS_MULTIPROC_DIR); the worker's RelayKVConnectorStats
travel with each step's output to the frontend, where RelayKVPromMetrics turns them
into vllm:relaykv_* series with vLLM's engine labels on the /metrics endpoint.

The Prometheus objects are process-wide and created once: vLLM may build
several connector instances in one process (scheduler and worker roles, tests),
and prometheus_client refuses a second registration of the same name. vLLM
serves the default registry on its /metrics endpoint, so these series appear
there next to vLLM's own.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

IMPORT_FAILURE_REASONS = ("not_found", "corrupt", "mismatch", "token_mismatch", "invalid", "unavailable", "other")

_lock = threading.Lock()
_metrics: ConnectorMetrics | None = None


@dataclasses.dataclass(frozen=True)
class ConnectorMetrics:
    lookups: Counter
    hit_tokens: Counter
    imports: Counter
    import_failures: Counter
    exports: Counter
    export_failures: Counter
    bytes: Counter
    import_seconds: Histogram
    export_seconds: Histogram
    rectified_token_ratio: Histogram


def _existing(name: str) -> Any:
    # Another copy of this module (e.g. re-imported under a different name) registered it first.
    return REGISTRY._names_to_collectors.get(name)  # noqa: SLF001 - the only lookup prometheus_client offers


def _counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
    try:
        return Counter(name, doc, labels)
    except ValueError:
        return _existing(name)


def _histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
    try:
        return Histogram(name, doc, buckets=buckets)
    except ValueError:
        return _existing(name)


def counter_values() -> dict[str, float]:
    """This process's connector counters by short name (lookups, hit_tokens, imports, exports,
    export_failures, import_failures summed over reasons, rectified_token_ratio_sum): what
    tests and benchmarks compare before and after a request."""
    out = {n: REGISTRY.get_sample_value(f"relaykv_connector_{n}_total") or 0.0
           for n in ("lookups", "hit_tokens", "imports", "exports", "export_failures")}
    out["import_failures"] = sum(REGISTRY.get_sample_value("relaykv_connector_import_failures_total",
                                                           {"reason": r}) or 0.0 for r in IMPORT_FAILURE_REASONS)
    out["rectified_token_ratio_sum"] = REGISTRY.get_sample_value("relaykv_connector_rectified_token_ratio_sum") or 0.0
    return out


def connector_metrics() -> ConnectorMetrics:
    """The process's connector metrics, registered on first use."""
    global _metrics
    with _lock:
        if _metrics is None:
            seconds = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
            m = ConnectorMetrics(
                lookups=_counter("relaykv_connector_lookups_total", "Span lookups by the scheduler side."),
                hit_tokens=_counter("relaykv_connector_hit_tokens_total",
                                    "Prompt tokens claimed from the relay (spans and the gaps between them)."),
                imports=_counter("relaykv_connector_imports_total", "Spans imported into vLLM's KV cache."),
                import_failures=_counter("relaykv_connector_import_failures_total",
                                         "Claims that could not be materialized; their blocks are recomputed.",
                                         ("reason",)),
                exports=_counter("relaykv_connector_exports_total",
                                 "Records exported to the store (one per run of positions a finished "
                                 "request computed itself)."),
                export_failures=_counter("relaykv_connector_export_failures_total",
                                         "Exports that failed (the blocks are freed anyway)."),
                bytes=_counter("relaykv_connector_bytes_total", "KV bytes moved through the relay.",
                               ("direction",)),
                import_seconds=_histogram("relaykv_connector_import_seconds",
                                          "Time to materialize one request's claim (imports + gaps).", seconds),
                export_seconds=_histogram("relaykv_connector_export_seconds", "Time to export one request.",
                                          seconds),
                rectified_token_ratio=_histogram(
                    "relaykv_connector_rectified_token_ratio",
                    "Fraction of a claim's imported span tokens recomputed by rectification.",
                    (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)),
            )
            for reason in IMPORT_FAILURE_REASONS:  # every series exists from the start, at 0
                m.import_failures.labels(reason=reason)
            for direction in ("import", "export"):
                m.bytes.labels(direction=direction)
            _metrics = m
        return _metrics


@dataclasses.dataclass
class RelayKVConnectorStats(KVConnectorStats):
    """Counts since the last get_kv_connector_stats, summed across workers by vLLM's aggregator."""

    def reset(self) -> None:
        self.data = {}

    def add(self, key: str, value: float = 1) -> None:
        self.data[key] = self.data.get(key, 0) + value

    def aggregate(self, other: KVConnectorStats) -> RelayKVConnectorStats:
        for k, v in (other.data or {}).items():
            self.add(k, v)
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


# RelayKVConnectorStats keys → (vllm:-prefixed counter, extra label name, extra label value).
_STAT_SERIES: dict[str, tuple[str, str | None, str | None]] = {
    "imports": ("vllm:relaykv_imports_total", None, None),
    "import_tokens": ("vllm:relaykv_import_tokens_total", None, None),
    "gap_tokens": ("vllm:relaykv_gap_tokens_total", None, None),
    "recomputed_tokens": ("vllm:relaykv_recomputed_tokens_total", None, None),
    "exports": ("vllm:relaykv_exports_total", None, None),
    "export_failures": ("vllm:relaykv_export_failures_total", None, None),
    "import_bytes": ("vllm:relaykv_bytes_total", "direction", "import"),
    "export_bytes": ("vllm:relaykv_bytes_total", "direction", "export"),
    **{f"import_failures_{r}": ("vllm:relaykv_import_failures_total", "reason", r) for r in IMPORT_FAILURE_REASONS},
}


class RelayKVPromMetrics(KVConnectorPromMetrics):
    """The worker's interval stats as vLLM-labelled counters in the frontend process."""

    def __init__(self, vllm_config: Any, metric_types: dict, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters: dict[str, Any] = {}
        for name, extra, _ in _STAT_SERIES.values():
            if name in self._counters:
                continue
            names = list(labelnames) + ([extra] if extra else [])
            try:
                self._counters[name] = self._counter_cls(name=name, documentation=f"relaykv connector: {name}",
                                                         labelnames=names)
            except ValueError:  # a second engine/LLM in this process registered it already
                self._counters[name] = _existing(name.removesuffix("_total"))

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = list(self.per_engine_labelvalues.get(engine_idx, []))
        for key, value in transfer_stats_data.items():
            series = _STAT_SERIES.get(key)
            if series is None or not value:
                continue
            name, _, extra_value = series
            counter = self._counters.get(name)
            if counter is not None:
                counter.labels(*labels, *([extra_value] if extra_value else [])).inc(value)


__all__ = ["IMPORT_FAILURE_REASONS", "ConnectorMetrics", "RelayKVConnectorStats", "RelayKVPromMetrics",
           "connector_metrics"]
