"""The README's two commands, run the way a new user runs them: in a fresh virtual environment."""
import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", text, re.S)
    assert block, "README must show the two commands in a bash block under '## Two commands'"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_shows_exactly_the_study_and_test_commands():
    assert readme_commands() == ["make study", "make test"]


def test_ci_runs_exactly_the_readme_test_command():
    lines = [l.strip() for l in (ROOT / ".ci/run").read_text().splitlines()
             if l.strip() and not l.startswith("#") and not l.startswith("set ") and not l.startswith("cd ")]
    assert lines == [readme_commands()[1]]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_readme_commands_work_in_a_fresh_virtual_environment(tmp_path):
    """`make study` and `make test` set up a new .venv and run; the study is shrunk through
    STUDY_ARGS (the default one takes ~17 minutes) and the tests through PYTEST_ARGS."""
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    report = tmp_path / "report"
    study_args = (f"--out {report} --schemes nope,alibi --steps 2 --train-length 16 --eval-lengths 16,32 "
                  "--eval-tokens 256 --batch-size 2 --dim 16 --depth 1 --heads 2 --rope-variants none --no-progress")
    study = subprocess.run(["make", "-C", str(ROOT), "study", f"VENV={venv}",
                            f"STUDY_ARGS={study_args}"], env=env, capture_output=True, text=True, timeout=900)
    assert study.returncode == 0, study.stdout[-3000:] + study.stderr[-3000:]
    assert (venv / ".installed").exists()
    with open(report / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["scheme"] for r in rows} == {"nope", "alibi"}
    tests = subprocess.run(["make", "-C", str(ROOT), "test", f"VENV={venv}",
                            "PYTEST_ARGS=tests/test_registry.py -p no:cacheprovider"],
                           env=env, capture_output=True, text=True, timeout=600)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-3000:]
    assert re.search(r"\d+ passed", tests.stdout)
