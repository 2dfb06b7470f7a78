"""Rectification: selector math on constructed cases, and each strategy on a tiny random Llama."""

from __future__ import annotations

import types

import pytest
import torch

from relaykv import core
from relaykv.model.executor import Executor
from relaykv.model.tiny import tiny_model
from relaykv.rectify import Strategy, prefill, selector
from relaykv.relay_chain import Instance


# --- selector ----------------------------------------------------------------------------------
def test_deviation_is_one_minus_cosine():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, -1.0]])
    assert torch.allclose(selector.deviation(a, b), torch.tensor([0.0, 1.0, 2.0]))


def test_influence_counts_only_later_queries():
    probs = torch.zeros(3, 2, 4)  # queries at positions 1, 2, 3; keys 0..3
    probs[0, :, 0] = 1.0  # query 1 gives all to key 0
    probs[1, :, 1] = 0.5  # query 2 gives half to key 1
    probs[2, :, 1] = 1.0  # query 3 all to key 1
    infl = selector.influence(probs, torch.tensor([1, 2, 3]), torch.tensor([0, 1, 3]))
    # key 0: (1 + 0 + 0)/3; key 1: (0.5 + 1)/2 (query at 1 is not later); key 3: no later query.
    assert torch.allclose(infl, torch.tensor([1 / 3, 0.75, 0.0]))


def test_span_first_and_last_masks():
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    assert selector.last_tokens_mask(ids, 2).tolist() == [0, 0, 1, 1, 1, 1, 1]
    assert selector.first_tokens_mask(ids, 2).tolist() == [1, 1, 0, 0, 1, 1, 1]
    assert selector.first_tokens_mask(ids, 1).tolist() == [1, 0, 0, 0, 1, 0, 1]
    assert selector.last_tokens_mask(torch.tensor([], dtype=torch.long), 3).numel() == 0


def test_outliers_are_relative_to_their_own_span():
    score = torch.tensor([1.0, 1.0, 4.0, 10.0, 10.0, 10.0])
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    # span 0 mean 2: only 4 > 1.5 × 2; span 1 is flat: nothing stands out there.
    assert selector.outliers(score, ids, 1.5).tolist() == [0, 0, 1, 0, 0, 0]


def test_top_ratio_and_budget_cap():
    score = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2])
    assert selector.top_ratio(score, 0.4).tolist() == [0, 1, 0, 1, 0]
    assert selector.top_ratio(score, 0.3).tolist() == [0, 1, 0, 1, 0]  # ceil(1.5) = 2
    mask = torch.tensor([1, 1, 1, 0, 1], dtype=torch.bool)
    assert selector.cap(mask, score, 2).tolist() == [0, 1, 1, 0, 0]
    assert selector.cap(mask, score, None).tolist() == mask.tolist()


def test_select_relay_is_the_union_and_budget_keeps_suffix_first():
    dev = torch.tensor([0.0, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    infl = torch.tensor([0.0, 0.0, 0.0, 0.8, 0.0, 0.0, 0.0, 0.0])
    ids = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])
    m = selector.select_relay(dev, infl, ids, tau_dev=2.0, tau_inf=2.0, suffix_tokens=1)
    assert m.tolist() == [0, 1, 0, 1, 1, 0, 0, 1]
    capped = selector.select_relay(dev, infl, ids, tau_dev=2.0, tau_inf=2.0, suffix_tokens=1, budget=3)
    assert capped.sum() == 3 and capped[4] and capped[7]


# --- strategies on a tiny model ------------------------------------------------------------------
@pytest.fixture(scope="module")
def executor():
    torch.set_num_threads(2)
    return Executor.from_hf(tiny_model("llama", seed=3))


def _instance(executor, eos: int | None = None) -> Instance:
    tok = types.SimpleNamespace(eos_token_id=eos)
    return Instance(executor, tok, block_size=8, store_bytes=1 << 26)


def _exported(inst: Instance, prefix: list[int], body: list[int]) -> None:
    """Prefills prefix + body exactly and exports body (its KV at its original positions)."""
    seq = inst.new_sequence(len(prefix) + len(body))
    ids = prefix + body
    out = inst.executor.forward(seq.cache, query_lens=[len(ids)], context_lens=[len(ids)],
                                block_tables=[seq.table], positions=range(len(ids)), token_ids=ids,
                                observe_hidden_layers=[0, 1])
    # Checkpoints entering layers 1 and 2 (outputs of layers 0 and 1), as an exporter saves them.
    hidden = torch.stack([out.hidden[0][len(prefix):], out.hidden[1][len(prefix):]]).contiguous()
    inst.relay.export(seq.paged, seq.table, body, len(prefix), hidden_layers=[1, 2], hidden=hidden)


def _tokens(seed: int, n: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


@pytest.fixture()
def relayed(executor):
    """Body exported behind prefix A, prompt = prefix B (other length) + body + tail."""
    inst = _instance(executor)
    vocab = executor.config.vocab_size
    body = _tokens(1, 48, vocab)
    _exported(inst, _tokens(2, 13, vocab), body)
    ids = _tokens(3, 21, vocab) + body + _tokens(4, 9, vocab)
    return inst, ids, list(range(21, 21 + 48))



def test_relay_with_every_token_over_all_layers_equals_full(relayed):
    inst, ids, span = relayed
    full = prefill(inst, ids, Strategy("full"))
    everything = Strategy("relay", start_layer=0, det_layer=0, end_layer=-1, tau_dev=-1.0,
                          suffix_tokens=10**6, use_prefix_cache=False)
    got = prefill(inst, ids, everything)
    assert got.info["recomputed_positions"] == span and got.recompute_ratio == 1.0
    assert torch.allclose(got.logits, full.logits, atol=1e-4, rtol=0)
    kf = full.seq.cache.gather(full.seq.table, range(len(ids)))
    kg = got.seq.cache.gather(got.seq.table, range(len(ids)))
    for a, b in zip(kf, kg):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    # and naive, which keeps the imported KV, is measurably different: the test can fail.
    naive = prefill(inst, ids, Strategy("naive", use_prefix_cache=False))
    assert not torch.allclose(naive.logits, full.logits, atol=1e-4, rtol=0)


def _span_kv(inst, ids, span, strategy):
    """K and V of the span positions after prefilling `ids` with `strategy`."""
    res = prefill(inst, ids, strategy)
    return res.seq.cache.gather(res.seq.table, span)


def _imported_kv(inst, ids, span):
    return _span_kv(inst, ids, span, Strategy("naive", use_prefix_cache=False))


@pytest.mark.parametrize("strategy", [
    Strategy("naive", use_prefix_cache=False),
    Strategy("epic", first_k=5, use_prefix_cache=False),
    Strategy("cacheblend", det_layer=1, ratio=0.15, use_prefix_cache=False),
    Strategy("relay", start_layer=1, det_layer=1, end_layer=2, suffix_tokens=4, use_prefix_cache=False),
    Strategy("relay", start_layer=1, det_layer=1, end_layer=1, suffix_tokens=4, use_prefix_cache=False),
    Strategy("relay", start_layer=1, det_layer=1, end_layer=1, suffix_tokens=4, scheme="hidden",
             use_prefix_cache=False),
    Strategy("relay", start_layer=1, det_layer=1, end_layer=-1, suffix_tokens=4, budget=0.25,
             use_prefix_cache=False),
    # det before start: R is computed from det + 1 on and keeps that fresh KV.
    Strategy("relay", start_layer=2, det_layer=0, end_layer=2, suffix_tokens=4, use_prefix_cache=False),
    Strategy("relay", start_layer=0, det_layer=1, end_layer=1, suffix_tokens=4, use_prefix_cache=False),
    # The same with the imported KV put back where stage 1 computed it.
    Strategy("cacheblend", det_layer=1, ratio=0.15, use_prefix_cache=False, keep_detection_kv=False),
    Strategy("relay", start_layer=1, det_layer=1, end_layer=2, suffix_tokens=4, use_prefix_cache=False,
             keep_detection_kv=False),
    Strategy("relay", start_layer=2, det_layer=0, end_layer=2, suffix_tokens=4, use_prefix_cache=False,
             keep_detection_kv=False),
    Strategy("relay", start_layer=0, det_layer=1, end_layer=1, suffix_tokens=4, use_prefix_cache=False,
             keep_detection_kv=False),
], ids=lambda s: s.label() + f"-d{s.det_layer}-{s.end_layer}")
def test_recompute_set_is_the_definition(relayed, strategy):
    inst, ids, span = relayed
    L = inst.executor.num_layers
    imp_k, imp_v = _imported_kv(inst, ids, span)
    res = prefill(inst, ids, strategy)
    chosen = res.info["recomputed_positions"]
    n_span = len(span)
    expected_n = {"naive": 0, "epic": 5, "cacheblend": 8}.get(strategy.name)
    if expected_n is not None:
        assert len(chosen) == expected_n
    if strategy.name == "epic":
        assert chosen == span[:5]
    if strategy.name == "relay":
        assert set(span[-4:]) <= set(chosen)
        if strategy.budget is not None:
            assert len(chosen) <= int(strategy.budget * n_span)
    k, v = res.seq.cache.gather(res.seq.table, span)
    start = {"cacheblend": 0, "epic": 0}.get(strategy.name, strategy.start_layer)
    if strategy.name == "relay" and strategy.scheme == "layer0":
        start = min(start, strategy.det_layer + 1)
    end = L - 1 if strategy.end_layer < 0 or strategy.name != "relay" else strategy.end_layer
    is_chosen = torch.tensor([p in set(chosen) for p in span])
    # Stage 1 ran every token through [0, det] behind the new prefix; kept, that KV is full prefill's.
    kept_det = -1
    if strategy.name in ("cacheblend", "relay") and strategy.scheme == "layer0" and strategy.keep_detection_kv:
        kept_det = strategy.det_layer
        full_k, full_v = _span_kv(inst, ids, span, Strategy("full"))
        for layer in range(kept_det + 1):
            assert torch.allclose(k[layer], full_k[layer], atol=1e-5, rtol=0), layer
            assert torch.allclose(v[layer], full_v[layer], atol=1e-5, rtol=0), layer
    for layer in range(L):
        fresh_rows = is_chosen if start <= layer <= end else torch.zeros_like(is_chosen)
        if layer <= kept_det:
            fresh_rows = torch.ones_like(is_chosen)
        same = (k[layer] == imp_k[layer]).flatten(1).all(1) & (v[layer] == imp_v[layer]).flatten(1).all(1)
        # Imported KV stays bit-exact outside R × [start, end]; inside, it was recomputed.
        assert same[~fresh_rows].all(), (layer, strategy)
        if layer >= 1:  # layer 0 KV depends on the token alone: recomputing it may reproduce it
            assert not same[fresh_rows].any(), (layer, strategy)
    assert 0.0 < res.reuse_rate < 1.0


def test_naive_with_zero_offset_and_identical_prefix_equals_prefix_reuse(executor):
    inst = _instance(executor)
    vocab = executor.config.vocab_size
    prefix, body, tail = _tokens(5, 19, vocab), _tokens(6, 40, vocab), _tokens(7, 7, vocab)
    seq = inst.new_sequence(len(prefix) + len(body))
    inst.prefill(seq, prefix + body, 0)
    inst.export(seq, body, len(prefix))
    inst.remember(seq, prefix + body)  # exact KV: the prefix cache may hand it out
    ids = prefix + body + tail
    by_prefix = prefill(inst, ids, Strategy("prefix"))
    assert by_prefix.info["prefix_tokens"] == len(prefix) + len(body)
    naive = prefill(inst, ids, Strategy("naive", use_prefix_cache=False))
    assert naive.info["imported_tokens"] == len(body) and naive.info["prefix_tokens"] == 0
    kp = by_prefix.seq.cache.gather(by_prefix.seq.table, range(len(ids)))
    kn = naive.seq.cache.gather(naive.seq.table, range(len(ids)))
    span = slice(len(prefix), len(prefix) + len(body))
    for a, b in zip(kp, kn):
        assert torch.equal(a[:, span], b[:, span])  # delta 0: the imported bytes are the exact ones
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    assert torch.allclose(naive.logits, by_prefix.logits, atol=1e-4, rtol=0)


def test_hidden_checkpoint_scheme_with_exact_checkpoint_equals_full(executor):
    """Same prefix, zero offset: the exporter's checkpoint is exact, so recomputing every token
    from it over the remaining layers must reproduce full prefill."""
    inst = _instance(executor)
    inst.checkpoint_layers = [1]
    vocab = executor.config.vocab_size
    prefix = _tokens(8, 17, vocab)
    seq = inst.new_sequence(len(prefix) + 40)
    logits = inst.prefill(seq, prefix, 0)
    out = inst.decode(seq, logits, len(prefix), 33, stop_at_eos=False)
    body = out[:-1]
    inst.export(seq, body, len(prefix))
    [span] = inst.relay.lookup(prefix + body)
    assert inst.checkpoint_rows([(span.record_id, 0, span.dst_offset, len(body))], prefix + body, 1).shape == (len(body), executor.config.hidden_size)
    ids = prefix + body + _tokens(9, 5, vocab)
    s = Strategy("relay", start_layer=2, det_layer=2, scheme="hidden", tau_dev=-1.0,
                 suffix_tokens=10**6, use_prefix_cache=False)
    got = prefill(inst, ids, s)
    full = prefill(inst, ids, Strategy("full"))
    assert got.info["imported_tokens"] > 0
    assert torch.allclose(got.logits, full.logits, atol=1e-4, rtol=0)


def test_prefix_strategy_takes_no_imported_kv_and_imports_never_enter_the_prefix_cache(relayed):
    inst, ids, _ = relayed
    before = list(inst.prefix_cache)
    res = prefill(inst, ids, Strategy("prefix"))
    assert res.info["imported_tokens"] == 0 and res.info["prefix_tokens"] == 0
    full = prefill(inst, ids, Strategy("full"))
    assert torch.allclose(res.logits, full.logits, atol=1e-4, rtol=0)
    prefill(inst, ids, Strategy("relay", start_layer=1, det_layer=1))
    assert inst.prefix_cache == before


def test_hidden_rows_round_trip_through_the_record(executor):
    inst = _instance(executor)
    vocab, hidden = executor.config.vocab_size, executor.config.hidden_size
    body = _tokens(10, 40, vocab)
    seq = inst.new_sequence(60)
    inst.prefill(seq, _tokens(11, 5, vocab) + body, 0)
    rows = torch.randn(2, len(body), hidden)
    info = inst.relay.export(seq.paged, seq.table, body, 5, hidden_layers=[1, 3], hidden=rows)
    prompt = _tokens(12, 9, vocab) + body
    span = core.Span(info["record_id"], 3, 9 + 3, 20)
    got = torch.frombuffer(bytearray(inst.relay.read_hidden(span, prompt, 3)), dtype=torch.float32)
    assert torch.equal(got.view(20, hidden), rows[1, 3:23])
    with pytest.raises(core.RelayKVError):
        inst.relay.read_hidden(span, prompt, 2)
    with pytest.raises(core.RelayKVError):  # wrong shape is refused at export
        inst.relay.export(seq.paged, seq.table, body, 5, hidden_layers=[1], hidden=rows)


# --- profiler -------------------------------------------------------------------------------------
def test_pick_layers_finds_the_dip():
    from relaykv.rectify.profiler import is_u_shaped, pick_layers

    u = torch.tensor([1.0, 0.999, 0.98, 0.9, 0.92, 0.97, 0.999, 0.999])
    assert pick_layers(u, torch.ones(8), 0.99) == {"start_layer": 2, "det_layer": 2, "end_layer": 5}
    assert is_u_shaped(u)
    falling = torch.tensor([1.0, 0.99, 0.97, 0.95, 0.93])
    assert pick_layers(torch.ones(5), falling, 0.98) == {"start_layer": 2, "det_layer": 2, "end_layer": 4}
    assert not is_u_shaped(falling)
    # layer 0 is never rectified, and nothing below the threshold means an empty range
    r = pick_layers(torch.tensor([0.5, 1.0, 1.0]), torch.ones(3), 0.99)
    assert r["start_layer"] > r["end_layer"]


def test_det_layer_is_the_earliest_that_ranks_tokens_like_the_rectified_range():
    from relaykv.rectify.profiler import build_profile, det_rank_correlation, pick_det_layer, spearman

    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([10.0, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([4.0, 3, 2, 1])) == pytest.approx(-1.0)
    # Ties share their mean rank: a constant layer says nothing, equal pairs agree fully.
    assert spearman(torch.zeros(6), torch.arange(6.0)) == 0.0
    assert spearman(torch.tensor([1.0, 1, 2, 2]), torch.tensor([5.0, 5, 9, 9])) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    truth = torch.rand(40, generator=g)  # each token's real deviation
    noise = torch.rand(6, 40, generator=g)
    # Layer l sees the truth through noise that fades with depth; layers 3..5 are the rectified range.
    weights = [0.0, 0.1, 0.5, 0.9, 1.0, 1.0]
    dev = torch.stack([w * truth + (1 - w) * noise[i] for i, w in enumerate(weights)])
    corr = det_rank_correlation([dev, dev.flip(1)], start=3, end=5)
    assert corr[1] < 0.5 < 0.9 < corr[3]
    assert pick_det_layer(corr, start=3, min_corr=0.6) in (2, 3)
    assert pick_det_layer(corr, start=3, min_corr=0.99) == 3  # none reaches it: start
    assert pick_det_layer(corr, start=3, min_corr=-1.0) == 1  # never layer 0
    stats = {"_dev_v": [dev], "cos_k": [1.0] * 6, "cos_v": [1.0, 1.0, 1.0, 0.9, 0.9, 0.9]}
    prof = build_profile("m", stats, threshold=0.95, tau_dev=1.5, tau_inf=1.5, suffix_tokens=4,
                         scheme="layer0", det_min_corr=0.6)
    assert (prof["start_layer"], prof["end_layer"]) == (3, 5) and prof["det_layer"] <= 3
    assert "_dev_v" not in prof and len(prof["det_rank_corr"]) == 6


def test_token_cosines_per_layer_and_token():
    from relaykv.rectify.profiler import token_cosines

    k = torch.randn(3, 4, 2, 5)
    ck, cv = token_cosines(k, k, k, -k)
    assert torch.allclose(ck, torch.ones(3, 4)) and torch.allclose(cv, -torch.ones(3, 4))


def test_bench_rows_summarise_per_strategy_and_agent():
    from relaykv.rectify.bench import _flatten, summarise

    row = {"agent": 1, "name": "critic", "prompt_tokens": 100, "ttft_ms": {"full": 10.0, "relay": 4.0}}
    for key, val in (("speedup", 2.5), ("reuse_rate", 0.8), ("recompute_ratio", 0.2), ("top1_agree", 1.0),
                     ("kl", 0.01), ("greedy_match", 0.5), ("imported_tokens", 50),
                     ("recomputed_tokens", 10), ("prefix_tokens", 3)):
        row[key] = {"relay": val}
    lines = _flatten(0, "maths", row)
    assert {line["strategy"] for line in lines} == {"full", "relay"}
    s = summarise(lines + _flatten(1, "code", {**row, "ttft_ms": {"full": 20.0, "relay": 6.0}}))
    assert s[("relay", 1)]["ttft_ms"] == 5.0 and s[("relay", -1)]["speedup"] == 2.5


def test_bench_strategies_label_every_configuration_apart():
    from relaykv.rectify.bench import bench_strategies

    profile = {"start_layer": 5, "det_layer": 5, "end_layer": 29, "tau_dev": 1.5, "tau_inf": 1.5,
               "suffix_tokens": 8, "scheme": "layer0"}
    plain = bench_strategies(profile, [0.15], [16], with_hidden=False)
    both = bench_strategies(profile, [0.15], [16], with_hidden=False, with_restore=True)
    labels = [s.label() for s in both]
    assert len(labels) == len(set(labels))  # the benchmark keys rows by label
    assert {s.label() for s in plain} < set(labels)
    restored = [s for s in both if not s.keep_detection_kv]
    assert sorted(s.label() for s in restored) == ["cacheblend-restore@0.15", "relay-restore",
                                                    "relay-restore@0.15"]
    assert all(s.keep_detection_kv for s in plain)


def test_min_new_tokens_holds_eos_back(executor):
    vocab = executor.config.vocab_size
    ids = _tokens(7, 20, vocab)
    plain = _instance(executor)
    seq = plain.new_sequence(64)
    first = int(torch.argmax(plain.prefill(seq, ids, 0)))
    # Make the token greedy decoding picks first the EOS: without a minimum it stops at once.
    inst = _instance(executor, eos=first)
    seq = inst.new_sequence(64)
    assert inst.decode(seq, inst.prefill(seq, ids, 0), len(ids), 12) == [first]
    seq = inst.new_sequence(64)
    out = inst.decode(seq, inst.prefill(seq, ids, 0), len(ids), 12, min_new=6)
    assert len(out) >= 6 and first not in out[:6]
