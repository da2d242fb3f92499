"""CoPE's fused path (``posemb.model.cope_attention``: whole-row blocks on the fused CPU kernel with a
hand-written backward) against the naive float64 formula, autograd through it, and the tiled content path
it replaces; and the calls that must fall back to the tiled path."""
from __future__ import annotations

import pytest
import torch

import posemb
from posemb.model import TransformerLM, attention
from posemb.model import cope_attention as cope
from posemb.model.attention import attend

from _fused_paths import assert_double_backward_matches, assert_float32_close_to_float64, runs_forward
from _fused_paths import tiled as tiled_path
from test_key_bias_attention import loss_and_gradients
from test_newer_schemes import LargestTensor, naive_attention, naive_cope_term


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few query rows, so that short sequences cross several blocks."""
    monkeypatch.setattr(attention, "_CONTENT_RECOMPUTE_ELEMENTS", 2 * 3 * 4 * 12)


def _scheme(npos=4, heads=3, head_dim=8, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    scheme = posemb.build("cope", head_dim=head_dim, num_heads=heads, npos=npos)
    with torch.no_grad():
        scheme.position_embedding.normal_()
    return scheme.to(dtype)


def _inputs(q_len, k_len, batch=2, heads=3, head_dim=8, dtype=torch.float64, seed=0, gate_scale=2.0):
    """q scaled so that the gates spread over (0, 1) and the positions cross several integers."""
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=generator, dtype=dtype)
               for length in (q_len, k_len, k_len))
    k_pos = torch.arange(k_len).expand(batch, -1)
    return q * gate_scale, k, v, k_pos[:, k_len - q_len:], k_pos


def _tiled(monkeypatch, *args, **kwargs):
    return tiled_path(monkeypatch, "_COPE_FUSED", *args, **kwargs)


def _takes_fused_path(scheme, q, k, v, q_pos, k_pos, monkeypatch):
    """Whether attend() really went through the fused path (so no test here passes by falling back)."""
    with torch.no_grad():
        return runs_forward(monkeypatch, cope, lambda: attend(q, k, v, scheme, q_pos, k_pos, causal=True))


def naive_cope_autograd(scheme, q, k, v):
    """The paper's formula with autograd-able float64 tensors: gates, the reversed cumulative sum by an
    explicit upper-triangular matrix product, the clip, floor / ceil interpolation of q . e, dense softmax."""
    q_len, k_len, d = q.shape[-2], k.shape[-2], q.shape[-1]
    offset = k_len - q_len
    visible = torch.arange(k_len)[None, :] <= torch.arange(q_len)[:, None] + offset
    gates = torch.sigmoid(q @ k.transpose(-1, -2) / d ** 0.5) * visible
    after = (torch.arange(k_len)[:, None] >= torch.arange(k_len)[None, :]).double()   # t >= j
    positions = (gates @ after).clamp(max=scheme.npos - 1)                             # sum_{t >= j} g_t
    table = q @ scheme.position_embedding.T
    low = positions.detach().floor().long()
    high = (low + 1).clamp(max=scheme.npos - 1)
    weight = positions - low
    z = (1 - weight) * table.gather(-1, low) + weight * table.gather(-1, high)
    scores = (q @ k.transpose(-1, -2) / d ** 0.5 + z).masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, -1) @ v


LENGTHS = [(29, 29), (11, 23), (1, 17)]


@pytest.mark.parametrize("npos", [3, 64])
@pytest.mark.parametrize("q_len,k_len", LENGTHS)
def test_forward_equals_the_naive_formula(npos, q_len, k_len, small_blocks, monkeypatch):
    """npos 3: most keys sit at the clip; 64: none do."""
    scheme = _scheme(npos, heads=2)
    q, k, v, q_pos, k_pos = _inputs(q_len, k_len, batch=1, heads=2)
    assert _takes_fused_path(scheme, q, k, v, q_pos, k_pos, monkeypatch)
    with torch.no_grad():
        got = attend(q, k, v, scheme, q_pos, k_pos, causal=True)
        tiled = _tiled(monkeypatch, q, k, v, scheme, q_pos, k_pos, causal=True)
    torch.testing.assert_close(got, naive_attention(q, k, v, naive_cope_term(scheme, q, k)), rtol=0, atol=1e-12)
    torch.testing.assert_close(got, tiled, rtol=0, atol=1e-12)


@pytest.mark.parametrize("npos", [3, 64])
@pytest.mark.parametrize("q_len,k_len", LENGTHS)
def test_gradients_equal_autograd_through_the_naive_formula(npos, q_len, k_len, small_blocks, monkeypatch):
    scheme = _scheme(npos)
    q, k, v, q_pos, k_pos = _inputs(q_len, k_len)
    weights = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    leaves = [q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), scheme.position_embedding]
    ours = torch.autograd.grad((attend(q, k, v, scheme, q_pos, k_pos, causal=True) * weights).sum(), leaves)
    expected = torch.autograd.grad((naive_cope_autograd(scheme, q, k, v) * weights).sum(), leaves)
    tiled = torch.autograd.grad((_tiled(monkeypatch, q, k, v, scheme, q_pos, k_pos, causal=True) * weights).sum(),
                                leaves)
    for label, a, b, c in zip(("q", "k", "v", "position_embedding"), ours, expected, tiled):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11, msg=f"gradient of {label}")
        torch.testing.assert_close(a, c, rtol=0, atol=1e-11, msg=f"gradient of {label} (tiled)")
        assert a.abs().max() > 1e-3, label


def test_positions_are_not_read(monkeypatch):
    """CoPE reads no positions: spaced ones take the fused path and give the same output."""
    scheme = _scheme()
    q, k, v, q_pos, k_pos = _inputs(20, 20)
    assert _takes_fused_path(scheme, q, k, v, q_pos * 3 + 7, k_pos * 3 + 7, monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(attend(q, k, v, scheme, q_pos * 3 + 7, k_pos * 3 + 7, causal=True),
                                   attend(q, k, v, scheme, q_pos, k_pos, causal=True), rtol=0, atol=0)


def test_float32_is_close_to_float64():
    """Real blocks (the default block budget) at 300 tokens: forward and gradients."""
    scheme = _scheme(16)
    q, k, v, q_pos, k_pos = _inputs(300, 300, batch=1)
    leaves = [q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), scheme.position_embedding]
    exact_out = attend(q, k, v, scheme, q_pos, k_pos, causal=True)
    exact = torch.autograd.grad(exact_out.square().sum(), leaves)
    low = _scheme(16, dtype=torch.float32)
    low_leaves = [t.detach().float().requires_grad_() for t in (q, k, v)] + [low.position_embedding]
    out = attend(*low_leaves[:3], low, q_pos, k_pos, causal=True)
    got = torch.autograd.grad(out.square().sum(), low_leaves)
    assert_float32_close_to_float64(out, got, exact_out, exact)


def test_model_training_step_matches_tiled_path(monkeypatch):
    torch.manual_seed(3)
    model = TransformerLM(vocab_size=40, dim=24, depth=2, heads=3, scheme="cope", npos=8).double()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.shape == (8, 8):   # each layer's position embedding (zero at initialisation)
                parameter.normal_()
    tokens = torch.randint(0, 40, (2, 70))
    monkeypatch.setattr(attention, "_CONTENT_RECOMPUTE_ELEMENTS", 2 * 3 * 16 * 30)
    loss, grads = loss_and_gradients(model, tokens)
    monkeypatch.setattr(attention, "_COPE_FUSED", False)
    loss_tiled, grads_tiled = loss_and_gradients(model, tokens)
    torch.testing.assert_close(loss, loss_tiled, rtol=1e-12, atol=0)
    for a, b in zip(grads, grads_tiled):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("case", ["bfloat16", "values narrower", "batch of one key"])
def test_calls_outside_the_path_fall_back_to_the_tiled_path(case, monkeypatch):
    scheme = _scheme()
    q, k, v, q_pos, k_pos = _inputs(12, 12)
    if case == "bfloat16":
        scheme, q, k, v = scheme.to(torch.bfloat16), q.bfloat16(), k.bfloat16(), v.bfloat16()
    if case == "values narrower":
        v = v[..., :4]
    if case == "batch of one key":
        k, v = k[:1], v[:1]
    assert not _takes_fused_path(scheme, q, k, v, q_pos, k_pos, monkeypatch)
    if case != "bfloat16":
        with torch.no_grad():
            got = attend(q, k, v, scheme, q_pos, k_pos, causal=True)
        expected = naive_attention(q, k.expand(q.shape[0], -1, -1, -1), v.expand(q.shape[0], -1, -1, -1),
                                   naive_cope_term(scheme, q, k.expand(q.shape[0], -1, -1, -1)))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_training_call_keeps_every_tensor_within_a_block(monkeypatch):
    """At L = 1024, forward and backward: no tensor outgrows one block of the logits budget, here a
    sixteenth of the (L, L) matrices; the gradients equal the tiled path's."""
    length, heads = 1024, 2
    scheme = _scheme(32, heads=heads, head_dim=16, dtype=torch.float32)
    q, k, v = (torch.randn(1, heads, length, 16).requires_grad_() for _ in range(3))
    pos = torch.arange(length)[None]
    block = heads * length * length // 16   # (the default budget holds all of L = 1024 at 2 heads)
    monkeypatch.setattr(attention, "_CONTENT_RECOMPUTE_ELEMENTS", block)
    recorder = LargestTensor()
    with recorder:
        out = attend(q, k, v, scheme, pos, pos, causal=True)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v, scheme.position_embedding))
    assert recorder.largest <= 1.1 * block, f"a tensor of {recorder.largest} elements, block {block}"
    tiled = torch.autograd.grad(_tiled(monkeypatch, q, k, v, scheme, pos, pos, causal=True).square().sum(),
                                (q, k, v, scheme.position_embedding))
    for a, b in zip(grads, tiled):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * max(1.0, b.abs().max().item()))


def test_plain_autograd_setting_keeps_double_backward(monkeypatch):
    scheme = _scheme()
    q, k, v, q_pos, k_pos = _inputs(12, 12)
    assert_double_backward_matches(monkeypatch, scheme, q, k, v, q_pos, k_pos,
                                   lambda scheme, q, k, v, q_pos, k_pos: naive_cope_autograd(scheme, q, k, v))


def test_a_subclass_with_its_own_term_takes_the_generic_path(monkeypatch):
    scheme = _scheme()

    class Halved(type(scheme)):
        def relative_logits(self, *args, **kwargs):
            return super().relative_logits(*args, **kwargs) / 2

    scheme.__class__ = Halved
    assert scheme.cope_parameters() is None
    q, k, v, q_pos, k_pos = _inputs(12, 12)
    assert not _takes_fused_path(scheme, q, k, v, q_pos, k_pos, monkeypatch)


def test_a_subclass_with_a_value_term_takes_the_generic_path(monkeypatch):
    """The fused path computes CoPE's own terms only: a subclass adding relative_values (or its own
    prepare_relative) must run through the hooks, or its term would be silently dropped."""
    scheme = _scheme()

    class WithValues(type(scheme)):
        def relative_values(self, probs, *args, **kwargs):
            return probs.sum(-1, keepdim=True) * torch.ones(probs.shape[-3], 1, 8, dtype=probs.dtype)

    scheme.__class__ = WithValues
    assert scheme.cope_parameters() is None
