"""How `sglang-evict serve` completes SGLang's arguments."""

from __future__ import annotations

from sglang_evict import serve


def test_cpu_defaults_fill_only_what_is_missing():
    out = serve.with_cpu_defaults(["--model-path", "m", "--dtype", "bfloat16", "--device=cpu"])
    assert serve.flag_value(out, "--dtype") == "bfloat16"
    assert out.count("--device=cpu") == 1 and "--device" not in out
    assert serve.flag_value(out, "--attention-backend") == "torch_native"
    assert serve.flag_value(out, "--sampling-backend") == "pytorch"
    assert "--disable-cuda-graph" in out
    assert serve.flag_value(out, "--max-total-tokens") == str(serve.CPU_DEFAULT_MAX_TOTAL_TOKENS)


def test_user_memory_settings_win():
    out = serve.with_cpu_defaults(["--mem-fraction-static", "0.3"])
    assert not serve.has_flag(out, "--max-total-tokens")
    out = serve.with_cpu_defaults(["--max-total-tokens", "1000"])
    assert serve.flag_value(out, "--max-total-tokens") == "1000"


def test_default_model_is_filled_in(default_model_path, monkeypatch):
    monkeypatch.setattr(serve, "cuda_available", lambda: False)
    monkeypatch.setattr(serve, "check_port", lambda host, port: None)
    _, out = serve.prepare_argv(["--port", "31000"])
    assert serve.flag_value(out, "--model-path") == str(default_model_path)
    assert serve.flag_value(out, "--host") == "127.0.0.1"
    assert serve.flag_value(out, "--device") == "cpu"


def test_gpu_host_gets_no_cpu_settings(default_model_path, monkeypatch):
    monkeypatch.setattr(serve, "cuda_available", lambda: True)
    monkeypatch.setattr(serve, "check_port", lambda host, port: None)
    _, out = serve.prepare_argv(["--model-path", str(default_model_path)])
    for flag, _ in serve.CPU_DEFAULTS:
        assert not serve.has_flag(out, flag)


def _evict_argv(default_model_path, monkeypatch, *extra):
    monkeypatch.setattr(serve, "cuda_available", lambda: False)
    monkeypatch.setattr(serve, "check_port", lambda host, port: None)
    argv = ["--model-path", str(default_model_path), "--evict-policy", "streaming"]
    return serve.prepare_argv(argv + ["--evict-budget", "8", *extra])


def test_eviction_brings_its_backend_and_scheduler_settings(default_model_path, monkeypatch):
    config, out = _evict_argv(
        default_model_path, monkeypatch, "--disable-radix-cache", "--max-total-tokens", "1000"
    )
    assert config.evicting and config.budget == 8
    assert serve.flag_value(out, "--attention-backend") == "sglang_evict"
    assert "--disable-overlap-schedule" not in out  # the overlap scheduler stays on
    assert serve.flag_value(out, "--chunked-prefill-size") == "500"
    # The CPU defaults still apply to everything else.
    assert serve.flag_value(out, "--device") == "cpu"


def test_eviction_refuses_conflicting_settings(default_model_path, monkeypatch):
    import pytest

    with pytest.raises(serve.StartupError, match="--enable-hierarchical-cache is not supported"):
        _evict_argv(default_model_path, monkeypatch, "--enable-hierarchical-cache")
    with pytest.raises(serve.StartupError, match="--attention-backend sglang_evict, not torch_native"):
        _evict_argv(
            default_model_path, monkeypatch, "--disable-radix-cache",
            "--attention-backend", "torch_native",
        )
    with pytest.raises(serve.StartupError, match="--page-size 1"):
        _evict_argv(default_model_path, monkeypatch, "--disable-radix-cache", "--page-size", "16")


def test_retention_on_the_default_model_uses_the_packaged_gates(
    default_model_path, monkeypatch, tmp_path
):
    import pytest

    fake = tmp_path / "gates.safetensors"
    monkeypatch.setattr(serve, "DEFAULT_GATES", fake)
    monkeypatch.setattr(serve, "check_gates", lambda config, path: None)
    monkeypatch.setattr(serve, "cuda_available", lambda: False)
    monkeypatch.setattr(serve, "check_port", lambda host, port: None)
    argv = ["--model-path", str(default_model_path), "--evict-policy", "retention-global",
            "--evict-budget", "8", "--disable-radix-cache"]
    with pytest.raises(serve.StartupError, match="pass --evict-gates PATH"):
        serve.prepare_argv(argv)  # no packaged file yet
    fake.write_bytes(b"x")
    config, _ = serve.prepare_argv(argv)
    assert config.gates == str(fake)
    other = tmp_path / "other"
    other.mkdir()
    plain = config.__class__(policy="retention", budget=8)
    assert serve.with_default_gates(plain, str(other)).gates is None


def test_eviction_sizes_fit_the_pool(default_model_path, monkeypatch, capsys):
    """The reported failure: a 1024-token pool with streaming M=64 used to die in the scheduler
    (512 running requests x protected tokens + a 512 chunk > pool). serve now derives the
    running-request limit and the chunk from the pool, says what it chose, and refuses only
    what cannot fit."""
    import pytest

    config, out = _evict_argv(
        default_model_path, monkeypatch, "--disable-radix-cache", "--max-total-tokens", "1024",
        "--evict-buffer", "32",
    )
    assert serve.flag_value(out, "--chunked-prefill-size") == "512"
    running = int(serve.flag_value(out, "--max-running-requests"))
    assert running == (1024 - 512) // (8 + 32 + 1)
    assert "chose --chunked-prefill-size 512, --max-running-requests" in capsys.readouterr().err
    # the user's own choices are kept when they fit, refused with one line when they cannot
    _, out = _evict_argv(default_model_path, monkeypatch, "--disable-radix-cache",
                         "--max-total-tokens", "1024", "--max-running-requests", "100")
    assert serve.flag_value(out, "--max-running-requests") == "100"
    with pytest.raises(serve.StartupError, match="at most 102 fit"):
        _evict_argv(default_model_path, monkeypatch, "--disable-radix-cache",
                    "--max-total-tokens", "1024", "--max-running-requests", "512")
    with pytest.raises(serve.StartupError, match="exceeds half the physical pool"):
        _evict_argv(default_model_path, monkeypatch, "--disable-radix-cache",
                    "--max-total-tokens", "1024", "--chunked-prefill-size", "600")


def test_shipped_default_gates_are_dbtrimkv_and_served_by_default(default_model_path, monkeypatch):
    """The packaged default gates load against the default model, have one projection shared by
    all layers (DBTrimKV), and are what a retention policy on the default model serves when no
    --evict-gates is given (the real start-up check loads them)."""
    import json

    from sglang_evict.gates.checkpoint import read_gate_header
    from sglang_evict.gates.files import load_gates_for_model

    hf = json.loads((default_model_path / "config.json").read_text())
    gates = load_gates_for_model(serve.DEFAULT_GATES, hf)
    assert gates.config.shared_projection is True
    assert read_gate_header(serve.DEFAULT_GATES).config.shared_projection is True
    assert gates.config.num_layers == hf["num_hidden_layers"]
    monkeypatch.setattr(serve, "cuda_available", lambda: False)
    monkeypatch.setattr(serve, "check_port", lambda host, port: None)
    for policy in ("retention-global", "retention"):
        config, _ = serve.prepare_argv(["--evict-policy", policy, "--evict-budget", "64",
                                        "--disable-radix-cache"])
        assert config.gates == str(serve.DEFAULT_GATES)
    # any eviction server whose clients may pick a policy has the gates a retention request
    # needs; one whose operator takes no overrides (or that evicts nothing) does not load them
    for policy, overrides, loaded in (("streaming", "clamp", True), ("random", "any", True),
                                      ("streaming", "none", False)):
        config, _ = serve.prepare_argv(["--evict-policy", policy, "--evict-budget", "64",
                                        "--evict-overrides", overrides, "--disable-radix-cache"])
        assert (config.gates == str(serve.DEFAULT_GATES)) is loaded, (policy, overrides)
    config, _ = serve.prepare_argv(["--disable-radix-cache"])
    assert config.gates is None
