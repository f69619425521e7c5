"""Shared fixtures. Server fixtures start real SGLang servers on 127.0.0.1 (free port) with the
default model and stop them by pid in teardown. The vanilla one is session-scoped (one start costs
30-45 s on 2 cores); every other lives for its module or its test."""

from __future__ import annotations

import pytest


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Every test of tests/server/ runs on one pytest-xdist worker, in order (`-n 2 --dist
    loadgroup` in pyproject.toml): at most the session's vanilla server and one other are
    alive, while the other worker runs the unit and kernel tests beside them. xdist groups by a
    "@group" suffix of the node id, which it sets through an attribute pytest 9 no longer reads
    (`_nodeid`); the id is set here instead."""
    from _pytest.nodeid import coerce_node_id

    if not getattr(config.option, "loadgroup", False):  # set on xdist workers only
        return
    for item in items:
        if _is_server_test(item) and not item.nodeid.endswith("@server"):
            item._id = coerce_node_id(item.nodeid + "@server")


_TORCH_THREADS: list[int] = []  # torch's own choice in this worker, taken before any change


def _is_server_test(item) -> bool:
    return item.path.parent.name == "server"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """With two workers on two cores, a unit or kernel test runs torch on one thread: the other
    worker's servers run their own torch threads, and two busy-waiting thread pools per core
    slowed the server tests 2-5x (CI, stop 30). Server tests keep torch's own choice (their HF
    references run in this process)."""
    if not getattr(item.config.option, "loadgroup", False):
        return
    import torch

    if not _TORCH_THREADS:
        _TORCH_THREADS.append(torch.get_num_threads())
    torch.set_num_threads(_TORCH_THREADS[0] if _is_server_test(item) else 1)


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


# The session's vanilla SGLang server. Its settings are the quick scored sweeps' vanilla ones
# (tests/server/test_scored_benches.py runs them on it): a 512-token pool, which every other test
# of it fits, and a decode log line per step.
VANILLA_ARGS = ["--max-total-tokens", "512", "--enable-cache-report", "--decode-log-interval", "1"]


@pytest.fixture(scope="session")
def server(default_model_path):
    from sglang_evict.server_process import ServerProcess

    with ServerProcess(VANILLA_ARGS) as srv:
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
