"""Eviction policies: which cached KV entries to keep when a budget is exceeded.

A policy is a small frozen dataclass with one `score(inputs)` method (the kvpress shape), so the
evictor, the CLI and the benchmarks treat every policy alike and a new one is a dozen lines.

Score convention: `score` returns float32 [N, H], one value per (cached entry, KV head);
higher = keep. Protected entries score +inf and are kept whatever the budget:

    sinks   the first `sinks` positions of each sequence (attention sinks)
    window  entries with seq_len - position <= window (the most recent tokens; 0 = no window)

Policies (registry name -> raw score of an unprotected entry, t = its sequence's length):

    retention  learned TrimKV / DBTrimKV score log α = (t - pos) · log β
               (optionally the n-step lookahead form and a + log ||k|| key-norm bonus)
    streaming  StreamingLLM: -(t - pos), so a budget keeps the sinks and the most recent tokens
    random     uniform in [0, 1), reproducible from `seed` (a baseline)
    knorm      kvpress KnormPress: -||k||₂ (low-norm keys draw the most attention; keep them)
    none       never evict: every entry +inf

`keep_mask(scores, budget, per_head=...)` turns scores into the kept set: per head (TrimKV: M
per (layer, head)) or one global budget over all entries and heads (DBTrimKV).
"""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch

from sglang_evict.gates.retention import retention_log_alpha, retention_log_alpha_lookahead


class ScoreInputs(NamedTuple):
    """N cached entries, of one or several requests, as one policy scores them.

    positions     int64 [N]        token position of each entry in its sequence
    seq_len       int64 [N]        current length t of the sequence the entry belongs to
                                   (positions are < t; requests have different lengths)
    num_kv_heads  H
    log_beta      float32 [N, H]   the retention gate output stored with each entry, or None
    keys          [N, H, D]        post-RoPE keys (any float dtype), or None

    Only shapes are checked (`check`), never values: reading values back would synchronise the
    device on every eviction.
    """

    positions: torch.Tensor
    seq_len: torch.Tensor
    num_kv_heads: int
    log_beta: torch.Tensor | None = None
    keys: torch.Tensor | None = None

    @property
    def num_entries(self) -> int:
        return self.positions.shape[0]

    def check(self) -> None:
        """ValueError if a tensor has the wrong rank, shape or kind of dtype."""
        h = self.num_kv_heads
        if not _is_int(h) or h < 1:
            raise ValueError(f"ScoreInputs.num_kv_heads must be a positive integer, got {h!r}")
        pos, t = self.positions, self.seq_len
        if pos.ndim != 1 or pos.is_floating_point() or pos.is_complex():
            raise ValueError(
                f"ScoreInputs.positions must be an integer tensor [N], got {pos.dtype} "
                f"{tuple(pos.shape)}"
            )
        n = pos.shape[0]
        if t.shape != (n,) or t.is_floating_point() or t.is_complex():
            raise ValueError(
                f"ScoreInputs.seq_len must be an integer tensor [N={n}], got {t.dtype} "
                f"{tuple(t.shape)}"
            )
        lb = self.log_beta
        if lb is not None and (lb.shape != (n, h) or not lb.is_floating_point()):
            raise ValueError(
                f"ScoreInputs.log_beta must be a float tensor [N={n}, H={h}], got {lb.dtype} "
                f"{tuple(lb.shape)}"
            )
        k = self.keys
        if k is not None and (k.ndim != 3 or k.shape[:2] != (n, h) or not k.is_floating_point()):
            raise ValueError(
                f"ScoreInputs.keys must be a float tensor [N={n}, H={h}, D], got {k.dtype} "
                f"{tuple(k.shape)}"
            )


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_non_negative_int(policy: str, field: str, value: object) -> None:
    if not _is_int(value) or value < 0:
        raise ValueError(
            f"policy {policy!r}: {field} must be a non-negative integer, got {value!r}"
        )


# kw_only: policies are built from names and flags (make_policy, the CLI); a positional
# argument would silently bind to whichever field happens to come first.
@dataclass(frozen=True, kw_only=True)
class EvictionPolicy(abc.ABC):
    """Scores cached entries; higher = keep, protected entries +inf (see the module docstring).

    Subclasses set `name` (the registry, CLI and benchmark name), declare what they read
    (`needs_log_beta`, `needs_keys`) and write `_raw_score` only; `score` validates the inputs
    and applies the sink / window protection shared by all policies.
    """

    name: ClassVar[str]
    needs_log_beta: ClassVar[bool] = False
    needs_keys: ClassVar[bool] = False

    sinks: int = 4
    window: int = 0

    def __post_init__(self) -> None:
        _check_non_negative_int(self.name, "sinks", self.sinks)
        _check_non_negative_int(self.name, "window", self.window)

    @abc.abstractmethod
    def _raw_score(self, inputs: ScoreInputs) -> torch.Tensor:
        """float32 [N, H] before protection; inputs are checked and hold what the policy needs."""

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """float32 [N, H]: higher = keep; sinks and the recent window +inf."""
        inputs.check()
        for needed, field in ((self.needs_log_beta, "log_beta"), (self.needs_keys, "keys")):
            if needed and getattr(inputs, field) is None:
                raise ValueError(
                    f"policy {self.name!r} ({self}) needs ScoreInputs.{field}, which is None"
                )
        raw = self._raw_score(inputs)
        expected = (inputs.num_entries, inputs.num_kv_heads)
        if raw.shape != expected:
            raise RuntimeError(
                f"policy {self.name!r} returned scores of shape {tuple(raw.shape)}, "
                f"expected {expected}"
            )
        # Out of place: raw may be a view (streaming expands one column over the heads).
        return raw.float().masked_fill(self.protected(inputs)[:, None], math.inf)

    def protected(self, inputs: ScoreInputs) -> torch.Tensor:
        """bool [N]: the entries this policy never evicts (sinks and recent window, per
        sequence). Protection is per entry, so it covers all KV heads of that entry."""
        mask = inputs.positions < self.sinks
        # window = 0 means no window, not "entries of age <= 0".
        if self.window > 0:
            mask |= (inputs.seq_len - inputs.positions) <= self.window
        return mask


@dataclass(frozen=True, kw_only=True)
class RetentionPolicy(EvictionPolicy):
    """Learned retention (TrimKV / DBTrimKV): log α = (t - pos) · log β.

    lookahead = n > 0 scores the entry's retention summed over the next n steps,
    (t + 1 - pos) log β + log(1 - β^n) - log(1 - β), instead of its value now.
    key_norm_bonus adds log ||k|| (METHOD.md "Options"); the policy then needs keys too.
    """

    name: ClassVar[str] = "retention"
    needs_log_beta: ClassVar[bool] = True

    lookahead: int = 0
    key_norm_bonus: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_non_negative_int(self.name, "lookahead", self.lookahead)
        if not isinstance(self.key_norm_bonus, bool):
            raise ValueError(
                f"policy {self.name!r}: key_norm_bonus must be a bool, got {self.key_norm_bonus!r}"
            )

    # A property, not a ClassVar: whether keys are needed depends on this instance's options.
    # Read it on an instance (on the class it is the property object).
    @property
    def needs_keys(self) -> bool:  # type: ignore[override]
        return self.key_norm_bonus

    def _raw_score(self, inputs: ScoreInputs) -> torch.Tensor:
        pos, t = inputs.positions[:, None], inputs.seq_len[:, None]
        if self.lookahead:
            raw = retention_log_alpha_lookahead(inputs.log_beta, pos, t, self.lookahead)
        else:
            raw = retention_log_alpha(inputs.log_beta, pos, t)
        if self.key_norm_bonus:
            # A zero key gives log 0 = -inf: evicted first, never NaN (log α is finite).
            raw = raw + torch.log(_key_norm(inputs.keys))
        return raw


@dataclass(frozen=True, kw_only=True)
class StreamingPolicy(EvictionPolicy):
    """StreamingLLM: attention sinks plus the most recent tokens. The raw score -(t - pos) is
    the negated age, so keeping the top M keeps the youngest entries across all requests."""

    name: ClassVar[str] = "streaming"

    def _raw_score(self, inputs: ScoreInputs) -> torch.Tensor:
        # Integer subtraction, one rounding: ages are exact in float32 up to 2^24.
        neg_age = (inputs.positions - inputs.seq_len).to(torch.float32)
        return neg_age[:, None].expand(inputs.num_entries, inputs.num_kv_heads)


# Odd 64-bit constants (splitmix64): multiplying by an odd number is a bijection mod 2^64, so
# different seeds give different generator seeds for the same input size.
_MIX_SEED = 0x9E3779B97F4A7C15
_MIX_N = 0xBF58476D1CE4E5B9
_MIX_H = 0x94D049BB133111EB
_U64 = (1 << 64) - 1


@dataclass(frozen=True, kw_only=True)
class RandomPolicy(EvictionPolicy):
    """Uniform random scores in [0, 1): the floor any informed policy must beat.

    Reproducible: the generator is seeded from `seed` and the input size (N, H), so the same
    inputs and seed give the same scores, and rounds of different sizes do not replay the same
    draws against the same leading entries."""

    name: ClassVar[str] = "random"

    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _is_int(self.seed):
            raise ValueError(f"policy {self.name!r}: seed must be an integer, got {self.seed!r}")

    def _raw_score(self, inputs: ScoreInputs) -> torch.Tensor:
        n, h = inputs.num_entries, inputs.num_kv_heads
        mixed = (self.seed * _MIX_SEED + n * _MIX_N + h * _MIX_H) & _U64
        device = inputs.positions.device
        gen = torch.Generator(device=device).manual_seed(mixed)
        return torch.rand((n, h), generator=gen, device=device, dtype=torch.float32)


@dataclass(frozen=True, kw_only=True)
class KnormPolicy(EvictionPolicy):
    """kvpress KnormPress: -||k||₂ over head_dim. Keys of low norm receive the most attention
    (Devoto et al., 2024), so they are kept."""

    name: ClassVar[str] = "knorm"
    needs_keys: ClassVar[bool] = True

    def _raw_score(self, inputs: ScoreInputs) -> torch.Tensor:
        return -_key_norm(inputs.keys)


@dataclass(frozen=True, kw_only=True)
class NoEvictionPolicy(EvictionPolicy):
    """Never evict (the full-cache reference): every entry +inf."""

    name: ClassVar[str] = "none"

    def _raw_score(self, inputs: ScoreInputs) -> torch.Tensor:
        return torch.full(
            (inputs.num_entries, inputs.num_kv_heads),
            math.inf,
            dtype=torch.float32,
            device=inputs.positions.device,
        )


def _key_norm(keys: torch.Tensor) -> torch.Tensor:
    # Accumulate in float32: bf16 keys would round the norm to 3 significant digits.
    return torch.linalg.vector_norm(keys, dim=-1, dtype=torch.float32)


POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls
    for cls in (RetentionPolicy, StreamingPolicy, RandomPolicy, KnormPolicy, NoEvictionPolicy)
}


def make_policy(name: str, **fields: Any) -> EvictionPolicy:
    """The policy registered as `name`, with the given fields (ValueError for an unknown name,
    an unknown field or an invalid value)."""
    try:
        cls = POLICIES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown eviction policy {name!r}; valid: {', '.join(POLICIES)}"
        ) from None
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(
            f"policy {name!r} has no field(s) {', '.join(unknown)}; its fields: {', '.join(known)}"
        )
    return cls(**fields)


def keep_mask(scores: torch.Tensor, budget: int, *, per_head: bool) -> torch.Tensor:
    """bool [N, H]: the entries kept under `budget`.

    per_head=True (TrimKV): the `budget` highest scores of each head column.
    per_head=False (DBTrimKV): the `budget` highest of all N*H entries, one budget over heads.
    +inf entries are always kept, even beyond the budget. Ties are broken by the lower index
    first (row-major flat index globally, row index per head), so the result is deterministic.
    A NaN score ranks lowest (torch would otherwise rank NaN above +inf).
    """
    if scores.ndim != 2 or not scores.is_floating_point():
        raise ValueError(
            f"scores must be a float tensor [N, H], got {scores.dtype} {tuple(scores.shape)}"
        )
    if not _is_int(budget) or budget < 0:
        raise ValueError(f"budget must be a non-negative integer, got {budget!r}")
    n, h = scores.shape
    # One column per budget: each head's column, or all entries flattened in row-major order.
    cols = scores if per_head else scores.reshape(-1, 1)
    cols = torch.nan_to_num(cols, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    rows = cols.shape[0]
    if budget >= rows:
        return torch.ones((n, h), dtype=torch.bool, device=scores.device)
    if budget == 0:
        keep = torch.isposinf(cols)
    else:
        # Threshold = the budget-th largest value of each column; everything above it is kept,
        # and of the entries equal to it, only as many as fit, lowest index first. Stays on
        # the device: no Python loop over entries and no value read back.
        thresh = torch.kthvalue(cols, rows - budget + 1, dim=0, keepdim=True).values
        above = cols > thresh
        at = cols == thresh
        room = budget - above.sum(dim=0, keepdim=True)
        keep = above | (at & (torch.cumsum(at, dim=0) <= room)) | torch.isposinf(cols)
    return keep.reshape(n, h)
