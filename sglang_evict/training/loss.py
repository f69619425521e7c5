"""The training loss of one sequence and its backward into the gates (METHOD.md "Training").

    kl_weight · KL(teacher || student) on next-token distributions
    + ce_weight · next-token cross-entropy of the student
      (both a weighted mean over positions: the answer's tokens weigh answer_weight)
    + capacity_weight · mean over layers of capacity_loss(expected_live_count(log β), M)

The KL/CE terms are computed `loss_chunk` positions at a time and back-propagated into the
student's final hidden state chunk by chunk, so the [T, vocab] logits of teacher and student
never exist in full (49152 x 2048 floats are 400 MB each for the default model)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sglang_evict.gated_attention import capacity_loss, expected_live_count
from sglang_evict.training.config import TrainConfig
from sglang_evict.training.hard_eviction import eviction_times, make_evictor, serving_steps
from sglang_evict.training.student import GateAttachment


@dataclass
class StepLosses:
    total: float
    kl: float
    ce: float
    ce_teacher: float
    cap: float
    live: float  # expected live entries at the last position, mean over layers and heads
    tokens: int
    # KL per answer token (unweighted mean over the answer); None for a sample without one
    kl_answer: float | None = None


def hard_eviction_times(log_betas, config: TrainConfig, answer_start: int | None):
    """Per layer, int64 [B, T, Hkv]: when the server's evictor drops each key of each sequence,
    from the layers' log β [B, T, Hkv] (the prompt is the tokens before `answer_start`)."""
    B, T, H = log_betas[0].shape
    evictor = make_evictor(config.eviction_policy, config.budget, config.eviction_buffer,
                           config.eviction_sinks, config.eviction_window, len(log_betas), H,
                           config.eviction_lookahead)
    steps = serving_steps(T, answer_start, config.eviction_chunk)
    stacked = torch.stack(list(log_betas))  # [L, B, T, H]
    per_seq = [eviction_times(stacked[:, b], evictor, steps) for b in range(B)]  # [L, T, H] each
    return list(torch.stack(per_seq, dim=1).unbind(0))  # L x [B, T, H]


def forward_backward(
    model: torch.nn.Module,
    attachment: GateAttachment,
    input_ids: torch.Tensor,
    config: TrainConfig,
    scale: float = 1.0,
    answer_start: int | None = None,
) -> StepLosses:
    """Teacher and student forwards on `input_ids` [B, T], the loss, and its backward into the
    gates' .grad (multiplied by `scale`, e.g. 1 / grad_accum). Tokens from `answer_start` on
    are the answer: their next-token terms weigh `config.answer_weight`."""
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [B, T] with T >= 2, got {tuple(input_ids.shape)}")
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    evicted_at = None
    with torch.no_grad():
        if config.hard_eviction:
            with attachment.capture() as teacher_log_betas:
                teacher_h = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
            evicted_at = hard_eviction_times(teacher_log_betas, config, answer_start)
        else:
            teacher_h = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
    with attachment.student(evicted_at):
        student_h = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
    log_betas = attachment.log_betas

    # Capacity term: mean over layers of the hinge on the expected live count.
    # "head": every (layer, head) at most M in expectation (TrimKV); "global": their mean
    # (DBTrimKV's one budget L*H*M, which heads share unevenly).
    caps, lives, per_layer = [], [], []
    for lb in log_betas:
        live = expected_live_count(lb, chunk_size=config.attn_chunk)
        if config.capacity_scope == "head":
            caps.append(capacity_loss(live, config.budget))
        else:
            per_layer.append(live.mean(dim=2, keepdim=True))
        lives.append(live[:, -1].detach().mean())
    if per_layer:
        caps.append(capacity_loss(torch.stack(per_layer).mean(dim=0), config.budget))
    cap = torch.stack(caps).mean()

    # KL + CE, chunk by chunk, each chunk's backward stopping at a detached copy of the
    # student's hidden state; the summed gradient then goes through the model once.
    labels = input_ids[:, 1:]
    n = labels.numel()
    # Label j is token j + 1: the answer's labels start at answer_start - 1.
    weights = torch.ones(labels.shape[1], dtype=torch.float32, device=labels.device)
    first = None
    if answer_start is not None and 1 <= answer_start < input_ids.shape[1]:
        first = answer_start - 1
        weights[first:] = float(config.answer_weight)
    w_total = float(weights.sum()) * labels.shape[0]
    h = student_h[:, :-1].detach().requires_grad_(True)
    kl_sum = ce_sum = ce_t_sum = kl_w_sum = ce_w_sum = kl_ans_sum = 0.0
    for a in range(0, h.shape[1], config.loss_chunk):
        b = min(a + config.loss_chunk, h.shape[1])
        logp_s = F.log_softmax(head(h[:, a:b]).float(), dim=-1)
        with torch.no_grad():
            logp_t = F.log_softmax(head(teacher_h[:, a:b]).float(), dim=-1)
        target = labels[:, a:b]
        w = weights[a:b]
        kl_tok = (logp_t.exp() * (logp_t - logp_s)).sum(dim=-1)  # [B, b - a]
        ce_tok = F.nll_loss(logp_s.transpose(1, 2), target, reduction="none")
        kl_w, ce_w = (kl_tok * w).sum(), (ce_tok * w).sum()
        part = (config.kl_weight * kl_w + config.ce_weight * ce_w) * (scale / w_total)
        if part.requires_grad:
            part.backward()
        kl_sum += float(kl_tok.detach().sum())
        ce_sum += float(ce_tok.detach().sum())
        kl_w_sum += float(kl_w.detach())
        ce_w_sum += float(ce_w.detach())
        if first is not None and b > first:
            kl_ans_sum += float(kl_tok.detach()[:, max(first - a, 0):].sum())
        ce_t_sum += float(F.nll_loss(logp_t.transpose(1, 2), target, reduction="sum"))
    roots, grads = [], []
    if h.grad is not None:
        roots.append(student_h[:, :-1])
        grads.append(h.grad)
    cap_term = config.capacity_weight * scale * cap
    if cap_term.requires_grad:
        roots.append(cap_term)
        grads.append(None)
    if roots:
        torch.autograd.backward(roots, grads)
    cap_v = float(cap.detach())
    n_answer = 0 if first is None else (labels.shape[1] - first) * labels.shape[0]
    return StepLosses(
        total=(config.kl_weight * kl_w_sum + config.ce_weight * ce_w_sum) / w_total
        + config.capacity_weight * cap_v,
        kl=kl_sum / n,
        ce=ce_sum / n,
        ce_teacher=ce_t_sum / n,
        cap=cap_v,
        live=float(torch.stack(lives).mean()),
        tokens=int(input_ids.numel()),
        kl_answer=kl_ans_sum / n_answer if n_answer else None,
    )
