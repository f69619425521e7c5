"""The radix cache on with head-granular eviction, in a real SGLang server (CPU, default model,
packaged retention gates). Every step ends with the cache's integrity check (lists against the
virtual map, owners, shared parts, refcounts, the tree's counts)."""

from __future__ import annotations

import concurrent.futures as cf
import re
import time

import pytest
import requests

from serving_client import generate

# One test each uses none_radix_server, haystack_server and lru_server: function-scoped, so
# at most the session's vanilla server, radix_server and one of them are alive at once.
LAYERS, KV_HEADS = 30, 3
HPT = LAYERS * KV_HEADS
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


@pytest.fixture
def none_radix_server():
    from sglang_evict.server_process import ServerProcess

    with ServerProcess(["--evict-policy", "none", "--enable-cache-report",
                        "--max-total-tokens", "4096"]) as srv:
        yield srv


def _metrics(server) -> dict[str, float]:
    """sglang_evict:* samples of /metrics, summed over label sets (one scheduler here)."""
    out: dict[str, float] = {}
    for line in requests.get(server.url + "/metrics", timeout=30).text.splitlines():
        m = re.match(r"^(sglang_evict:[a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$", line)
        if m and "layer=" not in (m.group(2) or ""):
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def _drained(server, seconds: int = 120) -> dict[str, float]:
    """/metrics once the requests have drained: every head-slot free or held by the tree (the
    gauges follow the scheduler's next step or idle round); asserted, and nothing unaccounted."""
    for _ in range(seconds):
        m = _metrics(server)
        if m["sglang_evict:head_slots_free"] + m["sglang_evict:head_slots_tree"] == \
                m["sglang_evict:head_slots_capacity"]:
            break
        time.sleep(1)
    assert m["sglang_evict:head_slots_free"] + m["sglang_evict:head_slots_tree"] == \
        m["sglang_evict:head_slots_capacity"], m
    assert m["sglang_evict:head_slots_unaccounted"] == 0
    return m


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
    before = _metrics(radix_server)
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
    after = _metrics(radix_server)
    hits = sum(b["meta_info"]["cached_tokens"] for _, b in bodies)
    assert after["sglang_evict:prefix_hit_tokens_total"] - before.get(
        "sglang_evict:prefix_hit_tokens_total", 0) == hits
    assert after["sglang_evict:head_slots_tree"] > 0
    assert after["sglang_evict:evicted_head_slots_total"] > before.get(
        "sglang_evict:evicted_head_slots_total", 0)


def test_policy_none_with_the_radix_cache_is_vanilla_sglang(server, none_radix_server, hf_model):
    """Same greedy tokens and the same cached-token counts as vanilla SGLang with its radix
    cache, over requests that share prefixes (unique to this test, so neither server has them)."""
    _, tokenizer = hf_model
    context = tokenizer("Field notes 7f3a-radix: the heron waits by the reed bed at dawn. " * 4)[
        "input_ids"]
    asks = [" What does the heron do?", " Where is the reed bed?", " What does the heron do?"]
    for ask in asks:
        ids = context + tokenizer(ask, add_special_tokens=False)["input_ids"]
        vanilla = generate(server, ids, 12)
        ours = generate(none_radix_server, ids, 12)
        assert ours["output_ids"] == vanilla["output_ids"], ask
        assert ours["meta_info"]["cached_tokens"] == vanilla["meta_info"]["cached_tokens"], ask
    assert ours["meta_info"]["cached_tokens"] >= len(ids) - 1  # the repeated ask hit in full


NEEDLES = {f"key-{i}": f"{(i * 7919) % 9000 + 1000}" for i in range(16)}
HAYSTACK_BUFFER = 64  # holds a query and its answer: the context is the only thing evicted


def _haystack(tokenizer) -> list[int]:
    """A RULER-style haystack: 16 needles (key -> number) among filler sentences."""
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. "
    text = "".join(f"{filler}The special magic number for {k} is: {v}. "
                   for k, v in NEEDLES.items())
    return tokenizer(text + filler)["input_ids"]


def _question(tokenizer, key) -> list[int]:
    return tokenizer(f" What is the special magic number for {key}? The special magic number "
                     f"for {key} is:", add_special_tokens=False)["input_ids"]


@pytest.fixture
def haystack_server(hf_model):
    """The radix server's eviction settings, with prefill chunks the context's length: a
    request that carries the context and its question alone compresses the context at the
    point where a request that matched it in the tree finds it compressed."""
    from sglang_evict.server_process import ServerProcess

    _, tokenizer = hf_model
    args = [
        "--evict-policy", "retention-global", "--evict-budget", str(BUDGET),
        "--evict-buffer", str(HAYSTACK_BUFFER), "--evict-sinks", "16", "--evict-window", "16",
        "--max-total-tokens", "2048", "--enable-cache-report", "--enable-metrics",
        "--evict-debug-check", "1", "--chunked-prefill-size", str(len(_haystack(tokenizer))),
    ]
    with ServerProcess(args) as srv:
        yield srv


def _flush(server) -> None:
    for _ in range(60):
        if requests.post(server.url + "/flush_cache", timeout=30).status_code == 200:
            return
        time.sleep(1)
    raise AssertionError("the server did not flush its cache")


def test_sixteen_queries_share_one_compressed_context(haystack_server, hf_model):
    """16 concurrent queries on one haystack, each for a different needle: the context's gates
    run once, every query is served from its compressed copy, and the answers equal those of
    16 separate requests that each carry the whole context, on an empty cache."""
    _, tokenizer = hf_model
    ctx = _haystack(tokenizer)
    asks = {k: ctx + _question(tokenizer, k) for k in NEEDLES}

    def gated():
        return _metrics(haystack_server).get("sglang_evict:gated_prompt_tokens_total", 0.0)

    separate = {}
    for key, ids in asks.items():
        _flush(haystack_server)
        before = gated()
        separate[key] = generate(haystack_server, ids, 6)
        assert separate[key]["meta_info"]["cached_tokens"] == 0
        assert gated() - before == len(ids)  # every prompt token's gates ran, once
    assert all(b["meta_info"]["sglang_evict"]["evictions"] > 0 for b in separate.values())

    _flush(haystack_server)
    before = gated()
    generate(haystack_server, ctx, 1)  # the context is computed, its gates run, once
    with cf.ThreadPoolExecutor(16) as pool:
        shared = dict(zip(asks, pool.map(lambda ids: generate(haystack_server, ids, 6),
                                         asks.values())))
    # each query matches the context, or more: a question's opening is shared by the others
    cached = {k: b["meta_info"]["cached_tokens"] for k, b in shared.items()}
    assert all(cached[k] >= len(ctx) for k in asks)
    computed = sum(len(ids) - cached[k] for k, ids in asks.items())
    assert gated() - before == len(ctx) + computed  # the context once, not 16 times
    # what one query holds: the compressed context it shares and its own tokens
    for b in shared.values():
        e = b["meta_info"]["sglang_evict"]
        assert e["live_head_slots"] < 0.5 * e["full_head_slots"]
    assert {k: b["output_ids"] for k, b in shared.items()} == {
        k: b["output_ids"] for k, b in separate.items()}
    m = _metrics(haystack_server)
    assert m["sglang_evict:head_slots_live"] <= m["sglang_evict:head_slots_capacity"]
    found = sum(NEEDLES[k] in b["text"] for k, b in shared.items())
    print(f"needles found at M={BUDGET}: {found} of {len(NEEDLES)}")


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
    before = _metrics(radix_server)
    again = two_views.run(topic="the ocean tides", backend=backend).text()
    assert again == first  # greedy, served from the compressed prefixes the first run left
    after = _metrics(radix_server)
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
    m = _drained(radix_server)
    assert m["sglang_evict:head_slots_tree"] > 0
    generate(radix_server, prefix, 4)  # and it keeps serving


@pytest.fixture
def lru_server():
    """Streaming M=400 in a 512-token pool: a finished 300-token request stays whole in the
    tree, so the next long prompt is short of room."""
    from sglang_evict.server_process import ServerProcess

    args = [
        "--evict-policy", "streaming", "--evict-budget", "400", "--evict-buffer", "8",
        "--evict-sinks", "4", "--evict-window", "8", "--evict-reclaim", "lru-first",
        "--max-total-tokens", "512", "--chunked-prefill-size", "256",
        "--enable-cache-report", "--enable-metrics", "--evict-debug-check", "1",
    ]
    with ServerProcess(args) as srv:
        yield srv


def test_lru_first_frees_whole_tree_nodes_before_any_lossy_reclaim(lru_server):
    a = list(range(1000, 1300))
    b = list(range(2000, 2250))
    assert generate(lru_server, a, 4)["meta_info"]["cached_tokens"] == 0
    # nothing short yet: the tree keeps A whole and serves it again
    assert generate(lru_server, a, 4)["meta_info"]["cached_tokens"] >= 290
    held = _metrics(lru_server)
    assert held["sglang_evict:head_slots_tree"] >= 300 * HPT
    # B (250 tokens) does not fit beside A: SGLang's LRU frees A's nodes whole, and the global
    # evictor (lossy: holes) never runs
    got = generate(lru_server, b, 4)
    assert got["meta_info"]["completion_tokens"] == 4
    assert got["meta_info"]["sglang_evict"]["reclaimed_head_slots"] == 0
    after = _metrics(lru_server)
    assert after.get("sglang_evict:reclaimed_head_slots_total", 0) == held.get(
        "sglang_evict:reclaimed_head_slots_total", 0)
    # A's last nodes left the tree whole (not holed): sent again, A finds at most the node of
    # its first prefill chunk (SGLang caches a chunked prompt node by node) and computes the rest
    again = generate(lru_server, a, 4)["meta_info"]
    assert again["cached_tokens"] in (0, 256) and again["completion_tokens"] == 4
    _drained(lru_server)
