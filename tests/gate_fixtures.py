"""Gate checkpoints for tests: input-dependent gates (small bias, larger weights), so log beta
varies from token to token and a wrong hidden state or layer shows up in the scores."""

from __future__ import annotations

import json
from pathlib import Path


def write_test_gates(model_path: Path, out: Path, **overrides) -> Path:
    from sglang_evict.gates.checkpoint import save_gates
    from sglang_evict.gates.modules import GateConfig, RetentionGates

    hf_config = json.loads((Path(model_path) / "config.json").read_text())
    config = GateConfig.from_hf_config(hf_config, **{"bias_init": 2.0, **overrides})
    return save_gates(out, RetentionGates(config, seed=1, init_std=0.2))


def hf_log_beta(model, gates, input_ids: list[int]):
    """log beta [L, T, H] of every token, computed by the gates on the hidden state that enters
    each HF decoder layer's attention (after its input layernorm)."""
    import torch

    captured: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        def hook(module, args, kwargs, i=i):
            captured[i] = kwargs["hidden_states"][0]
        handles.append(layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(torch.tensor([input_ids]))
            return torch.stack([gates.forward_layer(i, captured[i]) for i in range(len(captured))])
    finally:
        for h in handles:
            h.remove()
