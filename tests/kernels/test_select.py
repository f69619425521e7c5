"""topk_threshold (Triton radix select) against topk_threshold_reference (torch): same bits;
select_keep against policies.keep_mask.

Runs on CPU tensors under TRITON_INTERPRET=1, so sizes stay small (N <= 3000)."""

import math
import os

# Before triton is imported (conftest.py does the same; this keeps the module runnable alone).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglang_evict.kernels.select import select_keep, topk_threshold, topk_threshold_reference
from sglang_evict.eviction.policies import keep_mask

INF = math.inf
NAN = math.nan
SUBNORMALS = [1e-45, -1e-45, 1e-40, -1e-40, 1.1754942e-38, -1.1754942e-38]

BOTH = pytest.mark.parametrize(
    "fn", [topk_threshold, topk_threshold_reference], ids=["triton", "reference"]
)


def _bits(t: torch.Tensor) -> int:
    return int(t.view(torch.int32))


def oracle(scores: torch.Tensor, budget: int) -> tuple[float, int]:
    """Independent Python statement of the contract (sorted list, no torch ranking)."""
    s = [-INF if math.isnan(x) else (0.0 if x == 0 else x) for x in scores.tolist()]
    n = len(s)
    if budget >= n:
        return -INF, sum(x > -INF for x in s)
    if budget == 0:
        return INF, 0
    thr = sorted(s, reverse=True)[budget - 1]
    return thr, sum(x > thr for x in s)


def assert_same(scores: torch.Tensor, budget: int) -> None:
    thr, above = topk_threshold(scores, budget)
    rthr, rabove = topk_threshold_reference(scores, budget)
    assert thr.dtype == rthr.dtype == torch.float32 and thr.dim() == rthr.dim() == 0
    assert above.dtype == rabove.dtype == torch.int64 and above.dim() == rabove.dim() == 0
    assert _bits(thr) == _bits(rthr), (float(thr), float(rthr))
    assert int(above) == int(rabove)
    othr, oabove = oracle(scores, budget)
    assert float(rthr) == othr and int(rabove) == oabove
    assert not math.isnan(float(thr)) and _bits(thr) != _bits(torch.tensor(-0.0))
    assert int(above) <= budget


def assert_keep(scores: torch.Tensor, budget: int) -> None:
    keep = select_keep(scores, budget)
    expected = keep_mask(scores.view(-1, 1), budget, per_head=False)[:, 0]
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    assert torch.equal(keep, expected)
    n = scores.shape[0]
    n_inf = int(torch.isposinf(scores).sum())
    assert int(keep.sum()) == (n if budget >= n else max(budget, n_inf))


def make_scores(n: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "normal":
        return torch.randn(n, generator=gen) * 10
    if kind == "ties":  # a few distinct values, heavy ties
        vals = torch.tensor([-2.5, -1.0, 0.0, 0.75, 3.0])
        return vals[torch.randint(0, len(vals), (n,), generator=gen)]
    if kind == "special":  # everything at once, in random positions
        pool = torch.tensor([INF, -INF, NAN, 0.0, -0.0, 1.0, -1.0, *SUBNORMALS])
        s = torch.randn(n, generator=gen)
        pick = torch.rand(n, generator=gen) < 0.5
        s[pick] = pool[torch.randint(0, len(pool), (int(pick.sum()),), generator=gen)]
        return s
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["normal", "ties", "special"])
@pytest.mark.parametrize("n", [1, 7, 100, 2049])
def test_kernel_matches_reference(n, kind):
    gen = torch.Generator().manual_seed(1000 * n + len(kind))
    scores = make_scores(n, kind, gen)
    for budget in sorted({0, 1, n // 3, max(n - 1, 0), n, n + 5}):
        assert_same(scores, budget)
        assert_keep(scores, budget)


@pytest.mark.parametrize(
    "values",
    [
        [NAN] * 9,
        [-INF] * 5 + [NAN] * 4,
        [INF] * 6 + [1.0] * 3,
        [2.0] * 11,
        [-0.0, 0.0, -0.0, 0.0, 1e-45, -1e-45],
        SUBNORMALS + [0.0, -0.0],
        [-3.0, -1e30, -7.5, -0.5, -1e-38, -INF],
        [3.4028235e38, -3.4028235e38, INF, -INF, NAN, 1.0],
    ],
    ids=["all-nan", "neginf-nan", "posinf", "all-equal", "signed-zeros", "subnormals",
         "all-negative", "extremes"],
)
def test_edge_values(values):
    scores = torch.tensor(values, dtype=torch.float32)
    for budget in range(0, len(values) + 2):
        assert_same(scores, budget)
        assert_keep(scores, budget)


def test_more_posinf_than_budget():
    scores = torch.tensor([1.0, INF, 2.0, INF, INF, NAN])
    thr, above = topk_threshold(scores, 2)
    assert float(thr) == INF and int(above) == 0
    assert select_keep(scores, 2).tolist() == [False, True, False, True, True, False]


def test_tie_break_lowest_index():
    scores = torch.tensor([5.0, 1.0, 3.0, 3.0, NAN, 3.0, 3.0, 0.5])
    thr, above = topk_threshold(scores, 3)
    assert float(thr) == 3.0 and int(above) == 1
    assert select_keep(scores, 3).tolist() == [True, False, True, True, False, False, False, False]


def test_empty():
    scores = torch.empty(0)
    for budget in (0, 3):
        thr, above = topk_threshold(scores, budget)
        assert float(thr) == -INF and int(above) == 0
        assert select_keep(scores, budget).shape == (0,)


def test_strided_input():
    gen = torch.Generator().manual_seed(7)
    base = make_scores(600, "special", gen)
    scores = base[::3]  # non-contiguous view, N = 200
    assert not scores.is_contiguous()
    for budget in (1, 17, 150):
        assert_same(scores, budget)
        assert_keep(scores, budget)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(
        st.one_of(
            st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True),
            st.sampled_from([0.0, -0.0, 1.0, -1.0, INF, -INF, NAN]),
        ),
        min_size=1,
        max_size=300,
    ),
    frac=st.floats(min_value=0.0, max_value=1.2),
)
def test_hypothesis(values, frac):
    scores = torch.tensor(values, dtype=torch.float32)
    budget = int(frac * len(values))
    assert_same(scores, budget)
    assert_keep(scores, budget)


@BOTH
def test_validation(fn):
    good = torch.randn(8)
    with pytest.raises(ValueError, match="scores"):
        fn(good.double(), 2)
    with pytest.raises(ValueError, match="scores"):
        fn(good.half(), 2)
    with pytest.raises(ValueError, match="scores"):
        fn(torch.arange(8), 2)
    with pytest.raises(ValueError, match="scores"):
        fn(good.view(2, 4), 2)
    with pytest.raises(ValueError, match="scores"):
        fn(torch.tensor(1.0), 0)
    with pytest.raises(ValueError, match="scores"):
        fn(good.tolist(), 2)
    with pytest.raises(ValueError, match="budget"):
        fn(good, -1)
    with pytest.raises(ValueError, match="budget"):
        fn(good, 2.0)
    with pytest.raises(ValueError, match="budget"):
        fn(good, True)


def test_select_keep_validation():
    with pytest.raises(ValueError, match="budget"):
        select_keep(torch.randn(4), -2)
    with pytest.raises(ValueError, match="scores"):
        select_keep(torch.randn(4, 1), 2)
