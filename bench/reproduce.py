"""Rerun every benchmark behind a figure README.md quotes, one after the other, each writing its
JSON (and PNG) to bench/results/ as its own command would. Hours on 2 CPU cores; nothing else
should run beside it (the figures are timings).

    .venv/bin/python bench/reproduce.py --dry-run          # the commands
    .venv/bin/python bench/reproduce.py                    # all of them
    .venv/bin/python bench/reproduce.py --only scored_context
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent

# name -> (what README.md quotes from it, the bench's arguments)
FIGURES = {
    "scored_sessions": (
        "headline table: scored chats, vanilla vs lru-first and mixed per pool",
        ["scored_sessions.py", "--reclaim", "lru-first", "mixed",
         "--out", "bench/results/scored_sessions.json"]),
    "scored_context": (
        "headline table: shared documents asked in sequence, vanilla vs lru-first per pool",
        ["scored_context.py", "--out", "bench/results/scored_context.json"]),
    "multi_turn": (
        "multi-turn sessions on random tokens, requests/s against vanilla",
        ["multi_turn.py", "--out", "bench/results/multi_turn.json"]),
    "shared_prefix": (
        "bench_serving's generated shared prefixes, requests/s against vanilla",
        ["shared_prefix.py", "--out", "bench/results/shared_prefix.json"]),
    "quality_2k": (
        "one request at a time: retention-global, the full cache and kvpress at 2K tokens",
        ["quality.py", "--lengths", "2048", "--n", "12", "--headline-n", "40",
         "--budgets", "64", "128", "256", "512", "--headline-budgets", "128", "256",
         "--policies", "retention-global", "retention-global+la1", "retention", "streaming",
         "random", "knorm", "--out", "bench/results/quality_2k.json"]),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=list(FIGURES), default=list(FIGURES))
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = p.parse_args(argv)
    failed = []
    for name in args.only:
        what, bench_args = FIGURES[name]
        cmd = [sys.executable, str(BENCH / bench_args[0]), *bench_args[1:]]
        print(f"# {name}: {what}\n{' '.join(cmd)}", flush=True)
        if args.dry_run:
            continue
        start = time.monotonic()
        rc = subprocess.call(cmd, cwd=BENCH.parent)
        print(f"# {name}: exit {rc} after {(time.monotonic() - start) / 60:.0f} min", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
