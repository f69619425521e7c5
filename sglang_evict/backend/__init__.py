"""The sglang_evict attention backend and the per-step head-slot cache state behind it."""
