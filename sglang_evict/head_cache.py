"""Head-granular KV for one served model: the physical store behind the sglang_evict backend.

SGLang keeps its virtual side (token ids from its allocator, req_to_token, positions); this cache
holds the physical side:

    pool        HeadSlotPool: (virtual id, layer, KV head) -> head-slot or EVICTED
    k, v        [capacity, head_dim]  one token's K / V of one layer and one KV head per row
    log_beta    [capacity] float32    the retention gate's output stored with the entry
    pos         [capacity] int64      the entry's position (never changes: no re-rotation)

One forward step:
  1. `prepare(batch)`: give the step's new tokens head-slots in every layer and head (reclaiming
     across all requests first if the pool is short), then build each layer's per-(request, KV
     head) live lists in the FlashInfer ragged layout, once for all layers.
  2. each layer: `store(layer, k, v, log_beta, positions)` then attention over `lists[layer]`.
  3. `after_forward(batch)`: the evictor enforces each request's budget; statistics per request.

Requests are tracked by their req_to_token row. The row's statistics are handed over when SGLang
releases the row (`release`); head-slots return to the free list when SGLang frees the virtual ids
(`free`), so every path that frees KV in SGLang (finish, abort, retraction, flush) frees
head-slots too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from sglang_evict.evictor import Evictor
from sglang_evict.head_slots import EVICTED, HeadSlotPool, HeadSlotPoolFull
from sglang_evict.policies import keep_mask

logger = logging.getLogger(__name__)

# head-slot bytes beside K and V: log beta (float32) and position (int64)
SLOT_META_BYTES = 4 + 8
# slot_map bytes per (virtual token, layer, head)
MAP_BYTES = 4


def bytes_per_token(num_layers: int, num_kv_heads: int, oversubscribe: int) -> int:
    """Bytes added to SGLang's per-token KV cost (K and V are counted by SGLang already): the
    head-slot metadata of one token's L*H head-slots, and the map entries of the
    `oversubscribe` virtual ids each token of physical memory backs."""
    return num_layers * num_kv_heads * (SLOT_META_BYTES + MAP_BYTES * oversubscribe)


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


class StepLists:
    """Per-layer live lists of one forward step: layer l's sequence r*H + h is (request r of
    the batch, KV head h); indices are head-slots in token order."""

    def __init__(self, indptr: torch.Tensor, indices: torch.Tensor, bounds: list[int], seqs: int):
        self._indptr = indptr  # [L * seqs + 1] cumulative over all layers
        self._indices = indices
        self._bounds = bounds
        self._seqs = seqs

    def layer(self, l: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self._bounds[l], self._bounds[l + 1]
        ptr = self._indptr[l * self._seqs : (l + 1) * self._seqs + 1] - a
        return ptr.to(torch.int32), self._indices[a:b]


class HeadKVCache:
    def __init__(
        self,
        *,
        num_virtual: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        v_head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
        evictor: Evictor | None,
    ):
        self.device = torch.device(device)
        self.pool = HeadSlotPool(num_virtual, num_layers, num_kv_heads, capacity, self.device)
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.k = torch.zeros(capacity, head_dim, dtype=dtype, device=self.device)
        self.v = torch.zeros(capacity, v_head_dim, dtype=dtype, device=self.device)
        self.log_beta = torch.zeros(capacity, dtype=torch.float32, device=self.device)
        self.pos = torch.full((capacity,), -1, dtype=torch.int64, device=self.device)
        # Also scores entries for cross-request reclaim; without one (policy none) nothing may
        # be reclaimed.
        self.evictor = evictor
        self.rows: dict[int, RowStats] = {}
        # Per-request policy overrides (row -> its evictor, None = never evict this request).
        self.row_evictors: dict[int, Evictor | None] = {}
        self.new_slots: torch.Tensor | None = None  # [T, L, H] of the current step
        self.lists: StepLists | None = None
        self.q_req: torch.Tensor | None = None
        self.steps = 0
        self.reclaims = 0

    @property
    def capacity(self) -> int:
        return self.pool.capacity

    @property
    def nbytes(self) -> int:
        t = (self.k, self.v, self.log_beta, self.pos, self.pool.slot_map, self.pool.free_slots)
        return sum(x.numel() * x.element_size() for x in t)

    @property
    def heads_per_token(self) -> int:
        return self.num_layers * self.num_kv_heads

    # ------------------------------------------------------------------ one step
    def prepare(self, batch, req_to_token: torch.Tensor) -> None:
        """Allocate head-slots for the batch's new tokens and build the step's live lists."""
        new_ids = batch.out_cache_loc.to(self.device, torch.long)
        need = new_ids.numel() * self.heads_per_token
        if need > self.pool.num_free:
            self.reclaim(need - self.pool.num_free, req_to_token)
        try:
            self.new_slots = self.pool.alloc(new_ids)
        except HeadSlotPoolFull as e:
            raise HeadSlotPoolFull(e.requested, e.available) from RuntimeError(
                "every remaining head-slot is protected (sinks / recent window) or the step "
                "alone exceeds the pool; lower --chunked-prefill-size or --max-running-requests"
            )
        rows = batch.req_pool_indices.to(self.device, torch.long)
        lens = batch.seq_lens.to(self.device, torch.long)
        R = rows.numel()
        L, H = self.num_layers, self.num_kv_heads
        if batch.forward_mode.is_decode():
            self.q_req = None
        else:
            ext = batch.extend_seq_lens.to(self.device, torch.long)
            self.q_req = torch.repeat_interleave(torch.arange(R, device=self.device), ext)
        maxlen = int(lens.max()) if R else 0
        span = torch.arange(maxlen, device=self.device)
        valid = span[None, :] < lens[:, None]
        ids = req_to_token[rows][:, :maxlen].to(torch.long)[valid]  # [N], request-major
        req_of = torch.repeat_interleave(torch.arange(R, device=self.device), lens)
        slots = self.pool.slot_map[ids]  # [N, L, H]
        live = slots != EVICTED
        seq = (
            torch.arange(L, device=self.device)[None, :, None] * (R * H)
            + req_of[:, None, None] * H
            + torch.arange(H, device=self.device)[None, None, :]
        )
        key = seq.expand_as(slots)[live]
        order = torch.sort(key, stable=True).indices
        indices = slots[live][order]
        counts = torch.bincount(key, minlength=L * R * H)
        indptr = torch.zeros(L * R * H + 1, dtype=torch.long, device=self.device)
        indptr[1:] = counts.cumsum(0)
        bounds = indptr[:: R * H].tolist() if R else [0] * (L + 1)
        self.lists = StepLists(indptr, indices, bounds, R * H)

    def store(self, layer: int, k, v, log_beta, positions, store_fn) -> None:
        slot = self.new_slots[:, layer, :]
        n = slot.shape[0]
        store_fn(self.k, self.v, self.log_beta, self.pos, k[:n], v[:n], log_beta[:n], positions[:n], slot)

    def after_forward(self, batch, req_to_token: torch.Tensor) -> None:
        """Enforce every request's budget; update its statistics."""
        self.steps += 1
        rows = batch.req_pool_indices.tolist()
        lens = batch.seq_lens.tolist()
        fresh = [False] * len(rows)
        if not batch.forward_mode.is_decode() and batch.extend_prefix_lens is not None:
            fresh = [p == 0 for p in batch.extend_prefix_lens.tolist()]
        for row, n, new in zip(rows, lens, fresh):
            if new:  # the row's first chunk: a new request (or a retracted one starting over)
                self.rows[row] = RowStats()
            stats = self.rows.setdefault(row, RowStats())
            stats.seq_len = n
            tokens = req_to_token[row, :n].to(self.device, torch.long)
            evictor = self.row_evictors.get(row, self.evictor)
            if evictor is None:
                live = int((self.pool.slot_map[tokens] != EVICTED).sum())
                stats.live = live
                stats.peak_live = max(stats.peak_live, live)
                stats.peak_before_evict = max(stats.peak_before_evict, live)
                continue
            free_before = self.pool.num_free
            res = evictor.enforce(
                self.pool,
                tokens,
                torch.arange(n, device=self.device),
                n,
                self.log_beta,
                self.k,
            )
            stats.peak_before_evict = max(stats.peak_before_evict, res.live_before)
            stats.live = res.live_after
            stats.peak_live = max(stats.peak_live, res.live_after)
            if res.evicted:
                stats.evicted += res.evicted
                stats.evictions += 1
                stats.free_before_last_evict = free_before
                stats.free_after_last_evict = self.pool.num_free
        self.new_slots = None
        self.lists = None

    # ------------------------------------------------------------------ cross-request reclaim
    def reclaim(self, deficit: int, req_to_token: torch.Tensor) -> int:
        """Free at least `deficit` head-slots, lowest score first across every request that holds
        any (DBTrimKV's rule applied to the whole pool); protected entries are never taken.
        Returns the number freed (less than deficit only when too much is protected)."""
        if self.evictor is None or not self.rows:
            return 0
        rows = list(self.rows)
        lens = torch.tensor([self.rows[r].seq_len for r in rows], device=self.device)
        tokens = torch.cat(
            [req_to_token[r, :n].to(self.device, torch.long) for r, n in zip(rows, lens.tolist())]
        )
        owner = torch.repeat_interleave(torch.arange(len(rows), device=self.device), lens)
        starts = torch.cumsum(lens, 0) - lens
        positions = torch.arange(tokens.numel(), device=self.device) - starts[owner]
        L, H = self.num_layers, self.num_kv_heads
        slots = self.pool.slot_map[tokens]  # [n, L, H]
        live = slots != EVICTED
        n = tokens.numel()
        live2 = live.view(n * L, H)
        scores = self.evictor.score_entries(
            slots, live, positions, lens[owner], self.log_beta, self.k
        )
        evictable = int((live2 & torch.isfinite(scores)).sum())
        total_live = int(live2.sum())
        take = min(deficit, evictable)
        if take <= 0:
            return 0
        keep = keep_mask(scores.reshape(-1, 1), total_live - take, per_head=False)[:, 0]
        keep = keep.view(n, L, H) & live
        dropped = (live & ~keep).flatten(1).sum(1)
        freed = self.pool.evict_mask(tokens, keep)
        per_owner = torch.zeros(len(rows), dtype=torch.long, device=self.device)
        per_owner.index_add_(0, owner, dropped)
        for row, k in zip(rows, per_owner.tolist()):
            if k:
                st = self.rows[row]
                st.reclaimed += k
                st.evicted += k
                st.live -= k
        self.reclaims += 1
        logger.info("sglang-evict: reclaimed %d head-slots across %d requests", freed, len(rows))
        return freed

    def reclaimable(self) -> int:
        """Head-slots that `reclaim` could free now: live minus an upper bound on protected ones
        (sinks plus recent window of every request; a cheap bound, no scoring)."""
        if self.evictor is None:
            return 0
        pol = self.evictor.config.policy
        protected = 0
        for st in self.rows.values():
            protected += min(st.seq_len, pol.sinks + pol.window + 1)
        return max(0, self.pool.num_live - protected * self.heads_per_token)

    # ------------------------------------------------------------------ SGLang's side
    def free(self, virtual_ids: torch.Tensor) -> int:
        ids = virtual_ids.to(self.device, torch.long)
        ids = ids[(ids >= 0) & (ids < self.pool.num_virtual)]
        return self.pool.free(torch.unique(ids))

    def evictor_of(self, row: int) -> Evictor | None:
        return self.row_evictors.get(row, self.evictor)

    def release(self, row: int) -> tuple[RowStats | None, Evictor | None]:
        evictor = self.row_evictors.pop(row, self.evictor)
        return self.rows.pop(row, None), evictor

    def reset(self) -> None:
        """SGLang cleared its allocator (flush_cache): every head-slot is free again."""
        live = self.pool.slot_map != EVICTED
        if bool(live.any()):
            ids = live.flatten(1).any(1).nonzero()[:, 0]
            self.pool.free(ids)
        self.rows.clear()
        self.row_evictors.clear()
