"""The serving figures several benches report: percentiles of completed requests, throughput,
prefix hit rate, and what the server log says (most requests running, retractions)."""

from __future__ import annotations

import re

RETRACTION = "KV cache pool is full. Retract requests."


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile by rank (no interpolation); None for no values."""
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else None


def request_figures(done: list[dict], wall: float) -> dict:
    """Figures of the completed requests of a run of `wall` seconds; each a dict with latency,
    ttft (seconds), prompt, cached and completion (tokens)."""
    latency = [r["latency"] for r in done]
    ttft = [r["ttft"] for r in done]
    return {
        "requests_per_s": len(done) / wall,
        "output_tokens_per_s": sum(r["completion"] for r in done) / wall,
        "latency_p50_s": percentile(latency, 0.5),
        "latency_p99_s": percentile(latency, 0.99),
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p99_s": percentile(ttft, 0.99),
        "prefix_hit_rate": sum(r["cached"] for r in done) / max(1, sum(r["prompt"] for r in done)),
    }


def log_figures(log: str, running: str = r"#running-req: (\d+)") -> dict:
    """From a stretch of SGLang's log (`--decode-log-interval 1` logs every step): the most
    requests running (`running`, the pattern whose group is the count) and the retractions."""
    counts = [int(n) for n in re.findall(running, log)]
    return {"max_running": max(counts) if counts else 0, "retractions": log.count(RETRACTION)}
