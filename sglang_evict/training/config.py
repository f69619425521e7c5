"""The training run's configuration: `TrainConfig` from a JSON/TOML file and command-line
overrides, validated field by field with one message naming the field."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sglang_evict.gates.modules import VARIANTS

class TrainConfigError(ValueError):
    """A training config value (or the model folder it names) is unusable."""


# ---------------------------------------------------------------------- config


def _default_tasks() -> list[str]:
    from sglang_evict.training.data import TRAIN_TASKS

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
    # or fit fresh gates to these gates' scores first (any architecture: e.g. per-layer gates
    # into DBTrimKV's shared projection), over distill_tokens tokens of training data for
    # distill_steps steps (training/distill.py)
    distill_from: str | None = None
    distill_steps: int = 300
    distill_tokens: int = 8192
    # loss: the authors' (KL + CE) / 2 + 1.0 * capacity
    kl_weight: float = 0.5
    ce_weight: float = 0.5
    capacity_weight: float = 1.0
    # the capacity term's budget: "head" (each layer and KV head, TrimKV) or "global" (their
    # mean, DBTrimKV's one budget shared unevenly)
    capacity_scope: str = "head"
    # KL and CE on the answer's tokens only (the authors' labels mask the prompt); a sample
    # without an answer (plain text) then has them on every token. False: every token, the
    # answer's weighing answer_weight (a RULER answer is ~10 of ~2000 tokens, and the only place
    # where losing the needle costs anything).
    answer_only: bool = True
    answer_weight: float = 1.0
    # Hard eviction (straight-through): the student attends only to the keys the server's
    # evictor would keep (policy, budget M, buffer, sinks, window as served; the prompt prefilled
    # eviction_chunk tokens at a time, then one token per step), with the soft path's gradient.
    # False: the published soft loss.
    hard_eviction: bool = False
    eviction_policy: str = "retention-global"
    eviction_buffer: int = 128
    eviction_sinks: int = 4
    eviction_window: int = 0
    # The score's offset, as `--evict-lookahead` serves it (0: (t - pos) log beta).
    eviction_lookahead: int = 0
    eviction_chunk: int = 1024
    # data (sglang_evict.training.data)
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
    # the frozen model's precision. "auto": bf16 on cuda; on cpu, bf16 autocast where the CPU
    # has bf16 matrix units (AMX, AVX512-BF16), else fp32. "autocast": fp32 weights, bf16
    # matmuls. The gates and the loss are float32 always
    dtype: str = "auto"
    device: str = "auto"
    attn_chunk: int = 128
    loss_chunk: int = 256
    checkpoint_every: int = 25
    max_minutes: float | None = None
    num_threads: int | None = None
    progress: bool = True

    def validate(self) -> TrainConfig:
        from sglang_evict.training.data import DataError, check_length, task_spec

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
        need(self.distill_from is None or (isinstance(self.distill_from, str)
                                           and self.distill_from != ""),
             "distill_from", "a gate checkpoint path or null")
        if self.distill_from and self.init_gates:
            raise TrainConfigError("init_gates and distill_from are two ways to start: pick one")
        for name in ("distill_steps", "distill_tokens"):
            need(is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "an integer >= 1")
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
        need(isinstance(self.answer_only, bool), "answer_only", "true or false")
        need(self.capacity_scope in ("head", "global"), "capacity_scope", "head or global")
        need(isinstance(self.hard_eviction, bool), "hard_eviction", "true or false")
        need(self.eviction_policy in ("retention", "retention-global"), "eviction_policy",
             "retention or retention-global")
        for name in ("eviction_buffer", "eviction_sinks", "eviction_window", "eviction_lookahead"):
            need(is_int(getattr(self, name)) and getattr(self, name) >= 0, name, "an integer >= 0")
        need(is_int(self.eviction_chunk) and self.eviction_chunk >= 1, "eviction_chunk",
             "an integer >= 1")
        for name in ("steps", "grad_accum", "attn_chunk", "loss_chunk", "checkpoint_every"):
            need(is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "an integer >= 1")
        need(is_num(self.lr) and self.lr > 0, "lr", "a number > 0")
        need(is_int(self.warmup_steps) and self.warmup_steps >= 0, "warmup_steps", "an integer >= 0")
        need(is_num(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]")
        need(is_int(self.seed), "seed", "an integer")
        need(self.dtype in ("auto", "fp32", "bf16", "autocast"), "dtype",
             "auto, fp32, bf16 or autocast")
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


# May change between a run and its --resume (they do not change what a step computes, beyond
# the precision of the frozen model's arithmetic on another machine).
RESUMABLE_CHANGES = frozenset(
    {"steps", "max_minutes", "checkpoint_every", "progress", "export", "num_threads", "out_dir",
     "model", "tokenizer", "device", "dtype"}
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
