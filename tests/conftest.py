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
def trained_test_gates(default_model_path, tmp_path_factory):
    """(the gates module of a training run, the checkpoint it exported). The run is one step
    of `sglang-evict train` on the default model from the input-dependent test gates, so the
    servers below serve a file written by training."""
    from gate_fixtures import write_test_gates

    from sglang_evict import training as tr
    from sglang_evict.gates.checkpoint import read_gate_header

    root = tmp_path_factory.mktemp("gates")
    init = write_test_gates(default_model_path, root / "init.safetensors")
    config = tr.load_config(None, {
        "init_gates": str(init), "out_dir": str(root / "run"),
        "gate_hidden": read_gate_header(init).config.gate_hidden, "bias_init": 2.0,
        "tasks": ["niah_single_1"], "lengths": [256], "steps": 1, "lr": 1e-3,
        "warmup_steps": 0, "progress": False,
    })
    trainer = tr.Trainer(config)
    assert trainer.run()["status"] == "completed"
    return trainer.gates, root / "run" / tr.EXPORT_FILE


@pytest.fixture(scope="session")
def test_gates_path(trained_test_gates):
    return trained_test_gates[1]


# Servers used by one module live for that module only: every server's scheduler holds about
# 4.5 GB here, and a suite that kept them all alive ran this 24 GB machine out of memory (the
# kernel killed a scheduler, and the next server's start-up starved).
@pytest.fixture(scope="module")
def gated_server(test_gates_path):
    from sglang_evict.server_process import ServerProcess

    with ServerProcess(["--evict-gates", str(test_gates_path), "--enable-cache-report"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def gated_triton_server(test_gates_path):
    """Gates stored by the Triton kernel (run by Triton's interpreter on CPU)."""
    import os

    from sglang_evict.server_process import ServerProcess

    env = dict(os.environ, TRITON_INTERPRET="1")
    args = ["--evict-gates", str(test_gates_path), "--evict-kernel", "triton"]
    with ServerProcess(args, env=env) as srv:
        yield srv
