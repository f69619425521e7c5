"""One forward step:
- ForwardBatch.init_new (AFTER): a decode batch keeps the scheduler's host copy of its
  req_to_token rows (SGLang passes it on for extend only), so the step reads no rows back from
  the device;
- ModelRunner.forward (AFTER): the evictor enforces the budgets after every step, including
  between prefill chunks; and each finishing request's statistics for its meta_info;
- Scheduler.on_idle (AFTER): the gauges catch up with what finished requests released after the
  last step, so a drained server shows its drained pool (polled: only when something changed)."""

from __future__ import annotations

import logging

from sglang_evict.backend.step import host_field
from sglang_evict.patches import faults
from sglang_evict.patches.runtime import bind

logger = logging.getLogger(__name__)

FORWARD = "sglang.srt.model_executor.model_runner.ModelRunner.forward"
INIT_FORWARD_BATCH = "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new"
ON_IDLE = "sglang.srt.managers.scheduler.Scheduler.on_idle"


def after_init_forward_batch(forward_batch, *args, **kwargs):
    batch = kwargs.get("batch")
    if batch is None:  # init_new(cls, batch, model_runner, ...): cls may or may not be passed
        batch = next(a for a in args if hasattr(a, "req_pool_indices"))
    rows = getattr(batch, "req_pool_indices_cpu", None)
    if (forward_batch.req_pool_indices_cpu is None and rows is not None
            and forward_batch.forward_mode.is_decode()
            and rows.numel() == forward_batch.req_pool_indices.numel()):
        forward_batch.req_pool_indices_cpu = rows
    return forward_batch


def after_forward(rt, result, runner, *args, **kwargs):
    forward_batch = args[0] if args else kwargs["forward_batch"]
    state = rt.cache
    if state is None or runner is not rt.runner:
        return result
    if forward_batch.forward_mode.is_idle() or state.new_slots is None:
        return result
    try:
        state.after_forward(forward_batch, runner.req_to_token_pool.req_to_token)
    except Exception as exc:  # noqa: BLE001 - the forward's output stands; its requests end
        rows = host_field(forward_batch, "req_pool_indices").tolist()
        faults.mark_rows(rt, rows, "the step's budget enforcement", exc)
    publish_metrics(rt)
    return result


def after_on_idle(rt, result, scheduler, *args, **kwargs):
    state = rt.cache
    if state is not None and rt.published != _pool_state(state):
        publish_metrics(rt)
    return result


def _pool_state(state) -> tuple:
    return state.steps, state.pool.num_free, state.tree.live


def publish_metrics(rt) -> None:
    """Check the head-slot balance and update the Prometheus metrics (after a step, and after
    SGLang flushed its cache). The balance is host counters only, so it runs always; a broken
    one is logged once per new value (`--evict-debug-check 1` finds where)."""
    state, runner = rt.cache, rt.runner
    if state is None or runner is None:
        return
    rt.published = _pool_state(state)
    gap = state.unaccounted()
    if gap != state.reported_unaccounted:
        if gap:
            logger.error("sglang-evict: %d head-slots are neither free, listed by a request nor "
                         "held by the radix cache (capacity %d)", gap, state.capacity)
        state.reported_unaccounted = gap
    metrics = _metrics(rt)
    if metrics is not None:
        gates = rt.gates
        gated = gates.gated_prompt_token_layers / gates.num_layers if gates is not None else 0.0
        metrics.update(state, gated, rt.fault_counts)


def _metrics(rt):
    """The Prometheus metrics of this scheduler process (`--enable-metrics`), or None."""
    if not rt.metrics_made:
        runner = rt.runner
        if getattr(runner.server_args, "enable_metrics", False):
            from sglang_evict.metrics import EvictMetrics

            labels = {"model_name": str(runner.server_args.served_model_name),
                      "tp_rank": str(getattr(runner, "tp_rank", 0))}
            rt.metrics = EvictMetrics(rt.cache, labels)
        rt.metrics_made = True
    return rt.metrics


def release_stats(rt, req, row: int) -> dict | None:
    """Statistics of the request leaving `row` (called when SGLang releases its KV)."""
    state = rt.cache
    if state is None:
        return None
    stats, ev = state.release(row)
    if stats is None:
        return None
    meta = stats.as_meta(state.heads_per_token, ev.global_trigger if ev is not None else None)
    meta["policy"] = _policy_label(ev)
    return meta


def _policy_label(ev) -> dict:
    if ev is None:
        return {"policy": "none"}
    c = ev.config
    return {
        "policy": c.policy.name, "mode": c.mode, "budget": c.budget, "buffer": c.buffer,
        "sinks": c.policy.sinks, "window": c.policy.window,
    }


def register(registry, hook_type, rt) -> None:
    registry.register(INIT_FORWARD_BATCH, after_init_forward_batch, hook_type.AFTER)
    registry.register(FORWARD, bind(rt, after_forward), hook_type.AFTER)
    registry.register(ON_IDLE, bind(rt, after_on_idle), hook_type.AFTER)
