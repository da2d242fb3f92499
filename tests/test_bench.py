"""``posemb bench``: the CLI runs, prints a table and writes valid JSON with ratios and metadata."""
from __future__ import annotations

import json

import pytest
import torch

from posemb import bench
from posemb.cli import main


@pytest.mark.slow
def test_bench_quick_writes_valid_json(tmp_path, capsys):
    """The CI check: ``posemb bench --quick`` runs every section and writes valid JSON."""
    output = tmp_path / "nested" / "bench.json"
    threads = torch.get_num_threads()
    # One thread: on a shared machine two OpenMP threads can wait on each other for milliseconds
    # per op, which makes the run slow without making the check stronger.
    code = main(["bench", "--quick", "--repeats", "1", "--threads", "1", "--output", str(output)])
    assert torch.get_num_threads() == threads  # restored
    assert code == 0
    printed = capsys.readouterr().out
    for heading in ("RoPE on q and k", "Relative attention", "Bias site", "Training throughput", "Targets"):
        assert heading in printed
    results = json.loads(output.read_text())
    assert results["torch"] == torch.__version__
    assert results["threads"] == 1
    assert results["quick"] is True and set(results["sections"]) == set(bench.SECTIONS)
    rope_rows = results["sections"]["rope"]["rows"]
    impls = {row["impl"] for row in rope_rows}
    assert {"copy floor (copy_ into buffers)", "posemb in place", "posemb out=", "posemb out of place"} <= impls
    for row in rope_rows:
        assert row["dtype"] in ("float32", "bfloat16") and len(row["shape"]) == 4
        assert row["median_ms"] > 0 and row["x_floor"] > 0
    assert all(row["x_floor"] == 1.0 for row in rope_rows if row["impl"].startswith("copy floor"))
    relative = results["sections"]["relative"]
    assert {row["impl"] for row in relative["rows"]} >= {"plain SDPA (causal)", "shaw (posemb)", "shaw (naive)",
                                                         "transformer_xl (naive)", "deberta (naive)"}
    checked = [note for note in relative["notes"] if "max |posemb - naive|" in note]
    assert len(checked) == 3
    for note in checked:  # the naive forms agree with posemb's own (computed inside the bench)
        assert float(note.rsplit("= ", 1)[1].split()[0]) < 1e-4
    assert {row["mode"] for row in results["sections"]["bias"]["rows"]} == {"forward", "forward+backward"}
    train = results["sections"]["train"]["rows"]
    assert any(row["impl"].startswith("posemb TransformerLM") for row in train)
    assert all(row["tokens_per_s"] > 0 for row in train)
    assert all(target["met"] is None for target in results["targets"])  # quick: indicative only
    assert any(target["name"].startswith("rope in place") for target in results["targets"])


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


def test_bench_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--sections", "rope,gpu"])
    assert "sections must be a comma-separated subset" in capsys.readouterr().err
    assert main(["bench", "--repeats", "0", "--sections", "rope"]) == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err
