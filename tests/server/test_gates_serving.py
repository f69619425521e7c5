"""Retention gates inside the real server, alone (policy none on the head-slot backend): log
beta computed during the forward pass and stored beside the KV equals an HF-transformers
computation of the same gates (the module of the training run that wrote the served
checkpoint); attaching gates leaves greedy outputs and the radix cache's hits those of vanilla
SGLang; cached prefixes keep their pinned scores."""

from __future__ import annotations

import uuid

import pytest
import torch

from gate_fixtures import hf_log_beta
from hf_reference import cut_at_eos
from serving_client import generate

pytestmark = pytest.mark.server

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "List three facts about the Moon:\n1.",
]


@pytest.fixture(scope="module")
def gated_server(servers, test_gates_path):
    """Gates alone."""
    args = ["--evict-gates", str(test_gates_path), "--enable-cache-report",
            "--max-total-tokens", "4096"]
    with servers.held(args) as srv:
        yield srv


# Shares a prefix among its requests, unique to this module (so no server has it yet).
RADIX_CONTEXT = "Field notes 7f3a-radix: the heron waits by the reed bed at dawn. " * 4
RADIX_ASKS = [" What does the heron do?", " Where is the reed bed?", " What does the heron do?"]


def _radix_ids(tokenizer) -> list[list[int]]:
    context = tokenizer(RADIX_CONTEXT)["input_ids"]
    return [context + tokenizer(ask, add_special_tokens=False)["input_ids"] for ask in RADIX_ASKS]


def vanilla_requests(tokenizer) -> dict:
    """What vanilla SGLang answers before this module's server starts (tests/lane_servers.py):
    each sequence in order, so its radix cache's hits are those of the same requests here."""
    return {"greedy": [(tokenizer(p)["input_ids"], 24, {}) for p in PROMPTS],
            "radix": [(ids, 12, {}) for ids in _radix_ids(tokenizer)]}


def evict_stats(response) -> dict:
    entry = response["meta_info"]["sglang_evict"]
    assert isinstance(entry, dict), entry
    return entry


@pytest.fixture(scope="module")
def gates(trained_test_gates):
    """The training run's own gates module; the servers load the file it exported."""
    from sglang_evict.gates.checkpoint import read_gate_header

    module, path = trained_test_gates
    assert read_gate_header(path).training["steps"] == 1
    return module


@pytest.mark.parametrize("prompt", PROMPTS)
def test_stored_log_beta_equals_hf_reference(gated_server, hf_model, gates, prompt):
    model, tokenizer = hf_model
    prompt_ids = tokenizer(f"[{uuid.uuid4().hex[:8]}] {prompt}")["input_ids"]
    out = generate(gated_server, prompt_ids, 12)
    stats = evict_stats(out)
    # KV (and so a score) exists for the prompt and every generated token but the last.
    tokens = (prompt_ids + out["output_ids"])[: stats["scored_tokens"]]
    assert stats["scored_tokens"] == len(prompt_ids) + len(out["output_ids"]) - 1

    reference = hf_log_beta(model, gates, tokens)  # [L, T, H]
    served = torch.tensor(stats["mean_log_beta_per_layer_head"], dtype=torch.float64)
    expected = reference.double().mean(dim=1)
    assert served.shape == (gates.config.num_layers, gates.config.num_kv_heads)
    # The gates are input dependent: a constant or misplaced score would not match.
    assert reference.std() > 0.05
    torch.testing.assert_close(served, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        torch.tensor(stats["mean_log_beta_per_layer"], dtype=torch.float64),
        expected.mean(dim=1), rtol=1e-4, atol=1e-4,
    )


@pytest.mark.parametrize("prompt", PROMPTS)
def test_gates_attached_keep_greedy_output(vanilla, gated_server, hf_model, prompt):
    _, tokenizer = hf_model
    ids = tokenizer(prompt)["input_ids"]
    reply = vanilla["greedy"][PROMPTS.index(prompt)]
    gated = cut_at_eos(generate(gated_server, ids, 24)["output_ids"], tokenizer)
    assert gated == cut_at_eos(reply["output_ids"], tokenizer)


def test_prefix_hit_reuses_pinned_scores(gated_server, hf_model):
    _, tokenizer = hf_model
    ids = tokenizer(f"Note {uuid.uuid4().hex}: " + "a b c d e f g. " * 12)["input_ids"]
    first = generate(gated_server, ids, 4)
    second = generate(gated_server, ids, 4)
    assert second["meta_info"]["cached_tokens"] >= len(ids) - 1
    # Cached tokens were not recomputed: their scores come from the store as written the first
    # time, so both requests report the same statistics.
    torch.testing.assert_close(
        torch.tensor(evict_stats(second)["mean_log_beta_per_layer_head"]),
        torch.tensor(evict_stats(first)["mean_log_beta_per_layer_head"]),
        rtol=1e-6, atol=1e-6,
    )


def test_gates_alone_with_the_radix_cache_is_vanilla_sglang(vanilla, gated_server, hf_model):
    """Same greedy tokens and the same cached-token counts as vanilla SGLang with its radix
    cache, over requests that share prefixes."""
    _, tokenizer = hf_model
    for ask, ids, reply in zip(RADIX_ASKS, _radix_ids(tokenizer), vanilla["radix"], strict=True):
        ours = generate(gated_server, ids, 12)
        assert ours["output_ids"] == reply["output_ids"], ask
        assert ours["meta_info"]["cached_tokens"] == reply["meta_info"]["cached_tokens"], ask
    assert ours["meta_info"]["cached_tokens"] >= len(ids) - 1  # the repeated ask hit in full
