"""``posemb tasks``: the algorithmic length-generalization suite from the command line.

A subcommand of its own (not ``posemb study --task ...``): its knobs (tasks, instance lengths, test
factor, scheme specs with ``+randomized``) are not the language-model study's.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from posemb._validation import check_float
from posemb.lab.algorithmic.suite import PROFILES, SuiteConfig, make_config, run_suite
from posemb.lab.algorithmic.tasks import task_names
from posemb.lab.progress import format_seconds
from posemb.lab.distributed import dist_info, shutdown_distributed


def _names(text: str, option: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise ValueError(f"{option} must name at least one, got {text!r}")
    return names


def _ints(text: str, option: str) -> tuple[int, ...]:
    values = []
    for part in _names(text, option):
        try:
            values.append(int(part))
        except ValueError:
            raise ValueError(f"{option} must be a comma-separated list of integers, got {text!r}") from None
    return tuple(values)


def config_from_args(args: argparse.Namespace) -> SuiteConfig:
    overrides: dict = {"out": args.out, "device": args.device, "threads": args.threads,
                       "progress": not args.no_progress, "force": args.force}
    if args.tasks is not None:
        overrides["tasks"] = tuple(task_names()) if args.tasks.strip() == "all" else _names(args.tasks, "--tasks")
    if args.schemes is not None:
        overrides["schemes"] = _names(args.schemes, "--schemes")
    if args.seeds is not None:
        overrides["seeds"] = _ints(args.seeds, "--seeds")
    if args.checkpoint_every is not None:
        overrides["checkpoint_every_s"] = check_float("--checkpoint-every", args.checkpoint_every, minimum=0.0)
    for name in ("max_train_length", "test_factor", "test_samples", "position_range", "steps", "batch_size",
                 "dim", "depth", "heads", "lr"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    return make_config(args.profile, **overrides).validate()


def config_command(config: SuiteConfig) -> str:
    """The explicit command line that reproduces ``config``."""
    parts = ["posemb", "tasks", "--out", config.out, "--profile", config.profile, "--tasks", ",".join(config.tasks),
             "--schemes", ",".join(config.schemes), "--seeds", ",".join(map(str, config.seeds)),
             "--max-train-length", str(config.max_train_length), "--test-factor", str(config.test_factor),
             "--test-samples", str(config.test_samples), "--steps", str(config.train.steps),
             "--batch-size", str(config.train.batch_size), "--dim", str(config.model.dim),
             "--depth", str(config.model.depth), "--heads", str(config.model.heads), "--lr", repr(config.train.lr),
             "--device", config.device]
    if config.position_range is not None:
        parts += ["--position-range", str(config.position_range)]
    if config.threads is not None:
        parts += ["--threads", str(config.threads)]
    return " ".join(shlex.quote(p) for p in parts)


def _handle(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    try:
        result = run_suite(config, command=config_command(config))
        if dist_info().is_main:
            print(f"report: {Path(result['out']) / 'report.md'} (wall time {format_seconds(result['wall_seconds'])}; "
                  f"trained {result['trained_now']}, reused {result['reused']})")
    finally:
        shutdown_distributed(wait=sys.exc_info()[0] is None)
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "tasks", help="algorithmic length generalization: train on short instances, score on longer ones",
        description="Train one small decoder-only transformer per (task, scheme, seed) on generated algorithmic "
                    "tasks (copy, reverse, addition, parity, sort, ...) with instance lengths 1..L, score exact "
                    "match and per-token accuracy at lengths 1..k*L, and write report.md, results.csv, "
                    "results.json and accuracy_<task>.png. Rerun the same command to resume.")
    parser.add_argument("--out", default="tasks-report", help="report directory (default ./tasks-report)")
    parser.add_argument("--profile", default="quick", choices=sorted(PROFILES),
                        help="quick: default subset, at most 15 min on 2 CPU cores (default); full: every task and "
                             "scheme, 3 seeds, for a GPU; smoke: seconds, tests the machinery only")
    parser.add_argument("--tasks", default=None, help=f"comma-separated, or 'all' ({', '.join(task_names())})")
    parser.add_argument("--schemes", default=None,
                        help="comma-separated scheme specs: a scheme name, NAME+randomized (randomized positions "
                             "in training), rope+linear|ntk|dynamic|yarn|llama3 (test-time scaling of the rope run)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (profile default; 2+ give a spread)")
    parser.add_argument("--max-train-length", type=int, default=None, metavar="L",
                        help="longest training instance (instance lengths 1..L)")
    parser.add_argument("--test-factor", type=int, default=None, metavar="K", help="test lengths 1..K*L")
    parser.add_argument("--test-samples", type=int, default=None, help="test instances per length")
    parser.add_argument("--position-range", type=int, default=None, metavar="N",
                        help="randomized positions are drawn from [0, N) (default: the longest test sequence)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--checkpoint-every", type=float, default=None, metavar="SECONDS",
                        help="seconds between training checkpoints (default 30; one is always written at the end)")
    parser.add_argument("--force", action="store_true",
                        help="replace report files in --out that posemb did not write or wrote for another configuration")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or log lines")
    parser.set_defaults(handler=_handle)
