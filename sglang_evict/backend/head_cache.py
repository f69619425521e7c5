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
(`free`), so every path that frees KV in SGLang (finish, abort, retraction, flush, the radix
tree's node eviction) frees head-slots too.

Radix cache: when the tree takes a request's tokens (`tree_insert`), their surviving head-slots
become shared (`tree_t` per virtual id; refcounts `holders` of the running requests that list
them); a request that matched a prefix loads it once (`load_rows`). A request's own evictor takes
its private entries and the shared ones it alone lists; the global evictor (`reclaim`) ranks the
tree's entries with the requests'.

The host keeps exact mirrors of what it decides (live counts, list lengths and spans), so a step
reads nothing back from the device except when an eviction compacts lists.
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
        self.row_evictor = torch.full((num_rows,), -1, dtype=torch.long)
        self.row_evictor.fill_(self._evictor_index(evictor))
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
        # host totals for the metrics: head-slots evicted, taken by the global evictor, and
        # prompt tokens that matched the radix cache
        self.evicted_total = self.reclaimed_total = self.prefix_hit_tokens = 0
        # Radix cache: per virtual id, the length t of the sequence the tree took it from (its
        # entries' age for the global evictor), -1 while the tree does not hold it; host counts
        # of the live head-slots the tree holds and of those among them that are protected.
        self.tree_t = torch.full((num_virtual,), -1, dtype=torch.long, device=self.device)
        self.tree_live = 0
        self.reported_unaccounted = 0  # the last balance the step logged (`unaccounted`)
        self.tree_protected = 0
        # Per head-slot, how many requests list it in their shared part (exact refcount), and
        # per (row, list) how many shared entries the row alone lists (host): those are the
        # row's to evict like its private ones, since no other request would lose them.
        self.holders = torch.zeros(capacity, dtype=torch.int32, device=self.device)
        self.alone_host = torch.zeros(num_rows, num_layers * num_kv_heads, dtype=torch.long)

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
        """The evictor's index in the table the step dispatches on. An index no row uses is
        reused, so the table (and what a step or `reclaimable` does per evictor) stays bounded
        by the distinct policies of the requests running now, not of every request ever seen.
        Runs at admission and release, never per step."""
        if evictor is None:
            return -1
        for i, e in enumerate(self.evictors):
            if e is evictor:
                return i
        in_use = set(self.row_evictor.unique().tolist())
        for i, e in enumerate(self.evictors):
            if i not in in_use and e is not self.evictor:
                self.evictors[i] = evictor
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
                      batch.out_cache_loc, req_to_token)
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

    def _prepare(self, batch, rows: torch.Tensor, seq: torch.Tensor, out_cache_loc,
                 req_to_token: torch.Tensor | None = None) -> None:
        """The step's bookkeeping: head-slots for the new tokens (reclaiming first if the pool
        is short), appended to their lists; a new request that matched a cached prefix has its
        lists loaded from the virtual map first; host statistics."""
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
            prefix = _host(batch, "extend_prefix_lens")
            # a row's first chunk: a new request (or a retracted one anew), maybe after a
            # prefix the radix tree had cached
            new = ~self.stats.active[rows] | (prefix == 0)
            fresh = rows[new]
            if fresh.numel():
                self._forget(fresh)
                self.stats.start(fresh)
                hit = new & (prefix > 0)
                if bool(hit.any()):
                    if req_to_token is None:
                        raise RuntimeError("a cached prefix needs req_to_token to load its lists")
                    self.load_rows(rows[hit], req_to_token, prefix[hit], prefix[hit])
                    self.prefix_hit_tokens += int(prefix[hit].sum())
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
            live, span = self._own_counts(mine)
            due = mine[evictor.triggered(live, span)]
            if due.numel():
                self._evict_rows(due, evictor)
        st.peak_live[rows] = torch.maximum(st.peak_live[rows], st.live[rows])
        if self.debug_check:
            self.check_integrity(req_to_token)
        self.new_slots = None
        self.step = None
        self._batch_rows = self._batch_rows_dev = None

    def _own_counts(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Host int64 [R] each: the entries `rows` may evict themselves (private, and shared
        ones no other request lists) and their longest such list: what their budget counts."""
        lists = self.lists
        shared = lists.shared_host[rows]
        if not bool(shared.any()):
            return self.stats.live[rows], lists.span[rows]
        own = lists.lens_host[rows] - shared + self.alone_host[rows]
        return own.sum(dim=1), own.max(dim=1).values

    def _shared_part(self, rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """bool [R, LH, W]: the gathered entries of `rows` in their lists' shared parts."""
        j = torch.arange(valid.shape[2], device=self.device)
        return valid & (j < self.lists.shared[rows.to(self.device)][:, :, None])

    def _private(self, rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """bool [R, LH, W]: the gathered entries of `rows` past their lists' shared parts."""
        return valid & ~self._shared_part(rows, valid)

    def _own(self, rows: torch.Tensor, entries: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """bool [R, LH, W]: what each row's own evictor may take: its private entries, and the
        shared ones that no other request lists (taking them leaves a hole in the tree's copy,
        as the global evictor would)."""
        alone = self.holders[entries.clamp(min=0)] == 1
        return valid & (~self._shared_part(rows, valid) | alone)

    def _shared_holders(self, rows: torch.Tensor, delta: int) -> None:
        """Add `delta` to the refcount of every head-slot in the shared parts of `rows`."""
        if rows.numel() == 0 or not bool(self.lists.shared_host[rows].any()):
            return
        entries, valid = self.lists.gather(rows)
        slots = entries[self._shared_part(rows, valid)]
        ones = torch.full_like(slots, delta, dtype=torch.int32)
        self.holders.index_put_((slots,), ones, accumulate=True)

    def _refresh_alone(self) -> None:
        """Recount, for every row with a shared part, the shared entries it alone lists (after
        requests started or stopped sharing a prefix; never per step)."""
        self.alone_host.zero_()
        rows = self.lists.shared_host.any(dim=1).nonzero()[:, 0]
        if rows.numel() == 0:
            return
        entries, valid = self.lists.gather(rows)
        alone = self._shared_part(rows, valid) & (self.holders[entries.clamp(min=0)] == 1)
        self.alone_host[rows] = alone.sum(dim=2).cpu().long()

    def _evict_rows(self, rows: torch.Tensor, evictor: Evictor) -> None:
        entries, valid = self.lists.gather(rows)
        pos = self.pos[entries.clamp(min=0)]
        seq = self.stats.seq_len[rows].to(self.device)
        # a request's own eviction never takes an entry another request lists
        own = self._own(rows, entries, valid)
        keep = evictor.keep_lists(entries, own, pos, seq, self.log_beta, self.k)
        keep = keep | (valid & ~own)
        free_before = self.pool.num_free
        dropped = self._drop(rows, entries, valid, keep)
        st = self.stats
        hit = dropped > 0
        r = rows[hit]
        st.live[rows] -= dropped
        st.evicted[r] += dropped[hit]
        self.evicted_total += int(dropped.sum())
        st.evictions[r] += 1
        st.free_before_last_evict[r] = free_before
        st.free_after_last_evict[r] = self.pool.num_free

    def _drop(self, rows, entries, valid, keep) -> torch.Tensor:
        """Free what `keep` drops from the gathered lists of `rows`, compact the lists; returns
        host int64 [R]: head-slots freed per row."""
        drop = valid & ~keep
        lh = torch.arange(entries.shape[1], device=self.device)[None, :, None].expand_as(drop)
        slots = entries[drop]
        tree = 0
        if self.tree_live:  # shared entries a row alone listed: holes in the tree's copy
            held = self._tree_held(slots)
            tree = self._forget_tree_slots(slots[held])
        self.lists.owner[slots] = NO_OWNER
        self.pool.evict_slots(slots, lh[drop])
        self.lists.compact(rows, keep, entries)
        if tree:
            self._refresh_alone()
        return drop.sum(dim=(1, 2)).cpu()

    def _tree_held(self, slots: torch.Tensor) -> torch.Tensor:
        return self.tree_t[self.pool.slot_vid[slots].long()] >= 0

    def _count_tree_slots(self, slots: torch.Tensor, sign: int) -> int:
        """Add (sign 1) or remove (sign -1) live head-slots the tree holds (tree_t set) to or
        from the tree's host counts; returns how many."""
        n = slots.numel()
        if n:
            vid = self.pool.slot_vid[slots].long()
            prot = int(self._tree_protected_mask(self.pos[slots], self.tree_t[vid]).sum())
            self.tree_live += sign * n
            self.tree_protected += sign * prot
        return n

    def _forget_tree_slots(self, slots: torch.Tensor) -> int:
        """The tree loses these live head-slots it held (about to be evicted); returns how
        many."""
        self.holders[slots] = 0
        return self._count_tree_slots(slots, -1)

    # ------------------------------------------------------------------ cross-request reclaim
    def reclaim(self, deficit: int, req_to_token: torch.Tensor | None = None) -> int:
        """The global evictor: free at least `deficit` head-slots, lowest utility first, in one
        ranking over every request's private entries (each scored by its own policy; a request
        with policy none is never reclaimed from) and every head-slot the radix tree holds
        (scored by the server's policy at its youngest holder's length; pinned while a policy
        none request lists it). Protected entries are never taken. Returns the number freed
        (less than deficit only when too much is protected)."""
        dev = self.device
        st = self.stats
        rows = self._reclaimable_rows()
        entries, valid = self.lists.gather(rows)
        R, LH, W = entries.shape
        private = self._private(rows, valid)
        scores = torch.full((R, LH, W), -math.inf, device=dev)
        ev_ids = self.row_evictor[rows]
        pos = self.pos[entries.clamp(min=0)]
        seq = st.seq_len[rows].to(dev)
        for i in torch.unique(ev_ids).tolist():  # one pass per distinct policy
            sel = (ev_ids == i).to(dev)
            scores[sel] = self.evictors[i].score_lists(
                entries[sel], private[sel], pos[sel], seq[sel], self.log_beta, self.k
            )
        tree_slots, tree_lh, tree_scores = self._tree_candidates()
        flat = torch.cat([scores.view(-1), tree_scores])
        live = int(private.sum()) + tree_slots.numel()
        evictable = int(torch.isfinite(flat).sum())  # -inf: no entry; +inf: protected
        take = min(deficit, evictable)
        if take <= 0:
            return 0
        # one ranking over the whole pool; ties to the lower (row, layer, head, list index),
        # then the tree's entries
        if self._select_keep is not None:
            keep = self._select_keep(flat, live - take)
        else:
            tie = torch.arange(flat.numel(), device=dev).view(1, -1)
            keep = keep_top(flat.view(1, -1), live - take, tie)[0]
        n_rows = R * LH * W
        keep_rows = (keep[:n_rows].view(R, LH, W) & valid) | (valid & ~private)
        dropped = self._drop(rows, entries, valid, keep_rows)
        st.reclaimed[rows] += dropped
        st.evicted[rows] += dropped
        st.live[rows] -= dropped
        gone = ~keep[n_rows:]
        freed = int(dropped.sum()) + self._drop_shared(tree_slots[gone], tree_lh[gone])
        self.reclaims += 1
        self.reclaimed_total += freed
        self.evicted_total += freed
        logger.info("sglang-evict: reclaimed %d head-slots across %d requests and the tree",
                    freed, R)
        return freed

    def _tree_candidates(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The live head-slots the tree holds: (slots, their layer*H + head, scores), scored by
        the server's policy at the length of their youngest holder: the sequence the tree took
        them from, or a running request that lists them at a shorter length."""
        dev = self.device
        none = torch.zeros(0, dtype=torch.long, device=dev)
        if self.tree_live == 0 or self.evictor is None:
            return none, none, torch.zeros(0, device=dev)
        LH = self.heads_per_token
        vids = (self.tree_t >= 0).nonzero()[:, 0]
        sm = self.pool.slot_map[vids].view(-1, LH).long()
        held = sm >= 0
        slots = sm[held]
        lh = held.nonzero()[:, 1]
        t_min = torch.full((self.capacity,), torch.iinfo(torch.long).max, dtype=torch.long,
                           device=dev)
        t_min[slots] = self.tree_t[vids][:, None].expand_as(sm)[held]
        pinned = torch.zeros(self.capacity, dtype=torch.bool, device=dev)
        listing = (self.stats.active & self.lists.shared_host.any(dim=1)).nonzero()[:, 0]
        if listing.numel():
            entries, valid = self.lists.gather(listing)
            shared = self._shared_part(listing, valid)
            seq = self.stats.seq_len[listing].to(dev)[:, None, None].expand_as(entries)
            t_min.scatter_reduce_(0, entries[shared], seq[shared], reduce="amin")
            never = (self.row_evictor[listing] < 0).to(dev)[:, None, None].expand_as(entries)
            pinned[entries[shared & never]] = True
        t = t_min[slots]
        n = slots.numel()
        scores = self.evictor.score_lists(
            slots.view(1, 1, n), torch.ones(1, 1, n, dtype=torch.bool, device=dev),
            self.pos[slots].view(1, 1, n), t.view(1, 1, n), self.log_beta, self.k,
        ).view(n)
        return slots, lh, scores.masked_fill(pinned[slots], math.inf)

    def _drop_shared(self, slots: torch.Tensor, lh: torch.Tensor) -> int:
        """Evict head-slots the tree holds: their virtual ids keep their keys in the tree with
        holes here; every running request that lists them loses them too."""
        n = slots.numel()
        if n == 0:
            return 0
        self._forget_tree_slots(slots)
        self.pool.evict_slots(slots, lh)
        listing = self.lists.shared_host.any(dim=1).nonzero()[:, 0]
        if listing.numel():
            gone = torch.zeros(self.capacity, dtype=torch.bool, device=self.device)
            gone[slots] = True
            entries, valid = self.lists.gather(listing)
            hit = valid & gone[entries.clamp(min=0)]
            lost = hit.sum(dim=(1, 2)).cpu()
            touched = lost > 0
            if bool(touched.any()):
                r = listing[touched]
                t = touched.to(self.device)
                self.lists.compact(r, (valid & ~hit)[t], entries[t])
                self.stats.live[r] -= lost[touched]
                self.stats.evicted[r] += lost[touched]
        self._refresh_alone()
        return n

    def _reclaimable_rows(self) -> torch.Tensor:
        st = self.stats
        return (st.active & (st.live > 0) & (self.row_evictor >= 0)).nonzero()[:, 0]

    def reclaimable(self) -> int:
        """Head-slots that `reclaim` could free now: private live minus an upper bound on
        protected ones (sinks plus recent window of every request; a cheap bound, no scoring),
        plus the unprotected head-slots the tree holds."""
        tree = self.tree_live - self.tree_protected if self.evictor is not None else 0
        rows = self._reclaimable_rows()
        if rows.numel() == 0:
            return max(tree, 0)
        pols = [self.evictors[i].config.policy for i in range(len(self.evictors))]
        prot = torch.tensor([p.sinks + p.window + 1 for p in pols], dtype=torch.long)
        protected = torch.minimum(self.stats.seq_len[rows], prot[self.row_evictor[rows]])
        live = (self.lists.lens_host[rows] - self.lists.shared_host[rows]).sum(dim=1)
        return int((live - protected * self.heads_per_token).clamp(min=0).sum()) + max(tree, 0)

    def totals(self) -> tuple[int, int, int]:
        """(head-slots evicted, taken by the global evictor, prompt tokens matched in the radix
        cache), since start-up."""
        return self.evicted_total, self.reclaimed_total, self.prefix_hit_tokens

    def live_per_layer(self) -> torch.Tensor:
        """Host int64 [L]: head-slots the running requests list, per layer."""
        lens = self.lists.lens_host[self.stats.active]
        return lens.view(-1, self.num_layers, self.num_kv_heads).sum(dim=(0, 2))

    # ------------------------------------------------------------------ radix cache
    def load_rows(self, rows: torch.Tensor, req_to_token: torch.Tensor, lens: torch.Tensor,
                  protected: torch.Tensor) -> None:
        """Rebuild the lists of `rows` (host int64) from the virtual map: the live head-slots of
        req_to_token[row, :lens[row]] in position order, those of the first protected[row]
        tokens (the tree's) shared, the rest owned by the row. For a request that matched a
        cached prefix, and after SGLang rewrote a running row to the tree's ids; its cost
        follows the row's length, once."""
        dev = self.device
        R, LH = rows.numel(), self.heads_per_token
        W = int(lens.max()) if R else 0
        rows_d = rows.to(dev)
        j = torch.arange(W, device=dev)
        ids = req_to_token[rows_d, :W].to(dev, torch.long)
        ok = j[None, :] < lens.to(dev)[:, None]
        slots = self.pool.slot_map[ids.clamp(min=0)].view(R, W, LH).long()
        slots = slots.masked_fill(~ok[:, :, None], -1).permute(0, 2, 1)  # [R, LH, W]
        is_shared = (slots >= 0) & (j[None, None, :] < protected.to(dev)[:, None, None])
        self._shared_holders(rows, -1)
        # What the rows owned and no longer reference (duplicates of the tree's tokens, which
        # SGLang frees right after, maybe deferred to the end of its free group) leaves them now.
        old, valid = self.lists.gather(rows)
        owned = valid & (self.lists.owner[old.clamp(min=0)] == rows_d[:, None, None])
        self.lists.owner[old[owned]] = NO_OWNER
        self.lists.load(rows, slots, is_shared.sum(dim=2))
        mine = (slots >= 0) & ~is_shared
        self.lists.owner[slots[mine]] = rows_d[:, None, None].expand_as(slots)[mine].to(torch.int32)
        shared = slots[is_shared]
        self.holders.index_put_((shared,), torch.ones_like(shared, dtype=torch.int32), accumulate=True)
        self._refresh_alone()
        self.stats.live[rows] = self.lists.lens_host[rows].sum(dim=1)

    def tree_insert(self, row: int, req_to_token: torch.Tensor, protected: int, running: bool) -> None:
        """SGLang's radix tree now holds the first `protected` tokens of `row` (a request's
        checkpoint: finished, or a chunk of a running one). Their head-slots become shared:
        no longer the request's to evict, kept with their scores for later matches. A running
        row is reloaded (SGLang may have rewritten it to ids the tree already had); a leaving
        row keeps only what is still its own."""
        dev = self.device
        ids = req_to_token[row, :protected].to(dev, torch.long)
        new = ids[self.tree_t[ids] < 0]
        if new.numel():
            t = int(self.stats.seq_len[row])
            self.tree_t[new] = t
            sm = self.pool.slot_map[new].long()  # [k, L, H]
            held = sm[sm >= 0]
            self.lists.owner[held] = NO_OWNER
            self._count_tree_slots(held, 1)
        rows = torch.tensor([row])
        if running:
            self.load_rows(rows, req_to_token, self.stats.seq_len[rows].clamp(min=protected),
                           torch.tensor([protected]))
        else:
            self._keep_owned(rows)

    def _tree_protected_mask(self, pos: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Which tree entries the server's policy protects (sinks, recent window at length t)."""
        if self.evictor is None:
            return torch.ones_like(pos, dtype=torch.bool)
        p = self.evictor.config.policy
        return (pos < p.sinks) | ((p.window > 0) & (pos >= t - p.window))

    def _keep_owned(self, rows: torch.Tensor) -> None:
        """Drop from the lists of `rows` (host int64) every entry they do not own (shared ones:
        a request leaving no longer lists the tree's head-slots)."""
        if rows.numel() == 0 or not bool(self.lists.lens_host[rows].any()):
            return
        self._shared_holders(rows, -1)
        entries, valid = self.lists.gather(rows)
        keep = valid & (self.lists.owner[entries.clamp(min=0)] == rows.to(self.device)[:, None, None])
        self.lists.compact(rows, keep, entries)
        self._refresh_alone()
        self.stats.live[rows] = self.lists.lens_host[rows].sum(dim=1)

    # ------------------------------------------------------------------ SGLang's side
    def free(self, virtual_ids: torch.Tensor) -> int:
        """SGLang freed these virtual ids (a request's own, or the tree's on node eviction):
        free their head-slots and take them out of their owners' lists (a whole request at a
        time, as SGLang releases a row, is the common case: its lists are simply dropped)."""
        ids = virtual_ids.to(self.device, torch.long)
        ids = torch.unique(ids[(ids >= 0) & (ids < self.pool.num_virtual)])
        sm = self.pool.slot_map[ids]
        live = sm != EVICTED
        slots = sm[live].long()
        if slots.numel() == 0:
            self.tree_t[ids] = -1
            return 0
        if self.tree_live:
            self._count_tree_slots(slots[self._tree_held(slots)], -1)
        self.tree_t[ids] = -1
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
            owned = self.lists.owner[entries.clamp(min=0)] == part.to(self.device)[:, None, None]
            keep = valid & (owned | ~self._private(part, valid))
            self.lists.compact(part, keep, entries)
        self.stats.live[rows] -= per_row
        return freed

    def _forget(self, rows: torch.Tensor) -> None:
        """Rows starting a new request hold nothing (SGLang freed their ids before reuse)."""
        self._shared_holders(rows, -1)
        self.lists.drop(rows)
        self.alone_host[rows] = 0
        self.stats.live[rows] = 0

    def release(self, row: int) -> tuple[RowStats | None, Evictor | None]:
        evictor = self.evictor_of(row)
        self.row_evictor[row] = self._evictor_index(self.evictor)
        if not bool(self.stats.active[row]):
            return None, evictor
        stats = self.stats.row(row)
        self.stats.active[row] = False
        if bool(self.lists.shared_host[row].any()):  # leaving: the tree's entries stay the tree's
            self._keep_owned(torch.tensor([row]))
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
        self.tree_t.fill_(-1)
        self.tree_live = self.tree_protected = 0
        self.holders.zero_()
        self.alone_host.zero_()
        self.stats = RowStatsTable(self.stats.active.numel())
        self.row_evictor.fill_(self._evictor_index(self.evictor))

    # ------------------------------------------------------------------ integrity
    def unaccounted(self) -> int:
        """capacity - free - listed privately by a request - held by the tree, from host
        counters (O(rows), no device read): every head-slot is exactly one of the three, so
        anything but 0 is a leak (> 0) or a double count (< 0). Cheap enough for every step."""
        private = int((self.lists.lens_host - self.lists.shared_host).sum())
        return self.capacity - self.pool.num_free - private - self.tree_live

    def check_integrity(self, req_to_token: torch.Tensor | None = None) -> None:
        """The pool's and the lists' own checks, the host mirrors against the device, the
        host-counter balance (`unaccounted`), and, given req_to_token, each active row's lists
        against a recomputation from the virtual map."""
        self.pool.check_integrity()
        vid = self.pool.slot_vid.long()
        tree_slots = (vid >= 0) & (self.tree_t[vid.clamp(min=0)] >= 0)
        self.lists.check_integrity(self.pool.slot_map, self.pos, tree_slots)
        if int(tree_slots.sum()) != self.tree_live:
            raise RuntimeError(
                f"tree holds {int(tree_slots.sum())} head-slots, counted {self.tree_live}")
        gap = self.unaccounted()
        if gap != 0:
            raise RuntimeError(f"{gap} head-slots neither free, listed by a request nor held by "
                               "the tree")
        rows = torch.arange(self.stats.active.numel())
        entries, valid = self.lists.gather(rows)
        shared = self._shared_part(rows, valid)
        count = torch.bincount(entries[shared], minlength=self.capacity).to(self.holders.device)
        if not torch.equal(count.int(), self.holders):
            raise RuntimeError("shared refcounts differ from the lists' shared parts")
        alone = (shared & (self.holders[entries.clamp(min=0)] == 1)).sum(dim=2).cpu().long()
        if not torch.equal(alone, self.alone_host):
            raise RuntimeError("host counts of shared entries a row alone lists are stale")
        if self.tree_live:
            s = tree_slots.nonzero()[:, 0]
            prot = self._tree_protected_mask(self.pos[s], self.tree_t[vid[s]])
            if int(prot.sum()) != self.tree_protected:
                raise RuntimeError(f"tree protects {int(prot.sum())} head-slots, counted "
                                   f"{self.tree_protected}")
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
