"""Bad start-up input gives one clear error line and a non-zero exit, never a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest


def run_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-P", "-m", "sglang_evict", "serve", *args],
        capture_output=True, text=True, timeout=120,
    )


def assert_one_error_line(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 2
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sglang-evict: error: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_missing_model_path(tmp_path):
    missing = tmp_path / "no-such-model"
    result = run_serve("--model-path", str(missing))
    assert_one_error_line(result, f"model path {missing} does not exist")


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    result = run_serve("--model-path", str(tmp_path))
    assert_one_error_line(result, "is not a model folder (no config.json)")


def test_config_without_weights(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    result = run_serve("--model-path", str(tmp_path))
    assert_one_error_line(result, "has a config.json but no weight files")


def test_corrupt_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    result = run_serve("--model-path", str(tmp_path))
    assert_one_error_line(result, "config.json is not valid JSON")


def test_port_in_use(default_model_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_serve("--model-path", str(default_model_path), "--port", str(port))
    assert_one_error_line(result, f"port {port} on 127.0.0.1 is already in use")


@pytest.mark.parametrize("bad", ["abc", "70000"])
def test_bad_port_value(default_model_path, bad):
    result = run_serve("--model-path", str(default_model_path), "--port", bad)
    assert_one_error_line(result, "--port must be")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_layers": 24}, "was made for 24 layers, the served model has 30"),
        ({"num_kv_heads": 4}, "was made for 4 KV heads, the served model has 3"),
        ({"hidden_size": 960}, "was made for hidden size 960, the served model has 576"),
    ],
)
def test_gates_for_another_model_are_refused(default_model_path, tmp_path, overrides, message):
    from gate_fixtures import write_test_gates

    bad = write_test_gates(default_model_path, tmp_path / "other.safetensors", **overrides)
    result = run_serve("--model-path", str(default_model_path), "--evict-gates", str(bad))
    assert_one_error_line(result, message)
    assert str(bad) in result.stderr


def test_corrupt_gate_file_is_refused(default_model_path, tmp_path):
    bad = tmp_path / "gates.safetensors"
    bad.write_bytes(b"\x00" * 64)
    result = run_serve("--model-path", str(default_model_path), "--evict-gates", str(bad))
    assert_one_error_line(result, str(bad))


def test_missing_gate_file_and_unknown_option(default_model_path, tmp_path):
    result = run_serve("--evict-gates", str(tmp_path / "none.safetensors"))
    assert_one_error_line(result, "does not exist")
    result = run_serve("--evict-budgett", "5")
    assert_one_error_line(result, "unknown option --evict-budgett")


def _serve_with(setup: str, model_path) -> subprocess.CompletedProcess:
    """`serve` of a streaming server in a fresh process after `setup` (Python run first)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = f"{setup}\nimport sys\nfrom sglang_evict import serve\nsys.exit(serve.main(sys.argv[1:]))"
    args = ["--model-path", str(model_path), "--evict-policy", "streaming", "--evict-budget", "64",
            "--port", str(port)]
    return subprocess.run([sys.executable, "-P", "-c", code, *args],
                          capture_output=True, text=True, timeout=300)


def _refusal(result: subprocess.CompletedProcess) -> str:
    """The last line of a refused start-up (exit code 2), which must be ours."""
    assert result.returncode == 2, result.stderr
    last = [l for l in result.stderr.splitlines() if l.strip()][-1]
    assert last.startswith("sglang-evict: error: "), result.stderr
    return last


def test_other_sglang_version_is_refused_before_patching(default_model_path):
    """Another installed SGLang: the plugin patches nothing and the server refuses with one line
    naming both versions, before any model is built."""
    result = _serve_with(
        "from sglang_evict.patches import hook_check\n"
        "hook_check.installed_sglang = lambda: '0.5.99'", default_model_path)
    assert "is written for sglang 0.5.23, and sglang 0.5.99 is installed" in _refusal(result)
    assert "Traceback" not in result.stderr + result.stdout


def test_a_hook_sglang_could_not_apply_refuses_the_server(default_model_path):
    """SGLang logs a hook it cannot apply and goes on; the plugin refuses instead, naming it."""
    result = _serve_with(
        "from sglang.srt.plugins.hook_registry import HookRegistry, HookType\n"
        "from sglang_evict.patches import hook_check\n"
        "HookRegistry.register('sglang.srt.no_such_module.moved_function',\n"
        "                      hook_check.before_model_runner_init, HookType.BEFORE)",
        default_model_path)
    assert ("1 of its hooks were not applied (sglang.srt.no_such_module.moved_function)"
            in _refusal(result))
