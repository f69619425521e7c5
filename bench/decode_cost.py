"""Decode cost against context and against batch size: does a step follow the live KV?

Context (default): one request generates G tokens (greedy, ignore_eos, streamed) on each server
in turn, in one run on one machine; the client notes when each token arrives and reports
ms/token per window of W tokens. With eviction the live KV is bounded by the budget, so the
windows should stay flat; vanilla SGLang's attention reads the whole context, so its windows grow.

    .venv/bin/python bench/decode_cost.py --new-tokens 2000 --out bench/results/decode_cost.json

Batch (--batches 1,4,8,16): B requests with C-token prompts (--context) decode together; the step
time is measured once every request of the batch is decoding (from the last first token on).

    .venv/bin/python bench/decode_cost.py --batches 1,4,8,16 --context 2048 \
        --out bench/results/batch_scaling.json

Servers: vanilla (SGLang's torch_native backend, full cache), then the sglang_evict backend with
each --policies entry at --budget (retention uses the default model's packaged gates); with
--schedulers overlap,sync each runs with SGLang's overlap scheduler and without it.

    .venv/bin/python bench/decode_cost.py --batches 8 --context 1024 --new-tokens 96 \
        --policies streaming --schedulers overlap,sync --out bench/results/overlap.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import client

PROMPT = "Write a long, detailed story about a lighthouse keeper and the ships she guides."


def token_times(server, new_tokens: int) -> list[tuple[int, float]]:
    """(tokens generated so far, seconds since the request was sent) per streamed chunk."""
    got = client.stream(server.url, PROMPT, new_tokens)
    if got.status != 200:
        raise RuntimeError(f"/generate answered {got.status}")
    return [(n, t - got.sent) for n, t in got.marks]


def batch_step_ms(server, batch: int, context: int, new_tokens: int) -> float:
    """Median over the batch's requests of ms per decode step once all of them decode."""
    import concurrent.futures as cf

    def one(i):
        ids = [1000 + (7 * i + 13 * j) % 20000 for j in range(context)]  # distinct prompts
        got = client.stream(server.url, ids, new_tokens)
        if got.status != 200:
            raise RuntimeError(f"/generate answered {got.status}")
        return got.marks

    with cf.ThreadPoolExecutor(batch) as ex:
        runs = list(ex.map(one, range(batch)))
    t_all = max(m[0][1] for m in runs)  # every request has its first token
    steps = []
    for marks in runs:
        after = [(n, t) for n, t in marks if t >= t_all]
        if len(after) >= 2:
            (n0, t0), (n1, t1) = after[0], after[-1]
            if n1 > n0:
                steps.append(1000 * (t1 - t0) / (n1 - n0))
    steps.sort()
    return steps[len(steps) // 2]


def windows(marks: list[tuple[int, float]], width: int) -> list[dict]:
    """ms/token per window of `width` tokens, from the first token on (prefill excluded)."""
    out = []
    edges = list(range(1, marks[-1][0] + 1, width))
    at = {}
    for n, t in marks:
        for e in edges:
            if e not in at and n >= e:
                at[e] = (n, t)
    keys = sorted(at)
    for a, b in zip(keys, keys[1:]):
        (n0, t0), (n1, t1) = at[a], at[b]
        out.append({"from_token": n0, "to_token": n1, "ms_per_token": 1000 * (t1 - t0) / (n1 - n0)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=2000)
    p.add_argument("--window", type=int, default=250)
    p.add_argument("--budget", type=int, default=128)
    p.add_argument("--buffer", type=int, default=128)
    p.add_argument("--policies", default="streaming,retention")
    p.add_argument("--pool", type=int, default=8192, help="--max-total-tokens for every server")
    p.add_argument("--batches", default=None, help="batch mode: batch sizes, e.g. 1,4,8,16")
    p.add_argument("--context", type=int, default=2048, help="batch mode: prompt tokens")
    p.add_argument("--schedulers", default="overlap", choices=["overlap", "sync", "overlap,sync"],
                   help="SGLang's overlap scheduler (its default) and/or --disable-overlap-schedule")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.batches:
        return batch_main(args)
    from sglang_evict.server_process import ServerProcess

    servers = _servers(args, ["--disable-radix-cache", "--max-total-tokens", str(args.pool)])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {"new_tokens": args.new_tokens, "window": args.window, "budget": args.budget,
               "buffer": args.buffer, "servers": {}}
    for name, sargs in servers.items():
        print(f"{name}: {' '.join(sargs)}", flush=True)
        with ServerProcess(sargs, log_path=out.with_suffix(f".{name}.log")) as server:
            token_times(server, 8)  # warm-up
            marks = token_times(server, args.new_tokens)
        out.with_suffix(f".{name}.log").unlink(missing_ok=True)
        w = windows(marks, args.window)
        results["servers"][name] = {"args": sargs, "windows": w,
                                    "total_s": marks[-1][1], "tokens": marks[-1][0]}
        ms = [x["ms_per_token"] for x in w]
        print(f"  {name}: " + " ".join(f"{m:.0f}" for m in ms)
              + f"  last/second {ms[-1] / ms[1]:.2f}" if len(ms) > 1 else "", flush=True)
    out.write_text(json.dumps(results, indent=2))
    _plot(results, out.with_suffix(".png"))
    return 0


def _servers(args, common: list[str]) -> dict[str, list[str]]:
    """Vanilla SGLang, then one eviction server per --policies entry, on the same settings; each
    once per --schedulers entry (overlap: SGLang's default; sync: --disable-overlap-schedule)."""
    base = {"vanilla": common}
    for pol in filter(None, args.policies.split(",")):
        base[pol] = common + ["--evict-policy", pol, "--evict-budget", str(args.budget),
                              "--evict-buffer", str(args.buffer)]
    schedulers = [s for s in args.schedulers.split(",") if s]
    servers = {}
    for name, sargs in base.items():
        for sched in schedulers:
            label = name if schedulers == ["overlap"] else f"{name}+{sched}"
            servers[label] = sargs + (["--disable-overlap-schedule"] if sched == "sync" else [])
    return servers


def batch_main(args) -> int:
    from sglang_evict.server_process import ServerProcess

    batches = [int(b) for b in args.batches.split(",")]
    pool = max(args.pool, max(batches) * (args.context + args.new_tokens + 16))
    servers = _servers(args, ["--disable-radix-cache", "--max-total-tokens", str(pool),
                              "--max-running-requests", str(max(batches)),
                              "--chunked-prefill-size", "4096"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {"context": args.context, "new_tokens": args.new_tokens, "budget": args.budget,
               "buffer": args.buffer, "servers": {}}
    for name, sargs in servers.items():
        print(f"{name}: {' '.join(sargs)}", flush=True)
        rows = {}
        with ServerProcess(sargs, log_path=out.with_suffix(f".{name}.log")) as server:
            token_times(server, 8)  # warm-up
            for b in batches:
                rows[b] = batch_step_ms(server, b, args.context, args.new_tokens)
                print(f"  {name} batch {b}: {rows[b]:.1f} ms/step, "
                      f"{1000 * b / rows[b]:.1f} tokens/s", flush=True)
        results["servers"][name] = {"args": sargs, "ms_per_step": rows}
        out.with_suffix(f".{name}.log").unlink(missing_ok=True)
    out.write_text(json.dumps(results, indent=2))
    return 0


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results["servers"].items():
        xs = [(w["from_token"] + w["to_token"]) / 2 for w in r["windows"]]
        ax.plot(xs, [w["ms_per_token"] for w in r["windows"]], marker="o", label=name)
    ax.set_xlabel("tokens generated (context grows with them)")
    ax.set_ylabel("ms / token")
    ax.set_title(f"Decode cost vs context (M={results['budget']}, B={results['buffer']})")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
