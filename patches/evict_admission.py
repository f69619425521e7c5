"""SGLang's allocator and admission, seen through the physical pool.

- TokenToKVPoolAllocator.free / clear (AROUND / AFTER): freeing a virtual id frees its head-slots,
  so finish, abort, retraction and flush all return physical memory.
- BaseTokenToKVPoolAllocator.check_decode_capacity (AROUND): the next decode step must also fit
  the physical pool after reclaiming evictable head-slots, else SGLang retracts (eviction always
  comes first; retraction only when eviction cannot make room).
- PrefillAdder.__init__ (AFTER) / add_one_req / add_chunked_req (AROUND): a prefill round counts
  the physical tokens free or reclaimable, less the decode tokens a mixed chunk carries; a
  request whose next chunk does not fit waits, so admission never outgrows the pool.
- With --evict-reclaim lru-first, both checks first free whole unreferenced radix-tree nodes,
  least recently used first (SGLang's own tree eviction, lossless for running requests: a later
  request recomputes what it no longer finds), until the step's tokens are free in the physical
  pool or the tree has none to give; lossy reclaim only covers what remains.
- validate_input_length, as the scheduler calls it (AROUND): a request whose protected KV can
  never fit the physical pool is refused with HTTP 400 naming the limit, instead of waiting
  forever (the pool SGLang checks against is the virtual one, `--evict-oversubscribe` times
  larger).

A fault in these hooks (faults.py) refuses the waiting request it concerns with HTTP 500, or,
where it concerns no one request, falls back to counting nothing as reclaimable: SGLang then
waits or retracts instead of outgrowing the pool, and the scheduler goes on.
"""

from __future__ import annotations

from sglang_evict.patches import evict_step, faults
from sglang_evict.patches.runtime import bind

ALLOC_FREE = "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator.free"
ALLOC_CLEAR = "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator.clear"
DECODE_CAPACITY = (
    "sglang.srt.mem_cache.allocator.base.BaseTokenToKVPoolAllocator.check_decode_capacity"
)
PREFILL_ADDER = "sglang.srt.managers.schedule_policy.PrefillAdder.__init__"
ADD_ONE_REQ = "sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req"
ADD_CHUNKED_REQ = "sglang.srt.managers.schedule_policy.PrefillAdder.add_chunked_req"
VALIDATE_INPUT = "sglang.srt.managers.scheduler.validate_input_length"


def around_alloc_free(rt, original, allocator, free_index, *args, **kwargs):
    state = rt.cache
    if state is not None and allocator.free_group is None and free_index.numel():
        try:
            state.free(free_index)
        except Exception as exc:  # noqa: BLE001 - SGLang's free must go on
            faults.degraded(rt, "freeing head-slots", exc, "their virtual ids are freed; "
                            "/metrics head_slots_unaccounted shows what stayed held")
    return original(allocator, free_index, *args, **kwargs)


def after_alloc_clear(rt, result, allocator, *args, **kwargs):
    state = rt.cache
    if state is not None:
        try:
            state.reset()
            evict_step.publish_metrics(rt)
        except Exception as exc:  # noqa: BLE001
            faults.degraded(rt, "resetting the head-slot pool", exc,
                            "/metrics head_slots_unaccounted shows what stayed held")
    return result


def around_decode_capacity(rt, original, allocator, *args, **kwargs):
    ok = original(allocator, *args, **kwargs)
    state = rt.cache
    if not ok or state is None:
        return ok
    requests = kwargs.get("requests")
    n = len(requests) if requests is not None else kwargs.get("num_tokens", 0)
    free_tree_nodes(rt, state, kwargs.get("tree_cache"), n)
    return physical_tokens_available(rt, state) >= n


TREE_LRU = "freeing radix-tree nodes for the step"


def free_tree_nodes(rt, state, tree_cache, tokens: int) -> None:
    """--evict-reclaim lru-first: SGLang's LRU eviction of whole unreferenced tree nodes until
    `tokens` whole tokens (all L*H head-slots each) are free in the physical pool. A tree token
    frees at most L*H head-slots (fewer where it has holes), hence the loop; it stops when the
    tree gives nothing more or a pass frees nothing (a deferred free group)."""
    if tree_cache is None or rt.config.reclaim != "lru-first" or tokens <= 0:
        return
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    try:
        lh = state.heads_per_token
        while (short := tokens - state.pool.num_free // lh) > 0:
            before, evictable = state.pool.num_free, tree_cache.evictable_size()
            if evictable <= 0:
                return
            tree_cache.evict(EvictParams(num_tokens=min(short, evictable)))
            if state.pool.num_free == before:
                return
    except Exception as exc:  # noqa: BLE001 - reclaim below still covers the step
        faults.degraded(rt, TREE_LRU, exc, "reclaim ranks the tree's entries with the rest")


def physical_tokens_available(rt, state) -> int:
    """Whole tokens (all L*H head-slots each) that fit the physical pool now, counting what
    reclaim can free (a lower bound of it; nothing, if judging it fails)."""
    try:
        reclaimable = state.reclaimable()
    except Exception as exc:  # noqa: BLE001 - 0 is always a lower bound
        faults.degraded(rt, "counting reclaimable head-slots", exc,
                        "counting none: admission waits and decoding retracts sooner")
        reclaimable = 0
    return (state.pool.num_free + reclaimable) // state.heads_per_token


def after_prefill_adder_init(rt, result, adder, *args, **kwargs):
    # The physical tokens this prefill round may still use (the adder lives for one round),
    # less one per running request a mixed chunk (--enable-mixed-chunk) decodes beside it.
    state = rt.cache
    if state is not None:
        mixed = _mixed_decode_tokens(args, kwargs)
        adder._evict_tokens_left = physical_tokens_available(rt, state) - mixed
        adder._evict_tokens_start = adder._evict_tokens_left + mixed
    return result


# PrefillAdder.__init__(page_size, tree_cache, allocator, running_batch, new_token_ratio,
# rem_input_tokens, rem_chunk_tokens, num_mixed_decode_tokens=0, ...)
_MIXED_POSITION = 7


def _mixed_decode_tokens(args: tuple, kwargs: dict) -> int:
    if "num_mixed_decode_tokens" in kwargs:
        return int(kwargs["num_mixed_decode_tokens"] or 0)
    return int(args[_MIXED_POSITION] or 0) if len(args) > _MIXED_POSITION else 0


def _next_chunk(adder, req) -> int:
    """Tokens SGLang would prefill for `req` now: the rest of its input, at most one chunk."""
    want = len(req.full_untruncated_fill_ids) - req.prefix_len
    if adder.rem_chunk_tokens is not None:
        want = min(want, max(adder.rem_chunk_tokens, 0))
    return want


ADMISSION = "the prefill admission"


def _admit(rt, original, adder, req, refused, *args, **kwargs):
    # SGLang admits prefills against its oversubscribed virtual pool; the new tokens need real
    # head-slots. A request whose next chunk does not fit what the physical pool can give (free
    # plus reclaimable) waits for a later round, whole: SGLang's own chunking is left alone
    # (truncating a retracted request's re-prefill to fit is a path it does not survive).
    left = getattr(adder, "_evict_tokens_left", None)
    if left is None:
        return original(adder, req, *args, **kwargs)
    try:
        want = _next_chunk(adder, req)
    except Exception as exc:  # noqa: BLE001 - the boundary: this request alone
        if getattr(req, "to_finish", None) is None:
            faults.count(rt, ADMISSION)
            faults.refuse(req, ADMISSION, exc)
            return refused
        want = 1  # a request refused already: SGLang runs its one token and ends it
    committed = getattr(adder, "_evict_tokens_start", left) - left
    free_tree_nodes(rt, rt.cache, getattr(adder, "tree_cache", None), committed + want)
    if want > left:
        return refused
    before = getattr(req, "extend_end", None)
    result = original(adder, req, *args, **kwargs)
    try:
        if getattr(req, "extend_end", None) != before or req in adder.can_run_list:
            adder._evict_tokens_left = left - (req.extend_end - req.prefix_len)
    except Exception as exc:  # noqa: BLE001 - admitted by SGLang: ended after its chunk
        faults.count(rt, ADMISSION)
        faults.abort(req, ADMISSION, exc)
        adder._evict_tokens_left = left - want
    return result


def around_add_one_req(rt, original, adder, req, *args, **kwargs):
    from sglang.srt.managers.schedule_policy import AddReqResult

    return _admit(rt, original, adder, req, AddReqResult.NO_TOKEN, *args, **kwargs)


def around_add_chunked_req(rt, original, adder, req, *args, **kwargs):
    # returning the request unchanged = not continued this round (SGLang's own parked path)
    return _admit(rt, original, adder, req, req, *args, **kwargs)


def never_fits(cfg, prompt_len: int, pool: int, chunk: int) -> str | None:
    """One line if a request with settings `cfg` (EvictConfig) and a prompt of `prompt_len`
    tokens can never run in a physical pool of `pool` tokens with prefill chunks of `chunk`:
    what it keeps whole (policy none: the prompt and its next token; otherwise its sinks,
    recent window and next token, beside one prefill chunk) exceeds the pool; else None."""
    if cfg.policy in (None, "none"):
        need, what = prompt_len + 1, "its whole prompt and next token (policy none)"
    else:
        protected = min(prompt_len + 1, cfg.sinks + cfg.window + 1)
        need = protected + min(chunk, prompt_len)
        what = (f"{protected} protected tokens (sinks {cfg.sinks} + window {cfg.window} + 1) "
                f"beside a prefill chunk of {min(chunk, prompt_len)}")
    if need <= pool:
        return None
    return (f"sglang-evict: this request keeps {what}: {need} tokens of KV, more than the "
            f"physical pool holds ({pool} tokens at full size)")


LENGTH_CHECK = "the admission's length check"


def around_validate_input_length(rt, original, req, *args, **kwargs):
    error = original(req, *args, **kwargs)
    if error is not None or rt.cache is None or rt.physical_tokens is None:
        return error
    try:
        return _length_error(rt, req)
    except Exception as exc:  # noqa: BLE001 - the boundary: this request alone
        faults.count(rt, LENGTH_CHECK)
        faults.refuse(req, LENGTH_CHECK, exc)
        return None


def _length_error(rt, req) -> str | None:
    from sglang_evict.patches.evict_requests import request_config

    try:
        cfg = request_config(req.sampling_params.custom_params, rt.config) or rt.config
    except ValueError as e:  # refused in the tokenizer manager already; say it again here
        return str(e)
    chunk = rt.prefill_chunk or rt.physical_tokens
    return never_fits(cfg, len(req.origin_input_ids), rt.physical_tokens, chunk)


def register(registry, hook_type, rt) -> None:
    registry.register(ALLOC_FREE, bind(rt, around_alloc_free), hook_type.AROUND)
    registry.register(ALLOC_CLEAR, bind(rt, after_alloc_clear), hook_type.AFTER)
    registry.register(DECODE_CAPACITY, bind(rt, around_decode_capacity), hook_type.AROUND)
    registry.register(PREFILL_ADDER, bind(rt, after_prefill_adder_init), hook_type.AFTER)
    registry.register(VALIDATE_INPUT, bind(rt, around_validate_input_length), hook_type.AROUND)
    registry.register(ADD_ONE_REQ, bind(rt, around_add_one_req), hook_type.AROUND)
    registry.register(ADD_CHUNKED_REQ, bind(rt, around_add_chunked_req), hook_type.AROUND)
