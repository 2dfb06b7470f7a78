"""Python face of the C++ model executor.

`Executor` wraps relaykv._relaykv.ModelExecutor over the weights of a
transformers model (or a state dict + config) without copying them, and
`KvCache` holds a paged KV cache in vLLM's per-layer layout. The forward takes
any tokens of any sequences over any layer range; see `Executor.forward`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from relaykv import _relaykv as core
from relaykv.model.config import model_config_from_hf

IntsLike = Sequence[int] | torch.Tensor | range


class KvObservation(NamedTuple):
    fresh_k: torch.Tensor  # [T, kv_heads, head_size], RoPE applied, model dtype
    fresh_v: torch.Tensor
    cached_k: torch.Tensor  # what the cache held at those slots before the call wrote them
    cached_v: torch.Tensor


@dataclasses.dataclass
class ForwardResult:
    hidden_states: torch.Tensor  # [T, hidden] after last_layer (before the final norm)
    logits: torch.Tensor | None  # float32 [R, vocab] for logits_rows
    kv: dict[int, KvObservation]
    attention: dict[int, torch.Tensor]  # float32 [A, heads, max_ctx]
    hidden: dict[int, torch.Tensor]  # [T, hidden] after each observed layer
    # With attention_key_mass: float32 [num_seqs, max_ctx] (mass, followers); see the C++ header.
    attention_mass: dict[int, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)


class KvCache:
    """A paged KV cache: per layer, a [2, num_blocks, block_size, kv_heads, head_size] tensor.

    `layers` may also hold (K, V) pairs of [num_blocks, block_size, kv_heads,
    head_size] views with any strides (vLLM's other layouts).
    """

    def __init__(self, layers: list[Any]):
        self.layers = list(layers)
        self.native = core.TorchKvCache(self.layers)
        first = self.layers[0]
        k = first[0]
        self.num_blocks = int(k.shape[0])
        self.block_size = int(k.shape[1])

    @classmethod
    def allocate(
        cls,
        config: Any,
        num_blocks: int,
        block_size: int = 16,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> KvCache:
        shape = (2, num_blocks, block_size, config.num_kv_heads, config.head_size)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)])

    def __len__(self) -> int:
        return len(self.layers)

    def _kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self.layers[layer]
        return entry[0], entry[1]

    def _slots(self, block_table: IntsLike, positions: IntsLike) -> tuple[torch.Tensor, torch.Tensor]:
        table = _ints(block_table)
        pos = _ints(positions)
        device = self._kv(0)[0].device
        return table[pos // self.block_size].to(device), (pos % self.block_size).to(device)

    def gather(
        self, block_table: IntsLike, positions: IntsLike, layers: Iterable[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one sequence's `positions`: two [layers, n, kv_heads, head_size] copies."""
        blocks, slots = self._slots(block_table, positions)
        chosen = range(len(self.layers)) if layers is None else list(layers)
        ks, vs = zip(*((k[blocks, slots], v[blocks, slots]) for k, v in map(self._kv, chosen)))
        return torch.stack(ks), torch.stack(vs)

    def scatter(
        self,
        block_table: IntsLike,
        positions: IntsLike,
        k: torch.Tensor,
        v: torch.Tensor,
        layers: Iterable[int] | None = None,
    ) -> None:
        """Writes [layers, n, kv_heads, head_size] K and V at one sequence's `positions`."""
        blocks, slots = self._slots(block_table, positions)
        chosen = range(len(self.layers)) if layers is None else list(layers)
        for i, layer in enumerate(chosen):
            ck, cv = self._kv(layer)
            ck[blocks, slots] = k[i].to(ck.dtype)
            cv[blocks, slots] = v[i].to(cv.dtype)


def _ints(x: IntsLike | None, dtype: torch.dtype = torch.int64) -> torch.Tensor | None:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x.to(dtype=dtype)
    return torch.as_tensor(list(x), dtype=dtype)


def _block_tables(tables: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
    if isinstance(tables, torch.Tensor):
        return tables.cpu() if tables.dim() == 2 else tables.cpu().unsqueeze(0)
    width = max(len(t) for t in tables)
    out = torch.zeros((len(tables), width), dtype=torch.int32)
    for i, t in enumerate(tables):
        out[i, : len(t)] = torch.as_tensor(list(t), dtype=torch.int32)
    return out


class Executor:
    """The C++ Llama-family executor over weights that stay where they are."""

    def __init__(self, config: core.ModelConfig, weights: Mapping[str, torch.Tensor]):
        # Kept so the tensors (and a model owning them) obviously outlive the executor;
        # the C++ side holds its own references through DLPack as well.
        self.weights = {name: t.detach() for name, t in weights.items()}
        self.config = config
        self.native = core.ModelExecutor.create(config, self.weights)

    @classmethod
    def from_hf(cls, model: Any) -> Executor:
        """Wraps a transformers causal LM (LlamaForCausalLM, Qwen2/3, Mistral)."""
        return cls.from_state_dict(model.state_dict(), model.config)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], hf_config: Any) -> Executor:
        config = model_config_from_hf(hf_config)
        weights = dict(state_dict)
        if config.tie_word_embeddings and "lm_head.weight" in weights:
            # A tied state dict lists the embedding twice; one name is enough.
            if weights["lm_head.weight"].data_ptr() == weights["model.embed_tokens.weight"].data_ptr():
                del weights["lm_head.weight"]
        return cls(config, weights)

    @property
    def device(self) -> torch.device:
        return torch.device(self.native.device)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.native.dtype)

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def new_kv_cache(
        self,
        num_blocks: int,
        block_size: int = 16,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KvCache:
        return KvCache.allocate(
            self.config,
            num_blocks,
            block_size,
            dtype=dtype or self.dtype,
            device=device if device is not None else self.device,
        )

    def forward(
        self,
        kv_cache: KvCache,
        *,
        query_lens: Sequence[int],
        context_lens: Sequence[int],
        block_tables: torch.Tensor | Sequence[Sequence[int]],
        positions: IntsLike,
        token_ids: IntsLike | None = None,
        hidden_states: torch.Tensor | None = None,
        first_layer: int = 0,
        last_layer: int = -1,
        write_kv: bool = True,
        skip_write_layers: Iterable[int] = (),
        logits_rows: IntsLike | str | None = None,
        observe_kv_layers: Iterable[int] = (),
        observe_attention_layers: Iterable[int] = (),
        attention_rows: IntsLike | None = None,
        attention_key_mass: bool = False,
        observe_hidden_layers: Iterable[int] = (),
    ) -> ForwardResult:
        """Computes the given tokens of one or more sequences over [first_layer, last_layer].

        Sequence i computes query_lens[i] tokens (rows of `positions`,
        `token_ids`, `hidden_states`, in sequence order) and attends to its
        positions [0, context_lens[i]) through its block table; the cache must
        hold valid KV for every position it does not compute. `logits_rows`
        may be "last" for the last row of each sequence.
        """
        if isinstance(logits_rows, str):
            if logits_rows != "last":
                raise ValueError("logits_rows must be row indices, None or 'last'")
            logits_rows = [int(x) - 1 for x in torch.tensor(list(query_lens)).cumsum(0)]
        out = self.native.forward(
            kv_cache.native,
            query_lens=[int(x) for x in query_lens],
            context_lens=[int(x) for x in context_lens],
            block_tables=_block_tables(block_tables),
            positions=_ints(positions),
            token_ids=_ints(token_ids),
            hidden_states=hidden_states,
            first_layer=first_layer,
            last_layer=last_layer,
            write_kv=write_kv,
            skip_write_layers=list(skip_write_layers),
            logits_rows=_ints(logits_rows),
            observe_kv_layers=list(observe_kv_layers),
            observe_attention_layers=list(observe_attention_layers),
            attention_rows=_ints(attention_rows),
            attention_key_mass=attention_key_mass,
            observe_hidden_layers=list(observe_hidden_layers),
        )
        return ForwardResult(
            hidden_states=out["hidden_states"],
            logits=out["logits"],
            kv={layer: KvObservation(*t) for layer, t in out["kv"].items()},
            attention=dict(out["attention"]),
            hidden=dict(out["hidden"]),
            attention_mass={layer: tuple(t) for layer, t in out["attention_mass"].items()},
        )

    def prefill(
        self,
        kv_cache: KvCache,
        token_ids: IntsLike,
        block_table: Sequence[int] | torch.Tensor,
        *,
        start: int = 0,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Computes positions [start, start + len(token_ids)) of one sequence; returns logits
        of the last token ([vocab]) or of all of them ([n, vocab])."""
        ids = _ints(token_ids)
        n = int(ids.shape[0])
        out = self.forward(
            kv_cache,
            query_lens=[n],
            context_lens=[start + n],
            block_tables=[list(_ints(block_table).tolist())],
            positions=range(start, start + n),
            token_ids=ids,
            logits_rows=range(n) if all_logits else [n - 1],
        )
        return out.logits if all_logits else out.logits[0]

    def embed(self, token_ids: IntsLike) -> torch.Tensor:
        return self.native.embed(_ints(token_ids))

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.native.logits(hidden_states)


def greedy_generate(
    executor: Executor,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    block_size: int = 16,
    eos_token_id: int | Sequence[int] | None = None,
    prefill_chunk: int | None = None,
) -> list[int]:
    """Greedy continuation of one prompt (stops after an EOS token, which it includes)."""
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    n = len(prompt_ids)
    num_blocks = math.ceil((n + max_new_tokens) / block_size)
    cache = executor.new_kv_cache(num_blocks, block_size)
    table = list(range(num_blocks))
    chunk = prefill_chunk or n
    for start in range(0, n, chunk):
        logits = executor.prefill(cache, prompt_ids[start : start + chunk], table, start=start)
    out: list[int] = []
    for step in range(max_new_tokens):
        token = int(torch.argmax(logits))
        out.append(token)
        if token in eos or step == max_new_tokens - 1:
            break
        logits = executor.prefill(cache, [token], table, start=n + step)
    return out


__all__ = ["Executor", "ForwardResult", "KvCache", "KvObservation", "greedy_generate"]
