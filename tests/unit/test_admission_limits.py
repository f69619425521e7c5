"""A request whose protected KV can never fit the physical pool is refused at admission with
one line naming the limit (the scheduler turns it into HTTP 400), not left waiting forever."""

from __future__ import annotations

from types import SimpleNamespace

from sglang_evict.config import EvictConfig
from sglang_evict.patches import evict_admission as adm
from sglang_evict.patches.runtime import Runtime


def test_never_fits_counts_what_a_request_keeps_whole():
    none = EvictConfig(policy="none")
    assert adm.never_fits(none, 127, 128, 64) is None  # the prompt and its next token fit
    why = adm.never_fits(none, 128, 128, 64)
    assert "129 tokens of KV" in why and "(128 tokens at full size)" in why
    assert "policy none" in why and "\n" not in why
    evicting = EvictConfig(policy="streaming", budget=8, sinks=4, window=100)
    # a long prompt is evicted chunk by chunk: 4 + 100 + 1 protected beside a chunk of 64
    assert adm.never_fits(evicting, 10_000, 200, 64) is None
    why = adm.never_fits(evicting, 10_000, 160, 64)
    assert "105 protected tokens (sinks 4 + window 100 + 1)" in why and "169 tokens" in why
    # a short prompt protects only what it has
    assert adm.never_fits(evicting, 20, 50, 64) is None


def test_the_hook_refuses_only_on_an_eviction_server_and_by_the_request_s_own_settings():
    server = EvictConfig(policy="retention-global", budget=8, overrides="any", sinks=4)
    rt = Runtime(server)

    def req(n, override=None):
        params = {"sglang_evict": override} if override is not None else None
        return SimpleNamespace(origin_input_ids=list(range(n)),
                               sampling_params=SimpleNamespace(custom_params=params))

    def sglang_ok(req, *args):
        return None

    long = req(300, {"policy": "none"})
    assert adm.around_validate_input_length(rt, sglang_ok, long, 1024, False) is None  # no cache
    rt.cache, rt.physical_tokens, rt.prefill_chunk = object(), 128, 64
    why = adm.around_validate_input_length(rt, sglang_ok, long, 1024, False)
    assert why.startswith("sglang-evict: this request keeps its whole prompt")
    assert adm.around_validate_input_length(rt, sglang_ok, req(300), 1024, False) is None
    assert adm.around_validate_input_length(rt, sglang_ok, req(100, {"policy": "none"}),
                                            1024, False) is None
    # SGLang's own refusal comes first and unchanged
    assert adm.around_validate_input_length(rt, lambda *a: "too long", long, 1024, False) == \
        "too long"
