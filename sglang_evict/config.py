"""The plugin's own settings, shared by every SGLang process of one server.

`sglang-evict serve` takes its `--evict-*` flags out of SGLang's argv (SGLang's parser would
reject them), validates them at start-up and hands them to SGLang's processes through one
environment variable: SGLang starts its scheduler with spawn, which inherits the environment,
so this reaches every process without touching SGLang's argument parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass

ENV_VAR = "SGLANG_EVICT_CONFIG"
KERNEL_BACKENDS = ("auto", "triton", "torch", "flashinfer")
# CLI policy name -> (policies.py registry name, evictor mode). "retention" is TrimKV (a fixed
# budget per layer and head), "retention-global" DBTrimKV (one budget per request shared by all
# its layers and heads); the training-free baselines use the global budget, so they compete
# with retention-global on equal terms.
POLICY_CHOICES: dict[str, tuple[str, str]] = {
    "retention": ("retention", "per_head"),
    "retention-global": ("retention", "global"),
    "streaming": ("streaming", "global"),
    "random": ("random", "global"),
    "knorm": ("knorm", "global"),
    "none": ("none", "global"),
}
ATTENTION_BACKEND = "sglang_evict"
# What a client may change per request (custom_params.sglang_evict): nothing; its budget,
# buffer, sinks, window and lookahead up to the server's own (and any evicting policy); or
# anything, including policy none (no eviction for that request).
OVERRIDE_MODES = ("none", "clamp", "any")
# When the pool runs short: one ranking over running requests' entries and the radix tree's
# ("mixed"); the tree's evictable entries first, lowest-scored first ("tree-first"); or SGLang's
# LRU eviction of whole unreferenced tree nodes first ("lru-first"). The last two are lossless
# for running requests.
RECLAIM_ORDERS = ("mixed", "tree-first", "lru-first")

# (flag, field, type)
FLAGS: tuple[tuple[str, str, type], ...] = (
    ("--evict-gates", "gates", str),
    ("--evict-kernel", "kernel", str),
    ("--evict-policy", "policy", str),
    ("--evict-budget", "budget", int),
    ("--evict-buffer", "buffer", int),
    ("--evict-sinks", "sinks", int),
    ("--evict-window", "window", int),
    ("--evict-lookahead", "lookahead", int),
    ("--evict-min-per-head", "min_per_head", int),
    ("--evict-oversubscribe", "oversubscribe", int),
    ("--evict-debug-check", "debug_check", int),
    ("--evict-overrides", "overrides", str),
    ("--evict-reclaim", "reclaim", str),
)


class EvictConfigError(ValueError):
    pass


@dataclass(frozen=True)
class EvictConfig:
    gates: str | None = None  # gate checkpoint: ours (.safetensors) or the authors' (.pth / folder)
    # Kernels: Triton where it compiles for real (CUDA); on CPU the torch paths, since Triton's
    # interpreter is far too slow for a serving hot path. "flashinfer": FlashInfer's paged
    # attention over the same lists (CUDA), Triton for the rest.
    kernel: str = "auto"
    # Head-granular eviction (None = SGLang's own KV pool, no eviction; with gates, "none").
    policy: str | None = None
    budget: int | None = None  # M: head-slots per (layer, KV head) a request keeps
    buffer: int = 128  # B: eviction triggers above M + B
    sinks: int = 4  # first positions never evicted (attention sinks)
    window: int = 0  # most recent positions never evicted (0 = none)
    # Retention policies: 0 ranks by log alpha now, (t - pos) log beta; n >= 1 by the retention
    # summed over the next n steps (1: (t + 1 - pos) log beta, the authors' runtime).
    lookahead: int = 0
    min_per_head: int = 0  # floor per (layer, head) under the global budget
    # Virtual token ids (SGLang's token pool) per token of physical KV memory: how many more
    # tokens requests may hold in total than would fit at full size.
    oversubscribe: int = 8
    # 1: after every step, check the live lists against a recomputation from the virtual map
    # (slow; for tests and debugging).
    debug_check: int = 0
    # What clients may override per request (OVERRIDE_MODES); "clamp" suits a shared server.
    overrides: str = "clamp"
    # The order of reclaim when the pool runs short (RECLAIM_ORDERS). lru-first measured best
    # in bench/scored_sessions.py: vanilla's accuracy at vanilla's requests/s where lossy
    # reclaim of cached prefixes lost most answers (bench/README.md, "The order of reclaim").
    reclaim: str = "lru-first"

    def __post_init__(self) -> None:
        if self.overrides not in OVERRIDE_MODES:
            raise EvictConfigError(
                f"--evict-overrides must be one of {', '.join(OVERRIDE_MODES)}, "
                f"got {self.overrides!r}"
            )
        if self.reclaim not in RECLAIM_ORDERS:
            raise EvictConfigError(
                f"--evict-reclaim must be one of {', '.join(RECLAIM_ORDERS)}, got {self.reclaim!r}"
            )
        if self.kernel not in KERNEL_BACKENDS:
            raise EvictConfigError(
                f"--evict-kernel must be one of {', '.join(KERNEL_BACKENDS)}, got {self.kernel!r}"
            )
        if self.gates is not None and not os.path.exists(self.gates):
            raise EvictConfigError(f"--evict-gates: {self.gates} does not exist")
        if self.policy is None:
            tuned = [
                flag
                for flag, name, _ in FLAGS
                if name not in ("gates", "kernel") and getattr(self, name) != _DEFAULTS[name]
            ]
            if tuned:
                raise EvictConfigError(
                    f"{', '.join(tuned)} without --evict-policy: choose a policy "
                    f"({', '.join(POLICY_CHOICES)})"
                )
            if self.gates is None:
                return
            # Gates alone: the head-slot backend scores every entry and evicts none, the one
            # data path of every mode (docs/layout.md, "One data path").
            object.__setattr__(self, "policy", "none")
        if self.policy not in POLICY_CHOICES:
            raise EvictConfigError(
                f"--evict-policy must be one of {', '.join(POLICY_CHOICES)}, got {self.policy!r}"
            )
        if self.policy == "none":
            if self.budget is not None:
                raise EvictConfigError("--evict-budget has no effect with --evict-policy none")
        elif self.budget is None:
            raise EvictConfigError(f"--evict-policy {self.policy} needs --evict-budget M")
        elif self.budget < 1:
            raise EvictConfigError(f"--evict-budget must be >= 1, got {self.budget}")
        for name in ("buffer", "sinks", "window", "min_per_head", "lookahead"):
            if getattr(self, name) < 0:
                flag = "--evict-" + name.replace("_", "-")
                raise EvictConfigError(f"{flag} must be >= 0, got {getattr(self, name)}")
        if self.oversubscribe < 1:
            raise EvictConfigError(f"--evict-oversubscribe must be >= 1, got {self.oversubscribe}")
        if self.lookahead and POLICY_CHOICES[self.policy][0] != "retention":
            raise EvictConfigError(
                f"--evict-lookahead applies to the retention policies, not {self.policy}"
            )
        if self.min_per_head:
            if self.policy == "retention":
                raise EvictConfigError(
                    "--evict-min-per-head applies to global budgets; --evict-policy retention "
                    "already keeps M entries in every layer and head"
                )
            if self.budget is not None and self.min_per_head > self.budget:
                raise EvictConfigError(
                    f"--evict-min-per-head {self.min_per_head} exceeds --evict-budget {self.budget}"
                )

    def use_triton(self, device) -> bool:
        """Triton kernels where they compile for real (CUDA), or when asked for; the torch
        twins otherwise (Triton's CPU interpreter is far too slow to serve with)."""
        import torch

        return self.kernel in ("triton", "flashinfer") or (
            self.kernel == "auto" and torch.device(device).type == "cuda"
        )

    def attention_kernel(self, device) -> str:
        """Which attention kernels serve: "flashinfer", "triton" or "torch"."""
        if self.kernel == "flashinfer":
            return "flashinfer"
        return "triton" if self.use_triton(device) else "torch"

    @property
    def active(self) -> bool:
        return self.gates is not None or self.evicting

    def check_gates_present(self) -> None:
        """The retention policies score entries with gates; `sglang-evict serve` fills in the
        packaged gates for the default model before calling this."""
        if self.policy is not None and self.policy.startswith("retention") and self.gates is None:
            raise EvictConfigError(
                f"--evict-policy {self.policy} scores entries with retention gates: pass "
                "--evict-gates PATH (the default model has packaged gates)"
            )

    @property
    def virtual_factor(self) -> int:
        """Virtual token ids per physical token: 1 without an evictor (policy none holds every
        token, so promising more than memory would only defer the shortage)."""
        return self.oversubscribe if self.policy not in (None, "none") else 1

    @property
    def evicting(self) -> bool:
        """Head-granular KV (the sglang_evict attention backend) replaces SGLang's KV pool."""
        return self.policy is not None

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


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EvictConfig)}


def _flag_parser() -> argparse.ArgumentParser:
    """argparse for this plugin's flags only; the rest of a command line is SGLang's."""
    parser = argparse.ArgumentParser(prog="sglang-evict serve", add_help=False,
                                     allow_abbrev=False, exit_on_error=False)
    for flag, field, kind in FLAGS:
        parser.add_argument(flag, dest=field, type=kind, default=argparse.SUPPRESS)
    return parser


def _flag_error(e: argparse.ArgumentError) -> str:
    """argparse's error, phrased as the other start-up errors are (the flag first)."""
    flag = e.argument_name or "an --evict- option"
    if "expected one argument" in e.message:
        return f"{flag} needs a value"
    if "invalid int value" in e.message:
        return f"{flag} must be an integer, got {e.message.split(': ', 1)[-1]}"
    return f"{flag}: {e.message}"


def split_argv(argv: list[str]) -> tuple[EvictConfig, list[str]]:
    """Take this plugin's flags out of a command line; return them, validated as one
    EvictConfig, and SGLang's remaining argv."""
    try:
        parsed, rest = _flag_parser().parse_known_args(argv)
    except argparse.ArgumentError as e:
        raise EvictConfigError(_flag_error(e)) from None
    unknown = [a.partition("=")[0] for a in rest if a.startswith("--evict-")]
    if unknown:
        known = ", ".join(f for f, _, _ in FLAGS)
        raise EvictConfigError(f"unknown option {unknown[0]} (sglang-evict options: {known})")
    values = vars(parsed)
    if values.get("gates"):
        # The scheduler resolves paths from its own working directory; make them absolute.
        values["gates"] = os.path.abspath(os.path.expanduser(values["gates"]))
    return EvictConfig(**values), rest
