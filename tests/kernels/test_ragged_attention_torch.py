"""Vectorised torch ragged attention (the CPU serving path) == the looping torch reference.

The reference is itself checked against dense masked attention in test_ragged_attention.py."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sglang_evict.kernels.ragged_attention_torch as ra
from sglang_evict.kernels.ragged_attention_torch import (
    ragged_decode_attention_reference,
    ragged_decode_attention_torch,
    ragged_extend_attention_reference,
    ragged_extend_attention_torch,
)
from test_ragged_attention import ATOL, DTYPES, RTOL, build_problem, decode_args, extend_args


def with_index_dtype(p, dtype):
    return dict(p, indptr=p["indptr"].to(dtype), indices=p["indices"].to(dtype))


def drop_lists(p, req):
    """Request `req` keeps its tokens but loses every live head-slot (all its lists empty)."""
    ptr, H_kv = p["indptr"].tolist(), p["H_kv"]
    keep = [s for s in range(len(ptr) - 1) if s // H_kv != req]
    parts = [p["indices"][ptr[s]:ptr[s + 1]] for s in keep]
    counts = [0] * (len(ptr) - 1)
    for s in keep:
        counts[s] = ptr[s + 1] - ptr[s]
    indptr = torch.zeros(len(ptr), dtype=p["indptr"].dtype)
    indptr[1:] = torch.tensor(counts).cumsum(0)
    indices = torch.cat(parts) if parts else p["indices"][:0]
    return dict(p, indptr=indptr, indices=indices)


def assert_same(p, sm, dtype, num_kv_heads=None):
    got = ragged_decode_attention_torch(*decode_args(p), sm)
    exp = ragged_decode_attention_reference(*decode_args(p), sm)
    assert got.dtype == dtype and got.shape == p["q_dec"].shape
    torch.testing.assert_close(got.float(), exp.float(), atol=ATOL[dtype], rtol=RTOL[dtype])
    got = ragged_extend_attention_torch(*extend_args(p), sm, num_kv_heads=num_kv_heads)
    exp = ragged_extend_attention_reference(*extend_args(p), sm, num_kv_heads=num_kv_heads)
    assert got.dtype == dtype and got.shape == p["q_ext"].shape
    torch.testing.assert_close(got.float(), exp.float(), atol=ATOL[dtype], rtol=RTOL[dtype])
    return got


CASES = [
    # lens, H_kv, group, D, live_p
    ([5, 0, 30], 2, 3, 48, 0.6),
    ([40], 1, 4, 64, 0.9),
    ([12, 33], 2, 1, 64, 0.5),
    ([1, 7, 0], 3, 3, 16, 0.3),
    ([20, 20], 2, 4, 32, 0.0),  # every list empty -> o = 0
]


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-kv{c[1]}-g{c[2]}-d{c[3]}-p{c[4]}")
def test_torch_equals_reference(case, dtype, index_dtype):
    lens, H_kv, group, D, live_p = case
    p = build_problem(lens, H_kv, group, D, dtype, 200, live_p, seed=5 + D + len(lens))
    p = with_index_dtype(p, index_dtype)
    p["q_req"] = p["q_req"].to(index_dtype)
    got = assert_same(p, 1.0 / math.sqrt(D), dtype, num_kv_heads=H_kv)
    if live_p == 0.0:
        assert not got.any()


@pytest.mark.parametrize("small", [False, True], ids=["defaults", "tiny-blocks"])
@pytest.mark.parametrize("inline", [0, 1 << 40], ids=["gemm", "inline"])
def test_extend_many_tokens_per_request(monkeypatch, small, inline):
    """Requests with 1, 70 and 9 query tokens (interleaved, positions out of order): several
    blocks per request, padded last blocks, several chunks, keys trimmed per chunk."""
    if small:  # the same paths at test scale: many blocks, many chunks, both P @ V variants
        monkeypatch.setattr(ra, "_BLOCK_Q", 4)
        monkeypatch.setattr(ra, "_CHUNK_Q", 8)
        monkeypatch.setattr(ra, "_CHUNK_ELEMS", 4096)
        monkeypatch.setattr(ra, "_EBAG_MAX_ROWS", 12)
    monkeypatch.setattr(ra, "_INLINE_MACS", inline)
    g = torch.Generator().manual_seed(3)
    p = build_problem([30, 80, 12], 2, 3, 32, torch.float32, 300, 0.7, seed=4)
    n = [1, 70, 9]
    q_req = torch.repeat_interleave(torch.arange(3), torch.tensor(n))
    q_pos = torch.cat([torch.randint(0, L + 1, (c,), generator=g) for L, c in zip([30, 80, 12], n)])
    perm = torch.randperm(q_req.numel(), generator=g)
    p.update(q_req=q_req[perm], q_pos=q_pos[perm], q_ext=torch.randn(q_req.numel(), 6, 32, generator=g))
    assert_same(p, 0.2, torch.float32)


@pytest.mark.parametrize("ebag_rows, inline", [(0, 0), (8, 0), (8, 1 << 40)],
                         ids=["bmm", "embedding_bag", "inline"])
def test_both_pv_paths(monkeypatch, ebag_rows, inline):
    """float32 decode takes embedding_bag for P @ V, everything else a GEMM, and small chunks
    broadcast products: all must agree."""
    monkeypatch.setattr(ra, "_EBAG_MAX_ROWS", ebag_rows)
    monkeypatch.setattr(ra, "_INLINE_MACS", inline)
    p = build_problem([9, 0, 25, 3], 2, 3, 48, torch.float32, 200, 0.6, seed=8, q_per_req=1)
    assert_same(p, 0.3, torch.float32)


def test_invisible_queries_and_dead_requests():
    """A query before every key, and a request whose lists are all empty, get exactly 0."""
    p = drop_lists(build_problem([10, 15, 6], 2, 3, 32, torch.float32, 100, 0.8, seed=6), req=1)
    q_pos = p["q_pos"].clone()
    q_pos[::2] = -1  # sees no key (stored positions are >= 0)
    p["q_pos"] = q_pos
    o = assert_same(p, 0.25, torch.float32)
    assert not o[::2].any() and not o[p["q_req"] == 1].any()
    assert not ragged_decode_attention_torch(*decode_args(p), 0.25)[1].any()
    assert torch.isfinite(o).all()


def test_reads_only_listed_slots():
    """Head-slots no list names hold NaN (the first few rows always): padding never reads them."""
    p = build_problem([7, 0, 19], 2, 3, 32, torch.float32, 120, 0.5, seed=12)
    nan_rows = torch.full((4, 32), math.nan)
    p.update(k_slots=torch.cat([nan_rows, p["k_slots"]]), v_slots=torch.cat([nan_rows, p["v_slots"]]),
             slot_pos=torch.cat([torch.zeros(4, dtype=torch.int64), p["slot_pos"]]),
             indices=p["indices"] + 4)
    unlisted = torch.ones(124, dtype=torch.bool)
    unlisted[p["indices"].long()] = False
    p["k_slots"][unlisted] = math.nan
    p["v_slots"][unlisted] = math.nan
    assert torch.isfinite(assert_same(p, 0.2, torch.float32)).all()


def test_list_order_does_not_matter():
    p = build_problem([25, 9], 2, 3, 48, torch.float32, 120, 0.9, seed=5, q_per_req=3)
    a = ragged_extend_attention_torch(*extend_args(p), 0.2)
    ptr = p["indptr"].tolist()
    rev = torch.cat([p["indices"][ptr[s]:ptr[s + 1]].flip(0) for s in range(len(ptr) - 1)])
    b = ragged_extend_attention_torch(*extend_args(dict(p, indices=rev)), 0.2)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_strided_q_and_slot_views():
    p = build_problem([15, 22], 1, 3, 64, torch.float32, 80, 0.7, seed=9)
    big_q = torch.randn(p["q_dec"].shape[0], 3, 2 * 64)
    big_q[:, :, ::2] = p["q_dec"]
    kbuf = torch.randn(80, 2, 64)
    kbuf[:, 1] = p["k_slots"]
    vbuf = torch.randn(80, 2, 64)
    vbuf[:, 0] = p["v_slots"]
    got = ragged_decode_attention_torch(big_q[:, :, ::2], kbuf[:, 1], vbuf[:, 0], p["indptr"], p["indices"], 0.1)
    exp = ragged_decode_attention_reference(*decode_args(p), 0.1)
    torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)
    # Queries whose row stride is the smallest (a transposed buffer), with several kv heads.
    p = build_problem([6, 11, 4], 2, 3, 32, torch.float32, 80, 0.7, seed=10)
    for name in ("q_dec", "q_ext"):
        p[name] = p[name].transpose(0, 1).contiguous().transpose(0, 1)
    assert_same(p, 0.1, torch.float32)


def test_zero_sizes():
    p = build_problem([4], 1, 1, 48, torch.float32, 10, 1.0, seed=0)
    args = list(extend_args(p))
    args[:3] = [a[:0] for a in args[:3]]
    assert ragged_extend_attention_torch(*args, 0.1, num_kv_heads=1).shape == (0, 1, 48)
    assert ragged_extend_attention_torch(*args, 0.1).shape == (0, 1, 48)
    out = ragged_decode_attention_torch(torch.zeros(0, 2, 48), p["k_slots"], p["v_slots"],
                                        torch.zeros(1, dtype=torch.int32), p["indices"][:0], 0.1)
    assert out.shape == (0, 2, 48)
    # No live slot anywhere (and an empty pool): zeros, not NaN.
    q = torch.randn(2, 3, 8)
    empty = torch.zeros(0, 8)
    out = ragged_decode_attention_torch(q, empty, empty, torch.zeros(3, dtype=torch.int64),
                                        torch.zeros(0, dtype=torch.int64), 0.1)
    assert out.shape == (2, 3, 8) and not out.any()


# ----------------------------------------------------------------------------- validation
def raised(fn, *args, **kw):
    with pytest.raises(ValueError) as e:
        fn(*args, **kw)
    return str(e.value)


def test_decode_validation_matches_reference():
    p = build_problem([6, 3], 2, 3, 48, torch.float32, 30, 1.0, seed=2)
    q, k, v, indptr, indices = decode_args(p)
    bad = [
        (q, k, v, indptr, indices + 1000, 0.1),  # head-slot out of range
        (q, k, v, indptr, indices[:-1], 0.1),  # indptr[-1] != len(indices)
        (q, k, v, indptr.flip(0), indices, 0.1),  # indptr not starting at 0
        (q, k, v, torch.zeros(9, dtype=torch.int32), indices[:0], 0.1),  # H_kv=4 does not divide 6
        (q, k[:, :40], v, indptr, indices, 0.1),
        (q, k, v, indptr, indices, math.nan),
    ]
    swapped = indptr.clone()
    swapped[1], swapped[2] = indptr[2], indptr[1]  # decreasing step
    bad.append((q, k, v, swapped, indices, 0.1))
    for args in bad:
        msg = raised(ragged_decode_attention_reference, *args)
        assert raised(ragged_decode_attention_torch, *args) == msg


def test_extend_validation_matches_reference():
    p = build_problem([6, 3], 2, 3, 48, torch.float32, 30, 1.0, seed=2, q_per_req=2)
    good = dict(zip(["q", "q_pos", "q_req", "k_slots", "v_slots", "slot_pos", "indptr", "indices"],
                    extend_args(p)), sm_scale=0.1, num_kv_heads=2)
    bad = [
        dict(q_req=torch.full_like(p["q_req"], 5)),  # request 5 does not exist (R = 2)
        dict(q_req=p["q_req"] - 1),
        dict(indices=p["indices"] - 100),
        dict(indices=p["indices"] - 100, q_req=p["q_req"] + 7),  # first failing check wins
        dict(num_kv_heads=4),
        dict(slot_pos=p["slot_pos"].float()),
        dict(q_pos=p["q_pos"][:-1]),
    ]
    for change in bad:
        kw = dict(good, **change)
        msg = raised(ragged_extend_attention_reference, **kw)
        assert raised(ragged_extend_attention_torch, **kw) == msg


# ----------------------------------------------------------------------------- hypothesis
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lens=st.lists(st.integers(0, 30), min_size=1, max_size=4),
    H_kv=st.sampled_from([1, 2, 3]),
    group=st.sampled_from([1, 3, 4]),
    D=st.sampled_from([16, 40]),
    dtype=st.sampled_from(DTYPES),
    index_dtype=st.sampled_from([torch.int32, torch.int64]),
    live_p=st.sampled_from([0.0, 0.3, 0.8, 1.0]),
    dead=st.integers(-1, 3),
    infer_heads=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_torch_equals_reference(lens, H_kv, group, D, dtype, index_dtype, live_p, dead,
                                           infer_heads, seed):
    p = build_problem(lens, H_kv, group, D, dtype, 400, live_p, seed)
    if 0 <= dead < len(lens):
        p = drop_lists(p, dead)
    p = with_index_dtype(p, index_dtype)
    assert_same(p, 1.0 / math.sqrt(D), dtype, num_kv_heads=None if infer_heads else H_kv)
