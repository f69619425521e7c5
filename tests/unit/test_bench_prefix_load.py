"""bench/prefix_load.py times what admission runs after a cached prefix: the request's lists
must end up holding exactly the prefix's live head-slots, per (layer, head), all shared."""

from __future__ import annotations

import torch

import bench_modules


def test_the_timed_load_lists_every_live_head_slot_of_the_prefix_once():
    bench = bench_modules.load("prefix_load")
    L, H, D, prefix, budget = 3, 2, 8, 40, 5
    for compressed in (False, True):
        cache, req_to_token, lh = bench.cache_for(prefix, L, H, D)
        assert lh == L * H
        if compressed:
            bench.compress(cache, prefix, budget)
        assert bench.time_load(cache, req_to_token, prefix, repeats=2) > 0
        per_head = budget if compressed else prefix
        # independent of the lists: the pool's own map of the prefix's live head-slots
        live = cache.pool.slot_map[1:prefix + 1].view(prefix, L * H)
        assert int((live >= 0).sum()) == per_head * L * H
        listed, valid = cache.lists.gather(torch.tensor([0]))
        assert valid.sum(dim=-1).tolist() == [[per_head] * (L * H)]
        for lh_i in range(L * H):
            want = sorted(live[:, lh_i][live[:, lh_i] >= 0].tolist())
            assert sorted(listed[0, lh_i][valid[0, lh_i]].tolist()) == want
        assert cache.lists.lens_host[0].tolist() == [per_head] * (L * H)
