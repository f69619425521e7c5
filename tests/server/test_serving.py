"""The plugin-enabled server on CPU with the default model: greedy agreement with HF
transformers, prefix caching, the OpenAI API and the sglang frontend language; and what vanilla
SGLang cannot do on a small pool (which eviction does: test_eviction_serving.py)."""

from __future__ import annotations

import concurrent.futures as cf
import time
import uuid

import pytest
import requests

from hf_reference import cut_at_eos, greedy_ids
from serving_client import generate

pytestmark = pytest.mark.server

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived",
    "Translate to French: 'The weather is nice today.'\nFrench:",
    "List three facts about the Moon:\n1.",
]
MAX_NEW_TOKENS = 24


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_transformers(server, hf_model, prompt):
    model, tokenizer = hf_model
    input_ids = tokenizer(prompt)["input_ids"]
    served = cut_at_eos(generate(server, input_ids, MAX_NEW_TOKENS)["output_ids"], tokenizer)
    reference = greedy_ids(model, tokenizer, input_ids, MAX_NEW_TOKENS)
    assert len(reference) > 0
    assert served == reference, (
        f"server: {tokenizer.decode(served)!r}\nHF:     {tokenizer.decode(reference)!r}"
    )


def test_repeated_prefix_reports_cached_tokens(server, hf_model):
    _, tokenizer = hf_model
    # A nonce keeps earlier tests' cache entries from matching this prefix.
    prefix = f"Document {uuid.uuid4().hex}. " + "The quick brown fox jumps over the lazy dog. " * 20
    prefix_len = len(tokenizer(prefix)["input_ids"])
    first = generate(server, tokenizer(prefix + "Question one:")["input_ids"], 4)
    second = generate(server, tokenizer(prefix + "Question two:")["input_ids"], 4)
    assert first["meta_info"]["cached_tokens"] < 8
    # The whole shared prefix (up to the last token or two, whose tokenisation may merge
    # with the suffix) comes from the radix cache.
    assert second["meta_info"]["cached_tokens"] >= prefix_len - 2


def test_openai_chat_completion_and_follow_up(server, hf_model):
    from openai import OpenAI

    model, tokenizer = hf_model
    client = OpenAI(base_url=server.url + "/v1", api_key="test")
    messages = [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": f"Say hello to {uuid.uuid4().hex[:6]} in one sentence."},
    ]
    reply = client.chat.completions.create(
        model="default", messages=messages, temperature=0, max_tokens=MAX_NEW_TOKENS
    )
    template_ids = list(
        tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    )
    reference = greedy_ids(model, tokenizer, template_ids, MAX_NEW_TOKENS)
    assert reply.choices[0].message.content == tokenizer.decode(reference, skip_special_tokens=True)
    assert reply.usage.prompt_tokens == len(template_ids)

    messages += [
        {"role": "assistant", "content": reply.choices[0].message.content},
        {"role": "user", "content": "Now say goodbye."},
    ]
    follow_up = client.chat.completions.create(
        model="default", messages=messages, temperature=0, max_tokens=8
    )
    assert follow_up.choices[0].message.content
    # The first turn's prompt is a prefix of the follow-up's and sits in the radix cache.
    assert follow_up.usage.prompt_tokens_details.cached_tokens >= len(template_ids) - 2


def test_sgl_function_program(server, hf_model):
    from sglang_evict.demo import frontend_program

    model, tokenizer = hf_model
    first = frontend_program(server.url)
    second = frontend_program(server.url)
    assert first["setting"] in ("indoors", "outdoors")
    assert first["sight"] and first["sight"] == second["sight"]
    # Running the same program again hits the radix cache for its whole prompt.
    assert second["cached_tokens"] >= second["prompt_tokens"] - 1
    # The generated text is the model's greedy continuation of the program's prompt.
    prompt_ids = tokenizer(first["prompt_text"], add_special_tokens=False)["input_ids"]
    reference = greedy_ids(model, tokenizer, prompt_ids, 40)
    assert first["sight"] == tokenizer.decode(reference, skip_special_tokens=True).strip()


def test_the_benches_client_streams_what_a_plain_request_returns(server, hf_model):
    """bench/client.py (every bench's requests): a streamed request brings the same greedy
    tokens as a whole one, an arrival per chunk that brought new tokens, and `evict` goes as
    the request's custom_params (which SGLang without eviction settings accepts and ignores)."""

    import bench_modules

    client = bench_modules.load("client")
    _, tokenizer = hf_model
    ids = tokenizer(PROMPTS[0])["input_ids"]
    whole = client.generate(server.url, ids, 8)
    assert whole["meta_info"]["completion_tokens"] == 8  # ignore_eos by default
    assert whole["output_ids"] == generate(server, ids, 8, ignore_eos=True)["output_ids"]
    got = client.stream(server.url, ids, 8)
    assert got.ok and got.output_ids == whole["output_ids"]
    assert got.meta_info["completion_tokens"] == 8
    # a chunk per decode step, unless the server's output side lagged and sent several new
    # tokens in one (seen in CI: 6 then 8): the counts rise to 8 and it did stream
    counts = [n for n, _ in got.marks]
    assert counts == sorted(counts) and counts[-1] == 8
    assert 2 <= len(got.arrivals) == len(set(counts) - {0}) and got.arrivals == sorted(got.arrivals)
    assert got.arrivals[0] > got.sent
    body = client.request_body(PROMPTS[0], 4, evict={"budget": 16})
    assert body["sampling_params"]["custom_params"] == {"sglang_evict": {"budget": 16}}
    assert body["text"] == PROMPTS[0]
    assert client.generate(server.url, PROMPTS[0], 4, evict={"budget": 16})[
        "meta_info"]["completion_tokens"] == 4


def test_vanilla_server_reports_no_gate_stats(server, hf_model):
    _, tokenizer = hf_model
    out = generate(server, tokenizer("Hello")["input_ids"], 2)
    assert "sglang_evict" not in out["meta_info"]


SMALL_POOL = 128  # test_eviction_serving.py's pool
QUEUED_SECONDS = 10  # far longer than a scheduler round, in which it would be admitted


@pytest.fixture
def small_vanilla_server(servers):
    """Vanilla SGLang on the eviction tests' pool, radix cache off as there."""
    with servers.held(["--disable-radix-cache", "--max-total-tokens", str(SMALL_POOL)]) as srv:
        yield srv


def test_vanilla_cannot_hold_a_generation_4x_its_pool(small_vanilla_server, hf_model):
    """Without the radix cache SGLang reserves prompt + max_new_tokens before prefilling: a
    generation of 4x the pool waits in the queue and is never prefilled; once aborted it ends
    without the generation. (With eviction it completes: test_eviction_serving.py.)"""
    server = small_vanilla_server
    _, tokenizer = hf_model
    ids = tokenizer("Write a very long story about a dragon.")["input_ids"]
    n = 4 * SMALL_POOL
    rid = f"too-long-{uuid.uuid4().hex}"
    log_before = server.log_path.read_text(errors="replace")
    with cf.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(requests.post, server.url + "/generate", timeout=300, json={
            "rid": rid, "input_ids": ids,
            "sampling_params": {"temperature": 0, "max_new_tokens": n, "ignore_eos": True},
        })
        time.sleep(QUEUED_SECONDS)
        log = server.log_path.read_text(errors="replace")[len(log_before):]
        queued = not answer.done() and "Prefill batch" not in log and "Decode batch" not in log
        requests.post(server.url + "/abort_request", json={"rid": rid}, timeout=30
                      ).raise_for_status()
        r = answer.result()
    assert queued, log
    if r.status_code == 200:
        meta = r.json()["meta_info"]
        assert meta["finish_reason"]["type"] == "abort" and meta["completion_tokens"] < n
    else:
        assert r.status_code >= 400
    assert generate(server, ids, 4, ignore_eos=True)["meta_info"]["completion_tokens"] == 4
