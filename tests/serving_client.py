"""The native /generate call the server tests make: greedy, token ids in and out."""

from __future__ import annotations

import requests


def generate(server, input_ids: list[int], max_new_tokens: int, **sampling) -> dict:
    """Greedy `/generate` of `max_new_tokens`; `sampling` adds sampling params (custom_params)."""
    r = requests.post(
        server.url + "/generate",
        json={
            "input_ids": input_ids,
            "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens, **sampling},
        },
        timeout=300,
    )
    r.raise_for_status()
    return r.json()
