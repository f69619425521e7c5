"""Hard eviction in training: which keys the server's evictor would have dropped, and when.

Serving cuts hard: after a forward that brings a request to length t (the end of a prefill
chunk, or one decoded token), the evictor checks the request's trigger and keeps its top M by
score; what it drops is gone for every later query. Soft training decays logits instead, so
the student never sees what serving does. Here the server's own `Evictor` (not a copy) runs over
a sequence's log β at the steps the server would run it, and returns for every key the step at
which it was dropped; `gated_attention(..., evicted_at=...)` then attends over the survivors in
the forward and takes the soft path's gradient (straight-through).

The scores come from the gates applied to the teacher's hidden states (the model with its full
cache), so the selection for all layers is known before the student's forward: one global
budget needs every layer's scores at once, and the student computes layer l + 1's scores only
after layer l's attention.
"""

from __future__ import annotations

import torch

from sglang_evict.config import POLICY_CHOICES, EvictConfig
from sglang_evict.eviction.evictor import Evictor
from sglang_evict.eviction.settings import evictor_config


def serving_steps(length: int, prompt_len: int | None, chunk: int) -> list[int]:
    """The lengths t < `length` after which the server runs the evictor on a request whose
    prompt is `prompt_len` tokens (None: the whole sequence is prompt), prefilled `chunk`
    tokens at a time, and the rest decoded one token per step."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    prompt = length if prompt_len is None else min(max(int(prompt_len), 1), length)
    steps = list(range(chunk, prompt, chunk)) + [prompt] + list(range(prompt + 1, length))
    return [t for t in steps if t < length]


def make_evictor(policy: str, budget: int, buffer: int, sinks: int, window: int,
                 num_layers: int, num_kv_heads: int, lookahead: int = 0) -> Evictor:
    """The server's evictor for these `--evict-*` settings."""
    if policy not in POLICY_CHOICES or policy == "none":
        raise ValueError(f"eviction_policy must be a policy that evicts, got {policy!r}")
    cfg = EvictConfig(policy=policy, budget=budget, buffer=buffer, sinks=sinks, window=window,
                      lookahead=lookahead)
    return Evictor(evictor_config(cfg), num_layers, num_kv_heads)


def eviction_times(log_beta: torch.Tensor, evictor: Evictor, steps: list[int],
                   keys: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [L, T, H]: the step at which the evictor drops each key (T: never).

    log_beta  [L, T, H] one sequence's scores (no grad needed)
    steps     increasing lengths after which the evictor runs (`serving_steps`)
    keys      [L, T, H, D] only for policies that score keys (knorm)"""
    L, T, H = log_beta.shape
    LH = L * H
    dev = log_beta.device
    flat_lb = log_beta.detach().float().permute(0, 2, 1).reshape(LH * T)
    flat_k = None
    if keys is not None:
        flat_k = keys.detach().float().permute(0, 2, 1, 3).reshape(LH * T, keys.shape[-1])
    ids = torch.arange(LH * T, device=dev).view(LH, T)  # an entry's id indexes the flat scores
    pos = torch.arange(T, device=dev).expand(LH, T)
    evicted_at = torch.full((LH, T), T, dtype=torch.long, device=dev)
    alive = torch.zeros((LH, T), dtype=torch.bool, device=dev)
    seen = 0
    for t in steps:  # a few dozen evictions per sequence at most: training, not serving
        alive[:, seen:t] = True
        seen = t
        counts = alive.sum(1)
        if not bool(evictor.triggered(counts.sum().view(1).cpu(), counts.max().view(1).cpu())[0]):
            continue
        keep = evictor.keep_lists(ids[None, :, :t], alive[None, :, :t], pos[None, :, :t],
                                  torch.tensor([t], device=dev), flat_lb, flat_k)[0]
        dropped = alive[:, :t] & ~keep
        evicted_at[:, :t][dropped] = t
        alive[:, :t] &= keep
    return evicted_at.view(L, H, T).permute(0, 2, 1).contiguous()
