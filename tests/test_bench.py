"""``posemb bench``: the CLI runs, prints a table and writes valid JSON with ratios and metadata."""
from __future__ import annotations

import json
import math

import pytest
import torch

import posemb
from posemb import bench
from posemb.cli import main

#: Every section but ``step``, which has its own test (it trains every registered scheme).
ATTENTION_SECTIONS = [name for name in bench.SECTIONS if name != "step"]


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_bench_quick_writes_valid_json(tmp_path, capsys):
    """The CI check: ``posemb bench --quick`` runs every section (``step``: its own test) and
    writes valid JSON."""
    output = tmp_path / "nested" / "bench.json"
    threads = torch.get_num_threads()
    # One thread: on a shared machine two OpenMP threads can wait on each other for milliseconds
    # per op, which makes the run slow without making the check stronger.
    code = main(["bench", "--quick", "--repeats", "1", "--threads", "1", "--sections", ",".join(ATTENTION_SECTIONS),
                 "--output", str(output)])
    assert torch.get_num_threads() == threads  # restored
    assert code == 0
    printed = capsys.readouterr().out
    for heading in ("RoPE on q and k", "RoPE model step", "Relative attention", "Newer content-site schemes",
                    "Bias site", "Training throughput", "Targets"):
        assert heading in printed
    results = json.loads(output.read_text())
    assert results["torch"] == torch.__version__
    assert results["threads"] == 1
    assert results["quick"] is True and set(results["sections"]) == set(ATTENTION_SECTIONS)
    rope_rows = results["sections"]["rope"]["rows"]
    impls = {row["impl"] for row in rope_rows}
    assert {"copy floor (copy_ into buffers)", "posemb in place", "posemb out=", "posemb out of place"} <= impls
    for row in rope_rows:
        assert row["dtype"] in ("float32", "bfloat16") and len(row["shape"]) == 4
        assert row["median_ms"] > 0 and row["x_floor"] > 0
    assert all(row["x_floor"] == 1.0 for row in rope_rows if row["impl"].startswith("copy floor"))
    # The model-step rows: rotate (and the packed path plain RoPE takes) per shape and dtype.
    model_rows = results["sections"]["rope"]["model_rows"]
    configurations = {(tuple(row["shape"]), row["dtype"]) for row in rope_rows}
    for configuration in configurations:
        impls = {row["impl"]: row for row in model_rows if (tuple(row["shape"]), row["dtype"]) == configuration}
        assert set(impls) == {bench.ROPE_STEP_FLOOR, bench.ROPE_STEP_ROTATE, bench.ROPE_STEP_PACKED}
        assert impls[bench.ROPE_STEP_FLOOR]["x_floor"] == 1.0
        assert all(_finite_positive(row["median_ms"]) and _finite_positive(row["x_floor"]) for row in impls.values())
    step_notes = [note for note in results["sections"]["rope"]["notes"] if note.startswith("model step")]
    assert len(step_notes) == len(configurations)
    for note in step_notes:  # outputs and gradients of both paths against the float64 formula
        bound = 1e-5 if "float32" in note else 5e-2  # bf16: its own rounding
        diffs = [float(part.split()[-1]) for part in note.rsplit(": ", 1)[1].split(", ")]
        assert len(diffs) == 2 and all(diff < bound for diff in diffs), note
    relative = results["sections"]["relative"]
    assert {row["impl"] for row in relative["rows"]} >= {"plain SDPA (causal)", "shaw (posemb)", "shaw (naive)",
                                                         "transformer_xl (naive)", "deberta (naive)"}
    checked = [note for note in relative["notes"] if "max |posemb - naive|" in note]
    assert len(checked) == 3
    for note in checked:  # the naive forms agree with posemb's own (computed inside the bench)
        assert float(note.rsplit("= ", 1)[1].split()[0]) < 1e-4
    newer = relative["causal_rows"]
    for mode in ("forward", "forward+backward"):
        rows = {row["impl"]: row for row in newer if row["mode"] == mode}
        assert set(rows) == {"plain SDPA (causal)"} | {f"{name} (posemb)" for name in bench.NEWER_CONTENT_SCHEMES}
        assert rows["plain SDPA (causal)"]["x_sdpa_causal"] == 1.0
        assert all(_finite_positive(row["x_sdpa_causal"]) for row in rows.values())
    dense = [note for note in relative["notes"] if "max |posemb - dense float64|" in note]
    assert len(dense) == len(bench.NEWER_CONTENT_SCHEMES)
    for note in dense:
        assert float(note.rsplit("= ", 1)[1].split()[0]) < 1e-4, note
    bias = results["sections"]["bias"]
    assert {row["mode"] for row in bias["rows"]} == {"forward", "forward+backward"}
    assert {row["impl"] for row in bias["rows"]} >= {f"{name} (posemb auto)" for name in bench.NEWER_BIAS_SCHEMES}
    checked = [note for note in bias["notes"] if "max |auto - dense|" in note]
    assert len(checked) == 2 + len(bench.NEWER_BIAS_SCHEMES)
    for note in checked:
        assert float(note.rsplit("= ", 1)[1]) < 1e-4, note
    train = results["sections"]["train"]["rows"]
    assert any(row["impl"].startswith("posemb TransformerLM") for row in train)
    assert all(row["tokens_per_s"] > 0 for row in train)
    assert all(target["met"] is None for target in results["targets"])  # quick: indicative only
    names = {target["name"]: target for target in results["targets"]}
    assert any(name.startswith("rope in place") for name in names)
    assert any(name.startswith("rope model step rope.rotate ") for name in names)
    assert any(name.startswith("t5 (posemb auto) fwd+bwd") and t["target"] == "<= 1.25" for name, t in names.items())
    assert any(name.startswith("cope (posemb) time") and t["target"] == "<= 1.5" for name, t in names.items())
    assert any(name.startswith("shaw (posemb) time / SDPA") for name in names)
    assert all(t["target"] == ">= 1.3" for name, t in names.items() if "x-transformers" in name)


def _step_run(tmp_path, capsys, *extra):
    output = tmp_path / "step.json"
    assert main(["bench", "--quick", "--sections", "step", "--repeats", "1", "--threads", "1",
                 "--output", str(output), *extra]) == 0
    return json.loads(output.read_text()), capsys.readouterr().out


@pytest.mark.slow
def test_bench_step_covers_every_registered_scheme(tmp_path, capsys):
    """``posemb bench --quick --sections step``: one row per registered scheme (or a reason it is
    skipped), ratios to NoPE from the same run, a time and a memory target for each scheme."""
    results, printed = _step_run(tmp_path, capsys)
    step = results["sections"]["step"]
    rows = {row["scheme"]: row for row in step["rows"]}
    assert step["failed"] == {}
    assert set(rows) | set(step["skipped"]) == set(posemb.available())
    assert all(reason.strip() for reason in step["skipped"].values())
    assert rows["nope"]["x_nope_time"] == 1.0
    for name, row in rows.items():
        assert (row["time_length"], row["memory_length"]) == bench.STEP_LENGTHS["quick"]
        assert len(row["step_times_ms"]) == 1 and _finite_positive(row["median_step_ms"])
        assert _finite_positive(row["x_nope_time"]), name
        if row["peak_mib"] is not None:  # Linux
            assert _finite_positive(row["peak_mib"]) and _finite_positive(row["x_nope_memory"]), name
        # A training step at initialisation: cross-entropy near log(vocab), not NaN.
        assert abs(row["first_loss"] - math.log(step["model"]["vocab_size"])) < 1.0, name
        assert name in printed
    assert rows["learned"]["options"] == {"max_positions": repr(bench.STEP_LENGTHS["quick"][1])}
    targets = {target["name"]: target for target in results["targets"]}
    for name in set(rows) - {"nope"}:
        time_target = targets[f"step {name} time / nope, L={step['time_length']}"]
        memory_target = targets[f"step {name} peak memory / nope, L={step['memory_length']}"]
        assert time_target["value"] == round(rows[name]["x_nope_time"], 3) and time_target["target"] == "<= 1.5"
        assert memory_target["target"] == "<= 1.5"
        assert time_target["met"] is None  # quick: printed, not judged
    assert "Training step, every registered scheme" in printed


def test_bench_step_reports_skipped_and_failed_schemes(tmp_path, capsys, monkeypatch):
    """A scheme in STEP_SKIPPED is listed with its reason; one that cannot run is reported as
    FAILED (a NOT met target even under --quick), never left out."""
    monkeypatch.setattr(posemb, "available", lambda: ["alibi", "nope", "rope"])
    monkeypatch.setattr(bench, "STEP_SKIPPED", {"alibi": "left out for this test"})
    monkeypatch.setattr(bench, "STEP_OPTIONS", {"rope": (lambda length: {"base": -1.0}, "a bad option")})
    results, printed = _step_run(tmp_path, capsys)
    step = results["sections"]["step"]
    assert [row["scheme"] for row in step["rows"]] == ["nope"]
    assert step["skipped"] == {"alibi": "left out for this test"}
    assert "base" in step["failed"]["rope"]
    assert "alibi" in printed and "skipped: left out for this test" in printed and "FAILED" in printed
    targets = {target["name"]: target for target in results["targets"]}
    assert targets["step rope time / nope, L=64"]["met"] is False
    assert targets["step alibi time / nope, L=64"]["met"] is None
    assert "skipped: left out for this test" in targets["step alibi time / nope, L=64"]["detail"]


def test_dense_content_references_see_the_scheme_and_agree_with_attend():
    """The bench's float64 dense forms of FIRE, forgetting and CoPE differ from plain attention
    (the scheme's term is not zero) and agree with posemb's blocked attention."""
    from posemb.model.attention import attend

    heads, head_dim, length = 2, 8, 40
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, head_dim, generator=generator) for _ in range(3))
    positions = torch.arange(length)[None]
    plain = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    for name, scheme in bench._newer_content_schemes(heads, head_dim).items():
        dense = bench._dense_content_reference(scheme, q, k, v, positions)
        assert (dense - plain).abs().max() > 1e-3, name
        with torch.no_grad():
            got = attend(q, k, v, scheme, positions, positions, causal=True)
        torch.testing.assert_close(got.double(), dense, atol=1e-5, rtol=1e-5, msg=name)


def test_peak_memory_probe_sees_an_allocation():
    peak = bench.peak_memory_bytes(lambda: torch.ones(16 << 20 >> 2))  # 16 MiB
    if peak is None:
        pytest.skip("no /proc memory accounting here")
    assert peak >= 15 << 20


def test_time_interleaved_counts_calls():
    calls = {"a": 0, "b": 0}

    def make(name):
        def function():
            calls[name] += 1
        return function

    times = bench.time_interleaved({"a": make("a"), "b": make("b")}, repeats=3, warmup=2)
    assert calls == {"a": 5, "b": 5} and all(len(t) == 3 for t in times.values())


def test_time_interleaved_prepares_each_call_outside_the_timing():
    """``prepare``: a fresh argument per call (warm-up included), its cost not in the timing."""
    import time

    made, seen = [], []

    def prepare():
        time.sleep(0.05)
        made.append(len(made))
        return made[-1]

    times = bench.time_interleaved({"a": seen.append}, repeats=3, warmup=1, prepare={"a": prepare})
    assert seen == [0, 1, 2, 3] and len(times["a"]) == 3
    assert max(times["a"]) < 0.05


def test_bench_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--sections", "rope,gpu"])
    assert "sections must be a comma-separated subset" in capsys.readouterr().err
    assert main(["bench", "--repeats", "0", "--sections", "rope"]) == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err
