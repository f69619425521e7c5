"""Needle survival: which share of the needle's head-slots is alive when the answer starts, per
layer, for the gates (retention-global, the server's evictor replayed), the hindsight oracle
and streaming, at one budget, on the held-out split. It tells whether a miss is eviction or the
model: a needle the oracle keeps and the gates drop is the gates' loss.

    .venv/bin/python bench/needle_survival.py [--length 2048] [--budget 128] [--n 10]
        [--gates FILE] [--out bench/results/needle_survival_2k_m128.json]

Writes JSON (per sample and system: the share per layer, and the needle's positions) and a PNG
of the per-layer share averaged over samples, one line per system. `--quick`: one sample of one
task at 1024 tokens.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import oracle
from sglang_evict.serve import DEFAULT_GATES

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("niah_single_1", "niah_multikey_1", "niah_multivalue", "multiturn_recall")
SYSTEMS = ("retention-global", "oracle", "streaming")


def survival(samples, model_path, gates_path, budget: int, buffer: int, sinks: int,
             chunk: int) -> list[dict]:
    from transformers import AutoTokenizer

    from sglang_evict.gates.files import load_gates_for_model

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = oracle.load_model(model_path)
    gates = load_gates_for_model(gates_path, model.config)
    rows = []
    for sample in samples:
        prompt = tokenizer.encode(sample["input"])
        needles = oracle.needle_positions(tokenizer, prompt, sample["outputs"])
        if not needles:
            continue
        importance = oracle.hindsight_importance(model, prompt,
                                                 oracle.answer_ids(tokenizer, sample))
        log_beta = oracle.gate_log_beta(gates)
        alive = {
            "retention-global": oracle.served_alive("retention-global", log_beta, budget,
                                                    buffer, sinks, chunk),
            "streaming": oracle.served_alive("streaming", torch.zeros_like(log_beta), budget,
                                             buffer, sinks, chunk),
            "oracle": oracle.oracle_keep(importance, budget),
        }
        rows.append({
            "task": sample["task"], "length": sample["length"], "index": sample["index"],
            "prompt_tokens": len(prompt), "needle_positions": needles,
            "share_per_layer": {s: a[:, :, needles].float().mean(dim=(1, 2)).tolist()
                                for s, a in alive.items()},
            "kept_per_layer": {s: a.float().mean(dim=(1, 2)).tolist() for s, a in alive.items()},
        })
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for system in SYSTEMS:
        shares = np.array([r["share_per_layer"][system] for r in result["rows"]])
        ax.plot(range(shares.shape[1]), shares.mean(axis=0), marker="o", ms=3,
                label=f"{system} (mean {shares.mean():.2f})")
    ax.set_xlabel("layer")
    ax.set_ylabel("share of the needle's head-slots alive")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"needle survival at the answer's start, {result['length']} tokens, "
                 f"M = {result['budget']} (n = {len(result['rows'])})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    from sglang_evict import default_model
    from sglang_evict.training.data import build_eval_set

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--buffer", type=int, default=32)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--n", type=int, default=10, help="samples per task")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--gates", default=str(DEFAULT_GATES))
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    tasks = args.tasks.split(",")
    if args.quick:
        args.length, args.n, tasks = 1024, 1, tasks[:1]
    out = Path(args.out or RESULTS / f"needle_survival_{args.length // 1024}k_m{args.budget}.json")
    samples = [s for t in tasks for s in build_eval_set(t, args.length, args.n)]
    rows = survival(samples, default_model.resolve(), args.gates, args.budget, args.buffer,
                    args.sinks, args.chunk)
    result = {"benchmark": "needle_survival", "length": args.length, "budget": args.budget,
              "buffer": args.buffer, "sinks": args.sinks, "chunk": args.chunk,
              "gates": args.gates, "tasks": tasks, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    for system in SYSTEMS:
        shares = np.array([r["share_per_layer"][system] for r in rows])
        print(f"{system:17s} needle head-slots alive: {shares.mean():.3f} "
              f"(layers {shares.mean(axis=0).min():.2f} to {shares.mean(axis=0).max():.2f})")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
