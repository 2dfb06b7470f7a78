"""relaykv across processes on one machine: a Redis directory, a store server and
instance processes, each a real process talking over loopback (UCX for record bytes).

`relaykv demo --distributed` runs the relay chain this way: agents alternate between
two instance processes, every output is exported to the store server, and the next
agent's instance finds it through the directory and imports it over UCX. Multi-host
deployments use the same pieces (see deploy/).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_PKG = Path(__file__).resolve().parent


def store_binary() -> Path:
    """The relaykv-store executable: $RELAYKV_STORE_BINARY, the installed package's
    copy, a source checkout's build, or PATH."""
    candidates = []
    if os.environ.get("RELAYKV_STORE_BINARY"):
        candidates.append(Path(os.environ["RELAYKV_STORE_BINARY"]))
    candidates += [_PKG / "bin" / "relaykv-store",
                   _PKG.parent.parent / "build" / "transfer" / "server" / "relaykv-store"]
    which = shutil.which("relaykv-store")
    if which:
        candidates.append(Path(which))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise FileNotFoundError("relaykv-store not found (looked at: " +
                            ", ".join(str(c) for c in candidates) +
                            "); build it with `make build` or set RELAYKV_STORE_BINARY")


def redis_binary() -> str:
    path = os.environ.get("RELAYKV_REDIS_SERVER") or shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.access(path, os.X_OK):
        raise FileNotFoundError("redis-server not found: install the redis-server package "
                                "(make setup does) or set RELAYKV_REDIS_SERVER")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class LineReader:
    """A child's stdout read on a thread, so every wait for a line is bounded and a
    child that exits early is reported with its last lines."""

    def __init__(self, stream: Any):
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, prefix: str, timeout: float) -> str:
        """The next line starting with `prefix`."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no line starting with {prefix!r} within {timeout} s; "
                                   f"last lines: {self.seen[-10:]}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"the process exited before printing {prefix!r}; "
                                   f"last lines: {self.seen[-10:]}")
            self.seen.append(line)
            if line.startswith(prefix):
                return line

    def wait_for_text(self, text: str, timeout: float) -> str:
        """The next line containing `text` anywhere (log lines carry a prefix)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.wait_for("", max(0.001, deadline - time.monotonic()))
            except TimeoutError:
                raise TimeoutError(f"no line with {text!r} within {timeout} s; "
                                   f"last lines: {self.seen[-10:]}") from None
            if text in line:
                return line


class Cluster:
    """A private Redis and one store server on loopback, torn down on exit."""

    def __init__(self, *, capacity: str = "1GiB", ucx_tls: str = "tcp", heartbeat_ms: int = 500):
        self.capacity = capacity
        self.ucx_tls = ucx_tls
        self.heartbeat_ms = heartbeat_ms
        self.token = secrets.token_hex(16)
        self.redis: subprocess.Popen | None = None
        self.store: subprocess.Popen | None = None
        self.store_info: dict[str, str] = {}
        self.redis_port = 0

    @property
    def directory(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def __enter__(self) -> "Cluster":
        try:
            self.start_redis()
            self.start_store()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start_redis(self) -> None:
        self.redis_port = self.redis_port or free_port()
        self.redis = subprocess.Popen(
            [redis_binary(), "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not _redis_pings(self.redis_port):
            if self.redis.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.redis_port}")
            time.sleep(0.02)

    def start_store(self) -> None:
        env = dict(os.environ, RELAYKV_TOKEN=self.token)
        self.store = subprocess.Popen(
            [str(store_binary()), "--name", "demo-store", "--listen", "127.0.0.1:0",
             "--metrics-listen", "127.0.0.1:0", "--capacity", self.capacity, "--directory",
             self.directory, "--heartbeat-ms", str(self.heartbeat_ms), "--ucx-tls", self.ucx_tls],
            stdout=subprocess.PIPE, text=True, env=env)
        line = LineReader(self.store.stdout).wait_for("relaykv-store ready", 30)
        self.store_info = dict(re.findall(r"(\w+)=(\S+)", line))

    def stop_store(self, *, kill: bool = False) -> None:
        if self.store and self.store.poll() is None:
            (self.store.kill if kill else self.store.terminate)()
            self.store.wait(timeout=10)

    def close(self) -> None:
        self.stop_store()
        if self.redis and self.redis.poll() is None:
            self.redis.kill()
            self.redis.wait(timeout=10)


# -- instance processes -----------------------------------------------------------------------

def _instance_main(conn: Any, index: int, directory: str, token: str, ucx_tls: str,
                   threads: int) -> None:
    try:
        import torch

        torch.set_num_threads(threads)
        from relaykv.model.executor import Executor
        from relaykv.model.loader import load_smollm2
        from relaykv.relay_chain import Instance, run_agent, warm_up

        loaded = load_smollm2()
        inst = Instance(Executor.from_hf(loaded.model), loaded.tokenizer, directory=directory,
                        token=token, ucx_tls=ucx_tls, seed=index)
        warm_up(inst)
        conn.send(("ready", os.getpid()))
    except Exception:  # noqa: BLE001 - reported to the driver, which fails with it
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        msg = conn.recv()
        try:
            if msg[0] == "agent":
                _, task, i, earlier, strategies, max_new_tokens, repeats = msg
                row = run_agent(inst, task, i, earlier, strategies=strategies,
                                max_new_tokens=max_new_tokens, repeats=repeats)
                row["instance"] = index
                conn.send(("row", row))
            elif msg[0] == "metrics":
                conn.send(("metrics", inst.relay.metrics()))
            else:
                conn.send(("bye", None))
                return
        except Exception:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))


class InstanceProcess:
    """One reference instance in its own process, driven over a pipe."""

    def __init__(self, index: int, cluster: Cluster, threads: int = 1):
        ctx = mp.get_context("spawn")  # a fresh interpreter: no forked torch or UCX state
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_instance_main, daemon=True,
                                args=(child, index, cluster.directory, cluster.token,
                                      cluster.ucx_tls, threads))
        self.proc.start()
        self.index = index

    def _reply(self, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"instance {self.index} did not answer within {timeout} s")
        kind, value = self.conn.recv()
        if kind == "error":
            raise RuntimeError(f"instance {self.index} failed:\n{value}")
        return value

    def wait_ready(self, timeout: float = 300) -> int:
        return self._reply(timeout)

    def run_agent(self, task: str, i: int, earlier: Sequence[tuple[str, str]], strategies: Sequence[Any],
                  max_new_tokens: int, repeats: int = 1, timeout: float = 600) -> dict:
        self.conn.send(("agent", task, i, list(earlier), list(strategies), max_new_tokens, repeats))
        return self._reply(timeout)

    def metrics(self) -> dict:
        self.conn.send(("metrics",))
        return self._reply(60)

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("stop",))
                self.proc.join(10)
            except (BrokenPipeError, OSError):
                pass
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


def run_distributed_chain(cluster: Cluster, tasks: Sequence[str], *, num_agents: int,
                          max_new_tokens: int, strategies: Sequence[Any], num_instances: int = 2,
                          threads: int = 1, repeats: int = 1,
                          on_agent: Callable[[dict], None] | None = None) -> tuple[list[dict], list[dict]]:
    """Runs each task's chain with agent i on instance i % num_instances; returns the rows
    (row["task"] is the task's index) and each instance's relay metrics."""
    from relaykv.relay_chain import AGENTS

    instances = [InstanceProcess(k, cluster, threads) for k in range(num_instances)]
    try:
        for inst in instances:
            inst.wait_ready()
        rows = []
        for t, task in enumerate(tasks):
            earlier: list[tuple[str, str]] = []
            for i in range(min(num_agents, len(AGENTS))):
                row = instances[i % num_instances].run_agent(task, i, earlier, strategies,
                                                             max_new_tokens, repeats)
                row["task"] = t
                earlier.append((row["name"], row["output"]))
                rows.append(row)
                if on_agent:
                    on_agent(row)
        return rows, [inst.metrics() for inst in instances]
    finally:
        for inst in instances:
            inst.close()
