"""State shared by the eviction hooks of one SGLang process: the plugin's settings (from the
environment) and the head-slot cache once the model runner has built it."""

from __future__ import annotations

from sglang_evict.config import EvictConfig
from sglang_evict.errors import HeadEvictError  # noqa: F401  (raised by the hooks)


class _State:
    config: EvictConfig | None = None
    physical_tokens: int | None = None
    cache = None  # HeadKVCache
    runner = None


_state = _State()


def cache():
    return _state.cache


def config() -> EvictConfig:
    if _state.config is None:
        _state.config = EvictConfig.from_env()
    return _state.config
