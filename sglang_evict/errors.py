"""Errors every layer may raise (at the bottom: imports nothing of the package)."""


class HeadEvictError(RuntimeError):
    """Eviction cannot serve this model or these settings; one line naming the problem."""
