"""What a training run records of itself: its log files, the provenance its gates carry, and the
check that a resumed run computes what the checkpoint's run computed."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sglang_evict.training.checkpoints import CHECKPOINT_VERSION
from sglang_evict.training.config import RESUMABLE_CHANGES, TrainConfig, TrainConfigError
from sglang_evict.training.plots import plot_history


def _machine(device: torch.device) -> str:
    """Where a run trained, for the gates' provenance."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()} CPU cores ({torch.backends.cpu.get_cpu_capability()})"


def _mean_present(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _finite(x: Any) -> Any:
    return x if not isinstance(x, float) or math.isfinite(x) else None


def check_resume(state: Mapping[str, Any], config: TrainConfig, path: Path) -> None:
    """Refuse a checkpoint of another format, or a config that changes what training computes."""
    if state.get("version") != CHECKPOINT_VERSION:
        raise TrainConfigError(
            f"{path}: checkpoint version {state.get('version')!r}, "
            f"expected {CHECKPOINT_VERSION}"
        )
    saved, now = state["config"], config.to_dict()
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
    if int(state["step"]) > config.steps:
        raise TrainConfigError(
            f"the checkpoint is at step {state['step']}, beyond steps={config.steps}"
        )


def write_run_logs(out_dir: Path, history: list[dict[str, Any]], budget: int) -> None:
    """log.jsonl and log.csv (one row per optimizer step) and the loss curve."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "log.jsonl", "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    if history:
        with open(out_dir / "log.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)
        plot_history(history, out_dir / "loss_curve.png", budget)


def training_info(run, stopped: str) -> dict[str, Any]:
    """The provenance a run's exported gates carry in their header (`run`: the Trainer)."""
    recent = run.history[-10:]

    def mean(key: str) -> float | None:
        return _finite(_mean_present([r.get(key) for r in recent]))

    c = run.config
    return {
        "method": "TrimKV" if not c.shared_projection else "DBTrimKV (shared projection)",
        "base_model": str(run.model_path),
        "base_model_name": Path(run.model_path).name,
        "budget": c.budget,
        "steps": run.step,
        "target_steps": c.steps,
        "stopped": stopped,
        "init_gates": c.init_gates,
        "distilled": run.distilled,
        "sequences": run.cursor,
        "tokens": int(sum(r["tokens"] for r in run.history)),
        "tasks": list(c.tasks),
        "lengths": list(c.lengths),
        "chat": c.chat,
        "data": "RULER generators from nvidia-long-context-eval 26.3 + multi-turn recall, "
        "train split (sglang_evict.training.data)",
        "seed": c.seed,
        "lr": c.lr,
        "grad_accum": c.grad_accum,
        "loss": f"{c.kl_weight}*KL(teacher||student) + {c.ce_weight}*CE ("
        + ("answer tokens only" if c.answer_only else f"answer tokens x{c.answer_weight}")
        + f") + {c.capacity_weight}*mean_positive max(0, (S_t - M)/(t - M)) over "
        + ("each layer and head" if c.capacity_scope == "head"
           else "the mean over layers and heads")
        + "; decay added to the logit"
        + (f"; hard eviction ({c.eviction_policy}, M={c.budget}, B={c.eviction_buffer}, "
           f"sinks={c.eviction_sinks}, window={c.eviction_window}, "
           f"lookahead={c.eviction_lookahead}, prefill chunks of "
           f"{c.eviction_chunk}), straight-through" if c.hard_eviction else ""),
        "dtype": run.dtype,
        "device": run.device.type,
        "machine": _machine(run.device),
        "wall_minutes": round(run.elapsed() / 60, 2),
        "answer_weight": c.answer_weight,
        "final_last10": {
            k: mean(k) for k in ("loss", "kl", "kl_answer", "ce", "ce_teacher", "cap", "live")
        },
    }
