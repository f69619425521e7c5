"""The native /generate call the server tests make (greedy, token ids in and out), and the
cache flush between runs that must start from an empty cache."""

from __future__ import annotations

import functools
import re
import time

import requests


def generate(server, input_ids: list[int], max_new_tokens: int, **sampling) -> dict:
    """Greedy `/generate` of `max_new_tokens`; `sampling` adds sampling params (custom_params)."""
    r = requests.post(
        server.url + "/generate",
        json={
            "input_ids": input_ids,
            "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens, **sampling},
        },
        timeout=300,
    )
    r.raise_for_status()
    return r.json()


def flush(server) -> None:
    """Empty the server's radix cache (the benches' client's flush, which retries while
    requests run)."""
    _bench_client().flush_cache(server.url)


@functools.cache
def _bench_client():
    import bench_modules

    return bench_modules.load("client")


def evict_metrics(server) -> dict[str, float]:
    """sglang_evict:* samples of /metrics, summed over label sets (one scheduler here)."""
    out: dict[str, float] = {}
    for line in requests.get(server.url + "/metrics", timeout=30).text.splitlines():
        m = re.match(r"^(sglang_evict:[a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$", line)
        if m and "layer=" not in (m.group(2) or ""):
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def drained(server, seconds: int = 120) -> dict[str, float]:
    """/metrics once the requests have drained: every head-slot free or held by the tree (the
    gauges follow the scheduler's next step or idle round); asserted, and nothing unaccounted."""
    for _ in range(seconds):
        m = evict_metrics(server)
        if m["sglang_evict:head_slots_free"] + m["sglang_evict:head_slots_tree"] == \
                m["sglang_evict:head_slots_capacity"]:
            break
        time.sleep(1)
    assert m["sglang_evict:head_slots_free"] + m["sglang_evict:head_slots_tree"] == \
        m["sglang_evict:head_slots_capacity"], m
    assert m["sglang_evict:head_slots_unaccounted"] == 0
    return m
