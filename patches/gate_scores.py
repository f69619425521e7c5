"""The gates-only mode (`--evict-gates` without `--evict-policy`): log beta scored beside SGLang's
own paged KV pool, nothing evicted; statistics per request. Targets sglang 0.5.23 (checked by
tests/unit/test_upstream_guards.py):
- DefaultPoolConfigurator._compute_cell_size (AROUND): add the score bytes (or, with eviction,
  the head-slot metadata and the virtual map) to SGLang's per-token cost, so the pool is sized
  from one memory budget for KV and scores together.
- ModelRunner.alloc_memory_pool (AFTER): allocate the score store beside the KV pool, same
  slot numbering, and report its memory share.
- MHATokenToKVPool._store_kv_layer (AROUND): where SGLang writes a layer's new K and V, write
  K, V, log beta and positions in one pass with the store kernel.
"""

from __future__ import annotations

import logging

from sglang_evict.cache.score_store import ScoreStore, bytes_per_slot
from sglang_evict.patches.gate_attach import GateAttachError
from sglang_evict.patches.runtime import bind

logger = logging.getLogger(__name__)

ALLOC_POOL = "sglang.srt.model_executor.model_runner.ModelRunner.alloc_memory_pool"
CELL_SIZE = (
    "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size"
)
STORE_KV = "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool._store_kv_layer"


def around_cell_size(rt, original, configurator, kvc, num_layers, *args, **kwargs):
    cell = original(configurator, kvc, num_layers, *args, **kwargs)
    config = rt.config
    if not config.active:
        return cell
    from sglang.srt.runtime_context import get_parallel

    heads = kvc.model_config.get_num_kv_heads(get_parallel().attn_tp_size)
    if config.evicting:
        from sglang_evict.sizing import bytes_per_token

        return cell + bytes_per_token(num_layers, heads, config.virtual_factor)
    return cell + bytes_per_slot(num_layers, heads)


def after_alloc_memory_pool(rt, result, runner, *args, **kwargs):
    state = rt.gates
    if state is None or runner.is_draft_worker or state.config.evicting:
        # With eviction, log beta lives in the head-slots (head_cache.py), not a score store.
        return result
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    pool = runner.token_to_kv_pool
    if not isinstance(pool, MHATokenToKVPool):
        raise GateAttachError(
            f"sglang-evict needs an MHA KV pool; this model uses {type(pool).__name__}"
        )
    layer_num = len(pool.k_buffer)
    if layer_num != state.num_layers or pool.head_num != state.num_kv_heads:
        raise GateAttachError(
            f"sglang-evict: the KV pool has {layer_num} layers x {pool.head_num} KV heads, the "
            f"gates have {state.num_layers} x {state.num_kv_heads} (tensor or pipeline "
            "parallelism is not supported yet)"
        )
    num_slots = pool.k_buffer[0].shape[0]
    state.store = ScoreStore(num_slots, layer_num, pool.head_num, pool.page_size, pool.device)
    pool._sglang_evict_scores = state.store
    kv_bytes = sum(b.numel() * b.element_size() for b in (*pool.k_buffer, *pool.v_buffer))
    logger.info(
        "sglang-evict: score store %.1f MiB for %d slots (%.2f%% of the KV pool's %.1f MiB)",
        state.store.nbytes / 2**20, num_slots, 100 * state.store.nbytes / kv_bytes, kv_bytes / 2**20,
    )
    return result


def around_store_kv_layer(rt, original, pool, layer_idx, loc, cache_k, cache_v, *args, **kwargs):
    state = rt.gates
    store = getattr(pool, "_sglang_evict_scores", None)
    layer_id = layer_idx + pool.start_layer
    if (
        state is None
        or store is None
        or layer_id not in state.pending
        or pool.store_dtype != pool.dtype
        or getattr(pool, "kv_cache_layout", None) == "vectorized_5d"
    ):
        return original(pool, layer_idx, loc, cache_k, cache_v, *args, **kwargs)
    log_beta, positions = state.pending.pop(layer_id)
    n = loc.shape[0]
    from sglang_evict.kernels.kv_store import paged_view

    page = pool.page_size
    state.store_fn(loc.device)(
        paged_view(pool.k_buffer[layer_idx], page),
        paged_view(pool.v_buffer[layer_idx], page),
        store.log_beta[layer_id],
        store.pos,
        cache_k,
        cache_v,
        log_beta[:n],
        positions[:n],
        loc,
    )
    return None


def register(registry, hook_type, rt) -> None:
    if not rt.config.active:
        return
    registry.register(CELL_SIZE, bind(rt, around_cell_size), hook_type.AROUND)
    registry.register(ALLOC_POOL, bind(rt, after_alloc_memory_pool), hook_type.AFTER)
    if not rt.config.evicting:
        registry.register(STORE_KV, bind(rt, around_store_kv_layer), hook_type.AROUND)
