"""``posemb study --jobs``: runs in worker processes give the records of one process at the same thread
count, reuse and refuse run folders as one process does, and bad settings are refused up front."""
import json
import shutil
import sysconfig
from pathlib import Path

import pytest

from posemb.cli import main as cli_main
from posemb.lab.errors import LabError
from posemb.lab.parallel_runs import AUTO, available_cpus, resolve_jobs
from posemb.lab.study import StudyHooks, make_config, run_study
from posemb.lab.study_command import config_command

SCHEMES = ("nope", "shaw", "alibi")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("abc", "bisect", "colorsys", "copy", "glob", "heapq", "keyword", "numbers", "queue", "string"):
        source = stdlib / f"{name}.py"
        if source.exists():
            shutil.copy(source, root / source.name)
    return root


def tiny(out: Path, corpus: Path, **overrides):
    settings = dict(out=str(out), data=str(corpus), schemes=SCHEMES, steps=3, train_length=16,
                    eval_lengths=(16, 32), eval_tokens=256, batch_size=4, dim=32, depth=1, heads=2,
                    progress=False, rope_variants=(), threads=1)
    settings.update(overrides)
    return make_config(**settings)


def _measured(entry):
    """An evaluation entry without its wall times (``seconds``), which no two runs share."""
    if isinstance(entry, dict):
        return {key: _measured(value) for key, value in entry.items() if key != "seconds"}
    if isinstance(entry, list):
        return [_measured(value) for value in entry]
    return entry


def numbers(result: dict) -> list:
    """Everything a record measured: the final training loss and every evaluation entry."""
    records = result["records"]
    assert all("seconds" in r["eval"][r["scheme"]]["16"] for r in records)  # (what _measured leaves out)
    return [(r["scheme"], r["train"]["final_loss"], json.dumps(_measured(r["eval"]), sort_keys=True))
            for r in records]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, corpus) -> dict:
    return run_study(tiny(tmp_path_factory.mktemp("serial") / "r", corpus, jobs=1))


def test_workers_give_the_records_of_one_process_to_the_last_bit(tmp_path, corpus, one_process):
    parallel = run_study(tiny(tmp_path / "r", corpus, jobs=2))
    assert parallel["trained_now"] == len(SCHEMES) and parallel["reused"] == 0
    # Same records, in the order of the schemes (not the order the workers finished in).
    assert [r["scheme"] for r in parallel["records"]] == list(SCHEMES)
    assert numbers(parallel) == numbers(one_process)
    for name in ("report.md", "results.csv", "results.json", "ppl_vs_length.png"):
        assert (tmp_path / "r" / name).stat().st_size > 0
    assert not list((tmp_path / "r").rglob("*.tmp"))


def test_workers_reuse_finished_runs_and_train_the_rest(tmp_path, corpus, one_process):
    out = tmp_path / "r"
    first = run_study(tiny(out, corpus, schemes=("nope",), jobs=1))
    assert first["trained_now"] == 1
    again = run_study(tiny(out, corpus, jobs=2, force=True))  # (more schemes: another report)
    assert again["trained_now"] == len(SCHEMES) - 1 and again["reused"] == 1
    assert numbers(again) == numbers(one_process)


def test_a_run_that_fails_in_a_worker_stops_the_study_with_its_file_named(tmp_path, corpus):
    out = tmp_path / "r"
    run_study(tiny(out, corpus, schemes=("nope",), jobs=1))
    (train_json,) = out.glob("runs/nope-seed0-*/train.json")
    train_json.write_text("{not json")
    with pytest.raises(LabError, match=r"run nope-seed0 failed in its worker process: .*train\.json"):
        run_study(tiny(out, corpus, jobs=2, force=True))


def test_hooks_cannot_reach_worker_processes(tmp_path, corpus):
    with pytest.raises(ValueError, match="StudyHooks run in this process.*jobs=1"):
        run_study(tiny(tmp_path / "r", corpus, jobs=2), StudyHooks(after_run=lambda run: None))


def test_resolve_jobs():
    cpus = available_cpus()
    assert resolve_jobs(AUTO, 16, "cpu", 1, None) == (min(cpus, 16), 1 if min(cpus, 16) > 1 else None)
    assert resolve_jobs(AUTO, 1, "cpu", 1, None) == (1, None)  # one run: this process, torch's threads
    assert resolve_jobs(AUTO, 16, "cuda", 1, None) == (1, None)
    assert resolve_jobs(AUTO, 16, "cpu", 2, 3) == (1, 3)  # under torchrun: the ranks share each run
    assert resolve_jobs(3, 16, "cpu", 1, None) == (3, 1)  # 1 thread each unless told
    assert resolve_jobs(3, 16, "cpu", 1, 2) == (3, 2)
    assert resolve_jobs(1, 16, "cpu", 1, 4) == (1, 4)


@pytest.mark.parametrize("jobs", [0, -1, True, 1.5, "two", None])
def test_bad_jobs_are_refused_before_any_training(tmp_path, corpus, jobs):
    with pytest.raises(ValueError, match="jobs must be a positive int or 'auto'"):
        tiny(tmp_path / "r", corpus, jobs=jobs).validate()
    assert not (tmp_path / "r").exists()


def test_several_jobs_need_a_cpu_and_no_torchrun():
    with pytest.raises(ValueError, match="jobs=2 runs the study's runs in parallel CPU processes"):
        resolve_jobs(2, 4, "cuda", 1, None)
    with pytest.raises(ValueError, match="jobs=2 cannot be combined with torchrun"):
        resolve_jobs(2, 4, "cpu", 2, None)


@pytest.mark.parametrize("value", ["0", "x", "1.5", ""])
def test_cli_refuses_bad_jobs_in_one_line(tmp_path, corpus, capsys, value):
    code = cli_main(["study", "--out", str(tmp_path / "r"), "--data", str(corpus), "--schemes", "nope",
                     "--steps", "1", "--jobs", value, "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "jobs must be a positive int" in err or "--jobs must be a positive integer or 'auto'" in err
    assert not (tmp_path / "r").exists()


def test_jobs_is_not_part_of_what_the_report_depends_on(tmp_path, corpus):
    # Workers change how fast, not what: a report written with jobs=1 is the same study's with jobs=2.
    assert tiny(tmp_path, corpus, jobs=1).report_identity() == tiny(tmp_path, corpus, jobs=2).report_identity()
    assert "--jobs auto" in config_command(tiny(tmp_path, corpus, jobs=AUTO))


INTERRUPTIBLE = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # (a test runner may start us with SIGINT ignored)
from posemb.cli import main
if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_ends_every_worker_and_the_same_command_resumes(tmp_path, corpus):
    """Ctrl-C (SIGINT to the process group) in the middle of training: exit 130 with one line, no worker
    left running, and the rerun resumes from the checkpoints to the numbers of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "r"
    args = ["study", "--out", str(out), "--data", str(corpus), "--schemes", ",".join(SCHEMES), "--steps", "1500",
            "--train-length", "16", "--eval-lengths", "16,32", "--eval-tokens", "256", "--batch-size", "4",
            "--dim", "32", "--depth", "1", "--heads", "2", "--rope-variants", "none", "--threads", "1",
            "--jobs", "2", "--checkpoint-every", "0.2", "--no-progress"]
    script = tmp_path / "interruptible.py"
    script.write_text(INTERRUPTIBLE)
    process = subprocess.Popen([sys.executable, str(script), *args], stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("runs/*/checkpoint.pt")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    assert process.poll() is None, "the study finished before it could be interrupted: give it more steps"
    os.killpg(process.pid, signal.SIGINT)
    stderr = process.communicate(timeout=60)[1]
    assert process.returncode == 130, stderr
    assert "interrupted; rerun the same command to resume" in stderr
    def group_alive():
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return False
        return True

    deadline = time.monotonic() + 20  # (multiprocessing's resource tracker takes a moment to go)
    while group_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not group_alive(), "a process of the study outlived it"
    assert not list(out.glob("runs/*/train.json")) or len(list(out.glob("runs/*/train.json"))) < len(SCHEMES)

    resumed = run_study(tiny(out, corpus, steps=1500, jobs=2))
    assert resumed["trained_now"] >= 1
    uninterrupted = run_study(tiny(tmp_path / "whole", corpus, steps=1500, jobs=1))
    assert numbers(resumed) == numbers(uninterrupted)
