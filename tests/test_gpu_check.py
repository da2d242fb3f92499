"""The GPU check (``bench/gpu_check.sh``): its dry run and its bookkeeping on CPU (what CI runs), and
the CUDA tests it runs when a GPU is lent.

The CUDA tests (names containing ``cuda``, which ``pytest -k cuda`` selects) are skipped cleanly
without CUDA. Each calls a checker that also runs here on the CPU back ends (the ``cpu`` tests), so
CI keeps the checkers working between the rare GPU runs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import posemb
from posemb.functional.rope import apply_rotary as reference_rotary, rotary_cos_sin
from posemb.model.attention import attend

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
STEP_NAMES = ["environment", "cuda_tests", "rope_bandwidth", "bias_attention", "train_throughput", "study_full"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_check as module
    finally:
        sys.path.pop(0)
    return module


@pytest.fixture
def many_compiles(monkeypatch):
    """posemb.kernels.flex compiles flex_attention once (dynamic=False): each score_mod, shape and
    grad mode below is another entry, and past dynamo's recompile limit (8) it would run eagerly,
    so the compiled kernel would not be the one tested."""
    import torch._dynamo.config as dynamo_config
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    monkeypatch.setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))


# ---- the script, on CPU ---------------------------------------------------------------------------
def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_step(tmp_path):
    """What CI can run: the wrapper starts, every step's imports and arguments are checked, every GPU
    step is skipped for want of CUDA, and both files are written."""
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path / "out")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert results["dry_run"] is True and results["finished"]
    steps = results["steps"]
    assert list(steps) == STEP_NAMES
    assert steps["environment"]["status"] == "ok"
    assert steps["environment"]["torch"] == torch.__version__
    assert steps["environment"]["cuda_available"] == torch.cuda.is_available()
    expected_reason = "dry run (--dry-run)" if torch.cuda.is_available() else "no CUDA"
    for name in STEP_NAMES[1:]:
        assert steps[name]["status"] == "skipped", (name, steps[name])
        assert steps[name]["reason"] == expected_reason
    # the dry run got as far as each step's own checks: the commands it would run, the model it would train
    assert "-k cuda" in steps["cuda_tests"]["command"]
    assert "--profile full" in steps["study_full"]["command"]
    assert steps["train_throughput"]["model"]["dim"] == 512
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "(dry run)" in table
    for name in STEP_NAMES[1:]:
        assert f"| {name} | skipped |" in table and f"| {expected_reason} |" in table


@pytest.mark.parametrize("argv, message", [
    (["--out", ""], "--out must name a directory"),
    (["--only", "rope,nonsense"], "--only takes step names"),
    (["--budget", "0"], "--budget must be a positive number"),
    (["--budget", "soon"], "--budget must be a positive number"),
])
def test_gpu_check_bad_arguments_name_the_argument(gpu_check, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--dry-run", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_gpu_check_out_under_a_file_is_refused(gpu_check, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run", "--out", str(tmp_path / "file" / "out")])
    assert "--out" in capsys.readouterr().err


def test_failed_and_timed_out_steps_are_recorded_and_the_rest_run(gpu_check, tmp_path):
    def broken(step):
        step.detail["measured"] = 1.5  # kept although the step fails afterwards
        raise RuntimeError("deliberately broken")

    def slow(step):
        step.detail["rows"] = ["first row"]
        time.sleep(30)

    def fine(step):
        step.detail["value"] = 2

    steps = [("broken", broken, 10), ("slow", slow, 5), ("fine", fine, 10)]
    start = time.monotonic()
    results = gpu_check.run(tmp_path, steps=steps, budget=100)
    assert time.monotonic() - start < 20  # the sleeping step was cut at its 5 s limit
    broken_result, slow_result = results["steps"]["broken"], results["steps"]["slow"]
    assert broken_result["status"] == "failed" and broken_result["reason"] == "RuntimeError: deliberately broken"
    assert broken_result["measured"] == 1.5
    assert slow_result["status"] == "failed" and slow_result["reason"].startswith("timed out after 5 s")
    assert slow_result["rows"] == ["first row"]
    assert results["steps"]["fine"]["status"] == "ok" and results["steps"]["fine"]["value"] == 2
    on_disk = json.loads((tmp_path / "gpu_check.json").read_text())
    assert on_disk["steps"]["slow"]["rows"] == ["first row"]


def test_spent_budget_skips_the_remaining_steps(gpu_check, tmp_path):
    ran = []

    def sleeper(step):
        ran.append(step.seconds)
        time.sleep(step.seconds + 1)  # outlives its share: cut by the alarm

    steps = [("first", sleeper, 6), ("second", sleeper, 100)]
    results = gpu_check.run(tmp_path, steps=steps, budget=8)
    assert ran == [6]
    assert results["steps"]["first"]["status"] == "failed"
    assert results["steps"]["second"]["status"] == "skipped"
    assert results["steps"]["second"]["reason"].startswith("out of time")


def test_only_runs_the_named_steps(gpu_check, tmp_path):
    results = gpu_check.run(tmp_path, dry_run=True, only=["environment", "study_full"])
    assert list(results["steps"]) == ["environment", "study_full"]


@pytest.mark.slow
def test_every_measuring_step_runs_on_the_cpu_target(gpu_check, tmp_path, monkeypatch):
    """The GPU steps' own code, on the CPU back ends at toy sizes (``Target.cpu_smoke``): what would
    break in the minutes a GPU is lent breaks here first. Only the device, back ends and sizes differ."""
    data = tmp_path / "data.txt"
    data.write_text((ROOT / "posemb" / "bench.py").read_text())
    study_args = ("--profile", "quick", "--schemes", "rope", "--steps", "2", "--dim", "32", "--depth", "1",
                  "--heads", "2", "--train-length", "32", "--batch-size", "2", "--eval-lengths", "32",
                  "--eval-tokens", "256", "--rope-variants", "none", "--no-progress", "--data", str(data))
    monkeypatch.setattr(gpu_check, "TARGET", gpu_check.Target.cpu_smoke(study_args))
    measured = ["rope_bandwidth", "bias_attention", "train_throughput", "study_full"]
    results = gpu_check.run(tmp_path / "out", only=measured)
    steps = results["steps"]
    assert results["dry_run"] is False
    assert {name: steps[name]["status"] for name in measured} == dict.fromkeys(measured, "ok"), steps
    rope = steps["rope_bandwidth"]["rows"]
    assert [(row["shape"], row["dtype"]) for row in rope] == [([1, 2, 16, 8], "float32"), ([1, 2, 16, 8], "bfloat16")]
    for row in rope:
        assert set(row["median_ms"]) >= {"copy", "posemb in place", "posemb out=", "posemb new", "posemb forward+backward"}
        assert row["max_abs_diff_vs_reference"] < 0.05 and row["fraction_of_copy"]["posemb in place"] > 0
    bias = steps["bias_attention"]
    assert {(row["mode"], row["impl"]) for row in bias["rows"]} == {
        (mode, impl) for mode in ("forward", "forward+backward")
        for impl in ["sdpa causal", "t5 toeplitz", "alibi toeplitz", "kerple toeplitz"]}
    assert all(diff < 0.05 for diff in bias["max_abs_diff_vs_dense"].values())
    train = steps["train_throughput"]["rows"]
    assert [row["scheme"] for row in train] == ["nope", "alibi"]
    assert train[0]["x_nope_step_time"] == 1.0 and all(row["steady_tokens_per_s"] > 0 for row in train)
    runs = steps["study_full"]["runs"]
    assert len(runs) == 1 and next(iter(runs.values()))["steps"] == 2
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| alibi |" in table and "| forward+backward | 32 | kerple toeplitz |" in table


def test_table_lists_every_benchmark_row(gpu_check):
    """The table of a full run, from results shaped as the steps write them."""
    rope_row = {"shape": [1, 32, 4096, 128], "dtype": "float32", "copy_GBps": 3900.0, "met": False,
                "median_ms": {"copy": 0.1, "posemb in place": 0.125, "posemb out=": 0.12, "posemb new": 0.2,
                              "posemb forward+backward": 0.3, "liger": 0.15},
                "fraction_of_copy": {"posemb in place": 0.8, "posemb out=": 0.83},
                "forward_backward_x_two_copies": 1.5}
    results = {"dry_run": False, "started": "now", "steps": {
        "environment": {"status": "ok", "seconds": 1, "torch": "x", "device": "H200"},
        "cuda_tests": {"status": "failed", "seconds": 2, "reason": "pytest exit status 1: 1 failed | 3 passed",
                       "summary": "1 failed, 3 passed", "failures": ["FAILED tests/x.py::test_a"]},
        "rope_bandwidth": {"status": "ok", "seconds": 3, "rows": [rope_row], "optional": {"flash_attn": "not importable"}},
        "bias_attention": {"status": "ok", "seconds": 4, "rows": [
            {"mode": "forward", "length": 2048, "impl": "t5 flex", "median_ms": 0.5, "x_sdpa_causal": 1.25}]},
        "train_throughput": {"status": "ok", "seconds": 5, "steps": 30, "warmup_steps_excluded": 10, "rows": [
            {"scheme": "t5", "steady_step_ms": 50.0, "steady_tokens_per_s": 655360.0, "x_nope_step_time": 1.1,
             "peak_memory_MiB": 2048.0, "x_nope_peak_memory": 1.2, "first_step_s": 12.0}]},
        "study_full": {"status": "ok", "seconds": 6, "command": "study --profile full", "wall_s": 60,
                       "runs": {"rope-abc": {"steps": 30, "tokens_per_s": 123456.0}}}}}
    table = gpu_check.format_table(results)
    assert "| cuda_tests | failed | 2 | pytest exit status 1: 1 failed / 3 passed |" in table
    assert "- FAILED tests/x.py::test_a" in table
    assert "| [1, 32, 4096, 128] | float32 | 0.100 (3900) | 0.125 (0.80, not met) | 0.120 (0.83) | 0.200 | 0.300 (1.50) | 0.150 |" in table
    assert "flash_attn: not importable" in table
    assert "| forward | 2048 | t5 flex | 0.500 | 1.25 |" in table
    assert "| t5 | 50.0 | 655,360 | 1.10 | 2,048 | 1.20 | 12.0 |" in table
    assert "| rope-abc | 30 | 123,456 |" in table


def test_non_finite_numbers_are_written_as_null(gpu_check, tmp_path):
    gpu_check.write_results(tmp_path, {"dry_run": True, "started": "now", "steps": {
        "environment": {"status": "ok", "seconds": 1.0, "rate": float("nan"), "pair": (1, float("inf"))}}})
    step = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]["environment"]
    assert step["rate"] is None and step["pair"] == [1, None]


# ---- checkers: run on CUDA by the GPU check, on the CPU back ends here -----------------------------
def check_rotary(device: str, backend: str, dtype: torch.dtype, interleaved: bool) -> None:
    """``apply_rotary`` on ``backend`` against the plain formula (float64): new tensor, in place, and
    on strided q/k views of a fused qkv, with partial rotary (48 of 64 channels); its backward
    against the rotation by -theta (the rotation is orthogonal: its Jacobian's transpose is R(-theta))."""
    from posemb.kernels import apply_rotary, apply_rotary_qk
    batch, heads, length, head_dim, rotary_dim = 2, 4, 300, 64, 48
    positions = (torch.arange(length, device=device) + 1000)[None].expand(batch, -1)
    inv_freq = 10000.0 ** (-torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float64) / rotary_dim)
    cos, sin = rotary_cos_sin(positions, inv_freq)
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 1.6e-2}

    def expected(x, sign=1.0):
        return reference_rotary(x.double(), cos.double(), sign * sin.double(), interleaved=interleaved)

    qkv = torch.randn(batch, length, 3, heads, head_dim, device=device).to(dtype).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]  # strided views, as MultiHeadAttention's fused projection gives
    got = apply_rotary(q, cos, sin, interleaved=interleaved, backend=backend)
    torch.testing.assert_close(got.double(), expected(q), **tolerance)
    q2, k2 = q.clone(), k.clone()
    apply_rotary_qk(q2, k2, cos, sin, interleaved=interleaved, inplace=True, backend=backend)
    torch.testing.assert_close(q2.double(), expected(q), **tolerance)
    torch.testing.assert_close(k2.double(), expected(k), **tolerance)
    assert torch.equal(q2[..., rotary_dim:], q[..., rotary_dim:])  # partial rotary: the rest passes

    x = torch.randn(batch, heads, length, head_dim, device=device).to(dtype).requires_grad_()
    out = apply_rotary(x, cos, sin, interleaved=interleaved, backend=backend)
    grad = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, grad)
    torch.testing.assert_close(dx.double(), expected(grad, sign=-1.0), **tolerance)


def check_bias_path(name: str, device: str, path: str, q_len: int, k_len: int) -> None:
    """``attend`` through the fast bias ``path`` against the dense bias (``score_bias`` + SDPA):
    output and the gradients of q, k, v and the scheme's parameters. ``q_len < k_len`` is a KV-cache
    step (queries at the last positions, keys over the whole context)."""
    options = {"dim": 128} if name == "sandwich" else {}
    scheme = posemb.build(name, num_heads=4, **options).to(device)
    if path == "flex" and not callable(getattr(scheme, "score_mod", None)):
        pytest.skip(f"{name} has no score_mod")
    if name == "t5":
        torch.nn.init.normal_(scheme.bias.weight)  # zeros would make every bias path trivially equal
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, q_len, 32, generator=generator).to(device).requires_grad_()
    k, v = (torch.randn(1, 4, k_len, 32, generator=generator).to(device).requires_grad_() for _ in range(2))
    grad = torch.randn(1, 4, q_len, 32, generator=generator).to(device)
    k_positions = (torch.arange(k_len) + 5).to(device)[None]
    q_positions = k_positions[:, k_len - q_len:]
    inputs = [q, k, v, *scheme.parameters()]
    results = {}
    for bias_path in (path, "dense"):
        out = attend(q, k, v, scheme, q_positions, k_positions, causal=True, bias_path=bias_path)
        results[bias_path] = (out, torch.autograd.grad(out, inputs, grad))
    torch.testing.assert_close(results[path][0], results["dense"][0], atol=1e-4, rtol=1e-4)
    for fast, dense in zip(results[path][1], results["dense"][1]):
        torch.testing.assert_close(fast, dense, atol=1e-3, rtol=1e-3)


def check_study_model_trains(scheme: str, device: str) -> None:
    """A small study model (``posemb.lab.train``, as ``posemb study`` builds and trains it) for a few
    steps on ``device``: finite loss, the weights on the device and changed, the loss going down on
    the one repeated batch."""
    from posemb.lab.train import ModelConfig, TrainConfig, build_model, train_model
    config = TrainConfig(train_length=64, batch_size=4, steps=8, lr=3e-3, warmup_steps=1)
    model = build_model(scheme, ModelConfig(dim=64, depth=2, heads=4), 64, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    data = torch.randint(0, 256, (4, 65), generator=torch.Generator().manual_seed(0))
    losses = []

    def batches(step):
        return data[:, :-1], data[:, 1:]

    def record(step):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(data[:, :-1].to(device))
        losses.append(float(torch.nn.functional.cross_entropy(logits.float().reshape(-1, 256),
                                                              data[:, 1:].reshape(-1).to(device))))
        model.train()

    result = train_model(model, batches, config, device=device, progress=False, on_step=record)
    assert result.steps == 8 and result.tokens_per_s > 0 and all(map(torch.isfinite, map(torch.tensor, losses)))
    assert all(p.device.type == device for p in model.parameters())
    assert any(not torch.equal(p.detach().cpu(), b.cpu()) for p, b in zip(model.parameters(), before))
    assert losses[-1] < losses[0]


def test_cpu_checkers_run_on_the_cpu_back_ends():
    check_rotary("cpu", "cpu", torch.float32, interleaved=False)
    check_bias_path("alibi", "cpu", "toeplitz", 40, 40)
    check_study_model_trains("rope", "cpu")


# ---- CUDA tests (what the GPU check's cuda_tests step runs) ---------------------------------------
@needs_cuda
def test_cuda_rotary_auto_backend_is_triton():
    from posemb.kernels import select_backend
    from posemb.kernels.rotary_triton import available
    assert available(), "triton does not import on this CUDA machine"
    assert select_backend(torch.empty(1, 1, 1, 2, device="cuda", dtype=torch.bfloat16)) == "triton"


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_cuda_triton_rope_forward_backward_match_reference(dtype, interleaved):
    check_rotary("cuda", "triton", dtype, interleaved)


@needs_cuda
@pytest.mark.parametrize("name", ["t5", "alibi", "kerple", "sandwich", "dynamic_position_bias"])
def test_cuda_flex_score_mods_match_dense_bias(name, many_compiles):
    check_bias_path(name, "cuda", "flex", 256, 256)


@needs_cuda
def test_cuda_flex_kv_cache_step_matches_dense_bias(many_compiles):
    check_bias_path("t5", "cuda", "flex", 64, 320)


@needs_cuda
@pytest.mark.parametrize("scheme", ["rope", "alibi"])
def test_cuda_model_matches_cpu(scheme, many_compiles):
    """The whole model on CUDA (Triton RoPE / FlexAttention inside attention) against the same
    weights on CPU (the eager / Toeplitz paths), float32."""
    torch.manual_seed(0)
    model = posemb.TransformerLM(256, 64, 2, 4, scheme=scheme).eval()
    tokens = torch.randint(0, 256, (2, 200))
    with torch.no_grad():
        expected = model(tokens)
        got = model.cuda()(tokens.cuda()).cpu()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@needs_cuda
@pytest.mark.parametrize("scheme", ["rope", "alibi", "shaw"])
def test_cuda_study_model_trains_a_few_steps(scheme, many_compiles):
    check_study_model_trains(scheme, "cuda")
