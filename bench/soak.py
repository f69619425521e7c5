"""Soak: a long mixed load on one eviction server with a small pool and the radix cache on,
with the server's resident memory sampled. It answers the operator's question: left running
under everything clients send, does it keep answering, refuse only what is malformed, and hold
its memory flat?

Clients send, at random: plain generations over shared prefixes, every per-request policy
(`policy none` included, which may force SGLang's retraction), OpenAI chat and text
completions, prompts longer than the physical pool, streams cut by the client, malformed
overrides and token ids outside the vocabulary. Every answer is checked: 200 with the output
length asked for, or 400 naming the problem for the malformed ones; nothing else. The server's
resident memory (the process and its children) is sampled every few seconds and its trend
fitted over the run after the warm-up.

    .venv/bin/python bench/soak.py --minutes 10          # writes bench/results/soak.json
    .venv/bin/python bench/soak.py --quick               # one minute

tests/server/test_load_and_faults.py drives `run_load` for a shorter run against its own server
(with a fault injected into the plugin's code)."""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import json
import random
import threading
import time
from pathlib import Path

import figures
import requests

POOL = 256
SERVER_ARGS = ["--evict-policy", "streaming", "--evict-budget", "16", "--evict-buffer", "8",
               "--evict-overrides", "any", "--max-total-tokens", str(POOL), "--enable-metrics"]
POLICIES = ("streaming", "random", "knorm", "retention", "retention-global", "none")
# kind -> weight; "faulty" only where the caller injected a fault (see the load test)
KINDS = {"normal": 5, "policy": 2, "chat": 1, "completion": 1, "long": 1, "abort": 2,
         "bad_override": 1, "bad_ids": 1}
OK_CODES = {"normal": 200, "policy": 200, "chat": 200, "completion": 200, "long": 200,
            "bad_override": 400, "bad_ids": 400, "faulty": 500}


def _body(kind: str, rng: random.Random, prefixes: list[list[int]], fault: dict | None,
          policies: tuple):
    """(path, json body, output tokens asked for) of one request of `kind`."""
    n = rng.randrange(1, 48)
    ids = rng.choice(prefixes) + [rng.randrange(100, 20000) for _ in range(rng.randrange(1, 40))]
    params = {"temperature": 0, "max_new_tokens": n, "ignore_eos": True}
    if kind == "chat":
        return "/v1/chat/completions", {
            "model": "default", "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": f"Count the stones, turn {rng.random()}."}],
            "custom_params": {"sglang_evict": {"policy": rng.choice(policies)}}}, n
    if kind == "completion":
        return "/v1/completions", {
            "model": "default", "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "prompt": f"The river keeps {rng.random()} stones and", }, n
    if kind == "policy":
        policy = rng.choice(policies)  # `none` keeps everything: a budget would be refused
        params["custom_params"] = {"sglang_evict": {"policy": policy} if policy == "none" else
                                   {"policy": policy, "budget": rng.choice([4, 8, 12, 16])}}
    elif kind == "long":  # longer than the physical pool: only eviction makes it fit
        ids = [rng.randrange(100, 20000) for _ in range(POOL + rng.randrange(1, POOL))]
    elif kind == "bad_override":
        params["custom_params"] = {"sglang_evict": rng.choice(
            [{"budget": 0}, {"bugdet": 8}, {"policy": "lru"}, {"budget": 2**63}, {"sinks": 1.5},
             {"window": "8"}, {"budget": None}, {"lookahead": [1]}])}
    elif kind == "bad_ids":
        ids = ids[:5] + [10**9]
    elif kind == "faulty":
        params["custom_params"] = {"sglang_evict": dict(fault)}
    return "/generate", {"input_ids": ids, "sampling_params": params}, n


def _produced(path: str, body: dict) -> int:
    if path == "/generate":
        return body["meta_info"]["completion_tokens"]
    return body["usage"]["completion_tokens"]


def _client(url: str, seed: int, deadline: float, kinds: dict, fault: dict | None,
            policies: tuple) -> list:
    """One client's requests until `deadline`: (kind, status, produced == asked, text)."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(100, 20000) for _ in range(rng.randrange(20, 120))]
                for _ in range(3)]
    names, weights = list(kinds), list(kinds.values())
    out = []
    while time.monotonic() < deadline:
        kind = rng.choices(names, weights)[0]
        path, body, asked = _body(kind, rng, prefixes, fault, policies)
        try:
            if kind == "abort":  # a stream the client cuts after a few chunks
                body["stream"] = True
                with requests.post(url + path, json=body, stream=True, timeout=600) as r:
                    for i, _ in enumerate(r.iter_lines()):
                        if i >= rng.randrange(1, 4):
                            break
                    out.append((kind, r.status_code, True, ""))
                continue
            r = requests.post(url + path, json=body, timeout=600)
            whole = r.status_code != 200 or _produced(path, r.json()) == asked
            out.append((kind, r.status_code, whole, r.text[:300]))
        except requests.RequestException as e:  # a dropped connection: a failure
            out.append((kind, -1, False, repr(e)))
    return out


def run_load(url: str, seconds: float, clients: int, kinds: dict | None = None,
             fault: dict | None = None, policies: tuple = POLICIES, seed: int = 0) -> list:
    """Every client's results, all clients at once for `seconds`: (kind, status, output
    length as asked, text). `policies`: what the per-request ones pick from (`none` only
    where the operator allows it)."""
    kinds = dict(KINDS if kinds is None else kinds)
    deadline = time.monotonic() + seconds
    with cf.ThreadPoolExecutor(clients) as pool:
        runs = pool.map(lambda i: _client(url, seed * 1000 + i, deadline, kinds, fault,
                                          policies), range(clients))
        return [r for rs in runs for r in rs]


def failures(results: list) -> list:
    """The results that break the contract: a status other than the kind's (an aborted stream
    started with 200), or a 200 whose output length is not the one asked for."""
    bad = []
    for kind, code, whole, text in results:
        want = OK_CODES.get(kind)
        if kind == "abort":
            ok = code == 200
        else:
            ok = code == want and (code != 200 or whole)
        if not ok:
            bad.append((kind, code, text))
    return bad


class MemorySampler(threading.Thread):
    """Resident memory (MiB) of a process and its children, every `every` seconds."""

    def __init__(self, pid: int, every: float = 5.0):
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.every = every
        self.samples: list[tuple[float, float]] = []
        self._halt = threading.Event()
        self._t0 = time.monotonic()

    def rss_mib(self) -> float:
        procs = [self.proc] + self.proc.children(recursive=True)
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except Exception:  # noqa: BLE001 - a child that just exited
                pass
        return total / 2**20

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append(((time.monotonic() - self._t0) / 60, self.rss_mib()))
            self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def trend(self, warmup: float = 0.2) -> dict:
        """Start, end and peak MiB, and the fitted slope (MiB per minute) after the warm-up."""
        import numpy as np

        t = np.array([s[0] for s in self.samples])
        m = np.array([s[1] for s in self.samples])
        keep = t >= warmup * t[-1]
        slope = float(np.polyfit(t[keep], m[keep], 1)[0]) if keep.sum() >= 3 else 0.0
        return {"samples": len(m), "start_mib": float(m[0]), "end_mib": float(m[-1]),
                "peak_mib": float(m.max()), "after_warmup_mib": float(m[keep][0]),
                "slope_mib_per_min": slope}


def summary(results: list, seconds: float) -> dict:
    codes = collections.Counter((k, c) for k, c, _, _ in results)
    return {
        "seconds": seconds, "requests": len(results),
        "by_kind": dict(collections.Counter(k for k, _, _, _ in results)),
        "by_status": {f"{k} {c}": n for (k, c), n in sorted(codes.items())},
        "failures": failures(results)[:20], "failure_count": len(failures(results)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--quick", action="store_true", help="one minute")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "soak.json"))
    args = ap.parse_args()
    seconds = 60.0 if args.quick else args.minutes * 60
    from sglang_evict.server_process import ServerProcess

    with ServerProcess(SERVER_ARGS, startup_timeout=900) as srv:
        sampler = MemorySampler(srv.proc.pid)
        sampler.start()
        t0 = time.monotonic()
        results = run_load(srv.url, seconds, args.clients)
        elapsed = time.monotonic() - t0
        sampler.stop()
        log = srv.log_path.read_text(errors="replace")
        alive = srv.proc.poll() is None
    report = summary(results, elapsed)
    report.update(memory=sampler.trend(), server_alive=alive, server_args=SERVER_ARGS,
                  retractions=log.count(figures.RETRACTION),
                  reclaims=log.count("sglang-evict: reclaimed"),
                  unbalanced=log.count("head-slots are neither free"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    mem = report["memory"]
    print(f"{report['requests']} requests in {elapsed / 60:.1f} min, "
          f"{report['failure_count']} outside the contract; by status {report['by_status']}")
    print(f"resident memory {mem['start_mib']:.0f} -> {mem['end_mib']:.0f} MiB "
          f"(peak {mem['peak_mib']:.0f}), trend after warm-up "
          f"{mem['slope_mib_per_min']:+.2f} MiB/min; retractions {report['retractions']}, "
          f"reclaims {report['reclaims']}; server alive: {alive}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
