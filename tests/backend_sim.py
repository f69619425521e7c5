"""Two attention backends over one simulated SGLang: the virtual side (rows, token ids,
positions) and the model's per-layer calls, so a test can run the same steps through different
kernel paths or metadata paths and compare them."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from sglang_evict.backend.attention_backend import HeadSlotAttnBackend
from sglang_evict.config import EvictConfig

from head_cache_sim import Mode, make_cache

L, H, G, D = 2, 2, 2, 8


def make_backend(kernel: str, req_to_token):
    """A backend on CPU with `--evict-kernel kernel` (torch, triton or flashinfer) over a small
    cache with streaming eviction (M=6, B=3, one sink)."""
    config = EvictConfig(kernel=kernel)
    cache = make_cache(96, L, H, D, policy="streaming", budget=6, buffer=3, sinks=1, rows=4,
                       use_triton=config.use_triton("cpu"))
    runner = SimpleNamespace(device="cpu", req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
                             model_config=SimpleNamespace(num_attention_heads=H * G))
    return HeadSlotAttnBackend(runner, cache, config)


def layer(layer_id):
    return SimpleNamespace(layer_id=layer_id, tp_k_head_num=H, tp_q_head_num=H * G,
                           qk_head_dim=D, v_head_dim=D, scaling=D ** -0.5)


class Requests:
    """SGLang's virtual side for both backends: rows, token ids, positions."""

    def __init__(self):
        self.req_to_token = torch.zeros(4, 128, dtype=torch.int32)
        self.lens = {}
        self.next_id = 1

    def batch(self, chunks: dict[int, int]):
        rows, ids, pos, prefix, ext = list(chunks), [], [], [], []
        for r in rows:
            n, k = self.lens.get(r, 0), chunks[r]
            new = torch.arange(self.next_id, self.next_id + k)
            self.next_id += k
            self.req_to_token[r, n:n + k] = new.int()
            ids.append(new)
            pos.append(torch.arange(n, n + k))
            prefix.append(n)
            ext.append(k)
            self.lens[r] = n + k
        seq = torch.tensor([self.lens[r] for r in rows])
        decode = all(k == 1 for k in ext) and all(p > 0 for p in prefix)
        return SimpleNamespace(
            batch_size=len(rows), out_cache_loc=torch.cat(ids), req_pool_indices=torch.tensor(rows),
            seq_lens=seq, seq_lens_cpu=seq, extend_seq_lens=torch.tensor(ext),
            extend_prefix_lens=torch.tensor(prefix), positions=torch.cat(pos),
            forward_mode=Mode(decode),
        )

    def finish(self, row, backends):
        ids = self.req_to_token[row, : self.lens.pop(row)]
        for b in backends:
            b.cache.free(ids)
            b.cache.release(row)


def forward(backend, batch, gen, pad=0, decode=True):
    """Every layer: store this step's K/V and attend (as the model does), outputs per layer."""
    T = batch.positions.numel()
    outs = []
    for l in range(L):
        q = torch.randn(T - pad, H * G * D, generator=gen)
        k = torch.randn(T - pad, H * D, generator=gen)
        v = torch.randn(T - pad, H * D, generator=gen)
        if pad:  # padded requests carry garbage; nothing of theirs may be stored or read
            q, k, v = (torch.cat([x, torch.full((pad, x.shape[1]), 1e4)]) for x in (q, k, v))
        fwd = backend.forward_decode if decode else backend.forward_extend
        outs.append(fwd(q, k, v, layer(l), batch))
    return outs
