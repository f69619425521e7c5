"""Eviction statistics per req_to_token row, as host columns updated for a whole batch at once."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RowStats:
    """Eviction statistics of the request holding one req_to_token row."""

    seq_len: int = 0
    live: int = 0
    peak_live: int = 0  # after eviction, over all steps: what the request really holds
    peak_before_evict: int = 0  # inside a step, before the evictor ran
    evicted: int = 0
    evictions: int = 0
    reclaimed: int = 0  # head-slots taken from this request to make room for another
    free_before_last_evict: int = -1
    free_after_last_evict: int = -1

    def as_meta(self, heads_per_token: int, budget_trigger: int | None) -> dict:
        full = self.seq_len * heads_per_token
        return {
            "live_head_slots": self.live,
            "evicted_head_slots": self.evicted,
            "peak_live_head_slots": self.peak_live,
            "peak_head_slots_before_eviction": self.peak_before_evict,
            "full_head_slots": full,
            "compression_ratio": (full / self.live) if self.live else None,
            "evictions": self.evictions,
            "reclaimed_head_slots": self.reclaimed,
            "budget_trigger_head_slots": budget_trigger,
            "pool_free_before_last_eviction": self.free_before_last_evict,
            "pool_free_after_last_eviction": self.free_after_last_evict,
        }


_STAT_FIELDS = tuple(f for f in RowStats.__dataclass_fields__)


def _fill(name: str) -> int:
    return -1 if name.startswith("free_") else 0


class RowStatsTable:
    """RowStats of every req_to_token row as host int64 columns (no Python loop over
    requests); `active` marks the rows a running request holds."""

    def __init__(self, num_rows: int):
        for name in _STAT_FIELDS:
            setattr(self, name, torch.full((num_rows,), _fill(name), dtype=torch.long))
        self.active = torch.zeros(num_rows, dtype=torch.bool)

    def start(self, rows: torch.Tensor) -> None:
        for name in _STAT_FIELDS:
            getattr(self, name)[rows] = _fill(name)
        self.active[rows] = True

    def clear(self) -> None:
        for name in _STAT_FIELDS:
            getattr(self, name).fill_(_fill(name))
        self.active.zero_()

    def row(self, r: int) -> RowStats:
        return RowStats(**{name: int(getattr(self, name)[r]) for name in _STAT_FIELDS})
