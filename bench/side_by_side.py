"""A vanilla server beside one evicting server on the same KV pool: the flags both benches
(multi_turn.py, shared_prefix.py) take for the pair, the pair's server arguments, and the
results file with its ratios."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_pair_arguments(p: argparse.ArgumentParser, budget: int, what: str) -> None:
    p.add_argument("--fraction", type=float, default=0.25,
                   help=f"the pool as a share of {what} at full size")
    p.add_argument("--policy", default="retention-global")
    p.add_argument("--budget", type=int, default=budget)
    p.add_argument("--buffer", type=int, default=16)


def pair_server_args(pool: int, args: argparse.Namespace) -> dict[str, list[str]]:
    """name -> server arguments: vanilla first, then the evicting server."""
    common = ["--max-total-tokens", str(pool), "--enable-cache-report"]
    return {
        "vanilla": common,
        f"{args.policy} M={args.budget}": common + [
            "--evict-policy", args.policy, "--evict-budget", str(args.budget),
            "--evict-buffer", str(args.buffer)],
    }


def write_pair(results: dict, keys: tuple[str, ...], out: str) -> Path:
    """Adds ratio_<key> (evicting / vanilla) for each key and writes the JSON."""
    base, ours = results["servers"].values()
    for key in keys:
        results[f"ratio_{key}"] = ours[key] / base[key]
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    return path
