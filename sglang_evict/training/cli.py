"""`sglang-evict train`: the command line of a training run."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from sglang_evict.training.config import TrainConfig, TrainConfigError, load_config
from sglang_evict.training.trainer import export_checkpoint, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sglang-evict train",
        description="Train retention gates (TrimKV / DBTrimKV) on a frozen Hugging Face model.",
    )
    parser.add_argument("--config", help="a .json or .toml file of TrainConfig fields")
    parser.add_argument("--resume", action="store_true", help="continue from out_dir/checkpoint.pt")
    parser.add_argument(
        "--export-only", action="store_true",
        help="write the gates of out_dir/checkpoint.pt (to out_dir/gates.safetensors and --export) and exit",
    )
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "max_minutes":
            help_ = "stop cleanly (checkpoint + export) before this many minutes"
        else:
            help_ = f"(config field {f.name})"
        parser.add_argument(flag, dest=f.name, default=None, metavar="VALUE", help=help_)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if getattr(args, f.name) is not None
    }
    try:
        config = load_config(args.config, overrides)
        if args.export_only:
            for p in export_checkpoint(config):
                print(p)
            return 0
        result = train(config, resume=args.resume)
    except TrainConfigError as err:
        print(f"sglang-evict train: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in result.items() if k != "last"}, indent=2))
    if result["last"]:
        print(json.dumps(result["last"]))
    return 130 if result["status"] == "interrupted" else 0
