"""The Triton path in a real server (Triton's interpreter on CPU): gates alone with
`--evict-kernel triton`, so the head-slot store, the live lists' indices and the attention run
as Triton kernels. Its greedy tokens are vanilla SGLang's and the log beta it stored equals the
HF-transformers computation of the same gates."""

from __future__ import annotations

import os

import pytest
import torch

from gate_fixtures import hf_log_beta
from serving_client import generate

pytestmark = pytest.mark.server


# unique to this module, so that the server's statistics cover this prompt alone
PROMPT = "[triton-5c2e] The tallest mountain on Earth is"


def vanilla_requests(tokenizer) -> dict:
    """What vanilla SGLang answers before this module's server starts (tests/lane_servers.py)."""
    return {"greedy": [(tokenizer(PROMPT)["input_ids"], 3, {})]}


@pytest.fixture(scope="module")
def gated_triton_server(servers, test_gates_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    # no warm-up request: under the interpreter it costs a minute, and the test's own request
    # is the first the kernels see either way
    args = ["--evict-gates", str(test_gates_path), "--evict-kernel", "triton",
            "--skip-server-warmup", "--max-total-tokens", "512"]
    with servers.held(args, env) as srv:
        yield srv


def test_triton_path_in_the_server_equals_vanilla_and_the_hf_gates(
        vanilla, gated_triton_server, hf_model, trained_test_gates):
    model, tokenizer = hf_model
    gates = trained_test_gates[0]
    ids = tokenizer(PROMPT)["input_ids"]
    # a prefill and two decode steps (about 8 s a forward pass, interpreted)
    triton_path = generate(gated_triton_server, ids, 3)
    assert triton_path["output_ids"] == vanilla["greedy"][0]["output_ids"]
    stats = triton_path["meta_info"]["sglang_evict"]
    tokens = (ids + triton_path["output_ids"])[: stats["scored_tokens"]]
    assert stats["scored_tokens"] == len(ids) + len(triton_path["output_ids"]) - 1
    reference = hf_log_beta(model, gates, tokens).double().mean(dim=1)  # [L, H]
    torch.testing.assert_close(
        torch.tensor(stats["mean_log_beta_per_layer_head"], dtype=torch.float64), reference,
        rtol=1e-4, atol=1e-4,
    )
