"""Requests, their sampling settings and their finished outputs."""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Sequence

import torch


@dataclasses.dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    stop: Sequence[str] = ()  # stop strings; need the engine's tokenizer

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_REMOTE_KVS = "waiting_for_remote_kvs"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"


@dataclasses.dataclass
class Request:
    """One request, named as vLLM's Request so a connector reads the same attributes."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = dataclasses.field(default_factory=time.perf_counter)
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    first_token_time: float | None = None
    finish_time: float | None = None
    num_cached_tokens: int = 0  # local prefix-cache hit at first schedule
    num_external_tokens: int = 0  # claimed by the connector at first schedule
    num_preemptions: int = 0
    output_text: str = ""
    generator: torch.Generator | None = None
    kv_transfer_params: dict | None = None  # as vLLM's Request; connectors may read it

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def is_finished(self) -> bool:
        return self.status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH)


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    text: str | None
    finish_reason: str
    ttft_s: float
    e2e_s: float
    num_cached_tokens: int
    num_external_tokens: int

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first over the time after the first."""
        dt = self.e2e_s - self.ttft_s
        return (len(self.output_token_ids) - 1) / dt if dt > 0 else float("nan")

    @classmethod
    def of(cls, req: Request) -> RequestOutput:
        assert req.finish_time is not None and req.first_token_time is not None
        return cls(
            request_id=req.request_id,
            prompt_token_ids=list(req.prompt_token_ids),
            output_token_ids=list(req.output_token_ids),
            text=req.output_text or None,
            finish_reason=req.status.value,
            ttft_s=req.first_token_time - req.arrival_time,
            e2e_s=req.finish_time - req.arrival_time,
            num_cached_tokens=req.num_cached_tokens,
            num_external_tokens=req.num_external_tokens,
        )


__all__ = ["Request", "RequestOutput", "RequestStatus", "SamplingParams"]
