"""One run of the study: train one scheme with one seed (or reuse it), then evaluate it.

A run lives in its own folder, ``runs/<scheme>-seed<k>-<config hash>/``::

    run.json          the configuration the folder's hash stands for (written when training starts)
    checkpoint.pt     weights + optimizer + step, rewritten atomically while training
    train.json        written once, when training finished: the run is then immutable
    eval-<hash>.json  one entry per (label, length), rewritten atomically as each lands

The states a folder can be in, and what happens to each (rank 0 decides, every rank follows):

* **finished** (``train.json`` reads back, and its checkpoint matches the SHA-256 recorded in it):
  reused; neither file is ever written again.
* **finished but damaged** (``train.json`` unreadable, or its checkpoint missing, truncated or
  changed): refused with the file's path; deleting the folder retrains it.
* **unfinished** (no ``train.json``): training resumes from the checkpoint; a checkpoint that
  cannot be read is a partial artefact, so it is named, moved aside to ``checkpoint.pt.corrupt``
  and the run trains from step 0.
* an evaluation file that cannot be read is named, moved aside, and its entries recomputed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from posemb.lab import passkey
from posemb.lab.checkpoint import atomic_write_json, file_sha256, load_checkpoint, read_json
from posemb.lab.data import RandomWindows
from posemb.lab.distributed import barrier, broadcast_from_main, dist_info
from posemb.lab.errors import CorruptFileError, LabError
from posemb.lab.evaluate import (evaluation_labels, lm_loss_at_length, parse_row, passkey_at_length, row_batches,
                                 row_family, row_model, variant_model)
from posemb.lab.progress import StudyLog
from posemb.lab.train import train_model

if TYPE_CHECKING:
    from posemb.lab.study import StudyConfig, StudyHooks

TRAIN_STATS_KEYS = ("steps", "tokens", "train_seconds", "tokens_per_s", "final_loss")


class RunFolder:
    """The paths of one run's folder."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.run_json = self.path / "run.json"
        self.checkpoint = self.path / "checkpoint.pt"
        self.train_json = self.path / "train.json"

    def eval_json(self, eval_hash: str) -> Path:
        return self.path / f"eval-{eval_hash}.json"

    def refuse_advice(self) -> str:
        return f"delete the folder {str(self.path)!r} to train this run again"


def set_aside(path: Path) -> Path:
    """Move a damaged file out of the way (``NAME.corrupt``) instead of deleting what the user
    may want to look at."""
    target = path.with_name(path.name + ".corrupt")
    os.replace(path, target)
    return target


def finished_stats(folder: RunFolder, steps: int) -> dict | None:
    """The checked ``train.json`` of a finished run, or None when the run is unfinished.

    Raises :class:`CorruptFileError` naming the file when the run says it finished but its
    ``train.json`` or its checkpoint cannot be trusted."""
    if not folder.train_json.exists():
        return None
    advice = folder.refuse_advice()
    stats = read_json(folder.train_json, advice=advice)
    if not isinstance(stats, dict) or any(key not in stats for key in TRAIN_STATS_KEYS):
        raise CorruptFileError(folder.train_json, "not a posemb training record", advice)
    if not folder.checkpoint.is_file():
        raise CorruptFileError(folder.checkpoint, "missing, though train.json says the run finished", advice)
    recorded = stats.get("checkpoint_sha256")
    if recorded is not None:
        if file_sha256(folder.checkpoint) != recorded:
            raise CorruptFileError(folder.checkpoint, "its SHA-256 is not the one train.json recorded when "
                                   "training finished", advice)
    else:
        state = load_checkpoint(folder.checkpoint, advice=advice)
        if state["step"] != stats["steps"] or stats["steps"] != steps:
            raise CorruptFileError(folder.checkpoint, f"it holds step {state['step']}, train.json says "
                                   f"{stats['steps']} of {steps}", advice)
    return stats


def usable_checkpoint(folder: RunFolder, steps: int, warn) -> bool:
    """Whether an unfinished run has a checkpoint to resume from; a damaged one is set aside
    (and named through ``warn``), so the run trains from step 0."""
    if not folder.checkpoint.exists():
        return False
    try:
        state = load_checkpoint(folder.checkpoint)
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= steps:
            raise CorruptFileError(folder.checkpoint, f"its step {step!r} is not in 0..{steps}")
    except CorruptFileError as error:
        moved = set_aside(folder.checkpoint)
        warn(f"{error.path} is corrupt ({error.reason}): moved to {moved.name}; the run trains from step 0")
        return False
    return True


def read_evaluations(path: Path, warn) -> dict:
    """The entries of an evaluation file (``{label: {length: result}}``); a damaged file is set
    aside (and named through ``warn``) and its entries are computed again."""
    if not path.exists():
        return {}
    try:
        entries = read_json(path)
        if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
            raise CorruptFileError(path, "not a posemb evaluation file")
    except CorruptFileError as error:
        moved = set_aside(path)
        warn(f"{error.path} is corrupt ({error.reason}): moved to {moved.name}; its evaluations are computed again")
        return {}
    return entries


def _inspect(folder: RunFolder, config: "StudyConfig", identity: dict, eval_hash: str, warn) -> dict:
    """Rank 0's look at a run folder: what to do with it (see the module docstring)."""
    if folder.path.exists():
        # Temporary files of writes cut short by a kill (-9): the complete files they were to replace are intact.
        for stale in folder.path.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
    stats = finished_stats(folder, config.train.steps)
    if stats is None:
        if folder.run_json.exists():
            try:
                recorded = read_json(folder.run_json)
            except CorruptFileError:
                recorded = None  # rewritten below: the run is not finished, so nothing depends on it
            if recorded is not None and recorded != identity:
                raise LabError(f"{folder.run_json} describes another configuration than this study's; "
                               f"{folder.refuse_advice()}")
        resume = usable_checkpoint(folder, config.train.steps, warn)
    else:
        resume = True
    return {"stats": stats, "resume": resume, "entries": read_evaluations(folder.eval_json(eval_hash), warn)}


def run_one(config: "StudyConfig", scheme: str, seed: int, run_name: str, folder: RunFolder, train_identity: dict,
            eval_hash: str, corpus, chunks, device: str, log: StudyLog, hooks: "StudyHooks") -> tuple[dict, bool]:
    """Train (or reuse) and evaluate one run; returns ``(record, worked)``, ``worked`` being
    whether anything was computed."""
    info = dist_info()
    train_length = config.train.train_length
    row = parse_row(scheme, allow_evaluation=False)
    family = row_family(row)
    position_range = position_range_of(config)
    identity = {"scheme": scheme, "seed": seed, **train_identity}
    if row.randomized:
        identity["position_range"] = position_range  # the training positions depend on it
    worked = False
    found, failure = None, None
    if info.is_main:
        try:
            found = _inspect(folder, config, identity, eval_hash, log.warn)
        except LabError as error:
            failure = error
    shared = broadcast_from_main({"failure": None if failure is None else str(failure), "found": found})
    if failure is not None:
        raise failure
    if shared["failure"] is not None:
        raise LabError(shared["failure"])
    found = shared["found"]

    stats = found["stats"]
    if stats is not None:
        trained_now = False
        log.write(f"{run_name}: already trained ({stats['steps']} steps, loss {stats['final_loss']:.3f}), reused")
    else:
        worked, trained_now = True, True
        if info.is_main:
            folder.path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(folder.run_json, identity)
        barrier()
        model = row_model(row, config.model, train_length, position_range, seed=seed)
        if config.task == "lm":
            batches = RandomWindows(corpus.train, train_length, config.train.batch_size, seed)
        else:
            batches = passkey.PasskeyBatches(train_length, config.train.batch_size, seed)
        batches = row_batches(row, batches, position_range, seed)
        start_step = int(load_checkpoint(folder.checkpoint)["step"]) if found["resume"] else 0
        log.write(f"{run_name}: training {config.train.steps} steps" +
                  (f", resuming from step {start_step}" if start_step else ""))
        if hooks.on_train_start is not None:
            hooks.on_train_start(run_name, start_step)
        on_step = (lambda step: hooks.on_step(run_name, step)) if hooks.on_step is not None else None
        result = train_model(model, batches, config.train, device=device, checkpoint_path=folder.checkpoint,
                             checkpoint_every_s=config.checkpoint_every_s, progress=config.progress,
                             desc=f"{run_name} train", name=run_name, on_step=on_step)
        stats = {"scheme": scheme, "seed": seed, "family": family, "finished": True, **result.to_dict(),
                 "position_params": model.num_position_parameters(),
                 "parameters": sum(p.numel() for p in model.parameters())}
        if info.is_main:
            atomic_write_json(folder.train_json, stats)
        barrier()
        log.write(f"{run_name}: trained, loss {stats['final_loss']:.3f}, {stats['tokens_per_s']:,.0f} tokens/s")

    entries, worked_eval = _evaluate_run(config, scheme, seed, run_name, folder, eval_hash, found["entries"],
                                         chunks, device, log)
    labels = evaluation_labels(scheme, config.rope_variants)
    record = {"scheme": scheme, "seed": seed, "family": family, "run_dir": str(folder.path), "train": stats,
              "labels": labels, "eval": {label: entries[label] for label in labels}, "trained_now": trained_now}
    return record, worked or worked_eval


def _evaluate_run(config: "StudyConfig", scheme: str, seed: int, run_name: str, folder: RunFolder, eval_hash: str,
                  entries: dict, chunks, device: str, log: StudyLog) -> tuple[dict, bool]:
    """Fill in every (label, length) missing from ``entries``; rank 0 writes the file as each lands."""
    info = dist_info()
    train_length = config.train.train_length
    eval_path = folder.eval_json(eval_hash)
    labels = evaluation_labels(scheme, config.rope_variants)
    wanted = [(label, length) for label in labels for length in config.eval_lengths]
    missing = [(label, length) for label, length in wanted if str(length) not in entries.get(label, {})]
    if not missing:
        return entries, False
    state = load_checkpoint(folder.checkpoint, map_location="cpu", advice=folder.refuse_advice())["model"]
    trained_model = row_model(parse_row(scheme, allow_evaluation=False), config.model, train_length,
                              position_range_of(config))
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
        variant = labels[label]["variant"]
        if variant is not None and length == train_length:
            # Every scaling is the identity at factor 1: the trained scheme's own number.
            base = entries.get(scheme, {}).get(str(length))
            if base is None:
                base = _evaluate(config, trained_model, chunks, length, seed, device, f"{scheme} @{length}")
                entries.setdefault(scheme, {})[str(length)] = base
            result = json.loads(json.dumps(base))
            if isinstance(result, dict):
                result["note"] = f"factor 1: the trained {scheme} itself"
        else:
            model = trained_model
            if variant is not None:
                model = variant_model(scheme, variant, state, length / train_length, config.model, train_length,
                                      device)
            result = _evaluate(config, model, chunks, length, seed, device, f"{label} @{length}",
                               reference=reference if length > train_length else None)
        entries.setdefault(label, {})[str(length)] = result
        if info.is_main:
            atomic_write_json(eval_path, entries)
    if info.is_main:
        atomic_write_json(eval_path, entries)
    barrier()
    return entries, True


def position_range_of(config: "StudyConfig") -> int:
    """N of randomized positions: training positions lie in ``[0, N)``, N = the longest evaluation
    length, so every position an evaluation window uses was drawn in training (Ruoss et al. 2023
    take N above the longest test length; the algorithmic suite does the same)."""
    return max(config.eval_lengths)


def _evaluate(config: "StudyConfig", model, chunks, length: int, seed: int, device: str, desc: str, *,
              reference=None):
    if config.task == "lm":
        return lm_loss_at_length(model, chunks, length, reference=reference, device=device,
                                 batch_tokens=config.eval_batch_tokens, progress=config.progress, desc=desc)[0]
    return passkey_at_length(model, length, samples=config.passkey_samples, seed=seed, device=device,
                             batch_tokens=config.eval_batch_tokens)
