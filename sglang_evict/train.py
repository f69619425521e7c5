"""Training the retention gates (METHOD.md "Training"): only the gates learn, the LLM is frozen.

    teacher   the frozen Hugging Face model with its normal attention, under no_grad
    student   the same model with retention-gated attention: a forward pre-hook on every
              decoder layer's self_attn computes log β = gates.forward_layer(i, x) from the
              normalised hidden state x that enters attention (the same input the server's
              gate reads), and a custom attention function registered with transformers'
              AttentionInterface calls `gated_attention(q, k, v, log β)`
    loss      kl_weight · KL(teacher || student) on next-token distributions
              + ce_weight · next-token cross-entropy of the student
              (both a weighted mean over positions: the answer's tokens weigh answer_weight)
              + capacity_weight · mean over layers of capacity_loss(expected_live_count(log β), M)

Teacher and student share one model object: the attention implementation is switched for the
student's forward only, so the frozen weights are held once.

The KL/CE terms are computed `loss_chunk` positions at a time and back-propagated into the
student's final hidden state chunk by chunk, so the [T, vocab] logits of teacher and student
never exist in full (49152 x 2048 floats are 400 MB each for the default model).

A run writes to `out_dir`: checkpoint.pt (gates, optimizer, scheduler, RNG states, data
cursor, step, history; replaced atomically every `checkpoint_every` steps and on stop),
config.json, log.jsonl and log.csv (one row per optimizer step), loss_curve.png, and at the end
gates.safetensors (`save_gates`, with the budget M and the training info in its header), also
copied to `export` when set. `resume=True` continues from checkpoint.pt with the identical next
loss an uninterrupted run would have had: the data stream is a pure function of (seed, index).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sglang_evict.gate_checkpoint import save_gates
from sglang_evict.gated_attention import capacity_loss, expected_live_count, gated_attention
from sglang_evict.gates import VARIANTS, GateConfig, RetentionGates

GATED_ATTENTION = "sglang_evict_gated"
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_VERSION = 1
EXPORT_FILE = "gates.safetensors"
# Where the committed gates for the default model live (installed as package data).
DEFAULT_GATES_DIR = Path(__file__).resolve().parent / "default_gates"


class TrainConfigError(ValueError):
    """A training config value (or the model folder it names) is unusable."""


# ---------------------------------------------------------------------- config


def _default_tasks() -> list[str]:
    from sglang_evict.train_data import TRAIN_TASKS

    return list(TRAIN_TASKS)


@dataclass
class TrainConfig:
    """Everything a run depends on. Read from a JSON/TOML file (`load_config`) with
    command-line overrides; the fields in RESUMABLE_CHANGES may differ on --resume."""

    # base model folder (Hugging Face format); None = the default model (SmolLM2-135M-Instruct)
    model: str | None = None
    # tokenizer folder for the data; None = the model folder
    tokenizer: str | None = None
    out_dir: str = "train_runs/gates"
    # extra path for the final gates (besides out_dir/gates.safetensors)
    export: str | None = None
    # the gates (GateConfig fields). 64 hidden units keep the default model's file at
    # 30 x (576·64 + 64 + 64·3 + 3) float32 = 4.5 MB.
    budget: int = 128
    gate_hidden: int = 64
    variant: str = "mlp"
    shared_projection: bool = False  # True: DBTrimKV's final projection shared by all layers
    bias_init: float = 10.0
    init_std: float = 0.02
    # start from these gates (a checkpoint `load_gates_for_model` accepts: ours or the authors')
    # instead of a fresh init; their variant, width and projection must match the fields above
    init_gates: str | None = None
    # loss
    kl_weight: float = 1.0
    ce_weight: float = 1.0
    capacity_weight: float = 1.0
    # Weight of an answer token (after the prompt) in the KL and CE means; other tokens weigh 1.
    # A RULER answer is ~10 of ~2000 tokens, and it is the only place where losing the needle
    # costs anything: at weight 1 that signal is a few tenths of a percent of the loss.
    answer_weight: float = 1.0
    # data (sglang_evict.train_data)
    tasks: list[str] = field(default_factory=_default_tasks)
    lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    chat: bool = True
    # optimisation: `steps` optimizer steps of `grad_accum` sequences each
    steps: int = 200
    grad_accum: int = 1
    lr: float = 5e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    # "auto": cuda if available else cpu; bf16 on cuda, fp32 on cpu
    dtype: str = "auto"
    device: str = "auto"
    attn_chunk: int = 128
    loss_chunk: int = 256
    checkpoint_every: int = 25
    max_minutes: float | None = None
    num_threads: int | None = None
    progress: bool = True

    def validate(self) -> TrainConfig:
        from sglang_evict.train_data import DataError, check_length, task_spec

        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise TrainConfigError(f"{name} must be {what}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return is_int(v) or (isinstance(v, float) and math.isfinite(v))

        need(is_int(self.budget) and self.budget >= 1, "budget", "an integer >= 1 (M)")
        need(is_int(self.gate_hidden) and self.gate_hidden >= 1, "gate_hidden", "an integer >= 1")
        need(self.variant in VARIANTS, "variant", f"one of {', '.join(VARIANTS)}")
        need(isinstance(self.shared_projection, bool), "shared_projection", "true or false")
        need(is_num(self.bias_init), "bias_init", "a finite number")
        need(is_num(self.init_std) and self.init_std >= 0, "init_std", "a number >= 0")
        need(self.init_gates is None or (isinstance(self.init_gates, str) and self.init_gates != ""),
             "init_gates", "a gate checkpoint path or null")
        for name in ("kl_weight", "ce_weight", "capacity_weight", "weight_decay", "grad_clip"):
            need(is_num(getattr(self, name)) and getattr(self, name) >= 0, name, "a number >= 0")
        need(is_num(self.answer_weight) and self.answer_weight > 0, "answer_weight", "a number > 0")
        if self.kl_weight == self.ce_weight == self.capacity_weight == 0:
            raise TrainConfigError("kl_weight, ce_weight and capacity_weight are all 0")
        need(isinstance(self.tasks, list) and len(self.tasks) > 0, "tasks", "a non-empty list")
        for t in self.tasks:
            try:
                task_spec(t)
            except DataError as err:
                raise TrainConfigError(f"tasks: {err}") from None
        need(isinstance(self.lengths, list) and len(self.lengths) > 0, "lengths", "a non-empty list")
        for length in self.lengths:
            try:
                check_length(length)
            except DataError as err:
                raise TrainConfigError(f"lengths: {err}") from None
        need(isinstance(self.chat, bool), "chat", "true or false")
        for name in ("steps", "grad_accum", "attn_chunk", "loss_chunk", "checkpoint_every"):
            need(is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "an integer >= 1")
        need(is_num(self.lr) and self.lr > 0, "lr", "a number > 0")
        need(is_int(self.warmup_steps) and self.warmup_steps >= 0, "warmup_steps", "an integer >= 0")
        need(is_num(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]")
        need(is_int(self.seed), "seed", "an integer")
        need(self.dtype in ("auto", "fp32", "bf16"), "dtype", "auto, fp32 or bf16")
        need(self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:"),
             "device", "auto, cpu, cuda or cuda:N")
        need(self.max_minutes is None or (is_num(self.max_minutes) and self.max_minutes > 0),
             "max_minutes", "a number > 0 or null")
        need(self.num_threads is None or (is_int(self.num_threads) and self.num_threads >= 1),
             "num_threads", "an integer >= 1 or null")
        need(isinstance(self.out_dir, str) and self.out_dir != "", "out_dir", "a folder path")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# May change between a run and its --resume (they do not change what a step computes).
RESUMABLE_CHANGES = frozenset(
    {"steps", "max_minutes", "checkpoint_every", "progress", "export", "num_threads", "out_dir",
     "model", "tokenizer", "device"}
)


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _convert(name: str, value: Any, tp: Any) -> Any:
    """A config value from a file (already typed) or the command line (a string)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _convert(name, value, inner)
    if origin is list:
        (item,) = args
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise TrainConfigError(f"{name} must be a list, got {value!r}")
        return [_convert(name, v, item) for v in value]
    if not isinstance(value, str):
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value  # type errors are reported by validate()
    try:
        if tp is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            return int(value)
        if tp is float:
            return float(value)
    except ValueError:
        raise TrainConfigError(f"{name}: cannot read {value!r} as {tp.__name__}") from None
    return value


def config_from_mapping(data: Mapping[str, Any]) -> TrainConfig:
    types_ = _field_types()
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise TrainConfigError(f"unknown config field(s): {', '.join(unknown)}")
    values = {k: _convert(k, v, types_[k]) for k, v in data.items()}
    return TrainConfig(**values).validate()


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | None = None
) -> TrainConfig:
    """TrainConfig from a .json or .toml file (or the defaults), then `overrides`."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise TrainConfigError(f"config file {path} does not exist")
        try:
            if path.suffix == ".toml":
                data = tomllib.loads(path.read_text())
            elif path.suffix == ".json":
                data = json.loads(path.read_text())
            else:
                raise TrainConfigError(f"config file {path}: use a .json or .toml file")
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
            raise TrainConfigError(f"config file {path}: {err}") from None
        if not isinstance(data, dict):
            raise TrainConfigError(f"config file {path} must hold a table/object of fields")
    data.update(overrides or {})
    return config_from_mapping(data)


# ---------------------------------------------------------------------- gated attention in HF


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
    log_beta, chunk = stored
    if attention_mask is not None:
        raise ValueError(
            f"{GATED_ATTENTION} attention supports unpadded causal batches only (got a mask)"
        )
    if key.shape[2] != query.shape[2]:
        raise ValueError(
            f"{GATED_ATTENTION} attention is for training: call the model with use_cache=False"
        )
    out = gated_attention(query, key, value, log_beta, scale=scaling, chunk_size=chunk)
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
        self.log_betas: list[torch.Tensor | None] = [None] * len(self.layers)
        self._handles = [
            layer.self_attn.register_forward_pre_hook(self._hook(i), with_kwargs=True)
            for i, layer in enumerate(self.layers)
        ]

    def _hook(self, i: int):
        def hook(module, args, kwargs):
            if not self.active:
                return None
            x = kwargs.get("hidden_states", args[0] if args else None)
            log_beta = self.gates.forward_layer(i, x)  # [B, T, Hkv] float32
            setattr(module, _GATE_ATTR, (log_beta, self.chunk_size))
            self.log_betas[i] = log_beta
            return None

        return hook

    @contextlib.contextmanager
    def student(self) -> Iterator[GateAttachment]:
        previous = self.model.config._attn_implementation
        self.log_betas = [None] * len(self.layers)
        self.model.set_attn_implementation(GATED_ATTENTION)
        self.active = True
        try:
            yield self
        finally:
            self.active = False
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


# ---------------------------------------------------------------------- losses


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
    with torch.no_grad():
        teacher_h = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
    with attachment.student():
        student_h = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
    log_betas = attachment.log_betas

    # Capacity term: mean over layers of the hinge on the expected live count.
    caps, lives = [], []
    for lb in log_betas:
        live = expected_live_count(lb, chunk_size=config.attn_chunk)
        caps.append(capacity_loss(live, config.budget))
        lives.append(live[:, -1].detach().mean())
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


# ---------------------------------------------------------------------- the run


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainConfigError(f"device {name!r} asked for, but CUDA is not available")
    return torch.device(name)


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def _lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up over warmup_steps, then cosine decay to min_lr_ratio at `steps`."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _rng_states() -> dict[str, Any]:
    import numpy as np

    states = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: Mapping[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _mean_present(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _finite(x: Any) -> Any:
    return x if not isinstance(x, float) or math.isfinite(x) else None


class Trainer:
    """One training run (see the module docstring for what it writes)."""

    def __init__(self, config: TrainConfig, *, resume: bool = False) -> None:
        from sglang_evict import default_model
        from sglang_evict.train_data import TrainingData

        self.config = config.validate()
        self.out_dir = Path(config.out_dir)
        self.checkpoint_path = self.out_dir / CHECKPOINT_FILE
        state = None
        if resume:
            if not self.checkpoint_path.is_file():
                raise TrainConfigError(f"--resume: no checkpoint at {self.checkpoint_path}")
            state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
            self._check_resume(state)
        elif self.checkpoint_path.exists():
            raise TrainConfigError(
                f"{self.checkpoint_path} exists: pass --resume to continue that run, or choose "
                f"another out_dir"
            )
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.model_path = Path(config.model) if config.model else default_model.resolve()
        self.device = _resolve_device(config.device)
        self.dtype = _resolve_dtype(config.dtype, self.device)
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        self.model = load_base_model(self.model_path, self.dtype, str(self.device))
        gate_config = GateConfig.from_hf_config(
            self.model.config,
            gate_hidden=config.gate_hidden,
            variant=config.variant,
            shared_projection=config.shared_projection,
            bias_init=float(config.bias_init),
            budget=config.budget,
        )
        self.gates = RetentionGates(
            gate_config, seed=config.seed, init_std=float(config.init_std), device=self.device
        )
        if config.init_gates and state is None:
            self._load_init_gates(config.init_gates)
        self.attachment = GateAttachment(self.model, self.gates, config.attn_chunk)
        self.optimizer = torch.optim.AdamW(
            self.gates.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: _lr_factor(s, self.config)
        )
        self.data = TrainingData(
            tokenizer_path=config.tokenizer or self.model_path,
            task_names=config.tasks,
            lengths=config.lengths,
            seed=config.seed,
            chat=config.chat,
        )
        try:
            self.data.check()
        except ValueError as err:
            raise TrainConfigError(f"training data: {err}") from None
        self.step = 0
        self.cursor = 0
        self.history: list[dict[str, Any]] = []
        self.elapsed_before = 0.0
        if state is not None:
            self.gates.load_state_dict(state["gates"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step, self.cursor = int(state["step"]), int(state["cursor"])
            self.history = list(state["history"])
            self.elapsed_before = float(state.get("elapsed_s", 0.0))
            _set_rng_states(state["rng"])
        self._stop_signal = False

    def _load_init_gates(self, path: str) -> None:
        from sglang_evict.gate_checkpoint import GateCheckpointError, load_gates_for_model

        try:
            start = load_gates_for_model(path, self.model.config, device=self.device)
        except GateCheckpointError as err:
            raise TrainConfigError(f"init_gates: {err}") from None
        mine, theirs = self.gates.config, start.config
        differ = [
            f"{k}: {getattr(theirs, k)!r} in the file, {getattr(mine, k)!r} in the config"
            for k in ("variant", "gate_hidden", "shared_projection", "activation")
            if getattr(theirs, k) != getattr(mine, k)
        ]
        if differ:
            raise TrainConfigError(f"init_gates {path} does not fit this config ({'; '.join(differ)})")
        self.gates.load_state_dict(start.state_dict())

    def _check_resume(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != CHECKPOINT_VERSION:
            raise TrainConfigError(
                f"{self.checkpoint_path}: checkpoint version {state.get('version')!r}, "
                f"expected {CHECKPOINT_VERSION}"
            )
        saved, now = state["config"], self.config.to_dict()
        # A field newer than the checkpoint had its default value in that run.
        defaults = TrainConfig().to_dict()
        changed = [
            f"{k}: {saved.get(k, defaults[k])!r} -> {now[k]!r}"
            for k in now
            if k not in RESUMABLE_CHANGES and saved.get(k, defaults[k]) != now[k]
        ]
        if changed:
            raise TrainConfigError(
                f"--resume with a config that changes what training computes ({'; '.join(changed)}); "
                f"only {', '.join(sorted(RESUMABLE_CHANGES))} may change"
            )
        if int(state["step"]) > self.config.steps:
            raise TrainConfigError(
                f"the checkpoint is at step {state['step']}, beyond steps={self.config.steps}"
            )

    # -- persistence

    def save_checkpoint(self) -> Path:
        state = {
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "cursor": self.cursor,
            "gates": self.gates.state_dict(),
            "gate_config": self.gates.config.to_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_states(),
            "config": self.config.to_dict(),
            "history": self.history,
            "elapsed_s": self.elapsed(),
        }
        _atomic_torch_save(state, self.checkpoint_path)
        self.write_logs()
        return self.checkpoint_path

    def write_logs(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "log.jsonl", "w") as f:
            for row in self.history:
                f.write(json.dumps(row) + "\n")
        if self.history:
            with open(self.out_dir / "log.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(self.history[0]))
                writer.writeheader()
                writer.writerows(self.history)
            plot_history(self.history, self.out_dir / "loss_curve.png", self.config.budget)

    def training_info(self, stopped: str) -> dict[str, Any]:
        recent = self.history[-10:]

        def mean(key: str) -> float | None:
            return _finite(_mean_present([r.get(key) for r in recent]))

        c = self.config
        return {
            "method": "TrimKV" if not c.shared_projection else "DBTrimKV (shared projection)",
            "base_model": str(self.model_path),
            "base_model_name": Path(self.model_path).name,
            "budget": c.budget,
            "steps": self.step,
            "target_steps": c.steps,
            "stopped": stopped,
            "init_gates": c.init_gates,
            "sequences": self.cursor,
            "tokens": int(sum(r["tokens"] for r in self.history)),
            "tasks": list(c.tasks),
            "lengths": list(c.lengths),
            "chat": c.chat,
            "data": "RULER generators from nvidia-long-context-eval 26.3 + multi-turn recall, "
            "train split (sglang_evict.train_data)",
            "seed": c.seed,
            "lr": c.lr,
            "grad_accum": c.grad_accum,
            "loss": f"{c.kl_weight}*KL(teacher||student) + {c.ce_weight}*CE "
            f"(answer tokens x{c.answer_weight}) + {c.capacity_weight}*mean_layers relu(live - M)/M",
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": self.device.type,
            "wall_minutes": round(self.elapsed() / 60, 2),
            "answer_weight": c.answer_weight,
            "final_last10": {
                k: mean(k) for k in ("loss", "kl", "kl_answer", "ce", "ce_teacher", "cap", "live")
            },
        }

    def export(self, stopped: str = "completed", paths: Sequence[str | os.PathLike[str]] = ()) -> list[Path]:
        info = self.training_info(stopped)
        targets = [self.out_dir / EXPORT_FILE, *[Path(p) for p in paths]]
        if self.config.export:
            targets.append(Path(self.config.export))
        written = []
        for t in dict.fromkeys(targets):
            written.append(save_gates(t, self.gates, extra=info))
        return written

    # -- the loop

    def elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self._t0 if hasattr(self, "_t0") else 0.0)

    def _accumulate(self) -> tuple[list[StepLosses], list[str]]:
        """Forward/backward of one optimizer step's sequences into the gates' .grad."""
        c = self.config
        self.optimizer.zero_grad(set_to_none=True)
        parts: list[StepLosses] = []
        tasks: list[str] = []
        for i in range(c.grad_accum):
            sample = self.data.sample(self.cursor + i)
            ids = torch.tensor([sample["input_ids"]], device=self.device)
            parts.append(forward_backward(self.model, self.attachment, ids, c, 1.0 / c.grad_accum,
                                          answer_start=sample["answer_start"]))
            tasks.append(f"{sample['task']}@{sample['length']}")
        return parts, tasks

    def train_step(self) -> dict[str, Any]:
        """One optimizer step; returns (and logs) its row of the history."""
        c = self.config
        t0 = time.monotonic()
        parts, tasks = self._accumulate()
        # Nothing below is interrupted half-way by a KeyboardInterrupt in _accumulate: the
        # step, the cursor and the gates change together.
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.gates.parameters(), c.grad_clip if c.grad_clip > 0 else float("inf")
        )
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.cursor += c.grad_accum

        def avg(key: str) -> float:
            return sum(getattr(p, key) for p in parts) / len(parts)

        row = {
            "step": self.step,
            "loss": avg("total"),
            "kl": avg("kl"),
            "ce": avg("ce"),
            "ce_teacher": avg("ce_teacher"),
            "cap": avg("cap"),
            "live": avg("live"),
            "kl_answer": _mean_present([p.kl_answer for p in parts]),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens": sum(p.tokens for p in parts),
            "seconds": time.monotonic() - t0,
            "tasks": " ".join(tasks),
        }
        row = {k: _finite(v) for k, v in row.items()}
        self.history.append(row)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    def run(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train until `steps` (or `stop_at`, status "paused"), the time limit, or
        SIGTERM/SIGINT; checkpoint, export, and return {status, step, checkpoint, exported,
        last}. A paused run is checkpointed but not exported."""
        c = self.config
        end = c.steps if stop_at is None else min(stop_at, c.steps)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.json").write_text(json.dumps(c.to_dict(), indent=2) + "\n")
        self.write_logs()  # on resume: drops rows logged after the checkpoint
        self._t0 = time.monotonic()
        limit = c.max_minutes * 60 if c.max_minutes else None
        handlers = self._install_signals()
        from tqdm.auto import tqdm

        bar = tqdm(total=c.steps, initial=self.step, disable=not c.progress, unit="step",
                   dynamic_ncols=True, desc="train gates")
        status = "completed" if end == c.steps else "paused"
        try:
            while self.step < end:
                try:
                    row = self.train_step()
                except KeyboardInterrupt:
                    status = "interrupted"
                    break
                bar.update(1)
                bar.set_postfix_str(
                    f"loss {row['loss']:.3f} kl {row['kl']:.4f} ce {row['ce']:.3f} "
                    f"cap {row['cap']:.3f} live {row['live']:.0f} {row['seconds']:.1f}s/step"
                )
                if self.step % c.checkpoint_every == 0 and self.step < end:
                    self.save_checkpoint()
                if self._stop_signal:
                    status = "interrupted"
                    break
                # Stop when the next step would likely end past the limit.
                if limit is not None and self.step < end:
                    if time.monotonic() - self._t0 + row["seconds"] > limit:
                        status = "time_limit"
                        break
        finally:
            bar.close()
            self._restore_signals(handlers)
        checkpoint = self.save_checkpoint()
        exported = self.export(status) if self.step > 0 and status != "paused" else []
        return {
            "status": status,
            "step": self.step,
            "checkpoint": str(checkpoint),
            "exported": [str(p) for p in exported],
            "last": self.history[-1] if self.history else None,
        }

    def _install_signals(self):
        def stop(signum, frame):
            self._stop_signal = True

        try:
            return {signal.SIGTERM: signal.signal(signal.SIGTERM, stop)}
        except ValueError:  # not the main thread
            return {}

    @staticmethod
    def _restore_signals(handlers) -> None:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _moving_mean(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last `window` finite values (nan where there are none yet)."""
    out, recent = [], []
    for v in values:
        if not math.isnan(v):
            recent = (recent + [v])[-window:]
        out.append(sum(recent) / len(recent) if recent else float("nan"))
    return out


def plot_history(history: Sequence[Mapping[str, Any]], path: Path, budget: int | None = None) -> None:
    """loss_curve.png: total loss, KL (all tokens and the answer's), the student's CE above the
    teacher's with the capacity term, and the live count. Each step is one mix of tasks and
    lengths, so steps are dots and a 10-step trailing mean is the line.
    Skipped when matplotlib (the `bench` extra) is not installed: the CSV has the same data."""
    try:
        import matplotlib
    except ImportError:
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]

    def series(key: str) -> list[float]:
        return [float("nan") if r.get(key) is None else float(r[key]) for r in history]

    def draw(ax, values: list[float], label: str, color: str) -> None:
        if all(math.isnan(v) for v in values):
            return
        ax.plot(steps, values, ".", color=color, alpha=0.35, markersize=4)
        ax.plot(steps, _moving_mean(values, 10), color=color, label=label)

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    draw(axes[0, 0], series("loss"), "total loss", "C0")
    axes[0, 0].set_title("total loss")
    draw(axes[0, 1], series("kl"), "all tokens", "C0")
    draw(axes[0, 1], series("kl_answer"), "answer tokens", "C1")
    axes[0, 1].set_title("KL(teacher || student) per token")
    ce, ce_t = series("ce"), series("ce_teacher")
    draw(axes[1, 0], [a - b for a, b in zip(ce, ce_t)], "student CE - teacher CE", "C0")
    draw(axes[1, 0], series("cap"), "capacity term", "C2")
    axes[1, 0].set_title("CE excess and capacity")
    draw(axes[1, 1], series("live"), "expected live (last position)", "C0")
    if budget:
        axes[1, 1].axhline(budget, color="red", linestyle="--", label=f"budget M={budget}")
    axes[1, 1].set_title("live entries per (layer, head)")
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(config: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) training; see `Trainer.run` for the result."""
    return Trainer(config, resume=resume).run()


def export_checkpoint(config: TrainConfig, paths: Sequence[str | os.PathLike[str]] = ()) -> list[Path]:
    """Write the gates of out_dir/checkpoint.pt with save_gates (to out_dir/gates.safetensors,
    `config.export` and `paths`) without training."""
    trainer = Trainer(config, resume=True)
    return trainer.export("exported from checkpoint", paths)


# ---------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sglang-evict train",
        description="Train retention gates (TrimKV / DBTrimKV) on a frozen Hugging Face model.",
    )
    parser.add_argument("--config", help="a .json or .toml file of TrainConfig fields")
    parser.add_argument("--resume", action="store_true", help="continue from out_dir/checkpoint.pt")
    parser.add_argument(
        "--export-only", action="store_true",
        help="write the gates of out_dir/checkpoint.pt (to out_dir/gates.safetensors and --export) and exit",
    )
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "max_minutes":
            help_ = "stop cleanly (checkpoint + export) before this many minutes"
        else:
            help_ = f"(config field {f.name})"
        parser.add_argument(flag, dest=f.name, default=None, metavar="VALUE", help=help_)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if getattr(args, f.name) is not None
    }
    try:
        config = load_config(args.config, overrides)
        if args.export_only:
            for p in export_checkpoint(config):
                print(p)
            return 0
        result = train(config, resume=args.resume)
    except TrainConfigError as err:
        print(f"sglang-evict train: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in result.items() if k != "last"}, indent=2))
    if result["last"]:
        print(json.dumps(result["last"]))
    return 130 if result["status"] == "interrupted" else 0
