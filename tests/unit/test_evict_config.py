"""The plugin's flags are taken out of SGLang's argv and travel to its processes as one
environment variable."""

from __future__ import annotations

import os

import pytest

from sglang_evict.config import ENV_VAR, EvictConfig, EvictConfigError, split_argv
from sglang_evict.eviction.settings import evictor_config


def test_split_argv_takes_only_evict_flags(tmp_path):
    gates = tmp_path / "g.safetensors"
    gates.write_bytes(b"x")
    config, rest = split_argv(
        ["--port", "1", f"--evict-gates={gates}", "--dtype", "float32", "--evict-kernel", "torch"]
    )
    assert rest == ["--port", "1", "--dtype", "float32"]
    assert config == EvictConfig(gates=str(gates), kernel="torch")
    assert config.active
    # gates alone: the head-slot backend scores every entry and evicts none
    assert config.policy == "none" and config.evicting and config.virtual_factor == 1


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


def test_eviction_flags_parse_and_build_the_evictor(tmp_path):
    gates = tmp_path / "g.safetensors"
    gates.write_bytes(b"x")
    config, rest = split_argv([
        "--evict-policy", "retention-global", "--evict-budget=64", "--evict-buffer", "32",
        "--evict-sinks", "2", "--evict-window", "16", "--evict-min-per-head", "4",
        "--evict-gates", str(gates), "--port", "1",
    ])
    assert rest == ["--port", "1"]
    assert config.evicting and config.active and config.virtual_factor == 8
    ev = evictor_config(config)
    assert (ev.budget, ev.buffer, ev.mode, ev.min_per_head) == (64, 32, "global", 4)
    assert (ev.policy.name, ev.policy.sinks, ev.policy.window) == ("retention", 2, 16)
    per_head, _ = split_argv(["--evict-policy", "retention", "--evict-budget", "8",
                              "--evict-gates", str(gates)])
    assert evictor_config(per_head).mode == "per_head"
    none, _ = split_argv(["--evict-policy", "none"])
    assert none.evicting and evictor_config(none) is None and none.virtual_factor == 1
    assert EvictConfig.from_env({ENV_VAR: config.to_env()}) == config


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--evict-policy", "lru", "--evict-budget", "8"], "--evict-policy must be one of"),
        (["--evict-policy", "streaming"], "needs --evict-budget M"),
        (["--evict-policy", "streaming", "--evict-budget", "0"], "--evict-budget must be >= 1"),
        (["--evict-policy", "streaming", "--evict-budget", "x"], "must be an integer"),
        (["--evict-policy", "none", "--evict-budget", "8"], "no effect with --evict-policy none"),
        (["--evict-budget", "8"], "--evict-budget without --evict-policy"),
        (["--evict-policy", "streaming", "--evict-budget", "8", "--evict-window", "-1"],
         "--evict-window must be >= 0"),
        (["--evict-policy", "streaming", "--evict-budget", "8", "--evict-min-per-head", "9"],
         "exceeds --evict-budget 8"),
        (["--evict-policy", "streaming", "--evict-budget", "8", "--evict-oversubscribe", "0"],
         "--evict-oversubscribe must be >= 1"),
        (["--evict-policy", "streaming", "--evict-budget", "8", "--evict-lookahead", "1"],
         "--evict-lookahead applies to the retention policies, not streaming"),
        (["--evict-policy", "retention", "--evict-budget", "8", "--evict-lookahead", "-1"],
         "--evict-lookahead must be >= 0"),
    ],
)
def test_bad_eviction_flags(argv, message):
    with pytest.raises(EvictConfigError, match=message):
        split_argv(argv)


def test_per_request_override_merges_over_the_server_settings(monkeypatch):
    from sglang_evict.patches import evict_requests

    server, _ = split_argv(["--evict-policy", "streaming", "--evict-budget", "64",
                            "--evict-sinks", "2", "--evict-overrides", "any"])
    srv = server
    assert evict_requests.request_config(None, srv) is None
    assert evict_requests.request_config({"other": 1}, srv) is None
    cfg = evict_requests.request_config({"sglang_evict": {"budget": 8, "window": 4}}, srv)
    assert (cfg.policy, cfg.budget, cfg.window, cfg.sinks) == ("streaming", 8, 4, 2)
    full = evict_requests.request_config({"sglang_evict": {"policy": "none"}}, srv)
    assert evictor_config(full) is None
    for bad, message in [
        ({"sglang_evict": {"budget": 0}}, r"sglang_evict\.budget must be an integer in \[1, "),
        ({"sglang_evict": {"budgets": 8}}, "unknown field"),
        ({"sglang_evict": {"budget": "8"}}, r"sglang_evict\.budget must be an integer"),
        ({"sglang_evict": {"policy": "lru"}}, r"sglang_evict\.policy must be one of"),
        ({"sglang_evict": 3}, "must be an object"),
    ]:
        with pytest.raises(ValueError, match=message):
            evict_requests.request_config(bad, srv)
    srv = EvictConfig()
    with pytest.raises(ValueError, match="started without --evict-policy"):
        evict_requests.request_config({"sglang_evict": {"budget": 8}}, srv)


def test_lookahead_flag_and_override_set_the_served_score(tmp_path, monkeypatch):
    """--evict-lookahead 1 ranks entries by (t + 1 - pos) log beta (the authors' runtime), 0 by
    (t - pos) log beta; a request may choose either on a retention server."""
    import torch

    from sglang_evict.eviction.policies import ScoreInputs
    from sglang_evict.patches import evict_requests

    gates = tmp_path / "g.safetensors"
    gates.write_bytes(b"x")
    flags = ["--evict-policy", "retention-global", "--evict-budget", "8",
             "--evict-gates", str(gates), "--evict-sinks", "0"]
    plain, _ = split_argv(flags)
    ahead, _ = split_argv(flags + ["--evict-lookahead", "1"])
    assert evictor_config(plain).policy.lookahead == 0
    assert evictor_config(ahead).policy.lookahead == 1
    # Two entries whose order flips with the offset: an old one with beta near 1 and a recent
    # one with a small beta. t = 10.
    log_beta = torch.tensor([[-0.1], [-0.7]])
    positions = torch.tensor([0, 9])
    inputs = ScoreInputs(positions, torch.tensor([10, 10]), 1, log_beta, None)
    for cfg, offset in ((plain, 0), (ahead, 1)):
        score = evictor_config(cfg).policy.score(inputs)[:, 0].double()
        expect = (10 + offset - positions).double() * log_beta[:, 0].double()
        assert torch.allclose(score, expect, atol=1e-5)
    plain_order = evictor_config(plain).policy.score(inputs)[:, 0].argsort().tolist()
    ahead_order = evictor_config(ahead).policy.score(inputs)[:, 0].argsort().tolist()
    # now: -1.0 vs -0.7 (the old entry goes first); one step on: -1.1 vs -1.4 (the recent one)
    assert plain_order == [0, 1] and ahead_order == [1, 0]

    srv = plain  # --evict-overrides clamp
    cfg = evict_requests.request_config({"sglang_evict": {"lookahead": 1}}, srv)
    assert evictor_config(cfg).policy.lookahead == 0  # at most the server's
    open_server, _ = split_argv(flags + ["--evict-overrides", "any"])
    srv = open_server
    cfg = evict_requests.request_config({"sglang_evict": {"lookahead": 1}}, srv)
    assert evictor_config(cfg).policy.lookahead == 1
    with pytest.raises(ValueError, match=r"sglang_evict\.lookahead must be an integer in \[0, "):
        evict_requests.request_config({"sglang_evict": {"lookahead": -2}}, srv)
    with pytest.raises(ValueError, match="lookahead applies to the retention policies"):
        evict_requests.request_config({"sglang_evict": {"policy": "random", "lookahead": 1}}, srv)


def test_retention_needs_gates():
    config, _ = split_argv(["--evict-policy", "retention-global", "--evict-budget", "8"])
    with pytest.raises(EvictConfigError, match="pass --evict-gates PATH"):
        config.check_gates_present()


HOSTILE = [
    ("budget", 2**63), ("budget", 2**64 + 1), ("budget", -(2**63)), ("budget", 1.5),
    ("budget", "64"), ("budget", None), ("budget", [64]), ("budget", True), ("buffer", 10**30),
    ("sinks", -1), ("window", {"a": 1}), ("min_per_head", 2**40), ("lookahead", 10**6),
    ("policy", 3), ("policy", None), ("policy", ["streaming"]), ("policy", "STREAMING"),
]


@pytest.mark.parametrize("field,value", HOSTILE)
def test_hostile_override_fields_are_refused_by_field_name(monkeypatch, field, value):
    """Huge, negative, wrong-typed and null values: one ValueError (the tokenizer manager's
    400) that names the field, not the server flag, in every operator mode that takes them."""
    from sglang_evict.patches import evict_requests

    for mode in ("clamp", "any"):
        server, _ = split_argv(["--evict-policy", "streaming", "--evict-budget", "64",
                                "--evict-overrides", mode])
        srv = server
        with pytest.raises(ValueError) as err:
            evict_requests.request_config({"sglang_evict": {field: value}}, srv)
        message = str(err.value)
        assert f"custom_params.sglang_evict.{field} must be" in message
        assert "--evict" not in message and "\n" not in message and len(message) < 200


def test_operator_switch_decides_what_a_client_may_change(monkeypatch):
    """none: no override at all; clamp (the default): budget, buffer, sinks, window and
    lookahead at most the server's own, any evicting policy, no opt-out; any: everything."""
    from sglang_evict.patches import evict_requests

    flags = ["--evict-policy", "streaming", "--evict-budget", "64", "--evict-buffer", "16",
             "--evict-sinks", "4", "--evict-window", "8"]
    default, _ = split_argv(flags)
    assert default.overrides == "clamp"
    srv = default
    big = {"budget": 4096, "buffer": 999, "sinks": 100, "window": 500}
    cfg = evict_requests.request_config({"sglang_evict": big}, srv)
    assert (cfg.budget, cfg.buffer, cfg.sinks, cfg.window) == (64, 16, 4, 8)
    small = evict_requests.request_config({"sglang_evict": {"budget": 8, "policy": "random"}}, srv)
    assert (small.budget, small.policy) == (8, "random")
    with pytest.raises(ValueError, match=r"policy: none \(no eviction\) is not allowed"):
        evict_requests.request_config({"sglang_evict": {"policy": "none"}}, srv)

    anything, _ = split_argv(flags + ["--evict-overrides", "any"])
    srv = anything
    cfg = evict_requests.request_config({"sglang_evict": big}, srv)
    assert (cfg.budget, cfg.buffer, cfg.sinks, cfg.window) == (4096, 999, 100, 500)
    assert evict_requests.request_config({"sglang_evict": {"policy": "none"}}, srv).policy == "none"

    closed, _ = split_argv(flags + ["--evict-overrides", "none"])
    srv = closed
    with pytest.raises(ValueError, match="takes no per-request eviction settings"):
        evict_requests.request_config({"sglang_evict": {"budget": 8}}, srv)
    assert evict_requests.request_config(None, srv) is None
    with pytest.raises(EvictConfigError, match="--evict-overrides must be one of"):
        split_argv(flags + ["--evict-overrides", "some"])


def test_reclaim_order_is_a_server_setting_checked_at_start_up():
    flags = ["--evict-policy", "streaming", "--evict-budget", "64"]
    assert split_argv(flags)[0].reclaim == "lru-first"
    assert split_argv(flags + ["--evict-reclaim", "tree-first"])[0].reclaim == "tree-first"
    with pytest.raises(EvictConfigError,
                       match="--evict-reclaim must be one of mixed, tree-first, lru-first"):
        split_argv(flags + ["--evict-reclaim", "lru"])
    with pytest.raises(EvictConfigError, match="--evict-reclaim without --evict-policy"):
        split_argv(["--evict-reclaim", "tree-first"])
    # not a client's to choose
    from sglang_evict.patches import evict_requests

    server, _ = split_argv(flags + ["--evict-overrides", "any"])
    with pytest.raises(ValueError, match="unknown field"):
        evict_requests.request_config({"sglang_evict": {"reclaim": "mixed"}}, server)


def test_evictors_of_distinct_overrides_stay_bounded(monkeypatch):
    """Thousands of distinct overrides, one request after another on the same rows: the
    override cache and the cache's evictor table stay bounded by what runs now."""
    from head_cache_sim import make_cache

    from sglang_evict.patches import evict_requests
    from sglang_evict.patches.runtime import Runtime

    server, _ = split_argv(["--evict-policy", "streaming", "--evict-budget", "4096",
                            "--evict-overrides", "any"])
    srv = server
    cache = make_cache(64, 2, 2, 4)
    rt = Runtime(server)
    rt.cache = cache
    rows = 3
    for i in range(1000):
        cfg = evict_requests.request_config({"sglang_evict": {"budget": 1 + i}}, srv)
        row = i % rows
        cache.release(row)  # the row's previous request finished
        cache.set_row_evictor(row, evict_requests._evictor_for(rt, cfg))
        assert cache.evictor_of(row).config.budget == 1 + i
    assert len(rt.request_evictors) <= evict_requests.EVICTOR_CACHE
    assert len(cache.evictors) <= rows + 1
