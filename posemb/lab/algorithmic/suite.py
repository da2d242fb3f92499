"""The algorithmic suite: profiles, the configuration, and the loop over (task, scheme, seed).

Layout of the output directory (``--out``, default ``./tasks-report``)::

    report.md  results.csv  results.json  accuracy_<task>.png (one per task)
    runs/<task>-<label>-seed<k>-<hash>/checkpoint.pt    weights + optimizer + step (atomic)
                                      train.json       written once training finished
                                      eval-<hash>.json scores of every (label, length), written when scoring ends

Rerunning the same command skips finished runs, resumes an unfinished one from its checkpoint, and
scores only what is missing. The hash in a run's name covers everything that changes its weights
(task, L, model, training, position range, seed), the eval hash everything that changes its scores.
The report files are written through :class:`posemb.lab.outdir.OutputDir` (locked while in use;
never replacing a file posemb did not write, or wrote for another configuration, without ``force``).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from posemb._validation import check_bool, check_choice, check_float, check_int
from posemb.lab.algorithmic import harness
from posemb.lab.algorithmic.harness import PositionedLM, Spec, TrainingBatches, parse_spec
from posemb.lab.algorithmic.tasks import VOCAB_SIZE, Task, get_task, task_names
from posemb.lab.checkpoint import atomic_write_json, load_checkpoint, read_json
from posemb.lab.distributed import barrier, broadcast_from_main, dist_info, start_processes
from posemb.lab.errors import CorruptFileError, LabError
from posemb.lab.evaluate import ROPE_VARIANTS
from posemb.lab.outdir import OutputDir
from posemb.lab.progress import StudyLog, format_seconds, token_bar
from posemb.lab.runs import RunFolder, finished_stats, read_evaluations, usable_checkpoint
from posemb.lab.train import ModelConfig, TrainConfig, train_model
from posemb.registry import available, scheme_class

#: The quick profile's default subset: the anchors' five schemes (Kazemnejad et al. 2023: NoPE, T5,
#: ALiBi, RoPE, absolute) plus the sinusoidal table, on tasks that need position in different ways.
QUICK_TASKS = ("copy", "reverse", "bucket_sort")
QUICK_SCHEMES = ("nope", "learned", "sinusoidal", "t5", "alibi", "rope")
#: Kazemnejad et al.'s schemes plus the sinusoidal table: the full profile trains each also with
#: randomized positions (any other scheme takes ``NAME+randomized`` in ``--schemes``).
ANCHOR_SCHEMES = ("nope", "learned", "sinusoidal", "t5", "alibi", "rope")

PROFILES: dict[str, dict] = {
    # At most 15 minutes on 2 CPU cores (docs/algorithmic.md says how it is measured).
    "quick": dict(model=ModelConfig(vocab_size=VOCAB_SIZE, dim=64, depth=2, heads=4),
                  train=TrainConfig(train_length=2, batch_size=64, steps=600, lr=3e-3, warmup_steps=60),
                  max_train_length=8, test_factor=4, test_samples=64, seeds=(0, 1)),
    # Every task and scheme, longer training, more seeds: for a GPU (or torchrun).
    "full": dict(model=ModelConfig(vocab_size=VOCAB_SIZE, dim=128, depth=4, heads=8),
                 train=TrainConfig(train_length=2, batch_size=128, steps=5_000, lr=1e-3, warmup_steps=250),
                 max_train_length=20, test_factor=5, test_samples=256, seeds=(0, 1, 2)),
    # Seconds, for tests of the machinery; the numbers mean nothing.
    "smoke": dict(model=ModelConfig(vocab_size=VOCAB_SIZE, dim=16, depth=1, heads=2),
                  train=TrainConfig(train_length=2, batch_size=4, steps=2, lr=1e-3, warmup_steps=0),
                  max_train_length=3, test_factor=2, test_samples=4, seeds=(0,)),
}
DEFAULT_TASKS = {"quick": QUICK_TASKS, "smoke": ("copy", "parity")}
TIMING = "_timing"  # the eval file's entry for the seconds spent scoring (not a label)
EVAL_SEED = 10_000  # the test instances: the same for every scheme and seed, so comparisons are paired


def default_schemes(profile: str) -> tuple[str, ...]:
    """The profile's scheme specs. quick: :data:`QUICK_SCHEMES` (those registered) plus
    ``rope+randomized`` when randomized positions exist; full: every registered scheme, the
    :data:`ANCHOR_SCHEMES` also with randomized positions, and every test-time RoPE scaling."""
    registered = available()
    if profile == "quick":
        specs = [s for s in QUICK_SCHEMES if s in registered]
        if "rope" in registered and harness.randomized_available():
            specs.append("rope+randomized")
        return tuple(specs)
    if profile == "smoke":
        return tuple(s for s in ("nope", "learned") if s in registered)
    specs = list(registered)
    if harness.randomized_available():
        specs += [f"{s}+randomized" for s in ANCHOR_SCHEMES if s in registered and scheme_class(s).site != "none"]
    if "rope" in registered:
        specs += [f"rope+{v}" for v in ROPE_VARIANTS]
    return tuple(specs)


@dataclass
class SuiteConfig:
    """Everything a suite run needs; build one with :func:`make_config` (profile + overrides)."""

    out: str = "tasks-report"
    profile: str = "quick"
    tasks: tuple[str, ...] = ()
    schemes: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    max_train_length: int = 8
    test_factor: int = 4
    test_samples: int = 64
    position_range: int | None = None
    device: str = "auto"
    threads: int | None = None
    progress: bool = True
    checkpoint_every_s: float = 30.0
    force: bool = False

    @property
    def specs(self) -> list[Spec]:
        return [parse_spec(s) for s in self.schemes]

    @property
    def test_lengths(self) -> list[int]:
        return list(range(1, self.test_factor * self.max_train_length + 1))

    def validate(self) -> "SuiteConfig":
        """Every check that can fail, before any training starts."""
        check_choice("profile", self.profile, PROFILES)
        self.model.validate()
        if self.model.vocab_size != VOCAB_SIZE:
            raise ValueError(f"vocab_size must be {VOCAB_SIZE} (the tasks' vocabulary), got {self.model.vocab_size}")
        self.train.validate()
        for what, values, allowed in (("tasks", self.tasks, task_names()), ("schemes", self.schemes, None)):
            if not values:
                extra = f"; available: {', '.join(allowed or available())}"
                raise ValueError(f"{what} must name at least one{extra}")
            if len(set(values)) != len(values):
                raise ValueError(f"{what} must not repeat, got {list(values)}")
        for name in self.tasks:
            get_task(name)
        self.specs  # noqa: B018 -- parses every spec: unknown schemes or options raise here
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        for seed in self.seeds:
            check_int("seed", seed, minimum=0)
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must not repeat, got {list(self.seeds)}")
        check_int("max_train_length", self.max_train_length, minimum=1, maximum=4096)
        check_int("test_factor", self.test_factor, minimum=1, maximum=64)
        check_int("test_samples", self.test_samples, minimum=1)
        if self.position_range is not None:
            check_int("position_range", self.position_range, minimum=1)
            for name in self.tasks:
                needed = self.longest_test_input(get_task(name))
                if self.position_range < needed:
                    raise ValueError(f"position_range must be >= {needed}, the longest test sequence of task "
                                     f"{name!r} (instance length {max(self.test_lengths)}), got {self.position_range}")
        if self.threads is not None:
            check_int("threads", self.threads, minimum=1)
        check_float("checkpoint_every_s", self.checkpoint_every_s, minimum=0.0)
        check_bool("progress", self.progress)
        check_bool("force", self.force)
        return self

    # ---- per task ----
    def train_input_length(self, task: Task) -> int:
        """Tokens the model reads for the longest training instance (length L)."""
        return task.sequence_length(self.max_train_length) - 1

    def longest_test_input(self, task: Task) -> int:
        return task.sequence_length(max(self.test_lengths)) - 1

    def task_position_range(self, task: Task) -> int:
        """N: positions lie in ``[0, N)``; the longest test sequence unless ``position_range`` is larger."""
        return max(self.position_range or 0, self.longest_test_input(task))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["model"], data["train"] = asdict(self.model), asdict(self.train)
        return data

    def identity(self) -> str:
        """A hash of what the report's content depends on (not where or how fast it runs)."""
        data = self.to_dict()
        for key in ("out", "device", "threads", "progress", "checkpoint_every_s", "force"):
            data.pop(key)
        return _hash(data)


def make_config(profile: str = "quick", **overrides) -> SuiteConfig:
    """A :class:`SuiteConfig` from a profile; ``overrides`` may name any field, and the fields of the
    model (``dim``, ``depth``, ``heads``) and of training (``steps``, ``batch_size``, ``lr``,
    ``warmup_steps``) directly. Missing ``tasks`` / ``schemes`` mean the profile's defaults."""
    check_choice("profile", profile, PROFILES)
    base = PROFILES[profile]
    model_fields = {k: overrides.pop(k) for k in list(overrides) if k in ModelConfig.__dataclass_fields__}
    train_fields = {k: overrides.pop(k) for k in list(overrides) if k in TrainConfig.__dataclass_fields__}
    if "train_length" in train_fields:
        raise TypeError("train_length is set per task from max_train_length; give max_train_length instead")
    model = replace(overrides.pop("model", base["model"]), **model_fields)
    train = replace(overrides.pop("train", base["train"]), **train_fields)
    if "steps" in train_fields and "warmup_steps" not in train_fields and isinstance(train.steps, int):
        train = replace(train, warmup_steps=min(base["train"].warmup_steps, max(0, train.steps // 10)))
    settings = {k: base[k] for k in ("max_train_length", "test_factor", "test_samples", "seeds")}
    settings.update(overrides)
    unknown = sorted(set(settings) - set(SuiteConfig.__dataclass_fields__))
    if unknown:
        raise TypeError(f"unknown suite option(s) {unknown}")
    config = SuiteConfig(profile=profile, model=model, train=train, **settings)
    config.tasks = tuple(config.tasks) or DEFAULT_TASKS.get(profile, tuple(task_names()))
    config.schemes = tuple(config.schemes) or default_schemes(profile)
    config.seeds = tuple(config.seeds)
    return config


@dataclass
class SuiteHooks:
    """Callbacks for tests: ``on_step(run, step)`` after each training step, ``after_run(run)``
    (raise from either to simulate an interruption)."""

    on_step: Callable[[str, int], None] | None = None
    after_run: Callable[[str], None] | None = None


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def report_files(config: SuiteConfig) -> list[str]:
    return ["report.md", "results.csv", "results.json"] + [f"accuracy_{t}.png" for t in config.tasks]


def runs_of(config: SuiteConfig) -> list[tuple[str, str, int, list[Spec]]]:
    """``(task, run label, seed, specs scored on that run)``: ``rope+yarn`` is scored on the
    ``rope`` run, so a rope run is trained once for all its test-time scalings."""
    by_run: dict[str, list[Spec]] = {}
    for spec in config.specs:
        by_run.setdefault(spec.run_label, []).append(spec)
    return [(task, run_label, seed, specs) for seed in config.seeds for task in config.tasks
            for run_label, specs in by_run.items()]


def run_suite(config: SuiteConfig, hooks: SuiteHooks | None = None, *, command: str | None = None) -> dict:
    """Run (or resume) the suite; returns ``{"out", "records", "summary", "wall_seconds", ...}``."""
    from posemb.lab.algorithmic.report import render_report

    wall_start = time.perf_counter()
    hooks = hooks or SuiteHooks()
    config.validate()
    device, info = start_processes(config.device, threads=config.threads, batch_size=config.train.batch_size)
    environment = _environment(device)
    out_dir = OutputDir(config.out, identity=config.identity(), argument="--out") if info.is_main else None
    if out_dir is not None:
        out_dir.open()  # checked, locked and claimed before any training
    try:
        if out_dir is not None:
            out_dir.claim(report_files(config), force=config.force)
        barrier()
        runs = runs_of(config)
        log = StudyLog(len(runs), enabled=config.progress and info.is_main)
        log.write(f"{len(runs)} run(s) ({len(config.tasks)} task(s) x {len(runs) // len(config.tasks) // len(config.seeds)}"
                  f" trained scheme(s) x {len(config.seeds)} seed(s)) on {environment['device']}, "
                  f"{environment['threads']} threads")
        records, trained_now, reused = [], 0, 0
        out = Path(config.out)

        def write(plots: bool) -> dict:
            meta = _meta(config, environment, wall_start, trained_now, reused, command)
            files, summary = render_report(config, records, meta, plots=plots)
            if out_dir is not None:
                for name, data in files.items():
                    out_dir.write_bytes(name, data)
            barrier()
            return summary

        for index, (task_name, run_label, seed, specs) in enumerate(runs, 1):
            log.begin_run(index)
            record, worked = run_one(config, get_task(task_name), run_label, seed, specs, out, device, log, hooks)
            trained_now += record["trained_now"]
            reused += not record["trained_now"]
            records.append(record)
            log.end_run(worked=worked)
            write(plots=False)  # partial results survive a kill
            if hooks.after_run is not None:
                hooks.after_run(record["name"])
        environment["load_end"] = _load()
        summary = write(plots=True)
        log.finish()
        log.write(f"done in {format_seconds(time.perf_counter() - wall_start)}: {out / 'report.md'}")
    finally:
        if out_dir is not None:
            out_dir.close()
    return {"out": str(out), "records": records, "summary": summary,
            "wall_seconds": time.perf_counter() - wall_start, "trained_now": trained_now, "reused": reused}


def run_one(config: SuiteConfig, task: Task, run_label: str, seed: int, specs: list[Spec], out: Path, device: str,
            log: StudyLog, hooks: SuiteHooks) -> tuple[dict, bool]:
    """Train (or reuse, or resume) one run and score every spec on it at every test length."""
    info = dist_info()
    run_spec = parse_spec(run_label)
    position_range = config.task_position_range(task)
    train_length = config.train_input_length(task)
    train = replace(config.train, train_length=train_length)
    identity = {"task": task.name, "max_train_length": config.max_train_length, "run": run_label, "seed": seed,
                "model": asdict(config.model), "train": asdict(train), "position_range": position_range, "format": 1}
    name = f"{task.name}-{run_label}-seed{seed}"
    folder = RunFolder(out / "runs" / f"{name}-{_hash(identity)}")
    eval_identity = {"lengths": config.test_lengths, "samples": config.test_samples, "eval_seed": EVAL_SEED,
                     "format": 1}
    eval_path = folder.eval_json(_hash(eval_identity))
    worked = False
    # Rank 0 decides what the folder holds (the study's rules, posemb.lab.runs); every rank follows.
    look = broadcast_from_main(_inspect(folder, identity, train.steps, eval_path, log.write) if info.is_main else None)
    stats, entries = look["stats"], look["entries"]
    if stats is not None:
        trained_now = False
        log.write(f"{name}: already trained ({stats['steps']} steps, loss {stats['final_loss']:.3f}), reused")
    else:
        worked, trained_now = True, True
        if info.is_main:
            folder.path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(folder.run_json, identity)
        barrier()
        lm = harness.build_run_model(run_spec, config.model, train_length, position_range, seed=seed)
        batches = TrainingBatches(task, run_spec, config.max_train_length, config.train.batch_size, seed,
                                  position_range)
        start_step = int(load_checkpoint(folder.checkpoint)["step"]) if look["resume"] else 0
        log.write(f"{name}: training {train.steps} steps" + (f", resuming from step {start_step}" if start_step else ""))
        on_step = (lambda step: hooks.on_step(name, step)) if hooks.on_step is not None else None
        result = train_model(PositionedLM(lm), batches, train, device=device, checkpoint_path=folder.checkpoint,
                             checkpoint_every_s=config.checkpoint_every_s, progress=config.progress,
                             desc=f"{name} train", name=name, on_step=on_step)
        stats = {"task": task.name, "run": run_label, "seed": seed, "family": scheme_class(run_spec.scheme).family,
                 **result.to_dict(), "position_params": lm.num_position_parameters(),
                 "parameters": sum(p.numel() for p in lm.parameters())}
        if info.is_main:
            atomic_write_json(folder.train_json, stats)
        barrier()
        log.write(f"{name}: trained, answer loss {stats['final_loss']:.3f}, {stats['train_seconds']:.1f} s")

    missing = [(spec, n) for spec in specs for n in config.test_lengths if str(n) not in entries.get(spec.label, {})]
    if missing:
        worked = True
        started = time.perf_counter()
        state = {k.removeprefix("lm."): v
                 for k, v in load_checkpoint(folder.checkpoint, map_location="cpu")["model"].items()}
        trained = harness.build_run_model(run_spec, config.model, train_length, position_range)
        trained.load_state_dict(state)
        trained.to(device).eval()
        log.write(f"{name}: scoring {len(missing)} (label, length) pair(s)")
        total = sum(config.test_samples * (task.sequence_length(n) - 1) for _, n in missing)
        with token_bar(total, f"{name} score", enabled=config.progress and info.is_main) as bar:
            for spec, n in missing:
                read = task.sequence_length(n) - 1
                if spec.variant is not None and read <= train_length:
                    # Every scaling is the identity at factor 1: the trained rope's own score.
                    result = dict(_score(trained, task, n, config, run_spec, position_range, device))
                    result["note"] = "factor 1: the trained rope itself"
                else:
                    lm = trained if spec.variant is None else harness.variant_model(
                        state, spec.variant, read / train_length, config.model, train_length, position_range
                    ).to(device).eval()
                    result = _score(lm, task, n, config, run_spec, position_range, device)
                entries.setdefault(spec.label, {})[str(n)] = result
                bar.update(config.test_samples * read)
        timing = entries.setdefault(TIMING, {"seconds": 0.0})
        timing["seconds"] += time.perf_counter() - started
        if info.is_main:
            atomic_write_json(eval_path, entries)
        barrier()
    record = {"name": name, "task": task.name, "run": run_label, "seed": seed,
              "family": scheme_class(run_spec.scheme).family, "run_dir": str(folder.path), "train": stats,
              "eval_seconds": entries.get(TIMING, {}).get("seconds", 0.0),
              "eval": {spec.label: entries[spec.label] for spec in specs}, "trained_now": trained_now}
    return record, worked


def _inspect(folder: RunFolder, identity: dict, steps: int, eval_path: Path, warn) -> dict:
    """Rank 0's look at a run folder, by the study's rules (:mod:`posemb.lab.runs`): a finished run
    is reused only if its checkpoint is the one it recorded; an unfinished one resumes from a
    readable checkpoint (a damaged one is set aside); a folder of another configuration is refused."""
    if folder.path.exists():
        # Temporary files of writes cut short by a kill (-9): the complete files they were to replace are intact.
        for stale in folder.path.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
    stats = finished_stats(folder, steps)
    resume = True
    if stats is None:
        if folder.run_json.exists():
            try:
                recorded = read_json(folder.run_json)
            except CorruptFileError:
                recorded = None  # rewritten when training starts: nothing finished depends on it
            if recorded is not None and recorded != identity:
                raise LabError(f"{folder.run_json} describes another configuration than this run's; "
                               f"{folder.refuse_advice()}")
        resume = usable_checkpoint(folder, steps, warn)
    return {"stats": stats, "resume": resume, "entries": read_evaluations(eval_path, warn)}


def _score(lm, task: Task, n: int, config: SuiteConfig, run_spec: Spec, position_range: int, device: str) -> dict:
    return harness.score(lm, task, n, config.test_samples, eval_seed=EVAL_SEED, randomized=run_spec.randomized,
                         position_range=position_range, device=device)


def _environment(device: str) -> dict:
    from posemb import __version__

    if device.startswith("cuda"):
        name = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs)"
    return {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "device": name, "threads": torch.get_num_threads(), "world_size": dist_info().world_size,
            "posemb": __version__, "load_start": _load(), "load_end": None}


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (OSError, AttributeError):
        return "n/a"


def _meta(config: SuiteConfig, environment: dict, wall_start: float, trained_now: int, reused: int,
          command: str | None) -> dict:
    seconds = time.perf_counter() - wall_start
    return {"config": config.to_dict(), "environment": dict(environment), "wall_seconds": seconds,
            "wall_time": format_seconds(seconds), "trained_now": trained_now, "reused": reused,
            "command": command or "posemb.lab.algorithmic.suite.run_suite(...)"}
