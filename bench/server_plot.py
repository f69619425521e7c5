"""One figure for a side-by-side server comparison: a panel per metric, a bar per server."""

from __future__ import annotations

from pathlib import Path


def plot_servers(servers: dict[str, dict], metrics: dict[str, str], title: str,
                 out: Path) -> None:
    """servers: name -> result dict; metrics: result key -> panel label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(servers)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.4))
    for ax, (key, label) in zip(axes, metrics.items()):
        values = [servers[n].get(key) or 0.0 for n in names]
        bars = ax.bar(range(len(names)), values, color=["#888888", "#2a7ab9", "#d9822b"][
            :len(names)])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
        ax.set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
