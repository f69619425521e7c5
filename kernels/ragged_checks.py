"""Argument checks shared by the ragged attention kernels and their torch twins: each raises
ValueError naming the bad argument (ragged_attention.py states the contract)."""

from __future__ import annotations

import math

import torch

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)


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
