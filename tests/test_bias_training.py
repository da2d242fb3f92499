"""Bias-site schemes in training: the Toeplitz path's hand-written backward and the FlexAttention
score_mods of the distance-only biases, each against the dense reference (float64)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import posemb
from posemb.kernels import flex
from posemb.model.attention import attend

# (name, options); every scheme with a learnable bias table, plus Sandwich (a constant one).
LEARNED = [
    ("t5", dict(num_buckets=8, max_distance=12)),   # reach 12: the tail rule of the backward runs
    ("t5", dict(num_buckets=6, max_distance=3)),    # reach 6 (exact buckets only)
    ("kerple", dict(kernel="log")),
    ("kerple", dict(kernel="power", r2=1.3)),
    ("dynamic_position_bias", dict(hidden=8, depth=2, norm=True)),
]
DISTANCE = [("kerple", dict(kernel="log")), ("kerple", dict(kernel="power", r2=1.3)), ("sandwich", dict(dim=16)),
            ("dynamic_position_bias", dict(hidden=8, depth=2)),
            ("dynamic_position_bias", dict(hidden=8, depth=1, log_distance=False, norm=True))]


def build(name, options, heads=3, causal=True, dtype=torch.float64):
    torch.manual_seed(0)
    scheme = posemb.build(name, num_heads=heads, causal=causal, **options).to(dtype)
    with torch.no_grad():  # random parameters (T5's table starts at zero), so position matters
        for parameter in scheme.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    return scheme


def qkv(batch, heads, q_len, k_len, dim=8, seed=0, requires_grad=True):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, n, dim, generator=generator, dtype=torch.float64)
                 .requires_grad_(requires_grad) for n in (q_len, k_len, k_len))


def gradients(scheme, q, k, v, qp, kp, causal, path):
    """Output and the gradients of a non-trivial loss to q, k, v and every parameter."""
    scheme.zero_grad()
    for t in (q, k, v):
        t.grad = None
    out = attend(q, k, v, scheme, qp, kp, causal=causal, bias_path=path)
    weights = torch.linspace(-1, 2, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * weights).sum().backward()
    return [out.detach()] + [t.grad.clone() for t in (q, k, v) if t.requires_grad] \
        + [p.grad.clone() for p in scheme.parameters()]


def positions_for(batch, q_len, k_len, start):
    kp = torch.arange(k_len)[None] + start + torch.arange(batch)[:, None] * 100
    return kp[:, k_len - q_len:], kp


@pytest.mark.parametrize("name,options", LEARNED)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_len,k_len,start", [(40, 40, 0), (7, 33, 5), (1, 20, 9)])
def test_toeplitz_backward_matches_dense_and_autograd(name, options, causal, q_len, k_len, start, monkeypatch):
    """The hand-written backward (several forward blocks, several sub-blocks each, KV-cache offsets,
    a batch whose rows start at other positions) gives the dense reference's output and gradients
    to q, k, v and the scheme's parameters, as does autograd through the strided view."""
    monkeypatch.setattr(flex, "QUERY_BLOCK", 16)
    monkeypatch.setattr(flex, "_TOEPLITZ_BACKWARD_ELEMENTS", 2 * 3 * 5 * 16)  # sub-blocks of ~5 rows
    scheme = build(name, options, causal=causal)
    q, k, v = qkv(2, 3, q_len, k_len)
    qp, kp = positions_for(2, q_len, k_len, start)
    dense = gradients(scheme, q, k, v, qp, kp, causal, "dense")
    fast = gradients(scheme, q, k, v, qp, kp, causal, "toeplitz")
    assert all(g.abs().sum() > 0 for g in dense[4:])
    for got, want in zip(fast, dense):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    original = flex.toeplitz_bias_attention
    monkeypatch.setattr(flex, "toeplitz_bias_attention",
                        lambda *a, **kw: original(*a, **{**kw, "backward": "autograd"}))
    for got, want in zip(gradients(scheme, q, k, v, qp, kp, causal, "toeplitz"), dense):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)


def test_t5_tail_rule_with_queries_far_from_their_keys():
    """Query positions that do not sit at the end of the keys (delta far from -shift): the band
    rule is off whenever a visible pair lies beyond reach on the positive side, and the gradients
    still equal the dense ones; with the band rule on, only pairs within reach are resolved."""
    scheme = build("t5", dict(num_buckets=8, max_distance=10), causal=True)
    for q_offset in (-30, 0, 25):
        q, k, v = qkv(1, 3, 12, 30, seed=q_offset + 40)
        kp = torch.arange(30)[None] + 50
        qp = kp[:, -12:] + q_offset
        dense = gradients(scheme, q, k, v, qp, kp, True, "dense")
        fast = gradients(scheme, q, k, v, qp, kp, True, "toeplitz")
        for got, want in zip(fast, dense):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)


def test_constant_table_keeps_sdpa_autograd_and_diagonal_needs_cpu():
    """ALiBi/Sandwich (no parameters) never enter the custom Function; 'diagonal' refuses other devices."""
    q, k, v = qkv(1, 2, 6, 6)
    alibi = posemb.build("alibi", num_heads=2)
    out = flex.toeplitz_bias_attention(q, k, v, alibi.distance_bias, 0, causal=True, backward="diagonal")
    assert "Toeplitz" not in type(out.grad_fn).__name__
    t5 = build("t5", {}, heads=2)
    out = flex.toeplitz_bias_attention(q, k, v, t5.distance_bias, 0, causal=True, backward="diagonal")
    assert "Toeplitz" in type(out.grad_fn).__name__
    with pytest.raises(ValueError, match="backward must be one of"):
        flex.toeplitz_bias_attention(q, k, v, t5.distance_bias, 0, causal=True, backward="fused")
    with pytest.raises(ValueError, match="reach"):
        flex.toeplitz_bias_attention(q, k, v, t5.distance_bias, 0, causal=True, reach=0)
    meta = tuple(t.detach().to("meta") for t in (q, k, v))
    with pytest.raises(ValueError, match="CPU kernel"):
        flex.toeplitz_bias_attention(*meta, lambda d: torch.zeros(2, d.numel(), device="meta"), 0,
                                     causal=True, backward="diagonal")


def test_antidiagonal_sums_equal_a_loop():
    x = torch.randn(2, 5, 7, dtype=torch.float64)
    want = torch.zeros(2, 5 + 7 - 1, dtype=torch.float64)
    for i in range(5):
        for j in range(7):
            want[:, i + j] += x[:, i, j]
    torch.testing.assert_close(flex._antidiagonal_sums(x), want, atol=1e-14, rtol=0)


def test_t5_reach_is_where_the_buckets_saturate():
    from posemb.functional.buckets import t5_relative_bucket

    for causal, buckets, distance in ((True, 32, 128), (False, 32, 128), (True, 6, 3), (False, 8, 100)):
        scheme = posemb.build("t5", num_heads=2, causal=causal, num_buckets=buckets, max_distance=distance)
        reach = scheme.distance_reach()
        far = torch.arange(reach, reach + 500)
        for sign in (1, -1):
            got = t5_relative_bucket(sign * far, bidirectional=not causal, num_buckets=buckets, max_distance=distance)
            assert (got == got[0]).all()


class LargestTensor(TorchDispatchMode):
    """The largest tensor any ATen op produces while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("name", ["t5", "kerple", "dynamic_position_bias"])
def test_training_backward_stays_within_blocks(name):
    """No tensor of the backward reaches one (L, L) score matrix per head (autograd through the
    view kept a (heads, block, L) probability block per block, and the math kernel's)."""
    length, heads = 1024, 2
    scheme = build(name, {}, heads=heads, dtype=torch.float32)
    q, k, v = (t.float().detach().requires_grad_() for t in qkv(1, heads, length, length, dim=16))
    pos = torch.arange(length)[None]
    recorder = LargestTensor()
    with recorder:
        attend(q, k, v, scheme, pos, pos, causal=True).sum().backward()
    assert recorder.largest <= flex._TOEPLITZ_BACKWARD_ELEMENTS + 1024 * 16 * heads, recorder.largest
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in scheme.parameters())


# ---- FlexAttention score_mods (eager on CPU) ----

@pytest.mark.parametrize("name,options", DISTANCE)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_len,k_len,start", [(20, 20, 0), (3, 25, 40)])
def test_distance_score_mods_match_dense(name, options, causal, q_len, k_len, start):
    scheme = build(name, options, causal=causal)
    q, k, v = qkv(2, 3, q_len, k_len, requires_grad=False)
    qp, kp = positions_for(2, q_len, k_len, start)
    dense = attend(q, k, v, scheme, qp, kp, causal=causal, bias_path="dense")
    got = attend(q, k, v, scheme, qp, kp, causal=causal, bias_path="flex")
    torch.testing.assert_close(got, dense, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("name,options", [d for d in DISTANCE if d[0] != "sandwich"])
def test_distance_score_mod_gradients_reach_the_parameters(name, options):
    """FlexAttention's eager CPU path differentiates the captured table (not q, k, v in this torch):
    the parameters' gradients equal the dense ones."""
    scheme = build(name, options, causal=False)
    q, k, v = qkv(1, 3, 15, 15, requires_grad=False)
    qp, kp = positions_for(1, 15, 15, 3)
    dense = gradients(scheme, q, k, v, qp, kp, False, "dense")
    got = gradients(scheme, q, k, v, qp, kp, False, "flex")
    assert all(g.abs().sum() > 0 for g in dense[1:])
    for a, b in zip(got, dense):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_distance_score_mod_with_scattered_positions_and_a_bad_span():
    scheme = build("dynamic_position_bias", dict(hidden=8))
    qp = kp = torch.tensor([[0, 1, 2, 5, 6, 9], [300, 303, 304, 308, 309, 330]])
    q, k, v = qkv(2, 3, 6, 6, requires_grad=False)
    dense = attend(q, k, v, scheme, qp, kp, causal=True, bias_path="dense")
    torch.testing.assert_close(attend(q, k, v, scheme, qp, kp, causal=True, bias_path="flex"), dense,
                               atol=1e-12, rtol=1e-10)
    far = torch.tensor([[0, 2 ** 25]])
    with pytest.raises(ValueError, match="bias_path='dense'"):
        scheme.score_mod(far, far)
