"""The plugin's own settings, shared by every SGLang process of one server.

`sglang-evict serve` takes its `--evict-*` flags out of SGLang's argv (SGLang's parser would
reject them), validates them at start-up and hands them to SGLang's processes through one
environment variable: SGLang starts its scheduler with spawn, which inherits the environment,
so this reaches every process without touching SGLang's argument parser.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

ENV_VAR = "SGLANG_EVICT_CONFIG"
KERNEL_BACKENDS = ("auto", "triton", "torch")

# (flag, field, takes a value)
FLAGS: tuple[tuple[str, str, bool], ...] = (
    ("--evict-gates", "gates", True),
    ("--evict-kernel", "kernel", True),
)


class EvictConfigError(ValueError):
    pass


@dataclass(frozen=True)
class EvictConfig:
    gates: str | None = None  # gate checkpoint: ours (.safetensors) or the authors' (.pth / folder)
    # Store kernel: Triton where it compiles for real (CUDA); on CPU the torch reference, since
    # Triton's interpreter is far too slow for a serving hot path.
    kernel: str = "auto"

    def __post_init__(self) -> None:
        if self.kernel not in KERNEL_BACKENDS:
            raise EvictConfigError(
                f"--evict-kernel must be one of {', '.join(KERNEL_BACKENDS)}, got {self.kernel!r}"
            )
        if self.gates is not None and not os.path.exists(self.gates):
            raise EvictConfigError(f"--evict-gates: {self.gates} does not exist")

    @property
    def active(self) -> bool:
        return self.gates is not None

    def to_env(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_env(cls, environ=os.environ) -> "EvictConfig":
        raw = environ.get(ENV_VAR)
        if not raw:
            return cls()
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise EvictConfigError(f"{ENV_VAR} is not valid JSON: {e}") from None
        return cls(**data)


def split_argv(argv: list[str]) -> tuple[EvictConfig, list[str]]:
    """Take this plugin's flags out of a command line; return them and SGLang's remaining argv."""
    values: dict[str, str] = {}
    rest: list[str] = []
    by_flag = {flag: (field, takes) for flag, field, takes in FLAGS}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg.partition("=")
        if name in by_flag:
            field, _ = by_flag[name]
            if eq:
                values[field] = inline
            elif i + 1 < len(argv):
                values[field] = argv[i + 1]
                i += 1
            else:
                raise EvictConfigError(f"{name} needs a value")
        elif name.startswith("--evict-"):
            known = ", ".join(f for f, _, _ in FLAGS)
            raise EvictConfigError(f"unknown option {name} (sglang-evict options: {known})")
        else:
            rest.append(arg)
        i += 1
    if values.get("gates"):
        # The scheduler resolves paths from its own working directory; make them absolute.
        values["gates"] = os.path.abspath(os.path.expanduser(values["gates"]))
    return EvictConfig(**values), rest
