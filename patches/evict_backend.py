"""`--attention-backend sglang_evict` (register_attention_backend): stores K, V, log beta and
position into head-slots and attends over the live lists."""

from __future__ import annotations

from sglang_evict.config import ATTENTION_BACKEND
from sglang_evict.patches.evict_state import HeadEvictError, _state, config


def create_backend(runner):
    from sglang_evict.backend.attention_backend import HeadSlotAttnBackend
    from sglang_evict.patches.gate_attach import attachment

    if _state.cache is None:
        raise HeadEvictError(
            f"--attention-backend {ATTENTION_BACKEND} serves head-granular KV: start the "
            "server with sglang-evict serve --evict-policy ..."
        )
    return HeadSlotAttnBackend(runner, _state.cache, config(), attachment)


def register_backend() -> None:
    """Make `--attention-backend sglang_evict` known (server main parses the CLI; the scheduler
    builds the backend)."""
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import register_attention_backend

    if ATTENTION_BACKEND not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([ATTENTION_BACKEND])
    register_attention_backend(ATTENTION_BACKEND)(create_backend)
