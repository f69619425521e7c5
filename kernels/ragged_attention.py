"""Attention over live head-slot lists (FlashInfer-compatible ragged layout), decode and extend.

Layout (one layer):
    k_slots, v_slots  [capacity, head_dim]   float32 / float16 / bfloat16 (same dtype); one row is
                                            one token's K (or V) for one KV head
    slot_pos          int64 [capacity]       the token position stored in each head-slot
    indptr            int32/int64 [R*H_kv+1] sequence s = r*H_kv + h is (request r, kv head h)
    indices           int32/int64 [n]        its live head-slots are indices[indptr[s]:indptr[s+1]],
                                            in any order (positions decide causality, never order);
                                            0 <= indptr[0] and indptr[-1] <= n: offsets are absolute,
                                            so every layer's indptr can point into one buffer of
                                            all layers (a CUDA graph's static metadata); entries
                                            outside [indptr[0], indptr[-1]) are never read
Query heads: H_q = H_kv * group; query head j reads kv head j // group (GQA).

    ragged_decode_attention(q [R, H_q, D], k_slots, v_slots, indptr, indices, sm_scale)
        -> o [R, H_q, D]: each request's single query attends to every live slot of its
           (request, kv head). H_kv = (len(indptr) - 1) / R.
    ragged_extend_attention(q [T, H_q, D], q_pos [T], q_req [T], k_slots, v_slots, slot_pos,
                            indptr, indices, sm_scale, *, num_kv_heads=None)
        -> o [T, H_q, D]: query token t attends to the live slots of (q_req[t], kv head) whose
           slot_pos <= q_pos[t]. num_kv_heads=None infers R = max(q_req) + 1 (a host sync; the
           last request must own a query token) and H_kv = (len(indptr) - 1) / R; pass it to avoid
           both.
A query with no live (visible) key gets o = 0. o has q's dtype; accumulation is float32 and the
softmax subtracts the running max. Wrappers raise ValueError naming the bad argument. On CPU
tensors out-of-range indices / q_req are rejected; on a GPU the kernel masks them (they contribute
nothing) instead of syncing.

Triton kernels (GPU-grade shapes; on CPU they run under TRITON_INTERPRET=1 in tests):
    decode  a program per (request, KV head, KV split) computes the whole query group with tl.dot
            over its split of the list (split bounds from indptr in device memory), then a merge
            kernel combines the splits by log-sum-exp. `num_splits` only changes the work split.
    extend  a program per (request, KV head, block of the request's query tokens) holds
            tokens x group query rows as one tile; the list is read once per tile, scores and
            P @ V are tl.dot; causality by stored position. Tokens are grouped by request on the
            device, and the grid is sized from shapes only (no host read).

Each Triton function has two pure-torch twins with the same signature and contract:
    *_reference  ground truth; loops in Python over sequences (and query tokens). Tests only.
    *_torch      vectorised, for serving on CPU: the lists become a padded [R*H_kv, max_len]
                 head-slot matrix (padding reads only listed head-slots), K/V are gathered per
                 chunk and attended with batched GEMMs; float32 P @ V with few query rows per list
                 (decode) runs as embedding_bag, which never copies V out. Extend packs each
                 request's tokens into blocks and sorts every list by position, so a chunk of
                 tokens only touches the keys it can see. Memory is bounded by _CHUNK_ELEMS. One
                 host read covers the range checks and padding sizes; extend adds one for its
                 block count and one per chunk for the visible key count.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

__all__ = [
    "ragged_decode_attention",
    "ragged_decode_attention_reference",
    "ragged_decode_attention_torch",
    "ragged_extend_attention",
    "ragged_extend_attention_reference",
    "ragged_extend_attention_torch",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)
_BLOCK_N = 32
# Triton's interpreter runs tl.dot in numpy, which has no bfloat16: there the decode kernel's dots
# take float32 inputs (on a GPU they stay in the storage dtype, on tensor cores).
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------- validation
def _tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, found {type(t).__name__}")


def _validate_common(q, k_slots, v_slots, indptr, indices, sm_scale, num_rows_name):
    for name, t in dict(q=q, k_slots=k_slots, v_slots=v_slots, indptr=indptr, indices=indices).items():
        _tensor(name, t)
    if q.dim() != 3:
        raise ValueError(f"q: expected shape [{num_rows_name}, H_q, D], found {tuple(q.shape)}")
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"q: expected dtype in {_FLOAT_DTYPES}, found {q.dtype}")
    D = q.shape[2]
    if k_slots.dim() != 2 or k_slots.shape[1] != D:
        raise ValueError(f"k_slots: expected shape [capacity, {D}], found {tuple(k_slots.shape)}")
    if k_slots.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"k_slots: expected dtype in {_FLOAT_DTYPES}, found {k_slots.dtype}")
    if tuple(v_slots.shape) != tuple(k_slots.shape):
        raise ValueError(
            f"v_slots: expected shape {tuple(k_slots.shape)} (as k_slots), found {tuple(v_slots.shape)}"
        )
    if v_slots.dtype != k_slots.dtype:
        raise ValueError(f"v_slots: expected dtype {k_slots.dtype} (as k_slots), found {v_slots.dtype}")
    for name, t in (("indptr", indptr), ("indices", indices)):
        if t.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D tensor, found shape {tuple(t.shape)}")
        if t.dtype not in _INDEX_DTYPES:
            raise ValueError(f"{name}: expected dtype in {_INDEX_DTYPES}, found {t.dtype}")
    if indptr.numel() < 1:
        raise ValueError("indptr: expected length R*H_kv + 1 >= 1, found 0")
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float)) or not math.isfinite(sm_scale):
        raise ValueError(f"sm_scale: expected a finite float, found {sm_scale!r}")


def _check_devices(**tensors):
    device = tensors["q"].device
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"{name}: expected device {device} (as q), found {t.device}")


def _check_heads(q, indptr, num_req, num_kv_heads_name="indptr"):
    """Return H_kv from len(indptr) = num_req * H_kv + 1 and check H_q % H_kv == 0."""
    H_q = q.shape[1]
    nseq = indptr.numel() - 1
    if num_req == 0:
        if nseq != 0:
            raise ValueError(f"indptr: expected length 1 for 0 requests, found {indptr.numel()}")
        return max(H_q, 1)
    if nseq % num_req or nseq == 0:
        raise ValueError(
            f"{num_kv_heads_name}: expected len(indptr) = R*H_kv + 1 with R={num_req}, "
            f"found len(indptr)={indptr.numel()}"
        )
    H_kv = nseq // num_req
    if H_q % H_kv:
        raise ValueError(
            f"{num_kv_heads_name}: H_kv={H_kv} (from len(indptr)={indptr.numel()}, R={num_req}) "
            f"must divide H_q={H_q}"
        )
    return H_kv


def _check_ranges(indptr, indices, capacity):
    """Host-side checks (syncs): 0 <= indptr[0] <= ... <= indptr[-1] <= len(indices), and the
    listed indices (indices[indptr[0]:indptr[-1]]) in [0, capacity)."""
    first, last = int(indptr[0]), int(indptr[-1])
    if first < 0 or last > indices.numel():
        raise ValueError(
            f"indptr: expected 0 <= indptr[0] and indptr[-1] <= len(indices) = {indices.numel()}, "
            f"found {first} and {last}"
        )
    if indptr.numel() > 1 and bool((indptr[1:] < indptr[:-1]).any()):
        raise ValueError("indptr: expected a non-decreasing sequence")
    listed = indices[first:last]
    if listed.numel() and (int(listed.min()) < 0 or int(listed.max()) >= capacity):
        raise ValueError(
            f"indices: head-slots must lie in [0, capacity={capacity}), "
            f"found range [{int(listed.min())}, {int(listed.max())}]"
        )


def _validate_decode(q, k_slots, v_slots, indptr, indices, sm_scale):
    _validate_common(q, k_slots, v_slots, indptr, indices, sm_scale, "R")
    _check_devices(q=q, k_slots=k_slots, v_slots=v_slots, indptr=indptr, indices=indices)
    return _check_heads(q, indptr, q.shape[0])


def _validate_extend(q, q_pos, q_req, k_slots, v_slots, slot_pos, indptr, indices, sm_scale, num_kv_heads):
    _validate_common(q, k_slots, v_slots, indptr, indices, sm_scale, "T")
    for name, t in dict(q_pos=q_pos, q_req=q_req, slot_pos=slot_pos).items():
        _tensor(name, t)
    T = q.shape[0]
    for name, t in (("q_pos", q_pos), ("q_req", q_req)):
        if tuple(t.shape) != (T,):
            raise ValueError(f"{name}: expected shape ({T},), found {tuple(t.shape)}")
        if t.dtype not in _INDEX_DTYPES:
            raise ValueError(f"{name}: expected dtype in {_INDEX_DTYPES}, found {t.dtype}")
    if tuple(slot_pos.shape) != (k_slots.shape[0],):
        raise ValueError(f"slot_pos: expected shape ({k_slots.shape[0]},), found {tuple(slot_pos.shape)}")
    if slot_pos.dtype not in _INDEX_DTYPES:
        raise ValueError(f"slot_pos: expected dtype in {_INDEX_DTYPES}, found {slot_pos.dtype}")
    _check_devices(q=q, q_pos=q_pos, q_req=q_req, k_slots=k_slots, v_slots=v_slots,
                   slot_pos=slot_pos, indptr=indptr, indices=indices)
    nseq = indptr.numel() - 1
    H_q = q.shape[1]
    if num_kv_heads is None:
        if T == 0:
            return max(H_q, 1), (nseq // max(H_q, 1))
        num_req = int(q_req.max()) + 1
        H_kv = _check_heads(q, indptr, num_req)
    else:
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1:
            raise ValueError(f"num_kv_heads: expected a positive int, found {num_kv_heads!r}")
        H_kv = num_kv_heads
        if H_q % H_kv:
            raise ValueError(f"num_kv_heads: {H_kv} must divide H_q={H_q}")
        if nseq % H_kv:
            raise ValueError(
                f"indptr: expected length R*{H_kv} + 1, found {indptr.numel()}"
            )
        num_req = nseq // H_kv
    return H_kv, num_req


def _check_q_req(q_req, num_req):
    if q_req.numel() and (int(q_req.min()) < 0 or int(q_req.max()) >= num_req):
        raise ValueError(
            f"q_req: requests must lie in [0, R={num_req}), "
            f"found range [{int(q_req.min())}, {int(q_req.max())}]"
        )


# ----------------------------------------------------------------------------- Triton kernels
@triton.jit
def _online_softmax_block(s, vt, acc, l_i, m_i, dot_ty: tl.constexpr):
    """One block of the online softmax: scores s [rows, BLOCK_N] (masked -inf), values vt
    [BLOCK_N, D]; returns the rescaled (acc, l_i, m_i)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row whose keys so far are all masked has max -inf: subtract 0 so exp gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    acc = acc * alpha[:, None] + tl.dot(p.to(dot_ty), vt.to(dot_ty))
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return acc, l_i, m_new


@triton.jit
def _decode_split_kernel(
    q, k_slots, v_slots, indptr, indices, o_part, lse_part,
    capacity, head_dim, sm_scale,
    s_q_r, s_q_h, s_q_d,
    s_k_n, s_k_d,
    s_v_n, s_v_d,
    H_KV: tl.constexpr, GROUP: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr,
):
    # Grid: (sequences = requests x KV heads, KV splits). One program holds the whole query group
    # of its KV head, so each K/V row is read once per group, and scores are one tl.dot per block.
    seq = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    r = seq // H_KV
    kvh = seq % H_KV
    g = tl.arange(0, BLOCK_G).to(tl.int64)
    g_ok = g < GROUP
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    d_ok = d < head_dim
    qmask = g_ok[:, None] & d_ok[None, :]
    qh = kvh * GROUP + g
    qt = tl.load(q + r * s_q_r + qh[:, None] * s_q_h + d[None, :] * s_q_d, mask=qmask, other=0.0)
    dot_ty = tl.float32 if DOT_F32 else k_slots.dtype.element_ty
    qt = qt.to(dot_ty)

    # Lengths come from device memory: the split of the list is decided here, not on the host.
    start = tl.load(indptr + seq).to(tl.int64)
    end = tl.load(indptr + seq + 1).to(tl.int64)
    chunk = (end - start + NUM_SPLITS - 1) // NUM_SPLITS
    lo = start + split * chunk
    hi = tl.minimum(lo + chunk, end)

    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    n_off = tl.arange(0, BLOCK_N).to(tl.int64)
    for n0 in range(lo, hi, BLOCK_N):
        idx = n0 + n_off
        ok = idx < hi
        slot = tl.load(indices + idx, mask=ok, other=0).to(tl.int64)
        ok = ok & (slot >= 0) & (slot < capacity)  # never read outside the pool
        slot = tl.where(ok, slot, 0)
        kvmask = ok[:, None] & d_ok[None, :]
        kt = tl.load(k_slots + slot[:, None] * s_k_n + d[None, :] * s_k_d, mask=kvmask, other=0.0)
        s = tl.dot(qt, tl.trans(kt.to(dot_ty))) * sm_scale  # [BLOCK_G, BLOCK_N], float32 accumulation
        s = tl.where(ok[None, :], s, float("-inf"))
        vt = tl.load(v_slots + slot[:, None] * s_v_n + d[None, :] * s_v_d, mask=kvmask, other=0.0)
        acc, l_i, m_i = _online_softmax_block(s, vt, acc, l_i, m_i, dot_ty)

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    part = (seq * NUM_SPLITS + split) * BLOCK_G + g
    tl.store(o_part + part[:, None] * BLOCK_D + d[None, :], out, mask=qmask)
    tl.store(lse_part + part, lse, mask=g_ok)


@triton.jit
def _decode_merge_kernel(
    o_part, lse_part, o, head_dim,
    s_o_r, s_o_h, s_o_d,
    H_KV: tl.constexpr, GROUP: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Grid: (sequences, query heads of the group). Log-sum-exp merge of the splits' partials.
    seq = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    r = seq // H_KV
    kvh = seq % H_KV
    sp = tl.arange(0, BLOCK_S).to(tl.int64)
    sp_ok = sp < NUM_SPLITS
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    d_ok = d < head_dim
    part = (seq * NUM_SPLITS + sp) * BLOCK_G + g
    lse = tl.load(lse_part + part, mask=sp_ok, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.where(lse == float("-inf"), 0.0, tl.exp(lse - m_safe))
    parts = tl.load(o_part + part[:, None] * BLOCK_D + d[None, :],
                    mask=sp_ok[:, None] & d_ok[None, :], other=0.0)
    total = tl.sum(w, axis=0)
    out = tl.sum(parts * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    out = tl.where(total > 0, out, 0.0)
    qh = kvh * GROUP + g
    tl.store(o + r * s_o_r + qh * s_o_h + d * s_o_d, out.to(o.dtype.element_ty), mask=d_ok)


@triton.jit
def _extend_kernel(
    q, k_slots, v_slots, o,
    indptr, indices, q_pos, q_order, q_start, q_count, slot_pos,
    capacity, head_dim, sm_scale,
    s_q_t, s_q_h, s_q_d,
    s_k_n, s_k_d,
    s_v_n, s_v_d,
    s_o_t, s_o_h, s_o_d,
    H_KV: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr,
    POSITIONS_SORTED: tl.constexpr,
):
    # Grid: (sequences = requests x KV heads, query blocks). A program takes BLOCK_M query tokens
    # of one request with the whole query group of its KV head (BLOCK_M * BLOCK_G rows), so a
    # list is read once per block of tokens, and scores and P @ V are tl.dot tiles.
    seq = tl.program_id(0).to(tl.int64)
    mb = tl.program_id(1).to(tl.int64)
    r = seq // H_KV
    kvh = seq % H_KV
    count = tl.load(q_count + r).to(tl.int64)
    if mb * BLOCK_M >= count:
        return
    first = tl.load(q_start + r).to(tl.int64)
    m = tl.arange(0, BLOCK_M * BLOCK_G).to(tl.int64)
    i = m // BLOCK_G  # token of the block
    g = m % BLOCK_G  # query head in the group
    row_ok = (mb * BLOCK_M + i < count) & (g < GROUP)
    tok = tl.load(q_order + first + mb * BLOCK_M + i, mask=row_ok, other=0).to(tl.int64)
    qp = tl.load(q_pos + tok, mask=row_ok, other=-1).to(tl.int64)
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    d_ok = d < head_dim
    qmask = row_ok[:, None] & d_ok[None, :]
    qh = kvh * GROUP + g
    dot_ty = tl.float32 if DOT_F32 else k_slots.dtype.element_ty
    qt = tl.load(q + tok[:, None] * s_q_t + qh[:, None] * s_q_h + d[None, :] * s_q_d,
                 mask=qmask, other=0.0).to(dot_ty)

    start = tl.load(indptr + seq).to(tl.int64)
    end = tl.load(indptr + seq + 1).to(tl.int64)
    if POSITIONS_SORTED:
        # The list is in position order: the keys this tile can see are a prefix of it. Binary
        # search its end (log2 of the list's length in scalar loads) and never read past it.
        q_last = tl.max(tl.where(row_ok, qp, -1), axis=0)
        lo = start
        hi = end
        while lo < hi:
            mid = (lo + hi) // 2
            mslot = tl.load(indices + mid).to(tl.int64)
            mslot = tl.where((mslot >= 0) & (mslot < capacity), mslot, 0)
            before = tl.load(slot_pos + mslot).to(tl.int64) <= q_last
            lo = tl.where(before, mid + 1, lo)
            hi = tl.where(before, hi, mid)
        end = lo
    m_i = tl.full((BLOCK_M * BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M * BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M * BLOCK_G, BLOCK_D), dtype=tl.float32)
    n_off = tl.arange(0, BLOCK_N).to(tl.int64)
    for n0 in range(start, end, BLOCK_N):
        idx = n0 + n_off
        ok = idx < end
        slot = tl.load(indices + idx, mask=ok, other=0).to(tl.int64)
        ok = ok & (slot >= 0) & (slot < capacity)  # never read outside the pool
        slot = tl.where(ok, slot, 0)
        sp = tl.load(slot_pos + slot, mask=ok, other=0).to(tl.int64)
        kvmask = ok[:, None] & d_ok[None, :]
        kt = tl.load(k_slots + slot[:, None] * s_k_n + d[None, :] * s_k_d, mask=kvmask, other=0.0)
        s = tl.dot(qt, tl.trans(kt.to(dot_ty))) * sm_scale
        # causal by stored position, never by list order
        visible = ok[None, :] & (sp[None, :] <= qp[:, None])
        s = tl.where(visible, s, float("-inf"))
        vt = tl.load(v_slots + slot[:, None] * s_v_n + d[None, :] * s_v_d, mask=kvmask, other=0.0)
        acc, l_i, m_i = _online_softmax_block(s, vt, acc, l_i, m_i, dot_ty)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out = tl.where((l_i > 0)[:, None], out, 0.0)
    tl.store(o + tok[:, None] * s_o_t + qh[:, None] * s_o_h + d[None, :] * s_o_d,
             out.to(o.dtype.element_ty), mask=qmask)


# Decode splits: enough programs to fill a large GPU whatever the batch (list lengths are read on
# the device, so the split count depends only on the number of sequences).
_TARGET_PROGRAMS = 512
_MAX_SPLITS = 16


def decode_num_splits(num_seqs: int) -> int:
    return max(1, min(_MAX_SPLITS, -(-_TARGET_PROGRAMS // max(num_seqs, 1))))


def _launch_decode(q, k_slots, v_slots, o, indptr, indices, H_kv, sm_scale, num_splits):
    R, H_q, D = q.shape
    if R == 0 or H_q == 0 or D == 0:
        return
    if k_slots.shape[0] == 0:
        o.zero_()
        return
    indptr = indptr.contiguous()
    indices = indices.contiguous()
    if indices.numel() == 0:  # a valid pointer for the (never executed) loads
        indices = torch.zeros(1, dtype=torch.int32, device=q.device)
    G = H_q // H_kv
    S = num_splits or decode_num_splits(R * H_kv)
    BLOCK_G = max(16, triton.next_power_of_2(G))  # tl.dot needs at least 16 rows
    BLOCK_D = max(16, triton.next_power_of_2(D))
    o_part = torch.empty(R * H_kv * S * BLOCK_G * BLOCK_D, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(R * H_kv * S * BLOCK_G, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(R * H_kv, S)](
        q, k_slots, v_slots, indptr, indices, o_part, lse_part,
        k_slots.shape[0], D, float(sm_scale),
        *q.stride(), *k_slots.stride(), *v_slots.stride(),
        H_KV=H_kv, GROUP=G, NUM_SPLITS=S,
        BLOCK_G=BLOCK_G, BLOCK_N=_BLOCK_N, BLOCK_D=BLOCK_D,
        DOT_F32=_INTERPRET and k_slots.dtype == torch.bfloat16,
    )
    _decode_merge_kernel[(R * H_kv, G)](
        o_part, lse_part, o, D, *o.stride(),
        H_KV=H_kv, GROUP=G, NUM_SPLITS=S,
        BLOCK_S=triton.next_power_of_2(S), BLOCK_G=BLOCK_G, BLOCK_D=BLOCK_D,
    )


def _launch_extend(q, k_slots, v_slots, o, indptr, indices, q_pos, q_req, slot_pos, num_req, H_kv, sm_scale,
                   positions_sorted):
    T, H_q, D = q.shape
    if T == 0 or H_q == 0 or D == 0 or num_req == 0:
        return
    if k_slots.shape[0] == 0:
        o.zero_()
        return
    indptr = indptr.contiguous()
    indices = indices.contiguous()
    if indices.numel() == 0:  # a valid pointer for the (never executed) loads
        indices = torch.zeros(1, dtype=torch.int32, device=q.device)
    G = H_q // H_kv
    BLOCK_G = triton.next_power_of_2(G)
    BLOCK_M = max(1, 64 // BLOCK_G)  # 64 query rows per tile (tl.dot needs at least 16)
    # Each request's tokens, grouped (device ops: stable sort by request, counts, starts); a
    # bad request id is dropped, so its token attends to nothing (o = 0).
    req = q_req.long()
    good = (req >= 0) & (req < num_req)
    key = torch.where(good, req, torch.full_like(req, num_req))
    order = torch.argsort(key, stable=True)
    count = torch.bincount(key, minlength=num_req + 1)[:num_req]
    start = torch.cumsum(count, 0) - count
    # The grid is sized without reading the counts back: every request may own every token.
    blocks = triton.cdiv(T, BLOCK_M)
    _extend_kernel[(num_req * H_kv, blocks)](
        q, k_slots, v_slots, o,
        indptr, indices, q_pos.contiguous(), order, start, count, slot_pos.contiguous(),
        k_slots.shape[0], D, float(sm_scale),
        *q.stride(), *k_slots.stride(), *v_slots.stride(), *o.stride(),
        H_KV=H_kv, GROUP=G, BLOCK_M=BLOCK_M, BLOCK_G=BLOCK_G,
        BLOCK_N=_BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(D)),
        DOT_F32=_INTERPRET and k_slots.dtype == torch.bfloat16,
        POSITIONS_SORTED=bool(positions_sorted),
    )


def ragged_decode_attention(
    q, k_slots, v_slots, indptr, indices, sm_scale: float, *, num_splits: int | None = None
) -> torch.Tensor:
    """Decode attention over live head-slot lists (Triton: a program per (request, KV head, KV
    split) computes the query group with tl.dot; splits merge by log-sum-exp). `num_splits`
    (default: from the number of sequences) only changes how the work is cut, not the result."""
    H_kv = _validate_decode(q, k_slots, v_slots, indptr, indices, sm_scale)
    if q.device.type == "cpu":
        _check_ranges(indptr, indices, k_slots.shape[0])
    o = torch.zeros_like(q, memory_format=torch.contiguous_format)
    _launch_decode(q, k_slots, v_slots, o, indptr, indices, H_kv, sm_scale, num_splits)
    return o


def ragged_extend_attention(
    q, q_pos, q_req, k_slots, v_slots, slot_pos, indptr, indices, sm_scale: float,
    *, num_kv_heads: int | None = None, positions_sorted: bool = False,
) -> torch.Tensor:
    """Extend (prefill) attention over live head-slot lists, causal by stored position (Triton).
    positions_sorted=True promises every list is in increasing position (the live lists are):
    each query tile then stops at its last visible key instead of scanning the whole list."""
    H_kv, num_req = _validate_extend(
        q, q_pos, q_req, k_slots, v_slots, slot_pos, indptr, indices, sm_scale, num_kv_heads
    )
    if q.device.type == "cpu":
        _check_ranges(indptr, indices, k_slots.shape[0])
        _check_q_req(q_req, num_req)
    o = torch.zeros_like(q, memory_format=torch.contiguous_format)
    _launch_extend(q, k_slots, v_slots, o, indptr, indices, q_pos, q_req, slot_pos, num_req, H_kv, sm_scale,
                   positions_sorted)
    return o


# ----------------------------------------------------------------------------- torch references
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
        k = k_slots.index_select(0, sl.reshape(-1)).view(n * H_kv, Lc, D).float()
        s = torch.bmm(qb[b0:b1].view(n * H_kv, M, D), k.transpose(1, 2))
        del k
        s.mul_(sm_scale)
        s.view(n, H_kv, B, G, Lc).masked_fill_(hidden, -math.inf)
        m = s.amax(dim=2, keepdim=True)
        # A row with no visible key has max -inf; subtract 0 instead so exp gives 0, not NaN.
        m.masked_fill_(m == -math.inf, 0.0)
        p = s.sub_(m).exp_()
        l = p.sum(dim=2, keepdim=True)
        if use_ebag:
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
