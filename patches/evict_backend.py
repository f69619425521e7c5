"""`--attention-backend sglang_evict` (register_attention_backend): stores K, V, log beta and
position into head-slots and attends over the live lists."""

from __future__ import annotations

from sglang_evict.config import ATTENTION_BACKEND
from sglang_evict.errors import HeadEvictError
from sglang_evict.patches.runtime import bind


def create_backend(rt, runner):
    from sglang_evict.backend.attention_backend import HeadSlotAttnBackend

    if rt.cache is None:
        raise HeadEvictError(
            f"--attention-backend {ATTENTION_BACKEND} serves head-granular KV: start the "
            "server with sglang-evict serve --evict-policy ..."
        )
    return HeadSlotAttnBackend(runner, rt.cache, rt.config, lambda: rt.gates)


def register_backend(rt) -> None:
    """Make `--attention-backend sglang_evict` known (server main parses the CLI; the scheduler
    builds the backend)."""
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import register_attention_backend

    if ATTENTION_BACKEND not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([ATTENTION_BACKEND])
    register_attention_backend(ATTENTION_BACKEND)(bind(rt, create_backend))
