"""Quality under a KV budget: sglang-evict's policies against the full cache and NVIDIA kvpress's
presses, on the same held-out RULER prompts. One command; JSON + PNG + a markdown table.

Systems, per length:
    full                       sglang-evict server, policy none (every head-slot kept)
    retention-global, retention, streaming, random, knorm
                               sglang-evict server, one request per (prompt, policy, M)
    kvpress:<press>            kvpress 0.5.5 (SnapKV, StreamingLLM, ExpectedAttention, Knorm,
                               AdaKV over ExpectedAttention) in its own virtual environment,
                               bench/.venv-kvpress, created on first use (transformers==5.2.0;
                               torch shared with the project's environment)
    kvpress:full               the same HF model without a press (a cross-check of the server's
                               full-cache row)
    oracle                     hindsight: at the answer's start, the L·H·M prompt entries the
                               expected answer attends to most in a full-cache pass
                               (bench/oracle.py; the ceiling of any query-agnostic score at M)

Prompt protocol, the same for all: RULER's prompt in the default model's chat template (context,
question and RULER's answer prefix in one prompt), prefilled whole; the system compresses its KV
the way it serves (sglang-evict: its evictor after every prefill chunk and decode step, at most
M + B head-slots per layer and KV head on average; kvpress: the press on the prefilled cache,
M + B entries per KV head on average), then the answer is decoded greedily. KV kept is measured
per request at its end (live over full-size entries).

Samples: `--n` per task in every cell; the headline cells get `--headline-n` per task: full,
retention-global and the oracle at `--headline-budgets`, and, chosen after the first pass by
mean score at those budgets, the best training-free policy and the best press. 95% bootstrap
intervals. After the tables: retention-global's score over the full cache's and over the
oracle's at each (length, M).

`--reuse EARLIER.json` takes every row that does not read the gates (full, streaming, random,
knorm, every kvpress row) from an earlier run with the same prompts and settings, so new gates
cost only the retention cells; when the earlier run served the same gate file (sha256), its
retention rows are taken too, so adding budgets or samples costs only the new rows. `--quick`
is a smoke run (one length, two tasks, one sample, M = 128; a few minutes).

    .venv/bin/python bench/quality.py --out bench/results/quality.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import oracle
import ruler
from sglang_evict.serve import DEFAULT_GATES

PRESSES = ("snapkv", "streamingllm", "expected_attention", "knorm", "adakv")
TRAINING_FREE = ("streaming", "random", "knorm")
ORACLE = "oracle"
KVPRESS = ("kvpress==0.5.5", "transformers==5.2.0")
PEER_VENV = Path(__file__).resolve().parent / ".venv-kvpress"
DEFAULT_TASKS = ("niah_single_1", "niah_multikey_1", "niah_multivalue", "multiturn_recall")


def ensure_peer_venv(path: Path = PEER_VENV) -> Path:
    """The kvpress environment: its own transformers and kvpress; torch (and whatever else it
    does not pin) from this environment through a .pth line, so no second torch is installed."""
    python = path / "bin" / "python"
    ok = python.exists() and subprocess.run(
        [str(python), "-c", "import kvpress, transformers; "
         "assert transformers.__version__ == '5.2.0'"], capture_output=True).returncode == 0
    if ok:
        return python
    import sysconfig

    print(f"creating {path} ({' '.join(KVPRESS)})", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(path)], check=True)
    site = subprocess.run([str(python), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "sglang_evict_shared.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    *KVPRESS], check=True)
    return python


def run_peers(samples_cells: list[tuple[dict, list]], model: Path, buffer: int, work: Path) -> list[dict]:
    """kvpress rows for [(sample, [(press, M), ...])], scored with RULER's metric here."""
    from sglang_evict.training.data import score_sample

    if not samples_cells:
        return []
    python = ensure_peer_venv()
    work.mkdir(parents=True, exist_ok=True)
    feed = work / "peer_samples.jsonl"
    rows_path = work / "peer_rows.jsonl"
    with open(feed, "w") as f:
        for s, cells in samples_cells:
            f.write(json.dumps(dict(s, cells=[[p.removeprefix("kvpress:"), m] for p, m in cells]))
                    + "\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               HF_HUB_DISABLE_PROGRESS_BARS="1")
    subprocess.run([str(python), "-P", str(Path(__file__).with_name("kvpress_peers.py")),
                    "--model", str(model), "--samples", str(feed), "--buffer", str(buffer),
                    "--out", str(rows_path)], check=True, env=env)
    by_key = {(s["task"], s["length"], s["index"]): s for s, _ in samples_cells}
    wanted = {(s["task"], s["length"], s["index"], p, m) for s, cells in samples_cells
              for p, m in cells}
    rows = []
    for line in rows_path.read_text().splitlines():
        r = json.loads(line)
        key = key_of(r)
        if key not in wanted or r.get("buffer") != buffer:
            continue
        s = by_key[key[:3]]
        r["outputs"] = s["outputs"]
        r["score"] = score_sample(s["task"], r["prediction"], s["outputs"])
        rows.append(r)
    return rows


def earlier_rows(path: Path, settings: dict, samples: list[dict],
                 gates_sha256: str | None = None) -> dict[tuple, dict]:
    """The rows of an earlier run with the same settings, on the same prompts: the gate-free
    ones, and the ones that read the gates too when it served the gates of `gates_sha256`."""
    earlier = json.loads(path.read_text())
    if earlier["settings"] != settings:
        raise SystemExit(f"--reuse {path}: it ran with other settings "
                         f"({earlier['settings']} vs {settings})")
    same_gates = gates_sha256 is not None and earlier.get("gates_sha256") == gates_sha256
    outputs = {(s["task"], s["length"], s["index"]): s["outputs"] for s in samples}
    rows = {}
    for r in earlier["rows"]:
        k = (r["task"], r["length"], r["index"])
        if (ruler.reads_gates(r["policy"]) and not same_gates) or k not in outputs:
            continue
        if r["outputs"] != outputs[k]:
            raise SystemExit(f"--reuse {path}: {k} is another prompt there")
        rows[(*k, r["policy"], r["budget"])] = r
    return rows


def measure(jobs: list[tuple[dict, str, int | None]], server, args, model: Path, work: Path,
            have: dict[tuple, dict]) -> list[dict]:
    """Rows for the (sample, system, M) jobs not in `have`: server jobs on the server, kvpress
    jobs in the peer environment."""
    todo = [j for j in jobs if ruler.cell_key(*j) not in have]
    ours = [j for j in todo if not j[1].startswith("kvpress:") and j[1] != ORACLE]
    peers: dict[tuple, tuple[dict, list]] = {}
    hindsight: dict[tuple, tuple[dict, list]] = {}
    for s, p, m in todo:
        key = (s["task"], s["length"], s["index"])
        if p.startswith("kvpress:"):
            peers.setdefault(key, (s, []))[1].append((p, m))
        elif p == ORACLE:
            hindsight.setdefault(key, (s, []))[1].append(m)
    print(f"{len(ours)} server requests, {sum(len(c) for _, c in peers.values())} kvpress rows, "
          f"{sum(len(c) for _, c in hindsight.values())} oracle rows", flush=True)
    rows = ruler.serve_rows(server, ours, args.buffer, args.concurrency) if ours else []
    rows += run_peers(list(peers.values()), model, args.buffer, work)
    rows += oracle.oracle_rows(model, list(hindsight.values())) if hindsight else []
    return rows


def best(rows: list[dict], length: int, systems, budgets) -> str | None:
    """The system of `systems` with the highest mean score at `budgets` (ties: listed first)."""
    means = []
    for i, p in enumerate(systems):
        sel = [r["score"] for r in rows if r["length"] == length and r["policy"] == p
               and r["budget"] in budgets]
        if sel:
            means.append((-float(np.mean(sel)), i, p))
    return min(means)[2] if means else None


def run(args) -> dict:
    from sglang_evict import default_model
    from sglang_evict.server_process import ServerProcess
    from sglang_evict.training.data import build_eval_set

    model = default_model.resolve()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.with_suffix(".work")
    gates = args.gates or str(DEFAULT_GATES)
    systems = [*args.policies, *(f"kvpress:{p}" for p in args.presses)]
    systems += [ORACLE] if args.oracle else []
    budgets = sorted(set(args.budgets) | set(args.headline_budgets))
    pool = max(args.lengths) * (args.concurrency + 1)
    server_args = ruler.server_args_for(gates, budgets, args.buffer, pool, args.concurrency,
                                        args.chunk)
    settings = {"buffer": args.buffer, "chunk": args.chunk, "concurrency": args.concurrency,
                "kvpress": list(KVPRESS)}
    headline_n = max(args.headline_n, args.n)
    samples = {(length, task): build_eval_set(task, length, headline_n)
               for length in args.lengths for task in args.tasks}
    every = [s for v in samples.values() for s in v]
    gates_sha256 = hashlib.sha256(Path(gates).read_bytes()).hexdigest()
    have = earlier_rows(Path(args.reuse), settings, every, gates_sha256) if args.reuse else {}
    reused = len(have)

    def jobs_for(cells, n):
        return [(s, p, m) for v in samples.values() for s in v[:n] for p, m in cells]

    first = [("full", None)] + [(p, m) for p in systems for m in args.budgets]
    first += [("kvpress:full", None)] if args.presses else []
    t0 = time.time()
    log = out.with_suffix(".server.log")
    rows: list[dict] = []
    with ServerProcess(server_args, log_path=log) as server:
        started = time.time() - t0
        # Pass 1: every cell at n; the headline cells that do not depend on it at headline n.
        fixed = [("full", None)] + [(p, m) for p in ("retention-global", ORACLE)
                                    for m in args.headline_budgets if p in systems]
        jobs = jobs_for(first, args.n) + jobs_for(fixed, headline_n)
        jobs = list({ruler.cell_key(*j): j for j in jobs}.values())
        rows += measure(jobs, server, args, model, work, have)
        have.update({key_of(r): r for r in rows})
        # Pass 2: the best training-free policy and the best press per length, at headline n.
        picked = {}
        for length in args.lengths:
            pool_rows = list(have.values())
            picked[length] = [b for b in (
                best(pool_rows, length, [p for p in args.policies if p in TRAINING_FREE],
                     args.headline_budgets),
                best(pool_rows, length, [f"kvpress:{p}" for p in args.presses],
                     args.headline_budgets)) if b]
        jobs = [(s, p, m) for (length, _), v in samples.items() for s in v[:headline_n]
                for p in picked[length] for m in args.headline_budgets]
        rows += measure(jobs, server, args, model, work, have)
    all_rows = {key_of(r): r for r in [*have.values(), *rows]}
    rows = list(all_rows.values())
    grid = [("full", None), ("kvpress:full", None)] + [(p, m) for p in systems for m in budgets]
    result = {
        "benchmark": "quality", "gates": gates,
        "gates_sha256": gates_sha256,
        "tasks": list(args.tasks), "lengths": list(args.lengths), "n_per_task": args.n,
        "headline_n_per_task": headline_n, "headline_budgets": list(args.headline_budgets),
        "picked": {str(k): v for k, v in picked.items()}, "settings": settings,
        "server_args": server_args, "reused_from": args.reuse, "reused_rows": reused,
        "server_start_s": started, "wall_s": time.time() - t0,
        "protocol": __doc__.split("Prompt protocol, the same for all: ")[1].split("\n\n")[0],
        "summary": ruler.summarize(rows, args.lengths, grid, args.tasks), "rows": rows,
    }
    result["ratios"] = ratios(result)
    out.write_text(json.dumps(result, indent=1))
    ruler.plot(result, out.with_suffix(".png"))
    print(table(result))
    for length in args.lengths:
        print(f"\n{length} tokens: score (n) [95% CI] KV kept\n{matrix(result, length)}")
    print("\n" + ratio_table(result["ratios"]))
    return result


def ratios(result: dict) -> list[dict]:
    """retention-global's score over the full cache's and over the oracle's, per (length, M)."""
    cells = {(s["length"], s["policy"], s["budget"]): s["score"] for s in result["summary"]}
    out = []
    for length in result["lengths"]:
        full = cells.get((length, "full", None))
        for (n, p, m), score in cells.items():
            if n != length or p != "retention-global":
                continue
            best = cells.get((length, ORACLE, m))
            out.append({"length": length, "budget": m, "gates": score, "full": full,
                        "oracle": best,
                        "gates_over_full": score / full if full else None,
                        "gates_over_oracle": score / best if best else None})
    return sorted(out, key=lambda r: (r["length"], r["budget"]))


def ratio_table(rows: list[dict]) -> str:
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    lines = ["| length | M | gates | full | oracle | gates / full | gates / oracle |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['length']} | {r['budget']} | {fmt(r['gates'])} | {fmt(r['full'])} | "
              f"{fmt(r['oracle'])} | {fmt(r['gates_over_full'])} | {fmt(r['gates_over_oracle'])} |"
              for r in rows]
    return "\n".join(lines)


def key_of(r: dict) -> tuple:
    return ruler.cell_key(r, r["policy"], r["budget"])


def table(result: dict) -> str:
    tasks = result["tasks"]
    lines = ["| length | system | M | n | score | 95% CI | KV kept | " + " | ".join(tasks) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(tasks)]
    for s in result["summary"]:
        lo, hi = s["ci95"]
        per = " | ".join(f"{s['per_task'][t]:.2f}" if t in s["per_task"] else "-" for t in tasks)
        lines.append(f"| {s['length']} | {s['policy']} | {s['budget'] or '-'} | {s['n']} | "
                     f"{s['score']:.3f} | [{lo:.2f}, {hi:.2f}] | {s['kv_kept_fraction']:.1%} | "
                     f"{per} |")
    return "\n".join(lines)


def matrix(result: dict, length: int) -> str:
    """One row per system, one column per M: score (n), 95% interval, KV kept."""
    cells = {(s["policy"], s["budget"]): s for s in result["summary"] if s["length"] == length}
    budgets = sorted({m for _, m in cells if m is not None})
    lines = ["| system | " + " | ".join(f"M = {m}" for m in budgets) + " |",
             "|---|" + "---|" * len(budgets)]

    def cell(s):
        if s is None:
            return "-"
        lo, hi = s["ci95"]
        return (f"{s['score']:.3f} ({s['n']}) [{lo:.2f}, {hi:.2f}] "
                f"{s['kv_kept_fraction']:.1%}")

    for p in dict.fromkeys(p for p, _ in cells):
        if (p, None) in cells:
            lines.append(f"| {p} | {cell(cells[(p, None)])}" + " |" * len(budgets))
        else:
            lines.append(f"| {p} | " + " | ".join(cell(cells.get((p, m))) for m in budgets)
                         + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gates", default=None, help="gate checkpoint (default: the shipped default)")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    p.add_argument("--n", type=int, default=3, help="samples per task in every cell")
    p.add_argument("--headline-n", type=int, default=10, help="samples per task, headline cells")
    p.add_argument("--policies", nargs="+",
                   default=["retention-global", "retention", *TRAINING_FREE],
                   help="sglang-evict policies (retention-global+la1: lookahead 1)")
    p.add_argument("--presses", nargs="*", default=list(PRESSES), choices=PRESSES)
    p.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--headline-budgets", type=int, nargs="+", default=[128, 256])
    p.add_argument("--oracle", action=argparse.BooleanOptionalAction, default=True,
                   help="the hindsight oracle's rows (bench/oracle.py)")
    p.add_argument("--buffer", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=3)
    p.add_argument("--chunk", type=int, default=1024, help="--chunked-prefill-size")
    p.add_argument("--reuse", default=None, metavar="EARLIER.json",
                   help="take the rows that do not read the gates from an earlier run")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2048 tokens, 2 tasks, 1 sample, M = 128")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.tasks = [2048], ["niah_single_1", "multiturn_recall"]
        args.n = args.headline_n = 1
        args.budgets = args.headline_budgets = [128]
        args.policies = ["retention-global", "streaming"]
        args.presses = ["snapkv", "streamingllm"]
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
