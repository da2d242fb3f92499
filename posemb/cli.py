"""The ``posemb`` command line. Each subcommand lives in its own module with ``add_parser``."""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute a subcommand (each defines ``add_parser(subparsers)``).
SUBCOMMAND_MODULES = [
    "posemb.demo",
    "posemb.lab.study",
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
    except (ValueError, TypeError, FileNotFoundError) as error:
        # Bad input: one clear line, not a traceback.
        print(f"posemb {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nposemb {args.command}: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    _code = main()
    from posemb.lab.train import exit_now, launched_by_torchrun
    if launched_by_torchrun():  # see exit_now: gloo could abort a finished worker at exit
        exit_now(_code)
    raise SystemExit(_code)
