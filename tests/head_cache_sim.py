"""SGLang's virtual side (req_to_token rows, a token-id allocator, positions) driving a
HeadKVCache with the same batch fields SGLang's ForwardBatch carries; shared by the unit, stress
and kernel tests of the cache."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from sglang_evict.eviction.evictor import Evictor, EvictorConfig
from sglang_evict.backend.head_cache import HeadKVCache
from sglang_evict.kernels.head_store import store_head_slots_reference
from sglang_evict.eviction.policies import make_policy


def make_cache(capacity_tokens, L, H, D, *, policy="streaming", budget=4, buffer=2, sinks=1,
               rows=4, use_triton=False, reclaim="mixed"):
    """A HeadKVCache with the integrity check after every step (policy None: no evictor)."""
    evictor = None
    if policy is not None:
        cfg = EvictorConfig(budget=budget, buffer=buffer, policy=make_policy(policy, sinks=sinks))
        evictor = Evictor(cfg, L, H)
    return HeadKVCache(
        num_virtual=512, num_layers=L, num_kv_heads=H, head_dim=D, v_head_dim=D,
        capacity=capacity_tokens * L * H, dtype=torch.float32, device="cpu", evictor=evictor,
        num_rows=rows, max_row_len=256, page_size=4, debug_check=True, use_triton=use_triton,
        tree_first=reclaim == "tree-first",
    )


class Mode:
    def __init__(self, decode: bool):
        self.decode = decode

    def is_decode(self):
        return self.decode

    def is_idle(self):
        return False


class CacheSim:
    def __init__(self, cache, rows: int = 4, ctx: int = 256, seed: int = 0):
        self.cache = cache
        self.L, self.H = cache.num_layers, cache.num_kv_heads
        self.D = cache.k.shape[1]
        self.req_to_token = torch.zeros(rows, ctx, dtype=torch.int32)
        self.lens = [0] * rows
        self.free_ids = list(range(1, cache.pool.num_virtual))
        self.gen = torch.Generator().manual_seed(seed)

    def step(self, chunks: dict[int, int], log_beta: float | torch.Tensor | None = 0.0,
             extend: bool = False):
        """One forward: request row r gets chunks[r] new tokens (a decode step if every chunk is
        1 and every row already holds tokens, unless `extend`: a new request after a cached
        prefix). log_beta None draws it at random. If the cache cannot fit the step, our side is
        undone (SGLang would retract) and the error raised."""
        rows = list(chunks)
        decode = not extend and all(chunks[r] == 1 and self.lens[r] > 0 for r in rows)
        ids, pos, prefix, ext = [], [], [], []
        for r in rows:
            k = chunks[r]
            new = torch.tensor(self.free_ids[:k])
            del self.free_ids[:k]
            self.req_to_token[r, self.lens[r]:self.lens[r] + k] = new.int()
            ids.append(new)
            pos.append(torch.arange(self.lens[r], self.lens[r] + k))
            prefix.append(self.lens[r])
            ext.append(k)
            self.lens[r] += k
        batch = SimpleNamespace(
            out_cache_loc=torch.cat(ids), req_pool_indices=torch.tensor(rows),
            seq_lens=torch.tensor([self.lens[r] for r in rows]),
            extend_seq_lens=torch.tensor(ext), extend_prefix_lens=torch.tensor(prefix),
            positions=torch.cat(pos), forward_mode=Mode(decode),
        )
        try:
            self.cache.prepare(batch, self.req_to_token)
        except Exception:
            for r, k in zip(rows, ext):
                self.lens[r] -= k
                self.free_ids += self.req_to_token[r, self.lens[r]:self.lens[r] + k].tolist()
            raise
        T = batch.out_cache_loc.numel()
        for layer in range(self.L):
            if log_beta is None:
                lb = -torch.rand(T, self.H, generator=self.gen)
            elif isinstance(log_beta, torch.Tensor):
                lb = log_beta
            else:
                lb = torch.full((T, self.H), log_beta)
            k = torch.randn(T, self.H, self.D, generator=self.gen)
            v = torch.randn(T, self.H, self.D, generator=self.gen)
            self.cache.store(layer, k, v, lb, batch.positions, store_head_slots_reference)
            self.check_step(rows, layer)
        self.cache.after_forward(batch, self.req_to_token)
        self.cache.pool.check_integrity()
        return batch

    def check_step(self, rows, layer):
        """The step's metadata equals the pool's own live lists, recomputed from the virtual map."""
        per_req = [self.req_to_token[r, : self.lens[r]].long() for r in rows]
        want = self.cache.pool.live_indices(per_req, layer)
        indptr, indices = self.cache.step.layer(layer)
        # offsets are absolute into the step's one indices buffer of all layers
        a, b = int(indptr[0]), int(indptr[-1])
        assert torch.equal((indptr - a).long(), want.indptr.long())
        assert torch.equal(indices[a:b].int(), want.indices)

    def free(self, row: int, keep: int = 0):
        """Free the row's tokens from `keep` on; keep = 0 finishes the request."""
        ids = self.req_to_token[row, keep: self.lens[row]]
        self.cache.free(ids)
        if keep == 0:
            self.cache.release(row)
        else:
            self.cache.stats.seq_len[row] = keep
        self.free_ids += ids.tolist()
        self.lens[row] = keep
