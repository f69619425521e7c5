"""The step-metadata kernel: live lists -> FlashInfer indptr/indices, Triton vs torch reference vs
the lists read back one by one."""

from __future__ import annotations

import pytest
import torch

from sglang_evict.kernels.live_indices import live_indices, live_indices_reference
from sglang_evict.cache.live_lists import LiveLists


def _lists(L, H, rows, P, steps, seed):
    g = torch.Generator().manual_seed(seed)
    ll = LiveLists(num_rows=rows, max_row_len=256, heads_per_token=L * H, capacity=1 << 16,
                   num_pages=LiveLists.pages_for(1024, rows, P), page_size=P)
    nxt = 0
    for _ in range(steps):
        rs = torch.randperm(rows, generator=g)[: int(torch.randint(1, rows + 1, (1,), generator=g))]
        counts = torch.randint(1, 9, (rs.numel(),), generator=g)
        T = int(counts.sum())
        ll.append(rs, counts, torch.arange(nxt, nxt + T * L * H).view(T, L * H))
        nxt += T * L * H
        # evict a random part of some rows (lists then differ in length per head)
        e, v = ll.gather(rs)
        keep = v & (torch.rand(v.shape, generator=g) < 0.7)
        ll.compact(rs, keep, e)
    return ll


def _expected(ll, rows, L):
    e, v = ll.gather(rows)
    R, LH, W = e.shape
    H = LH // L
    lists = [e[r, l * H + h][v[r, l * H + h]] for l in range(L) for r in range(R) for h in range(H)]
    lens = torch.tensor([x.numel() for x in lists])
    indptr = torch.zeros(len(lists) + 1, dtype=torch.long)
    indptr[1:] = lens.cumsum(0)
    return indptr, torch.cat(lists).int()


@pytest.mark.parametrize("L,H,P,rows,seed", [(2, 3, 4, 5, 0), (3, 1, 16, 3, 1), (1, 8, 2, 4, 2)])
def test_kernel_and_reference_equal_the_lists(L, H, P, rows, seed):
    ll = _lists(L, H, rows, P, steps=6, seed=seed)
    batch = torch.tensor([rows - 1, 0] + list(range(1, rows - 1)))
    want_ptr, want_idx = _expected(ll, batch, L)
    for fn in (live_indices_reference, live_indices):
        indptr, indices = fn(ll.arena, ll.row_pages, ll.lens, batch, L)
        assert torch.equal(indptr, want_ptr)
        assert torch.equal(indices, want_idx)
        # a capacity bound instead of the exact size: no host read, -1 past the end
        indptr, padded = fn(ll.arena, ll.row_pages, ll.lens, batch, L, max_entries=want_idx.numel() + 7)
        assert torch.equal(padded[: want_idx.numel()], want_idx)
        assert bool((padded[want_idx.numel():] == -1).all())


def test_long_list_spread_over_programs_and_empty_batch():
    ll = LiveLists(num_rows=1, max_row_len=2048, heads_per_token=1, capacity=4096,
                   num_pages=LiveLists.pages_for(2048, 1, 16), page_size=16)
    ll.append(torch.tensor([0]), torch.tensor([1500]), torch.arange(1500).view(1500, 1))
    indptr, indices = live_indices(ll.arena, ll.row_pages, ll.lens, torch.tensor([0]), 1)
    assert indptr.tolist() == [0, 1500] and torch.equal(indices, torch.arange(1500, dtype=torch.int32))
    for fn in (live_indices_reference, live_indices):
        indptr, indices = fn(ll.arena, ll.row_pages, ll.lens, torch.zeros(0, dtype=torch.long), 1)
        assert indptr.tolist() == [0] and indices.numel() == 0


def test_validation_names_the_argument():
    ll = LiveLists(num_rows=1, max_row_len=16, heads_per_token=4, capacity=16, num_pages=4)
    with pytest.raises(ValueError, match="num_layers"):
        live_indices(ll.arena, ll.row_pages, ll.lens, torch.tensor([0]), 3)
    with pytest.raises(ValueError, match="lens"):
        live_indices_reference(ll.arena, ll.row_pages, ll.lens[:, :2], torch.tensor([0]), 2)


def test_padding_rows_and_static_buffers():
    """A CUDA graph's batch: rows < 0 are padding with empty lists; `out` buffers (larger than
    needed) are written in place and the results are views of them."""
    L = 2
    ll = _lists(L, 3, 4, 4, steps=5, seed=3)
    real = torch.tensor([2, 0, 3])
    want_ptr, want_idx = _expected(ll, real, L)
    padded = torch.tensor([2, 0, 3, -1, -1])
    H = 3
    for fn in (live_indices_reference, live_indices):
        ptr_buf = torch.full((L * 8 * H + 1,), 99, dtype=torch.long)
        idx_buf = torch.full((want_idx.numel() + 50,), 7, dtype=torch.int32)
        indptr, indices = fn(ll.arena, ll.row_pages, ll.lens, padded, L,
                             max_entries=idx_buf.numel(), out=(ptr_buf, idx_buf))
        assert indptr.data_ptr() == ptr_buf.data_ptr() and indices.data_ptr() == idx_buf.data_ptr()
        R = padded.numel()
        lens = (indptr[1:] - indptr[:-1]).view(L, R, H)
        assert bool((lens[:, 3:] == 0).all())  # padding lists nothing
        # the real sequences, in order, equal the plain batch's
        real_lens = lens[:, :3].reshape(-1)
        assert torch.equal(real_lens, want_ptr[1:] - want_ptr[:-1])
        assert torch.equal(indices[: want_idx.numel()], want_idx)
        assert bool((idx_buf[want_idx.numel():] == -1).all())
        with pytest.raises(ValueError, match="out"):
            fn(ll.arena, ll.row_pages, ll.lens, padded, L, max_entries=idx_buf.numel(),
               out=(ptr_buf[:5], idx_buf))
