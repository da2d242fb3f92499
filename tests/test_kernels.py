"""Fast paths against their plain references: fused RoPE (CPU, Triton interpreter) and bias-site
attention (Toeplitz view, FlexAttention score_mods) against the dense bias."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import posemb
from posemb.functional.rope import apply_rotary as reference_rotary
from posemb.kernels import apply_rotary, apply_rotary_qk, select_backend
from posemb.kernels import flex
from posemb.model.attention import attend

TOLERANCE = {torch.float64: dict(atol=1e-12, rtol=0), torch.float32: dict(atol=1e-6, rtol=0),
             torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2), torch.float16: dict(atol=1e-3, rtol=1e-3)}


def _tables(batch, length, half, *, offset=0, dtype=torch.float32, seed=0):
    """cos/sin from float64 angles at positions offset..offset+length-1 (batch rows shifted)."""
    generator = torch.Generator().manual_seed(seed)
    inv_freq = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    positions = torch.arange(length, dtype=torch.float64)[None] + offset + 3 * torch.arange(batch)[:, None]
    angles = positions[..., None] * inv_freq + 0.1 * torch.rand(batch, length, half, generator=generator,
                                                                 dtype=torch.float64)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _fused_qkv(batch, heads, length, dim, dtype):
    """q, k as non-contiguous views of one (batch, seq, 3, heads, dim) projection, like the model's."""
    qkv = torch.randn(batch, length, 3, heads, dim).to(dtype).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1]


# ---- RoPE forward --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [16, 10])
@pytest.mark.parametrize("mode", ["inplace", "out", "new"])
def test_cpu_rotary_matches_reference(dtype, interleaved, rotary_dim, mode):
    q, k = _fused_qkv(2, 3, 37, 16, dtype)
    cos, sin = _tables(2, 37, rotary_dim // 2, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    expected_q = reference_rotary(q, cos, sin, interleaved=interleaved)
    expected_k = reference_rotary(k, cos, sin, interleaved=interleaved)
    if mode == "inplace":
        q_ptr = q.data_ptr()
        got_q, got_k = apply_rotary_qk(q, k, cos, sin, interleaved=interleaved, inplace=True, backend="cpu")
        assert got_q is q and got_k is k and q.data_ptr() == q_ptr
    elif mode == "out":
        buffers = (torch.empty(q.shape, dtype=dtype), torch.empty(k.shape, dtype=dtype))
        got_q, got_k = apply_rotary_qk(q, k, cos, sin, interleaved=interleaved, out=buffers, backend="cpu")
        assert got_q is buffers[0] and got_k is buffers[1]
    else:
        got_q, got_k = apply_rotary_qk(q, k, cos, sin, interleaved=interleaved, backend="cpu")
    torch.testing.assert_close(got_q, expected_q, **TOLERANCE[dtype])
    torch.testing.assert_close(got_k, expected_k, **TOLERANCE[dtype])


def test_cpu_rotary_chunking_covers_every_row(monkeypatch):
    """Tiny chunks force both chunking loops (over batches and over positions inside a batch)."""
    from posemb.kernels import rotary_cpu

    for chunk_bytes in (64, 3 * 16 * 4 * 5, 1 << 20):
        monkeypatch.setattr(rotary_cpu, "CHUNK_BYTES", chunk_bytes)
        for interleaved in (False, True):
            x = torch.randn(3, 4, 29, 16)
            cos, sin = _tables(3, 29, 8)
            expected = reference_rotary(x, cos, sin, interleaved=interleaved)
            torch.testing.assert_close(apply_rotary(x, cos, sin, interleaved=interleaved), expected, atol=1e-6, rtol=0)
            torch.testing.assert_close(apply_rotary(x.clone(), cos[:1], sin[:1], interleaved=interleaved, inplace=True),
                                       reference_rotary(x, cos[:1], sin[:1], interleaved=interleaved), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_odd_offsets_and_strides_take_the_generic_path(dtype, interleaved):
    """A view at an odd storage offset cannot be seen as complex numbers: the real-pair path runs."""
    storage = torch.randn(1 + 2 * 3 * 7 * 10).to(dtype)
    x = storage[1:].view(2, 3, 7, 10)[..., :8]  # odd offset, row stride 10, 8 channels used
    cos, sin = _tables(2, 7, 3)
    expected = reference_rotary(x, cos, sin, interleaved=interleaved)
    torch.testing.assert_close(apply_rotary(x, cos, sin, interleaved=interleaved), expected, **TOLERANCE[dtype])
    apply_rotary(x, cos, sin, interleaved=interleaved, inplace=True)
    torch.testing.assert_close(x, expected, **TOLERANCE[dtype])


def test_position_offsets_make_scores_depend_on_distance_only():
    """Keys over the whole context, queries at its last positions (KV-cache decoding): the rotated
    q.k equals the one computed with every position shifted by the same offset."""
    q, k = torch.randn(1, 2, 4, 16, dtype=torch.float64), torch.randn(1, 2, 12, 16, dtype=torch.float64)
    inv_freq = 10000.0 ** (-torch.arange(8, dtype=torch.float64) / 8)

    def scores(offset):
        q_angles = (torch.arange(8, 12, dtype=torch.float64) + offset)[None, :, None] * inv_freq
        k_angles = (torch.arange(12, dtype=torch.float64) + offset)[None, :, None] * inv_freq
        rq, rk = apply_rotary_qk(q, k, q_angles.cos(), q_angles.sin(), k_angles.cos(), k_angles.sin())
        return rq @ rk.transpose(-1, -2)

    torch.testing.assert_close(scores(0), scores(1000), atol=1e-10, rtol=1e-10)
    expected_k = reference_rotary(k, *(lambda a: (a.cos(), a.sin()))(torch.arange(12.0, dtype=torch.float64)[None, :, None] * inv_freq))
    _, got_k = apply_rotary_qk(q, k, *(lambda a: (a.cos(), a.sin()))(torch.arange(8.0, 12.0, dtype=torch.float64)[None, :, None] * inv_freq),
                               *(lambda a: (a.cos(), a.sin()))(torch.arange(12.0, dtype=torch.float64)[None, :, None] * inv_freq))
    torch.testing.assert_close(got_k, expected_k)


def test_rotation_preserves_norm_and_inverts():
    x = torch.randn(2, 2, 9, 12, dtype=torch.float64)
    cos, sin = _tables(2, 9, 6, dtype=torch.float64)
    y = apply_rotary(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(apply_rotary(y, cos, -sin), x)


def test_backends_agree_and_selection():
    x = torch.randn(2, 3, 11, 8)
    cos, sin = _tables(1, 11, 4)
    torch.testing.assert_close(apply_rotary(x, cos, sin, backend="reference"), apply_rotary(x, cos, sin, backend="cpu"),
                               atol=1e-6, rtol=0)
    assert select_backend(x) == "cpu"
    assert select_backend(torch.empty(1, 1, 1, 2, device="meta")) == "reference"


# ---- RoPE backward -------------------------------------------------------------------------------
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [8, 6])
def test_rotary_gradcheck(interleaved, rotary_dim):
    x = torch.randn(2, 2, 5, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = _tables(2, 5, rotary_dim // 2, dtype=torch.float64)

    def out_of_place(x):
        return apply_rotary(x, cos, sin, interleaved=interleaved)

    def in_place(x):
        return apply_rotary(x * 1.0, cos, sin, interleaved=interleaved, inplace=True)

    def pair(x):
        q, k = apply_rotary_qk(x[:, :1] * 1.0, x[:, 1:] * 1.0, cos, sin, interleaved=interleaved, inplace=True)
        return q * k

    for function in (out_of_place, in_place, pair):
        assert torch.autograd.gradcheck(function, (x,))
    assert torch.autograd.gradgradcheck(out_of_place, (x,))


def test_rotary_gradcheck_through_tables():
    """cos/sin that require grad go through the differentiable reference formula."""
    x = torch.randn(1, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    cos, sin = (t.requires_grad_() for t in _tables(1, 4, 3, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda x, c, s: apply_rotary(x, c, s, interleaved=True), (x, cos, sin))


def test_backward_matches_reference_on_fused_views():
    base = torch.randn(2, 7, 3, 2, 16, requires_grad=True)
    cos, sin = _tables(2, 7, 8)
    grads = []
    for fast in (True, False):
        base.grad = None
        q, k, _ = base.permute(2, 0, 3, 1, 4)
        if fast:
            q, k = apply_rotary_qk(q, k, cos, sin)
        else:
            q, k = reference_rotary(q, cos, sin), reference_rotary(k, cos, sin)
        (q * torch.arange(16.0) + 2 * k).sum().backward()
        grads.append(base.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=0)


def test_inplace_on_a_leaf_that_requires_grad_is_refused():
    x = torch.randn(1, 1, 3, 4, requires_grad=True)
    cos, sin = _tables(1, 3, 2)
    with pytest.raises(RuntimeError, match="leaf"):
        apply_rotary(x, cos, sin, inplace=True)


# ---- RoPE argument checks ------------------------------------------------------------------------
def test_rotary_bad_arguments():
    x = torch.randn(2, 2, 5, 8)
    cos, sin = _tables(2, 5, 4)
    with pytest.raises(ValueError, match="cos and sin"):
        apply_rotary(x, cos, sin[..., :3])
    with pytest.raises(ValueError, match="rotary_dim"):
        apply_rotary(x, *_tables(2, 5, 5))
    with pytest.raises(ValueError, match=r"\(batch or 1, seq"):
        apply_rotary(x, *_tables(2, 4, 4))
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        apply_rotary(x[0], cos, sin)
    with pytest.raises(TypeError, match="floating"):
        apply_rotary(x.long(), cos, sin)
    with pytest.raises(ValueError, match="either inplace=True or out="):
        apply_rotary(x, cos, sin, inplace=True, out=torch.empty_like(x))
    with pytest.raises(ValueError, match="backend must be one of"):
        apply_rotary(x, cos, sin, backend="cuda")
    with pytest.raises(ValueError, match="out for x must have"):
        apply_rotary(x, cos, sin, out=torch.empty(2, 2, 5, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="partially overlaps"):
        storage = torch.randn(2 * 2 * 5 * 8 + 1)
        apply_rotary(storage[:-1].view(2, 2, 5, 8), cos, sin, out=storage[1:].view(2, 2, 5, 8))
    with pytest.raises(ValueError, match="does not support autograd"):
        apply_rotary(x.clone().requires_grad_(), cos, sin, out=torch.empty_like(x))
    with pytest.raises(ValueError, match="cos_k and sin_k"):
        apply_rotary_qk(x, x, cos, sin, cos_k=cos)
    with pytest.raises(TypeError, match="pair"):
        apply_rotary_qk(x, x, cos, sin, out=torch.empty_like(x))
    with pytest.raises(TypeError, match="interleaved must be a bool"):
        apply_rotary(x, cos, sin, interleaved=1)


def test_out_equal_to_input_means_in_place():
    x = torch.randn(1, 2, 5, 8)
    cos, sin = _tables(1, 5, 4)
    expected = reference_rotary(x, cos, sin)
    assert apply_rotary(x, cos, sin, out=x) is x
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)


# ---- Triton, through its interpreter on CPU tensors ----------------------------------------------
_TRITON_SCRIPT = textwrap.dedent("""
    import os
    assert os.environ["TRITON_INTERPRET"] == "1"
    import torch
    from posemb.kernels import apply_rotary, apply_rotary_qk
    from posemb.functional.rope import apply_rotary as reference
    torch.manual_seed(0)
    for dtype, atol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
        for interleaved in (False, True):
            for rotary_dim in (16, 6):
                qkv = torch.randn(2, 9, 3, 3, 16).to(dtype).permute(2, 0, 3, 1, 4)
                q, k = qkv[0], qkv[1]
                angles = torch.rand(2, 9, rotary_dim // 2) * 20
                cos, sin = angles.cos(), angles.sin()
                expected_q = reference(q, cos, sin, interleaved=interleaved)
                expected_k = reference(k, cos[:1], sin[:1], interleaved=interleaved)
                got_q = apply_rotary(q, cos, sin, interleaved=interleaved, backend="triton")
                torch.testing.assert_close(got_q, expected_q, atol=atol, rtol=1.6e-2 if atol > 1e-6 else 0)
                out = torch.empty(k.shape, dtype=dtype)
                apply_rotary(k, cos[:1], sin[:1], interleaved=interleaved, out=out, backend="triton")
                torch.testing.assert_close(out, expected_k, atol=atol, rtol=1.6e-2 if atol > 1e-6 else 0)
                q2, k2 = q.clone(), k.clone()
                apply_rotary_qk(q2, k2, cos, sin, cos[:1], sin[:1], interleaved=interleaved, inplace=True,
                                backend="triton")
                torch.testing.assert_close(q2, expected_q, atol=atol, rtol=1.6e-2 if atol > 1e-6 else 0)
                torch.testing.assert_close(k2, expected_k, atol=atol, rtol=1.6e-2 if atol > 1e-6 else 0)
    # backward: the inverse rotation, also through the kernel
    x = torch.randn(2, 3, 9, 16, requires_grad=True)
    cos, sin = (lambda a: (a.cos(), a.sin()))(torch.rand(2, 9, 8) * 20)
    weight = torch.randn(2, 3, 9, 16)
    (apply_rotary(x, cos, sin, backend="triton") * weight).sum().backward()
    fast = x.grad.clone(); x.grad = None
    (reference(x, cos, sin) * weight).sum().backward()
    torch.testing.assert_close(fast, x.grad, atol=1e-5, rtol=0)
    print("TRITON-OK")
""")


def test_triton_kernel_in_interpreter_mode():
    pytest.importorskip("triton")
    # TRITON_INTERPRET must be set before triton is imported, so the check runs in a fresh process.
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TRITON-OK" in result.stdout


# ---- bias site: Toeplitz view and FlexAttention against the dense bias ---------------------------
def _bias_scheme(name, heads, causal, **options):
    scheme = posemb.build(name, num_heads=heads, causal=causal, **options)
    if name == "t5":
        torch.nn.init.normal_(scheme.bias.weight)  # zeros would make every bias path trivially equal
    return scheme


def _qkv(batch, heads, q_len, k_len, dim, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=generator).to(dtype)
    k = torch.randn(batch, heads, k_len, dim, generator=generator).to(dtype)
    v = torch.randn(batch, heads, k_len, dim, generator=generator).to(dtype)
    return q, k, v


@pytest.mark.parametrize("name", ["t5", "alibi"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("path", ["toeplitz", "flex"])
def test_bias_fast_paths_match_dense(name, causal, path, monkeypatch):
    monkeypatch.setattr(flex, "QUERY_BLOCK", 16)  # several query blocks on a small problem
    scheme = _bias_scheme(name, 3, causal)
    q, k, v = _qkv(2, 3, 50, 50, 8)
    positions = (torch.arange(50) + 7)[None].expand(2, 50)
    dense = attend(q, k, v, scheme, positions, positions, causal=causal, bias_path="dense")
    fast = attend(q, k, v, scheme, positions, positions, causal=causal, bias_path=path)
    torch.testing.assert_close(fast, dense, atol=2e-6, rtol=0)


@pytest.mark.parametrize("name", ["t5", "alibi"])
@pytest.mark.parametrize("path", ["toeplitz", "flex"])
def test_bias_fast_paths_with_kv_cache_offsets(name, path):
    """Queries are the last tokens of a longer key sequence, batch rows start at other positions."""
    scheme = _bias_scheme(name, 2, True)
    q, k, v = _qkv(2, 2, 3, 40, 8, seed=1)
    k_positions = torch.arange(40)[None] + torch.tensor([[0], [100]])
    q_positions = k_positions[:, -3:]
    dense = attend(q, k, v, scheme, q_positions, k_positions, causal=True, bias_path="dense")
    fast = attend(q, k, v, scheme, q_positions, k_positions, causal=True, bias_path=path)
    torch.testing.assert_close(fast, dense, atol=2e-6, rtol=0)


def test_toeplitz_gradients_match_dense(monkeypatch):
    monkeypatch.setattr(flex, "QUERY_BLOCK", 8)
    scheme = _bias_scheme("t5", 2, True, num_buckets=8, max_distance=16)
    positions = torch.arange(30)[None].expand(2, 30)
    grads = {}
    for path in ("dense", "toeplitz"):
        scheme.zero_grad()
        q, k, v = (t.double().requires_grad_() for t in _qkv(2, 2, 30, 30, 4, seed=2))
        scheme.double()
        out = attend(q, k, v, scheme, positions, positions, causal=True, bias_path=path)
        (out * torch.linspace(-1, 1, 4, dtype=torch.float64)).sum().backward()
        grads[path] = [q.grad, k.grad, v.grad, scheme.bias.weight.grad.clone()]
    for fast, dense in zip(grads["toeplitz"], grads["dense"]):
        torch.testing.assert_close(fast, dense, atol=1e-10, rtol=1e-10)
    assert grads["dense"][3].abs().sum() > 0


def test_flex_t5_table_gradient_matches_dense():
    """FlexAttention has no CPU backward for q/k/v in torch 2.13, but its eager reference does
    differentiate the captured bias table: that gradient must equal the dense one."""
    scheme = _bias_scheme("t5", 2, False, num_buckets=8, max_distance=12)
    q, k, v = _qkv(1, 2, 20, 20, 4, seed=3)
    positions = torch.arange(20)[None]
    grads = []
    for path in ("dense", "flex"):
        scheme.zero_grad()
        attend(q, k, v, scheme, positions, positions, causal=False, bias_path=path).pow(2).sum().backward()
        grads.append(scheme.bias.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-5)


def test_flex_path_refuses_cpu_backward():
    scheme = _bias_scheme("alibi", 2, True)
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 6, 6, 4))
    positions = torch.arange(6)[None]
    with pytest.raises(ValueError, match="no backward on CPU"):
        attend(q, k, v, scheme, positions, positions, causal=True, bias_path="flex")
    # auto picks a path with a backward (Toeplitz) on CPU
    attend(q, k, v, scheme, positions, positions, causal=True).sum().backward()
    assert q.grad is not None


def test_irregular_positions_fall_back_to_dense():
    scheme = _bias_scheme("t5", 2, True)
    q, k, v = _qkv(2, 2, 6, 6, 4)
    positions = torch.tensor([[0, 1, 2, 5, 6, 9], [0, 1, 2, 3, 4, 5]])
    dense = attend(q, k, v, scheme, positions, positions, causal=True, bias_path="dense")
    torch.testing.assert_close(attend(q, k, v, scheme, positions, positions, causal=True), dense)
    with pytest.raises(ValueError, match="consecutive positions"):
        attend(q, k, v, scheme, positions, positions, causal=True, bias_path="toeplitz")
    with pytest.raises(ValueError, match="path must be one of"):
        attend(q, k, v, scheme, positions, positions, causal=True, bias_path="fast")


def test_key_query_delta_is_the_negated_consecutive_offset():
    base = torch.arange(10)[None]
    assert flex.key_query_delta(base[:, 7:], base) == -7
    assert flex.key_query_delta(base + torch.tensor([[0], [5]]), base + torch.tensor([[0], [5]])) == 0
    assert flex.key_query_delta(base, base + torch.tensor([[0], [5]])) is None
    assert flex.key_query_delta(torch.tensor([[0, 2]]), torch.tensor([[0, 2]])) is None
    assert flex.key_query_delta(torch.tensor([[4]]), torch.tensor([[1, 2, 3, 4]])) == -3
    for q_pos, k_pos in ((base[:, 3:], base), (base[:, :1] + 4, base[:, 2:])):
        delta = flex.key_query_delta(q_pos, k_pos)
        j, i = torch.arange(k_pos.shape[1])[None, :], torch.arange(q_pos.shape[1])[:, None]
        assert torch.equal(k_pos[0][None, :] - q_pos[0][:, None], (j - i) + delta)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (32, 8), (6, 3), (8, 100)])
def test_t5_score_mod_lookup_equals_buckets(causal, num_buckets, max_distance):
    """The score_mod's clamped lookup table gives the bucket of every distance, far ones included."""
    from posemb.functional.buckets import t5_relative_bucket

    scheme = _bias_scheme("t5", 3, causal, num_buckets=num_buckets, max_distance=max_distance)
    distance = torch.arange(-1000, 1001)
    q_positions = torch.zeros(1, 1, dtype=torch.long)
    k_positions = distance[None]
    score_mod = scheme.score_mod(q_positions, k_positions)
    zero = torch.zeros(())
    got = torch.stack([score_mod(zero, torch.tensor(0), torch.tensor(1), torch.tensor(0), torch.tensor(j))
                       for j in range(0, 2001, 7)])
    buckets = t5_relative_bucket(distance[::7], bidirectional=not causal, num_buckets=num_buckets,
                                 max_distance=max_distance)
    torch.testing.assert_close(got, scheme.bias.weight[buckets, 1].detach())
    torch.testing.assert_close(scheme.distance_bias(distance[::7])[1], scheme.bias.weight[buckets, 1])


def test_alibi_distance_bias_and_score_mod():
    scheme = posemb.build("alibi", num_heads=4)
    distance = torch.tensor([-5, 0, 3])
    expected = -scheme.slopes[:, None] * distance.abs().float()
    torch.testing.assert_close(scheme.distance_bias(distance), expected)
    score_mod = scheme.score_mod(torch.tensor([[10]]), torch.tensor([[5, 10, 13]]))
    got = score_mod(torch.tensor(1.0), torch.tensor(0), torch.tensor(2), torch.tensor(0), torch.tensor(0))
    torch.testing.assert_close(got, 1.0 - scheme.slopes[2] * 5)
