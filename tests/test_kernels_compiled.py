"""The optional compiled single-pass CPU RoPE kernel (posemb/kernels/rotary_compiled.py) against
the plain reference. Skipped, with the reason, when the extension cannot be built here (no C++
compiler or ninja). The build happens once per session (module-scoped fixture; later sessions
load it from the cache)."""
from __future__ import annotations

import warnings

import pytest
import torch

from posemb.functional.rope import apply_rotary as rotary_reference
from posemb.kernels import apply_rotary, apply_rotary_qk, load_compiled_cpu, select_backend
from posemb.kernels import rotary_compiled

# float32 math either way; bf16/fp16 results may differ from the reference by one rounding step.
TOLERANCE = {torch.float64: dict(atol=1e-12, rtol=0), torch.float32: dict(atol=1e-6, rtol=0),
             torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2), torch.float16: dict(atol=1e-3, rtol=1e-3)}


@pytest.fixture(scope="module")
def compiled():
    """Build/load the extension once; afterwards unload it from the selector so other test files
    still see the default (eager) CPU selection."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = load_compiled_cpu(build=True)
    if not ok:
        pytest.skip("compiled CPU RoPE kernel could not be built: "
                    + "; ".join(str(w.message) for w in caught))
    yield rotary_compiled._module
    rotary_compiled.unload()


def _tables(batch, length, half, *, offset=0, seed=0):
    """float32 cos/sin from float64 angles at positions offset.. (each batch row shifted)."""
    generator = torch.Generator().manual_seed(seed)
    inv_freq = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    positions = torch.arange(length, dtype=torch.float64)[None] + offset + 3 * torch.arange(batch)[:, None]
    angles = positions[..., None] * inv_freq + 0.1 * torch.rand(batch, length, half, generator=generator,
                                                                 dtype=torch.float64)
    return angles.cos().float(), angles.sin().float()


def _fused_qkv(batch, heads, length, dim, dtype, seed=1):
    """q, k as non-contiguous views of one (batch, seq, 3, heads, dim) projection."""
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, length, 3, heads, dim, generator=generator).to(dtype).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1]


def _spy(monkeypatch):
    """Count calls that reach the C++ kernel (so a silent eager fallback cannot pass)."""
    calls = []
    original = rotary_compiled._module

    class Spy:
        def rotate(self, *args):
            calls.append(args[0].dtype)
            return original.rotate(*args)

    monkeypatch.setattr(rotary_compiled, "_module", Spy())
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [16, 10])
@pytest.mark.parametrize("mode", ["inplace", "out", "new"])
def test_compiled_matches_reference(compiled, monkeypatch, dtype, interleaved, rotary_dim, mode):
    q, k = _fused_qkv(2, 3, 37, 16, dtype)
    cos, sin = _tables(2, 37, rotary_dim // 2, offset=5)
    expected_q = rotary_reference(q, cos, sin, interleaved=interleaved)
    expected_k = rotary_reference(k, cos, sin, interleaved=interleaved)
    calls = _spy(monkeypatch)
    if mode == "inplace":
        got_q, got_k = apply_rotary_qk(q, k, cos, sin, interleaved=interleaved, inplace=True, backend="compiled")
        assert got_q is q and got_k is k
    elif mode == "out":
        # Buffers filled with garbage: the pass-through channels must be copied, not left.
        buffers = (torch.full(q.shape, 7.0, dtype=dtype), torch.full(k.shape, 7.0, dtype=dtype))
        got_q, got_k = apply_rotary_qk(q, k, cos, sin, interleaved=interleaved, out=buffers, backend="compiled")
        assert got_q is buffers[0] and got_k is buffers[1]
    else:
        got_q, got_k = apply_rotary_qk(q, k, cos, sin, interleaved=interleaved, backend="compiled")
    assert len(calls) == 2
    torch.testing.assert_close(got_q, expected_q, **TOLERANCE[dtype])
    torch.testing.assert_close(got_k, expected_k, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_float32_is_exact_and_low_precision_rounds_once(compiled, dtype):
    """Same float32 formula as the reference: fp32 within 1e-6, and bf16/fp16 (special values
    included) equal to the reference's single rounding."""
    x = torch.randn(1, 2, 5, 8).to(dtype)
    cos, sin = _tables(1, 5, 4)
    got = apply_rotary(x, cos, sin, backend="compiled")
    torch.testing.assert_close(got, rotary_reference(x, cos, sin), atol=1e-6 if dtype == torch.float32 else 0,
                               rtol=0 if dtype == torch.float32 else TOLERANCE[dtype]["rtol"])
    # Special values through the conversions: the same float32 formula, rounded once, so the
    # result equals the reference's bit for bit (nan where it has nan, e.g. inf * sin 0).
    tiny = torch.finfo(dtype).tiny
    big = 65504.0 if dtype == torch.float16 else 1e30
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), tiny / 4, -tiny / 2, 0.0, -0.0, big, -big,
                            1.0, 3.0, -2.5], dtype=dtype).reshape(1, 1, 3, 4).repeat(1, 2, 1, 2)
    cos, sin = _tables(1, 3, 4)
    for table_cos, table_sin in ((cos, sin), (torch.ones(1, 3, 4), torch.zeros(1, 3, 4))):
        for interleaved in (False, True):
            torch.testing.assert_close(
                apply_rotary(special, table_cos, table_sin, interleaved=interleaved, backend="compiled"),
                rotary_reference(special, table_cos, table_sin, interleaved=interleaved),
                atol=0, rtol=0, equal_nan=True)


def test_compiled_broadcast_tables_batch_rows_and_large_shape(compiled):
    """Per-batch tables (batch rows differ), a broadcast (1, L, r/2) table, and enough rows that
    at::parallel_for splits the work between threads."""
    q = torch.randn(3, 4, 300, 32)
    for batch_rows in (1, 3):
        cos, sin = _tables(batch_rows, 300, 16, offset=11)
        torch.testing.assert_close(apply_rotary(q, cos, sin, backend="compiled"), rotary_reference(q, cos, sin),
                                   atol=1e-6, rtol=0)


def test_compiled_inverse_and_fallbacks(compiled, monkeypatch):
    x, _ = _fused_qkv(2, 3, 9, 12, torch.float32)
    cos, sin = _tables(2, 9, 6)
    # The inverse (sign -1) undoes the rotation.
    y = torch.empty(x.shape)
    rotary_compiled.rotate_compiled(x, cos, sin, y, interleaved=True, sign=1.0)
    back = torch.empty(x.shape)
    rotary_compiled.rotate_compiled(y, cos, sin, back, interleaved=True, sign=-1.0)
    torch.testing.assert_close(back, x, atol=1e-6, rtol=0)
    # Non-unit channel stride or float64 tables: the eager path, same results.
    calls = _spy(monkeypatch)
    strided = torch.randn(2, 3, 9, 24)[..., ::2]
    torch.testing.assert_close(apply_rotary(strided, cos, sin, backend="compiled"), rotary_reference(strided, cos, sin),
                               atol=1e-6, rtol=0)
    x64 = x.double()
    torch.testing.assert_close(apply_rotary(x64, cos.double(), sin.double(), backend="compiled"),
                               rotary_reference(x64, cos.double(), sin.double()), atol=1e-12, rtol=0)
    assert calls == []


@pytest.mark.parametrize("interleaved", [False, True])
def test_compiled_gradcheck(compiled, interleaved):
    x = torch.randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = _tables(1, 5, 3)
    assert torch.autograd.gradcheck(lambda t: apply_rotary(t, cos, sin, interleaved=interleaved, backend="compiled"),
                                    (x,))
    assert torch.autograd.gradgradcheck(
        lambda t: apply_rotary(t, cos, sin, interleaved=interleaved, backend="compiled"), (x,))


def test_auto_picks_compiled_once_loaded(compiled, monkeypatch):
    x = torch.randn(1, 2, 3, 8)
    assert select_backend(x) == "compiled"
    calls = _spy(monkeypatch)
    cos, sin = _tables(1, 3, 4)
    apply_rotary(x, cos, sin, inplace=True)
    assert calls == [torch.float32]
    # Interleaved float32/float64 stays on the eager complex multiplication; bf16 goes compiled.
    apply_rotary(x, cos, sin, interleaved=True)
    apply_rotary(x.double(), cos, sin, interleaved=True)
    assert calls == [torch.float32]
    apply_rotary(x.bfloat16(), cos, sin, interleaved=True)
    assert calls == [torch.float32, torch.bfloat16]
    # Not loaded: auto falls back to the eager path and an explicit request says what to do.
    monkeypatch.setattr(rotary_compiled, "_module", None)
    monkeypatch.setenv("POSEMB_COMPILED_KERNELS", "0")
    assert select_backend(x) == "cpu"
    with pytest.raises(ValueError, match="load_compiled_cpu"):
        apply_rotary(x, cos, sin, backend="compiled")


def test_environment_variable_loads_on_first_cpu_call(compiled, monkeypatch):
    from posemb.kernels import rotary
    monkeypatch.setattr(rotary_compiled, "_module", None)
    monkeypatch.setattr(rotary, "_env_load_tried", False)
    monkeypatch.setenv("POSEMB_COMPILED_KERNELS", "1")
    assert select_backend(torch.randn(1, 1, 2, 4)) == "compiled"  # loads the session's build from the cache
    assert rotary_compiled.loaded()
