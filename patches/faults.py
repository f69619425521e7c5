"""The fault boundary: an exception in one of the plugin's hooks ends the requests it concerns
with an error (HTTP 500 naming the hook), and the scheduler goes on serving the others.

SGLang's scheduler dies on any exception raised in its loop, and with it every request it
holds; a bug in the plugin must cost the requests it touched, not the server.

- Per-request hooks (a request's eviction settings, its statistics at release) run each request
  inside `for_request`: a fault aborts that request alone.
- The step's budget enforcement runs after the model's forward, whose output is valid: a fault
  there marks the batch's rows (`mark_rows`), and Scheduler.process_batch_result (BEFORE) ends
  the requests on those rows with the error when it takes the step's tokens.

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


def for_request(where: str, req, fn, *args, **kwargs):
    """`fn(*args, **kwargs)`; an exception is logged with its traceback and ends `req` alone."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the boundary: any fault of ours, one request
        logger.exception("sglang-evict: %s failed for request %s; ending that request",
                         where, getattr(req, "rid", "?"))
        abort(req, where, exc)
        return None


def mark_rows(rt, rows, where: str, exc: BaseException) -> None:
    """A fault in a batch step: the requests on `rows` end when their result is processed."""
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
