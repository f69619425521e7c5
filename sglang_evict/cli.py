"""The `sglang-evict` command.

    sglang-evict model [--force]     materialise the default model, print its folder
    sglang-evict serve [SGLANG ARGS] SGLang's server with this plugin (see serve.py)
    sglang-evict demo  [SGLANG ARGS] start a server on loopback, send real requests, stop it
    sglang-evict plan  --gpu-memory 80GiB|--kv-tokens N --context C --budget M [--model DIR]
                                     concurrent requests that fit, with and without eviction
    sglang-evict train --config FILE.json|toml [--FIELD VALUE ...] [--resume] [--export-only]
                                     train retention gates on a frozen model (see training/)

Heavy imports (torch, sglang) happen inside the subcommands so `--help` and the start-up
checks answer at once.
"""

from __future__ import annotations

import argparse
import sys

USAGE = __doc__.split("\n\n")[1]


def _model(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sglang-evict model")
    parser.add_argument("--force", action="store_true", help="rebuild even if a verified copy exists")
    args = parser.parse_args(argv)
    from sglang_evict import default_model

    try:
        result = default_model.materialise(force=args.force)
    except default_model.DefaultModelError as e:
        print(f"sglang-evict: error: {e}", file=sys.stderr)
        return 2
    state = "written" if result.created else "verified"
    print(f"{result.path} ({state}, gguf sha256 {result.gguf_sha256[:12]})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("usage:\n" + USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "model":
        return _model(rest)
    if command == "serve":
        from sglang_evict import serve

        return serve.main(rest)
    if command == "demo":
        from sglang_evict import demo

        return demo.main(rest)
    if command == "plan":
        from sglang_evict import plan

        return plan.main(rest)
    if command == "train":
        from sglang_evict import training as train

        return train.main(rest)
    print(f"sglang-evict: error: unknown command {command!r}\nusage:\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
