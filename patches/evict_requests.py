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

import dataclasses
import re

from sglang_evict.config import POLICY_CHOICES, EvictConfig
from sglang_evict.patches import faults
from sglang_evict.patches.runtime import bind

SAMPLING_VERIFY = "sglang.srt.sampling.sampling_params.SamplingParams.verify"
PREPARE_EXTEND = "sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_extend"
VALIDATE_REQUEST = "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request"

REQUEST_KEY = "sglang_evict"  # sampling_params.custom_params[REQUEST_KEY]
REQUEST_FIELDS = ("policy", "budget", "buffer", "sinks", "window", "min_per_head", "lookahead")
# Bounds on every integer field, whatever the operator allows: nothing a client sends reaches
# the scheduler unbounded (a 2^63 budget would overflow the evictor's int64 arithmetic).
FIELD_LIMIT = 1 << 20
LOOKAHEAD_LIMIT = 1024
# Under --evict-overrides clamp, a client may ask for less than the server's setting, never more.
CLAMPED = ("budget", "buffer", "sinks", "window", "lookahead")
# The evictors of recent distinct overrides (a running request keeps its own referenced).
EVICTOR_CACHE = 64


def _where(field: str | None = None) -> str:
    return f"custom_params.{REQUEST_KEY}" + (f".{field}" if field else "")


def _field_names(message: str) -> str:
    """An EvictConfig message speaks of flags (--evict-min-per-head); a client sent fields."""
    return re.sub(r"--evict-([a-z-]+)", lambda m: m.group(1).replace("-", "_"), message)


def _checked_fields(override: dict) -> dict:
    """The override's fields, each type-checked and bounded; ValueError naming the field."""
    unknown = sorted(str(k) for k in set(override) - set(REQUEST_FIELDS))
    if unknown:
        raise ValueError(f"{_where()}: unknown field(s) {', '.join(unknown)}; "
                         f"valid: {', '.join(REQUEST_FIELDS)}")
    for k, v in override.items():
        if k == "policy":
            if not isinstance(v, str) or v not in POLICY_CHOICES:
                raise ValueError(f"{_where(k)} must be one of {', '.join(POLICY_CHOICES)}, "
                                 f"got {v!r}")
            continue
        low = 1 if k == "budget" else 0
        high = LOOKAHEAD_LIMIT if k == "lookahead" else FIELD_LIMIT
        if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
            shown = repr(v) if len(repr(v)) <= 40 else repr(v)[:40] + "..."
            raise ValueError(f"{_where(k)} must be an integer in [{low}, {high}], got {shown}")
    return dict(override)


def request_config(custom_params, server: EvictConfig) -> EvictConfig | None:
    """The per-request override in `custom_params["sglang_evict"]` (same names as the server
    flags without the --evict- prefix), checked, bounded, limited by what the operator allows
    (`--evict-overrides`), and merged over the server's settings; None if absent. ValueError
    naming the field otherwise."""
    if not isinstance(custom_params, dict) or REQUEST_KEY not in custom_params:
        return None
    override = custom_params[REQUEST_KEY]
    if not server.evicting:
        raise ValueError(f"{_where()}: this server was started without --evict-policy")
    if server.overrides == "none":
        raise ValueError(f"{_where()}: this server takes no per-request eviction settings "
                         "(--evict-overrides none)")
    if not isinstance(override, dict):
        raise ValueError(f"{_where()} must be an object, got {override!r}"[:200])
    fields = _checked_fields(override)
    if server.overrides == "clamp":
        if fields.get("policy") == "none":
            raise ValueError(f"{_where('policy')}: none (no eviction) is not allowed on this "
                             "server (its operator allows it with --evict-overrides any)")
        for k in CLAMPED:
            ceiling = getattr(server, k)
            if k in fields and ceiling is not None:
                fields[k] = min(fields[k], ceiling)
    base = dataclasses.asdict(server)
    if fields.get("policy") == "none" and "budget" not in fields:
        base["budget"] = None
    base.update(fields)
    try:
        cfg = EvictConfig(**base)
        cfg.check_gates_present()
    except Exception as e:  # EvictConfigError: phrased with flags; name the request field
        raise ValueError(f"{_where()}: {_field_names(str(e))}") from None
    return cfg


def after_sampling_verify(rt, result, params, *args, **kwargs):
    # Runs in the tokenizer manager: a bad override is refused with the request, before any
    # scheduling, and never reaches the scheduler.
    request_config(params.custom_params, rt.config)
    return result


def _evictor_for(rt, cfg: EvictConfig):
    """The evictor of an override; the newest EVICTOR_CACHE distinct ones are kept."""
    from sglang_evict.eviction.evictor import Evictor
    from sglang_evict.eviction.settings import evictor_config

    ev_cfg = evictor_config(cfg)
    if ev_cfg is None:
        return None
    known = rt.request_evictors  # repr(EvictorConfig) -> Evictor, least recent first
    key = repr(ev_cfg)
    if key not in known:
        known[key] = Evictor(ev_cfg, rt.cache.num_layers, rt.cache.num_kv_heads)
        while len(known) > EVICTOR_CACHE:
            known.popitem(last=False)
    known.move_to_end(key)
    return known[key]


def after_prepare_for_extend(rt, result, batch, *args, **kwargs):
    state = rt.cache
    if state is None:
        return result
    for req in batch.reqs:
        faults.for_request(rt, "the request's eviction settings", req, _set_evictor, rt, state,
                           req)
    return result


def _set_evictor(rt, state, req) -> None:
    cfg = request_config(req.sampling_params.custom_params, rt.config)
    row = req.kv.req_pool_idx
    if cfg is not None and row is not None:
        state.set_row_evictor(row, _evictor_for(rt, cfg))


def before_validate_request(manager, obj, input_ids, *args, **kwargs):
    if input_ids:
        vocab = manager.model_config.vocab_size
        lo, hi = min(input_ids), max(input_ids)
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise ValueError(f"input_ids: token id {bad} is outside the vocabulary [0, {vocab})")
    return None


def register(registry, hook_type, rt) -> None:
    registry.register(VALIDATE_REQUEST, before_validate_request, hook_type.BEFORE)
    registry.register(SAMPLING_VERIFY, bind(rt, after_sampling_verify), hook_type.AFTER)
    registry.register(PREPARE_EXTEND, bind(rt, after_prepare_for_extend), hook_type.AFTER)
