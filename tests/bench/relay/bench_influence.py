"""Cost of relay's detection pass with and without the influence signal, side by side.

The detection forward computes every prompt token up to the detection layer;
relay also needs the attention each span token receives there. Three ways, in
one run, on SmolLM2 (fp32, CPU):

  none   the forward alone (what cacheblend's detection costs);
  probs  the executor returns the [rows, heads, context] weights and
         selector.influence reduces them;
  mass   the executor sums them per key position in blocks of rows
         (observe attention_key_mass), selector.influence_from_mass divides.

JSON lines on stdout: ms (fastest of --repeats) per mode and prompt length.

    .venv/bin/python tests/bench/relay/bench_influence.py [--lengths 1000 3000] [--det 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from relaykv.model import load_smollm2
from relaykv.model.executor import Executor
from relaykv.rectify import selector


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1000, 3000])
    ap.add_argument("--det", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ex = Executor.from_hf(load_smollm2().model)
    det = args.det
    for n in args.lengths:
        ids = torch.randint(0, 40000, (n,), generator=torch.Generator().manual_seed(n))
        blocks = -(-n // 16)
        cache = ex.new_kv_cache(blocks, 16)
        span = torch.arange(n // 4, n - 50)  # an imported span in the middle of the prompt

        def run(mode: str) -> tuple[float, torch.Tensor | None]:
            kw = {} if mode == "none" else dict(observe_attention_layers=[det], attention_rows=torch.arange(n),
                                                attention_key_mass=mode == "mass")
            t0 = time.perf_counter()
            out = ex.forward(cache, query_lens=[n], context_lens=[n], block_tables=[list(range(blocks))],
                             positions=range(n), token_ids=ids, last_layer=det, **kw)
            infl = None
            if mode == "probs":
                infl = selector.influence(out.attention[det], torch.arange(n), span)
            elif mode == "mass":
                mass, followers = out.attention_mass[det]
                infl = selector.influence_from_mass(mass[0], followers[0], span)
            return time.perf_counter() - t0, infl

        for mode in ("none", "probs", "mass"):
            run(mode)  # warm-up
        best = {}
        scores = {}
        for _ in range(args.repeats):
            for mode in ("none", "probs", "mass"):  # interleaved, so load falls on all alike
                t, infl = run(mode)
                best[mode] = min(best.get(mode, t), t)
                scores[mode] = infl
        same = bool(torch.allclose(scores["probs"], scores["mass"], atol=1e-6))
        for mode, t in best.items():
            print(json.dumps(dict(bench="relay_influence", tokens=n, det_layer=det, threads=args.threads,
                                  mode=mode, ms=round(t * 1e3, 1), same_scores=same)), flush=True)


if __name__ == "__main__":
    main()
