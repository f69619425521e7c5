"""ServerArgs.check_server_args (AFTER): settings eviction cannot serve are refused with one line
in SGLang's own process, so plain `python -m sglang.launch_server` refuses them too; `serve`
calls the same `refusal` before SGLang starts."""

from __future__ import annotations

from sglang_evict.config import ATTENTION_BACKEND, EvictConfig
from sglang_evict.errors import HeadEvictError
from sglang_evict.patches.runtime import bind

CHECK_ARGS = "sglang.srt.server_args.ServerArgs.check_server_args"
# KV dtypes the head-slot pool stores (the model's own, or bf16); every fp8 / fp4 / mx recipe
# of SGLang 0.5.23 (fp8_e5m2, fp8_e4m3, mxfp8, nvfp4, fp4_mx_block16) is refused.
KV_DTYPES = ("auto", "bf16", "bfloat16")
# Options whose code reads, copies or releases SGLang's own KV buffers, which eviction replaces.
KV_BUFFER_READERS = (
    "enable_lmcache", "enable_streaming_session", "enable_hisparse", "enable_memory_saver",
    "enable_pdmux", "hicache_storage_backend", "disaggregation_decode_enable_offload_kvcache",
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def refusal(server_args, cfg: EvictConfig) -> str | None:
    """Why this server cannot run head-granular eviction with these SGLang settings (one line
    naming the setting), or None. Checked in SGLang's own process (`ServerArgs.
    check_server_args`), so plain `python -m sglang.launch_server` refuses them too."""
    def get(name, default=None):
        return getattr(server_args, name, default)

    policy = f"--evict-policy {cfg.policy}"
    if get("attention_backend") != ATTENTION_BACKEND:
        return f"{policy} needs --attention-backend {ATTENTION_BACKEND}, got {get('attention_backend')}"
    for name in ("decode_attention_backend", "prefill_attention_backend"):
        if get(name) not in (None, ATTENTION_BACKEND):
            return (f"{policy} attends over head-slots with one backend: drop "
                    f"{_flag(name)} {get(name)}")
    if not get("disable_radix_cache", False):
        if get("enable_session_radix_cache", False):
            return f"{policy} does not support --enable-session-radix-cache yet"
        if get("radix_cache_backend"):
            return f"{policy} shares prefixes through SGLang's default radix cache: drop --radix-cache-backend"
    if get("enable_hierarchical_cache", False):
        return f"{policy} keeps the radix cache on the device: --enable-hierarchical-cache is not supported"
    for name in KV_BUFFER_READERS:
        if get(name, False):
            return (f"{policy} keeps K/V in head-slots, not in SGLang's KV buffers that "
                    f"{_flag(name)} reads or moves: it is not supported")
    if str(get("disaggregation_mode") or "null") != "null":
        return (f"{policy} does not support prefill/decode disaggregation "
                f"(--disaggregation-mode {get('disaggregation_mode')}): the KV transfer reads "
                "SGLang's KV buffers")
    if (get("page_size") or 1) != 1:
        return f"{policy} needs --page-size 1 (one token per slot), got {get('page_size')}"
    for name, flag in (("tp_size", "--tp-size"), ("pp_size", "--pp-size"), ("dp_size", "--dp-size")):
        if (get(name) or 1) > 1:
            return f"{policy} runs on one device for now: {flag} {get(name)} is not supported"
    dtype = str(get("kv_cache_dtype") or "auto")
    if dtype not in KV_DTYPES:
        return f"{policy} stores K/V in the model dtype: --kv-cache-dtype {dtype} is not supported"
    if get("speculative_algorithm"):
        return f"{policy} does not support speculative decoding (--speculative-algorithm)"
    if cfg.kernel == "flashinfer":
        return _flashinfer_refusal(get)
    return None


def _flashinfer_refusal(get) -> str | None:
    """--evict-kernel flashinfer plans every layer on the host each step: CUDA, eager decode."""
    if str(get("device") or "cuda") != "cuda":
        return f"--evict-kernel flashinfer needs --device cuda, got {get('device')}"
    if not get("disable_cuda_graph", False):
        return ("--evict-kernel flashinfer plans each layer on the host every step, so decode "
                "runs eagerly: add --disable-cuda-graph (or use --evict-kernel triton)")
    from sglang_evict.kernels.flashinfer_lists import flashinfer_available

    return flashinfer_available()


def after_check_server_args(rt, result, server_args, *args, **kwargs):
    why = refusal(server_args, rt.config)
    if why is not None:
        raise HeadEvictError(f"sglang-evict: {why}")
    return result


def register(registry, hook_type, rt) -> None:
    registry.register(CHECK_ARGS, bind(rt, after_check_server_args), hook_type.AFTER)
