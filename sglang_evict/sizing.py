"""The arithmetic of pool sizing with eviction, in one place: what the server's hooks, `serve`
and `plan` all compute from (no imports of the package: it sits at the bottom)."""

from __future__ import annotations

# head-slot bytes beside K and V: log beta (float32), position (int64), its virtual id and its
# holder (int32 each)
SLOT_META_BYTES = 4 + 8 + 4 + 4
# per (virtual token, layer, head): the slot_map entry and the live-list arena entry (int32 each)
MAP_BYTES = 4 + 4


def bytes_per_token(num_layers: int, num_kv_heads: int, oversubscribe: int) -> int:
    """Bytes added to SGLang's per-token KV cost (K and V are counted by SGLang already): the
    head-slot metadata of one token's L*H head-slots, and the map and list entries of the
    `oversubscribe` virtual ids each token of physical memory backs."""
    return num_layers * num_kv_heads * (SLOT_META_BYTES + MAP_BYTES * oversubscribe)


def default_chunk(pool: int) -> int:
    """The prefill chunk for a pool of `pool` tokens at full size: half of it, at most 4096
    (eviction needs room beside a chunk)."""
    return max(1, min(4096, pool // 2))


def default_running(budget: int, buffer: int, pool: int, chunk: int) -> int:
    """The running requests allowed with eviction: every one can hold its whole budget (M + B,
    plus the next token) beside a prefill chunk, without squeezing another; reclaim makes room
    beyond that only under pressure."""
    return max(1, (pool - chunk) // (budget + buffer + 1))


def protected_fits(running: int, sinks: int, window: int, chunk: int, pool: int) -> bool:
    """Whether every running request's protected tokens (sinks, recent window and the next
    token) beside one prefill chunk fit the physical pool: else a step could need more
    head-slots than reclaim can ever free."""
    return (sinks + window + 1) * running + chunk <= pool
