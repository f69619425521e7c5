"""The radix cache on with head-granular eviction, in a real SGLang server (CPU, default model,
packaged retention gates): multi-turn chats and forking programs served from compressed
prefixes, aborted requests, sixteen queries served from one compressed context, and the order of
reclaim when the pool runs short (lru-first frees whole tree nodes before any lossy reclaim).
One server for all: the last two set their eviction per request. Every step ends with the
cache's integrity check (lists against the virtual map, owners, shared parts, refcounts, the
tree's counts)."""

from __future__ import annotations

import concurrent.futures as cf

import pytest
import requests

from serving_client import drained, evict_metrics, flush, generate

BUDGET, BUFFER = 48, 8
POOL = 2048
LAYERS, KV_HEADS = 30, 3
HPT = LAYERS * KV_HEADS

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


@pytest.fixture(scope="module")
def radix_server(servers, hf_model):
    """Prefill chunks the haystack's length (longer than every other prompt here but the lru
    test's): a request that carries the context and its question alone compresses the context
    at the point where a request that matched it in the tree finds it compressed."""
    _, tokenizer = hf_model
    args = [
        "--evict-policy", "retention-global", "--evict-budget", str(BUDGET),
        "--evict-buffer", str(BUFFER), "--evict-sinks", "16", "--evict-window", "16",
        "--evict-overrides", "any",  # the haystack's buffer, the lru test's streaming budget
        "--max-total-tokens", str(POOL), "--enable-cache-report", "--enable-metrics",
        "--chunked-prefill-size", str(len(_haystack(tokenizer))),
        "--evict-debug-check", "1",
    ]
    with servers.held(args) as srv:
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


def test_sixteen_queries_share_one_compressed_context(radix_server, hf_model):
    """16 concurrent queries on one haystack, each for a different needle: the context's gates
    run once, every query is served from its compressed copy, and the answers equal those of
    16 separate requests that each carry the whole context, on an empty cache."""
    _, tokenizer = hf_model
    ctx = _haystack(tokenizer)
    evict = {"sglang_evict": {"buffer": HAYSTACK_BUFFER}}
    asks = {k: ctx + _question(tokenizer, k) for k in NEEDLES}

    def gated():
        return evict_metrics(radix_server).get("sglang_evict:gated_prompt_tokens_total", 0.0)

    separate = {}
    for key, ids in asks.items():
        flush(radix_server)
        before = gated()
        separate[key] = generate(radix_server, ids, 6, custom_params=evict)
        assert separate[key]["meta_info"]["cached_tokens"] == 0
        assert gated() - before == len(ids)  # every prompt token's gates ran, once
    assert all(b["meta_info"]["sglang_evict"]["evictions"] > 0 for b in separate.values())

    flush(radix_server)
    before = gated()
    # the context is computed, its gates run, once
    generate(radix_server, ctx, 1, custom_params=evict)
    with cf.ThreadPoolExecutor(16) as pool:
        shared = dict(zip(asks, pool.map(
            lambda ids: generate(radix_server, ids, 6, custom_params=evict), asks.values())))
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
    m = evict_metrics(radix_server)
    assert m["sglang_evict:head_slots_live"] <= m["sglang_evict:head_slots_capacity"]
    found = sum(NEEDLES[k] in b["text"] for k, b in shared.items())
    print(f"needles found at M={BUDGET}: {found} of {len(NEEDLES)}")


def test_lru_first_frees_whole_tree_nodes_before_any_lossy_reclaim(radix_server):
    """Streaming with a budget above A's length (set per request): a finished A stays whole in
    the tree, and the next long prompt B does not fit beside it (A + B > POOL)."""
    from sglang_evict.serve import flag_value

    chunk = int(flag_value(radix_server.sglang_args, "--chunked-prefill-size"))
    a = list(range(1000, 1000 + POOL // 2 + 100))
    b = list(range(4000, 4000 + POOL // 2 - 50))
    assert len(a) > chunk and len(a) + len(b) > POOL
    evict = {"sglang_evict": {"policy": "streaming", "budget": len(a) + 76, "buffer": 8,
                              "sinks": 4, "window": 8}}

    def run(ids):
        return generate(radix_server, ids, 4, custom_params=evict)["meta_info"]

    flush(radix_server)
    assert run(a)["cached_tokens"] == 0
    # nothing short yet: the tree keeps A whole and serves it again
    assert run(a)["cached_tokens"] >= len(a) - 10
    held = evict_metrics(radix_server)
    assert held["sglang_evict:head_slots_tree"] >= len(a) * HPT
    # B does not fit beside A: SGLang's LRU frees A's nodes whole, and the global evictor
    # (lossy: holes) never runs
    got = run(b)
    assert got["completion_tokens"] == 4
    assert got["sglang_evict"]["reclaimed_head_slots"] == 0
    after = evict_metrics(radix_server)
    assert after.get("sglang_evict:reclaimed_head_slots_total", 0) == held.get(
        "sglang_evict:reclaimed_head_slots_total", 0)
    # A's last nodes left the tree whole (not holed): sent again, A finds at most the node of
    # its first prefill chunk (SGLang caches a chunked prompt node by node) and computes the rest
    again = run(a)
    assert again["cached_tokens"] in (0, chunk) and again["completion_tokens"] == 4
    drained(radix_server)
