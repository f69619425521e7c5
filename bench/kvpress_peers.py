"""NVIDIA kvpress presses on the same RULER prompts, run inside the kvpress virtual environment
that bench/quality.py creates (kvpress 0.5.5 on transformers 5.2.0; torch is the project's).

Protocol, the same for every system of bench/quality.py: the whole chat-formatted prompt is the
input; the system prefills it, its KV is compressed to the budget, and the answer is decoded
greedily from the compressed cache. Here kvpress's own protocol with an empty question: the
prompt but its last token is the context (compressed by the press's `compress`, as its forward
hook does after each layer), and the last token starts the greedy decode, so every answer token
attends to the compressed cache only. A press keeps M + B entries per KV head on average, the
most an sglang-evict request at budget M and buffer B holds; decoded tokens are not compressed.

One prefill per prompt scores every press and budget: kvpress compresses a layer's cache after
that layer's attention ran over the full context, so the prefill's hidden states do not depend
on the press. The runner captures each layer's inputs once and calls every press's `compress` on
them.

`--check-native` checks that claim instead of writing rows: for each cell it also runs kvpress's
own path (the press as a context manager around a plain prefill) and compares the two caches,
layer by layer, and the greedy answers; it exits 1 on any difference.

KVzap and DMS need trained scorers from the Hugging Face hub (nvidia/KVzap-*), unreachable here
and published for other models; they are not run.

    bench/.venv-kvpress/bin/python -P bench/kvpress_peers.py --model DIR --samples S.jsonl \\
        --budgets 128 256 --out rows.jsonl

Rows are appended as they finish (a rerun skips the rows already in --out for the same buffer):
task, length, index, policy ("kvpress:<press>" or "kvpress:full"), budget, buffer, prediction,
prompt_tokens, compression_ratio, kv_kept_fraction.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PRESSES = ("snapkv", "streamingllm", "expected_attention", "knorm", "adakv")


def make_press(name: str, ratio: float):
    import kvpress

    if name == "snapkv":
        return kvpress.SnapKVPress(compression_ratio=ratio)
    if name == "streamingllm":
        return kvpress.StreamingLLMPress(compression_ratio=ratio, n_sink=4)
    if name == "expected_attention":
        return kvpress.ExpectedAttentionPress(compression_ratio=ratio)
    if name == "knorm":
        return kvpress.KnormPress(compression_ratio=ratio)
    if name == "adakv":
        # kvpress's recommended head-adaptive press: AdaKV over ExpectedAttention's scores.
        return kvpress.AdaKVPress(kvpress.ExpectedAttentionPress(compression_ratio=ratio))
    raise SystemExit(f"unknown press {name!r}; known: {', '.join(PRESSES)}")


class SharedPrefill:
    """One prompt's full-cache prefill, with every attention layer's forward inputs kept."""

    def __init__(self, model, context_ids) -> None:
        import torch
        from transformers import DynamicCache

        self.model = model
        self.layers = [layer.self_attn for layer in model.model.layers]
        self.inputs: list[dict] = [None] * len(self.layers)

        def keep(module, args, kwargs, output):
            self.inputs[module.layer_idx] = {
                "hidden_states": kwargs["hidden_states"],
                "attentions": output[1],
                "kwargs": {k: v for k, v in kwargs.items() if k != "past_key_values"},
            }

        hooks = [m.register_forward_hook(keep, with_kwargs=True) for m in self.layers]
        self.cache = DynamicCache()
        try:
            with torch.no_grad():
                model.model(input_ids=context_ids, past_key_values=self.cache)
        finally:
            for h in hooks:
                h.remove()
        self.length = context_ids.shape[1]

    def compressed(self, press):
        """A new cache holding what `press` keeps of every layer, and the share of the
        context's (layer, head, position) entries that still take part in attention."""
        import torch
        from transformers import DynamicCache

        for module in self.layers:
            module.rotary_emb = self.model.model.rotary_emb  # as kvpress's context manager does
            module.masked_key_indices = None
        cache = DynamicCache()
        kept = total = 0
        if press is not None:
            press.post_init_from_model(self.model)
        with torch.no_grad():
            for i, module in enumerate(self.layers):
                keys, values = self.cache.layers[i].keys, self.cache.layers[i].values
                if press is not None:
                    got = self.inputs[i]
                    keys, values = press.compress(module, got["hidden_states"], keys, values,
                                                  got["attentions"], got["kwargs"])
                heads = keys.shape[1]
                entries = heads * keys.shape[2]
                masked = getattr(module, "masked_key_indices", None)
                if masked is not None:  # AdaKV masks entries in attention instead of removing them
                    entries -= int(masked[0].numel())
                kept += entries
                total += heads * self.length
                cache.update(keys.clone(), values.clone(), i)
        return cache, kept / total


def press_ratio(budget: int, buffer: int, context_len: int) -> float:
    """kvpress's compression ratio that keeps M + B entries per KV head on average."""
    return max(0.0, 1 - (budget + buffer) / context_len)


def native_cache(model, context_ids, press):
    """kvpress's own path: its forward hooks compress every layer during a plain prefill."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model.model(input_ids=context_ids, past_key_values=cache)
    return cache


def same_cache(a, b) -> bool:
    import torch

    return len(a.layers) == len(b.layers) and all(
        x.keys.shape == y.keys.shape and torch.allclose(x.keys, y.keys, atol=1e-5)
        and torch.allclose(x.values, y.values, atol=1e-5) for x, y in zip(a.layers, b.layers))


def greedy(model, cache, last_id: int, position: int, max_new_tokens: int, stop: set[int]) -> list[int]:
    import torch

    out: list[int] = []
    token = torch.tensor([[last_id]])
    with torch.no_grad():
        for i in range(max_new_tokens):
            logits = model(input_ids=token, past_key_values=cache,
                           position_ids=torch.tensor([[position + i]]), logits_to_keep=1).logits
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            if nxt in stop:
                break
            token = torch.tensor([[nxt]])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="the model folder (config, weights, tokenizer)")
    p.add_argument("--samples", required=True, help="JSONL of RULER records (input, outputs, ...) "
                   "with `cells`: the [press, budget] pairs to run on each")
    p.add_argument("--buffer", type=int, default=32, help="B: a press keeps M + B per KV head")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--check-native", action="store_true",
                   help="compare with kvpress's own forward-hook path instead of writing rows")
    args = p.parse_args(argv)
    if not args.check_native and args.out is None:
        p.error("--out is required (or --check-native)")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    stop = model.generation_config.eos_token_id
    stop = set(stop if isinstance(stop, list) else [stop])
    if args.check_native:
        return check_native(model, tok, args, stop)
    out = Path(args.out)

    def key(s: dict, policy: str, budget, buffer: int) -> tuple:
        return (s["task"], s["length"], s["index"], policy, budget, buffer)

    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add(key(r, r["policy"], r["budget"], r.get("buffer")))
    samples = [json.loads(x) for x in Path(args.samples).read_text().splitlines() if x.strip()]
    todo = sum(1 for s in samples for press, m in s["cells"]
               if key(s, f"kvpress:{press}", m, args.buffer) not in done)
    print(f"kvpress peers: {len(samples)} prompts, {todo} rows to run", flush=True)
    t0, ran = time.time(), 0
    with open(out, "a") as f:
        for s in samples:
            cells = [(press, m) for press, m in s["cells"]
                     if key(s, f"kvpress:{press}", m, args.buffer) not in done]
            if not cells:
                continue
            ids = tok.encode(s["input"])
            context = torch.tensor([ids[:-1]])
            prefill = SharedPrefill(model, context)
            for press_name, m in cells:
                ratio = 0.0 if press_name == "full" else press_ratio(m, args.buffer,
                                                                    context.shape[1])
                press = None if press_name == "full" else make_press(press_name, ratio)
                cache, kept = prefill.compressed(press)
                answer = greedy(model, cache, ids[-1], len(ids) - 1, s["tokens_to_generate"], stop)
                generated = len(answer)
                row = {
                    "task": s["task"], "length": s["length"], "index": s["index"],
                    "policy": f"kvpress:{press_name}", "budget": m, "buffer": args.buffer,
                    "prediction": tok.decode(answer, skip_special_tokens=True),
                    "prompt_tokens": len(ids), "compression_ratio": ratio,
                    # Kept at the end as a share of the full cache at the end (prompt + answer).
                    "kv_kept_fraction": (kept * context.shape[1] + 1 + generated)
                    / (len(ids) + generated),
                }
                f.write(json.dumps(row) + "\n")
                f.flush()
                ran += 1
            print(f"{ran}/{todo} rows, {time.time() - t0:.0f} s", flush=True)
    return 0


def check_native(model, tok, args, stop) -> int:
    import torch

    differ = 0
    for line in Path(args.samples).read_text().splitlines():
        if not line.strip():
            continue
        s = json.loads(line)
        ids = tok.encode(s["input"])
        context = torch.tensor([ids[:-1]])
        prefill = SharedPrefill(model, context)
        for press_name, m in s["cells"]:
            if press_name == "full":
                continue
            ratio = press_ratio(m, args.buffer, context.shape[1])
            ours, _ = prefill.compressed(make_press(press_name, ratio))
            answer = greedy(model, ours, ids[-1], len(ids) - 1, s["tokens_to_generate"], stop)
            theirs = native_cache(model, context, make_press(press_name, ratio))
            native = greedy(model, theirs, ids[-1], len(ids) - 1, s["tokens_to_generate"], stop)
            same = same_cache(ours, theirs) and answer == native
            differ += not same
            print(f"{s['task']}#{s['index']} {press_name} M={m}: "
                  f"{'same' if same else 'DIFFERS'} ({tok.decode(answer)!r} / "
                  f"{tok.decode(native)!r})", flush=True)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
