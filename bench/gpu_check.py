"""The GPU check: CUDA tests and CUDA benchmarks in one bounded run (``bash bench/gpu_check.sh``).

A GPU is lent to this project now and then, for minutes; this script is what those minutes run.
Every step below runs under its own time limit (``signal.setitimer``, and ``timeout=`` for the
subprocesses), inside one overall budget (``--budget``, default 450 s; the shell wrapper adds a
hard ``timeout`` of 480 s). A failed or timed-out step is recorded with what it measured so far, and
the next step runs. ``<out>/gpu_check.json`` (every timing, every status) and ``<out>/gpu_check.md``
(the tables) are rewritten after every step, so even a run killed from outside leaves its results.

Steps, each ``ok`` / ``failed`` / ``skipped`` with a reason:

* ``environment``: python, torch, CUDA, triton, FlexAttention, the device, optional baselines.
* ``cuda_tests``: ``pytest -k cuda tests/test_gpu_check.py``: Triton RoPE forward and backward
  against the plain formula (``posemb.functional.rope.apply_rotary``), FlexAttention ``score_mod``s
  (T5, ALiBi, Kerple, Sandwich, dynamic position bias) forward and backward against the dense bias,
  the study model trained a few steps on CUDA. No earlier test of the project runs on CUDA.
* ``rope_bandwidth``: posemb's Triton RoPE on q and k (in place, ``out=``, new tensors, forward +
  backward) against a device-to-device ``copy_`` of q and k in the same interleaved rounds. Target:
  ``copy time / rotation time >= 0.85`` (the rotation reaches 85 % of the copy's bandwidth; both
  read and write q and k once). Liger-Kernel's and flash-attn's rotary when they import.
* ``bias_attention``: T5, ALiBi, Kerple through ``attend(..., bias_path="flex")`` (FlexAttention)
  against causal SDPA, forward and forward + backward, L = 2048 and 8192, bf16.
* ``train_throughput``: the study's ``full`` model (``posemb.lab.study.PROFILES``) trained in this
  process for a few steps per scheme; steady-state tokens/s (after the warm-up steps, which hold
  the compilations) and peak memory, each scheme against NoPE.
* ``study_full``: ``posemb study --profile full`` end to end on CUDA, bounded (few steps, two
  schemes, short evaluation); tokens/s from its runs' ``train.json``.

Timing method (as ``posemb bench``, on the GPU): every implementation of one comparison is timed
in the same interleaved rounds (A, B, C, A, B, C, ...) with CUDA events around a few back-to-back calls;
medians and ratios of medians from that run.

``--dry-run`` (automatic without CUDA) runs every step's imports and checks its arguments, then
records each GPU step as ``skipped`` ("no CUDA" on a machine without it): seconds, and what CI runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/gpu_check.py` from anywhere, posemb not installed
    sys.path.insert(0, str(ROOT))

ROPE_TARGET = 0.85
BIAS_SCHEMES = ["t5", "alibi", "kerple"]


@dataclasses.dataclass
class Target:
    """Where and at what size the measuring steps run. The default is the GPU check; the tests run
    the same step code on the CPU back ends at toy sizes (:meth:`cpu_smoke`), so a broken step shows
    up in CI, not in the few minutes a GPU is lent."""
    device: str = "cuda"
    rope_backend: str = "triton"
    bias_path: str = "flex"
    #: (batch, heads, seq, head_dim): the CPU bench's two shapes (posemb/bench.py) and one larger than L2
    rope_shapes: tuple = ((1, 32, 4096, 128), (8, 8, 1024, 64), (4, 32, 8192, 128))
    bias_lengths: tuple = (2048, 8192)
    bias_shape: tuple = (2, 16, 64)  # batch, heads, head_dim
    train_profile: str = "full"
    train_model: dict = dataclasses.field(default_factory=dict)  # ModelConfig fields replacing the profile's
    train_config: dict = dataclasses.field(default_factory=dict)  # TrainConfig fields replacing the profile's
    train_schemes: tuple = ("nope", "rope", "shaw", "alibi", "t5")  # those that compile FlexAttention last
    train_steps: int = 30
    train_warmup: int = 10  # steps left out of the steady-state rate: compilations, allocator warm-up
    study_args: tuple = ("--profile", "full", "--schemes", "rope,alibi", "--steps", "30", "--eval-lengths",
                         "512", "--eval-tokens", "32768", "--rope-variants", "none", "--no-progress")
    repeats: int = 15
    inner: int = 5

    @classmethod
    def cpu_smoke(cls, study_args: tuple) -> "Target":
        return cls(device="cpu", rope_backend="cpu", bias_path="toeplitz", rope_shapes=((1, 2, 16, 8),),
                   bias_lengths=(32,), bias_shape=(1, 2, 8), train_profile="quick",
                   train_model={"dim": 32, "depth": 1, "heads": 2}, train_config={"batch_size": 2, "train_length": 32},
                   train_schemes=("nope", "alibi"), train_steps=4, train_warmup=2, study_args=study_args,
                   repeats=2, inner=1)


TARGET = Target()


class Skipped(Exception):
    """A step that does not apply here (no CUDA, a dry run): recorded as ``skipped`` with the reason."""


class StepTimeout(Exception):
    pass


@dataclasses.dataclass
class Step:
    """What a step function receives: whether to measure, its time limit, and the dict it fills
    as it goes (kept when the step fails or times out, so partial results are not lost)."""
    dry_run: bool
    skip_reason: str
    seconds: float
    detail: dict

    def skip_if_dry(self) -> None:
        if self.dry_run:
            raise Skipped(self.skip_reason)


# ---- timing ---------------------------------------------------------------------------------------
def _synchronize() -> None:
    import torch
    if TARGET.device == "cuda":
        torch.cuda.synchronize()


def _empty_cache() -> None:
    import torch
    if TARGET.device == "cuda":
        torch.cuda.empty_cache()


def time_interleaved_ms(functions: dict[str, Callable[[], Any]], repeats: int | None = None,
                        inner: int | None = None, warmup: int = 2) -> dict[str, list[float]]:
    """Milliseconds per call of each function, in ``repeats`` interleaved rounds: the CUDA analogue of
    ``posemb.bench.time_interleaved``. Each sample is CUDA events around ``inner`` back-to-back calls
    (divided by ``inner``), so a kernel of a few microseconds is not lost in the events' resolution.
    On a CPU target (the tests) it is ``posemb.bench.time_interleaved`` itself."""
    repeats = TARGET.repeats if repeats is None else repeats
    inner = TARGET.inner if inner is None else inner
    if TARGET.device != "cuda":
        from posemb.bench import time_interleaved
        seconds = time_interleaved(functions, repeats, warmup)
        return {name: [value * 1e3 for value in values] for name, values in seconds.items()}
    import torch
    for function in functions.values():
        for _ in range(warmup):
            function()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        events = {}
        for name, function in functions.items():
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                function()
            stop.record()
            events[name] = (start, stop)
        torch.cuda.synchronize()
        for name, (start, stop) in events.items():
            times[name].append(start.elapsed_time(stop) / inner)
    return times


def allow_recompiles(detail: dict) -> None:
    """Raise torch.compile's per-function recompile limit (8 by default) for this process.

    ``posemb.kernels.flex`` compiles ``flex_attention`` once with ``dynamic=False``: every scheme's
    score_mod, sequence length and grad mode is another entry under that one function, and past the
    limit dynamo silently runs it eagerly (unfused: the scores materialised), which would time the
    wrong thing. The check times more such variants than a model uses, so it lifts the limit and
    records the value it found."""
    import torch._dynamo.config as dynamo_config
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    detail["dynamo_recompile_limit_before"] = getattr(dynamo_config, name)
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- steps ----------------------------------------------------------------------------------------
def step_environment(step: Step) -> None:
    import torch
    info = step.detail
    info.update(python=platform.python_version(), executable=sys.executable, torch=torch.__version__,
                cuda_available=torch.cuda.is_available(), cuda=torch.version.cuda)
    from posemb.kernels.flex import flex_available
    from posemb.kernels import rotary_triton
    info["flex_attention"] = flex_available()
    info["triton"] = getattr(rotary_triton.triton, "__version__", None)
    info["optional"] = _optional_baselines()
    for module in ("pytest", "transformers"):  # from the project's test extra
        try:
            info[module] = __import__(module).__version__
        except Exception as error:
            info[module] = f"not importable: {type(error).__name__}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=f"{props.major}.{props.minor}",
                    memory_GiB=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)


def _optional_baselines() -> dict[str, Any]:
    """Liger-Kernel's and flash-attn's rotary: True when they import, else the reason (not fatal)."""
    found: dict[str, Any] = {}
    for name, module in (("liger", "liger_kernel.transformers.rope"), ("flash_attn", "flash_attn.layers.rotary")):
        try:
            __import__(module)
            found[name] = True
        except Exception as error:  # not installed, or built for another torch
            found[name] = f"not importable: {type(error).__name__}: {str(error)[:120]}"
    return found


def _pytest_command() -> list[str]:
    # -vv (the project's addopts has -q): one line per test, so a run cut by its time limit still
    # says which tests passed
    return [sys.executable, "-m", "pytest", "-vv", "-p", "no:cacheprovider", "-rfEs", "-k", "cuda",
            str(ROOT / "tests" / "test_gpu_check.py")]


def step_cuda_tests(step: Step) -> None:
    import pytest  # noqa: F401 (the test extra is there)
    command = _pytest_command()
    step.detail["command"] = " ".join(command)
    step.skip_if_dry()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env,
                              timeout=max(step.seconds - 5, 1))
    except subprocess.TimeoutExpired as error:
        output = error.stdout or b""
        output = output.decode(errors="replace") if isinstance(output, bytes) else output
        step.detail["passed_before_timeout"] = [line.split(" ")[0] for line in output.splitlines() if " PASSED" in line]
        step.detail["output_tail"] = output.splitlines()[-20:]
        raise
    lines = (done.stdout + done.stderr).strip().splitlines()
    step.detail["summary"] = lines[-1] if lines else ""
    step.detail["failures"] = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    counts = {word: int(number) for number, word in re.findall(r"(\d+) (passed|failed|skipped|error)", step.detail["summary"])}
    step.detail["counts"] = counts
    if done.returncode != 0:
        raise RuntimeError(f"pytest exit status {done.returncode}: {step.detail['summary']}\n" + "\n".join(lines[-30:]))
    if not counts.get("passed"):
        raise RuntimeError(f"no CUDA test ran ({step.detail['summary']}): pytest's process does not see CUDA")


def step_rope_bandwidth(step: Step) -> None:
    import torch
    from posemb.functional.rope import rotary_cos_sin
    from posemb.kernels import apply_rotary_qk
    optional = step.detail["optional"] = _optional_baselines()
    step.skip_if_dry()
    rows = step.detail["rows"] = []
    step.detail["backend"] = TARGET.rope_backend
    for shape in TARGET.rope_shapes:
        for dtype in (torch.float32, torch.bfloat16):
            rows.append(_rope_row(shape, dtype, optional, torch, rotary_cos_sin, apply_rotary_qk))
            _empty_cache()
    step.detail["met"] = all(row["met"] for row in rows)


def _rope_row(shape, dtype, optional, torch, rotary_cos_sin, apply_rotary_qk) -> dict:
    batch, heads, length, head_dim = shape
    device, backend = TARGET.device, TARGET.rope_backend
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(shape, device=device, dtype=dtype, generator=generator)
    k = torch.randn(shape, device=device, dtype=dtype, generator=generator)
    q_buf, k_buf = torch.empty_like(q), torch.empty_like(k)
    # Leaves for the training path; their gradients are dropped after each call.
    q_leaf, k_leaf = q.clone().requires_grad_(), k.clone().requires_grad_()
    grad_q, grad_k = torch.randn_like(q), torch.randn_like(k)
    positions = torch.arange(length, device=device)[None]
    inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
    cos, sin = rotary_cos_sin(positions, inv_freq)

    def forward_backward():
        # what the model's RoPE step costs in training: rotation forward, rotation by -theta backward
        rq, rk = apply_rotary_qk(q_leaf, k_leaf, cos, sin, backend=backend)
        torch.autograd.backward((rq, rk), (grad_q, grad_k))
        q_leaf.grad = k_leaf.grad = None

    functions: dict[str, Callable[[], Any]] = {
        "copy": lambda: (q_buf.copy_(q), k_buf.copy_(k)),
        "posemb in place": lambda: apply_rotary_qk(q_buf, k_buf, cos, sin, inplace=True, backend=backend),
        "posemb out=": lambda: apply_rotary_qk(q, k, cos, sin, out=(q_buf, k_buf), backend=backend),
        "posemb new": lambda: apply_rotary_qk(q, k, cos, sin, backend=backend),
        "posemb forward+backward": forward_backward,
    }
    # Agreement with the plain formula on this shape (the tests check small shapes exactly).
    from posemb.functional.rope import apply_rotary as reference
    expected_q = reference(q.float(), cos, sin).to(dtype)
    got_q, _ = apply_rotary_qk(q, k, cos, sin, backend=backend)
    notes = {"max_abs_diff_vs_reference": float((got_q.float() - expected_q.float()).abs().max())}
    if optional.get("liger") is True:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
        # Liger takes Hugging Face's (1, seq, head_dim) tables (the half table repeated) and rotates in place.
        cos_full, sin_full = torch.cat([cos, cos], -1).to(dtype), torch.cat([sin, sin], -1).to(dtype)
        lq, lk = q.clone(), k.clone()
        functions["liger"] = lambda: liger_rotary_pos_emb(lq, lk, cos_full, sin_full)
        check_q, _ = liger_rotary_pos_emb(q.clone(), k.clone(), cos_full, sin_full)
        notes["liger_max_abs_diff"] = float((check_q.float() - got_q.float()).abs().max())
    if optional.get("flash_attn") is True:
        from flash_attn.layers.rotary import apply_rotary_emb
        # flash-attn's layout is (batch, seq, heads, head_dim), tables (seq, rotary_dim / 2).
        fq, fk = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
        cos_h, sin_h = cos[0].to(dtype), sin[0].to(dtype)
        functions["flash_attn in place"] = lambda: (apply_rotary_emb(fq, cos_h, sin_h, inplace=True),
                                                    apply_rotary_emb(fk, cos_h, sin_h, inplace=True))
        check_q = apply_rotary_emb(q.transpose(1, 2).contiguous(), cos_h, sin_h).transpose(1, 2)
        notes["flash_attn_max_abs_diff"] = float((check_q.float() - got_q.float()).abs().max())
    times = time_interleaved_ms(functions)
    medians = {name: median(samples) for name, samples in times.items()}
    copy = medians["copy"]
    bytes_moved = 2 * 2 * q.numel() * q.element_size()  # q and k, each read once and written once
    fraction = copy / medians["posemb in place"]
    return {"shape": list(shape), "dtype": _dtype_name(dtype), "median_ms": medians, "times_ms": times,
            "copy_GBps": bytes_moved / copy / 1e6,
            "fraction_of_copy": {name: copy / value for name, value in medians.items() if name != "copy"},
            # forward + backward reads and writes q and k twice: its floor is two copies
            "forward_backward_x_two_copies": medians["posemb forward+backward"] / (2 * copy),
            "target": ROPE_TARGET, "met": fraction >= ROPE_TARGET, **notes}


def step_bias_attention(step: Step) -> None:
    import torch
    import torch.nn.functional as F
    import posemb
    from posemb.kernels.flex import flex_available
    from posemb.model.attention import attend
    batch, heads, head_dim = TARGET.bias_shape
    device, path = TARGET.device, TARGET.bias_path
    schemes = {name: posemb.build(name, num_heads=heads) for name in BIAS_SCHEMES}
    step.detail["shape"] = {"batch": batch, "heads": heads, "head_dim": head_dim, "dtype": "bfloat16"}
    step.detail["path"] = path
    step.skip_if_dry()
    if path == "flex" and not flex_available():
        raise Skipped(f"torch {torch.__version__} has no FlexAttention")
    allow_recompiles(step.detail)
    torch.nn.init.normal_(schemes["t5"].bias.weight)  # zeros would hide a wrong bucket lookup
    schemes = {name: scheme.to(device) for name, scheme in schemes.items()}
    rows = step.detail["rows"] = []
    first_call = step.detail["first_call_s"] = {}
    agreement = step.detail["max_abs_diff_vs_dense"] = {}
    for length in TARGET.bias_lengths:
        generator = torch.Generator(device=device).manual_seed(length)
        q, k, v, grad = (torch.randn(batch, heads, length, head_dim, device=device, dtype=torch.bfloat16,
                                     generator=generator) for _ in range(4))
        positions = torch.arange(length, device=device)[None]

        def forward(scheme=None):
            def run():
                with torch.no_grad():
                    if scheme is None:
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    return attend(q, k, v, scheme, positions, positions, causal=True, bias_path=path)
            return run

        def forward_backward(scheme=None):
            def run():
                qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
                out = (F.scaled_dot_product_attention(qq, kk, vv, is_causal=True) if scheme is None
                       else attend(qq, kk, vv, scheme, positions, positions, causal=True, bias_path=path))
                out.backward(grad)
                if scheme is not None:
                    scheme.zero_grad(set_to_none=True)
            return run

        for name, scheme in schemes.items():
            if length == TARGET.bias_lengths[0]:
                with torch.no_grad():
                    fast = attend(q, k, v, scheme, positions, positions, causal=True, bias_path=path)
                    dense = attend(q, k, v, scheme, positions, positions, causal=True, bias_path="dense")
                agreement[name] = float((fast.float() - dense.float()).abs().max())
            for mode, make in (("forward", forward), ("forward+backward", forward_backward)):
                start = time.perf_counter()  # the first call compiles FlexAttention for this score_mod
                make(scheme)()
                _synchronize()
                first_call[f"{name} {mode} L={length}"] = round(time.perf_counter() - start, 2)
        for mode, make in (("forward", forward), ("forward+backward", forward_backward)):
            functions = {"sdpa causal": make(), **{f"{name} {path}": make(scheme) for name, scheme in schemes.items()}}
            times = time_interleaved_ms(functions, repeats=min(10, TARGET.repeats), inner=min(2, TARGET.inner))
            base = median(times["sdpa causal"])
            for impl, samples in times.items():
                rows.append({"mode": mode, "length": length, "impl": impl, "median_ms": median(samples),
                             "x_sdpa_causal": median(samples) / base, "times_ms": samples})
        del q, k, v, grad
        _empty_cache()


def step_train_throughput(step: Step) -> None:
    import torch
    from posemb.lab.study import PROFILES
    from posemb.lab.train import build_model, train_model
    profile = PROFILES[TARGET.train_profile]
    model_config = dataclasses.replace(profile["model"], **TARGET.train_model)
    train_config = dataclasses.replace(profile["train"], **TARGET.train_config, steps=TARGET.train_steps, warmup_steps=2)
    train_config.validate()
    warmup, device = TARGET.train_warmup, TARGET.device
    step.detail.update(profile=TARGET.train_profile, model=dataclasses.asdict(model_config),
                       batch_size=train_config.batch_size, train_length=train_config.train_length,
                       steps=TARGET.train_steps, warmup_steps_excluded=warmup, schemes=list(TARGET.train_schemes),
                       autocast="bfloat16 (as train_model on CUDA)" if device == "cuda" else None)
    step.skip_if_dry()
    allow_recompiles(step.detail)
    rows = step.detail["rows"] = []
    length, batch = train_config.train_length, train_config.batch_size
    tokens_per_step = batch * length
    for scheme in TARGET.train_schemes:
        model = build_model(scheme, model_config, length, seed=0)
        generator = torch.Generator().manual_seed(0)
        data = torch.randint(0, model_config.vocab_size, (batch, length + 1), generator=generator)
        stamps: list[float] = []
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        # train_model reads the loss every step (a host sync), so these wall-clock stamps are step ends.
        result = train_model(model, lambda _: (data[:, :-1], data[:, 1:]), train_config, device=device,
                             progress=False, on_step=lambda _: stamps.append(time.perf_counter()))
        steady = (stamps[-1] - stamps[warmup - 1]) / (len(stamps) - warmup)
        rows.append({"scheme": scheme, "steady_step_ms": steady * 1e3, "steady_tokens_per_s": tokens_per_step / steady,
                     "first_step_s": stamps[0] - start, "train_model_tokens_per_s": result.tokens_per_s,
                     "peak_memory_MiB": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
                     "final_loss": result.final_loss})
        del model
        _empty_cache()
    nope = next((row for row in rows if row["scheme"] == "nope"), None)
    for row in rows:
        if nope is not None:
            row["x_nope_step_time"] = row["steady_step_ms"] / nope["steady_step_ms"]
            if nope["peak_memory_MiB"]:
                row["x_nope_peak_memory"] = row["peak_memory_MiB"] / nope["peak_memory_MiB"]


def step_study_full(step: Step) -> None:
    from posemb.cli import build_parser
    from posemb.lab.study_command import config_from_args
    command = [sys.executable, "-m", "posemb.cli", "study", *TARGET.study_args, "--device", TARGET.device]
    step.detail["command"] = "posemb " + " ".join(command[3:]) + " --out TMPDIR"
    # The arguments must make a valid study (checked on the CPU too: only --device differs).
    with tempfile.TemporaryDirectory() as scratch:
        config_from_args(build_parser().parse_args(["study", *TARGET.study_args, "--device", "cpu", "--out", scratch]))
    step.skip_if_dry()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        done = subprocess.run([*command, "--out", out], cwd=ROOT, capture_output=True, text=True, env=env,
                              timeout=max(step.seconds - 5, 1))
        step.detail["wall_s"] = round(time.perf_counter() - start, 1)
        if done.returncode != 0:
            raise RuntimeError(f"posemb study exit status {done.returncode}: {(done.stderr or done.stdout)[-2000:]}")
        runs = step.detail["runs"] = {}
        for train_json in sorted(Path(out).glob("runs/*/train.json")):
            record = json.loads(train_json.read_text())
            runs[train_json.parent.name] = {key: record.get(key) for key in
                                            ("scheme", "steps", "tokens", "train_seconds", "tokens_per_s", "final_loss")}
        if not runs:
            raise RuntimeError(f"posemb study wrote no runs/*/train.json under its --out ({done.stdout[-500:]})")
        step.detail["report_written"] = (Path(out) / "report.md").exists()


#: (name, function, seconds): the order they run in, and each one's time limit. The limits add up to
#: less than the default --budget, which stays under the wrapper's hard limit of 480 s (8 minutes).
STEPS: list[tuple[str, Callable[[Step], None], int]] = [
    ("environment", step_environment, 15),
    ("cuda_tests", step_cuda_tests, 130),
    ("rope_bandwidth", step_rope_bandwidth, 40),
    ("bias_attention", step_bias_attention, 110),
    ("train_throughput", step_train_throughput, 70),
    ("study_full", step_study_full, 80),
]
GPU_FREE_STEPS = {"environment"}  # runs in a dry run too


# ---- running and writing --------------------------------------------------------------------------
def _alarm(signum, frame):
    raise StepTimeout()


def _finite(value):
    """JSON without NaN/inf (not JSON): such values become None; tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def write_results(out: Path, results: dict) -> None:
    from posemb.lab.checkpoint import atomic_write_json, atomic_write_text
    atomic_write_json(out / "gpu_check.json", _finite(results))
    try:
        table = format_table(results)
    except Exception as error:  # the JSON holds everything; a table bug must not stop the run
        table = f"# posemb GPU check\n\nThe table could not be formatted ({type(error).__name__}: {error}); see gpu_check.json.\n"
    atomic_write_text(out / "gpu_check.md", table)


def run(out: Path, *, dry_run: bool = False, only: list[str] | None = None, budget: float = 450.0,
        steps: list | None = None) -> dict:
    """Run the steps (``only`` some of them, by name) within ``budget`` seconds; write and return the results."""
    import torch
    has_cuda = torch.cuda.is_available()
    dry_run = dry_run or (TARGET.device == "cuda" and not has_cuda)
    skip_reason = "dry run (--dry-run)" if has_cuda else "no CUDA"
    results: dict[str, Any] = {"dry_run": dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "budget_s": budget, "steps": {}}
    deadline = time.monotonic() + budget
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for name, function, limit in (STEPS if steps is None else steps):
            if only is not None and name not in only:
                continue
            left = deadline - time.monotonic()
            seconds = min(limit, left)
            step = Step(dry_run=dry_run and name not in GPU_FREE_STEPS, skip_reason=skip_reason,
                        seconds=seconds, detail={})
            start = time.perf_counter()
            if seconds < 5:
                status, reason = "skipped", f"out of time: {left:.0f} s of the {budget:.0f} s budget left"
            else:
                signal.setitimer(signal.ITIMER_REAL, seconds)
                try:
                    function(step)
                    status, reason = "ok", None
                except Skipped as why:
                    status, reason = "skipped", str(why)
                except StepTimeout:
                    status, reason = "failed", f"timed out after {seconds:.0f} s (results so far kept)"
                except subprocess.TimeoutExpired as error:
                    status, reason = "failed", f"timed out after {error.timeout:.0f} s: {' '.join(map(str, error.cmd))[:200]}"
                except Exception as error:  # a failed step is recorded; the next one runs
                    status, reason = "failed", f"{type(error).__name__}: {error}"
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            results["steps"][name] = {"status": status, "reason": reason,
                                      "seconds": round(time.perf_counter() - start, 2), **step.detail}
            print(f"[gpu_check] {name}: {status}" + (f" ({str(reason).splitlines()[0][:160]})" if reason else "")
                  + f" [{results['steps'][name]['seconds']} s]", flush=True)
            write_results(out, results)
    finally:
        signal.signal(signal.SIGALRM, previous)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_results(out, results)
    return results


def _fmt(value, digits=3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(results: dict) -> str:
    """The Markdown report: one status table, then one table per benchmark that ran."""
    steps = results["steps"]
    env = steps.get("environment", {})
    lines = ["# posemb GPU check" + (" (dry run)" if results["dry_run"] else ""), "",
             f"torch {env.get('torch', '?')}, CUDA {env.get('cuda')}, triton {env.get('triton')}, "
             f"device {env.get('device', 'none')}; started {results['started']}.", "",
             "| step | status | seconds | reason |", "|---|---|---|---|"]
    for name, step in steps.items():
        reason = (step.get("reason") or "").splitlines()[0][:200] if step.get("reason") else ""
        lines.append(f"| {name} | {step['status']} | {step['seconds']} | {reason.replace('|', '/')} |")
    tests = steps.get("cuda_tests", {})
    if tests.get("summary"):
        lines += ["", f"CUDA tests: {tests['summary']}"] + [f"- {line}" for line in tests.get("failures", [])]
    rope = steps.get("rope_bandwidth", {})
    if rope.get("rows"):
        others = sorted({name for row in rope["rows"] for name in row["median_ms"]} -
                        {"copy", "posemb in place", "posemb out=", "posemb new", "posemb forward+backward"})
        lines += ["", f"RoPE on q and k, ms (median); fraction = copy time / rotation time, target >= {ROPE_TARGET}",
                  "", "| shape | dtype | copy (GB/s) | in place (fraction) | out= (fraction) | new | fwd+bwd (x 2 copies) |"
                  + "".join(f" {name} |" for name in others),
                  "|---|---|---|---|---|---|---|" + "---|" * len(others)]
        for row in rope["rows"]:
            ms, frac = row["median_ms"], row["fraction_of_copy"]
            lines.append(f"| {row['shape']} | {row['dtype']} | {_fmt(ms['copy'])} ({row['copy_GBps']:.0f}) "
                         f"| {_fmt(ms['posemb in place'])} ({_fmt(frac['posemb in place'], 2)}, "
                         f"{'met' if row['met'] else 'not met'}) | {_fmt(ms['posemb out='])} ({_fmt(frac['posemb out='], 2)}) "
                         f"| {_fmt(ms['posemb new'])} | {_fmt(ms['posemb forward+backward'])} "
                         f"({_fmt(row['forward_backward_x_two_copies'], 2)}) |"
                         + "".join(f" {_fmt(ms.get(name))} |" for name in others))
        missing = [f"{name}: {why}" for name, why in rope.get("optional", {}).items() if why is not True]
        if missing:
            lines += ["", "Skipped baselines: " + "; ".join(missing)]
    bias = steps.get("bias_attention", {})
    if bias.get("rows"):
        lines += ["", "Bias attention (bf16), ms (median) and x causal SDPA of the same run", "",
                  "| mode | L | impl | ms | x SDPA |", "|---|---|---|---|---|"]
        lines += [f"| {row['mode']} | {row['length']} | {row['impl']} | {_fmt(row['median_ms'])} | "
                  f"{_fmt(row['x_sdpa_causal'], 2)} |" for row in bias["rows"]]
    train = steps.get("train_throughput", {})
    if train.get("rows"):
        lines += ["", f"Training, study `{train.get('profile')}` model, {train['steps']} steps (first {train['warmup_steps_excluded']} excluded)",
                  "", "| scheme | step ms | tokens/s | x NoPE time | peak MiB | x NoPE memory | first step s |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {row['scheme']} | {_fmt(row['steady_step_ms'], 1)} | {row['steady_tokens_per_s']:,.0f} "
                  f"| {_fmt(row.get('x_nope_step_time'), 2)} | {'-' if row['peak_memory_MiB'] is None else format(row['peak_memory_MiB'], ',.0f')} "
                  f"| {_fmt(row.get('x_nope_peak_memory'), 2)} | {_fmt(row['first_step_s'], 1)} |" for row in train["rows"]]
    study = steps.get("study_full", {})
    if study.get("runs"):
        lines += ["", f"`{study['command']}`: {study.get('wall_s')} s", "", "| run | steps | tokens/s (train.json) |",
                  "|---|---|---|"]
        lines += [f"| {name} | {run['steps']} | {run['tokens_per_s'] or 0:,.0f} |" for name, run in study["runs"].items()]
    return "\n".join(lines) + "\n"


def _step_names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    known = [name for name, _, _ in STEPS]
    unknown = [name for name in names if name not in known]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"--only takes step names from {known}, got {text!r}")
    return names


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"--budget must be a positive number of seconds, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="check every step's imports and arguments, measure nothing (automatic without CUDA)")
    parser.add_argument("--out", default="gpu-check", help="folder for gpu_check.json and gpu_check.md (default %(default)s)")
    parser.add_argument("--only", type=_step_names, default=None, help="comma-separated steps to run (default: all)")
    parser.add_argument("--budget", type=_budget, default=450.0,
                        help="seconds for the whole run; later steps are skipped when it is spent (default %(default)s)")
    args = parser.parse_args(argv)
    from posemb.lab.outdir import OutputDirError, check_writable_directory
    try:
        out = check_writable_directory(args.out, "--out")  # before any step, not after minutes of them
    except OutputDirError as error:
        parser.error(str(error))
    results = run(out, dry_run=args.dry_run, only=args.only, budget=args.budget)
    failed = [name for name, step in results["steps"].items() if step["status"] == "failed"]
    print(f"[gpu_check] wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
