"""Host time of the eviction backend's share of one decode step, without the model.

Builds the head-slot cache at the default model's shapes (30 layers, 3 KV heads, 9 query heads,
head_dim 64, float32), fills B requests with C tokens each (prefilled in chunks with eviction
between them), then times decode steps: `prepare` (allocation, lists, metadata), per layer the
store and the CPU attention path, and `after_forward` (the evictor). Reported per (policy, B, C):
ms per step, and the share spent in prepare / attention / after_forward.

    .venv/bin/python bench/step_cost.py --out bench/results/step_cost.json

`--src DIR` runs the same measurement against another checkout's package (for example the
commit before the live lists, to compare before and after in one run): DIR must hold
sglang_evict/ with its kernels/ folder reachable as sglang_evict/kernels (the script links it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

L, H, G, D = 30, 3, 3, 64


class _Mode:
    def __init__(self, decode):
        self.decode = decode

    def is_decode(self):
        return self.decode

    def is_idle(self):
        return False


def _imports():
    try:
        from sglang_evict.backend.head_cache import HeadKVCache
        from sglang_evict.eviction.evictor import Evictor, EvictorConfig
        from sglang_evict.eviction.policies import make_policy
        new = True
    except ImportError:  # the layout before the live lists
        from sglang_evict.evictor import Evictor, EvictorConfig
        from sglang_evict.head_cache import HeadKVCache
        from sglang_evict.policies import make_policy
        new = False
    from sglang_evict.kernels import head_store
    from sglang_evict.kernels.ragged_attention_torch import ragged_decode_attention_torch
    # what the backend stores with on CPU
    store = getattr(head_store, "store_head_slots_torch", head_store.store_head_slots_reference)
    return HeadKVCache, Evictor, EvictorConfig, make_policy, store, \
        ragged_decode_attention_torch, new


def measure(policy: str, batch: int, context: int, steps: int, budget: int, buffer: int) -> dict:
    import torch

    torch.manual_seed(0)
    HeadKVCache, Evictor, EvictorConfig, make_policy, store, decode, new = _imports()
    evictor = None
    if policy != "none":
        evictor = Evictor(EvictorConfig(budget=budget, buffer=buffer,
                                        policy=make_policy(policy, sinks=4)), L, H)
    cap_tokens = batch * (context + steps + 8) if evictor is None else batch * (budget + buffer + 64) + 4096
    num_virtual = batch * (context + steps + 8) + 8
    kw = dict(num_virtual=num_virtual, num_layers=L, num_kv_heads=H, head_dim=D, v_head_dim=D,
              capacity=cap_tokens * L * H, dtype=torch.float32, device="cpu", evictor=evictor)
    if new:
        kw.update(num_rows=batch + 1, max_row_len=context + steps + 8)
    cache = HeadKVCache(**kw)
    rtt = torch.zeros(batch + 1, context + steps + 8, dtype=torch.int32)
    lens = [0] * batch
    next_id = [1]

    def step(chunks, timed=False):
        rows = list(chunks)
        decode_mode = all(chunks[r] == 1 and lens[r] > 0 for r in rows)
        ids, pos, ext, prefix = [], [], [], []
        for r in rows:
            k = chunks[r]
            new_ids = torch.arange(next_id[0], next_id[0] + k)
            next_id[0] += k
            rtt[r, lens[r]:lens[r] + k] = new_ids.int()
            ids.append(new_ids)
            pos.append(torch.arange(lens[r], lens[r] + k))
            ext.append(k)
            prefix.append(lens[r])
            lens[r] += k
        seq = torch.tensor([lens[r] for r in rows])
        b = SimpleNamespace(
            out_cache_loc=torch.cat(ids), req_pool_indices=torch.tensor(rows), seq_lens=seq,
            seq_lens_cpu=seq, extend_seq_lens=torch.tensor(ext),
            extend_prefix_lens=torch.tensor(prefix), positions=torch.cat(pos),
            forward_mode=_Mode(decode_mode),
        )
        T = b.out_cache_loc.numel()
        t0 = time.perf_counter()
        cache.prepare(b, rtt)
        t1 = time.perf_counter()
        for layer in range(L):
            k = torch.randn(T, H, D)
            lb = torch.full((T, H), -0.01)
            cache.store(layer, k, k, lb, b.positions, store)
            if decode_mode:
                lists = cache.step if new else cache.lists
                indptr, indices = lists.layer(layer)
                decode(torch.randn(len(rows), H * G, D), cache.k, cache.v, indptr, indices, 0.125)
        t2 = time.perf_counter()
        cache.after_forward(b, rtt)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2

    for r in range(batch):  # prefill in chunks of 512, eviction between them
        left = context
        while left:
            c = min(512, left)
            step({r: c})
            left -= c
    times = [step({r: 1 for r in range(batch)}) for _ in range(steps)]
    times = times[steps // 5:]  # warm-up
    prep, attn, after = (sum(t[i] for t in times) / len(times) * 1000 for i in range(3))
    return {"policy": policy, "batch": batch, "context": context, "impl": "new" if new else "old",
            "ms_per_step": prep + attn + after, "prepare_ms": prep, "layers_ms": attn,
            "after_forward_ms": after}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--policies", default="streaming,none")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--contexts", default="512,4096")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--budget", type=int, default=128)
    p.add_argument("--buffer", type=int, default=32)
    p.add_argument("--src", default=None, help="another checkout's repository root")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.one:
        src = os.environ.get("STEP_COST_SRC")
        if src:  # the other checkout's package, ahead of this one's editable install
            sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
            sys.path.insert(0, src)
        pol, b, c = args.one.split(":")
        print(json.dumps(measure(pol, int(b), int(c), args.steps, args.budget, args.buffer)))
        return 0
    env = dict(os.environ)
    tmp = None
    if args.src:
        # The other checkout's package first on the path, its kernels/ linked into it.
        tmp = tempfile.mkdtemp()
        src = Path(args.src).resolve()
        (Path(tmp) / "sglang_evict").symlink_to(src / "sglang_evict")
        if not (src / "sglang_evict" / "kernels").exists():
            (src / "sglang_evict" / "kernels").symlink_to(src / "kernels")
        env["STEP_COST_SRC"] = tmp
    rows = []
    for pol in args.policies.split(","):
        for b in map(int, args.batches.split(",")):
            for c in map(int, args.contexts.split(",")):
                cmd = [sys.executable, "-P", __file__, "--one", f"{pol}:{b}:{c}",
                       "--steps", str(args.steps), "--budget", str(args.budget),
                       "--buffer", str(args.buffer)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{row['impl']} {pol:9s} batch {b:2d} context {c:5d}: "
                      f"{row['ms_per_step']:7.1f} ms/step (prepare {row['prepare_ms']:.1f}, "
                      f"layers {row['layers_ms']:.1f}, after {row['after_forward_ms']:.1f})",
                      flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
