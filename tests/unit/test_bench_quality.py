"""bench/quality.py: what a rerun with new gates may take from an earlier run, which systems
the headline cells pick, and the request a cell sends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bench_modules



@pytest.fixture(scope="module")
def quality():
    return bench_modules.load("quality")


SETTINGS = {"buffer": 32, "chunk": 1024, "concurrency": 3, "kvpress": ["kvpress==0.5.5"]}
SYSTEMS = [("full", None), ("retention-global", 128), ("retention-global+la1", 128),
           ("retention", 128), ("streaming", 128), ("kvpress:snapkv", 128), ("kvpress:full", None)]


def _samples():
    return [{"task": "niah_single_1", "length": 2048, "index": i, "outputs": [str(1000 + i)]}
            for i in range(2)]


def _earlier(tmp_path, settings=SETTINGS, gates_sha256="a" * 64):
    rows = [{"task": s["task"], "length": s["length"], "index": s["index"], "policy": p,
             "budget": m, "outputs": s["outputs"], "score": 1.0, "kv_kept_fraction": 0.1}
            for s in _samples() for p, m in SYSTEMS]
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps({"settings": settings, "gates_sha256": gates_sha256,
                                "rows": rows}))
    return path


def test_reuse_takes_every_row_that_does_not_read_the_gates(tmp_path, quality):
    rows = quality.earlier_rows(_earlier(tmp_path), SETTINGS, _samples())
    taken = {(k[3], k[4]) for k in rows}
    assert taken == {("full", None), ("streaming", 128), ("kvpress:snapkv", 128),
                     ("kvpress:full", None)}
    assert len(rows) == 2 * len(taken)


def test_reuse_takes_the_gated_rows_only_from_a_run_of_the_same_gate_file(tmp_path, quality):
    other = quality.earlier_rows(_earlier(tmp_path), SETTINGS, _samples(), "b" * 64)
    assert {(k[3], k[4]) for k in other} == {("full", None), ("streaming", 128),
                                             ("kvpress:snapkv", 128), ("kvpress:full", None)}
    same = quality.earlier_rows(_earlier(tmp_path), SETTINGS, _samples(), "a" * 64)
    assert {(k[3], k[4]) for k in same} == set(SYSTEMS)
    assert len(same) == 2 * len(SYSTEMS)


def test_reuse_refuses_other_settings_or_prompts(tmp_path, quality):
    path = _earlier(tmp_path, dict(SETTINGS, buffer=16))
    with pytest.raises(SystemExit, match="other settings"):
        quality.earlier_rows(path, SETTINGS, _samples())
    changed = _samples()
    changed[0]["outputs"] = ["999"]
    with pytest.raises(SystemExit, match="another prompt"):
        quality.earlier_rows(_earlier(tmp_path), SETTINGS, changed)


def test_best_system_is_the_highest_mean_at_the_headline_budgets(quality):
    def row(p, m, score, length=2048):
        return {"length": length, "policy": p, "budget": m, "score": score}

    rows = [row("streaming", 128, 0.0), row("streaming", 256, 0.5), row("random", 128, 0.25),
            row("random", 256, 0.25), row("knorm", 128, 1.0), row("knorm", 512, 1.0),
            row("knorm", 256, 0.0, length=4096)]
    # knorm's 512 row and its other length do not count: at 128 and 256 it has one row, 1.0.
    assert quality.best(rows, 2048, ["streaming", "random", "knorm"], [128, 256]) == "knorm"
    assert quality.best(rows, 2048, ["streaming", "random"], [128, 256]) == "streaming"
    assert quality.best(rows, 2048, ["streaming", "random"], [128]) == "random"
    # a tie goes to the system listed first
    assert quality.best(rows, 2048, ["random", "streaming"], [128, 256]) == "random"
    assert quality.best(rows, 2048, ["knorm"], [64]) is None


def test_a_cell_sends_its_lookahead(quality):
    ruler = quality.ruler
    assert ruler.override("retention-global+la1", 128, 32) == {
        "policy": "retention-global", "budget": 128, "buffer": 32, "lookahead": 1}
    assert ruler.override("retention", 64, 16) == {"policy": "retention", "budget": 64, "buffer": 16}
    assert ruler.override("full", None, 32) == {"policy": "none"}
    assert ruler.reads_gates("retention-global+la1") and not ruler.reads_gates("kvpress:knorm")


def test_summary_reads_kvpress_rows_too(quality):
    rows = [{"task": "niah_single_1", "length": 2048, "index": i, "policy": "kvpress:snapkv",
             "budget": 128, "score": float(i % 2), "kv_kept_fraction": 0.08} for i in range(4)]
    (cell,) = quality.ruler.summarize(rows, [2048], [("kvpress:snapkv", 128), ("full", None)],
                                      ["niah_single_1"])
    assert (cell["n"], cell["score"], cell["kv_kept_fraction"]) == (4, 0.5, 0.08)
    lo, hi = cell["ci95"]
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0


def test_matrix_puts_each_system_on_a_row_and_each_budget_in_a_column(quality):
    def cell(p, m, score, n, length=2048):
        return {"length": length, "policy": p, "budget": m, "score": score, "n": n,
                "ci95": [score - 0.1, score + 0.1], "kv_kept_fraction": 0.5 if m else 1.0}

    result = {"summary": [cell("full", None, 0.5, 40), cell("streaming", 128, 0.25, 12),
                          cell("streaming", 256, 0.6, 40), cell("knorm", 256, 0.0, 12),
                          cell("knorm", 128, 0.75, 12, length=4096)]}
    lines = quality.matrix(result, 2048).splitlines()
    assert lines[0] == "| system | M = 128 | M = 256 |"
    assert lines[2] == "| full | 0.500 (40) [0.40, 0.60] 100.0% | |"
    assert lines[3] == ("| streaming | 0.250 (12) [0.15, 0.35] 50.0% | "
                        "0.600 (40) [0.50, 0.70] 50.0% |")
    assert lines[4] == "| knorm | - | 0.000 (12) [-0.10, 0.10] 50.0% |"
    assert len(lines) == 5


def test_oracle_jobs_go_to_the_oracle_and_ratios_are_computed(quality, monkeypatch):
    """measure() sends each job to its system (server, kvpress, hindsight oracle, grouped per
    prompt); the ratio rows divide retention-global's score by the full cache's and the
    oracle's at the same length and M."""
    a = {"task": "niah_single_1", "length": 2048, "index": 0, "outputs": ["1"]}
    b = dict(a, index=1)
    seen = {}
    monkeypatch.setattr(quality.ruler, "serve_rows",
                        lambda server, jobs, buffer, conc: seen.setdefault("server", jobs) and [])
    monkeypatch.setattr(quality, "run_peers",
                        lambda cells, model, buffer, work: seen.setdefault("peers", cells) and [])
    monkeypatch.setattr(quality.oracle, "oracle_rows",
                        lambda model, jobs: seen.setdefault("oracle", jobs) and [])
    jobs = [(a, "streaming", 64), (a, "oracle", 64), (a, "oracle", 128), (b, "oracle", 64),
            (a, "kvpress:snapkv", 64), (b, "oracle", 256)]
    args = type("Args", (), {"buffer": 32, "concurrency": 1})()
    have = {quality.ruler.cell_key(b, "oracle", 256): {}}
    quality.measure(jobs, None, args, Path("m"), Path("w"), have)
    assert seen["server"] == [(a, "streaming", 64)]
    assert seen["peers"] == [(a, [("kvpress:snapkv", 64)])]
    assert seen["oracle"] == [(a, [64, 128]), (b, [64])]  # the reused row is not measured again
    summary = [
        {"length": 2048, "policy": "full", "budget": None, "score": 0.5},
        {"length": 2048, "policy": "retention-global", "budget": 128, "score": 0.4},
        {"length": 2048, "policy": "oracle", "budget": 128, "score": 0.8},
        {"length": 2048, "policy": "retention-global", "budget": 64, "score": 0.1},
    ]
    rows = quality.ratios({"lengths": [2048], "summary": summary})
    assert [(r["budget"], r["gates_over_full"], r["gates_over_oracle"]) for r in rows] == [
        (64, pytest.approx(0.2), None), (128, pytest.approx(0.8), pytest.approx(0.5))]
    assert "| 2048 | 128 | 0.40 | 0.50 | 0.80 | 0.80 | 0.50 |" in quality.ratio_table(rows)
