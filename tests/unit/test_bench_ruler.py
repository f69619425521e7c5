"""bench/ruler.py --reuse: the gate-free rows of an earlier run are taken only for the same
prompts and server settings, and never the rows that read the gates."""

from __future__ import annotations

import json

import pytest

import bench_modules



@pytest.fixture(scope="module")
def ruler():
    return bench_modules.load("ruler")


ARGS = ["--evict-policy", "retention-global", "--evict-gates", "old.safetensors",
        "--evict-budget", "128", "--max-total-tokens", "16384"]


def _samples():
    return [{"task": "niah_single_1", "length": 2048, "index": i, "outputs": [str(1000 + i)]}
            for i in range(2)]


def _earlier(tmp_path, ruler, **changes):
    grid = list(ruler.cells(["retention-global", "streaming"], [128]))
    rows = [
        {"task": s["task"], "length": s["length"], "index": s["index"], "policy": p, "budget": m,
         "outputs": s["outputs"], "score": 1.0}
        for s in _samples() for p, m in grid
    ]
    data = {"buffer": 32, "server_args": ARGS, "rows": rows}
    data.update(changes)
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(data))
    return path, grid


def test_reuse_takes_gate_free_rows_only(tmp_path, ruler):
    path, grid = _earlier(tmp_path, ruler)
    new_args = [a if a != "old.safetensors" else "new.safetensors" for a in ARGS]
    reused = ruler.reusable_rows(path, _samples(), grid, 32, new_args)
    assert sorted(reused) == sorted(
        ("niah_single_1", 2048, i, p, m) for i in range(2) for p, m in (("full", None), ("streaming", 128))
    )
    # A cell the earlier run did not measure is measured, not invented.
    more = grid + [("random", 128)]
    assert len(ruler.reusable_rows(path, _samples(), more, 32, new_args)) == 4


def test_reuse_refuses_other_settings_or_prompts(tmp_path, ruler):
    path, grid = _earlier(tmp_path, ruler)
    with pytest.raises(SystemExit, match="other server settings"):
        ruler.reusable_rows(path, _samples(), grid, 16, ARGS)
    other = [a if a != "16384" else "8192" for a in ARGS]
    with pytest.raises(SystemExit, match="other server settings"):
        ruler.reusable_rows(path, _samples(), grid, 32, other)
    changed = _samples()
    changed[1]["outputs"] = ["999"]
    with pytest.raises(SystemExit, match="another prompt"):
        ruler.reusable_rows(path, changed, grid, 32, ARGS)


def test_bootstrap_interval_matches_the_normal_approximation_of_a_large_sample(ruler):
    """scipy's percentile bootstrap of the mean against the textbook interval for a mean of n
    0/1 scores (mean +- 1.96 sqrt(p(1-p)/n)): for n = 400 they agree to within 0.01."""
    import numpy as np

    scores = (np.random.default_rng(3).random(400) < 0.3).astype(float).tolist()
    p = float(np.mean(scores))
    half = 1.96 * (p * (1 - p) / len(scores)) ** 0.5
    lo, hi = ruler.bootstrap_ci(scores)
    assert lo == pytest.approx(p - half, abs=0.01) and hi == pytest.approx(p + half, abs=0.01)
    assert ruler.bootstrap_ci([0.5]) == (0.5, 0.5) and ruler.bootstrap_ci([1.0, 1.0]) == (1.0, 1.0)
