"""Tests for sglang_evict.gated_attention (training-time retention-gated attention)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from sglang_evict.training.gated_attention import (
    capacity_loss,
    expected_live_count,
    expected_live_count_reference,
    gated_attention,
    gated_attention_reference,
)


def _inputs(B, Hkv, group, T, D=8, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * group, T, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, T, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, T, D, generator=g, dtype=dtype)
    # log β in roughly [-1.5, -0.001]: a wide range of decay speeds, strictly <= 0.
    lb = -torch.rand(B, T, Hkv, generator=g, dtype=dtype) * 1.5 - 1e-3
    xs = (q, k, v, lb)
    if requires_grad:
        xs = tuple(x.clone().requires_grad_(True) for x in xs)
    return xs


CASES = list(itertools.product([1, 5, 37], [1, 4, 16, 128], [1, 3], [1, 2]))


@pytest.mark.parametrize("T,chunk,group,B", CASES)
def test_values_and_grads_match_reference(T, chunk, group, B):
    q, k, v, lb = _inputs(B, 2, group, T, requires_grad=True, seed=T * 7 + chunk + group + B)
    out = gated_attention(q, k, v, lb, chunk_size=chunk)
    ref = gated_attention_reference(q, k, v, lb)
    assert out.shape == ref.shape == q.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    g_out = torch.autograd.grad((out * w).sum(), (q, k, v, lb))
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v, lb))
    for name, a, b in zip("q k v log_beta".split(), g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10, msg=f"grad wrt {name}")
    # log_beta really gets a gradient once there is a key older than the query
    if T > 1:
        assert g_out[3].abs().sum() > 0


def test_gradcheck_small():
    q, k, v, lb = _inputs(1, 2, 2, 6, D=3, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, lb: gated_attention(q, k, v, lb, chunk_size=4), (q, k, v, lb)
    )


def test_float32_and_bf16_inputs():
    q, k, v, lb = _inputs(2, 2, 2, 19, dtype=torch.float32)
    out = gated_attention(q, k, v, lb, chunk_size=4)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, gated_attention_reference(q, k, v, lb), rtol=1e-5, atol=1e-5)
    out_bf = gated_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), lb, chunk_size=4)
    assert out_bf.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf.float(), out, rtol=0.05, atol=0.05)


def test_explicit_scale_and_no_grad_path():
    q, k, v, lb = _inputs(1, 1, 2, 9)
    with torch.no_grad():
        out = gated_attention(q, k, v, lb, scale=0.3, chunk_size=2)
    torch.testing.assert_close(out, gated_attention_reference(q, k, v, lb, scale=0.3))
    nocp = gated_attention(q, k, v, lb, scale=0.3, chunk_size=2, use_checkpoint=False)
    torch.testing.assert_close(nocp, out)


@pytest.mark.parametrize("group", [1, 4])
def test_beta_one_is_plain_causal_attention(group):
    q, k, v, _ = _inputs(2, 2, group, 23)
    lb = torch.zeros(2, 23, 2, dtype=torch.float64)
    out = gated_attention(q, k, v, lb, chunk_size=8)
    kk = k.repeat_interleave(group, dim=1)
    vv = v.repeat_interleave(group, dim=1)
    sdpa = F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
    torch.testing.assert_close(out, sdpa, rtol=1e-10, atol=1e-12)


def test_decay_is_added_to_the_scaled_logit():
    """Independent computation, one query row at a time: weight of key i at query t is
    softmax_i(q_t . k_i * scale + (t - i) * log beta_i); a decayed key loses weight whatever
    the sign of its logit (multiplying the logit instead would raise a negative one)."""
    q, k, v, lb = _inputs(1, 2, 3, 9, requires_grad=True)
    out = gated_attention(q, k, v, lb, chunk_size=4)
    scale = 1 / math.sqrt(q.shape[-1])
    rows = []
    for j in range(q.shape[1]):
        h = j // 3
        per_t = []
        for t in range(9):
            logits = torch.stack([
                (q[0, j, t] * k[0, h, i]).sum() * scale + (t - i) * lb[0, i, h]
                for i in range(t + 1)
            ])
            per_t.append(torch.softmax(logits, 0) @ v[0, h, : t + 1])
        rows.append(torch.stack(per_t))
    expected = torch.stack(rows)[None]
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v, lb))
    want = torch.autograd.grad((expected * w).sum(), (q, k, v, lb))
    for name, a, b in zip("q k v log_beta".split(), grads, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=f"grad wrt {name}")


def test_strong_decay_leaves_only_the_current_key():
    # beta -> 0 for every key: every older key's weight -> 0, whatever its logit, so each
    # query reads its own value.
    q, k, v, _ = _inputs(1, 1, 1, 6)
    lb = torch.full((1, 6, 1), -60.0, dtype=torch.float64)
    out = gated_attention(q, k, v, lb, chunk_size=4)
    torch.testing.assert_close(out[0, 0], v[0, 0], rtol=1e-9, atol=1e-9)


def test_decay_lowers_a_negative_logit_key_weight():
    """One old key with a negative logit: decaying it lowers its share of attention (the
    multiplicative form raised it)."""
    D = 4
    q = torch.zeros(1, 1, 2, D, dtype=torch.float64)
    k = torch.zeros(1, 1, 2, D, dtype=torch.float64)
    q[0, 0, 1, 0] = 2.0
    k[0, 0, 0, 0] = -1.0  # key 0: logit -1 for query 1; key 1: logit 0
    v = torch.tensor([[[[1.0, 0, 0, 0], [0, 1.0, 0, 0]]]], dtype=torch.float64)
    kept = gated_attention(q, k, v, torch.zeros(1, 2, 1, dtype=torch.float64))
    decayed = gated_attention(q, k, v, torch.full((1, 2, 1), -0.5, dtype=torch.float64))
    assert decayed[0, 0, 1, 0] < kept[0, 0, 1, 0]


# ------------------------------------------------------------------ expected live count


@pytest.mark.parametrize("T,chunk", [(1, 1), (5, 4), (37, 1), (37, 16), (37, 128)])
def test_live_count_matches_reference_values_and_grads(T, chunk):
    _, _, _, lb = _inputs(2, 3, 1, T, requires_grad=True)
    live = expected_live_count(lb, chunk_size=chunk)
    ref = expected_live_count_reference(lb)
    assert live.shape == ref.shape == lb.shape
    torch.testing.assert_close(live, ref, rtol=1e-10, atol=1e-12)
    w = torch.randn(live.shape, generator=torch.Generator().manual_seed(3), dtype=live.dtype)
    (ga,) = torch.autograd.grad((live * w).sum(), lb)
    (gb,) = torch.autograd.grad((ref * w).sum(), lb)
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-10)


def test_live_count_beta_one_is_t_plus_one():
    lb = torch.zeros(2, 41, 3)
    live = expected_live_count(lb, chunk_size=8)
    assert live.dtype == torch.float32
    expected = torch.arange(1, 42, dtype=torch.float32)[None, :, None].expand(2, 41, 3)
    torch.testing.assert_close(live, expected)


def test_live_count_constant_beta_closed_form():
    betas = torch.tensor([0.5, 0.9, 0.99, 0.999], dtype=torch.float64)
    T = 50
    lb = torch.log(betas)[None, None, :].expand(1, T, 4).contiguous()
    live = expected_live_count(lb, chunk_size=7)
    t = torch.arange(T, dtype=torch.float64)[:, None]
    closed = (1 - betas[None, :] ** (t + 1)) / (1 - betas[None, :])
    torch.testing.assert_close(live[0], closed, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ capacity loss


def test_capacity_loss_zero_under_budget():
    live = torch.tensor([[[1.0, 4.0], [2.0, 4.0], [3.0, 3.9]]], requires_grad=True)
    loss = capacity_loss(live, 4)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(live.grad == 0)


def test_capacity_loss_value_and_gradient_sign():
    """max(0, (S_t - M) / max(t - M, 1)) at 0-based position t, averaged over the positive
    entries, written out for M = 2 and positions 0..4."""
    live = torch.tensor([[[1.0, 1.0], [2.0, 2.5], [3.0, 2.0], [4.0, 1.0], [2.0, 5.0]]],
                        requires_grad=True)
    loss = capacity_loss(live, 2)
    # positive: t=1 head 1: 0.5 / 1; t=2 head 0: 1 / 1; t=3 head 0: 2 / 1; t=4 head 1: 3 / 2
    assert loss.item() == pytest.approx((0.5 + 1.0 + 2.0 + 1.5) / 4)
    loss.backward()
    assert live.grad[0, 1, 1] > 0 and live.grad[0, 2, 0] > 0 and live.grad[0, 4, 1] > 0
    assert live.grad[0, 4, 1] == pytest.approx(0.5 / 4)  # 1 / (t - M) / count
    assert live.grad[0, 0, 0] == 0 and live.grad[0, 3, 1] == 0 and live.grad[0, 4, 0] == 0


def test_capacity_loss_pushes_log_beta_down_when_over_budget():
    lb = torch.full((1, 40, 2), -0.01, dtype=torch.float64, requires_grad=True)
    loss = capacity_loss(expected_live_count(lb, chunk_size=8), 8)
    assert loss.item() > 0
    loss.backward()
    # gradient descent lowers log β (faster forgetting): d loss / d log β >= 0, and > 0 for
    # every key that is older than some over-budget step
    assert torch.all(lb.grad >= 0)
    assert torch.all(lb.grad[:, :-1] > 0)


# ------------------------------------------------------------------ memory boundedness


def _saved_sizes(fn):
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sizes


def test_memory_bounded_saved_tensors():
    T, chunk, group, Hkv, D = 64, 8, 2, 2, 4
    q, k, v, lb = _inputs(1, Hkv, group, T, D=D, dtype=torch.float32, requires_grad=True)
    Hq = Hkv * group
    full = T * T * Hq

    out, sizes = _saved_sizes(lambda: gated_attention(q, k, v, lb, chunk_size=chunk))
    assert sizes and max(sizes) < full
    out.sum().backward()  # recompute-in-backward works under the hooks' absence too

    # Checkpointing keeps only block inputs: the total saved is far below one [T, T] matrix per
    # head (the reference saves several of them).
    _, ref_sizes = _saved_sizes(lambda: gated_attention_reference(q, k, v, lb))
    assert max(ref_sizes) >= full
    assert sum(sizes) < sum(ref_sizes)

    # Without checkpointing, each saved intermediate is still at most one block: [B, Hq, chunk, T].
    _, nocp = _saved_sizes(
        lambda: gated_attention(q, k, v, lb, chunk_size=chunk, use_checkpoint=False)
    )
    assert max(nocp) <= Hq * chunk * T < full

    _, live_sizes = _saved_sizes(lambda: expected_live_count(lb, chunk_size=chunk))
    assert max(live_sizes) < T * T * Hkv


# ------------------------------------------------------------------ validation


def test_validation_errors():
    q, k, v, lb = _inputs(1, 2, 2, 5, dtype=torch.float32)
    with pytest.raises(ValueError, match="Hq"):
        gated_attention(q[:, :3], k, v, lb)
    with pytest.raises(ValueError, match="log_beta"):
        gated_attention(q, k, v, lb[:, :4])
    with pytest.raises(ValueError, match="log_beta"):
        gated_attention(q, k, v, lb.permute(0, 2, 1))
    with pytest.raises(ValueError, match="chunk_size"):
        gated_attention(q, k, v, lb, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        expected_live_count(lb, chunk_size=-1)
    with pytest.raises(ValueError, match="^k"):
        gated_attention(q, k[:, :, :4], v, lb)
    with pytest.raises(ValueError, match="^v"):
        gated_attention(q, k, v[:, :1], lb)
    with pytest.raises(ValueError, match="^q"):
        gated_attention(q[0], k, v, lb)
    with pytest.raises(ValueError, match="log_beta"):
        expected_live_count(lb[0])
    with pytest.raises(ValueError, match="budget"):
        capacity_loss(lb, 0)
    with pytest.raises(ValueError, match="live"):
        capacity_loss(lb[0, 0], 4)
    with pytest.raises(ValueError, match="log_beta"):
        gated_attention_reference(q, k, v, lb[:, :, :1])
