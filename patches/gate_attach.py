"""Retention gates inside SGLang: log β computed while attention runs, stored beside the KV.

Targets sglang 0.5.23 (each target is checked by tests/unit/test_upstream_guards.py):
- ModelRunner.load_model (AFTER): load the gate checkpoint, check it against the served model
  and attach a forward pre-hook to every decoder layer's `self_attn`. The pre-hook sees the
  normalised hidden state entering attention (Llama, Qwen2, Qwen3 and Mistral all call
  `self_attn(positions=, hidden_states=, forward_batch=)` after the input layernorm), so one
  mechanism serves every family without forking a model file.
The sglang_evict attention backend stores each layer's log beta beside its K and V in the
head-slots (pending until that layer's KV write); per-request statistics: request_meta.py.
"""

from __future__ import annotations

import inspect
import logging

import torch

from sglang_evict.config import EvictConfig
from sglang_evict.patches.runtime import bind

logger = logging.getLogger(__name__)

LOAD_MODEL = "sglang.srt.model_executor.model_runner.ModelRunner.load_model"

ATTENTION_ARGS = ("positions", "hidden_states", "forward_batch")


class GateAttachError(RuntimeError):
    pass


class GateAttachment:
    """Process-wide state of one served model: its gates and pending scores.

    `pending[layer_id]` holds (log_beta, positions) from the layer's pre-hook until the backend's
    KV write of the same layer consumes it; the post-hook drops what no write consumed."""

    def __init__(self, config: EvictConfig, gates, num_layers: int, num_kv_heads: int):
        self.config = config
        self.gates = gates
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # Token-layers of extend forwards whose gates ran (the shape, a host int): what a
        # prefix hit saves is visible as gates not run.
        self.gated_prompt_token_layers = 0


# ------------------------------------------------------------------ attaching to the model


def decoder_layers(model) -> list:
    """The decoder layers of a SGLang causal LM whose attention is `layers[i].self_attn`
    called as self_attn(positions, hidden_states, forward_batch); raise by name otherwise."""
    name = type(model).__name__
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise GateAttachError(
            f"sglang-evict cannot attach retention gates to {name}: it has no model.layers"
        )
    found = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None:
            if type(layer).__name__ == "PPMissingLayer":  # another pipeline stage's layer
                continue
            raise GateAttachError(
                f"sglang-evict cannot attach retention gates to {name}: layer {i} "
                f"({type(layer).__name__}) has no self_attn"
            )
        params = list(inspect.signature(attn.forward).parameters)
        if tuple(params[:3]) != ATTENTION_ARGS:
            raise GateAttachError(
                f"sglang-evict cannot attach retention gates to {name}: layer {i}'s "
                f"{type(attn).__name__}.forward takes {params[:3]}, expected {list(ATTENTION_ARGS)}"
            )
        found.append((i, attn))
    if not found:
        raise GateAttachError(f"sglang-evict cannot attach retention gates to {name}: no layers")
    return found


def _bound(args, kwargs, name: str):
    if name in kwargs:
        return kwargs[name]
    return args[ATTENTION_ARGS.index(name)]


def _make_hooks(state: GateAttachment, layer_id: int):
    def pre_hook(module, args, kwargs):
        hidden = _bound(args, kwargs, "hidden_states")
        positions = _bound(args, kwargs, "positions")
        if hidden.shape[0] == 0:
            return None
        with torch.no_grad():
            log_beta = state.gates.forward_layer(layer_id, hidden)
        if _bound(args, kwargs, "forward_batch").forward_mode.is_extend():
            state.gated_prompt_token_layers += hidden.shape[0]
        state.pending[layer_id] = (log_beta, positions)
        return None

    def post_hook(module, args, kwargs, output):
        # A forward that wrote no KV (save_kv_cache off) leaves its scores: none may go stale.
        state.pending.pop(layer_id, None)
        return None

    return pre_hook, post_hook


def after_load_model(rt, result, runner, *args, **kwargs):
    config = rt.config
    if config.gates is None or runner.is_draft_worker:
        return result
    from sglang_evict.gates.files import load_gates_for_model

    hf_config = runner.model_config.hf_config
    layers = decoder_layers(runner.model)
    gates = load_gates_for_model(config.gates, hf_config, device=runner.device)
    gates.eval().requires_grad_(False)
    state = GateAttachment(config, gates, gates.config.num_layers, gates.config.num_kv_heads)
    for layer_id, attn in layers:
        pre_hook, post_hook = _make_hooks(state, layer_id)
        attn.register_forward_pre_hook(pre_hook, with_kwargs=True)
        attn.register_forward_hook(post_hook, with_kwargs=True)
    rt.gates = state
    logger.info(
        "sglang-evict: retention gates %s attached to %d layers of %s (variant %s%s)",
        config.gates, len(layers), type(runner.model).__name__, gates.config.variant,
        ", shared projection" if gates.config.shared_projection else "",
    )
    return result


def register(registry, hook_type, rt) -> None:
    """Registered only with gates configured, so vanilla serving keeps SGLang's hot paths
    unwrapped."""
    if not rt.config.active:
        return
    registry.register(LOAD_MODEL, bind(rt, after_load_model), hook_type.AFTER)
