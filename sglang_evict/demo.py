"""`sglang-evict demo`: start the server on loopback, send real requests, print what came back.

Three kinds of traffic an SGLang user sends: an OpenAI chat completion, a multi-turn follow-up
whose history hits the radix (prefix) cache, and an `sgl.function` program through SGLang's
frontend language. Each answer is printed with its prompt and cached token counts.
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


def main(argv: list[str]) -> int:
    from openai import OpenAI
    from tqdm.auto import tqdm

    if "--model-path" not in " ".join(argv):
        from sglang_evict import default_model

        # Materialise here, where the progress bar is visible, not inside the server's log.
        print(f"default model: {default_model.resolve()}", flush=True)
    server_args = ["--enable-cache-report", *argv]
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
        bar.close()
        print(f"server ready after {time.monotonic() - start:.0f}s\n", flush=True)
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
    except ServerStartError as e:
        bar.close()
        print(f"sglang-evict: error: {e}", file=sys.stderr)
        return 1
    finally:
        server.stop()
        print("\nserver stopped", flush=True)
