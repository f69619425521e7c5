"""`sglang-evict plan`: how many concurrent requests of a given context fit, with and without
eviction, from a model's config.json and a GPU's memory (or a KV pool size in tokens).

The arithmetic is the server's own:
- the KV pool: SGLang gives `mem_fraction_static` of the GPU to weights and KV pool together;
  the pool is the rest, divided by SGLang's per-token cost (K and V of every layer) plus, with
  eviction, the head-slot metadata and virtual map of `sizing.bytes_per_token`;
- without eviction a request holds its whole context and output;
- with eviction `serve` allows as many running requests as can each hold M + B + 1 head-slots
  per (layer, KV head) beside one prefill chunk (`sizing.default_running`, the chunk
  `sizing.default_chunk` unless given); SGLang's token ids are virtual, `--evict-oversubscribe`
  per physical token, and every request holds one per token of its context and output.
With a larger `--max-running-requests`, the global evictor squeezes running requests below M
(down to their sinks and window) before SGLang would retract one: `squeezed` is that bound.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from sglang_evict.config import EvictConfig

DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2,
               "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}
DEFAULT_MEM_FRACTION = 0.88  # SGLang's static fraction on a large GPU with TP 1


class PlanError(ValueError):
    pass


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    weight_bytes: int
    dtype_bytes: int

    @property
    def kv_bytes_per_token(self) -> int:
        """SGLang's per-token KV cost: K and V of every layer and KV head."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes


def read_model(path: str | Path) -> ModelShape:
    """The attention shape and weight bytes of a Hugging Face model folder (or its config.json).
    Weights: the folder's safetensors files where present, else counted from the config."""
    path = Path(path)
    config_path = path / "config.json" if path.is_dir() else path
    try:
        cfg = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise PlanError(f"--model: {config_path} does not exist") from None
    except json.JSONDecodeError as e:
        raise PlanError(f"--model: {config_path} is not valid JSON ({e})") from None
    cfg = cfg.get("text_config", cfg)
    try:
        layers = int(cfg["num_hidden_layers"])
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads", heads))
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        inter = int(cfg.get("intermediate_size", 4 * hidden))
        vocab = int(cfg["vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise PlanError(f"--model: {config_path} lacks a decoder field ({e})") from None
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    dtype_bytes = DTYPE_BYTES.get(dtype, 2)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if files:
        weight_bytes = sum(f.stat().st_size for f in files)
    else:
        per_layer = (hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
                     + 3 * hidden * inter + 2 * hidden)
        embed = vocab * hidden * (1 if cfg.get("tie_word_embeddings", False) else 2)
        weight_bytes = (layers * per_layer + embed + hidden) * dtype_bytes
    name = cfg.get("_name_or_path") or path.resolve().name
    return ModelShape(str(name), layers, kv_heads, head_dim, weight_bytes, dtype_bytes)


def parse_bytes(text: str) -> int:
    """'80GiB', '141GB', '24g', '1e10' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text)
    if not m:
        raise PlanError(f"--gpu-memory: cannot read {text!r} (e.g. 80GiB, 141GB)")
    base = 1024 if m.group(3) else 1000  # GiB vs GB
    return int(float(m.group(1)) * base ** "_kmgt".index((m.group(2) or "_").lower()))


@dataclass(frozen=True)
class Plan:
    model: str
    context: int
    output: int
    budget: int
    buffer: int
    kv_pool_bytes: int | None
    tokens_full_size: int  # the pool without eviction, in tokens at full size
    tokens_physical: int  # the pool with eviction (metadata included), in tokens of L*H slots
    virtual_ids: int
    chunk: int  # the prefill chunk (`serve`'s choice unless given)
    vanilla: int  # concurrent requests without eviction
    at_budget: int  # with eviction, every request at M + B: what `serve` admits
    squeezed: int  # with a larger --max-running-requests: squeezed to sinks and window
    limit: str  # what bounds `at_budget`
    oversubscribe_for_memory: int  # the --evict-oversubscribe at which memory bounds it

    @property
    def ratio(self) -> float:
        return self.at_budget / self.vanilla if self.vanilla else math.inf


def plan(shape: ModelShape, *, context: int, output: int, budget: int,
         cfg: EvictConfig | None = None, gpu_memory: int | None = None,
         mem_fraction: float = DEFAULT_MEM_FRACTION, kv_tokens: int | None = None,
         chunk: int | None = None) -> Plan:
    from sglang_evict.sizing import bytes_per_token, default_chunk, default_running

    cfg = cfg or EvictConfig(policy="retention-global", budget=budget)
    if context < 1 or output < 0 or budget < 1:
        raise PlanError("--context and --budget must be >= 1 and --output >= 0")
    held_full = context + output
    if kv_tokens is not None:  # --max-total-tokens: the same token count with and without
        pool_bytes, full = None, kv_tokens
    else:
        if gpu_memory is None:
            raise PlanError("give --gpu-memory or --kv-tokens")
        pool_bytes = int(gpu_memory * mem_fraction) - shape.weight_bytes
        if pool_bytes <= 0:
            raise PlanError(
                f"the weights ({shape.weight_bytes / 2**30:.1f} GiB) do not fit "
                f"{mem_fraction:.2f} of {gpu_memory / 2**30:.1f} GiB")
        full = pool_bytes // shape.kv_bytes_per_token
    protected = cfg.sinks + cfg.window + 1

    def physical_tokens(oversubscribe: int) -> int:
        if pool_bytes is None:
            return kv_tokens
        extra = bytes_per_token(shape.num_layers, shape.num_kv_heads, oversubscribe)
        return pool_bytes // (shape.kv_bytes_per_token + extra)

    def at_budget_of(physical: int) -> int:
        return default_running(cfg.budget, cfg.buffer, physical, chunk or default_chunk(physical))

    physical = physical_tokens(cfg.oversubscribe)
    chunk = chunk or default_chunk(physical)
    by_virtual = physical * cfg.oversubscribe // held_full
    by_physical = at_budget_of(physical)
    at_budget = min(by_physical, by_virtual)
    squeezed = min(max(1, (physical - chunk) // protected), by_virtual)
    limit = "virtual token ids (--evict-oversubscribe)" if by_virtual < by_physical else \
        "physical head-slots"
    # The oversubscription at which memory, not virtual ids, bounds the count (more virtual
    # ids cost metadata memory, so iterate to the fixed point).
    enough = cfg.oversubscribe
    for _ in range(32):
        p = physical_tokens(enough)
        if p * enough // held_full >= at_budget_of(p):
            break
        enough = max(enough + 1, math.ceil(at_budget_of(p) * held_full / max(p, 1)))
    return Plan(shape.name, context, output, budget, cfg.buffer, pool_bytes, full, physical,
                physical * cfg.oversubscribe, chunk, full // held_full, at_budget, squeezed,
                limit, enough)


def render(p: Plan, shape: ModelShape) -> str:
    lines = [f"model: {p.model} ({shape.num_layers} layers x {shape.num_kv_heads} KV heads x "
             f"{shape.head_dim}, {shape.kv_bytes_per_token} B of KV per token, weights "
             f"{shape.weight_bytes / 2**30:.2f} GiB)"]
    if p.kv_pool_bytes is not None:
        lines.append(f"KV pool: {p.kv_pool_bytes / 2**30:.2f} GiB")
    lines += [
        f"tokens at full size: {p.tokens_full_size} without eviction, {p.tokens_physical} with "
        f"(head-slot metadata included); {p.virtual_ids} virtual token ids",
        f"per request: {p.context} context + {p.output} output tokens; with eviction at most "
        f"M + B + 1 = {p.budget} + {p.buffer} + 1 head-slots per layer and KV head, beside a "
        f"prefill chunk of {p.chunk}",
        f"concurrent requests without eviction: {p.vanilla}",
        f"concurrent requests with eviction:    {p.at_budget} at the budget "
        f"(bound: {p.limit}); up to {p.squeezed} with a larger --max-running-requests, "
        "squeezed below M by the global evictor",
        f"serve with: --max-total-tokens {p.tokens_physical} --evict-budget {p.budget} "
        f"--evict-buffer {p.buffer}",
    ]
    if p.vanilla:
        lines.append(f"ratio: {p.ratio:.1f}x")
    if p.limit.startswith("virtual"):
        lines.append(f"memory would admit more: serve with --evict-oversubscribe "
                     f"{p.oversubscribe_for_memory}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sglang-evict plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder or config.json (default: the default model)")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--gpu-memory", help="GPU memory, e.g. 80GiB or 141GB")
    size.add_argument("--kv-tokens", type=int, help="KV pool in tokens at full size "
                      "(SGLang's --max-total-tokens)")
    parser.add_argument("--mem-fraction-static", type=float, default=DEFAULT_MEM_FRACTION)
    parser.add_argument("--context", type=int, required=True, help="prompt tokens per request")
    parser.add_argument("--output", type=int, default=256, help="output tokens per request")
    parser.add_argument("--budget", type=int, required=True, help="M (--evict-budget)")
    parser.add_argument("--buffer", type=int, default=EvictConfig.buffer)
    parser.add_argument("--sinks", type=int, default=EvictConfig.sinks)
    parser.add_argument("--window", type=int, default=EvictConfig.window)
    parser.add_argument("--oversubscribe", type=int, default=EvictConfig.oversubscribe)
    parser.add_argument("--chunked-prefill-size", type=int, help="SGLang's prefill chunk")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    try:
        if args.model is None:
            from sglang_evict import default_model

            args.model = str(default_model.resolve())
        shape = read_model(args.model)
        cfg = EvictConfig(policy="retention-global", budget=args.budget, buffer=args.buffer,
                          sinks=args.sinks, window=args.window,
                          oversubscribe=args.oversubscribe, gates=None)
        p = plan(shape, context=args.context, output=args.output, budget=args.budget, cfg=cfg,
                 gpu_memory=parse_bytes(args.gpu_memory) if args.gpu_memory else None,
                 mem_fraction=args.mem_fraction_static, kv_tokens=args.kv_tokens,
                 chunk=args.chunked_prefill_size)
    except (PlanError, ValueError) as e:
        print(f"sglang-evict plan: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({**asdict(p), "ratio": p.ratio}) if args.json else render(p, shape))
    return 0
