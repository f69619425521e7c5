"""The loss curve of a run (loss_curve.png)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


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
