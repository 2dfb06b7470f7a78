"""Executor vs transformers on the same weights and thread count: prefill and decode.

Prints one JSON object per line (and appends them to --out when given):
  {"bench": "executor", "engine": "relaykv"|"transformers", "phase": "prefill", "tokens": 512,
   "ms": ..., "ms_min": ..., "tokens_per_s": ..., "threads": 2, "model": "SmolLM2-135M-Instruct"}
  {"bench": "executor", "engine": ..., "phase": "decode", "context": 512, "steps": 32,
   "ms_per_token": ..., "ms_per_token_min": ..., "tokens_per_s": ...}
  {"bench": "executor", "phase": ..., "speedup": ..., "speedup_median": ...}
After one warm-up run each, the two engines run alternately --repeats times, so
load from other processes falls on both alike. "ms" is the median, "ms_min" the
fastest run; tokens_per_s and "speedup" (relaykv tokens/s over transformers
tokens/s) use the fastest run, the better estimate of each engine's own cost on
a shared machine; "speedup_median" uses the medians.

  .venv/bin/python tests/bench/executor/bench_executor.py [--lengths 512 1024 2048] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def alternate(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Runs each fn once to warm up, then all of them in turn `repeats` times; ms per run.

    A fn may return its own measured ms (to leave set-up out), or None to be timed whole.
    """
    for fn in fns.values():
        fn()  # warm-up: allocator, oneDNN primitives, lazy init
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            own = fn()
            times[name].append(own if own is not None else (time.perf_counter() - t0) * 1e3)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--decode-context", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--out", help="append the JSON lines to this file too")
    args = ap.parse_args(argv)

    from relaykv.model import Executor, load_smollm2

    torch.set_num_threads(args.threads)
    loaded = load_smollm2()
    model = loaded.model
    executor = Executor.from_hf(model)
    base = {"bench": "executor", "threads": torch.get_num_threads(), "model": "SmolLM2-135M-Instruct",
            "dtype": "float32", "device": "cpu"}
    lines: list[dict] = []

    def emit(rec: dict) -> None:
        rec = {**base, **rec}
        lines.append(rec)
        print(json.dumps(rec), flush=True)

    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    bs = args.block_size
    for n in args.lengths:
        ids = torch.randint(0, vocab, (n,), generator=gen)
        blocks = -(-n // bs)
        cache = executor.new_kv_cache(blocks, bs)
        table = list(range(blocks))

        def ours() -> None:
            executor.prefill(cache, ids, table)

        @torch.inference_mode()
        def theirs() -> None:
            model(ids[None], use_cache=True, logits_to_keep=1)

        times = alternate({"relaykv": ours, "transformers": theirs}, args.repeats)
        best, med = {}, {}
        for engine, ts in times.items():
            best[engine], med[engine] = min(ts), statistics.median(ts)
            emit({"engine": engine, "phase": "prefill", "tokens": n, "ms": round(med[engine], 2),
                  "ms_min": round(best[engine], 2), "tokens_per_s": round(n / best[engine] * 1e3, 1)})
        emit({"phase": "prefill", "tokens": n,
              "speedup": round(best["transformers"] / best["relaykv"], 3),
              "speedup_median": round(med["transformers"] / med["relaykv"], 3)})

    # Decode: one token at a time after a prompt, greedy, KV cache on both sides.
    n, steps = args.decode_context, args.decode_steps
    ids = torch.randint(0, vocab, (n,), generator=gen)
    blocks = -(-(n + steps + 1) // bs)

    def ours_decode() -> float:
        cache = executor.new_kv_cache(blocks, bs)
        table = list(range(blocks))
        tok = int(executor.prefill(cache, ids, table).argmax())
        t0 = time.perf_counter()
        for i in range(steps):
            tok = int(executor.prefill(cache, [tok], table, start=n + i).argmax())
        return (time.perf_counter() - t0) * 1e3

    @torch.inference_mode()
    def theirs_decode() -> float:
        out = model(ids[None], use_cache=True, logits_to_keep=1)
        past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True, logits_to_keep=1)
            past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
        return (time.perf_counter() - t0) * 1e3

    times = alternate({"relaykv": ours_decode, "transformers": theirs_decode}, args.repeats)
    best, med = {}, {}
    for engine, ts in times.items():
        best[engine], med[engine] = min(ts), statistics.median(ts)
        emit({"engine": engine, "phase": "decode", "context": n, "steps": steps,
              "ms_per_token": round(med[engine] / steps, 2),
              "ms_per_token_min": round(best[engine] / steps, 2),
              "tokens_per_s": round(steps / best[engine] * 1e3, 1)})
    emit({"phase": "decode", "context": n,
          "speedup": round(best["transformers"] / best["relaykv"], 3),
          "speedup_median": round(med["transformers"] / med["relaykv"], 3)})

    if args.out:
        with open(args.out, "a") as f:
            for rec in lines:
                f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
