"""A cached entry's retention score from its stored log beta: log alpha = (t - pos) * log beta, and
the same looking a few steps ahead (METHOD.md "Score of a cached entry")."""

from __future__ import annotations

import math
from typing import Any

import torch


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def retention_log_alpha(
    log_beta: torch.Tensor,
    token_pos: torch.Tensor | int,
    seq_len: torch.Tensor | int,
) -> torch.Tensor:
    """Score of a cached entry: log α = (t - pos_i) · log β_i  (α = β_i^(t - pos_i)).

    TrimKV's geometric retention (arXiv 2512.03324; METHOD.md "Score of a cached entry"): the
    entry of token i keeps a fraction β_i of its importance per step, so after t - pos_i steps
    it has α = β_i^(t - pos_i). log_beta, token_pos and seq_len (= t) broadcast against each
    other; the result is float32 (positions are exact in float32 up to 2^24). An entry with
    pos_i = t (the newest) scores 0, the highest possible score.
    """
    log_beta = log_beta.float()
    return _age(log_beta, token_pos, seq_len, 0) * log_beta


def _age(log_beta: torch.Tensor, token_pos: Any, seq_len: Any, shift: int) -> torch.Tensor:
    # Integer subtraction first, then one rounding to float32.
    t = torch.as_tensor(seq_len, device=log_beta.device)
    pos = torch.as_tensor(token_pos, device=log_beta.device)
    return (t + shift - pos).to(torch.float32)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of x = -log 2 (Mächler, 2012)."""
    return torch.where(
        x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x))
    )


# Below this |n · log β| the closed form loses digits to cancellation; the series is exact to
# float32 there (the first dropped term is (n·log β)^4 / 2880 < 4e-16).
_SERIES_CUTOFF = 1e-3


def retention_log_alpha_lookahead(
    log_beta: torch.Tensor,
    token_pos: torch.Tensor | int,
    seq_len: torch.Tensor | int,
    lookahead: int,
) -> torch.Tensor:
    """Lookahead score: log Σ_{k=1..n} β^(t + k - pos) for the next n = `lookahead` steps,

        = (t + 1 - pos) · log β + log(1 - β^n) - log(1 - β)          (METHOD.md, "Options")

    i.e. the log of the entry's expected usefulness summed over the next n steps rather than
    its value now. n = 1 gives (t + 1 - pos) · log β, the plain score one step later. The
    ratio (1 - β^n) / (1 - β) is computed in log space with log1p/expm1 and, for β → 1, its
    series log n + (n - 1)·log β / 2 + (n² - 1)·log² β / 24, so β = 1 exactly gives log n.
    Broadcasting and dtype as `retention_log_alpha`.
    """
    if not _is_int(lookahead) or lookahead < 1:
        raise ValueError(f"lookahead must be a positive integer, got {lookahead!r}")
    # logsigmoid never returns > 0; clamp rounding noise from elsewhere so the logs stay real.
    lb = log_beta.float().clamp(max=0.0)
    n = float(lookahead)
    base = _age(lb, token_pos, seq_len, 1) * lb
    if lookahead == 1:
        return base
    small = (n * lb).abs() < _SERIES_CUTOFF
    # Evaluate the closed form only where it is well defined (|x| >= cutoff); the other lanes
    # take the series, so no NaN or inf is ever produced, even transiently.
    safe = torch.where(small, torch.full_like(lb, -1.0), lb)
    closed = _log1mexp(n * safe) - _log1mexp(safe)
    series = math.log(n) + (n - 1.0) * lb / 2.0 + (n * n - 1.0) * lb * lb / 24.0
    return base + torch.where(small, series, closed)
