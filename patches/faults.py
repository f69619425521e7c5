"""The fault boundary: an exception in one of the plugin's hooks ends the requests it concerns
with an error (HTTP 500 naming the hook), and the scheduler goes on serving the others.

SGLang's scheduler dies on any exception raised in its loop, and with it every request it
holds; a bug in the plugin must cost the requests it touched, not the server.

- Per-request hooks (a request's eviction settings, its statistics at release) run each request
  inside `for_request`: a fault aborts that request alone.
- The step's budget enforcement runs after the model's forward, whose output is valid: a fault
  there marks the batch's rows (`mark_rows`), and Scheduler.process_batch_result (BEFORE) ends
  the requests on those rows with the error when it takes the step's tokens.
- Admission of a waiting request (its length check, its prefill chunk's room): a fault refuses
  that request (`refuse`, SGLang's own abort of a queued request: it runs one token and ends).
- Hooks that concern no one request (freeing head-slots, the room a round or a decode step may
  use) go on with a conservative fallback (`degraded`): nothing reclaimable, so SGLang waits or
  retracts rather than outgrow the pool.

Every fault is counted per hook (`rt.fault_counts`, /metrics `sglang_evict:hook_faults_total`).

Aborted requests release their KV through SGLang's own finish path, which resets their rows in
the head-slot cache; the always-on balance check (/metrics, the log) shows if anything leaked.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from sglang_evict.patches.runtime import bind

logger = logging.getLogger(__name__)

PROCESS_RESULT = "sglang.srt.managers.scheduler.Scheduler.process_batch_result"


def message(where: str, exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    text = text if len(text) <= 300 else text[:300] + "..."
    return f"sglang-evict: internal error in {where}; this request was ended ({text})"


def abort(req, where: str, exc: BaseException) -> None:
    """End `req` with HTTP 500 at its next result (SGLang's abort of a running request)."""
    from sglang.srt.managers.schedule_batch import FINISH_ABORT

    if req.finished() or req.to_finish is not None:
        return
    req.to_finish = FINISH_ABORT(message(where, exc), HTTPStatus.INTERNAL_SERVER_ERROR,
                                 "InternalServerError")


def refuse(req, where: str, exc: BaseException) -> None:
    """End a request still waiting for admission with HTTP 500: SGLang's abort of a queued
    request (its input becomes one token, which runs, and the request ends with the error)."""
    if req.to_finish is not None:
        return
    req.set_finish_with_abort(message(where, exc), HTTPStatus.INTERNAL_SERVER_ERROR,
                              "InternalServerError")


def count(rt, where: str) -> int:
    """One more fault in `where`; how many so far."""
    n = rt.fault_counts.get(where, 0) + 1
    rt.fault_counts[where] = n
    return n


def for_request(rt, where: str, req, fn, *args, **kwargs):
    """`fn(*args, **kwargs)`; an exception is logged with its traceback and ends `req` alone."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the boundary: any fault of ours, one request
        count(rt, where)
        logger.exception("sglang-evict: %s failed for request %s; ending that request",
                         where, getattr(req, "rid", "?"))
        abort(req, where, exc)
        return None


def degraded(rt, where: str, exc: BaseException, fallback: str) -> None:
    """A fault in a hook that concerns no one request; the hook goes on with `fallback`. Logged
    with its traceback the 1st, 2nd, 4th, 8th... time: a fault that persists shows, without a
    line per step."""
    n = count(rt, where)
    if n & (n - 1) == 0:
        logger.error("sglang-evict: %s failed (%d time%s so far); %s", where, n,
                     "" if n == 1 else "s", fallback, exc_info=exc)


def mark_rows(rt, rows, where: str, exc: BaseException) -> None:
    """A fault in a batch step: the requests on `rows` end when their result is processed."""
    count(rt, where)
    logger.exception("sglang-evict: %s failed for a batch of %d requests; ending them",
                     where, len(rows))
    for row in rows:
        rt.faulted_rows[int(row)] = (where, exc)


def before_process_batch_result(rt, scheduler, batch, *args, **kwargs):
    faulted = rt.faulted_rows
    if not faulted or batch is None:
        return None
    for req in batch.reqs:
        row = req.kv.req_pool_idx
        if row is not None and row in faulted:
            where, exc = faulted.pop(row)
            abort(req, where, exc)
    return None


def forget_row(rt, row) -> None:
    """A released row starts clean: a fault of the request that left it is not inherited."""
    if rt.faulted_rows:
        rt.faulted_rows.pop(int(row), None)


def register(registry, hook_type, rt) -> None:
    registry.register(PROCESS_RESULT, bind(rt, before_process_batch_result), hook_type.BEFORE)
