"""Import of the authors' gate checkpoints (`trimkv_weights.pth`, format: trimkv_format.py) into
`RetentionGates`, step by step, and their conversion into the sglang-evict format (checkpoint.py).

Mapping onto `RetentionGates`: 'rg' -> variant "mlp" (linear1 -> w1, linear2 -> w2, bias ->
bias); 'rg10' -> variant "mlp3" (linear1 -> w1, linear2 -> w_mid, linear3 -> w2, bias -> bias;
tied -> shared.w2 / shared.bias). 'rg2', 'rg3' and any other variant raise GateCheckpointError
naming it: their gates read K and V, which the serving path does not feed to the gate.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from sglang_evict.gates.checkpoint import (
    GateCheckpointError,
    _check_tensors,
    _check_values,
    save_gates,
)
from sglang_evict.gates.modules import GateConfig, RetentionGates
from sglang_evict.gates.trimkv_format import (
    _TRIMKV_PARAMS,
    _TRIMKV_SUPPORTED,
    TRIMKV_WEIGHTS_FILE,
    _Found,
    _group_by_layer,
    _locate,
    _model_config,
    _read_trimkv_state,
    _trimkv_fields,
    _unsupported,
)

logger = logging.getLogger(__name__)

class TrimKVImport(NamedTuple):
    gates: RetentionGates
    source_variant: str  # the authors' name: 'rg' or 'rg10'
    key_prefix: str  # e.g. "model." or "model.language_model."
    notes: tuple[str, ...]  # what the import decided (tied copies, inferred fields)


def import_trimkv(
    path: str | os.PathLike[str],
    model_config: Any = None,
    *,
    retention_gate: str | None = None,
    tie_layers: bool | None = None,
    budget: int | None = None,
    untied_copies: str = "last",
) -> TrimKVImport:
    """Import the authors' `trimkv_weights.pth` into `RetentionGates`, with a report.

    path: the .pth file, or the folder holding it (then its config.json, the TrimKV config, is
        read for the gate variant, the tie flag, the intermediate size and M).
    model_config: the served model: a GateConfig, or a Hugging Face config (object or the dict
        of a config.json). None: use the config.json beside the weights.
    retention_gate / tie_layers / budget: override what config.json says (their names:
        retention_gate in {'rg', 'rg10', ...}, tie_retention_gate_layers, memory_size).
    untied_copies: for tied 'rg10' gates whose per-layer copies in the file differ: "last"
        uses the last layer's copy (what their loader ends up with, see the module docstring)
        and logs a warning; "error" raises.
    """
    if untied_copies not in ("last", "error"):
        raise ValueError(f"untied_copies must be 'last' or 'error', got {untied_copies!r}")
    path, config_json = _locate(Path(path))
    source = str(path)
    if model_config is None:
        if config_json is None:
            raise GateCheckpointError(
                f"trimkv checkpoint {source}: no model config given and no config.json beside it"
            )
        model_config = config_json
    served = _model_config(model_config, source)
    # The TrimKV fields: the config.json beside the weights wins over the passed config.
    fields = {**_trimkv_fields(model_config), **_trimkv_fields(config_json)}
    if retention_gate is not None:
        fields["retention_gate"] = retention_gate
    if tie_layers is not None:
        fields["tie_retention_gate_layers"] = tie_layers
    notes: list[str] = []

    state = _read_trimkv_state(path)
    per_layer, prefix = _group_by_layer(state, source)
    layers = _check_layers(per_layer, served, source)
    found = _Found(source, prefix, per_layer, layers)
    variant = _variant(found, fields.get("retention_gate"))
    g = _check_shapes(found, state, variant, served, fields)
    shared = _tied(found, variant, fields, untied_copies, notes)
    config = _gate_config(served, fields, budget, g, variant, shared, source)
    gates = RetentionGates(config, init_std=0.0)
    gates.load_state_dict(_our_state(found, variant, shared), strict=True)
    return TrimKVImport(gates, variant, prefix, tuple(notes))


def _check_layers(per_layer: Mapping[int, Any], served: GateConfig, source: str) -> list[int]:
    """Layers: exactly 0 .. L-1 of the served model."""
    layers = sorted(per_layer)
    num_found = layers[-1] + 1
    if num_found != served.num_layers or len(layers) != served.num_layers:
        missing = sorted(set(range(served.num_layers)) - set(layers))
        detail = ""
        if missing and num_found == served.num_layers:
            detail = f" (missing layers {missing[:10]})"
        raise GateCheckpointError(
            f"trimkv checkpoint {source} was made for {num_found} layers, the served model has "
            f"{served.num_layers}{detail}"
        )
    return layers


def _variant(found: _Found, declared: str | None) -> str:
    """Their gate class, from the parameter names, cross-checked with the config when it names
    one; the same names in every layer."""
    source, per_layer = found.source, found.per_layer
    names = frozenset(per_layer[0])
    by_names = next((v for v, p in _TRIMKV_PARAMS.items() if p == names), None)
    if by_names is None:
        if declared is not None and declared not in _TRIMKV_SUPPORTED:
            raise _unsupported(str(declared), source)
        raise GateCheckpointError(
            f"trimkv checkpoint {source}: unknown retention gate layout, parameters "
            f"{sorted(names)} under {found.key(0, '')!r}"
        )
    if by_names == "rg3" or (declared is not None and declared not in _TRIMKV_SUPPORTED):
        raise _unsupported(str(declared if declared is not None else by_names), source)
    if declared is not None and declared != by_names:
        raise GateCheckpointError(
            f"trimkv checkpoint {source}: config says retention_gate={declared!r} but the "
            f"tensors are those of {by_names!r}"
        )
    for i in found.layers:
        if frozenset(per_layer[i]) != names:
            diff = sorted(frozenset(per_layer[i]) ^ names)
            raise GateCheckpointError(
                f"trimkv checkpoint {source}: layer {i} has different gate parameters than "
                f"layer 0 (differing: {diff})"
            )
    return by_names


def _final(variant: str) -> str:
    return "linear3" if variant == "rg10" else "linear2"


def _check_shapes(found: _Found, state: Mapping[str, torch.Tensor], variant: str,
                  served: GateConfig, fields: Mapping[str, Any]) -> int:
    """Every tensor's shape and values against the served model; returns the gate width."""
    source, first, key = found.source, found.per_layer[0], found.key
    final = _final(variant)
    g = int(first["linear1.weight"].shape[0])
    d, h = served.hidden_size, served.num_kv_heads
    linear1_in = int(first["linear1.weight"].shape[-1])
    heads_found = int(first[f"{final}.weight"].shape[0])
    if heads_found != h:
        raise GateCheckpointError(
            f"trimkv checkpoint {source} was made for {heads_found} KV heads, the served model "
            f"has {h} (tensor {key(0, final + '.weight')!r} has shape "
            f"{tuple(first[final + '.weight'].shape)})"
        )
    if linear1_in != d:
        guess = (
            "; if it was made for this model, its gate reads something other than the hidden "
            "state, i.e. retention gate variant 'rg2' (an MLP on concat(post-RoPE K, V)), which "
            "sglang-evict does not support"
            if variant == "rg" and fields.get("retention_gate") is None
            else ""
        )
        raise GateCheckpointError(
            f"trimkv checkpoint {source} was made for hidden size {linear1_in}, the served model "
            f"has {d} (tensor {key(0, 'linear1.weight')!r}: expected shape ({g}, {d}), found "
            f"{tuple(first['linear1.weight'].shape)}){guess}"
        )
    declared_g = fields.get("retention_gate_intermediate_size")
    if declared_g is not None and declared_g != g:
        raise GateCheckpointError(
            f"trimkv checkpoint {source}: config says retention_gate_intermediate_size="
            f"{declared_g}, tensor {key(0, 'linear1.weight')!r} has {g} rows"
        )
    expected: dict[str, tuple[int, ...]] = {}
    for i in found.layers:
        expected[key(i, "linear1.weight")] = (g, d)
        expected[key(i, "linear1.bias")] = (g,)
        if variant == "rg10":
            expected[key(i, "linear2.weight")] = (g, g)
            expected[key(i, "linear2.bias")] = (g,)
        expected[key(i, f"{final}.weight")] = (h, g)
        expected[key(i, "bias")] = (h,)
    _check_tensors(
        source, {k: tuple(v.shape) for k, v in state.items()}, expected, what="trimkv checkpoint"
    )
    for k, v in state.items():
        _check_values(source, k, v, what="trimkv checkpoint")
    return g


def _tied(found: _Found, variant: str, fields: Mapping[str, Any], untied_copies: str,
          notes: list[str]) -> bool:
    """Whether the final projection is shared (DBTrimKV): their model ties linear3 and bias
    only for 'rg10'."""
    if variant != "rg10":
        if fields.get("tie_retention_gate_layers"):
            notes.append("tie_retention_gate_layers ignored: their model ties only 'rg10' gates")
        return False
    final, layers = _final(variant), found.layers
    tie = fields.get("tie_retention_gate_layers")
    copies_w = [found.per_layer[i][f"{final}.weight"] for i in layers]
    copies_b = [found.per_layer[i]["bias"] for i in layers]
    identical = all(torch.equal(copies_w[0], w) for w in copies_w[1:]) and all(
        torch.equal(copies_b[0], b) for b in copies_b[1:]
    )
    if tie is None:
        shared = identical and len(layers) > 1
        notes.append(
            f"tie_retention_gate_layers not given; per-layer copies are "
            f"{'identical' if identical else 'distinct'}, so shared_projection={shared}"
        )
        return shared
    if tie and not identical:
        diff = max(float((w.float() - copies_w[-1].float()).abs().max()) for w in copies_w)
        msg = (
            f"trimkv checkpoint {found.source}: tie_retention_gate_layers is set but the "
            f"per-layer copies of {final}/bias differ (max |diff| {diff:.3g})"
        )
        if untied_copies == "error":
            raise GateCheckpointError(msg)
        logger.warning("%s; using layer %d's copy, as their loader does", msg, layers[-1])
        notes.append(f"tied copies differ (max |diff| {diff:.3g}); used layer {layers[-1]}'s")
    return bool(tie)


def _gate_config(served: GateConfig, fields: Mapping[str, Any], budget: int | None, g: int,
                 variant: str, shared: bool, source: str) -> GateConfig:
    if budget is None:
        m = fields.get("memory_size")
        # memory_size < 1 means a fraction of the sequence length in their trainer: no fixed M.
        is_number = isinstance(m, (int, float)) and not isinstance(m, bool)
        if is_number and m >= 1 and float(m).is_integer():
            budget = int(m)
    bias_init = fields.get("retention_gate_bias_init", served.bias_init)
    if not isinstance(bias_init, (int, float)) or not math.isfinite(bias_init):
        bias_init = served.bias_init
    try:
        return served.replace(
            gate_hidden=g,
            variant=_TRIMKV_SUPPORTED[variant],
            shared_projection=shared,
            bias_init=float(bias_init),
            budget=budget,
        )
    except ValueError as err:
        raise GateCheckpointError(f"trimkv checkpoint {source}: {err}") from err


def _our_state(found: _Found, variant: str, shared: bool) -> dict[str, torch.Tensor]:
    """Their tensors under our names (tied: the last layer's copy, as their loader ends up)."""
    final, layers, per_layer = _final(variant), found.layers, found.per_layer
    mapping = {"linear1.weight": "w1.weight", "linear1.bias": "w1.bias"}
    if variant == "rg10":
        mapping.update({"linear2.weight": "w_mid.weight", "linear2.bias": "w_mid.bias"})
    ours: dict[str, torch.Tensor] = {}
    for i in layers:
        for theirs, name in mapping.items():
            ours[f"layers.{i}.{name}"] = per_layer[i][theirs]
        if not shared:
            ours[f"layers.{i}.w2.weight"] = per_layer[i][f"{final}.weight"]
            ours[f"layers.{i}.bias"] = per_layer[i]["bias"]
    if shared:
        ours["shared.w2.weight"] = per_layer[layers[-1]][f"{final}.weight"]
        ours["shared.bias"] = per_layer[layers[-1]]["bias"]
    return {k: v.to(torch.float32) for k, v in ours.items()}


def import_trimkv_checkpoint(
    path: str | os.PathLike[str],
    model_config: Any = None,
    **options: Any,
) -> RetentionGates:
    """The authors' `trimkv_weights.pth` (or its folder) as `RetentionGates`; see
    `import_trimkv` for the arguments and checks."""
    return import_trimkv(path, model_config, **options).gates


def convert_trimkv_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    model_config: Any = None,
    *,
    extra: Mapping[str, Any] | None = None,
    **options: Any,
) -> Path:
    """Import the authors' checkpoint and write it in the sglang-evict format at `dst`; the
    header's training info records the source file, their variant name and the import notes."""
    result = import_trimkv(src, model_config, **options)
    info: dict[str, Any] = {
        "imported_from": "ngocbh/trimkv " + TRIMKV_WEIGHTS_FILE,
        "source_path": str(src),
        "trimkv_retention_gate": result.source_variant,
        "trimkv_key_prefix": result.key_prefix,
        "import_notes": list(result.notes),
    }
    if extra:
        info.update(extra)
    return save_gates(dst, result.gates, extra=info)
