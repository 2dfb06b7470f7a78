"""Where the connector's KvRelay comes from: the one seam a remote store plugs into.

With ``directory: "embedded"`` (the default) records live in an in-process
core.KvRelay. Connectors of one process with the same identity (model
fingerprint, KV layout, RoPE, tenant) and store options share one relay through
a registry, because vLLM builds the scheduler-side and the worker-side
connector separately: with one worker in the engine-core process (vLLM's
UniProcExecutor, the default for one device) both sides then see the same
records, and a test can export through one connector and import through another.

With ``directory: "redis://host:port/db"`` records live on the store servers
(`relaykv-store`) announced in that Redis: exports go to a live server over
UCX, imports read from whichever server holds the record, and the span index
follows the directory, so agents on other vLLM instances find each other's
records. The deployment token comes from ``token_file`` (or RELAYKV_TOKEN).
Servers are always found through the directory; a fixed ``store`` address is
refused with a message saying so.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from relaykv import _relaykv as core

EMBEDDED = "embedded"

_lock = threading.Lock()
_relays: dict[tuple[Any, ...], core.KvRelay] = {}


class StoreUnavailableError(RuntimeError):
    """The configured store or directory cannot be used by this build."""


def _key(fingerprint: int, layout: core.KvLayout, rope: core.RopeParams, tenant: str, capacity: int,
         min_span_tokens: int) -> tuple[Any, ...]:
    return (fingerprint, layout.fingerprint, rope.fingerprint, tenant, capacity, min_span_tokens)


def _read_token(token_file: str | None) -> str:
    if token_file:
        with open(token_file, encoding="utf-8") as f:
            token = f.read().strip()
        if not token:
            raise StoreUnavailableError(f"relaykv: kv_connector_extra_config['token_file']: {token_file!r} is empty")
        return token
    return os.environ.get("RELAYKV_TOKEN", "")


def open_relay(*, fingerprint: int, layout: core.KvLayout, rope: core.RopeParams, tenant: str,
               capacity_bytes: int, min_span_tokens: int, directory: str = EMBEDDED,
               store: str | None = None, token_file: str | None = None,
               ucx_tls: str | None = None, inline_bytes: int | None = None) -> core.KvRelay:
    """The KvRelay for this identity and store configuration (shared per process)."""
    if store is not None:
        raise StoreUnavailableError(
            f"relaykv: kv_connector_extra_config['store']={store!r}: store servers are found through the "
            f"directory; set 'directory' to the Redis URL they announce themselves in and drop 'store'")
    if directory != EMBEDDED and not hasattr(core.KvRelay, "distributed"):
        raise StoreUnavailableError(
            f"relaykv: kv_connector_extra_config['directory']={directory!r}: this build has no store "
            f"client (built without UCX); use directory={EMBEDDED!r}")
    key = _key(fingerprint, layout, rope, tenant, capacity_bytes, min_span_tokens) + (directory, ucx_tls, inline_bytes)
    with _lock:
        relay = _relays.get(key)
        if relay is None:
            if directory == EMBEDDED:
                relay = core.KvRelay(fingerprint, layout, rope, tenant, capacity_bytes, min_span_tokens)
            else:
                relay = core.KvRelay.distributed(fingerprint, layout, rope, tenant, directory=directory,
                                                 token=_read_token(token_file), ucx_tls=ucx_tls or "",
                                                 min_span_tokens=min_span_tokens,
                                                 inline_bytes=-1 if inline_bytes is None else inline_bytes)
            _relays[key] = relay
        return relay


def forget_relays() -> None:
    """Drops every embedded relay of this process (tests; a fresh engine in the same process)."""
    with _lock:
        _relays.clear()


__all__ = ["EMBEDDED", "StoreUnavailableError", "forget_relays", "open_relay"]
