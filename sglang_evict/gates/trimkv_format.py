"""The authors' gate checkpoint format (`trimkv_weights.pth` and its config.json): where its keys,
shapes and fields come from, and reading a file into tensors grouped by layer.

Facts read from the public repository (no code taken from it):

* ngocbh/trimkv @ 0456bc4eb5bc20972c7463cabf3ae859e498f7f6 (2025-12-23),
  src/trimkv/models/{qwen3,llama,phi3}/modeling_trimkv_*.py: each decoder layer's attention
  holds `self.retention_gate`, so the gate keys are
  `model.layers.{i}.self_attn.retention_gate.<name>`. The class is picked by the config field
  `retention_gate`:
    - 'rg'  `RetentionGate`:  linear1 = Linear(hidden_size, I, bias=True),
            linear2 = Linear(I, num_key_value_heads, bias=False), bias = Parameter([H]);
            log β = logsigmoid(linear2(act(linear1(x))) + bias), x = the hidden state after
            input_layernorm, act = ACT2FN[hidden_act]. Keys/shapes:
              linear1.weight [I, d]   linear1.bias [I]   linear2.weight [H, I]   bias [H]
    - 'rg2' `RetentionGate2`: the same names, but linear1 takes concat(post-RoPE K, V),
            2 · H · head_dim inputs, not x.
    - 'rg3' `RetentionGate3`: SwiGLU without biases on concat(post-RoPE K, V):
              gate_proj.weight [I, 2·H·head_dim]   up_proj.weight [I, 2·H·head_dim]
              down_proj.weight [H, I]   bias [H]
  I = config.retention_gate_intermediate_size (512 for Qwen3/Llama, 1024 by default for
  Phi-3), bias initialised to config.retention_gate_bias_init (10.0). `from_pretrained` loads
  `<dir>/trimkv_weights.pth` with `torch.load` (a flat dict name -> tensor holding exactly the
  keys of the model's state_dict that contain one of config.trainable_params, split on '|')
  and applies it with `load_state_dict(strict=False)`; `<dir>/config.json` is the TrimKV
  config (base model in `base_model`, M in `memory_size`).
* A later snapshot of the same code, seen through the code index (files
  src/trimkv/models/{qwen2,qwen2_5_vl,qwen3_vl,llava}/modeling_trimkv_*.py and a Qwen3 config
  with `global_capacity` / `tie_retention_gate_layers`; ngocbh/trimkv @ ed920f36 imports these
  modules in experiments/lmms-eval/load_model.py), adds the DBTrimKV gate:
    - 'rg10' `RetentionGate10`, a 3-layer MLP on x:
              linear1.weight [I, d]  linear1.bias [I]  linear2.weight [I, I]  linear2.bias [I]
              linear3.weight [H, I]  bias [H]
            log β = logsigmoid(linear3(act(linear2(act(linear1(x))))) + bias).
      With `tie_retention_gate_layers` (default True) and 'rg10', the model's __init__ makes
      every layer's `linear3` and `bias` the objects of layer 0 (DBTrimKV: one final
      projection for all layers). The training script saves
      {k: v for k, v in model.state_dict().items() if any(p in k for p in trainable_params)},
      and a state_dict lists a tied parameter once per layer, so the file has per-layer keys
      for the tied tensors too. Loading it with load_state_dict copies each layer's entry into
      the one shared tensor in turn, so the LAST layer's copy is what their model runs with.
    - Multimodal models (Qwen3-VL, Qwen2.5-VL, LLaVA) put the language model under
      `model.language_model.`, so their keys read
      `model.language_model.layers.{i}.self_attn.retention_gate.<name>`; their TrimKV fields
      live in config.json's `text_config`.
  The training code also names rg4..rg9 (not published); only 'rg' and 'rg10' read x.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from sglang_evict.gates.checkpoint import GateCheckpointError, _check_file
from sglang_evict.gates.modules import GateConfig

TRIMKV_WEIGHTS_FILE = "trimkv_weights.pth"


# Their gate keys: <prefix>layers.<i>.self_attn.retention_gate.<param>, where <prefix> is
# "model." (causal LMs) or "model.language_model." (multimodal models).
_TRIMKV_KEY = re.compile(
    r"^(?P<prefix>.*?)layers\.(?P<layer>\d+)\.self_attn\.retention_gate\.(?P<param>.+)$"
)


# Parameter names (within one layer's retention_gate) of each of their gate classes.
_TRIMKV_PARAMS = {
    "rg": frozenset({"linear1.weight", "linear1.bias", "linear2.weight", "bias"}),
    "rg10": frozenset(
        {
            "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias",
            "linear3.weight", "bias",
        }
    ),
    "rg3": frozenset({"gate_proj.weight", "up_proj.weight", "down_proj.weight", "bias"}),
}


_TRIMKV_SUPPORTED = {"rg": "mlp", "rg10": "mlp3"}


_TRIMKV_DESCRIBED = {
    "rg2": "an MLP on concat(post-RoPE K, V)",
    "rg3": "a SwiGLU MLP on concat(post-RoPE K, V)",
}


def _unsupported(variant: str, source: str) -> GateCheckpointError:
    desc = _TRIMKV_DESCRIBED.get(variant)
    what = f" ({desc})" if desc else ""
    return GateCheckpointError(
        f"trimkv checkpoint {source} uses retention gate variant {variant!r}{what}, which "
        f"sglang-evict does not support; supported: 'rg' (-> mlp) and 'rg10' (-> mlp3), "
        f"whose gates read the hidden state entering attention"
    )


def _trimkv_fields(cfg: Any) -> dict[str, Any]:
    """TrimKV-specific fields of their config (object or dict), looking into text_config too
    (multimodal configs keep them there, and memory_size at the top)."""
    out: dict[str, Any] = {}
    if cfg is None or isinstance(cfg, GateConfig):
        return out

    def get(c: Any, k: str) -> Any:
        return c.get(k) if isinstance(c, Mapping) else getattr(c, k, None)

    text = get(cfg, "text_config")
    for key in (
        "retention_gate",
        "tie_retention_gate_layers",
        "retention_gate_intermediate_size",
        "retention_gate_bias_init",
        "memory_size",
    ):
        value = get(cfg, key)
        if value is None and text is not None:
            value = get(text, key)
        if value is not None:
            out[key] = value
    return out


def _model_config(model_config: Any, source: str) -> GateConfig:
    if isinstance(model_config, GateConfig):
        return model_config
    try:
        cfg = GateConfig.from_hf_config(model_config)
    except (TypeError, ValueError) as err:
        raise GateCheckpointError(
            f"trimkv checkpoint {source}: cannot read the model config: {err}"
        ) from err
    arch = cfg.architecture
    if arch:
        # Their saved config names their wrapper class (TrimKVQwen3ForCausalLM); the served
        # model is the base class.
        for wrapper in ("DBTrimKV", "TrimKV"):
            if arch.startswith(wrapper) and len(arch) > len(wrapper):
                cfg = cfg.replace(architecture=arch[len(wrapper):])
                break
    return cfg


def _read_trimkv_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise GateCheckpointError(
            f"trimkv checkpoint {path} cannot be read by torch.load (corrupt or truncated?): {err}"
        ) from err
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise GateCheckpointError(
            f"trimkv checkpoint {path} is not a flat dict of name -> tensor "
            f"(got {type(state).__name__})"
        )
    if not state:
        raise GateCheckpointError(f"trimkv checkpoint {path} holds no tensors")
    return dict(state)


class _Found(NamedTuple):
    """The file's gate tensors, grouped: what the import's steps read."""

    source: str
    prefix: str
    per_layer: dict[int, dict[str, torch.Tensor]]
    layers: list[int]

    def key(self, i: int, param: str) -> str:
        return f"{self.prefix}layers.{i}.self_attn.retention_gate.{param}"


def _locate(path: Path) -> tuple[Path, dict[str, Any] | None]:
    """The weights file, and the TrimKV config.json beside it when `path` is their folder."""
    config_json: dict[str, Any] | None = None
    if path.is_dir():
        folder = path
        path = folder / TRIMKV_WEIGHTS_FILE
        cfg_path = folder / "config.json"
        if cfg_path.is_file():
            try:
                config_json = json.loads(cfg_path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise GateCheckpointError(
                    f"trimkv config {cfg_path} is not valid JSON: {err}"
                ) from err
    _check_file(path, "trimkv checkpoint")
    return path, config_json


def _group_by_layer(state: Mapping[str, torch.Tensor],
                    source: str) -> tuple[dict[int, dict[str, torch.Tensor]], str]:
    """Keys grouped by layer, and their one prefix; anything that is not a retention-gate key
    is unexpected."""
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    prefixes: set[str] = set()
    unexpected = []
    for key, tensor in state.items():
        m = _TRIMKV_KEY.match(key)
        if m is None:
            unexpected.append(key)
            continue
        prefixes.add(m["prefix"])
        per_layer.setdefault(int(m["layer"]), {})[m["param"]] = tensor
    if unexpected:
        shown = ", ".join(repr(k) for k in unexpected[:10])
        raise GateCheckpointError(
            f"trimkv checkpoint {source}: unexpected tensor(s) that are not retention-gate "
            f"parameters (<prefix>layers.N.self_attn.retention_gate.*): {shown}"
        )
    if len(prefixes) != 1:
        raise GateCheckpointError(
            f"trimkv checkpoint {source}: gate keys under several prefixes {sorted(prefixes)}"
        )
    return per_layer, prefixes.pop()
