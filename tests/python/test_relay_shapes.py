"""The relay benchmark's workload shapes on the bundled SmolLM2, at small sizes."""

from __future__ import annotations

import pytest
import torch

from relaykv.model import load_smollm2
from relaykv.model.executor import Executor
from relaykv.rectify import Strategy
from relaykv.relay_chain import Instance, common_suffix, long_system_prompt, run_fully_connected, shared_input


@pytest.fixture(scope="module")
def inst() -> Instance:
    torch.set_num_threads(1)
    loaded = load_smollm2()
    return Instance(Executor.from_hf(loaded.model), loaded.tokenizer)


def test_prefixes_and_input_have_the_asked_lengths_and_differ(inst: Instance) -> None:
    a = inst.tokenizer(long_system_prompt(inst, "You are A.", 0, 96), add_special_tokens=False)["input_ids"]
    b = inst.tokenizer(long_system_prompt(inst, "You are B.", 1, 96), add_special_tokens=False)["input_ids"]
    assert abs(len(a) - 96) <= 3 and abs(len(b) - 96) <= 3  # cut in token space, re-tokenized
    assert a[:4] != b[:4]
    x = inst.tokenizer(shared_input(inst, "What is 2 + 2?", 200), add_special_tokens=False)["input_ids"]
    assert abs(len(x) - 200) <= 3
    assert common_suffix([1, 2, 3, 4], [9, 3, 4]) == 2 and common_suffix([1], [2]) == 0


def test_fully_connected_round_two_imports_the_input_and_every_other_answer(inst: Instance) -> None:
    rows = run_fully_connected(inst, "What is 15% of 240?", num_agents=3, prefix_tokens=48, input_tokens=160,
                               max_new_tokens=24, strategies=[Strategy("naive")])
    assert [r["name"] for r in rows] == ["solver-r1", "critic-r1", "editor-r1",
                                         "solver-r2", "critic-r2", "editor-r2"]
    assert "naive" not in rows[0]["ttft_ms"]  # the first agent has nothing to import
    # Round 1: agents 1 and 2 import the shared input agent 0 exported, behind their own prefix.
    for r in rows[1:3]:
        assert r["imported_tokens"]["naive"] >= 150, r["imported_tokens"]
    # Round 2: its own first prompt is an exact prefix hit; the two other answers are imported.
    for r in rows[3:]:
        assert r["prefix_tokens"]["naive"] >= 48 + 150
        assert r["imported_tokens"]["naive"] >= 2 * 16, r["imported_tokens"]
        assert r["reuse_rate"]["naive"] > 0 and r["output_tokens"] > 0
