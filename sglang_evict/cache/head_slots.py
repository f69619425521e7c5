"""The head-slot pool: physical KV memory at the granularity of one token, one layer, one KV head.

SGLang keeps virtual token ids (its token-slot ids, 0..num_virtual-1) as the source of positions and
radix-tree keys. This pool maps each (virtual id, layer, kv_head) to a physical head-slot in
[0, capacity), or to EVICTED (-1). A head-slot holds one token's K and V for one layer and one
KV head; any free head-slot can be reused by any layer, head or request, so `capacity` is one
budget for everything, and evicting a single (token, layer, head) returns real memory at once
(not a mask).

Contract:
  * `alloc` gives every (token, layer, head) of new tokens a head-slot; all or nothing.
  * Any live (token, layer, head) may be evicted at any time, independently of the others; it then
    maps to EVICTED until the token is freed. An evicted entry is never restored (its KV is gone);
    a virtual id can be allocated again only once none of its entries is live.
  * `free` releases whatever a token still holds (request finished, cache flushed).
  * Sharing between holders (radix tree, several requests) is the caller's business: the pool has
    one owner per head-slot and frees on request, so callers must refcount above it.
  * `check_integrity` raises when the structure is corrupt; tests call it after every operation.

Free list: a stack in `free_slots[:num_free]`; the top is `free_slots[num_free - 1]`, so alloc and
free of k head-slots are O(k) tensor slices. Hot operations are vectorised: no Python loop over
tokens or head-slots (live_indices loops over requests only).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

EVICTED = -1


class HeadSlotPoolFull(RuntimeError):
    """Raised by `alloc` when fewer head-slots are free than requested; the pool is unchanged."""

    def __init__(self, requested: int, available: int):
        super().__init__(
            f"head-slot pool full: requested {requested} head-slots, only {available} free"
        )
        self.requested = requested
        self.available = available


class HeadSlotIntegrityError(RuntimeError):
    """Raised by `check_integrity` when the pool's bookkeeping is corrupt."""


class LiveIndices(NamedTuple):
    """FlashInfer-style ragged layout for one layer: sequence r*H + h is (request r, kv_head h).

    indptr  int32 [R*H + 1]   offsets into indices
    indices int32 [nnz]       physical head-slots, in token order within each sequence
    """

    indptr: torch.Tensor
    indices: torch.Tensor


class HeadSlotPool:
    """Maps (virtual token id, layer, kv_head) -> physical head-slot or EVICTED (-1).

    Attributes:
      slot_map    int32 [num_virtual, num_layers, num_kv_heads]; -1 where no head-slot.
      free_slots  int32 [capacity]; `free_slots[:num_free]` is the free stack.

    Shapes: `alloc(ids[T])` -> int64 [T, L, H]; `live_counts(ids)` -> int64 [L, H];
    `live_indices(reqs, layer)` -> LiveIndices(indptr int32 [R*H+1], indices int32 [nnz]).
    Every mutating method validates its input fully before changing any state, so an exception
    leaves the pool as it was.
    """

    def __init__(
        self,
        num_virtual: int,
        num_layers: int,
        num_kv_heads: int,
        capacity: int,
        device: torch.device | str = "cpu",
    ):
        for name, value in (
            ("num_virtual", num_virtual),
            ("num_layers", num_layers),
            ("num_kv_heads", num_kv_heads),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
            raise ValueError(f"capacity must be a non-negative integer, got {capacity!r}")
        # Head-slot ids are stored as int32 (half the memory of the map); they must fit.
        if capacity >= 2**31:
            raise ValueError(f"capacity must be < 2**31 (int32 head-slot ids), got {capacity}")
        self.num_virtual = num_virtual
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.capacity = capacity
        self.device = torch.device(device)
        self.slot_map = torch.full(
            (num_virtual, num_layers, num_kv_heads), EVICTED, dtype=torch.int32, device=self.device
        )
        # Reversed so the first alloc on a fresh pool hands out 0, 1, 2, ... (deterministic tests).
        self.free_slots = torch.arange(
            capacity - 1, -1, -1, dtype=torch.int32, device=self.device
        )
        # Reverse map: the virtual id each head-slot belongs to (-1 when free), so an entry found
        # in a live list can be evicted without searching the virtual map.
        self.slot_vid = torch.full((capacity,), -1, dtype=torch.int32, device=self.device)
        self._num_free = capacity
        self._num_live = 0

    # ------------------------------------------------------------------ counters
    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_live(self) -> int:
        return self._num_live

    @property
    def heads_per_token(self) -> int:
        return self.num_layers * self.num_kv_heads

    # ------------------------------------------------------------------ validation
    def _ids(self, virtual_ids: torch.Tensor, what: str = "virtual_ids", unique: bool = True):
        if not isinstance(virtual_ids, torch.Tensor):
            raise TypeError(f"{what} must be a tensor, got {type(virtual_ids).__name__}")
        if virtual_ids.ndim != 1 or not _is_int_dtype(virtual_ids):
            raise ValueError(
                f"{what} must be a 1-D integer tensor, got {virtual_ids.dtype} "
                f"{tuple(virtual_ids.shape)}"
            )
        ids = virtual_ids.to(device=self.device, dtype=torch.long)
        if ids.numel() == 0:
            return ids
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.num_virtual:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{what} out of range [0, {self.num_virtual}): {bad}")
        if unique and torch.unique(ids).numel() != ids.numel():
            dup = _first_duplicate(ids)
            raise ValueError(f"{what} contains duplicate virtual id {dup}")
        return ids

    def _index(self, t: torch.Tensor, bound: int, what: str, n: int) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or t.ndim != 1 or not _is_int_dtype(t):
            raise ValueError(f"{what} must be a 1-D integer tensor")
        if t.numel() != n:
            raise ValueError(f"{what} has {t.numel()} entries, virtual_ids has {n}")
        t = t.to(device=self.device, dtype=torch.long)
        if n and (int(t.min()) < 0 or int(t.max()) >= bound):
            raise ValueError(f"{what} out of range [0, {bound})")
        return t

    # ------------------------------------------------------------------ free stack
    def _push(self, slots: torch.Tensor) -> None:
        k = slots.numel()
        self.slot_vid[slots.long()] = -1
        self.free_slots[self._num_free : self._num_free + k] = slots.to(torch.int32)
        self._num_free += k
        self._num_live -= k

    # ------------------------------------------------------------------ operations
    def alloc(self, virtual_ids: torch.Tensor) -> torch.Tensor:
        """Give every (token, layer, head) of the T new tokens a head-slot.

        Returns int64 [T, L, H] head-slot ids (also written to slot_map). Raises ValueError if an
        id is out of range, duplicated, or still holds a live head-slot; HeadSlotPoolFull if fewer
        than T*L*H are free. Either error leaves the pool unchanged.
        """
        ids = self._ids(virtual_ids)
        t = ids.numel()
        if t and bool((self.slot_map[ids] != EVICTED).any()):
            holder = (self.slot_map[ids] != EVICTED).flatten(1).any(1)
            first = int(ids[holder.nonzero()[0, 0]])
            raise ValueError(f"virtual id {first} already holds head-slots; free it before alloc")
        need = t * self.heads_per_token
        if need > self._num_free:
            raise HeadSlotPoolFull(need, self._num_free)
        top = self._num_free
        slots = self.free_slots[top - need : top].flip(0)
        slots = slots.view(t, self.num_layers, self.num_kv_heads)
        self.slot_map[ids] = slots
        self.slot_vid[slots.reshape(-1).long()] = ids.repeat_interleave(self.heads_per_token).to(
            torch.int32
        )
        self._num_free -= need
        self._num_live += need
        return slots.to(torch.long)

    def evict(self, virtual_ids: torch.Tensor, layers: torch.Tensor, heads: torch.Tensor) -> int:
        """Free the K listed (token, layer, head) head-slots; they map to EVICTED afterwards.

        Each entry must be live and listed once, else ValueError naming the first offender (pool
        unchanged). Returns the number freed (= K).
        """
        ids = self._ids(virtual_ids, unique=False)
        k = ids.numel()
        layers = self._index(layers, self.num_layers, "layers", k)
        heads = self._index(heads, self.num_kv_heads, "heads", k)
        if k == 0:
            return 0
        slots = self.slot_map[ids, layers, heads]
        dead = slots == EVICTED
        if bool(dead.any()):
            i = int(dead.nonzero()[0, 0])
            raise ValueError(
                f"(virtual id {int(ids[i])}, layer {int(layers[i])}, head {int(heads[i])}) "
                "holds no head-slot (already evicted or never allocated)"
            )
        flat = (ids * self.num_layers + layers) * self.num_kv_heads + heads
        if torch.unique(flat).numel() != k:
            f = _first_duplicate(flat)
            v, rest = divmod(f, self.heads_per_token)
            raise ValueError(
                f"(virtual id {v}, layer {rest // self.num_kv_heads}, head "
                f"{rest % self.num_kv_heads}) listed more than once"
            )
        self._push(slots)
        self.slot_map[ids, layers, heads] = EVICTED
        return k

    def evict_mask(self, virtual_ids: torch.Tensor, keep: torch.Tensor) -> int:
        """Free every live head-slot of the T tokens where keep [T, L, H] is False.

        Entries already evicted are ignored whatever keep says. Returns the number freed.
        """
        ids = self._ids(virtual_ids)
        shape = (ids.numel(), self.num_layers, self.num_kv_heads)
        ok = isinstance(keep, torch.Tensor) and keep.dtype == torch.bool
        if not ok or tuple(keep.shape) != shape:
            is_t = isinstance(keep, torch.Tensor)
            got = f"{keep.dtype} {tuple(keep.shape)}" if is_t else type(keep).__name__
            raise ValueError(f"keep must be a bool tensor {shape}, got {got}")
        rows = self.slot_map[ids]
        drop = ~keep.to(self.device) & (rows != EVICTED)
        return self._release(ids, rows, drop)

    def evict_slots(self, slots: torch.Tensor, lh: torch.Tensor) -> int:
        """Free live head-slots named directly (as a live list holds them): `slots` and their
        flat (layer * H + head) index `lh`, int64 tensors of one shape, each slot live and listed
        once (the caller's lists guarantee it; not re-validated on this hot path)."""
        slots = slots.reshape(-1)
        k = slots.numel()
        if k == 0:
            return 0
        vids = self.slot_vid[slots].long()
        self.slot_map.view(self.num_virtual, self.heads_per_token)[vids, lh.reshape(-1)] = EVICTED
        self._push(slots)
        return k

    def free(self, virtual_ids: torch.Tensor) -> int:
        """Free all remaining head-slots of these tokens; tokens with none left are fine.

        Returns the number freed.
        """
        ids = self._ids(virtual_ids)
        rows = self.slot_map[ids]
        return self._release(ids, rows, rows != EVICTED)

    def _release(self, ids: torch.Tensor, rows: torch.Tensor, drop: torch.Tensor) -> int:
        slots = rows[drop]
        self._push(slots)
        self.slot_map[ids] = torch.where(drop, torch.full_like(rows, EVICTED), rows)
        return slots.numel()

    # ------------------------------------------------------------------ queries
    def live_counts(self, virtual_ids: torch.Tensor) -> torch.Tensor:
        """int64 [L, H]: live head-slots per (layer, head) among these tokens."""
        ids = self._ids(virtual_ids, unique=False)
        return (self.slot_map[ids] != EVICTED).sum(0, dtype=torch.long)

    def live_indices(
        self, virtual_ids_per_request: Sequence[torch.Tensor], layer: int
    ) -> LiveIndices:
        """Ragged per-(request, kv_head) head-slot lists of one layer (FlashInfer paged layout
        with page size 1, each (request, kv_head) one sequence with one KV head).

        Sequence r*H + h lists the live head-slots of request r's tokens for head h, in the order
        of the request's virtual ids. A token may appear in several requests (shared prefix).
        """
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer!r}")
        counts, parts = [], []
        for r, v in enumerate(virtual_ids_per_request):
            ids = self._ids(v, what=f"request {r} virtual_ids", unique=False)
            per_head = self.slot_map[ids, layer].t()  # [H, T_r]: row-major = head, then token
            live = per_head != EVICTED
            parts.append(per_head[live])
            counts.append(live.sum(1))
        h = self.num_kv_heads
        indptr = torch.zeros(len(counts) * h + 1, dtype=torch.int32, device=self.device)
        if counts:
            indptr[1:] = torch.cat(counts).cumsum(0)
            indices = torch.cat(parts).to(torch.int32)
        else:
            indices = torch.zeros(0, dtype=torch.int32, device=self.device)
        return LiveIndices(indptr, indices)

    # ------------------------------------------------------------------ integrity
    def check_integrity(self) -> None:
        """Raise HeadSlotIntegrityError unless every head-slot is exactly one of free or referenced
        once, the free stack has no duplicates, and the counters agree with the tensors."""
        cap = self.capacity
        if not 0 <= self._num_free <= cap:
            raise HeadSlotIntegrityError(f"num_free {self._num_free} outside [0, {cap}]")
        bad_map = (self.slot_map < EVICTED) | (self.slot_map >= cap)
        if bool(bad_map.any()):
            v, l, h = (int(x) for x in bad_map.nonzero()[0])
            raise HeadSlotIntegrityError(
                f"slot_map[{v}, {l}, {h}] = {int(self.slot_map[v, l, h])} is not a head-slot id "
                f"in [0, {cap}) nor EVICTED"
            )
        free = self.free_slots[: self._num_free].long()
        if free.numel() and (int(free.min()) < 0 or int(free.max()) >= cap):
            bad = int(free.min()) if int(free.min()) < 0 else int(free.max())
            raise HeadSlotIntegrityError(f"free list holds {bad}, outside [0, {cap})")
        live = self.slot_map != EVICTED
        referenced = self.slot_map[live].long()
        free_count = torch.bincount(free, minlength=cap)
        ref_count = torch.bincount(referenced, minlength=cap)

        def where(slot: int) -> str:
            locs = (self.slot_map == slot).nonzero().tolist()
            return ", ".join(f"(virtual id {v}, layer {l}, head {h})" for v, l, h in locs)

        dup_free = (free_count > 1).nonzero()
        if dup_free.numel():
            s = int(dup_free[0, 0])
            raise HeadSlotIntegrityError(
                f"head-slot {s} is {int(free_count[s])} times in the free list"
            )
        dup_ref = (ref_count > 1).nonzero()
        if dup_ref.numel():
            s = int(dup_ref[0, 0])
            raise HeadSlotIntegrityError(
                f"head-slot {s} referenced {int(ref_count[s])} times: {where(s)}"
            )
        both = ((free_count > 0) & (ref_count > 0)).nonzero()
        if both.numel():
            s = int(both[0, 0])
            raise HeadSlotIntegrityError(f"head-slot {s} is free and referenced by {where(s)}")
        leaked = ((free_count == 0) & (ref_count == 0)).nonzero()
        if leaked.numel():
            s = int(leaked[0, 0])
            raise HeadSlotIntegrityError(
                f"head-slot {s} leaked: neither free nor referenced ({leaked.shape[0]} leaked)"
            )
        vid_of = live.nonzero()[:, 0]
        if not torch.equal(self.slot_vid[referenced].long(), vid_of):
            raise HeadSlotIntegrityError("slot_vid disagrees with slot_map for a live head-slot")
        if bool((self.slot_vid[free] != -1).any()):
            raise HeadSlotIntegrityError("a free head-slot still names a virtual id")
        n_live = referenced.numel()
        if n_live != self._num_live:
            raise HeadSlotIntegrityError(
                f"num_live counter {self._num_live} != {n_live} head-slots referenced in slot_map"
            )
        if self._num_free + n_live != cap:
            raise HeadSlotIntegrityError(
                f"num_free {self._num_free} + num_live {n_live} != capacity {cap}"
            )


def _is_int_dtype(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _first_duplicate(values: torch.Tensor) -> int:
    """The first value (in order) that occurs earlier too; only called on the error path."""
    sorted_vals, order = torch.sort(values, stable=True)
    repeat = (sorted_vals[1:] == sorted_vals[:-1]).nonzero()[:, 0] + 1
    return int(values[order[repeat].min()])
