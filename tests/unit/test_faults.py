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


# --- admission: the waiting request a fault concerns is refused; the rest falls back safely ---


@pytest.fixture
def scheduler_rank():
    """This process as the scheduler of rank 0 (SGLang's Req reads its rank when it aborts)."""
    from sglang.srt.runtime_context import get_parallel

    with get_parallel().override(tp_rank=0):
        yield


def _waiting(rid: str, n: int):
    """A queued SGLang request of `n` prompt tokens (the real Req: its abort is SGLang's own)."""
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    req = Req(rid, "", list(range(1, n + 1)), SamplingParams(max_new_tokens=4))
    req.full_untruncated_fill_ids = list(req.origin_input_ids)
    req.prefix_len = 0
    return req


def _refused_with(req, where: str) -> bool:
    reason = req.to_finish.to_json()
    return (reason["status_code"] == HTTPStatus.INTERNAL_SERVER_ERROR
            and f"sglang-evict: internal error in {where}" in reason["message"]
            and "injected fault" in reason["message"]
            and list(req.origin_input_ids) == [0])  # SGLang runs it as one token, then ends it


def test_a_fault_in_the_length_check_refuses_that_request_alone(monkeypatch, scheduler_rank):
    from sglang_evict.patches import evict_admission as adm

    rt = _runtime()
    rt.physical_tokens = 64
    real = adm.never_fits
    monkeypatch.setattr(adm, "never_fits", lambda cfg, n, *a: (
        (_ for _ in ()).throw(RuntimeError("injected fault")) if n == 5 else real(cfg, n, *a)))
    sglang_check = lambda req, *a: None  # noqa: E731 - SGLang's own check passes both
    bad, good, long = _waiting("bad", 5), _waiting("good", 3), _waiting("long", 80)
    assert adm.around_validate_input_length(rt, sglang_check, bad, 1000, False) is None
    assert _refused_with(bad, adm.LENGTH_CHECK)
    assert adm.around_validate_input_length(rt, sglang_check, good, 1000, False) is None
    assert good.to_finish is None
    # the check itself still refuses what can never fit (policy none on this pool: 80 + 1 > 64)
    long.sampling_params.custom_params = {"sglang_evict": {"policy": "none"}}
    assert "more than the physical pool holds" in adm.around_validate_input_length(
        rt, sglang_check, long, 1000, False)
    assert rt.fault_counts == {adm.LENGTH_CHECK: 1}


def test_a_fault_in_prefill_admission_refuses_that_request_and_the_round_goes_on(monkeypatch,
                                                                                scheduler_rank):
    from sglang.srt.managers.schedule_policy import AddReqResult

    from sglang_evict.patches import evict_admission as adm

    rt = _runtime()
    adder = SimpleNamespace(rem_chunk_tokens=12, can_run_list=[], _evict_tokens_left=20)

    def admit(adder, req, *args):  # SGLang's admission: the next chunk, at most one chunk
        want = len(req.full_untruncated_fill_ids) - req.prefix_len
        req.extend_end = req.prefix_len + min(want, adder.rem_chunk_tokens)
        adder.can_run_list.append(req)
        return AddReqResult.CONTINUE

    bad, good = _waiting("bad", 6), _waiting("good", 5)
    real = adm._next_chunk
    monkeypatch.setattr(adm, "_next_chunk", lambda adder, req: (
        (_ for _ in ()).throw(RuntimeError("injected fault")) if req is bad else real(adder, req)))
    assert adm.around_add_one_req(rt, admit, adder, bad, False, None) == AddReqResult.NO_TOKEN
    assert _refused_with(bad, adm.ADMISSION) and bad not in adder.can_run_list
    assert adder._evict_tokens_left == 20  # nothing charged for it
    # the next round: the others are admitted as before; the refused one runs its one token
    assert adm.around_add_one_req(rt, admit, adder, good, False, None) == AddReqResult.CONTINUE
    assert adder._evict_tokens_left == 15
    bad.full_untruncated_fill_ids = list(bad.origin_input_ids)  # SGLang's next round: [0]
    assert adm.around_add_one_req(rt, admit, adder, bad, False, None) == AddReqResult.CONTINUE
    assert adder._evict_tokens_left == 14
    assert rt.fault_counts == {adm.ADMISSION: 1}  # counted once: the second pass is the abort


def test_a_fault_judging_reclaimable_counts_nothing_reclaimable(monkeypatch, caplog):
    """Admission and decode capacity fall back to the free head-slots alone: SGLang waits or
    retracts instead of outgrowing the pool, and the fault is logged without a line per step."""
    from sglang_evict.patches import evict_admission as adm

    rt = _runtime()
    rt.cache = make_cache(20, L, H, D, budget=4, buffer=6, sinks=1)
    CacheSim(rt.cache).step({0: 9})
    cache = rt.cache
    free_tokens = cache.pool.num_free // (L * H)
    assert free_tokens == 11 and cache.reclaimable() > 0  # 18 whole tokens with reclaim
    monkeypatch.setattr(cache, "reclaimable",
                        lambda: (_ for _ in ()).throw(IndexError("injected fault")))
    adder = SimpleNamespace()
    adm.after_prefill_adder_init(rt, None, adder)
    assert adder._evict_tokens_left == free_tokens
    allocator = SimpleNamespace()
    sglang_says = lambda allocator, **kw: True  # noqa: E731 - the virtual pool has room
    assert adm.around_decode_capacity(rt, sglang_says, allocator, num_tokens=free_tokens)
    assert not adm.around_decode_capacity(rt, sglang_says, allocator, num_tokens=free_tokens + 1)
    for _ in range(2):
        adm.after_prefill_adder_init(rt, None, SimpleNamespace())
    where = "counting reclaimable head-slots"
    assert rt.fault_counts == {where: 5}
    logged = [r for r in caplog.records if where in r.getMessage()]
    assert len(logged) == 3 and all(r.exc_info for r in logged)  # the 1st, 2nd and 4th


def test_a_fault_freeing_head_slots_still_frees_the_virtual_ids(monkeypatch):
    import torch

    from sglang_evict.patches import evict_admission as adm

    rt = _runtime()
    monkeypatch.setattr(rt.cache, "free",
                        lambda ids: (_ for _ in ()).throw(RuntimeError("injected fault")))
    freed = []
    sglang_free = lambda allocator, ids: freed.append(ids.tolist())  # noqa: E731
    allocator = SimpleNamespace(free_group=None)
    adm.around_alloc_free(rt, sglang_free, allocator, torch.tensor([3, 4]))
    assert freed == [[3, 4]] and rt.fault_counts == {"freeing head-slots": 1}
