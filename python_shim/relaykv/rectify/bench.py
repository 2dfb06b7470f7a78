"""`relaykv profile` and `relaykv bench relay`: the profiler's command and the relay benchmark."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from relaykv.rectify import profiler
from relaykv.rectify.strategies import Strategy, from_profile

MEASURES = ("ttft_ms", "speedup", "reuse_rate", "recompute_ratio", "top1_agree", "kl", "greedy_match")


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 140)


def _instance(threads: int | None):
    from relaykv.cli import _load
    from relaykv.relay_chain import Instance

    loaded, executor = _load(threads)
    return Instance(executor, loaded.tokenizer)


def cmd_profile(args: argparse.Namespace) -> int:
    from relaykv.relay_chain import TASKS

    console = _console()
    with console.status("loading SmolLM2-135M-Instruct"):
        inst = _instance(args.threads)
    tasks = [t for _, t in TASKS[: args.tasks]]
    t0 = time.perf_counter()
    with console.status("calibration relays") as status:
        stats = profiler.calibrate(
            inst, tasks, max_new_tokens=args.max_new_tokens,
            progress=lambda i, n: status.update(f"calibration relay {i + 1}/{len(tasks)} ({n} span tokens)"))
    prof = profiler.build_profile("smollm2-135m-instruct", stats, threshold=args.threshold,
                                  tau_dev=args.tau_dev, tau_inf=args.tau_inf,
                                  suffix_tokens=args.suffix_tokens, scheme=args.scheme,
                                  det_min_corr=args.det_min_corr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(prof, indent=1) + "\n")
    plot = Path(args.plot or out.with_suffix(".png"))
    profiler.plot_profile(prof, plot)
    console.print(f"{stats['relays']} calibration relays, {stats['tokens']} span tokens, "
                  f"{time.perf_counter() - t0:.0f} s")
    console.print("layer  " + " ".join(f"{i:>5}" for i in range(len(stats["cos_k"]))))
    console.print("cos K  " + " ".join(f"{x:5.3f}" for x in stats["cos_k"]))
    console.print("cos V  " + " ".join(f"{x:5.3f}" for x in stats["cos_v"]))
    if prof["det_rank_corr"]:
        console.print("rank corr " + " ".join(f"{x:5.2f}" for x in prof["det_rank_corr"]))
    console.print(f"start_layer {prof['start_layer']}, det_layer {prof['det_layer']}, "
                  f"end_layer {prof['end_layer']} (threshold {args.threshold}); "
                  f"U-shaped: {prof['u_shaped']}")
    console.print(f"profile -> {out}, plot -> {plot}")
    return 0


def bench_strategies(profile: dict[str, Any], budgets: Sequence[float], epic_k: Sequence[int],
                     with_hidden: bool, relay_det: Sequence[int] = (),
                     with_restore: bool = False) -> list[Strategy]:
    """prefix, naive, cacheblend and relay at each budget, epic at each k, relay uncapped;
    with relay_det, the relay ones once per detection layer (labelled relay-det<l>); with
    with_restore, cacheblend and relay also with the imported KV put back in the detection
    layers (labelled -restore)."""
    keeps = (True, False) if with_restore else (True,)
    out = [Strategy("prefix"), Strategy("naive")]
    out += [Strategy("cacheblend", det_layer=1, ratio=b, keep_detection_kv=k) for k in keeps for b in budgets]
    out += [Strategy("epic", first_k=k) for k in epic_k]
    for keep in keeps:
        for det in relay_det or [None]:
            extra = {"keep_detection_kv": keep}
            if det is not None:
                extra.update(det_layer=det, variant=f"det{det}")
            out.append(from_profile(profile, scheme="layer0", **extra))
            out += [from_profile(profile, scheme="layer0", budget=b, **extra) for b in budgets]
    if with_hidden and profile["start_layer"] > 0:
        out.append(from_profile(profile, scheme="hidden"))
        out += [from_profile(profile, scheme="hidden", budget=b) for b in budgets]
    return out


def _flatten(task: int, kind: str, row: dict[str, Any], shape: str = "chain") -> list[dict[str, Any]]:
    """One JSON line per (task, agent, strategy), every measure by its design name."""
    lines = []
    for label, ms in row["ttft_ms"].items():
        line = {"bench": "relay", "shape": shape, "task": task, "kind": kind, "agent": row["agent"],
                "name": row["name"],
                "prompt_tokens": row["prompt_tokens"], "strategy": label, "ttft_ms": ms}
        if label == "full":
            line.update(speedup=1.0, reuse_rate=0.0, recompute_ratio=1.0, top1_agree=1.0, kl=0.0,
                        greedy_match=1.0)
        else:
            for key in MEASURES[1:] + ("imported_tokens", "recomputed_tokens", "prefix_tokens"):
                line[key] = row[key][label]
        lines.append(line)
    return lines


def summarise(lines: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, float]]:
    """Mean of every measure per (strategy, agent), plus agent -1 = over all agents > 0."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for line in lines:
        groups.setdefault((line["strategy"], line["agent"]), []).append(line)
        if line["agent"] > 0:
            groups.setdefault((line["strategy"], -1), []).append(line)
    return {key: {m: sum(r[m] for r in rows) / len(rows) for m in MEASURES + ("prompt_tokens",)}
            for key, rows in groups.items()}


def plot_bench(summary: dict[tuple[str, int], dict[str, float]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({s for s, _ in summary}, key=lambda s: (s != "full", s))
    agents = sorted({a for _, a in summary if a >= 0})
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / len(labels)
    for j, label in enumerate(labels):
        ys = [summary.get((label, a), {}).get("ttft_ms", float("nan")) for a in agents]
        ax.bar([a + j * width for a in agents], ys, width, label=label)
    ax.set_xlabel("agent")
    ax.set_ylabel("TTFT (ms)")
    ax.set_xticks([a + 0.4 - width / 2 for a in agents], [str(a + 1) for a in agents])
    ax.legend(fontsize=7, ncol=3)
    ax.set_title("TTFT per agent per strategy")
    fig.tight_layout()
    ttft = out_dir / "relay_ttft.png"
    fig.savefig(ttft, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    families: dict[str, list[str]] = {}
    for label in labels:
        if label != "full":
            families.setdefault(label.split("@")[0], []).append(label)
    for family, members in families.items():
        pts = sorted((summary[(m, -1)] for m in members if (m, -1) in summary), key=lambda r: r["speedup"])
        for ax, y in zip(axes, ("greedy_match", "top1_agree", "kl")):
            x = "recompute_ratio" if y == "kl" else "speedup"
            pts_x = sorted(pts, key=lambda r: r[x])
            ax.plot([p[x] for p in pts_x], [p[y] for p in pts_x], "o-", label=family)
            ax.set_xlabel(x)
            ax.set_ylabel(y)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("fidelity vs speedup / recompute ratio (mean over agents 2..N, each strategy at several budgets)")
    fig.tight_layout()
    fid = out_dir / "relay_fidelity.png"
    fig.savefig(fid, dpi=120)
    plt.close(fig)
    return [ttft, fid]


def cmd_bench_relay(args: argparse.Namespace) -> int:
    from rich.progress import Progress
    from rich.table import Table

    from relaykv.relay_chain import TASKS, run_chain, run_fully_connected, warm_up

    console = _console()
    with console.status("loading SmolLM2-135M-Instruct"):
        inst = _instance(args.threads)
        warm_up(inst)
    profile = profiler.load_profile(args.profile)
    budgets = [float(x) for x in args.budgets.split(",") if x]
    epic_k = [int(x) for x in args.epic_k.split(",") if x]
    relay_det = [int(x) for x in args.relay_det.split(",") if x]
    strategies = bench_strategies(profile, budgets, epic_k, args.hidden, relay_det, args.restore)
    if args.only:
        wanted = set(args.only.split(","))
        strategies = [s for s in strategies if s.label() in wanted or s.name in wanted]
    if any(s.scheme == "hidden" for s in strategies):
        inst.checkpoint_layers = [profile["start_layer"] - 1]
    console.print(f"profile {args.profile or profiler.DEFAULT_PROFILE}: layers [{profile['start_layer']}, "
                  f"{profile['end_layer']}], det {profile['det_layer']}; strategies: "
                  + ", ".join(s.label() for s in strategies))
    tasks = (TASKS * (1 + args.tasks // len(TASKS)))[: args.tasks]
    fully = args.shape == "fully-connected"
    max_new = args.max_new_tokens if args.max_new_tokens is not None else (512 if fully else 256)
    rows_per_task = args.agents * (2 if fully else 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines: list[dict[str, Any]] = []
    with open(out, "w") as f, Progress(console=console) as progress:
        bar = progress.add_task(args.shape, total=len(tasks) * rows_per_task)
        for t, (kind, task) in enumerate(tasks):
            def on_agent(row: dict[str, Any], t: int = t, kind: str = kind) -> None:
                for line in _flatten(t, kind, row, args.shape):
                    f.write(json.dumps(line) + "\n")
                    lines.append(line)
                f.flush()
                progress.advance(bar)
                progress.update(bar, description=f"task {t + 1}/{len(tasks)} {row['name']}")
            if fully:
                run_fully_connected(inst, task, num_agents=args.agents, prefix_tokens=args.prefix_tokens,
                                    input_tokens=args.input_tokens, max_new_tokens=max_new,
                                    strategies=strategies, repeats=args.repeats, on_agent=on_agent)
            else:
                run_chain(inst, task, num_agents=args.agents, max_new_tokens=max_new,
                          min_new_tokens=args.min_new_tokens,
                          strategies=strategies, repeats=args.repeats, on_agent=on_agent)
    summary = summarise(lines)
    what = "agent rows (round 1: 1..N, round 2: N+1..2N)" if fully else "agents"
    table = Table(title=f"relay benchmark, {args.shape}: {len(tasks)} tasks × {rows_per_task} {what} "
                        "(mean per row)")
    for col in ("strategy", "agent", "prompt tok", "ttft ms", "speedup", "reuse", "recompute", "top1",
                "KL", "greedy"):
        table.add_column(col, justify="right")
    for (label, agent), m in sorted(summary.items(), key=lambda kv: (kv[0][0] != "full", kv[0][0], kv[0][1])):
        table.add_row(label, "all>1" if agent < 0 else str(agent + 1), f"{m['prompt_tokens']:.0f}",
                      f"{m['ttft_ms']:.0f}", f"{m['speedup']:.2f}x", f"{m['reuse_rate']:.2f}",
                      f"{m['recompute_ratio']:.2f}", f"{m['top1_agree']:.2f}", f"{m['kl']:.3f}",
                      f"{m['greedy_match']:.2f}")
    console.print(table)
    plots = plot_bench(summary, out.parent)
    console.print(f"rows -> {out}; plots -> " + ", ".join(map(str, plots)))
    return 0


def add_bench_parser(sub: Any) -> None:
    bench = sub.add_parser("bench", help="benchmarks")
    which = bench.add_subparsers(dest="bench", required=True)
    relay = which.add_parser("relay", help="relay chain: every strategy vs full prefill, per agent")
    relay.add_argument("--tasks", type=int, default=20)
    relay.add_argument("--agents", type=int, default=5)
    relay.add_argument("--shape", choices=("chain", "fully-connected"), default="chain",
                       help="chain: each agent reads the answers before it; fully-connected: every agent reads "
                            "a shared input behind its own long prefix, answers, then answers again after "
                            "reading every other agent's answer")
    relay.add_argument("--max-new-tokens", type=int, default=None, help="default 256 (chain), 512 (fully-connected)")
    relay.add_argument("--min-new-tokens", type=int, default=0,
                       help="chain: no EOS before this many tokens per answer (vLLM's min_tokens), "
                            "for prompts nearer the workload's ~1K tokens at the last agent")
    relay.add_argument("--prefix-tokens", type=int, default=512, help="fully-connected: each agent's prefix")
    relay.add_argument("--input-tokens", type=int, default=1024, help="fully-connected: the shared input")
    relay.add_argument("--budgets", default="0.15,0.3", help="cacheblend ratios and relay budget caps")
    relay.add_argument("--epic-k", default="16,32")
    relay.add_argument("--hidden", action=argparse.BooleanOptionalAction, default=True,
                       help="also run relay from exporter-saved hidden-state checkpoints")
    relay.add_argument("--repeats", type=int, default=2, help="TTFT = fastest of this many runs")
    relay.add_argument("--only", default="",
                       help="comma-separated labels or families to run (e.g. naive,relay-hidden@0.15)")
    relay.add_argument("--profile", default=None)
    relay.add_argument("--relay-det", default="",
                       help="comma-separated detection layers: relay once per layer (default: the profile's)")
    relay.add_argument("--restore", action="store_true",
                       help="also run cacheblend and relay with the imported KV put back in the layers "
                            "the detection pass computed (labelled -restore)")
    relay.add_argument("--out", default="results/bench/relay.jsonl")
    relay.add_argument("--threads", type=int, default=None)
    relay.set_defaults(func=cmd_bench_relay)
