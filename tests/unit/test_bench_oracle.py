"""bench/oracle.py (the hindsight oracle of bench/quality.py) and bench/needle_survival.py,
against independent computations on the default model: transformers' own attention weights,
its own greedy decoding, and the streaming policy's definition."""

from __future__ import annotations

import json

import pytest
import torch

import bench_modules



_load = bench_modules.load


@pytest.fixture(scope="module")
def oracle():
    return _load("oracle")


@pytest.fixture(scope="module")
def models(oracle, default_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    eager = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    return tokenizer, oracle.load_model(default_model_path), eager


def test_importance_is_the_answers_softmax_weight_on_each_prompt_entry(oracle, models):
    tokenizer, model, eager = models
    prompt = tokenizer.encode("The code for the blue door is 4821. The code for the red door is")
    answer = tokenizer.encode(" 9130, and the end", add_special_tokens=False)
    importance = oracle.hindsight_importance(model, prompt, answer)
    P = len(prompt)
    with torch.no_grad():
        out = eager(input_ids=torch.tensor([prompt + answer[:-1]]), output_attentions=True)
    L, Hkv = eager.config.num_hidden_layers, eager.config.num_key_value_heads
    g = eager.config.num_attention_heads // Hkv
    expected = torch.stack([a[0, :, P - 1:, :P].sum(dim=1).view(Hkv, g, P).sum(dim=1)
                            for a in out.attentions])
    assert importance.shape == (L, Hkv, P)
    torch.testing.assert_close(importance, expected, rtol=1e-4, atol=1e-5)


def test_oracle_keep_is_the_global_top_and_generation_sees_only_it(oracle, models):
    tokenizer, model, eager = models
    importance = torch.tensor([[[0.1, 0.9, 0.3]], [[0.5, 0.0, 0.8]]])  # [L=2, H=1, P=3]
    assert oracle.oracle_keep(importance, 1).tolist() == [[[False, True, False]],
                                                          [[False, False, True]]]
    assert bool(oracle.oracle_keep(importance, 5).all())
    prompt = tokenizer.encode("<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n")
    L, Hkv = eager.config.num_hidden_layers, eager.config.num_key_value_heads
    everything = torch.ones(L, Hkv, len(prompt), dtype=torch.bool)
    text = oracle.oracle_generate(model, tokenizer, prompt, everything, 12)
    with torch.no_grad():
        ids = eager.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    assert text == tokenizer.decode(ids[0, len(prompt):], skip_special_tokens=True)
    # dropping every prompt entry but the first changes what the answer can read
    first_only = torch.zeros_like(everything)
    first_only[:, :, 0] = True
    assert oracle.oracle_generate(model, tokenizer, prompt, first_only, 12) != text


def test_needles_are_found_and_streaming_keeps_sinks_and_the_recent_tokens(oracle, models):
    tokenizer, _, _ = models
    prompt = tokenizer.encode("filler words here. The number is 4279559. more filler text")
    pos = oracle.needle_positions(tokenizer, prompt, ["4279559"])
    assert tokenizer.decode([prompt[i] for i in pos]).strip() == "4279559"
    assert oracle.needle_positions(tokenizer, prompt, ["99999999"]) == []
    L, P, H, M, B, sinks = 3, 300, 2, 16, 8, 4
    alive = oracle.served_alive("streaming", torch.zeros(L, P, H), M, B, sinks, chunk=128)
    assert alive.shape == (L, H, P)
    kept = alive[0, 0].nonzero().flatten().tolist()
    # streaming: the sinks and the most recent tokens, the same for every layer and head
    assert kept[:sinks] == list(range(sinks)) and kept[-1] == P - 1
    assert kept[sinks:] == list(range(kept[sinks], P))
    assert M <= len(kept) <= M + B
    assert bool((alive == alive[:1, :1]).all())


def test_needle_survival_quick_run_writes_json_and_png(tmp_path):
    survival = _load("needle_survival")
    out = tmp_path / "ns.json"
    assert survival.main(["--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    row = result["rows"][0]
    assert set(row["share_per_layer"]) == {"retention-global", "oracle", "streaming"}
    assert all(0.0 <= s <= 1.0 for v in row["share_per_layer"].values() for s in v)
    assert len(row["share_per_layer"]["oracle"]) == 30 and row["needle_positions"]
    assert out.with_suffix(".png").stat().st_size > 1000
