"""bench/figures.py: the serving figures the benches share, against values worked by hand."""

from __future__ import annotations

import bench_modules


def test_figures_of_completed_requests_and_of_the_server_log():
    figures = bench_modules.load("figures")
    assert figures.percentile([], 0.5) is None
    assert figures.percentile([3.0, 1.0, 2.0, 4.0], 0.5) == 3.0  # rank int(0.5 * 4) = 2
    assert figures.percentile([3.0, 1.0, 2.0, 4.0], 0.99) == 4.0
    done = [{"latency": 2.0, "ttft": 0.5, "prompt": 100, "cached": 80, "completion": 10},
            {"latency": 4.0, "ttft": 1.5, "prompt": 100, "cached": 0, "completion": 30}]
    got = figures.request_figures(done, wall=8.0)
    assert got == {"requests_per_s": 0.25, "output_tokens_per_s": 5.0,
                   "latency_p50_s": 4.0, "latency_p99_s": 4.0,
                   "ttft_p50_s": 1.5, "ttft_p99_s": 1.5, "prefix_hit_rate": 0.4}
    log = ("Prefill batch. #new-token: 40, #running-req: 7\n"
           "Decode batch. #running-req: 3\nKV cache pool is full. Retract requests.\n"
           "Decode batch. #running-req: 5\n")
    assert figures.log_figures(log) == {"max_running": 7, "retractions": 1}
    assert figures.log_figures(log, running=r"Decode batch.*?#running-req: (\d+)") == {
        "max_running": 5, "retractions": 1}
    assert figures.log_figures("") == {"max_running": 0, "retractions": 0}
