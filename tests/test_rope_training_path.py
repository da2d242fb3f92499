"""The model's training path for rotation schemes: q and k rotated in place inside the packed
projection (posemb.kernels.apply_rotary_qkv_, RoPE.rotate_qkv_), one cos/sin table per forward
(PositionsMemo), and the input schemes on expanded positions. Everything against the
out-of-place reference it replaces."""
from __future__ import annotations

import pytest
import torch

import posemb
from posemb.functional.rope import apply_rotary as reference_rotary
from posemb.kernels import apply_rotary_qkv_
from posemb.model.attention import MultiHeadAttention
from posemb.schemes.rope import RoPE

TOLERANCE = {torch.float64: dict(atol=1e-12, rtol=0), torch.float32: dict(atol=1e-6, rtol=1e-6),
             torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2)}


def _tables(batch, length, half, seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    angles = torch.rand(batch, length, half, generator=generator, dtype=torch.float64) * 50
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _thirds(qkv, heads):
    batch, length = qkv.shape[:2]
    q, k, v = qkv.view(batch, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [8, 6])
def test_packed_rotation_matches_reference(dtype, interleaved, rotary_dim):
    batch, length, heads, dim = 2, 7, 3, 8
    qkv = torch.randn(batch, length, 3 * heads * dim).to(dtype)
    table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    cos_q, sin_q = _tables(batch, length, rotary_dim // 2, 0, table_dtype)
    cos_k, sin_k = _tables(1, length, rotary_dim // 2, 1, table_dtype)
    q, k, v = (t.clone() for t in _thirds(qkv, heads))
    got = apply_rotary_qkv_(qkv, cos_q, sin_q, cos_k, sin_k, heads=heads, interleaved=interleaved, backend="cpu")
    assert got is qkv
    got_q, got_k, got_v = _thirds(got, heads)
    torch.testing.assert_close(got_q, reference_rotary(q, cos_q, sin_q, interleaved=interleaved), **TOLERANCE[dtype])
    torch.testing.assert_close(got_k, reference_rotary(k, cos_k, sin_k, interleaved=interleaved), **TOLERANCE[dtype])
    assert torch.equal(got_v, v)


@pytest.mark.parametrize("grad_inplace", [False, True])
@pytest.mark.parametrize("interleaved", [False, True])
def test_packed_backward_matches_reference(grad_inplace, interleaved):
    batch, length, heads, dim = 2, 5, 2, 6
    weight = torch.randn(batch, length, 3 * heads * dim, dtype=torch.float64, requires_grad=True)
    cos, sin = _tables(1, length, dim // 2, 3, torch.float64)
    upstream = torch.randn(batch, length, 3 * heads * dim, dtype=torch.float64)

    rotated = apply_rotary_qkv_(weight * 2, cos, sin, heads=heads, interleaved=interleaved,
                                grad_inplace=grad_inplace)
    (got,) = torch.autograd.grad(rotated, weight, upstream.clone())

    q, k, v = _thirds(weight * 2, heads)
    ref = torch.stack([reference_rotary(q, cos, sin, interleaved=interleaved),
                       reference_rotary(k, cos, sin, interleaved=interleaved), v])
    ref = ref.permute(1, 3, 0, 2, 4).reshape(batch, length, -1)
    (expected,) = torch.autograd.grad(ref, weight, upstream)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def test_packed_rotation_gradcheck_and_double_backward():
    cos, sin = _tables(1, 3, 2, 4, torch.float64)

    def f(x):
        return apply_rotary_qkv_(x * 1, cos, sin, heads=2)

    x = torch.randn(1, 3, 3 * 2 * 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


def test_shared_gradient_is_not_overwritten_without_grad_inplace():
    # AddBackward hands one gradient tensor to both inputs: rotating it in place would corrupt w's.
    cos, sin = _tables(1, 4, 2, 5)
    x = torch.randn(1, 4, 3 * 4, requires_grad=True)
    w = torch.randn(1, 4, 3 * 4, requires_grad=True)
    upstream = torch.randn(1, 4, 3 * 4)
    (apply_rotary_qkv_(x * 1, cos, sin, heads=1) + w).backward(upstream)
    assert torch.equal(w.grad, upstream)
    assert not torch.equal(x.grad, upstream)  # the q and k thirds were rotated back


def test_packed_rotation_refuses_clearly():
    cos, sin = _tables(1, 4, 2, 6)
    leaf = torch.randn(1, 4, 12, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf"):
        apply_rotary_qkv_(leaf, cos, sin, heads=1)
    with pytest.raises(ValueError, match="heads"):
        apply_rotary_qkv_(torch.randn(1, 4, 12), cos, sin, heads=5)
    with pytest.raises(ValueError, match="contiguous"):
        apply_rotary_qkv_(torch.randn(1, 4, 24)[..., ::2], cos, sin, heads=1)
    with pytest.raises(ValueError, match="cos_q"):
        apply_rotary_qkv_(torch.randn(1, 4, 12), cos[:, :3], sin[:, :3], heads=1)
    with pytest.raises(TypeError, match="M-RoPE|replaces"):
        posemb.build("mrope", head_dim=8).rotate_qkv_(torch.randn(1, 4, 24), torch.arange(4)[None], heads=1)


@pytest.mark.parametrize("scheme", ["rope", "xpos", "rope_interleaved"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_packed_path_equals_out_of_place(scheme, dtype):
    """MultiHeadAttention takes the in-place path unless a forward hook watches the projection;
    with the hook it rotates out of place (HEAD's path). Same outputs and gradients, and the
    hook's copy of the projection is left unrotated."""
    options = {"layout": "interleaved"} if scheme == "rope_interleaved" else {}
    name = "rope" if scheme == "rope_interleaved" else scheme
    torch.manual_seed(0)
    attention = MultiHeadAttention(32, 4, posemb.build(name, head_dim=8, **options)).to(dtype)
    x = torch.randn(3, 11, 32, dtype=dtype, requires_grad=True)
    positions = torch.arange(11)[None].expand(3, 11)
    upstream = torch.randn(3, 11, 32, dtype=dtype)

    packed = attention(x, positions)
    packed_grads = torch.autograd.grad(packed, [x, *attention.parameters()], upstream)

    seen = []
    handle = attention.qkv.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        plain = attention(x, positions)
        plain_grads = torch.autograd.grad(plain, [x, *attention.parameters()], upstream)
    finally:
        handle.remove()
    torch.testing.assert_close(seen[0], torch.nn.functional.linear(x, attention.qkv.weight))
    torch.testing.assert_close(packed, plain, **TOLERANCE[dtype])
    for got, expected in zip(packed_grads, plain_grads):
        torch.testing.assert_close(got, expected, **TOLERANCE[dtype])


def test_tables_are_built_once_per_forward(monkeypatch):
    model = posemb.TransformerLM(50, 32, 3, 4, scheme="rope")
    calls = []
    original = RoPE._compute_rotation_tables

    def counting(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(RoPE, "_compute_rotation_tables", counting)
    tokens = torch.randint(0, 50, (2, 9))
    model(tokens).sum().backward()
    assert len(calls) == 1
    model(tokens)
    assert len(calls) == 2  # a new forward makes new positions: a new table


def test_memo_follows_in_place_changes_of_positions():
    scheme = RoPE(8)
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    positions = torch.arange(5)[None]
    first = scheme.rotate(q, k, positions, positions)
    positions.add_(3)
    shifted = scheme.rotate(q, k, positions, positions)
    expected = RoPE(8).rotate(q, k, torch.arange(3, 8)[None], torch.arange(3, 8)[None])
    assert not torch.allclose(first[0], shifted[0])
    torch.testing.assert_close(shifted, expected)
    with torch.inference_mode():  # inference tensors have no version counter: computed directly
        positions = torch.arange(5)[None]
        torch.testing.assert_close(scheme.rotate(q, k, positions, positions), first)


@pytest.mark.parametrize("scheme", ["learned", "sinusoidal", "pope", "xpos", "rope"])
def test_expanded_positions_equal_materialised_ones(scheme):
    """Schemes look up one row for expanded positions; materialised equal rows give the same
    output and gradients."""
    torch.manual_seed(0)
    model = posemb.TransformerLM(40, 32, 2, 4, scheme=scheme)
    tokens = torch.randint(0, 40, (3, 10))
    expanded = torch.arange(10)[None].expand(3, 10)
    results = []
    for positions in (expanded, expanded.clone()):
        model.zero_grad()
        out = model(tokens, positions)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_pope_polar_function_matches_plain_autograd():
    """PoPE's memory-saving autograd Function against the plain formula it replaces, with
    gradients for x and for broadcast tables (the key phase bias reaches them)."""
    from posemb.schemes.pope import _Polar, _polar_reference

    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    cos = torch.randn(1, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    sin = torch.randn(1, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: _Polar.apply(*a, torch.float64), (x, cos, sin))
    upstream = torch.randn(2, 3, 4, 10, dtype=torch.float64)
    got = torch.autograd.grad(_Polar.apply(x, cos, sin, torch.float64), (x, cos, sin), upstream)
    expected = torch.autograd.grad(_polar_reference(x, cos, sin, torch.float64), (x, cos, sin), upstream)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    xb = x.detach().bfloat16()
    torch.testing.assert_close(_Polar.apply(xb, cos.detach().float(), sin.detach().float(), torch.float32),
                               _polar_reference(xb, cos.detach().float(), sin.detach().float(), torch.float32))


def test_training_after_inference_mode_evaluation_reuses_no_inference_buffer():
    """Evaluation under torch.inference_mode, then a training step: the CPU kernel's scratch
    buffers must not be inference tensors outside inference mode (a RuntimeError before)."""
    import posemb as _posemb
    model = _posemb.TransformerLM(256, 64, 1, 4, scheme="rope")
    tokens = torch.randint(0, 256, (2, 600))
    with torch.inference_mode():
        expected = model(tokens)
    logits = model(tokens)
    logits.float().sum().backward()
    torch.testing.assert_close(logits.detach(), expected)
