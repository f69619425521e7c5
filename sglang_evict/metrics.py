"""Prometheus metrics of head-granular eviction, on SGLang's own endpoint (`--enable-metrics`).

Created in the scheduler process (SGLang has set PROMETHEUS_MULTIPROC_DIR before spawning it,
so /metrics aggregates them with SGLang's own) and updated after every forward step from host
counters only: no device read.

    sglang_evict:head_slots_capacity / _free / _live / _tree     gauges (head-slots)
    sglang_evict:head_slots_unaccounted                         gauge: capacity - free - listed
                                                                 by requests - held by the
                                                                 tree; 0 unless KV leaked
    sglang_evict:layer_live_share{layer}                        gauge: a layer's share of the
                                                                 live head-slots in use
    sglang_evict:evicted_head_slots_total                       counter (requests' own
                                                                 evictions and reclaim)
    sglang_evict:reclaimed_head_slots_total                     counter (global evictor)
    sglang_evict:prefix_hit_tokens_total                        counter: tokens matched in
                                                                 the radix cache with eviction
    sglang_evict:gated_prompt_tokens_total                      counter: prompt tokens whose
                                                                 retention gates ran (per
                                                                 layer, averaged over layers)
    sglang_evict:hook_faults_total{hook}                        counter: exceptions the fault
                                                                 boundary caught in a hook
"""

from __future__ import annotations

PREFIX = "sglang_evict:"


class EvictMetrics:
    def __init__(self, cache, labels: dict[str, str]):
        from prometheus_client import Counter, Gauge  # lazily: after SGLang set its directory

        names = list(labels)
        self.labels = labels

        def gauge(name, doc, extra=()):
            return Gauge(PREFIX + name, doc, labelnames=names + list(extra),
                         multiprocess_mode="mostrecent")

        self.capacity = gauge("head_slots_capacity", "Head-slots in the pool.")
        self.free = gauge("head_slots_free", "Free head-slots.")
        self.live = gauge("head_slots_live", "Head-slots holding KV.")
        self.tree = gauge("head_slots_tree", "Head-slots the radix cache holds.")
        self.unaccounted = gauge("head_slots_unaccounted",
                                 "Head-slots neither free, listed by a request nor held by the "
                                 "radix cache (0 unless KV leaked).")
        self.layer_share = gauge("layer_live_share",
                                 "A layer's share of the head-slots running requests list.",
                                 ("layer",))
        self.evicted = Counter(PREFIX + "evicted_head_slots", "Head-slots evicted.",
                               labelnames=names)
        self.reclaimed = Counter(PREFIX + "reclaimed_head_slots",
                                 "Head-slots the global evictor took.", labelnames=names)
        self.prefix_hits = Counter(PREFIX + "prefix_hit_tokens",
                                   "Prompt tokens matched in the radix cache.", labelnames=names)
        self.gated = Counter(PREFIX + "gated_prompt_tokens",
                             "Prompt tokens whose retention gates ran.", labelnames=names)
        self.hook_faults = Counter(PREFIX + "hook_faults",
                                   "Exceptions caught in the plugin's hooks (the requests they "
                                   "concerned ended with an error).",
                                   labelnames=names + ["hook"])
        self._seen = (0, 0, 0, 0.0)
        self._faults_seen: dict[str, int] = {}
        self.capacity.labels(**labels).set(cache.capacity)

    def update(self, cache, gated_prompt_tokens: float = 0.0,
               fault_counts: dict[str, int] | None = None) -> None:
        lab = self.labels
        free = cache.pool.num_free
        self.free.labels(**lab).set(free)
        self.live.labels(**lab).set(cache.capacity - free)
        self.tree.labels(**lab).set(cache.tree.live)
        self.unaccounted.labels(**lab).set(cache.reported_unaccounted)
        totals = (*cache.totals(), gated_prompt_tokens)
        for counter, now, before in zip((self.evicted, self.reclaimed, self.prefix_hits,
                                         self.gated), totals, self._seen):
            if now > before:
                counter.labels(**lab).inc(now - before)
        self._seen = totals
        for hook, n in (fault_counts or {}).items():
            if n > self._faults_seen.get(hook, 0):
                self.hook_faults.labels(**lab, hook=hook).inc(n - self._faults_seen.get(hook, 0))
                self._faults_seen[hook] = n
        per_layer = cache.live_per_layer()
        total = float(per_layer.sum())
        for layer, n in enumerate(per_layer.tolist()):
            self.layer_share.labels(**lab, layer=str(layer)).set(n / total if total else 0.0)
