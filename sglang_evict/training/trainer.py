"""One training run: only the gates learn, the LLM is frozen.

A run writes to `out_dir`: checkpoint.pt (gates, optimizer, scheduler, RNG states, data
cursor, step, history; replaced atomically every `checkpoint_every` steps and on stop),
config.json, log.jsonl and log.csv (one row per optimizer step), loss_curve.png, and at the end
gates.safetensors (`save_gates`, with the budget M and the training info in its header), also
copied to `export` when set. `resume=True` continues from checkpoint.pt with the identical next
loss an uninterrupted run would have had: the data stream is a pure function of (seed, index)."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sglang_evict.gates.checkpoint import save_gates
from sglang_evict.gates.modules import GateConfig, RetentionGates
from sglang_evict.training.checkpoints import (
    CHECKPOINT_FILE,
    CHECKPOINT_VERSION,
    EXPORT_FILE,
    _atomic_torch_save,
    _rng_states,
    _set_rng_states,
)
from sglang_evict.training.config import TrainConfig, TrainConfigError
from sglang_evict.training.loss import StepLosses, forward_backward, resolve_precision
from sglang_evict.training.provenance import (
    _finite,
    _mean_present,
    check_resume,
    training_info,
    write_run_logs,
)
from sglang_evict.training.student import GateAttachment, load_base_model


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainConfigError(f"device {name!r} asked for, but CUDA is not available")
    return torch.device(name)


def _lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up over warmup_steps, then cosine decay to min_lr_ratio at `steps`."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# Distillation reads training samples from here on; a run draws from 0 up (one per sequence).
DISTILL_INDEX = 10**9


class Trainer:
    """One training run (see the module docstring for what it writes)."""

    def __init__(self, config: TrainConfig, *, resume: bool = False) -> None:
        from sglang_evict import default_model
        from sglang_evict.training.data import TrainingData

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
        self.dtype = resolve_precision(config.dtype, self.device)
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        weights = torch.bfloat16 if self.dtype == "bf16" else torch.float32
        self.model = load_base_model(self.model_path, weights, str(self.device))
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
        self.distilled: dict[str, Any] | None = state.get("distilled") if state else None
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
        if config.distill_from and state is None:
            self._distill(config.distill_from)
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
        from sglang_evict.gates.checkpoint import GateCheckpointError
        from sglang_evict.gates.files import load_gates_for_model

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

    def _distill(self, path: str) -> None:
        """Fit the fresh gates to the scores of the gates in `path` (distill.py) on training
        sequences that the run itself never draws (indices from DISTILL_INDEX on)."""
        from sglang_evict.gates.checkpoint import GateCheckpointError
        from sglang_evict.gates.files import load_gates_for_model
        from sglang_evict.training.distill import attention_inputs, distill_error, distill_gates

        try:
            source = load_gates_for_model(path, self.model.config, device=self.device)
        except GateCheckpointError as err:
            raise TrainConfigError(f"distill_from: {err}") from None
        c = self.config
        sequences, tokens, index = [], 0, DISTILL_INDEX
        while tokens < c.distill_tokens:
            ids = self.data.sample(index)["input_ids"]
            sequences.append(torch.tensor([ids], device=self.device))
            tokens, index = tokens + len(ids), index + 1
        inputs = attention_inputs(self.model, sequences)
        before = distill_error(self.gates, source, inputs)
        losses = distill_gates(self.gates, source, inputs, c.distill_steps, seed=c.seed)
        self.distilled = {"from": str(path), "tokens": tokens, "steps": c.distill_steps,
                          "log_rate_mse_before": before,
                          "log_rate_mse_after": distill_error(self.gates, source, inputs),
                          "last_step_loss": losses[-1]}
        print(f"distilled from {path}: log-rate MSE {before:.3f} -> "
              f"{self.distilled['log_rate_mse_after']:.3f} ({tokens} tokens, {c.distill_steps} "
              "steps)", flush=True)

    def _check_resume(self, state: Mapping[str, Any]) -> None:
        check_resume(state, self.config, self.checkpoint_path)

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
            "distilled": self.distilled,
            "elapsed_s": self.elapsed(),
        }
        _atomic_torch_save(state, self.checkpoint_path)
        self.write_logs()
        return self.checkpoint_path

    def write_logs(self) -> None:
        write_run_logs(self.out_dir, self.history, self.config.budget)

    def training_info(self, stopped: str) -> dict[str, Any]:
        return training_info(self, stopped)

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
                                          answer_start=sample["answer_start"],
                                          precision=self.dtype))
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


def train(config: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) training; see `Trainer.run` for the result."""
    return Trainer(config, resume=resume).run()


def export_checkpoint(config: TrainConfig, paths: Sequence[str | os.PathLike[str]] = ()) -> list[Path]:
    """Write the gates of out_dir/checkpoint.pt with save_gates (to out_dir/gates.safetensors,
    `config.export` and `paths`) without training."""
    trainer = Trainer(config, resume=True)
    return trainer.export("exported from checkpoint", paths)
