"""What the hooks of one SGLang process share, in one object: the plugin's settings, the served
model's gates and head-slot cache once built, and the bounded tables per request.

`plugin.register()` creates one Runtime per process (SGLang runs it in the server main, the
tokenizer manager, the scheduler and the detokenizer) and hands it to every hook module's
`register`, which binds it to its hooks (`bind`). No module keeps state of its own, so a test
builds a Runtime, and a second one never sees the first's cache."""

from __future__ import annotations

import functools
from collections import OrderedDict

from sglang_evict.config import EvictConfig


class Runtime:
    def __init__(self, config: EvictConfig | None = None):
        self._config = config
        # Pool sizing: the physical tokens SGLang sized its pool for (before the virtual ids).
        self.physical_tokens: int | None = None
        self.prefill_chunk: int | None = None  # --chunked-prefill-size, checked to fit
        self.cache = None  # HeadKVCache, once the model runner allocated its pool
        self.runner = None  # the ModelRunner that owns `cache` (not a draft worker)
        self.gates = None  # GateAttachment, once the model is loaded with gates
        self.serving_on_cpu = False  # set while the model runner is built (cpu_rotary)
        # Evictors of recent distinct per-request overrides (repr of its config -> Evictor).
        self.request_evictors: OrderedDict = OrderedDict()
        # Per-request statistics waiting for their response (rid -> meta_info entry).
        self.finished_stats: OrderedDict[str, dict] = OrderedDict()
        self.metrics = None  # EvictMetrics of this scheduler, once created
        self.metrics_made = False
        self.published = None  # the pool's state the gauges last showed (evict_step)
        # Rows whose requests a fault in a batch step ends at their next result (faults.py).
        self.faulted_rows: dict[int, tuple] = {}
        self.fault_counts: dict[str, int] = {}  # hook -> faults so far (faults.count)

    @property
    def config(self) -> EvictConfig:
        """The plugin's settings, from the environment `serve` wrote them to (read once)."""
        if self._config is None:
            self._config = EvictConfig.from_env()
        return self._config


def bind(runtime: Runtime, hook):
    """`hook(runtime, *args, **kwargs)` as the hook SGLang calls with (*args, **kwargs). It
    keeps the hook's module and name, which the start-up check reads to find the plugin's own
    hooks."""

    @functools.wraps(hook)
    def bound(*args, **kwargs):
        return hook(runtime, *args, **kwargs)

    return bound
