"""The `gptoss` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gptoss", description="gpt-oss models in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="write, load and run a tiny random checkpoint")
    info = sub.add_parser("info", help="describe a checkpoint folder without loading its weights")
    info.add_argument("path")
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from gptoss.demo import main as demo

        return demo(rest)
    if args.command == "info":
        from gptoss.io import open_checkpoint

        kind, cfg, index, folder = open_checkpoint(args.path)
        size = sum(i.end - i.start for i in index.infos.values())
        print(f"{folder}: {kind} layout, {len(index.files)} file(s), {len(index.infos)} tensors, "
              f"{size / 2**30:.2f} GiB")
        print(cfg)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
