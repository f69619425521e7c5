"""GPU check of the kernels at real model shapes: correctness, time, bandwidth. Needs torch and
triton only (the lent GPU machine has no SGLang and no registry), finishes in a few minutes.

    python bench/gpu_kernels.py --out gpu_kernels.json        # on a CUDA machine
    TRITON_INTERPRET=1 python bench/gpu_kernels.py --smoke    # tiny shapes on CPU (a test runs it)

For each shape (Qwen3-4B-like: 36 layers, 8 KV heads, 32 query heads, head_dim 128; Llama-8B-like:
32 layers, 8 KV heads, 32 query heads, head_dim 128; bf16):
  - decode over live lists (Triton, grouped split-KV) against its torch twin, then its time
    against dense SDPA over the same number of live tokens per (request, KV head), and
    `--evict-kernel flashinfer` (FlashInfer's paged kernel, page size 1, through the serving
    adapter) against the same twin where flashinfer is installed; bandwidth reached as a share of
    a measured device-to-device copy;
  - extend (query tiles) against its torch twin, time against causal SDPA and FlashInfer;
  - the step-metadata kernel (live lists -> indptr/indices) against its torch twin, time for all
    layers of a batch;
  - the head-slot store and the radix select against their references;
  - the evictor's per-request selection (torch.kthvalue over exact int64 keys, PyTorch's CUDA
    radix select) against the Triton float32 select run per request;
  - a decode step (store + decode for every layer) captured as a CUDA graph from static metadata
    buffers, replayed with new contents, against the eager step (CUDA only).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _kernels():
    """sglang_evict.kernels from the installed package, or straight from this checkout's kernels/
    folder (the GPU machine has neither SGLang nor this package installed)."""
    try:
        importlib.import_module("sglang_evict.kernels.ragged_attention")
    except ImportError:
        pkg = types.ModuleType("sglang_evict")
        pkg.__path__ = []
        sub = types.ModuleType("sglang_evict.kernels")
        sub.__path__ = [str(ROOT / "kernels")]
        sys.modules["sglang_evict"], sys.modules["sglang_evict.kernels"] = pkg, sub
    names = ("ragged_attention", "ragged_attention_torch", "live_indices", "head_store", "select",
             "flashinfer_lists")
    return {n: importlib.import_module(f"sglang_evict.kernels.{n}") for n in names}


SHAPES = {
    "qwen3-4b-like": dict(layers=36, kv_heads=8, q_heads=32, head_dim=128),
    "llama-8b-like": dict(layers=32, kv_heads=8, q_heads=32, head_dim=128),
}
SMOKE = {"tiny": dict(layers=2, kv_heads=2, q_heads=4, head_dim=32)}


def _time(fn, reps):
    import torch

    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def _lists(batch, kv_heads, live, capacity, dev, gen):
    """Each (request, KV head) holds `live` random head-slots (FlashInfer ragged layout)."""
    import torch

    seqs = batch * kv_heads
    indices = torch.randperm(capacity, generator=gen, device="cpu")[: seqs * live].to(dev, torch.int32)
    indptr = torch.arange(0, seqs * live + 1, live, dtype=torch.int32, device=dev)
    return indptr, indices


def check_decode(k, shape, batch, live, dtype, dev, reps, out):
    import torch
    import torch.nn.functional as F

    ra = k["ragged_attention"]
    H, Hq, D = shape["kv_heads"], shape["q_heads"], shape["head_dim"]
    gen = torch.Generator().manual_seed(0)
    capacity = batch * H * live + 1024
    k_slots = torch.randn(capacity, D, generator=gen).to(dev, dtype)
    v_slots = torch.randn(capacity, D, generator=gen).to(dev, dtype)
    indptr, indices = _lists(batch, H, live, capacity, dev, gen)
    q = torch.randn(batch, Hq, D, generator=gen).to(dev, dtype)
    sm = 1 / math.sqrt(D)
    got = ra.ragged_decode_attention(q, k_slots, v_slots, indptr, indices, sm)
    want = k["ragged_attention_torch"].ragged_decode_attention_torch(q, k_slots, v_slots, indptr, indices, sm)
    err = (got.float() - want.float()).abs().max().item()
    t_tri = _time(lambda: ra.ragged_decode_attention(q, k_slots, v_slots, indptr, indices, sm), reps)
    kd = k_slots[indices.long()].view(batch, H, live, D)
    vd = v_slots[indices.long()].view(batch, H, live, D)
    qd = q.view(batch, Hq, 1, D)
    t_sdpa = _time(lambda: F.scaled_dot_product_attention(qd, kd, vd, scale=sm, enable_gqa=True), reps)
    moved = 2 * batch * H * live * D * k_slots.element_size() + indices.numel() * 4
    row = dict(kernel="decode", shape=out["shape"], batch=batch, live=live, max_abs_err=err,
               triton_us=t_tri * 1e6, sdpa_dense_us=t_sdpa * 1e6, triton_vs_sdpa=t_tri / t_sdpa,
               triton_gbps=moved / t_tri / 1e9)
    row.update(_flashinfer(k, q, k_slots, v_slots, indptr, indices, torch.ones(batch), sm, want, reps))
    out["rows"].append(row)
    print(json.dumps(row), flush=True)


def _flashinfer(k, q, k_slots, v_slots, indptr, indices, q_lens, sm, want, reps) -> dict:
    """The same lists through `--evict-kernel flashinfer`'s adapter (FlashInfer's paged kernel,
    each (request, KV head) a sequence with its query group, page size 1): error against the
    torch twin and time per call; or why it did not run."""
    fl = k["flashinfer_lists"]
    why = fl.flashinfer_available()
    if why is not None:
        return {"flashinfer": f"not run: {why}"}
    try:
        H = (indptr.numel() - 1) // q_lens.numel()
        fi = fl.FlashInferLists(1, q.shape[1], H, q.device)
        fi.begin_step(indptr.cpu().long(), indices, q_lens.long())
        got = fi.run(0, q, k_slots, v_slots, sm)
        err = (got.float() - want.float()).abs().max().item()
        return {"flashinfer_max_abs_err": err,
                "flashinfer_us": _time(lambda: fi.run(0, q, k_slots, v_slots, sm), reps) * 1e6}
    except Exception as e:  # an API that moved: say so in the table
        return {"flashinfer": f"failed: {type(e).__name__}: {str(e)[:120]}"}


def check_extend(k, shape, chunk, live, dtype, dev, reps, out):
    import torch
    import torch.nn.functional as F

    ra = k["ragged_attention"]
    H, Hq, D = shape["kv_heads"], shape["q_heads"], shape["head_dim"]
    gen = torch.Generator().manual_seed(1)
    capacity = H * (live + chunk) + 1024
    k_slots = torch.randn(capacity, D, generator=gen).to(dev, dtype)
    v_slots = torch.randn(capacity, D, generator=gen).to(dev, dtype)
    indptr, indices = _lists(1, H, live + chunk, capacity, dev, gen)
    slot_pos = torch.zeros(capacity, dtype=torch.int64, device=dev)
    for h in range(H):  # positions 0..live+chunk-1 along each list
        seg = indices[indptr[h]:indptr[h + 1]].long()
        slot_pos[seg] = torch.arange(seg.numel(), device=dev)
    q = torch.randn(chunk, Hq, D, generator=gen).to(dev, dtype)
    q_pos = torch.arange(live, live + chunk, device=dev)
    q_req = torch.zeros(chunk, dtype=torch.int64, device=dev)
    sm = 1 / math.sqrt(D)
    args = (q, q_pos, q_req, k_slots, v_slots, slot_pos, indptr, indices, sm)
    # positions run along each list, as in the live lists: tiles stop at their last visible key
    got = ra.ragged_extend_attention(*args, num_kv_heads=H, positions_sorted=True)
    want = k["ragged_attention_torch"].ragged_extend_attention_torch(*args, num_kv_heads=H)
    err = (got.float() - want.float()).abs().max().item()
    t_tri = _time(lambda: ra.ragged_extend_attention(*args, num_kv_heads=H, positions_sorted=True),
                  reps)
    n = live + chunk
    kd = k_slots[indices.long()].view(1, H, n, D)
    vd = v_slots[indices.long()].view(1, H, n, D)
    qd = q.transpose(0, 1).unsqueeze(0)
    mask = torch.arange(n, device=dev)[None, :] <= q_pos[:, None]
    t_sdpa = _time(lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=sm,
                                                          enable_gqa=True), reps)
    row = dict(kernel="extend", shape=out["shape"], chunk=chunk, live=live, max_abs_err=err,
               triton_us=t_tri * 1e6, sdpa_dense_us=t_sdpa * 1e6, triton_vs_sdpa=t_tri / t_sdpa)
    row.update(_flashinfer(k, q, k_slots, v_slots, indptr, indices, torch.tensor([chunk]), sm,
                           want, reps))
    out["rows"].append(row)
    print(json.dumps(row), flush=True)


def check_metadata(k, shape, batch, live, dev, reps, out):
    import torch

    li = k["live_indices"]
    L, H = shape["layers"], shape["kv_heads"]
    P = 16
    pages_per_row = -(-live // P)
    rows = batch + 1
    arena = torch.randint(0, 1 << 30, (rows * pages_per_row, L * H, P), dtype=torch.int32, device=dev)
    row_pages = torch.arange(rows * pages_per_row, dtype=torch.int32, device=dev).view(rows, pages_per_row)
    lens = torch.randint(live // 2, live + 1, (rows, L * H), dtype=torch.int32, device=dev)
    batch_rows = torch.arange(1, rows, device=dev)
    bound = rows * L * H * live
    got = li.live_indices(arena, row_pages, lens, batch_rows, L, max_entries=bound)
    want = li.live_indices_reference(arena, row_pages, lens, batch_rows, L, max_entries=bound)
    ok = torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    t_tri = _time(lambda: li.live_indices(arena, row_pages, lens, batch_rows, L, max_entries=bound), reps)
    t_ref = _time(lambda: li.live_indices_reference(arena, row_pages, lens, batch_rows, L,
                                                    max_entries=bound), reps)
    row = dict(kernel="live_indices", shape=out["shape"], batch=batch, live=live, equal=ok,
               triton_us=t_tri * 1e6, torch_us=t_ref * 1e6)
    out["rows"].append(row)
    print(json.dumps(row), flush=True)


def check_store_and_select(k, shape, tokens, dtype, dev, out):
    import torch

    hs, sel = k["head_store"], k["select"]
    H, D = shape["kv_heads"], shape["head_dim"]
    gen = torch.Generator().manual_seed(2)
    cap = tokens * H + 64
    bufs = lambda: (torch.zeros(cap, D, dtype=dtype, device=dev), torch.zeros(cap, D, dtype=dtype, device=dev),
                    torch.zeros(cap, device=dev), torch.full((cap,), -1, dtype=torch.int64, device=dev))
    kk = torch.randn(tokens, H, D, generator=gen).to(dev, dtype)
    lb = -torch.rand(tokens, H, generator=gen).to(dev)
    pos = torch.arange(tokens, device=dev)
    loc = torch.randperm(cap, generator=gen)[: tokens * H].view(tokens, H).to(dev)
    a, b = bufs(), bufs()
    hs.store_head_slots(*a, kk, kk, lb, pos, loc)
    hs.store_head_slots_reference(*b, kk, kk, lb, pos, loc)
    store_ok = all(torch.equal(x, y) for x, y in zip(a, b))
    scores = torch.randn(tokens * H, generator=gen).to(dev)
    budget = tokens * H // 3
    th = sel.topk_threshold(scores, budget)
    th_ref = sel.topk_threshold_reference(scores, budget)
    select_ok = torch.equal(th[0], th_ref[0]) and torch.equal(th[1], th_ref[1])
    row = dict(kernel="store+select", shape=out["shape"], tokens=tokens, store_equal=store_ok,
               select_equal=select_ok)
    out["rows"].append(row)
    print(json.dumps(row), flush=True)


def check_keep_top(shape, batch, live, dev, reps, out):
    """The evictor's selection (eviction.evictor.keep_top): one k-th value per request over exact
    int64 (score, tie) keys, i.e. torch.kthvalue, which on CUDA is PyTorch's per-slice radix
    select (one launch for every request). Timed against the Triton float32 radix select run
    once per request, at an eviction of `batch` requests holding M + B entries per list."""
    import torch

    sel = _kernels()["select"]
    L, H = shape["layers"], shape["kv_heads"]
    N = L * H * live
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(batch, N, generator=gen).to(dev)
    bits = scores.view(torch.int32).long()
    order = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # orders like the float
    key = (order << 32) - torch.arange(N, device=dev)
    keep = N * 4 // 5
    t_kth = _time(lambda: torch.kthvalue(key, N - keep + 1, dim=1), reps)
    t_tri = _time(lambda: [sel.topk_threshold(scores[r], keep) for r in range(batch)], reps)
    kth = torch.kthvalue(key, N - keep + 1, dim=1, keepdim=True).values
    kept = (key >= kth).sum(1)
    row = dict(kernel="keep_top", shape=out["shape"], batch=batch, entries_per_request=N,
               equal=bool((kept == keep).all()), kthvalue_us=t_kth * 1e6,
               triton_select_per_request_us=t_tri * 1e6)
    out["rows"].append(row)
    print(json.dumps(row), flush=True)


def check_graph_replay(k, shape, batch, live, dtype, dev, out):
    """A decode step as the backend captures it: per layer the head-slot store and the decode
    kernel, reading the step's new head-slots, indptr (all layers, absolute offsets) and indices
    from static buffers. Captured once, replayed after new metadata and inputs are copied into
    the buffers; the replay must equal an eager run on the same inputs."""
    import torch

    ra, hs = k["ragged_attention"], k["head_store"]
    L, H, Hq, D = shape["layers"], shape["kv_heads"], shape["q_heads"], shape["head_dim"]
    cap = batch * H * (live + 1) * L + 64
    kv = [torch.zeros(cap, D, dtype=dtype, device=dev) for _ in range(2)]
    lb, pos = torch.zeros(cap, device=dev), torch.zeros(cap, dtype=torch.long, device=dev)
    seqs = batch * H
    s_indptr = torch.zeros(L * seqs + 1, dtype=torch.long, device=dev)
    s_indices = torch.full((cap,), -1, dtype=torch.int32, device=dev)
    s_slots = torch.full((batch, L, H), -1, dtype=torch.long, device=dev)
    s_q = torch.zeros(L, batch, Hq, D, dtype=dtype, device=dev)
    s_k = torch.zeros(L, batch, H, D, dtype=dtype, device=dev)
    s_pos = torch.zeros(batch, dtype=torch.long, device=dev)
    s_lb = torch.zeros(batch, H, device=dev)
    sm = 1 / math.sqrt(D)

    def step():
        outs = []
        for l in range(L):
            hs.store_head_slots(kv[0], kv[1], lb, pos, s_k[l], s_k[l], s_lb, s_pos, s_slots[:, l])
            ptr = s_indptr[l * seqs:(l + 1) * seqs + 1]
            outs.append(ra.ragged_decode_attention(s_q[l], kv[0], kv[1], ptr, s_indices, sm))
        return torch.stack(outs)

    def load(seed):
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(cap, generator=g)[: L * seqs * (live + 1)].to(dev)
        new = perm[: batch * L * H].view(batch, L, H)
        old = perm[batch * L * H:].view(L, batch, H, live)
        kv[0][old.reshape(-1)] = torch.randn(old.numel(), D, generator=g).to(dev, dtype)
        kv[1][old.reshape(-1)] = torch.randn(old.numel(), D, generator=g).to(dev, dtype)
        lists = torch.cat([old, new.permute(1, 0, 2)[..., None]], -1)  # [L, batch, H, live + 1]
        s_indices[: lists.numel()] = lists.reshape(-1).to(torch.int32)
        s_indptr.copy_(torch.arange(0, L * seqs * (live + 1) + 1, live + 1, device=dev))
        s_slots.copy_(new)
        s_q.copy_(torch.randn(s_q.shape, generator=g).to(dev, dtype))
        s_k.copy_(torch.randn(s_k.shape, generator=g).to(dev, dtype))

    load(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up: compile every kernel outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_static = step()
    load(1)
    graph.replay()
    torch.cuda.synchronize()
    replayed = o_static.clone()
    load(1)
    eager = step()
    err = (replayed.float() - eager.float()).abs().max().item()
    t_graph = _time(graph.replay, 20)
    t_eager = _time(step, 20)
    row = dict(kernel="graph_replay", shape=out["shape"], batch=batch, live=live, max_abs_err=err,
               graph_us=t_graph * 1e6, eager_us=t_eager * 1e6, eager_vs_graph=t_eager / t_graph)
    out["rows"].append(row)
    print(json.dumps(row), flush=True)


def copy_bandwidth_gbps(dev) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    x = torch.empty(1 << 28, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    t = _time(lambda: y.copy_(x), 20)
    return 2 * x.numel() / t / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, TRITON_INTERPRET=1)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch

    dev = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    k = _kernels()
    shapes = SMOKE if args.smoke else SHAPES
    dtype = torch.float32 if args.smoke else torch.bfloat16
    reps = 1 if args.smoke else 20
    out = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
           "copy_gbps": copy_bandwidth_gbps(dev), "rows": []}
    for name, shape in shapes.items():
        out["shape"] = name
        cases = [(2, 40)] if args.smoke else [(1, 4096), (16, 2048), (64, 1024)]
        for batch, live in cases:
            check_decode(k, shape, batch, live, dtype, dev, reps, out)
        for chunk, live in ([(8, 24)] if args.smoke else [(512, 4096), (2048, 0)]):
            check_extend(k, shape, chunk, live, dtype, dev, reps, out)
        check_metadata(k, shape, 2 if args.smoke else 64, 20 if args.smoke else 1024, dev, reps, out)
        check_store_and_select(k, shape, 16 if args.smoke else 4096, dtype, dev, out)
        check_keep_top(shape, 2 if args.smoke else 16, 6 if args.smoke else 160, dev, reps, out)
        if dev == "cuda":  # CUDA graphs exist only there
            check_graph_replay(k, shape, 32, 256, dtype, dev, out)
    if out["copy_gbps"]:
        for row in out["rows"]:
            if "triton_gbps" in row:
                row["share_of_copy_bandwidth"] = row["triton_gbps"] / out["copy_gbps"]
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
