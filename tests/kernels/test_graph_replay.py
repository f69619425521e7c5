"""CUDA-graph replay of decode, on CPU: the backend's capture / replay metadata path (static
buffers sized at capture, a batch padded to the captured size) must give the eager path's
attention outputs and leave the cache in the eager path's state, step after step, with eviction
running between steps and requests leaving mid-way."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from backend_sim import L, H, Requests, forward, make_backend
from head_cache_sim import Mode


def _backend(use_triton: bool, req_to_token):
    return make_backend("triton" if use_triton else "torch", req_to_token)


def _replay_view(batch, bs):
    """What SGLang's decode graph runner hands the backend before a replay: the captured size,
    padded req_pool_indices (stale values: here a live row) and seq_lens (the fill value)."""
    raw = batch.batch_size
    pad = bs - raw
    rows = torch.cat([batch.req_pool_indices, torch.zeros(pad, dtype=torch.long)])
    seq = torch.cat([batch.seq_lens, torch.ones(pad, dtype=torch.long)])
    pos = torch.cat([batch.positions, torch.zeros(pad, dtype=torch.long)])
    return SimpleNamespace(
        batch_size=bs, num_padding=pad, forward_mode=Mode(True), actual_forward_mode=Mode(True),
        req_pool_indices=rows, seq_lens=seq, seq_lens_cpu=seq, out_cache_loc=batch.out_cache_loc,
        positions=pos,
    )


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
def test_replay_metadata_equals_eager(use_triton):
    reqs = Requests()
    eager, graph = _backend(use_triton, reqs.req_to_token), _backend(use_triton, reqs.req_to_token)
    max_bs = 4
    graph.init_cuda_graph_state(max_bs, max_bs)
    g = graph.cache.graph
    addresses = (g.indptr.data_ptr(), g.indices.data_ptr(), g.new_slots.data_ptr())

    # capture: an empty step on the static buffers, no request state touched
    capture = SimpleNamespace(batch_size=max_bs, forward_mode=Mode(True))
    graph.init_forward_metadata_out_graph(capture, in_capture=True)
    free = graph.cache.pool.num_free
    o = forward(graph, SimpleNamespace(positions=torch.zeros(max_bs, dtype=torch.long)),
                 torch.Generator().manual_seed(9))
    assert all(bool((x == 0).all()) for x in o)  # nothing listed, nothing attended
    assert graph.cache.pool.num_free == free and not bool(graph.cache.lists.lens.any())

    prefill = reqs.batch({0: 9, 1: 5, 2: 12})
    for b in (eager, graph):  # prefill runs eager in both
        b.init_forward_metadata(prefill)
        forward(b, prefill, torch.Generator().manual_seed(1), decode=False)
        b.cache.after_forward(prefill, reqs.req_to_token)

    rows = [0, 1, 2]
    for step in range(14):
        if step == 6:  # a request leaves: the graph batch gets two padded requests
            reqs.finish(1, (eager, graph))
            rows = [0, 2]
        batch = reqs.batch({r: 1 for r in rows})
        eager.init_forward_metadata(batch)
        want = forward(eager, batch, torch.Generator().manual_seed(step))

        view = _replay_view(batch, max_bs)
        graph.init_forward_metadata_out_graph(view)
        got = forward(graph, view, torch.Generator().manual_seed(step), pad=view.num_padding)
        for l in range(L):
            seqs = max_bs * H
            indptr, indices = graph.cache.step.layer(l)
            assert indptr.data_ptr() == g.indptr.data_ptr() + l * seqs * 8
            assert indices.data_ptr() == g.indices.data_ptr()
            torch.testing.assert_close(got[l][: len(rows)], want[l], rtol=1e-5, atol=1e-6)
            assert bool((got[l][len(rows):] == 0).all())
        for b in (eager, graph):
            b.cache.after_forward(batch, reqs.req_to_token)
        assert (g.indptr.data_ptr(), g.indices.data_ptr(), g.new_slots.data_ptr()) == addresses

        # the same cache state: lists, stored K/V/positions, pool, statistics
        e, c = eager.cache, graph.cache
        live = e.pool.slot_map != -1
        assert torch.equal(e.pool.slot_map, c.pool.slot_map)
        slots = e.pool.slot_map[live].long()
        assert torch.equal(e.k[slots], c.k[slots]) and torch.equal(e.v[slots], c.v[slots])
        assert torch.equal(e.pos[slots], c.pos[slots])
        assert torch.equal(e.lists.lens, c.lists.lens)
        assert torch.equal(e.stats.live, c.stats.live) and torch.equal(e.stats.evicted, c.stats.evicted)
    assert int(eager.cache.stats.evicted.sum()) > 0  # eviction ran between replayed steps


def test_replay_beyond_the_captured_size_is_refused():
    reqs = Requests()
    backend = _backend(False, reqs.req_to_token)
    backend.init_cuda_graph_state(2, 2)
    with pytest.raises(RuntimeError, match="init_graph"):
        backend.init_forward_metadata_out_graph(
            SimpleNamespace(batch_size=3, forward_mode=Mode(True)), in_capture=True
        )
