"""Distillation init: new gates start from the scores of existing ones.

Changing the gates' architecture (per-layer TrimKV gates to DBTrimKV's shared projection, another
width or variant) leaves nothing to copy, and training from scratch spends its first hundred
steps on what the old gates already know. Here the new gates regress the old gates' log β on
the frozen model's own attention inputs: no attention, no backward through the model, seconds
per step. The target is log(-log β), the log of the decay rate: the eviction score
(t - pos) · log β ranks entries by their rate times their age, so a relative error in the rate
is what matters, whatever its magnitude.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from sglang_evict.gates.modules import RetentionGates
from sglang_evict.training.student import decoder_layers


def _log_rate(log_beta: torch.Tensor) -> torch.Tensor:
    return torch.log((-log_beta).clamp_min(1e-30))


@torch.no_grad()
def attention_inputs(model: torch.nn.Module, sequences: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, [N, d]: the normalised hidden states entering attention over `sequences`
    (each [1, T]), as the gates see them."""
    layers = decoder_layers(model)
    found: list[list[torch.Tensor]] = [[] for _ in layers]

    def hook(i):
        def record(module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            found[i].append(x.reshape(-1, x.shape[-1]).float().cpu())
        return record

    with contextlib.ExitStack() as stack:
        for i, layer in enumerate(layers):
            stack.callback(layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True).remove)
        for ids in sequences:
            model(input_ids=ids, use_cache=False)
    return [torch.cat(xs) for xs in found]


def distill_gates(gates: RetentionGates, source: RetentionGates, inputs: Sequence[torch.Tensor],
                  steps: int, lr: float = 1e-2, batch: int = 2048, seed: int = 0) -> list[float]:
    """Fit `gates` to `source`'s log rate on `inputs` (per layer [N, d]) with Adam, `batch`
    rows per layer and step; returns the loss (mean squared log-rate error) per step."""
    with torch.no_grad():
        targets = [_log_rate(source.forward_layer(i, x)) for i, x in enumerate(inputs)]
    n = inputs[0].shape[0]
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(gates.parameters(), lr=lr)
    device = next(gates.parameters()).device
    losses = []
    for _ in range(steps):
        rows = torch.randint(0, n, (min(batch, n),), generator=g)
        opt.zero_grad(set_to_none=True)
        loss = torch.stack([
            (_log_rate(gates.forward_layer(i, x[rows].to(device))) - t[rows].to(device)).pow(2).mean()
            for i, (x, t) in enumerate(zip(inputs, targets))
        ]).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def distill_error(gates: RetentionGates, source: RetentionGates,
                  inputs: Sequence[torch.Tensor]) -> float:
    """Mean squared log-rate error of `gates` against `source` on `inputs`."""
    errs = [(_log_rate(gates.forward_layer(i, x)) - _log_rate(source.forward_layer(i, x))).pow(2).mean()
            for i, x in enumerate(inputs)]
    return float(torch.stack(errs).mean())
