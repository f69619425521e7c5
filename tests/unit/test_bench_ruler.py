"""bench/ruler.py --reuse: the gate-free rows of an earlier run are taken only for the same
prompts and server settings, and never the rows that read the gates."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ruler():
    spec = importlib.util.spec_from_file_location("bench_ruler", ROOT / "bench" / "ruler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
