"""``posemb study --jobs``: runs in worker processes give the records of one process at the same thread
count, reuse and refuse run folders as one process does, and bad settings are refused up front."""
import json
import shutil
import sysconfig
from pathlib import Path

import pytest

from posemb.cli import main as cli_main
from posemb.lab.errors import CorruptFileError, LabError
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


def test_a_run_that_fails_in_a_worker_stops_the_study_as_it_would_in_one_process(tmp_path, corpus):
    """The worker's error reaches the parent as itself: same class (so the same exit code) and message."""
    out = tmp_path / "r"
    run_study(tiny(out, corpus, schemes=("nope",), jobs=1))
    (train_json,) = out.glob("runs/nope-seed0-*/train.json")
    train_json.write_text("{not json")
    errors = []
    for jobs in (1, 2):
        with pytest.raises(CorruptFileError) as caught:
            run_study(tiny(out, corpus, jobs=jobs, force=True))
        errors.append(str(caught.value))
    assert errors[0] == errors[1] and "train.json" in errors[0]


def test_cli_error_from_a_worker_is_one_line_with_its_exit_code(tmp_path, corpus, capsys):
    """A diverging run (exit 1, one line) says the same through a worker as in one process."""
    lines = []
    for jobs in ("1", "2"):
        code = cli_main(["study", "--out", str(tmp_path / jobs), "--data", str(corpus), "--schemes", "nope,alibi",
                         "--steps", "3", "--train-length", "16", "--eval-lengths", "16", "--eval-tokens", "256",
                         "--batch-size", "4", "--dim", "32", "--depth", "1", "--heads", "2", "--lr", "1e30",
                         "--rope-variants", "none", "--threads", "1", "--jobs", jobs, "--no-progress"])
        err = capsys.readouterr().err
        assert code == 1, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        lines.append(err.strip().replace(str(tmp_path / jobs), "OUT"))
    assert "diverged" in lines[1].lower() or "nan" in lines[1].lower() or "infinite" in lines[1].lower()


def test_a_worker_killed_mid_run_is_a_clear_error_naming_the_runs(tmp_path, corpus, monkeypatch):
    """A worker that dies (kill -9, the OOM killer): one error naming the unfinished runs, and advice."""
    import posemb.lab.parallel_runs as parallel_runs

    monkeypatch.setattr(parallel_runs, "_worker_run", _die)
    with pytest.raises(LabError, match=r"ended abruptly.*unfinished: .*nope-seed0.*rerun the same command"):
        run_study(tiny(tmp_path / "r", corpus, jobs=2))


def _die(*args, **kwargs):  # (module level: the worker imports it by name)
    import os
    os._exit(9)


def test_hooks_cannot_reach_worker_processes(tmp_path, corpus):
    with pytest.raises(ValueError, match="StudyHooks run in this process.*jobs=1"):
        run_study(tiny(tmp_path / "r", corpus, jobs=2), StudyHooks(after_run=lambda run: None))


def test_resolve_jobs():
    cpus = available_cpus()
    assert resolve_jobs(AUTO, 16, "cpu", 1, None) == (min(cpus, 16), 1)
    assert resolve_jobs(AUTO, 1, "cpu", 1, None) == (1, 1)  # one run: this process, still 1 thread
    assert resolve_jobs(AUTO, 16, "cuda", 1, None) == (1, None)
    assert resolve_jobs(AUTO, 16, "cpu", 2, 3) == (1, 3)  # under torchrun: the ranks share each run
    assert resolve_jobs(AUTO, 16, "cpu", 2, None) == (1, None)
    assert resolve_jobs(3, 16, "cpu", 1, None) == (3, 1)  # 1 thread each unless told
    assert resolve_jobs(3, 16, "cpu", 1, 2) == (3, 2)
    assert resolve_jobs(64, 3, "cpu", 1, None) == (3, 1)  # no more workers than runs
    assert resolve_jobs(1, 16, "cpu", 1, 4) == (1, 4)
    assert resolve_jobs(1, 16, "cpu", 1, None) == (1, None)


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


@pytest.mark.parametrize("value", ["0", "-1", "x", "1.5", ""])
def test_cli_refuses_bad_jobs_in_one_line(tmp_path, corpus, capsys, value):
    code = cli_main(["study", "--out", str(tmp_path / "r"), "--data", str(corpus), "--schemes", "nope",
                     "--steps", "1", "--jobs", value, "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"--jobs must be a positive integer or 'auto', got {value!r}" in err
    assert not (tmp_path / "r").exists()


def test_jobs_is_not_part_of_what_the_report_depends_on(tmp_path, corpus):
    # Workers change how fast, not what: a report written with jobs=1 is the same study's with jobs=2.
    assert tiny(tmp_path, corpus, jobs=1).report_identity() == tiny(tmp_path, corpus, jobs=2).report_identity()
    assert "--jobs auto" in config_command(tiny(tmp_path, corpus, jobs=AUTO))


def group_ended(group: int, seconds: float = 20.0) -> bool:
    """Whether every process of process group ``group`` is gone within ``seconds`` (multiprocessing's
    resource tracker takes a moment to go after its parent)."""
    import os
    import time

    deadline = time.monotonic() + seconds
    while True:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


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
    assert group_ended(process.pid), "a process of the study outlived it"
    assert not list(out.glob("runs/*/train.json")) or len(list(out.glob("runs/*/train.json"))) < len(SCHEMES)

    resumed = run_study(tiny(out, corpus, steps=1500, jobs=2))
    assert resumed["trained_now"] >= 1
    uninterrupted = run_study(tiny(tmp_path / "whole", corpus, steps=1500, jobs=1))
    assert numbers(resumed) == numbers(uninterrupted)


ORPHAN_CHECK = """
import os, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_parallel_runs import tiny
from posemb.lab.study import run_study
if __name__ == "__main__":
    run_study(tiny(Path({out!r}), Path({corpus!r}), steps=100000, jobs=2))
"""


def test_workers_end_when_their_parent_is_killed(tmp_path, corpus):
    """kill -9 of the study leaves it no time to end its workers; they notice and end themselves, so none
    trains on in the run folders that the next command resumes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "r"
    script = tmp_path / "study.py"
    script.write_text(ORPHAN_CHECK.format(tests=str(Path(__file__).parent), out=str(out), corpus=str(corpus)))
    process = subprocess.Popen([sys.executable, str(script)], start_new_session=True, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(out.glob("runs/*/checkpoint.pt"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(list(out.glob("runs/*/checkpoint.pt"))) == 2, "the workers never started training"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    ended = group_ended(process.pid)
    if not ended:
        os.killpg(process.pid, signal.SIGKILL)
    assert ended, "a worker outlived its killed parent"


NO_GUARD = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_parallel_runs import tiny
from posemb.lab.study import run_study
run_study(tiny(Path({out!r}), Path({corpus!r}), jobs=2))
"""


def test_a_script_without_a_main_guard_is_told_so(tmp_path, corpus):
    import subprocess
    import sys

    script = tmp_path / "study.py"
    script.write_text(NO_GUARD.format(tests=str(Path(__file__).parent), out=str(tmp_path / "r"), corpus=str(corpus)))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert 'if __name__ == "__main__":' in result.stderr
    assert "ended abruptly" in result.stderr
