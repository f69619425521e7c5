"""The score store: one log β per (token slot, layer, KV head) and each slot's position,
living beside SGLang's KV pool with the same slot numbering.

Written once when a token's KV is written (by the same kernel) and never rewritten, so a radix
cache hit that reuses a slot's KV reuses its score too ("pinned beside the KV"). The layout per
layer is the store kernel's paged one: log_beta[layer] is [num_pages, page_size, num_kv_heads].
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# Sentinels of a slot that was never written: a position no token has, and a log β of 0
# (β = 1: never decays), so a stray read can neither fake an age nor evict anything.
UNWRITTEN_POS = -1


class ScoreStoreSize(NamedTuple):
    bytes: int
    kv_bytes: int

    @property
    def share_of_kv(self) -> float:
        return self.bytes / self.kv_bytes if self.kv_bytes else 0.0


def bytes_per_slot(num_layers: int, num_kv_heads: int) -> int:
    """Score memory per token slot: a float32 log β per (layer, head) and an int64 position."""
    return num_layers * num_kv_heads * 4 + 8


class ScoreStore:
    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        num_kv_heads: int,
        page_size: int,
        device: torch.device | str,
    ):
        if num_slots % page_size:
            raise ValueError(f"num_slots={num_slots} is not a multiple of page_size={page_size}")
        self.num_slots = num_slots
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.page_size = page_size
        pages = num_slots // page_size
        self.log_beta = torch.zeros(
            num_layers, pages, page_size, num_kv_heads, dtype=torch.float32, device=device
        )
        self.pos = torch.full((pages, page_size), UNWRITTEN_POS, dtype=torch.int64, device=device)

    @property
    def nbytes(self) -> int:
        return self.log_beta.numel() * 4 + self.pos.numel() * 8

    def log_beta_flat(self, layer: int) -> torch.Tensor:
        """[num_slots, num_kv_heads] view of one layer."""
        return self.log_beta[layer].view(self.num_slots, self.num_kv_heads)

    def read(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log_beta [L, n, H], positions [n]) of the given slot ids."""
        slots = slots.to(self.pos.device, torch.long)
        flat = self.log_beta.view(self.num_layers, self.num_slots, self.num_kv_heads)
        return flat[:, slots], self.pos.view(-1)[slots]
