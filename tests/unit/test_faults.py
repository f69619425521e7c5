"""The fault boundary (patches/faults.py): an exception inside one of the plugin's hooks ends the
requests it concerns with HTTP 500 naming the hook; the hook returns to SGLang normally, so the
scheduler and every other request go on. Faults are injected into the code the hooks call."""

from __future__ import annotations

from http import HTTPStatus
from types import SimpleNamespace

import pytest

from sglang_evict.eviction.evictor import Evictor
from sglang_evict.patches import evict_requests, evict_step, faults, request_meta
from sglang_evict.patches.runtime import Runtime
from sglang_evict.serve import split_argv

from head_cache_sim import CacheSim, make_cache

L, H, D = 2, 2, 4
FAULTY_BUDGET = 13


def _runtime():
    server, _ = split_argv(["--evict-policy", "streaming", "--evict-budget", "64",
                            "--evict-overrides", "any"])
    rt = Runtime(server)
    rt.cache = make_cache(64, L, H, D, policy="streaming", budget=4, buffer=2)
    return rt


def _req(rid: str, row: int, override: dict | None = None):
    params = {"sglang_evict": override} if override is not None else None
    req = SimpleNamespace(rid=rid, kv=SimpleNamespace(req_pool_idx=row, kv_committed_len=0),
                          sampling_params=SimpleNamespace(custom_params=params),
                          to_finish=None, finished_reason=None)
    req.finished = lambda: req.finished_reason is not None
    return req


@pytest.fixture
def faulty_evictor(monkeypatch):
    """Building the evictor of a budget-13 override raises (a bug in the plugin's own code)."""
    real = Evictor.__init__

    def init(self, config, *args, **kwargs):
        if config.budget == FAULTY_BUDGET:
            raise RuntimeError("injected fault")
        real(self, config, *args, **kwargs)

    monkeypatch.setattr(Evictor, "__init__", init)


def test_a_fault_in_one_requests_settings_ends_that_request_alone(faulty_evictor):
    rt = _runtime()
    ok, bad, plain = (_req("ok", 0, {"budget": 8}), _req("bad", 1, {"budget": FAULTY_BUDGET}),
                      _req("plain", 2))
    batch = SimpleNamespace(reqs=[ok, bad, plain])
    assert evict_requests.after_prepare_for_extend(rt, "result", batch) == "result"
    assert ok.to_finish is None and plain.to_finish is None
    assert rt.cache.evictor_of(0).config.budget == 8  # the others got their settings
    reason = bad.to_finish.to_json()
    assert reason["type"] == "abort" and reason["status_code"] == HTTPStatus.INTERNAL_SERVER_ERROR
    assert "sglang-evict: internal error in the request's eviction settings" in reason["message"]
    assert "injected fault" in reason["message"]
    # the faulty request's row keeps the server's own evictor for the step it still runs
    assert rt.cache.evictor_of(1) is rt.cache.requests.default


def test_a_fault_in_the_steps_enforcement_ends_the_batchs_requests_at_their_result(monkeypatch):
    rt = _runtime()
    cache = rt.cache
    sim = CacheSim(cache)
    rt.runner = SimpleNamespace(req_to_token_pool=SimpleNamespace(req_to_token=sim.req_to_token),
                                server_args=SimpleNamespace(enable_metrics=False))
    cache.after_forward = lambda *a: None  # the step up to its forward; the hook's part below
    batch = sim.step({0: 3, 1: 2})
    del cache.after_forward
    monkeypatch.setattr(cache.requests, "enforce",
                        lambda rows: (_ for _ in ()).throw(ValueError("injected fault")))
    # the forward's output goes back to SGLang untouched
    assert evict_step.after_forward(rt, "logits", rt.runner, batch) == "logits"
    assert set(rt.faulted_rows) == {0, 1}
    assert cache.new_slots is None  # the step is closed all the same
    in_batch, other = _req("a", 0), _req("b", 3)
    faults.before_process_batch_result(rt, None, SimpleNamespace(reqs=[in_batch, other]), None)
    assert other.to_finish is None
    reason = in_batch.to_finish.to_json()
    assert reason["status_code"] == HTTPStatus.INTERNAL_SERVER_ERROR
    assert "the step's budget enforcement" in reason["message"]
    # row 1's request is released before its result is processed: a later one on it starts clean
    request_meta.before_release_kv_cache(rt, _req("c", 1), SimpleNamespace())
    assert rt.faulted_rows == {}


def test_a_fault_in_the_statistics_at_release_leaves_the_release_to_sglang(monkeypatch):
    rt = _runtime()
    sim = CacheSim(rt.cache)
    sim.step({0: 3})
    monkeypatch.setattr(evict_step, "release_stats",
                        lambda *a: (_ for _ in ()).throw(KeyError("injected fault")))
    req = _req("r", 0)
    req.finished_reason = "length"  # finishing: its response is on the way, with no statistics
    assert request_meta.before_release_kv_cache(rt, req, SimpleNamespace()) is None
    assert req.to_finish is None and "r" not in rt.finished_stats
    # a request still running (retracted) ends with the error instead
    running = _req("s", 0)
    assert request_meta.before_release_kv_cache(rt, running, SimpleNamespace()) is None
    assert running.to_finish.to_json()["status_code"] == HTTPStatus.INTERNAL_SERVER_ERROR


def test_an_abort_already_on_its_way_is_kept():
    from sglang.srt.managers.schedule_batch import FINISH_ABORT

    req = _req("r", 0)
    earlier = FINISH_ABORT("client went away")
    req.to_finish = earlier
    faults.abort(req, "somewhere", RuntimeError("later"))
    assert req.to_finish is earlier
    long = faults.message("x", RuntimeError("y" * 1000))
    assert len(long) < 400 and long.endswith("...)")
