"""bench/gpu_kernels.py is what a lent GPU runs, with no chance to debug it there: its tiny-shape
mode runs here under the interpreter, every kernel agreeing with its torch twin."""

from __future__ import annotations

import json

import bench_modules


def test_gpu_kernel_check_runs_and_every_kernel_agrees(tmp_path):
    mod = bench_modules.load("gpu_kernels")
    out = tmp_path / "gpu.json"
    assert mod.main(["--smoke", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    kinds = {r["kernel"] for r in rows}
    assert kinds == {"decode", "extend", "live_indices", "store+select", "keep_top"}
    for r in rows:
        if "max_abs_err" in r:
            assert r["max_abs_err"] < 1e-4, r
        for flag in ("equal", "store_equal", "select_equal"):
            if flag in r:
                assert r[flag] is True, r
