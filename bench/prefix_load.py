"""What admitting a request after a cached prefix costs: the copy of the prefix's live
head-slots into the request's own lists (TreeShare.load_rows), O(prefix x layers x heads), the
step the cascade form of ARCHITECTURE.md (shared segments attended in place) would remove.

Times load_rows for one request at the default model's shape (layers, KV heads, head size) and
several prefix lengths, the prefix whole or compressed to the budget per head (entries evicted,
holes in the tree's copy: the gather still reads the whole row), and, with --ttft, divides the
time by the p50 time to first token of the requests that hit a cached document in a
bench/scored_context.py report (eviction servers, "in sequence" phase).

    .venv/bin/python bench/prefix_load.py --ttft bench/results/scored_context.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def model_shape(model_path: str) -> tuple[int, int, int]:
    """(layers, KV heads, head size) of the model."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_path)
    return c.num_hidden_layers, c.num_key_value_heads, c.hidden_size // c.num_attention_heads


def cache_for(prefix: int, L: int, H: int, D: int):
    """A HeadKVCache of shape (L, H, D) holding one cached prefix of `prefix` tokens (row 0's
    req_to_token) and nothing else."""
    from sglang_evict.backend.head_cache import HeadKVCache

    cache = HeadKVCache(num_virtual=prefix + 1, num_layers=L, num_kv_heads=H, head_dim=D,
                        v_head_dim=D, capacity=prefix * L * H, dtype=torch.bfloat16,
                        device="cpu", evictor=None, num_rows=2, max_row_len=prefix + 1)
    ids = torch.arange(1, prefix + 1)
    cache.pool.alloc(ids)
    req_to_token = torch.zeros(2, prefix + 1, dtype=torch.int32)
    req_to_token[0, :prefix] = ids.to(torch.int32)
    return cache, req_to_token, L * H


def compress(cache, prefix: int, budget: int) -> None:
    """Evict all but a random `budget` of each (layer, head)'s entries, as eviction leaves a
    cached prefix."""
    L, H = cache.num_layers, cache.num_kv_heads
    keep = torch.zeros(prefix, L, H, dtype=torch.bool)
    score = torch.rand(prefix, L, H)
    top = score.topk(min(budget, prefix), dim=0).indices
    keep.scatter_(0, top, True)
    cache.pool.evict_mask(torch.arange(1, prefix + 1), keep)


def time_load(cache, req_to_token, prefix: int, repeats: int) -> float:
    """Median seconds of one load_rows of the prefix into row 0 (what admission runs)."""
    rows, lens = torch.tensor([0]), torch.tensor([prefix])
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        cache.tree.load_rows(rows, req_to_token, lens, lens)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])  # the first warms the allocator


def hit_ttft(report: Path) -> float | None:
    """p50 time to first token of the eviction servers' "in sequence" phase, whose requests
    after a group's first found its document cached."""
    rows = json.loads(report.read_text())["servers"]
    ttft = [r["ttft_p50_s"] for r in rows if r["budget"] is not None
            and r.get("phase") == "in sequence" and r["ttft_p50_s"]]
    return statistics.median(ttft) if ttft else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prefixes", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    p.add_argument("--budget", type=int, default=128, help="entries per head after compression")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--ttft", type=Path, help="a scored_context.py report to divide by")
    p.add_argument("--out", default="bench/results/prefix_load.json")
    args = p.parse_args(argv)
    from sglang_evict.default_model import resolve

    shape = model_shape(resolve())
    ttft = hit_ttft(args.ttft) if args.ttft else None
    rows = []
    for prefix in args.prefixes:
        for compressed in (False, True):
            cache, req_to_token, lh = cache_for(prefix, *shape)
            if compressed:
                compress(cache, prefix, args.budget)
            s = time_load(cache, req_to_token, prefix, args.repeats)
            row = {"prefix": prefix, "compressed_to": args.budget if compressed else None,
                   "live_head_slots": cache.pool.num_live, "head_slots_per_token": lh,
                   "load_rows_ms": 1000 * s,
                   "share_of_hit_ttft_p50": s / ttft if ttft else None}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "prefix_load", "hit_ttft_p50_s": ttft,
                               "threads": torch.get_num_threads(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
