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

import os

import torch
import triton
import triton.language as tl

from sglang_evict.kernels.ragged_checks import (
    _check_q_req,
    _check_ranges,
    _validate_decode,
    _validate_extend,
)

_BLOCK_N = 32
# Triton's interpreter runs tl.dot in numpy, which has no bfloat16: there the decode kernel's dots
# take float32 inputs (on a GPU they stay in the storage dtype, on tensor cores).
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

__all__ = [
    "ragged_decode_attention",
    "ragged_extend_attention",
]

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
