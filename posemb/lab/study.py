"""``posemb study``: train one small LM per positional scheme, evaluate each at the training length
and at 2x, 4x, 8x, 16x it, and write the seed's comparison table rebuilt from measurements.

Layout of the output directory (``--out``, default ``./study-report``)::

    report.md  results.csv  results.json  ppl_vs_length.png  loss_by_position.png
    runs/<scheme>-seed<k>-<config hash>/checkpoint.pt   weights + optimizer + step (atomic)
                                       train.json      written once training finished
                                       eval-<hash>.json one entry per (label, length), written as each lands

Rerunning the same command after Ctrl-C or kill skips every finished run, resumes an unfinished
one from its last checkpoint, and re-evaluates only what is missing. The config hash in a run's
directory name covers everything that changes its weights (model, training, data, seed), so a
different ``--steps`` trains new runs instead of reusing the wrong ones.

Runs under ``torchrun`` too (``torchrun --nproc_per_node N -m posemb.cli study ...``): each run is
trained with DDP, evaluation windows are shared out over the ranks, rank 0 writes the files.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from posemb._validation import check_choice, check_float, check_int
from posemb.lab import passkey
from posemb.lab.checkpoint import atomic_write_json, load_checkpoint, read_json
from posemb.lab.data import RandomWindows, evaluation_chunks, load_corpus
from posemb.lab.evaluate import (ROPE_VARIANTS, lm_loss_at_length, passkey_at_length, rope_variant_model)
from posemb.lab.progress import StudyLog, format_seconds
from posemb.lab.report import write_report
from posemb.lab.train import (ModelConfig, TrainConfig, barrier, build_model, dist_info, init_distributed,
                              resolve_device, shutdown_distributed, train_model)
from posemb.registry import available, scheme_class

TASKS = ("lm", "passkey")
EVAL_FACTORS = (1, 2, 4, 8, 16)

#: ``quick`` fits the whole default study in 15 minutes on 2 CPU cores (docs/study.md says how it
#: was measured); ``full`` is a larger model trained longer, meant for a GPU.
PROFILES: dict[str, dict] = {
    "quick": dict(model=ModelConfig(dim=128, depth=3, heads=4),
                  train=TrainConfig(train_length=128, batch_size=32, steps=300, lr=2e-3, warmup_steps=30),
                  eval_tokens=32_768, eval_batch_tokens=8_192, passkey_samples=32),
    "full": dict(model=ModelConfig(dim=512, depth=8, heads=8),
                 train=TrainConfig(train_length=512, batch_size=64, steps=5000, lr=6e-4, warmup_steps=200),
                 eval_tokens=1_048_576, eval_batch_tokens=32_768, passkey_samples=100),
}


@dataclass
class StudyConfig:
    """Everything a study needs. Build one with :func:`make_config` (profile + overrides)."""

    out: str = "study-report"
    task: str = "lm"
    data: str | None = None
    schemes: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    profile: str = "quick"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_lengths: tuple[int, ...] = ()
    eval_tokens: int = 16_384
    eval_batch_tokens: int = 8_192
    passkey_samples: int = 32
    rope_variants: tuple[str, ...] = ROPE_VARIANTS
    device: str = "auto"
    threads: int | None = None
    progress: bool = True
    checkpoint_every_s: float = 30.0

    def validate(self) -> "StudyConfig":
        """Every check that can fail, before any training starts."""
        check_choice("task", self.task, TASKS)
        check_choice("profile", self.profile, PROFILES)
        self.model.validate()
        self.train.validate()
        if not self.schemes:
            raise ValueError("schemes must name at least one scheme; available: " + ", ".join(available()))
        for name in self.schemes:
            scheme_class(name)  # unknown names raise ValueError listing the available ones
        if len(set(self.schemes)) != len(self.schemes):
            raise ValueError(f"schemes must not repeat, got {list(self.schemes)}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        for seed in self.seeds:
            check_int("seed", seed, minimum=0)
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must not repeat, got {list(self.seeds)}")
        for length in self.eval_lengths:
            check_int("eval length", length, minimum=1)
            if length < self.train.train_length:
                raise ValueError(f"eval lengths must be >= the training length {self.train.train_length}, "
                                 f"got {length}")
        if self.eval_lengths:
            longest = max(self.eval_lengths)
            odd = [length for length in self.eval_lengths if longest % length]
            if odd:
                raise ValueError(f"eval lengths must each divide the longest one ({longest}), so that every length "
                                 f"scores the same bytes; got {odd}")
        check_int("eval_tokens", self.eval_tokens, minimum=1)
        check_int("eval_batch_tokens", self.eval_batch_tokens, minimum=1)
        check_int("passkey_samples", self.passkey_samples, minimum=1)
        for variant in self.rope_variants:
            check_choice("rope variant", variant, ROPE_VARIANTS)
        if self.threads is not None:
            check_int("threads", self.threads, minimum=1)
        if self.task == "passkey":
            if self.data is not None:
                raise ValueError("--data applies to --task lm; passkey samples are built from their own filler")
            if self.train.train_length < passkey.minimum_length():
                raise ValueError(f"train_length must be >= {passkey.minimum_length()} for --task passkey "
                                 f"(the needle and question take {passkey.minimum_length() - 8} bytes), "
                                 f"got {self.train.train_length}")
        return self

    def to_dict(self) -> dict:
        data = asdict(self)
        data["model"], data["train"] = asdict(self.model), asdict(self.train)
        return data


def make_config(profile: str = "quick", **overrides) -> StudyConfig:
    """A :class:`StudyConfig` from a profile; ``overrides`` may name any field, and also the fields of
    the model (``dim``, ``depth``, ``heads``) and of training (``steps``, ``train_length``, ``batch_size``,
    ``lr``, ``warmup_steps``) directly. Missing ``schemes`` means every registered scheme; missing
    ``eval_lengths`` means the training length times 1, 2, 4, 8, 16."""
    check_choice("profile", profile, PROFILES)
    base = PROFILES[profile]
    model_fields = {k: overrides.pop(k) for k in list(overrides) if k in ModelConfig.__dataclass_fields__}
    train_fields = {k: overrides.pop(k) for k in list(overrides) if k in TrainConfig.__dataclass_fields__}
    model = replace(overrides.pop("model", base["model"]), **model_fields)
    train = replace(overrides.pop("train", base["train"]), **train_fields)
    if "steps" in train_fields and "warmup_steps" not in train_fields and isinstance(train.steps, int):
        train = replace(train, warmup_steps=min(base["train"].warmup_steps, max(0, train.steps // 10)))
    settings = {k: base[k] for k in ("eval_tokens", "eval_batch_tokens", "passkey_samples")}
    settings.update(overrides)
    unknown = sorted(set(settings) - set(StudyConfig.__dataclass_fields__))
    if unknown:
        raise TypeError(f"unknown study option(s) {unknown}")
    config = StudyConfig(profile=profile, model=model, train=train, **settings)
    if not config.schemes:
        config.schemes = tuple(available())
    if isinstance(train.train_length, int) and not config.eval_lengths:
        config.eval_lengths = tuple(train.train_length * f for f in EVAL_FACTORS)
    # The rise is measured against the training length, so it is always evaluated.
    if isinstance(train.train_length, int) and train.train_length not in config.eval_lengths:
        config.eval_lengths = (train.train_length,) + tuple(config.eval_lengths)
    config.eval_lengths = tuple(sorted(set(config.eval_lengths)))
    config.schemes, config.seeds = tuple(config.schemes), tuple(config.seeds)
    return config


@dataclass
class StudyHooks:
    """Callbacks for tests and tools: ``on_train_start(run, start_step)``, ``on_step(run, step)``,
    ``after_run(run)`` (raise from any of them to simulate an interruption)."""

    on_train_start: Callable[[str, int], None] | None = None
    on_step: Callable[[str, int], None] | None = None
    after_run: Callable[[str], None] | None = None


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def _environment(device: str) -> dict:
    from posemb import __version__

    if device.startswith("cuda"):
        device_name = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    else:
        device_name = f"cpu ({_cpu_name()}, {os.cpu_count()} logical CPUs)"
    return {"torch": torch.__version__, "python": f"Python {platform.python_version()}",
            "platform": platform.platform(), "device": device_name, "threads": torch.get_num_threads(),
            "world_size": dist_info().world_size, "posemb": __version__, "load_start": _load(), "load_end": None}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (OSError, AttributeError):
        return "n/a"


def run_study(config: StudyConfig, hooks: StudyHooks | None = None, *, command: str | None = None) -> dict:
    """Run (or resume) the study described by ``config``; returns ``{"out", "rows", "records", ...}``."""
    wall_start = time.perf_counter()
    hooks = hooks or StudyHooks()
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    info = init_distributed(device)
    if config.train.batch_size % info.world_size:
        raise ValueError(f"batch_size ({config.train.batch_size}) must be divisible by the number of DDP "
                         f"processes ({info.world_size})")
    environment = _environment(device)
    train_length = config.train.train_length
    longest = max(config.eval_lengths)

    # Data first: a bad --data path fails here, before any training.
    if config.task == "lm":
        corpus = load_corpus(config.data)
        if corpus.train.numel() < train_length + 1:
            raise ValueError(f"the training split has {corpus.train.numel():,} bytes; training length "
                             f"{train_length} needs at least {train_length + 1}")
        chunks = evaluation_chunks(corpus.validation, config.eval_tokens, longest)
        data_description, fingerprint = corpus.describe(), corpus.fingerprint
        eval_tokens = chunks.shape[0] * longest
    else:
        corpus, chunks = None, None
        data_description = f"passkey samples (filler: {passkey.FILLER.strip()!r} repeated)"
        fingerprint, eval_tokens = "passkey-v1", config.passkey_samples * len(passkey.DEFAULT_DEPTHS)

    out = Path(config.out)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    barrier()
    train_identity = {"task": config.task, "model": asdict(config.model), "train": asdict(config.train),
                      "data": fingerprint, "format": 1}
    train_hash = _hash(train_identity)
    eval_hash = _hash({"lengths": list(config.eval_lengths), "eval_tokens": eval_tokens,
                       "passkey_samples": config.passkey_samples, "format": 2})
    runs = [(scheme, seed) for seed in config.seeds for scheme in config.schemes]
    log = StudyLog(len(runs), enabled=config.progress and info.is_main)
    if info.is_main and config.progress:
        log.write(f"{len(runs)} run(s) on {environment['device']}, {environment['threads']} threads; "
                  f"data: {data_description}")
    records, trained_now, reused = [], 0, 0
    for index, (scheme, seed) in enumerate(runs, 1):
        log.begin_run(index)
        run_name = f"{scheme}-seed{seed}"
        run_dir = out / "runs" / f"{run_name}-{train_hash}"
        record, worked = _run_one(config, scheme, seed, run_name, run_dir, train_identity, eval_hash, corpus,
                                  chunks, device, log, hooks)
        trained_now += record["trained_now"]
        reused += not record["trained_now"]
        records.append(record)
        log.end_run(worked=worked)
        meta = _meta(config, environment, data_description, eval_tokens, wall_start, trained_now, reused, command)
        if info.is_main:
            write_report(out, config.task, records, meta, plots=False)  # partial results survive a kill
        barrier()
        if hooks.after_run is not None:
            hooks.after_run(run_name)
    environment["load_end"] = _load()
    meta = _meta(config, environment, data_description, eval_tokens, wall_start, trained_now, reused, command)
    rows = write_report(out, config.task, records, meta, plots=True) if info.is_main else []
    barrier()
    log.finish()
    if info.is_main and config.progress:
        log.write(f"done in {format_seconds(time.perf_counter() - wall_start)}: {out / 'report.md'}")
    return {"out": str(out), "rows": rows, "records": records, "wall_seconds": time.perf_counter() - wall_start,
            "trained_now": trained_now, "reused": reused}


def _meta(config: StudyConfig, environment: dict, data: str, eval_tokens: int, wall_start: float,
          trained_now: int, reused: int, command: str | None) -> dict:
    seconds = time.perf_counter() - wall_start
    return {"config": config.to_dict(), "environment": dict(environment), "data": data, "eval_tokens": eval_tokens,
            "wall_seconds": seconds, "wall_time": format_seconds(seconds), "trained_now": trained_now,
            "reused": reused, "command": command or "posemb.lab.study.run_study(...)"}


def _run_one(config: StudyConfig, scheme: str, seed: int, run_name: str, run_dir: Path, train_identity: dict,
             eval_hash: str, corpus, chunks, device: str, log: StudyLog, hooks: StudyHooks) -> tuple[dict, bool]:
    info = dist_info()
    train_length = config.train.train_length
    train_json, checkpoint = run_dir / "train.json", run_dir / "checkpoint.pt"
    family = scheme_class(scheme).family
    worked = False
    if info.is_main and run_dir.exists():
        # Temporary files of writes cut short by a kill (-9): the complete files they were to replace are intact.
        for stale in run_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
    barrier()
    if train_json.exists() and checkpoint.exists():
        stats = read_json(train_json)
        trained_now = False
        log.write(f"{run_name}: already trained ({stats['steps']} steps, loss {stats['final_loss']:.3f}), reused")
    else:
        worked, trained_now = True, True
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run_dir / "run.json", {"scheme": scheme, "seed": seed, **train_identity})
        barrier()
        model = build_model(scheme, config.model, train_length, seed=seed)
        if config.task == "lm":
            batches = RandomWindows(corpus.train, train_length, config.train.batch_size, seed)
        else:
            batches = passkey.PasskeyBatches(train_length, config.train.batch_size, seed)
        start_step = int(load_checkpoint(checkpoint)["step"]) if checkpoint.exists() else 0
        log.write(f"{run_name}: training {config.train.steps} steps" +
                  (f", resuming from step {start_step}" if start_step else ""))
        if hooks.on_train_start is not None:
            hooks.on_train_start(run_name, start_step)
        on_step = (lambda step: hooks.on_step(run_name, step)) if hooks.on_step is not None else None
        result = train_model(model, batches, config.train, device=device, checkpoint_path=checkpoint,
                             checkpoint_every_s=config.checkpoint_every_s, progress=config.progress,
                             desc=f"{run_name} train", on_step=on_step)
        stats = {"scheme": scheme, "seed": seed, "family": family, **result.to_dict(),
                 "position_params": model.num_position_parameters(),
                 "parameters": sum(p.numel() for p in model.parameters())}
        if info.is_main:
            atomic_write_json(train_json, stats)
        barrier()
        log.write(f"{run_name}: trained, loss {stats['final_loss']:.3f}, {stats['tokens_per_s']:,.0f} tokens/s")

    eval_path = run_dir / f"eval-{eval_hash}.json"
    entries: dict = read_json(eval_path) if eval_path.exists() else {}
    labels = [scheme]
    if scheme == "rope":
        labels += [f"rope+{v}" for v in config.rope_variants]
    wanted = [(label, length) for label in labels for length in config.eval_lengths]
    missing = [(label, length) for label, length in wanted if str(length) not in entries.get(label, {})]
    if missing:
        worked = True
        state = load_checkpoint(checkpoint, map_location="cpu")["model"]
        trained_model = build_model(scheme, config.model, train_length)
        trained_model.load_state_dict(state)
        trained_model.to(device).eval()
        log.write(f"{run_name}: evaluating {len(missing)} (label, length) pair(s)")
        reference = None  # every byte's loss at the training length (lm task), for the paired rise by position
        if config.task == "lm" and any(length > train_length for _, length in missing):
            base, reference = lm_loss_at_length(trained_model, chunks, train_length, device=device,
                                                batch_tokens=config.eval_batch_tokens, progress=config.progress,
                                                desc=f"{scheme} @{train_length}")
            entries.setdefault(scheme, {}).setdefault(str(train_length), base)
        for label, length in missing:
            if label in entries and str(length) in entries[label]:
                continue  # filled above (the training length of the trained scheme)
            if "+" in label and length == train_length:
                # Every scaling is the identity at factor 1: the trained rope's own number.
                base = entries.get(scheme, {}).get(str(length))
                if base is None:
                    base = _evaluate(config, trained_model, chunks, length, seed, device, f"{scheme} @{length}")
                    entries.setdefault(scheme, {})[str(length)] = base
                result = json.loads(json.dumps(base))
                if isinstance(result, dict):
                    result["note"] = "factor 1: the trained rope itself"
            else:
                model = trained_model
                if "+" in label:
                    model = rope_variant_model(state, label.split("+", 1)[1], length / train_length, config.model,
                                               train_length, device)
                result = _evaluate(config, model, chunks, length, seed, device, f"{label} @{length}",
                                   reference=reference if length > train_length else None)
            entries.setdefault(label, {})[str(length)] = result
            if info.is_main:
                atomic_write_json(eval_path, entries)
        if info.is_main:
            atomic_write_json(eval_path, entries)
        barrier()
    record = {"scheme": scheme, "seed": seed, "family": family, "run_dir": str(run_dir), "train": stats,
              "eval": {label: entries[label] for label in labels}, "trained_now": trained_now}
    return record, worked


def _evaluate(config: StudyConfig, model, chunks, length: int, seed: int, device: str, desc: str, *,
              reference=None):
    if config.task == "lm":
        return lm_loss_at_length(model, chunks, length, reference=reference, device=device,
                                 batch_tokens=config.eval_batch_tokens, progress=config.progress, desc=desc)[0]
    return passkey_at_length(model, length, samples=config.passkey_samples, seed=seed, device=device,
                             batch_tokens=config.eval_batch_tokens)


# ---- command line -------------------------------------------------------------------------------

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


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    overrides: dict = {"out": args.out, "task": args.task, "data": args.data, "device": args.device,
                       "threads": args.threads, "progress": not args.no_progress}
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
    parser.add_argument("--schemes", default=None, help="comma-separated schemes (default: every registered one)")
    parser.add_argument("--task", default="lm", choices=TASKS,
                        help="lm: next-byte loss by length (default); passkey: key retrieval by length and depth")
    parser.add_argument("--data", default=None, help="a text file or directory (default: the stdlib's .py files)")
    parser.add_argument("--profile", default="quick", choices=sorted(PROFILES),
                        help="quick: 15 minutes on 2 CPU cores (default); full: larger model, longer, for a GPU")
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
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--checkpoint-every", type=float, default=None, metavar="SECONDS",
                        help="seconds between training checkpoints (default 30; one is always written at the end)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or log lines")
    parser.set_defaults(handler=_handle)


def main(argv: list[str] | None = None) -> int:
    """``python -m posemb.lab.study ...`` (the same options as ``posemb study``)."""
    from posemb.cli import main as cli_main

    return cli_main(["study", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
