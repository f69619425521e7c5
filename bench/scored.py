"""What the scored serving benches share: one scored request, one server run of concurrent
jobs with its figures, the sweep's servers, the vanilla pool matched to each eviction point,
and the plots.

A job is a callable that takes the server's URL and returns its turns (dicts from `ask`); a
phase is a list of jobs run at once on one server. A server runs its phases one after the
other, each summarised on its own (its retractions from its own stretch of the server log).
Several benches of the same systems can share one sweep of servers (`sweep_together`), each
bench on each server from an empty cache.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import client
import figures
import requests
from intervals import bootstrap_ci

Job = Callable[[str], list[dict]]


@dataclass
class Bench:
    """One scored bench's sweep: its parsed arguments (the systems), its phases, and how its
    report is named, titled and which settings it records."""
    args: argparse.Namespace
    phases: dict[str, list[Job]]
    benchmark: str
    settings: tuple[str, ...]
    title: str


def draw_secrets(rng, key_space: list[str], n: int) -> tuple[list[str], list[str]]:
    """`n` distinct keys of the eval split's key space and a 7-digit value of the eval split
    for each."""
    from sglang_evict.training.data.ruler_builders import draw_in_split

    keys: list[str] = []
    while len(keys) < n:
        k = key_space[rng.randrange(len(key_space))]
        if k not in keys:
            keys.append(k)
    values = [draw_in_split(rng, lambda r: str(r.randint(10**6, 10**7 - 1)), "eval")
              for _ in keys]
    return keys, values


def is_right(reply: str, digits: str) -> bool:
    """The reply states the digits (as a number of its own, not inside a longer one)."""
    return re.search(rf"(?<!\d){digits}(?!\d)", reply) is not None


def ask(url: str, tokenizer, messages: list[dict], max_new_tokens: int,
        expected: str | None) -> dict:
    """One chat turn through the model's chat template, streamed; scored when `expected` (the
    digits the reply must state) is given. A transport error or a non-200 answer: ok False."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    try:
        got = client.stream(url, ids, max_new_tokens, ignore_eos=False, timeout=3600)
    except requests.RequestException:
        got = None
    done = time.perf_counter()
    if got is None or not got.ok:
        return {"ok": False, "scored": expected is not None, "right": False}
    reply = tokenizer.decode(got.output_ids, skip_special_tokens=True)
    meta = got.meta_info
    return {"ok": True, "scored": expected is not None,
            "right": expected is not None and is_right(reply, expected),
            "latency": done - got.sent, "ttft": got.arrivals[0] - got.sent,
            "prompt": meta["prompt_tokens"], "cached": meta.get("cached_tokens", 0),
            "completion": meta["completion_tokens"], "reply": reply,
            **({"expected": expected} if expected is not None else {})}


def summarise(turns: list[dict], wall: float, log: str) -> dict:
    """A phase's figures from its turns, its wall time and its stretch of the server log."""
    done = [t for t in turns if t["ok"]]
    scored = [float(t["right"]) for t in turns if t["scored"]]
    lo, hi = bootstrap_ci(scored)
    return {
        "accuracy": sum(scored) / len(scored), "accuracy_ci95": [lo, hi],
        "scored_turns": len(scored), "right": int(sum(scored)),
        "requests": len(done), "failed": len(turns) - len(done), "wall_s": wall,
        **figures.request_figures(done, wall),
        **figures.log_figures(log, running=r"Decode batch.*?#running-req: (\d+)"),
        "answers": [{"reply": t["reply"], "expected": t["expected"], "right": t["right"]}
                    for t in done if t["scored"]],
    }


def start_server(sargs: list[str]):
    """A fresh server for `sargs`, stopped when the `with` block ends."""
    from sglang_evict.server_process import ServerProcess

    return ServerProcess(sargs, startup_timeout=900)


def run_phases(srv, name: str, phases: dict[str, list[Job]]) -> dict[str, dict]:
    """`phases` on the running server `srv`, each phase's jobs at once, the phases in order;
    per phase its figures."""
    out = {}
    for phase, jobs in phases.items():
        start = len(srv.log_path.read_text(errors="replace"))
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(len(jobs)) as pool:
            runs = list(pool.map(lambda job: job(srv.url), jobs))
        wall = time.perf_counter() - t0
        log = srv.log_path.read_text(errors="replace")[start:]
        out[phase] = summarise([t for r in runs for t in r], wall, log)
        print(json.dumps({f"{name} {phase}": {k: v for k, v in out[phase].items()
                                               if k != "answers"}}), flush=True)
    return out


def add_sweep_args(p: argparse.ArgumentParser, pools: list[int], budgets: list[int]) -> None:
    p.add_argument("--pools", type=int, nargs="+", default=pools,
                   help="KV pools, tokens at full size")
    p.add_argument("--budgets", type=int, nargs="+", default=budgets)
    p.add_argument("--policy", default="retention-global")
    p.add_argument("--reclaim", nargs="+", default=["lru-first"],
                   choices=["mixed", "tree-first", "lru-first"],
                   help="the eviction servers' --evict-reclaim orders, each its own server")
    p.add_argument("--no-vanilla", dest="vanilla", action="store_false",
                   help="eviction servers only (vanilla's rows from an earlier run)")
    p.add_argument("--buffer", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)


def systems(args) -> list[dict]:
    """The sweep's servers: vanilla at every pool (unless --no-vanilla), then eviction at every
    pool, budget and reclaim order."""
    out = []
    for pool in args.pools:
        common = ["--max-total-tokens", str(pool), "--enable-cache-report",
                  "--decode-log-interval", "1"]
        if args.vanilla:
            out.append({"name": f"vanilla pool={pool}", "system": "vanilla", "pool": pool,
                        "budget": None, "args": common})
        for m in args.budgets:
            for order in args.reclaim:
                system = f"{args.policy} M={m}" + (f" {order}" if order != "lru-first" else "")
                out.append({"name": f"{system} pool={pool}", "system": system, "pool": pool,
                            "budget": m, "args": common + [
                                "--evict-policy", args.policy, "--evict-budget", str(m),
                                "--evict-buffer", str(args.buffer), "--evict-reclaim", order]})
    return out


def matched_vanilla(results: list[dict]) -> None:
    """For each eviction point: the smallest vanilla pool of the same phase whose accuracy
    reaches its accuracy (None if no vanilla pool of the sweep does), and its requests/s against
    that pool's."""
    for r in results:
        if r["budget"] is None:
            continue
        vanilla = sorted((v for v in results if v["budget"] is None
                          and v.get("phase") == r.get("phase")), key=lambda v: v["pool"])
        match = next((v for v in vanilla if v["accuracy"] >= r["accuracy"]), None)
        r["vanilla_pool_at_same_accuracy"] = match["pool"] if match else None
        r["memory_share_of_that_pool"] = r["pool"] / match["pool"] if match else None
        r["requests_per_s_over_that_pool"] = (
            r["requests_per_s"] / match["requests_per_s"] if match else None)


def plot(results: list[dict], out, title: str) -> None:
    """Accuracy (with its interval) and requests/s against the pool, one line per system and
    phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    lines = dict.fromkeys((r["system"], r.get("phase")) for r in results)
    for system, phase in lines:
        rows = sorted((r for r in results if (r["system"], r.get("phase")) == (system, phase)),
                      key=lambda r: r["pool"])
        label = system if phase is None else f"{system} ({phase})"
        pools = [r["pool"] for r in rows]
        acc = [r["accuracy"] for r in rows]
        err = [[a - r["accuracy_ci95"][0] for a, r in zip(acc, rows)],
               [r["accuracy_ci95"][1] - a for a, r in zip(acc, rows)]]
        axes[0].errorbar(pools, acc, yerr=err, marker="o", capsize=3, label=label)
        axes[1].plot(pools, [r["requests_per_s"] for r in rows], marker="o", label=label)
    for ax, label in zip(axes, ("accuracy of scored turns", "requests/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("KV pool (tokens at full size)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.05, 1.05)
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def sweep_together(benches: list[Bench], serve=start_server) -> list[list[dict]]:
    """Every server of the benches' sweep (their systems must be the same), one after the other
    (each from `serve`, fresh by default); on each, every bench's phases in turn, the cache
    flushed between benches. Per bench its rows, one per server and phase ("phase" only where
    the bench has more than one), and its report written."""
    specs = systems(benches[0].args)
    for bench in benches[1:]:
        if systems(bench.args) != specs:
            raise ValueError(f"{bench.benchmark} sweeps other systems than "
                             f"{benches[0].benchmark}: they cannot share servers")
    rows: list[list[dict]] = [[] for _ in benches]
    for spec in specs:
        print(f"{spec['name']}: {' '.join(spec['args'])}", flush=True)
        with serve(spec["args"]) as srv:
            for i, bench in enumerate(benches):
                if i:
                    client.flush_cache(srv.url)
                runs = run_phases(srv, f"{bench.benchmark} {spec['name']}", bench.phases)
                for phase, result in runs.items():
                    row = {k: spec[k] for k in ("name", "system", "pool", "budget")}
                    rows[i].append(row | ({"phase": phase} if len(bench.phases) > 1 else {})
                                   | {"server_args": spec["args"]} | result)
    for bench, results in zip(benches, rows):
        write_report(bench, results)
    return rows


def write_report(bench: Bench, results: list[dict]) -> None:
    """Each eviction point matched to vanilla; the report (JSON at args.out, its plot beside
    it) written and its table printed."""
    matched_vanilla(results)
    report = {"benchmark": bench.benchmark,
              "settings": {k: getattr(bench.args, k) for k in bench.settings},
              "servers": results}
    out = Path(bench.args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    plot(results, out.with_suffix(".png"), bench.title)
    print_table(results)


def print_table(results: list[dict]) -> None:
    for r in results:
        ci = r["accuracy_ci95"]
        name = r["name"] + (f" ({r['phase']})" if r.get("phase") else "")
        print(f"{name:>48}: accuracy {r['accuracy']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}], "
              f"{r['requests_per_s']:.2f} req/s, p99 TTFT {r['ttft_p99_s'] or 0:.1f} s, "
              f"hit {r['prefix_hit_rate']:.2f}, retractions {r['retractions']}, "
              f"failed {r['failed']}")
