"""The radix cache on with head-granular eviction, in a real SGLang server (CPU, default model,
packaged retention gates). Every step ends with the cache's integrity check (lists against the
virtual map, owners, shared parts, refcounts, the tree's counts)."""

from __future__ import annotations

import concurrent.futures as cf

import pytest
import requests

from serving_client import drained, evict_metrics, generate

BUDGET, BUFFER = 48, 8

TURNS = [
    "Remember this: the secret word is pineapple.",
    "Tell me about the weather in spring.",
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What do bees make?",
    "Name a large animal.",
    "What colour is the sky?",
    "What is the secret word?",
]


@pytest.fixture(scope="module")
def radix_server():
    from sglang_evict.server_process import ServerProcess

    args = [
        "--evict-policy", "retention-global", "--evict-budget", str(BUDGET),
        "--evict-buffer", str(BUFFER), "--evict-sinks", "16", "--evict-window", "16",
        "--max-total-tokens", "2048", "--enable-cache-report", "--enable-metrics",
        "--evict-debug-check", "1",
    ]
    with ServerProcess(args) as srv:
        yield srv


def _chat(server, tokenizer, turns, max_new_tokens=24):
    """A multi-turn conversation as raw text: each turn resends the whole history."""
    history, bodies = [], []
    for i, text in enumerate(turns):
        history += tokenizer(("\n" if i else "") + "User: " + text + "\nAssistant:",
                             add_special_tokens=False)["input_ids"]
        r = requests.post(server.url + "/generate", json={
            "input_ids": history,
            "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens, "stop": ["\n"]},
        }, timeout=600)
        r.raise_for_status()
        body = r.json()
        bodies.append((len(history), body))
        history += body["output_ids"]
    return bodies


def test_multi_turn_conversation_is_served_from_the_compressed_cache(radix_server, hf_model):
    _, tokenizer = hf_model
    before = evict_metrics(radix_server)
    bodies = _chat(radix_server, tokenizer, TURNS)
    held = 0
    for i, (_, body) in enumerate(bodies):
        meta = body["meta_info"]
        if i:  # at least the whole previous prompt is matched, at most all the previous turn
            prev_len, prev = bodies[i - 1]
            assert prev_len <= meta["cached_tokens"] <= prev_len + len(prev["output_ids"])
        held = meta["sglang_evict"]["live_head_slots"]
    # the history was compressed: the last turn held far less than the full cache
    last = bodies[-1][1]["meta_info"]["sglang_evict"]
    assert held < 0.7 * last["full_head_slots"] and last["evictions"] > 0
    assert "pineapple" in bodies[-1][1]["text"]  # the fact from turn 1 is recalled in turn 8
    after = evict_metrics(radix_server)
    hits = sum(b["meta_info"]["cached_tokens"] for _, b in bodies)
    assert after["sglang_evict:prefix_hit_tokens_total"] - before.get(
        "sglang_evict:prefix_hit_tokens_total", 0) == hits
    assert after["sglang_evict:head_slots_tree"] > 0
    assert after["sglang_evict:evicted_head_slots_total"] > before.get(
        "sglang_evict:evicted_head_slots_total", 0)


def test_a_forking_program_shares_its_prefix(radix_server):
    import sglang as sgl

    @sgl.function
    def two_views(s, topic):
        s += "Write about " + topic + " in the voice of a poet and of a scientist. "
        forks = s.fork(2)
        for f, voice in zip(forks, ("A poet says:", "A scientist says:")):
            f += voice + sgl.gen("view", max_tokens=8, temperature=0)
        s += "Poet: " + forks[0]["view"] + " Scientist: " + forks[1]["view"]

    backend = sgl.RuntimeEndpoint(radix_server.url)
    first = two_views.run(topic="the ocean tides", backend=backend).text()
    assert "Poet:" in first and "Scientist:" in first
    before = evict_metrics(radix_server)
    again = two_views.run(topic="the ocean tides", backend=backend).text()
    assert again == first  # greedy, served from the compressed prefixes the first run left
    after = evict_metrics(radix_server)
    assert after["sglang_evict:prefix_hit_tokens_total"] > before.get(
        "sglang_evict:prefix_hit_tokens_total", 0)


def test_aborted_requests_with_shared_prefixes_leave_nothing_behind(radix_server, hf_model):
    _, tokenizer = hf_model
    prefix = tokenizer("A shared preamble about lighthouses and the sea. " * 6)["input_ids"]

    def run(i):
        body = {"input_ids": prefix + [100 + i], "stream": True,
                "sampling_params": {"temperature": 0, "max_new_tokens": 64, "ignore_eos": True}}
        with requests.post(radix_server.url + "/generate", json=body, stream=True,
                           timeout=600) as r:
            for n, _ in enumerate(r.iter_lines()):
                if i % 2 and n >= 3:  # odd clients disconnect mid-generation
                    return "aborted"
        return "done"

    with cf.ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(run, range(6)))
    assert outcomes.count("done") == 3
    # once the aborted ones drain (no flush: it would free everything and prove nothing), every
    # head-slot is free or held by the tree (which keeps the finished requests' prefixes)
    m = drained(radix_server)
    assert m["sglang_evict:head_slots_tree"] > 0
    generate(radix_server, prefix, 4)  # and it keeps serving
