"""The radix cache with eviction under pressure, in a real SGLang server (CPU, default model,
packaged retention gates): sixteen queries served from one compressed context, and the order of
reclaim when the pool runs short (lru-first frees whole tree nodes before any lossy reclaim).
Every step ends with the cache's integrity check. Each test has its own server (function
scope), so only it and the session's vanilla server are alive."""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from serving_client import drained, evict_metrics, flush, generate

LAYERS, KV_HEADS = 30, 3
HPT = LAYERS * KV_HEADS
BUDGET = 48  # the radix tests' budget (test_radix_serving.py)

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


def test_sixteen_queries_share_one_compressed_context(haystack_server, hf_model):
    """16 concurrent queries on one haystack, each for a different needle: the context's gates
    run once, every query is served from its compressed copy, and the answers equal those of
    16 separate requests that each carry the whole context, on an empty cache."""
    _, tokenizer = hf_model
    ctx = _haystack(tokenizer)
    asks = {k: ctx + _question(tokenizer, k) for k in NEEDLES}

    def gated():
        return evict_metrics(haystack_server).get("sglang_evict:gated_prompt_tokens_total", 0.0)

    separate = {}
    for key, ids in asks.items():
        flush(haystack_server)
        before = gated()
        separate[key] = generate(haystack_server, ids, 6)
        assert separate[key]["meta_info"]["cached_tokens"] == 0
        assert gated() - before == len(ids)  # every prompt token's gates ran, once
    assert all(b["meta_info"]["sglang_evict"]["evictions"] > 0 for b in separate.values())

    flush(haystack_server)
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
    m = evict_metrics(haystack_server)
    assert m["sglang_evict:head_slots_live"] <= m["sglang_evict:head_slots_capacity"]
    found = sum(NEEDLES[k] in b["text"] for k, b in shared.items())
    print(f"needles found at M={BUDGET}: {found} of {len(NEEDLES)}")


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
    held = evict_metrics(lru_server)
    assert held["sglang_evict:head_slots_tree"] >= 300 * HPT
    # B (250 tokens) does not fit beside A: SGLang's LRU frees A's nodes whole, and the global
    # evictor (lossy: holes) never runs
    got = generate(lru_server, b, 4)
    assert got["meta_info"]["completion_tokens"] == 4
    assert got["meta_info"]["sglang_evict"]["reclaimed_head_slots"] == 0
    after = evict_metrics(lru_server)
    assert after.get("sglang_evict:reclaimed_head_slots_total", 0) == held.get(
        "sglang_evict:reclaimed_head_slots_total", 0)
    # A's last nodes left the tree whole (not holed): sent again, A finds at most the node of
    # its first prefill chunk (SGLang caches a chunked prompt node by node) and computes the rest
    again = generate(lru_server, a, 4)["meta_info"]
    assert again["cached_tokens"] in (0, 256) and again["completion_tokens"] == 4
    drained(lru_server)
