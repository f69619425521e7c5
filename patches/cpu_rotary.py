"""CPU serving fix for the rotary embedding.

Targets sglang 0.5.23: `sglang.srt.layers.rotary_embedding.base.RotaryEmbedding.__init__`.

Upstream decides at import time whether the process is a CPU engine (`_is_cpu`, true only
with SGLANG_USE_CPU_ENGINE=1, which also demands a CPU build of sgl-kernel that PyPI does not
ship). With the flag false on a CUDA-less host, `__init__` imports `vllm._custom_ops` as a
"fallback kernel" and model loading fails. We wrap `__init__` so that, only when the model
runner of this process was configured for the CPU device, the flag reads true while the
rotary module is built: forward then takes the pure-torch path. GPU runs are untouched.
"""

from __future__ import annotations

import contextlib

from sglang_evict.patches.runtime import bind

TARGET = "sglang.srt.layers.rotary_embedding.base.RotaryEmbedding.__init__"
RUNNER_TARGET = "sglang.srt.model_executor.model_runner.ModelRunner.__init__"



def device_is_cpu(server_args) -> bool:
    device = getattr(server_args, "device", None)
    if device is None:
        import torch

        # SGLang's own auto-detection picks CPU when no accelerator is present.
        return not torch.cuda.is_available()
    return str(device).split(":", 1)[0] == "cpu"


def before_model_runner_init(rt, *args, **kwargs):
    # One process builds one model runner (plus maybe draft runners on the same device): the
    # runtime's flag is what the rotary hook reads.
    server_args = kwargs.get("server_args")
    if server_args is None and len(args) > 5:
        server_args = args[5]  # (self, model_config, mem_fraction_static, gpu_id, nccl_port, server_args)
    if server_args is not None:
        rt.serving_on_cpu = device_is_cpu(server_args)
    return None


@contextlib.contextmanager
def _cpu_flag():
    from sglang.srt.layers.rotary_embedding import base

    saved = base._is_cpu
    base._is_cpu = True
    try:
        yield
    finally:
        base._is_cpu = saved


def around_rotary_init(rt, original, *args, **kwargs):
    if not rt.serving_on_cpu:
        return original(*args, **kwargs)
    with _cpu_flag():
        return original(*args, **kwargs)


def register(registry, hook_type, rt) -> None:
    registry.register(RUNNER_TARGET, bind(rt, before_model_runner_init), hook_type.BEFORE)
    registry.register(TARGET, bind(rt, around_rotary_init), hook_type.AROUND)
