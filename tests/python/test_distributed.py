"""Records crossing processes: a real redis-server directory, a real relaykv-store
process, and an exporter in another Python process; bytes over UCX (tcp)."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

import relaykv
from relaykv import core
from relaykv.distributed import Cluster

pytestmark = [pytest.mark.ucx, pytest.mark.redis]

L, H, D, BS, NB = 4, 2, 16, 8, 16
FINGERPRINT = 0xFEED


def _relay(cluster_or_dir, token: str, tenant: str = "t", inline_bytes: int = -1) -> core.KvRelay:
    layout = core.KvLayout(L, H, D, "float32")
    directory = cluster_or_dir.directory if isinstance(cluster_or_dir, Cluster) else cluster_or_dir
    return core.KvRelay.distributed(FINGERPRINT, layout, relaykv.RopeParams(theta=10000.0), tenant,
                                    directory=directory, token=token, ucx_tls="tcp",
                                    timeout_ms=3000, index_sync_ms=0, inline_bytes=inline_bytes)


def _cache(seed: int):
    g = torch.Generator().manual_seed(seed)
    layers = [torch.randn(2, NB, BS, H, D, generator=g) for _ in range(L)]
    return layers, core.PagedCache([x[0] for x in layers], [x[1] for x in layers])


def _exporter(directory: str, token: str, tokens: list[int], conn, inline_bytes: int) -> None:
    # Another instance process: exports its decoding cache for `tokens` at positions 0...
    layers, cache = _cache(seed=1)
    relay = _relay(directory, token, inline_bytes=inline_bytes)
    res = relay.export(cache, list(range(NB)), tokens, 0)
    conn.send(res)


@pytest.fixture(scope="module")
def cluster():
    try:
        with Cluster(capacity="64MiB", heartbeat_ms=200) as c:
            yield c
    except FileNotFoundError as e:  # no redis-server or relaykv-store on this machine
        pytest.skip(str(e))


def _export_in_child(cluster: Cluster, tokens: list[int], inline_bytes: int = -1) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_exporter, args=(cluster.directory, cluster.token, tokens, child, inline_bytes))
    p.start()
    assert parent.poll(120), "exporter process did not answer"
    res = parent.recv()
    p.join(30)
    assert p.exitcode == 0
    return res


# The ~41 KB record rides inside the store's control messages by default
# (inline_bytes -1: 64 KiB); 0 sends it one-sided. Each way exports in one
# process and imports in another, and each pairing must give the same bytes.
@pytest.mark.parametrize(("export_inline", "import_inline"), [(-1, -1), (0, 0), (-1, 0), (0, -1)])
def test_import_what_another_process_exported(cluster, export_inline, import_inline):
    base = 500 + 1000 * (2 * (export_inline == 0) + (import_inline == 0))
    tokens = list(range(base, base + 40))
    exported = _export_in_child(cluster, tokens, export_inline)
    assert exported["bytes"] > 0 and not exported["deduplicated"]

    relay = _relay(cluster, cluster.token, inline_bytes=import_inline)
    prompt = list(range(10, 30)) + tokens + [7, 8, 9]  # behind another prefix
    spans = relay.lookup(prompt)
    assert [(s.dst_offset, s.length) for s in spans] == [(20, 40)]
    dst_layers, dst = _cache(seed=2)
    table = list(reversed(range(NB)))
    res = relay.import_span(spans[0], prompt, dst, table)
    assert res["tokens"] == 40 and res["position_delta"] == 20

    src_layers, _ = _cache(seed=1)
    pos_src = torch.arange(0, 40)
    pos_dst = torch.arange(20, 60)
    t = torch.as_tensor(table)
    for l in range(L):
        v_src = src_layers[l][1][pos_src // BS, pos_src % BS]
        v_dst = dst_layers[l][1][t[pos_dst // BS], pos_dst % BS]
        assert torch.equal(v_src, v_dst), f"layer {l}: V bytes differ after the round trip"
        # K is re-rotated by +20: norms per rotation pair are preserved, values are not equal.
        k_src = src_layers[l][0][pos_src // BS, pos_src % BS]
        k_dst = dst_layers[l][0][t[pos_dst // BS], pos_dst % BS]
        assert torch.allclose(k_src.norm(dim=-1), k_dst.norm(dim=-1), atol=1e-4)
        assert not torch.allclose(k_src, k_dst)
    m = relay.metrics()
    assert m["imports"] == 1 and m["index_syncs"] >= 1


def test_inline_limit_beyond_the_protocol_cap_fails_the_export(cluster):
    layers, cache = _cache(seed=6)
    relay = _relay(cluster, cluster.token, inline_bytes=(4 << 20) + 1)
    with pytest.raises(core.InvalidArgumentError, match="inline_bytes"):
        relay.export(cache, list(range(NB)), list(range(3000, 3040)), 0)


def test_other_tenants_never_see_the_record(cluster):
    tokens = list(range(900, 950))
    _export_in_child(cluster, tokens)
    other = _relay(cluster, cluster.token, tenant="someone-else")
    assert other.lookup([1, 2, 3] + tokens) == []


def test_bad_token_fails_the_export_and_counts_it(cluster):
    layers, cache = _cache(seed=3)
    relay = _relay(cluster, "not-the-token")
    with pytest.raises(core.PermissionDeniedError):
        relay.export(cache, list(range(NB)), list(range(1200, 1240)), 0)
    assert relay.metrics()["export_failures"] == 1


def test_store_death_falls_back_and_a_new_store_recovers(cluster):
    layers, cache = _cache(seed=4)
    relay = _relay(cluster, cluster.token)
    tokens = list(range(2000, 2050))
    relay.export(cache, list(range(NB)), tokens, 0)
    prompt = [1] * 5 + tokens
    spans = relay.lookup(prompt)
    assert len(spans) == 1
    cluster.stop_store(kill=True)  # no goodbye: the directory forgets it after 3 heartbeats
    _, dst = _cache(seed=5)
    with pytest.raises((core.NotFoundError, core.UnavailableError, core.DeadlineExceededError)):
        relay.import_span(spans[0], prompt, dst, list(range(NB)))
    failures = relay.metrics()["import_failures"]
    assert failures["not_found"] + failures["unavailable"] == 1, failures
    # Once the directory has forgotten the dead server (3 heartbeats), the record is
    # NotFound and leaves the span index: later prompts stop claiming it.
    deadline = time.monotonic() + 5
    while relay.lookup(prompt) and time.monotonic() < deadline:
        try:
            relay.import_span(spans[0], prompt, dst, list(range(NB)))
        except (core.NotFoundError, core.UnavailableError, core.DeadlineExceededError):
            pass
        time.sleep(0.2)
    assert relay.lookup(prompt) == []
    assert relay.metrics()["import_failures"]["not_found"] >= 1
    # A store server comes back (empty): exports and imports work again.
    cluster.start_store()
    deadline = time.monotonic() + 10
    while True:
        try:
            relay.export(cache, list(range(NB)), list(range(3000, 3050)), 0)
            break
        except (core.UnavailableError, core.NotFoundError, core.DeadlineExceededError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    spans = relay.lookup([4, 4] + list(range(3000, 3050)))
    assert len(spans) == 1
    relay.import_span(spans[0], [4, 4] + list(range(3000, 3050)), dst, list(range(NB)))
