"""store_head_slots (Triton) against store_head_slots_reference (torch): same bits, same errors,
and end to end with HeadSlotPool. Runs on CPU tensors under TRITON_INTERPRET=1: shapes stay small."""

import os
import re

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglang_evict.cache.head_slots import EVICTED, HeadSlotPool
from sglang_evict.kernels.head_store import (
    store_head_slots,
    store_head_slots_reference,
    store_head_slots_torch,
)

CACHE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Sentinels the kernel can never write: log beta <= 0 and positions >= 0.
LB_SENTINEL = 7.5
POS_SENTINEL = -3

BOTH = pytest.mark.parametrize(
    "fn", [store_head_slots, store_head_slots_reference, store_head_slots_torch],
    ids=["triton", "reference", "torch"],
)


def make_buffers(capacity, head_dim, dtype, gen):
    ks = torch.randn(capacity, head_dim, generator=gen).to(dtype)
    vs = torch.randn(capacity, head_dim, generator=gen).to(dtype)
    lbs = torch.full((capacity,), LB_SENTINEL)
    ps = torch.full((capacity,), POS_SENTINEL, dtype=torch.int64)
    return ks, vs, lbs, ps


def make_tokens(T, H, D, dtype, capacity, gen, drop_frac=0.0, lb_dtype=torch.float32):
    k = torch.randn(T, H, D, generator=gen).to(dtype)
    v = torch.randn(T, H, D, generator=gen).to(dtype)
    log_beta = torch.nn.functional.logsigmoid(3 * torch.randn(T, H, generator=gen)).to(lb_dtype)
    positions = torch.randint(0, 1 << 40, (T,), generator=gen)
    slot = torch.randperm(capacity, generator=gen)[: T * H].view(T, H).clone()
    if drop_frac:
        slot[torch.rand(T, H, generator=gen) < drop_frac] = -1
    return k, v, log_beta, positions, slot


def clone(bufs):
    return tuple(t.clone() for t in bufs)


def assert_equal_bufs(actual, expected):
    for name, a, e in zip(("k_slots", "v_slots", "log_beta_slots", "pos_slots"), actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert torch.equal(a, e), f"{name} differs"


def run_both(bufs, *tokens):
    """Triton and the CPU serving twin each write the reference's bits."""
    tri, ref, twin = clone(bufs), clone(bufs), clone(bufs)
    store_head_slots(*tri, *tokens)
    store_head_slots_reference(*ref, *tokens)
    store_head_slots_torch(*twin, *tokens)
    assert_equal_bufs(tri, ref)
    assert_equal_bufs(twin, ref)
    return tri


def check_contents(before, after, k, v, log_beta, positions, slot):
    """Every written head-slot holds its (token, head) values; every other row is unchanged."""
    ks, vs, lbs, ps = after
    written = torch.zeros(ks.shape[0], dtype=torch.bool)
    T, H = slot.shape
    for t in range(T):
        for h in range(H):
            s = int(slot[t, h])
            if s < 0:
                continue
            written[s] = True
            assert torch.equal(ks[s], k[t, h].to(ks.dtype))
            assert torch.equal(vs[s], v[t, h].to(vs.dtype))
            assert lbs[s].item() == log_beta[t, h].to(torch.float32).item()
            assert int(ps[s]) == int(positions[t])
    for a, b in zip(after, before):
        assert torch.equal(a[~written], b[~written])


@pytest.mark.parametrize("dtype", CACHE_DTYPES, ids=str)
@pytest.mark.parametrize("D", [48, 64])
@pytest.mark.parametrize("H", [1, 3])
@pytest.mark.parametrize("T", [1, 7, 33])
def test_triton_matches_reference(T, H, D, dtype):
    gen = torch.Generator().manual_seed(T * 1000 + H * 100 + D)
    capacity = T * H + 11
    bufs = make_buffers(capacity, D, dtype, gen)
    tokens = make_tokens(T, H, D, torch.float32, capacity, gen, drop_frac=0.3)
    if T > 1:
        tokens[4][0, 0] = -1  # at least one dropped entry
    after = run_both(bufs, *tokens)
    check_contents(bufs, after, *tokens)


def test_all_negative_slots_leave_buffers_untouched():
    gen = torch.Generator().manual_seed(1)
    bufs = make_buffers(20, 48, torch.float16, gen)
    tokens = list(make_tokens(5, 3, 48, torch.float16, 20, gen))
    tokens[4] = torch.full((5, 3), -1, dtype=torch.int64)
    after = run_both(bufs, *tokens)
    assert_equal_bufs(after, bufs)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter's numpy warns on float16 inf
@pytest.mark.parametrize("src", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("dst", CACHE_DTYPES, ids=str)
def test_cast_on_store_rounds_like_torch(src, dst):
    gen = torch.Generator().manual_seed(2)
    bufs = make_buffers(40, 64, dst, gen)
    tokens = list(make_tokens(9, 3, 64, src, 40, gen, drop_frac=0.2, lb_dtype=src))
    # Values that stress rounding: ties, subnormals, overflow to inf.
    tokens[0] = tokens[0] * torch.tensor(1e-39 if src != torch.float16 else 1e-6).to(src)
    tokens[1] = tokens[1] * torch.tensor(3e4 if src == torch.float16 else 1e5).to(src)
    after = run_both(bufs, *tokens)
    check_contents(bufs, after, *tokens)


def test_strided_inputs_and_buffer_views_int32_indices():
    gen = torch.Generator().manual_seed(3)
    T, H, D, cap = 6, 3, 48, 30
    # Buffers are column slices of wider tensors; inputs are transposed / strided views.
    big_k = torch.randn(cap, D + 16, generator=gen)
    big_v = torch.randn(cap, D + 16, generator=gen)
    big_lb = torch.full((cap, 2), LB_SENTINEL)
    big_p = torch.full((cap, 3), POS_SENTINEL, dtype=torch.int64)
    bufs = (big_k[:, 8 : 8 + D], big_v[:, :D], big_lb[:, 1], big_p[:, 2])
    k = torch.randn(H, T, D, generator=gen).transpose(0, 1)
    v = torch.randn(T, H, 2 * D, generator=gen)[:, :, ::2]
    lb = -torch.rand(H, T, generator=gen).t()
    positions = torch.randint(0, 1000, (2 * T,), generator=gen, dtype=torch.int32)[::2]
    slot = torch.randperm(cap, generator=gen)[: T * H].view(H, T).t().to(torch.int32)
    slot[2, 1] = -1
    tokens = (k, v, lb, positions, slot)

    tri_big = (big_k.clone(), big_v.clone(), big_lb.clone(), big_p.clone())
    tri = (tri_big[0][:, 8 : 8 + D], tri_big[1][:, :D], tri_big[2][:, 1], tri_big[3][:, 2])
    store_head_slots(*tri, *tokens)
    ref = clone(bufs)
    store_head_slots_reference(*ref, *tokens)
    assert_equal_bufs(tri, ref)
    check_contents(bufs, ref, *tokens)
    # Nothing outside the views was written.
    assert torch.equal(tri_big[0][:, :8], big_k[:, :8]) and torch.equal(tri_big[0][:, 8 + D :], big_k[:, 8 + D :])
    assert torch.equal(tri_big[1][:, D:], big_v[:, D:])
    assert torch.equal(tri_big[2][:, 0], big_lb[:, 0])
    assert torch.equal(tri_big[3][:, :2], big_p[:, :2])


@BOTH
def test_empty_batch_is_a_no_op(fn):
    gen = torch.Generator().manual_seed(4)
    bufs = make_buffers(8, 48, torch.float32, gen)
    out = clone(bufs)
    fn(*out, *make_tokens(0, 2, 48, torch.float32, 8, gen))
    assert_equal_bufs(out, bufs)


@pytest.mark.parametrize("dtype", CACHE_DTYPES, ids=str)
def test_end_to_end_with_head_slot_pool(dtype):
    """Alloc, store each layer, evict some, alloc new tokens into the freed head-slots (reused by
    other layers/heads), store them, and read everything live back through the slot map."""
    gen = torch.Generator().manual_seed(5)
    L, H, D = 3, 2, 48
    cap = 8 * L * H  # exactly room for 8 tokens
    pool = HeadSlotPool(num_virtual=16, num_layers=L, num_kv_heads=H, capacity=cap)
    ks, vs, lbs, ps = make_buffers(cap, D, dtype, gen)
    truth = {}  # (virtual id, layer, head) -> (k row, v row, log beta, position)

    def store(ids, phys):
        T = ids.numel()
        positions = torch.randint(0, 1 << 30, (T,), generator=gen)
        for layer in range(L):
            k = torch.randn(T, H, D, generator=gen)
            v = torch.randn(T, H, D, generator=gen)
            lb = -torch.rand(T, H, generator=gen)
            store_head_slots(ks, vs, lbs, ps, k, v, lb, positions, phys[:, layer, :])
            for t in range(T):
                for h in range(H):
                    truth[(int(ids[t]), layer, h)] = (k[t, h], v[t, h], lb[t, h], int(positions[t]))

    def check():
        pool.check_integrity()
        n = 0
        for (vid, layer, h), (k, v, lb, pos) in truth.items():
            s = int(pool.slot_map[vid, layer, h])
            if s == EVICTED:
                continue
            n += 1
            assert torch.equal(ks[s], k.to(dtype)), (vid, layer, h)
            assert torch.equal(vs[s], v.to(dtype)), (vid, layer, h)
            assert lbs[s].item() == lb.item() and int(ps[s]) == pos
        assert n == pool.num_live

    ids0 = torch.arange(6)
    store(ids0, pool.alloc(ids0))
    check()
    # Evict a scattered set of entries: 12 head-slots = exactly 2 tokens' worth.
    ev_ids = torch.tensor([0, 0, 1, 2, 2, 3, 3, 4, 5, 5, 1, 4])
    ev_layers = torch.tensor([0, 2, 1, 0, 1, 2, 0, 1, 2, 0, 2, 0])
    ev_heads = torch.tensor([1, 0, 1, 0, 1, 0, 0, 1, 1, 0, 0, 0])
    freed = {int(pool.slot_map[i, l, h]) for i, l, h in zip(ev_ids, ev_layers, ev_heads)}
    assert pool.evict(ev_ids, ev_layers, ev_heads) == 12
    ids1 = torch.arange(6, 10)
    phys = pool.alloc(ids1)  # 4 tokens = 24 head-slots: the 12 never used + the 12 freed
    assert freed <= set(phys.flatten().tolist())
    store(ids1, phys)
    check()
    # Also store a batch where some entries are already evicted (slot = -1 from the slot map).
    pool.free(torch.tensor([6]))
    ids2 = torch.tensor([6])
    pool.alloc(ids2)
    pool.evict(torch.tensor([6, 6]), torch.tensor([0, 2]), torch.tensor([1, 0]))
    live_map = pool.slot_map[ids2].long()  # -1 where evicted
    for layer in range(L):
        assert (live_map[:, layer, :] == -1).sum() == ((layer == 0) + (layer == 2))
    store(ids2, live_map)
    check()


def test_freed_slot_reused_by_another_layer_and_head():
    gen = torch.Generator().manual_seed(6)
    L, H, D = 2, 2, 64
    pool = HeadSlotPool(num_virtual=4, num_layers=L, num_kv_heads=H, capacity=L * H)
    bufs = make_buffers(L * H, D, torch.bfloat16, gen)
    a = pool.alloc(torch.tensor([0]))
    s = int(a[0, 0, 0])
    pool.evict(torch.tensor([0, 0, 0]), torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0]))
    # Token 0 keeps only (layer 1, head 1); token 1 cannot fit (needs 4), so free token 0 first.
    pool.free(torch.tensor([0]))
    b = pool.alloc(torch.tensor([1]))
    assert int(b[0, 0, 0]) != s and s in b.flatten().tolist()
    layer, head = [(l, h) for l in range(L) for h in range(H) if int(b[0, l, h]) == s][0]
    k = torch.randn(1, H, D, generator=gen)
    v = torch.randn(1, H, D, generator=gen)
    store_head_slots(*bufs, k, v, -torch.rand(1, H, generator=gen), torch.tensor([9]), b[:, layer, :])
    assert torch.equal(bufs[0][s], k[0, head].to(torch.bfloat16))
    assert torch.equal(bufs[1][s], v[0, head].to(torch.bfloat16))
    assert int(bufs[3][s]) == 9


# ---------------------------------------------------------------------------- validation
def _valid_args(T=3, H=2, D=48, cap=10):
    gen = torch.Generator().manual_seed(7)
    return dict(
        zip(
            ("k_slots", "v_slots", "log_beta_slots", "pos_slots"),
            make_buffers(cap, D, torch.float16, gen),
        )
    ) | dict(zip(("k", "v", "log_beta", "positions", "slot"), make_tokens(T, H, D, torch.float32, cap, gen)))


BAD_SHAPES = {
    "k_slots": (10, 48, 1),
    "v_slots": (10, 64),
    "log_beta_slots": (11,),
    "pos_slots": (10, 1),
    "k": (3, 2, 64),
    "v": (3, 1, 48),
    "log_beta": (2, 2),
    "positions": (4,),
    "slot": (3,),
}


@BOTH
@pytest.mark.parametrize("name", list(BAD_SHAPES))
def test_wrong_shape_names_the_argument(fn, name):
    args = _valid_args()
    args[name] = torch.zeros(BAD_SHAPES[name], dtype=args[name].dtype)
    with pytest.raises(ValueError, match=rf"^{name}: expected .*found {re.escape(str(BAD_SHAPES[name]))}$"):
        fn(**args)


BAD_DTYPES = {
    "k_slots": torch.float64,
    "v_slots": torch.float32,  # differs from k_slots
    "log_beta_slots": torch.float16,
    "pos_slots": torch.int32,
    "k": torch.int32,
    "v": torch.int64,
    "log_beta": torch.int16,
    "positions": torch.float32,
    "slot": torch.int16,
}


@BOTH
@pytest.mark.parametrize("name", list(BAD_DTYPES))
def test_wrong_dtype_names_the_argument(fn, name):
    args = _valid_args()
    args[name] = args[name].to(BAD_DTYPES[name])
    with pytest.raises(ValueError, match=rf"^{name}: expected .*found {re.escape(str(BAD_DTYPES[name]))}"):
        fn(**args)


@BOTH
def test_not_a_tensor_and_wrong_device(fn):
    args = _valid_args()
    args["log_beta"] = args["log_beta"].tolist()
    with pytest.raises(ValueError, match=r"^log_beta: expected a torch.Tensor, found list"):
        fn(**args)
    args = _valid_args()
    args["positions"] = args["positions"].to("meta")
    with pytest.raises(ValueError, match=r"^positions: expected device cpu .*found meta"):
        fn(**args)


@BOTH
def test_slot_out_of_range_is_rejected_before_writing(fn):
    args = _valid_args()
    args["slot"][1, 1] = 10
    before = {n: args[n].clone() for n in ("k_slots", "v_slots", "log_beta_slots", "pos_slots")}
    with pytest.raises(ValueError, match=r"^slot: head-slot ids must be < capacity = 10, found 10$"):
        fn(**args)
    for n, t in before.items():
        assert torch.equal(args[n], t), n


# ---------------------------------------------------------------------------- randomized
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.integers(0, 20),
    H=st.integers(1, 4),
    D=st.sampled_from([16, 48, 64, 80]),
    dtype=st.sampled_from(CACHE_DTYPES),
    src=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    spare=st.integers(0, 10),
    drop=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_randomized_against_reference(T, H, D, dtype, src, spare, drop, seed):
    gen = torch.Generator().manual_seed(seed)
    cap = T * H + spare
    bufs = make_buffers(cap, D, dtype, gen)
    tokens = make_tokens(T, H, D, src, cap, gen, drop_frac=drop, lb_dtype=src)
    after = run_both(bufs, *tokens)
    if T:
        check_contents(bufs, after, *tokens)
