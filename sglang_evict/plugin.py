"""SGLang plugin entry point (group `sglang.srt.plugins`).

`load_plugins()` calls `register()` in every SGLang process (server main, scheduler,
detokenizer); hooks registered here are applied by SGLang right after, before any model is
built. Keep this import-light: it runs in every process.
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

    from sglang_evict.patches import cpu_rotary, gate_attach, head_evict

    cpu_rotary.register(HookRegistry, HookType)
    gate_attach.register(HookRegistry, HookType)
    head_evict.register(HookRegistry, HookType)
    _registered = True
    logger.info("sglang-evict plugin registered")
