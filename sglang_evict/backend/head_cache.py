"""Head-granular KV for one served model: the physical store behind the sglang_evict backend.

SGLang keeps its virtual side (token ids from its allocator, req_to_token, positions); this cache
holds the physical side:

    pool        HeadSlotPool: (virtual id, layer, KV head) -> head-slot or EVICTED
    k, v        [capacity, head_dim]  one token's K / V of one layer and one KV head per row
    log_beta    [capacity] float32    the retention gate's output stored with the entry
    pos         [capacity] int64      the entry's position (never changes: no re-rotation)

    lists       LiveLists: per (request row, layer, KV head) the live head-slots in position
                order, the source of truth between steps

One forward step:
  1. `prepare(batch)`: give the step's new tokens head-slots in every layer and head (reclaiming
     across all requests first if the pool is short), append them to their lists, and write the
     step's per-(request, KV head) metadata in the FlashInfer ragged layout from the lists, once
     for all layers. Its cost follows the batch's live entries, never the evicted ones.
  2. each layer: `store(layer, k, v, log_beta, positions)` then attention over `lists[layer]`.
  3. `after_forward(batch)`: the requests over their trigger are selected together in one
     batched pass and their lists compacted; statistics per request, as host tensors.

Requests are tracked by their req_to_token row. The row's statistics are handed over when SGLang
releases the row (`release`); head-slots return to the free list when SGLang frees the virtual ids
(`free`), so every path that frees KV in SGLang (finish, abort, retraction, flush) frees
head-slots too. The host keeps exact mirrors of what it decides (live counts, list spans), so a
step reads nothing back from the device except when an eviction compacts lists.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from sglang_evict.eviction.evictor import Evictor, keep_top
from sglang_evict.cache.head_slots import EVICTED, HeadSlotPool, HeadSlotPoolFull
from sglang_evict.kernels.live_indices import live_indices, live_indices_reference, step_indptr
from sglang_evict.kernels.select import select_keep
from sglang_evict.cache.live_lists import NO_OWNER, LiveLists

logger = logging.getLogger(__name__)

# head-slot bytes beside K and V: log beta (float32), position (int64), its virtual id and its
# holder (int32 each)
SLOT_META_BYTES = 4 + 8 + 4 + 4
# per (virtual token, layer, head): the slot_map entry and the live-list arena entry (int32 each)
MAP_BYTES = 4 + 4


def bytes_per_token(num_layers: int, num_kv_heads: int, oversubscribe: int) -> int:
    """Bytes added to SGLang's per-token KV cost (K and V are counted by SGLang already): the
    head-slot metadata of one token's L*H head-slots, and the map and list entries of the
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
    the batch, KV head h); indices are head-slots in position order. One indptr over all layers
    with absolute offsets into one indices buffer, so a layer's lists are two views (no host
    read; the same addresses every step when the buffers are static, as CUDA graphs need).

    `indptr_host` (the same indptr on the host, from the lists' host mirror) and `q_lens` (host:
    query tokens per request) are kept for kernels planned on the host (FlashInfer)."""

    def __init__(self, indptr: torch.Tensor, indices: torch.Tensor, seqs: int,
                 indptr_host: torch.Tensor | None = None, q_lens: torch.Tensor | None = None):
        self._indptr = indptr  # [L * seqs + 1] cumulative over all layers
        self._indices = indices
        self._seqs = seqs
        self.indptr_host = indptr_host
        self.q_lens = q_lens

    @property
    def indices(self) -> torch.Tensor:
        return self._indices

    def layer(self, l: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._indptr[l * self._seqs : (l + 1) * self._seqs + 1], self._indices


class GraphBuffers:
    """Static step metadata for CUDA graph replay of decode, sized at capture for `max_bs`
    requests: the step's new head-slots (-1 for a padded request: nothing is stored), the
    all-layer indptr and the indices (at most every head-slot of the pool)."""

    def __init__(self, max_bs: int, num_layers: int, num_kv_heads: int, capacity: int, device):
        self.max_bs = max_bs
        self.new_slots = torch.full((max_bs, num_layers, num_kv_heads), -1, dtype=torch.long,
                                    device=device)
        self.indptr = torch.zeros(num_layers * max_bs * num_kv_heads + 1, dtype=torch.long,
                                  device=device)
        self.indices = torch.full((capacity,), -1, dtype=torch.int32, device=device)


_STAT_FIELDS = tuple(f for f in RowStats.__dataclass_fields__)


class RowStatsTable:
    """RowStats of every req_to_token row as host int64 columns, updated for a whole batch at
    once (no Python loop over requests)."""

    def __init__(self, num_rows: int):
        for name in _STAT_FIELDS:
            fill = -1 if name.startswith("free_") else 0
            setattr(self, name, torch.full((num_rows,), fill, dtype=torch.long))
        self.active = torch.zeros(num_rows, dtype=torch.bool)

    def start(self, rows: torch.Tensor) -> None:
        for name in _STAT_FIELDS:
            getattr(self, name)[rows] = -1 if name.startswith("free_") else 0
        self.active[rows] = True

    def row(self, r: int) -> RowStats:
        return RowStats(**{name: int(getattr(self, name)[r]) for name in _STAT_FIELDS})


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
        num_rows: int = 64,
        max_row_len: int | None = None,
        page_size: int = 16,
        debug_check: bool = False,
        use_triton: bool = False,
    ):
        self.device = torch.device(device)
        self.pool = HeadSlotPool(num_virtual, num_layers, num_kv_heads, capacity, self.device)
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.k = torch.zeros(capacity, head_dim, dtype=dtype, device=self.device)
        self.v = torch.zeros(capacity, v_head_dim, dtype=dtype, device=self.device)
        self.log_beta = torch.zeros(capacity, dtype=torch.float32, device=self.device)
        self.pos = torch.full((capacity,), -1, dtype=torch.int64, device=self.device)
        self.lists = LiveLists(
            num_rows=num_rows,
            max_row_len=max_row_len or num_virtual,
            heads_per_token=num_layers * num_kv_heads,
            capacity=capacity,
            num_pages=LiveLists.pages_for(num_virtual, num_rows, page_size),
            page_size=page_size,
            device=self.device,
        )
        # Also scores entries for cross-request reclaim; without one (policy none) nothing may
        # be reclaimed.
        self.evictor = evictor
        self.stats = RowStatsTable(num_rows)
        # Per-request evictors: row -> index into `evictors`; -1 = never evict this request.
        self.evictors: list[Evictor] = []
        self.row_evictor = torch.full((num_rows,), self._evictor_index(evictor), dtype=torch.long)
        self.new_slots: torch.Tensor | None = None  # [T, L, H] of the current step
        self.step: StepLists | None = None
        self.graph: GraphBuffers | None = None  # set when SGLang captures CUDA graphs
        self._batch_rows: torch.Tensor | None = None  # the step's requests' rows (host)
        self._batch_rows_dev: torch.Tensor | None = None
        self.q_req: torch.Tensor | None = None
        self.debug_check = debug_check
        # Also keep each step's indptr on the host (set by a backend that plans there).
        self.host_metadata = False
        self._q_lens: torch.Tensor | None = None
        # The step's metadata kernel: Triton where it compiles for real, its torch twin on CPU.
        self._live_indices = live_indices if use_triton else live_indices_reference
        # Reclaim ranks every live head-slot of the pool as one row: the Triton radix select
        # spreads that over many programs (a k-th value runs one block per row).
        self._select_keep = select_keep if use_triton else None
        self.steps = 0
        self.reclaims = 0

    @property
    def capacity(self) -> int:
        return self.pool.capacity

    @property
    def nbytes(self) -> int:
        t = (self.k, self.v, self.log_beta, self.pos, self.pool.slot_map, self.pool.free_slots,
             self.pool.slot_vid)
        return sum(x.numel() * x.element_size() for x in t) + self.lists.nbytes

    @property
    def heads_per_token(self) -> int:
        return self.num_layers * self.num_kv_heads

    # ------------------------------------------------------------------ per-request policy
    def _evictor_index(self, evictor: Evictor | None) -> int:
        if evictor is None:
            return -1
        for i, e in enumerate(self.evictors):
            if e is evictor:
                return i
        self.evictors.append(evictor)
        return len(self.evictors) - 1

    def set_row_evictor(self, row: int, evictor: Evictor | None) -> None:
        self.row_evictor[row] = self._evictor_index(evictor)

    def evictor_of(self, row: int) -> Evictor | None:
        i = int(self.row_evictor[row])
        return self.evictors[i] if i >= 0 else None

    # ------------------------------------------------------------------ one step
    def prepare(self, batch, req_to_token: torch.Tensor | None = None) -> None:
        """Allocate head-slots for the batch's new tokens, append them to their lists and build
        the step's metadata from the lists."""
        self._prepare(batch, _host(batch, "req_pool_indices"), _host(batch, "seq_lens"),
                      batch.out_cache_loc)
        rows = self._batch_rows
        # The host mirror of the list lengths gives the exact size: no device read.
        total = int(self.lists.lens_host[rows].sum())
        indptr, indices = self._live_indices(
            self.lists.arena, self.lists.row_pages, self.lists.lens, self._batch_rows_dev,
            self.num_layers, max_entries=total,
        )
        host = (step_indptr(self.lists.lens_host, rows, self.num_layers)
                if self.host_metadata else None)
        self.step = StepLists(indptr, indices, rows.numel() * self.num_kv_heads, host,
                              self._q_lens)

    # ------------------------------------------------------------------ CUDA graphs (decode)
    def init_graph(self, max_bs: int) -> None:
        """Static metadata buffers for decode graphs of up to `max_bs` requests."""
        self.graph = GraphBuffers(max_bs, self.num_layers, self.num_kv_heads, self.capacity,
                                  self.device)

    def prepare_capture(self, bs: int) -> None:
        """Metadata for capturing a decode graph of `bs` requests: the static buffers as an
        empty step (nothing stored, nothing attended); no request's state is touched."""
        g = self._graph_for(bs)
        g.new_slots[:bs].fill_(-1)
        g.indptr.zero_()
        self.new_slots = g.new_slots[:bs]
        self.step = StepLists(g.indptr, g.indices, bs * self.num_kv_heads)

    def prepare_replay(self, batch, bs: int, num_padding: int) -> None:
        """`prepare` for replaying a decode graph captured for `bs` requests, of which the last
        `num_padding` are padding: the real requests' step is written into the static buffers,
        the padding's new head-slots are -1 and its lists empty."""
        g = self._graph_for(bs)
        raw = bs - num_padding
        rows = _host(batch, "req_pool_indices")[:raw]
        self._prepare(batch, rows, _host(batch, "seq_lens")[:raw], batch.out_cache_loc[:raw])
        g.new_slots[:raw].copy_(self.new_slots)
        g.new_slots[raw:bs].fill_(-1)
        self.new_slots = g.new_slots[:bs]
        padded = torch.full((bs,), -1, dtype=torch.long, device=self.device)
        padded[:raw] = self._batch_rows_dev
        indptr, indices = self._live_indices(
            self.lists.arena, self.lists.row_pages, self.lists.lens, padded, self.num_layers,
            max_entries=self.capacity, out=(g.indptr, g.indices),
        )
        self.step = StepLists(g.indptr, g.indices, bs * self.num_kv_heads)

    def _graph_for(self, bs: int) -> GraphBuffers:
        if self.graph is None or bs > self.graph.max_bs:
            raise RuntimeError(
                f"sglang-evict: a decode graph of {bs} requests needs init_graph(max_bs >= {bs})"
            )
        return self.graph

    def _prepare(self, batch, rows: torch.Tensor, seq: torch.Tensor, out_cache_loc) -> None:
        """The step's bookkeeping: head-slots for the new tokens (reclaiming first if the pool
        is short), appended to their lists; host statistics."""
        new_ids = out_cache_loc.to(self.device, torch.long)
        need = new_ids.numel() * self.heads_per_token
        if need > self.pool.num_free:
            self.reclaim(need - self.pool.num_free)
        try:
            self.new_slots = self.pool.alloc(new_ids)
        except HeadSlotPoolFull as e:
            raise HeadSlotPoolFull(e.requested, e.available) from RuntimeError(
                "every remaining head-slot is protected (sinks / recent window) or the step "
                "alone exceeds the pool; lower --chunked-prefill-size or --max-running-requests"
            )
        R = rows.numel()
        if batch.forward_mode.is_decode():
            counts = torch.ones(R, dtype=torch.long)
            self.q_req = None
        else:
            counts = _host(batch, "extend_seq_lens")
            self.q_req = torch.repeat_interleave(
                torch.arange(R, device=self.device), counts.to(self.device),
                output_size=new_ids.numel(),
            )
            fresh = rows[_host(batch, "extend_prefix_lens") == 0]
            if fresh.numel():  # a row's first chunk: a new request (or a retracted one anew)
                self._forget(fresh)
                self.stats.start(fresh)
        self.lists.append(rows, counts, self.new_slots.view(-1, self.heads_per_token))
        st = self.stats
        st.active[rows] = True
        st.seq_len[rows] = seq
        st.live[rows] += counts * self.heads_per_token
        st.peak_before_evict[rows] = torch.maximum(st.peak_before_evict[rows], st.live[rows])
        self._batch_rows = rows
        self._batch_rows_dev = rows.to(self.device)
        self._q_lens = counts

    def store(self, layer: int, k, v, log_beta, positions, store_fn) -> None:
        slot = self.new_slots[:, layer, :]
        n = slot.shape[0]
        store_fn(self.k, self.v, self.log_beta, self.pos, k[:n], v[:n], log_beta[:n], positions[:n], slot)

    def after_forward(self, batch, req_to_token: torch.Tensor | None = None) -> None:
        """Enforce the budgets of the batch's requests over their trigger, all together."""
        self.steps += 1
        rows = self._batch_rows  # the step's real requests (a graph's padding excluded)
        st = self.stats
        ev_ids = self.row_evictor[rows]
        for i in torch.unique(ev_ids[ev_ids >= 0]).tolist():  # one pass per distinct policy
            evictor = self.evictors[i]
            mine = rows[ev_ids == i]
            due = mine[evictor.triggered(st.live[mine], self.lists.span[mine])]
            if due.numel():
                self._evict_rows(due, evictor)
        st.peak_live[rows] = torch.maximum(st.peak_live[rows], st.live[rows])
        if self.debug_check:
            self.check_integrity(req_to_token)
        self.new_slots = None
        self.step = None
        self._batch_rows = self._batch_rows_dev = None

    def _evict_rows(self, rows: torch.Tensor, evictor: Evictor) -> None:
        entries, valid = self.lists.gather(rows)
        pos = self.pos[entries.clamp(min=0)]
        seq = self.stats.seq_len[rows].to(self.device)
        keep = evictor.keep_lists(entries, valid, pos, seq, self.log_beta, self.k)
        free_before = self.pool.num_free
        dropped = self._drop(rows, entries, valid, keep)
        st = self.stats
        hit = dropped > 0
        r = rows[hit]
        st.live[rows] -= dropped
        st.evicted[r] += dropped[hit]
        st.evictions[r] += 1
        st.free_before_last_evict[r] = free_before
        st.free_after_last_evict[r] = self.pool.num_free

    def _drop(self, rows, entries, valid, keep) -> torch.Tensor:
        """Free what `keep` drops from the gathered lists of `rows`, compact the lists; returns
        host int64 [R]: head-slots freed per row."""
        drop = valid & ~keep
        lh = torch.arange(entries.shape[1], device=self.device)[None, :, None].expand_as(drop)
        slots = entries[drop]
        self.lists.owner[slots] = NO_OWNER
        self.pool.evict_slots(slots, lh[drop])
        self.lists.compact(rows, keep, entries)
        return drop.sum(dim=(1, 2)).cpu()

    # ------------------------------------------------------------------ cross-request reclaim
    def reclaim(self, deficit: int, req_to_token: torch.Tensor | None = None) -> int:
        """Free at least `deficit` head-slots, lowest score first across every request that holds
        any and allows eviction (each scored by its own policy; a request with policy none is
        never reclaimed from); protected entries are never taken. Returns the number freed (less
        than deficit only when too much is protected)."""
        rows = self._reclaimable_rows()
        if rows.numel() == 0:
            return 0
        entries, valid = self.lists.gather(rows)
        R, LH, W = entries.shape
        scores = torch.full((R, LH, W), -math.inf, device=self.device)
        ev_ids = self.row_evictor[rows]
        pos = self.pos[entries.clamp(min=0)]
        seq = self.stats.seq_len[rows].to(self.device)
        for i in torch.unique(ev_ids).tolist():
            sel = (ev_ids == i).to(self.device)
            scores[sel] = self.evictors[i].score_lists(
                entries[sel], valid[sel], pos[sel], seq[sel], self.log_beta, self.k
            )
        live = int(valid.sum())
        evictable = int((valid & torch.isfinite(scores)).sum())
        take = min(deficit, evictable)
        if take <= 0:
            return 0
        # one ranking over the whole pool; ties to the lower (row, layer, head, list index)
        if self._select_keep is not None:
            keep = self._select_keep(scores.view(-1), live - take)
        else:
            tie = torch.arange(R * LH * W, device=self.device).view(1, -1)
            keep = keep_top(scores.view(1, -1), live - take, tie)
        keep = keep.view(R, LH, W) & valid
        dropped = self._drop(rows, entries, valid, keep)
        st = self.stats
        st.reclaimed[rows] += dropped
        st.evicted[rows] += dropped
        st.live[rows] -= dropped
        freed = int(dropped.sum())
        self.reclaims += 1
        logger.info("sglang-evict: reclaimed %d head-slots across %d requests", freed, R)
        return freed

    def _reclaimable_rows(self) -> torch.Tensor:
        st = self.stats
        return (st.active & (st.live > 0) & (self.row_evictor >= 0)).nonzero()[:, 0]

    def reclaimable(self) -> int:
        """Head-slots that `reclaim` could free now: live minus an upper bound on protected ones
        (sinks plus recent window of every request; a cheap bound, no scoring)."""
        rows = self._reclaimable_rows()
        if rows.numel() == 0:
            return 0
        pols = [self.evictors[i].config.policy for i in range(len(self.evictors))]
        prot = torch.tensor([p.sinks + p.window + 1 for p in pols], dtype=torch.long)
        protected = torch.minimum(self.stats.seq_len[rows], prot[self.row_evictor[rows]])
        live = self.stats.live[rows]
        return int((live - protected * self.heads_per_token).clamp(min=0).sum())

    # ------------------------------------------------------------------ SGLang's side
    def free(self, virtual_ids: torch.Tensor) -> int:
        """SGLang freed these virtual ids: free their head-slots and take them out of their
        holders' lists (a whole request at a time, as SGLang releases a row, is the common
        case: its lists are simply dropped)."""
        ids = virtual_ids.to(self.device, torch.long)
        ids = torch.unique(ids[(ids >= 0) & (ids < self.pool.num_virtual)])
        slots = self.pool.slot_map[ids]
        slots = slots[slots != EVICTED].long()
        if slots.numel() == 0:
            return 0
        owners = self.lists.owner[slots]
        rows, per_row = torch.unique(owners[owners >= 0], return_counts=True)
        rows, per_row = rows.cpu().long(), per_row.cpu().long()
        self.lists.owner[slots] = NO_OWNER
        freed = self.pool.free(ids)
        whole = per_row == self.stats.live[rows]
        self.lists.drop(rows[whole])
        part = rows[~whole]
        if part.numel():
            entries, valid = self.lists.gather(part)
            keep = valid & (self.lists.owner[entries.clamp(min=0)] == part.to(self.device)[:, None, None])
            self.lists.compact(part, keep, entries)
        self.stats.live[rows] -= per_row
        return freed

    def _forget(self, rows: torch.Tensor) -> None:
        """Rows starting a new request hold nothing (SGLang freed their ids before reuse)."""
        self.lists.drop(rows)
        self.stats.live[rows] = 0

    def release(self, row: int) -> tuple[RowStats | None, Evictor | None]:
        evictor = self.evictor_of(row)
        self.row_evictor[row] = self._evictor_index(self.evictor)
        if not bool(self.stats.active[row]):
            return None, evictor
        stats = self.stats.row(row)
        self.stats.active[row] = False
        return stats, evictor

    def row_stats(self, row: int) -> RowStats:
        return self.stats.row(row)

    def reset(self) -> None:
        """SGLang cleared its allocator (flush_cache): every head-slot is free again."""
        live = self.pool.slot_map != EVICTED
        if bool(live.any()):
            ids = live.flatten(1).any(1).nonzero()[:, 0]
            self.pool.free(ids)
        self.lists.reset()
        self.stats = RowStatsTable(self.stats.active.numel())
        self.row_evictor.fill_(self._evictor_index(self.evictor))

    # ------------------------------------------------------------------ integrity
    def check_integrity(self, req_to_token: torch.Tensor | None = None) -> None:
        """The pool's and the lists' own checks, the host mirrors against the device, and, given
        req_to_token, each active row's lists against a recomputation from the virtual map."""
        self.pool.check_integrity()
        self.lists.check_integrity(self.pool.slot_map, self.pos)
        lens = self.lists.lens.sum(1).cpu().long()
        st = self.stats
        bad = st.active & (lens != st.live)
        if bool(bad.any()):
            r = int(bad.nonzero()[0, 0])
            raise RuntimeError(f"row {r}: host live count {int(st.live[r])} != listed {int(lens[r])}")
        if req_to_token is None:
            return
        for r in st.active.nonzero()[:, 0].tolist():  # debug only: a loop is fine here
            ids = req_to_token[r, : int(st.seq_len[r])].to(self.device, torch.long)
            n = int(self.pool.slot_map[ids].ne(EVICTED).sum())
            if n != int(lens[r]):
                raise RuntimeError(f"row {r}: lists hold {int(lens[r])}, virtual map {n}")
            entries, valid = self.lists.gather(torch.tensor([r]))
            for layer in range(self.num_layers):
                want = self.pool.live_indices([ids], layer).indices.long()
                H = self.num_kv_heads
                got = entries[0, layer * H : (layer + 1) * H][valid[0, layer * H : (layer + 1) * H]]
                if not torch.equal(got, want):
                    raise RuntimeError(f"row {r} layer {layer}: lists differ from the virtual map")


def _host(batch, name: str) -> torch.Tensor:
    """A batch field as a host int64 tensor, from SGLang's CPU copy when it has one."""
    cpu = getattr(batch, name + "_cpu", None)
    if cpu is None:
        cpu = getattr(batch, name)
    if isinstance(cpu, torch.Tensor):
        return cpu.to("cpu", torch.long)
    return torch.tensor(cpu, dtype=torch.long)
