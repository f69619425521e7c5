"""Eviction with the radix cache, at the cache level (SGLang's tree flows from tests/radix_sim.py):
compressed prefixes are shared, not copied or recomputed; a request's own eviction never takes
the tree's head-slots; the global evictor ranks the tree's entries with the requests'; the tree
frees what it evicts; every step ends with the integrity check (lists against the virtual map,
owners, shared parts, the tree's counts)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglang_evict.cache.head_slots import EVICTED, HeadSlotPoolFull

from head_cache_sim import make_cache
from radix_sim import RadixSim

L, H, D = 2, 2, 4
HPT = L * H


def _sim(capacity_tokens=64, policy="streaming", budget=4, buffer=2, sinks=1, rows=4,
         reclaim="mixed"):
    cache = make_cache(capacity_tokens, L, H, D, policy=policy, budget=budget, buffer=buffer,
                       sinks=sinks, rows=rows, reclaim=reclaim)
    return cache, RadixSim(cache, rows=rows)


def _live(cache, ids):
    return cache.pool.slot_map[ids.long()] != EVICTED


def test_a_later_turn_reuses_the_compressed_history_without_copying_it():
    cache, sim = _sim()
    sim.admit(0, None, 0, 9, log_beta=None)
    for _ in range(6):
        sim.step({0: 1}, log_beta=None)
    assert cache.row_stats(0).evictions > 0
    history = sim.req_to_token[0, :15].clone()
    survivors = cache.pool.slot_map[history.long()].clone()
    sim.finish(0)
    assert cache.tree.live == int((survivors >= 0).sum())  # the tree keeps what survived
    free = cache.pool.num_free
    sim.admit(1, 0, 15, 3, log_beta=None)  # turn 2: the whole history matched, 3 new tokens
    now = cache.pool.slot_map[history.long()]
    # the same head-slots (or holes where turn 2 compressed its history further), never copies
    assert bool(((now == survivors) | (now == EVICTED)).all())
    taken = int(((survivors >= 0) & (now == EVICTED)).sum())
    assert free - cache.pool.num_free == 3 * HPT - taken  # only the new tokens took head-slots
    for _ in range(8):  # turn 2 alone lists the history: its budget covers it
        sim.step({1: 1}, log_beta=None)
        assert cache.row_stats(1).live <= (4 + 2) * HPT + HPT
    sim.finish(1)
    for i in range(len(sim.sequences)):
        sim.evict_sequence(i)
    assert cache.pool.num_free == cache.capacity and cache.tree.live == 0
    cache.check_integrity()


def test_a_prefix_two_requests_list_is_evicted_by_neither_of_them():
    cache, sim = _sim(capacity_tokens=96)
    sim.admit(0, None, 0, 8, log_beta=None)
    sim.finish(0)
    history = sim.sequences[0].long()
    sim.admit(1, 0, 8, 1, log_beta=None)
    sim.admit(2, 0, 8, 1, log_beta=None)
    held = cache.pool.slot_map[history].clone()
    assert int(cache.tree.holders.max()) == 2
    for _ in range(10):
        sim.step({1: 1, 2: 1}, log_beta=None)
        assert torch.equal(cache.pool.slot_map[history], held)
    assert cache.row_stats(1).evictions > 0 and cache.row_stats(2).evictions > 0
    sim.finish(2)  # row 1 alone lists the prefix now: its next eviction may compress it
    assert int(cache.tree.alone_host[1].sum()) == int((held >= 0).sum())
    for _ in range(8):
        sim.step({1: 1}, log_beta=None)
    assert not torch.equal(cache.pool.slot_map[history], held)
    cache.check_integrity(sim.req_to_token)


def test_global_evictor_takes_the_tree_entries_with_the_lowest_utility():
    cache, sim = _sim(capacity_tokens=24, budget=6, buffer=4)
    sim.admit(0, None, 0, 10, log_beta=None)
    for _ in range(4):
        sim.step({0: 1}, log_beta=None)
    sim.finish(0)
    held = cache.tree.live
    assert held > 0 and cache.pool.num_free < 16 * HPT
    sim.admit(1, None, 0, 16, log_beta=None)  # does not fit beside the tree: reclaim
    assert cache.reclaims >= 1 and cache.tree.live < held
    tree_ids = sim.sequences[0]
    kept = _live(cache, tree_ids)
    assert bool(kept[0].all())  # the tree's sink survives
    assert bool((~kept).any())  # holes: per head, not whole tokens
    cache.check_integrity(sim.req_to_token)


def test_tree_first_takes_the_trees_entries_before_any_running_requests():
    """Streaming scores -(t - pos): a running request's oldest entries score below the tree's
    (cached at a shorter length), so one ranking takes from the request; tree-first takes the
    tree's evictable entries first and leaves every running head-slot in place."""
    taken = {}
    for order in ("mixed", "tree-first"):
        cache, sim = _sim(capacity_tokens=40, budget=16, buffer=4, reclaim=order)
        sim.admit(0, None, 0, 6, log_beta=None)
        sim.finish(0)  # the tree holds 6 tokens, its sink protected
        sim.admit(1, None, 0, 14, log_beta=None)  # a new request, nothing shared
        for _ in range(4):
            sim.step({1: 1}, log_beta=None)
        running = sim.req_to_token[1, :18].long()
        before = cache.pool.slot_map[running].clone()
        assert bool((before >= 0).all())
        tree_before = cache.tree.live
        freed = cache.global_evictor.reclaim(3 * HPT)
        assert freed == 3 * HPT
        taken[order] = int((cache.pool.slot_map[running] != before).sum())
        if order == "tree-first":
            assert taken[order] == 0 and cache.tree.live == tree_before - 3 * HPT
        cache.check_integrity(sim.req_to_token)
    assert taken["mixed"] > 0  # one ranking: the request's old entries went first


def test_a_request_listing_tree_entries_loses_them_when_the_global_evictor_takes_them():
    cache, sim = _sim(capacity_tokens=26, budget=12, buffer=4)
    sim.admit(0, None, 0, 10, log_beta=None)
    sim.finish(0)
    sim.admit(1, 0, 10, 2, log_beta=None)  # row 1 lists the tree's 10 tokens as shared
    assert int(cache.lists.shared_host[1].sum()) == 10 * HPT
    sim.admit(2, None, 0, 16, log_beta=None)  # short: the global evictor ranks everything
    assert cache.reclaims >= 1
    lost = 10 * HPT - int(cache.lists.shared_host[1].sum())
    assert lost > 0  # shared entries left row 1's lists with the tree's head-slots
    cache.check_integrity(sim.req_to_token)
    sim.step({1: 1, 2: 1}, log_beta=None)  # and both keep running


def test_policy_none_request_pins_the_tree_entries_it_lists():
    cache, sim = _sim(capacity_tokens=26, budget=6, buffer=4)
    sim.admit(0, None, 0, 10, log_beta=None)
    sim.finish(0)  # sequence 0: matched below by a request that evicts nothing
    sim.admit(0, None, 0, 8, log_beta=None)
    sim.finish(0)  # sequence 1: nobody's
    cache.set_row_evictor(1, None)
    sim.admit(1, 0, 10, 2, log_beta=None)
    pinned = cache.pool.slot_map[sim.sequences[0].long()].clone()
    other = cache.pool.slot_map[sim.sequences[1].long()].clone()
    sim.admit(2, None, 0, 8, log_beta=None)  # short by 2 tokens' head-slots
    assert cache.reclaims == 1
    assert torch.equal(cache.pool.slot_map[sim.sequences[0].long()], pinned)
    assert not torch.equal(cache.pool.slot_map[sim.sequences[1].long()], other)
    assert int(cache.lists.shared_host[1].sum()) == 10 * HPT


def test_a_shared_entry_is_scored_for_its_youngest_holder():
    """Retention at a constant log beta: a tree entry's utility is (t - pos) * log beta at the
    shortest length among its holders. A request 12 tokens long that matched the first 10 tokens
    of a 30-token cached sequence makes them young; the global evictor takes the cached tail."""
    cache, sim = _sim(capacity_tokens=44, policy="retention", budget=40, buffer=0)
    sim.admit(0, None, 0, 30, log_beta=-1.0)
    sim.finish(0)  # sequence 0, t = 30
    sim.admit(0, None, 0, 10, log_beta=-1.0)
    sim.finish(0)  # sequence 1, t = 10
    sim.admit(1, 0, 10, 2, log_beta=-1.0)  # t = 12, lists sequence 0's first 10 tokens
    tail = sim.sequences[0][10:].long()
    sim.admit(2, None, 0, 6, log_beta=-1.0)  # short by 4 tokens' head-slots
    assert cache.reclaims == 1
    assert int(cache.lists.shared_host[1].sum()) == 10 * HPT  # the young prefix stays
    lost = (cache.pool.slot_map[tail] == EVICTED).all(dim=(1, 2))
    assert lost.tolist() == [True] * 4 + [False] * 16  # the oldest of the cached tail went


def test_a_chunk_checkpoint_that_rewrites_the_row_to_the_trees_ids():
    cache, sim = _sim(capacity_tokens=96)
    sim.admit(0, None, 0, 8, log_beta=None)
    sim.finish(0)
    # row 1 computed the same 8 tokens itself (admitted before row 0 finished), then more
    sim.admit(1, None, 0, 8, log_beta=None)
    sim.step({1: 4}, log_beta=None)
    own = sim.req_to_token[1, :8].clone()
    sim.checkpoint(1, duplicate_of=0)  # its own duplicates freed, row rewritten to the tree's
    assert bool((cache.pool.slot_map[own.long()] == EVICTED).all())
    assert torch.equal(sim.req_to_token[1, :8], sim.sequences[0][:8].int())
    cache.check_integrity(sim.req_to_token)
    for _ in range(6):
        sim.step({1: 1}, log_beta=None)
    sim.finish(1)
    for i in range(len(sim.sequences)):
        sim.evict_sequence(i)
    assert cache.pool.num_free == cache.capacity


def test_abort_keeps_the_tree_and_frees_only_the_request_own():
    cache, sim = _sim()
    sim.admit(0, None, 0, 6, log_beta=None)
    sim.finish(0)
    sim.admit(1, 0, 6, 5, log_beta=None)
    tree = cache.tree.live  # what the tree still holds after row 1 compressed the history
    assert 0 < tree
    sim.finish(1, into_tree=False)  # client disconnected
    assert cache.tree.live == tree and cache.pool.num_free == cache.capacity - tree
    cache.check_integrity()


OPS = st.lists(
    st.tuples(st.sampled_from(["admit"] * 4 + ["decode"] * 2 + ["finish"] * 2 +
                              ["chunk", "abort", "checkpoint", "evict_tree"]),
              st.integers(0, 3), st.integers(0, 7), st.integers(1, 10)),
    min_size=10, max_size=50,
)


def _apply(sim, op: str, row: int, a: int, b: int) -> int:
    """One random operation of SGLang's radix flow on the simulated cache; returns the tokens
    it asked the pool for (0 if it took none)."""
    cache = sim.cache
    running = [r for r in range(4) if sim.lens[r]]
    if op == "admit" and not sim.lens[row]:
        live_seqs = [i for i, s in enumerate(sim.sequences) if s.numel()]
        if live_seqs and a % 2:
            seq = live_seqs[a % len(live_seqs)]
            prefix = 1 + a % sim.sequences[seq].numel()
            ids = sim.sequences[seq][:prefix]
            assert bool((cache.tree.tree_t[ids.long()] >= 0).all())  # never freed KV
            sim.admit(row, seq, prefix, b, log_beta=None)
        else:
            sim.admit(row, None, 0, b, log_beta=None)
        return b
    if op == "decode" and running:
        sim.step({r: 1 for r in running}, log_beta=None)
        return len(running)
    if op == "chunk" and sim.lens[row]:
        sim.step({row: b}, log_beta=None)
        return b
    if op in ("finish", "abort") and sim.lens[row]:
        sim.finish(row, into_tree=op == "finish")
    elif op == "checkpoint" and sim.lens[row]:
        sim.checkpoint(row)
    elif op == "evict_tree" and sim.sequences:
        sim.evict_sequence(a % len(sim.sequences))
    return 0


def _asks(sim, op: str, row: int) -> int:
    """The tokens `_apply` would ask the pool for, before it runs (b for admit and chunk)."""
    running = [r for r in range(4) if sim.lens[r]]
    if op == "decode":
        return len(running)
    if op == "admit" and not sim.lens[row] or op == "chunk" and sim.lens[row]:
        return -1  # b
    return 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS, st.sampled_from(["streaming", "retention", "random"]),
       st.lists(st.booleans(), min_size=4, max_size=4))
def test_a_step_admission_counted_as_fitting_never_runs_short(ops, policy, never):
    """Admission's promise, under random tree and request operations with some requests that
    never evict (policy none, pinning the tree entries they list) and holders of different
    lengths: a step whose head-slots fit the free ones plus `reclaimable()` never fails, and
    `reclaimable()` never exceeds what the global evictor frees when asked for everything."""
    cache, sim = _sim(capacity_tokens=16, policy=policy, budget=3, buffer=2)
    fitted = short = 0
    for op, row, a, b in ops:
        if op == "admit" and not sim.lens[row]:
            cache.set_row_evictor(row, None if never[row] else cache.requests.default)
        asks = _asks(sim, op, row)
        asks = b if asks < 0 else asks
        fits = asks * HPT <= cache.pool.num_free + cache.reclaimable()
        try:
            _apply(sim, op, row, a, b)
            fitted += bool(asks)
        except HeadSlotPoolFull:
            assert not fits, (op, asks, cache.pool.num_free)
            short += 1
        cache.check_integrity(sim.req_to_token)
        if a == 7:  # now and then: the global evictor asked for everything it can take
            promised = cache.reclaimable()
            assert cache.reclaim(cache.capacity) >= promised
            cache.check_integrity(sim.req_to_token)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS, st.sampled_from(["streaming", "retention", "random"]))
def test_random_tree_and_request_operations_keep_every_invariant(ops, policy):
    """Random admits (with and without a match), decode and chunk steps, finishes into the tree,
    aborts, running checkpoints and tree evictions over a small pool: after every operation the
    lists equal the virtual map, owners and shared parts are exact, the tree's counts hold, no
    match returns freed KV; after draining, free == capacity."""
    cache, sim = _sim(capacity_tokens=16, policy=policy, budget=3, buffer=2)
    for op, row, a, b in ops:
        try:
            _apply(sim, op, row, a, b)
        except HeadSlotPoolFull:  # a pool too small for the step: SGLang would retract
            pass
        cache.check_integrity(sim.req_to_token)
        # the cheap host-counter balance, and the same balance from the device's owners: every
        # live head-slot is a request's own or the tree's
        owned = int((cache.lists.owner >= 0).sum())
        assert cache.unaccounted() == 0
        assert cache.capacity - cache.pool.num_free == owned + cache.tree.live
    for r in range(4):
        if sim.lens[r]:
            sim.finish(r)
    for i in range(len(sim.sequences)):
        assert sim.sequences[i].numel() == 0 or sim.evict_sequence(i)
    cache.check_integrity(sim.req_to_token)
    assert cache.pool.num_free == cache.capacity and cache.tree.live == 0
