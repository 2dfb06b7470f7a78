"""Executor vs transformers on the same weights and thread count: prefill and decode.

Prints one JSON object per line (and appends them to --out when given):
  {"bench": "executor", "engine": "relaykv"|"transformers", "phase": "prefill", "tokens": 512,
   "ms": ..., "tokens_per_s": ..., "threads": 2, "model": "SmolLM2-135M-Instruct"}
  {"bench": "executor", "engine": ..., "phase": "decode", "context": 512, "steps": 32, "ms_per_token": ...,
   "tokens_per_s": ...}
  {"bench": "executor", "phase": ..., "speedup": relaykv tokens/s over transformers tokens/s}
Each figure is the median of --repeats runs after one warm-up run.

  .venv/bin/python tests/bench/executor/bench_executor.py [--lengths 512 1024 2048] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, oneDNN primitives, lazy init
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


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

        rates = {}
        for engine, fn in (("relaykv", ours), ("transformers", theirs)):
            ms = median_ms(fn, args.repeats)
            rates[engine] = n / ms * 1e3
            emit({"engine": engine, "phase": "prefill", "tokens": n, "ms": round(ms, 2),
                  "tokens_per_s": round(rates[engine], 1)})
        emit({"phase": "prefill", "tokens": n, "speedup": round(rates["relaykv"] / rates["transformers"], 3)})

    # Decode: one token at a time after a prompt, greedy, KV cache on both sides.
    n, steps = args.decode_context, args.decode_steps
    ids = torch.randint(0, vocab, (n,), generator=gen)
    blocks = -(-(n + steps + 1) // bs)

    def ours_decode() -> None:
        cache = executor.new_kv_cache(blocks, bs)
        table = list(range(blocks))
        tok = int(executor.prefill(cache, ids, table).argmax())
        t0 = time.perf_counter()
        for i in range(steps):
            tok = int(executor.prefill(cache, [tok], table, start=n + i).argmax())
        return (time.perf_counter() - t0) * 1e3

    @torch.inference_mode()
    def theirs_decode() -> None:
        out = model(ids[None], use_cache=True, logits_to_keep=1)
        past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True, logits_to_keep=1)
            past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
        return (time.perf_counter() - t0) * 1e3

    rates = {}
    for engine, fn in (("relaykv", ours_decode), ("transformers", theirs_decode)):
        fn()
        ms = statistics.median(fn() for _ in range(args.repeats))
        rates[engine] = steps / ms * 1e3
        emit({"engine": engine, "phase": "decode", "context": n, "steps": steps,
              "ms_per_token": round(ms / steps, 2), "tokens_per_s": round(rates[engine], 1)})
    emit({"phase": "decode", "context": n, "speedup": round(rates["relaykv"] / rates["transformers"], 3)})

    if args.out:
        with open(args.out, "a") as f:
            for rec in lines:
                f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
