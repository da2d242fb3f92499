"""``posemb study`` end to end on a tiny budget: every file, parseable numbers, resume after an
interruption (between runs and inside training), bad input rejected before any training, RoPE
rebuilt with inference-time scaling, verdicts computed from the numbers."""
import csv
import json
import math
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

import posemb
from posemb.cli import main as cli_main
from posemb.lab.checkpoint import load_checkpoint
from posemb.lab.evaluate import BEYOND_N_MAX, load_trained_weights, rope_variant_model, rope_variant_options
from posemb.lab.study import StudyHooks, make_config, run_study
from posemb.lab.summary import summarize_lm
from posemb.lab.train import ModelConfig, build_model
from posemb.lab.verdicts import classify, family_verdicts, scheme_phrase

HAS_ROPE = "rope" in posemb.available()
TINY_SCHEMES = ("nope", "learned", "rope") if HAS_ROPE else ("nope", "learned", "alibi")
TINY_ARGS = ["--steps", "3", "--train-length", "16", "--eval-lengths", "16,32,64", "--eval-tokens", "256",
             "--batch-size", "4", "--dim", "32", "--depth", "1", "--heads", "2", "--no-progress"]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    """A few real stdlib modules (~100 KB): the default corpus's kind of text, at test size."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("abc", "bisect", "colorsys", "copy", "glob", "heapq", "keyword", "numbers", "opcode", "queue",
                 "shlex", "string", "textwrap", "fnmatch", "stat", "this"):
        source = stdlib / f"{name}.py"
        if source.exists():
            shutil.copy(source, root / source.name)
    return root


class StopTraining(Exception):
    """Raised from a study hook to stand for a kill in the middle of training."""


def tiny_config(out: Path, corpus: Path, **overrides):
    settings = dict(out=str(out), data=str(corpus), schemes=TINY_SCHEMES, steps=3, train_length=16,
                    eval_lengths=(16, 32, 64), eval_tokens=256, batch_size=4, dim=32, depth=1, heads=2,
                    progress=False)
    settings.update(overrides)
    return make_config(**settings)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_tiny_study_from_the_command_line_writes_every_file(tmp_path, small_corpus, capsys):
    out = tmp_path / "report"
    code = cli_main(["study", "--out", str(out), "--data", str(small_corpus), "--schemes", ",".join(TINY_SCHEMES),
                     "--seeds", "0,1", *TINY_ARGS])
    assert code == 0, capsys.readouterr().err
    for name in ("report.md", "results.csv", "results.json", "ppl_vs_length.png", "loss_by_position.png"):
        assert (out / name).stat().st_size > 0, name
    for name in ("ppl_vs_length.png", "loss_by_position.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.rglob("*.tmp")), "no temporary file may be left behind"

    rows = read_csv(out / "results.csv")
    for column in ("scheme", "train_length", "eval_length", "loss", "ppl", "rise", "rise_spread", "note"):
        assert column in rows[0]
    labels = {r["scheme"] for r in rows}
    expected = set(TINY_SCHEMES) | ({f"rope+{v}" for v in ("linear", "ntk", "dynamic", "yarn", "llama3")}
                                    if HAS_ROPE else set())
    assert labels == expected
    assert len(rows) == len(expected) * 3  # one row per (scheme, eval length)
    for row in rows:
        assert int(row["train_length"]) == 16
        if row["scheme"] == "learned" and int(row["eval_length"]) > 16:
            # Never clamped: no number at all beyond N_max.
            assert row["loss"] == "" and row["note"] == BEYOND_N_MAX
            continue
        loss, ppl = float(row["loss"]), float(row["ppl"])
        assert math.isfinite(loss) and math.isfinite(ppl) and 0 < loss < 10
        assert ppl == pytest.approx(math.exp(loss), rel=1e-9)
        assert row["rise_spread"] != ""  # two seeds: the spread is reported
        if int(row["eval_length"]) == 16:
            assert float(row["rise"]) == 0.0

    results = json.loads((out / "results.json").read_text())
    # The paired rise by position is zero before the training length: the same bytes, the same context.
    by_key = {(r["scheme"], r["eval_length"]): r for r in results["rows"]}
    for scheme in TINY_SCHEMES:
        if scheme == "learned":
            continue
        rise_buckets = by_key[(scheme, 64)]["rise_buckets"]
        assert rise_buckets and rise_buckets[-1]["stop"] == 64
        for bucket in rise_buckets:
            if bucket["stop"] <= 16:
                assert bucket["loss"] == pytest.approx(0.0, abs=1e-4), (scheme, bucket)
        mean_rise = sum(b["loss"] * (b["stop"] - b["start"]) for b in rise_buckets) / 64
        assert mean_rise == pytest.approx(by_key[(scheme, 64)]["rise"], abs=1e-9)
    assert results["environment"]["torch"] == torch.__version__
    assert results["config"]["seeds"] == [0, 1] and len(results["runs"]) == 2 * len(TINY_SCHEMES)
    report = (out / "report.md").read_text()
    for text in ("The study notes' comparison table", "rise of the loss above its own value", "Verdicts by family",
                 "Configuration and environment", "torch threads", BEYOND_N_MAX, "seed-to-seed spread"):
        assert text in report, text
    assert "report:" in capsys.readouterr().out


def test_a_study_killed_after_its_first_run_reuses_that_run(tmp_path, small_corpus):
    config = tiny_config(tmp_path / "report", small_corpus, schemes=("nope", "alibi"))
    trained: list[str] = []

    def killed(run):
        raise KeyboardInterrupt(f"killed after {run}")

    with pytest.raises(KeyboardInterrupt):
        run_study(config, StudyHooks(on_train_start=lambda run, step: trained.append(run), after_run=killed))
    assert trained == ["nope-seed0"]
    first_train_json = next((tmp_path / "report" / "runs").glob("nope-seed0-*/train.json"))
    stamp = first_train_json.stat().st_mtime_ns
    partial = read_csv(tmp_path / "report" / "results.csv")  # written after the first run already
    assert {r["scheme"] for r in partial} == {"nope"}

    trained.clear()
    result = run_study(config, StudyHooks(on_train_start=lambda run, step: trained.append(run)))
    assert trained == ["alibi-seed0"], "the finished run must not be retrained"
    assert first_train_json.stat().st_mtime_ns == stamp
    assert result["reused"] == 1 and result["trained_now"] == 1
    rows = read_csv(tmp_path / "report" / "results.csv")
    nope_before = [r["loss"] for r in partial if r["scheme"] == "nope"]
    assert [r["loss"] for r in rows if r["scheme"] == "nope"] == nope_before

    # A third invocation has nothing left to do.
    trained.clear()
    assert run_study(config, StudyHooks(on_train_start=lambda run, step: trained.append(run)))["reused"] == 2
    assert trained == []


def test_training_interrupted_mid_run_resumes_from_its_checkpoint_and_matches(tmp_path, small_corpus):
    settings = dict(schemes=("alibi",), steps=6, rope_variants=(), checkpoint_every_s=0.0)
    straight = run_study(tiny_config(tmp_path / "straight", small_corpus, **settings))

    def stop_at_4(run, step):
        if step == 4:
            raise StopTraining("simulated kill")

    config = tiny_config(tmp_path / "resumed", small_corpus, **settings)
    with pytest.raises(StopTraining):
        run_study(config, StudyHooks(on_step=stop_at_4))
    starts: list[int] = []
    resumed = run_study(config, StudyHooks(on_train_start=lambda run, step: starts.append(step)))
    assert starts == [4]
    ckpt_a = load_checkpoint(next((tmp_path / "straight" / "runs").glob("*/checkpoint.pt")))
    ckpt_b = load_checkpoint(next((tmp_path / "resumed" / "runs").glob("*/checkpoint.pt")))
    assert ckpt_a["step"] == ckpt_b["step"] == 6
    for name, tensor in ckpt_a["model"].items():
        assert torch.equal(tensor, ckpt_b["model"][name]), name
    assert [r["loss"] for r in straight["rows"]] == [r["loss"] for r in resumed["rows"]]


def test_seeds_change_the_run_and_repeat_exactly(tmp_path, small_corpus):
    settings = dict(schemes=("nope",), rope_variants=())
    a = run_study(tiny_config(tmp_path / "a", small_corpus, seeds=(0,), **settings))
    b = run_study(tiny_config(tmp_path / "b", small_corpus, seeds=(0,), **settings))
    c = run_study(tiny_config(tmp_path / "c", small_corpus, seeds=(1,), **settings))
    assert [r["loss"] for r in a["rows"]] == [r["loss"] for r in b["rows"]]
    assert [r["loss"] for r in a["rows"]] != [r["loss"] for r in c["rows"]]


@pytest.mark.parametrize("extra,message", [
    (["--schemes", "nope,bogus"], "unknown scheme 'bogus'"),
    (["--eval-lengths", "8,32"], "eval lengths must be >= the training length 16, got 8"),
    (["--steps", "0"], "steps must be a positive number"),
    (["--steps", "-5"], "steps must be a positive number"),
    (["--seed", "1", "--seeds", "0,1"], "either --seed S or --seeds"),
    (["--eval-lengths", "16,x"], "--eval-lengths must be a comma-separated list of integers"),
    (["--task", "passkey"], "--data applies to --task lm"),
    (["--eval-lengths", "16,64,96"], "eval lengths must each divide the longest one (96)"),
    (["--eval-lengths", "16,65536"], "needs at least 65537"),
    (["--lr", "0"], "lr must be > 0.0"),
    (["--heads", "3"], "dim (32) must be divisible by heads (3)"),
    (["--rope-variants", "linear,bogus"], "rope variant must be one of"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "CUDA is not available")]))
def test_bad_input_is_one_clear_error_before_any_training(tmp_path, small_corpus, capsys, extra, message):
    out = tmp_path / "report"
    args = ["study", "--out", str(out), "--data", str(small_corpus), "--schemes", "nope", *TINY_ARGS]
    # Later options win in argparse, so the bad value overrides the tiny default.
    code = cli_main(args + extra)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (out / "runs").exists()


@pytest.mark.parametrize("kind", ["missing", "empty-dir", "empty-file", "unreadable"])
def test_bad_data_path_is_rejected_before_training(tmp_path, capsys, monkeypatch, kind):
    path = tmp_path / "data"
    if kind == "empty-dir":
        path.mkdir()
    elif kind == "empty-file":
        path.write_bytes(b"")
    elif kind == "unreadable":
        path.write_text("print('hello')\n" * 100)

        def refuse(self):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(Path, "read_bytes", refuse)
    out = tmp_path / "report"
    code = cli_main(["study", "--out", str(out), "--data", str(path), "--schemes", "nope", *TINY_ARGS])
    err = capsys.readouterr().err
    assert code == 2 and str(path) in err and "Traceback" not in err
    assert not (out / "runs").exists()


@pytest.mark.skipif(not HAS_ROPE, reason="the rope scheme is not registered")
@pytest.mark.parametrize("variant", ["linear", "ntk", "dynamic", "yarn", "llama3"])
def test_rope_rebuilt_with_a_scaling_keeps_its_own_schedule(variant):
    model_config = ModelConfig(dim=32, depth=1, heads=2)
    trained = build_model("rope", model_config, 16, seed=0)
    state = trained.state_dict()
    # A saved schedule buffer, as a persistent implementation would write, must not win either.
    scheme_prefix = next(name for name, m in trained.named_modules() if isinstance(m, posemb.PositionalScheme))
    poisoned = dict(state)
    buffers = dict(trained.named_buffers())
    for name, value in buffers.items():
        if name.startswith(scheme_prefix):
            poisoned[name] = value
    rebuilt = rope_variant_model(poisoned, variant, 4.0, model_config, 16, "cpu")
    fresh = build_model("rope", model_config, 16, rope_type=variant,
                        scaling=rope_variant_options(variant, 4.0, 16)["scaling"],
                        max_position_embeddings=16)
    for name, buffer in fresh.named_buffers():
        assert torch.equal(dict(rebuilt.named_buffers())[name], buffer), name
    for name, parameter in trained.named_parameters():
        assert torch.equal(dict(rebuilt.named_parameters())[name], parameter), name
    tokens = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(trained.eval()(tokens), rebuilt(tokens)), "the new schedule must change the output"


def test_loading_weights_never_overwrites_a_scheme_buffer():
    model = build_model("sinusoidal", ModelConfig(dim=32, depth=1, heads=2), 16, seed=0)
    state = model.state_dict()
    fake = {k: v for k, v in state.items()}
    for name, buffer in model.named_buffers():
        fake[name] = torch.full_like(buffer, 7.0)
    other = build_model("sinusoidal", ModelConfig(dim=32, depth=1, heads=2), 16, seed=1)
    before = {k: v.clone() for k, v in other.named_buffers()}
    load_trained_weights(other, fake)
    for name, buffer in other.named_buffers():
        assert torch.equal(buffer, before[name])
    with pytest.raises(ValueError, match="missing"):
        load_trained_weights(other, {k: v for k, v in state.items() if "embed" not in k})


def _synthetic_records(rises: dict[str, list[float]], families: dict[str, str]) -> list[dict]:
    records = []
    for scheme, values in rises.items():
        base = 1.5
        entries = {"16": {"loss": base, "tokens": 64, "buckets": [], "note": ""}}
        for factor, rise in zip((2, 4), values):
            if rise is None:
                entries[str(16 * factor)] = {"loss": None, "note": BEYOND_N_MAX}
            else:
                entries[str(16 * factor)] = {"loss": base + rise, "tokens": 64, "buckets": [], "note": ""}
        records.append({"scheme": scheme, "seed": 0, "family": families[scheme], "eval": {scheme: entries},
                        "train": {"tokens_per_s": 1000.0, "position_params": 0}})
    return records


def test_verdicts_are_computed_from_the_numbers():
    assert classify(0.02) == "holds" and classify(0.2) == "degrades gently"
    assert classify(0.5) == "degrades" and classify(3.0) == "breaks down"
    assert classify(0.1, spread=0.12) == "holds"  # within the seed noise
    families = {"alibi": "relative", "t5": "relative", "learned": "absolute", "rope": "rotary"}
    records = _synthetic_records({"alibi": [0.01, 0.02], "t5": [0.4, 1.5], "learned": [None, None],
                                  "rope": [0.1, 2.0]}, families)
    rows = summarize_lm(records, 16, [16, 32, 64])
    verdicts = family_verdicts(rows, 16)
    assert "alibi holds to 4x" in verdicts["relative"]
    assert "t5 degrades at 2x (+0.40), breaks down at 4x (+1.50)" in verdicts["relative"]
    assert "borne out by 1 of 2 (alibi)" in verdicts["relative"]
    assert "cannot run beyond N_max = 16" in verdicts["absolute"]
    assert "borne out by 1 of 1 (rope)" in verdicts["rotary"]
    # Change the numbers and the verdict follows.
    flipped = summarize_lm(_synthetic_records({"alibi": [1.2, 2.5], "t5": [0.0, 0.01], "learned": [None, None],
                                               "rope": [0.1, 2.0]}, families), 16, [16, 32, 64])
    assert "t5 holds to 4x" in family_verdicts(flipped, 16)["relative"]
    assert scheme_phrase(flipped, "alibi", 16) == "alibi breaks down at 2x (+1.20) to 4x (+2.50)"


def test_profiles_and_defaults():
    quick = make_config()
    # Every registered scheme but the documented opt-in ones, each of which must be registered
    # and give its reason.
    from posemb.lab.study import OPT_IN_SCHEMES
    assert set(quick.schemes) == set(posemb.available()) - set(OPT_IN_SCHEMES)
    assert set(OPT_IN_SCHEMES) <= set(posemb.available())
    assert all(isinstance(reason, str) and reason for reason in OPT_IN_SCHEMES.values())
    assert quick.eval_lengths == (128, 256, 512, 1024, 2048)
    assert (quick.model.dim, quick.model.depth, quick.model.heads) == (128, 3, 4)
    assert (quick.train.batch_size, quick.train.steps) == (32, 300)
    full = make_config("full", schemes=("rope",)).validate()
    assert full.model.dim > quick.model.dim and full.train.steps > quick.train.steps
    assert full.eval_lengths == tuple(full.train.train_length * f for f in (1, 2, 4, 8, 16))
    # An override wins, and the training length is always among the evaluation lengths.
    custom = make_config(train_length=64, eval_lengths=(256, 128), steps=10)
    assert custom.eval_lengths == (64, 128, 256) and custom.train.warmup_steps == 1
    with pytest.raises(TypeError, match="unknown study option"):
        make_config(stpes=3)
    with pytest.raises(ValueError, match="profile must be one of"):
        make_config("huge")


def test_tiny_passkey_study(tmp_path):
    config = make_config(out=str(tmp_path / "passkey"), task="passkey", schemes=("nope", "learned"), steps=2,
                         train_length=48, eval_lengths=(48, 96), batch_size=4, dim=32, depth=1, heads=2,
                         passkey_samples=4, progress=False)
    run_study(config)
    out = tmp_path / "passkey"
    for name in ("report.md", "results.csv", "results.json", "passkey_accuracy.png"):
        assert (out / name).stat().st_size > 0
    rows = read_csv(out / "results.csv")
    for column in ("scheme", "train_length", "eval_length", "depth", "accuracy", "loss", "ppl"):
        assert column in rows[0]
    assert len(rows) == 2 * 2 * 5  # schemes x lengths x depths
    for row in rows:
        if row["scheme"] == "learned" and row["eval_length"] == "96":
            assert row["accuracy"] == "" and row["note"] == BEYOND_N_MAX
        else:
            assert 0.0 <= float(row["accuracy"]) <= 1.0 and math.isfinite(float(row["loss"]))
    assert "Accuracy by depth" in (out / "report.md").read_text()
