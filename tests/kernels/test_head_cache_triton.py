"""The cache with its Triton step-metadata kernel (interpreted): through prefill, decode and
eviction of two requests, the metadata equals the pool's live lists recomputed from the virtual
map (CacheSim checks every layer of every step)."""

from __future__ import annotations

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
