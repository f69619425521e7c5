"""Per-request statistics in the response's meta_info["sglang_evict"]. Targets sglang 0.5.23
(checked by tests/unit/test_upstream_guards.py):
- release_kv_cache (BEFORE): the request's eviction statistics (and, with gates attached, the
  mean log beta of its entries when it held them all), taken when SGLang releases its KV.
- Scheduler.get_output_streamer_class (AROUND): they ride the output streamer's per-request
  customized info.
- TokenizerManager.update_request_meta_info (AROUND): that entry is one object. SGLang's
  customized info is a list accumulated over a request's outputs (and sliced per streamed
  chunk); ours is sent once, when the request finishes, so it is set, not accumulated.
"""

from __future__ import annotations

import torch

from sglang_evict.patches import evict_step, faults
from sglang_evict.patches.runtime import bind

RELEASE_KV = "sglang.srt.mem_cache.common.release_kv_cache"
STREAMER_CLASS = "sglang.srt.managers.scheduler.Scheduler.get_output_streamer_class"
UPDATE_META = "sglang.srt.managers.tokenizer_manager.TokenizerManager.update_request_meta_info"
META_KEY = "sglang_evict"
MAX_PENDING_STATS = 4096

# Per-request statistics wait for the request's response in the runtime's `finished_stats`
# (rid -> meta_info entry), popped when the response is streamed; a request that finishes
# without a response (aborted) would leave one behind, so only the newest MAX_PENDING_STATS
# are kept.


def request_stats(log_beta: torch.Tensor) -> dict:
    """The gates' scores of a request's entries, log_beta [L, n, H], averaged over its tokens."""
    per_head = log_beta.double().mean(dim=1) if log_beta.shape[1] else log_beta.new_zeros(
        log_beta.shape[0], log_beta.shape[2], dtype=torch.float64
    )
    return {
        "scored_tokens": int(log_beta.shape[1]),
        "mean_log_beta_per_layer": per_head.mean(dim=1).tolist(),
        "mean_log_beta_per_layer_head": per_head.tolist(),
    }


def before_release_kv_cache(rt, req, tree_cache, *args, **kwargs):
    row = req.kv.req_pool_idx
    if row is None:
        return None
    faults.forget_row(rt, row)
    # SGLang's release goes on whatever happens here: its free hook returns the memory.
    faults.for_request(rt, "the request's statistics at release", req, _take_stats, rt, req,
                       row, tree_cache)
    return None


def _take_stats(rt, req, row: int, tree_cache) -> None:
    # Always hand the row's eviction statistics over: the row may be reused next step.
    evict_stats = evict_step.release_stats(rt, req, row)
    if not req.finished():
        return
    entry = dict(evict_stats or {})
    if rt.gates is not None and rt.cache is not None:
        # The last sampled token has no KV yet: committed KV is what was scored. A request that
        # lost entries to eviction reports none (a mean over survivors would mislead).
        n = req.kv.kv_committed_len
        log_beta = rt.cache.log_beta_of(tree_cache.req_to_token_pool.req_to_token[row, :n])
        if log_beta is not None:
            entry.update(request_stats(log_beta))
    if not entry:
        return
    pending = rt.finished_stats
    pending[req.rid] = entry
    while len(pending) > MAX_PENDING_STATS:
        pending.popitem(last=False)


def around_output_streamer_class(rt, original, scheduler, *args, **kwargs):
    base = original(scheduler, *args, **kwargs)
    if not rt.config.active:
        return base
    pending = rt.finished_stats

    class EvictOutputStreamer(base):
        has_additional_customized_info = True

        def build_additional_customized_info(self, reqs):
            values = super().build_additional_customized_info(reqs)
            values[META_KEY] = [
                [pending.pop(r.rid)] if r.rid in pending else [] for r in reqs
            ]
            return values

        def is_request_level_customized_info_key(self, key):
            return key == META_KEY or super().is_request_level_customized_info_key(key)

    EvictOutputStreamer.__name__ = f"Evict{base.__name__}"
    return EvictOutputStreamer


def around_update_request_meta_info(original, manager, meta_info, state, customized_info, index,
                                    *args, **kwargs):
    if META_KEY not in customized_info:
        return original(manager, meta_info, state, customized_info, index, *args, **kwargs)
    rest = {k: v for k, v in customized_info.items() if k != META_KEY}
    result = original(manager, meta_info, state, rest, index, *args, **kwargs)
    entries = customized_info[META_KEY][index]
    if entries:
        meta_info[META_KEY] = entries[-1]
    return result


def register(registry, hook_type, rt) -> None:
    if not rt.config.active:
        return
    registry.register(RELEASE_KV, bind(rt, before_release_kv_cache), hook_type.BEFORE)
    registry.register(STREAMER_CLASS, bind(rt, around_output_streamer_class), hook_type.AROUND)
    registry.register(UPDATE_META, around_update_request_meta_info, hook_type.AROUND)
