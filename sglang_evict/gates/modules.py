"""Retention gates (TrimKV / DBTrimKV) and the retention score of a cached entry.

One gate per decoder layer reads the normalised hidden state x_t that enters attention (after
the input layernorm) and gives one retention value per KV head (per GQA group):

    z_t       = W2 · f(x_t) + b            (b: a separate bias, initialised to +10)
    log β_t   = logsigmoid(z_t)            β in (0, 1); starts near 1, so nothing decays

where the first stage f depends on `GateConfig.variant`:

    "mlp"     f(x) = act(W1 x + b1)                          (the paper's gate; authors' 'rg')
    "swiglu"  f(x) = act(Wg x + bg) * (Wu x + bu)
    "mlp3"    f(x) = act(Wm act(W1 x + b1) + bm)             (authors' 'rg10', the DBTrimKV gate)

`act` is the served model's `hidden_act`. With `shared_projection` (DBTrimKV) one W2 and one b
serve every layer, so the scores of all layers and heads live on one scale and can compete for
one budget.

The gate math always runs in float32, whatever the dtype of the input or of the parameters:
log β is stored once per cached entry and multiplied by ages of up to ~1e5 tokens, so a bf16
rounding of log β (3 significant digits) would reorder entries.

Parameter names are the checkpoint keys (see `checkpoint`), so they are part of the
on-disk format and must not change:

    first stage, layer i    mlp, mlp3   layers.{i}.w1.weight [G, d]      layers.{i}.w1.bias [G]
                            swiglu      layers.{i}.w_gate.weight [G, d]  layers.{i}.w_gate.bias [G]
                                        layers.{i}.w_up.weight [G, d]    layers.{i}.w_up.bias [G]
                            mlp3        layers.{i}.w_mid.weight [G, G]   layers.{i}.w_mid.bias [G]
    final projection        per layer   layers.{i}.w2.weight [H, G]      layers.{i}.bias [H]
                            shared      shared.w2.weight [H, G]          shared.bias [H]

with d = hidden_size, G = gate_hidden, H = num_kv_heads.

Score of a cached entry (METHOD.md): for token i at position pos_i, when the sequence has t
tokens, log α = (t - pos_i) · log β_i (α = β^(t - pos_i), geometric retention); see
`retention.py`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS: tuple[str, ...] = ("mlp", "swiglu", "mlp3")


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


# Names as Hugging Face configs spell `hidden_act` (transformers.activations.ACT2FN); several
# HF names are the same function written differently (the tanh approximations of GELU).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "relu2": _relu2,
    "relu6": F.relu6,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "mish": F.mish,
}


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The torch function for a `hidden_act` name; ValueError for a name not supported."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unsupported gate activation {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}"
        ) from None


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class GateConfig:
    """Shape and kind of the retention gates of one model.

    hidden_size, num_layers, num_kv_heads describe the served model and are checked against it
    when a checkpoint is loaded; gate_hidden, activation, variant, shared_projection and
    bias_init describe the gates; architecture (e.g. "LlamaForCausalLM") and budget (the
    training budget M, per (layer, head)) are metadata kept for checking and reporting.
    """

    hidden_size: int
    num_layers: int
    num_kv_heads: int
    gate_hidden: int = 512
    activation: str = "silu"
    variant: str = "mlp"
    shared_projection: bool = False
    bias_init: float = 10.0
    architecture: str | None = None
    budget: int | None = None

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_kv_heads", "gate_hidden"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"GateConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.activation, str):
            raise ValueError(f"GateConfig.activation must be a string, got {self.activation!r}")
        activation_fn(self.activation)
        if self.variant not in VARIANTS:
            raise ValueError(
                f"GateConfig.variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}"
            )
        if not isinstance(self.shared_projection, bool):
            raise ValueError(
                f"GateConfig.shared_projection must be a bool, got {self.shared_projection!r}"
            )
        if (
            isinstance(self.bias_init, bool)
            or not isinstance(self.bias_init, (int, float))
            or not math.isfinite(self.bias_init)
        ):
            raise ValueError(
                f"GateConfig.bias_init must be a finite number, got {self.bias_init!r}"
            )
        if self.architecture is not None and (
            not isinstance(self.architecture, str) or not self.architecture
        ):
            raise ValueError(
                f"GateConfig.architecture must be a non-empty string or None, "
                f"got {self.architecture!r}"
            )
        if self.budget is not None and (not _is_int(self.budget) or self.budget < 1):
            raise ValueError(
                f"GateConfig.budget (training budget M) must be a positive integer or None, "
                f"got {self.budget!r}"
            )

    def replace(self, **changes: Any) -> GateConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateConfig:
        """Inverse of `to_dict`; unknown keys are a ValueError (a typo must not pass silently)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown GateConfig field(s): {', '.join(unknown)}")
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise ValueError(f"missing GateConfig field(s): {', '.join(missing)}")
        return cls(**dict(data))

    @classmethod
    def from_hf_config(cls, hf_config: Any, **overrides: Any) -> GateConfig:
        """Read the model's dimensions from a Hugging Face config (object or dict).

        Uses hidden_size, num_hidden_layers, num_key_value_heads (falling back to
        num_attention_heads: a model without GQA has one KV head per query head), hidden_act
        and architectures[0]. Multimodal configs keep the language model under `text_config`;
        the dimensions are read from there. `overrides` set any GateConfig field directly.
        """
        top = hf_config
        text = _cfg_get(top, "text_config")
        src = text if text is not None and _cfg_get(top, "hidden_size") is None else top

        def need(name: str, *fallbacks: str) -> Any:
            for key in (name, *fallbacks):
                value = _cfg_get(src, key)
                if value is not None:
                    return value
            raise ValueError(f"the model config has no {name!r}; pass {name} in overrides")

        values: dict[str, Any] = {}
        if "hidden_size" not in overrides:
            values["hidden_size"] = need("hidden_size")
        if "num_layers" not in overrides:
            values["num_layers"] = need("num_hidden_layers")
        if "num_kv_heads" not in overrides:
            values["num_kv_heads"] = need("num_key_value_heads", "num_attention_heads")
        if "activation" not in overrides:
            values["activation"] = need("hidden_act")
        if "architecture" not in overrides:
            archs = _cfg_get(top, "architectures") or _cfg_get(src, "architectures")
            values["architecture"] = archs[0] if archs else None
        values.update(overrides)
        return cls(**values)


def _cfg_get(cfg: Any, name: str) -> Any:
    if cfg is None:
        return None
    if isinstance(cfg, Mapping):
        return cfg.get(name)
    return getattr(cfg, name, None)


def expected_tensor_shapes(config: GateConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of `RetentionGates(config)` by name, with its shape (the checkpoint
    contract, computed without building the module)."""
    d, g, h = config.hidden_size, config.gate_hidden, config.num_kv_heads
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(config.num_layers):
        p = f"layers.{i}."
        if config.variant == "swiglu":
            shapes[p + "w_gate.weight"] = (g, d)
            shapes[p + "w_gate.bias"] = (g,)
            shapes[p + "w_up.weight"] = (g, d)
            shapes[p + "w_up.bias"] = (g,)
        else:
            shapes[p + "w1.weight"] = (g, d)
            shapes[p + "w1.bias"] = (g,)
        if config.variant == "mlp3":
            shapes[p + "w_mid.weight"] = (g, g)
            shapes[p + "w_mid.bias"] = (g,)
        if not config.shared_projection:
            shapes[p + "w2.weight"] = (h, g)
            shapes[p + "bias"] = (h,)
    if config.shared_projection:
        shapes["shared.w2.weight"] = (h, g)
        shapes["shared.bias"] = (h,)
    return shapes


class FinalProjection(nn.Module):
    """z = W2 · h + b: W2 without bias, b a separate per-head bias (so b can be shared and
    initialised to +10 on its own)."""

    def __init__(self, gate_hidden: int, num_kv_heads: int) -> None:
        super().__init__()
        self.w2 = nn.Linear(gate_hidden, num_kv_heads, bias=False)
        self.bias = nn.Parameter(torch.empty(num_kv_heads))


class LayerGate(nn.Module):
    """First stage of one layer's gate (x -> h, [.., d] -> [.., G]), plus that layer's own final
    projection (`w2`, `bias`) unless the projection is shared."""

    def __init__(self, config: GateConfig) -> None:
        super().__init__()
        d, g = config.hidden_size, config.gate_hidden
        if config.variant == "swiglu":
            self.w_gate = nn.Linear(d, g, bias=True)
            self.w_up = nn.Linear(d, g, bias=True)
        else:
            self.w1 = nn.Linear(d, g, bias=True)
        if config.variant == "mlp3":
            self.w_mid = nn.Linear(g, g, bias=True)
        if not config.shared_projection:
            self.w2 = nn.Linear(g, config.num_kv_heads, bias=False)
            self.bias = nn.Parameter(torch.empty(config.num_kv_heads))


# The separate final bias b (per layer or shared), as opposed to the first-stage biases.
_FINAL_BIAS = re.compile(r"shared\.bias|layers\.\d+\.bias")


def _linear32(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    bias = layer.bias.float() if layer.bias is not None else None
    return F.linear(x, layer.weight.float(), bias)


class RetentionGates(nn.Module):
    """The retention gates of all decoder layers of one model.

    `forward_layer(layer_id, x)` maps the attention input of one layer, x [T, d] (any float
    dtype), to log β [T, num_kv_heads] in float32. Parameters are created in float32; keep
    them there (a `.to(bfloat16)` works but loses precision the float32 math cannot recover).

    Initialisation is deterministic: weights ~ N(0, init_std²) drawn from `generator` (or a
    generator seeded with `seed`, default 0), first-stage biases 0, b = bias_init. With the
    default init_std=0.02 (the authors' initializer_range) z stays within a few tenths of
    bias_init, so log β ≈ logsigmoid(10) ≈ -4.5e-5 at the start; init_std=0 gives exactly that.
    """

    def __init__(
        self,
        config: GateConfig,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        init_std: float = 0.02,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, GateConfig):
            raise TypeError(f"RetentionGates needs a GateConfig, got {type(config).__name__}")
        if seed is not None and generator is not None:
            raise ValueError("pass either seed or generator, not both")
        if not init_std >= 0.0:
            raise ValueError(f"init_std must be >= 0, got {init_std!r}")
        self.config = config
        self._act = activation_fn(config.activation)
        self.layers = nn.ModuleList(LayerGate(config) for _ in range(config.num_layers))
        self.shared: FinalProjection | None = (
            FinalProjection(config.gate_hidden, config.num_kv_heads)
            if config.shared_projection
            else None
        )
        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else seed)
        self.reset_parameters(generator, init_std)
        if device is not None:
            self.to(device)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator, init_std: float = 0.02) -> None:
        # Drawn on the CPU in a fixed order (the order of named_parameters) so that the same
        # seed gives the same gates on every device.
        for name, param in self.named_parameters():
            if name.endswith(".weight"):
                values = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                param.copy_(values * init_std)
            elif _FINAL_BIAS.fullmatch(name):
                param.fill_(self.config.bias_init)
            else:  # first-stage biases
                param.zero_()

    # ------------------------------------------------------------------ forward

    def final_projection(self, layer_id: int) -> tuple[nn.Linear, nn.Parameter]:
        """(W2, b) used by layer `layer_id`: the shared pair, or the layer's own."""
        owner = self.shared if self.shared is not None else self.layers[layer_id]
        return owner.w2, owner.bias

    def hidden_features(self, layer_id: int, x: torch.Tensor) -> torch.Tensor:
        """First stage f(x) of layer `layer_id` in float32, [..., d] -> [..., G]."""
        gate = self.layers[layer_id]
        x32 = x.float()
        act = self._act
        variant = self.config.variant
        if variant == "swiglu":
            return act(_linear32(x32, gate.w_gate)) * _linear32(x32, gate.w_up)
        h = act(_linear32(x32, gate.w1))
        if variant == "mlp3":
            h = act(_linear32(h, gate.w_mid))
        return h

    def forward_layer(self, layer_id: int, x: torch.Tensor) -> torch.Tensor:
        """log β = logsigmoid(W2 · f(x) + b) for layer `layer_id`.

        x: [T, hidden_size] (or any [..., hidden_size]), any float dtype.
        Returns float32 [T, num_kv_heads] (resp. [..., num_kv_heads]), every value < 0.
        """
        if not 0 <= layer_id < self.config.num_layers:
            raise IndexError(f"layer_id {layer_id} out of range [0, {self.config.num_layers})")
        if x.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"gate input has last dimension {x.shape[-1]}, expected hidden_size "
                f"{self.config.hidden_size}"
            )
        if not x.is_floating_point():
            raise TypeError(f"gate input must be a floating-point tensor, got {x.dtype}")
        w2, b = self.final_projection(layer_id)
        z = F.linear(self.hidden_features(layer_id, x), w2.weight.float()) + b.float()
        # logsigmoid(z) = -softplus(-z), not log(sigmoid): sigmoid(z) rounds to 1 for z > ~17 in
        # float32 and the log would be exactly 0 (no decay at all); softplus keeps -exp(-z)
        # (log1p). Not F.logsigmoid: on CPU it opens an OpenMP region even for a decode step's
        # few values, about 7% of a served step with two threads (py-spy); softplus does not.
        return -F.softplus(-z)

    def forward(self, x_all: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """log β of every layer: x_all [L, T, d] (or a sequence of L tensors [T, d]) ->
        float32 [L, T, num_kv_heads]."""
        n = len(x_all)
        if n != self.config.num_layers:
            raise ValueError(f"got inputs for {n} layers, the gates have {self.config.num_layers}")
        return torch.stack([self.forward_layer(i, x_all[i]) for i in range(n)])

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"variant={c.variant}, layers={c.num_layers}, d={c.hidden_size}, G={c.gate_hidden}, "
            f"kv_heads={c.num_kv_heads}, act={c.activation}, "
            f"shared_projection={c.shared_projection}"
        )
