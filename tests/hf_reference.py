"""Greedy generation with HF transformers: the reference SGLang must equal token for token."""

from __future__ import annotations


def greedy_ids(model, tokenizer, input_ids: list[int], max_new_tokens: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([input_ids]),
            attention_mask=torch.ones(1, len(input_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    return cut_at_eos(out[0, len(input_ids):].tolist(), tokenizer)


def cut_at_eos(ids: list[int], tokenizer) -> list[int]:
    """Both engines stop at EOS; one reports it among the output ids and one may not."""
    eos = tokenizer.eos_token_id
    return ids[: ids.index(eos)] if eos in ids else ids
