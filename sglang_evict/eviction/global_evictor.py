"""The global evictor: one ranking over the whole head-slot pool when it runs short.

Every running request's private entries (each scored by its own policy; a request with policy
none is never reclaimed from) and every head-slot the radix tree holds (scored by the server's
policy at its youngest holder's length; pinned while a policy-none request lists it) compete in
one selection; the lowest utility leaves first, protected entries never.

Policies score on their own ranges (streaming -(t - pos), random [0, 1), retention
(t - pos) log beta, knorm -|k|), so raw scores would make the choice of policy a claim on the
pool: the policy with the higher range is reclaimed from last. When entries of more than one
policy compete, each policy's scores become their quantile among that policy's evictable
entries (ties to the lower index, as before), so every policy loses the same share of what it
could lose, and within a policy the ranking is its own. One policy alone ranks as before.

With `tree_first` (--evict-reclaim tree-first) the tree's evictable entries all go before any
running request's: lossless for the requests running, at the cost of holes in cached prefixes
that later turns would match."""

from __future__ import annotations

import logging
import math

import torch

from sglang_evict.eviction.evictor import keep_top

logger = logging.getLogger(__name__)


class GlobalEvictor:
    def __init__(self, cache, requests, select_keep=None, tree_first: bool = False):
        self.cache = cache
        self.tree_first = tree_first
        self.requests = requests  # RequestEvictors: each row's policy
        # Ranks every live head-slot of the pool as one row: the Triton radix select spreads
        # that over many programs (a k-th value runs one block per row); None: torch.
        self._select_keep = select_keep
        self.reclaims = 0
        self.reclaimed_total = 0

    def rows(self) -> torch.Tensor:
        """Host rows the global evictor may take from: running, holding entries, evicting."""
        st = self.cache.stats
        return (st.active & (st.live > 0) & (self.requests.row_evictor >= 0)).nonzero()[:, 0]

    def reclaim(self, deficit: int) -> int:
        """Free at least `deficit` head-slots, lowest utility first. Returns the number freed
        (less than deficit only when too much is protected)."""
        c = self.cache
        dev = c.device
        st = c.stats
        rows = self.rows()
        entries, valid = c.lists.gather(rows)
        R, LH, W = entries.shape
        private = c.tree.private(rows, valid)
        scores = torch.full((R, LH, W), -math.inf, device=dev)
        ev_ids = self.requests.row_evictor[rows]
        pos = c.pos[entries.clamp(min=0)]
        seq = st.seq_len[rows].to(dev)
        for i in torch.unique(ev_ids).tolist():  # one pass per distinct policy
            sel = (ev_ids == i).to(dev)
            scores[sel] = self.requests.evictors[i].score_lists(
                entries[sel], private[sel], pos[sel], seq[sel], c.log_beta, c.k
            )
        tree_slots, tree_lh, tree_scores = self._tree_candidates()
        flat = torch.cat([scores.view(-1), tree_scores])
        groups = self._policy_groups(ev_ids, scores.shape[1] * scores.shape[2],
                                     tree_scores.numel())
        if groups is not None:
            flat = common_scale(flat, groups)
        if self.tree_first and tree_scores.numel():
            flat = tree_before_requests(flat, scores.numel())
        live = int(private.sum()) + tree_slots.numel()
        evictable = int(torch.isfinite(flat).sum())  # -inf: no entry; +inf: protected
        take = min(deficit, evictable)
        if take <= 0:
            return 0
        # ties to the lower (row, layer, head, list index), then the tree's entries
        if self._select_keep is not None:
            keep = self._select_keep(flat, live - take)
        else:
            tie = torch.arange(flat.numel(), device=dev).view(1, -1)
            keep = keep_top(flat.view(1, -1), live - take, tie)[0]
        n_rows = R * LH * W
        keep_rows = (keep[:n_rows].view(R, LH, W) & valid) | (valid & ~private)
        dropped = c.drop(rows, entries, valid, keep_rows)
        st.reclaimed[rows] += dropped
        st.evicted[rows] += dropped
        st.live[rows] -= dropped
        gone = ~keep[n_rows:]
        freed = int(dropped.sum()) + c.tree.evict(tree_slots[gone], tree_lh[gone])
        self.reclaims += 1
        self.reclaimed_total += freed
        c.evicted_total += freed
        logger.info("sglang-evict: reclaimed %d head-slots across %d requests and the tree",
                    freed, R)
        return freed

    def _policy_groups(self, ev_ids: torch.Tensor, per_row: int, n_tree: int):
        """Each flat entry's policy (rows' entries, then the tree's, scored by the server's
        policy) as a small int, or None when one policy scores them all."""
        names = [e.config.policy.name for e in self.requests.evictors]
        default = self.requests.default
        known = names + ([default.config.policy.name] if default is not None else [])
        ids = {n: i for i, n in enumerate(dict.fromkeys(known))}
        row_group = torch.tensor([ids[n] for n in names] or [0], dtype=torch.long)[ev_ids]
        parts = [row_group.repeat_interleave(per_row)]
        if n_tree:
            parts.append(torch.full((n_tree,), ids[default.config.policy.name], dtype=torch.long))
        groups = torch.cat(parts).to(self.cache.device)
        if groups.numel() == 0 or bool((groups == groups[0]).all()):
            return None
        return groups

    def _tree_candidates(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tree's live head-slots (slots, layer*H + head, scores): the server's policy
        scores them at their youngest holder's length; pinned ones score +inf."""
        c = self.cache
        default = self.requests.default
        none = torch.zeros(0, dtype=torch.long, device=c.device)
        if c.tree.live == 0 or default is None:
            return none, none, torch.zeros(0, device=c.device)
        slots, lh, t, pinned = c.tree.candidates(self.requests.row_evictor < 0)
        n = slots.numel()
        scores = default.score_lists(
            slots.view(1, 1, n), torch.ones(1, 1, n, dtype=torch.bool, device=c.device),
            c.pos[slots].view(1, 1, n), t.view(1, 1, n), c.log_beta, c.k,
        ).view(n)
        return slots, lh, scores.masked_fill(pinned, math.inf)

    def reclaimable(self) -> int:
        """A lower bound on what `reclaim` frees now, judged as reclaim judges: the tree's
        head-slots exactly (scored by the server's policy at their youngest holder's length,
        pinned ones excluded), plus each request's private live entries less an upper bound on
        its protected ones (sinks plus recent window per layer and head; no scoring)."""
        c = self.cache
        rows = self.rows()
        tree = self._tree_reclaimable()
        if rows.numel() == 0:
            return tree
        pols = [e.config.policy for e in self.requests.evictors]
        prot = torch.tensor([p.sinks + p.window + 1 for p in pols], dtype=torch.long)
        protected = torch.minimum(c.stats.seq_len[rows], prot[self.requests.row_evictor[rows]])
        live = (c.lists.lens_host[rows] - c.lists.shared_host[rows]).sum(dim=1)
        return int((live - protected * c.heads_per_token).clamp(min=0).sum()) + tree

    def _tree_reclaimable(self) -> int:
        """The tree's head-slots `reclaim` may take: its live entries less those the server's
        policy protects at their youngest holder's length and those a policy-none request pins
        (the host counts, when no running request lists any of them)."""
        c = self.cache
        if c.tree.live == 0 or self.requests.default is None:
            return 0
        listing = c.stats.active & c.lists.shared_host.any(dim=1)
        if not bool(listing.any()):  # every entry judged at the length the tree took it from
            return max(c.tree.live - c.tree.protected, 0)
        _, _, scores = self._tree_candidates()
        return int(torch.isfinite(scores).sum())


def common_scale(flat: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Each group's finite scores replaced by their quantile (rank + 1/2) / n within the group,
    ties to the lower index; +inf (protected) and -inf (no entry) stay."""
    out = flat.clone()
    finite = torch.isfinite(flat)
    for g in torch.unique(groups[finite]).tolist():  # one pass per policy, not per request
        idx = (finite & (groups == g)).nonzero()[:, 0]
        order = torch.sort(flat[idx], stable=True).indices
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=flat.device)
        out[idx] = (rank.to(flat.dtype) + 0.5) / order.numel()
    return out


def tree_before_requests(flat: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Every finite score of the tree's entries (after the first `n_rows`) below every finite
    score of the requests', each part keeping its own order (both become their quantiles, the
    tree's less 1); +inf and -inf stay."""
    part = torch.zeros(flat.numel(), dtype=torch.long, device=flat.device)
    part[n_rows:] = 1
    out = common_scale(flat, part)
    tree = torch.isfinite(out)
    tree[:n_rows] = False
    out[tree] -= 1.0
    return out
