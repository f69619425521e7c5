"""The head-slot memory: the pool, the persistent live lists, the score store (no eviction logic)."""
