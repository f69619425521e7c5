"""The house stays readable: no source file over 450 lines outside tests, no function over 80
(issue: architecture v3). Counted from the files, by Python's own parser."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ("sglang_evict", "patches", "kernels", "bench", "scripts")
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80


def _sources() -> list[Path]:
    files = [p for d in SOURCE for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 50, "the source folders were not found"
    return files


def test_no_source_file_over_450_lines():
    long = {str(p.relative_to(ROOT)): n for p in _sources()
            if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, long


def test_no_function_over_80_lines():
    long = {}
    for p in _sources():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{p.relative_to(ROOT)}:{node.name}"] = n
    assert not long, long
