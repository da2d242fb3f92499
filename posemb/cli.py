"""The ``posemb`` command line. Each subcommand lives in its own module with ``add_parser``.

Errors the user can act on (bad arguments, unusable paths, a full disk, a diverged run, a damaged
file) are printed as one line, ``posemb COMMAND: error: ...``, naming the argument or the file;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from posemb.lab.distributed import exit_process
from posemb.lab.errors import exit_code, user_message

# Modules that contribute a subcommand (each defines ``add_parser(subparsers)``).
SUBCOMMAND_MODULES = [
    "posemb.demo",
    "posemb.lab.study_command",
    "posemb.lab.algorithmic.command",
    "posemb.lab.extend.command",
    "posemb.plots",
    "posemb.bench",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posemb", description="Positional encodings for transformers: "
                                     "schemes, studies, plots and benchmarks.")
    from posemb import __version__
    parser.add_argument("--version", action="version", version=f"posemb {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        result = args.handler(args)
    except KeyboardInterrupt:
        print(f"\nposemb {args.command}: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - user_message decides; anything else is re-raised
        line = user_message(error)
        if line is None:
            raise
        print(f"posemb {args.command}: error: {line}", file=sys.stderr)
        return exit_code(error)
    return int(result or 0)


if __name__ == "__main__":
    exit_process(main())
