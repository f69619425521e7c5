"""The pure-torch twins of the ragged attention kernels (ragged_attention.py), same signatures
and contract:
    *_reference  ground truth; loops in Python over sequences (and query tokens). Tests only.
    *_torch      vectorised, for serving on CPU (the layout and its costs: ragged_attention.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sglang_evict.kernels.ragged_checks import (
    _check_q_req,
    _check_ranges,
    _validate_decode,
    _validate_extend,
)

__all__ = [
    "ragged_decode_attention_reference",
    "ragged_decode_attention_torch",
    "ragged_extend_attention_reference",
    "ragged_extend_attention_torch",
]

def _attend(qs: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, sm_scale) -> torch.Tensor:
    """qs [G, D] f32, k/v [N, D] f32, visible [G, N] bool -> [G, D] f32; all-masked rows -> 0."""
    if k.shape[0] == 0:
        return torch.zeros_like(qs)
    s = (qs @ k.T) * sm_scale
    s = s.masked_fill(~visible, -math.inf)
    m = s.max(dim=1, keepdim=True).values
    m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    l = p.sum(dim=1, keepdim=True)
    out = (p @ v) / torch.where(l > 0, l, torch.ones_like(l))
    return torch.where(l > 0, out, torch.zeros_like(out))


def ragged_decode_attention_reference(q, k_slots, v_slots, indptr, indices, sm_scale: float) -> torch.Tensor:
    """Pure-torch ground truth of `ragged_decode_attention` (same signature and contract)."""
    H_kv = _validate_decode(q, k_slots, v_slots, indptr, indices, sm_scale)
    _check_ranges(indptr, indices, k_slots.shape[0])
    R, H_q, D = q.shape
    o = torch.zeros(R, H_q, D, dtype=torch.float32, device=q.device)
    if R == 0 or H_q == 0:
        return o.to(q.dtype)
    G = H_q // H_kv
    ptr = indptr.tolist()
    for r in range(R):
        for h in range(H_kv):
            s = r * H_kv + h
            sl = indices[ptr[s]:ptr[s + 1]].long()
            k = k_slots[sl].float()
            v = v_slots[sl].float()
            qs = q[r, h * G:(h + 1) * G].float()
            vis = torch.ones(G, sl.numel(), dtype=torch.bool, device=q.device)
            o[r, h * G:(h + 1) * G] = _attend(qs, k, v, vis, sm_scale)
    return o.to(q.dtype)


def ragged_extend_attention_reference(
    q, q_pos, q_req, k_slots, v_slots, slot_pos, indptr, indices, sm_scale: float,
    *, num_kv_heads: int | None = None, positions_sorted: bool = False,
) -> torch.Tensor:
    """Pure-torch ground truth of `ragged_extend_attention` (same signature and contract; it
    reads every key whatever `positions_sorted` promises)."""
    H_kv, num_req = _validate_extend(
        q, q_pos, q_req, k_slots, v_slots, slot_pos, indptr, indices, sm_scale, num_kv_heads
    )
    _check_ranges(indptr, indices, k_slots.shape[0])
    _check_q_req(q_req, num_req)
    T, H_q, D = q.shape
    o = torch.zeros(T, H_q, D, dtype=torch.float32, device=q.device)
    if T == 0 or H_q == 0:
        return o.to(q.dtype)
    G = H_q // H_kv
    ptr = indptr.tolist()
    reqs = q_req.tolist()
    for t in range(T):
        r = reqs[t]
        for h in range(H_kv):
            s = r * H_kv + h
            sl = indices[ptr[s]:ptr[s + 1]].long()
            k = k_slots[sl].float()
            v = v_slots[sl].float()
            vis = (slot_pos[sl].long() <= q_pos[t].long()).unsqueeze(0).expand(G, -1)
            qs = q[t, h * G:(h + 1) * G].float()
            o[t, h * G:(h + 1) * G] = _attend(qs, k, v, vis, sm_scale)
    return o.to(q.dtype)


# ----------------------------------------------------------------------------- vectorised torch (CPU serving)
# Element budget per chunk, for the score block and for each gathered K/V block (float32: 32 MiB).
_CHUNK_ELEMS = 1 << 23
# Extend: at most this many query tokens of one request share a block (one K/V gather per block),
# and at most _CHUNK_Q query tokens share a chunk (keys trimmed to what the chunk can see).
_BLOCK_Q = 64
_CHUNK_Q = 128
_I64_MIN = torch.iinfo(torch.int64).min
_I64_MAX = torch.iinfo(torch.int64).max
# Up to this many query rows per list, P @ V runs as embedding_bag (gather fused into the weighted
# sum, V never copied out: ~2.5x faster for decode); above it a batched GEMM on gathered V wins.
_EBAG_MAX_ROWS = 8
# Up to this many multiply-adds per product, a chunk's scores and P @ V run as broadcast products
# and sums, which stay on the calling thread below torch's grain size; bmm and embedding_bag open
# an OpenMP region on every call, and for a decode step's short lists on two busy cores its fork
# and join cost more than the arithmetic (py-spy of a served decode step: 11% of the scheduler in
# libgomp under these two calls).
_INLINE_MACS = 1 << 15


def _list_stats(indptr, indices, capacity, q_req=None, num_req=0):
    """Everything `_check_ranges` (and `_check_q_req` when q_req is given) tests, plus the padding
    sizes, in one host read. On bad input the original helpers run, so the errors are identical.

    Returns (max list length, per-request query counts or None, max query count)."""
    z = torch.zeros((), dtype=torch.int64, device=indptr.device)
    lens = indptr[1:].long() - indptr[:-1].long()
    first, last = indptr[0].long(), indptr[-1].long()
    vals = [first, last]
    vals += list(torch.aminmax(lens)) if lens.numel() else [z, z]
    # Only the listed range indices[indptr[0]:indptr[-1]] is checked. One layer's lists are a
    # slice of a buffer of all layers: on CPU, slice it (its bounds are host values already)
    # rather than scan the whole buffer per layer; elsewhere mask, with no host read.
    if indices.device.type == "cpu":
        listed = indices[max(int(first), 0):int(last)]
        vals += [t.long() for t in torch.aminmax(listed)] if listed.numel() else [z, z]
    elif indices.numel():
        at = torch.arange(indices.numel(), device=indices.device)
        listed = (at >= first) & (at < last)
        idx = indices.long()
        vals += [torch.where(listed, idx, capacity).min(), torch.where(listed, idx, 0).max()]
    else:
        vals += [z, z]
    counts = None
    if q_req is not None:
        T = q_req.numel()
        vals += [t.long() for t in torch.aminmax(q_req)] if T else [z, z]
        if T and num_req > 0:
            # Clamped so a bad id cannot make bincount fail or allocate; it is rejected below.
            counts = torch.bincount(q_req.long().clamp(0, num_req), minlength=num_req + 1)[:num_req]
            vals.append(counts.max())
        else:
            vals.append(z)
    got = torch.stack(vals).tolist()
    first, last, lmin, lmax, imin, imax = got[:6]
    bad = first < 0 or last > indices.numel() or lmin < 0
    bad = bad or (last > first and (imin < 0 or imax >= capacity))
    max_count = 0
    if q_req is not None:
        qmin, qmax, max_count = got[6:]
        bad = bad or (q_req.numel() > 0 and (qmin < 0 or qmax >= num_req))
    if bad:
        _check_ranges(indptr, indices, capacity)
        if q_req is not None:
            _check_q_req(q_req, num_req)
    return lmax, counts, max_count


def _padded_lists(indptr, indices, maxlen):
    """Head-slot lists as a [S, maxlen] matrix plus a validity mask, without a loop.

    A padding entry runs on into the next lists (clamped to the last entry), so gathers only read
    head-slots that `indices` names, i.e. rows that were written, never free (maybe NaN) ones."""
    start = indptr[:-1].long()
    lens = indptr[1:].long() - start
    pos = torch.arange(maxlen, device=indptr.device)
    valid = pos < lens[:, None]
    flat = torch.minimum(start[:, None] + pos, indptr[-1].long() - 1)
    return indices[flat].long(), valid


def _blocked_attention(qb, blk_req, slots, valid, k_slots, v_slots, sm_scale, key_pos=None, q_pos=None):
    """qb [NB, H_kv, B, G, D] float32: block i holds B query rows of request blk_req[i] (None:
    request i); head h*G+g of a row reads list req*H_kv + h. slots/valid (and key_pos) are [S, L]
    from `_padded_lists`; with key_pos (each list sorted by it), row b of block i sees only keys
    with key_pos <= q_pos[i, b]. Returns [NB, H_kv, B, G, D] float32, all-hidden rows 0, the
    reference's softmax order."""
    NB, H_kv, B, G, D = qb.shape
    L = slots.shape[1]
    M = B * G  # query rows per list
    # Blocks per chunk: bound both the scores (rows x L) and the K and V gathers (L x D).
    step = max(1, _CHUNK_ELEMS // (H_kv * L * max(M, D)))
    if key_pos is not None:
        step = min(step, max(1, _CHUNK_Q // B))
    use_ebag = M <= _EBAG_MAX_ROWS and v_slots.dtype == torch.float32 and v_slots.is_contiguous()
    heads = torch.arange(H_kv, device=qb.device)
    out = torch.empty_like(qb)
    for b0 in range(0, NB, step):
        b1 = min(NB, b0 + step)
        n, Lc = b1 - b0, L
        if blk_req is None:  # consecutive requests own consecutive lists: slice, no gather
            sl, ok_key = slots[b0 * H_kv:b1 * H_kv], valid[b0 * H_kv:b1 * H_kv]
            kp = None if key_pos is None else key_pos[b0 * H_kv:b1 * H_kv]
        else:
            seq = (blk_req[b0:b1, None] * H_kv + heads).reshape(-1)  # [n*H_kv] lists of this chunk
            sl, ok_key = slots.index_select(0, seq), valid.index_select(0, seq)
            kp = None if key_pos is None else key_pos.index_select(0, seq)
        if kp is not None:
            # Sorted lists: keys past the chunk's largest visible count are hidden from every row
            # (padded rows have q_pos = int64 min), so drop them before any arithmetic.
            top = q_pos[b0:b1].max().repeat(kp.shape[0], 1)
            Lc = int(torch.searchsorted(kp, top, right=True).max())
            if Lc == 0:
                out[b0:b1] = 0.0
                continue
            sl, ok_key, kp = sl[:, :Lc], ok_key[:, :Lc], kp[:, :Lc]
        hidden = ~ok_key.reshape(n, H_kv, 1, 1, Lc)
        if kp is not None:
            hidden = hidden | (kp.reshape(n, H_kv, 1, 1, Lc) > q_pos[b0:b1].view(n, 1, B, 1, 1))
        inline = n * H_kv * M * Lc * D <= _INLINE_MACS
        k = k_slots.index_select(0, sl.reshape(-1)).view(n * H_kv, Lc, D).float()
        if inline:
            s = (qb[b0:b1].reshape(n * H_kv, M, 1, D) * k.view(n * H_kv, 1, Lc, D)).sum(-1)
        else:
            s = torch.bmm(qb[b0:b1].view(n * H_kv, M, D), k.transpose(1, 2))
        del k
        s.mul_(sm_scale)
        s.view(n, H_kv, B, G, Lc).masked_fill_(hidden, -math.inf)
        m = s.amax(dim=2, keepdim=True)
        # A row with no visible key has max -inf; subtract 0 instead so exp gives 0, not NaN.
        m.masked_fill_(m == -math.inf, 0.0)
        p = s.sub_(m).exp_()
        l = p.sum(dim=2, keepdim=True)
        if inline:
            v = v_slots.index_select(0, sl.reshape(-1)).view(n * H_kv, 1, Lc, D).float()
            o = (p.view(n * H_kv, M, Lc, 1) * v).sum(2)
        elif use_ebag:
            # Row (list, r) is the bag of its list's head-slots weighted by p: sum_j p_j V[slot_j].
            bags = sl.reshape(n * H_kv, 1, Lc).expand(-1, M, -1).reshape(-1, Lc)
            o = F.embedding_bag(bags, v_slots, per_sample_weights=p.view(-1, Lc), mode="sum")
            o = o.view(n * H_kv, M, D)
        else:
            v = v_slots.index_select(0, sl.reshape(-1)).view(n * H_kv, Lc, D).float()
            o = torch.bmm(p, v)
        ok = l > 0
        o = torch.where(ok, o / torch.where(ok, l, torch.ones_like(l)), torch.zeros_like(o))
        out[b0:b1] = o.view(n, H_kv, B, G, D)
    return out


def ragged_decode_attention_torch(q, k_slots, v_slots, indptr, indices, sm_scale: float) -> torch.Tensor:
    """Vectorised pure-torch `ragged_decode_attention` (same signature and contract), for CPU."""
    H_kv = _validate_decode(q, k_slots, v_slots, indptr, indices, sm_scale)
    maxlen, _, _ = _list_stats(indptr, indices, k_slots.shape[0])
    R, H_q, D = q.shape
    if R == 0 or H_q == 0 or D == 0 or maxlen == 0:
        return torch.zeros(R, H_q, D, dtype=q.dtype, device=q.device)
    G = H_q // H_kv
    slots, valid = _padded_lists(indptr, indices, maxlen)
    # Request r is one block of one row: its list for kv head h is r*H_kv + h.
    qb = q.reshape(R, H_kv, 1, G, D).float().contiguous()  # chunks are viewed as [lists, G, D]
    o = _blocked_attention(qb, None, slots, valid, k_slots, v_slots, sm_scale)
    return o.view(R, H_q, D).to(q.dtype)


def ragged_extend_attention_torch(
    q, q_pos, q_req, k_slots, v_slots, slot_pos, indptr, indices, sm_scale: float,
    *, num_kv_heads: int | None = None, positions_sorted: bool = False,
) -> torch.Tensor:
    """Vectorised pure-torch `ragged_extend_attention` (same signature and contract), for CPU.
    It sorts each list by position itself, so `positions_sorted` changes nothing here."""
    H_kv, num_req = _validate_extend(
        q, q_pos, q_req, k_slots, v_slots, slot_pos, indptr, indices, sm_scale, num_kv_heads
    )
    maxlen, counts, max_count = _list_stats(indptr, indices, k_slots.shape[0], q_req, num_req)
    T, H_q, D = q.shape
    if T == 0 or H_q == 0 or D == 0 or maxlen == 0:
        return torch.zeros(T, H_q, D, dtype=q.dtype, device=q.device)
    G = H_q // H_kv
    dev = q.device
    slots, valid = _padded_lists(indptr, indices, maxlen)
    key_pos = slot_pos[slots].long()  # gather first: never convert the whole pool
    # Sort each list by position (padding last) so a query's visible keys are a prefix of it.
    key_pos, by_pos = key_pos.masked_fill_(~valid, _I64_MAX).sort(dim=1)
    slots, valid = slots.gather(1, by_pos), valid.gather(1, by_pos)

    # Tokens of one request are packed into blocks of B rows (a request's last block is padded), so
    # a block shares one K/V gather per kv head; padding costs at most B - 1 rows per request.
    B = min(_BLOCK_Q, max_count)
    nblk = (counts + B - 1) // B
    blk_end = nblk.cumsum(0)
    NB = int(blk_end[-1])
    blk_req = torch.repeat_interleave(torch.arange(num_req, device=dev), nblk, output_size=NB)
    # Tokens by (request, position): a block then spans few positions, so trimming drops more.
    order = torch.argsort(q_pos, stable=True)
    order = order[torch.argsort(q_req[order], stable=True)]
    req_sorted = q_req[order].long()
    rank = torch.arange(T, device=dev) - (counts.cumsum(0) - counts)[req_sorted]  # within request
    blk_sorted = (blk_end - nblk)[req_sorted] + rank // B
    blk = torch.empty_like(blk_sorted).scatter_(0, order, blk_sorted)  # back to token order
    row = torch.empty_like(rank).scatter_(0, order, rank % B)

    qb = torch.zeros(NB, H_kv, B, G, D, dtype=torch.float32, device=dev)
    qb[blk, :, row] = q.reshape(T, H_kv, G, D).float()
    qp = torch.full((NB, B), _I64_MIN, dtype=torch.int64, device=dev)  # padded rows see nothing
    qp[blk, row] = q_pos.long()
    o = _blocked_attention(qb, blk_req, slots, valid, k_slots, v_slots, sm_scale, key_pos, qp)
    return o[blk, :, row].reshape(T, H_q, D).to(q.dtype)
