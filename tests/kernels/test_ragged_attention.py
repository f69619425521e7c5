"""Ragged attention over live head-slot lists: Triton == torch reference == dense masked attention.

Runs on CPU tensors under TRITON_INTERPRET=1, so shapes stay small."""

import os

# Before triton is imported (conftest.py does the same; this keeps the module runnable alone).
os.environ.setdefault("TRITON_INTERPRET", "1")

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglang_evict.cache.head_slots import HeadSlotPool
from sglang_evict.kernels.ragged_attention import ragged_decode_attention, ragged_extend_attention
from sglang_evict.kernels.ragged_attention_torch import (
    ragged_decode_attention_reference,
    ragged_extend_attention_reference,
    ragged_extend_attention_torch,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
RTOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


# ----------------------------------------------------------------------------- problem builder
def build_problem(lens, H_kv, group, D, dtype, capacity, live_p, seed, q_per_req=None):
    """Dense per-request K/V [L_r, H_kv, D] at positions 0..L_r-1, a random live mask [L_r, H_kv],
    live entries stored into random distinct head-slots, indptr/indices in shuffled order.

    Returns a dict with the ragged inputs and the dense ones for the masked reference."""
    g = torch.Generator().manual_seed(seed)
    H_q = H_kv * group
    dense_k = [torch.randn(L, H_kv, D, generator=g) for L in lens]
    dense_v = [torch.randn(L, H_kv, D, generator=g) for L in lens]
    live = [torch.rand(L, H_kv, generator=g) < live_p for L in lens]
    nnz = sum(int(m.sum()) for m in live)
    assert nnz <= capacity
    # Garbage everywhere, then the live rows: untouched head-slots must never be read.
    k_slots = (torch.randn(capacity, D, generator=g) * 50).to(dtype)
    v_slots = (torch.randn(capacity, D, generator=g) * 50).to(dtype)
    slot_pos = torch.randint(0, 1000, (capacity,), generator=g, dtype=torch.int64)
    free = torch.randperm(capacity, generator=g)
    counts, parts, used = [], [], 0
    for r, L in enumerate(lens):
        for h in range(H_kv):
            toks = torch.nonzero(live[r][:, h]).flatten()
            slots = free[used:used + toks.numel()]
            used += toks.numel()
            k_slots[slots] = dense_k[r][toks, h].to(dtype)
            v_slots[slots] = dense_v[r][toks, h].to(dtype)
            slot_pos[slots] = toks
            order = torch.randperm(toks.numel(), generator=g)
            parts.append(slots[order])
            counts.append(toks.numel())
    indptr = torch.zeros(len(lens) * H_kv + 1, dtype=torch.int32)
    indptr[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    indices = torch.cat(parts).to(torch.int32) if parts else torch.zeros(0, dtype=torch.int32)
    # The dense reference sees the stored (rounded) values.
    dense_k = [k.to(dtype).float() for k in dense_k]
    dense_v = [v.to(dtype).float() for v in dense_v]

    q_dec = torch.randn(len(lens), H_q, D, generator=g).to(dtype)
    # Extend: each request gets query tokens at random positions (incl. ones beyond L_r - 1).
    q_req, q_pos = [], []
    for r, L in enumerate(lens):
        n = q_per_req if q_per_req is not None else int(torch.randint(1, 4, (1,), generator=g))
        for _ in range(n):
            q_req.append(r)
            q_pos.append(int(torch.randint(0, max(L, 1) + 1, (1,), generator=g)))
    perm = torch.randperm(len(q_req), generator=g)  # tokens of different requests interleaved
    q_req = torch.tensor(q_req, dtype=torch.int64)[perm]
    q_pos = torch.tensor(q_pos, dtype=torch.int64)[perm]
    q_ext = torch.randn(len(q_req), H_q, D, generator=g).to(dtype)
    return dict(
        k_slots=k_slots, v_slots=v_slots, slot_pos=slot_pos, indptr=indptr, indices=indices,
        dense_k=dense_k, dense_v=dense_v, live=live, q_dec=q_dec, q_ext=q_ext,
        q_req=q_req, q_pos=q_pos, H_kv=H_kv, group=group,
    )


def dense_masked(q, dense_k, dense_v, live, req, qpos, group, sm_scale):
    """Plain softmax attention over request req's dense keys; non-live keys (and, when qpos is
    given, keys at positions > qpos) masked to -inf. q [H_q, D] -> [H_q, D] float32."""
    k, v, m = dense_k[req], dense_v[req], live[req]  # [L, H_kv, D], [L, H_kv]
    L = k.shape[0]
    H_q = q.shape[0]
    out = torch.zeros(H_q, q.shape[1])
    for j in range(H_q):
        h = j // group
        s = (k[:, h] @ q[j].float()) * sm_scale  # [L]
        vis = m[:, h].clone()
        if qpos is not None:
            vis &= torch.arange(L) <= qpos
        if not bool(vis.any()):
            continue
        s = s.masked_fill(~vis, -math.inf)
        out[j] = torch.softmax(s, dim=0) @ v[:, h]
    return out


def decode_args(p):
    return (p["q_dec"], p["k_slots"], p["v_slots"], p["indptr"], p["indices"])


def extend_args(p):
    return (p["q_ext"], p["q_pos"], p["q_req"], p["k_slots"], p["v_slots"], p["slot_pos"],
            p["indptr"], p["indices"])


CASES = [
    # lens, H_kv, group, D, live_p
    ([5, 0, 30], 2, 3, 48, 0.6),
    ([40], 1, 3, 64, 0.9),
    ([12, 33], 2, 1, 64, 0.5),
    ([1, 7, 0], 1, 1, 48, 0.3),
    ([20, 20], 2, 3, 80, 0.0),  # every list empty -> o = 0
]


# ----------------------------------------------------------------------------- reference == dense
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-kv{c[1]}-g{c[2]}-d{c[3]}-p{c[4]}")
def test_reference_equals_dense_masked(case):
    lens, H_kv, group, D, live_p = case
    p = build_problem(lens, H_kv, group, D, torch.float32, 200, live_p, seed=len(lens) * 7 + D)
    sm = 1.0 / math.sqrt(D)
    o = ragged_decode_attention_reference(*decode_args(p), sm)
    for r in range(len(lens)):
        exp = dense_masked(p["q_dec"][r], p["dense_k"], p["dense_v"], p["live"], r, None, group, sm)
        torch.testing.assert_close(o[r], exp, atol=1e-5, rtol=1e-5)
    o = ragged_extend_attention_reference(*extend_args(p), sm, num_kv_heads=H_kv)
    for t in range(p["q_ext"].shape[0]):
        r, qp = int(p["q_req"][t]), int(p["q_pos"][t])
        exp = dense_masked(p["q_ext"][t], p["dense_k"], p["dense_v"], p["live"], r, qp, group, sm)
        torch.testing.assert_close(o[t], exp, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: f"{c[0]}-kv{c[1]}-g{c[2]}-d{c[3]}")
def test_triton_equals_dense_masked(case):
    """The acceptance test, for the kernels themselves."""
    lens, H_kv, group, D, live_p = case
    p = build_problem(lens, H_kv, group, D, torch.float32, 200, live_p, seed=11 + D)
    sm = 0.125
    o = ragged_decode_attention(*decode_args(p), sm)
    for r in range(len(lens)):
        exp = dense_masked(p["q_dec"][r], p["dense_k"], p["dense_v"], p["live"], r, None, group, sm)
        torch.testing.assert_close(o[r], exp, atol=1e-5, rtol=1e-5)
    o = ragged_extend_attention(*extend_args(p), sm)
    for t in range(p["q_ext"].shape[0]):
        r, qp = int(p["q_req"][t]), int(p["q_pos"][t])
        exp = dense_masked(p["q_ext"][t], p["dense_k"], p["dense_v"], p["live"], r, qp, group, sm)
        torch.testing.assert_close(o[t], exp, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- triton == reference
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-kv{c[1]}-g{c[2]}-d{c[3]}-p{c[4]}")
def test_triton_equals_reference(case, dtype):
    lens, H_kv, group, D, live_p = case
    p = build_problem(lens, H_kv, group, D, dtype, 200, live_p, seed=3 + D + len(lens))
    sm = 1.0 / math.sqrt(D)
    got = ragged_decode_attention(*decode_args(p), sm)
    exp = ragged_decode_attention_reference(*decode_args(p), sm)
    assert got.dtype == dtype and got.shape == p["q_dec"].shape
    torch.testing.assert_close(got.float(), exp.float(), atol=ATOL[dtype], rtol=RTOL[dtype])
    got = ragged_extend_attention(*extend_args(p), sm)
    exp = ragged_extend_attention_reference(*extend_args(p), sm)
    assert got.dtype == dtype and got.shape == p["q_ext"].shape
    torch.testing.assert_close(got.float(), exp.float(), atol=ATOL[dtype], rtol=RTOL[dtype])
    if live_p == 0.0:
        assert not got.any() and not ragged_decode_attention(*decode_args(p), sm).any()


@pytest.mark.parametrize("block_n", [4, 8])
def test_many_blocks_online_softmax(monkeypatch, block_n):
    """Small key blocks: many online-softmax rescales per list, masked tails, empty lists."""
    import sglang_evict.kernels.ragged_attention as ra

    monkeypatch.setattr(ra, "_BLOCK_N", block_n)
    p = build_problem([5, 0, 30], 2, 3, 48, torch.float32, 200, 0.7, seed=21)
    sm = 0.3
    torch.testing.assert_close(
        ragged_decode_attention(*decode_args(p), sm),
        ragged_decode_attention_reference(*decode_args(p), sm), atol=1e-5, rtol=1e-5,
    )
    torch.testing.assert_close(
        ragged_extend_attention(*extend_args(p), sm),
        ragged_extend_attention_reference(*extend_args(p), sm), atol=1e-5, rtol=1e-5,
    )


def test_extend_causal_by_position_not_list_order():
    """Reversing every list changes nothing; the new tokens' own keys are visible to themselves."""
    p = build_problem([25, 9], 2, 3, 48, torch.float32, 120, 1.0, seed=5, q_per_req=3)
    sm = 0.2
    a = ragged_extend_attention(*extend_args(p), sm)
    ptr = p["indptr"].tolist()
    rev = torch.cat([p["indices"][ptr[s]:ptr[s + 1]].flip(0) for s in range(len(ptr) - 1)])
    args = list(extend_args(p))
    args[7] = rev
    b = ragged_extend_attention(*args, sm)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # q at position 0 with every key live sees exactly one key (position 0): o == v at position 0.
    q_pos = torch.zeros_like(p["q_pos"])
    args = list(extend_args(p))
    args[1] = q_pos
    o = ragged_extend_attention(*args, sm)
    for t in range(o.shape[0]):
        r = int(p["q_req"][t])
        for j in range(6):
            torch.testing.assert_close(o[t, j], p["dense_v"][r][0, j // 3], atol=1e-6, rtol=1e-6)


def test_strided_q_and_slot_views():
    """Non-contiguous q and k/v views (rows of a wider per-layer buffer) are read through strides."""
    p = build_problem([15, 22], 1, 3, 64, torch.float32, 80, 0.7, seed=9)
    sm = 0.1
    big_q = torch.randn(p["q_dec"].shape[0], 3, 2 * 64)
    big_q[:, :, ::2] = p["q_dec"]
    q = big_q[:, :, ::2]
    kbuf = torch.randn(80, 2, 64)
    kbuf[:, 1] = p["k_slots"]
    vbuf = torch.randn(80, 2, 64)
    vbuf[:, 0] = p["v_slots"]
    got = ragged_decode_attention(q, kbuf[:, 1], vbuf[:, 0], p["indptr"], p["indices"], sm)
    exp = ragged_decode_attention_reference(*decode_args(p), sm)
    torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)


def test_head_slot_pool_live_indices_layout():
    """Consumes HeadSlotPool.live_indices directly (token order, int32) for one layer."""
    H_kv, group, D, L = 2, 3, 48, 10
    pool = HeadSlotPool(num_virtual=32, num_layers=2, num_kv_heads=H_kv, capacity=2 * 20 * H_kv)
    reqs = [torch.arange(0, L), torch.arange(L, L + 7)]
    slots = [pool.alloc(ids) for ids in reqs]  # [T, layers, H]
    g = torch.Generator().manual_seed(1)
    keep = [torch.rand(ids.numel(), 2, H_kv, generator=g) < 0.6 for ids in reqs]
    for ids, kp in zip(reqs, keep):
        pool.evict_mask(ids, kp)
    layer = 1
    li = pool.live_indices(reqs, layer)
    cap = pool.capacity
    k_slots = torch.randn(cap, D, generator=g)
    v_slots = torch.randn(cap, D, generator=g)
    slot_pos = torch.zeros(cap, dtype=torch.int64)
    for ids, sl in zip(reqs, slots):
        slot_pos[sl[:, layer].flatten().long()] = torch.arange(ids.numel()).repeat_interleave(H_kv)
    q = torch.randn(2, H_kv * group, D, generator=g)
    got = ragged_decode_attention(q, k_slots, v_slots, li.indptr, li.indices, 0.15)
    dense_k = [k_slots[sl[:, layer].long()] .reshape(-1, H_kv, D) for sl in slots]
    dense_v = [v_slots[sl[:, layer].long()] .reshape(-1, H_kv, D) for sl in slots]
    live = [kp[:, layer] for kp in keep]
    for r in range(2):
        exp = dense_masked(q[r], dense_k, dense_v, live, r, None, group, 0.15)
        torch.testing.assert_close(got[r], exp, atol=1e-5, rtol=1e-5)
    q_pos = torch.tensor([3, 9, 0, 6])
    q_req = torch.tensor([0, 0, 1, 1], dtype=torch.int32)
    qe = torch.randn(4, H_kv * group, D, generator=g)
    got = ragged_extend_attention(qe, q_pos, q_req, k_slots, v_slots, slot_pos, li.indptr, li.indices,
                                  0.15, num_kv_heads=H_kv)
    for t in range(4):
        r = int(q_req[t])
        exp = dense_masked(qe[t], dense_k, dense_v, live, r, int(q_pos[t]), group, 0.15)
        torch.testing.assert_close(got[t], exp, atol=1e-5, rtol=1e-5)


def test_zero_queries():
    p = build_problem([4], 1, 1, 48, torch.float32, 10, 1.0, seed=0)
    for fn in (ragged_extend_attention, ragged_extend_attention_reference):
        args = list(extend_args(p))
        args[0] = args[0][:0]
        args[1] = args[1][:0]
        args[2] = args[2][:0]
        assert fn(*args, 0.1, num_kv_heads=1).shape == (0, 1, 48)
    for fn in (ragged_decode_attention, ragged_decode_attention_reference):
        out = fn(torch.zeros(0, 2, 48), p["k_slots"], p["v_slots"], torch.zeros(1, dtype=torch.int32),
                 p["indices"][:0], 0.1)
        assert out.shape == (0, 2, 48)


# ----------------------------------------------------------------------------- validation
DECODE_FNS = pytest.mark.parametrize(
    "dec", [ragged_decode_attention, ragged_decode_attention_reference], ids=["triton", "reference"]
)
EXTEND_FNS = pytest.mark.parametrize(
    "ext", [ragged_extend_attention, ragged_extend_attention_reference], ids=["triton", "reference"]
)


@DECODE_FNS
def test_decode_validation(dec):
    p = build_problem([6, 3], 2, 3, 48, torch.float32, 30, 1.0, seed=2)
    q, k, v, indptr, indices = decode_args(p)
    bad = {
        "q": [q[0], q.to(torch.int32)],
        "k_slots": [k.to(torch.float64), k[:, :40], k[None]],
        "v_slots": [v[:-1], v.half()],
        "indptr": [indptr[:-1], indptr.float(), indptr[None], indptr[:0]],
        "indices": [indices.float(), indices[None], (indices + 1000), indices[:-1]],
        "sm_scale": [float("nan"), "x"],
    }
    good = dict(q=q, k_slots=k, v_slots=v, indptr=indptr, indices=indices, sm_scale=0.1)
    for name, values in bad.items():
        for val in values:
            kw = dict(good, **{name: val})
            # indices[:-1] is caught through indptr[-1] != len(indices)
            expect = "indptr" if name == "indices" and val.dim() == 1 and val.numel() < indices.numel() else name
            with pytest.raises(ValueError, match=f"^{expect}:"):
                dec(**kw)
    # H_kv = 4 (from len(indptr) = 9, R = 2) does not divide H_q = 6.
    with pytest.raises(ValueError, match="^indptr:"):
        dec(q, k, v, torch.zeros(9, dtype=torch.int32), indices[:0], 0.1)


@EXTEND_FNS
def test_extend_validation(ext):
    p = build_problem([6, 3], 2, 3, 48, torch.float32, 30, 1.0, seed=2, q_per_req=2)
    q, q_pos, q_req, k, v, slot_pos, indptr, indices = extend_args(p)
    good = dict(q=q, q_pos=q_pos, q_req=q_req, k_slots=k, v_slots=v, slot_pos=slot_pos,
                indptr=indptr, indices=indices, sm_scale=0.1)
    bad = {
        "q": [q.double(), q[:, :, None]],
        "q_pos": [q_pos[:-1], q_pos.float()],
        "q_req": [q_req[:-1], q_req.float(), q_req - 1],
        "k_slots": [k[:, :8]],
        "v_slots": [v.bfloat16()],
        "slot_pos": [slot_pos[:-1], slot_pos.float()],
        "indptr": [indptr[:-1].contiguous(), indptr.to(torch.float16)],
        "indices": [indices.float(), indices - 100],
    }
    for name, values in bad.items():
        for val in values:
            with pytest.raises(ValueError, match=f"^{name}:"):
                ext(**dict(good, **{name: val}), num_kv_heads=2)
    for nkv in (0, 4, True):
        with pytest.raises(ValueError, match="^num_kv_heads:"):
            ext(**good, num_kv_heads=nkv)
    with pytest.raises(ValueError, match="^q_req:"):  # request 5 does not exist (R = 2)
        ext(**dict(good, q_req=torch.full_like(q_req, 5)), num_kv_heads=2)
    with pytest.raises(ValueError, match="^k_slots:"):
        ext(**dict(good, k_slots="nope"))


# ----------------------------------------------------------------------------- hypothesis
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lens=st.lists(st.integers(0, 33), min_size=1, max_size=3),  # nnz <= 3*33*2 <= 200
    H_kv=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 3]),
    D=st.sampled_from([48, 64]),
    dtype=st.sampled_from(DTYPES),
    live_p=st.sampled_from([0.0, 0.3, 0.8, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_triton_reference_dense(lens, H_kv, group, D, dtype, live_p, seed):
    p = build_problem(lens, H_kv, group, D, dtype, 200, live_p, seed)
    sm = 1.0 / math.sqrt(D)
    atol, rtol = ATOL[dtype], RTOL[dtype]
    dec = ragged_decode_attention(*decode_args(p), sm)
    dec_ref = ragged_decode_attention_reference(*decode_args(p), sm)
    torch.testing.assert_close(dec.float(), dec_ref.float(), atol=atol, rtol=rtol)
    ext = ragged_extend_attention(*extend_args(p), sm, num_kv_heads=H_kv)
    ext_ref = ragged_extend_attention_reference(*extend_args(p), sm, num_kv_heads=H_kv)
    torch.testing.assert_close(ext.float(), ext_ref.float(), atol=atol, rtol=rtol)
    # Against dense masked attention (query rounded as the kernels saw it; output rounded once).
    for r in range(len(lens)):
        exp = dense_masked(p["q_dec"][r], p["dense_k"], p["dense_v"], p["live"], r, None, group, sm)
        torch.testing.assert_close(dec_ref[r].float(), exp.to(dtype).float(), atol=atol, rtol=rtol)
    for t in range(p["q_ext"].shape[0]):
        r, qp = int(p["q_req"][t]), int(p["q_pos"][t])
        exp = dense_masked(p["q_ext"][t], p["dense_k"], p["dense_v"], p["live"], r, qp, group, sm)
        torch.testing.assert_close(ext_ref[t].float(), exp.to(dtype).float(), atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------- decode splits / GQA
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("num_splits", [1, 3, 16])
def test_decode_split_kv_and_gqa_ratios(group, num_splits):
    """The grouped split-KV decode equals the reference whatever the split count, for every GQA
    ratio; splits that get no key (more splits than keys) merge as nothing."""
    p = build_problem([1, 0, 37, 90], 2, group, 64, torch.float32, 400, 0.7, seed=group + num_splits)
    sm = 0.125
    got = ragged_decode_attention(*decode_args(p), sm, num_splits=num_splits)
    exp = ragged_decode_attention_reference(*decode_args(p), sm)
    torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)


def test_decode_long_list_many_splits():
    """A 2K-entry list split 8 ways, bf16 K/V: the log-sum-exp merge keeps the softmax exact."""
    p = build_problem([2000], 1, 4, 64, torch.bfloat16, 2100, 1.0, seed=7)
    sm = 0.125
    got = ragged_decode_attention(*decode_args(p), sm, num_splits=8)
    exp = ragged_decode_attention_reference(*decode_args(p), sm)
    torch.testing.assert_close(got.float(), exp.float(), atol=ATOL[torch.bfloat16], rtol=RTOL[torch.bfloat16])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_extend_with_position_sorted_lists_stops_early_and_agrees(seed):
    """Lists in position order (as the live lists keep them) with positions_sorted=True: each
    query tile binary-searches its last visible key; the result equals the reference's, which
    reads every key. Queries are interleaved across requests and sit at every position."""
    p = build_problem([31, 0, 70], 2, 3, 48, torch.float32, 300, 0.8, seed=seed, q_per_req=5)
    indptr, indices, pos = p["indptr"].long(), p["indices"].clone(), p["slot_pos"]
    for s in range(indptr.numel() - 1):
        a, b = int(indptr[s]), int(indptr[s + 1])
        seg = indices[a:b]
        indices[a:b] = seg[torch.argsort(pos[seg.long()], stable=True)]
    for shrink in (1, 4):  # /4: every tile's last query sits well inside its lists
        args = (p["q_ext"], p["q_pos"] // shrink, p["q_req"], p["k_slots"], p["v_slots"], pos,
                p["indptr"], indices, 0.2)
        got = ragged_extend_attention(*args, num_kv_heads=2, positions_sorted=True)
        exp = ragged_extend_attention_reference(*args, num_kv_heads=2)
        torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)
        twin = ragged_extend_attention_torch(*args, num_kv_heads=2, positions_sorted=True)
        torch.testing.assert_close(twin, exp, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_absolute_offsets_into_a_larger_buffer(seed):
    """One layer's lists as a slice of an all-layer indptr: offsets start past 0 and the indices
    buffer runs on beyond indptr[-1] (-1 there, and garbage before indptr[0]). Every
    implementation reads only indices[indptr[0]:indptr[-1]] and gives the plain layout's
    result."""
    from sglang_evict.kernels.ragged_attention_torch import ragged_decode_attention_torch

    p = build_problem([9, 0, 25], 2, 3, 48, torch.float32, 200, 0.7, seed=seed, q_per_req=3)
    before, after = 11, 17
    shifted_ptr = p["indptr"].long() + before
    shifted = torch.cat([torch.randint(0, 200, (before,), dtype=torch.int32), p["indices"],
                         torch.full((after,), -1, dtype=torch.int32)])
    q, k, v = p["q_dec"], p["k_slots"], p["v_slots"]
    exp = ragged_decode_attention_reference(q, k, v, p["indptr"], p["indices"], 0.3)
    for fn in (ragged_decode_attention, ragged_decode_attention_torch, ragged_decode_attention_reference):
        torch.testing.assert_close(fn(q, k, v, shifted_ptr, shifted, 0.3), exp, atol=1e-5, rtol=1e-5)
    ext = (p["q_ext"], p["q_pos"], p["q_req"], k, v, p["slot_pos"])
    exp = ragged_extend_attention_reference(*ext, p["indptr"], p["indices"], 0.3, num_kv_heads=2)
    for fn in (ragged_extend_attention, ragged_extend_attention_torch, ragged_extend_attention_reference):
        got = fn(*ext, shifted_ptr, shifted, 0.3, num_kv_heads=2)
        torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)
    # a listed entry out of range is still caught; the unlisted -1 tail is not an error
    bad = shifted.clone()
    bad[before] = 10_000
    with pytest.raises(ValueError, match="^indices:"):
        ragged_decode_attention(q, k, v, shifted_ptr, bad, 0.3)
    with pytest.raises(ValueError, match="^indptr:"):
        ragged_decode_attention(q, k, v, shifted_ptr + after + 1, shifted, 0.3)
