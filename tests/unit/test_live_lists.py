"""Persistent live lists: append / gather / compact / drop, and a randomized stress of the whole
head-slot cache (append, evict, compact, reclaim, free) checked against the virtual map after
every operation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from sglang_evict.eviction.evictor import Evictor, EvictorConfig
from sglang_evict.backend.head_cache import HeadKVCache
from sglang_evict.cache.head_slots import EVICTED, HeadSlotPoolFull
from sglang_evict.cache.live_lists import LiveListIntegrityError, LiveLists
from sglang_evict.eviction.policies import make_policy

from head_cache_sim import CacheSim


def _lists(rows=3, LH=2, P=2, cap=64, pages=None):
    return LiveLists(
        num_rows=rows, max_row_len=16, heads_per_token=LH, capacity=cap,
        num_pages=pages or LiveLists.pages_for(32, rows, P), page_size=P,
    )


def test_append_then_gather_lists_each_head_in_order():
    ll = _lists()
    # row 2 gets 3 tokens, row 0 gets 1, in one step; slots [T, LH]
    slots = torch.tensor([[10, 11], [12, 13], [14, 15], [20, 21]])
    ll.append(torch.tensor([2, 0]), torch.tensor([3, 1]), slots)
    e, v = ll.gather(torch.tensor([0, 2]))
    assert e.shape[:2] == (2, 2) and e.shape[2] % 2 == 0
    assert e[0][v[0]].tolist() == [20, 21]
    assert e[1, 0][v[1, 0]].tolist() == [10, 12, 14]
    assert e[1, 1][v[1, 1]].tolist() == [11, 13, 15]
    assert ll.owner[[10, 15, 20]].tolist() == [2, 2, 0]
    assert ll.span.tolist() == [1, 0, 3] and ll.num_row_pages.tolist() == [1, 0, 2]


def test_compact_keeps_survivors_in_order_and_returns_pages():
    ll = _lists()
    slots = torch.arange(20).view(10, 2)
    ll.append(torch.tensor([1]), torch.tensor([10]), slots)
    free_before = ll.num_free_pages
    e, v = ll.gather(torch.tensor([1]))
    keep = v.clone()
    keep[0, 0, 1:9] = False  # head 0 keeps entries 0 and 9
    keep[0, 1, :7] = False  # head 1 keeps 7, 8, 9
    lens = ll.compact(torch.tensor([1]), keep, e)
    assert lens.tolist() == [[2, 3]]
    e, v = ll.gather(torch.tensor([1]))
    assert e[0, 0][v[0, 0]].tolist() == [0, 18]
    assert e[0, 1][v[0, 1]].tolist() == [15, 17, 19]
    assert int(ll.span[1]) == 3
    assert ll.num_free_pages == free_before + 3  # 5 pages -> 2
    ll.drop(torch.tensor([1]))
    assert ll.num_free_pages == ll.arena.shape[0] and int(ll.span[1]) == 0


def test_a_full_row_is_refused():
    ll = _lists()
    with pytest.raises(ValueError, match="exceed"):
        ll.append(torch.tensor([0]), torch.tensor([17]), torch.zeros(17, 2, dtype=torch.long))


def test_integrity_check_finds_a_list_that_disagrees_with_the_map():
    ll = _lists(rows=1, LH=1, cap=4)
    slot_map = torch.full((4, 1, 1), EVICTED, dtype=torch.int32)
    slot_map[0, 0, 0], slot_map[1, 0, 0] = 0, 1
    pos = torch.tensor([0, 1, -1, -1])
    ll.append(torch.tensor([0]), torch.tensor([2]), torch.tensor([[0], [1]]))
    ll.check_integrity(slot_map, pos)
    slot_map[1, 0, 0] = EVICTED  # freed behind the lists' back
    with pytest.raises(LiveListIntegrityError, match="head-slot 1"):
        ll.check_integrity(slot_map, pos)


# ---------------------------------------------------------------- randomized stress
L, H, D = 2, 2, 2
ROWS, CTX = 4, 40


class CacheMachine(RuleBasedStateMachine):
    """SGLang's virtual side driving a HeadKVCache; after every operation the lists, the pool and
    the statistics must agree with the virtual map."""

    @initialize(budget=st.integers(1, 3), buffer=st.integers(0, 2), sinks=st.integers(0, 2),
                mode=st.sampled_from(["global", "per_head"]), cap=st.integers(12, 30))
    def setup(self, budget, buffer, sinks, mode, cap):
        pol = "retention" if mode == "per_head" else "streaming"
        ev = Evictor(EvictorConfig(budget=budget, buffer=buffer, mode=mode,
                                   policy=make_policy(pol, sinks=sinks)), L, H)
        self.alt_ev = Evictor(EvictorConfig(budget=budget + 1, buffer=0,
                                            policy=make_policy("random", sinks=sinks)), L, H)
        self.cache = HeadKVCache(
            num_virtual=256, num_layers=L, num_kv_heads=H, head_dim=D, v_head_dim=D,
            capacity=cap * L * H, dtype=torch.float32, device="cpu", evictor=ev,
            num_rows=ROWS, max_row_len=CTX, page_size=3,
        )
        self.sim = CacheSim(self.cache, rows=ROWS, ctx=CTX, seed=budget * 7 + cap)

    def _step(self, chunks):
        try:
            self.sim.step(chunks, log_beta=None)
        except HeadSlotPoolFull:
            pass  # not even reclaim could make room: SGLang would retract

    @property
    def lens(self):
        return self.sim.lens

    @rule(row=st.integers(0, ROWS - 1), n=st.integers(1, 6))
    def prefill(self, row, n):
        if self.lens[row] + n <= CTX:
            self._step({row: n})

    @precondition(lambda self: any(self.lens))
    @rule()
    def decode(self):
        self._step({r: 1 for r in range(ROWS) if 0 < self.lens[r] < CTX})

    @precondition(lambda self: any(self.lens))
    @rule(data=st.data())
    def finish(self, data):
        self.sim.free(data.draw(st.sampled_from([r for r in range(ROWS) if self.lens[r]])))

    @precondition(lambda self: any(n > 1 for n in self.lens))
    @rule(data=st.data())
    def free_tail(self, data):
        row = data.draw(st.sampled_from([r for r in range(ROWS) if self.lens[r] > 1]))
        self.sim.free(row, keep=data.draw(st.integers(1, self.lens[row] - 1)))

    @rule(deficit=st.integers(1, 20))
    def reclaim(self, deficit):
        before = self.cache.pool.num_free
        freed = self.cache.reclaim(deficit)
        assert self.cache.pool.num_free == before + freed

    @rule(row=st.integers(0, ROWS - 1), which=st.sampled_from(["none", "alt", "server"]))
    def set_policy(self, row, which):
        ev = {"none": None, "alt": self.alt_ev, "server": self.cache.evictor}[which]
        self.cache.set_row_evictor(row, ev)

    @invariant()
    def consistent(self):
        if not hasattr(self, "cache"):
            return
        rtt = self.sim.req_to_token
        self.cache.check_integrity(rtt)
        held = sum(int((self.cache.pool.slot_map[rtt[r, : self.lens[r]].long()] != EVICTED).sum())
                   for r in range(ROWS))
        assert self.cache.pool.num_live == held
        if not any(self.lens):
            assert self.cache.pool.num_free == self.cache.capacity

    def teardown(self):
        if hasattr(self, "cache"):
            event(f"evictions: {int(self.cache.stats.evictions.sum()) > 0}")
            event(f"reclaims: {self.cache.reclaims > 0}")
            for r in range(ROWS):
                if self.lens[r]:
                    self.sim.free(r)
            assert self.cache.pool.num_free == self.cache.capacity
            assert self.cache.lists.num_free_pages == self.cache.lists.arena.shape[0]


CacheMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestCacheMachine = CacheMachine.TestCase
