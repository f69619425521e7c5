"""The plugin's flags are taken out of SGLang's argv and travel to its processes as one
environment variable."""

from __future__ import annotations

import os

import pytest

from sglang_evict.config import ENV_VAR, EvictConfig, EvictConfigError, split_argv


def test_split_argv_takes_only_evict_flags(tmp_path):
    gates = tmp_path / "g.safetensors"
    gates.write_bytes(b"x")
    config, rest = split_argv(
        ["--port", "1", f"--evict-gates={gates}", "--dtype", "float32", "--evict-kernel", "torch"]
    )
    assert rest == ["--port", "1", "--dtype", "float32"]
    assert config == EvictConfig(gates=str(gates), kernel="torch")
    assert config.active


def test_relative_gate_path_becomes_absolute(tmp_path, monkeypatch):
    (tmp_path / "g.safetensors").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    config, _ = split_argv(["--evict-gates", "g.safetensors"])
    assert config.gates == os.path.join(str(tmp_path), "g.safetensors")


def test_round_trip_through_environment(tmp_path):
    gates = tmp_path / "g.safetensors"
    gates.write_bytes(b"x")
    config = EvictConfig(gates=str(gates), kernel="triton")
    assert EvictConfig.from_env({ENV_VAR: config.to_env()}) == config
    assert EvictConfig.from_env({}) == EvictConfig()
    assert not EvictConfig().active


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--evict-kernel", "cuda"], "--evict-kernel must be one of"),
        (["--evict-gates"], "--evict-gates needs a value"),
        (["--evict-nope", "1"], "unknown option --evict-nope"),
        (["--evict-gates", "/no/such/file"], "does not exist"),
    ],
)
def test_bad_flags(argv, message):
    with pytest.raises(EvictConfigError, match=message):
        split_argv(argv)


def test_bad_environment():
    with pytest.raises(EvictConfigError, match="not valid JSON"):
        EvictConfig.from_env({ENV_VAR: "{"})
