"""``posemb tasks`` end to end at the smoke profile (seconds): every file, resume after an
interruption (between runs and inside training, matching an uninterrupted run bit for bit), the
output-directory guarantees, bad input rejected before any training; and the scoring and ranking
checked against hand-made cases."""
import csv
import json

import pytest
import torch

import posemb
from posemb.cli import main as cli_main
from posemb.lab.algorithmic import harness
from posemb.lab.algorithmic.harness import PositionedLM, Spec, TrainingBatches, parse_spec, score
from posemb.lab.algorithmic.report import anchor_checks, rank
from posemb.lab.algorithmic.suite import SuiteHooks, make_config, run_suite
from posemb.lab.algorithmic.tasks import IGNORE, VOCAB_SIZE, curriculum_length, get_task, make_batch
from posemb.lab.checkpoint import load_checkpoint

SMOKE = ["--profile", "smoke", "--no-progress"]


class StopTraining(Exception):
    """Raised from a hook to simulate a kill."""


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


HAS_ROPE = "rope" in posemb.available()
E2E_SCHEMES = ("nope", "learned+randomized") + (("rope+yarn",) if HAS_ROPE else ())


def test_smoke_run_from_the_command_line_writes_every_file(tmp_path, capsys):
    out = tmp_path / "report"
    code = cli_main(["tasks", "--out", str(out), "--tasks", "copy,addition", "--schemes", ",".join(E2E_SCHEMES),
                     "--seeds", "0,1", *SMOKE])
    assert code == 0, capsys.readouterr().err
    for name in ("report.md", "results.csv", "results.json", "accuracy_copy.png", "accuracy_addition.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "accuracy_copy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_csv(out / "results.csv")
    config = make_config("smoke")
    lengths = list(range(1, config.test_factor * config.max_train_length + 1))
    # 2 tasks x every label x 2 seeds x every test length, once each.
    assert sorted((r["task"], r["label"], r["seed"], int(r["length"])) for r in rows) == sorted(
        (t, s, str(seed), n) for t in ("copy", "addition") for s in E2E_SCHEMES for seed in (0, 1)
        for n in lengths)
    for row in rows:
        assert row["split"] == ("id" if int(row["length"]) <= config.max_train_length else "ood")
        assert 0.0 <= float(row["exact"]) <= float(row["token"]) <= 1.0
    # rope+yarn is scored on the rope run (no run of its own), and is rope itself within training.
    assert not list((out / "runs").glob("*yarn*"))
    assert len(list((out / "runs").glob("copy-*"))) == 2 * len(E2E_SCHEMES)
    for row in rows:
        if row["label"] == "rope+yarn":
            task = get_task(row["task"])
            within = task.sequence_length(int(row["length"])) <= task.sequence_length(config.max_train_length)
            assert row["note"] == ("factor 1: the trained rope itself" if within else "")
    data = json.loads((out / "results.json").read_text())
    assert {e["label"] for e in data["summary"]["ranking"]} == set(E2E_SCHEMES)
    report = (out / "report.md").read_text()
    for heading in ("## Exact match", "## Per-token accuracy", "## Ranking", "## The anchors' orderings",
                    "accuracy_copy.png"):
        assert heading in report
    assert "report:" in capsys.readouterr().out


def test_killed_after_a_run_reuses_it_and_training_resumes_bit_for_bit(tmp_path):
    settings = dict(tasks=("copy",), schemes=("nope", "learned"), seeds=(0,), steps=6, progress=False,
                    checkpoint_every_s=0.0)
    straight = run_suite(make_config("smoke", out=str(tmp_path / "straight"), **settings))

    def stop_after_first(run):
        raise StopTraining(f"simulated kill after {run}")

    resumed_config = make_config("smoke", out=str(tmp_path / "resumed"), **settings)
    with pytest.raises(StopTraining):
        run_suite(resumed_config, SuiteHooks(after_run=stop_after_first))

    def stop_mid_training(run, step):
        if run == "copy-learned-seed0" and step == 3:
            raise StopTraining("simulated kill in training")

    with pytest.raises(StopTraining):
        run_suite(resumed_config, SuiteHooks(on_step=stop_mid_training))
    result = run_suite(resumed_config)
    assert (result["trained_now"], result["reused"]) == (1, 1)
    learned = next(r for r in result["records"] if r["run"] == "learned")
    assert learned["train"]["resumed_from_step"] == 3
    for name in ("copy-nope-seed0", "copy-learned-seed0"):
        a = load_checkpoint(next((tmp_path / "straight" / "runs").glob(f"{name}-*/checkpoint.pt")))["model"]
        b = load_checkpoint(next((tmp_path / "resumed" / "runs").glob(f"{name}-*/checkpoint.pt")))["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert straight["summary"]["rows"] == result["summary"]["rows"]
    again = run_suite(resumed_config)
    assert (again["trained_now"], again["reused"]) == (0, 2)


def test_report_files_are_never_replaced_by_surprise(tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.md").write_text("my notes\n")
    args = ["tasks", "--out", str(out), "--tasks", "parity", "--schemes", "nope", *SMOKE]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "report.md was not written by posemb" in err and "--force" in err
    assert not (out / "runs").exists()  # refused before any training
    assert (out / "report.md").read_text() == "my notes\n"
    assert cli_main(args + ["--force"]) == 0
    assert cli_main(args) == 0  # its own files, same configuration: replaced without --force
    assert cli_main(["tasks", "--out", str(out), "--tasks", "parity", "--schemes", "learned", *SMOKE]) == 2
    assert "output of another configuration" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "copy,nosuch"], "task must be one of"),
    (["--schemes", "nosuch"], "unknown scheme 'nosuch'"),
    (["--schemes", "nope+yarn"], "scheme spec 'nope+yarn'"),
    (["--schemes", "rope+linear+yarn"], "scheme spec 'rope+linear+yarn'"),
    (["--schemes", "nope,nope"], "schemes must not repeat"),
    (["--seeds", "0,0"], "seeds must not repeat"),
    (["--seeds", "a"], "--seeds must be a comma-separated list of integers"),
    (["--test-factor", "0"], "test_factor must be >= 1"),
    (["--max-train-length", "0"], "max_train_length must be >= 1"),
    (["--position-range", "2"], "position_range must be >="),
    (["--steps", "0"], "steps must be"),
    (["--dim", "15"], "dim (15) must be divisible by heads (2)"),
])
def test_bad_input_is_one_clear_error_before_any_training(tmp_path, capsys, extra, message):
    out = tmp_path / "report"
    assert cli_main(["tasks", "--out", str(out), *SMOKE, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("posemb tasks: error:") and message in err, err
    assert not (out / "runs").exists()


def test_randomized_positions_need_their_function(monkeypatch):
    monkeypatch.setattr(harness, "randomized_available", lambda: False)
    with pytest.raises(ValueError, match="posemb.functional.randomized"):
        parse_spec("rope+randomized")


def test_scheme_specs():
    assert parse_spec("rope") == Spec("rope")
    assert parse_spec(" rope+yarn ") == Spec("rope", variant="yarn")
    assert parse_spec("rope+yarn").run_label == "rope"
    assert parse_spec("rope+yarn").label == "rope+yarn"
    for bad in ("", "rope+", "rope+yarn+randomized", "t5+ntk", "alibi+random"):
        with pytest.raises(ValueError):
            parse_spec(bad)


class Oracle(torch.nn.Module):
    """Logits that predict the true next token (the test instances are deterministic), wrong on
    answer token ``wrong`` of every row when given."""

    def __init__(self, tokens, wrong=None, answer_start=None):
        super().__init__()
        self.tokens, self.wrong, self.answer_start = tokens, wrong, answer_start

    def forward(self, x, positions=None):
        nxt = self.tokens[self._rows(x), 1:].clone()
        if self.wrong is not None:
            column = self.answer_start - 1 + self.wrong
            nxt[:, column] = (nxt[:, column] + 1) % VOCAB_SIZE
        return torch.nn.functional.one_hot(nxt, VOCAB_SIZE).float()

    def _rows(self, x):
        # rows of self.tokens whose inputs equal x (score() may cut the samples into batches)
        matches = (self.tokens[:, None, :-1] == x[None]).all(-1)
        return matches.float().argmax(0)


@pytest.mark.parametrize("task_name", ["copy", "duplicate", "addition", "parity"])
def test_score_is_teacher_forced_exact_match_and_per_token_accuracy(task_name):
    task = get_task(task_name)
    n, samples = 5, 12
    batch = make_batch(task, n, samples, seed=7, stream="test")
    right = score(Oracle(batch.tokens), task, n, samples, eval_seed=7, randomized=False, position_range=99,
                  batch_tokens=50)
    assert right == {"exact": 1.0, "token": 1.0, "count": samples, "note": ""}
    one_wrong = score(Oracle(batch.tokens, wrong=0, answer_start=batch.answer_start), task, n, samples,
                      eval_seed=7, randomized=False, position_range=99)
    a = task.answer_length(n)
    assert one_wrong["exact"] == 0.0
    assert one_wrong["token"] == pytest.approx((a - 1) / a)


def test_teacher_forced_exact_match_equals_greedy_decoding():
    """A briefly trained model is right on some instances and wrong on others; the instances
    teacher forcing counts right are exactly those greedy decoding (KV cache) gets right."""
    task = get_task("copy")
    config = make_config("smoke", dim=32, heads=2, steps=40, max_train_length=3)
    spec = Spec("rope" if "rope" in posemb.available() else "alibi")
    lm = harness.build_run_model(spec, config.model, config.train_input_length(task), 16, seed=0)
    from dataclasses import replace

    from posemb.lab.train import train_model
    train_model(PositionedLM(lm), TrainingBatches(task, spec, 3, 16, 0, 16),
                replace(config.train, lr=1e-2, train_length=config.train_input_length(task)), progress=False)
    batch = make_batch(task, 3, 64, seed=1, stream="test")
    with torch.no_grad():
        logits = lm(batch.inputs)
        forced = (logits[:, batch.answer_start - 1:].argmax(-1) == batch.tokens[:, batch.answer_start:]).all(1)
        greedy = lm.generate(batch.tokens[:, :batch.answer_start], task.answer_length(3), temperature=0)
    decoded = (greedy[:, batch.answer_start:] == batch.tokens[:, batch.answer_start:]).all(1)
    assert 0 < int(forced.sum()) < 64, "the test needs a model that is right on some rows only"
    assert torch.equal(forced, decoded)


def test_training_batches_follow_the_curriculum_and_score_answers_only():
    task = get_task("reverse")
    batches = TrainingBatches(task, Spec("nope"), 6, 8, seed=3, position_range=40)
    for step in range(5):
        packed, targets = batches(step)
        n = curriculum_length(3, step, 6)
        assert packed.shape == (8, 2, task.sequence_length(n) - 1)
        assert torch.equal(packed[:, 1], torch.arange(packed.shape[-1]).expand(8, -1))
        assert ((targets != IGNORE).sum(1) == n).all()
        again, _ = batches(step)
        assert torch.equal(packed, again)


def test_the_learned_table_covers_every_test_position():
    config = make_config("smoke", tasks=("duplicate",))
    task = get_task("duplicate")
    lm = harness.build_run_model(Spec("learned"), config.model, config.train_input_length(task),
                                 config.task_position_range(task))
    longest = max(config.test_lengths)
    result = score(lm, task, longest, 4, eval_seed=0, randomized=False, position_range=config.task_position_range(task))
    assert result["exact"] is not None and result["note"] == ""


def _per_seed(scores):
    """``{label: [seed scores]}`` as split means of one task, for the ranking."""
    return {("t", label, seed, "ood"): {"exact": v / 2, "token": v} for label, values in scores.items()
            for seed, v in enumerate(values)} | {("t", label, seed, "id"): {"exact": 1.0, "token": 1.0}
                                                 for label, values in scores.items() for seed in range(len(values))}


def test_ranking_and_anchor_verdicts_come_from_the_seed_ranges():
    scores = {"learned": [0.20, 0.25], "nope": [0.60, 0.70], "t5": [0.22, 0.40], "rope": [0.5, 0.55],
              "rope+randomized": [0.58, 0.8]}
    ranking = rank(_per_seed(scores), ["t"], list(scores), [0, 1])
    assert [e["label"] for e in ranking] == ["rope+randomized", "nope", "rope", "t5", "learned"]
    assert [e["separated_from_next"] for e in ranking] == [False, True, True, False, False]
    assert [e["tier"] for e in ranking] == [1, 1, 2, 3, 3]
    assert ranking[1]["score"] == pytest.approx(0.65) and ranking[1]["spread"] == pytest.approx(0.1)
    verdicts = {c["claim"].split(" (")[0]: c["verdict"] for c in anchor_checks(ranking)}
    assert verdicts == {"nope above learned": "reproduced", "t5 above learned": "within noise",
                        "randomized positions help rope": "reproduced"}
    reversed_case = rank(_per_seed({"nope": [0.1, 0.2], "sinusoidal": [0.3, 0.4]}), ["t"], ["nope", "sinusoidal"],
                         [0, 1])
    assert anchor_checks(reversed_case)[0]["verdict"] == "reversed"
    one_seed = rank(_per_seed({"nope": [0.9], "learned": [0.1]}), ["t"], ["nope", "learned"], [0])
    assert anchor_checks(one_seed)[0]["verdict"] == "within noise"


def test_randomized_training_positions_are_sorted_subsets_of_the_range_and_reproducible():
    task = get_task("copy")
    batches = TrainingBatches(task, Spec("alibi", randomized=True), 6, 8, seed=1, position_range=40)
    seen = set()
    for step in range(6):
        packed, _ = batches(step)
        positions = packed[:, 1]
        assert bool((positions[:, 1:] > positions[:, :-1]).all())  # increasing, hence distinct
        assert int(positions.min()) >= 0 and int(positions.max()) < 40
        assert torch.equal(packed, batches(step)[0])
        seen.update(positions.flatten().tolist())
    assert max(seen) > 6 * 2  # beyond the default positions of the training lengths


def test_a_damaged_finished_run_is_named_not_silently_reused(tmp_path, capsys):
    out = tmp_path / "report"
    args = ["tasks", "--out", str(out), "--tasks", "parity", "--schemes", "nope", *SMOKE]
    assert cli_main(args) == 0
    checkpoint = next((out / "runs").glob("parity-nope-seed0-*/checkpoint.pt"))
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert str(checkpoint) in err and "delete the folder" in err
