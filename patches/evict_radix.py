"""The radix cache with head-granular KV: UnifiedRadixCache.checkpoint (AFTER).

When SGLang's tree takes a request's tokens (a finished request, or a chunk of a running one),
the tokens' surviving head-slots become shared: the tree holds them with their scores and
positions, later requests that match the prefix list them without recomputing gates or KV, a
request's own eviction no longer takes them, and the global evictor ranks them with everything
else. The tree frees what it evicts through the allocator (evict_admission's free hook); a new
request's matched prefix is loaded into its lists when it first runs (HeadKVCache.prepare).
"""

from __future__ import annotations

from sglang_evict.patches.runtime import bind

CHECKPOINT = "sglang.srt.mem_cache.unified_radix_cache.UnifiedRadixCache.checkpoint"


def after_checkpoint(rt, result, tree_cache, req, *args, **kwargs):
    state = rt.cache
    if state is None or tree_cache.disable:
        return result
    row = req.kv.req_pool_idx
    protected = req.kv.cache_protected_len
    if row is None or not protected:
        return result
    running = bool(state.stats.active[row])  # a finishing request released its row already
    state.tree_insert(row, tree_cache.req_to_token_pool.req_to_token, protected, running)
    return result


def register(registry, hook_type, rt) -> None:
    registry.register(CHECKPOINT, bind(rt, after_checkpoint), hook_type.AFTER)
