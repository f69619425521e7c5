"""Pool sizing: SGLang's token pool becomes virtual, the KV memory becomes head-slots.

- KVCacheConfigurator._derive_pool_sizes (AROUND): SGLang sized its pool from memory as N tokens;
  the physical head-slot capacity is N*L*H (the same bytes) and SGLang's virtual token pool gets
  N * oversubscribe ids, so requests may hold more tokens than fit at full size.
- MHATokenToKVPool._create_buffers (AROUND): SGLang's per-layer K/V buffers become placeholders
  (upstream's NoOp pool layout); nothing reads them, the sglang_evict backend owns the KV.
- ModelRunner.alloc_memory_pool (AFTER): build the HeadKVCache, after checking that the model's
  attention is one the kernels implement, capping the running requests the user left open to
  what the pool holds at budget, and checking that one step always fits.
- DefaultPoolConfigurator._compute_cell_size (AROUND): add the head-slot metadata and the virtual
  map to SGLang's per-token cost, so one memory budget covers everything.
"""

from __future__ import annotations

import logging

from sglang_evict.errors import HeadEvictError
from sglang_evict.patches.runtime import bind
from sglang_evict.sizing import default_running, protected_fits

logger = logging.getLogger(__name__)

DERIVE_SIZES = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._derive_pool_sizes"
CREATE_BUFFERS = "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool._create_buffers"
ALLOC_POOL = "sglang.srt.model_executor.model_runner.ModelRunner.alloc_memory_pool"
CELL_SIZE = (
    "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size"
)


def around_cell_size(rt, original, configurator, kvc, num_layers, *args, **kwargs):
    from sglang.srt.runtime_context import get_parallel

    from sglang_evict.sizing import bytes_per_token

    cell = original(configurator, kvc, num_layers, *args, **kwargs)
    heads = kvc.model_config.get_num_kv_heads(get_parallel().attn_tp_size)
    return cell + bytes_per_token(num_layers, heads, rt.config.virtual_factor)


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


def around_derive_pool_sizes(rt, original, configurator, *args, **kwargs):
    sizes = original(configurator, *args, **kwargs)
    if configurator.is_draft_worker:
        return sizes
    import msgspec

    n = sizes.max_total_num_tokens
    rt.physical_tokens = n
    virtual = n * rt.config.virtual_factor
    logger.info(
        "sglang-evict: KV memory for %d tokens at full size; %d virtual token ids", n, virtual
    )
    return msgspec.structs.replace(sizes, max_total_num_tokens=virtual)


def around_create_buffers(original, pool, *args, **kwargs):
    from sglang.srt.mem_cache.memory_pool import NoOpMHATokenToKVPool

    # Placeholders only: the head-slot cache holds the KV (upstream's own no-op layout).
    return NoOpMHATokenToKVPool._create_buffers(pool)


def after_alloc_memory_pool(rt, result, runner, *args, **kwargs):
    if runner.is_draft_worker:
        return result
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from sglang_evict.backend.head_cache import HeadKVCache
    from sglang_evict.eviction.settings import make_evictor

    pool = runner.token_to_kv_pool
    if not isinstance(pool, MHATokenToKVPool):
        raise HeadEvictError(
            f"sglang-evict eviction needs an MHA KV pool; this model uses {type(pool).__name__}"
        )
    if pool.page_size != 1:
        raise HeadEvictError(f"sglang-evict eviction needs --page-size 1, got {pool.page_size}")
    check_model(runner.model_config)
    cfg = rt.config
    L, H = pool.layer_num, pool.head_num
    n = rt.physical_tokens
    if n is None:
        raise HeadEvictError("sglang-evict: the KV pool was sized without the eviction hook")
    evictor = make_evictor(cfg, L, H)
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
        # lru-first is SGLang's tree eviction, driven at admission (evict_admission)
        tree_first=cfg.reclaim == "tree-first",
    )
    _fit_running(runner, cfg, evictor is not None, n)
    rt.prefill_chunk = _check_fits(runner, state, n)
    rt.cache = state
    rt.runner = runner
    logger.info(
        "sglang-evict: head-slot KV %.1f MiB: %d head-slots (%d tokens x %d layers x %d KV "
        "heads), %d virtual ids, policy %s%s",
        state.nbytes / 2**20, state.capacity, n, L, H, alloc.size, cfg.policy,
        f", budget M={cfg.budget} B={cfg.buffer} (trigger {evictor.global_trigger} head-slots "
        "per request)" if evictor is not None else "",
    )
    return result


def _fit_running(runner, cfg, evicting: bool, n: int) -> None:
    """Where the user left --max-running-requests open and SGLang sized the pool itself (from
    memory, e.g. --mem-fraction-static), cap the running requests as `serve` does for a given
    pool: every one can hold its budget beside a prefill chunk. SGLang's own default (about half
    the pool's tokens) assumes nothing is evicted and would fail the fit check below."""
    sa = runner.server_args
    chunk = sa.chunked_prefill_size
    if not evicting or sa.max_running_requests is not None or not chunk or chunk > n // 2:
        return  # set by the user (checked below), or a chunk _check_fits refuses
    fit = default_running(cfg.budget, cfg.buffer, n, chunk)
    if fit < runner.max_running_requests:
        logger.info("sglang-evict: pool of %d tokens at full size: max running requests %d "
                    "(SGLang's default %d)", n, fit, runner.max_running_requests)
        runner.max_running_requests = fit
        if getattr(runner, "memory_pool_config", None) is not None:
            runner.memory_pool_config.max_running_requests = fit


def _check_fits(runner, state, n: int) -> int:
    """Refuse settings under which one step could need more head-slots than exist even after
    evicting everything evictable; returns the prefill chunk."""
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
        if not protected_fits(runner.max_running_requests, pol.sinks, pol.window, chunk, n):
            raise HeadEvictError(
                f"sglang-evict: {runner.max_running_requests} running requests x (sinks "
                f"{pol.sinks} + window {pol.window} + 1) protected tokens plus a prefill chunk "
                f"of {chunk} exceed the physical pool of {n} tokens; lower "
                "--max-running-requests or the protected sizes"
            )
    return chunk


def register(registry, hook_type, rt) -> None:
    registry.register(CELL_SIZE, bind(rt, around_cell_size), hook_type.AROUND)
    registry.register(DERIVE_SIZES, bind(rt, around_derive_pool_sizes), hook_type.AROUND)
    registry.register(CREATE_BUFFERS, around_create_buffers, hook_type.AROUND)
    registry.register(ALLOC_POOL, bind(rt, after_alloc_memory_pool), hook_type.AFTER)
