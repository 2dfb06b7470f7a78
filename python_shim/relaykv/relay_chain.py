"""A relay chain of agents on one reference instance, measured per strategy.

Agent i's prompt is its own system prompt, the task and the outputs of the
agents before it. Every output is decoded into a paged KV cache and exported
as a record; later prompts look their spans up and import them at their new
positions. Strategies implemented so far:

- ``full``: prefill the whole prompt (the baseline);
- ``naive``: import every span (K re-rotated to its new position), compute only
  the gaps and the tail; no rectification.

Every measure is named as in the design: ttft_ms, speedup, reuse_rate,
recompute_ratio, top1_agree, kl, greedy_match.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from relaykv import _relaykv as core
from relaykv.model.executor import Executor, KvCache

GREEDY_MATCH_TOKENS = 32


def model_fingerprint(config: Any, weights: dict[str, torch.Tensor]) -> int:
    """Identifies a model: its architecture numbers and a sample of its embedding."""
    desc = json.dumps(
        {
            "arch": config.architecture,
            "layers": config.num_layers,
            "hidden": config.hidden_size,
            "heads": config.num_heads,
            "kv_heads": config.num_kv_heads,
            "head_size": config.head_size,
            "vocab": config.vocab_size,
        },
        sort_keys=True,
    ).encode()
    embed = weights["model.embed_tokens.weight"].detach().reshape(-1)[:65536]
    sample = embed.to(torch.float32).contiguous().numpy().tobytes()
    return core.xxh64(desc + sample)


@dataclasses.dataclass
class Sequence_:
    """One sequence's KV: a cache of its own and a shuffled block table (paging is real)."""

    cache: KvCache
    table: list[int]

    @property
    def paged(self) -> core.PagedCache:
        return core.PagedCache([layer[0] for layer in self.cache.layers], [layer[1] for layer in self.cache.layers])


class Instance:
    """A serving instance: executor, tokenizer and a KvRelay (embedded store + span index)."""

    def __init__(self, executor: Executor, tokenizer: Any, *, block_size: int = 16,
                 store_bytes: int = 1 << 30, tenant: str = "demo", seed: int = 0):
        self.executor = executor
        self.tokenizer = tokenizer
        self.block_size = block_size
        cfg = executor.config
        self.layout = core.KvLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_size,
                                    str(executor.dtype).replace("torch.", ""))
        self.relay = core.KvRelay(model_fingerprint(cfg, executor.weights), self.layout, cfg.rope,
                                  tenant, store_bytes)
        self.rng = random.Random(seed)
        eos = tokenizer.eos_token_id
        self.eos = {eos} if isinstance(eos, int) else set(eos or ())

    def new_sequence(self, num_tokens: int) -> Sequence_:
        blocks = math.ceil(num_tokens / self.block_size) + 1
        table = list(range(blocks))
        self.rng.shuffle(table)
        return Sequence_(self.executor.new_kv_cache(blocks, self.block_size), table)

    def chat_ids(self, system: str, user: str) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": user}],
            tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- computing ----------------------------------------------------------------------------
    def prefill(self, seq: Sequence_, ids: Sequence[int], start: int) -> torch.Tensor:
        return self.executor.prefill(seq.cache, list(ids), seq.table, start=start)

    def decode(self, seq: Sequence_, logits: torch.Tensor, start: int, max_new: int,
               stop_at_eos: bool = True) -> list[int]:
        """Greedy tokens after a prompt of `start` tokens whose last logits are given; the KV
        of every returned token but the last is in the cache."""
        out: list[int] = []
        for step in range(max_new):
            token = int(torch.argmax(logits))
            out.append(token)
            if (stop_at_eos and token in self.eos) or step == max_new - 1:
                break
            logits = self.prefill(seq, [token], start + step)
        return out

    # -- the two halves of a relay ------------------------------------------------------------
    def export(self, seq: Sequence_, tokens: Sequence[int], seq_begin: int) -> dict:
        return self.relay.export(seq.paged, seq.table, list(tokens), seq_begin)

    def prefill_full(self, ids: Sequence[int]) -> tuple[torch.Tensor, Sequence_, float]:
        seq = self.new_sequence(len(ids) + GREEDY_MATCH_TOKENS)
        t0 = time.perf_counter()
        logits = self.prefill(seq, ids, 0)
        return logits, seq, (time.perf_counter() - t0) * 1e3

    def prefill_naive(self, ids: Sequence[int]) -> tuple[torch.Tensor, Sequence_, float, dict]:
        """Imports every span the index offers and computes the rest. A span that fails to
        import is computed instead and counted."""
        seq = self.new_sequence(len(ids) + GREEDY_MATCH_TOKENS)
        t0 = time.perf_counter()
        spans = self.relay.lookup(list(ids))
        imported: list[int] = []
        fallback = 0
        pos = 0
        logits = None
        for span in spans:
            # The last prompt token is always computed: its logits are the first output.
            length = min(span.length, len(ids) - 1 - span.dst_offset)
            if length <= 0:
                continue
            if span.dst_offset > pos:
                self.prefill(seq, ids[pos:span.dst_offset], pos)
            span = core.Span(span.record_id, span.src_offset, span.dst_offset, length)
            try:
                self.relay.import_span(span, list(ids), seq.paged, seq.table)
                imported.extend(range(span.dst_offset, span.dst_offset + length))
            except core.RelayKVError:
                self.prefill(seq, ids[span.dst_offset:span.dst_offset + length], span.dst_offset)
                fallback += length
            pos = span.dst_offset + length
        logits = self.prefill(seq, ids[pos:], pos)
        ms = (time.perf_counter() - t0) * 1e3
        return logits, seq, ms, {"spans": len(spans), "imported_positions": imported,
                                 "fallback_tokens": fallback}


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p = torch.log_softmax(p_logits.double(), -1)
    q = torch.log_softmax(q_logits.double(), -1)
    return float(torch.sum(p.exp() * (p - q)))


def greedy_match(reference: Sequence[int], other: Sequence[int]) -> float:
    n = 0
    for a, b in zip(reference, other):
        if a != b:
            break
        n += 1
    return n / max(1, len(reference))


def layer_cosine(inst: Instance, a: Sequence_, b: Sequence_, positions: Sequence[int]) -> list[tuple[float, float]]:
    """Mean cosine similarity of K and of V between two caches at the given positions, per layer."""
    bs = inst.block_size
    pos = torch.as_tensor(list(positions))
    def rows(seq: Sequence_, layer: int, kv: int) -> torch.Tensor:
        table = torch.as_tensor(seq.table)
        return seq.cache.layers[layer][kv][table[pos // bs], pos % bs].reshape(len(pos), -1).float()
    out = []
    for layer in range(inst.executor.num_layers):
        ck = torch.nn.functional.cosine_similarity(rows(a, layer, 0), rows(b, layer, 0), dim=-1)
        cv = torch.nn.functional.cosine_similarity(rows(a, layer, 1), rows(b, layer, 1), dim=-1)
        out.append((float(ck.mean()), float(cv.mean())))
    return out


# ---------------------------------------------------------------------------------------------
# The workload: tasks and agents.

TASKS = [
    ("maths", "A train leaves at 9:40 and travels 180 km at 72 km/h. When does it arrive? "
              "Show the steps."),
    ("code", "Write a Python function that returns the n-th Fibonacci number iteratively, "
             "and explain its complexity."),
    ("knowledge", "Why is the sky blue during the day and red at sunset? Explain simply."),
    ("maths", "What is the sum of the first 50 odd numbers? Explain the pattern."),
    ("code", "Explain what a hash table is and when a list is a better choice."),
    ("knowledge", "What causes the seasons on Earth? Give two common misconceptions."),
]

AGENTS = [
    ("solver", "You are the Solver. Answer the task directly and concisely."),
    ("critic", "You are the Critic. Check the previous answers for mistakes and say what is wrong."),
    ("editor", "You are the Editor. Rewrite the answers above into one clear final answer."),
    ("teacher", "You are the Teacher. Explain the final answer to a twelve-year-old."),
    ("summariser", "You are the Summariser. Summarise everything above in two sentences."),
]


def agent_user_message(task: str, earlier: Sequence[tuple[str, str]]) -> str:
    parts = [f"Task: {task}"]
    for name, text in earlier:
        parts.append(f"The {name} wrote:\n{text}")
    parts.append("Your turn.")
    return "\n\n".join(parts)


def run_chain(inst: Instance, task: str, *, num_agents: int, max_new_tokens: int,
              on_agent: Callable[[dict], None] | None = None) -> list[dict]:
    """Runs one task through the chain; returns one result row per agent."""
    rows = []
    earlier: list[tuple[str, str]] = []
    for i, (name, system) in enumerate(AGENTS[:num_agents]):
        ids = inst.chat_ids(system, agent_user_message(task, earlier))
        logits_full, seq_full, ms_full = inst.prefill_full(ids)
        ref_cont = inst.decode(seq_full, logits_full, len(ids), GREEDY_MATCH_TOKENS, stop_at_eos=False)
        row: dict[str, Any] = {"agent": i, "name": name, "prompt_tokens": len(ids),
                               "ttft_ms": {"full": ms_full}}
        if i > 0:
            logits_n, seq_n, ms_n, info = inst.prefill_naive(ids)
            cont = inst.decode(seq_n, logits_n, len(ids), GREEDY_MATCH_TOKENS, stop_at_eos=False)
            span_positions = info.pop("imported_positions")
            info["imported_tokens"] = len(span_positions)
            row["ttft_ms"]["naive"] = ms_n
            row["speedup"] = {"naive": ms_full / ms_n}
            row["reuse_rate"] = {"naive": info["imported_tokens"] / len(ids)}
            row["recompute_ratio"] = {"naive": 0.0}
            row["top1_agree"] = {"naive": float(int(torch.argmax(logits_full)) == int(torch.argmax(logits_n)))}
            row["kl"] = {"naive": kl_divergence(logits_full, logits_n)}
            row["greedy_match"] = {"naive": greedy_match(ref_cont, cont)}
            row["import"] = info
            if span_positions:
                row["layer_cosine"] = layer_cosine(inst, seq_full, seq_n, span_positions)
        # The agent's answer, decoded from its exact cache, becomes the next agents' input.
        seq_dec = inst.new_sequence(len(ids) + max_new_tokens + 1)
        logits = inst.prefill(seq_dec, ids, 0)
        out = inst.decode(seq_dec, logits, len(ids), max_new_tokens)
        body = [t for t in out if t not in inst.eos]
        # Every sampled token but the last was fed back, so its decoding KV is in the cache;
        # when the last one is EOS, all of `body` has KV.
        with_kv = body if len(body) < len(out) else body[:-1]
        if with_kv:
            row["export"] = inst.export(seq_dec, with_kv, len(ids))
        text = inst.tokenizer.decode(body, skip_special_tokens=True).strip()
        row["output_tokens"] = len(out)
        row["output"] = text
        earlier.append((name, text))
        rows.append(row)
        if on_agent:
            on_agent(row)
    return rows

