"""The head-slot pool (pure torch, CPU): each operation, each error, live_indices against a naive
reference, and a randomized state machine that checks integrity after every step."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from sglang_evict.cache.head_slots import (
    EVICTED,
    HeadSlotIntegrityError,
    HeadSlotPool,
    HeadSlotPoolFull,
)


def ids(*xs: int) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.long)


def snapshot(pool: HeadSlotPool):
    return (pool.slot_map.clone(), pool.free_slots.clone(), pool.num_free, pool.num_live)


def assert_unchanged(pool: HeadSlotPool, snap) -> None:
    slot_map, free_slots, num_free, num_live = snap
    assert torch.equal(pool.slot_map, slot_map)
    assert pool.num_free == num_free and pool.num_live == num_live
    assert torch.equal(pool.free_slots[:num_free], free_slots[:num_free])


@pytest.fixture
def pool():
    p = HeadSlotPool(num_virtual=8, num_layers=2, num_kv_heads=2, capacity=20)
    p.check_integrity()
    return p


# ---------------------------------------------------------------- construction


def test_fresh_pool_is_all_free(pool):
    assert pool.slot_map.shape == (8, 2, 2) and (pool.slot_map == EVICTED).all()
    assert pool.num_free == 20 and pool.num_live == 0


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_virtual=0), dict(num_layers=-1), dict(num_kv_heads=True), dict(capacity=-1)],
)
def test_bad_construction_is_rejected(kwargs):
    args = dict(num_virtual=4, num_layers=2, num_kv_heads=2, capacity=8) | kwargs
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        HeadSlotPool(**args)


# ---------------------------------------------------------------- alloc


def test_alloc_gives_distinct_slots_of_shape_t_l_h(pool):
    slots = pool.alloc(ids(3, 5))
    pool.check_integrity()
    assert slots.shape == (2, 2, 2) and slots.dtype == torch.long
    assert torch.unique(slots).numel() == 8
    assert ((slots >= 0) & (slots < 20)).all()
    assert torch.equal(pool.slot_map[ids(3, 5)].long(), slots)
    assert pool.num_free == 12 and pool.num_live == 8
    # Fresh pool hands out 0, 1, 2, ... in row-major (token, layer, head) order.
    assert torch.equal(slots.flatten(), torch.arange(8))


def test_alloc_of_nothing_is_fine(pool):
    assert pool.alloc(ids()).shape == (0, 2, 2)
    pool.check_integrity()
    assert pool.num_free == 20


def test_pool_full_names_sizes_and_leaves_state_unchanged(pool):
    pool.alloc(ids(0, 1, 2, 3))  # 16 of 20
    snap = snapshot(pool)
    with pytest.raises(HeadSlotPoolFull, match="requested 8 .*only 4 free") as err:
        pool.alloc(ids(4, 5))
    assert err.value.requested == 8 and err.value.available == 4
    assert_unchanged(pool, snap)
    pool.check_integrity()
    pool.alloc(ids(4))  # exactly the remaining 4
    pool.check_integrity()
    assert pool.num_free == 0


def test_alloc_of_live_id_is_rejected(pool):
    pool.alloc(ids(2))
    snap = snapshot(pool)
    with pytest.raises(ValueError, match="virtual id 2 already holds"):
        pool.alloc(ids(1, 2))
    assert_unchanged(pool, snap)
    pool.check_integrity()


def test_alloc_of_partly_evicted_id_is_rejected_fully_evicted_is_fine(pool):
    pool.alloc(ids(2))
    pool.evict(ids(2, 2, 2), ids(0, 0, 1), ids(0, 1, 0))
    with pytest.raises(ValueError, match="virtual id 2 already holds"):
        pool.alloc(ids(2))
    pool.evict(ids(2), ids(1), ids(1))
    pool.alloc(ids(2))
    pool.check_integrity()
    assert pool.num_live == 4


@pytest.mark.parametrize(
    "bad, match",
    [
        (ids(1, 1), "duplicate virtual id 1"),
        (ids(8), "out of range"),
        (ids(-1), "out of range"),
        (torch.tensor([1.0]), "integer"),
        (torch.tensor([[1]]), "1-D"),
    ],
)
def test_alloc_rejects_bad_ids(pool, bad, match):
    with pytest.raises(ValueError, match=match):
        pool.alloc(bad)
    assert pool.num_free == 20
    pool.check_integrity()


def test_alloc_accepts_int32_ids(pool):
    slots = pool.alloc(torch.tensor([7], dtype=torch.int32))
    assert slots.shape == (1, 2, 2)
    pool.check_integrity()


# ---------------------------------------------------------------- evict


def test_evict_frees_and_marks_evicted(pool):
    slots = pool.alloc(ids(0, 1))
    n = pool.evict(ids(0, 1, 1), ids(0, 1, 0), ids(1, 0, 0))
    pool.check_integrity()
    assert n == 3 and pool.num_free == 15 and pool.num_live == 5
    assert pool.slot_map[0, 0, 1] == EVICTED and pool.slot_map[1, 1, 0] == EVICTED
    assert pool.slot_map[1, 0, 0] == EVICTED and pool.slot_map[0, 0, 0] == slots[0, 0, 0]
    # Freed head-slots are reused by any layer, head or token.
    new = pool.alloc(ids(5, 6, 7))
    pool.check_integrity()
    freed = {int(slots[0, 0, 1]), int(slots[1, 1, 0]), int(slots[1, 0, 0])}
    assert freed <= set(new.flatten().tolist())
    assert pool.num_free == 3


def test_double_evict_names_first_offender_and_changes_nothing(pool):
    pool.alloc(ids(0, 1))
    pool.evict(ids(1), ids(1), ids(0))
    snap = snapshot(pool)
    with pytest.raises(ValueError, match=r"virtual id 1, layer 1, head 0.*already evicted"):
        pool.evict(ids(0, 1, 0), ids(0, 1, 1), ids(0, 0, 1))
    assert_unchanged(pool, snap)
    pool.check_integrity()


def test_evict_of_never_allocated_is_rejected(pool):
    with pytest.raises(ValueError, match="virtual id 4, layer 0, head 1"):
        pool.evict(ids(4), ids(0), ids(1))
    pool.check_integrity()


def test_evict_same_entry_twice_in_one_call_is_rejected(pool):
    pool.alloc(ids(0))
    snap = snapshot(pool)
    with pytest.raises(ValueError, match=r"virtual id 0, layer 1, head 1\) listed more than once"):
        pool.evict(ids(0, 0, 0), ids(1, 0, 1), ids(1, 0, 1))
    assert_unchanged(pool, snap)
    pool.check_integrity()


@pytest.mark.parametrize(
    "layers, heads, match",
    [(ids(2), ids(0), "layers out of range"), (ids(0), ids(5), "heads out of range"),
     (ids(0, 0), ids(0), "layers has 2 entries")],
)
def test_evict_rejects_bad_coordinates(pool, layers, heads, match):
    pool.alloc(ids(0))
    with pytest.raises(ValueError, match=match):
        pool.evict(ids(0), layers, heads)
    pool.check_integrity()
    assert pool.num_live == 4


def test_evict_of_nothing_returns_zero(pool):
    assert pool.evict(ids(), ids(), ids()) == 0
    pool.check_integrity()


# ---------------------------------------------------------------- evict_mask


def test_evict_mask_frees_where_keep_is_false(pool):
    pool.alloc(ids(2, 3))
    keep = torch.tensor([[[True, False], [False, False]], [[True, True], [True, False]]])
    assert pool.evict_mask(ids(2, 3), keep) == 4
    pool.check_integrity()
    assert torch.equal(pool.slot_map[ids(2, 3)] != EVICTED, keep)
    # Already-evicted entries are ignored whatever keep says.
    assert pool.evict_mask(ids(2, 3), torch.zeros(2, 2, 2, dtype=torch.bool)) == 4
    pool.check_integrity()
    assert pool.num_free == 20


def test_evict_mask_rejects_wrong_shape_dtype_and_duplicates(pool):
    pool.alloc(ids(2))
    with pytest.raises(ValueError, match=r"keep must be a bool tensor \(1, 2, 2\)"):
        pool.evict_mask(ids(2), torch.zeros(1, 2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="keep must be a bool tensor"):
        pool.evict_mask(ids(2), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="duplicate"):
        pool.evict_mask(ids(2, 2), torch.zeros(2, 2, 2, dtype=torch.bool))
    pool.check_integrity()
    assert pool.num_live == 4


def test_evict_mask_with_policies_keep_mask():
    from sglang_evict.eviction.policies import keep_mask

    pool = HeadSlotPool(num_virtual=6, num_layers=1, num_kv_heads=2, capacity=12)
    tokens = torch.arange(6)
    pool.alloc(tokens)
    scores = torch.tensor([[5.0, 1], [4, 2], [3, 3], [2, 4], [1, 5], [0, 6]])
    keep = keep_mask(scores, 2, per_head=True)
    assert pool.evict_mask(tokens, keep.view(6, 1, 2)) == 8
    pool.check_integrity()
    assert pool.live_counts(tokens).tolist() == [[2, 2]]


# ---------------------------------------------------------------- free, live_counts


def test_free_releases_remaining_and_tolerates_empty_tokens(pool):
    pool.alloc(ids(0, 1))
    pool.evict(ids(0), ids(0), ids(0))
    assert pool.free(ids(0, 1, 6)) == 7  # 6 never allocated: fine
    pool.check_integrity()
    assert pool.num_free == 20 and (pool.slot_map == EVICTED).all()
    assert pool.free(ids(0, 1)) == 0
    pool.check_integrity()


def test_free_rejects_bad_ids(pool):
    with pytest.raises(ValueError, match="out of range"):
        pool.free(ids(9))
    with pytest.raises(ValueError, match="duplicate"):
        pool.free(ids(3, 3))


def test_live_counts_per_layer_and_head(pool):
    pool.alloc(ids(0, 1, 2))
    pool.evict(ids(0, 1, 2, 2), ids(0, 0, 0, 1), ids(1, 1, 1, 0))
    counts = pool.live_counts(ids(0, 1, 2))
    assert counts.dtype == torch.long and counts.tolist() == [[3, 0], [2, 3]]
    assert pool.live_counts(ids(2)).tolist() == [[1, 0], [0, 1]]
    assert pool.live_counts(ids()).tolist() == [[0, 0], [0, 0]]


# ---------------------------------------------------------------- live_indices


def test_live_indices_layout(pool):
    a = pool.alloc(ids(4, 1))  # request 0 tokens, in this order
    b = pool.alloc(ids(6))  # request 1
    pool.evict(ids(4, 6), ids(1, 1), ids(0, 1))
    indptr, indices = pool.live_indices([ids(4, 1), ids(6)], layer=1)
    assert indptr.dtype == torch.int32 and indices.dtype == torch.int32
    # sequences: (r0,h0) (r0,h1) (r1,h0) (r1,h1)
    assert indptr.tolist() == [0, 1, 3, 4, 4]
    assert indices.tolist() == [
        int(a[1, 1, 0]), int(a[0, 1, 1]), int(a[1, 1, 1]), int(b[0, 1, 0])
    ]


def test_live_indices_empty_and_bad_layer(pool):
    indptr, indices = pool.live_indices([], layer=0)
    assert indptr.tolist() == [0] and indices.numel() == 0
    indptr, indices = pool.live_indices([ids()], layer=0)
    assert indptr.tolist() == [0, 0, 0] and indices.numel() == 0
    with pytest.raises(ValueError, match="layer"):
        pool.live_indices([ids(0)], layer=2)


def naive_live_indices(pool: HeadSlotPool, requests: list[list[int]], layer: int):
    indptr, indices = [0], []
    for req in requests:
        for h in range(pool.num_kv_heads):
            seq = [int(pool.slot_map[v, layer, h]) for v in req if pool.slot_map[v, layer, h] >= 0]
            indices.extend(seq)
            indptr.append(len(indices))
    return indptr, indices


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_live_indices_matches_naive_reference(data):
    n_virtual = data.draw(st.integers(1, 16))
    n_layers = data.draw(st.integers(1, 3))
    n_heads = data.draw(st.integers(1, 2))
    pool = HeadSlotPool(n_virtual, n_layers, n_heads, capacity=n_virtual * n_layers * n_heads)
    allocated = data.draw(st.lists(st.integers(0, n_virtual - 1), unique=True))
    pool.alloc(torch.tensor(allocated, dtype=torch.long))
    keep = data.draw(
        st.lists(st.booleans(), min_size=len(allocated) * n_layers * n_heads,
                 max_size=len(allocated) * n_layers * n_heads)
    )
    pool.evict_mask(
        torch.tensor(allocated, dtype=torch.long),
        torch.tensor(keep, dtype=torch.bool).view(len(allocated), n_layers, n_heads),
    )
    pool.check_integrity()
    # Requests may include never-allocated tokens and share tokens (a shared prefix).
    requests = data.draw(
        st.lists(st.lists(st.integers(0, n_virtual - 1), unique=True, max_size=8), max_size=4)
    )
    layer = data.draw(st.integers(0, n_layers - 1))
    tensors = [torch.tensor(r, dtype=torch.long) for r in requests]
    indptr, indices = pool.live_indices(tensors, layer)
    want_indptr, want_indices = naive_live_indices(pool, requests, layer)
    assert indptr.tolist() == want_indptr
    assert indices.tolist() == want_indices


# ---------------------------------------------------------------- check_integrity


def test_integrity_detects_corruption(pool):
    pool.alloc(ids(0))  # slots 0..3; free stack holds 4..19

    p = HeadSlotPool(8, 2, 2, 20)
    p.alloc(ids(0))
    p.slot_map[1, 0, 0] = 2  # referenced twice
    p._num_live += 1
    p._num_free -= 1
    with pytest.raises(HeadSlotIntegrityError, match="head-slot 2 referenced 2 times"):
        p.check_integrity()

    p = HeadSlotPool(8, 2, 2, 20)
    p.alloc(ids(0))
    p.free_slots[p.num_free - 1] = 1  # slot 1 free and referenced; the replaced one leaks
    with pytest.raises(HeadSlotIntegrityError, match="head-slot 1 is free and referenced"):
        p.check_integrity()

    p = HeadSlotPool(8, 2, 2, 20)
    p.alloc(ids(0))
    p.free_slots[0] = p.free_slots[1]  # duplicated in the free list
    with pytest.raises(HeadSlotIntegrityError, match="times in the free list"):
        p.check_integrity()

    p = HeadSlotPool(8, 2, 2, 20)
    p.alloc(ids(0))
    p.slot_map[0, 1, 1] = EVICTED  # dropped without freeing: leak
    with pytest.raises(HeadSlotIntegrityError, match="head-slot 3 leaked"):
        p.check_integrity()

    p = HeadSlotPool(8, 2, 2, 20)
    p.alloc(ids(0))
    p._num_free -= 1  # counter wrong: top of stack leaks
    with pytest.raises(HeadSlotIntegrityError, match="leaked"):
        p.check_integrity()

    p = HeadSlotPool(8, 2, 2, 20)
    p._num_live = 3
    with pytest.raises(HeadSlotIntegrityError, match="num_live counter 3"):
        p.check_integrity()

    p = HeadSlotPool(8, 2, 2, 20)
    p.slot_map[0, 0, 0] = 20
    with pytest.raises(HeadSlotIntegrityError, match=r"slot_map\[0, 0, 0\] = 20"):
        p.check_integrity()

    pool.check_integrity()  # the untouched pool is still fine


# ---------------------------------------------------------------- randomized state machine


class HeadSlotMachine(RuleBasedStateMachine):
    """Random alloc / evict / evict_mask / free, mirrored by a plain set of live (v, l, h)."""

    @initialize(
        n_virtual=st.integers(1, 32),
        n_layers=st.integers(1, 3),
        n_heads=st.integers(1, 2),
        capacity=st.integers(0, 96),
    )
    def setup(self, n_virtual, n_layers, n_heads, capacity):
        self.pool = HeadSlotPool(n_virtual, n_layers, n_heads, capacity)
        self.V, self.L, self.H, self.cap = n_virtual, n_layers, n_heads, capacity
        self.live: set[tuple[int, int, int]] = set()

    def holders(self) -> set[int]:
        return {v for v, _, _ in self.live}

    @rule(data=st.data())
    def alloc(self, data):
        fresh = sorted(set(range(self.V)) - self.holders())
        if not fresh:
            return
        tokens = data.draw(st.lists(st.sampled_from(fresh), unique=True, max_size=6))
        need = len(tokens) * self.L * self.H
        if need > self.cap - len(self.live):
            snap = snapshot(self.pool)
            with pytest.raises(HeadSlotPoolFull):
                self.pool.alloc(torch.tensor(tokens, dtype=torch.long))
            assert_unchanged(self.pool, snap)
            return
        slots = self.pool.alloc(torch.tensor(tokens, dtype=torch.long))
        assert slots.shape == (len(tokens), self.L, self.H)
        self.live |= {(v, l, h) for v in tokens for l in range(self.L) for h in range(self.H)}

    @rule(data=st.data())
    def alloc_live_id_fails(self, data):
        if not self.live:
            return
        v = data.draw(st.sampled_from(sorted(self.holders())))
        snap = snapshot(self.pool)
        with pytest.raises(ValueError, match="already holds"):
            self.pool.alloc(ids(v))
        assert_unchanged(self.pool, snap)

    @rule(data=st.data())
    def evict(self, data):
        if not self.live:
            return
        chosen = data.draw(
            st.lists(st.sampled_from(sorted(self.live)), unique=True, min_size=1, max_size=12)
        )
        v, l, h = (torch.tensor(c, dtype=torch.long) for c in zip(*chosen, strict=True))
        assert self.pool.evict(v, l, h) == len(chosen)
        self.live -= set(chosen)

    @rule(data=st.data())
    def evict_dead_fails(self, data):
        dead = [
            (v, l, h) for v in range(self.V) for l in range(self.L) for h in range(self.H)
            if (v, l, h) not in self.live
        ]
        if not dead:
            return
        entry = data.draw(st.sampled_from(dead))
        snap = snapshot(self.pool)
        with pytest.raises(ValueError, match="holds no head-slot"):
            self.pool.evict(*(ids(x) for x in entry))
        assert_unchanged(self.pool, snap)

    @rule(data=st.data())
    def evict_mask(self, data):
        tokens = data.draw(st.lists(st.integers(0, self.V - 1), unique=True, max_size=8))
        n = len(tokens) * self.L * self.H
        keep = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
        keep_t = torch.tensor(keep, dtype=torch.bool).view(len(tokens), self.L, self.H)
        dropped = {
            (v, l, h) for i, v in enumerate(tokens) for l in range(self.L) for h in range(self.H)
            if not keep_t[i, l, h] and (v, l, h) in self.live
        }
        assert self.pool.evict_mask(torch.tensor(tokens, dtype=torch.long), keep_t) == len(dropped)
        self.live -= dropped

    @rule(data=st.data())
    def free(self, data):
        tokens = data.draw(st.lists(st.integers(0, self.V - 1), unique=True, max_size=8))
        dropped = {e for e in self.live if e[0] in tokens}
        assert self.pool.free(torch.tensor(tokens, dtype=torch.long)) == len(dropped)
        self.live -= dropped

    @invariant()
    def consistent(self):
        self.pool.check_integrity()
        assert self.pool.num_live == len(self.live)
        assert self.pool.num_free == self.cap - len(self.live)
        got = {tuple(e) for e in (self.pool.slot_map != EVICTED).nonzero().tolist()}
        assert got == self.live
        counts = self.pool.live_counts(torch.arange(self.V))
        for l in range(self.L):
            for h in range(self.H):
                assert counts[l, h] == sum(1 for e in self.live if e[1:] == (l, h))

    def teardown(self):
        if not hasattr(self, "pool"):
            return
        self.pool.free(torch.arange(self.V))
        self.pool.check_integrity()
        assert self.pool.num_free == self.cap and self.pool.num_live == 0


HeadSlotMachine.TestCase.settings = settings(
    max_examples=30, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_head_slot_state_machine = HeadSlotMachine.TestCase
