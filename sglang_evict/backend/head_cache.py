"""Head-granular KV for one served model: the physical store behind the sglang_evict backend,
composed of the rooms that each own one concept.

SGLang keeps its virtual side (token ids from its allocator, req_to_token, positions); this cache
holds the physical side:

    pool        HeadSlotPool (cache/): (virtual id, layer, KV head) -> head-slot or EVICTED
    k, v        [capacity, head_dim]  one token's K / V of one layer and one KV head per row
    log_beta    [capacity] float32    the retention gate's output stored with the entry
    pos         [capacity] int64      the entry's position (never changes: no re-rotation)
    lists       LiveLists (cache/): per (request row, layer, KV head) the live head-slots in
                position order, the source of truth between steps
    stats       RowStatsTable (cache/): per-row statistics, host columns
    tree        TreeShare (radix/): what the radix tree holds, shared parts and refcounts
    requests    RequestEvictors (eviction/): each row's evictor and the budget enforcement
    global_evictor  GlobalEvictor (eviction/): one ranking over the pool when it runs short
    meta        StepMetadata (step.py): the step's lists in FlashInfer's layout, graph buffers

One forward step:
  1. `prepare(batch)`: give the step's new tokens head-slots in every layer and head (reclaiming
     across all requests first if the pool is short), append them to their lists, and write the
     step's per-(request, KV head) metadata from the lists, once for all layers. Its cost
     follows the batch's live entries, never the evicted ones.
  2. each layer: `store(layer, k, v, log_beta, positions)` then attention over `step.layer(l)`.
  3. `after_forward(batch)`: the requests over their trigger are selected together in one
     batched pass and their lists compacted; statistics per request, as host tensors.

Requests are tracked by their req_to_token row. The row's statistics are handed over when SGLang
releases the row (`release`); head-slots return to the free list when SGLang frees the virtual ids
(`free`), so every path that frees KV in SGLang (finish, abort, retraction, flush, the radix
tree's node eviction) frees head-slots too.

The host keeps exact mirrors of what it decides (live counts, list lengths and spans), so a step
reads nothing back from the device except when an eviction compacts lists.
"""

from __future__ import annotations

import torch

from sglang_evict.backend.step import StepLists, StepMetadata, host_field
from sglang_evict.cache.head_slots import EVICTED, HeadSlotPool, HeadSlotPoolFull
from sglang_evict.cache.live_lists import NO_OWNER, LiveLists
from sglang_evict.cache.row_stats import RowStats, RowStatsTable
from sglang_evict.eviction.evictor import Evictor
from sglang_evict.eviction.global_evictor import GlobalEvictor
from sglang_evict.eviction.request_evictors import RequestEvictors
from sglang_evict.kernels.select import select_keep
from sglang_evict.radix.tree_share import TreeShare


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
        tree_first: bool = False,
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
        # The server's evictor: also scores the tree's entries for the global evictor; without
        # one (policy none) nothing is reclaimed from the tree.
        self.evictor = evictor
        self.stats = RowStatsTable(num_rows)
        protect = (evictor.config.policy.sinks, evictor.config.policy.window) if evictor else None
        self.tree = TreeShare(self.pool, self.lists, self.pos, self.stats, num_rows, protect)
        self.requests = RequestEvictors(self, evictor, num_rows)
        self.global_evictor = GlobalEvictor(self, self.requests,
                                            select_keep if use_triton else None,
                                            tree_first=tree_first)
        self.meta = StepMetadata(self.lists, num_layers, num_kv_heads, capacity, self.device,
                                 use_triton)
        self.new_slots: torch.Tensor | None = None  # [T, L, H] of the current step
        self.step: StepLists | None = None
        self.q_req: torch.Tensor | None = None  # extend: each new token's request in the batch
        self._batch_rows: torch.Tensor | None = None  # the step's requests' rows (host)
        self._batch_rows_dev: torch.Tensor | None = None
        self._q_lens: torch.Tensor | None = None
        self.debug_check = debug_check
        self.steps = 0
        # host totals for the metrics: head-slots evicted, prompt tokens that matched the radix
        # cache (the global evictor counts what it took)
        self.evicted_total = self.prefix_hit_tokens = 0
        self.reported_unaccounted = 0  # the last balance the step logged (`unaccounted`)

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

    @property
    def host_metadata(self) -> bool:
        return self.meta.host_metadata

    @host_metadata.setter
    def host_metadata(self, on: bool) -> None:
        self.meta.host_metadata = on

    @property
    def graph(self):
        return self.meta.graph

    @property
    def reclaims(self) -> int:
        return self.global_evictor.reclaims

    # ------------------------------------------------------------------ per-request policy
    @property
    def evictors(self) -> list[Evictor]:
        return self.requests.evictors

    def set_row_evictor(self, row: int, evictor: Evictor | None) -> None:
        self.requests.set_row(row, evictor)

    def evictor_of(self, row: int) -> Evictor | None:
        return self.requests.of(row)

    # ------------------------------------------------------------------ one step
    def prepare(self, batch, req_to_token: torch.Tensor | None = None) -> None:
        """Allocate head-slots for the batch's new tokens, append them to their lists and build
        the step's metadata from the lists."""
        self._prepare(batch, host_field(batch, "req_pool_indices"), host_field(batch, "seq_lens"),
                      batch.out_cache_loc, req_to_token)
        self.step = self.meta.eager(self._batch_rows, self._batch_rows_dev, self._q_lens)

    def init_graph(self, max_bs: int) -> None:
        """Static metadata buffers for decode graphs of up to `max_bs` requests."""
        self.meta.init_graph(max_bs)

    def prepare_capture(self, bs: int) -> None:
        """Metadata for capturing a decode graph of `bs` requests: the static buffers as an
        empty step; no request's state is touched."""
        self.new_slots, self.step = self.meta.capture(bs)

    def prepare_replay(self, batch, bs: int, num_padding: int) -> None:
        """`prepare` for replaying a decode graph captured for `bs` requests, of which the last
        `num_padding` are padding."""
        raw = bs - num_padding
        rows = host_field(batch, "req_pool_indices")[:raw]
        self._prepare(batch, rows, host_field(batch, "seq_lens")[:raw], batch.out_cache_loc[:raw])
        self.new_slots, self.step = self.meta.replay(self.new_slots, self._batch_rows_dev, bs)

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
            counts = host_field(batch, "extend_seq_lens")
            self.q_req = torch.repeat_interleave(
                torch.arange(R, device=self.device), counts.to(self.device),
                output_size=new_ids.numel(),
            )
            self._start_rows(rows, host_field(batch, "extend_prefix_lens"), req_to_token)
        self.lists.append(rows, counts, self.new_slots.view(-1, self.heads_per_token))
        st = self.stats
        st.active[rows] = True
        st.seq_len[rows] = seq
        st.live[rows] += counts * self.heads_per_token
        st.peak_before_evict[rows] = torch.maximum(st.peak_before_evict[rows], st.live[rows])
        self._batch_rows = rows
        self._batch_rows_dev = rows.to(self.device)
        self._q_lens = counts

    def _start_rows(self, rows: torch.Tensor, prefix: torch.Tensor,
                    req_to_token: torch.Tensor | None) -> None:
        """A row's first chunk: a new request (or a retracted one anew), maybe after a prefix
        the radix tree had cached, whose lists are loaded now."""
        new = ~self.stats.active[rows] | (prefix == 0)
        fresh = rows[new]
        if not fresh.numel():
            return
        self._forget(fresh)
        self.stats.start(fresh)
        hit = new & (prefix > 0)
        if bool(hit.any()):
            if req_to_token is None:
                raise RuntimeError("a cached prefix needs req_to_token to load its lists")
            self.tree.load_rows(rows[hit], req_to_token, prefix[hit], prefix[hit])
            self.prefix_hit_tokens += int(prefix[hit].sum())

    def store(self, layer: int, k, v, log_beta, positions, store_fn) -> None:
        slot = self.new_slots[:, layer, :]
        n = slot.shape[0]
        store_fn(self.k, self.v, self.log_beta, self.pos, k[:n], v[:n], log_beta[:n],
                 positions[:n], slot)

    def after_forward(self, batch, req_to_token: torch.Tensor | None = None) -> None:
        """Enforce the budgets of the batch's requests over their trigger, all together."""
        self.steps += 1
        rows = self._batch_rows  # the step's real requests (a graph's padding excluded)
        try:
            self.requests.enforce(rows)
            st = self.stats
            st.peak_live[rows] = torch.maximum(st.peak_live[rows], st.live[rows])
            if self.debug_check:
                self.check_integrity(req_to_token)
        finally:  # the step is over, whatever failed in it (faults.py ends its requests)
            self.new_slots = None
            self.step = None
            self._batch_rows = self._batch_rows_dev = None

    def drop(self, rows, entries, valid, keep) -> torch.Tensor:
        """Free what `keep` drops from the gathered lists of `rows`, compact the lists; returns
        host int64 [R]: head-slots freed per row. Shared entries a row alone listed leave holes
        in the tree's copy."""
        drop = valid & ~keep
        lh = torch.arange(entries.shape[1], device=self.device)[None, :, None].expand_as(drop)
        slots = entries[drop]
        tree = 0
        if self.tree.live:
            tree = self.tree.forget(slots[self.tree.held(slots)])
        self.lists.owner[slots] = NO_OWNER
        self.pool.evict_slots(slots, lh[drop])
        self.lists.compact(rows, keep, entries)
        if tree:
            self.tree.refresh_alone()
        return drop.sum(dim=(1, 2)).cpu()

    # ------------------------------------------------------------------ cross-request reclaim
    def reclaim(self, deficit: int, req_to_token: torch.Tensor | None = None) -> int:
        """Free at least `deficit` head-slots through the global evictor; returns how many."""
        return self.global_evictor.reclaim(deficit)

    def reclaimable(self) -> int:
        return self.global_evictor.reclaimable()

    def totals(self) -> tuple[int, int, int]:
        """(head-slots evicted, taken by the global evictor, prompt tokens matched in the radix
        cache), since start-up."""
        return self.evicted_total, self.global_evictor.reclaimed_total, self.prefix_hit_tokens

    def live_per_layer(self) -> torch.Tensor:
        """Host int64 [L]: head-slots the running requests list, per layer."""
        lens = self.lists.lens_host[self.stats.active]
        return lens.view(-1, self.num_layers, self.num_kv_heads).sum(dim=(0, 2))

    # ------------------------------------------------------------------ radix cache
    def load_rows(self, rows, req_to_token, lens, protected) -> None:
        self.tree.load_rows(rows, req_to_token, lens, protected)

    def tree_insert(self, row: int, req_to_token: torch.Tensor, protected: int, running: bool) -> None:
        self.tree.insert(row, req_to_token, protected, running)

    # ------------------------------------------------------------------ SGLang's side
    def free(self, virtual_ids: torch.Tensor) -> int:
        """SGLang freed these virtual ids (a request's own, or the tree's on node eviction):
        free their head-slots and take them out of their owners' lists (a whole request at a
        time, as SGLang releases a row, is the common case: its lists are simply dropped)."""
        ids = virtual_ids.to(self.device, torch.long)
        ids = torch.unique(ids[(ids >= 0) & (ids < self.pool.num_virtual)])
        sm = self.pool.slot_map[ids]
        slots = sm[sm != EVICTED].long()
        self.tree.freed(ids, slots)
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
            owned = self.lists.owner[entries.clamp(min=0)] == part.to(self.device)[:, None, None]
            keep = valid & (owned | ~self.tree.private(part, valid))
            self.lists.compact(part, keep, entries)
        self.stats.live[rows] -= per_row
        return freed

    def _forget(self, rows: torch.Tensor) -> None:
        """Rows starting a new request hold nothing (SGLang freed their ids before reuse)."""
        self.tree.add_holders(rows, -1)
        self.lists.drop(rows)
        self.tree.alone_host[rows] = 0
        self.stats.live[rows] = 0

    def release(self, row: int) -> tuple[RowStats | None, Evictor | None]:
        evictor = self.requests.release(row)
        if not bool(self.stats.active[row]):
            return None, evictor
        stats = self.stats.row(row)
        self.stats.active[row] = False
        if bool(self.lists.shared_host[row].any()):  # leaving: the tree's entries stay the tree's
            self.tree.keep_owned(torch.tensor([row]))
        return stats, evictor

    def log_beta_of(self, virtual_ids: torch.Tensor) -> torch.Tensor | None:
        """log beta of every (layer, token, KV head) of these tokens, [L, n, H]; None when any
        of their entries was evicted (the scores of what a request held whole)."""
        slots = self.pool.slot_map[virtual_ids.to(self.device, torch.long)]  # [n, L, H]
        if bool((slots == EVICTED).any()):
            return None
        return self.log_beta[slots.long()].permute(1, 0, 2)

    def row_stats(self, row: int) -> RowStats:
        return self.stats.row(row)

    def reset(self) -> None:
        """SGLang cleared its allocator (flush_cache): every head-slot is free again."""
        live = self.pool.slot_map != EVICTED
        if bool(live.any()):
            ids = live.flatten(1).any(1).nonzero()[:, 0]
            self.pool.free(ids)
        self.lists.reset()
        self.tree.reset()
        self.stats.clear()
        self.requests.reset()

    # ------------------------------------------------------------------ integrity
    def unaccounted(self) -> int:
        """capacity - free - listed privately by a request - held by the tree, from host
        counters (O(rows), no device read): every head-slot is exactly one of the three, so
        anything but 0 is a leak (> 0) or a double count (< 0). Cheap enough for every step."""
        private = int((self.lists.lens_host - self.lists.shared_host).sum())
        return self.capacity - self.pool.num_free - private - self.tree.live

    def check_integrity(self, req_to_token: torch.Tensor | None = None) -> None:
        """The pool's, the lists' and the tree's own checks, the host-counter balance
        (`unaccounted`), and, given req_to_token, each active row's lists against a
        recomputation from the virtual map."""
        self.pool.check_integrity()
        tree_slots = self.tree.held_mask()
        self.lists.check_integrity(self.pool.slot_map, self.pos, tree_slots)
        self.tree.check_integrity(tree_slots)
        gap = self.unaccounted()
        if gap != 0:
            raise RuntimeError(f"{gap} head-slots neither free, listed by a request nor held by "
                               "the tree")
        lens = self.lists.lens.sum(1).cpu().long()
        st = self.stats
        bad = st.active & (lens != st.live)
        if bool(bad.any()):
            r = int(bad.nonzero()[0, 0])
            raise RuntimeError(f"row {r}: host live count {int(st.live[r])} != listed {int(lens[r])}")
        if req_to_token is not None:
            self._check_rows_against_map(req_to_token, lens)

    def _check_rows_against_map(self, req_to_token: torch.Tensor, lens: torch.Tensor) -> None:
        st = self.stats
        H = self.num_kv_heads
        for r in st.active.nonzero()[:, 0].tolist():  # debug only: a loop is fine here
            ids = req_to_token[r, : int(st.seq_len[r])].to(self.device, torch.long)
            n = int(self.pool.slot_map[ids].ne(EVICTED).sum())
            if n != int(lens[r]):
                raise RuntimeError(f"row {r}: lists hold {int(lens[r])}, virtual map {n}")
            entries, _ = self.lists.gather(torch.tensor([r]))
            want = self._live_in_map_order(ids, entries.shape[2])
            if not torch.equal(entries[0], want):
                lh = int((entries[0] != want).any(1).nonzero()[0, 0])
                layer = lh // H
                raise RuntimeError(f"row {r} layer {layer}: lists differ from the virtual map")

    def _live_in_map_order(self, ids: torch.Tensor, width: int) -> torch.Tensor:
        """The live head-slots of the virtual ids `ids` per (layer, head), in the ids' order,
        padded with -1 to `width`: int64 [L*H, width], what the lists hold for a request."""
        per = self.pool.slot_map[ids].reshape(ids.numel(), -1).t().long()  # [LH, T]
        live = per != EVICTED
        order = torch.sort((~live).to(torch.int8), dim=1, stable=True).indices  # live first
        first = per.gather(1, order)
        out = torch.full((per.shape[0], width), -1, dtype=torch.long, device=per.device)
        k = min(width, per.shape[1])
        j = torch.arange(k, device=per.device)
        out[:, :k] = torch.where(j[None, :] < live.sum(1, keepdim=True), first[:, :k], -1)
        return out
