"""Per-request policy: `sampling_params.custom_params["sglang_evict"]` overrides the server's
eviction settings for one request.

- SamplingParams.verify (AFTER): a malformed override is refused in the tokenizer manager with
  the request (HTTP 400 naming the field), before any scheduling.
- TokenizerManager._validate_one_request (BEFORE): a prompt token id outside the vocabulary is
  refused the same way (SGLang 0.5.23 would pass it to the embedding, whose IndexError kills
  the scheduler and every request with it).
- ScheduleBatch.prepare_for_extend (AFTER): each request's evictor is set on its row.
"""

from __future__ import annotations

from sglang_evict.config import EvictConfig
from sglang_evict.patches.evict_state import _state, config

SAMPLING_VERIFY = "sglang.srt.sampling.sampling_params.SamplingParams.verify"
PREPARE_EXTEND = "sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_extend"
VALIDATE_REQUEST = "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request"

REQUEST_KEY = "sglang_evict"  # sampling_params.custom_params[REQUEST_KEY]
REQUEST_FIELDS = ("policy", "budget", "buffer", "sinks", "window", "min_per_head", "lookahead")


def request_config(custom_params) -> EvictConfig | None:
    """The per-request override in `custom_params["sglang_evict"]` (same names as the server
    flags without the --evict- prefix), merged over the server's settings; None if absent.
    ValueError naming the problem otherwise."""
    if not isinstance(custom_params, dict) or REQUEST_KEY not in custom_params:
        return None
    override = custom_params[REQUEST_KEY]
    server = config()
    if not server.evicting:
        raise ValueError(
            f"custom_params.{REQUEST_KEY}: this server was started without --evict-policy"
        )
    if not isinstance(override, dict):
        raise ValueError(f"custom_params.{REQUEST_KEY} must be an object, got {override!r}")
    unknown = sorted(set(override) - set(REQUEST_FIELDS))
    if unknown:
        raise ValueError(
            f"custom_params.{REQUEST_KEY}: unknown field(s) {', '.join(unknown)}; "
            f"valid: {', '.join(REQUEST_FIELDS)}"
        )
    for k, v in override.items():
        if k != "policy" and (not isinstance(v, int) or isinstance(v, bool)):
            raise ValueError(f"custom_params.{REQUEST_KEY}.{k} must be an integer, got {v!r}")
    import dataclasses

    base = dataclasses.asdict(server)
    if "policy" in override and "budget" not in override and override["policy"] == "none":
        base["budget"] = None
    base.update(override)
    try:
        cfg = EvictConfig(**base)
        cfg.check_gates_present()
    except Exception as e:  # EvictConfigError: phrased with flags; name the request field
        raise ValueError(f"custom_params.{REQUEST_KEY}: {e}") from None
    return cfg


def after_sampling_verify(result, params, *args, **kwargs):
    # Runs in the tokenizer manager: a bad override is refused with the request, before any
    # scheduling, and never reaches the scheduler.
    request_config(params.custom_params)
    return result


_evictors: dict = {}


def _evictor_for(cfg: EvictConfig):
    from sglang_evict.eviction.evictor import Evictor

    ev_cfg = cfg.evictor_config()
    if ev_cfg is None:
        return None
    key = repr(ev_cfg)
    if key not in _evictors:
        _evictors[key] = Evictor(ev_cfg, _state.cache.num_layers, _state.cache.num_kv_heads)
    return _evictors[key]


def after_prepare_for_extend(result, batch, *args, **kwargs):
    state = _state.cache
    if state is None:
        return result
    for req in batch.reqs:
        cfg = request_config(req.sampling_params.custom_params)
        row = req.kv.req_pool_idx
        if cfg is not None and row is not None:
            state.set_row_evictor(row, _evictor_for(cfg))
    return result


def before_validate_request(manager, obj, input_ids, *args, **kwargs):
    if input_ids:
        vocab = manager.model_config.vocab_size
        lo, hi = min(input_ids), max(input_ids)
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise ValueError(f"input_ids: token id {bad} is outside the vocabulary [0, {vocab})")
    return None


def register(registry, hook_type) -> None:
    registry.register(VALIDATE_REQUEST, before_validate_request, hook_type.BEFORE)
    registry.register(SAMPLING_VERIFY, after_sampling_verify, hook_type.AFTER)
    registry.register(PREPARE_EXTEND, after_prepare_for_extend, hook_type.AFTER)
