"""The evictor a server's or a request's settings (EvictConfig) ask for."""

from __future__ import annotations

from sglang_evict.config import POLICY_CHOICES, EvictConfig
from sglang_evict.eviction.evictor import Evictor, EvictorConfig
from sglang_evict.eviction.policies import make_policy


def evictor_config(cfg: EvictConfig) -> EvictorConfig | None:
    """The evictor settings of `cfg`'s policy (None for policy none: nothing is evicted)."""
    if cfg.policy in (None, "none"):
        return None
    name, mode = POLICY_CHOICES[cfg.policy]
    retention = {"lookahead": cfg.lookahead} if name == "retention" else {}
    return EvictorConfig(
        budget=cfg.budget,
        policy=make_policy(name, sinks=cfg.sinks, window=cfg.window, **retention),
        buffer=cfg.buffer,
        mode=mode,
        min_per_head=cfg.min_per_head,
    )


def make_evictor(cfg: EvictConfig, num_layers: int, num_kv_heads: int) -> Evictor | None:
    ev = evictor_config(cfg)
    return Evictor(ev, num_layers, num_kv_heads) if ev is not None else None
