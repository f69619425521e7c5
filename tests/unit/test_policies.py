"""Eviction policies: each raw score against its formula, sink/window protection per sequence,
the registry, input errors, and keep_mask (global and per head) against a naive sort."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_evict.eviction import policies
from sglang_evict.gates.retention import retention_log_alpha, retention_log_alpha_lookahead
from sglang_evict.eviction.policies import (
    POLICIES,
    EvictionPolicy,
    KnormPolicy,
    NoEvictionPolicy,
    RandomPolicy,
    RetentionPolicy,
    ScoreInputs,
    StreamingPolicy,
    keep_mask,
    make_policy,
)

INF = math.inf


def make_inputs(positions, seq_len, *, h=2, log_beta=None, keys=None) -> ScoreInputs:
    return ScoreInputs(
        positions=torch.tensor(positions, dtype=torch.int64),
        seq_len=torch.tensor(seq_len, dtype=torch.int64),
        num_kv_heads=h,
        log_beta=log_beta,
        keys=keys,
    )


def two_requests(h=2, d=4, seed=0) -> ScoreInputs:
    """Request A of length 7 (positions 0..6) and request B of length 4 (positions 0..3),
    interleaved as a batch would hold them, with random log β and keys."""
    pos = [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3]
    t = [7] * 7 + [4] * 4
    g = torch.Generator().manual_seed(seed)
    log_beta = -torch.rand(len(pos), h, generator=g) * 0.5
    keys = torch.randn(len(pos), h, d, generator=g)
    return make_inputs(pos, t, h=h, log_beta=log_beta, keys=keys)


def all_policies(**common):
    return [cls(**common) for cls in POLICIES.values()]


# ---------------------------------------------------------------------- registry and fields


def test_registry_names_match_classes():
    assert list(POLICIES) == ["retention", "streaming", "random", "knorm", "none"]
    for name, cls in POLICIES.items():
        assert cls.name == name
        assert issubclass(cls, EvictionPolicy)


def test_make_policy_builds_with_fields():
    p = make_policy("retention", sinks=2, window=8, lookahead=16, key_norm_bonus=True)
    assert p == RetentionPolicy(sinks=2, window=8, lookahead=16, key_norm_bonus=True)
    assert make_policy("streaming") == StreamingPolicy(sinks=4, window=0)
    assert make_policy("random", seed=3).seed == 3


def test_make_policy_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown eviction policy 'snapkv'") as e:
        make_policy("snapkv")
    for name in POLICIES:
        assert name in str(e.value)


def test_make_policy_unknown_field():
    with pytest.raises(ValueError, match=r"'streaming' has no field\(s\) lookahead.*sinks, window"):
        make_policy("streaming", lookahead=4)


@pytest.mark.parametrize(
    "name, fields",
    [
        ("streaming", {"sinks": -1}),
        ("none", {"window": -3}),
        ("knorm", {"sinks": 1.5}),
        ("random", {"window": True}),
        ("retention", {"lookahead": -1}),
        ("retention", {"key_norm_bonus": 1}),
        ("random", {"seed": "0"}),
    ],
)
def test_invalid_field_values(name, fields):
    field = next(iter(fields))
    with pytest.raises(ValueError, match=f"policy '{name}': {field}"):
        make_policy(name, **fields)


def test_policies_are_frozen_keyword_only_and_hashable():
    p = StreamingPolicy(sinks=1, window=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.sinks = 3
    with pytest.raises(TypeError):
        StreamingPolicy(1, 2)
    assert len({p, StreamingPolicy(sinks=1, window=2)}) == 1


def test_base_is_abstract():
    with pytest.raises(TypeError):
        EvictionPolicy()


def test_needs_flags():
    assert RetentionPolicy().needs_log_beta and not RetentionPolicy().needs_keys
    assert RetentionPolicy(key_norm_bonus=True).needs_keys
    assert KnormPolicy().needs_keys and not KnormPolicy().needs_log_beta
    for cls in (StreamingPolicy, RandomPolicy, NoEvictionPolicy):
        assert not cls().needs_log_beta and not cls().needs_keys


# ---------------------------------------------------------------------- inputs


@pytest.mark.parametrize("policy", all_policies(sinks=0), ids=lambda p: p.name)
def test_missing_inputs_name_policy_and_input(policy):
    bare = make_inputs([0, 1], [2, 2])
    if policy.needs_log_beta:
        with pytest.raises(ValueError, match=f"'{policy.name}'.*ScoreInputs.log_beta"):
            policy.score(bare)
    elif policy.needs_keys:
        with pytest.raises(ValueError, match=f"'{policy.name}'.*ScoreInputs.keys"):
            policy.score(bare)
    else:
        assert policy.score(bare).shape == (2, 2)


def test_key_norm_bonus_needs_keys():
    inp = make_inputs([0, 1], [2, 2], log_beta=torch.full((2, 2), -0.1))
    RetentionPolicy().score(inp)  # fine without keys
    with pytest.raises(ValueError, match="'retention'.*key_norm_bonus=True.*ScoreInputs.keys"):
        RetentionPolicy(key_norm_bonus=True).score(inp)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"positions": torch.zeros(3, 1, dtype=torch.int64)}, "positions"),
        ({"positions": torch.zeros(3)}, "positions"),
        ({"seq_len": torch.zeros(2, dtype=torch.int64)}, "seq_len"),
        ({"seq_len": torch.zeros(3)}, "seq_len"),
        ({"log_beta": torch.zeros(3, 3)}, "log_beta"),
        ({"log_beta": torch.zeros(3, 2, dtype=torch.int64)}, "log_beta"),
        ({"keys": torch.zeros(3, 2)}, "keys"),
        ({"keys": torch.zeros(2, 2, 4)}, "keys"),
        ({"num_kv_heads": 0}, "num_kv_heads"),
    ],
)
def test_bad_input_shapes(changes, match):
    good = make_inputs([0, 1, 2], [3, 3, 3], log_beta=torch.zeros(3, 2), keys=torch.ones(3, 2, 4))
    good.check()
    with pytest.raises(ValueError, match=f"ScoreInputs.{match}"):
        StreamingPolicy().score(good._replace(**changes))


# ---------------------------------------------------------------------- protection


def test_protection_per_sequence_with_mixed_lengths():
    # sinks=2: positions 0, 1 of each request. window=2: the last two of each request
    # (A: positions 5, 6 of t=7; B: positions 2, 3 of t=4).
    inp = two_requests()
    p = StreamingPolicy(sinks=2, window=2)
    expected = [True, True, False, False, False, True, True, True, True, True, True]
    assert p.protected(inp).tolist() == expected
    assert StreamingPolicy(sinks=0, window=0).protected(inp).tolist() == [False] * 11
    assert StreamingPolicy(sinks=0, window=1).protected(inp).tolist() == (
        [False] * 6 + [True] + [False] * 3 + [True]
    )


@pytest.mark.parametrize("policy", all_policies(sinks=2, window=2), ids=lambda p: p.name)
def test_every_policy_protects_sinks_and_window(policy):
    inp = two_requests(h=3)
    s = policy.score(inp)
    assert s.dtype == torch.float32 and s.shape == (11, 3)
    prot = policy.protected(inp)
    assert torch.isposinf(s[prot]).all()
    if policy.name == "none":
        assert torch.isposinf(s).all()
    else:
        assert torch.isfinite(s[~prot]).all()


# ---------------------------------------------------------------------- retention


def test_retention_raw_score_by_hand():
    log_beta = torch.tensor([[-0.5, -0.1], [-0.25, -1.0], [-2.0, -0.0]])
    inp = make_inputs([0, 3, 1], [5, 5, 2], log_beta=log_beta)
    s = RetentionPolicy(sinks=0).score(inp)
    # ages 5, 2, 1
    expected = torch.tensor([[-2.5, -0.5], [-0.5, -2.0], [-2.0, 0.0]])
    assert torch.equal(s, expected)


def test_retention_matches_gates_function_and_ordering():
    inp = two_requests(h=4, seed=1)
    s = RetentionPolicy(sinks=0).score(inp)
    ref = retention_log_alpha(inp.log_beta, inp.positions[:, None], inp.seq_len[:, None])
    assert torch.equal(s, ref)
    naive = (inp.seq_len - inp.positions)[:, None].double() * inp.log_beta.double()
    for h in range(4):
        order = torch.argsort(s[:, h], stable=True)
        assert torch.equal(order, torch.argsort(naive[:, h], stable=True))


def test_retention_lookahead_uses_gates_function(monkeypatch):
    inp = two_requests(h=2, seed=2)
    s = RetentionPolicy(sinks=0, lookahead=8).score(inp)
    ref = retention_log_alpha_lookahead(
        inp.log_beta, inp.positions[:, None], inp.seq_len[:, None], 8
    )
    assert torch.equal(s, ref)
    # Against the definition: log Σ_{k=1..n} β^(t + k - pos).
    lb = inp.log_beta.double()
    age = (inp.seq_len - inp.positions)[:, None].double()
    naive = torch.logsumexp(torch.stack([(age + k) * lb for k in range(1, 9)]), dim=0)
    assert torch.allclose(s.double(), naive, rtol=1e-5, atol=1e-5)

    calls = []

    def spy(log_beta, pos, t, n):
        calls.append(n)
        return retention_log_alpha_lookahead(log_beta, pos, t, n)

    monkeypatch.setattr(policies, "retention_log_alpha_lookahead", spy)
    RetentionPolicy(lookahead=3).score(inp)
    RetentionPolicy(lookahead=0).score(inp)
    assert calls == [3]


def test_retention_key_norm_bonus():
    inp = two_requests(h=2, d=8, seed=3)
    plain = RetentionPolicy(sinks=0).score(inp)
    bonus = RetentionPolicy(sinks=0, key_norm_bonus=True).score(inp)
    assert torch.allclose(bonus - plain, torch.log(inp.keys.norm(dim=-1)), atol=1e-6)
    zero_key = inp._replace(keys=torch.zeros_like(inp.keys))
    assert torch.isneginf(RetentionPolicy(sinks=0, key_norm_bonus=True).score(zero_key)).all()


# ---------------------------------------------------------------------- streaming


def test_streaming_raw_score_is_negated_age():
    inp = make_inputs([0, 3, 9, 1], [10, 10, 10, 2], h=3)
    s = StreamingPolicy(sinks=0).score(inp)
    assert s.tolist() == [[-10.0] * 3, [-7.0] * 3, [-1.0] * 3, [-1.0] * 3]


@pytest.mark.parametrize("sinks, budget", [(4, 10), (0, 5), (2, 2), (3, 1)])
def test_streaming_keep_mask_keeps_sinks_and_most_recent(sinks, budget):
    t = 32
    inp = make_inputs(list(range(t)), [t] * t, h=3)
    kept = keep_mask(StreamingPolicy(sinks=sinks).score(inp), budget, per_head=True)
    recent = max(budget - sinks, 0)
    expected = [p < sinks or p >= t - recent for p in range(t)]
    for h in range(3):
        assert kept[:, h].tolist() == expected


def test_streaming_global_budget_keeps_youngest_across_requests():
    inp = two_requests(h=1)
    kept = keep_mask(StreamingPolicy(sinks=1).score(inp), 5, per_head=False)[:, 0]
    # Sinks: position 0 of both requests; then the 3 youngest: A pos 6 (age 1), B pos 3
    # (age 1), then A pos 5 / B pos 2 (age 2) tie -> the lower index (A pos 5) wins.
    expected = [True, False, False, False, False, True, True, True, False, False, True]
    assert kept.tolist() == expected


# ---------------------------------------------------------------------- knorm, random, none


def test_knorm_raw_score_and_ordering():
    keys = torch.tensor(
        [[[3.0, 4.0], [1.0, 0.0]], [[0.0, 1.0], [6.0, 8.0]], [[0.0, 0.0], [2.0, 0.0]]]
    )
    inp = make_inputs([0, 1, 2], [3, 3, 3], keys=keys)
    s = KnormPolicy(sinks=0).score(inp)
    assert s.tolist() == [[-5.0, -1.0], [-1.0, -10.0], [0.0, -2.0]]
    kept = keep_mask(s, 1, per_head=True)
    assert kept.tolist() == [[False, True], [False, False], [True, False]]


def test_knorm_bf16_keys_scored_in_float32():
    g = torch.Generator().manual_seed(4)
    keys = torch.randn(6, 2, 64, generator=g).to(torch.bfloat16)
    inp = make_inputs(list(range(6)), [6] * 6, keys=keys)
    s = KnormPolicy(sinks=0).score(inp)
    assert s.dtype == torch.float32
    assert torch.allclose(s, -keys.float().norm(dim=-1), rtol=1e-6)


def test_random_is_reproducible_and_seeded():
    inp = two_requests(h=2)
    a = RandomPolicy(sinks=0).score(inp)
    assert torch.equal(a, RandomPolicy(sinks=0).score(inp))
    assert not torch.equal(a, RandomPolicy(sinks=0, seed=1).score(inp))
    assert ((a >= 0) & (a < 1)).all()
    # A round of another size draws afresh rather than replaying a prefix of the same draws.
    smaller = RandomPolicy(sinks=0).score(inp._replace(
        positions=inp.positions[:10], seq_len=inp.seq_len[:10], log_beta=None, keys=None
    ))
    assert not torch.equal(smaller, a[:10])


def test_none_keeps_everything():
    inp = two_requests(h=2)
    s = NoEvictionPolicy(sinks=0).score(inp)
    assert torch.isposinf(s).all()
    assert keep_mask(s, 0, per_head=False).all()
    assert keep_mask(s, 1, per_head=True).all()


# ---------------------------------------------------------------------- keep_mask


def naive_keep(scores: torch.Tensor, budget: int, per_head: bool) -> torch.Tensor:
    """Sort-based reference: per column, order by (score descending, index ascending), keep the
    first `budget` and every +inf; NaN ranks lowest."""
    n, h = scores.shape
    cols = [scores[:, j].tolist() for j in range(h)] if per_head else [scores.flatten().tolist()]
    out = []
    for col in cols:
        col = [-INF if math.isnan(v) else v for v in col]
        order = sorted(range(len(col)), key=lambda i: (-col[i], i))
        chosen = set(order[:budget]) | {i for i, v in enumerate(col) if v == INF}
        out.append([i in chosen for i in range(len(col))])
    if per_head:
        return torch.tensor(out, dtype=torch.bool).reshape(h, n).T
    return torch.tensor(out[0], dtype=torch.bool).reshape(n, h)


# Few distinct values so that ties, +inf beyond the budget and -inf are common.
score_values = st.one_of(
    st.sampled_from([-INF, -1.0, 0.0, 0.5, 2.0, INF]),
    st.floats(min_value=-1e6, max_value=1e6, width=32),
)


@settings(max_examples=50, deadline=None)
@given(
    data=st.data(),
    n=st.integers(0, 12),
    h=st.integers(1, 4),
    per_head=st.booleans(),
)
def test_keep_mask_matches_naive_sort(data, n, h, per_head):
    values = data.draw(st.lists(score_values, min_size=n * h, max_size=n * h))
    scores = torch.tensor(values, dtype=torch.float32).reshape(n, h)
    rows = n if per_head else n * h
    budget = data.draw(st.integers(0, rows + 2))
    kept = keep_mask(scores, budget, per_head=per_head)
    assert kept.dtype == torch.bool and kept.shape == (n, h)
    assert torch.equal(kept, naive_keep(scores, budget, per_head))
    # Kept count: the budget, or every +inf where those alone exceed it.
    dim = 0 if per_head else None
    n_inf = torch.isposinf(scores).sum(dim=dim)
    assert torch.equal(kept.sum(dim=dim), torch.clamp(n_inf, min=min(budget, rows)))


def test_keep_mask_infinite_beyond_budget_and_ties():
    s = torch.tensor([[INF, 1.0], [1.0, INF], [INF, 1.0], [0.0, 1.0]])
    assert keep_mask(s, 2, per_head=False).tolist() == [
        [True, False], [False, True], [True, False], [False, False]
    ]
    # Budget 5: the three +inf and the two lowest-index 1.0 entries (flat indices 1 and 2).
    assert keep_mask(s, 5, per_head=False).tolist() == [
        [True, True], [True, True], [True, False], [False, False]
    ]
    # Per head, budget 2: column 0 keeps its two +inf; column 1 its +inf and the first 1.0.
    assert keep_mask(s, 2, per_head=True).tolist() == [
        [True, True], [False, True], [True, False], [False, False]
    ]


def test_keep_mask_edge_budgets_and_nan():
    s = torch.tensor([[0.5, INF], [float("nan"), -INF], [1.0, 2.0]])
    only_inf = [[False, True], [False, False], [False, False]]
    assert keep_mask(s, 0, per_head=False).tolist() == only_inf
    assert keep_mask(s, 6, per_head=False).all()
    assert keep_mask(s, 100, per_head=True).all()
    # NaN ranks below every number, even -inf is not below it: budget 1 per head keeps 1.0.
    assert keep_mask(s, 1, per_head=True)[:, 0].tolist() == [False, False, True]
    assert keep_mask(s, 2, per_head=True)[:, 0].tolist() == [True, False, True]


@pytest.mark.parametrize(
    "scores, budget, match",
    [
        (torch.zeros(4), 1, "scores"),
        (torch.zeros(2, 2, dtype=torch.int64), 1, "scores"),
        (torch.zeros(2, 2), -1, "budget"),
        (torch.zeros(2, 2), 1.0, "budget"),
    ],
)
def test_keep_mask_errors(scores, budget, match):
    with pytest.raises(ValueError, match=match):
        keep_mask(scores, budget, per_head=False)
