"""`--evict-kernel flashinfer`'s layout on CPU: the step's lists handed to a paged-prefill wrapper
(each (request, KV head) a sequence with one KV head and its query group, page size 1, bottom-right
causal) give the ragged torch reference's attention, for decode and for chunks after cached
survivors. FlashInfer itself needs CUDA: here a torch implementation of its documented plan/run
contract stands in for it (bench/gpu_kernels.py runs the real one against the same reference)."""

from __future__ import annotations

import pytest
import torch

from sglang_evict.kernels.flashinfer_lists import FlashInferLists, layer_plan, query_order
from sglang_evict.kernels.ragged_attention_torch import ragged_extend_attention_torch

from backend_sim import Requests, forward, make_backend
from flashinfer_contract import PagedPrefillTorch


def _step(q_lens, cached, L, H, D, seed):
    """An all-layer step as HeadKVCache writes it: per (layer, request, KV head) some cached
    survivors (increasing positions below the request's context) then the request's new tokens,
    head-slots drawn at random; absolute offsets with garbage before layer 0's lists."""
    g = torch.Generator().manual_seed(seed)
    R = len(q_lens)
    ctx = [c + 7 for c in cached]
    lists, pos_of = [], {}
    cap = 4096
    free = torch.randperm(cap, generator=g).tolist()
    for l in range(L):
        for r in range(R):
            for h in range(H):
                keep = int(torch.randint(1, cached[r] + 1, (1,), generator=g)) if cached[r] else 0
                old = sorted(torch.randperm(ctx[r], generator=g)[:keep].tolist())
                new = list(range(ctx[r], ctx[r] + q_lens[r]))
                slots = [free.pop() for _ in old + new]
                for s, p in zip(slots, old + new):
                    pos_of[s] = p
                lists.append(slots)
    lead = 5
    indptr = torch.tensor([lead] + [lead + sum(map(len, lists[: i + 1])) for i in range(len(lists))])
    indices = torch.tensor([-1] * lead + [s for x in lists for s in x] + [-1] * 3, dtype=torch.int32)
    k = torch.randn(cap, D, generator=g)
    v = torch.randn(cap, D, generator=g)
    pos = torch.full((cap,), -1, dtype=torch.long)
    for s, p in pos_of.items():
        pos[s] = p
    q_pos = torch.cat([torch.arange(ctx[r], ctx[r] + q_lens[r]) for r in range(R)])
    q_req = torch.repeat_interleave(torch.arange(R), torch.tensor(q_lens))
    return indptr, indices, k, v, pos, q_pos, q_req


@pytest.mark.parametrize("q_lens,cached", [
    ([1, 1, 1], [9, 0, 4]),  # decode (one of them a first token)
    ([3, 1, 5], [6, 0, 11]),  # chunks after survivors, a fresh prompt, a decode row
    ([4], [0]),  # a whole prompt
])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_lists_through_paged_prefill_equal_ragged_reference(q_lens, cached, group):
    L, H, D = 2, 2, 16
    indptr, indices, k, v, pos, q_pos, q_req = _step(q_lens, cached, L, H, D, seed=len(q_lens) + group)
    T = sum(q_lens)
    q = torch.randn(T, H * group, D, generator=torch.Generator().manual_seed(1))
    fi = FlashInferLists(L, H * group, H, "cpu", wrapper_cls=PagedPrefillTorch)
    fi.begin_step(indptr, indices, torch.tensor(q_lens))
    seqs = len(q_lens) * H
    for layer in range(L):
        got = fi.run(layer, q, k, v, 0.25)
        ip = indptr[layer * seqs : (layer + 1) * seqs + 1]
        want = ragged_extend_attention_torch(q, q_pos, q_req, k, v, pos, ip, indices, 0.25,
                                             num_kv_heads=H, positions_sorted=True)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        fi.run(layer, q, k, v, 0.25)  # a second call of the layer in one step plans nothing
        assert fi._wrappers[layer].plans == 1


def test_query_order_is_a_permutation_into_sequence_order():
    q_lens = torch.tensor([2, 0, 3])
    H = 2
    qo, perm = query_order(q_lens, H)
    assert qo.tolist() == [0, 2, 4, 4, 4, 7, 10]
    # row t*H + h of q: token t (request 0: t 0-1, request 2: t 2-4), head h
    assert perm.tolist() == [0, 2, 1, 3, 4, 6, 8, 5, 7, 9]
    assert query_order(torch.tensor([1, 1]), 3)[1] is None


def test_layer_plan_rebases_absolute_offsets():
    indptr = torch.tensor([4, 6, 6, 9, 10])  # 2 layers x 2 sequences
    kv, start, end = layer_plan(indptr, 1, 2)
    assert kv.tolist() == [0, 3, 4] and (start, end) == (6, 10) and kv.dtype == torch.int32


def test_backend_with_flashinfer_lists_equals_torch_backend():
    """The whole eager path with `--evict-kernel flashinfer` (host indptr from the lists' host
    mirror, per-layer plans, query order): chunked prefill after survivors, decode with streaming
    eviction between steps, a request leaving; outputs equal the torch kernels' step by step."""
    reqs = Requests()
    ref, fi = make_backend("torch", reqs.req_to_token), make_backend("flashinfer", reqs.req_to_token)
    fi._flashinfer._wrapper_cls = PagedPrefillTorch
    assert fi.cache.host_metadata and not ref.cache.host_metadata
    steps = [({0: 9, 1: 5}, False), ({0: 4, 2: 7}, False)] + [({0: 1, 1: 1, 2: 1}, True)] * 8
    steps += [({2: 6}, False)] + [({0: 1, 2: 1}, True)] * 4
    for i, (chunks, decode) in enumerate(steps):
        if i == 10:
            reqs.finish(1, (ref, fi))
        batch = reqs.batch(chunks)
        outs = []
        for b in (ref, fi):
            b.init_forward_metadata(batch)
            outs.append(forward(b, batch, torch.Generator().manual_seed(i), decode=decode))
            b.cache.after_forward(batch, reqs.req_to_token)
        for want, got in zip(*outs):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert int(ref.cache.stats.evicted.sum()) > 0  # eviction ran between the steps
    assert torch.equal(ref.cache.lists.lens, fi.cache.lists.lens)
