"""Evictor: enforce budgets on requests' live head-slots (METHOD.md, Inference).

Two modes (M = budget, B = buffer):

    per_head  TrimKV: a (layer, head) list that holds >= M + B live entries of the request keeps
              its top M by score; the other lists are left alone.
    global    DBTrimKV: one budget L*H*M shared by all layers and heads of the request; when its
              live head-slots exceed L*H*(M + B), the global top L*H*M are kept (per-head lengths
              then differ). `min_per_head` = f keeps at least min(f, live count) entries in every
              (layer, head): each list's top-f entries are scored +inf before the selection.

Scores come from `config.policy` (higher = keep, +inf = always kept). `keep_lists` selects for
many requests at once from their (layer, head) lists laid out [R, L*H, W] (as the live lists
hold them): no Python loop over requests, lists or entries, and no host read. Ties go to the
lower (position, layer, head), the order of a request's flat (token, layer, head) index: score
and tie form one exact int64 key, so one k-th value per request decides its set (`keep_top`, no
sort). Invalid entries score -inf and are never kept; a live entry's -inf / NaN score becomes the
lowest finite float32, so any live entry outranks every invalid one.

`enforce` applies the same selection to one request read from the virtual map (tests and tools);
selector "triton" there uses the radix select `kernels.select.select_keep` (global mode only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from sglang_evict.cache.head_slots import EVICTED, HeadSlotPool
from sglang_evict.eviction.policies import EvictionPolicy, ScoreInputs

__all__ = ["EvictorConfig", "EvictionResult", "Evictor", "MODES", "SELECTORS", "keep_top"]

MODES = ("global", "per_head")
SELECTORS = ("torch", "triton")

_LOWEST = torch.finfo(torch.float32).min


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class EvictorConfig:
    """budget     M >= 1: entries kept per (layer, head) (per_head) or per-head share (global)
    buffer        B >= 0: extra entries tolerated before eviction triggers
    mode          "global" (DBTrimKV) or "per_head" (TrimKV)
    min_per_head  floor >= 0 of entries kept per (layer, head); global mode only, <= budget
    selector      "torch" (policies.keep_mask) or "triton" (kernels.select; global mode only)
    policy        the EvictionPolicy that scores entries
    """

    budget: int
    policy: EvictionPolicy
    buffer: int = 128
    mode: str = "global"
    min_per_head: int = 0
    selector: str = "torch"

    def __post_init__(self) -> None:
        if not _is_int(self.budget) or self.budget < 1:
            raise ValueError(f"EvictorConfig.budget must be an integer >= 1, got {self.budget!r}")
        if not _is_int(self.buffer) or self.buffer < 0:
            raise ValueError(f"EvictorConfig.buffer must be an integer >= 0, got {self.buffer!r}")
        if self.mode not in MODES:
            raise ValueError(
                f"EvictorConfig.mode must be one of {', '.join(MODES)}, got {self.mode!r}"
            )
        if self.selector not in SELECTORS:
            raise ValueError(
                f"EvictorConfig.selector must be one of {', '.join(SELECTORS)}, "
                f"got {self.selector!r}"
            )
        if not isinstance(self.policy, EvictionPolicy):
            raise ValueError(
                "EvictorConfig.policy must be an EvictionPolicy instance (see "
                f"policies.make_policy), got {type(self.policy).__name__}"
            )
        f = self.min_per_head
        if not _is_int(f) or f < 0:
            raise ValueError(f"EvictorConfig.min_per_head must be an integer >= 0, got {f!r}")
        if self.mode == "per_head" and f:
            raise ValueError(
                f"EvictorConfig.min_per_head={f} applies to mode 'global' only; mode 'per_head' "
                "already keeps budget entries in every (layer, head)"
            )
        if f > self.budget:
            raise ValueError(
                f"EvictorConfig.min_per_head={f} exceeds budget={self.budget}: the floor cannot "
                "be above the per-head share of the global budget"
            )
        if self.selector == "triton" and self.mode != "global":
            raise ValueError(
                f"EvictorConfig.selector 'triton' supports mode 'global' only, got mode "
                f"{self.mode!r}; use selector 'torch'"
            )


class EvictionResult(NamedTuple):
    evicted: int
    live_before: int
    live_after: int


class Evictor:
    """Enforces `config` on one request's live head-slots in a HeadSlotPool."""

    def __init__(self, config: EvictorConfig, num_layers: int, num_kv_heads: int):
        if not isinstance(config, EvictorConfig):
            raise ValueError(f"config must be an EvictorConfig, got {type(config).__name__}")
        for name, v in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads)):
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.config = config
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads

    # ------------------------------------------------------------------ thresholds
    @property
    def global_budget(self) -> int:
        """L*H*M: live head-slots kept after a global eviction."""
        return self.num_layers * self.num_kv_heads * self.config.budget

    @property
    def global_trigger(self) -> int:
        """L*H*(M+B): global eviction happens when live head-slots exceed this."""
        return self.num_layers * self.num_kv_heads * (self.config.budget + self.config.buffer)

    # ------------------------------------------------------------------ trigger
    def triggered(self, live: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
        """bool [R] (host): which requests must evict now, from their live head-slots and
        their longest (layer, head) list (host int64 [R] each; no device read)."""
        if self.config.mode == "global":
            return live > self.global_trigger
        return span >= self.config.budget + self.config.buffer

    # ------------------------------------------------------------------ batched selection
    def keep_lists(
        self,
        entries: torch.Tensor,
        valid: torch.Tensor,
        positions: torch.Tensor,
        seq_len: torch.Tensor,
        log_beta_slots: torch.Tensor | None,
        k_slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """bool [R, LH, W]: the entries R requests keep, all selected together.

        entries   int64 [R, LH, W]  head-slots of each request's (layer, head) lists (any order
                                    inside a list; -1 / anything where not valid)
        valid     bool  [R, LH, W]
        positions int64 [R, LH, W]  each entry's position
        seq_len   int64 [R]         each request's length t (score_lists also takes [R, LH, W])
        Global mode keeps each request's top L*H*M (the floor first); per-head mode keeps the top
        M of every list holding >= M + B and leaves the others whole. Ties go to the lower
        (position, layer, head): the order of the request's flat (token, layer, head) index.
        Device ops only: no host read, no loop over requests or lists."""
        cfg = self.config
        R, LH, W = entries.shape
        scores = self.score_lists(entries, valid, positions, seq_len, log_beta_slots, k_slots)
        if cfg.mode == "global":
            if cfg.min_per_head:
                floor = keep_top(scores.view(R * LH, W), cfg.min_per_head, positions.view(R * LH, W))
                scores = scores.masked_fill(floor.view(R, LH, W) & valid, math.inf)
            lh = torch.arange(LH, device=entries.device)[None, :, None]
            tie = positions * LH + lh
            keep = keep_top(scores.view(R, LH * W), self.global_budget, tie.view(R, LH * W))
            return keep.view(R, LH, W) & valid
        top = keep_top(scores.view(R * LH, W), cfg.budget, positions.view(R * LH, W))
        full = valid.sum(2) >= cfg.budget + cfg.buffer  # [R, LH]
        return torch.where(full[:, :, None], top.view(R, LH, W), valid) & valid

    def score_lists(
        self,
        entries: torch.Tensor,
        valid: torch.Tensor,
        positions: torch.Tensor,
        seq_len: torch.Tensor,
        log_beta_slots: torch.Tensor | None,
        k_slots: torch.Tensor | None,
    ) -> torch.Tensor:
        """float32 [R, LH, W] policy scores; not valid -inf, a valid entry never below the
        lowest finite float32 (so it outranks every invalid one)."""
        policy = self.config.policy
        R, LH, W = entries.shape
        n = R * LH * W
        dev = entries.device
        safe = entries.clamp(min=0).reshape(n)
        t = seq_len.to(dev, torch.long)
        # a length per request, or one per entry (tree entries: their youngest holder's length)
        t = (t[:, None, None].expand(R, LH, W) if t.dim() == 1 else t.expand(R, LH, W)).reshape(n)
        log_beta = None
        if log_beta_slots is not None:
            log_beta = log_beta_slots.to(dev)[safe].float()[:, None]
        keys = None
        if k_slots is not None and policy.needs_keys:
            keys = k_slots.to(dev)[safe][:, None, :]
        raw = policy.score(ScoreInputs(positions.reshape(n).long(), t, 1, log_beta, keys))
        raw = torch.nan_to_num(raw, nan=_LOWEST, posinf=math.inf, neginf=_LOWEST)
        return raw.view(R, LH, W).masked_fill(~valid, -math.inf)

    # ------------------------------------------------------------------ one request on the map
    def enforce(
        self,
        pool: HeadSlotPool,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        seq_len: int,
        log_beta_slots: torch.Tensor | None,
        k_slots: torch.Tensor | None = None,
    ) -> EvictionResult:
        """Evict one request's lowest-scored live head-slots, read from the virtual map, if its
        budget trigger holds (the same selection as `keep_lists`).

        tokens     int64 [n]  the request's virtual ids in token order
        positions  int64 [n]  their positions in the sequence (< seq_len)
        """
        cfg = self.config
        L, H = self.num_layers, self.num_kv_heads
        if pool.num_layers != L or pool.num_kv_heads != H:
            raise ValueError(
                f"pool has {pool.num_layers} layers x {pool.num_kv_heads} KV heads, evictor "
                f"was built for {L} x {H}"
            )
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 1 or tokens.is_floating_point():
            raise ValueError("tokens must be a 1-D integer tensor")
        if (
            not isinstance(positions, torch.Tensor)
            or positions.shape != tokens.shape
            or positions.is_floating_point()
        ):
            raise ValueError(
                f"positions must be an integer tensor of shape {tuple(tokens.shape)} (as tokens)"
            )
        if not _is_int(seq_len) or seq_len < 0:
            raise ValueError(f"seq_len must be a non-negative integer, got {seq_len!r}")

        dev = pool.device
        tokens = tokens.to(device=dev, dtype=torch.long)
        n = tokens.numel()
        if n == 0:
            return EvictionResult(0, 0, 0)
        LH = L * H
        slots = pool.slot_map[tokens].view(n, LH).long()
        live = slots != EVICTED
        counts = live.sum(0)
        live_before = int(counts.sum())
        if not bool(self.triggered(torch.tensor([live_before]), counts.max().view(1).cpu())[0]):
            return EvictionResult(0, live_before, live_before)
        entries = slots.t()[None]  # [1, LH, n]: each (layer, head) list in token order
        valid = live.t()[None]
        pos = positions.to(dev, torch.long)[None, None, :].expand(1, LH, n)
        t = torch.tensor([seq_len], device=dev)
        if cfg.selector == "triton":
            from sglang_evict.kernels.select import select_keep

            scores = self.score_lists(entries, valid, pos, t, log_beta_slots, k_slots)
            if cfg.min_per_head:
                floor = keep_top(scores[0], cfg.min_per_head, pos[0])
                scores = scores.masked_fill(floor[None] & valid, math.inf)
            # token-major flat order: select_keep's lowest-index ties are (position, layer, head)
            flat = scores[0].t().contiguous().view(-1)
            keep = select_keep(flat, self.global_budget).view(n, LH).t()[None] & valid
        else:
            keep = self.keep_lists(entries, valid, pos, t, log_beta_slots, k_slots)
        drop = valid & ~keep
        lh = torch.arange(LH, device=dev)[None, :, None].expand_as(drop)
        evicted = pool.evict_slots(entries[drop], lh[drop])
        return EvictionResult(evicted, live_before, live_before - evicted)


def _order_key(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys that order like the float32 scores (-0.0 as +0.0, -inf lowest)."""
    bits = (scores.float() + 0.0).view(torch.int32).long()
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


def keep_top(scores: torch.Tensor, budget: int, tie: torch.Tensor) -> torch.Tensor:
    """bool [S, N]: the `budget` highest scores of each row, plus every +inf.

    Ties go to the lower `tie` (int64 [S, N], distinct within a row, in [0, 2**31)): score and
    tie form one exact int64 key, so one k-th value per row decides the set, with no sort and
    no host read."""
    S, N = scores.shape
    if budget >= N:
        return torch.ones((S, N), dtype=torch.bool, device=scores.device)
    inf = torch.isposinf(scores)
    if budget == 0 or N == 0:
        return inf
    key = (_order_key(scores) << 32) - tie.long()
    kth = torch.kthvalue(key, N - budget + 1, dim=1, keepdim=True).values
    return (key >= kth) | inf
