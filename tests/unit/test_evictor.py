"""Evictor: budget enforcement on a request's live head-slots (global DBTrimKV / per-head TrimKV),
against a naive sorted reference, with pool integrity after every enforce."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any triton import

import math

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from sglang_evict.eviction.evictor import EvictionResult, Evictor, EvictorConfig
from sglang_evict.cache.head_slots import EVICTED, HeadSlotPool, HeadSlotPoolFull
from sglang_evict.eviction.policies import (
    KnormPolicy,
    NoEvictionPolicy,
    RetentionPolicy,
    StreamingPolicy,
    make_policy,
)

SETTINGS = settings(max_examples=30, deadline=None)


def make_request(n, L, H, *, seed, extra_capacity=0, pre_evict=0.0, num_virtual=None, dim=0):
    """A pool with one request of n tokens (scattered virtual ids), random log_beta per head-slot
    (drawn from a small set, so ties happen), and optionally a random part pre-evicted."""
    g = torch.Generator().manual_seed(seed)
    nv = num_virtual or 2 * n + 3
    cap = n * L * H + extra_capacity
    pool = HeadSlotPool(nv, L, H, cap)
    tokens = torch.randperm(nv, generator=g)[:n]
    pool.alloc(tokens)
    if pre_evict:
        drop = torch.rand((n, L, H), generator=g) < pre_evict
        pool.evict_mask(tokens, ~drop)
    levels = -torch.rand(5, generator=g) * 0.5
    log_beta = levels[torch.randint(0, 5, (cap,), generator=g)].float()
    positions = torch.arange(n, dtype=torch.long)
    keys = torch.randn(cap, max(dim, 1), generator=g) if dim else None
    return pool, tokens, positions, log_beta, keys


def live_of(pool, tokens):
    return pool.slot_map[tokens] != EVICTED


def reference_scores(pool, tokens, positions, seq_len, log_beta, sinks):
    """float32 [n, L, H] retention scores (sinks +inf), -inf where not live."""
    slots = pool.slot_map[tokens].long()
    live = slots != EVICTED
    lb = log_beta[slots.clamp(min=0)]
    age = (seq_len - positions).to(torch.float32)[:, None, None]
    s = age * lb
    s = torch.where((positions < sinks)[:, None, None], torch.full_like(s, math.inf), s)
    return torch.where(live, s, torch.full_like(s, -math.inf))


def reference_keep_global(scores, live, budget):
    """Sort live entries by (score desc, flat index asc), keep max(budget, #inf) of them."""
    flat = scores.reshape(-1).tolist()
    lv = live.reshape(-1).tolist()
    entries = sorted((i for i in range(len(flat)) if lv[i]), key=lambda i: (-flat[i], i))
    n_inf = sum(1 for i in entries if flat[i] == math.inf)
    kept = set(entries[: max(budget, n_inf)])
    keep = torch.tensor([i in kept for i in range(len(flat))], dtype=torch.bool)
    return keep.view(scores.shape)


shapes = st.tuples(
    st.integers(1, 14),  # n tokens
    st.integers(1, 2),  # L
    st.integers(1, 3),  # H
    st.integers(1, 3),  # M
    st.integers(0, 2),  # B
    st.integers(0, 2**16),  # seed
)


# ---------------------------------------------------------------- global mode
@SETTINGS
@given(shapes, st.integers(0, 3), st.sampled_from([0.0, 0.3]))
def test_global_matches_naive_reference(shape, sinks, pre_evict):
    n, L, H, M, B, seed = shape
    pool, tokens, positions, lb, _ = make_request(n, L, H, seed=seed, pre_evict=pre_evict)
    policy = RetentionPolicy(sinks=sinks)
    ev = Evictor(EvictorConfig(budget=M, buffer=B, policy=policy), L, H)
    seq_len = n + 1
    scores = reference_scores(pool, tokens, positions, seq_len, lb, sinks)
    live = live_of(pool, tokens)
    live_before = int(live.sum())
    n_prot = int(torch.isposinf(scores).sum())

    res = ev.enforce(pool, tokens, positions, seq_len, lb)
    pool.check_integrity()

    assert isinstance(res, EvictionResult)
    assert res.live_before == live_before
    after = live_of(pool, tokens)
    assert res.live_after == int(after.sum()) == live_before - res.evicted
    triggered = live_before > L * H * (M + B)
    event(f"triggered={triggered}")
    if triggered:
        expected = reference_keep_global(scores, live, L * H * M)
        assert torch.equal(after, expected)
        assert res.live_after == min(live_before, max(L * H * M, n_prot))
    else:
        assert res.evicted == 0 and torch.equal(after, live)
    assert res.live_after <= max(live_before if not triggered else 0, L * H * M + n_prot)


@SETTINGS
@given(shapes, st.integers(1, 3))
def test_global_floor_respected(shape, floor):
    n, L, H, M, B, seed = shape
    floor = min(floor, M)
    pool, tokens, positions, lb, _ = make_request(n, L, H, seed=seed, pre_evict=0.2)
    ev = Evictor(
        EvictorConfig(budget=M, buffer=B, policy=RetentionPolicy(sinks=0), min_per_head=floor),
        L,
        H,
    )
    counts_before = pool.live_counts(tokens)
    res = ev.enforce(pool, tokens, positions, n, lb)
    pool.check_integrity()
    counts_after = pool.live_counts(tokens)
    assert torch.all(counts_after >= torch.clamp(counts_before, max=floor))
    if res.evicted:
        # Floor entries are protected: kept = max(budget, #floor-protected).
        n_prot = int(torch.clamp(counts_before, max=floor).sum())
        assert res.live_after == min(res.live_before, max(L * H * M, n_prot))


def test_floor_rescues_a_starved_head():
    # Head 1 has uniformly worse scores: without a floor the global budget takes only head 0.
    L, H, n, M = 1, 2, 10, 2
    pool, tokens, positions, _, _ = make_request(n, L, H, seed=0)
    lb = torch.zeros(pool.capacity)
    slots = pool.slot_map[tokens].long()
    lb[slots[:, 0, 1]] = -5.0
    lb[slots[:, 0, 0]] = -0.01
    for floor, want_h1 in ((0, 0), (1, 1), (2, 2)):
        p2 = HeadSlotPool(pool.num_virtual, L, H, pool.capacity)
        p2.alloc(tokens)
        cfg = EvictorConfig(budget=M, buffer=0, policy=RetentionPolicy(sinks=0), min_per_head=floor)
        res = Evictor(cfg, L, H).enforce(p2, tokens, positions, n, lb)
        p2.check_integrity()
        counts = p2.live_counts(tokens)
        assert int(counts[0, 1]) == want_h1
        assert res.live_after == L * H * M


def test_no_trigger_below_buffer():
    L, H, M, B = 2, 2, 2, 3
    trigger = L * H * (M + B)  # 20 live head-slots = 5 tokens
    pool, tokens, positions, lb, _ = make_request(6, L, H, seed=1)
    ev = Evictor(EvictorConfig(budget=M, buffer=B, policy=RetentionPolicy(sinks=0)), L, H)
    res = ev.enforce(pool, tokens[:5], positions[:5], 5, lb)
    assert res == EvictionResult(0, trigger, trigger)
    res = ev.enforce(pool, tokens, positions, 6, lb)
    pool.check_integrity()
    assert res == EvictionResult(24 - L * H * M, 24, L * H * M)


def test_streaming_keeps_sinks_and_recent():
    L, H, n, M = 2, 2, 12, 5
    pool, tokens, positions, lb, _ = make_request(n, L, H, seed=2)
    ev = Evictor(EvictorConfig(budget=M, buffer=0, policy=StreamingPolicy(sinks=2)), L, H)
    res = ev.enforce(pool, tokens, positions, n, None)
    pool.check_integrity()
    live = live_of(pool, tokens).all(dim=(1, 2))  # whole tokens survive: same score on all heads
    want = torch.zeros(n, dtype=torch.bool)
    want[:2] = True
    want[n - (M - 2) :] = True
    assert torch.equal(live, want)
    assert live_of(pool, tokens).any(dim=(1, 2)).equal(want)
    assert res.live_after == L * H * M


def test_streaming_per_head_keeps_sinks_and_recent():
    L, H, n, M = 2, 3, 9, 4
    pool, tokens, positions, _, _ = make_request(n, L, H, seed=3)
    ev = Evictor(
        EvictorConfig(budget=M, buffer=1, mode="per_head", policy=StreamingPolicy(sinks=1)), L, H
    )
    ev.enforce(pool, tokens, positions, n, None)
    pool.check_integrity()
    live = live_of(pool, tokens)
    want = torch.zeros(n, dtype=torch.bool)
    want[0] = True
    want[n - (M - 1) :] = True
    assert torch.equal(live, want[:, None, None].expand(n, L, H))


@pytest.mark.parametrize("mode", ["global", "per_head"])
def test_none_policy_never_evicts(mode):
    L, H, n = 2, 2, 10
    pool, tokens, positions, lb, _ = make_request(n, L, H, seed=4)
    ev = Evictor(EvictorConfig(budget=1, buffer=0, mode=mode, policy=NoEvictionPolicy()), L, H)
    res = ev.enforce(pool, tokens, positions, n, lb)
    pool.check_integrity()
    assert res == EvictionResult(0, n * L * H, n * L * H)


# ---------------------------------------------------------------- per-head mode
@SETTINGS
@given(shapes, st.integers(0, 3), st.sampled_from([0.0, 0.4]))
def test_per_head_bounds_and_reference(shape, sinks, pre_evict):
    n, L, H, M, B, seed = shape
    pool, tokens, positions, lb, _ = make_request(n, L, H, seed=seed, pre_evict=pre_evict)
    ev = Evictor(
        EvictorConfig(budget=M, buffer=B, mode="per_head", policy=RetentionPolicy(sinks=sinks)),
        L,
        H,
    )
    scores = reference_scores(pool, tokens, positions, n, lb, sinks)
    live = live_of(pool, tokens)
    res = ev.enforce(pool, tokens, positions, n, lb)
    pool.check_integrity()
    after = live_of(pool, tokens)
    assert res.live_after == int(after.sum())
    for layer in range(L):
        for h in range(H):
            col_live = live[:, layer, h]
            count = int(col_live.sum())
            if count >= M + B:
                n_prot = int(torch.isposinf(scores[:, layer, h]).sum())
                assert int(after[:, layer, h].sum()) == min(count, max(M, n_prot))
                col = scores[:, layer, h].view(-1, 1)
                want = reference_keep_global(col, col_live.view(-1, 1), M)[:, 0]
                assert torch.equal(after[:, layer, h], want)
            else:
                assert torch.equal(after[:, layer, h], col_live)


# ---------------------------------------------------------------- pool interplay
def test_freed_head_slots_are_reusable():
    L, H, n, M = 2, 2, 6, 2
    pool, tokens, positions, lb, _ = make_request(n, L, H, seed=5, num_virtual=n + 2)
    assert pool.num_free == 0
    new = torch.tensor(
        sorted(set(range(pool.num_virtual)) - set(tokens.tolist()))[:2], dtype=torch.long
    )
    with pytest.raises(HeadSlotPoolFull):
        pool.alloc(new)
    ev = Evictor(EvictorConfig(budget=M, buffer=0, policy=RetentionPolicy(sinks=0)), L, H)
    res = ev.enforce(pool, tokens, positions, n, lb)
    pool.check_integrity()
    assert res.evicted == (n - M) * L * H == pool.num_free
    pool.alloc(new)
    pool.check_integrity()
    # Repeated enforcement over a growing request stays within budget + buffer.
    all_tokens = torch.cat([tokens, new])
    all_pos = torch.arange(all_tokens.numel())
    lb2 = torch.rand(pool.capacity) * -1
    res = ev.enforce(pool, all_tokens, all_pos, all_tokens.numel(), lb2)
    pool.check_integrity()
    assert res.live_after == L * H * M


def test_knorm_policy_uses_keys_and_empty_request():
    L, H, n, M = 1, 2, 6, 2
    pool, tokens, positions, lb, keys = make_request(n, L, H, seed=6, dim=4)
    ev = Evictor(EvictorConfig(budget=M, buffer=0, policy=KnormPolicy(sinks=0)), L, H)
    norms = keys.norm(dim=-1)[pool.slot_map[tokens].long()]  # [n, L, H]
    res = ev.enforce(pool, tokens, positions, n, None, keys)
    pool.check_integrity()
    kept_norms = norms[live_of(pool, tokens)]
    dropped = norms[~live_of(pool, tokens)]
    assert res.live_after == L * H * M
    assert kept_norms.max() <= dropped.min()
    assert ev.enforce(pool, tokens[:0], positions[:0], n, None, keys) == EvictionResult(0, 0, 0)
    with pytest.raises(ValueError, match="keys"):
        ev2 = Evictor(EvictorConfig(budget=1, buffer=0, policy=KnormPolicy(sinks=0)), L, H)
        ev2.enforce(pool, tokens, positions, n, None, None)


def test_retention_without_log_beta_is_an_error():
    pool, tokens, positions, _, _ = make_request(4, 1, 1, seed=7)
    ev = Evictor(EvictorConfig(budget=1, buffer=0, policy=RetentionPolicy()), 1, 1)
    with pytest.raises(ValueError, match="log_beta"):
        ev.enforce(pool, tokens, positions, 4, None)
    pool.check_integrity()
    assert pool.num_live == 4


def test_mismatched_pool_shape():
    pool, tokens, positions, lb, _ = make_request(3, 2, 2, seed=8)
    ev = Evictor(EvictorConfig(budget=1, buffer=0, policy=RetentionPolicy()), 2, 3)
    with pytest.raises(ValueError, match="layers"):
        ev.enforce(pool, tokens, positions, 3, lb)


# ---------------------------------------------------------------- triton selector
@pytest.mark.parametrize(
    "n,L,H,M,floor,seed,pre_evict",
    [(8, 1, 2, 2, 0, 0, 0.0), (10, 2, 2, 1, 1, 1, 0.3), (7, 2, 1, 3, 2, 2, 0.2)],
)
def test_triton_selector_matches_torch(n, L, H, M, floor, seed, pre_evict):
    kept = []
    for selector in ("torch", "triton"):
        pool, tokens, positions, lb, _ = make_request(n, L, H, seed=seed, pre_evict=pre_evict)
        cfg = EvictorConfig(
            budget=M, buffer=0, policy=RetentionPolicy(sinks=1), min_per_head=floor,
            selector=selector,
        )
        res = Evictor(cfg, L, H).enforce(pool, tokens, positions, n, lb)
        pool.check_integrity()
        assert res.evicted > 0
        kept.append((live_of(pool, tokens), res))
    assert torch.equal(kept[0][0], kept[1][0])
    assert kept[0][1] == kept[1][1]


# ---------------------------------------------------------------- config validation
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(budget=0), "budget"),
        (dict(budget=True), "budget"),
        (dict(budget=2.0), "budget"),
        (dict(buffer=-1), "buffer"),
        (dict(mode="layer"), "mode"),
        (dict(selector="cuda"), "selector"),
        (dict(policy="retention"), "policy"),
        (dict(min_per_head=-1), "min_per_head"),
        (dict(min_per_head=3, budget=2), r"min_per_head=3.*budget=2"),
        (dict(min_per_head=1, mode="per_head"), "min_per_head"),
        (dict(selector="triton", mode="per_head"), "triton"),
    ],
)
def test_config_validation(kwargs, match):
    base = dict(budget=4, policy=make_policy("retention"))
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        EvictorConfig(**base)


def test_config_defaults_and_evictor_args():
    cfg = EvictorConfig(budget=4, policy=StreamingPolicy())
    assert (cfg.buffer, cfg.mode, cfg.min_per_head, cfg.selector) == (128, "global", 0, "torch")
    EvictorConfig(budget=2, policy=StreamingPolicy(), min_per_head=2)  # floor == budget is fine
    with pytest.raises(ValueError, match="num_layers"):
        Evictor(cfg, 0, 1)
    with pytest.raises(ValueError, match="num_kv_heads"):
        Evictor(cfg, 1, True)
    with pytest.raises(ValueError, match="EvictorConfig"):
        Evictor("cfg", 1, 1)
    with pytest.raises(Exception):
        cfg.budget = 5  # frozen
