"""Gate training step time and loss parity, float32 vs bfloat16 autocast, in one run.

    .venv/bin/python bench/train_precision.py [--lengths 2048,4096] [--samples 3]
                     [--precisions fp32,autocast] [--config configs/train_smollm2_dbtrimkv_v2.toml]

For each length, the same training samples (the config's stream, indices drawn so that each
length gets `--samples` of its own) go through one `forward_backward` per precision, from the
same gates, with the frozen model's precision the only difference. Reported per (length,
precision): seconds per sequence (median), and against float32 on the same samples the loss
terms' relative difference and the cosine of the gates' gradients. The precisions alternate
per sample, so machine noise hits both alike. Nothing else should run beside it.

Results: bench/results/train_precision.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def _samples_by_length(data, lengths: list[int], per_length: int) -> dict[int, list[dict]]:
    found: dict[int, list[dict]] = {n: [] for n in lengths}
    index = 0
    while any(len(v) < per_length for v in found.values()):
        sample = data.sample(index)
        bucket = found.get(sample["length"])
        if bucket is not None and len(bucket) < per_length:
            bucket.append(sample)
        index += 1
    return found


def _grad_vector(gates) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in gates.parameters() if p.grad is not None])


def main() -> None:
    from sglang_evict.training.config import load_config
    from sglang_evict.training.loss import forward_backward
    from sglang_evict.training.trainer import Trainer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "train_smollm2_dbtrimkv_v2.toml"))
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--precisions", default="fp32,autocast",
                    help="the first is the reference of the parity columns")
    ap.add_argument("--out", default=str(RESULTS / "train_precision.json"))
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    precisions = args.precisions.split(",")

    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(args.config, {"out_dir": tmp, "lengths": lengths, "progress": False})
        trainer = Trainer(config)
        samples = _samples_by_length(trainer.data, lengths, args.samples)
        rows = []
        for length, batch in samples.items():
            per = {p: {"seconds": [], "loss": [], "kl": [], "ce": [], "cap": [], "grads": []}
                   for p in precisions}
            for sample in batch:
                ids = torch.tensor([sample["input_ids"]])
                for precision in precisions:
                    trainer.gates.zero_grad(set_to_none=True)
                    t0 = time.perf_counter()
                    out = forward_backward(trainer.model, trainer.attachment, ids, config,
                                           answer_start=sample["answer_start"],
                                           precision=precision)
                    per[precision]["seconds"].append(time.perf_counter() - t0)
                    for key in ("loss", "kl", "ce", "cap"):
                        per[precision][key].append(out.total if key == "loss" else getattr(out, key))
                    per[precision]["grads"].append(_grad_vector(trainer.gates))
            ref = per[precisions[0]]
            for precision in precisions:
                got = per[precision]
                row = {"length": length, "precision": precision, "samples": len(batch),
                       "seconds_median": statistics.median(got["seconds"]),
                       "seconds": got["seconds"]}
                for key in ("loss", "kl", "ce", "cap"):
                    row[key] = got[key]
                    row[f"{key}_rel_diff_max"] = max(
                        abs(a - b) / max(abs(b), 1e-12) for a, b in zip(got[key], ref[key]))
                row["grad_cosine_min"] = min(
                    float(torch.nn.functional.cosine_similarity(a, b, dim=0))
                    for a, b in zip(got["grads"], ref["grads"]))
                row["speedup_vs_reference"] = (statistics.median(ref["seconds"])
                                               / row["seconds_median"])
                rows.append(row)
                print(f"{length:5d} {precision:8s} {row['seconds_median']:7.1f} s/seq  "
                      f"x{row['speedup_vs_reference']:.2f}  loss rel diff <= "
                      f"{row['loss_rel_diff_max']:.2e}  grad cos >= {row['grad_cosine_min']:.4f}",
                      flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from sglang_evict.training.loss import cpu_has_bf16_matmul

    Path(args.out).write_text(json.dumps({
        "config": args.config, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_matmul": cpu_has_bf16_matmul(), "reference": precisions[0],
        "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
