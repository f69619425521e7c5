"""Each running request's evictor (its policy and budget, the server's or its override) and the
batched enforcement of their budgets after a step."""

from __future__ import annotations

import torch

from sglang_evict.eviction.evictor import Evictor


class RequestEvictors:
    """The table the step dispatches on: `row_evictor[row]` indexes `evictors`, -1 = never evict
    that request (policy none). `cache` is the head-slot cache whose rows these are: its lists,
    statistics, tree share and `drop`."""

    def __init__(self, cache, default: Evictor | None, num_rows: int):
        self.cache = cache
        self.default = default
        self.evictors: list[Evictor] = []
        self.row_evictor = torch.full((num_rows,), -1, dtype=torch.long)
        self.row_evictor.fill_(self.index_of(default))

    def index_of(self, evictor: Evictor | None) -> int:
        """The evictor's index in the table. An index no row uses is reused, so the table (and
        what a step or `reclaimable` does per evictor) stays bounded by the distinct policies of
        the requests running now, not of every request ever seen. Runs at admission and
        release, never per step."""
        if evictor is None:
            return -1
        for i, e in enumerate(self.evictors):
            if e is evictor:
                return i
        in_use = set(self.row_evictor.unique().tolist())
        for i, e in enumerate(self.evictors):
            if i not in in_use and e is not self.default:
                self.evictors[i] = evictor
                return i
        self.evictors.append(evictor)
        return len(self.evictors) - 1

    def set_row(self, row: int, evictor: Evictor | None) -> None:
        self.row_evictor[row] = self.index_of(evictor)

    def of(self, row: int) -> Evictor | None:
        i = int(self.row_evictor[row])
        return self.evictors[i] if i >= 0 else None

    def release(self, row: int) -> Evictor | None:
        """The row's evictor; the row goes back to the server's."""
        evictor = self.of(row)
        self.row_evictor[row] = self.index_of(self.default)
        return evictor

    def reset(self) -> None:
        self.row_evictor.fill_(self.index_of(self.default))

    # ------------------------------------------------------------------ after a step
    def enforce(self, rows: torch.Tensor) -> None:
        """Evict from the step's requests (host int64 rows) that crossed their trigger: one
        batched pass per distinct policy among them."""
        ev_ids = self.row_evictor[rows]
        for i in torch.unique(ev_ids[ev_ids >= 0]).tolist():
            evictor = self.evictors[i]
            mine = rows[ev_ids == i]
            live, span = self.own_counts(mine)
            due = mine[evictor.triggered(live, span)]
            if due.numel():
                self._evict_rows(due, evictor)

    def own_counts(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Host int64 [R] each: the entries `rows` may evict themselves (private, and shared
        ones no other request lists) and their longest such list: what their budget counts."""
        c = self.cache
        lists = c.lists
        shared = lists.shared_host[rows]
        if not bool(shared.any()):
            return c.stats.live[rows], lists.span[rows]
        own = lists.lens_host[rows] - shared + c.tree.alone_host[rows]
        return own.sum(dim=1), own.max(dim=1).values

    def _evict_rows(self, rows: torch.Tensor, evictor: Evictor) -> None:
        c = self.cache
        entries, valid = c.lists.gather(rows)
        pos = c.pos[entries.clamp(min=0)]
        seq = c.stats.seq_len[rows].to(c.device)
        # a request's own eviction never takes an entry another request lists
        own = c.tree.own(rows, entries, valid)
        keep = evictor.keep_lists(entries, own, pos, seq, c.log_beta, c.k)
        keep = keep | (valid & ~own)
        free_before = c.pool.num_free
        dropped = c.drop(rows, entries, valid, keep)
        st = c.stats
        hit = dropped > 0
        r = rows[hit]
        st.live[rows] -= dropped
        st.evicted[r] += dropped[hit]
        c.evicted_total += int(dropped.sum())
        st.evictions[r] += 1
        st.free_before_last_evict[r] = free_before
        st.free_after_last_evict[r] = c.pool.num_free
