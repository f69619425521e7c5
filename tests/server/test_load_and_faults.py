"""A bounded randomized load against a small pool with eviction and the radix cache on (CPU,
default model): concurrent clients with shared prefixes, mixed lengths, client disconnects,
per-request policies of every kind (retention ones with the packaged gates of this streaming
server), malformed overrides, token ids outside the vocabulary, and requests that hit a fault
injected into the plugin's own code. Every request that is not aborted completes, malformed ones
get 400 naming the problem, the faulty ones 500 naming the hook, nothing else gets a 5xx, the
scheduler never dies (the cache's integrity check runs after every step); once the requests
drain, every head-slot is free or held by the radix tree, and again after SGLang's own tree
eviction made room for new prompts (never checked after a flush, which frees everything); no
request was retracted while eviction could make room."""

from __future__ import annotations

import concurrent.futures as cf
import os
import random
import re
import time

import pytest
import requests

import bench_modules

CLIENTS = 32
SECONDS = 100
POOL = 256
FAULTY_BUDGET = 13
FAULTY_ADMISSION_BUDGET = 14
# Every process of the server imports this first (sitecustomize): building the evictor of a
# budget-13 override raises, as a bug in the plugin's own code would, and so does the length
# check at admission of a budget-14 override.
INJECT_FAULT = f"""
from sglang_evict.eviction import evictor as _evictor
from sglang_evict.patches import evict_admission as _admission

_real_init = _evictor.Evictor.__init__


def _faulty_init(self, config, *args, **kwargs):
    if config.budget == {FAULTY_BUDGET}:
        raise RuntimeError("injected fault")
    _real_init(self, config, *args, **kwargs)


_evictor.Evictor.__init__ = _faulty_init
_real_never_fits = _admission.never_fits


def _faulty_never_fits(cfg, *args):
    if cfg.budget == {FAULTY_ADMISSION_BUDGET}:
        raise RuntimeError("injected fault")
    return _real_never_fits(cfg, *args)


_admission.never_fits = _faulty_never_fits
"""


@pytest.fixture(scope="module")
def loaded_server(servers, tmp_path_factory):
    site = tmp_path_factory.mktemp("inject_fault")
    (site / "sitecustomize.py").write_text(INJECT_FAULT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(site), os.environ.get("PYTHONPATH")) if p))
    # mixed: the tree's entries and the running requests' in one ranking, so the pressure of
    # the fairness test below reaches the running requests (lru-first would free the tree first)
    args = ["--evict-policy", "streaming", "--evict-budget", "16", "--evict-buffer", "8",
            "--evict-reclaim", "mixed",
            "--max-total-tokens", str(POOL), "--enable-metrics", "--evict-debug-check", "1"]
    with servers.held(args, env) as srv:
        yield srv


def _gauges(server) -> dict[str, float]:
    text = requests.get(server.url + "/metrics", timeout=30).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r"^((?:sglang_evict|sglang):[a-z_]+)\{[^}]*\} (\S+)$", text, re.M)}


def _drained(server, seconds: float = 120) -> dict[str, float]:
    """The gauges once no request runs: every head-slot free or the tree's (they catch up when
    the scheduler goes idle); the last reading if that never happens."""
    deadline = time.monotonic() + seconds
    while True:
        g = _gauges(server)
        free, tree = g["sglang_evict:head_slots_free"], g["sglang_evict:head_slots_tree"]
        if free + tree == g["sglang_evict:head_slots_capacity"] or time.monotonic() > deadline:
            return g
        time.sleep(1)


def _soak():
    """bench/soak.py: the load's requests and its contract, shared with the long soak."""
    return bench_modules.load("soak")


def test_randomized_load_with_disconnects_and_malformed_requests(loaded_server):
    soak = _soak()
    kinds = dict(soak.KINDS, faulty=1)
    # this server's operator clamps: `policy none` is not the clients' to pick
    policies = tuple(p for p in soak.POLICIES if p != "none")
    results = soak.run_load(loaded_server.url, SECONDS, CLIENTS, kinds=kinds,
                            fault={"budget": FAULTY_BUDGET}, policies=policies)
    by_kind = {k: [r[:2] + r[3:] for r in results if r[0] == k] for k in kinds}
    assert all(len(v) > 0 for v in by_kind.values()), {k: len(v) for k, v in by_kind.items()}
    # every answer as the contract says: 200 with the length asked for, 400 for the malformed,
    # 500 naming the hook for the faulty; nothing else
    assert soak.failures(results) == []
    assert all(code == 400 for _, code, _ in by_kind["bad_override"])
    assert all(code == 400 and "custom_params.sglang_evict" in text
               for _, code, text in by_kind["bad_override"])
    assert all(code == 400 and "outside the vocabulary" in text
               for _, code, text in by_kind["bad_ids"])
    # an exception in a hook ends its request with a 500 naming it; the others above completed
    assert all(code == 500 and "internal error in the request's eviction settings" in text
               for _, code, text in by_kind["faulty"]), by_kind["faulty"][:3]
    # a fault at admission (the length check) refuses that request alone, before it runs
    faulty = {"input_ids": list(range(100, 140)), "sampling_params": {
        "max_new_tokens": 4, "custom_params": {"sglang_evict": {
            "budget": FAULTY_ADMISSION_BUDGET}}}}
    r = requests.post(loaded_server.url + "/generate", json=faulty, timeout=600)
    assert r.status_code == 500 and "internal error in the admission's length check" in r.text
    r = requests.post(loaded_server.url + "/generate", timeout=600, json=dict(
        faulty, sampling_params={"max_new_tokens": 4}))
    assert r.status_code == 200
    assert 'hook="the admission\'s length check"' in requests.get(
        loaded_server.url + "/metrics", timeout=30).text
    # every running request fits its budget in the pool (serve sized it): eviction and reclaim
    # always make room, SGLang never had to retract
    log = loaded_server.log_path.read_text(errors="replace")
    assert "KV cache pool is full. Retract requests." not in log
    assert "reclaimed" in log  # the pool did run short: the global evictor made the room
    # the always-on balance (free + listed + tree-held == capacity) held, and was exported
    text = requests.get(loaded_server.url + "/metrics", timeout=30).text
    gauge = re.search(r"^sglang_evict:head_slots_unaccounted\{[^}]*\} (\S+)$", text, re.M)
    assert gauge is not None and float(gauge.group(1)) == 0.0
    assert "head-slots are neither free" not in log
    # drained: every head-slot is free or held by the radix tree, which holds at most its
    # cached tokens' head-slots
    g = _drained(loaded_server)
    assert g["sglang_evict:head_slots_free"] + g["sglang_evict:head_slots_tree"] == \
        g["sglang_evict:head_slots_capacity"], g
    assert g["sglang_evict:head_slots_unaccounted"] == 0
    hpt = 30 * 3  # the default model: 30 layers, 3 KV heads
    cached = g["sglang:kv_evictable_tokens"]
    assert 0 < g["sglang_evict:head_slots_tree"] <= cached * hpt, g
    # new prompts that outgrow SGLang's (virtual) token pool: its own tree eviction frees cached
    # prefixes, and what it freed is free again once they drain
    rng = random.Random(99)
    virtual = int(g["sglang:kv_available_tokens"] + cached)
    n = virtual // 500 + 2
    bodies = [{"input_ids": [rng.randrange(100, 20000) for _ in range(500)],
               "sampling_params": {"max_new_tokens": 2}} for _ in range(n)]
    with cf.ThreadPoolExecutor(2) as pool:
        codes = list(pool.map(lambda b: requests.post(loaded_server.url + "/generate", json=b,
                                                       timeout=600).status_code, bodies))
    assert codes == [200] * n
    after = _drained(loaded_server)
    assert after["sglang_evict:head_slots_free"] + after["sglang_evict:head_slots_tree"] == \
        after["sglang_evict:head_slots_capacity"], after
    assert after["sglang_evict:head_slots_unaccounted"] == 0
    assert after["sglang_evict:head_slots_tree"] <= after["sglang:kv_evictable_tokens"] * hpt
    log = loaded_server.log_path.read_text(errors="replace")
    assert "head-slots are neither free" not in log and "memory leak" not in log.lower()
    assert loaded_server.proc.poll() is None


def test_requests_of_different_policies_lose_equal_shares_under_pressure(loaded_server):
    """The radix tree fills the pool with earlier prompts' surviving KV; then four requests with
    equal budgets and equal lengths decode side by side, two with random scores and two with
    retention-global (the packaged gates, on this streaming server), each step taking room from
    the others and the tree. The global evictor ranks the policies on one scale (each loses the
    same share of what it could lose), so the two pairs lose the same number of head-slots, not
    all from the policy whose raw scores run lower."""
    rng = random.Random(7)

    def run(policy, n_prompt, new_tokens):
        params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True,
                  "custom_params": {"sglang_evict": {"policy": policy, "budget": 16}}}
        body = {"input_ids": [rng.randrange(100, 20000) for _ in range(n_prompt)],
                "sampling_params": params}
        r = requests.post(loaded_server.url + "/generate", json=body, timeout=600)
        r.raise_for_status()
        return r.json()["meta_info"]["sglang_evict"]

    # one at a time, so what the tree keeps does not depend on how the prompts overlapped:
    # each prefill takes 100 tokens' worth from the tree, gives back all but its budget's
    for _ in range(16):
        run("streaming", 100, 1)
    g = _drained(loaded_server)
    # the pool cannot hold the four at their budget (M + B + the step's token, every head-slot)
    # beside the tree: reclaim must take from someone while they run
    peak = 4 * (16 + 8 + 1) * 30 * 3
    assert g["sglang_evict:head_slots_free"] < peak, g
    with cf.ThreadPoolExecutor(4) as pool:
        policies = ["random", "retention-global"] * 2
        metas = list(pool.map(lambda p: run(p, 12, 120), policies))
    assert {m["policy"]["policy"] for m in metas[0::2]} == {"random"}
    assert {(m["policy"]["policy"], m["policy"]["mode"]) for m in metas[1::2]} == {
        ("retention", "global")}
    a = sum(m["reclaimed_head_slots"] for m in metas[0::2])
    b = sum(m["reclaimed_head_slots"] for m in metas[1::2])
    assert a + b > 0, metas  # the pool did run short while they held entries
    assert abs(a - b) <= max(8, (a + b) // 10), (a, b)
