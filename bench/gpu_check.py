"""The GPU check: CUDA tests and CUDA benchmarks in one bounded run (``bash bench/gpu_check.sh``).

A GPU is lent to this project now and then, for minutes; this script is what such minutes run.
Every step is a function below, run with its own time limit (``signal.alarm``); a failed or
timed-out step is recorded and the next one runs. Results go to ``<out>/gpu_check.json`` (every
timing, every status) and ``<out>/gpu_check.md`` (one table).

Steps (each ``ok`` / ``failed`` / ``skipped`` with a reason):

* ``environment``: torch, CUDA, triton, the device.
* ``cuda_tests``: the CUDA tests of ``tests/test_gpu_check.py`` (Triton RoPE forward and
  backward against the plain formula, FlexAttention ``score_mod``s forward and backward against the
  dense bias, the study model for a few steps), through pytest.
* ``rope_bandwidth``: posemb's Triton RoPE in place on q and k against a device-to-device copy of
  q and k in the same run (target: the rotation reaches >= 85 % of the copy's bandwidth, i.e.
  copy time / rotation time >= 0.85), and Liger-Kernel's and flash-attn's rotary when importable.
* ``bias_attention``: T5, ALiBi, Kerple through posemb's bias path (FlexAttention on CUDA) against
  causal SDPA, forward and forward+backward, L = 2048 and 8192.
* ``study_throughput``: ``posemb study --profile full`` for a few steps of rope and alibi on CUDA;
  its training tokens/s from the runs' ``train.json``.

``--dry-run`` (automatic without CUDA) imports everything each step needs, then records every
GPU step as ``skipped: no CUDA`` — seconds on a CPU machine; CI runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
ROPE_SHAPES = [(1, 32, 8192, 128), (8, 32, 2048, 128)]
BIAS_LENGTHS = [2048, 8192]
BANDWIDTH_TARGET = 0.85


class StepTimeout(Exception):
    pass


def _cuda_time(function: Callable[[], object], repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``function`` on the current CUDA stream (CUDA events)."""
    import torch
    for _ in range(warmup):
        function()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    times.sort()
    return times[len(times) // 2]


def step_environment(dry_run: bool) -> dict:
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    return info


def step_cuda_tests(dry_run: bool) -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
               str(ROOT / "tests" / "test_gpu_check.py")]
    if dry_run:
        return {"skipped": "no CUDA (dry run)", "command": " ".join(command)}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
    if done.returncode != 0:
        raise RuntimeError("pytest exit status %d:\n%s" % (done.returncode, "\n".join(tail)))
    return {"command": " ".join(command), "summary": tail[-1] if tail else ""}


def step_rope_bandwidth(dry_run: bool) -> dict:
    import torch
    from posemb.functional.rope import rotary_cos_sin
    from posemb.kernels import apply_rotary_qk
    optional = {}
    try:
        from liger_kernel.ops.rope import LigerRopeFunction  # noqa: F401
        optional["liger"] = True
    except Exception as error:  # not installed, or fails to import: noted, not fatal
        optional["liger"] = f"not importable: {type(error).__name__}"
    try:
        from flash_attn.layers.rotary import apply_rotary_emb  # noqa: F401
        optional["flash_attn"] = True
    except Exception as error:
        optional["flash_attn"] = f"not importable: {type(error).__name__}"
    if dry_run:
        return {"skipped": "no CUDA (dry run)", "optional": optional}
    rows = []
    for shape in ROPE_SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            batch, heads, length, head_dim = shape
            q = torch.randn(shape, device="cuda", dtype=dtype)
            k = torch.randn_like(q)
            q_copy, k_copy = torch.empty_like(q), torch.empty_like(k)
            positions = torch.arange(length, device="cuda")[None]
            inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, device="cuda", dtype=torch.float64) / head_dim)
            cos, sin = rotary_cos_sin(positions, inv_freq)
            timings = {
                "copy": _cuda_time(lambda: (q_copy.copy_(q), k_copy.copy_(k))),
                "posemb_triton_inplace": _cuda_time(
                    lambda: apply_rotary_qk(q, k, cos, sin, inplace=True, backend="triton")),
            }
            if optional["liger"] is True:
                from liger_kernel.ops.rope import LigerRopeFunction
                cos_full, sin_full = torch.cat([cos, cos], -1).to(dtype), torch.cat([sin, sin], -1).to(dtype)
                q_t, k_t = q.clone(), k.clone()
                timings["liger"] = _cuda_time(lambda: LigerRopeFunction.apply(q_t, k_t, cos_full, sin_full))
            if optional["flash_attn"] is True:
                from flash_attn.layers.rotary import apply_rotary_emb
                q_b = q.transpose(1, 2).contiguous()  # flash-attn: (batch, seq, heads, dim)
                k_b = k.transpose(1, 2).contiguous()
                cos_h, sin_h = cos[0].to(dtype), sin[0].to(dtype)
                timings["flash_attn"] = _cuda_time(
                    lambda: (apply_rotary_emb(q_b, cos_h, sin_h, inplace=True),
                             apply_rotary_emb(k_b, cos_h, sin_h, inplace=True)))
            bytes_moved = 2 * 2 * q.numel() * q.element_size()  # read + write of q and k
            rows.append({"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "ms": timings,
                         "copy_GBps": bytes_moved / timings["copy"] / 1e6,
                         "fraction_of_copy": timings["copy"] / timings["posemb_triton_inplace"],
                         "target": BANDWIDTH_TARGET,
                         "met": timings["copy"] / timings["posemb_triton_inplace"] >= BANDWIDTH_TARGET})
    return {"rows": rows, "optional": optional}


def step_bias_attention(dry_run: bool) -> dict:
    import torch
    import torch.nn.functional as F
    import posemb
    from posemb.model.attention import attend
    names = ["t5", "alibi", "kerple"]
    if dry_run:
        for name in names:
            posemb.build(name, num_heads=8)
        return {"skipped": "no CUDA (dry run)", "schemes": names}
    rows = []
    heads, head_dim = 8, 64
    for length in BIAS_LENGTHS:
        q, k, v = (torch.randn(1, heads, length, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        positions = torch.arange(length, device="cuda")[None]
        grad = torch.randn_like(q)

        def forward(scheme):
            with torch.no_grad():
                if scheme is None:
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
                return attend(q, k, v, scheme, positions, positions, causal=True)

        def forward_backward(scheme):
            out = (F.scaled_dot_product_attention(q, k, v, is_causal=True) if scheme is None
                   else attend(q, k, v, scheme, positions, positions, causal=True))
            out.backward(grad)

        sdpa = {"forward": _cuda_time(lambda: forward(None)), "forward_backward": _cuda_time(lambda: forward_backward(None))}
        for name in names:
            scheme = posemb.build(name, num_heads=heads).cuda()
            fwd = _cuda_time(lambda: forward(scheme))
            fwd_bwd = _cuda_time(lambda: forward_backward(scheme))
            rows.append({"scheme": name, "length": length, "ms_forward": fwd, "ms_forward_backward": fwd_bwd,
                         "sdpa_forward": sdpa["forward"], "sdpa_forward_backward": sdpa["forward_backward"],
                         "x_sdpa_forward": fwd / sdpa["forward"],
                         "x_sdpa_forward_backward": fwd_bwd / sdpa["forward_backward"]})
    return {"rows": rows}


def step_study_throughput(dry_run: bool) -> dict:
    command = [sys.executable, "-m", "posemb.cli", "study", "--profile", "full", "--schemes", "rope,alibi",
               "--steps", "60", "--eval-tokens", "65536", "--eval-lengths", "512,1024", "--device", "cuda",
               "--no-progress"]
    if dry_run:
        import posemb.lab.study  # noqa: F401 (the step's imports work)
        return {"skipped": "no CUDA (dry run)", "command": " ".join(command)}
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([*command, "--out", out], cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError("posemb study exit status %d: %s" % (done.returncode, (done.stderr or done.stdout)[-2000:]))
        rates = {}
        for train_json in Path(out).glob("runs/*/train.json"):
            record = json.loads(train_json.read_text())
            rates[train_json.parent.name] = record.get("tokens_per_s")
    return {"command": " ".join(command), "tokens_per_s": rates}


STEPS: list[tuple[str, Callable[[bool], dict], int]] = [
    ("environment", step_environment, 60),
    ("cuda_tests", step_cuda_tests, 180),
    ("rope_bandwidth", step_rope_bandwidth, 90),
    ("bias_attention", step_bias_attention, 120),
    ("study_throughput", step_study_throughput, 150),
]


def _alarm(signum, frame):
    raise StepTimeout()


def run(out: Path, dry_run: bool) -> dict:
    import torch
    dry_run = dry_run or not torch.cuda.is_available()
    results = {"dry_run": dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": {}}
    signal.signal(signal.SIGALRM, _alarm)
    for name, function, limit in STEPS:
        start = time.perf_counter()
        signal.alarm(limit)
        try:
            detail = function(dry_run)
            status = "skipped" if "skipped" in detail else "ok"
        except StepTimeout:
            detail, status = {"error": f"timed out after {limit} s"}, "failed"
        except Exception as error:  # a failed step is recorded; the next one runs
            detail, status = {"error": f"{type(error).__name__}: {error}"}, "failed"
        finally:
            signal.alarm(0)
        results["steps"][name] = {"status": status, "seconds": round(time.perf_counter() - start, 2), **detail}
        print(f"[gpu_check] {name}: {status} ({results['steps'][name]['seconds']} s)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(format_table(results))
    return results


def format_table(results: dict) -> str:
    lines = ["# posemb GPU check" + (" (dry run: no CUDA)" if results["dry_run"] else ""), "",
             "| step | status | seconds | detail |", "|---|---|---|---|"]
    for name, step in results["steps"].items():
        detail = step.get("skipped") or step.get("error") or ""
        lines.append(f"| {name} | {step['status']} | {step['seconds']} | {str(detail).splitlines()[0] if detail else ''} |")
    rope = results["steps"].get("rope_bandwidth", {})
    if rope.get("rows"):
        lines += ["", "| shape | dtype | copy ms | posemb Triton in place ms | copy time / rotation time (target >= 0.85) | others ms |",
                  "|---|---|---|---|---|---|"]
        for row in rope["rows"]:
            others = ", ".join(f"{k} {v:.3f}" for k, v in row["ms"].items() if k not in ("copy", "posemb_triton_inplace"))
            lines.append(f"| {row['shape']} | {row['dtype']} | {row['ms']['copy']:.3f} | {row['ms']['posemb_triton_inplace']:.3f} "
                         f"| {row['fraction_of_copy']:.2f} ({'met' if row['met'] else 'not met'}) | {others or '-'} |")
    bias = results["steps"].get("bias_attention", {})
    if bias.get("rows"):
        lines += ["", "| scheme | L | forward ms (x SDPA) | forward+backward ms (x SDPA) |", "|---|---|---|---|"]
        for row in bias["rows"]:
            lines.append(f"| {row['scheme']} | {row['length']} | {row['ms_forward']:.2f} ({row['x_sdpa_forward']:.2f}) "
                         f"| {row['ms_forward_backward']:.2f} ({row['x_sdpa_forward_backward']:.2f}) |")
    study = results["steps"].get("study_throughput", {})
    if study.get("tokens_per_s"):
        lines += ["", "| study run | training tokens/s |", "|---|---|"]
        lines += [f"| {name} | {rate:,.0f} |" for name, rate in sorted(study["tokens_per_s"].items()) if rate]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="import and skip every GPU step (automatic without CUDA)")
    parser.add_argument("--out", default="gpu-check", help="folder for gpu_check.json and gpu_check.md")
    args = parser.parse_args(argv)
    if not args.out:
        parser.error("--out must be a folder name, got ''")
    results = run(Path(args.out), args.dry_run)
    failed = [name for name, step in results["steps"].items() if step["status"] == "failed"]
    print(f"[gpu_check] wrote {Path(args.out) / 'gpu_check.json'} and gpu_check.md"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
