"""``posemb study``: train one small LM per positional scheme, evaluate each at the training length
and at 2x, 4x, 8x, 16x it, and write the study notes' comparison table rebuilt from measurements.

Layout of the output directory (``--out``, default ``./study-report``)::

    report.md  results.csv  results.json  ppl_vs_length.png  loss_by_position.png
    .posemb-manifest.json   what posemb wrote here, for which configuration (posemb.lab.outdir)
    .posemb.lock            held while a study writes here: a second one stops at once
    runs/<scheme>-seed<k>-<config hash>/   one run each (posemb.lab.runs)

Before any work the directory is locked and checked: a report file that posemb did not write, or
wrote for another configuration, is not replaced without ``force`` (``--force``).

Rerunning the same command after Ctrl-C or kill skips every finished run, resumes an unfinished
one from its last checkpoint, and re-evaluates only what is missing. The config hash in a run's
directory name covers everything that changes its weights (model, training, data, seed), so a
different ``--steps`` trains new runs instead of reusing the wrong ones.

Runs under ``torchrun`` too (``torchrun --nproc_per_node N -m posemb.cli study ...``): each run is
trained with DDP, evaluation windows are shared out over the ranks, rank 0 writes the files.
The command line of the study is :mod:`posemb.lab.study_command`.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch

from posemb._validation import check_choice, check_int
from posemb.lab import passkey
from posemb.lab.data import evaluation_chunks, load_corpus
from posemb.lab.distributed import barrier, broadcast_from_main, dist_info, start_processes
from posemb.lab.errors import LabError
from posemb.lab.evaluate import HYBRIDS, ROPE_VARIANTS, TRAINING_VARIANTS, parse_row, row_scheme
from posemb.lab.outdir import OutputDir
from posemb.lab.progress import StudyLog, format_seconds
from posemb.lab.report import REPORT_FILES, render_report
from posemb.lab.parallel_runs import check_jobs, check_spawnable, resolve_jobs, run_in_workers
from posemb.lab.runs import RunFolder, run_one
from posemb.lab.train import MAX_LENGTH, ModelConfig, TrainConfig
from posemb.registry import available

TASKS = ("lm", "passkey")
EVAL_FACTORS = (1, 2, 4, 8, 16)

#: ``quick`` is sized for 15 minutes on 2 CPU cores: with 16 default schemes in two 1-thread workers it took
#: 14 min 44 s on a quiet 2-core AMD EPYC (docs/study.md says how it was measured, and that this is at the line);
#: ``full`` is a larger model trained longer, meant for a GPU.
PROFILES: dict[str, dict] = {
    "quick": dict(model=ModelConfig(dim=128, depth=3, heads=4),
                  train=TrainConfig(train_length=128, batch_size=32, steps=300, lr=2e-3, warmup_steps=30),
                  eval_tokens=32_768, eval_batch_tokens=8_192, passkey_samples=32),
    "full": dict(model=ModelConfig(dim=512, depth=8, heads=8),
                 train=TrainConfig(train_length=512, batch_size=64, steps=5000, lr=6e-4, warmup_steps=200),
                 eval_tokens=1_048_576, eval_batch_tokens=32_768, passkey_samples=100),
}


#: Registered schemes the default study leaves out, each with the reason; ``--schemes`` runs them.
#: Every other registered scheme, including one added later, is in the default study.
OPT_IN_SCHEMES: dict[str, str] = {
    "mrope": "on text positions (t = h = w) it is exactly rope, which the study already trains",
    "axial_rope": "a 2-D vision rotary: byte sequences have no (h, w) grid, so it would reduce to a rope variant",
    "rope_mixed": "a 2-D vision rotary with learned frequencies: byte sequences have no (h, w) grid",
    "mla": "changes the attention module (decoupled rope sub-head, shared rope key), not only the positions",
    "cope": "content-dependent positions over whole key rows: one study run trains at about 0.5x rope's tokens/s "
            "(fused path, bench/study/perscheme.py), and the default study without it already fills its 15-minute "
            "budget (14 min 44 s on 2 cores, docs/study.md)",
    "nope_temperature": "with Llama 4's floor_scale 8192 its query scale is 1 below position 8191, so at every "
                        "length the study scores (<= 2048) it is exactly the nope row",
}


#: Rows that are not one registered scheme, opt-in with the reason: ``--schemes irope,rope+randomized``.
OPT_IN_ROWS: dict[str, str] = {
    **{name: "a per-layer hybrid (" + hybrid.source + "); the default study already fills its 15-minute budget "
             "(docs/study.md), so each added row is opt-in" for name, hybrid in HYBRIDS.items()},
    **{f"SCHEME+{name}": "a training variant: one more trained run per scheme and seed, and the default study "
                         "already fills its 15-minute budget (docs/study.md)" for name in TRAINING_VARIANTS},
}


def default_schemes() -> tuple[str, ...]:
    """Every registered scheme but :data:`OPT_IN_SCHEMES`, sorted."""
    return tuple(name for name in available() if name not in OPT_IN_SCHEMES)


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
    #: runs trained at once, each in a worker process (a positive int, or "auto": one per CPU on a CPU
    #: device; :mod:`posemb.lab.parallel_runs`, whose workers are spawned: a script calling run_study with
    #: jobs > 1 needs ``if __name__ == "__main__":``); 1 trains them one after another in this process
    jobs: int | str = 1
    progress: bool = True
    checkpoint_every_s: float = 30.0
    force: bool = False  # replace report files that posemb did not write, or wrote for another study

    def validate(self) -> "StudyConfig":
        """Every check that can fail, before any training starts."""
        check_choice("task", self.task, TASKS)
        check_choice("profile", self.profile, PROFILES)
        self.model.validate()
        self.train.validate()
        if not isinstance(self.out, str) or not self.out.strip():
            raise ValueError(f"out must name a directory, got {self.out!r}")
        if self.data is not None and (not isinstance(self.data, str) or not self.data.strip()):
            raise ValueError(f"--data must name a text file or a directory, got {self.data!r}; leave it out for "
                             "the default corpus (the standard library's source)")
        if not self.schemes:
            raise ValueError("schemes must name at least one scheme; available: " + ", ".join(available())
                             + "; hybrids: " + ", ".join(HYBRIDS))
        for name in self.schemes:
            row = parse_row(name, allow_evaluation=False)  # unknown names raise ValueError listing the available ones
            row_scheme(row, self.model.depth)  # a hybrid that cannot be built at this depth: now, not after training
        if len(set(self.schemes)) != len(self.schemes):
            raise ValueError(f"schemes must not repeat, got {list(self.schemes)}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        for seed in self.seeds:
            check_int("seed", seed, minimum=0)
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must not repeat, got {list(self.seeds)}")
        for length in self.eval_lengths:
            check_int("eval length", length, minimum=1, maximum=MAX_LENGTH)
            if length < self.train.train_length:
                raise ValueError(f"eval lengths must be >= the training length {self.train.train_length}, "
                                 f"got {length}")
        if self.eval_lengths:
            longest = max(self.eval_lengths)
            odd = [length for length in self.eval_lengths if longest % length]
            if odd:
                raise ValueError(f"eval lengths must each divide the longest one ({longest}), so that every length "
                                 f"scores the same bytes; got {odd}")
        check_int("eval_tokens", self.eval_tokens, minimum=1, maximum=1 << 32)
        check_int("eval_batch_tokens", self.eval_batch_tokens, minimum=1, maximum=1 << 26)
        check_int("passkey_samples", self.passkey_samples, minimum=1, maximum=1 << 16)
        for variant in self.rope_variants:
            check_choice("rope variant", variant, ROPE_VARIANTS)
        if self.threads is not None:
            check_int("threads", self.threads, minimum=1)
        check_jobs(self.jobs)
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

    def report_identity(self) -> str:
        """A hash of what the report's numbers depend on (not where it goes, how it is shown, how
        many threads or worker processes, nor ``force``): the configuration the output directory's files belong to."""
        settings = self.to_dict()
        for key in ("out", "device", "threads", "jobs", "progress", "checkpoint_every_s", "force"):
            settings.pop(key)
        return _hash(settings)


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
        config.schemes = default_schemes()
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
    """Run (or resume) the study described by ``config``; returns ``{"out", "rows", "records", ...}``.

    Everything that can be refused is refused before any training: the configuration, the output
    directory (locked, writable, no foreign report files unless ``config.force``), the data."""
    wall_start = time.perf_counter()
    hooks = hooks or StudyHooks()
    config.validate()
    device, info = start_processes(config.device, threads=config.threads, batch_size=config.train.batch_size)
    # The worker layout is checked before the output directory is touched.
    workers = resolve_jobs(config.jobs, len(config.seeds) * len(config.schemes), device, info.world_size,
                           config.threads)
    jobs = workers[0]
    if jobs > 1 and any(hook is not None for hook in (hooks.on_train_start, hooks.on_step, hooks.after_run)):
        raise ValueError(f"StudyHooks run in this process; with jobs={config.jobs} ({jobs} worker processes) "
                         "they would never be called: use jobs=1")
    check_spawnable(jobs)
    out_dir = _open_output(config)
    try:
        return _run_study(config, hooks, command, out_dir, device, wall_start, workers)
    finally:
        if out_dir is not None:
            out_dir.close()


def _open_output(config: StudyConfig) -> OutputDir | None:
    """Rank 0 locks and checks the output directory and claims the report's files; every rank
    raises if that failed (rank 0 with its own error, the others with its message)."""
    out_dir, failure = None, None
    if dist_info().is_main:
        try:
            out_dir = OutputDir(config.out, identity=config.report_identity(), argument="--out")
            out_dir.open()
            out_dir.claim(list(REPORT_FILES[config.task]), force=config.force)
        except (LabError, OSError) as error:
            if out_dir is not None:
                out_dir.close()
            failure = error
    message = broadcast_from_main(None if failure is None else str(failure))
    if failure is not None:
        raise failure
    if message is not None:
        raise LabError(message)
    return out_dir


def _run_study(config: StudyConfig, hooks: StudyHooks, command: str | None, out_dir: OutputDir | None,
               device: str, wall_start: float, workers: tuple[int, int | None]) -> dict:
    """The study, once ``run_study`` has checked everything; ``workers``: :func:`resolve_jobs`'s answer."""
    info = dist_info()
    environment = _environment(device)
    train_length = config.train.train_length
    longest = max(config.eval_lengths)

    # Data next: a bad --data path fails here, before any training.
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

    out = out_dir.path if out_dir is not None else None
    train_identity = {"task": config.task, "model": asdict(config.model), "train": asdict(config.train),
                      "data": fingerprint, "format": 1}
    train_hash = _hash(train_identity)
    eval_hash = _hash({"lengths": list(config.eval_lengths), "eval_tokens": eval_tokens,
                       "passkey_samples": config.passkey_samples, "format": 2})
    runs = [(scheme, seed) for seed in config.seeds for scheme in config.schemes]
    jobs, job_threads = workers
    if job_threads is not None:
        environment["threads"] = job_threads
        if jobs == 1:
            torch.set_num_threads(job_threads)  # (auto with one run: 1 thread, as each worker would have)
    if jobs > 1:
        environment["jobs"] = jobs
    log = StudyLog(len(runs), enabled=config.progress and info.is_main, warnings=info.is_main)
    if info.is_main and config.progress:
        workers = f" in {jobs} worker processes" if jobs > 1 else ""
        threads = environment["threads"]
        log.write(f"{len(runs)} run(s) on {environment['device']}{workers}, {threads} thread{'s' * (threads != 1)}"
                  f"{' each' if jobs > 1 else ''}; data: {data_description}")
    counts = {"trained_now": 0, "reused": 0}
    landed: dict[int, dict] = {}

    def land(index: int, record: dict) -> None:
        """One run's record: counted, and the report rewritten so that partial results survive a kill."""
        counts["trained_now"] += record["trained_now"]
        counts["reused"] += not record["trained_now"]
        landed[index] = record
        if out_dir is not None:
            meta = _meta(config, environment, data_description, eval_tokens, wall_start, counts["trained_now"],
                         counts["reused"], command)
            _write_report(out_dir, config.task, [landed[i] for i in sorted(landed)], meta, plots=False)

    def folder_of(scheme: str, seed: int) -> RunFolder:
        return RunFolder(os.path.join(config.out, "runs", f"{scheme}-seed{seed}-{train_hash}"))

    if jobs > 1:
        work = [(scheme, seed, f"{scheme}-seed{seed}", str(folder_of(scheme, seed).path)) for scheme, seed in runs]
        run_in_workers(config, work, train_identity, eval_hash, device, jobs, job_threads, log,
                       lambda index, record, worked: land(index, record))
    else:
        for index, (scheme, seed) in enumerate(runs, 1):
            log.begin_run(index)
            run_name = f"{scheme}-seed{seed}"
            record, worked = run_one(config, scheme, seed, run_name, folder_of(scheme, seed), train_identity,
                                     eval_hash, corpus, chunks, device, log, hooks)
            log.end_run(worked=worked)
            land(index, record)
            barrier()
            if hooks.after_run is not None:
                hooks.after_run(run_name)
    records = [landed[i] for i in sorted(landed)]
    trained_now, reused = counts["trained_now"], counts["reused"]
    environment["load_end"] = _load()
    meta = _meta(config, environment, data_description, eval_tokens, wall_start, trained_now, reused, command)
    rows = _write_report(out_dir, config.task, records, meta, plots=True) if out_dir is not None else []
    barrier()
    log.finish()
    if out is not None and config.progress:
        log.write(f"done in {format_seconds(time.perf_counter() - wall_start)}: {out / 'report.md'}")
    return {"out": config.out, "rows": rows, "records": records, "wall_seconds": time.perf_counter() - wall_start,
            "trained_now": trained_now, "reused": reused}


def _write_report(out_dir: OutputDir, task: str, records: list[dict], meta: dict, *, plots: bool) -> list[dict]:
    rows, files = render_report(task, records, meta, plots=plots)
    for name, data in files.items():
        out_dir.write_bytes(name, data)
    return rows


def _meta(config: StudyConfig, environment: dict, data: str, eval_tokens: int, wall_start: float,
          trained_now: int, reused: int, command: str | None) -> dict:
    seconds = time.perf_counter() - wall_start
    return {"config": config.to_dict(), "environment": dict(environment), "data": data, "eval_tokens": eval_tokens,
            "wall_seconds": seconds, "wall_time": format_seconds(seconds), "trained_now": trained_now,
            "reused": reused, "command": command or "posemb.lab.study.run_study(...)"}
