"""HeadKVCache: the physical side behind the sglang_evict attention backend, driven with the same
batch fields SGLang's ForwardBatch carries."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sglang_evict.cache.head_slots import EVICTED, HeadSlotPoolFull

from head_cache_sim import CacheSim, make_cache

L, H, D = 3, 2, 4


def _cache(capacity_tokens: int, policy: str | None = "streaming", budget=4, buffer=2, sinks=1):
    return make_cache(capacity_tokens, L, H, D, policy=policy, budget=budget, buffer=buffer,
                      sinks=sinks)


def test_store_writes_kv_scores_and_positions_into_the_new_head_slots():
    cache = _cache(64, policy=None)
    sim = CacheSim(cache)
    batch = sim.step({0: 5}, log_beta=-0.5)
    slots = cache.pool.slot_map[batch.out_cache_loc.long()].long()  # [5, L, H]
    assert bool((slots >= 0).all())
    assert torch.equal(cache.pos[slots], batch.positions[:, None, None].expand_as(slots))
    assert torch.all(cache.log_beta[slots] == -0.5)


def test_no_eviction_keeps_everything_and_stats_count_it():
    cache = _cache(64, policy=None)
    sim = CacheSim(cache)
    sim.step({0: 6, 1: 3})
    for _ in range(4):
        sim.step({0: 1, 1: 1})
    st = cache.row_stats(0)
    assert st.live == st.peak_live == 10 * L * H and st.evicted == 0
    meta = st.as_meta(L * H, None)
    assert meta["compression_ratio"] == 1.0 and meta["full_head_slots"] == 10 * L * H


def test_budget_is_enforced_after_every_step_and_memory_returns():
    cache = _cache(64, budget=4, buffer=2)
    sim = CacheSim(cache)
    trigger = L * H * (4 + 2)
    sim.step({0: 10})  # the prefill alone exceeds M + B
    assert cache.row_stats(0).live == L * H * 4
    for _ in range(12):
        free_before = cache.pool.num_free
        sim.step({0: 1})
        st = cache.row_stats(0)
        assert st.live <= trigger
        if st.free_after_last_evict >= 0:
            assert st.free_after_last_evict > st.free_before_last_evict
        assert cache.pool.num_free >= free_before - L * H
    st = cache.row_stats(0)
    assert st.peak_live <= trigger and st.evictions >= 2
    assert st.live + st.evicted == 22 * L * H
    # Streaming keeps the sink and the newest tokens: every survivor of layer 0, head 0.
    live = cache.pool.slot_map[sim.req_to_token[0, :22].long(), 0, 0] != EVICTED
    kept = live.nonzero()[:, 0].tolist()
    assert kept[0] == 0 and kept[1:] == list(range(22 - len(kept) + 1, 22))
    sim.free(0)
    assert cache.pool.num_free == cache.capacity
    cache.pool.check_integrity()


def test_a_new_request_on_a_reused_row_starts_fresh_statistics():
    cache = _cache(64)
    sim = CacheSim(cache)
    sim.step({0: 10})
    assert cache.row_stats(0).evicted > 0
    sim.free(0)
    sim.step({0: 3})
    assert cache.row_stats(0).evicted == 0 and cache.row_stats(0).seq_len == 3


def test_shortage_reclaims_lowest_scores_across_requests_before_failing():
    # 20 tokens of memory; each request may keep 4 + 6 tokens' worth, so three requests together
    # outgrow the pool and the third prefill must take head-slots from the first two.
    cache = _cache(20, budget=4, buffer=6, sinks=1)
    sim = CacheSim(cache)
    sim.step({0: 9})
    sim.step({1: 9})
    assert cache.pool.num_free == 2 * L * H
    sim.step({2: 6})
    assert cache.reclaims == 1
    taken = cache.row_stats(0).reclaimed + cache.row_stats(1).reclaimed
    assert taken >= 4 * L * H
    # Sinks (position 0) are protected: every request still has its first token everywhere.
    for r in (0, 1, 2):
        assert bool((cache.pool.slot_map[sim.req_to_token[r, 0].long()] != EVICTED).all())
    cache.pool.check_integrity()


def test_shortage_that_only_protected_entries_could_cover_fails_cleanly():
    cache = _cache(8, budget=4, buffer=4, sinks=8)
    sim = CacheSim(cache)
    sim.step({0: 6})
    with pytest.raises(HeadSlotPoolFull):
        sim.step({1: 4})
    cache.pool.check_integrity()


def test_reset_frees_everything():
    cache = _cache(32)
    sim = CacheSim(cache)
    sim.step({0: 5, 1: 7})
    cache.reset()
    assert cache.pool.num_free == cache.capacity and not bool(cache.stats.active.any())
    cache.pool.check_integrity()


def test_start_up_refuses_pools_one_step_could_outgrow():
    from sglang_evict.patches.head_evict import HeadEvictError, _check_fits

    cache = _cache(64, sinks=4)
    runner = SimpleNamespace(server_args=SimpleNamespace(chunked_prefill_size=32),
                             max_running_requests=4)
    _check_fits(runner, cache, 64)  # 4 x (4 + 0 + 1) protected + 32 <= 64
    runner.server_args.chunked_prefill_size = 40
    with pytest.raises(HeadEvictError, match="at most half the physical pool"):
        _check_fits(runner, cache, 64)
    runner.server_args.chunked_prefill_size = 32
    runner.max_running_requests = 8
    with pytest.raises(HeadEvictError, match="lower --max-running-requests"):
        _check_fits(runner, cache, 64)
    _check_fits(runner, _cache(64, policy=None), 64)  # nothing protected without an evictor
