"""Head-granular eviction inside SGLang: SGLang's token pool becomes virtual, KV lives in head-slots.

Targets sglang 0.5.23 (each target is pinned by tests/unit/test_upstream_guards.py). Active only
with `--evict-policy` (EvictConfig.evicting):
- KVCacheConfigurator._derive_pool_sizes (AROUND): SGLang sized its pool from memory as N tokens;
  the physical head-slot capacity is N*L*H (the same bytes) and SGLang's virtual token pool gets
  N * oversubscribe ids, so requests may hold more tokens than fit at full size.
- DefaultPoolConfigurator._compute_cell_size (AROUND, in gate_attach): the head-slot metadata and
  the virtual map are added to the per-token cost, so one memory budget covers everything.
- MHATokenToKVPool._create_buffers (AROUND): SGLang's per-layer K/V buffers become placeholders
  (upstream's NoOp pool layout); nothing reads them, the sglang_evict backend owns the KV.
- ModelRunner.alloc_memory_pool (AFTER): build the HeadKVCache.
- TokenToKVPoolAllocator.free / clear (AROUND / AFTER): freeing a virtual id frees its head-slots.
- ModelRunner.forward (AFTER): the evictor enforces each request's budget after every step.
- BaseTokenToKVPoolAllocator.check_decode_capacity (AROUND): the next decode step must also fit
  the physical pool after reclaiming evictable head-slots, else SGLang retracts (eviction always
  comes first; retraction only when eviction cannot make room).
- ServerArgs.check_server_args (AFTER): settings eviction cannot serve are refused with one line
  in SGLang's own process (plain `python -m sglang.launch_server` too).
- The attention backend `sglang_evict` (register_attention_backend) stores K, V, log beta and
  position into head-slots and attends over the live lists.
"""

from __future__ import annotations

import logging

import torch

from sglang_evict.config import ATTENTION_BACKEND, EvictConfig

logger = logging.getLogger(__name__)

SGLANG_VERSION = "0.5.23"
DERIVE_SIZES = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._derive_pool_sizes"
CREATE_BUFFERS = "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool._create_buffers"
ALLOC_POOL = "sglang.srt.model_executor.model_runner.ModelRunner.alloc_memory_pool"
ALLOC_FREE = "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator.free"
ALLOC_CLEAR = "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator.clear"
FORWARD = "sglang.srt.model_executor.model_runner.ModelRunner.forward"
SAMPLING_VERIFY = "sglang.srt.sampling.sampling_params.SamplingParams.verify"
PREPARE_EXTEND = "sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_extend"
DECODE_CAPACITY = (
    "sglang.srt.mem_cache.allocator.base.BaseTokenToKVPoolAllocator.check_decode_capacity"
)
CHECK_ARGS = "sglang.srt.server_args.ServerArgs.check_server_args"


class HeadEvictError(RuntimeError):
    pass


class _State:
    config: EvictConfig | None = None
    physical_tokens: int | None = None
    cache = None  # HeadKVCache
    runner = None


_state = _State()


def cache():
    return _state.cache


def config() -> EvictConfig:
    if _state.config is None:
        _state.config = EvictConfig.from_env()
    return _state.config


# ------------------------------------------------------------------ start-up refusals


def refusal(server_args, policy: str) -> str | None:
    """Why this server cannot run head-granular eviction with these SGLang settings (one line
    naming the setting), or None. Checked in SGLang's own process (`ServerArgs.
    check_server_args`), so plain `python -m sglang.launch_server` refuses them too."""
    def get(name, default=None):
        return getattr(server_args, name, default)

    policy = f"--evict-policy {policy}"
    if get("attention_backend") != ATTENTION_BACKEND:
        return f"{policy} needs --attention-backend {ATTENTION_BACKEND}, got {get('attention_backend')}"
    if not get("disable_radix_cache", False):
        return f"{policy} cannot run with the radix cache yet: add --disable-radix-cache"
    if (get("page_size") or 1) != 1:
        return f"{policy} needs --page-size 1 (one token per slot), got {get('page_size')}"
    for name, flag in (("tp_size", "--tp-size"), ("pp_size", "--pp-size"), ("dp_size", "--dp-size")):
        if (get(name) or 1) > 1:
            return f"{policy} runs on one device for now: {flag} {get(name)} is not supported"
    dtype = str(get("kv_cache_dtype") or "auto")
    if dtype.startswith("fp8") or dtype.startswith("fp4"):
        return f"{policy} stores K/V in the model dtype: --kv-cache-dtype {dtype} is not supported"
    if get("speculative_algorithm"):
        return f"{policy} does not support speculative decoding (--speculative-algorithm)"
    if not get("disable_overlap_schedule", False):
        return (f"{policy} evicts between steps: add --disable-overlap-schedule (the overlap "
                "scheduler would prepare the next batch while the evictor runs)")
    if not get("disable_cuda_graph", False):
        return f"{policy}: CUDA graphs are not captured with eviction yet: add --disable-cuda-graph"
    return None


def after_check_server_args(result, server_args, *args, **kwargs):
    why = refusal(server_args, config().policy)
    if why is not None:
        raise HeadEvictError(f"sglang-evict: {why}")
    return result


def check_model(model_config) -> None:
    """Attention variants the head-slot kernels do not implement are refused by name."""
    hf = getattr(model_config, "hf_text_config", None) or getattr(model_config, "hf_config", None)
    window = getattr(hf, "sliding_window", None)
    if window and getattr(hf, "use_sliding_window", True) is not False:
        raise HeadEvictError(
            f"sglang-evict: this model uses sliding-window attention (window {window}); "
            "eviction supports full attention only"
        )
    for cap in ("attn_logit_softcapping", "attn_logit_softcap"):
        if getattr(hf, cap, None):
            raise HeadEvictError(
                f"sglang-evict: this model caps attention logits ({cap}); eviction supports "
                "plain softmax attention only"
            )


# ------------------------------------------------------------------ pool sizing


def around_derive_pool_sizes(original, configurator, *args, **kwargs):
    sizes = original(configurator, *args, **kwargs)
    if configurator.is_draft_worker:
        return sizes
    import msgspec

    n = sizes.max_total_num_tokens
    _state.physical_tokens = n
    virtual = n * config().virtual_factor
    logger.info(
        "sglang-evict: KV memory for %d tokens at full size; %d virtual token ids", n, virtual
    )
    return msgspec.structs.replace(sizes, max_total_num_tokens=virtual)


def around_create_buffers(original, pool, *args, **kwargs):
    from sglang.srt.mem_cache.memory_pool import NoOpMHATokenToKVPool

    # Placeholders only: the head-slot cache holds the KV (upstream's own no-op layout).
    return NoOpMHATokenToKVPool._create_buffers(pool)


def after_alloc_memory_pool(result, runner, *args, **kwargs):
    if runner.is_draft_worker:
        return result
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from sglang_evict.eviction.evictor import Evictor
    from sglang_evict.backend.head_cache import HeadKVCache

    pool = runner.token_to_kv_pool
    if not isinstance(pool, MHATokenToKVPool):
        raise HeadEvictError(
            f"sglang-evict eviction needs an MHA KV pool; this model uses {type(pool).__name__}"
        )
    if pool.page_size != 1:
        raise HeadEvictError(f"sglang-evict eviction needs --page-size 1, got {pool.page_size}")
    check_model(runner.model_config)
    cfg = config()
    L, H = pool.layer_num, pool.head_num
    n = _state.physical_tokens
    if n is None:
        raise HeadEvictError("sglang-evict: the KV pool was sized without the eviction hook")
    ev_cfg = cfg.evictor_config()
    evictor = Evictor(ev_cfg, L, H) if ev_cfg is not None else None
    alloc = runner.token_to_kv_pool_allocator
    state = HeadKVCache(
        num_virtual=alloc.size + pool.page_size + 1,
        num_layers=L,
        num_kv_heads=H,
        head_dim=pool.head_dim,
        v_head_dim=pool.v_head_dim,
        capacity=n * L * H,
        dtype=pool.store_dtype,
        device=pool.device,
        evictor=evictor,
        num_rows=runner.req_to_token_pool.req_to_token.shape[0],
        max_row_len=runner.req_to_token_pool.req_to_token.shape[1],
        debug_check=bool(cfg.debug_check),
        use_triton=cfg.use_triton(pool.device),
    )
    _check_fits(runner, state, n)
    _state.cache = state
    _state.runner = runner
    logger.info(
        "sglang-evict: head-slot KV %.1f MiB: %d head-slots (%d tokens x %d layers x %d KV "
        "heads), %d virtual ids, policy %s%s",
        state.nbytes / 2**20, state.capacity, n, L, H, alloc.size, cfg.policy,
        f", budget M={cfg.budget} B={cfg.buffer} (trigger {evictor.global_trigger} head-slots "
        "per request)" if evictor is not None else "",
    )
    return result


def _check_fits(runner, state, n: int) -> None:
    """Refuse settings under which one step could need more head-slots than exist even after
    evicting everything evictable."""
    sa = runner.server_args
    chunk = sa.chunked_prefill_size if sa.chunked_prefill_size and sa.chunked_prefill_size > 0 else None
    if chunk is None or chunk > n // 2:
        raise HeadEvictError(
            f"sglang-evict: with eviction, --chunked-prefill-size must be set and at most half "
            f"the physical pool ({n // 2} tokens; the pool holds {n} tokens at full size), got "
            f"{sa.chunked_prefill_size}"
        )
    pol = state.evictor.config.policy if state.evictor is not None else None
    if pol is not None:
        protected = (pol.sinks + pol.window + 1) * runner.max_running_requests
        if protected + chunk > n:
            raise HeadEvictError(
                f"sglang-evict: {runner.max_running_requests} running requests x (sinks "
                f"{pol.sinks} + window {pol.window} + 1) protected tokens plus a prefill chunk "
                f"of {chunk} exceed the physical pool of {n} tokens; lower "
                "--max-running-requests or the protected sizes"
            )


# ------------------------------------------------------------------ SGLang's allocator


def around_alloc_free(original, allocator, free_index, *args, **kwargs):
    state = _state.cache
    if state is not None and allocator.free_group is None and free_index.numel():
        state.free(free_index)
    return original(allocator, free_index, *args, **kwargs)


def after_alloc_clear(result, allocator, *args, **kwargs):
    state = _state.cache
    if state is not None:
        state.reset()
    return result


def around_decode_capacity(original, allocator, *args, **kwargs):
    ok = original(allocator, *args, **kwargs)
    state = _state.cache
    if not ok or state is None:
        return ok
    requests = kwargs.get("requests")
    n = len(requests) if requests is not None else kwargs.get("num_tokens", 0)
    need = n * state.heads_per_token
    return state.pool.num_free + state.reclaimable() >= need


# ------------------------------------------------------------------ after each step


def after_forward(result, runner, *args, **kwargs):
    forward_batch = args[0] if args else kwargs["forward_batch"]
    state = _state.cache
    if state is None or runner is not _state.runner:
        return result
    if forward_batch.forward_mode.is_idle() or state.new_slots is None:
        return result
    state.after_forward(forward_batch, runner.req_to_token_pool.req_to_token)
    return result


def release_stats(req, row: int) -> dict | None:
    """Statistics of the request leaving `row` (called when SGLang releases its KV)."""
    state = _state.cache
    if state is None:
        return None
    stats, ev = state.release(row)
    if stats is None:
        return None
    meta = stats.as_meta(state.heads_per_token, ev.global_trigger if ev is not None else None)
    meta["policy"] = _policy_label(ev)
    return meta


def _policy_label(ev) -> dict:
    if ev is None:
        return {"policy": "none"}
    c = ev.config
    return {
        "policy": c.policy.name, "mode": c.mode, "budget": c.budget, "buffer": c.buffer,
        "sinks": c.policy.sinks, "window": c.policy.window,
    }


# ------------------------------------------------------------------ per-request policy

REQUEST_KEY = "sglang_evict"  # sampling_params.custom_params[REQUEST_KEY]
REQUEST_FIELDS = ("policy", "budget", "buffer", "sinks", "window", "min_per_head")


def request_config(custom_params) -> EvictConfig | None:
    """The per-request override in `custom_params["sglang_evict"]` (same names as the server
    flags without the --evict- prefix), merged over the server's settings; None if absent.
    ValueError naming the problem otherwise."""
    if not isinstance(custom_params, dict) or REQUEST_KEY not in custom_params:
        return None
    override = custom_params[REQUEST_KEY]
    server = config()
    if not server.evicting:
        raise ValueError(
            f"custom_params.{REQUEST_KEY}: this server was started without --evict-policy"
        )
    if not isinstance(override, dict):
        raise ValueError(f"custom_params.{REQUEST_KEY} must be an object, got {override!r}")
    unknown = sorted(set(override) - set(REQUEST_FIELDS))
    if unknown:
        raise ValueError(
            f"custom_params.{REQUEST_KEY}: unknown field(s) {', '.join(unknown)}; "
            f"valid: {', '.join(REQUEST_FIELDS)}"
        )
    for k, v in override.items():
        if k != "policy" and (not isinstance(v, int) or isinstance(v, bool)):
            raise ValueError(f"custom_params.{REQUEST_KEY}.{k} must be an integer, got {v!r}")
    import dataclasses

    base = dataclasses.asdict(server)
    if "policy" in override and "budget" not in override and override["policy"] == "none":
        base["budget"] = None
    base.update(override)
    try:
        cfg = EvictConfig(**base)
        cfg.check_gates_present()
    except Exception as e:  # EvictConfigError: phrased with flags; name the request field
        raise ValueError(f"custom_params.{REQUEST_KEY}: {e}") from None
    return cfg


def after_sampling_verify(result, params, *args, **kwargs):
    # Runs in the tokenizer manager: a bad override is refused with the request, before any
    # scheduling, and never reaches the scheduler.
    request_config(params.custom_params)
    return result


_evictors: dict = {}


def _evictor_for(cfg: EvictConfig):
    from sglang_evict.eviction.evictor import Evictor

    ev_cfg = cfg.evictor_config()
    if ev_cfg is None:
        return None
    key = repr(ev_cfg)
    if key not in _evictors:
        _evictors[key] = Evictor(ev_cfg, _state.cache.num_layers, _state.cache.num_kv_heads)
    return _evictors[key]


def after_prepare_for_extend(result, batch, *args, **kwargs):
    state = _state.cache
    if state is None:
        return result
    for req in batch.reqs:
        cfg = request_config(req.sampling_params.custom_params)
        row = req.kv.req_pool_idx
        if cfg is not None and row is not None:
            state.set_row_evictor(row, _evictor_for(cfg))
    return result


# ------------------------------------------------------------------ the attention backend


def create_backend(runner):
    from sglang_evict.backend.attention_backend import HeadSlotAttnBackend

    if _state.cache is None:
        raise HeadEvictError(
            f"--attention-backend {ATTENTION_BACKEND} serves head-granular KV: start the "
            "server with sglang-evict serve --evict-policy ..."
        )
    return HeadSlotAttnBackend(runner, _state.cache, config())


def register_backend() -> None:
    """Make `--attention-backend sglang_evict` known (server main parses the CLI; the scheduler
    builds the backend)."""
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import register_attention_backend

    if ATTENTION_BACKEND not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([ATTENTION_BACKEND])
    register_attention_backend(ATTENTION_BACKEND)(create_backend)


def register(registry, hook_type) -> None:
    register_backend()
    if not config().evicting:
        return
    registry.register(DERIVE_SIZES, around_derive_pool_sizes, hook_type.AROUND)
    registry.register(CREATE_BUFFERS, around_create_buffers, hook_type.AROUND)
    registry.register(ALLOC_POOL, after_alloc_memory_pool, hook_type.AFTER)
    registry.register(ALLOC_FREE, around_alloc_free, hook_type.AROUND)
    registry.register(ALLOC_CLEAR, after_alloc_clear, hook_type.AFTER)
    registry.register(FORWARD, after_forward, hook_type.AFTER)
    registry.register(DECODE_CAPACITY, around_decode_capacity, hook_type.AROUND)
    registry.register(SAMPLING_VERIFY, after_sampling_verify, hook_type.AFTER)
    registry.register(PREPARE_EXTEND, after_prepare_for_extend, hook_type.AFTER)
    registry.register(CHECK_ARGS, after_check_server_args, hook_type.AFTER)
