"""SGLang's radix cache around a HeadKVCache, as 0.5.23 drives it: a finishing request's tokens go
into the tree (its row released first, then the checkpoint, then the row's leftovers freed); a
new request that matches a cached prefix gets the tree's virtual ids in its row; a chunked
request's checkpoint may rewrite its row to ids the tree already had (its own duplicates freed);
the tree frees a node's ids when it evicts it, never while a running request locks it."""

from __future__ import annotations

import torch

from head_cache_sim import CacheSim


class RadixSim(CacheSim):
    def __init__(self, cache, rows: int = 4, ctx: int = 256, seed: int = 0):
        super().__init__(cache, rows, ctx, seed)
        self.sequences: list[torch.Tensor] = []  # what the tree holds, one id sequence each
        self.tree_ref: dict[int, int] = {}  # virtual id -> tree sequences holding it
        self.matched: dict[int, int] = {}  # row -> sequence index it locked
        self.protected: dict[int, int] = {}  # row -> its ids the tree holds (a prefix)

    # ------------------------------------------------------------------ request side
    def admit(self, row: int, seq: int | None, prefix: int, new_tokens: int, log_beta=None):
        """A new request on `row`: the first `prefix` ids of tree sequence `seq` (a match), then a
        prefill of `new_tokens`."""
        assert self.lens[row] == 0
        if seq is not None and prefix:
            ids = self.sequences[seq][:prefix]
            self.req_to_token[row, :prefix] = ids.int()
            self.lens[row] = prefix
            self.matched[row] = seq
            self.protected[row] = prefix
        try:
            return self.step({row: new_tokens}, log_beta=log_beta, extend=True)
        except Exception:  # not admitted (SGLang would have kept it waiting): no match either
            self.lens[row] = 0
            self.matched.pop(row, None)
            self.protected.pop(row, None)
            raise

    def finish(self, row: int, into_tree: bool = True):
        """SGLang's release_kv_cache: statistics handed over, then the checkpoint inserts the row
        into the tree (or not: abort), then whatever the tree did not take is freed."""
        n = self.lens[row]
        ids = self.req_to_token[row, :n].clone()
        self.cache.release(row)
        prot = self.protected.pop(row, 0)
        if into_tree:
            self.cache.tree_insert(row, self.req_to_token, n, running=False)
            self._insert(ids)
            leftover = ids[n:]
        else:
            leftover = ids[prot:]
        self.cache.free(leftover)
        self.free_ids += leftover.tolist()
        self.matched.pop(row, None)
        self.lens[row] = 0

    def checkpoint(self, row: int, duplicate_of: int | None = None):
        """A running request's prefix so far goes into the tree. With `duplicate_of`, the tree
        already held these tokens as that sequence: SGLang frees the request's own ids and
        rewrites its row to the tree's."""
        n = self.lens[row]
        own = self.req_to_token[row, :0]
        if duplicate_of is not None:
            tree_ids = self.sequences[duplicate_of]
            k = min(n, len(tree_ids))
            own = self.req_to_token[row, :k].clone()
            self.req_to_token[row, :k] = tree_ids[:k].int()
        ids = self.req_to_token[row, :n].clone()
        self.cache.tree_insert(row, self.req_to_token, n, running=True)
        # SGLang frees the request's duplicates inside its free group: after the checkpoint
        self.cache.free(own)
        self.free_ids += own.tolist()
        self._insert(ids)
        self.matched[row] = len(self.sequences) - 1
        self.protected[row] = n

    # ------------------------------------------------------------------ tree side
    def _insert(self, ids: torch.Tensor):
        self.sequences.append(ids)
        for v in set(ids.tolist()):
            self.tree_ref[v] = self.tree_ref.get(v, 0) + 1

    def locked(self) -> set[int]:
        out = set()
        for row, seq in self.matched.items():
            if self.lens[row]:
                out |= set(self.req_to_token[row, : self.lens[row]].tolist())
        return out

    def evict_sequence(self, seq: int) -> bool:
        """The tree evicts sequence `seq` (LRU node eviction) unless a running request locks any
        of its ids; ids no other cached sequence holds are freed."""
        ids = self.sequences[seq]
        if ids.numel() == 0 or set(ids.tolist()) & self.locked():
            return False
        gone = []
        for v in set(ids.tolist()):
            self.tree_ref[v] -= 1
            if self.tree_ref[v] == 0:
                del self.tree_ref[v]
                gone.append(v)
        self.sequences[seq] = ids[:0]
        if gone:
            t = torch.tensor(sorted(gone))
            self.cache.free(t)
            self.free_ids += gone
        return True
