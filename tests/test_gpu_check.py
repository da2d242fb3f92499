"""The GPU check (bench/gpu_check.sh): its dry run on CPU (what CI can run), and the CUDA tests
it runs when a GPU is lent (skipped cleanly without CUDA; their names contain ``cuda`` so that
``pytest -k cuda`` selects them)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import posemb
from posemb.functional.rope import apply_rotary as reference_rotary, rotary_cos_sin
from posemb.model.attention import attend

ROOT = Path(__file__).resolve().parent.parent
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")], check=True)


def test_gpu_check_dry_run_writes_every_step(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["dry_run"] is True
    steps = results["steps"]
    assert list(steps) == ["environment", "cuda_tests", "rope_bandwidth", "bias_attention", "study_throughput"]
    assert steps["environment"]["status"] == "ok" and steps["environment"]["torch"] == torch.__version__
    for name in ("cuda_tests", "rope_bandwidth", "bias_attention", "study_throughput"):
        assert steps[name]["status"] == "skipped", (name, steps[name])
        assert "no CUDA" in steps[name]["skipped"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "dry run" in table and all(f"| {name} |" in table for name in steps)


def test_gpu_check_refuses_empty_out(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", ""],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--out" in done.stderr


def test_a_failing_step_is_recorded_and_the_rest_run(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)

    def broken(dry_run):
        raise RuntimeError("deliberately broken")
    monkeypatch.setattr(gpu_check, "STEPS", [("broken", broken, 10), *gpu_check.STEPS[:1]])
    results = gpu_check.run(tmp_path, dry_run=True)
    assert results["steps"]["broken"] == {"status": "failed", "seconds": results["steps"]["broken"]["seconds"],
                                          "error": "RuntimeError: deliberately broken"}
    assert results["steps"]["environment"]["status"] == "ok"


# ---- CUDA tests (run by the GPU check; skipped here without CUDA) ------------------------------

@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_cuda_triton_rope_forward_backward_match_reference(dtype, interleaved):
    from posemb.kernels import apply_rotary
    x = torch.randn(2, 4, 300, 64, device="cuda", dtype=dtype, requires_grad=True)
    positions = torch.arange(300, device="cuda")[None].expand(2, -1)
    inv_freq = 10000.0 ** (-torch.arange(0, 64, 2, device="cuda", dtype=torch.float64) / 64)
    cos, sin = rotary_cos_sin(positions, inv_freq)
    out = apply_rotary(x, cos, sin, interleaved=interleaved, backend="triton")
    expected = reference_rotary(x.detach().double(), cos.double(), sin.double(), interleaved=interleaved)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)
    grad = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, grad)
    # the rotation is orthogonal: its backward is the rotation by -theta
    expected_dx = reference_rotary(grad.double(), cos.double(), -sin.double(), interleaved=interleaved)
    torch.testing.assert_close(dx.double(), expected_dx, atol=tolerance, rtol=tolerance)


@needs_cuda
@pytest.mark.parametrize("name", ["t5", "alibi", "kerple", "sandwich", "dynamic_position_bias"])
def test_cuda_flex_score_mods_match_dense_bias(name):
    scheme = posemb.build(name, num_heads=4).cuda()
    q, k, v = (torch.randn(1, 4, 256, 32, device="cuda", requires_grad=True) for _ in range(3))
    positions = torch.arange(256, device="cuda")[None]
    grad = torch.randn(1, 4, 256, 32, device="cuda")
    results = {}
    for path in ("auto", "dense"):
        scheme.zero_grad()
        out = attend(q, k, v, scheme, positions, positions, causal=True, bias_path=path)
        grads = torch.autograd.grad(out, [q, k, v, *scheme.parameters()], grad)
        results[path] = (out, grads)
    torch.testing.assert_close(results["auto"][0], results["dense"][0], atol=2e-4, rtol=2e-4)
    for fast, dense in zip(results["auto"][1], results["dense"][1]):
        torch.testing.assert_close(fast, dense, atol=2e-3, rtol=2e-3)


@needs_cuda
def test_cuda_study_model_trains_a_few_steps():
    from posemb.lab.train import ModelConfig, TrainConfig, build_model, train_model
    config = TrainConfig(train_length=64, batch_size=4, steps=5, lr=1e-3, warmup_steps=1)
    model = build_model("rope", ModelConfig(dim=64, depth=2, heads=4), 64, seed=0)
    data = torch.randint(0, 256, (4, 65))
    result = train_model(model, lambda step: (data[:, :-1], data[:, 1:]), config, device="cuda", progress=False)
    assert result.steps == 5 and result.tokens_per_s > 0 and torch.isfinite(torch.tensor(result.final_loss))
    assert next(model.parameters()).device.type == "cuda"
