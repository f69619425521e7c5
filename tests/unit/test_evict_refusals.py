"""Settings head-granular eviction cannot serve are refused with one line naming the setting,
in SGLang's own process (ServerArgs.check_server_args) as well as by `sglang-evict serve`."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sglang_evict.patches.evict_pool import check_model
from sglang_evict.patches.evict_refusals import refusal
from sglang_evict.errors import HeadEvictError
from sglang_evict.serve import StartupError, with_eviction_settings
from sglang_evict.config import EvictConfig

STREAMING = EvictConfig(policy="streaming", budget=8)

GOOD = dict(
    attention_backend="sglang_evict", disable_radix_cache=True, page_size=1, tp_size=1,
    pp_size=1, dp_size=1, kv_cache_dtype="auto", speculative_algorithm=None,
    disable_overlap_schedule=True, disable_cuda_graph=True,
)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(attention_backend="triton"), "--attention-backend sglang_evict"),
        (dict(disable_radix_cache=False, enable_session_radix_cache=True), "--enable-session-radix-cache"),
        (dict(disable_radix_cache=False, enable_hierarchical_cache=True), "--enable-hierarchical-cache"),
        (dict(disable_radix_cache=False, radix_cache_backend="lmcache"), "--radix-cache-backend"),
        (dict(page_size=16), "--page-size 1"),
        (dict(tp_size=2), "--tp-size 2"),
        (dict(pp_size=2), "--pp-size 2"),
        (dict(dp_size=2), "--dp-size 2"),
        (dict(kv_cache_dtype="fp8_e4m3"), "--kv-cache-dtype fp8_e4m3"),
        (dict(kv_cache_dtype="fp8_e5m2"), "--kv-cache-dtype fp8_e5m2"),
        (dict(kv_cache_dtype="mxfp8"), "--kv-cache-dtype mxfp8"),
        (dict(kv_cache_dtype="nvfp4"), "--kv-cache-dtype nvfp4"),
        (dict(kv_cache_dtype="fp4_mx_block16"), "--kv-cache-dtype fp4_mx_block16"),
        (dict(decode_attention_backend="triton"), "--decode-attention-backend triton"),
        (dict(prefill_attention_backend="torch_native"), "--prefill-attention-backend torch_native"),
        (dict(enable_streaming_session=True), "--enable-streaming-session"),
        (dict(disaggregation_mode="prefill"), "--disaggregation-mode prefill"),
        (dict(enable_lmcache=True), "--enable-lmcache"),
        (dict(enable_hisparse=True), "--enable-hisparse"),
        (dict(enable_memory_saver=True), "--enable-memory-saver"),
        (dict(enable_pdmux=True), "--enable-pdmux"),
        (dict(hicache_storage_backend="file"), "--hicache-storage-backend"),
        (dict(disable_radix_cache=True, enable_hierarchical_cache=True), "--enable-hierarchical-cache"),
        (dict(speculative_algorithm="EAGLE"), "speculative"),
    ],
)
def test_each_unsupported_setting_is_named(change, match):
    assert refusal(SimpleNamespace(**GOOD), STREAMING) is None
    why = refusal(SimpleNamespace(**{**GOOD, **change}), STREAMING)
    assert why is not None and match in why and "\n" not in why


def test_the_refused_options_exist_in_the_pinned_sglang():
    """Every option refused by name is a field of SGLang's ServerArgs (a renamed option would
    otherwise pass unrefused), and the KV dtypes are SGLang's choices less the kept ones."""
    import inspect

    from sglang.srt.server_args import ServerArgs

    from sglang_evict.patches import evict_refusals as r

    fields = set(inspect.signature(ServerArgs).parameters)
    names = set(r.KV_BUFFER_READERS) | {"decode_attention_backend", "prefill_attention_backend",
                                        "disaggregation_mode", "kv_cache_dtype"}
    assert names <= fields, names - fields
    assert refusal(SimpleNamespace(**{**GOOD, "kv_cache_dtype": "bf16"}), STREAMING) is None
    assert refusal(SimpleNamespace(**GOOD, decode_attention_backend="sglang_evict"),
                   STREAMING) is None


def test_cuda_graphs_the_overlap_scheduler_and_the_radix_cache_are_served():
    on = dict(GOOD, disable_overlap_schedule=False, disable_cuda_graph=False,
              disable_radix_cache=False)
    assert refusal(SimpleNamespace(**on), STREAMING) is None


def test_flashinfer_kernel_needs_cuda_and_eager_decode():
    fi = EvictConfig(policy="streaming", budget=8, kernel="flashinfer")
    why = refusal(SimpleNamespace(**GOOD, device="cpu"), fi)
    assert why == "--evict-kernel flashinfer needs --device cuda, got cpu"
    graphs = dict(GOOD, disable_cuda_graph=False, device="cuda")
    why = refusal(SimpleNamespace(**graphs), fi)
    assert "--disable-cuda-graph" in why and "\n" not in why
    why = refusal(SimpleNamespace(**GOOD, device="cuda"), fi)
    if not torch.cuda.is_available():  # this machine: said in one line, before SGLang starts
        assert why == "--evict-kernel flashinfer needs a CUDA device"


def test_serve_refuses_before_sglang_starts_with_the_same_reason():
    cfg = EvictConfig(policy="streaming", budget=8)
    argv = ["--attention-backend", "sglang_evict", "--disable-radix-cache"]
    out = with_eviction_settings(cfg, argv)  # nothing turned off behind the user's back
    assert "--disable-cuda-graph" not in out and "--disable-overlap-schedule" not in out
    with pytest.raises(StartupError, match="--tp-size 2"):
        with_eviction_settings(cfg, argv + ["--tp-size", "2"])
    with pytest.raises(StartupError, match="--enable-hierarchical-cache"):
        with_eviction_settings(cfg, argv[:2] + ["--enable-hierarchical-cache"])


def _model(**hf):
    return SimpleNamespace(hf_text_config=SimpleNamespace(**hf))


def test_sliding_window_and_logit_caps_are_refused():
    check_model(_model())  # Llama: full attention
    check_model(_model(sliding_window=4096, use_sliding_window=False))  # Qwen2 default
    with pytest.raises(HeadEvictError, match="sliding-window"):
        check_model(_model(sliding_window=4096))
    with pytest.raises(HeadEvictError, match="attn_logit_softcapping"):
        check_model(_model(attn_logit_softcapping=50.0))
