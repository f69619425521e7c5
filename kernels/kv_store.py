"""Store new tokens' K, V, log beta and position into the paged pool in one pass.

Pool layout (one layer), FlashInfer-compatible paged NHD:
    k_cache, v_cache   [num_pages, page_size, num_kv_heads, head_dim]   float32 / float16 / bfloat16
    log_beta_cache     [num_pages, page_size, num_kv_heads]             float32
    pos_cache          [num_pages, page_size]                           int64
A flat slot id is page * page_size + offset, the same numbering as SGLang's out_cache_loc.

Inputs for T new tokens:
    k, v        [T, num_kv_heads, head_dim]   any float dtype (cast to the cache dtype on store)
    log_beta    [T, num_kv_heads]             any float dtype (stored as float32)
    positions   [T]                           int64 / int32
    loc         [T]                           int64 / int32 flat slot ids; loc < 0 = padding, write nothing

Non-negative loc entries must be distinct: two tokens writing one slot race (undefined winner).
`store_kv_scores` (Triton) and `store_kv_scores_reference` (torch, the ground truth) share this
contract and write the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["store_kv_scores", "store_kv_scores_reference", "paged_view"]

_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int64, torch.int32)

# Elements of one (token block x head_dim) tile: big enough to amortise the launch, small enough
# to stay in registers for head_dim up to 256.
_TILE_ELEMENTS = 2048


def paged_view(flat_cache: torch.Tensor, page_size: int) -> torch.Tensor:
    """View a flat per-slot buffer [num_slots, ...] (SGLang's k_buffer[layer]) as
    [num_slots // page_size, page_size, ...] without copying, so writes reach the original."""
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, found {page_size}")
    if flat_cache.dim() < 1 or flat_cache.shape[0] % page_size:
        raise ValueError(
            f"flat_cache: first dimension must be a multiple of page_size={page_size}, "
            f"found shape {tuple(flat_cache.shape)}"
        )
    return flat_cache.view(flat_cache.shape[0] // page_size, page_size, *flat_cache.shape[1:])


def _check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != expected:
        raise ValueError(f"{name}: expected shape {expected}, found {tuple(t.shape)}")


def _validate(k_cache, v_cache, log_beta_cache, pos_cache, k, v, log_beta, positions, loc) -> int:
    """Check every argument before anything is launched; return T."""
    args = dict(
        k_cache=k_cache, v_cache=v_cache, log_beta_cache=log_beta_cache, pos_cache=pos_cache,
        k=k, v=v, log_beta=log_beta, positions=positions, loc=loc,
    )
    for name, t in args.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, found {type(t).__name__}")

    if k_cache.dim() != 4:
        raise ValueError(
            "k_cache: expected shape [num_pages, page_size, num_kv_heads, head_dim], "
            f"found {tuple(k_cache.shape)}"
        )
    num_pages, page_size, num_heads, head_dim = k_cache.shape
    if loc.dim() != 1:
        raise ValueError(f"loc: expected shape [T], found {tuple(loc.shape)}")
    T = loc.shape[0]

    _check_shape("v_cache", v_cache, (num_pages, page_size, num_heads, head_dim))
    _check_shape("log_beta_cache", log_beta_cache, (num_pages, page_size, num_heads))
    _check_shape("pos_cache", pos_cache, (num_pages, page_size))
    _check_shape("k", k, (T, num_heads, head_dim))
    _check_shape("v", v, (T, num_heads, head_dim))
    _check_shape("log_beta", log_beta, (T, num_heads))
    _check_shape("positions", positions, (T,))

    _check_dtypes_and_device(args, "k_cache", "v_cache", "log_beta_cache", "pos_cache", "loc")
    return T


def _check_dtypes_and_device(
    args: dict[str, torch.Tensor], k_name: str, v_name: str, lb_name: str, pos_name: str,
    index_name: str,
) -> None:
    """The dtype and device rules every store shares; argument names differ per layout."""
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


def _check_loc_bounds(loc: torch.Tensor, num_slots: int) -> None:
    # Costs a device->host sync, so the Triton path only does it for CPU tensors (free there);
    # on a GPU the kernel masks out-of-range slots instead so a bad loc cannot corrupt memory.
    if loc.numel() and int(loc.max()) >= num_slots:
        raise ValueError(
            f"loc: slot ids must be < num_pages * page_size = {num_slots}, found {int(loc.max())}"
        )


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


@triton.jit
def _store_kv_scores_kernel(
    k_cache, v_cache, lb_cache, pos_cache,
    k, v, log_beta, positions, loc,
    T, num_slots, head_dim,
    s_kc_p, s_kc_o, s_kc_h, s_kc_d,
    s_vc_p, s_vc_o, s_vc_h, s_vc_d,
    s_lbc_p, s_lbc_o, s_lbc_h,
    s_pc_p, s_pc_o,
    s_k_t, s_k_h, s_k_d,
    s_v_t, s_v_h, s_v_d,
    s_lb_t, s_lb_h,
    s_pos, s_loc,
    PAGE_SIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Grid: (token blocks, kv heads). Each program copies a [BLOCK_T, head_dim] tile of K and V for
    # one head plus that head's log beta; head 0's programs also write the positions.
    pid_t = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)

    # int64 everywhere an offset is formed: a pool can exceed 2^31 elements.
    tok = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    tok_ok = tok < T
    slot = tl.load(loc + tok * s_loc, mask=tok_ok, other=-1).to(tl.int64)
    # Negative slot = padding token. Out-of-range slots are dropped too (the wrapper rejects them
    # where that is free), so a bad loc never writes outside the pool.
    write = tok_ok & (slot >= 0) & (slot < num_slots)
    slot = tl.where(write, slot, 0)
    # PAGE_SIZE is fixed per server, so a constexpr costs one compile and turns // and % into shifts.
    page = slot // PAGE_SIZE
    off = slot % PAGE_SIZE

    d = tl.arange(0, BLOCK_D).to(tl.int64)
    d_ok = d < head_dim  # masked tail: head_dim need not be a power of two
    mask2 = write[:, None] & d_ok[None, :]

    k_src = k + tok[:, None] * s_k_t + head * s_k_h + d[None, :] * s_k_d
    k_dst = k_cache + page[:, None] * s_kc_p + off[:, None] * s_kc_o + head * s_kc_h + d[None, :] * s_kc_d
    kt = tl.load(k_src, mask=mask2)
    tl.store(k_dst, _cast_exact(kt, k_cache.dtype.element_ty), mask=mask2)

    v_src = v + tok[:, None] * s_v_t + head * s_v_h + d[None, :] * s_v_d
    v_dst = v_cache + page[:, None] * s_vc_p + off[:, None] * s_vc_o + head * s_vc_h + d[None, :] * s_vc_d
    vt = tl.load(v_src, mask=mask2)
    tl.store(v_dst, _cast_exact(vt, v_cache.dtype.element_ty), mask=mask2)

    lb = tl.load(log_beta + tok * s_lb_t + head * s_lb_h, mask=write)
    lb_dst = lb_cache + page * s_lbc_p + off * s_lbc_o + head * s_lbc_h
    tl.store(lb_dst, _cast_exact(lb, tl.float32), mask=write)

    if tl.program_id(1) == 0:
        pos = tl.load(positions + tok * s_pos, mask=write)
        tl.store(pos_cache + page * s_pc_p + off * s_pc_o, pos.to(tl.int64), mask=write)


def store_kv_scores(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    log_beta_cache: torch.Tensor,
    pos_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_beta: torch.Tensor,
    positions: torch.Tensor,
    loc: torch.Tensor,
) -> None:
    """Write T new tokens into the pool in place with one Triton launch (see module docstring).

    Any strides are accepted (caches are written through their strides, so views work)."""
    T = _validate(k_cache, v_cache, log_beta_cache, pos_cache, k, v, log_beta, positions, loc)
    if T == 0:
        return
    num_pages, page_size, num_heads, head_dim = k_cache.shape
    num_slots = num_pages * page_size
    if loc.device.type == "cpu":
        _check_loc_bounds(loc, num_slots)
    if num_heads == 0 or head_dim == 0 or num_slots == 0:
        return
    k, v, log_beta = _kernel_sources(k, v, log_beta, k_cache.dtype)
    grid, BLOCK_T, BLOCK_D = _store_grid(T, num_heads, head_dim)
    _store_kv_scores_kernel[grid](
        k_cache, v_cache, log_beta_cache, pos_cache,
        k, v, log_beta, positions, loc,
        T, num_slots, head_dim,
        *k_cache.stride(), *v_cache.stride(), *log_beta_cache.stride(), *pos_cache.stride(),
        *k.stride(), *v.stride(), *log_beta.stride(),
        positions.stride(0), loc.stride(0),
        PAGE_SIZE=page_size, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D,
    )


def store_kv_scores_reference(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    log_beta_cache: torch.Tensor,
    pos_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_beta: torch.Tensor,
    positions: torch.Tensor,
    loc: torch.Tensor,
) -> None:
    """Pure-torch ground truth of `store_kv_scores`: same contract, same bits. Rejects
    out-of-range slot ids on every device (it syncs; speed is not its job)."""
    T = _validate(k_cache, v_cache, log_beta_cache, pos_cache, k, v, log_beta, positions, loc)
    if T == 0:
        return
    num_pages, page_size = k_cache.shape[:2]
    _check_loc_bounds(loc, num_pages * page_size)
    keep = loc >= 0
    slot = loc[keep].long()
    page, off = slot // page_size, slot % page_size
    # Advanced-index assignment writes through the caches' strides, so views stay views.
    k_cache[page, off] = k[keep].to(k_cache.dtype)
    v_cache[page, off] = v[keep].to(v_cache.dtype)
    log_beta_cache[page, off] = log_beta[keep].to(torch.float32)
    pos_cache[page, off] = positions[keep].long()
