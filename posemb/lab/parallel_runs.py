"""The study's runs in worker processes (``posemb study --jobs N``): each run trains and evaluates in a
process of its own with ``threads`` torch threads, and the parent writes the report as runs land.

Why processes: a training step of the study's small model does not keep two threads busy. On the
project's 2-core machine two 1-thread processes train 1.06-1.32x the tokens per second of one 2-thread
process at the quick profile's shape (two runs of ``bench/study/parallel_steps.py``; docs/study.md,
"Parallel runs"), so ``--jobs auto`` on a CPU runs one 1-thread worker per core.

What a worker does is exactly what the parent does for a run with ``jobs=1`` (:func:`posemb.lab.runs.
run_one` into the same run folder), so resuming, reusing finished runs and refusing damaged ones work
the same. The numbers depend on the thread count of a run (matrix products split their sums by thread),
not on how many runs train at once: ``jobs=2, threads=1`` gives the records of ``jobs=1, threads=1``
to the last bit (``tests/test_parallel_runs.py``).

Workers are spawned (no fork of a process that holds torch's thread pools) and each loads the corpus
once; as with any spawned pool, a script that calls ``run_study`` with ``jobs > 1`` must do so under
``if __name__ == "__main__":`` (the command line does; :func:`check_spawnable` says so otherwise). A
worker ends itself when its parent is gone, so no orphan trains on after a ``kill -9``. A failed run stops the study with its error; an interrupt ends the workers, whose checkpoints
(written atomically every ``checkpoint_every_s``) let the same command resume.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from typing import TYPE_CHECKING, Callable

import torch

from posemb.lab.distributed import exit_process
from posemb.lab.errors import LabError
from posemb.lab.progress import StudyLog

if TYPE_CHECKING:
    from posemb.lab.study import StudyConfig

#: what ``jobs`` may be besides a positive integer
AUTO = "auto"
#: seconds between a worker's checks that its parent is still alive
_PARENT_CHECK_S = 0.5


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_jobs(jobs) -> int | str:
    """``jobs`` when it is a positive int or ``"auto"``; else a ``ValueError`` naming it."""
    if jobs != AUTO and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ValueError(f"jobs must be a positive int or {AUTO!r}, got {jobs!r}")
    return jobs


def resolve_jobs(jobs: int | str, runs: int, device: str, world_size: int,
                 threads: int | None) -> tuple[int, int | None]:
    """``(worker processes, torch threads per run)`` for ``jobs`` (a positive int or ``"auto"``).

    ``auto``: one worker per available CPU, at most one per run, on a CPU device outside ``torchrun``
    (elsewhere 1). Threads per run: ``threads`` when given; else 1 with ``auto`` on a CPU device or with
    several workers, so that the default study's numbers are the same on a machine of 2 CPUs and of 64,
    and for one run as for sixteen (a run's numbers depend on its thread count); else (``jobs=1``, or a
    GPU) None: torch's own default. With one worker the runs train in this process."""
    on_cpu = device == "cpu" and world_size == 1
    if jobs == AUTO:
        workers = max(1, min(available_cpus(), runs)) if on_cpu else 1
        return workers, threads or (1 if on_cpu else None)
    check_jobs(jobs)
    if jobs > 1 and device != "cpu":
        raise ValueError(f"jobs={jobs} runs the study's runs in parallel CPU processes; the device is "
                         f"{device!r}: use jobs=1 (one run at a time on the accelerator)")
    if jobs > 1 and world_size > 1:
        raise ValueError(f"jobs={jobs} cannot be combined with torchrun ({world_size} processes already "
                         "share each run); use jobs=1")
    if jobs == 1:
        return 1, threads
    return min(jobs, max(1, runs)), threads or 1


def check_spawnable(jobs: int) -> None:
    """Refuse to start workers from a process that is itself a spawned child still importing its
    parent's script: a script that calls ``run_study`` with ``jobs > 1`` at module level, without
    ``if __name__ == "__main__":``, would otherwise start one more study in every worker."""
    if jobs > 1 and getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError("run_study(jobs > 1) was called while a worker process imported the calling "
                           "script: put the call under `if __name__ == \"__main__\":` (worker processes are "
                           "spawned and import the script), or use jobs=1")


# ---- the worker side ----------------------------------------------------------------------------------
_WORKER: dict = {}


def _worker_start(config: "StudyConfig", threads: int, parent: int) -> None:
    """Once per worker process: its threads, and the corpus and evaluation chunks the parent also built."""
    # Ctrl-C reaches the whole process group; the parent alone answers it (it ends the workers, whose
    # checkpoints are on disk), so the workers do not each print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent,), name="posemb-parent-watch", daemon=True).start()
    torch.set_num_threads(threads)
    corpus, chunks = None, None
    if config.task == "lm":
        from posemb.lab.data import evaluation_chunks, load_corpus

        corpus = load_corpus(config.data)
        chunks = evaluation_chunks(corpus.validation, config.eval_tokens, max(config.eval_lengths))
    _WORKER.update(corpus=corpus, chunks=chunks)


def _exit_with_parent(parent: int) -> None:
    """End this worker soon after its parent is gone (killed with -9 or a plain SIGTERM, which leave no
    time to end the workers): an orphan would go on training the run folders that the next command
    resumes (its checkpoints are written atomically, so ending at any point loses nothing)."""
    while os.getppid() == parent:
        time.sleep(_PARENT_CHECK_S)
    exit_process(3, now=True)


def _worker_run(config: "StudyConfig", scheme: str, seed: int, run_name: str, folder_path: str, train_identity: dict,
                eval_hash: str, device: str, log_lines: bool, study_start: float) -> tuple[dict, bool]:
    """One run in a worker: ``(record, worked)``, as :func:`~posemb.lab.runs.run_one` returns them. An error
    propagates to the parent as itself (the lab's errors pickle), so the command line shows the line and
    exit code it would show with ``jobs=1``, and a bug's traceback from the worker."""
    from posemb.lab.runs import RunFolder, run_one
    from posemb.lab.study import StudyHooks

    # One line per event from each worker; no progress bars (several would draw over each other).
    log = StudyLog(1, enabled=log_lines)
    log.start -= time.time() - study_start  # elapsed time counted from the study's start, as the parent's
    return run_one(replace(config, progress=False), scheme, seed, run_name, RunFolder(folder_path), train_identity,
                   eval_hash, _WORKER["corpus"], _WORKER["chunks"], device, log, StudyHooks())


# ---- the parent side ----------------------------------------------------------------------------------
def run_in_workers(config: "StudyConfig", runs: list[tuple[str, int, str, str]], train_identity: dict,
                   eval_hash: str, device: str, jobs: int, threads: int, log: StudyLog,
                   on_record: Callable[[int, dict, bool], None]) -> None:
    """Run ``runs`` ((scheme, seed, run name, folder) each) on ``jobs`` workers of ``threads`` threads,
    the slowest kinds first (:data:`SITE_ORDER`); ``on_record(index, record, worked)`` is called in
    the parent as each run lands (index into ``runs``)."""
    order = sorted(range(len(runs)), key=lambda index: (_cost_rank(runs[index][0]), index))
    context = multiprocessing.get_context("spawn")
    executor = ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_start,
                                   initargs=(config, threads, os.getpid()))
    pending: dict = {}
    done = 0
    study_start = time.time() - (time.perf_counter() - log.start)
    try:
        for index in order:
            scheme, seed, run_name, folder = runs[index]
            future = executor.submit(_worker_run, config, scheme, seed, run_name, folder, train_identity, eval_hash,
                                     device, config.progress, study_start)
            pending[future] = index
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                index = pending.pop(future)
                try:
                    record, worked = future.result()
                except BrokenProcessPool:
                    running = sorted({runs[i][2] for i in [index, *pending.values()]})
                    raise LabError(f"a study worker process ended abruptly (killed, or out of memory) while these "
                                   f"runs were unfinished: {', '.join(running)}; rerun the same command to resume "
                                   "them from their checkpoints") from None
                run_name = runs[index][2]
                done += 1
                log.current = done
                log.write(f"{run_name}: done ({done} of {len(runs)} runs, {jobs} worker processes)")
                on_record(index, record, worked)
    except BaseException:
        # A failed run or an interrupt: nothing else starts, and running workers end now (their last
        # checkpoint is on disk, written atomically).
        for future in pending:
            future.cancel()
        processes = list((getattr(executor, "_processes", None) or {}).values())
        for process in processes:
            process.terminate()
        for process in processes:
            process.join()
        executor.shutdown(wait=True, cancel_futures=True)
        raise
    executor.shutdown(wait=True)


#: Scheduling order by attention site, slowest first (the quick profile's runs on 1 thread, 2026-12-04:
#: content 100-197 s, rotation 94-122 s with rope's five scalings evaluated, bias 88-104 s, input and
#: none 84-93 s), so that the last runs to start are short and the workers finish close together.
SITE_ORDER = ("content", "rotation", "bias")


def _cost_rank(row: str) -> int:
    """Where a row's scheme comes in the schedule (:data:`SITE_ORDER`; other sites and hybrids last)."""
    from posemb.lab.evaluate import parse_row
    from posemb.registry import available, scheme_class

    base = parse_row(row, allow_evaluation=False).base  # (rows were checked before any run started)
    # A hybrid (a per-layer pattern) is not one registered class: no cost hint.
    site = getattr(scheme_class(base), "site", None) if base in available() else None
    return SITE_ORDER.index(site) if site in SITE_ORDER else len(SITE_ORDER)


__all__ = ["AUTO", "available_cpus", "check_jobs", "check_spawnable", "resolve_jobs", "run_in_workers"]
