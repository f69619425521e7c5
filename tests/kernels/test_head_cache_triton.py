"""The cache with its Triton step-metadata kernel (interpreted): through prefill, decode and
eviction of two requests, the metadata equals the pool's live lists recomputed from the virtual
map (CacheSim checks every layer of every step)."""

from __future__ import annotations

import torch

from head_cache_sim import CacheSim, make_cache


def test_triton_metadata_kernel_inside_the_cache():
    cache = make_cache(64, 3, 2, 4, budget=3, buffer=2, use_triton=True)
    sim = CacheSim(cache)
    sim.step({0: 7, 1: 4}, log_beta=None)
    for _ in range(5):
        sim.step({0: 1, 1: 1}, log_beta=None)
    assert cache.row_stats(0).evictions >= 2 and cache.row_stats(1).evictions >= 1
    sim.free(0)
    sim.free(1)
    assert cache.pool.num_free == cache.capacity


def test_reclaim_with_the_triton_select_takes_what_the_torch_path_takes():
    """Cross-request reclaim ranks the whole pool with the Triton radix select: the same
    head-slots leave as with the torch k-th value (ties to the lower list index in both)."""
    caches = [make_cache(20, 2, 2, 4, budget=4, buffer=6, sinks=1, use_triton=t) for t in (False, True)]
    sims = [CacheSim(c) for c in caches]
    for sim in sims:
        sim.step({0: 9}, log_beta=None)
        sim.step({1: 9}, log_beta=None)
        sim.step({2: 6}, log_beta=None)  # short: reclaims from rows 0 and 1
    ref, tri = caches
    assert ref.reclaims == tri.reclaims == 1
    assert torch.equal(ref.pool.slot_map, tri.pool.slot_map)
    assert torch.equal(ref.stats.reclaimed, tri.stats.reclaimed) and int(ref.stats.reclaimed.sum()) > 0
