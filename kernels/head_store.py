"""Store one layer's new tokens into head-granular buffers in one pass.

Buffers (shared by every layer and KV head; one row = one token's K or V for one layer and one
KV head, see `sglang_evict.cache.head_slots`):
    k_slots, v_slots   [capacity, head_dim]   float32 / float16 / bfloat16
    log_beta_slots     [capacity]             float32
    pos_slots          [capacity]             int64

Inputs for T new tokens of ONE layer:
    k, v        [T, num_kv_heads, head_dim]   any float dtype (cast to the buffer dtype on store)
    log_beta    [T, num_kv_heads]             any float dtype (stored as float32)
    positions   [T]                           int64 / int32 (written to every head-slot of the token)
    slot        [T, num_kv_heads]             int64 / int32 physical head-slot of (token, head),
                                              i.e. HeadSlotPool.alloc(ids)[:, layer, :];
                                              slot < 0 = nothing to write (padding / evicted)

Non-negative slot entries must be distinct: two (token, head) pairs writing one head-slot race
(undefined winner, possibly a mix of both rows). `store_head_slots` (Triton) and
`store_head_slots_reference` (torch, the ground truth) share this contract and write the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["store_head_slots", "store_head_slots_reference", "store_head_slots_torch"]

_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int64, torch.int32)

# Elements of one (token block x head_dim) tile: big enough to amortise the launch, small enough
# to stay in registers for head_dim up to 256.
_TILE_ELEMENTS = 2048


def _check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != expected:
        raise ValueError(f"{name}: expected shape {expected}, found {tuple(t.shape)}")


def _check_dtypes_and_device(
    args: dict[str, torch.Tensor], k_name: str, v_name: str, lb_name: str, pos_name: str,
    index_name: str,
) -> None:
    for name in (k_name, v_name):
        if args[name].dtype not in _CACHE_DTYPES:
            raise ValueError(f"{name}: expected dtype in {_CACHE_DTYPES}, found {args[name].dtype}")
    k_dtype, v_dtype = args[k_name].dtype, args[v_name].dtype
    if v_dtype != k_dtype:
        raise ValueError(f"{v_name}: expected dtype {k_dtype} (as {k_name}), found {v_dtype}")
    if args[lb_name].dtype != torch.float32:
        raise ValueError(f"{lb_name}: expected dtype torch.float32, found {args[lb_name].dtype}")
    if args[pos_name].dtype != torch.int64:
        raise ValueError(f"{pos_name}: expected dtype torch.int64, found {args[pos_name].dtype}")
    for name in ("k", "v", "log_beta"):
        if not args[name].dtype.is_floating_point:
            raise ValueError(f"{name}: expected a floating dtype, found {args[name].dtype}")
    for name in ("positions", index_name):
        if args[name].dtype not in _INDEX_DTYPES:
            raise ValueError(f"{name}: expected dtype in {_INDEX_DTYPES}, found {args[name].dtype}")
    device = args[k_name].device
    for name, t in args.items():
        if t.device != device:
            raise ValueError(f"{name}: expected device {device} (as {k_name}), found {t.device}")


def _kernel_sources(k, v, log_beta, cache_dtype):
    # Sources the model never produces on the hot path (float64, float8) are cast by torch first:
    # one rounding, as the reference does, and the kernels only handle the three cache dtypes.
    if k.dtype not in _CACHE_DTYPES:
        k = k.to(cache_dtype)
    if v.dtype not in _CACHE_DTYPES:
        v = v.to(cache_dtype)
    if log_beta.dtype not in _CACHE_DTYPES:
        log_beta = log_beta.to(torch.float32)
    return k, v, log_beta


def _store_grid(T: int, num_heads: int, head_dim: int):
    """(grid, BLOCK_T, BLOCK_D) of a store launch: one program per (token block, KV head)."""
    BLOCK_D = triton.next_power_of_2(head_dim)
    BLOCK_T = max(1, min(_TILE_ELEMENTS // BLOCK_D, triton.next_power_of_2(T)))
    return (triton.cdiv(T, BLOCK_T), num_heads), BLOCK_T, BLOCK_D


@triton.jit
def _cast_exact(x, DST: tl.constexpr):
    """Cast x (float32/float16/bfloat16) to DST with torch's result: round to nearest even.

    The bfloat16 legs are done on bits because Triton 3.8's interpreter truncates float32 ->
    bfloat16 and mishandles bfloat16 subnormals; on a GPU the bit version costs a few integer
    ops on a memory-bound copy and gives what the hardware conversion gives."""
    if x.dtype == tl.bfloat16 and DST != tl.bfloat16:
        x = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    if DST == tl.bfloat16 and x.dtype != tl.bfloat16:
        x = x.to(tl.float32)  # float16 -> float32 is exact
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1)).to(tl.uint32)) >> 16
        bits = tl.where(x != x, 0x7FC0, bits)  # NaN stays a quiet NaN (torch: 0x7FC0)
        x = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(DST)




def _validate(k_slots, v_slots, log_beta_slots, pos_slots, k, v, log_beta, positions, slot) -> int:
    """Check every argument before anything is launched; return T."""
    args = dict(
        k_slots=k_slots, v_slots=v_slots, log_beta_slots=log_beta_slots, pos_slots=pos_slots,
        k=k, v=v, log_beta=log_beta, positions=positions, slot=slot,
    )
    for name, t in args.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, found {type(t).__name__}")

    if k_slots.dim() != 2:
        raise ValueError(f"k_slots: expected shape [capacity, head_dim], found {tuple(k_slots.shape)}")
    capacity, head_dim = k_slots.shape
    if slot.dim() != 2:
        raise ValueError(f"slot: expected shape [T, num_kv_heads], found {tuple(slot.shape)}")
    T, num_heads = slot.shape

    _check_shape("v_slots", v_slots, (capacity, head_dim))
    _check_shape("log_beta_slots", log_beta_slots, (capacity,))
    _check_shape("pos_slots", pos_slots, (capacity,))
    _check_shape("k", k, (T, num_heads, head_dim))
    _check_shape("v", v, (T, num_heads, head_dim))
    _check_shape("log_beta", log_beta, (T, num_heads))
    _check_shape("positions", positions, (T,))

    _check_dtypes_and_device(args, "k_slots", "v_slots", "log_beta_slots", "pos_slots", "slot")
    return T


def _check_slot_bounds(slot: torch.Tensor, capacity: int) -> None:
    # A device->host sync: the Triton path only does it for CPU tensors; on a GPU the kernel drops
    # out-of-range slots instead, so a bad slot cannot corrupt memory.
    if slot.numel() and int(slot.max()) >= capacity:
        raise ValueError(f"slot: head-slot ids must be < capacity = {capacity}, found {int(slot.max())}")


@triton.jit
def _store_head_slots_kernel(
    k_slots, v_slots, lb_slots, pos_slots,
    k, v, log_beta, positions, slot,
    T, capacity, head_dim,
    s_kc_s, s_kc_d,
    s_vc_s, s_vc_d,
    s_lbc, s_pc,
    s_k_t, s_k_h, s_k_d,
    s_v_t, s_v_h, s_v_d,
    s_lb_t, s_lb_h,
    s_pos, s_sl_t, s_sl_h,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Grid: (token blocks, kv heads). Each program scatters a [BLOCK_T, head_dim] tile of K and V of
    # one head into BLOCK_T independent head-slot rows, plus their log beta and position.
    pid_t = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)

    # int64 everywhere an offset is formed: a head-slot buffer can exceed 2^31 elements.
    tok = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    tok_ok = tok < T
    hs = tl.load(slot + tok * s_sl_t + head * s_sl_h, mask=tok_ok, other=-1).to(tl.int64)
    # Negative = nothing to write; out-of-range is dropped too (the wrapper rejects it where free).
    write = tok_ok & (hs >= 0) & (hs < capacity)
    hs = tl.where(write, hs, 0)

    d = tl.arange(0, BLOCK_D).to(tl.int64)
    d_ok = d < head_dim  # masked tail: head_dim need not be a power of two
    mask2 = write[:, None] & d_ok[None, :]

    k_src = k + tok[:, None] * s_k_t + head * s_k_h + d[None, :] * s_k_d
    kt = tl.load(k_src, mask=mask2)
    tl.store(k_slots + hs[:, None] * s_kc_s + d[None, :] * s_kc_d,
             _cast_exact(kt, k_slots.dtype.element_ty), mask=mask2)

    v_src = v + tok[:, None] * s_v_t + head * s_v_h + d[None, :] * s_v_d
    vt = tl.load(v_src, mask=mask2)
    tl.store(v_slots + hs[:, None] * s_vc_s + d[None, :] * s_vc_d,
             _cast_exact(vt, v_slots.dtype.element_ty), mask=mask2)

    lb = tl.load(log_beta + tok * s_lb_t + head * s_lb_h, mask=write)
    tl.store(lb_slots + hs * s_lbc, _cast_exact(lb, tl.float32), mask=write)

    pos = tl.load(positions + tok * s_pos, mask=write)
    tl.store(pos_slots + hs * s_pc, pos.to(tl.int64), mask=write)


def store_head_slots(
    k_slots: torch.Tensor,
    v_slots: torch.Tensor,
    log_beta_slots: torch.Tensor,
    pos_slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_beta: torch.Tensor,
    positions: torch.Tensor,
    slot: torch.Tensor,
) -> None:
    """Write one layer's T new tokens into their head-slots in place with one Triton launch (see
    module docstring). Any strides are accepted; buffers are written through their strides."""
    T = _validate(k_slots, v_slots, log_beta_slots, pos_slots, k, v, log_beta, positions, slot)
    capacity, head_dim = k_slots.shape
    num_heads = slot.shape[1]
    if slot.device.type == "cpu":
        _check_slot_bounds(slot, capacity)
    if T == 0 or num_heads == 0 or head_dim == 0 or capacity == 0:
        return
    k, v, log_beta = _kernel_sources(k, v, log_beta, k_slots.dtype)
    grid, BLOCK_T, BLOCK_D = _store_grid(T, num_heads, head_dim)
    _store_head_slots_kernel[grid](
        k_slots, v_slots, log_beta_slots, pos_slots,
        k, v, log_beta, positions, slot,
        T, capacity, head_dim,
        *k_slots.stride(), *v_slots.stride(), log_beta_slots.stride(0), pos_slots.stride(0),
        *k.stride(), *v.stride(), *log_beta.stride(),
        positions.stride(0), *slot.stride(),
        BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D,
    )


def store_head_slots_reference(
    k_slots: torch.Tensor,
    v_slots: torch.Tensor,
    log_beta_slots: torch.Tensor,
    pos_slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_beta: torch.Tensor,
    positions: torch.Tensor,
    slot: torch.Tensor,
) -> None:
    """Pure-torch ground truth of `store_head_slots`: same contract, same bits. Rejects
    out-of-range head-slot ids on every device (it syncs; speed is not its job)."""
    T = _validate(k_slots, v_slots, log_beta_slots, pos_slots, k, v, log_beta, positions, slot)
    _check_slot_bounds(slot, k_slots.shape[0])
    if T == 0:
        return
    keep = slot >= 0  # [T, H]
    hs = slot[keep].long()
    # Advanced-index assignment writes through the buffers' strides, so views stay views.
    k_slots[hs] = k[keep].to(k_slots.dtype)
    v_slots[hs] = v[keep].to(v_slots.dtype)
    log_beta_slots[hs] = log_beta[keep].to(torch.float32)
    pos_slots[hs] = positions.long()[:, None].expand_as(slot)[keep]


def store_head_slots_torch(
    k_slots: torch.Tensor,
    v_slots: torch.Tensor,
    log_beta_slots: torch.Tensor,
    pos_slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_beta: torch.Tensor,
    positions: torch.Tensor,
    slot: torch.Tensor,
) -> None:
    """Pure-torch twin of `store_head_slots` for serving on CPU: same signature, contract and
    bits. A step's head-slots are all allocated, so the common case is four index_copy_ calls
    with no mask; any -1 or out-of-range id takes the reference's path (which skips or rejects)."""
    T = _validate(k_slots, v_slots, log_beta_slots, pos_slots, k, v, log_beta, positions, slot)
    if T == 0:
        return
    flat = slot.reshape(-1)
    lo, hi = torch.aminmax(flat)
    if int(lo) < 0 or int(hi) >= k_slots.shape[0] or k_slots.stride(1) != 1:
        store_head_slots_reference(
            k_slots, v_slots, log_beta_slots, pos_slots, k, v, log_beta, positions, slot
        )
        return
    idx = flat.long()
    D = k_slots.shape[1]
    k_slots.index_copy_(0, idx, k.reshape(-1, D).to(k_slots.dtype))
    v_slots.index_copy_(0, idx, v.reshape(-1, v_slots.shape[1]).to(v_slots.dtype))
    log_beta_slots.index_copy_(0, idx, log_beta.reshape(-1).to(torch.float32))
    pos_slots.index_copy_(0, idx, positions.long()[:, None].expand_as(slot).reshape(-1))
