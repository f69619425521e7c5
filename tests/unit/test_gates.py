"""Retention gates: config validation, shapes and names, float32 math, init, shared projection,
and the retention scores against naive formulas."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_evict.gates.modules import (
    ACTIVATIONS,
    VARIANTS,
    GateConfig,
    RetentionGates,
    activation_fn,
    expected_tensor_shapes,
)
from sglang_evict.gates.retention import retention_log_alpha, retention_log_alpha_lookahead

LOGSIG10 = F.logsigmoid(torch.tensor(10.0, dtype=torch.float64)).item()  # ≈ -4.54e-5


def small_config(**kw) -> GateConfig:
    base = dict(hidden_size=24, num_layers=3, num_kv_heads=2, gate_hidden=16)
    base.update(kw)
    return GateConfig(**base)


# ---------------------------------------------------------------------- GateConfig


def test_config_defaults():
    c = GateConfig(hidden_size=576, num_layers=30, num_kv_heads=3)
    assert (c.gate_hidden, c.activation, c.variant) == (512, "silu", "mlp")
    assert c.shared_projection is False and c.bias_init == 10.0
    assert c.architecture is None and c.budget is None


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"hidden_size": 0}, r"hidden_size must be a positive integer"),
        ({"num_layers": -1}, r"num_layers must be a positive integer"),
        ({"num_kv_heads": 2.0}, r"num_kv_heads must be a positive integer"),
        ({"gate_hidden": True}, r"gate_hidden must be a positive integer"),
        ({"activation": "frobnicate"}, r"unsupported gate activation 'frobnicate'"),
        ({"variant": "rg2"}, r"variant must be one of mlp, swiglu, mlp3, got 'rg2'"),
        ({"shared_projection": 1}, r"shared_projection must be a bool"),
        ({"bias_init": float("nan")}, r"bias_init must be a finite number"),
        ({"architecture": ""}, r"architecture must be a non-empty string"),
        ({"budget": 0}, r"budget \(training budget M\) must be a positive integer"),
    ],
)
def test_config_validation(changes, match):
    with pytest.raises(ValueError, match=match):
        small_config(**changes)


def test_config_dict_round_trip_and_unknown_fields():
    c = small_config(
        variant="mlp3", shared_projection=True, architecture="LlamaForCausalLM", budget=64
    )
    assert GateConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown GateConfig field"):
        GateConfig.from_dict({**c.to_dict(), "colour": 1})
    with pytest.raises(ValueError, match="missing GateConfig field.*num_kv_heads"):
        GateConfig.from_dict({"hidden_size": 4, "num_layers": 1})


def test_from_hf_config_object():
    # Any object with HF config attributes works (a transformers LlamaConfig included; a
    # namespace keeps this test from importing transformers, which takes ~20 s here).
    hf = SimpleNamespace(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, hidden_act="silu", architectures=["LlamaForCausalLM"],
    )
    c = GateConfig.from_hf_config(hf, budget=128)
    assert (c.hidden_size, c.num_layers, c.num_kv_heads) == (576, 30, 3)
    assert c.activation == "silu" and c.architecture == "LlamaForCausalLM" and c.budget == 128


def test_from_hf_config_dict_fallbacks_and_text_config():
    no_gqa = {
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_act": "gelu"
    }
    c = GateConfig.from_hf_config(no_gqa)
    assert c.num_kv_heads == 4 and c.architecture is None and c.activation == "gelu"
    vl = {"architectures": ["Qwen3VLForConditionalGeneration"], "text_config": {
        "hidden_size": 32, "num_hidden_layers": 5, "num_key_value_heads": 2, "hidden_act": "silu"}}
    c = GateConfig.from_hf_config(vl)
    assert (c.hidden_size, c.num_layers, c.num_kv_heads) == (32, 5, 2)
    assert c.architecture == "Qwen3VLForConditionalGeneration"
    with pytest.raises(ValueError, match="no 'hidden_act'"):
        GateConfig.from_hf_config(
            {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1}
        )
    c = GateConfig.from_hf_config(
        {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1}, activation="relu")
    assert c.activation == "relu"


def _tanh_gelu(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


# The formulas behind transformers.activations.ACT2FN (importing transformers takes ~20 s here).
HF_FORMULAS = {
    "silu": lambda x: x * torch.sigmoid(x),
    "swish": lambda x: x * torch.sigmoid(x),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "gelu_new": _tanh_gelu,
    "gelu_pytorch_tanh": _tanh_gelu,
    "gelu_fast": _tanh_gelu,
    "gelu_accurate": _tanh_gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": lambda x: x.clamp(min=0),
    "relu2": lambda x: x.clamp(min=0) ** 2,
    "relu6": lambda x: x.clamp(0, 6),
    "sigmoid": lambda x: 1 / (1 + torch.exp(-x)),
    "tanh": lambda x: torch.tanh(x),
    "mish": lambda x: x * torch.tanh(torch.log1p(torch.exp(x))),
}


def test_activations_match_hf_formulas():
    assert set(HF_FORMULAS) == set(ACTIVATIONS)
    x = torch.linspace(-6, 8, 141, dtype=torch.float64)
    for name, formula in HF_FORMULAS.items():
        torch.testing.assert_close(activation_fn(name)(x), formula(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="unsupported gate activation 'nope'; supported: .*silu"):
        activation_fn("nope")


# ---------------------------------------------------------------------- module


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shared", [False, True])
def test_parameter_names_and_shapes(variant, shared):
    c = small_config(variant=variant, shared_projection=shared)
    gates = RetentionGates(c)
    got = {k: tuple(v.shape) for k, v in gates.state_dict().items()}
    assert got == expected_tensor_shapes(c)
    if shared:
        assert got["shared.w2.weight"] == (2, 16) and got["shared.bias"] == (2,)
        per_layer_final = [k for k in got if re.fullmatch(r"layers\.\d+\.(w2\.weight|bias)", k)]
        assert per_layer_final == []
    else:
        for i in range(3):
            assert got[f"layers.{i}.w2.weight"] == (2, 16) and got[f"layers.{i}.bias"] == (2,)


def test_stable_key_names_mlp():
    gates = RetentionGates(small_config(num_layers=2))
    assert sorted(gates.state_dict()) == sorted([
        "layers.0.w1.weight", "layers.0.w1.bias", "layers.0.w2.weight", "layers.0.bias",
        "layers.1.w1.weight", "layers.1.w1.bias", "layers.1.w2.weight", "layers.1.bias",
    ])


@pytest.mark.parametrize("variant", VARIANTS)
def test_init_log_beta_near_logsigmoid_10(variant):
    c = small_config(hidden_size=64, gate_hidden=512, variant=variant)
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(1))
    gates = RetentionGates(c)
    for layer in range(c.num_layers):
        lb = gates.forward_layer(layer, x)
        assert lb.shape == (7, 2) and lb.dtype == torch.float32
        # Within z = 10 ± 0.5: nothing decays noticeably.
        assert bool((lb < F.logsigmoid(torch.tensor(10.5))).all())
        assert bool((lb > F.logsigmoid(torch.tensor(9.5))).all())
    exact = RetentionGates(c, init_std=0.0).forward_layer(0, x)
    torch.testing.assert_close(exact, torch.full((7, 2), LOGSIG10, dtype=torch.float32))
    # Biases: the final one is bias_init, first-stage ones are zero.
    sd = gates.state_dict()
    assert torch.equal(sd["layers.0.bias"], torch.full((2,), 10.0))
    first = "layers.0.w_gate.bias" if variant == "swiglu" else "layers.0.w1.bias"
    assert torch.equal(sd[first], torch.zeros(512))


def test_bias_init_respected():
    gates = RetentionGates(small_config(bias_init=18.0, shared_projection=True), init_std=0.0)
    assert torch.equal(gates.shared.bias.detach(), torch.full((2,), 18.0))
    lb = gates.forward_layer(2, torch.randn(3, 24))
    torch.testing.assert_close(lb, F.logsigmoid(torch.full((3, 2), 18.0)))
    assert bool((lb < 0).all())  # logsigmoid keeps -exp(-18), log(sigmoid) would give 0


def test_deterministic_init():
    c = small_config(variant="mlp3")
    a, b = RetentionGates(c, seed=3), RetentionGates(c, seed=3)
    gen = RetentionGates(c, generator=torch.Generator().manual_seed(3))
    other = RetentionGates(c, seed=4)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]) and torch.equal(v, gen.state_dict()[k])
    key = "layers.0.w1.weight"
    assert not torch.equal(a.state_dict()[key], other.state_dict()[key])
    with pytest.raises(ValueError, match="either seed or generator"):
        RetentionGates(c, seed=1, generator=torch.Generator())


def reference_log_beta(gates: RetentionGates, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The gate equation written out in float64 from the state dict."""
    c, sd = gates.config, {k: v.double() for k, v in gates.state_dict().items()}
    act = activation_fn(c.activation)
    x = x.double()
    p = f"layers.{layer}."
    if c.variant == "swiglu":
        h = act(x @ sd[p + "w_gate.weight"].T + sd[p + "w_gate.bias"]) * (
            x @ sd[p + "w_up.weight"].T + sd[p + "w_up.bias"])
    else:
        h = act(x @ sd[p + "w1.weight"].T + sd[p + "w1.bias"])
    if c.variant == "mlp3":
        h = act(h @ sd[p + "w_mid.weight"].T + sd[p + "w_mid.bias"])
    q = "shared." if c.shared_projection else p
    z = h @ sd[q + "w2.weight"].T + sd[q + "bias"]
    return F.logsigmoid(z)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shared", [False, True])
def test_forward_matches_equation(variant, shared):
    c = small_config(
        variant=variant, shared_projection=shared, activation="gelu_pytorch_tanh", bias_init=2.0
    )
    gates = RetentionGates(c, init_std=0.5, seed=7)
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(2))
    for layer in range(3):
        out = gates.forward_layer(layer, x)
        want = reference_log_beta(gates, layer, x)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    stacked = gates(torch.stack([x, x * 2, x * 3]))
    assert stacked.shape == (3, 5, 2) and stacked.dtype == torch.float32
    torch.testing.assert_close(stacked[1], gates.forward_layer(1, x * 2))
    torch.testing.assert_close(gates([x, x * 2, x * 3]), stacked)
    with pytest.raises(ValueError, match="inputs for 2 layers, the gates have 3"):
        gates([x, x])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_output_for_low_precision_input_and_params(dtype):
    c = small_config()
    gates = RetentionGates(c, init_std=0.3)
    x = torch.randn(6, 24).to(dtype)
    out = gates.forward_layer(0, x)
    assert out.dtype == torch.float32
    want = reference_log_beta(gates, 0, x.float())
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    # Low-precision parameters are upcast inside; the result is still float32.
    low = RetentionGates(c, init_std=0.3).to(dtype)
    out_low = low.forward_layer(0, x)
    assert out_low.dtype == torch.float32
    want_low = reference_log_beta(low, 0, x.float())
    torch.testing.assert_close(out_low.double(), want_low, rtol=1e-5, atol=1e-6)
    # Near bias 10 a bf16 result could not even tell β apart from 1 at the score's scale.
    assert bool((gates.forward_layer(0, x) < 0).all())


def test_forward_layer_input_checks():
    gates = RetentionGates(small_config())
    with pytest.raises(IndexError, match=r"layer_id 3 out of range \[0, 3\)"):
        gates.forward_layer(3, torch.zeros(1, 24))
    with pytest.raises(ValueError, match="last dimension 25, expected hidden_size 24"):
        gates.forward_layer(0, torch.zeros(1, 25))
    with pytest.raises(TypeError, match="floating-point"):
        gates.forward_layer(0, torch.zeros(1, 24, dtype=torch.long))
    # Batched leading dimensions work too.
    assert gates.forward_layer(0, torch.zeros(2, 3, 24)).shape == (2, 3, 2)


def test_shared_projection_is_one_parameter_and_gets_every_layers_gradient():
    c = small_config(num_layers=4, shared_projection=True)
    gates = RetentionGates(c, init_std=0.2)
    w2s = {id(gates.final_projection(i)[0].weight) for i in range(4)}
    bs = {id(gates.final_projection(i)[1]) for i in range(4)}
    assert len(w2s) == 1 and len(bs) == 1
    assert sum(1 for n, _ in gates.named_parameters() if "w2" in n) == 1
    x = torch.randn(5, 24)
    grads = []
    for layer in range(4):
        gates.zero_grad()
        gates.forward_layer(layer, x).sum().backward()
        grads.append(gates.shared.w2.weight.grad.clone())
        assert gates.shared.bias.grad is not None and bool(gates.shared.bias.grad.abs().sum() > 0)
        assert bool(grads[-1].abs().sum() > 0)
        # Only this layer's first stage received gradient.
        for other in range(4):
            g = gates.layers[other].w1.weight.grad
            assert (g is not None and bool(g.abs().sum() > 0)) == (other == layer)
    # Gradient through all layers at once is the sum of the per-layer ones.
    gates.zero_grad()
    gates(torch.stack([x] * 4)).sum().backward()
    torch.testing.assert_close(gates.shared.w2.weight.grad, sum(grads))


def test_per_layer_projection_is_separate():
    gates = RetentionGates(small_config(num_layers=2))
    assert gates.final_projection(0)[0] is not gates.final_projection(1)[0]
    assert gates.shared is None


# ---------------------------------------------------------------------- scores


def test_retention_log_alpha_matches_naive():
    g = torch.Generator().manual_seed(0)
    log_beta = F.logsigmoid(torch.randn(4, 50, generator=g) * 2 + 3)
    pos = torch.randint(0, 100, (4, 50), generator=g)
    t = 100  # small enough that the naive β^age does not underflow
    got = retention_log_alpha(log_beta, pos, t)
    assert got.dtype == torch.float32
    naive = torch.log(torch.exp(log_beta.double()) ** (t - pos).double())
    torch.testing.assert_close(got.double(), naive, rtol=1e-5, atol=1e-5)
    # The newest entry scores 0 (alpha = 1); tensor seq_len broadcasts per row.
    assert retention_log_alpha(log_beta[:, :1], 7, 7).abs().max() == 0
    per_row = retention_log_alpha(log_beta, pos, torch.full((4, 1), t))
    torch.testing.assert_close(per_row, got)


def naive_lookahead(log_beta: float, pos: int, t: int, n: int) -> float:
    """log Σ_{k=1..n} β^(t+k-pos), term by term in float64 (log-sum-exp against underflow)."""
    terms = torch.tensor([(t + k - pos) * log_beta for k in range(1, n + 1)], dtype=torch.float64)
    return torch.logsumexp(terms, 0).item()


def test_lookahead_matches_naive_sum():
    g = torch.Generator().manual_seed(1)
    log_beta = -torch.exp(torch.empty(300).uniform_(-12, 2, generator=g))  # -6e-6 .. -7.4
    pos = torch.randint(0, 200, (300,), generator=g)
    t = 256
    for n in (1, 2, 8, 128):
        got = retention_log_alpha_lookahead(log_beta, pos, t, n)
        assert got.dtype == torch.float32
        pairs = zip(log_beta.double().tolist(), pos.tolist())
        want = torch.tensor([naive_lookahead(lb, p, t, n) for lb, p in pairs], dtype=torch.float64)
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


def test_lookahead_closed_form_is_the_method_formula():
    # (t + 1 - pos) log β + log(1 - β^n) - log(1 - β), for β far from 1.
    lb = torch.tensor([-0.1, -1.0, -5.0], dtype=torch.float64)
    want = (10 + 1 - 3) * lb + torch.log(1 - torch.exp(lb) ** 4) - torch.log(1 - torch.exp(lb))
    got = retention_log_alpha_lookahead(lb.float(), 3, 10, 4)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_lookahead_beta_to_one_limit():
    n = 16
    exact_one = retention_log_alpha_lookahead(torch.zeros(3), torch.tensor([0, 5, 9]), 9, n)
    torch.testing.assert_close(exact_one, torch.full((3,), math.log(n)))
    # Continuous across the switch between series and closed form.
    lbs = torch.tensor([-1e-12, -1e-9, -1e-6, -6.2e-5, -6.3e-5, -1e-4, -1e-3])
    got = retention_log_alpha_lookahead(lbs, 0, 0, n)
    naive = [naive_lookahead(x, 0, 0, n) for x in lbs.double().tolist()]
    want = torch.tensor(naive, dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=2e-6)
    assert bool(torch.isfinite(got).all())
    with pytest.raises(ValueError, match="lookahead must be a positive integer"):
        retention_log_alpha_lookahead(lbs, 0, 0, 0)


def test_lookahead_one_is_plain_score_one_step_later():
    lb = F.logsigmoid(torch.randn(20))
    pos = torch.arange(20)
    got = retention_log_alpha_lookahead(lb, pos, 30, 1)
    torch.testing.assert_close(got, retention_log_alpha(lb, pos, 31))


@settings(max_examples=60, deadline=None)
@given(
    z=st.floats(min_value=-8.0, max_value=30.0),
    age=st.integers(min_value=0, max_value=5000),
    n=st.integers(min_value=1, max_value=512),
)
def test_lookahead_property(z, age, n):
    lb = F.logsigmoid(torch.tensor([z], dtype=torch.float64)).float()
    got = retention_log_alpha_lookahead(lb, 0, age, n).item()
    want = naive_lookahead(lb.double().item(), 0, age, n)
    assert math.isfinite(got)
    assert abs(got - want) <= 1e-4 * max(1.0, abs(want))
