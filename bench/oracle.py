"""The hindsight oracle at a KV budget, and where a needle's head-slots survive.

The oracle is the ceiling for any query-agnostic score at budget M on this model: a full-cache
pass over the prompt followed by the expected answer measures how much attention the answer's
queries give each prompt entry (one per layer, KV head and token: softmax weights summed over
the answer's rows and the query heads of the group); at the answer's start the oracle keeps the
L·H·M prompt entries with the most (DBTrimKV's one budget, as retention-global keeps) and
decodes greedily over those and the answer's own tokens. The prompt itself is prefilled with
the full cache, so the oracle's only difference from the full cache is what the answer sees.

Needle survival: for the prompt's needle tokens (the expected answers' token spans in the
prompt), the share of their head-slots per layer still alive when the answer starts, under the
oracle's choice and under the server's evictor replayed on the prompt (`training.
hard_eviction.eviction_times`, prefill chunks as served) for the gates' scores (on the full
cache's attention inputs) and for streaming.

Model: the default model through transformers (float32, CPU), the same weights the server
serves.
"""

from __future__ import annotations

import torch

ORACLE_ATTENTION = "sglang_evict_oracle"


class _Capture:
    """What the oracle's attention function reads and writes for one forward."""

    answer_from: int | None = None  # importance pass: rows from here on are the answer's
    prompt_len: int = 0
    importance: dict[int, torch.Tensor] = {}  # layer -> [Hkv, prompt_len]
    kept: torch.Tensor | None = None  # decode: bool [L, Hkv, prompt_len]
    inputs: dict[int, torch.Tensor] = {}  # layer -> attention input [T, d] (the gates' input)


_capture = _Capture()


def _oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      **kwargs):
    """Causal attention; on the importance pass it also sums the answer rows' softmax weights
    over the prompt's keys; on decode it hides the prompt entries the oracle dropped."""
    import torch.nn.functional as F

    layer = module.layer_idx
    B, Hq, Tq, D = query.shape
    Hkv, Tk = key.shape[1], key.shape[2]
    g = Hq // Hkv
    k = key.repeat_interleave(g, dim=1)
    v = value.repeat_interleave(g, dim=1)
    scale = scaling if scaling is not None else D ** -0.5
    rows = torch.arange(Tk - Tq, Tk)
    visible = rows[:, None] >= torch.arange(Tk)[None, :]  # [Tq, Tk]
    if _capture.kept is not None and Tq < Tk:  # decode: the answer sees what the oracle kept
        P = _capture.prompt_len
        keep = torch.ones(Hkv, Tk, dtype=torch.bool)
        keep[:, :P] = _capture.kept[layer]
        visible = visible[None] & keep.repeat_interleave(g, dim=0)[:, None, :]  # [Hq, Tq, Tk]
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=visible, scale=scale)
    if _capture.answer_from is not None:
        a, P = _capture.answer_from, _capture.prompt_len
        logits = (query[:, :, a:] @ k.transpose(-1, -2)) * scale  # [B, Hq, A, Tk]
        logits = logits.masked_fill(~visible[a:], float("-inf"))
        weights = torch.softmax(logits.float(), dim=-1)[0, :, :, :P].sum(dim=1)  # [Hq, P]
        _capture.importance[layer] = weights.view(Hkv, g, P).sum(dim=1)
    return out.transpose(1, 2).contiguous(), None


def load_model(path):
    from transformers import AttentionInterface, AutoModelForCausalLM

    AttentionInterface.register(ORACLE_ATTENTION, _oracle_attention)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation=ORACLE_ATTENTION)
    model.eval().requires_grad_(False)
    return model


def answer_ids(tokenizer, sample: dict) -> list[int]:
    """The expected answer as the model would continue RULER's answer prefix."""
    return tokenizer.encode(" " + ", ".join(sample["outputs"]), add_special_tokens=False)


@torch.no_grad()
def hindsight_importance(model, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """float [L, Hkv, P]: the attention the answer's queries (the prompt's last token, which
    predicts the answer's first, and the answer's tokens but its last) give each prompt entry,
    from a full-cache pass over prompt + answer. Also records the gates' inputs per layer."""
    P = len(prompt)
    ids = torch.tensor([prompt + answer[:-1]])
    _capture.answer_from, _capture.prompt_len, _capture.importance = P - 1, P, {}
    _capture.inputs = {}
    hooks = [layer.self_attn.register_forward_pre_hook(_input_hook(i), with_kwargs=True)
             for i, layer in enumerate(model.model.layers)]
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        _capture.answer_from = None
        for h in hooks:
            h.remove()
    return torch.stack([_capture.importance[i] for i in range(len(model.model.layers))])


def _input_hook(i: int):
    def hook(module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        _capture.inputs[i] = x[0, :_capture.prompt_len].detach()
    return hook


def oracle_keep(importance: torch.Tensor, budget: int) -> torch.Tensor:
    """bool [L, Hkv, P]: the L·Hkv·M prompt entries with the most hindsight attention (all of
    them when the prompt is shorter than M)."""
    flat = importance.flatten()
    k = min(flat.numel(), importance.shape[0] * importance.shape[1] * budget)
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.topk(flat, k).indices] = True
    return keep.view_as(importance)


@torch.no_grad()
def oracle_generate(model, tokenizer, prompt: list[int], kept: torch.Tensor, max_new: int) -> str:
    """Greedy answer: the prompt prefilled with the full cache, then every answer token
    attends only to the kept prompt entries and the answer so far."""
    from transformers import DynamicCache

    _capture.prompt_len, _capture.kept = len(prompt), None
    cache = DynamicCache()
    out = model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True)
    token = int(out.logits[0, -1].argmax())
    generated = [token]
    _capture.kept = kept
    try:
        while len(generated) < max_new and token != tokenizer.eos_token_id:
            out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            token = int(out.logits[0, -1].argmax())
            generated.append(token)
    finally:
        _capture.kept = None
    return tokenizer.decode(generated, skip_special_tokens=True)


def needle_positions(tokenizer, prompt: list[int], values) -> list[int]:
    """Prompt positions of the expected answers' tokens (each value's first occurrence, as
    tokenized with or without a leading space)."""
    found: list[int] = []
    for value in values:
        for text in (" " + value, value):
            span = tokenizer.encode(text, add_special_tokens=False)
            n = len(span)
            hit = next((i for i in range(len(prompt) - n + 1) if prompt[i:i + n] == span), None)
            if hit is not None:
                found += range(hit, hit + n)
                break
    return sorted(set(found))


def served_alive(policy: str, log_beta: torch.Tensor, budget: int, buffer: int, sinks: int,
                 chunk: int) -> torch.Tensor:
    """bool [L, Hkv, P]: the prompt entries the server's evictor (`policy`, one request) keeps
    at the answer's start, replayed over the prompt's log β [L, P, Hkv] in prefill chunks."""
    from sglang_evict.training.hard_eviction import eviction_times, make_evictor, serving_steps

    L, P, H = log_beta.shape
    evictor = make_evictor(policy, budget, buffer, sinks, 0, L, H)
    padded = torch.cat([log_beta, log_beta[:, -1:]], dim=1)  # one more step: the answer's start
    times = eviction_times(padded, evictor, serving_steps(P + 1, P, chunk))[:, :P]
    return (times > P).permute(0, 2, 1)


@torch.no_grad()
def gate_log_beta(gates) -> torch.Tensor:
    """[L, P, Hkv] log β of the prompt from the last importance pass's attention inputs."""
    return torch.stack([gates.forward_layer(i, _capture.inputs[i])
                        for i in range(gates.config.num_layers)])


def oracle_rows(model_path, jobs: list[tuple[dict, list[int]]]) -> list[dict]:
    """bench/quality.py's rows of the oracle for [(sample, [M, ...])]: one per (sample, M), in
    the servers' row form. KV kept: the L·H·M kept prompt entries plus the answer's own, over
    the full cache's."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from sglang_evict.training.data import score_sample

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = load_model(model_path)
    rows = []
    for sample, budgets in tqdm(jobs, desc="oracle"):
        prompt = tokenizer.encode(sample["input"])
        importance = hindsight_importance(model, prompt, answer_ids(tokenizer, sample))
        L, H, P = importance.shape
        for budget in budgets:
            kept = oracle_keep(importance, budget)
            text = oracle_generate(model, tokenizer, prompt, kept, sample["tokens_to_generate"])
            answer = len(tokenizer.encode(text, add_special_tokens=False))
            live = int(kept.sum()) + answer * L * H
            rows.append({
                "task": sample["task"], "length": sample["length"], "index": sample["index"],
                "policy": "oracle", "budget": budget, "prediction": text,
                "outputs": sample["outputs"],
                "score": score_sample(sample["task"], text, sample["outputs"]),
                "prompt_tokens": P, "live_head_slots": live,
                "full_head_slots": (P + answer) * L * H, "reclaimed_head_slots": 0,
                "kv_kept_fraction": live / ((P + answer) * L * H),
            })
    return rows
