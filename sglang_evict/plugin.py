"""SGLang plugin entry point (group `sglang.srt.plugins`).

`load_plugins()` calls `register()` in every SGLang process (server main, scheduler,
detokenizer); hooks registered here are applied by SGLang right after, before any model is
built. Each process gets one `Runtime` that all its hooks share. Keep this import-light: it runs
in every process.

On another SGLang version than the pinned one nothing is patched: a server configured for
sglang-evict gets only `hook_check`, which refuses with one line at start-up; plain SGLang
(no sglang-evict settings) runs untouched.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from sglang_evict.config import EvictConfig
    from sglang_evict.patches import hook_check

    _registered = True
    why = hook_check.version_refusal()
    if why is not None and not EvictConfig.from_env().active:
        logger.warning("sglang-evict: %s; plain SGLang runs without the plugin", why)
        return
    hook_check.register(HookRegistry, HookType)
    if why is not None:
        return
    from sglang_evict.patches import cpu_rotary, gate_attach, head_evict, request_meta
    from sglang_evict.patches.runtime import Runtime

    runtime = Runtime()  # the one state of this process's hooks
    for hooks in (cpu_rotary, gate_attach, request_meta, head_evict):
        hooks.register(HookRegistry, HookType, runtime)
    logger.info("sglang-evict plugin registered")
