"""Per-request evictor: enforce a budget on a request's live head-slots (METHOD.md, Inference).

Two modes (M = budget, B = buffer):

    per_head  TrimKV: a (layer, head) column that holds >= M + B live entries of the request keeps
              its top M by score; the other columns are left alone.
    global    DBTrimKV: one budget L*H*M shared by all layers and heads of the request; when its
              live head-slots exceed L*H*(M + B), the global top L*H*M are kept (per-head lengths
              then differ). `min_per_head` = f keeps at least min(f, live count) entries in every
              (layer, head): each column's top-f entries are scored +inf before the selection.

Scores come from `config.policy` (higher = keep, +inf = always kept). The request's entries are
scored as one [n*L, H] matrix, row = (token, layer) in token order, so the row-major flat index is
(token, layer, head); ties are broken by the lower flat index (global) or lower token (per head).
Entries that are not live score -inf and are never kept; a live entry's -inf / NaN score becomes
the lowest finite float32, so any live entry outranks every non-live one.

Selection: selector "torch" uses `policies.keep_mask`; "triton" uses the radix select
`kernels.select.select_keep` (global mode only). Everything is tensor ops over the request: no
Python loop over tokens or entries. The only host reads are the live counts that decide whether
the trigger holds and the counts returned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from sglang_evict.head_slots import EVICTED, HeadSlotPool
from sglang_evict.policies import EvictionPolicy, ScoreInputs, keep_mask

__all__ = ["EvictorConfig", "EvictionResult", "Evictor", "MODES", "SELECTORS"]

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

    # ------------------------------------------------------------------ main entry
    def enforce(
        self,
        pool: HeadSlotPool,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        seq_len: int,
        log_beta_slots: torch.Tensor | None,
        k_slots: torch.Tensor | None = None,
    ) -> EvictionResult:
        """Evict the request's lowest-scored live head-slots if its budget trigger holds.

        tokens     int64 [n]  the request's virtual ids in token order
        positions  int64 [n]  their positions in the sequence (< seq_len)
        seq_len    current sequence length t
        log_beta_slots float32 [capacity] (needed by the retention policy), k_slots
        [capacity, D] (needed by key-based policies).
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
        slots = pool.slot_map[tokens]  # [n, L, H] int32
        live = slots != EVICTED
        cols_live = live.view(n, L * H)
        col_count = cols_live.sum(0)  # [L*H]
        live_before = int(col_count.sum())

        if cfg.mode == "global":
            if live_before <= self.global_trigger:
                return EvictionResult(0, live_before, live_before)
        else:
            full = col_count >= cfg.budget + cfg.buffer
            if not bool(full.any()):
                return EvictionResult(0, live_before, live_before)

        scores = self.score_entries(
            slots, live, positions.to(dev), seq_len, log_beta_slots, k_slots
        )
        cols = scores.view(n, L * H)  # column = (layer, head), rows = tokens

        if cfg.mode == "global":
            if cfg.min_per_head:
                floor = keep_mask(cols, cfg.min_per_head, per_head=True) & cols_live
                cols = cols.masked_fill(floor, math.inf)
            flat = cols.reshape(-1)
            if cfg.selector == "triton":
                from sglang_evict.kernels.select import select_keep

                keep = select_keep(flat.contiguous(), self.global_budget)
            else:
                keep = keep_mask(flat.view(-1, 1), self.global_budget, per_head=False)[:, 0]
            keep = keep.view(n, L, H) & live
        else:
            top = keep_mask(cols, cfg.budget, per_head=True)
            keep = torch.where(full[None, :], top, torch.ones_like(top)) & cols_live
            keep = keep.view(n, L, H)

        evicted = pool.evict_mask(tokens, keep)
        return EvictionResult(evicted, live_before, live_before - evicted)

    # ------------------------------------------------------------------ scoring
    def score_entries(
        self,
        slots: torch.Tensor,
        live: torch.Tensor,
        positions: torch.Tensor,
        seq_len: int | torch.Tensor,
        log_beta_slots: torch.Tensor | None,
        k_slots: torch.Tensor | None,
    ) -> torch.Tensor:
        """float32 [n*L, H]: policy scores of n tokens' entries (slots/live [n, L, H]), non-live
        -inf, live never below the lowest finite. seq_len is the length of the one sequence
        they belong to, or int64 [n] per token when they come from several sequences."""
        policy = self.config.policy
        n = slots.shape[0]
        L, H = self.num_layers, self.num_kv_heads
        safe = slots.clamp(min=0).long().view(n * L, H)
        live2 = live.view(n * L, H)
        pos = positions.long().repeat_interleave(L)  # row = token * L + layer
        if isinstance(seq_len, torch.Tensor):
            t = seq_len.to(pos.device, torch.long).repeat_interleave(L)
        else:
            t = torch.full_like(pos, seq_len)
        log_beta = None
        if log_beta_slots is not None:
            log_beta = log_beta_slots.to(pos.device)[safe].float().masked_fill(~live2, 0.0)
        keys = None
        if k_slots is not None and policy.needs_keys:
            keys = k_slots.to(pos.device)[safe]  # [n*L, H, D]
        raw = policy.score(ScoreInputs(pos, t, H, log_beta, keys))
        raw = torch.nan_to_num(raw, nan=_LOWEST, posinf=math.inf, neginf=_LOWEST)
        return raw.masked_fill(~live2, -math.inf)
