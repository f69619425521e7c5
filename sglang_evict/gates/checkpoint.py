"""Gate checkpoints: the project's own format.

## sglang-evict format (format_version 1)

ONE `.safetensors` file. Its tensors are the parameters of `RetentionGates`, float32, under the
names `gates.expected_tensor_shapes` lists (`layers.{i}.w1.weight`, ..., `shared.w2.weight`,
`shared.bias`). Its safetensors metadata holds one key, `sglang_evict_gates`, whose value is a
JSON object:

    format_version     1
    architecture       base model architecture, e.g. "LlamaForCausalLM" (or null)
    hidden_size, num_layers, num_kv_heads        the base model's dimensions
    gate_hidden, activation, variant, shared_projection, bias_init     the gates
    budget             training budget M per (layer, head), or null
    training           free-form object (data, steps, losses, source of an import, ...)

`load_gates` checks all of it before building anything and raises `GateCheckpointError` (a
ValueError) with a message that names the file and the problem, so a bad file stops the server
at start-up rather than mid-serving.

The authors' `trimkv_weights.pth` is read by `sglang_evict.gates.trimkv_import`;
`sglang_evict.gates.files.load_gates_for_model` takes either format.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from sglang_evict.gates.modules import GateConfig, RetentionGates, expected_tensor_shapes

HEADER_KEY = "sglang_evict_gates"
FORMAT_VERSION = 1

_HEADER_FIELDS = (
    "format_version",
    "architecture",
    "hidden_size",
    "num_layers",
    "num_kv_heads",
    "gate_hidden",
    "activation",
    "variant",
    "shared_projection",
    "bias_init",
    "budget",
    "training",
)


class GateCheckpointError(ValueError):
    """A gate checkpoint cannot be used; the message names the file and the problem."""


class GateCheckpointHeader(NamedTuple):
    config: GateConfig
    format_version: int
    training: dict[str, Any]


# ---------------------------------------------------------------------- save


def save_gates(
    path: str | os.PathLike[str],
    gates: RetentionGates,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write `gates` to one .safetensors file (float32); `extra` is stored as the header's
    free-form "training" object and must be JSON-serialisable. The file is written under a
    temporary name and renamed, so a crash never leaves a half-written checkpoint."""
    path = Path(path)
    if not isinstance(gates, RetentionGates):
        raise TypeError(f"save_gates needs RetentionGates, got {type(gates).__name__}")
    header = {"format_version": FORMAT_VERSION, **gates.config.to_dict()}
    header["training"] = dict(extra) if extra is not None else {}
    try:
        header_json = json.dumps(header, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise ValueError(f"gate checkpoint header is not JSON-serialisable: {err}") from err
    tensors = {
        name: t.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
        for name, t in gates.state_dict().items()
    }
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={HEADER_KEY: header_json})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------------- load


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise GateCheckpointError(f"{what} {path} does not exist")
    if not path.is_file():
        raise GateCheckpointError(f"{what} {path} is not a file")


def _open_safetensors(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # SafetensorError (a bare Exception subclass), OSError, ...
        raise GateCheckpointError(
            f"gate checkpoint {path} is not a readable safetensors file "
            f"(corrupt or truncated?): {err}"
        ) from err


def _parse_header(path: Path, metadata: Mapping[str, str] | None) -> GateCheckpointHeader:
    if not metadata or HEADER_KEY not in metadata:
        raise GateCheckpointError(
            f"gate checkpoint {path} has no {HEADER_KEY!r} header in its safetensors metadata: "
            "it is not an sglang-evict gate checkpoint (convert the authors' "
            "trimkv_weights.pth with trimkv_import.convert_trimkv_checkpoint)"
        )
    try:
        header = json.loads(metadata[HEADER_KEY])
    except json.JSONDecodeError as err:
        raise GateCheckpointError(
            f"gate checkpoint {path}: the {HEADER_KEY!r} header is not valid JSON: {err}"
        ) from err
    if not isinstance(header, dict):
        raise GateCheckpointError(
            f"gate checkpoint {path}: the {HEADER_KEY!r} header must be a JSON object, "
            f"got {type(header).__name__}"
        )
    missing = [f for f in _HEADER_FIELDS if f not in header]
    if missing:
        raise GateCheckpointError(
            f"gate checkpoint {path}: header lacks field(s) {', '.join(missing)}"
        )
    version = header["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise GateCheckpointError(f"gate checkpoint {path}: bad format_version {version!r}")
    if version > FORMAT_VERSION:
        raise GateCheckpointError(
            f"gate checkpoint {path} has format_version {version}, newer than this sglang-evict "
            f"reads ({FORMAT_VERSION}); upgrade sglang-evict"
        )
    training = header["training"]
    if not isinstance(training, dict):
        raise GateCheckpointError(
            f"gate checkpoint {path}: header field 'training' must be an object, "
            f"got {type(training).__name__}"
        )
    fields = {k: v for k, v in header.items() if k not in ("format_version", "training")}
    unknown = sorted(set(fields) - set(_HEADER_FIELDS))
    if unknown:
        raise GateCheckpointError(
            f"gate checkpoint {path}: unknown header field(s) {', '.join(unknown)}"
        )
    try:
        config = GateConfig.from_dict(fields)
    except (TypeError, ValueError) as err:
        raise GateCheckpointError(f"gate checkpoint {path}: invalid header: {err}") from err
    return GateCheckpointHeader(config, version, training)


def read_gate_header(path: str | os.PathLike[str]) -> GateCheckpointHeader:
    """The header of a gate checkpoint (config, format_version, training info), validated,
    without reading the tensors."""
    path = Path(path)
    _check_file(path, "gate checkpoint")
    with _open_safetensors(path) as f:
        return _parse_header(path, f.metadata())


def check_model_match(
    found: GateConfig, expect: GateConfig, source: str, *, what: str = "gate checkpoint"
) -> None:
    """Raise GateCheckpointError when gates made for one model meet another: layer count, KV
    heads, hidden size, and architecture (when both name one). All mismatches in one message."""
    problems = []
    for field, unit in (
        ("num_layers", "layers"),
        ("num_kv_heads", "KV heads"),
        ("hidden_size", "hidden size"),
    ):
        a, b = getattr(found, field), getattr(expect, field)
        if a != b:
            if field == "hidden_size":
                problems.append(f"was made for hidden size {a}, the served model has {b}")
            else:
                problems.append(f"was made for {a} {unit}, the served model has {b}")
    if found.architecture and expect.architecture and found.architecture != expect.architecture:
        problems.append(
            f"was made for architecture {found.architecture}, the served model is "
            f"{expect.architecture}"
        )
    if problems:
        raise GateCheckpointError(f"{what} {source} " + "; ".join(problems))


def _check_tensors(
    source: str,
    found: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    *,
    what: str = "gate checkpoint",
) -> None:
    problems = []
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    for k in missing:
        problems.append(f"missing tensor {k!r} (expected shape {tuple(expected[k])})")
    for k in unexpected:
        problems.append(f"unexpected tensor {k!r} (shape {tuple(found[k])})")
    for k, shape in expected.items():
        if k in found and tuple(found[k]) != tuple(shape):
            problems.append(
                f"tensor {k!r}: expected shape {tuple(shape)}, found {tuple(found[k])}"
            )
    if problems:
        shown = problems[:20]
        more = f"; ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise GateCheckpointError(f"{what} {source}: " + "; ".join(shown) + more)


def _check_values(source: str, name: str, t: torch.Tensor, *, what: str = "gate checkpoint"):
    if not t.is_floating_point():
        raise GateCheckpointError(
            f"{what} {source}: tensor {name!r} has dtype {t.dtype}, expected floating point"
        )
    if not bool(torch.isfinite(t).all()):
        raise GateCheckpointError(f"{what} {source}: tensor {name!r} holds NaN or inf values")


def load_gates(
    path: str | os.PathLike[str],
    expect: GateConfig | None = None,
    device: torch.device | str = "cpu",
) -> RetentionGates:
    """Load and validate a gate checkpoint written by `save_gates`.

    `expect` describes the served model (e.g. `GateConfig.from_hf_config(model_config)`); its
    layer count, KV heads, hidden size and architecture must match the checkpoint's. The gate
    fields (variant, gate_hidden, activation, shared_projection) come from the checkpoint.
    Every problem raises GateCheckpointError naming the file.
    """
    path = Path(path)
    _check_file(path, "gate checkpoint")
    with _open_safetensors(path) as f:
        header = _parse_header(path, f.metadata())
        if expect is not None:
            check_model_match(header.config, expect, str(path))
        try:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as err:
            raise GateCheckpointError(
                f"gate checkpoint {path} is not a readable safetensors file "
                f"(corrupt or truncated?): {err}"
            ) from err
        _check_tensors(str(path), found, expected_tensor_shapes(header.config))
        state = {}
        for name in found:
            try:
                t = f.get_tensor(name)
            except Exception as err:
                raise GateCheckpointError(
                    f"gate checkpoint {path}: cannot read tensor {name!r} (corrupt?): {err}"
                ) from err
            _check_values(str(path), name, t)
            state[name] = t.to(torch.float32)
    gates = RetentionGates(header.config, init_std=0.0)
    gates.load_state_dict(state, strict=True)
    return gates.to(device)
