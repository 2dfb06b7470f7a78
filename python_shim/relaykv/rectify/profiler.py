"""Layer-range profiler: where does a reused decoding cache deviate from a fresh prefill?

Calibration relays decode a text behind prefix A, export it, and prefill the
same text behind prefix B; per layer we compare the imported (re-rotated) K
and V with the K and V a full prefill of B computes, by cosine per token. The
layers whose similarity drops below a threshold are the ones worth
rectifying: [start_layer, end_layer]. det_layer is where the selector looks:
the earliest layer whose per-token V deviation already ranks the tokens the
way their deviation over [start_layer, end_layer] does (Spearman correlation
on the calibration relays), since every span token is computed up to it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

PROFILE_DIR = Path(__file__).resolve().parent.parent / "profiles"
DEFAULT_PROFILE = PROFILE_DIR / "smollm2-135m-instruct.json"


def token_cosines(k_a: torch.Tensor, v_a: torch.Tensor, k_b: torch.Tensor,
                  v_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer, per token cosine of K and of V: inputs [L, n, heads, d] -> two [L, n]."""
    def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cosine_similarity(a.flatten(2).float(), b.flatten(2).float(), dim=-1)
    return cos(k_a, k_b), cos(v_a, v_b)


def pick_layers(cos_k: torch.Tensor, cos_v: torch.Tensor, threshold: float) -> dict[str, int]:
    """Layers to rectify from mean per-layer cosines [L].

    A layer needs rectifying when min(cos K, cos V) < threshold. start_layer and
    end_layer are the first and last such layers (layer 0 never: its KV depends on
    the token alone, and K is re-rotated exactly); det_layer = start_layer, the
    earliest layer where the deviation shows, so the selector pays the least to see it.
    If no layer deviates, the range is empty (start_layer > end_layer).
    """
    sim = torch.minimum(cos_k, cos_v)
    low = torch.nonzero(sim[1:] < threshold).squeeze(1) + 1
    if low.numel() == 0:
        last = int(sim.numel())
        return {"start_layer": last, "det_layer": last - 1, "end_layer": last - 1}
    start, end = int(low[0]), int(low[-1])
    return {"start_layer": start, "det_layer": start, "end_layer": end}


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """0-based ranks; tied values share the mean of their ranks."""
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    return ((ends - counts.double() + ends - 1) / 2)[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two 1-D tensors (0 when either is constant)."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else 0.0


def det_rank_correlation(dev_v: Sequence[torch.Tensor], start: int, end: int) -> list[float]:
    """Per layer l, the mean over calibration relays of spearman(deviation at l, mean
    deviation over [start, end]); dev_v holds one [L, n] per relay (1 - cos V)."""
    if start > end:
        return []
    num_layers = int(dev_v[0].shape[0])
    out = []
    for layer in range(num_layers):
        vals = [spearman(d[layer], d[start:end + 1].mean(0)) for d in dev_v if d.shape[1] > 1]
        out.append(sum(vals) / len(vals) if vals else 0.0)
    return out


def pick_det_layer(corr: Sequence[float], start: int, min_corr: float) -> int:
    """The earliest layer in [1, start] whose rank correlation reaches min_corr; start if none."""
    for layer in range(1, start + 1):
        if layer < len(corr) and corr[layer] >= min_corr:
            return layer
    return start


def is_u_shaped(sim: torch.Tensor, margin: float = 0.01) -> bool:
    """True when both ends are more similar than the minimum by at least `margin`."""
    lo = int(torch.argmin(sim))
    return 0 < lo < sim.numel() - 1 and float(sim[-1] - sim[lo]) > margin and float(sim[0] - sim[lo]) > margin


def calibrate(inst: Any, tasks: Sequence[str], *, max_new_tokens: int = 96,
              progress: Any = None) -> dict[str, Any]:
    """Runs one calibration relay per task; returns per-layer cosine statistics."""
    from relaykv.rectify.strategies import Strategy, prefill
    from relaykv.relay_chain import AGENTS, agent_user_message

    ks, vs = [], []
    for i, task in enumerate(tasks):
        ids_a = inst.chat_ids(AGENTS[0][1], agent_user_message(task, []))
        seq = inst.new_sequence(len(ids_a) + max_new_tokens + 1)
        out = inst.decode(seq, inst.prefill(seq, ids_a, 0), len(ids_a), max_new_tokens)
        body = [t for t in out if t not in inst.eos]
        with_kv = body if len(body) < len(out) else body[:-1]
        if not with_kv:
            continue
        inst.export(seq, with_kv, len(ids_a))
        text = inst.tokenizer.decode(body, skip_special_tokens=True).strip()
        other = AGENTS[1 + i % (len(AGENTS) - 1)]
        ids_b = inst.chat_ids(other[1], agent_user_message(task, [(AGENTS[0][0], text)]))
        naive = prefill(inst, ids_b, Strategy("naive", use_prefix_cache=False))
        span = naive.info["span_positions"]
        if not span:
            continue
        full = prefill(inst, ids_b, Strategy("full"))
        ck, cv = token_cosines(*naive.seq.cache.gather(naive.seq.table, span),
                               *full.seq.cache.gather(full.seq.table, span))
        ks.append(ck)
        vs.append(cv)
        if progress:
            progress(i, len(span))
    if not ks:
        raise RuntimeError("no calibration relay imported anything")
    k, v = torch.cat(ks, 1), torch.cat(vs, 1)
    # Per-relay deviations stay apart: a token's rank only means something within its relay.
    return {"_dev_v": [1 - x for x in vs], "cos_k": k.mean(1).tolist(), "cos_v": v.mean(1).tolist(),
            "cos_k_p10": torch.quantile(k, 0.1, dim=1).tolist(),
            "cos_v_p10": torch.quantile(v, 0.1, dim=1).tolist(),
            "tokens": int(k.shape[1]), "relays": len(ks)}


def build_profile(model: str, stats: dict[str, Any], *, threshold: float, tau_dev: float,
                  tau_inf: float, suffix_tokens: int, scheme: str, det_min_corr: float = 0.85) -> dict[str, Any]:
    """The profile JSON. det_layer: pick_det_layer over the calibration relays' deviations
    (with the hidden scheme span tokens start at start_layer, so det_layer stays there)."""
    ck, cv = torch.tensor(stats["cos_k"]), torch.tensor(stats["cos_v"])
    layers = pick_layers(ck, cv, threshold)
    corr = det_rank_correlation(stats["_dev_v"], layers["start_layer"], layers["end_layer"]) \
        if stats.get("_dev_v") else []
    if corr and scheme == "layer0":
        layers["det_layer"] = pick_det_layer(corr, layers["start_layer"], det_min_corr)
    public = {k: v for k, v in stats.items() if not k.startswith("_")}
    return {"model": model, **layers, "similarity_threshold": threshold, "det_min_corr": det_min_corr,
            "det_rank_corr": corr, "tau_dev": tau_dev, "tau_inf": tau_inf, "suffix_tokens": suffix_tokens,
            "scheme": scheme, "u_shaped": is_u_shaped(torch.minimum(ck, cv)), **public}


def load_profile(path: str | Path | None = None) -> dict[str, Any]:
    return json.loads(Path(path or DEFAULT_PROFILE).read_text())


def plot_profile(profile: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    layers = range(len(profile["cos_k"]))
    ax.plot(layers, profile["cos_k"], "o-", label="K mean")
    ax.plot(layers, profile["cos_v"], "s-", label="V mean")
    ax.plot(layers, profile["cos_k_p10"], ":", label="K p10")
    ax.plot(layers, profile["cos_v_p10"], ":", label="V p10")
    ax.axhline(profile["similarity_threshold"], color="grey", lw=0.8, ls="--", label="threshold")
    if profile["start_layer"] <= profile["end_layer"]:
        ax.axvspan(profile["start_layer"] - 0.5, profile["end_layer"] + 0.5, color="orange", alpha=0.15,
                   label="rectified layers")
    ax.axvline(profile["det_layer"], color="red", lw=0.8, label="det_layer")
    ax.set_xlabel("layer")
    ax.set_ylabel("cosine(imported, full prefill)")
    ax.set_title(f"{profile['model']}: reused decoding KV vs full prefill "
                 f"({profile['tokens']} tokens, {profile['relays']} relays)")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
