"""Gates for a served model from a file of either format: ours (`checkpoint`, a
.safetensors file) or the authors' (`trimkv_import`: trimkv_weights.pth, or its folder)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from sglang_evict.gates.checkpoint import load_gates
from sglang_evict.gates.modules import GateConfig, RetentionGates
from sglang_evict.gates.trimkv_import import import_trimkv_checkpoint


def load_gates_for_model(
    path: str | os.PathLike[str], hf_config: Any, device: torch.device | str = "cpu"
) -> RetentionGates:
    """Gates for the served model from either format, checked against it: ours (a
    .safetensors file) or the authors' (trimkv_weights.pth, or the folder holding it).
    `hf_config` is the served model's Hugging Face config (object or config.json dict)."""
    path = Path(path)
    if path.is_dir() or path.suffix in (".pth", ".pt", ".bin"):
        expect = GateConfig.from_hf_config(hf_config)
        return import_trimkv_checkpoint(path, expect).to(device)
    return load_gates(path, expect=GateConfig.from_hf_config(hf_config), device=device)
