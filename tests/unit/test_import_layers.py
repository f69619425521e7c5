"""The layers of ARCHITECTURE.md hold: import-linter's contracts in pyproject.toml, run over the
package as it is installed (kernels/ and patches/ inside sglang_evict/), so an import that runs
back up or a cycle between layers fails here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")


def _installed_layout(dest: Path) -> Path:
    pkg = dest / "sglang_evict"
    ignore = shutil.ignore_patterns("__pycache__", "*.safetensors")
    shutil.copytree(ROOT / "sglang_evict", pkg, ignore=ignore)
    for mapped in ("kernels", "patches"):  # pyproject's package-dir
        shutil.copytree(ROOT / mapped, pkg / mapped, ignore=ignore)
    return dest


def _lint(src: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(src))
    return subprocess.run([str(LINT), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=src, env=env, capture_output=True, text=True, timeout=300)


def test_the_import_contracts_hold(tmp_path):
    run = _lint(_installed_layout(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 kept, 0 broken" in run.stdout


def test_an_import_running_back_up_is_caught(tmp_path):
    """The check can fail: the cache importing the eviction layer above it breaks the contract."""
    src = _installed_layout(tmp_path)
    lists = src / "sglang_evict" / "cache" / "live_lists.py"
    lists.write_text(lists.read_text() + "\nfrom sglang_evict.eviction import evictor  # noqa\n")
    run = _lint(src)
    assert run.returncode != 0
    assert "sglang_evict.cache.live_lists -> sglang_evict.eviction.evictor" in run.stdout
