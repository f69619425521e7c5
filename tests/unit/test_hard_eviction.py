"""Hard-eviction training: the keys the student loses are the ones the server's evictor drops,
at the step it drops them; the forward is attention over the survivors, the gradient the soft
path's (straight-through); and a few steps of training with it lower the loss."""

from __future__ import annotations

import pytest
import torch

from sglang_evict.cache.head_slots import EVICTED, HeadSlotPool
from sglang_evict.training.gated_attention import gated_attention, gated_attention_reference
from sglang_evict.training.hard_eviction import eviction_times, make_evictor, serving_steps


def test_serving_steps_are_chunk_ends_then_every_token():
    assert serving_steps(20, 10, 4) == [4, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    assert serving_steps(12, None, 5) == [5, 10]  # all prompt: chunks only
    assert serving_steps(6, 6, 8) == []  # one chunk, evicted after the last token: no query sees it


@pytest.mark.parametrize("policy,sinks,window", [("retention-global", 2, 0),
                                                 ("retention", 0, 3)])
def test_eviction_times_replay_the_evictor_on_a_head_slot_pool(policy, sinks, window):
    """Independent replay: the tokens enter a HeadSlotPool step by step and `Evictor.enforce`
    (the per-request path over the virtual map) runs after each serving step; a key is live
    for exactly the queries before the step `eviction_times` gives it."""
    L, T, H, M, B = 3, 40, 2, 4, 3
    g = torch.Generator().manual_seed(7)
    log_beta = -torch.rand(L, T, H, generator=g) * 0.3
    evictor = make_evictor(policy, M, B, sinks, window, L, H)
    steps = serving_steps(T, 23, 8)
    times = eviction_times(log_beta, evictor, steps)

    pool = HeadSlotPool(T, L, H, capacity=L * T * H)
    slots = pool.alloc(torch.arange(T))  # [T, L, H]
    lb_slots = torch.zeros(L * T * H)
    lb_slots[slots.permute(1, 0, 2).reshape(-1)] = log_beta.reshape(-1)
    for t in steps + [T]:
        # before the evictor runs at length t, a key is live iff it is dropped at t or later
        live = pool.slot_map[:t].permute(1, 0, 2) != EVICTED  # [L, t, H]
        assert torch.equal(live, times[:, :t] >= t), t
        if t < T:
            evictor.enforce(pool, torch.arange(t), torch.arange(t), t, lb_slots)
    assert int((times < T).sum()) > 0  # the replay did evict


def test_hard_forward_is_attention_over_survivors_and_gradient_is_soft():
    B, Hq, Hkv, T, D = 1, 4, 2, 24, 8
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, h, T, D, generator=g, dtype=torch.float64) for h in (Hq, Hkv, Hkv))
    lb = (-torch.rand(B, T, Hkv, generator=g, dtype=torch.float64) * 0.2).requires_grad_(True)
    ev = torch.arange(T)[None, :, None] + torch.randint(1, 12, (B, T, Hkv), generator=g)
    ev = ev.clamp(max=T)
    hard = gated_attention(q, k, v, lb, chunk_size=7, evicted_at=ev)
    torch.testing.assert_close(hard, gated_attention_reference(q, k, v, lb, evicted_at=ev))
    # what the server computes: plain attention (no decay term) over the keys still live
    pos = torch.arange(T)
    live = (pos[:, None] >= pos[None, :]) & (pos[:, None] < ev[0].T[:, None, :])  # [Hkv, T, T]
    served = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1),
        attn_mask=live.repeat_interleave(2, dim=0)[None])
    torch.testing.assert_close(hard, served)
    soft = gated_attention(q, k, v, lb, chunk_size=7)
    assert (hard - soft).abs().max() > 1e-3  # eviction changed the forward
    w = torch.randn(hard.shape, generator=g, dtype=torch.float64)
    (grad_hard,) = torch.autograd.grad((hard * w).sum(), lb)
    (grad_soft,) = torch.autograd.grad((soft * w).sum(), lb)
    torch.testing.assert_close(grad_hard, grad_soft)
    # nothing evicted: the server's full cache, plain causal attention (the soft student decays)
    never = torch.full_like(ev, T)
    full = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), is_causal=True)
    torch.testing.assert_close(gated_attention(q, k, v, lb, evicted_at=never), full)
    with pytest.raises(ValueError, match="at or before its own step"):
        gated_attention(q, k, v, lb, evicted_at=torch.zeros_like(ev))
