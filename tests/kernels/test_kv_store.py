"""store_kv_scores (Triton) against store_kv_scores_reference (torch): same bits, same errors.

Runs on CPU tensors under TRITON_INTERPRET=1, so shapes stay small."""

import os
import re

# Before triton is imported (conftest.py does the same; this keeps the module runnable alone).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglang_evict.kernels.kv_store import paged_view, store_kv_scores, store_kv_scores_reference

CACHE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
# Sentinels the kernel can never write: log beta <= 0 and positions >= 0.
LB_SENTINEL = 7.5
POS_SENTINEL = -3


BOTH = pytest.mark.parametrize(
    "fn", [store_kv_scores, store_kv_scores_reference], ids=["triton", "reference"]
)


def make_pool(num_pages, page_size, heads, head_dim, dtype, gen):
    """A pool whose prior contents are random (K, V) or impossible values (log beta, position)."""
    kc = torch.randn(num_pages, page_size, heads, head_dim, generator=gen).to(dtype)
    vc = torch.randn(num_pages, page_size, heads, head_dim, generator=gen).to(dtype)
    lbc = torch.full((num_pages, page_size, heads), LB_SENTINEL)
    pc = torch.full((num_pages, page_size), POS_SENTINEL, dtype=torch.int64)
    return kc, vc, lbc, pc


def make_tokens(T, heads, head_dim, dtype, num_slots, gen, pad_every=0, lb_dtype=torch.float32):
    k = torch.randn(T, heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(T, heads, head_dim, generator=gen).to(dtype)
    log_beta = torch.nn.functional.logsigmoid(3 * torch.randn(T, heads, generator=gen)).to(lb_dtype)
    positions = torch.randint(0, 1 << 40, (T,), generator=gen)
    # Distinct slots in random order, as an allocator hands out a fragmented free list.
    loc = torch.randperm(num_slots, generator=gen)[:T]
    if pad_every:
        loc[::pad_every] = -1
    return k, v, log_beta, positions, loc


def clone_pool(pool):
    return tuple(t.clone() for t in pool)


def assert_same_bits(actual, expected, name):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    if actual.dtype.is_floating_point:
        # NaN payloads may differ; everything else must match bit for bit.
        nan = expected.isnan()
        assert torch.equal(actual.isnan(), nan), f"{name}: NaNs differ"
        iv = _INT_VIEW[actual.dtype]
        assert torch.equal(actual.view(iv)[~nan], expected.view(iv)[~nan]), f"{name}: bits differ"
    else:
        assert torch.equal(actual, expected), f"{name}: values differ"


def assert_pools_equal(actual, expected):
    for name, a, e in zip(("k_cache", "v_cache", "log_beta_cache", "pos_cache"), actual, expected):
        assert_same_bits(a, e, name)


def run_both(pool, *tokens):
    tri, ref = clone_pool(pool), clone_pool(pool)
    store_kv_scores(*tri, *tokens)
    store_kv_scores_reference(*ref, *tokens)
    assert_pools_equal(tri, ref)
    return tri


def expected_by_loop(pool, k, v, log_beta, positions, loc):
    """Independent ground truth for the reference itself: one token at a time."""
    kc, vc, lbc, pc = clone_pool(pool)
    page_size = kc.shape[1]
    for t, slot in enumerate(loc.tolist()):
        if slot < 0:
            continue
        p, o = divmod(slot, page_size)
        kc[p, o] = k[t].to(kc.dtype)
        vc[p, o] = v[t].to(vc.dtype)
        lbc[p, o] = log_beta[t].float()
        pc[p, o] = int(positions[t])
    return kc, vc, lbc, pc


@pytest.mark.parametrize("page_size", [1, 16, 5])
@pytest.mark.parametrize("dtype", CACHE_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [48, 64])
@pytest.mark.parametrize("T", [1, 7, 33])
def test_triton_matches_reference(T, head_dim, dtype, page_size):
    gen = torch.Generator().manual_seed(T * 1000 + head_dim + page_size)
    heads = 3  # SmolLM2's KV head count: not a power of two
    num_pages = -(-(T + 11) // page_size)  # spare slots, so the written ones are a random subset
    pool = make_pool(num_pages, page_size, heads, head_dim, dtype, gen)
    num_slots = num_pages * page_size
    tokens = make_tokens(T, heads, head_dim, dtype, num_slots, gen, pad_every=3 if T > 1 else 0)
    out = run_both(pool, *tokens)
    assert_pools_equal(out, expected_by_loop(pool, *tokens))


def test_padding_tokens_leave_the_pool_untouched():
    gen = torch.Generator().manual_seed(1)
    pool = make_pool(3, 4, 2, 48, torch.float16, gen)
    k, v, log_beta, positions, _ = make_tokens(5, 2, 48, torch.float16, 12, gen)
    loc = torch.tensor([-1, -5, -1, -(1 << 40), -2])
    out = run_both(pool, k, v, log_beta, positions, loc)
    assert_pools_equal(out, pool)


def test_mixed_padding_writes_only_real_tokens():
    gen = torch.Generator().manual_seed(2)
    pool = make_pool(2, 5, 2, 48, torch.bfloat16, gen)
    k, v, log_beta, positions, _ = make_tokens(4, 2, 48, torch.bfloat16, 10, gen)
    loc = torch.tensor([7, -1, 0, -1])
    out = run_both(pool, k, v, log_beta, positions, loc)
    written = {(1, 2): 0, (0, 0): 2}
    for p in range(2):
        for o in range(5):
            if (p, o) in written:
                t = written[(p, o)]
                assert torch.equal(out[0][p, o], k[t]) and torch.equal(out[1][p, o], v[t])
                assert torch.equal(out[2][p, o], log_beta[t]) and out[3][p, o] == positions[t]
            else:
                assert torch.equal(out[0][p, o], pool[0][p, o]) and torch.equal(out[1][p, o], pool[1][p, o])
                assert (out[2][p, o] == LB_SENTINEL).all() and out[3][p, o] == POS_SENTINEL


def test_positions_and_log_beta_stored_exactly():
    gen = torch.Generator().manual_seed(3)
    pool = make_pool(2, 4, 2, 64, torch.float32, gen)
    k, v, _, _, _ = make_tokens(6, 2, 64, torch.float32, 8, gen)
    positions = torch.tensor([0, 1, (1 << 31) + 5, (1 << 62) + 1, 4095, 8191])
    # Edge values of log beta: zero of both signs, a subnormal, a tiny negative, a large negative, -inf.
    log_beta = torch.tensor(
        [[0.0, -0.0], [-1e-45, -1e-30], [-88.7, -1e30], [float("-inf"), -0.5], [-1.0, -2.0], [-3.0, -4.0]]
    )
    loc = torch.tensor([5, 0, 7, 2, 3, 6])
    out = run_both(pool, k, v, log_beta, positions, loc)
    assert torch.equal(out[3].flatten()[loc], positions)
    stored = out[2].flatten(0, 1)[loc]
    assert torch.equal(stored.view(torch.int32), log_beta.view(torch.int32))  # -0.0 and subnormals kept


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy warns on float16 overflow to inf
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES, ids=str)
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_cast_on_store_rounds_like_torch(src_dtype, cache_dtype):
    """Every 16-bit pattern (or random 32/64-bit ones) cast on store gives torch's bits."""
    gen = torch.Generator().manual_seed(4)
    n = 1 << 16
    if src_dtype in (torch.float16, torch.bfloat16):
        values = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(src_dtype)
    elif src_dtype == torch.float32:
        bits = torch.randint(-(1 << 31), (1 << 31) - 1, (n,), dtype=torch.int32, generator=gen)
        values = bits.view(torch.float32)
        # Exact rounding ties for bfloat16 and float16 (round half to even, both directions).
        ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-11, 1 + 3 * 2**-11, 2**-133])
        values[: ties.numel()] = ties
    else:
        scale = 10.0 ** torch.randint(-40, 40, (n,), generator=gen)
        values = torch.randn(n, dtype=torch.float64, generator=gen) * scale
    T, heads = 16, 2
    head_dim = n // (T * heads)
    k = values.view(T, heads, head_dim)
    v = values.flip(0).view(T, heads, head_dim)
    log_beta = values[: T * heads].view(T, heads)
    pool = make_pool(T, 1, heads, head_dim, cache_dtype, gen)
    run_both(pool, k, v, log_beta, torch.arange(T), torch.randperm(T, generator=gen))


def test_strided_inputs_and_paged_view_of_a_flat_pool():
    """K and V sliced out of a fused QKV tensor; the pool is SGLang's flat [slots, heads, dim] buffer."""
    gen = torch.Generator().manual_seed(5)
    T, heads, head_dim, page_size, slots = 7, 2, 48, 4, 20
    qkv = torch.randn(T, 4 * heads, head_dim, generator=gen, dtype=torch.float16)
    k, v = qkv[:, 2 * heads : 3 * heads], qkv[:, 3 * heads :]
    assert not k.is_contiguous()
    log_beta = -torch.rand(heads, T, generator=gen).t()  # transposed: stride (1, T)
    positions = torch.arange(0, 2 * T, 2)
    loc = torch.randperm(slots, generator=gen)[:T]

    flat = [torch.zeros(slots, heads, head_dim, dtype=torch.float16) for _ in range(2)]
    flat_lb, flat_pos = torch.zeros(slots, heads), torch.zeros(slots, dtype=torch.int64)
    ref = [torch.zeros(slots, heads, head_dim, dtype=torch.float16) for _ in range(2)]
    ref_lb, ref_pos = torch.zeros(slots, heads), torch.zeros(slots, dtype=torch.int64)
    store_kv_scores(
        *(paged_view(t, page_size) for t in (*flat, flat_lb, flat_pos)), k, v, log_beta, positions, loc
    )
    store_kv_scores_reference(
        *(paged_view(t, page_size) for t in (*ref, ref_lb, ref_pos)), k, v, log_beta, positions, loc
    )
    assert_pools_equal((*flat, flat_lb, flat_pos), (*ref, ref_lb, ref_pos))
    assert torch.equal(flat[0][loc], k) and torch.equal(flat[1][loc], v)
    assert torch.equal(flat_lb[loc], log_beta) and torch.equal(flat_pos[loc], positions)


def test_non_contiguous_cache_views():
    """Caches that are views (every other head of a bigger buffer) are written through their strides."""
    gen = torch.Generator().manual_seed(6)
    big = make_pool(3, 5, 4, 80, torch.float32, gen)
    pool = (big[0][:, :, ::2], big[1][:, :, 1::2], big[2][:, :, ::2], big[3])
    tokens = make_tokens(9, 2, 80, torch.float32, 15, gen, pad_every=4)
    before = clone_pool(big)
    store_kv_scores(*pool, *tokens)
    expect = clone_pool(before)
    store_kv_scores_reference(
        expect[0][:, :, ::2], expect[1][:, :, 1::2], expect[2][:, :, ::2], expect[3], *tokens
    )
    assert_pools_equal(big, expect)
    assert torch.equal(big[0][:, :, 1::2], before[0][:, :, 1::2])  # the other heads are not touched


def test_int32_positions_and_loc():
    gen = torch.Generator().manual_seed(7)
    pool = make_pool(4, 4, 1, 64, torch.float32, gen)
    k, v, log_beta, positions, loc = make_tokens(5, 1, 64, torch.float32, 16, gen, pad_every=2)
    run_both(pool, k, v, log_beta, positions.clamp(max=2**31 - 1).int(), loc.int())


@BOTH
def test_empty_batch_is_a_no_op(fn):
    gen = torch.Generator().manual_seed(8)
    pool = make_pool(2, 16, 3, 48, torch.bfloat16, gen)
    out = clone_pool(pool)
    fn(*out, *make_tokens(0, 3, 48, torch.bfloat16, 32, gen))
    assert_pools_equal(out, pool)


# --- validation: every bad argument fails before launch, naming itself ---------------------------

def _good_args(T=4, heads=2, head_dim=48):
    gen = torch.Generator().manual_seed(9)
    pool = make_pool(2, 5, heads, head_dim, torch.float16, gen)
    return dict(
        zip(
            ("k_cache", "v_cache", "log_beta_cache", "pos_cache", "k", "v", "log_beta", "positions", "loc"),
            (*pool, *make_tokens(T, heads, head_dim, torch.float16, 10, gen)),
        )
    )


BAD_SHAPES = {
    "k_cache": (2, 5, 2),
    "v_cache": (2, 5, 2, 64),
    "log_beta_cache": (2, 5, 3),
    "pos_cache": (10,),
    "k": (4, 2, 64),
    "v": (3, 2, 48),
    "log_beta": (4,),
    "positions": (5,),
    "loc": (4, 1),
}
BAD_DTYPES = {
    "v_cache": torch.float32,  # differs from k_cache
    "k_cache": torch.int16,
    "log_beta_cache": torch.float16,
    "pos_cache": torch.int32,
    "k": torch.int32,
    "log_beta": torch.int64,
    "positions": torch.float32,
    "loc": torch.int16,
}


@BOTH
@pytest.mark.parametrize("name", list(BAD_SHAPES))
def test_wrong_shape_names_the_argument(fn, name):
    args = _good_args()
    args[name] = torch.zeros(BAD_SHAPES[name], dtype=args[name].dtype)
    before = clone_pool([args[n] for n in ("k_cache", "v_cache", "log_beta_cache", "pos_cache")])
    with pytest.raises(ValueError, match=rf"^{name}: expected .*found {re.escape(str(BAD_SHAPES[name]))}$"):
        fn(**args)
    if name not in ("k_cache", "v_cache", "log_beta_cache", "pos_cache"):
        assert_pools_equal([args[n] for n in ("k_cache", "v_cache", "log_beta_cache", "pos_cache")], before)


@BOTH
@pytest.mark.parametrize("name", list(BAD_DTYPES))
def test_wrong_dtype_names_the_argument(fn, name):
    args = _good_args()
    args[name] = args[name].to(BAD_DTYPES[name])
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        fn(**args)


@BOTH
def test_wrong_device_names_the_argument(fn):
    args = _good_args()
    args["positions"] = torch.empty(args["positions"].shape, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match=r"^positions: expected device cpu"):
        fn(**args)


@BOTH
def test_not_a_tensor_names_the_argument(fn):
    args = _good_args()
    args["log_beta"] = [[0.0, 0.0]] * 4
    with pytest.raises(ValueError, match=r"^log_beta: expected a torch.Tensor"):
        fn(**args)


@BOTH
def test_slot_out_of_range_is_rejected(fn):
    args = _good_args()
    args["loc"] = torch.tensor([0, 1, 10, -1])  # 2 pages x 5 slots: 10 is one past the end
    before = clone_pool([args[n] for n in ("k_cache", "v_cache", "log_beta_cache", "pos_cache")])
    with pytest.raises(ValueError, match=r"^loc: slot ids must be < num_pages \* page_size = 10, found 10$"):
        fn(**args)
    assert_pools_equal([args[n] for n in ("k_cache", "v_cache", "log_beta_cache", "pos_cache")], before)


def test_paged_view_shares_storage_and_checks_divisibility():
    flat = torch.zeros(12, 2, 8)
    paged = paged_view(flat, 4)
    assert paged.shape == (3, 4, 2, 8) and paged.data_ptr() == flat.data_ptr()
    paged[2, 1] = 1.0
    assert (flat[9] == 1.0).all()
    assert paged_view(torch.zeros(12), 3).shape == (4, 3)
    with pytest.raises(ValueError, match="flat_cache: first dimension must be a multiple of page_size=5"):
        paged_view(flat, 5)
    with pytest.raises(ValueError, match="page_size must be >= 1"):
        paged_view(flat, 0)


# --- randomized -------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.integers(0, 40),
    heads=st.integers(1, 4),
    head_dim=st.sampled_from([1, 8, 48, 64, 80, 96, 128]),
    page_size=st.sampled_from([1, 2, 5, 16, 64]),
    cache_dtype=st.sampled_from(CACHE_DTYPES),
    src_dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    lb_dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    spare=st.integers(0, 40),
    pad_every=st.integers(0, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_randomized_against_reference(
    T, heads, head_dim, page_size, cache_dtype, src_dtype, lb_dtype, spare, pad_every, seed
):
    gen = torch.Generator().manual_seed(seed)
    num_pages = max(1, -(-(T + spare) // page_size))
    pool = make_pool(num_pages, page_size, heads, head_dim, cache_dtype, gen)
    tokens = make_tokens(
        T, heads, head_dim, src_dtype, num_pages * page_size, gen, pad_every=pad_every, lb_dtype=lb_dtype
    )
    out = run_both(pool, *tokens)
    assert_pools_equal(out, expected_by_loop(pool, *tokens))
