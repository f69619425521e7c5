"""Retention gates inside SGLang: log β computed while attention runs, stored beside the KV.

Targets sglang 0.5.23 (each target is checked by tests/unit/test_upstream_guards.py):
- ModelRunner.load_model (AFTER): load the gate checkpoint, check it against the served model
  and attach a forward pre-hook to every decoder layer's `self_attn`. The pre-hook sees the
  normalised hidden state entering attention (Llama, Qwen2, Qwen3 and Mistral all call
  `self_attn(positions=, hidden_states=, forward_batch=)` after the input layernorm), so one
  mechanism serves every family without forking a model file.
- ModelRunner.alloc_memory_pool (AFTER): allocate the score store beside the KV pool, same
  slot numbering, and report its memory share.
- DefaultPoolConfigurator._compute_cell_size (AROUND): add the score bytes to SGLang's
  per-token cost, so the pool is sized from one memory budget for KV and scores together.
- MHATokenToKVPool._store_kv_layer (AROUND): where SGLang writes a layer's new K and V, write
  K, V, log β and positions in one pass with the store kernel.
- release_kv_cache (BEFORE) and Scheduler.get_output_streamer_class (AROUND): per-request
  statistics read from the score store, returned in the response's meta_info["sglang_evict"].
- TokenizerManager.update_request_meta_info (AROUND): that entry is one object. SGLang's
  customized info is a list accumulated over a request's outputs (and sliced per streamed
  chunk); ours is sent once, when the request finishes, so it is set, not accumulated.
"""

from __future__ import annotations

import inspect
import logging

import torch

from sglang_evict.config import EvictConfig
from sglang_evict.cache.score_store import ScoreStore, bytes_per_slot

logger = logging.getLogger(__name__)

LOAD_MODEL = "sglang.srt.model_executor.model_runner.ModelRunner.load_model"
ALLOC_POOL = "sglang.srt.model_executor.model_runner.ModelRunner.alloc_memory_pool"
CELL_SIZE = (
    "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size"
)
STORE_KV = "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool._store_kv_layer"
RELEASE_KV = "sglang.srt.mem_cache.common.release_kv_cache"
STREAMER_CLASS = "sglang.srt.managers.scheduler.Scheduler.get_output_streamer_class"
UPDATE_META = "sglang.srt.managers.tokenizer_manager.TokenizerManager.update_request_meta_info"
META_KEY = "sglang_evict"
MAX_PENDING_STATS = 4096

ATTENTION_ARGS = ("positions", "hidden_states", "forward_batch")


class GateAttachError(RuntimeError):
    pass


class GateAttachment:
    """Process-wide state of one served model: its gates, score store and pending scores.

    `pending[layer_id]` holds (log_beta, positions) from the layer's pre-hook until the KV write
    of the same layer consumes it; a write path that bypasses `_store_kv_layer` (fused rope+store
    kernels on some GPUs) is caught by the post-hook, which stores the scores on their own."""

    def __init__(self, config: EvictConfig, gates, num_layers: int, num_kv_heads: int):
        self.config = config
        self.gates = gates
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.store: ScoreStore | None = None
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.unfused_writes = 0
        # Token-layers of extend forwards whose gates ran (the shape, a host int): what a
        # prefix hit saves is visible as gates not run.
        self.gated_prompt_token_layers = 0
        self._store_fn = None

    def store_fn(self, device: torch.device):
        if self._store_fn is None:
            from sglang_evict.kernels import kv_store

            self._store_fn = (
                kv_store.store_kv_scores
                if self.config.use_triton(device)
                else kv_store.store_kv_scores_reference
            )
        return self._store_fn


_attachment: GateAttachment | None = None
# Per-request statistics waiting for the request's response (rid -> meta_info entry). Entries
# are popped when the response is streamed; a request that finishes without a response
# (aborted) would leave one behind, so only the newest MAX_PENDING_STATS are kept.
_finished_stats: dict[str, dict] = {}


def attachment() -> GateAttachment | None:
    return _attachment


# ------------------------------------------------------------------ attaching to the model


def decoder_layers(model) -> list:
    """The decoder layers of a SGLang causal LM whose attention is `layers[i].self_attn`
    called as self_attn(positions, hidden_states, forward_batch); raise by name otherwise."""
    name = type(model).__name__
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise GateAttachError(
            f"sglang-evict cannot attach retention gates to {name}: it has no model.layers"
        )
    found = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None:
            if type(layer).__name__ == "PPMissingLayer":  # another pipeline stage's layer
                continue
            raise GateAttachError(
                f"sglang-evict cannot attach retention gates to {name}: layer {i} "
                f"({type(layer).__name__}) has no self_attn"
            )
        params = list(inspect.signature(attn.forward).parameters)
        if tuple(params[:3]) != ATTENTION_ARGS:
            raise GateAttachError(
                f"sglang-evict cannot attach retention gates to {name}: layer {i}'s "
                f"{type(attn).__name__}.forward takes {params[:3]}, expected {list(ATTENTION_ARGS)}"
            )
        found.append((i, attn))
    if not found:
        raise GateAttachError(f"sglang-evict cannot attach retention gates to {name}: no layers")
    return found


def _bound(args, kwargs, name: str):
    if name in kwargs:
        return kwargs[name]
    return args[ATTENTION_ARGS.index(name)]


def _make_hooks(state: GateAttachment, layer_id: int):
    def pre_hook(module, args, kwargs):
        hidden = _bound(args, kwargs, "hidden_states")
        positions = _bound(args, kwargs, "positions")
        if hidden.shape[0] == 0:
            return None
        with torch.no_grad():
            log_beta = state.gates.forward_layer(layer_id, hidden)
        if _bound(args, kwargs, "forward_batch").forward_mode.is_extend():
            state.gated_prompt_token_layers += hidden.shape[0]
        state.pending[layer_id] = (log_beta, positions)
        return None

    def post_hook(module, args, kwargs, output):
        left = state.pending.pop(layer_id, None)
        if left is None or state.store is None:
            return None
        # The KV write of this layer did not pass through _store_kv_layer: store scores alone.
        loc = _bound(args, kwargs, "forward_batch").out_cache_loc
        log_beta, positions = left
        n = loc.shape[0]
        keep = loc >= 0
        slots = loc[keep].long()
        state.store.log_beta_flat(layer_id)[slots] = log_beta[:n][keep]
        state.store.pos.view(-1)[slots] = positions[:n][keep].long()
        state.unfused_writes += 1
        return None

    return pre_hook, post_hook


def after_load_model(result, runner, *args, **kwargs):
    global _attachment
    config = EvictConfig.from_env()
    if config.gates is None or runner.is_draft_worker:
        return result
    from sglang_evict.gate_files import load_gates_for_model

    hf_config = runner.model_config.hf_config
    layers = decoder_layers(runner.model)
    gates = load_gates_for_model(config.gates, hf_config, device=runner.device)
    gates.eval().requires_grad_(False)
    state = GateAttachment(config, gates, gates.config.num_layers, gates.config.num_kv_heads)
    for layer_id, attn in layers:
        pre_hook, post_hook = _make_hooks(state, layer_id)
        attn.register_forward_pre_hook(pre_hook, with_kwargs=True)
        attn.register_forward_hook(post_hook, with_kwargs=True)
    _attachment = state
    logger.info(
        "sglang-evict: retention gates %s attached to %d layers of %s (variant %s%s)",
        config.gates, len(layers), type(runner.model).__name__, gates.config.variant,
        ", shared projection" if gates.config.shared_projection else "",
    )
    return result


# ------------------------------------------------------------------ the score store


def around_cell_size(original, configurator, kvc, num_layers, *args, **kwargs):
    cell = original(configurator, kvc, num_layers, *args, **kwargs)
    config = EvictConfig.from_env()
    if not config.active:
        return cell
    from sglang.srt.runtime_context import get_parallel

    heads = kvc.model_config.get_num_kv_heads(get_parallel().attn_tp_size)
    if config.evicting:
        from sglang_evict.backend.head_cache import bytes_per_token

        return cell + bytes_per_token(num_layers, heads, config.virtual_factor)
    return cell + bytes_per_slot(num_layers, heads)


def after_alloc_memory_pool(result, runner, *args, **kwargs):
    state = _attachment
    if state is None or runner.is_draft_worker or state.config.evicting:
        # With eviction, log beta lives in the head-slots (head_cache.py), not a score store.
        return result
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    pool = runner.token_to_kv_pool
    if not isinstance(pool, MHATokenToKVPool):
        raise GateAttachError(
            f"sglang-evict needs an MHA KV pool; this model uses {type(pool).__name__}"
        )
    layer_num = len(pool.k_buffer)
    if layer_num != state.num_layers or pool.head_num != state.num_kv_heads:
        raise GateAttachError(
            f"sglang-evict: the KV pool has {layer_num} layers x {pool.head_num} KV heads, the "
            f"gates have {state.num_layers} x {state.num_kv_heads} (tensor or pipeline "
            "parallelism is not supported yet)"
        )
    num_slots = pool.k_buffer[0].shape[0]
    state.store = ScoreStore(num_slots, layer_num, pool.head_num, pool.page_size, pool.device)
    pool._sglang_evict_scores = state.store
    kv_bytes = sum(b.numel() * b.element_size() for b in (*pool.k_buffer, *pool.v_buffer))
    logger.info(
        "sglang-evict: score store %.1f MiB for %d slots (%.2f%% of the KV pool's %.1f MiB)",
        state.store.nbytes / 2**20, num_slots, 100 * state.store.nbytes / kv_bytes, kv_bytes / 2**20,
    )
    return result


def around_store_kv_layer(original, pool, layer_idx, loc, cache_k, cache_v, *args, **kwargs):
    state = _attachment
    store = getattr(pool, "_sglang_evict_scores", None)
    layer_id = layer_idx + pool.start_layer
    if (
        state is None
        or store is None
        or layer_id not in state.pending
        or pool.store_dtype != pool.dtype
        or getattr(pool, "kv_cache_layout", None) == "vectorized_5d"
    ):
        return original(pool, layer_idx, loc, cache_k, cache_v, *args, **kwargs)
    log_beta, positions = state.pending.pop(layer_id)
    n = loc.shape[0]
    from sglang_evict.kernels.kv_store import paged_view

    page = pool.page_size
    state.store_fn(loc.device)(
        paged_view(pool.k_buffer[layer_idx], page),
        paged_view(pool.v_buffer[layer_idx], page),
        store.log_beta[layer_id],
        store.pos,
        cache_k,
        cache_v,
        log_beta[:n],
        positions[:n],
        loc,
    )
    return None


# ------------------------------------------------------------------ per-request statistics


def request_stats(store: ScoreStore, slots: torch.Tensor) -> dict:
    log_beta, _ = store.read(slots)  # [L, n, H]
    per_head = log_beta.double().mean(dim=1) if slots.numel() else log_beta.new_zeros(
        store.num_layers, store.num_kv_heads, dtype=torch.float64
    )
    return {
        "scored_tokens": int(slots.numel()),
        "mean_log_beta_per_layer": per_head.mean(dim=1).tolist(),
        "mean_log_beta_per_layer_head": per_head.tolist(),
    }


def before_release_kv_cache(req, tree_cache, *args, **kwargs):
    row = req.kv.req_pool_idx
    if row is None:
        return None
    from sglang_evict.patches import evict_step

    # Always hand the row's eviction statistics over: the row may be reused next step.
    evict_stats = evict_step.release_stats(req, row)
    if not req.finished():
        return None
    entry = dict(evict_stats or {})
    state = _attachment
    if state is not None and state.store is not None:
        # The last sampled token has no KV yet; committed KV is what the score store covers.
        n = req.kv.kv_committed_len
        slots = tree_cache.req_to_token_pool.req_to_token[row, :n]
        entry.update(request_stats(state.store, slots))
    if not entry:
        return None
    _finished_stats[req.rid] = entry
    while len(_finished_stats) > MAX_PENDING_STATS:
        _finished_stats.pop(next(iter(_finished_stats)))
    return None


def around_output_streamer_class(original, scheduler, *args, **kwargs):
    base = original(scheduler, *args, **kwargs)
    if not EvictConfig.from_env().active:
        return base

    class EvictOutputStreamer(base):
        has_additional_customized_info = True

        def build_additional_customized_info(self, reqs):
            values = super().build_additional_customized_info(reqs)
            values[META_KEY] = [
                [_finished_stats.pop(r.rid)] if r.rid in _finished_stats else [] for r in reqs
            ]
            return values

        def is_request_level_customized_info_key(self, key):
            return key == META_KEY or super().is_request_level_customized_info_key(key)

    EvictOutputStreamer.__name__ = f"Evict{base.__name__}"
    return EvictOutputStreamer


def around_update_request_meta_info(original, manager, meta_info, state, customized_info, index,
                                    *args, **kwargs):
    if META_KEY not in customized_info:
        return original(manager, meta_info, state, customized_info, index, *args, **kwargs)
    rest = {k: v for k, v in customized_info.items() if k != META_KEY}
    result = original(manager, meta_info, state, rest, index, *args, **kwargs)
    entries = customized_info[META_KEY][index]
    if entries:
        meta_info[META_KEY] = entries[-1]
    return result


def register(registry, hook_type) -> None:
    """Hooks that only matter with gates configured; registered only then, so vanilla serving
    keeps SGLang's hot paths unwrapped."""
    if not EvictConfig.from_env().active:
        return
    registry.register(LOAD_MODEL, after_load_model, hook_type.AFTER)
    registry.register(ALLOC_POOL, after_alloc_memory_pool, hook_type.AFTER)
    registry.register(CELL_SIZE, around_cell_size, hook_type.AROUND)
    if not EvictConfig.from_env().evicting:
        registry.register(STORE_KV, around_store_kv_layer, hook_type.AROUND)
    registry.register(RELEASE_KV, before_release_kv_cache, hook_type.BEFORE)
    registry.register(STREAMER_CLASS, around_output_streamer_class, hook_type.AROUND)
    registry.register(UPDATE_META, around_update_request_meta_info, hook_type.AROUND)
