"""bench/gpu_kernels.py is what a lent GPU runs, with no chance to debug it there: its tiny-shape
mode runs here under the interpreter, every kernel agreeing with its torch twin."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path


def test_gpu_kernel_check_runs_and_every_kernel_agrees(tmp_path):
    path = Path(__file__).resolve().parents[2] / "bench" / "gpu_kernels.py"
    spec = importlib.util.spec_from_file_location("gpu_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
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
