"""Every SGLang function this project wraps is checked here, so an SGLang upgrade that moves or
changes one fails loudly instead of silently disabling a patch."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from importlib.metadata import entry_points, version

import pytest

from sglang_evict.patches import cpu_rotary, hook_check
from sglang_evict.patches.runtime import Runtime


def resolve(dotted: str):
    obj, attrs, parts = None, [], dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            attrs = parts[i:]
            break
        except ModuleNotFoundError:
            continue
    for a in attrs:
        obj = getattr(obj, a)
    return obj


def test_pinned_sglang_version():
    assert version("sglang") == hook_check.SGLANG_VERSION == "0.5.23"


def test_rotary_target_still_has_the_cpu_flag_and_fallback_import():
    init = resolve(cpu_rotary.TARGET)
    source = inspect.getsource(init)
    assert "_is_cpu" in source
    assert "vllm._custom_ops" in source
    from sglang.srt.layers.rotary_embedding import base

    assert isinstance(base._is_cpu, bool)


def test_model_runner_init_signature():
    params = list(inspect.signature(resolve(cpu_rotary.RUNNER_TARGET)).parameters)
    assert params[:6] == [
        "self", "model_config", "mem_fraction_static", "gpu_id", "nccl_port", "server_args",
    ]


def test_plugin_entry_point_registers_hooks():
    eps = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "sglang_evict"]
    assert len(eps) == 1
    register = eps[0].load()
    from sglang.srt.plugins.hook_registry import HookRegistry

    register()
    hooked = HookRegistry._hooks

    def hook_of(h):  # a hook bound to the process's Runtime wraps the module's function
        return getattr(h[1], "__wrapped__", h[1])

    assert any(hook_of(h) is cpu_rotary.around_rotary_init for h in hooked[cpu_rotary.TARGET])
    assert any(hook_of(h) is cpu_rotary.before_model_runner_init
               for h in hooked[cpu_rotary.RUNNER_TARGET])
    assert any(h[1] is hook_check.after_check_server_args for h in hooked[hook_check.CHECK_ARGS])
    assert hook_check.RUNNER_INIT == cpu_rotary.RUNNER_TARGET
    assert _params(hook_check.CHECK_ARGS) == ["self"]


def test_cpu_flag_is_set_only_while_building_on_cpu():
    from sglang.srt.layers.rotary_embedding import base

    seen = []
    original = lambda: seen.append(base._is_cpu)  # noqa: E731
    before = base._is_cpu
    rt = Runtime()
    cpu_rotary.before_model_runner_init(rt, server_args=type("A", (), {"device": "cuda"})())
    cpu_rotary.around_rotary_init(rt, original)
    cpu_rotary.before_model_runner_init(rt, server_args=type("A", (), {"device": "cpu"})())
    cpu_rotary.around_rotary_init(rt, original)
    assert seen == [before, True]
    assert base._is_cpu == before


def _params(dotted: str) -> list[str]:
    return list(inspect.signature(resolve(dotted)).parameters)


def test_gate_attach_targets():
    from sglang_evict.patches import gate_attach
    from sglang_evict.patches import request_meta as g

    assert _params(gate_attach.LOAD_MODEL) == ["self"]
    assert _params(g.RELEASE_KV)[:2] == ["req", "tree_cache"]
    assert _params(g.STREAMER_CLASS) == ["self"]
    assert _params(g.UPDATE_META) == [
        "self", "meta_info", "state", "customized_info", "index", "finish_reason"]
    # The output streamer's documented extension point for per-request meta_info fields.
    from sglang.srt.managers.scheduler_components.output_streamer import SchedulerOutputStreamer

    assert SchedulerOutputStreamer.has_additional_customized_info is False
    assert _params(
        "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer"
        ".build_additional_customized_info"
    ) == ["self", "reqs"]
    # What the statistics hook reads off a finished request.
    from sglang.srt.managers.schedule_batch import Req

    source = inspect.getsource(Req)
    assert "kv_committed_len" in source and "req_pool_idx" in source


@pytest.mark.parametrize(
    "attention",
    [
        "sglang.srt.models.llama.LlamaAttention",
        "sglang.srt.models.qwen2.Qwen2Attention",
        "sglang.srt.models.qwen3.Qwen3Attention",
    ],
)
def test_attention_modules_take_positions_hidden_states_forward_batch(attention):
    from sglang_evict.patches.gate_attach import ATTENTION_ARGS

    assert tuple(_params(attention + ".forward")[1:4]) == ATTENTION_ARGS


def test_head_evict_targets():
    from types import SimpleNamespace

    from sglang_evict.patches import (
        evict_admission,
        evict_pool,
        evict_radix,
        evict_refusals,
        evict_requests,
        evict_step,
        faults,
        head_evict,
    )

    # every hook module registered by head_evict, and their targets under one name here
    assert set(head_evict.HOOKS) == {evict_refusals, evict_pool, evict_admission, evict_step,
                                     evict_requests, evict_radix, faults}
    h = SimpleNamespace(**{k: v for m in head_evict.HOOKS for k, v in vars(m).items()
                           if k.isupper()})
    assert _params(h.DERIVE_SIZES) == ["self", "config"]
    assert _params(h.CREATE_BUFFERS) == ["self"]
    assert _params(h.ALLOC_POOL)[:2] == ["self", "memory_pool_config"]
    assert _params(h.CELL_SIZE) == ["self", "kvc", "num_layers"]
    assert _params(h.ALLOC_FREE) == ["self", "free_index"]
    assert _params(h.ALLOC_CLEAR) == ["self"]
    assert _params(h.FORWARD)[:2] == ["self", "forward_batch"]
    assert _params(h.ON_IDLE) == ["self"]
    # decode batches: the scheduler's host rows exist, and SGLang drops them outside extend
    assert _params(h.INIT_FORWARD_BATCH)[:2] == ["batch", "model_runner"]
    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

    assert "req_pool_indices_cpu" in {f.name for f in dataclasses.fields(ScheduleBatch)}
    assert "is_extend_without_speculative()" in inspect.getsource(ForwardBatch.init_new)
    assert _params(h.DECODE_CAPACITY) == [
        "self", "num_tokens", "tree_cache", "requests", "spec_algorithm",
    ]
    assert _params(h.SAMPLING_VERIFY) == ["self", "vocab_size"]
    assert _params(h.VALIDATE_REQUEST) == ["self", "obj", "input_ids"]
    assert _params(h.PREPARE_EXTEND) == ["self"]
    assert _params(h.CHECK_ARGS) == ["self"]
    # the fault boundary: a running request ends at its next result when `to_finish` is set
    # (SGLang's own abort of a running request), with a FINISH_ABORT that carries a status
    assert _params(h.PROCESS_RESULT)[:3] == ["self", "batch", "result"]
    from sglang.srt.managers.schedule_batch import FINISH_ABORT, Req

    assert "if self.to_finish:" in inspect.getsource(Req.update_finish_state)
    assert list(inspect.signature(FINISH_ABORT).parameters) == ["message", "status_code",
                                                                "err_type"]
    # the radix tree: checkpoint moves the request's prefix into the tree and its lock there
    assert _params(h.CHECKPOINT)[:3] == ["self", "req", "up_to"]
    from sglang.srt.managers import scheduler as scheduler_module
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

    source = inspect.getsource(UnifiedRadixCache.checkpoint_into_tree)
    assert "req.kv.cache_protected_len = len(new_indices)" in source
    # prefill admission in physical terms: what the hooks read and how SGLang admits
    assert _params(h.PREFILL_ADDER)[:1] == ["self"]
    # the mixed chunk's decode tokens, read by name or by place (self not counted)
    assert _params(h.PREFILL_ADDER)[1 + evict_admission._MIXED_POSITION] == "num_mixed_decode_tokens"
    assert _params(h.ADD_ONE_REQ) == ["self", "req", "has_chunked_req", "truncation_align_size"]
    assert _params(h.ADD_CHUNKED_REQ) == ["self", "req"]
    # the scheduler validates a new request's length with this function, by the module's name,
    # and aborts it with the message it returns (HTTP 400)
    assert _params(h.VALIDATE_INPUT) == ["req", "max_req_input_len", "allow_auto_truncate"]
    sched_source = inspect.getsource(scheduler_module)
    assert "error_msg = validate_input_length(" in sched_source
    assert "req.set_finish_with_abort(error_msg)" in sched_source
    from sglang.srt.managers import scheduler
    from sglang.srt.managers.schedule_policy import AddReqResult, PrefillAdder

    assert AddReqResult.NO_TOKEN
    source = inspect.getsource(PrefillAdder)
    assert "self.rem_chunk_tokens = rem_chunk_tokens" in source
    assert "req.extend_end = admission.prefix_len + admission.extend_len" in source
    assert "self.can_run_list.append(req)" in source
    assert "len(req.full_untruncated_fill_ids) - req.prefix_len" in source
    # a chunked request returned unchanged stays parked for the next round
    assert "self.chunked_req = adder.add_chunked_req(self.chunked_req)" in inspect.getsource(scheduler)
    from sglang.srt.entrypoints import engine

    assert "server_args.check_server_args()" in inspect.getsource(engine)
    # every setting the start-up refusal reads is a ServerArgs field
    from sglang.srt.server_args import ServerArgs

    fields = set(ServerArgs.__struct_fields__)
    for name in ("attention_backend", "disable_radix_cache", "page_size", "tp_size", "pp_size",
                 "dp_size", "kv_cache_dtype", "speculative_algorithm",
                 "disable_overlap_schedule", "disable_cuda_graph", "enable_session_radix_cache",
                 "enable_hierarchical_cache", "radix_cache_backend"):
        assert name in fields, name
    from sglang.srt.sampling.sampling_params import SamplingParams

    assert "custom_params" in inspect.signature(SamplingParams).parameters
    # The placeholder layout borrowed for SGLang's (virtual) per-layer buffers.
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, NoOpMHATokenToKVPool

    assert issubclass(NoOpMHATokenToKVPool, MHATokenToKVPool)
    assert "_create_buffers" in NoOpMHATokenToKVPool.__dict__
    # Pool sizes are a frozen msgspec struct replaced field-wise.
    from sglang.srt.mem_cache.kv_cache_configurator import _PoolSizes

    assert "max_total_num_tokens" in _PoolSizes.__struct_fields__
    # Retractions are logged with this text (the server tests count them).
    from sglang.srt.managers import scheduler

    assert "KV cache pool is full. Retract requests." in inspect.getsource(scheduler)


def test_attention_backend_is_registered_for_the_cli():
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    from sglang_evict.config import ATTENTION_BACKEND
    from sglang_evict.patches import evict_backend

    evict_backend.register_backend(Runtime())
    assert ATTENTION_BACKEND in ATTENTION_BACKEND_CHOICES
    assert ATTENTION_BACKENDS[ATTENTION_BACKEND].__wrapped__ is evict_backend.create_backend


def test_evict_meta_info_is_one_object_beside_accumulated_customized_info():
    """SGLang accumulates customized info as lists over a request's outputs; the eviction entry,
    sent once when the request finishes, arrives as one object while other keys keep
    SGLang's list semantics (including the slice a streamed chunk takes)."""
    from sglang.srt.managers import tokenizer_manager as tm
    from sglang_evict.patches import request_meta as g

    manager = tm.TokenizerManager.__new__(tm.TokenizerManager)
    state = type("State", (), {})()
    state.customized_info_accumulated, state.customized_info_reported_keys = {}, set()
    original = tm.TokenizerManager.update_request_meta_info
    entry = {"live_head_slots": 7, "evictions": 1}

    meta_running: dict = {}  # an output before the request finished: no entry yet
    g.around_update_request_meta_info(
        original, manager, meta_running, state, {"other": [[1, 2]], g.META_KEY: [[]]}, 0, None)
    assert meta_running == {"other": [1, 2]}

    meta_done: dict = {}
    g.around_update_request_meta_info(
        original, manager, meta_done, state, {"other": [[0], [3]], g.META_KEY: [[], [entry]]},
        1, {"type": "length"})
    assert meta_done == {"other": [1, 2, 3], g.META_KEY: entry}
    assert g.META_KEY not in state.customized_info_accumulated
    tm._slice_streaming_output_meta_info(meta_done, 2, state.customized_info_accumulated.keys())
    assert meta_done == {"other": [3], g.META_KEY: entry}
