"""`sglang-evict serve`: SGLang's HTTP server with this plugin, the default model and CPU settings.

Every SGLang argument passes through unchanged. What this adds:
- no --model-path: the embedded default model (materialised once, see default_model.py);
- no CUDA: the CPU settings SGLang needs (torch_native attention, pytorch sampling, CUDA graphs
  off, float32, sleep when idle, a bounded KV pool), each only where the user did not set it;
- the plugin's own options (`--evict-gates PATH`, `--evict-kernel {auto,triton,torch,flashinfer}`), taken
  out of SGLang's argv and passed to its processes (see config.py);
- start-up checks that turn the common mistakes (a missing model path, a folder that is not a
  model, a port in use, gates made for another model, a corrupt gate file) into one clear error
  line and exit code 2 before SGLang is imported.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

from sglang_evict.config import (
    ATTENTION_BACKEND,
    ENV_VAR,
    EvictConfig,
    EvictConfigError,
    split_argv,
)
from sglang_evict.patches import evict_refusals
from sglang_evict.sizing import default_chunk, default_running, protected_fits

# Fits long-context tests on a 24 GiB machine; SGLang's own CPU default sizes the pool from
# free RAM (about 14 GiB of KV for the default model), which also makes start-up take ~25 s.
CPU_DEFAULT_MAX_TOTAL_TOKENS = 65536

# Trained gates for the default model (SmolLM2-135M-Instruct, M=128, `sglang-evict train`; package
# data): DBTrimKV, one projection shared by all layers, so their scores are on one scale, which
# retention-global's single budget needs. The per-layer TrimKV gates stay beside them.
DEFAULT_GATES = (
    Path(__file__).parent / "default_gates" / "smollm2_135m_instruct_dbtrimkv_m128.safetensors"
)

CPU_DEFAULTS: tuple[tuple[str, str | None], ...] = (
    ("--device", "cpu"),
    ("--attention-backend", "torch_native"),
    ("--sampling-backend", "pytorch"),
    ("--disable-cuda-graph", None),
    # SGLang's dtype "auto" turns a float32 checkpoint into float16, which CPUs compute slowly
    # and which breaks token-for-token agreement with transformers.
    ("--dtype", "float32"),
    # An idle scheduler otherwise busy-polls a whole core; on a CPU host that core is the one
    # the model (or a second server) needs.
    ("--sleep-on-idle", None),
)


class StartupError(RuntimeError):
    """A problem with the request to start a server, reported as one line."""


def has_flag(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def flag_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag:
            if i + 1 >= len(argv):
                raise StartupError(f"{flag} needs a value")
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def with_cpu_defaults(argv: list[str]) -> list[str]:
    out = list(argv)
    for flag, value in CPU_DEFAULTS:
        if not has_flag(out, flag):
            out += [flag] if value is None else [flag, value]
    if not (has_flag(out, "--max-total-tokens") or has_flag(out, "--mem-fraction-static")):
        out += ["--max-total-tokens", str(CPU_DEFAULT_MAX_TOTAL_TOKENS)]
    return out


def _looks_like_hub_id(path: str) -> bool:
    # "org/name" with no filesystem-looking prefix: leave it to SGLang (and the user's hub access).
    return (
        path.count("/") == 1
        and not path.startswith((".", "/", "~"))
        and not Path(path).exists()
    )


def check_model_path(path: str) -> None:
    if _looks_like_hub_id(path):
        return
    p = Path(path).expanduser()
    if not p.exists():
        raise StartupError(f"model path {path} does not exist")
    if not p.is_dir():
        raise StartupError(f"model path {path} is a file, not a model folder")
    config = p / "config.json"
    if not config.is_file():
        raise StartupError(f"model path {path} is not a model folder (no config.json)")
    try:
        info = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StartupError(f"model path {path}: config.json is not valid JSON ({e})") from None
    if not isinstance(info, dict) or not (info.get("architectures") or info.get("model_type")):
        raise StartupError(
            f"model path {path} is not a model folder (config.json names no architecture)"
        )
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")) and not any(p.glob("*.pt")):
        raise StartupError(f"model path {path} has a config.json but no weight files")


def check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            reason = "is already in use" if e.errno in (98, 48) else f"cannot be bound ({e.strerror})"
            raise StartupError(f"port {port} on {host} {reason}") from None


def check_gates(config: EvictConfig, model_path: str) -> None:
    """Load the gate checkpoint against the model's config.json now, so a checkpoint for
    another model (layer count, KV heads, hidden size) is refused before SGLang starts."""
    from sglang_evict.gates.checkpoint import GateCheckpointError
    from sglang_evict.gates.files import load_gates_for_model

    config_json = Path(model_path).expanduser() / "config.json"
    if not config_json.is_file():
        return  # a hub id: the scheduler checks the gates once the config is downloaded
    try:
        load_gates_for_model(config.gates, json.loads(config_json.read_text()))
    except (GateCheckpointError, ValueError) as e:
        raise StartupError(str(e)) from None


def with_eviction_backend(config: EvictConfig, argv: list[str]) -> list[str]:
    backend = flag_value(argv, "--attention-backend")
    if backend is None:
        return argv + ["--attention-backend", ATTENTION_BACKEND]
    if backend != ATTENTION_BACKEND:
        mode = (f"--evict-policy {config.policy}" if config.policy != "none" or not config.gates
                else "--evict-gates alone (policy none)")
        raise StartupError(
            f"{mode} serves head-granular KV with --attention-backend {ATTENTION_BACKEND}, "
            f"not {backend}"
        )
    return argv


def with_eviction_settings(config: EvictConfig, argv: list[str]) -> list[str]:
    """SGLang settings head-granular eviction needs: refuse the ones that conflict, add the rest.

    The sglang_evict attention backend owns the KV; the radix cache stays on (its hierarchical,
    session and other backends are refused). CUDA graphs (decode) and the overlap
    scheduler stay as the user set them: the backend captures and replays decode graphs, and
    the evictor runs on the host right after each forward, before the scheduler looks at the
    batch's results."""
    out = list(argv)
    why = evict_refusals.refusal(_server_args_of(out), config)
    if why is not None:
        raise StartupError(why)
    total = flag_value(out, "--max-total-tokens")
    if total is not None and total.isdigit():
        out = with_fitting_sizes(config, out, int(total))
    return out


def _int_flag(argv: list[str], flag: str) -> int | None:
    v = flag_value(argv, flag)
    if v is None:
        return None
    try:
        return int(v)
    except ValueError:
        raise StartupError(f"{flag} must be an integer, got {v!r}") from None


def with_fitting_sizes(config: EvictConfig, argv: list[str], pool: int) -> list[str]:
    """Derive what the user left open from the physical pool (`pool` tokens at full size) and
    the eviction settings, say what was chosen, and refuse only what cannot work: a prefill
    chunk must leave half the pool free, and every running request's protected tokens (sinks,
    window, the next token) plus a chunk must fit (evict_pool._check_fits, in the scheduler)."""
    out = list(argv)
    chosen = []
    chunk = _int_flag(out, "--chunked-prefill-size")
    if chunk is None or chunk <= 0:
        chunk = default_chunk(pool)
        out += ["--chunked-prefill-size", str(chunk)]
        chosen.append(f"--chunked-prefill-size {chunk}")
    elif chunk > pool // 2:
        raise StartupError(
            f"--chunked-prefill-size {chunk} exceeds half the physical pool ({pool // 2} of "
            f"{pool} tokens): eviction needs room beside a prefill chunk"
        )
    if config.policy not in (None, "none"):
        protected = config.sinks + config.window + 1
        if not protected_fits(1, config.sinks, config.window, chunk, pool):
            raise StartupError(
                f"one request's protected tokens (sinks {config.sinks} + window {config.window} "
                f"+ 1) plus a prefill chunk of {chunk} exceed the pool of {pool} tokens"
            )
        running = _int_flag(out, "--max-running-requests")
        if running is None:
            running = default_running(config.budget, config.buffer, pool, chunk)
            out += ["--max-running-requests", str(running)]
            chosen.append(f"--max-running-requests {running}")
        elif not protected_fits(running, config.sinks, config.window, chunk, pool):
            raise StartupError(
                f"--max-running-requests {running} x {protected} protected tokens (sinks "
                f"{config.sinks} + window {config.window} + 1) plus a prefill chunk of {chunk} "
                f"exceed the pool of {pool} tokens; at most {(pool - chunk) // protected} fit"
            )
    if chosen:
        print(f"sglang-evict: pool of {pool} tokens at full size: chose {', '.join(chosen)}",
              file=sys.stderr, flush=True)
    return out


def _server_args_of(argv: list[str]) -> SimpleNamespace:
    """The SGLang settings `evict_refusals.refusal` reads, from a command line (SGLang's own parser
    is not run before SGLang starts)."""

    def number(*flags: str) -> int:
        for flag in flags:
            v = flag_value(argv, flag)
            if v is not None:
                try:
                    return int(v)
                except ValueError:
                    raise StartupError(f"{flag} must be an integer, got {v!r}") from None
        return 1

    return SimpleNamespace(
        attention_backend=flag_value(argv, "--attention-backend"),
        disable_radix_cache=has_flag(argv, "--disable-radix-cache"),
        page_size=number("--page-size"),
        tp_size=number("--tp-size", "--tp"),
        pp_size=number("--pp-size", "--pp"),
        dp_size=number("--dp-size", "--dp"),
        kv_cache_dtype=flag_value(argv, "--kv-cache-dtype"),
        speculative_algorithm=flag_value(argv, "--speculative-algorithm"),
        disable_overlap_schedule=has_flag(argv, "--disable-overlap-schedule"),
        disable_cuda_graph=has_flag(argv, "--disable-cuda-graph"),
        enable_session_radix_cache=has_flag(argv, "--enable-session-radix-cache"),
        enable_hierarchical_cache=has_flag(argv, "--enable-hierarchical-cache"),
        radix_cache_backend=flag_value(argv, "--radix-cache-backend"),
        device=flag_value(argv, "--device"),
    )


def with_default_gates(config: EvictConfig, model_path: str) -> EvictConfig:
    """The default model without --evict-gates uses the trained gates shipped in the package
    when the server's policy is a retention one, or when its clients may pick one
    (`--evict-overrides clamp` or `any` on any eviction server: a request's retention policy
    then finds its scores, at the cost of running the gates on every token)."""
    import dataclasses

    from sglang_evict import default_model

    wants = config.policy is not None and (config.policy.startswith("retention")
                                           or config.overrides != "none")
    if not wants or config.gates is not None or not DEFAULT_GATES.is_file():
        return config
    try:
        is_default = Path(model_path).expanduser().resolve() == default_model.default_model_dir().resolve()
    except OSError:
        return config
    return dataclasses.replace(config, gates=str(DEFAULT_GATES)) if is_default else config


def prepare_argv(argv: list[str]) -> tuple[EvictConfig, list[str]]:
    """Fill in the defaults and run the start-up checks; return the plugin's settings and
    SGLang's argv."""
    try:
        config, out = split_argv(argv)
    except EvictConfigError as e:
        raise StartupError(str(e)) from None
    from sglang_evict.patches.hook_check import version_refusal

    why = version_refusal()
    if why is not None:
        raise StartupError(why)
    if not has_flag(out, "--model-path"):
        from sglang_evict import default_model

        out = ["--model-path", str(default_model.resolve())] + out
    check_model_path(flag_value(out, "--model-path"))
    config = with_default_gates(config, flag_value(out, "--model-path"))
    try:
        config.check_gates_present()
    except EvictConfigError as e:
        raise StartupError(str(e)) from None
    if config.gates is not None:
        check_gates(config, flag_value(out, "--model-path"))
    if config.evicting:
        out = with_eviction_backend(config, out)
    if not cuda_available():
        out = with_cpu_defaults(out)
    if config.evicting:
        out = with_eviction_settings(config, out)
    host = flag_value(out, "--host") or "127.0.0.1"
    if not has_flag(out, "--host"):
        out += ["--host", host]
    port_text = flag_value(out, "--port") or "30000"
    try:
        port = int(port_text)
    except ValueError:
        raise StartupError(f"--port must be an integer, got {port_text!r}") from None
    if not 0 < port < 65536:
        raise StartupError(f"--port must be between 1 and 65535, got {port}")
    check_port(host, port)
    return config, out


def run_sglang(config: EvictConfig, argv: list[str]) -> None:
    """Run SGLang's HTTP server in this process (what `python -m sglang.launch_server` does).
    The plugin's settings travel to SGLang's spawned processes in the environment."""
    os.environ[ENV_VAR] = config.to_env()
    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    from sglang_evict.errors import HeadEvictError
    from sglang_evict.patches.hook_check import PluginCheckError

    load_plugins()
    try:
        run_server(prepare_server_args(argv))
    except (PluginCheckError, HeadEvictError) as e:  # the plugin's start-up checks, one line
        raise StartupError(str(e).removeprefix("sglang-evict: ")) from None
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


def main(argv: list[str]) -> int:
    from sglang_evict.default_model import DefaultModelError

    try:
        config, sglang_argv = prepare_argv(argv)
        run_sglang(config, sglang_argv)
    except (StartupError, DefaultModelError) as e:
        print(f"sglang-evict: error: {e}", file=sys.stderr)
        return 2
    return 0
