"""Token selection for rectification: pure torch functions, no per-token Python loops.

Every function takes per-token tensors of the imported span tokens (in prompt
order) and returns either a score per token or a boolean "recompute" mask, so
they can be unit-tested on constructed inputs with known answers.
"""

from __future__ import annotations

import torch


def deviation(fresh_v: torch.Tensor, cached_v: torch.Tensor) -> torch.Tensor:
    """1 - cosine(fresh V, imported V) per token; inputs [n, ...] flattened per token."""
    a = fresh_v.reshape(fresh_v.shape[0], -1).float()
    b = cached_v.reshape(cached_v.shape[0], -1).float()
    return 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)


def influence(probs: torch.Tensor, query_positions: torch.Tensor,
              key_positions: torch.Tensor) -> torch.Tensor:
    """Mean attention mass that later query rows give each key token.

    probs: [A, heads, C] softmax rows (key index = position); query_positions [A];
    key_positions [n]. Only queries strictly after a key count (the others cannot
    see it), so tokens near the end are not penalised for having few followers.
    """
    p = probs.float().mean(dim=1)[:, key_positions]  # [A, n]
    later = query_positions[:, None] > key_positions[None, :]
    mass = (p * later).sum(0)
    return mass / later.sum(0).clamp(min=1)


def influence_from_mass(key_mass: torch.Tensor, key_followers: torch.Tensor,
                        key_positions: torch.Tensor) -> torch.Tensor:
    """influence() from the executor's per-position sums (observe attention_key_mass).

    key_mass [C]: head-mean weight summed over the later query rows; key_followers
    [C]: how many later rows there were. Equal to influence() of the same rows,
    without the [A, heads, C] weights.
    """
    return key_mass[key_positions] / key_followers[key_positions].clamp(min=1)


def last_tokens_mask(span_ids: torch.Tensor, k: int) -> torch.Tensor:
    """True for the last k tokens of every span; span_ids [n] is non-decreasing."""
    return _rank_in_span(span_ids, from_end=True) < k


def first_tokens_mask(span_ids: torch.Tensor, k: int) -> torch.Tensor:
    """True for the first k tokens of every span (EPIC's recompute set)."""
    return _rank_in_span(span_ids, from_end=False) < k


def _rank_in_span(span_ids: torch.Tensor, *, from_end: bool) -> torch.Tensor:
    n = span_ids.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    idx = torch.arange(n)
    boundary = torch.ones(n, dtype=torch.bool)
    if from_end:
        boundary[:-1] = span_ids[1:] != span_ids[:-1]  # last token of each span
        # index of the span's last token = smallest boundary index >= i
        last = torch.where(boundary, idx, torch.full_like(idx, n))
        last = torch.flip(torch.cummin(torch.flip(last, [0]), 0).values, [0])
        return last - idx
    boundary[1:] = span_ids[1:] != span_ids[:-1]  # first token of each span
    first = torch.where(boundary, idx, torch.zeros_like(idx))
    return idx - torch.cummax(first, 0).values


def outliers(score: torch.Tensor, span_ids: torch.Tensor, tau: float) -> torch.Tensor:
    """score > tau × the mean score of the token's own span."""
    if score.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    _, inverse = torch.unique_consecutive(span_ids, return_inverse=True)
    groups = int(inverse.max()) + 1
    sums = torch.zeros(groups, dtype=score.dtype).index_add_(0, inverse, score)
    counts = torch.zeros(groups, dtype=score.dtype).index_add_(0, inverse, torch.ones_like(score))
    return score > tau * (sums / counts)[inverse]


def top_ratio(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """The ceil(ratio × n) highest-scoring tokens (CacheBlend's fixed-ratio choice)."""
    n = score.numel()
    k = min(n, int(torch.ceil(torch.tensor(ratio * n)).item())) if n else 0
    mask = torch.zeros(n, dtype=torch.bool)
    if k:
        mask[torch.topk(score, k).indices] = True
    return mask


def cap(mask: torch.Tensor, priority: torch.Tensor, budget: int | None) -> torch.Tensor:
    """Keeps at most `budget` selected tokens, those of highest priority."""
    if budget is None or int(mask.sum()) <= budget:
        return mask
    masked = torch.where(mask, priority.float(), torch.full_like(priority, -float("inf"), dtype=torch.float))
    out = torch.zeros_like(mask)
    if budget > 0:
        out[torch.topk(masked, budget).indices] = True
    return out


def select_relay(dev: torch.Tensor, infl: torch.Tensor, span_ids: torch.Tensor, *,
                 tau_dev: float, tau_inf: float, suffix_tokens: int,
                 budget: int | None = None) -> torch.Tensor:
    """RelayCaching's rectify set: deviation outliers ∪ influence outliers ∪ span suffixes.

    Under a budget the suffix tokens go first (the next tokens attend to them most
    directly), then by deviation × influence-normalised score.
    """
    suffix = last_tokens_mask(span_ids, suffix_tokens)
    mask = outliers(dev, span_ids, tau_dev) | outliers(infl, span_ids, tau_inf) | suffix
    norm = dev / dev.mean().clamp(min=1e-12) + infl / infl.mean().clamp(min=1e-12)
    priority = norm.float() + suffix.float() * 1e6
    return cap(mask, priority, budget)
