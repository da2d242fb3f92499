"""What the lab writes, and what it refuses to write: output directories are locked and checked
before any work, files posemb did not write are never replaced without ``--force``, a finished run
is immutable, a damaged file in a run folder is named and retrained or refused, bad paths and a
diverging run are one line, and new files get the user's umask."""
import errno
import hashlib
import os
import stat
from pathlib import Path

import pytest

from posemb.cli import main as cli_main
from posemb.lab import checkpoint as checkpoint_module
from posemb.lab.data import load_corpus
from posemb.lab.errors import CorruptFileError, OutputDirError
from posemb.lab.outdir import MANIFEST_NAME, OutputDir, check_writable_file
from posemb.lab.study import StudyHooks, make_config, run_study

CORPUS_TEXT = "".join(f"def function_{i}(value):\n    return value * {i} + {i % 7}\n" for i in range(600))
TINY = ["--steps", "3", "--train-length", "16", "--eval-lengths", "16,32", "--eval-tokens", "128",
        "--batch-size", "4", "--dim", "16", "--depth", "1", "--heads", "2", "--rope-variants", "none",
        "--no-progress"]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


class StopTraining(Exception):
    """Raised from a study hook to stand for a kill in the middle of training."""


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS_TEXT)
    return path


def tiny(out: Path, corpus: Path, **overrides):
    settings = dict(out=str(out), data=str(corpus), schemes=("nope",), steps=3, train_length=16,
                    eval_lengths=(16, 32), eval_tokens=128, batch_size=4, dim=16, depth=1, heads=2,
                    rope_variants=(), progress=False)
    settings.update(overrides)
    return make_config(**settings)


def study_cli(out: Path, corpus: Path, *extra: str) -> int:
    return cli_main(["study", "--out", str(out), "--data", str(corpus), "--schemes", "nope", *TINY, *extra])


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_folder(out: Path, name: str = "nope-seed0") -> Path:
    (folder,) = (out / "runs").glob(f"{name}-*")
    return folder


# ---- output directories -----------------------------------------------------------------------
def test_a_foreign_report_is_refused_before_any_work_and_replaced_with_force(tmp_path, corpus, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.md").write_text("my own notes\n")
    assert study_cli(out, corpus) == 2
    err = one_line(capsys.readouterr().err)
    assert "report.md was not written by posemb" in err and "--force" in err and str(out) in err
    assert (out / "report.md").read_text() == "my own notes\n"
    assert not (out / "runs").exists(), "refused before any training"

    assert study_cli(out, corpus, "--force") == 0
    assert "posemb study" in (out / "report.md").read_text()
    assert study_cli(out, corpus) == 0, "posemb's own report of the same configuration is rewritten freely"


def test_a_report_of_another_configuration_or_edited_by_hand_is_refused(tmp_path, corpus, capsys):
    out = tmp_path / "report"
    assert study_cli(out, corpus) == 0
    capsys.readouterr()
    before = {name: digest(out / name) for name in ("report.md", "results.csv", "results.json")}
    assert study_cli(out, corpus, "--seeds", "0,1") == 2
    err = one_line(capsys.readouterr().err)
    assert "output of another configuration" in err and "--force" in err
    assert {name: digest(out / name) for name in before} == before
    assert len(list((out / "runs").iterdir())) == 1, "nothing trained for the refused study"

    with open(out / "report.md", "a") as handle:
        handle.write("\nmy remark\n")
    assert study_cli(out, corpus) == 2
    assert "report.md was changed since posemb wrote it" in one_line(capsys.readouterr().err)


def test_a_second_study_on_a_locked_directory_stops_at_once(tmp_path, corpus, capsys):
    out = tmp_path / "report"
    config = tiny(out, corpus)
    with OutputDir(out, identity="someone else", argument="--out"):
        with pytest.raises(OutputDirError, match=rf"in use by another posemb process \(pid {os.getpid()}\)"):
            run_study(config)
        assert study_cli(out, corpus) == 2
        assert "wait for it to finish, or choose another --out" in one_line(capsys.readouterr().err)
        assert not (out / "runs").exists()
    run_study(config)  # released: the same study now runs
    assert (out / "report.md").exists()


def test_the_manifest_survives_a_kill_between_a_file_and_its_record(tmp_path):
    out = OutputDir(tmp_path, identity="a", lock=False)
    with out:
        out.claim(["x.txt"])
        out.write_bytes("x.txt", b"old")
    real_write = checkpoint_module.atomic_write_bytes
    writes = []

    def killed_after_the_file(path, data):
        real_write(path, data)
        writes.append(Path(path).name)
        if Path(path).name == "x.txt":
            raise KeyboardInterrupt("killed")

    with OutputDir(tmp_path, identity="a", lock=False) as again:
        again.claim(["x.txt"])
        import posemb.lab.outdir as outdir_module

        original = outdir_module.atomic_write_bytes
        outdir_module.atomic_write_bytes = killed_after_the_file
        try:
            with pytest.raises(KeyboardInterrupt):
                again.write_bytes("x.txt", b"new")
        finally:
            outdir_module.atomic_write_bytes = original
    assert writes == [MANIFEST_NAME, "x.txt"] and (tmp_path / "x.txt").read_bytes() == b"new"
    with OutputDir(tmp_path, identity="a", lock=False) as third:
        third.claim(["x.txt"])  # the new content is known: no refusal


def _unwritable(tmp_path: Path, kind: str) -> Path:
    if kind == "under-a-file":
        (tmp_path / "file.txt").write_text("x")
        return tmp_path / "file.txt" / "sub"
    if IS_ROOT:
        pytest.skip("root writes into a 0500 directory anyway")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return locked / "sub"


@pytest.mark.parametrize("kind", ["under-a-file", "read-only"])
def test_an_unwritable_out_is_refused_before_any_work(tmp_path, corpus, capsys, kind):
    out = _unwritable(tmp_path, kind)
    try:
        assert study_cli(out, corpus) == 2
        err = one_line(capsys.readouterr().err)
        assert "--out" in err and str(out) in err and "cannot be written" in err
        assert cli_main(["plot", "all", "--out-dir", str(out)]) == 2
        assert "--out-dir" in one_line(capsys.readouterr().err)
        assert cli_main(["plot", "cosine", "--out", str(out / "c.png")]) == 2
        assert "cannot be written" in one_line(capsys.readouterr().err)
    finally:
        if (tmp_path / "locked").exists():
            (tmp_path / "locked").chmod(0o700)  # let pytest clean up


def test_empty_paths_are_refused(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty path would mean this directory
    assert cli_main(["study", "--out", str(tmp_path / "r"), "--data", "", "--schemes", "nope", *TINY]) == 2
    assert "--data must name a text file or a directory, got ''" in one_line(capsys.readouterr().err)
    with pytest.raises(ValueError, match="data path must name a text file or a directory"):
        load_corpus("")
    assert cli_main(["study", "--out", "", "--data", str(corpus), "--schemes", "nope", *TINY]) == 2
    assert "out must name a directory" in one_line(capsys.readouterr().err)
    assert cli_main(["plot", "all", "--out-dir", ""]) == 2
    assert "--out-dir must name a directory" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists() and not list(tmp_path.glob("*.png"))


def test_plot_all_keeps_a_users_picture_unless_forced(tmp_path, capsys):
    (tmp_path / "cosine.png").write_bytes(b"my picture")
    assert cli_main(["plot", "all", "--out-dir", str(tmp_path), "--dpi", "30"]) == 2
    assert "cosine.png was not written by posemb" in one_line(capsys.readouterr().err)
    assert (tmp_path / "cosine.png").read_bytes() == b"my picture"
    assert not (tmp_path / "decay.png").exists(), "refused before drawing anything"
    assert cli_main(["plot", "all", "--out-dir", str(tmp_path), "--dpi", "30", "--force"]) == 0
    assert (tmp_path / "cosine.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("argv,message", [
    (["cosine", "--length", "1000000000"], "length must be <= 100000"),
    (["decay", "--max-distance", "1000000000"], "max_distance must be <= 100000"),
    (["cosine", "--head-dim", "1048576"], "head_dim must be <= 8192"),
    (["schedules", "--head-dim", "1048576"], "head_dim must be <= 8192"),
])
def test_plot_sizes_are_bounded(tmp_path, capsys, argv, message):
    assert cli_main(["plot", *argv, "--out", str(tmp_path / "x.png")]) == 2
    assert message in one_line(capsys.readouterr().err)
    assert not (tmp_path / "x.png").exists()


def test_study_sizes_are_bounded(tmp_path, corpus, capsys):
    for extra, message in ((["--batch-size", "100000"], "batch_size must be <= 65536"),
                           (["--dim", "10000000"], "dim must be <= 32768"),
                           (["--eval-lengths", "16,1073741824"], "eval length must be <= 1048576"),
                           (["--batch-size", "4096", "--train-length", "8192", "--eval-lengths", "8192"],
                            "batch_size x train_length must be <=")):
        assert study_cli(tmp_path / "r", corpus, *extra) == 2
        assert message in one_line(capsys.readouterr().err)
    assert not (tmp_path / "r").exists()


def test_bench_checks_its_output_before_measuring(tmp_path, capsys, monkeypatch):
    from posemb import bench

    def measured(*args, **kwargs):
        raise AssertionError("bench measured before checking --output")

    monkeypatch.setattr(bench, "run", measured)
    (tmp_path / "file.txt").write_text("x")
    for output in (tmp_path / "file.txt" / "bench.json", tmp_path):
        assert cli_main(["bench", "--quick", "--sections", "rope", "--output", str(output)]) == 2
        err = one_line(capsys.readouterr().err)
        assert "--output" in err and str(output) in err


def test_check_writable_file_accepts_a_new_file_in_a_new_folder(tmp_path):
    target = tmp_path / "a" / "b" / "out.json"
    assert check_writable_file(target, "--output") == target
    assert target.parent.is_dir() and not target.exists() and not list(target.parent.iterdir())


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, corpus, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.os, "fsync", full)
    assert study_cli(tmp_path / "r", corpus) == 1
    err = one_line(capsys.readouterr().err)
    assert "No space left on device" in err and str(tmp_path / "r") in err and "free some space" in err
    assert not list((tmp_path / "r").rglob("*.tmp")), "no temporary file left behind"


# ---- runs ---------------------------------------------------------------------------------------
def test_a_finished_run_is_never_written_again(tmp_path, corpus):
    out = tmp_path / "report"
    run_study(tiny(out, corpus))
    folder = run_folder(out)
    files = ("checkpoint.pt", "train.json", "run.json")
    before = {name: (digest(folder / name), (folder / name).stat().st_mtime_ns) for name in files}
    trained = []
    # Same runs, more evaluation lengths: new evaluations, the weights untouched.
    result = run_study(tiny(out, corpus, eval_lengths=(16, 32, 64), force=True),
                       StudyHooks(on_train_start=lambda run, step: trained.append(run)))
    assert trained == [] and result["reused"] == 1
    assert {name: (digest(folder / name), (folder / name).stat().st_mtime_ns) for name in files} == before
    assert len(list(folder.glob("eval-*.json"))) == 2


def test_a_truncated_checkpoint_of_an_unfinished_run_is_named_and_retrained(tmp_path, corpus, capsys):
    out = tmp_path / "report"
    config = tiny(out, corpus, steps=4, checkpoint_every_s=0.0)

    def stop_at_2(run, step):
        if step == 2:
            raise StopTraining("simulated kill")

    with pytest.raises(StopTraining):
        run_study(config, StudyHooks(on_step=stop_at_2))
    folder = run_folder(out)
    data = (folder / "checkpoint.pt").read_bytes()
    (folder / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    starts = []
    run_study(config, StudyHooks(on_train_start=lambda run, step: starts.append(step)))
    err = capsys.readouterr().err
    assert f"{folder / 'checkpoint.pt'} is corrupt" in err and "trains from step 0" in err
    assert starts == [0]
    assert (folder / "checkpoint.pt.corrupt").read_bytes() == data[: len(data) // 2]
    assert (folder / "train.json").exists()


@pytest.mark.parametrize("damage", ["truncated checkpoint", "missing checkpoint", "corrupt train.json"])
def test_a_damaged_finished_run_is_refused_with_its_path(tmp_path, corpus, capsys, damage):
    out = tmp_path / "report"
    assert study_cli(out, corpus) == 0
    folder = run_folder(out)
    if damage == "truncated checkpoint":
        target = folder / "checkpoint.pt"
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "missing checkpoint":
        target = folder / "checkpoint.pt"
        target.unlink()
    else:
        target = folder / "train.json"
        target.write_text('{"steps": 3, "final_lo')
    kept = {p.name: digest(p) for p in folder.iterdir()}
    capsys.readouterr()
    assert study_cli(out, corpus) == 2
    err = one_line(capsys.readouterr().err)
    assert str(target) in err and f"delete the folder '{folder}'" in err
    assert {p.name: digest(p) for p in folder.iterdir()} == kept, "refused: nothing touched"


def test_a_corrupt_evaluation_file_is_named_and_computed_again(tmp_path, corpus, capsys):
    out = tmp_path / "report"
    first = run_study(tiny(out, corpus))
    (eval_file,) = run_folder(out).glob("eval-*.json")
    eval_file.write_text("{ not json")
    capsys.readouterr()
    again = run_study(tiny(out, corpus))
    assert f"{eval_file} is corrupt" in capsys.readouterr().err
    assert [r["loss"] for r in again["rows"]] == [r["loss"] for r in first["rows"]]
    assert eval_file.with_name(eval_file.name + ".corrupt").read_text() == "{ not json"
    with pytest.raises(CorruptFileError, match=str(eval_file.with_name(eval_file.name + ".corrupt"))):
        checkpoint_module.read_json(eval_file.with_name(eval_file.name + ".corrupt"))


def test_a_diverging_run_stops_with_one_line_and_is_not_marked_finished(tmp_path, corpus, capsys):
    out = tmp_path / "report"
    assert study_cli(out, corpus, "--lr", "1e30") == 1
    err = one_line(capsys.readouterr().err)
    assert "nope-seed0: training diverged" in err and "at step 2 of 3" in err and "lower --lr" in err
    assert not (run_folder(out) / "train.json").exists()


def test_new_files_get_the_users_umask_not_0600(tmp_path, corpus):
    old = os.umask(0o022)
    try:
        out = tmp_path / "report"
        run_study(tiny(out, corpus))
    finally:
        os.umask(old)
    folder = run_folder(out)
    for path in (out / "report.md", out / "results.csv", out / "results.json", out / "ppl_vs_length.png",
                 folder / "checkpoint.pt", folder / "train.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
