"""Study rows that are not one plainly trained scheme: ``SCHEME+randomized`` (trained with randomized
positions, Ruoss et al. 2023) and the ``irope`` hybrid (Llama 4's RoPE/NoPE layer pattern), through
the one table of variants in ``posemb.lab.evaluate``; and the noise section with two seeds."""
import json
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

import posemb
from posemb.cli import main as cli_main
from posemb.lab.evaluate import (HYBRIDS, ROPE_VARIANTS, TRAINING_VARIANTS, VARIANTS, Row, evaluation_labels,
                                 irope_pattern, parse_row, row_model)
from posemb.lab.study import OPT_IN_ROWS, make_config, run_study
from posemb.lab.train import ModelConfig, RandomizedPositions, TrainConfig, train_model
from posemb.lab.verdicts import separation_check

pytestmark = pytest.mark.skipif("rope" not in posemb.available(), reason="the rope scheme is not registered")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("abc", "bisect", "colorsys", "copy", "glob", "heapq", "keyword", "numbers"):
        if (stdlib / f"{name}.py").exists():
            shutil.copy(stdlib / f"{name}.py", root)
    return root


def test_rows_are_parsed_from_the_one_table_of_variants():
    assert parse_row("rope") == Row("rope")
    assert parse_row("rope+randomized") == Row("rope", ("randomized",))
    assert parse_row("alibi+randomized").label == "alibi+randomized"
    assert parse_row("irope") == Row("irope")
    assert parse_row("rope+yarn") == Row("rope", (), "yarn")
    assert parse_row("rope+yarn").run_label == "rope"
    assert set(ROPE_VARIANTS) == {"linear", "ntk", "dynamic", "yarn", "llama3"}
    assert TRAINING_VARIANTS == ("randomized",)
    assert {v.stage for v in VARIANTS.values()} == {"evaluation", "training"}
    # Every row that is not a registered scheme is documented as opt-in with its reason.
    assert set(HYBRIDS) <= set(OPT_IN_ROWS) and all(f"SCHEME+{v}" in OPT_IN_ROWS for v in TRAINING_VARIANTS)
    assert not set(HYBRIDS) & set(posemb.available())
    # Inference-time variants come with the plain rope run only.
    assert set(evaluation_labels("rope", ROPE_VARIANTS)) == {"rope"} | {f"rope+{v}" for v in ROPE_VARIANTS}
    assert set(evaluation_labels("rope+randomized", ROPE_VARIANTS)) == {"rope+randomized"}
    assert set(evaluation_labels("irope", ROPE_VARIANTS)) == {"irope"}
    assert evaluation_labels("rope+randomized", ())["rope+randomized"]["training"] == "randomized"


@pytest.mark.parametrize("text, message", [
    ("nope+randomized", "its layers read no positions"),
    ("rope+bogus", "got '+bogus'"),
    ("rope+randomized+randomized", "got '+randomized'"),
    ("rope+randomized+yarn", "not defined on rope+randomized"),
    ("alibi+yarn", "only to rope"),
    ("ropee", "unknown scheme 'ropee'"),
])
def test_bad_rows_name_what_is_allowed(text, message):
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        parse_row(text)


def test_an_inference_time_variant_is_not_a_trained_row():
    with pytest.raises(ValueError, match="--rope-variants"):
        parse_row("rope+yarn", allow_evaluation=False)


def test_irope_pattern_follows_llama4_and_says_what_depth_3_becomes():
    assert irope_pattern(8) == ["rope", "rope", "rope", "nope"] * 2
    assert irope_pattern(4) == ["rope", "rope", "rope", "nope"]
    assert irope_pattern(6) == ["rope", "rope", "rope", "nope", "rope", "rope"]
    assert irope_pattern(3) == ["rope", "rope", "nope"]  # no 4th layer: the last one is NoPE
    with pytest.raises(ValueError, match="depth >= 2"):
        irope_pattern(1)
    model = row_model(parse_row("irope"), ModelConfig(dim=32, depth=3, heads=2), 16, 64, seed=0)
    sites = [block.attn.scheme.site if block.attn.scheme is not None else None for block in model.blocks]
    assert sites == ["rotation", "rotation", "none"]
    assert model.num_position_parameters() == 0


def test_randomized_positions_repeat_by_seed_and_step_and_reach_the_model():
    windows = lambda step: (torch.zeros(4, 16, dtype=torch.long), torch.zeros(4, 16, dtype=torch.long))
    batches = RandomizedPositions(windows, 64, seed=3)
    _, _, positions = batches(5)
    assert positions.shape == (4, 16) and positions.dtype == torch.long
    assert bool((positions.diff(dim=1) > 0).all()) and 0 <= int(positions.min()) and int(positions.max()) < 64
    assert torch.equal(positions, RandomizedPositions(windows, 64, seed=3)(5)[2])
    assert not torch.equal(positions, batches(6)[2]) and not torch.equal(positions, RandomizedPositions(windows, 64, 4)(5)[2])
    with pytest.raises(ValueError, match="max_position"):
        RandomizedPositions(windows, 0, seed=0)

    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = posemb.TransformerLM(256, 32, 1, 2, scheme="rope")

        def forward(self, tokens, positions=None):
            seen.append(positions)
            return self.lm(tokens, positions=positions)

    config = TrainConfig(train_length=16, batch_size=4, steps=2, warmup_steps=0)
    train_model(Recorder(), batches, config, progress=False)
    assert len(seen) == 2 and all(torch.equal(p, batches(s)[2]) for s, p in enumerate(seen))


def test_a_tiny_study_trains_randomized_and_irope_rows(tmp_path, corpus):
    config = make_config(out=str(tmp_path / "report"), data=str(corpus),
                         schemes=("rope", "rope+randomized", "learned+randomized", "irope"), steps=2,
                         train_length=16, eval_lengths=(16, 32, 64), eval_tokens=256, batch_size=4, dim=32, depth=3,
                         heads=2, progress=False, rope_variants=("yarn",))
    result = run_study(config)
    rows = {(r["scheme"], r["eval_length"]): r for r in result["rows"]}
    assert {r["scheme"] for r in result["rows"]} == {"rope", "rope+yarn", "rope+randomized", "learned+randomized",
                                                    "irope"}
    for label in ("rope+randomized", "learned+randomized", "irope"):
        row = rows[(label, 64)]
        assert row["variant"] is None and row["train_tokens_per_s"] and row["loss"] is not None
    assert rows[("irope", 64)]["family"] == "rotary" and rows[("learned+randomized", 64)]["family"] == "absolute"
    # Trained on positions up to N = 64, the learned table has 64 rows and scores beyond L_train.
    assert rows[("learned+randomized", 64)]["position_params"] == 64 * 32
    # Its own run, whose identity records the position range; different weights from plain rope.
    runs = {r["scheme"]: r for r in result["records"]}
    identity = json.loads(Path(runs["rope+randomized"]["run_dir"], "run.json").read_text())
    assert identity["position_range"] == 64 and identity["scheme"] == "rope+randomized"
    assert "position_range" not in json.loads(Path(runs["rope"]["run_dir"], "run.json").read_text())
    assert rows[("rope+randomized", 16)]["loss"] != rows[("rope", 16)]["loss"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "sorted random subset of [0, 64)" in report and "ordinary positions 0 .. L-1" in report
    assert "at depth 3 the layers are rope, rope, nope" in report
    # A rerun reuses every run, randomized ones included.
    again = run_study(config)
    assert again["trained_now"] == 0


def test_rows_that_cannot_be_trained_are_refused_before_any_training(tmp_path, corpus, capsys):
    base = ["study", "--out", str(tmp_path / "r"), "--data", str(corpus), "--steps", "2", "--train-length", "16",
            "--eval-lengths", "16,32", "--eval-tokens", "128", "--batch-size", "4", "--dim", "32", "--heads", "2",
            "--no-progress"]
    for schemes, depth, message in (("nope+randomized", "1", "its layers read no positions"),
                                    ("irope", "1", "irope row needs depth >= 2"),
                                    ("rope+yarn", "1", "--rope-variants")):
        code = cli_main(base + ["--schemes", schemes, "--depth", depth])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "r" / "runs").exists()


def _row(scheme, length, loss, loss_spread, rise, rise_spread, variant=None):
    return {"scheme": scheme, "eval_length": length, "loss": loss, "loss_spread": loss_spread, "rise": rise,
            "rise_spread": rise_spread, "variant": variant, "seeds": 2}


def test_the_noise_section_with_two_seeds_counts_pairs_and_takes_the_true_median():
    rows = [_row("a", 16, 1.00, 0.01, 0.0, 0.0), _row("b", 16, 1.10, 0.02, 0.0, 0.0),
            _row("c", 16, 1.105, 0.04, 0.0, 0.0), _row("c+x", 16, 1.105, 0.04, 0.0, 0.0, variant="x"),
            _row("a", 32, 1.0, 0.01, 0.00, 0.01), _row("b", 32, 1.2, 0.02, 0.10, 0.02),
            _row("c", 32, 1.2, 0.04, 0.11, 0.04), _row("c+x", 32, 1.2, 0.04, 0.50, 0.10, variant="x")]
    text = separation_check(rows, 16)
    assert "2 seeds" in text and "one difference of two draws" in text
    # In range: the trained rows a, b, c; a-b and a-c separated, b-c not; median of 0.01, 0.02, 0.04.
    assert "median 0.020; 2 of 3 pairs separated" in text
    # At 2x: spreads 0.01, 0.02, 0.04, 0.10 -> median (0.02 + 0.04) / 2 = 0.03; pairs apart: a-b, a-c, a-c+x,
    # b-c+x, c-c+x (5 of 6; b-c overlap).
    assert "| 32 (2x) | 4 | 0.100 (c+x) | 0.030 | 5 of 6 |" in text
    single = [dict(r, loss_spread=None, rise_spread=None, seeds=1) for r in rows]
    assert "Only one seed was run" in separation_check(single, 16)
