"""Persistent live lists: per (holder, layer, KV head) the ordered head-slots that still hold KV.

The source of truth between steps (ARCHITECTURE.md, "Data path v2"). A step's attention metadata
and the evictor's candidates are read from these lists, never rebuilt from the virtual map, so
no per-step cost grows with the tokens a request has already evicted.

Holders are req_to_token rows (running requests). Layout, with LH = layers x KV heads and page
size P:

    arena       int32 [num_pages, LH, P]   head-slot ids; a page holds P consecutive entries of
                                           each of a holder's LH lists
    row_pages   int32 [rows, pages_per_row] the holder's pages in order (a page table)
    lens        int32 [rows, LH]           live entries per list (device; `lens_host` mirrors it)
    shared      int32 [rows, LH]           how many of each list's first entries are shared
                                           (held by the radix tree; `shared_host` mirrors it)
    owner       int32 [capacity]           the holder whose private part lists each head-slot,
                                           or -1 (free, or shared: held by the tree)

Entry j of list (row, lh) sits at arena[row_pages[row, j // P], lh, j % P]. A new token appends
its head-slot at the end of each list: positions arrive in order, so lists stay sorted by
position and nothing is ever sorted. An eviction compacts the survivors to the front (stable),
once per buffer's worth of growth, amortised. A holder's pages cover its longest list; the host
keeps that span and the page table's size so that allocating pages never reads the device.

With the radix cache, a request's list is its matched prefix's surviving head-slots (shared: the
tree holds them, several requests may list them, their positions come first) followed by its
private entries (owned by the request, listed once). The request's own evictor only selects
among private entries; shared ones leave through the global evictor or when the tree frees
them. A request that matched a prefix has its lists loaded once from the virtual map (`load`).
"""

from __future__ import annotations

import torch

NO_OWNER = -1


class LiveListIntegrityError(RuntimeError):
    """Raised by `check_integrity` when the lists disagree with the head-slot pool."""


class LiveListsFull(RuntimeError):
    """The arena has no free page (cannot happen when it is sized by `pages_for`)."""


class LiveLists:
    def __init__(
        self,
        *,
        num_rows: int,
        max_row_len: int,
        heads_per_token: int,
        capacity: int,
        num_pages: int,
        page_size: int = 16,
        device: torch.device | str = "cpu",
    ):
        for name, v in (("num_rows", num_rows), ("max_row_len", max_row_len),
                        ("heads_per_token", heads_per_token), ("num_pages", num_pages),
                        ("page_size", page_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.device = torch.device(device)
        self.page_size = page_size
        self.heads_per_token = heads_per_token
        self.num_rows = num_rows
        self.pages_per_row = -(-max_row_len // page_size)
        self.arena = torch.full(
            (num_pages, heads_per_token, page_size), -1, dtype=torch.int32, device=self.device
        )
        self.row_pages = torch.full(
            (num_rows, self.pages_per_row), -1, dtype=torch.int32, device=self.device
        )
        self.lens = torch.zeros(num_rows, heads_per_token, dtype=torch.int32, device=self.device)
        self.shared = torch.zeros(num_rows, heads_per_token, dtype=torch.int32, device=self.device)
        self.owner = torch.full((capacity,), NO_OWNER, dtype=torch.int32, device=self.device)
        # Host mirrors: every list's length (so a step's indptr and sizes are known without a
        # device read), a holder's longest list and how many pages it holds, and the free pages.
        self.lens_host = torch.zeros(num_rows, heads_per_token, dtype=torch.long)
        self.shared_host = torch.zeros(num_rows, heads_per_token, dtype=torch.long)
        self.span = torch.zeros(num_rows, dtype=torch.long)
        self.num_row_pages = torch.zeros(num_rows, dtype=torch.long)
        self.row_pages_host = torch.full((num_rows, self.pages_per_row), -1, dtype=torch.long)
        self.free_pages = torch.arange(num_pages - 1, -1, -1, dtype=torch.long)
        self.num_free_pages = num_pages

    @staticmethod
    def pages_for(num_virtual: int, num_rows: int, page_size: int) -> int:
        """Pages that always suffice: a holder's span never exceeds the virtual ids it holds,
        which together are at most num_virtual, plus one partly filled page per holder."""
        return -(-num_virtual // page_size) + num_rows

    @staticmethod
    def bytes_per_virtual_token(heads_per_token: int) -> int:
        return 4 * heads_per_token

    @property
    def nbytes(self) -> int:
        t = (self.arena, self.row_pages, self.lens, self.shared, self.owner)
        return sum(x.numel() * x.element_size() for x in t)

    # ------------------------------------------------------------------ pages (host only)
    def _grow(self, rows: torch.Tensor, counts: torch.Tensor) -> None:
        """Give `rows` (host int64) pages for `counts` more entries in every list."""
        P = self.page_size
        need_total = (self.span[rows] + counts + P - 1) // P
        if bool((need_total > self.pages_per_row).any()):
            raise ValueError(
                f"a holder's list would exceed {self.pages_per_row * P} entries (req_to_token "
                "width)"
            )
        need = (need_total - self.num_row_pages[rows]).clamp(min=0)
        k = int(need.sum())
        if k == 0:
            return
        if k > self.num_free_pages:
            raise LiveListsFull(f"live-list arena: {k} pages needed, {self.num_free_pages} free")
        top = self.num_free_pages
        pages = self.free_pages[top - k : top].flip(0)
        self.num_free_pages -= k
        owner_rows = torch.repeat_interleave(rows, need)
        starts = torch.cumsum(need, 0) - need
        col = self.num_row_pages[owner_rows] + (
            torch.arange(k) - torch.repeat_interleave(starts, need)
        )
        self.row_pages_host[owner_rows, col] = pages
        self.num_row_pages[rows] += need
        self.row_pages[owner_rows.to(self.device), col.to(self.device)] = pages.to(
            self.device, torch.int32
        )

    def _shrink(self, rows: torch.Tensor, spans: torch.Tensor) -> None:
        """Set the exact spans of `rows` and return the pages past them to the free list."""
        P = self.page_size
        self.span[rows] = spans
        keep = (spans + P - 1) // P
        have = self.num_row_pages[rows]
        col = torch.arange(self.pages_per_row)
        drop = (col[None, :] >= keep[:, None]) & (col[None, :] < have[:, None])
        pages = self.row_pages_host[rows][drop]
        k = pages.numel()
        if k:
            self.free_pages[self.num_free_pages : self.num_free_pages + k] = pages
            self.num_free_pages += k
            r = rows[:, None].expand_as(drop)[drop]
            c = col[None, :].expand_as(drop)[drop]
            self.row_pages_host[r, c] = -1
            self.row_pages[r.to(self.device), c.to(self.device)] = -1
        self.num_row_pages[rows] = torch.minimum(have, keep)

    # ------------------------------------------------------------------ operations
    def append(self, rows: torch.Tensor, counts: torch.Tensor, slots: torch.Tensor) -> None:
        """Append the step's new tokens: request i of the step (its holder rows[i], host int64)
        got counts[i] tokens (host int64), in order; slots [T, LH] (device) are their
        head-slots, request-major as SGLang lays out a batch's new tokens."""
        T = slots.shape[0]
        if T == 0:
            return
        self._grow(rows, counts)
        dev = self.device
        rows_d, counts_d = rows.to(dev), counts.to(dev)
        q = torch.repeat_interleave(torch.arange(rows.numel(), device=dev), counts_d, output_size=T)
        starts = torch.cumsum(counts_d, 0) - counts_d
        k = torch.arange(T, device=dev) - starts[q]
        row_of = rows_d[q]
        at = self.lens[row_of].long() + k[:, None]  # [T, LH]
        page = self.row_pages[row_of[:, None], at // self.page_size].long()
        lh = torch.arange(self.heads_per_token, device=dev)[None, :].expand_as(at)
        self.arena[page, lh, at % self.page_size] = slots.to(torch.int32)
        self.lens.index_add_(0, rows_d, counts_d[:, None].expand(-1, self.heads_per_token).to(torch.int32))
        self.owner[slots.reshape(-1).long()] = row_of[:, None].expand_as(at).reshape(-1).to(torch.int32)
        self.lens_host[rows] += counts[:, None]
        self.span[rows] += counts

    def gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The lists of `rows` (host int64) padded to one width W (a whole number of pages):
        entries int64 [R, LH, W] (head-slots; -1 past a list's end) and valid bool [R, LH, W].
        Cost follows the rows' live entries, not their context."""
        dev = self.device
        R, LH, P = rows.numel(), self.heads_per_token, self.page_size
        npages = int(self.num_row_pages[rows].max()) if R else 0
        if npages == 0:
            e = torch.zeros(R, LH, 0, dtype=torch.long, device=dev)
            return e, e.bool()
        rows_d = rows.to(dev)
        pages = self.row_pages[rows_d, :npages].long()  # [R, np]; -1 where none
        ent = self.arena[pages.clamp(min=0)]  # [R, np, LH, P]
        ent = ent.permute(0, 2, 1, 3).reshape(R, LH, npages * P).long()
        j = torch.arange(npages * P, device=dev)
        valid = j[None, None, :] < self.lens[rows_d].long()[:, :, None]
        return ent.masked_fill(~valid, -1), valid

    def compact(self, rows: torch.Tensor, keep: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
        """Keep, in order, the entries of `rows` (host int64) where keep [R, LH, W] holds
        (`entries` as `gather` returned them); returns the new lens [R, LH] (device). The caller
        frees what was dropped. One host read: the new lengths and shared counts (the host
        mirrors; the spans return emptied pages)."""
        dev = self.device
        R, LH, W = keep.shape
        if R == 0:
            return torch.zeros(0, LH, dtype=torch.int32, device=dev)
        P = self.page_size
        rows_d = rows.to(dev)
        new_at = torch.cumsum(keep, dim=2) - 1  # stable: survivors keep their order
        r_i, lh_i, _ = keep.nonzero(as_tuple=True)
        at = new_at[keep]
        page = self.row_pages[rows_d[r_i], at // P].long()
        self.arena[page, lh_i, at % P] = entries[keep].to(torch.int32)
        new_lens = keep.sum(dim=2, dtype=torch.int32)
        j = torch.arange(W, device=dev)
        new_shared = (keep & (j < self.shared[rows_d][:, :, None])).sum(dim=2, dtype=torch.int32)
        self.lens[rows_d] = new_lens
        self.shared[rows_d] = new_shared
        host = torch.stack([new_lens, new_shared]).cpu().long()
        self.lens_host[rows] = host[0]
        self.shared_host[rows] = host[1]
        self._shrink(rows, host[0].max(dim=1).values)
        return new_lens

    def load(self, rows: torch.Tensor, entries: torch.Tensor, shared: torch.Tensor) -> None:
        """Replace the lists of `rows` (host int64) by entries [R, LH, W] (device; head-slots in
        position order, < 0 where none), of which each list's first shared [R, LH] (device) are
        shared. Owners are the caller's business. One host read: the new lengths."""
        dev = self.device
        R, LH, W = entries.shape
        self.drop(rows)
        if R == 0 or W == 0:
            return
        self._grow(rows, torch.full((R,), W, dtype=torch.long))
        self.span[rows] = W
        keep = entries >= 0
        self.compact(rows, keep, entries)
        self.shared[rows.to(dev)] = shared.to(torch.int32)
        self.shared_host[rows] = shared.cpu().long()

    def drop(self, rows: torch.Tensor) -> None:
        """Forget the lists of `rows` (host int64); their head-slots must be freed already or
        still be referenced by nobody else (the caller's business)."""
        if rows.numel() == 0:
            return
        self.lens[rows.to(self.device)] = 0
        self.shared[rows.to(self.device)] = 0
        self.lens_host[rows] = 0
        self.shared_host[rows] = 0
        self._shrink(rows, torch.zeros_like(rows))

    def reset(self) -> None:
        self.lens.zero_()
        self.shared.zero_()
        self.lens_host.zero_()
        self.shared_host.zero_()
        self.owner.fill_(NO_OWNER)
        self.row_pages.fill_(-1)
        self.row_pages_host.fill_(-1)
        self.span.zero_()
        self.num_row_pages.zero_()
        n = self.arena.shape[0]
        self.free_pages = torch.arange(n - 1, -1, -1, dtype=torch.long)
        self.num_free_pages = n

    # ------------------------------------------------------------------ integrity
    def check_integrity(self, slot_map: torch.Tensor, slot_pos: torch.Tensor,
                        tree_slots: torch.Tensor | None = None) -> None:
        """Raise LiveListIntegrityError unless every live head-slot of the pool (slot_map int32
        [V, L, H]) that the tree does not hold (tree_slots bool [capacity], None = none) is listed
        once, in the private part of its owner's list of its (layer, head); every head-slot the
        tree holds has no owner and is listed only in shared parts (by any number of holders);
        lists run in increasing position (slot_pos [capacity]); the mirrors and the page
        bookkeeping are exact."""
        self._check_pages()
        lens = self._check_mirrors()
        LH = self.heads_per_token
        rows = torch.arange(self.num_rows)
        entries, valid = self.gather(rows)
        entries, valid = entries.cpu(), valid.cpu()
        W = entries.shape[2]
        shared = self.shared.cpu().long()
        if not torch.equal(shared, self.shared_host) or bool((shared > lens).any()):
            raise LiveListIntegrityError("shared counts differ from their mirror or exceed a list")
        in_shared = valid & (torch.arange(W)[None, None, :] < shared[:, :, None])
        private = valid & ~in_shared
        V = slot_map.shape[0]
        flat = slot_map.reshape(V, LH).cpu().long()
        live = flat >= 0
        want = flat[live]
        cap = self.owner.numel()
        held = torch.zeros(cap, dtype=torch.bool) if tree_slots is None else tree_slots.cpu()
        is_live = torch.zeros(cap, dtype=torch.bool)
        is_live[want] = True
        listed = entries[valid]
        if bool((~is_live[listed]).any()):
            raise LiveListIntegrityError(f"head-slot {int(listed[~is_live[listed]][0])} is listed but not live")
        mine = entries[private]
        seen = torch.bincount(mine, minlength=cap)
        ref = (is_live & ~held).long()
        if not torch.equal(seen, ref):
            s = int((seen != ref).nonzero()[0, 0])
            raise LiveListIntegrityError(
                f"head-slot {s} is listed privately {int(seen[s])} times, expected {int(ref[s])}"
            )
        if bool((~held[entries[in_shared]]).any()):
            raise LiveListIntegrityError("a shared list entry is not held by the tree")
        # each entry sits in the list of its own (layer, head); private ones with their owner
        lh_of = torch.full((cap,), -1, dtype=torch.long)
        lh_of[want] = live.nonzero()[:, 1]
        r_i, lh_i, _ = valid.nonzero(as_tuple=True)
        if not torch.equal(lh_of[listed], lh_i):
            raise LiveListIntegrityError("an entry sits in the list of another (layer, head)")
        owner = self.owner.cpu().long()
        r_p = private.nonzero(as_tuple=True)[0]
        if not torch.equal(owner[mine], r_p):
            raise LiveListIntegrityError("an entry's owner is not the holder listing it")
        unowned = torch.ones(cap, dtype=torch.bool)
        unowned[mine] = False
        if bool((owner[unowned] != NO_OWNER).any()):
            raise LiveListIntegrityError("a head-slot in no private list still has an owner")
        pos = slot_pos.cpu().long()[entries.clamp(min=0)]
        pos = pos.masked_fill(~valid, torch.iinfo(torch.long).max)
        later = valid[:, :, 1:]
        if bool((later & (pos[:, :, 1:] <= pos[:, :, :-1])).any()):
            raise LiveListIntegrityError("a list is not in increasing position order")

    def _check_pages(self) -> None:
        """Each arena page is free or owned by one holder, within its page count; the device
        page table equals its host mirror."""
        # pages: each either free or owned by one holder, within its page count
        n = self.arena.shape[0]
        used = self.row_pages_host[self.row_pages_host >= 0]
        count = torch.bincount(used, minlength=n) + torch.bincount(
            self.free_pages[: self.num_free_pages], minlength=n
        )
        if bool((count != 1).any()):
            p = int((count != 1).nonzero()[0, 0])
            raise LiveListIntegrityError(f"arena page {p} is used/free {int(count[p])} times")
        col = torch.arange(self.pages_per_row)
        inside = col[None, :] < self.num_row_pages[:, None]
        if not torch.equal(self.row_pages_host >= 0, inside):
            raise LiveListIntegrityError("page table entries disagree with page counts")
        if not torch.equal(self.row_pages.cpu().long(), self.row_pages_host):
            raise LiveListIntegrityError("device page table differs from its host mirror")

    def _check_mirrors(self) -> torch.Tensor:
        """The host mirrors of the lengths and spans against the device; returns the lengths."""
        P = self.page_size
        lens = self.lens.cpu().long()
        if not torch.equal(lens, self.lens_host):
            r = int((lens != self.lens_host).any(1).nonzero()[0, 0])
            raise LiveListIntegrityError(f"row {r}: host list lengths differ from the device's")
        if not torch.equal(lens.max(dim=1).values, self.span):
            r = int((lens.max(dim=1).values != self.span).nonzero()[0, 0])
            raise LiveListIntegrityError(
                f"row {r}: span {int(self.span[r])} != longest list {int(lens[r].max())}"
            )
        if bool((self.span > self.num_row_pages * P).any()):
            raise LiveListIntegrityError("a holder's span exceeds its pages")
        return lens
