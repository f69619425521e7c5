"""The student: retention-gated attention inside a frozen Hugging Face model.

A forward pre-hook on every decoder layer's self_attn computes log β = gates.forward_layer(i, x)
from the normalised hidden state x that enters attention (the input the server's gate reads), and
an attention function registered with transformers' AttentionInterface runs `gated_attention`.
Teacher and student share one model object: the attention implementation is switched for the
student's forward only, so the frozen weights are held once."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from sglang_evict.training.gated_attention import gated_attention
from sglang_evict.gates.modules import GateConfig, RetentionGates
from sglang_evict.training.config import TrainConfigError

GATED_ATTENTION = "sglang_evict_gated"


_GATE_ATTR = "_sglang_evict_gate"


def gated_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: retention-gated attention with the log β that the
    layer's pre-hook stored on the module. query [B, Hq, T, D], key/value [B, Hkv, T, D];
    returns ([B, T, Hq, D], None) as transformers expects."""
    stored = getattr(module, _GATE_ATTR, None)
    if stored is None:
        raise RuntimeError(
            f"{GATED_ATTENTION} attention ran without log beta: use GateAttachment.student()"
        )
    log_beta, chunk, evicted_at = stored
    if attention_mask is not None:
        raise ValueError(
            f"{GATED_ATTENTION} attention supports unpadded causal batches only (got a mask)"
        )
    if key.shape[2] != query.shape[2]:
        raise ValueError(
            f"{GATED_ATTENTION} attention is for training: call the model with use_cache=False"
        )
    out = gated_attention(query, key, value, log_beta, scale=scaling, chunk_size=chunk,
                          evicted_at=evicted_at)
    return out.transpose(1, 2).contiguous(), None


def register_gated_attention() -> None:
    """Make GATED_ATTENTION a valid transformers attn_implementation (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(GATED_ATTENTION, gated_attention_forward)


def decoder_layers(model: torch.nn.Module) -> Sequence[torch.nn.Module]:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise TrainConfigError(
            f"{type(model).__name__} has no decoder layers at get_decoder().layers"
        )
    return layers


class GateAttachment:
    """RetentionGates attached to a Hugging Face causal LM for training.

    A forward pre-hook on each layers[i].self_attn computes log β = gates.forward_layer(i, x)
    from the attention input x and stores it on the module and in `log_betas[i]` (with grad);
    inside `student()` the model runs GATED_ATTENTION, outside it the model is untouched
    (the hooks do nothing), which is the teacher.
    """

    def __init__(self, model: torch.nn.Module, gates: RetentionGates, chunk_size: int = 128):
        register_gated_attention()
        self.model = model
        self.gates = gates
        self.chunk_size = chunk_size
        self.layers = decoder_layers(model)
        expect = GateConfig.from_hf_config(model.config)
        c = gates.config
        if (c.num_layers, c.num_kv_heads, c.hidden_size) != (
            expect.num_layers, expect.num_kv_heads, expect.hidden_size
        ):
            raise ValueError(
                f"gates for {c.num_layers} layers / {c.num_kv_heads} KV heads / hidden "
                f"{c.hidden_size} do not fit the model ({expect.num_layers} / "
                f"{expect.num_kv_heads} / {expect.hidden_size})"
            )
        self.active = False
        self.capturing = False
        self.log_betas: list[torch.Tensor | None] = [None] * len(self.layers)
        # per layer: int64 [B, T, Hkv] steps at which keys are evicted (hard eviction), or None
        self.evicted_at: list[torch.Tensor | None] = [None] * len(self.layers)
        self._handles = [
            layer.self_attn.register_forward_pre_hook(self._hook(i), with_kwargs=True)
            for i, layer in enumerate(self.layers)
        ]

    def _hook(self, i: int):
        def hook(module, args, kwargs):
            if not (self.active or self.capturing):
                return None
            x = kwargs.get("hidden_states", args[0] if args else None)
            if self.capturing:  # the teacher's forward: scores only, attention untouched
                with torch.no_grad():
                    self.log_betas[i] = self._gate(i, x)
                return None
            log_beta = self._gate(i, x)  # [B, T, Hkv] float32
            setattr(module, _GATE_ATTR, (log_beta, self.chunk_size, self.evicted_at[i]))
            self.log_betas[i] = log_beta
            return None

        return hook

    def _gate(self, i: int, x: torch.Tensor) -> torch.Tensor:
        # float32 even when the frozen model runs under bf16 autocast: log β is multiplied by
        # ages of thousands of tokens, and a bf16 rounding of it would reorder entries
        with torch.autocast(x.device.type, enabled=False):
            return self.gates.forward_layer(i, x)

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[torch.Tensor | None]]:
        """Inside, a forward of the model (the teacher) records every layer's log β from its
        own hidden states, without gradients; the list is filled as the forward runs."""
        self.log_betas = [None] * len(self.layers)
        self.capturing = True
        try:
            yield self.log_betas
        finally:
            self.capturing = False

    @contextlib.contextmanager
    def student(self, evicted_at: Sequence[torch.Tensor] | None = None) -> Iterator[GateAttachment]:
        """Inside, the model is the student; `evicted_at` (one [B, T, Hkv] per layer) makes its
        attention hard-evicted (straight-through)."""
        self.evicted_at = list(evicted_at) if evicted_at is not None else [None] * len(self.layers)
        previous = self.model.config._attn_implementation
        self.log_betas = [None] * len(self.layers)
        self.model.set_attn_implementation(GATED_ATTENTION)
        self.active = True
        try:
            yield self
        finally:
            self.active = False
            self.evicted_at = [None] * len(self.layers)
            self.model.set_attn_implementation(previous)
            for layer in self.layers:
                if hasattr(layer.self_attn, _GATE_ATTR):
                    delattr(layer.self_attn, _GATE_ATTR)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def load_base_model(
    path: str | os.PathLike[str], dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> torch.nn.Module:
    """The frozen base model (eval mode, requires_grad off, sdpa attention for the teacher)."""
    path = Path(path)
    if not path.is_dir():
        raise TrainConfigError(f"model folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise TrainConfigError(f"model folder {path} has no config.json (not a Hugging Face model)")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def student_logits(model, attachment: GateAttachment, input_ids: torch.Tensor) -> torch.Tensor:
    """The student's logits for `input_ids` [B, T] (no KV cache)."""
    with attachment.student():
        return model(input_ids=input_ids, use_cache=False).logits
