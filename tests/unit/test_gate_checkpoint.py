"""Gate checkpoints: the sglang-evict safetensors format (round trip and every error path) and
the importer for the authors' trimkv_weights.pth (synthetic files with their key names)."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sglang_evict.gates.checkpoint import (
    FORMAT_VERSION,
    HEADER_KEY,
    GateCheckpointError,
    load_gates,
    read_gate_header,
    save_gates,
)
from sglang_evict.gates.trimkv_import import (
    convert_trimkv_checkpoint,
    import_trimkv,
    import_trimkv_checkpoint,
)
from sglang_evict.gates.modules import GateConfig, RetentionGates, activation_fn, expected_tensor_shapes

D, L, H, G = 24, 3, 2, 16


def cfg(**kw) -> GateConfig:
    base = dict(
        hidden_size=D, num_layers=L, num_kv_heads=H, gate_hidden=G, architecture="LlamaForCausalLM"
    )
    base.update(kw)
    return GateConfig(**base)


def x_in(t: int = 6) -> torch.Tensor:
    return torch.randn(t, D, generator=torch.Generator().manual_seed(5))


def all_log_beta(gates: RetentionGates, x: torch.Tensor) -> torch.Tensor:
    return gates(torch.stack([x] * gates.config.num_layers))


def write_raw(path: Path, tensors: dict, header: dict | str | None) -> Path:
    """A safetensors file with arbitrary tensors and header (for the error paths)."""
    meta = None
    if header is not None:
        meta = {HEADER_KEY: header if isinstance(header, str) else json.dumps(header)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def good_header(c: GateConfig) -> dict:
    return {"format_version": FORMAT_VERSION, **c.to_dict(), "training": {}}


# ---------------------------------------------------------------------- round trip


@pytest.mark.parametrize("variant", ["mlp", "swiglu", "mlp3"])
@pytest.mark.parametrize("shared", [False, True])
def test_round_trip_equal_outputs(tmp_path, variant, shared):
    c = cfg(variant=variant, shared_projection=shared, budget=128, activation="gelu_pytorch_tanh")
    gates = RetentionGates(c, init_std=0.3, seed=11)
    path = save_gates(tmp_path / "g.safetensors", gates, extra={"steps": 10, "data": ["ruler"]})
    assert path == tmp_path / "g.safetensors"
    assert [p.name for p in tmp_path.iterdir()] == ["g.safetensors"]  # no temp file left
    loaded = load_gates(path, expect=cfg())
    assert loaded.config == c
    for k, v in gates.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    x = x_in()
    assert torch.equal(all_log_beta(gates, x), all_log_beta(loaded, x))
    header = read_gate_header(path)
    assert header.format_version == FORMAT_VERSION and header.config == c
    assert header.training == {"steps": 10, "data": ["ruler"]}
    if shared:
        assert loaded.final_projection(0)[0] is loaded.final_projection(L - 1)[0]


def test_header_contents(tmp_path):
    from safetensors import safe_open

    path = save_gates(tmp_path / "g.safetensors", RetentionGates(cfg(budget=64)))
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()[HEADER_KEY])
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert header == {
        "format_version": 1, "architecture": "LlamaForCausalLM", "hidden_size": D, "num_layers": L,
        "num_kv_heads": H, "gate_hidden": G, "activation": "silu", "variant": "mlp",
        "shared_projection": False, "bias_init": 10.0, "budget": 64, "training": {},
    }
    assert dtypes == {torch.float32}


def test_save_stores_float32_from_bf16_params_and_device(tmp_path):
    gates = RetentionGates(cfg(), init_std=0.3).to(torch.bfloat16)
    loaded = load_gates(save_gates(tmp_path / "g.safetensors", gates), device="cpu")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.equal(loaded.layers[0].w1.weight, gates.layers[0].w1.weight.float())


def test_save_rejects_non_json_extra(tmp_path):
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        save_gates(tmp_path / "g.safetensors", RetentionGates(cfg()), extra={"when": object()})
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        save_gates(tmp_path / "g.safetensors", RetentionGates(cfg()), extra={"loss": float("nan")})
    assert not list(tmp_path.iterdir())


def test_save_overwrites_atomically(tmp_path):
    path = tmp_path / "g.safetensors"
    save_gates(path, RetentionGates(cfg(), seed=1))
    save_gates(path, RetentionGates(cfg(), seed=2))
    second = RetentionGates(cfg(), seed=2).layers[0].w1.weight
    assert torch.equal(load_gates(path).layers[0].w1.weight, second)
    assert [p.name for p in tmp_path.iterdir()] == ["g.safetensors"]


# ---------------------------------------------------------------------- error paths


def test_missing_file(tmp_path):
    p = tmp_path / "nope.safetensors"
    msg = f"gate checkpoint {re.escape(str(p))} does not exist"
    with pytest.raises(GateCheckpointError, match=msg):
        load_gates(p)
    with pytest.raises(GateCheckpointError, match="is not a file"):
        load_gates(tmp_path)
    assert issubclass(GateCheckpointError, ValueError)


def test_truncated_file(tmp_path):
    path = save_gates(tmp_path / "g.safetensors", RetentionGates(cfg()))
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 1, 7, 0):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        msg = re.escape(f"{bad} is not a readable safetensors file (corrupt or truncated?)")
        with pytest.raises(GateCheckpointError, match=msg):
            load_gates(bad)


def test_random_bytes(tmp_path):
    bad = tmp_path / "random.safetensors"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(GateCheckpointError, match="not a readable safetensors file"):
        load_gates(bad)
    text = tmp_path / "text.safetensors"
    text.write_text("this is not a checkpoint at all")
    with pytest.raises(GateCheckpointError, match="not a readable safetensors file"):
        load_gates(text)


def test_torch_pickle_is_not_accepted(tmp_path):
    bad = tmp_path / "trimkv_weights.pth"
    torch.save({"a": torch.zeros(2)}, bad)
    with pytest.raises(GateCheckpointError, match="not a readable safetensors file"):
        load_gates(bad)


def test_missing_header_key(tmp_path):
    c = cfg()
    tensors = RetentionGates(c).state_dict()
    p = write_raw(tmp_path / "plain.safetensors", tensors, None)
    msg = f"has no '{HEADER_KEY}' header.*convert_trimkv_checkpoint"
    with pytest.raises(GateCheckpointError, match=msg):
        load_gates(p)
    save_file(dict(tensors), str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    with pytest.raises(GateCheckpointError, match=f"has no '{HEADER_KEY}' header"):
        load_gates(tmp_path / "other.safetensors")


def test_malformed_header_json(tmp_path):
    tensors = RetentionGates(cfg()).state_dict()
    p = write_raw(tmp_path / "g.safetensors", tensors, "{not json")
    with pytest.raises(GateCheckpointError, match="header is not valid JSON"):
        load_gates(p)
    p = write_raw(tmp_path / "g2.safetensors", tensors, "[1, 2]")
    with pytest.raises(GateCheckpointError, match="must be a JSON object, got list"):
        load_gates(p)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda h: h.pop("num_kv_heads"), r"header lacks field\(s\) num_kv_heads"),
        (lambda h: h.update(format_version=2),
         r"format_version 2, newer than this sglang-evict reads \(1\)"),
        (lambda h: h.update(format_version="1"), r"bad format_version '1'"),
        (lambda h: h.update(variant="rg2"), r"invalid header: GateConfig.variant must be one of"),
        (lambda h: h.update(activation="swoosh"),
         r"invalid header: unsupported gate activation 'swoosh'"),
        (lambda h: h.update(training=[1]), r"'training' must be an object"),
        (lambda h: h.update(colour="blue"), r"unknown header field\(s\) colour"),
    ],
)
def test_bad_header_fields(tmp_path, edit, match):
    c = cfg()
    header = good_header(c)
    edit(header)
    p = write_raw(tmp_path / "g.safetensors", RetentionGates(c).state_dict(), header)
    with pytest.raises(GateCheckpointError, match=match):
        load_gates(p)


@pytest.mark.parametrize(
    "served, message",
    [
        (dict(num_layers=30), "was made for 3 layers, the served model has 30"),
        (dict(num_kv_heads=8), "was made for 2 KV heads, the served model has 8"),
        (dict(hidden_size=576), "was made for hidden size 24, the served model has 576"),
        (dict(architecture="Qwen3ForCausalLM"),
         "was made for architecture LlamaForCausalLM, the served model is Qwen3ForCausalLM"),
    ],
)
def test_model_mismatch(tmp_path, served, message):
    path = save_gates(tmp_path / "g.safetensors", RetentionGates(cfg()))
    with pytest.raises(GateCheckpointError, match=re.escape(f"gate checkpoint {path} {message}")):
        load_gates(path, expect=cfg(**served))


def test_model_mismatch_lists_all_problems_and_architecture_none_is_lenient(tmp_path):
    path = save_gates(tmp_path / "g.safetensors", RetentionGates(cfg()))
    msg = ("made for 3 layers, the served model has 30; "
           "was made for 2 KV heads, the served model has 4$")
    with pytest.raises(GateCheckpointError, match=msg):
        load_gates(path, expect=cfg(num_layers=30, num_kv_heads=4))
    load_gates(path, expect=cfg(architecture=None))  # unknown architecture: not an error
    # The gate fields come from the checkpoint, not from `expect`.
    assert load_gates(path, expect=cfg(gate_hidden=512, activation="gelu")).config.gate_hidden == G


def test_model_mismatch_message_example(tmp_path):
    path = save_gates(tmp_path / "x.safetensors", RetentionGates(cfg(num_layers=24)))
    with pytest.raises(GateCheckpointError) as info:
        load_gates(path, expect=cfg(num_layers=30))
    want = f"gate checkpoint {path} was made for 24 layers, the served model has 30"
    assert str(info.value) == want


def test_missing_tensor(tmp_path):
    c = cfg()
    tensors = dict(RetentionGates(c).state_dict())
    del tensors["layers.1.w2.weight"]
    p = write_raw(tmp_path / "g.safetensors", tensors, good_header(c))
    msg = f"gate checkpoint {p}: missing tensor 'layers.1.w2.weight' (expected shape ({H}, {G}))"
    with pytest.raises(GateCheckpointError, match=re.escape(msg)):
        load_gates(p)


def test_unexpected_tensor(tmp_path):
    c = cfg()
    tensors = dict(RetentionGates(c).state_dict())
    tensors["layers.3.w1.weight"] = torch.zeros(G, D)
    tensors["shared.bias"] = torch.zeros(H)
    p = write_raw(tmp_path / "g.safetensors", tensors, good_header(c))
    msg = "unexpected tensor 'layers.3.w1.weight' (shape (16, 24)); unexpected tensor 'shared.bias'"
    with pytest.raises(GateCheckpointError, match=re.escape(msg)):
        load_gates(p)


def test_shape_mismatch_names_tensor_expected_and_found(tmp_path):
    c = cfg()
    tensors = dict(RetentionGates(c).state_dict())
    tensors["layers.2.w1.weight"] = torch.zeros(G, D + 1)
    tensors["layers.0.bias"] = torch.zeros(H, 1)
    p = write_raw(tmp_path / "g.safetensors", tensors, good_header(c))
    with pytest.raises(GateCheckpointError) as info:
        load_gates(p)
    msg = str(info.value)
    assert "tensor 'layers.2.w1.weight': expected shape (16, 24), found (16, 25)" in msg
    assert "tensor 'layers.0.bias': expected shape (2,), found (2, 1)" in msg
    assert msg.startswith(f"gate checkpoint {p}: ")


def test_header_says_shared_but_tensors_are_per_layer(tmp_path):
    per_layer = RetentionGates(cfg()).state_dict()
    p = write_raw(tmp_path / "g.safetensors", per_layer, good_header(cfg(shared_projection=True)))
    msg = "missing tensor 'shared.w2.weight'.*unexpected tensor 'layers.0.w2.weight'"
    with pytest.raises(GateCheckpointError, match=msg):
        load_gates(p)


def test_non_finite_and_integer_tensors(tmp_path):
    c = cfg()
    tensors = dict(RetentionGates(c).state_dict())
    tensors["layers.1.w1.bias"] = torch.full((G,), float("nan"))
    p = write_raw(tmp_path / "g.safetensors", tensors, good_header(c))
    with pytest.raises(GateCheckpointError, match="tensor 'layers.1.w1.bias' holds NaN or inf"):
        load_gates(p)
    tensors["layers.1.w1.bias"] = torch.zeros(G, dtype=torch.int32)
    p = write_raw(tmp_path / "g2.safetensors", tensors, good_header(c))
    msg = "tensor 'layers.1.w1.bias' has dtype torch.int32"
    with pytest.raises(GateCheckpointError, match=msg):
        load_gates(p)


def test_expected_shapes_cover_every_key_in_a_saved_file(tmp_path):
    from safetensors import safe_open

    for shared in (False, True):
        c = cfg(variant="mlp3", shared_projection=shared)
        path = save_gates(tmp_path / f"g{shared}.safetensors", RetentionGates(c))
        with safe_open(str(path), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert shapes == expected_tensor_shapes(c)


# ---------------------------------------------------------------------- the authors' format
#
# Their keys (see the gates.trimkv_format module docstring):
#   <prefix>layers.<i>.self_attn.retention_gate.{linear1.weight [I, d], linear1.bias [I],
#       linear2.weight [H, I], bias [H]}                                      ('rg')
#   + linear2 = [I, I] with bias, linear3.weight [H, I]                       ('rg10')
#   gate_proj.weight, up_proj.weight [I, 2 H hd], down_proj.weight [H, I]    ('rg3')


def trimkv_state(
    variant="rg", layers=L, d=D, h=H, i=G, prefix="model.", tied=False, seed=0, head_dim=4
):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.3).to(torch.bfloat16)

    state = {}
    def final_bias():
        return (torch.full((h,), 10.0) + rnd(h)).to(torch.bfloat16)

    shared = {"linear3.weight": rnd(h, i), "bias": final_bias()}
    for n in range(layers):
        p = f"{prefix}layers.{n}.self_attn.retention_gate."
        if variant == "rg3":
            state[p + "gate_proj.weight"] = rnd(i, 2 * h * head_dim)
            state[p + "up_proj.weight"] = rnd(i, 2 * h * head_dim)
            state[p + "down_proj.weight"] = rnd(h, i)
            state[p + "bias"] = rnd(h)
            continue
        d_in = 2 * h * head_dim if variant == "rg2" else d
        state[p + "linear1.weight"] = rnd(i, d_in)
        state[p + "linear1.bias"] = rnd(i)
        if variant == "rg10":
            state[p + "linear2.weight"] = rnd(i, i)
            state[p + "linear2.bias"] = rnd(i)
            if tied:  # the same tensor object under every layer, as torch.save keeps it
                state[p + "linear3.weight"] = shared["linear3.weight"]
                state[p + "bias"] = shared["bias"]
            else:
                state[p + "linear3.weight"] = rnd(h, i)
                state[p + "bias"] = final_bias()
        else:
            state[p + "linear2.weight"] = rnd(h, i)
            state[p + "bias"] = final_bias()
    return state


def their_log_beta(state, layer, x, variant="rg", prefix="model.", act="silu", final_layer=None):
    """Their forward, written out from their key names, in float64."""
    f = activation_fn(act)
    p = f"{prefix}layers.{layer}.self_attn.retention_gate."
    final_layer = layer if final_layer is None else final_layer
    q = f"{prefix}layers.{final_layer}.self_attn.retention_gate."
    s = {k: v.double() for k, v in state.items()}
    h = f(x.double() @ s[p + "linear1.weight"].T + s[p + "linear1.bias"])
    if variant == "rg10":
        h = f(h @ s[p + "linear2.weight"].T + s[p + "linear2.bias"])
        z = h @ s[q + "linear3.weight"].T + s[q + "bias"]
    else:
        z = h @ s[p + "linear2.weight"].T + s[p + "bias"]
    return F.logsigmoid(z)


def hf_dict(**kw):
    base = {
        "hidden_size": D, "num_hidden_layers": L, "num_attention_heads": 4,
        "num_key_value_heads": H, "hidden_act": "silu", "architectures": ["Qwen3ForCausalLM"],
    }
    base.update(kw)
    return base


def test_import_rg_matches_their_forward(tmp_path):
    state = trimkv_state("rg")
    path = tmp_path / "trimkv_weights.pth"
    torch.save(state, path)
    gates = import_trimkv_checkpoint(path, hf_dict())
    c = gates.config
    assert (c.variant, c.shared_projection, c.gate_hidden) == ("mlp", False, G)
    assert c.architecture == "Qwen3ForCausalLM"
    x = x_in()
    for layer in range(L):
        got = gates.forward_layer(layer, x).double()
        torch.testing.assert_close(got, their_log_beta(state, layer, x), rtol=1e-5, atol=1e-6)
    theirs = state["model.layers.1.self_attn.retention_gate.linear2.weight"]
    assert torch.equal(gates.layers[1].w2.weight, theirs.float())


def test_import_with_gate_config_and_convert_round_trip(tmp_path):
    state = trimkv_state("rg")
    src = tmp_path / "trimkv_weights.pth"
    torch.save(state, src)
    served = cfg(gate_hidden=512)  # gate_hidden comes from the file
    gates = import_trimkv_checkpoint(src, served, budget=512)
    assert gates.config == served.replace(gate_hidden=G, budget=512)
    dst = convert_trimkv_checkpoint(src, tmp_path / "out" / "gates.safetensors", served, budget=512)
    loaded = load_gates(dst, expect=served)
    x = x_in()
    assert torch.equal(all_log_beta(loaded, x), all_log_beta(gates, x))
    training = read_gate_header(dst).training
    assert training["trimkv_retention_gate"] == "rg" and training["trimkv_key_prefix"] == "model."
    assert training["source_path"] == str(src)


def test_import_folder_with_their_config_json(tmp_path):
    state = trimkv_state("rg10", tied=True)
    torch.save(state, tmp_path / "trimkv_weights.pth")
    their_config = hf_dict(
        architectures=["TrimKVQwen3ForCausalLM"], retention_gate="rg10",
        tie_retention_gate_layers=True, retention_gate_intermediate_size=G,
        retention_gate_bias_init=18.0, memory_size=128,
        base_model="Qwen/Qwen3-4B", trainable_params="retention_gate")
    (tmp_path / "config.json").write_text(json.dumps(their_config))
    result = import_trimkv(tmp_path)  # model config taken from the config.json
    c = result.gates.config
    assert (c.variant, c.shared_projection, c.budget, c.bias_init) == ("mlp3", True, 128, 18.0)
    assert c.architecture == "Qwen3ForCausalLM"  # their wrapper class name stripped
    assert result.source_variant == "rg10" and result.key_prefix == "model."
    sd = result.gates.state_dict()
    assert "shared.w2.weight" in sd and "layers.0.w2.weight" not in sd
    theirs = state["model.layers.2.self_attn.retention_gate.linear2.weight"]
    assert torch.equal(sd["layers.2.w_mid.weight"], theirs.float())
    x = x_in()
    for layer in range(L):
        torch.testing.assert_close(result.gates.forward_layer(layer, x).double(),
                                   their_log_beta(state, layer, x, "rg10"), rtol=1e-5, atol=1e-6)


def test_import_rg10_tied_inferred_from_identical_copies(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(trimkv_state("rg10", tied=True), path)
    result = import_trimkv(path, hf_dict())
    assert result.gates.config.shared_projection is True
    assert "identical" in result.notes[0]
    torch.save(trimkv_state("rg10", tied=False), path)
    result = import_trimkv(path, hf_dict())
    assert result.gates.config.shared_projection is False
    result = import_trimkv(path, hf_dict(), tie_layers=False)
    assert result.gates.config.shared_projection is False and not result.notes


def test_import_rg10_tied_flag_with_distinct_copies_uses_last_layer(tmp_path, caplog):
    state = trimkv_state("rg10", tied=False)
    path = tmp_path / "w.pth"
    torch.save(state, path)
    with caplog.at_level(logging.WARNING, logger="sglang_evict.gates.trimkv_import"):
        result = import_trimkv(path, hf_dict(retention_gate="rg10", tie_retention_gate_layers=True))
    assert result.gates.config.shared_projection is True
    assert "copies of linear3/bias differ" in caplog.text
    assert f"using layer {L - 1}'s copy" in caplog.text
    x = x_in()
    for layer in range(L):  # their loader leaves the last layer's copy in the shared tensor
        got = result.gates.forward_layer(layer, x).double()
        want = their_log_beta(state, layer, x, "rg10", final_layer=L - 1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    msg = "tie_retention_gate_layers is set but the per-layer copies of linear3/bias differ"
    with pytest.raises(GateCheckpointError, match=msg):
        import_trimkv(path, hf_dict(), tie_layers=True, untied_copies="error")


def test_import_multimodal_prefix_and_text_config(tmp_path):
    state = trimkv_state("rg10", tied=True, prefix="model.language_model.")
    path = tmp_path / "trimkv_weights.pth"
    torch.save(state, path)
    vl = {"architectures": ["TrimKVQwen3VLForConditionalGeneration"], "memory_size": 1024,
          "text_config": {**hf_dict(), "retention_gate": "rg10", "tie_retention_gate_layers": True}}
    result = import_trimkv(path, vl)
    assert result.key_prefix == "model.language_model."
    assert result.gates.config.architecture == "Qwen3VLForConditionalGeneration"
    assert result.gates.config.shared_projection and result.gates.config.budget == 1024


@pytest.mark.parametrize("variant, match", [
    ("rg3", re.escape("uses retention gate variant 'rg3' (a SwiGLU MLP on concat(post-RoPE K, V)), "
                      "which sglang-evict does not support")),
    ("rg2", re.escape("uses retention gate variant 'rg2' (an MLP on concat(post-RoPE K, V)), "
                      "which sglang-evict does not support")),
])
def test_import_unsupported_variants_named(tmp_path, variant, match):
    path = tmp_path / "w.pth"
    torch.save(trimkv_state(variant), path)
    with pytest.raises(GateCheckpointError, match=match):
        import_trimkv_checkpoint(path, hf_dict(retention_gate=variant))
    if variant == "rg3":  # recognised from its parameter names alone
        with pytest.raises(GateCheckpointError, match=match):
            import_trimkv_checkpoint(path, hf_dict())


def test_import_rg2_without_config_is_recognised_by_its_input_width(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(trimkv_state("rg2", head_dim=4), path)  # linear1 takes 2*H*hd = 16 inputs, d = 24
    msg = r"made for hidden size 16, the served model has 24 .*'rg2'"
    with pytest.raises(GateCheckpointError, match=msg):
        import_trimkv_checkpoint(path, hf_dict())


def test_import_unknown_variant_name(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(trimkv_state("rg"), path)
    with pytest.raises(GateCheckpointError, match="variant 'rg7'.*does not support"):
        import_trimkv_checkpoint(path, hf_dict(), retention_gate="rg7")
    msg = "config says retention_gate='rg10' but the tensors are those of 'rg'"
    with pytest.raises(GateCheckpointError, match=msg):
        import_trimkv_checkpoint(path, hf_dict(), retention_gate="rg10")


def test_import_wrong_layer_count(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(trimkv_state("rg", layers=24), path)
    msg = f"trimkv checkpoint {path} was made for 24 layers, the served model has 30"
    with pytest.raises(GateCheckpointError, match=re.escape(msg)):
        import_trimkv_checkpoint(path, hf_dict(num_hidden_layers=30))
    state = trimkv_state("rg", layers=L)
    for k in [k for k in state if ".layers.1." in k]:
        del state[k]
    torch.save(state, path)
    with pytest.raises(GateCheckpointError, match=r"missing layers \[1\]"):
        import_trimkv_checkpoint(path, hf_dict())


def test_import_wrong_kv_heads_and_hidden_size(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(trimkv_state("rg", h=8), path)
    msg = ("was made for 8 KV heads, the served model has 2 (tensor "
           "'model.layers.0.self_attn.retention_gate.linear2.weight' has shape (8, 16))")
    with pytest.raises(GateCheckpointError, match=re.escape(msg)):
        import_trimkv_checkpoint(path, hf_dict())
    torch.save(trimkv_state("rg10", d=32), path)
    msg = ("made for hidden size 32, the served model has 24 (tensor "
           "'model.layers.0.self_attn.retention_gate.linear1.weight': expected shape (16, 24), "
           "found (16, 32))")
    with pytest.raises(GateCheckpointError, match=re.escape(msg) + "$"):
        import_trimkv_checkpoint(path, hf_dict(retention_gate="rg10"))


def test_import_shape_mismatch_in_a_later_layer(tmp_path):
    state = trimkv_state("rg10")
    state["model.layers.2.self_attn.retention_gate.linear2.weight"] = torch.zeros(G, G + 1)
    path = tmp_path / "w.pth"
    torch.save(state, path)
    msg = ("tensor 'model.layers.2.self_attn.retention_gate.linear2.weight': "
           "expected shape (16, 16), found (16, 17)")
    with pytest.raises(GateCheckpointError, match=re.escape(msg)):
        import_trimkv_checkpoint(path, hf_dict())


def test_import_intermediate_size_mismatch_with_config(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(trimkv_state("rg"), path)
    msg = "retention_gate_intermediate_size=512, tensor .* has 16 rows"
    with pytest.raises(GateCheckpointError, match=msg):
        import_trimkv_checkpoint(path, hf_dict(retention_gate_intermediate_size=512))


def test_import_unexpected_and_missing_keys(tmp_path):
    state = trimkv_state("rg")
    state["model.layers.0.self_attn.rope_bias"] = torch.zeros(4)
    path = tmp_path / "w.pth"
    torch.save(state, path)
    msg = (r"unexpected tensor\(s\) that are not retention-gate parameters "
           r".*'model.layers.0.self_attn.rope_bias'")
    with pytest.raises(GateCheckpointError, match=msg):
        import_trimkv_checkpoint(path, hf_dict())
    state = trimkv_state("rg")
    del state["model.layers.1.self_attn.retention_gate.linear1.bias"]
    torch.save(state, path)
    msg = "layer 1 has different gate parameters than layer 0 (differing: ['linear1.bias'])"
    with pytest.raises(GateCheckpointError, match=re.escape(msg)):
        import_trimkv_checkpoint(path, hf_dict())
    state = trimkv_state("rg")
    state["model.layers.0.self_attn.retention_gate.extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(GateCheckpointError, match="unknown retention gate layout"):
        import_trimkv_checkpoint(path, hf_dict())


def test_import_bad_files(tmp_path):
    missing = tmp_path / "trimkv_weights.pth"
    msg = f"trimkv checkpoint {re.escape(str(missing))} does not exist"
    with pytest.raises(GateCheckpointError, match=msg):
        import_trimkv_checkpoint(missing, hf_dict())
    with pytest.raises(GateCheckpointError, match="does not exist"):
        import_trimkv_checkpoint(tmp_path, hf_dict())  # a folder without the weights
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(os.urandom(2048))
    with pytest.raises(GateCheckpointError, match="cannot be read by torch.load"):
        import_trimkv_checkpoint(corrupt, hf_dict())
    good = tmp_path / "good.pth"
    torch.save(trimkv_state("rg"), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(GateCheckpointError, match="cannot be read by torch.load"):
        import_trimkv_checkpoint(truncated, hf_dict())
    not_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_dict)
    with pytest.raises(GateCheckpointError, match="not a flat dict of name -> tensor"):
        import_trimkv_checkpoint(not_dict, hf_dict())
    with pytest.raises(GateCheckpointError, match="no model config given and no config.json"):
        import_trimkv_checkpoint(good)
    no_act = {k: v for k, v in hf_dict().items() if k != "hidden_act"}
    with pytest.raises(GateCheckpointError, match="cannot read the model config: .*'hidden_act'"):
        import_trimkv_checkpoint(good, no_act)
    nan = trimkv_state("rg")
    nan["model.layers.0.self_attn.retention_gate.bias"] = torch.tensor([float("inf"), 0.0])
    torch.save(nan, good)
    with pytest.raises(GateCheckpointError, match="holds NaN or inf"):
        import_trimkv_checkpoint(good, hf_dict())


def test_import_bad_config_json(tmp_path):
    torch.save(trimkv_state("rg"), tmp_path / "trimkv_weights.pth")
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(GateCheckpointError, match="config.json is not valid JSON"):
        import_trimkv_checkpoint(tmp_path, hf_dict())
