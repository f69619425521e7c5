"""Retention-gated attention for TRAINING the gates (pure torch, autograd, memory-bounded).

METHOD.md (Training), as the authors' released training code computes it: the retention decay
is ADDED to the scaled logit (like ALiBi), so the attention WEIGHT of key i is multiplied by
β_i^(t-i) before normalisation. For one sequence, query position t, key position i <= t and KV
head h (GQA: query head j reads KV head j // group)

    log α_{t,i} = (t - i) · log β_{i,h}          (α_{t,t} = 1, α in (0, 1] since log β <= 0)
    logit_{t,i} = (q_t · k_i) · scale + log α_{t,i}   (scale defaults to 1 / sqrt(D))
    o_t         = Σ_{i<=t} softmax_i(logit_{t,i}) · v_i

A decayed key loses attention whatever the sign of its logit. Positions are token indices
0..T-1 of each sequence in the batch (no padding / packing support).

`gated_attention` processes `chunk_size` query rows at a time: a block only ever builds the
[chunk, t1] slice of the logits (t1 = last row of the block + 1; keys after the block are causally
masked and never touched), and the block is wrapped in
``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` so that autograd keeps only the block's
inputs and output; the [chunk, t1] intermediates are recomputed one block at a time in backward.
Peak extra memory is therefore O(B · Hq · chunk · T) instead of O(B · Hq · T²).

Dtypes: the logits and the softmax are computed in float32 whatever the q/k/v dtype (or in
float64 when any input is float64, which the tests use for tight gradient checks); the output is
cast back to q's dtype. The causal mask is applied to the age *before* the product, so masked
entries (negative age) can never overflow.

Hard eviction (`evicted_at`, optional, int64 [B, T, Hkv]): key i of head h is gone for every
query t >= evicted_at[b, i, h] (the step at which the serving evictor dropped it; T or more for
a key never dropped). The forward value is then what the server computes: plain attention (no
decay term) over the keys still live. The backward is the soft one's (straight-through:
o = o_soft + (o_hard - o_soft).detach()), so the gates also learn from the keys that were
evicted.

`expected_live_count` gives S_t = Σ_{i<=t} β_i^(t-i), the expected number of live cache entries
per KV head after step t; `capacity_loss` is the authors' hinge on its excess over the budget,
max(0, (S_t - M) / (t - M)), averaged over the entries where it is positive.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = [
    "capacity_loss",
    "expected_live_count",
    "expected_live_count_reference",
    "gated_attention",
    "gated_attention_reference",
]


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")


def _check_log_beta(log_beta: torch.Tensor, shape: tuple[int, int, int] | None = None) -> None:
    if not isinstance(log_beta, torch.Tensor):
        raise ValueError(f"log_beta must be a tensor, got {type(log_beta).__name__}")
    if not log_beta.is_floating_point():
        raise ValueError(f"log_beta must be floating point, got {log_beta.dtype}")
    if log_beta.dim() != 3:
        raise ValueError(f"log_beta must be [B, T, Hkv], got shape {tuple(log_beta.shape)}")
    if shape is not None and tuple(log_beta.shape) != shape:
        raise ValueError(
            f"log_beta must have shape [B, T, Hkv] = {list(shape)}, got {list(log_beta.shape)}"
        )


def _check_attention_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_beta: torch.Tensor, scale: float | None
) -> float:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, T, D], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {x.dtype}")
    B, Hq, T, D = q.shape
    Bk, Hkv, Tk, Dk = k.shape
    if (Bk, Tk, Dk) != (B, T, D):
        raise ValueError(
            f"k must be [B, Hkv, T, D] with B={B}, T={T}, D={D} from q, got {list(k.shape)}"
        )
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(
            f"k: number of query heads Hq={Hq} must be a multiple of KV heads Hkv={Hkv}"
        )
    if tuple(v.shape[:3]) != (B, Hkv, T):
        raise ValueError(
            f"v must be [B, Hkv, T, Dv] with B={B}, Hkv={Hkv}, T={T}, got {list(v.shape)}"
        )
    _check_log_beta(log_beta, (B, T, Hkv))
    if scale is None:
        return 1.0 / math.sqrt(D) if D > 0 else 1.0
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    return scale


def _compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    dt = torch.float32
    for x in xs:
        dt = torch.promote_types(dt, x.dtype)
    return dt


# --------------------------------------------------------------------------------------------
# shared math
# --------------------------------------------------------------------------------------------


def _log_alpha(log_beta_keys: torch.Tensor, t0: int, t1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log α for query rows t0..t1-1 against keys 0..t1-1.

    log_beta_keys: [B, Hkv, t1] (compute dtype). Returns (log_alpha [B, Hkv, t1-t0, t1], causal
    mask [t1-t0, t1] with True where i <= t). The age is clamped to >= 0 before the product, and
    the diagonal (age 0) is exactly 0 even if log β were -inf.
    """
    device = log_beta_keys.device
    rows = torch.arange(t0, t1, device=device)
    cols = torch.arange(0, t1, device=device)
    age = rows[:, None] - cols[None, :]  # [C, t1]
    causal = age >= 0
    age_f = age.clamp(min=0).to(log_beta_keys.dtype)
    prod = age_f[None, None] * log_beta_keys[:, :, None, :]  # [B, Hkv, C, t1]
    zero = torch.zeros((), dtype=prod.dtype, device=device)
    log_alpha = torch.where((age > 0)[None, None], prod, zero)
    return log_alpha, causal


def _attention_block(
    q_blk: torch.Tensor,
    k_keys: torch.Tensor,
    v_keys: torch.Tensor,
    lb_keys: torch.Tensor,
    t0: int,
    scale: float,
    compute_dtype: torch.dtype,
    evicted_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query block. q_blk [B, Hq, C, D], k/v_keys [B, Hkv, t1, *], lb_keys [B, Hkv, t1],
    evicted_keys None or int64 [B, Hkv, t1] (hard eviction, straight-through)."""
    B, Hq, C, D = q_blk.shape
    Hkv = k_keys.shape[1]
    g = Hq // Hkv
    qf = q_blk.to(compute_dtype).reshape(B, Hkv, g, C, D)
    kf = k_keys.to(compute_dtype)
    vf = v_keys.to(compute_dtype)
    log_alpha, causal = _log_alpha(lb_keys.to(compute_dtype), t0, t0 + C)  # [B, Hkv, C, t1]
    scores = torch.einsum("bhgcd,bhtd->bhgct", qf, kf) * scale  # [B, Hkv, g, C, t1]
    logits = (scores + log_alpha[:, :, None]).masked_fill(~causal, float("-inf"))
    out = torch.einsum("bhgct,bhtd->bhgcd", torch.softmax(logits, dim=-1), vf)
    if evicted_keys is not None:  # the value of the hard forward, the gradient of the soft one
        with torch.no_grad():  # served: plain logits over the live keys, no decay term
            rows = torch.arange(t0, t0 + C, device=q_blk.device)
            live = causal[None, None] & (rows[None, None, :, None] < evicted_keys[:, :, None, :])
            hard = torch.softmax(scores.masked_fill(~live[:, :, None], float("-inf")), dim=-1)
            out_hard = torch.einsum("bhgct,bhtd->bhgcd", hard, vf)
        out = out + (out_hard - out.detach())
    return out.reshape(B, Hq, C, vf.shape[-1]).to(q_blk.dtype)


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------


def gated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_beta: torch.Tensor,
    scale: float | None = None,
    chunk_size: int = 128,
    *,
    use_checkpoint: bool = True,
    evicted_at: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal retention-gated attention, chunked over query rows and checkpointed per chunk.

    q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv], log_beta [B, T, Hkv] (float32; <= 0),
    evicted_at None or int64 [B, T, Hkv] (hard eviction, see the module docstring).
    Returns o [B, Hq, T, Dv] in q's dtype. ``use_checkpoint=False`` (testing/debugging only)
    keeps the per-block intermediates for backward instead of recomputing them.
    """
    _check_chunk_size(chunk_size)
    scale = _check_attention_inputs(q, k, v, log_beta, scale)
    T = q.shape[2]
    compute_dtype = _compute_dtype(q, k, v, log_beta)
    lb = log_beta.permute(0, 2, 1)  # [B, Hkv, T] (a view)
    ev = _check_evicted_at(evicted_at, log_beta)
    outs = []
    for t0 in range(0, T, chunk_size):
        t1 = min(t0 + chunk_size, T)
        args = (q[:, :, t0:t1], k[:, :, :t1], v[:, :, :t1], lb[:, :, :t1], t0, scale, compute_dtype,
                None if ev is None else ev[:, :, :t1])
        if use_checkpoint and torch.is_grad_enabled():
            outs.append(checkpoint(_attention_block, *args, use_reentrant=False))
        else:
            outs.append(_attention_block(*args))
    if not outs:
        return q.new_empty((*q.shape[:3], v.shape[-1]))
    return torch.cat(outs, dim=2)


def _check_evicted_at(evicted_at: torch.Tensor | None, log_beta: torch.Tensor):
    """evicted_at [B, T, Hkv] -> [B, Hkv, T] (int64), or None."""
    if evicted_at is None:
        return None
    if not isinstance(evicted_at, torch.Tensor) or evicted_at.is_floating_point():
        raise ValueError("evicted_at must be an integer tensor [B, T, Hkv]")
    if evicted_at.shape != log_beta.shape:
        raise ValueError(
            f"evicted_at must have log_beta's shape {list(log_beta.shape)}, got "
            f"{list(evicted_at.shape)}"
        )
    T = log_beta.shape[1]
    if bool((evicted_at <= torch.arange(T, device=evicted_at.device)[None, :, None]).any()):
        raise ValueError("evicted_at: a key is evicted at or before its own step")
    return evicted_at.long().permute(0, 2, 1)


def gated_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_beta: torch.Tensor,
    scale: float | None = None,
    chunk_size: int = 128,
    *,
    evicted_at: torch.Tensor | None = None,
) -> torch.Tensor:
    """Naive ground truth: builds the full [T, T] logits per head (``chunk_size`` unused).
    With `evicted_at`, the forward only: plain attention over the keys still live."""
    _check_chunk_size(chunk_size)
    scale = _check_attention_inputs(q, k, v, log_beta, scale)
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    cd = _compute_dtype(q, k, v, log_beta)
    pos = torch.arange(T, device=q.device)
    age = (pos[:, None] - pos[None, :]).to(cd)  # [T, T], t - i
    causal = pos[:, None] >= pos[None, :]
    lb = log_beta.to(cd).permute(0, 2, 1)  # [B, Hkv, T]
    log_alpha = torch.where(causal, age, torch.zeros_like(age))[None, None] * lb[:, :, None, :]
    kf = k.to(cd).repeat_interleave(g, dim=1)
    vf = v.to(cd).repeat_interleave(g, dim=1)
    logits = (q.to(cd) @ kf.transpose(-1, -2)) * scale
    visible = causal[None, None]
    if evicted_at is None:
        logits = logits + log_alpha.repeat_interleave(g, dim=1)  # [B, Hq, T, T]
    else:  # [B, T, Hkv] -> visible[b, h, t, i] = t < evicted_at[b, i, h]
        ev = evicted_at.permute(0, 2, 1).repeat_interleave(g, dim=1)
        visible = visible & (pos[None, None, :, None] < ev[:, :, None, :])
    logits = logits.masked_fill(~visible, float("-inf"))
    return (torch.softmax(logits, dim=-1) @ vf).to(q.dtype)


# --------------------------------------------------------------------------------------------
# expected live count and capacity loss
# --------------------------------------------------------------------------------------------


def _live_block(lb_keys: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
    """Σ_{i<=t} α_{t,i} for rows t0..t1-1; lb_keys [B, Hkv, t1] -> [B, t1-t0, Hkv]."""
    log_alpha, causal = _log_alpha(lb_keys, t0, t1)
    alpha = torch.exp(log_alpha).masked_fill(~causal, 0.0)
    return alpha.sum(dim=-1).permute(0, 2, 1)


def expected_live_count(
    log_beta: torch.Tensor, chunk_size: int = 128, *, use_checkpoint: bool = True
) -> torch.Tensor:
    """Expected number of live cache entries per KV head after each step.

    live[b, t, h] = Σ_{i<=t} β_{b,i,h}^(t-i) = Σ_{i<=t} exp((t - i) · log β_{b,i,h}),
    computed ``chunk_size`` rows at a time (each row block checkpointed), in float32 (float64 for
    float64 input). log_beta [B, T, Hkv] -> live [B, T, Hkv]. Equals t + 1 when log β = 0.
    """
    _check_chunk_size(chunk_size)
    _check_log_beta(log_beta)
    cd = _compute_dtype(log_beta)
    lb = log_beta.to(cd).permute(0, 2, 1)  # [B, Hkv, T]
    T = lb.shape[-1]
    outs = []
    for t0 in range(0, T, chunk_size):
        t1 = min(t0 + chunk_size, T)
        if use_checkpoint and torch.is_grad_enabled():
            outs.append(checkpoint(_live_block, lb[:, :, :t1], t0, t1, use_reentrant=False))
        else:
            outs.append(_live_block(lb[:, :, :t1], t0, t1))
    if not outs:
        return log_beta.new_zeros(log_beta.shape, dtype=cd)
    return torch.cat(outs, dim=1)


def expected_live_count_reference(log_beta: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """Naive ground truth for `expected_live_count` (full [T, T] α; ``chunk_size`` unused)."""
    _check_chunk_size(chunk_size)
    _check_log_beta(log_beta)
    cd = _compute_dtype(log_beta)
    T = log_beta.shape[1]
    pos = torch.arange(T, device=log_beta.device)
    age = (pos[:, None] - pos[None, :]).to(cd)
    causal = pos[:, None] >= pos[None, :]
    age = torch.where(causal, age, torch.zeros_like(age))
    # [B, T(t), T(i), H]
    alpha = torch.exp(age[None, :, :, None] * log_beta.to(cd)[:, None, :, :])
    return (alpha * causal[None, :, :, None].to(cd)).sum(dim=2)


def capacity_loss(live: torch.Tensor, budget: int) -> torch.Tensor:
    """The authors' capacity penalty on live [..., T, H] (T positions, then heads):

        max(0, (S_t - M) / max(t - M, 1))   at position t (0-based: S_t counts t + 1 entries)

    averaged over the entries where it is positive (0 when none is). Dividing by t - M, the
    most a perfect gate could have dropped by step t, makes an overflow late in a long sequence
    cost as much as the same share early. DBTrimKV's one budget (S summed over layers and heads
    against L·H·M, positions scaled alike) is this with `live` the mean over layers and heads.
    """
    if not isinstance(live, torch.Tensor) or not live.is_floating_point():
        raise ValueError("live must be a floating-point tensor")
    if live.dim() < 2:
        raise ValueError(f"live must be [..., T, H], got shape {tuple(live.shape)}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be an int >= 1, got {budget!r}")
    t = torch.arange(live.shape[-2], device=live.device, dtype=live.dtype)
    span = (t - budget).clamp(min=1.0)[:, None]  # [T, 1]
    hinge = F.relu((live - budget) / span)
    positive = int((hinge > 0).sum())
    if positive == 0:
        return hinge.sum() * 0.0
    return hinge.sum() / positive
