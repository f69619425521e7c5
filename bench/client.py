"""The benches' one client of a server: SGLang's native /generate, whole or streamed.

A prompt is text or token ids; sampling is greedy unless asked otherwise, `ignore_eos` by
default (a bench decides how many tokens it times), and `evict` sets the request's eviction
settings (`custom_params.sglang_evict`). Transport errors raise `requests.RequestException`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import requests

TIMEOUT = 7200


def request_body(prompt: str | list[int], max_new_tokens: int, *, ignore_eos: bool = True,
                 evict: dict | None = None, stream: bool = False, **sampling) -> dict:
    params = {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": ignore_eos,
              **sampling}
    if evict is not None:
        params["custom_params"] = {"sglang_evict": evict}
    key = "text" if isinstance(prompt, str) else "input_ids"
    body = {key: prompt, "sampling_params": params}
    if stream:
        body["stream"] = True
    return body


def generate(url: str, prompt: str | list[int], max_new_tokens: int, *,
             timeout: float = TIMEOUT, **options) -> dict:
    """One /generate; its JSON answer (HTTPError unless 200)."""
    r = requests.post(url + "/generate", json=request_body(prompt, max_new_tokens, **options),
                      timeout=timeout)
    r.raise_for_status()
    return r.json()


@dataclass
class Streamed:
    status: int
    sent: float  # time.perf_counter() when the request was sent
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    meta_info: dict = field(default_factory=dict)
    marks: list[tuple[int, float]] = field(default_factory=list)  # (tokens so far, when)

    @property
    def ok(self) -> bool:
        return self.status == 200 and bool(self.marks)

    @property
    def arrivals(self) -> list[float]:
        """When each chunk that brought new tokens arrived (perf_counter)."""
        out, seen = [], 0
        for tokens, when in self.marks:
            if tokens > seen:
                out.append(when)
                seen = tokens
        return out


def stream(url: str, prompt: str | list[int], max_new_tokens: int, *,
           timeout: float = TIMEOUT, **options) -> Streamed:
    """One streamed /generate with the arrival time of every chunk; a non-200 answer comes
    back with its status and nothing else."""
    body = request_body(prompt, max_new_tokens, stream=True, **options)
    sent = time.perf_counter()
    with requests.post(url + "/generate", json=body, stream=True, timeout=timeout) as r:
        got = Streamed(status=r.status_code, sent=sent)
        if r.status_code != 200:
            return got
        for line in r.iter_lines():
            if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            meta = chunk.get("meta_info", {})
            got.marks.append((int(meta.get("completion_tokens", 0)), time.perf_counter()))
            got.output_ids = chunk.get("output_ids") or got.output_ids
            got.text = chunk.get("text", got.text)
            got.meta_info = meta
    return got


def flush_cache(url: str, tries: int = 60) -> None:
    """Empty the server's radix cache (refused while requests run: retried once a second)."""
    for _ in range(tries):
        if requests.post(url + "/flush_cache", timeout=30).status_code == 200:
            return
        time.sleep(1)
    raise RuntimeError(f"{url} did not flush its cache in {tries} s")
