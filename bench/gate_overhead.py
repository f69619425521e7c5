"""Cost of computing and storing retention scores, measured side by side in one run.

    .venv/bin/python bench/gate_overhead.py server   # two real servers, default model, CPU
    .venv/bin/python bench/gate_overhead.py shapes   # gate + store at a 4B-class shape

`server`: a vanilla server and a server with gates attached (the head-slot backend, eviction
off: policy none) run at the same time; rounds alternate between them, so machine noise hits both alike. Decode time per token
is (t(1 + n tokens) - t(1 token)) / n for the same prompt, taken as the median over rounds.

`shapes`: one decode step of a Qwen3-4B-like model (36 layers, hidden 2560, 32 query / 8 KV
heads, head_dim 128, MLP 9728) as its dense matmuls plus the KV store, with and without the
gate MLP and the one-pass K/V/log-beta/position store into head-slots. Runs on CUDA when present (the
Triton store kernel compiled for real), else on CPU with the torch reference store.

Results go to bench/results/gate_overhead_<mode>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import client

RESULTS = Path(__file__).resolve().parent / "results"


def _timed_generate(url: str, input_ids: list[int], n: int) -> float:
    start = time.perf_counter()
    client.generate(url, input_ids, n, timeout=600)
    return time.perf_counter() - start


def bench_server(args) -> dict:
    import tempfile

    from tqdm import tqdm
    from transformers import AutoTokenizer

    from sglang_evict import default_model
    from sglang_evict.gates.checkpoint import save_gates
    from sglang_evict.gates.modules import GateConfig, RetentionGates
    from sglang_evict.server_process import ServerProcess

    model_path = default_model.resolve()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    hf_config = json.loads((model_path / "config.json").read_text())
    gates_path = Path(tempfile.mkdtemp()) / "gates.safetensors"
    save_gates(gates_path, RetentionGates(GateConfig.from_hf_config(hf_config), seed=0))

    prompt = "Write a long story about a lighthouse keeper and the sea. " * 8
    ids = tokenizer(prompt)["input_ids"]
    common = ["--disable-radix-cache"]  # every round recomputes the prompt on both servers
    servers = {
        "vanilla": ServerProcess(common),
        "gates": ServerProcess(common + ["--evict-gates", str(gates_path)]),
    }
    per_token: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for name, server in servers.items():
            print(f"starting {name} server ...", flush=True)
            server.start().wait_ready()
        for url in (s.url for s in servers.values()):  # warm-up
            _timed_generate(url, ids, args.new_tokens)
        for _ in tqdm(range(args.rounds), desc="rounds"):
            for name, server in servers.items():
                t1 = _timed_generate(server.url, ids, 1)
                tn = _timed_generate(server.url, ids, 1 + args.new_tokens)
                per_token[name].append((tn - t1) / args.new_tokens)
    finally:
        for server in servers.values():
            server.stop()
    med = {name: statistics.median(v) for name, v in per_token.items()}
    return {
        "mode": "server",
        "model": str(model_path),
        "device": "cpu",
        "prompt_tokens": len(ids),
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "decode_s_per_token_median": med,
        "decode_s_per_token_all": per_token,
        "ratio_gates_over_vanilla": med["gates"] / med["vanilla"],
    }


def bench_shapes(args) -> dict:
    import torch

    from sglang_evict.gates.modules import GateConfig, RetentionGates
    from sglang_evict.kernels import head_store

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    L, d, hq, hkv, hd, ffn = 36, 2560, 32, 8, 128, 9728
    B, slots = args.batch, args.slots
    store = head_store.store_head_slots if cuda else head_store.store_head_slots_reference
    torch.manual_seed(0)
    w = {
        "qkv": torch.randn(d, (hq + 2 * hkv) * hd, device=device, dtype=dtype) * 0.02,
        "o": torch.randn(hq * hd, d, device=device, dtype=dtype) * 0.02,
        "gate_up": torch.randn(d, 2 * ffn, device=device, dtype=dtype) * 0.02,
        "down": torch.randn(ffn, d, device=device, dtype=dtype) * 0.02,
    }
    gates = RetentionGates(GateConfig(hidden_size=d, num_layers=L, num_kv_heads=hkv), device=device)
    # head-slots: one row per (token, KV head); the batch's tokens own random ones
    k_slots = torch.zeros(slots * hkv, hd, device=device, dtype=dtype)
    v_slots = torch.zeros_like(k_slots)
    lb_slots = torch.zeros(slots * hkv, device=device)
    pos_slots = torch.zeros(slots * hkv, dtype=torch.long, device=device)
    x = torch.randn(B, d, device=device, dtype=dtype)
    slot = torch.randperm(slots * hkv, device=device)[:B * hkv].view(B, hkv)
    positions = torch.arange(B, device=device) + 1000

    def step(with_gates: bool):
        h = x
        for layer in range(L):
            qkv = h @ w["qkv"]
            k = qkv[:, hq * hd:(hq + hkv) * hd].view(B, hkv, hd)
            v = qkv[:, (hq + hkv) * hd:].view(B, hkv, hd)
            if with_gates:
                log_beta = gates.forward_layer(layer, h)
                store(k_slots, v_slots, lb_slots, pos_slots, k, v, log_beta, positions, slot)
            else:  # a plain store: an index copy of K and V
                k_slots[slot.view(-1)] = k.reshape(-1, hd)
                v_slots[slot.view(-1)] = v.reshape(-1, hd)
            h = h + qkv[:, : hq * hd] @ w["o"]
            g, u = (h @ w["gate_up"]).chunk(2, dim=-1)
            h = h + (torch.nn.functional.silu(g) * u) @ w["down"]
        return h

    def timed(with_gates: bool) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.iters):
            step(with_gates)
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.iters

    with torch.no_grad():
        timed(False), timed(True)  # warm-up and compile
        samples = {"plain": [], "gates": []}
        for _ in range(args.rounds):  # interleaved: noise hits both alike
            samples["plain"].append(timed(False))
            samples["gates"].append(timed(True))
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "mode": "shapes",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "dtype": str(dtype),
        "shape": {"layers": L, "hidden": d, "q_heads": hq, "kv_heads": hkv, "head_dim": hd,
                  "ffn": ffn, "batch": B, "pool_slots": slots},
        "store": store.__name__,
        "step_s_median": med,
        "step_s_all": samples,
        "overhead": med["gates"] / med["plain"] - 1.0,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("server")
    s.add_argument("--rounds", type=int, default=5)
    s.add_argument("--new-tokens", type=int, default=32)
    g = sub.add_parser("shapes")
    g.add_argument("--batch", type=int, default=8)
    g.add_argument("--slots", type=int, default=65536)
    g.add_argument("--iters", type=int, default=5)
    g.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    result = bench_server(args) if args.mode == "server" else bench_shapes(args)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"gate_overhead_{args.mode}.json"
    out.write_text(json.dumps(result, indent=2))
    summary = {k: v for k, v in result.items() if not k.endswith("_all")}
    print(json.dumps(summary, indent=2))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
