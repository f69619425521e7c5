"""Shared fixtures. Server fixtures start real SGLang servers on 127.0.0.1 (free port) with the
default model through the worker's lane (lane_servers.py), which stops them by pid: a module's
own server lives for its module, vanilla's while the lane's tests talk to it (one start costs
30-45 s on 2 cores)."""

from __future__ import annotations

import pytest

from lane_servers import LANE


# The server tests' two lanes, each on its own pytest-xdist worker, in this order (a node id
# under tests/server/ goes to the lane of its longest matching prefix). Each lane keeps one
# server alive at a time (lane_servers.py), so at most two are alive. Each starts with tests
# that talk to vanilla (that start also records the vanilla answers its later modules compare
# with), and the two take about the same time (CI, stop 32).
LANES = {
    "server-a": ("test_serving.py", "test_plan_admission.py", "test_radix_serving.py",
                 "test_gates_triton.py", "test_load_and_faults.py"),
    "server-b": ("test_scored_benches.py", "test_eviction_serving.py", "test_gates_serving.py",
                 "test_serving.py::test_vanilla_cannot_hold"),
}


_LANE_SERVERS = pytest.StashKey["LaneServers"]()  # this worker's, for the teardown hook


def _lane(item) -> tuple[str, int]:
    """(lane, place in it) of a server test."""
    name = item.nodeid.split("tests/server/", 1)[-1]
    matches = [(len(prefix), lane, i) for lane, prefixes in LANES.items()
               for i, prefix in enumerate(prefixes) if name.startswith(prefix)]
    if not matches:
        raise pytest.UsageError(f"{item.nodeid}: a server test in no lane of tests/conftest.py")
    _, lane, place = max(matches)
    return lane, place


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """On xdist workers (`-n 2 --dist loadgroup` in pyproject.toml) the server tests come first,
    lane by lane, so each worker takes a lane at once and the unit and kernel tests fill in
    after. xdist groups by a "@group" suffix of the node id, which it sets through an attribute
    pytest 9 no longer reads (`_nodeid`); the id is set here instead."""
    from _pytest.nodeid import coerce_node_id

    if not getattr(config.option, "loadgroup", False):  # set on xdist workers only
        return
    lanes = {item: _lane(item) for item in items if _is_server_test(item)}
    order = {name: i for i, name in enumerate(LANES)}
    items.sort(key=lambda it: (0, order[lanes[it][0]], lanes[it][1]) if it in lanes else (1,))
    for item, (lane, _) in lanes.items():
        if not item.nodeid.endswith("@" + lane):
            item._id = coerce_node_id(item.nodeid + "@" + lane)


def _is_server_test(item) -> bool:
    return item.path.parent.name == "server"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """With two workers on two cores, every test runs torch on one thread, and so does every
    server (lane_servers.py): two busy-waiting thread pools per core slowed the server tests
    2-5x (CI, stop 30) and a two-thread server beside a busy core prefilled 20x slower (stop
    31)."""
    if getattr(item.config.option, "loadgroup", False):
        import torch

        torch.set_num_threads(1)
        if _is_server_test(item):
            item.config.stash[LANE] = _lane(item)[0]


def pytest_runtest_teardown(item, nextitem):
    """The lane's last server test stops the server left up (vanilla's is never released)."""
    servers = item.config.stash.get(_LANE_SERVERS, None)
    if servers is not None and _is_server_test(item) and (
            nextitem is None or not _is_server_test(nextitem)):
        servers.stop()


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
def servers(request, default_model_path):
    """This worker's lane of servers (lane_servers.py)."""
    from lane_servers import LaneServers

    lane = LaneServers(request.session, default_model_path,
                       one_thread=getattr(request.config.option, "loadgroup", False))
    request.config.stash[_LANE_SERVERS] = lane
    yield lane
    lane.stop()


@pytest.fixture
def server(servers):
    """Vanilla SGLang (lane_servers.VANILLA_ARGS), up while the lane's tests talk to it."""
    return servers.vanilla()


@pytest.fixture
def vanilla(servers, request):
    """Vanilla's recorded answers to this module's `vanilla_requests`, by name."""
    return servers.answers(request.module)


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
