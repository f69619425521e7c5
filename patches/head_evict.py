"""Head-granular eviction inside SGLang: SGLang's token pool becomes virtual, KV lives in
head-slots. One module per hook, each naming its targets (sglang 0.5.23, pinned by
tests/unit/test_upstream_guards.py); this one registers them, only with `--evict-policy`
(EvictConfig.evicting), except the attention backend's name, which the CLI always knows:

    evict_refusals   ServerArgs.check_server_args: settings eviction cannot serve, one line each
    evict_pool       pool sizing (virtual token ids, head-slot capacity), the HeadKVCache
    evict_admission  allocator free / clear, decode capacity, prefill budgets (physical pool)
    evict_step       after every forward: the batched evictor; per-request statistics
    evict_radix      the radix tree's checkpoints: cached prefixes shared with their head-slots
    evict_requests   per-request policy overrides (custom_params), refused when malformed
    evict_backend    the `sglang_evict` attention backend
    faults           a fault in a hook ends the requests it concerns, never the scheduler
(what they share in one process: runtime.Runtime, created by the plugin)
"""

from __future__ import annotations

from sglang_evict.patches import (
    evict_admission,
    evict_backend,
    evict_pool,
    evict_radix,
    evict_refusals,
    evict_requests,
    evict_step,
    faults,
)

HOOKS = (evict_refusals, evict_pool, evict_admission, evict_step, evict_requests, evict_radix,
         faults)


def register(registry, hook_type, rt) -> None:
    evict_backend.register_backend(rt)
    if not rt.config.evicting:
        return
    for module in HOOKS:
        module.register(registry, hook_type, rt)
