"""What SGLang's radix tree holds of the head-slot pool, and the requests that share it.

When the tree takes a request's tokens (`insert`), their surviving head-slots become shared:
the tree holds them with their scores and positions (per virtual id, `tree_t` is the length of
the sequence it took them from: their age for the global evictor), later requests that match
the prefix list them first in their lists (`load_rows`), a request's own evictor no longer
takes them unless no other request lists them. Host counts (`live`, `protected`) mirror what
the tree holds so that admission and the step's balance read nothing from the device.

    tree_t      int64 [virtual ids]  the sequence length the tree took the id from; -1: not held
    holders     int32 [capacity]     how many requests list the head-slot in their shared part
    alone_host  int64 [rows, L*H]    per list, the shared entries the row alone lists (host)

A shared head-slot is freed when SGLang's tree frees its virtual id, or by the global evictor
(`evict`: a hole in the tree's copy, lost by every request that lists it)."""

from __future__ import annotations

import torch

from sglang_evict.cache.live_lists import NO_OWNER


class TreeShare:
    def __init__(self, pool, lists, pos: torch.Tensor, stats, num_rows: int,
                 protect: tuple[int, int] | None):
        self.pool = pool
        self.lists = lists
        self.pos = pos
        self.stats = stats
        self.device = pos.device
        # (sinks, window) of the server's policy, which scores the tree's entries; None: the
        # server evicts nothing, and the tree's entries are all protected.
        self.protect = protect
        self.tree_t = torch.full((pool.num_virtual,), -1, dtype=torch.long, device=self.device)
        self.live = 0
        self.protected = 0
        self.holders = torch.zeros(pool.capacity, dtype=torch.int32, device=self.device)
        self.alone_host = torch.zeros(num_rows, pool.heads_per_token, dtype=torch.long)

    # ------------------------------------------------------------------ the parts of a list
    def shared_part(self, rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """bool [R, LH, W]: the gathered entries of `rows` in their lists' shared parts."""
        j = torch.arange(valid.shape[2], device=self.device)
        return valid & (j < self.lists.shared[rows.to(self.device)][:, :, None])

    def private(self, rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """bool [R, LH, W]: the gathered entries of `rows` past their lists' shared parts."""
        return valid & ~self.shared_part(rows, valid)

    def own(self, rows: torch.Tensor, entries: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """bool [R, LH, W]: what each row's own evictor may take: its private entries, and the
        shared ones that no other request lists (taking them leaves a hole in the tree's copy,
        as the global evictor would)."""
        alone = self.holders[entries.clamp(min=0)] == 1
        return valid & (~self.shared_part(rows, valid) | alone)

    def add_holders(self, rows: torch.Tensor, delta: int) -> None:
        """Add `delta` to the refcount of every head-slot in the shared parts of `rows`."""
        if rows.numel() == 0 or not bool(self.lists.shared_host[rows].any()):
            return
        entries, valid = self.lists.gather(rows)
        slots = entries[self.shared_part(rows, valid)]
        ones = torch.full_like(slots, delta, dtype=torch.int32)
        self.holders.index_put_((slots,), ones, accumulate=True)

    def refresh_alone(self) -> None:
        """Recount, for every row with a shared part, the shared entries it alone lists (after
        requests started or stopped sharing a prefix; never per step)."""
        self.alone_host.zero_()
        rows = self.lists.shared_host.any(dim=1).nonzero()[:, 0]
        if rows.numel() == 0:
            return
        entries, valid = self.lists.gather(rows)
        alone = self.shared_part(rows, valid) & (self.holders[entries.clamp(min=0)] == 1)
        self.alone_host[rows] = alone.sum(dim=2).cpu().long()

    # ------------------------------------------------------------------ the tree's counts
    def held(self, slots: torch.Tensor) -> torch.Tensor:
        return self.tree_t[self.pool.slot_vid[slots].long()] >= 0

    def protected_mask(self, pos: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Which tree entries the server's policy protects (sinks, recent window at length t)."""
        if self.protect is None:
            return torch.ones_like(pos, dtype=torch.bool)
        sinks, window = self.protect
        return (pos < sinks) | ((window > 0) & (pos >= t - window))

    def count(self, slots: torch.Tensor, sign: int) -> int:
        """Add (sign 1) or remove (sign -1) live head-slots the tree holds (tree_t set) to or
        from the host counts; returns how many."""
        n = slots.numel()
        if n:
            vid = self.pool.slot_vid[slots].long()
            prot = int(self.protected_mask(self.pos[slots], self.tree_t[vid]).sum())
            self.live += sign * n
            self.protected += sign * prot
        return n

    def forget(self, slots: torch.Tensor) -> int:
        """The tree loses these live head-slots it held (about to be evicted); returns how
        many."""
        self.holders[slots] = 0
        return self.count(slots, -1)

    def freed(self, ids: torch.Tensor, slots: torch.Tensor) -> None:
        """SGLang frees virtual ids `ids`, whose live head-slots are `slots`."""
        if self.live and slots.numel():
            self.count(slots[self.held(slots)], -1)
        self.tree_t[ids] = -1

    # ------------------------------------------------------------------ the tree's checkpoints
    def insert(self, row: int, req_to_token: torch.Tensor, protected: int, running: bool) -> None:
        """SGLang's radix tree now holds the first `protected` tokens of `row` (a request's
        checkpoint: finished, or a chunk of a running one). Their head-slots become shared:
        no longer the request's to evict, kept with their scores for later matches. A running
        row is reloaded (SGLang may have rewritten it to ids the tree already had); a leaving
        row keeps only what is still its own."""
        ids = req_to_token[row, :protected].to(self.device, torch.long)
        new = ids[self.tree_t[ids] < 0]
        if new.numel():
            self.tree_t[new] = int(self.stats.seq_len[row])
            sm = self.pool.slot_map[new].long()  # [k, L, H]
            held = sm[sm >= 0]
            self.lists.owner[held] = NO_OWNER
            self.count(held, 1)
        rows = torch.tensor([row])
        if running:
            self.load_rows(rows, req_to_token, self.stats.seq_len[rows].clamp(min=protected),
                           torch.tensor([protected]))
        else:
            self.keep_owned(rows)

    def load_rows(self, rows: torch.Tensor, req_to_token: torch.Tensor, lens: torch.Tensor,
                  protected: torch.Tensor) -> None:
        """Rebuild the lists of `rows` (host int64) from the virtual map: the live head-slots of
        req_to_token[row, :lens[row]] in position order, those of the first protected[row]
        tokens (the tree's) shared, the rest owned by the row. For a request that matched a
        cached prefix, and after SGLang rewrote a running row to the tree's ids; its cost
        follows the row's length, once."""
        dev = self.device
        R, LH = rows.numel(), self.pool.heads_per_token
        W = int(lens.max()) if R else 0
        rows_d = rows.to(dev)
        j = torch.arange(W, device=dev)
        ids = req_to_token[rows_d, :W].to(dev, torch.long)
        ok = j[None, :] < lens.to(dev)[:, None]
        slots = self.pool.slot_map[ids.clamp(min=0)].view(R, W, LH).long()
        slots = slots.masked_fill(~ok[:, :, None], -1).permute(0, 2, 1)  # [R, LH, W]
        is_shared = (slots >= 0) & (j[None, None, :] < protected.to(dev)[:, None, None])
        self.add_holders(rows, -1)
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
        self.refresh_alone()
        self.stats.live[rows] = self.lists.lens_host[rows].sum(dim=1)

    def keep_owned(self, rows: torch.Tensor) -> None:
        """Drop from the lists of `rows` (host int64) every entry they do not own (shared ones:
        a request leaving no longer lists the tree's head-slots)."""
        if rows.numel() == 0 or not bool(self.lists.lens_host[rows].any()):
            return
        self.add_holders(rows, -1)
        entries, valid = self.lists.gather(rows)
        keep = valid & (self.lists.owner[entries.clamp(min=0)] == rows.to(self.device)[:, None, None])
        self.lists.compact(rows, keep, entries)
        self.refresh_alone()
        self.stats.live[rows] = self.lists.lens_host[rows].sum(dim=1)

    # ------------------------------------------------------------------ for the global evictor
    def candidates(self, never: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The live head-slots the tree holds: (slots, their layer*H + head, the length of
        their youngest holder, pinned). The youngest holder is the sequence the tree took them
        from, or a running request that lists them at a shorter length; a head-slot is pinned
        while a request that never evicts (`never`: host bool per row) lists it."""
        dev = self.device
        LH = self.pool.heads_per_token
        vids = (self.tree_t >= 0).nonzero()[:, 0]
        sm = self.pool.slot_map[vids].view(-1, LH).long()
        held = sm >= 0
        slots = sm[held]
        lh = held.nonzero()[:, 1]
        t_min = torch.full((self.pool.capacity,), torch.iinfo(torch.long).max,
                           dtype=torch.long, device=dev)
        t_min[slots] = self.tree_t[vids][:, None].expand_as(sm)[held]
        pinned = torch.zeros(self.pool.capacity, dtype=torch.bool, device=dev)
        listing = (self.stats.active & self.lists.shared_host.any(dim=1)).nonzero()[:, 0]
        if listing.numel():
            entries, valid = self.lists.gather(listing)
            shared = self.shared_part(listing, valid)
            seq = self.stats.seq_len[listing].to(dev)[:, None, None].expand_as(entries)
            t_min.scatter_reduce_(0, entries[shared], seq[shared], reduce="amin")
            nev = never[listing].to(dev)[:, None, None].expand_as(entries)
            pinned[entries[shared & nev]] = True
        return slots, lh, t_min[slots], pinned[slots]

    def evict(self, slots: torch.Tensor, lh: torch.Tensor) -> int:
        """Evict head-slots the tree holds: their virtual ids keep their keys in the tree with
        holes here; every running request that lists them loses them too."""
        n = slots.numel()
        if n == 0:
            return 0
        self.forget(slots)
        self.pool.evict_slots(slots, lh)
        listing = self.lists.shared_host.any(dim=1).nonzero()[:, 0]
        if listing.numel():
            gone = torch.zeros(self.pool.capacity, dtype=torch.bool, device=self.device)
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
        self.refresh_alone()
        return n

    # ------------------------------------------------------------------ whole-cache events
    def reset(self) -> None:
        self.tree_t.fill_(-1)
        self.live = self.protected = 0
        self.holders.zero_()
        self.alone_host.zero_()

    def check_integrity(self, tree_slots: torch.Tensor | None = None) -> None:
        """The host counts against the device: what the tree holds and protects, the shared
        refcounts against the lists' shared parts, the rows' alone counts. `tree_slots`:
        `held_mask()` when the caller computed it already."""
        vid = self.pool.slot_vid.long()
        if tree_slots is None:
            tree_slots = self.held_mask()
        if int(tree_slots.sum()) != self.live:
            raise RuntimeError(f"tree holds {int(tree_slots.sum())} head-slots, counted {self.live}")
        rows = torch.arange(self.alone_host.shape[0])
        entries, valid = self.lists.gather(rows)
        shared = self.shared_part(rows, valid)
        count = torch.bincount(entries[shared], minlength=self.pool.capacity).to(self.device)
        if not torch.equal(count.int(), self.holders):
            raise RuntimeError("shared refcounts differ from the lists' shared parts")
        alone = (shared & (self.holders[entries.clamp(min=0)] == 1)).sum(dim=2).cpu().long()
        if not torch.equal(alone, self.alone_host):
            raise RuntimeError("host counts of shared entries a row alone lists are stale")
        if self.live:
            s = tree_slots.nonzero()[:, 0]
            prot = self.protected_mask(self.pos[s], self.tree_t[vid[s]])
            if int(prot.sum()) != self.protected:
                raise RuntimeError(f"tree protects {int(prot.sum())} head-slots, counted "
                                   f"{self.protected}")

    def held_mask(self) -> torch.Tensor:
        """bool [capacity]: the head-slots the tree holds, from the device (debug checks)."""
        vid = self.pool.slot_vid.long()
        return (vid >= 0) & (self.tree_t[vid.clamp(min=0)] >= 0)
