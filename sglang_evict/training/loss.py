"""The training loss of one sequence and its backward into the gates (METHOD.md "Training").

    kl_weight · KL(teacher || student) + ce_weight · next-token CE of the student
      (each a mean over the answer's tokens with `answer_only`, the authors' objective: their
      labels mask the prompt; over every token, the answer weighing answer_weight, without)
    + capacity_weight · capacity_loss(S, M)
      (S the expected live count per layer and head; with capacity_scope "global", DBTrimKV's
      one budget, its mean over layers and heads)

The defaults, 0.5 / 0.5 / 1, are the authors' (KL + CE)/2 + 1.0 · capacity.

The frozen model may run under bfloat16 autocast (`dtype = "autocast"`): its matmuls use the
CPU's bf16 units while the gates, their log β, the retention-gated softmax and the loss stay in
float32. The KL/CE terms are computed `loss_chunk` positions at a time, only at the positions
that carry a loss, and back-propagated into the student's final hidden state chunk by chunk, so
the [T, vocab] logits of teacher and student never exist in full (49152 x 2048 floats are 400 MB
each for the default model)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sglang_evict.training.config import TrainConfig
from sglang_evict.training.gated_attention import capacity_loss, expected_live_count
from sglang_evict.training.hard_eviction import eviction_times, make_evictor, serving_steps
from sglang_evict.training.student import GateAttachment


@dataclass
class StepLosses:
    total: float
    kl: float  # KL per loss token (unweighted mean over the positions that carry a loss)
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


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX or AVX512-BF16). Without
    them torch's bf16 matmul runs far below float32 (1.2 against 108 GFLOP/s on an AVX2-only
    EPYC), so autocast would slow training down."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def resolve_precision(name: str, device: torch.device) -> str:
    """The frozen model's precision for a config's `dtype`: "fp32", "bf16" (weights) or
    "autocast" (fp32 weights, bf16 matmuls). "auto": bf16 on CUDA; on CPU, autocast where
    the CPU has bf16 matrix units, else float32."""
    if name == "auto":
        if device.type == "cuda":
            return "bf16"
        return "autocast" if cpu_has_bf16_matmul() else "fp32"
    return name


def frozen_precision(precision: str, device: torch.device):
    """The context the frozen model runs in: bf16 autocast for "autocast", else none."""
    if precision == "autocast":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def capacity_term(log_betas, config: TrainConfig) -> tuple[torch.Tensor, float]:
    """(capacity loss, expected live entries at the last position, mean over layers and heads)
    from the layers' log β [B, T, Hkv]."""
    live = torch.stack([expected_live_count(lb, chunk_size=config.attn_chunk)
                        for lb in log_betas])  # [L, B, T, H]
    last = float(live[:, :, -1].detach().mean())
    if config.capacity_scope == "global":
        live = live.mean(dim=(0, 3))[..., None]  # [B, T, 1]: one budget for all layers and heads
    return capacity_loss(live, config.budget), last


def loss_weights(T: int, answer_start: int | None, config: TrainConfig, device) -> torch.Tensor:
    """Weight of each next-token label j (token j + 1) in the KL and CE means, [T - 1]."""
    weights = torch.ones(T - 1, dtype=torch.float32, device=device)
    if answer_start is not None and 1 <= answer_start < T:
        first = answer_start - 1  # label j is token j + 1
        if config.answer_only:
            weights[:first] = 0.0
        else:
            weights[first:] = float(config.answer_weight)
    return weights


def forward_backward(
    model: torch.nn.Module,
    attachment: GateAttachment,
    input_ids: torch.Tensor,
    config: TrainConfig,
    scale: float = 1.0,
    answer_start: int | None = None,
    precision: str | None = None,
) -> StepLosses:
    """Teacher and student forwards on `input_ids` [B, T], the loss, and its backward into the
    gates' .grad (multiplied by `scale`, e.g. 1 / grad_accum). Tokens from `answer_start` on
    are the answer (`loss_weights`). `precision`: the frozen model's (`resolve_precision`;
    None: from config.dtype)."""
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [B, T] with T >= 2, got {tuple(input_ids.shape)}")
    if precision is None:
        precision = resolve_precision(config.dtype, input_ids.device)
    teacher_h, student_h = _forwards(model.get_decoder(), attachment, input_ids, config,
                                     answer_start, frozen_precision(precision, input_ids.device))
    cap, last_live = capacity_term(attachment.log_betas, config)
    labels = input_ids[:, 1:]
    weights = loss_weights(input_ids.shape[1], answer_start, config, labels.device)
    carried = torch.nonzero(weights).flatten()
    lo, hi = int(carried[0]), int(carried[-1]) + 1  # the loss positions are one range
    n = (hi - lo) * labels.shape[0]
    first = None
    if answer_start is not None and 1 <= answer_start < input_ids.shape[1]:
        first = answer_start - 1
    w_total = float(weights.sum()) * labels.shape[0]
    h = student_h[:, lo:hi].detach().requires_grad_(True)
    sums = _chunked_loss(model.get_output_embeddings(), h, teacher_h, labels, weights, lo, first,
                         scale / w_total, config)
    roots, grads = [], []
    if h.grad is not None:
        roots.append(student_h[:, lo:hi])
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
        total=(config.kl_weight * sums["kl_w"] + config.ce_weight * sums["ce_w"]) / w_total
        + config.capacity_weight * cap_v,
        kl=sums["kl"] / n,
        ce=sums["ce"] / n,
        ce_teacher=sums["ce_t"] / n,
        cap=cap_v,
        live=last_live,
        tokens=int(input_ids.numel()),
        kl_answer=sums["kl_ans"] / n_answer if n_answer else None,
    )


def _forwards(decoder, attachment: GateAttachment, input_ids: torch.Tensor, config: TrainConfig,
              answer_start: int | None, precision) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen teacher's last hidden state (no gates), then the student's (gates on; with
    hard eviction, evicting where the teacher's pass of the gates says the server would)."""
    evicted_at = None
    with torch.no_grad(), precision:
        if config.hard_eviction:
            with attachment.capture() as teacher_log_betas:
                teacher_h = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
            evicted_at = hard_eviction_times(teacher_log_betas, config, answer_start)
        else:
            teacher_h = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
    with attachment.student(evicted_at), precision:
        student_h = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
    return teacher_h.float(), student_h.float()


def _chunked_loss(head, h: torch.Tensor, teacher_h: torch.Tensor, labels: torch.Tensor,
                  weights: torch.Tensor, lo: int, first: int | None, grad_scale: float,
                  config: TrainConfig) -> dict[str, float]:
    """KL + CE over the loss positions [lo, lo + h's length), chunk by chunk, each chunk's
    backward stopping at `h` (a detached copy of the student's hidden state, whose .grad
    collects the sum, so the model is traversed once). Returns the host sums of each term."""
    sums = dict(kl=0.0, ce=0.0, ce_t=0.0, kl_w=0.0, ce_w=0.0, kl_ans=0.0)
    hi = lo + h.shape[1]
    for a in range(lo, hi, config.loss_chunk):
        b = min(a + config.loss_chunk, hi)
        logp_s = F.log_softmax(head(h[:, a - lo:b - lo]).float(), dim=-1)
        with torch.no_grad():
            logp_t = F.log_softmax(head(teacher_h[:, a:b]).float(), dim=-1)
        target = labels[:, a:b]
        w = weights[a:b]
        kl_tok = (logp_t.exp() * (logp_t - logp_s)).sum(dim=-1)  # [B, b - a]
        ce_tok = F.nll_loss(logp_s.transpose(1, 2), target, reduction="none")
        kl_w, ce_w = (kl_tok * w).sum(), (ce_tok * w).sum()
        part = (config.kl_weight * kl_w + config.ce_weight * ce_w) * grad_scale
        if part.requires_grad:
            part.backward()
        sums["kl"] += float(kl_tok.detach().sum())
        sums["ce"] += float(ce_tok.detach().sum())
        sums["kl_w"] += float(kl_w.detach())
        sums["ce_w"] += float(ce_w.detach())
        if first is not None and b > first:
            sums["kl_ans"] += float(kl_tok.detach()[:, max(first - a, 0):].sum())
        sums["ce_t"] += float(F.nll_loss(logp_t.transpose(1, 2), target, reduction="sum"))
    return sums
