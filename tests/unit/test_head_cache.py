"""HeadKVCache: the physical side behind the sglang_evict attention backend, driven with the same
batch fields SGLang's ForwardBatch carries."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sglang_evict.errors import HeadEvictError
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


@pytest.mark.parametrize("policy", [None, "streaming"])
def test_the_integrity_check_recomputes_each_rows_lists_from_the_virtual_map(policy):
    """The debug check (--evict-debug-check) holds each active row's lists against the live
    head-slots of its req_to_token row: swapping two rows of the map (equal lengths and live
    counts, every list sound on its own) is caught; with eviction the lists have holes."""
    cache = _cache(64, policy=policy)
    sim = CacheSim(cache)
    sim.step({0: 9, 1: 9}, log_beta=None)
    if policy is not None:
        assert int(cache.stats.evicted[:2].sum()) > 0
    cache.check_integrity(sim.req_to_token)
    swapped = sim.req_to_token.clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    with pytest.raises(RuntimeError, match="row 0 layer 0: lists differ from the virtual map"):
        cache.check_integrity(swapped)


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
    from sglang_evict.patches.evict_pool import _check_fits

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


def test_start_up_caps_running_requests_the_user_left_open_to_the_budget_fit(monkeypatch):
    """A pool SGLang sized itself (e.g. --mem-fraction-static) with SGLang's default running
    requests: capped to (pool - chunk) // (M + B + 1), what `serve` chooses for a given pool; a
    value the user set is left to the fit check."""
    from sglang_evict.config import EvictConfig
    from sglang_evict.patches import evict_pool

    cfg = EvictConfig(policy="retention-global", budget=8, buffer=7, sinks=2)

    def runner(user, default):
        return SimpleNamespace(
            server_args=SimpleNamespace(chunked_prefill_size=100, max_running_requests=user),
            max_running_requests=default,
            memory_pool_config=SimpleNamespace(max_running_requests=default))

    r = runner(None, 500)
    with pytest.raises(HeadEvictError, match="lower --max-running-requests"):
        evict_pool._check_fits(r, _cache(64, sinks=2), 1000)  # 500 x 3 protected + 100 > 1000
    evict_pool._fit_running(r, cfg, True, 1000)
    assert r.max_running_requests == (1000 - 100) // (8 + 7 + 1) == 56
    assert r.memory_pool_config.max_running_requests == 56
    evict_pool._check_fits(r, _cache(64, sinks=2), 1000)  # now fits
    small = runner(None, 20)
    evict_pool._fit_running(small, cfg, True, 1000)
    assert small.max_running_requests == 20  # never raised above SGLang's own
    user = runner(500, 500)
    evict_pool._fit_running(user, cfg, True, 1000)
    assert user.max_running_requests == 500
    off = runner(None, 500)
    evict_pool._fit_running(off, cfg, False, 1000)
    assert off.max_running_requests == 500


def test_prefill_admission_counts_the_physical_pool(monkeypatch):
    """SGLang admits prefills against its oversubscribed virtual pool; the hooks admit a request
    only when its next chunk fits the whole tokens free or reclaimable in the physical pool, and
    charge what they admitted against the round."""
    from sglang.srt.managers.schedule_policy import AddReqResult

    from sglang_evict.patches import evict_admission as adm
    from sglang_evict.patches.runtime import Runtime

    cache = _cache(20, budget=4, buffer=6, sinks=1)
    sim = CacheSim(cache)
    sim.step({0: 9})
    rt = Runtime()
    rt.cache = cache
    # 11 tokens free; request 0 holds 9, of which sink + newest (2 tokens) are protected
    assert cache.pool.num_free == 11 * L * H and cache.reclaimable() == 7 * L * H
    adder = SimpleNamespace(rem_chunk_tokens=12, can_run_list=[])
    adm.after_prefill_adder_init(rt, None, adder)
    assert adder._evict_tokens_left == 18

    def admit(adder, req, *args):  # SGLang's admission: the next chunk, at most rem_chunk_tokens
        req.extend_end = req.prefix_len + min(len(req.full_untruncated_fill_ids) - req.prefix_len,
                                              adder.rem_chunk_tokens)
        adder.can_run_list.append(req)
        return AddReqResult.CONTINUE

    def req(n, prefix=0):
        return SimpleNamespace(full_untruncated_fill_ids=list(range(n)), prefix_len=prefix)

    assert adm.around_add_one_req(rt, admit, adder, req(10), False, None) == AddReqResult.CONTINUE
    assert adder._evict_tokens_left == 8
    big = req(10)
    assert adm.around_add_one_req(rt, admit, adder, big, False, None) == AddReqResult.NO_TOKEN
    assert big not in adder.can_run_list  # refused whole, never truncated to fit
    # a long prompt is admitted by its first chunk, continued only when the next chunk fits
    adder = SimpleNamespace(rem_chunk_tokens=12, can_run_list=[])
    adm.after_prefill_adder_init(rt, None, adder)
    long = req(40)
    adm.around_add_one_req(rt, admit, adder, long, False, None)
    assert long.extend_end == 12 and adder._evict_tokens_left == 6
    long.prefix_len = 12
    assert adm.around_add_chunked_req(rt, admit, adder, long) is long  # parked for a later round
    assert long.extend_end == 12
    # a request that may never be reclaimed from (policy none) leaves only what is free
    cache.set_row_evictor(0, None)
    adder = SimpleNamespace(rem_chunk_tokens=None, can_run_list=[])
    adm.after_prefill_adder_init(rt, None, adder)
    assert adder._evict_tokens_left == 11
    # a mixed chunk decodes one token per running request beside the prefill: SGLang passes
    # their count to PrefillAdder, by name or in its place
    adder = SimpleNamespace(rem_chunk_tokens=None, can_run_list=[])
    adm.after_prefill_adder_init(rt, None, adder, 1, None, None, None, 0.5, 100, None, 3)
    assert adder._evict_tokens_left == 11 - 3
    adm.after_prefill_adder_init(rt, None, adder, num_mixed_decode_tokens=4)
    assert adder._evict_tokens_left == 11 - 4


def _policy_evictor(policy: str, budget: int, buffer: int, sinks: int = 1):
    from sglang_evict.eviction.evictor import Evictor, EvictorConfig
    from sglang_evict.eviction.policies import make_policy

    return Evictor(EvictorConfig(budget=budget, buffer=buffer,
                                 policy=make_policy(policy, sinks=sinks)), L, H)


@pytest.mark.parametrize("policies", [("streaming", "random"), ("random", "streaming"),
                                      ("streaming", "retention"), ("knorm", "random")])
def test_a_shortage_takes_equal_shares_from_requests_of_different_policies(policies):
    """Two requests with equal budgets and equal lengths, each with its own policy, and a third
    that needs room: the global evictor takes the same number of head-slots from each (its
    scores on one scale), never all from the policy whose raw scores run lower."""
    cache = _cache(22, budget=8, buffer=2, sinks=1)
    sim = CacheSim(cache)
    for row, policy in enumerate(policies):
        cache.set_row_evictor(row, _policy_evictor(policy, budget=8, buffer=2))
        sim.step({row: 10}, log_beta=None)
    assert cache.pool.num_free == 2 * L * H
    sim.step({2: 8}, log_beta=None)  # short by 6 tokens' head-slots
    assert cache.reclaims == 1
    taken = [cache.row_stats(r).reclaimed for r in (0, 1)]
    assert sum(taken) == 6 * L * H
    assert taken[0] == taken[1], (policies, taken)


def test_one_policy_alone_ranks_by_its_raw_scores():
    """Requests of one policy compete on their raw scores: with streaming, the older request's
    entries (older positions) leave first."""
    from sglang_evict.eviction.global_evictor import common_scale

    cache = _cache(22, budget=8, buffer=2, sinks=1)
    sim = CacheSim(cache)
    sim.step({0: 10})
    sim.step({1: 4})
    sim.step({1: 1})
    sim.step({1: 1})
    before = [cache.row_stats(r).live for r in (0, 1)]
    sim.step({2: 9})  # short: streaming takes the oldest positions wherever they are
    taken = [cache.row_stats(r).reclaimed for r in (0, 1)]
    assert taken[0] > taken[1] and before[0] > before[1]
    # the common scale is each group's rank: order-preserving within a group, ties by index
    flat = torch.tensor([3.0, -1.0, float("inf"), 3.0, 0.5, -float("inf"), 7.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    want = torch.tensor([0.5, 1 / 6, float("inf"), 5 / 6, 0.25, -float("inf"), 0.75])
    assert torch.allclose(common_scale(flat, groups), want)
