"""The scale sheet's arithmetic against figures computed independently."""

from __future__ import annotations

import json

import pytest

from sglang_evict.config import EvictConfig
from sglang_evict.plan import PlanError, parse_bytes, plan, read_model

LLAMA_31_8B = {  # Meta-Llama-3.1-8B's config.json (the fields the sheet reads)
    "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
    "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


@pytest.fixture
def llama(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_31_8B))
    return read_model(tmp_path)


def test_weights_and_kv_cost_from_the_config(llama):
    assert llama.weight_bytes == 2 * 8_030_261_248  # the model card's parameter count, bf16
    assert llama.kv_bytes_per_token == 128 * 1024  # 128 KiB: 2 x 32 layers x 8 heads x 128 x 2 B


def test_a_gpu_plan(llama):
    from sglang_evict.sizing import bytes_per_token

    cfg = EvictConfig(policy="retention-global", budget=128)
    p = plan(llama, context=32768, output=512, budget=128, cfg=cfg,
             gpu_memory=parse_bytes("80GiB"), mem_fraction=0.88)
    pool = int(80 * 2**30 * 0.88) - 2 * 8_030_261_248
    assert p.kv_pool_bytes == pool
    assert p.tokens_full_size == pool // (128 * 1024)
    assert p.vanilla == (pool // (128 * 1024)) // (32768 + 512)
    physical = pool // (128 * 1024 + bytes_per_token(32, 8, 8))
    assert p.tokens_physical == physical
    by_virtual = physical * 8 // (32768 + 512)
    by_physical = (physical - 4096) // (128 + 128 + 1)  # serve's chunk: 4096 on a large pool
    assert p.at_budget == min(by_virtual, by_physical) and p.at_budget > 5 * p.vanilla


def test_physical_bound_when_oversubscription_is_ample(llama):
    cfg = EvictConfig(policy="retention", budget=256, buffer=64, oversubscribe=64)
    p = plan(llama, context=8192, output=0, budget=256, cfg=cfg, kv_tokens=100_000,
             chunk=2048)
    assert p.at_budget == (100_000 - 2048) // 321
    assert p.squeezed == min((100_000 - 2048) // 5, 100_000 * 64 // 8192)
    assert p.limit == "physical head-slots"


def test_bad_input_is_named(tmp_path, llama):
    with pytest.raises(PlanError, match="does not exist"):
        read_model(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(PlanError, match="not valid JSON"):
        read_model(tmp_path)
    with pytest.raises(PlanError, match="cannot read"):
        parse_bytes("lots")
    with pytest.raises(PlanError, match="do not fit"):
        plan(llama, context=10, output=0, budget=1, gpu_memory=parse_bytes("8GB"))
    assert parse_bytes("141GB") == 141 * 10**9 and parse_bytes("24GiB") == 24 * 2**30


def test_command_line(capsys, default_model_path):
    from sglang_evict.cli import main

    assert main(["plan", "--model", str(default_model_path), "--kv-tokens", "2048",
                 "--context", "500", "--output", "8", "--budget", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["vanilla"] == 2048 // 508
    assert main(["plan", "--kv-tokens", "10", "--context", "0", "--budget", "4"]) == 2
    assert "--context" in capsys.readouterr().err
