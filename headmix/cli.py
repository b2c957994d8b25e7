"""The ``headmix`` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="headmix", description="Multi-head attention whose heads work together.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="build the four attention layers and check them against each other")
    demo.add_argument("--dim", type=int, default=256, help="model width (default: %(default)s)")
    demo.add_argument("--heads", type=int, default=8, help="number of heads (default: %(default)s)")
    demo.add_argument("--seq", type=int, default=512, help="sequence length (default: %(default)s)")
    demo.add_argument("--batch", type=int, default=2, help="batch size (default: %(default)s)")
    demo.set_defaults(run=_run_demo)

    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except ValueError as error:  # bad user input: one clear line, no traceback
        print(f"headmix {args.command}: error: {error}", file=sys.stderr)
        return 2


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(dim=args.dim, num_heads=args.heads, seq_len=args.seq, batch=args.batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
