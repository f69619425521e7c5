"""A step's attention metadata written from the persistent live lists (FlashInfer ragged layout).

Inputs (sglang_evict.cache.live_lists.LiveLists):
    arena      int32 [num_pages, L*H, P]  head-slot ids; entry j of a holder's list lh sits at
                                          arena[row_pages[row, j // P], lh, j % P]
    row_pages  int32 [rows, pages_per_row]
    lens       int32 [rows, L*H]          entries per list
    rows       int64 [R]                  the batch's holders, in batch order; a row < 0 is
                                          padding (a CUDA graph's batch): its lists are empty
Output, all layers at once, sequence s = l*R*H + r*H + h (layer, then request, then KV head):
    indptr     int64 [L*R*H + 1]          from 0, cumulative list lengths
    indices    int32 [max_entries]        indices[indptr[s]:indptr[s+1]] = list (rows[r], l*H+h)
                                          in list order; -1 past indptr[-1]
`max_entries` None means exactly indptr[-1] (one host read); a bound (for example the pool's
capacity) keeps the call free of host reads, as CUDA graphs need. `out=(indptr, indices)` writes
into preallocated buffers (at least L*R*H + 1 and max_entries long; a CUDA graph's static
metadata) and returns views of them.

`live_indices` is one Triton kernel (a program per (sequence, block of entries)) after a device
cumsum; `live_indices_reference` is the torch twin with the same signature and result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["live_indices", "live_indices_reference", "step_indptr"]

_BLOCK = 128
# programs per list (each strides over it), so one long list does not serialise the step
_NUM_BLOCKS = 4


def _validate(arena, row_pages, lens, rows, num_layers):
    for name, t, nd in (("arena", arena, 3), ("row_pages", row_pages, 2), ("lens", lens, 2),
                        ("rows", rows, 1)):
        if not isinstance(t, torch.Tensor) or t.dim() != nd or t.is_floating_point():
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a {nd}-D integer tensor, found {got}")
        if t.device != arena.device:
            raise ValueError(f"{name}: expected device {arena.device} (as arena), found {t.device}")
    LH = arena.shape[1]
    if lens.shape[1] != LH:
        raise ValueError(f"lens: expected [rows, {LH}] (arena's L*H), found {tuple(lens.shape)}")
    if lens.shape[0] != row_pages.shape[0]:
        raise ValueError(f"lens and row_pages disagree on rows: {lens.shape[0]} vs {row_pages.shape[0]}")
    if not isinstance(num_layers, int) or num_layers < 1 or LH % num_layers:
        raise ValueError(f"num_layers: expected a positive divisor of L*H={LH}, found {num_layers!r}")


def step_indptr(lens, rows, num_layers, out=None):
    """The step's indptr (see the module docstring) from list lengths `lens` [rows, L*H] on
    any device: on the host from LiveLists.lens_host, it costs no device read."""
    R = rows.numel()
    L = num_layers
    H = lens.shape[1] // L
    r = rows.long()
    counts = lens[r.clamp(min=0)] * (r >= 0)[:, None]  # padding rows list nothing
    counts = counts.view(R, L, H).transpose(0, 1).reshape(-1).long()
    if out is None:
        indptr = torch.zeros(L * R * H + 1, dtype=torch.long, device=lens.device)
    else:
        indptr = out[: L * R * H + 1]
        indptr[:1] = 0
    torch.cumsum(counts, 0, out=indptr[1:])
    return indptr


def _indices(indptr, max_entries, out, device):
    n = int(indptr[-1]) if max_entries is None else max_entries
    if out is None:
        return torch.full((n,), -1, dtype=torch.int32, device=device)
    indices = out[:n]
    indices.fill_(-1)
    return indices


def _check_out(out, rows, arena, num_layers, max_entries):
    if out is None:
        return None, None
    indptr, indices = out
    need = num_layers * rows.numel() * (arena.shape[1] // num_layers) + 1
    if not isinstance(indptr, torch.Tensor) or indptr.dtype != torch.int64 or indptr.numel() < need:
        raise ValueError(f"out[0] (indptr): expected int64 with at least {need} entries")
    if (not isinstance(indices, torch.Tensor) or indices.dtype != torch.int32 or max_entries is None
            or indices.numel() < max_entries):
        raise ValueError("out[1] (indices): expected int32 with at least max_entries entries "
                         "(and max_entries given)")
    return indptr, indices


def live_indices_reference(arena, row_pages, lens, rows, num_layers, max_entries=None, out=None):
    """Torch twin of `live_indices` (same signature and result)."""
    _validate(arena, row_pages, lens, rows, num_layers)
    out_ptr, out_idx = _check_out(out, rows, arena, num_layers, max_entries)
    indptr = step_indptr(lens, rows, num_layers, out_ptr)
    R, LH, P = rows.numel(), arena.shape[1], arena.shape[2]
    L, H = num_layers, LH // num_layers
    indices = _indices(indptr, max_entries, out_idx, arena.device)
    n = indices.numel()
    if R == 0:
        return indptr, indices
    r = rows.long()
    row_lens = lens[r.clamp(min=0)].long() * (r >= 0)[:, None]  # [R, LH]
    width = int(row_lens.max()) if row_lens.numel() else 0
    if width == 0:
        return indptr, indices
    j = torch.arange(width, device=arena.device)
    pages = row_pages[r.clamp(min=0)][:, j // P].long()  # [R, W]
    lh = torch.arange(LH, device=arena.device)
    ent = arena[pages.clamp(min=0)[:, None, :], lh[None, :, None], (j % P)[None, None, :]]
    valid = j[None, None, :] < row_lens[:, :, None]  # [R, LH, W]
    by_layer = ent.view(R, L, H, width).transpose(0, 1)
    ok = valid.view(R, L, H, width).transpose(0, 1)
    listed = by_layer[ok]
    indices[: listed.numel()] = listed[: n]
    return indptr, indices


@triton.jit
def _live_indices_kernel(
    arena, row_pages, lens, rows, indptr, indices,
    num_req, pages_per_row, max_entries,
    LH: tl.constexpr, H: tl.constexpr, P: tl.constexpr, BLOCK: tl.constexpr,
    NUM_BLOCKS: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1).to(tl.int64)
    layer = s // (num_req * H)
    r = (s // H) % num_req
    h = s % H
    lh = layer * H + h
    row = tl.load(rows + r).to(tl.int64)
    n = tl.load(lens + tl.maximum(row, 0) * LH + lh).to(tl.int64)
    n = tl.where(row >= 0, n, 0)  # a padding row lists nothing
    out0 = tl.load(indptr + s)
    j0 = blk * BLOCK
    # Blocks stride over the list, so a long list is spread over programs.
    for j_start in range(j0, n, BLOCK * NUM_BLOCKS):
        j = j_start + tl.arange(0, BLOCK).to(tl.int64)
        ok = (j < n) & (out0 + j < max_entries)
        page = tl.load(row_pages + row * pages_per_row + j // P, mask=ok, other=0).to(tl.int64)
        slot = tl.load(arena + (page * LH + lh) * P + j % P, mask=ok, other=-1)
        tl.store(indices + out0 + j, slot, mask=ok)


def live_indices(arena, row_pages, lens, rows, num_layers, max_entries=None, out=None):
    """The step's indptr / indices from the live lists (Triton). See the module docstring."""
    _validate(arena, row_pages, lens, rows, num_layers)
    out_ptr, out_idx = _check_out(out, rows, arena, num_layers, max_entries)
    indptr = step_indptr(lens, rows, num_layers, out_ptr)
    R, LH, P = rows.numel(), arena.shape[1], arena.shape[2]
    indices = _indices(indptr, max_entries, out_idx, arena.device)
    n = indices.numel()
    if R == 0 or n == 0:
        return indptr, indices
    _live_indices_kernel[(num_layers * R * (LH // num_layers), _NUM_BLOCKS)](
        arena.contiguous(), row_pages.contiguous(), lens.contiguous(), rows.contiguous(),
        indptr, indices, R, row_pages.shape[1], n,
        LH=LH, H=LH // num_layers, P=P, BLOCK=_BLOCK, NUM_BLOCKS=_NUM_BLOCKS,
    )
    return indptr, indices
