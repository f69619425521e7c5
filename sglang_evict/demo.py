"""`sglang-evict demo`: start the server on loopback, send real requests, print what came back.

Three kinds of traffic an SGLang user sends: an OpenAI chat completion, a multi-turn follow-up
whose history hits the radix (prefix) cache, and an `sgl.function` program through SGLang's
frontend language. Each answer is printed with its prompt and cached token counts.

Then eviction at work, with the radix cache on: a second server whose KV pool holds EVICT_POOL
tokens at full size serves one greedy generation of twice that, with the retention-global policy
(DBTrimKV: the packaged gates of the default model, one budget for all layers and heads) at
M = EVICT_BUDGET, then follow-up turns that resend the whole conversation (longer than the
pool): the radix cache serves them from the compressed history the earlier turns left. Each turn
prints its cached tokens and the KV it held against the full cache.
"""

from __future__ import annotations

import sys
import time

from sglang_evict.server_process import ServerProcess, ServerStartError

# The default model speaks ChatML; SGLang's frontend cannot guess that from a local folder name.
FRONTEND_CHAT_TEMPLATE = "chatml"


def chat_turns(client, model: str) -> list[dict]:
    """A first question and a follow-up that resends the whole history (prefix cache hit)."""
    history = [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Name the three primary colours of light."},
    ]
    results = []
    for follow_up in (None, "Which of them has the longest wavelength?"):
        if follow_up is not None:
            history.append({"role": "user", "content": follow_up})
        reply = client.chat.completions.create(
            model=model, messages=history, temperature=0, max_tokens=48
        )
        answer = reply.choices[0].message.content
        details = reply.usage.prompt_tokens_details
        results.append(
            {
                "question": history[-1]["content"],
                "answer": answer,
                "prompt_tokens": reply.usage.prompt_tokens,
                "cached_tokens": details.cached_tokens if details else 0,
            }
        )
        history.append({"role": "assistant", "content": answer})
    return results


def frontend_program(url: str) -> dict:
    import sglang as sgl

    @sgl.function
    def trip_planner(s, city):
        s += sgl.system("You are a concise travel assistant.")
        s += sgl.user(f"Suggest one thing to see in {city}. Answer in one sentence.")
        s += sgl.assistant(sgl.gen("sight", max_tokens=40, temperature=0))
        s += sgl.user("Is it indoors or outdoors? Answer with one word.")
        s += sgl.assistant(sgl.select("setting", choices=["indoors", "outdoors"]))

    backend = sgl.RuntimeEndpoint(url, chat_template_name=FRONTEND_CHAT_TEMPLATE)
    state = trip_planner.run(city="Paris", backend=backend)
    meta = state.get_meta_info("sight") or {}
    text = state.text()
    return {
        "prompt_text": text[: text.index(state["sight"])],
        "sight": state["sight"].strip(),
        "setting": state["setting"],
        "prompt_tokens": meta.get("prompt_tokens"),
        "cached_tokens": meta.get("cached_tokens"),
    }


EVICT_POOL = 512
EVICT_BUDGET = 64
EVICT_NEW_TOKENS = 2 * EVICT_POOL
# In the default model's chat format (ChatML), as the frontend section assumes too.
STORY = ("<|im_start|>user\nWrite a long story about a lighthouse keeper and the ships she "
         "guides.<|im_end|>\n<|im_start|>assistant\n")


FOLLOW_UPS = ("Give the lighthouse keeper a name.", "Summarise the story in one sentence.")


def _turn(url: str, input_ids: list[int], new_tokens: int, ignore_eos: bool) -> dict:
    import requests

    r = requests.post(url + "/generate", json={
        "input_ids": input_ids,
        "sampling_params": {"temperature": 0, "max_new_tokens": new_tokens,
                            "ignore_eos": ignore_eos},
    }, timeout=3600)
    r.raise_for_status()
    body = r.json()
    meta = body["meta_info"]
    stats = meta["sglang_evict"]
    return {
        "text": body["text"],
        "output_ids": body["output_ids"],
        "completion_tokens": meta["completion_tokens"],
        "prompt_tokens": meta["prompt_tokens"],
        "cached_tokens": meta.get("cached_tokens", 0),
        "live": stats["live_head_slots"],
        "peak_live": stats["peak_live_head_slots"],
        "full": stats["full_head_slots"],
        "evictions": stats["evictions"],
    }


def _tokenizer():
    from transformers import AutoTokenizer

    from sglang_evict import default_model

    return AutoTokenizer.from_pretrained(default_model.resolve())


def eviction_run(url: str, new_tokens: int = EVICT_NEW_TOKENS) -> dict:
    """One greedy generation of `new_tokens` tokens; its eviction statistics and the
    conversation so far as token ids (`history`)."""
    ids = _tokenizer()(STORY, add_special_tokens=False)["input_ids"]
    run = _turn(url, ids, new_tokens, ignore_eos=True)
    run["history"] = ids + run["output_ids"]
    return run


def follow_up_runs(url: str, history: list[int], questions=FOLLOW_UPS,
                   new_tokens: int = 48) -> list[dict]:
    """Turns that resend the whole conversation with one more question each."""
    tok = _tokenizer()
    runs = []
    for q in questions:
        history = history + tok(f"<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n"
                                "<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        run = _turn(url, history, new_tokens, ignore_eos=False)
        run["question"] = q
        runs.append(run)
        history = history + run["output_ids"]
    return runs


def _start(server_args: list[str]) -> ServerProcess:
    from tqdm.auto import tqdm

    server = ServerProcess(server_args)
    print(f"starting sglang-evict server on {server.url} (log: {server.log_path})", flush=True)
    start = time.monotonic()
    # Without a terminal, a line every 15 s instead of a redrawn counter.
    bar = tqdm(
        desc="waiting for the server", unit="s", bar_format="{desc}: {elapsed}",
        mininterval=0.5 if sys.stderr.isatty() else 15,
    )
    try:
        server.start()
        server.wait_ready(progress=bar.update)
    except BaseException:
        server.stop()
        raise
    finally:
        bar.close()
    print(f"server ready after {time.monotonic() - start:.0f}s\n", flush=True)
    return server


def main(argv: list[str]) -> int:
    try:
        code = serving_demo(argv)
        if code == 0:
            code = eviction_demo(argv)
        return code
    except ServerStartError as e:
        print(f"sglang-evict: error: {e}", file=sys.stderr)
        return 1


def eviction_demo(argv: list[str]) -> int:
    server = _start([
        "--evict-policy", "retention-global", "--evict-budget", str(EVICT_BUDGET),
        "--max-total-tokens", str(EVICT_POOL), "--enable-cache-report", *argv,
    ])
    try:
        print(f"== eviction with the radix cache: {EVICT_NEW_TOKENS} new tokens in a KV pool of "
              f"{EVICT_POOL} tokens (retention-global, M = {EVICT_BUDGET}), then follow-up turns ==")
        run = eviction_run(server.url)
        print(f"generated: {run['completion_tokens']} tokens after a {run['prompt_tokens']}-token "
              f"prompt: {run['text'][:160].strip()!r} ...")
        _held(run)
        for turn in follow_up_runs(server.url, run["history"]):
            print(f"user:      {turn['question']}")
            print(f"assistant: {turn['text'].strip()[:160]!r}")
            print(f"           prompt tokens {turn['prompt_tokens']}, cached {turn['cached_tokens']} "
                  "(served from the compressed history)")
            _held(turn)
        return 0
    finally:
        server.stop()
        print("\nserver stopped", flush=True)


def _held(run: dict) -> None:
    print(f"           KV held at the end: {run['live']} head-slots of {run['full']} "
          f"({100 * run['live'] / run['full']:.1f}% of the full cache), at most "
          f"{run['peak_live']}; {run['evictions']} evictions")


def serving_demo(argv: list[str]) -> int:
    from openai import OpenAI

    if "--model-path" not in " ".join(argv):
        from sglang_evict import default_model

        # Materialise here, where the progress bar is visible, not inside the server's log.
        print(f"default model: {default_model.resolve()}", flush=True)
    server = _start(["--enable-cache-report", *argv])
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="sglang-evict")
        model = client.models.list().data[0].id

        print("== OpenAI chat completion, then a multi-turn follow-up ==")
        for turn in chat_turns(client, model):
            print(f"user:      {turn['question']}")
            print(f"assistant: {turn['answer']}")
            print(f"           prompt tokens {turn['prompt_tokens']}, cached {turn['cached_tokens']}")

        print("\n== sgl.function program (frontend language) ==")
        program = frontend_program(server.url)
        print(f"sight:     {program['sight']}")
        print(f"setting:   {program['setting']}")
        print(
            f"           prompt tokens {program['prompt_tokens']}, "
            f"cached {program['cached_tokens']}"
        )
        return 0
    finally:
        server.stop()
        print("\nserver stopped\n", flush=True)
