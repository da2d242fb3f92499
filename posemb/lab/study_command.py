"""The command line of the study: ``posemb study`` (:func:`add_parser`, registered by
``posemb.cli``). It turns arguments into a :class:`~posemb.lab.study.StudyConfig` and runs it;
the command line prints the errors (``posemb.cli.main``)."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from posemb._validation import check_float
from posemb.lab.distributed import dist_info, shutdown_distributed
from posemb.lab.evaluate import ROPE_VARIANTS
from posemb.lab.parallel_runs import AUTO
from posemb.lab.progress import format_seconds
from posemb.lab.study import PROFILES, TASKS, StudyConfig, make_config, run_study


def _int_list(text: str, name: str) -> tuple[int, ...]:
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            values.append(int(part))
        except ValueError:
            raise ValueError(f"{name} must be a comma-separated list of integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{name} must not be empty")
    return tuple(values)


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _jobs(text: str) -> int | str:
    """``--jobs``: a positive integer or ``auto``."""
    if text.strip() == AUTO:
        return AUTO
    try:
        jobs = int(text)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise ValueError(f"--jobs must be a positive integer or {AUTO!r}, got {text!r}")
    return jobs


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    overrides: dict = {"out": args.out, "task": args.task, "data": args.data, "device": args.device,
                       "threads": args.threads, "jobs": _jobs(args.jobs), "progress": not args.no_progress, "force": args.force}
    if args.schemes is not None:
        overrides["schemes"] = _name_list(args.schemes)
        if not overrides["schemes"]:
            raise ValueError(f"--schemes must name at least one scheme, got {args.schemes!r}")
    if args.seeds is not None and args.seed is not None:
        raise ValueError("give either --seed S or --seeds A,B, not both")
    if args.seeds is not None:
        overrides["seeds"] = _int_list(args.seeds, "--seeds")
    elif args.seed is not None:
        overrides["seeds"] = (args.seed,)
    if args.eval_lengths is not None:
        overrides["eval_lengths"] = _int_list(args.eval_lengths, "--eval-lengths")
    if args.rope_variants is not None:
        overrides["rope_variants"] = () if args.rope_variants.strip() in ("", "none") else _name_list(args.rope_variants)
    if args.checkpoint_every is not None:
        overrides["checkpoint_every_s"] = check_float("--checkpoint-every", args.checkpoint_every, minimum=0.0)
    for name in ("steps", "train_length", "batch_size", "dim", "depth", "heads", "lr", "eval_tokens"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    config = make_config(args.profile, **overrides)
    return config.validate()


def config_command(config: StudyConfig) -> str:
    """The explicit command line that reproduces ``config`` (every option spelled out)."""
    parts = ["posemb", "study", "--out", config.out, "--task", config.task, "--profile", config.profile,
             "--schemes", ",".join(config.schemes), "--seeds", ",".join(map(str, config.seeds)),
             "--steps", str(config.train.steps), "--train-length", str(config.train.train_length),
             "--batch-size", str(config.train.batch_size), "--dim", str(config.model.dim),
             "--depth", str(config.model.depth), "--heads", str(config.model.heads), "--lr", repr(config.train.lr),
             "--eval-lengths", ",".join(map(str, config.eval_lengths)), "--eval-tokens", str(config.eval_tokens),
             "--rope-variants", ",".join(config.rope_variants) or "none", "--device", config.device]
    if config.data is not None:
        parts += ["--data", config.data]
    if config.threads is not None:
        parts += ["--threads", str(config.threads)]
    parts += ["--jobs", str(config.jobs)]
    return " ".join(shlex.quote(p) for p in parts)


def _handle(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    try:
        result = run_study(config, command=config_command(config))
        if dist_info().is_main:
            print(f"report: {Path(result['out']) / 'report.md'} (wall time {format_seconds(result['wall_seconds'])}; "
                  f"trained {result['trained_now']}, reused {result['reused']})")
    finally:
        shutdown_distributed(wait=sys.exc_info()[0] is None)
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "study", help="train one small LM per scheme, evaluate by length, write the comparison report",
        description="Train one small decoder-only LM per positional scheme on the Python standard library's "
                    "source (or --data), evaluate at the training length and 2x-16x it, and write report.md, "
                    "results.csv, results.json and plots. Rerun the same command to resume after an interruption.")
    parser.add_argument("--out", default="study-report", help="report directory (default ./study-report)")
    parser.add_argument("--schemes", default=None, help="comma-separated rows: registered schemes, hybrids (irope), SCHEME+randomized (trained with "
                             "randomized positions); default: every registered scheme but those in OPT_IN_SCHEMES, "
                             "see docs/study.md")
    parser.add_argument("--task", default="lm", choices=TASKS,
                        help="lm: next-byte loss by length (default); passkey: key retrieval by length and depth")
    parser.add_argument("--data", default=None, help="a text file or directory (default: the stdlib's .py files)")
    parser.add_argument("--profile", default="quick", choices=sorted(PROFILES),
                        help="quick: about 15 minutes on 2 CPU cores (default); full: larger model, longer, for a GPU")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (profile default)")
    parser.add_argument("--train-length", type=int, default=None, help="training sequence length L_train")
    parser.add_argument("--eval-lengths", default=None,
                        help="comma-separated evaluation lengths, each >= L_train (default L_train x 1,2,4,8,16)")
    parser.add_argument("--eval-tokens", type=int, default=None,
                        help="validation bytes scored at every length (profile default)")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch size")
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None, help="one seed (default 0)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1: spread is reported")
    parser.add_argument("--rope-variants", default=None,
                        help=f"inference-time RoPE scalings to evaluate (default {','.join(ROPE_VARIANTS)}; 'none')")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of each run (default: 1 with --jobs auto on a CPU or several --jobs, "
                             "so that the numbers do not depend on the machine's CPU count; with --jobs 1, "
                             "torch's own)")
    parser.add_argument("--jobs", default=AUTO, metavar="N|auto",
                        help="runs trained at once, each in a worker process (default auto: one per CPU on a CPU "
                             "device, one on a GPU or under torchrun); 1: one after another in this process. "
                             "The numbers depend on --threads, not on --jobs")
    parser.add_argument("--checkpoint-every", type=float, default=None, metavar="SECONDS",
                        help="seconds between training checkpoints (default 30; one is always written at the end)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or log lines")
    parser.add_argument("--force", action="store_true",
                        help="replace report files in --out that posemb did not write, or wrote for another "
                             "configuration (finished runs are still reused, never rewritten)")
    parser.set_defaults(handler=_handle)
