"""`sglang-evict plan` against what the server actually admits: the same KV pool, the same
requests, the most requests running at once read from the scheduler's own log."""

from __future__ import annotations

import concurrent.futures as cf
import re

import pytest
import requests

from serving_client import flush

pytestmark = pytest.mark.server

# POOL is the vanilla server's pool (its log has a line per decode step)
POOL, CONTEXT, OUTPUT, BUDGET, BUFFER = 512, 200, 8, 16, 4


def _most_running(server, requests_sent: int) -> int:
    """Run `requests_sent` distinct prompts (nothing to share in the prefix cache) at once, on
    an empty cache; the most requests SGLang's scheduler had running in one decode batch."""
    flush(server)
    start = len(server.log_path.read_text(errors="replace"))

    def one(i):
        ids = [100 + (i * 131 + j * 7) % 20000 for j in range(CONTEXT)]
        r = requests.post(server.url + "/generate", json={
            "input_ids": ids,
            "sampling_params": {"temperature": 0, "max_new_tokens": OUTPUT, "ignore_eos": True},
        }, timeout=900)
        r.raise_for_status()
        return r.json()["meta_info"]["completion_tokens"]

    with cf.ThreadPoolExecutor(requests_sent) as pool:
        assert list(pool.map(one, range(requests_sent))) == [OUTPUT] * requests_sent
    log = server.log_path.read_text(errors="replace")[start:]
    return max(int(n) for n in re.findall(r"Decode batch.*?#running-req: (\d+)", log))


@pytest.fixture(scope="module")
def predicted(default_model_path):
    from sglang_evict.config import EvictConfig
    from sglang_evict.plan import plan, read_model

    cfg = EvictConfig(policy="retention-global", budget=BUDGET, buffer=BUFFER)
    return plan(read_model(default_model_path), context=CONTEXT, output=OUTPUT, budget=BUDGET,
                cfg=cfg, kv_tokens=POOL)


def test_plan_predicts_what_the_server_admits(servers, server, predicted):
    from sglang_evict.serve import flag_value

    common = ["--max-total-tokens", str(POOL), "--decode-log-interval", "1"]
    assert flag_value(server.sglang_args, "--max-total-tokens") == str(POOL)
    assert flag_value(server.sglang_args, "--decode-log-interval") == "1"
    # independent arithmetic: whole requests per pool; with eviction, M + B + 1 tokens' worth
    # each beside a prefill chunk of half the pool (fewer than the virtual ids would allow)
    assert predicted.vanilla == POOL // (CONTEXT + OUTPUT)
    assert predicted.at_budget == (POOL - POOL // 2) // (BUDGET + BUFFER + 1)
    # each server gets more requests than the plan says fit (vanilla 3x, with eviction 8 more),
    # so a higher limit would show
    seen_vanilla = _most_running(server, 3 * predicted.vanilla)
    with servers.held(common + ["--evict-policy", "retention-global", "--evict-budget",
                                str(BUDGET), "--evict-buffer", str(BUFFER)]) as evicting:
        seen_evicting = _most_running(evicting, predicted.at_budget + 8)
    assert predicted.at_budget < POOL * 8 // (CONTEXT + OUTPUT)
    assert (seen_vanilla, seen_evicting) == (predicted.vanilla, predicted.at_budget)
    assert seen_evicting >= 5 * seen_vanilla
