"""Top-`budget` score threshold without sorting: a radix select over the float32 bit pattern.

The evictor keeps the `budget` highest scores. Instead of sorting N scores it finds the
threshold value with four histogram passes of 8 bits each over order-preserving integer keys.

Canonical scores (what every function here ranks, and what the threshold is compared with):
    s = scores with NaN -> -inf and -0.0 -> +0.0
NaN therefore ranks lowest, tied with -inf; -0.0 and +0.0 are one value (as `==` sees them).
This is exactly the order of `sglang_evict.eviction.policies.keep_mask` (which maps NaN to -inf too).

`topk_threshold(scores, budget) -> (threshold, num_above)`, both 0-d tensors on scores' device:
    budget == 0        threshold = +inf,                    num_above = 0
    1 <= budget < N    threshold = the budget-th largest s   (duplicates counted; so +inf when
                       at least `budget` scores are +inf),  num_above = #(s > threshold)
    budget >= N        threshold = -inf (keep everything),  num_above = #(s > -inf)
threshold is float32 (never NaN, never -0.0); num_above is int64 and always <= budget.

The kept set (`select_keep`) is then
    s > threshold
    | the first (budget - num_above) entries with s == threshold, lowest index first
    | s == +inf  (always kept, even beyond the budget)
which holds max(budget, #+inf) entries, or N when budget >= N.

`topk_threshold` (Triton) and `topk_threshold_reference` (torch kthvalue) share this contract and
return the same bits.

Kernel: a float32 maps to a uint32 key that orders like the float (flip the sign bit of a
positive, invert every bit of a negative); keys are handled as int64 inside the kernel so that
Python-side constants never hit Triton's signed 32-bit argument typing. Each pass builds a
256-bin histogram of one byte of the key (most significant first) over the keys whose higher
bytes equal the prefix found so far (grid-strided loop over N, atomic adds into the histogram);
a few torch ops on the histogram (suffix cumsum) pick the byte, extend the prefix, lower the
remaining rank and add the count of keys strictly above. The prefix and rank stay in a device
tensor, so nothing is read back to the host between passes. Counts are int32: N < 2**31.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["topk_threshold", "topk_threshold_reference", "select_keep"]

_RADIX_BITS = 8
_NUM_BINS = 1 << _RADIX_BITS
_BLOCK = 1024
# Programs per pass: enough to fill a GPU, few enough that the histogram atomics stay cheap.
_MAX_PROGRAMS = 1024


def _validate(scores, budget) -> None:
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"scores: expected a torch.Tensor, found {type(scores).__name__}")
    if scores.dtype != torch.float32:
        raise ValueError(f"scores: expected dtype torch.float32, found {scores.dtype}")
    if scores.dim() != 1:
        raise ValueError(f"scores: expected shape [N], found {tuple(scores.shape)}")
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise ValueError(f"budget: expected an int, found {type(budget).__name__}")
    if budget < 0:
        raise ValueError(f"budget: expected a non-negative integer, found {budget}")


def _canonical(scores: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf, -0.0 -> +0.0 (see module docstring)."""
    s = torch.where(torch.isnan(scores), torch.full_like(scores, -math.inf), scores)
    return torch.where(s == 0, torch.zeros_like(s), s)


def _trivial(scores: torch.Tensor, budget: int):
    """The budget == 0 and budget >= N cases, shared by kernel and reference; None otherwise."""
    n = scores.shape[0]
    dev = scores.device
    if budget >= n:
        # NaN > -inf is False, so NaN entries are not counted, as -inf entries are not.
        num_above = (scores > -math.inf).sum().to(torch.int64)
        return torch.tensor(-math.inf, dtype=torch.float32, device=dev), num_above
    if budget == 0:
        return (
            torch.tensor(math.inf, dtype=torch.float32, device=dev),
            torch.zeros((), dtype=torch.int64, device=dev),
        )
    return None


def topk_threshold_reference(scores: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch ground truth of `topk_threshold` (kthvalue based; see module docstring)."""
    _validate(scores, budget)
    trivial = _trivial(scores, budget)
    if trivial is not None:
        return trivial
    s = _canonical(scores)
    n = s.shape[0]
    threshold = torch.kthvalue(s, n - budget + 1).values  # budget-th largest
    num_above = (s > threshold).sum().to(torch.int64)
    return threshold.to(torch.float32), num_above


@triton.jit
def _radix_hist_kernel(
    scores, stride, N, state, hist,
    SHIFT: tl.constexpr, HIGH_MASK: tl.constexpr,
    BLOCK: tl.constexpr, RADIX_MASK: tl.constexpr,
):
    # state[0] = key prefix found so far (int64, only the bits in HIGH_MASK are set).
    prefix = tl.load(state)
    start = tl.program_id(0) * BLOCK
    step = tl.num_programs(0) * BLOCK
    for base in range(start, N, step):
        offs = tl.arange(0, BLOCK).to(tl.int64) + base
        ok = offs < N
        x = tl.load(scores + offs * stride, mask=ok, other=0.0)
        x = tl.where(x != x, float("-inf"), x)  # NaN ranks lowest, tied with -inf
        x = tl.where(x == 0.0, 0.0, x)  # -0.0 == +0.0
        bits = x.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
        # Order-preserving key in [0, 2**32): positives get the sign bit set, negatives are inverted.
        key = tl.where(bits >= 0x80000000, 0xFFFFFFFF - bits, bits + 0x80000000)
        match = ok & ((key & HIGH_MASK) == prefix)
        digit = (key >> SHIFT) & RADIX_MASK
        tl.atomic_add(hist + digit, tl.full(digit.shape, 1, tl.int32), mask=match)


def topk_threshold(scores: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(threshold, num_above) of the `budget` highest scores by a Triton radix select
    (4 histogram passes, no sort; see module docstring). Any stride is accepted."""
    _validate(scores, budget)
    trivial = _trivial(scores, budget)
    if trivial is not None:
        return trivial
    n = scores.shape[0]
    dev = scores.device
    # state: [prefix, remaining rank k (1-based, from the top, among keys matching the prefix)]
    state = torch.tensor([0, budget], dtype=torch.int64, device=dev)
    num_above = torch.zeros((), dtype=torch.int64, device=dev)
    hist = torch.empty(_NUM_BINS, dtype=torch.int32, device=dev)
    grid = (max(1, min(triton.cdiv(n, _BLOCK), _MAX_PROGRAMS)),)
    for shift in range(32 - _RADIX_BITS, -1, -_RADIX_BITS):
        high_mask = (0xFFFFFFFF << (shift + _RADIX_BITS)) & 0xFFFFFFFF
        hist.zero_()
        _radix_hist_kernel[grid](
            scores, scores.stride(0), n, state, hist,
            SHIFT=shift, HIGH_MASK=high_mask, BLOCK=_BLOCK, RADIX_MASK=_NUM_BINS - 1,
        )
        h = hist.to(torch.int64)
        suffix = h.flip(0).cumsum(0).flip(0)  # suffix[d] = #matching keys with digit >= d
        k = state[1]
        # suffix is non-increasing and suffix[0] >= k >= 1: the digit holding the k-th largest
        # is the last d with suffix[d] >= k.
        digit = (suffix >= k).sum() - 1
        above = suffix[digit] - h[digit]  # matching keys with a larger digit
        num_above += above
        state[0] = state[0] | (digit << shift)
        state[1] = k - above
    key = state[0]
    bits = torch.where(key >= 0x80000000, key - 0x80000000, 0xFFFFFFFF - key)
    bits = torch.where(bits >= 0x80000000, bits - 0x100000000, bits)
    threshold = bits.to(torch.int32).view(torch.float32)
    return threshold, num_above


def select_keep(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """bool [N]: the kept entries, via `topk_threshold` and a lowest-index-first tie-break.

    Keeps max(budget, #+inf) entries (N when budget >= N); equal to
    `policies.keep_mask(scores.view(-1, 1), budget, per_head=False)[:, 0]`."""
    threshold, num_above = topk_threshold(scores, budget)
    s = _canonical(scores)
    above = s > threshold
    at = s == threshold
    room = budget - num_above
    return above | (at & (torch.cumsum(at, dim=0) <= room)) | torch.isposinf(s)
