"""relaykv across hosts, emulated with network namespaces on one machine.

Redis, a store server and two instance processes each live in their own network
namespace, joined through a bridge in a hub namespace on a private /24:

    rkv-<pid>-hub    bridge br0 (no address); one veth per namespace below
    rkv-<pid>-redis  eth0 10.231.X.1   redis-server
    rkv-<pid>-store  eth0 10.231.X.2   relaykv-store (a second one comes back on :7601)
    rkv-<pid>-a      eth0 10.231.X.3   instance A (exports)
    rkv-<pid>-b      eth0 10.231.X.4   instance B (imports)

Nothing is reachable across namespaces except through eth0, so every record byte
crosses a veth over UCX tcp (checked with eth0's byte counters). UCX runs with its
defaults apart from the tcp transport that --ucx-tls and ucx_tls= select: it needs
no UCX_NET_DEVICES here (it also passes with UCX_NET_DEVICES=eth0), so the caller's
UCX_NET_DEVICES / UCX_TLS are not passed on. Both instances build the same tiny
random Llama (same seed, so the model fingerprint matches) and are driven over a JSON
line protocol on stdin/stdout of a worker script run with `ip netns exec`.

The scenario: A exports the KV of a prefilled token sequence; B imports it through
the directory and store for prompts containing it and its output matches a full
prefill; the store server is killed (-9) and B's next import fails, is counted and
the tokens are recomputed (output equal to full prefill); a new store server comes
up, A exports again and B imports again.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relaykv.distributed import LineReader

pytestmark = [pytest.mark.netns, pytest.mark.ucx, pytest.mark.redis, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SHIM = REPO / "python_shim"
ROLES = ("redis", "store", "a", "b")
HOST = {"redis": 1, "store": 2, "a": 3, "b": 4}
REDIS_PORT = 6379
STEPS = 8  # greedy tokens compared after each prompt
# Exact KV imported at its own positions (same prefix as the exporter): the strategy's
# forward differs from a one-shot prefill only in summation order (test_rectify uses the
# same bound for the same comparison on the same model).
LOGIT_ATOL = 1e-4


# -- skip conditions, checked before anything is created --------------------------------------

def _skip_reason() -> str | None:
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (euid is %d)" % os.geteuid()
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (package {package})"
    r = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        return f"cannot create a network namespace: `unshare -n true` failed: {r.stderr.strip()}"
    from relaykv.distributed import redis_binary, store_binary
    try:
        redis_binary()
        store_binary()
    except FileNotFoundError as e:
        return str(e)
    probe = f"rkv-{os.getpid()}-probe"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


# -- topology ----------------------------------------------------------------------------------

def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {r.stderr.strip()}")


class Topology:
    """The namespaces, the bridge and the veths; close() deletes every namespace (the veths
    go with them)."""

    def __init__(self) -> None:
        self.prefix = f"rkv-{os.getpid()}"
        self.subnet = f"10.231.{random.randint(1, 254)}"
        self.created: list[str] = []

    def ns(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def addr(self, role: str) -> str:
        return f"{self.subnet}.{HOST[role]}"

    def build(self) -> None:
        hub = self.ns("hub")
        for name in [hub] + [self.ns(r) for r in ROLES]:
            _ip("netns", "add", name)
            self.created.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        for role in ROLES:
            # Created directly in the namespaces: no name ever lands in the root namespace.
            _ip("-n", hub, "link", "add", f"v-{role}", "type", "veth", "peer", "name", "eth0",
                "netns", self.ns(role))
            _ip("-n", hub, "link", "set", f"v-{role}", "master", "br0")
            _ip("-n", hub, "link", "set", f"v-{role}", "up")
            _ip("-n", self.ns(role), "addr", "add", f"{self.addr(role)}/24", "dev", "eth0")
            _ip("-n", self.ns(role), "link", "set", "eth0", "up")

    def close(self) -> None:
        for name in reversed(self.created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)
        self.created.clear()


# -- processes ---------------------------------------------------------------------------------

class Procs:
    """Every child started in a namespace; kill_all() ends them (teardown)."""

    def __init__(self, topo: Topology, tmp: Path) -> None:
        self.topo, self.tmp = topo, tmp
        self.children: list[subprocess.Popen] = []
        self.logs: list = []
        inherited = {k: v for k, v in os.environ.items() if k not in ("UCX_NET_DEVICES", "UCX_TLS")}
        self.env = dict(inherited,
                        PYTHONPATH=str(SHIM) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")

    def start(self, role: str, argv: list[str], log: str, env: dict | None = None,
              stdin: bool = False) -> tuple[subprocess.Popen, _Lines]:
        self.logs.append(open(self.tmp / log, "w"))
        p = subprocess.Popen(["ip", "netns", "exec", self.topo.ns(role), *argv],
                             stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=self.logs[-1],
                             text=True, env={**self.env, **(env or {})})
        self.children.append(p)
        return p, LineReader(p.stdout)

    def kill_all(self) -> None:
        for p in self.children:
            if p.poll() is None:
                p.kill()
        for p in self.children:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for f in self.logs:
            f.close()


class Worker:
    """One instance process, driven over JSON lines."""

    def __init__(self, procs: Procs, role: str, script: Path) -> None:
        self.role = role
        self.proc, self.lines = procs.start(role, [sys.executable, str(script)], f"worker-{role}.log",
                                            stdin=True)
        self.log = procs.tmp / f"worker-{role}.log"

    def send(self, **msg) -> None:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def reply(self, timeout: float = 60) -> dict:
        try:
            line = self.lines.wait_for("@@", timeout)
        except (TimeoutError, RuntimeError) as e:
            raise RuntimeError(f"instance {self.role}: {e}\nstderr:\n{self.log.read_text()[-3000:]}")
        out = json.loads(line[2:])
        if out.get("crash"):
            raise RuntimeError(f"instance {self.role} failed:\n{out['crash']}")
        return out

    def call(self, timeout: float = 60, **msg) -> dict:
        self.send(**msg)
        return self.reply(timeout)


WORKER = r'''
import json, sys, traceback, types
import torch
torch.set_num_threads(1)
from relaykv import core
from relaykv.model.executor import Executor
from relaykv.model.tiny import tiny_model
from relaykv.rectify import Strategy, prefill
from relaykv.relay_chain import Instance, kl_divergence

inst = None

def out(obj):
    print("@@" + json.dumps(obj, default=str), flush=True)

def handle(msg):
    global inst
    cmd = msg["cmd"]
    if cmd == "init":
        torch.manual_seed(0)
        executor = Executor.from_hf(tiny_model("llama", seed=3))
        inst = Instance(executor, types.SimpleNamespace(eos_token_id=None), block_size=8,
                        directory=msg["directory"], token=msg["token"], ucx_tls="tcp")
        return {"vocab": executor.config.vocab_size}
    if cmd == "export":
        prefix, body = msg["prefix"], msg["body"]
        seq = inst.new_sequence(len(prefix) + len(body))
        inst.prefill(seq, prefix + body, 0)
        return {"export": dict(inst.export(seq, body, len(prefix)))}
    if cmd == "lookup":
        return {"spans": [[s.record_id, s.src_offset, s.dst_offset, s.length]
                          for s in inst.relay.lookup(msg["ids"])]}
    if cmd == "compare":
        ids = msg["ids"]
        full = prefill(inst, ids, Strategy("full"))
        res = prefill(inst, ids, Strategy(**msg["strategy"]))
        ref = inst.decode(full.seq, full.logits, len(ids), msg["steps"], stop_at_eos=False)
        got = inst.decode(res.seq, res.logits, len(ids), msg["steps"], stop_at_eos=False)
        return {"imported_tokens": res.info.get("imported_tokens", 0),
                "spans": res.info.get("spans", 0),
                "max_abs_diff": float((res.logits - full.logits).abs().max()),
                "equal": bool(torch.equal(res.logits, full.logits)),
                "kl": kl_divergence(full.logits, res.logits),
                "full_tokens": ref, "tokens": got}
    if cmd == "metrics":
        return {"metrics": inst.relay.metrics()}
    raise ValueError(cmd)

for line in sys.stdin:
    msg = json.loads(line)
    if msg["cmd"] == "quit":
        break
    try:
        out({"ok": True, **handle(msg)})
    except core.RelayKVError as e:
        out({"ok": False, "error": type(e).__name__, "message": str(e)})
    except Exception:
        out({"crash": traceback.format_exc()})
'''


def _rx_bytes(topo: Topology, role: str) -> int:
    r = subprocess.run(["ip", "-n", topo.ns(role), "-j", "-s", "link", "show", "eth0"],
                       capture_output=True, text=True, timeout=10, check=True)
    return int(json.loads(r.stdout)[0]["stats64"]["rx"]["bytes"])


def _tokens(seed: int, n: int, vocab: int = 256) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def _failures(m: dict) -> int:
    return sum(int(v) for v in m["import_failures"].values())


@pytest.fixture()
def net(tmp_path):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    topo = Topology()
    procs = Procs(topo, tmp_path)
    try:
        topo.build()
        yield topo, procs
    finally:
        procs.kill_all()
        topo.close()


def _start_store(topo: Topology, procs: Procs, token: str, directory: str, port: int) -> subprocess.Popen:
    from relaykv.distributed import store_binary

    ip = topo.addr("store")
    p, lines = procs.start("store", [
        str(store_binary()), "--name", "mh-store", "--listen", f"{ip}:{port}",
        "--advertise", f"{ip}:{port}", "--metrics-listen", f"{ip}:{port + 2000}",
        "--directory", directory, "--heartbeat-ms", "200", "--capacity", "64MiB",
        "--ucx-tls", "tcp"], f"store-{port}.log", env={"RELAYKV_TOKEN": token})
    lines.wait_for("relaykv-store ready", 30)
    return p


def test_relay_across_network_namespaces_survives_store_death(net, tmp_path):
    from relaykv.distributed import redis_binary

    topo, procs = net
    token = os.urandom(16).hex()
    redis_ip = topo.addr("redis")
    directory = f"redis://{redis_ip}:{REDIS_PORT}/0"

    # The instances start importing torch while the servers come up.
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    a = Worker(procs, "a", script)
    b = Worker(procs, "b", script)

    _, redis_out = procs.start("redis", [
        redis_binary(), "--port", str(REDIS_PORT), "--bind", redis_ip, "--save", "",
        "--appendonly", "no", "--protected-mode", "no"], "redis.log")
    redis_out.wait_for_text("Ready to accept connections", 15)
    store = _start_store(topo, procs, token, directory, 7600)

    a.send(cmd="init", directory=directory, token=token)
    b.send(cmd="init", directory=directory, token=token)
    assert a.reply(90)["ok"] and b.reply(90)["ok"]

    # 1. A exports body behind prefix_a; B's prompt has the same prefix: the imported KV
    #    is exact, so B's output with the import equals a full prefill.
    prefix_a, body = _tokens(1, 13), _tokens(2, 48)
    exp = a.call(cmd="export", prefix=prefix_a, body=body)
    assert exp["ok"], exp
    assert exp["export"]["bytes"] > 0
    naive = {"name": "naive", "use_prefix_cache": False}
    ids = prefix_a + body + _tokens(3, 9)
    rx = _rx_bytes(topo, "b")
    r = b.call(cmd="compare", ids=ids, strategy=naive, steps=STEPS)
    assert r["ok"], r
    assert r["imported_tokens"] == len(body), r
    assert r["max_abs_diff"] < LOGIT_ATOL, r
    assert r["tokens"] == r["full_tokens"], r
    m = b.call(cmd="metrics")["metrics"]
    assert m["imports"] >= 1 and m["import_bytes"] > 0 and _failures(m) == 0, m
    # The record's bytes reached B through its veth (its only way out of its namespace).
    assert _rx_bytes(topo, "b") - rx >= m["import_bytes"], (rx, _rx_bytes(topo, "b"), m)

    # 2. Behind another prefix (K re-rotated by the offset): relay recomputing every span
    #    token over every layer reproduces full prefill; the import itself must succeed.
    everything = {"name": "relay", "start_layer": 0, "det_layer": 0, "end_layer": -1,
                  "tau_dev": -1.0, "suffix_tokens": 10**6, "use_prefix_cache": False}
    ids = _tokens(4, 21) + body + _tokens(5, 7)
    r = b.call(cmd="compare", ids=ids, strategy=everything, steps=STEPS)
    assert r["ok"] and r["imported_tokens"] == len(body), r
    assert r["max_abs_diff"] < LOGIT_ATOL and r["tokens"] == r["full_tokens"], r
    m = b.call(cmd="metrics")["metrics"]
    assert m["imports"] >= 2 and _failures(m) == 0, m

    # 3. The store server dies without a goodbye. B's next prompt still finds the span in its
    #    index, the import fails, is counted, and the tokens are recomputed: exactly full.
    store.send_signal(signal.SIGKILL)
    store.wait(timeout=10)
    ids = _tokens(6, 17) + body + _tokens(7, 5)
    spans = b.call(cmd="lookup", ids=ids)["spans"]
    assert len(spans) == 1 and spans[0][3] == len(body), spans
    before = _failures(m)
    r = b.call(cmd="compare", ids=ids, strategy=naive, steps=STEPS)
    assert r["ok"], r
    assert r["imported_tokens"] == 0 and r["spans"] == 0, r
    assert r["equal"], r  # nothing imported: the same computation as a full prefill
    assert r["tokens"] == r["full_tokens"], r
    m = b.call(cmd="metrics")["metrics"]
    f = m["import_failures"]
    assert _failures(m) == before + 1, f
    # Holder gone from the directory (not_found) or its address refusing (unavailable).
    assert f["not_found"] + f["unavailable"] == before + 1, f

    # 4. A new store server (empty) comes up: A exports again, B imports again.
    _start_store(topo, procs, token, directory, 7601)
    prefix2, body2 = _tokens(8, 11), _tokens(9, 40)
    deadline = time.monotonic() + 15
    while True:
        exp = a.call(cmd="export", prefix=prefix2, body=body2)
        if exp["ok"]:
            break
        assert exp["error"] in ("UnavailableError", "NotFoundError", "DeadlineExceededError"), exp
        assert time.monotonic() < deadline, f"export after the store came back kept failing: {exp}"
        time.sleep(0.1)
    imports_before = m["imports"]
    ids = prefix2 + body2 + _tokens(10, 6)
    r = b.call(cmd="compare", ids=ids, strategy=naive, steps=STEPS)
    assert r["ok"] and r["imported_tokens"] == len(body2), r
    assert r["max_abs_diff"] < LOGIT_ATOL and r["tokens"] == r["full_tokens"], r
    m = b.call(cmd="metrics")["metrics"]
    assert m["imports"] == imports_before + 1 and _failures(m) == before + 1, m

    for w in (a, b):
        w.send(cmd="quit")
