"""Shared fixtures. Server fixtures start real SGLang servers on 127.0.0.1 (free port) with the
default model and stop them by pid in teardown; they are session-scoped because one start costs
about 100 s on 2 cores."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def default_model_path():
    from sglang_evict import default_model

    return default_model.resolve()


@pytest.fixture(scope="session")
def hf_model(default_model_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    return model, tokenizer


@pytest.fixture(scope="session")
def server(default_model_path):
    from sglang_evict.server_process import ServerProcess

    with ServerProcess(["--enable-cache-report"]) as srv:
        yield srv


@pytest.fixture(scope="session")
def test_gates_path(default_model_path, tmp_path_factory):
    from gate_fixtures import write_test_gates

    return write_test_gates(default_model_path, tmp_path_factory.mktemp("gates") / "gates.safetensors")


@pytest.fixture(scope="session")
def gated_server(test_gates_path):
    from sglang_evict.server_process import ServerProcess

    with ServerProcess(["--evict-gates", str(test_gates_path), "--enable-cache-report"]) as srv:
        yield srv


@pytest.fixture(scope="session")
def gated_triton_server(test_gates_path):
    """Gates stored by the Triton kernel (run by Triton's interpreter on CPU)."""
    import os

    from sglang_evict.server_process import ServerProcess

    env = dict(os.environ, TRITON_INTERPRET="1")
    args = ["--evict-gates", str(test_gates_path), "--evict-kernel", "triton"]
    with ServerProcess(args, env=env) as srv:
        yield srv
