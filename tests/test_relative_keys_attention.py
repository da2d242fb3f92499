"""Transformer-XL's fused path (``posemb.model.relative_keys_attention``: q + u on the fused CPU kernel, the
positional scores per block as a strided mask, a hand-written backward) against the naive float64 formula,
autograd through it, and the tiled content path it replaces; and the calls that must fall back."""
from __future__ import annotations

import math

import pytest
import torch

import posemb
from posemb.model import TransformerLM, attention
from posemb.model import relative_keys_attention as fused
from posemb.model.attention import attend

from _fused_paths import (assert_bounded_and_equal_to_tiled, assert_double_backward_matches,
                          assert_float32_close_to_float64, runs_forward)
from _fused_paths import tiled as tiled_path
from test_key_bias_attention import loss_and_gradients
from test_relative_schemes import naive_transformer_xl


@pytest.fixture
def small_blocks(monkeypatch):
    """Query blocks of 8 rows, so that short sequences cross several blocks and backward sub-blocks."""
    monkeypatch.setattr(fused, "QUERY_BLOCK", 8)


def _scheme(heads=3, head_dim=8, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    scheme = posemb.build("transformer_xl", dim=heads * head_dim, num_heads=heads)
    with torch.no_grad():
        for parameter in scheme.parameters():
            parameter.normal_(0.0, 0.5)
    return scheme.to(dtype)


def _inputs(q_len, k_len, starts=(37, 5), heads=3, head_dim=8, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(len(starts), heads, length, head_dim, generator=generator, dtype=dtype)
               for length in (q_len, k_len, k_len))
    k_pos = torch.stack([torch.arange(start, start + k_len) for start in starts])
    return q, k, v, k_pos[:, k_len - q_len:], k_pos


def _tiled(monkeypatch, *args, **kwargs):
    return tiled_path(monkeypatch, "_RELATIVE_KEYS_FUSED", *args, **kwargs)


def _takes_fused_path(scheme, q, k, v, q_pos, k_pos, monkeypatch, causal=True):
    """Whether the training path (q requires grad) really went through the fused path."""
    return runs_forward(monkeypatch, fused, lambda: attend(q.detach().requires_grad_(), k, v, scheme, q_pos, k_pos, causal=causal))


def naive_transformer_xl_autograd(scheme, q, k, v, q_pos, k_pos):
    """Dai et al. 2019 (a) + (b) + (c) + (d) with autograd-able float64 tensors: R_{i-j} for every pair from
    the sinusoid's formula, projected by the scheme's W_R; a dense causal softmax."""
    heads, head_dim, dim = scheme.num_heads, scheme.head_dim, scheme.dim
    inv_freq = scheme.base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    distance = (q_pos[:, :, None] - k_pos[:, None, :]).double()[..., None] * inv_freq   # (B, Lq, Lk, dim / 2)
    r = torch.cat([distance.sin(), distance.cos()], -1) @ scheme.r_proj.weight.T         # (B, Lq, Lk, H d)
    r = r.unflatten(-1, (heads, head_dim)).permute(0, 3, 1, 2, 4)                         # (B, H, Lq, Lk, d)
    u, bias_v = scheme.content_bias[None, :, None, :], scheme.position_bias[None, :, None, :]
    logits = (q + u) @ k.transpose(-1, -2) + ((q + bias_v)[..., None, :] * r).sum(-1)
    hidden = k_pos[:, None, :] > q_pos[:, :, None]
    logits = logits.masked_fill(hidden[:, None], float("-inf")) / math.sqrt(head_dim)
    return torch.softmax(logits, -1) @ v


LENGTHS = [(29, 29), (11, 23), (1, 17)]


@pytest.mark.parametrize("q_len,k_len", LENGTHS)
def test_forward_equals_the_naive_formula(q_len, k_len, small_blocks, monkeypatch):
    """The training path's output (q requires grad)."""
    scheme = _scheme()
    q, k, v, q_pos, k_pos = _inputs(q_len, k_len)
    assert _takes_fused_path(scheme, q, k, v, q_pos, k_pos, monkeypatch)
    got = attend(q.requires_grad_(), k, v, scheme, q_pos, k_pos, causal=True).detach()
    with torch.no_grad():
        tiled = _tiled(monkeypatch, q, k, v, scheme, q_pos, k_pos, causal=True)
    torch.testing.assert_close(got, naive_transformer_xl(scheme, q, k, v, q_pos, k_pos, True), rtol=0, atol=1e-12)
    torch.testing.assert_close(got, tiled, rtol=0, atol=1e-12)


def test_no_grad_calls_take_the_fused_path_only_when_the_table_is_small(small_blocks, monkeypatch):
    """Without autograd the (heads, Lk, d) distance table must be at most a quarter of the output: a batch
    of 8 at Lq = Lk takes the fused path (and equals the formula), a batch of 1 the tiled one."""
    scheme = _scheme()
    calls = []
    original = fused._forward
    monkeypatch.setattr(fused, "_forward", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    for starts, expected in (((0, 3, 5, 9, 11, 20, 30, 40), [1]), ((7,), [1])):
        q, k, v, q_pos, k_pos = _inputs(29, 29, starts)
        with torch.no_grad():
            got = attend(q, k, v, scheme, q_pos, k_pos, causal=True)
        assert calls == expected
        torch.testing.assert_close(got, naive_transformer_xl(scheme, q, k, v, q_pos, k_pos, True), rtol=0, atol=1e-12)


@pytest.mark.parametrize("q_len,k_len", LENGTHS)
def test_gradients_equal_autograd_through_the_naive_formula(q_len, k_len, small_blocks, monkeypatch):
    scheme = _scheme()
    q, k, v, q_pos, k_pos = _inputs(q_len, k_len)
    weights = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    leaves = [q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), *scheme.parameters()]
    names = ["q", "k", "v", *(name for name, _ in scheme.named_parameters())]
    ours = torch.autograd.grad((attend(q, k, v, scheme, q_pos, k_pos, causal=True) * weights).sum(), leaves)
    expected = torch.autograd.grad(
        (naive_transformer_xl_autograd(scheme, q, k, v, q_pos, k_pos) * weights).sum(), leaves)
    tiled = torch.autograd.grad((_tiled(monkeypatch, q, k, v, scheme, q_pos, k_pos, causal=True) * weights).sum(),
                                leaves)
    for label, a, b, c in zip(names, ours, expected, tiled):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11, msg=f"gradient of {label}")
        torch.testing.assert_close(a, c, rtol=0, atol=1e-11, msg=f"gradient of {label} (tiled)")
    # u's gradient is zero in the mathematics for a single query (a constant per row); the rest are not
    assert all(g.abs().max() > 1e-6 for name, g in zip(names, ours) if not (q_len == 1 and name == "content_bias"))


def test_float32_is_close_to_float64_at_real_blocks():
    """The module's 256-row blocks at a length that crosses two, forward and gradients."""
    scheme = _scheme(heads=2, head_dim=16)
    q, k, v, q_pos, k_pos = _inputs(300, 300, (0,), heads=2, head_dim=16)
    leaves = [q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), *scheme.parameters()]
    exact_out = attend(q, k, v, scheme, q_pos, k_pos, causal=True)
    exact = torch.autograd.grad(exact_out.square().sum(), leaves)
    low = _scheme(heads=2, head_dim=16, dtype=torch.float32)
    low_leaves = [t.detach().float().requires_grad_() for t in (q, k, v)] + list(low.parameters())
    out = attend(*low_leaves[:3], low, q_pos, k_pos, causal=True)
    got = torch.autograd.grad(out.square().sum(), low_leaves)
    assert_float32_close_to_float64(out, got, exact_out, exact)


def test_model_training_step_matches_tiled_path(monkeypatch):
    torch.manual_seed(3)
    model = TransformerLM(vocab_size=40, dim=24, depth=2, heads=3, scheme="transformer_xl").double()
    tokens = torch.randint(0, 40, (2, fused.QUERY_BLOCK + 41))
    loss, grads = loss_and_gradients(model, tokens)
    monkeypatch.setattr(attention, "_RELATIVE_KEYS_FUSED", False)
    loss_tiled, grads_tiled = loss_and_gradients(model, tokens)
    torch.testing.assert_close(loss, loss_tiled, rtol=1e-12, atol=0)
    for a, b in zip(grads, grads_tiled):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("case", ["bidirectional", "spaced positions", "bfloat16", "subclass"])
def test_calls_outside_the_path_fall_back_to_the_tiled_path(case, monkeypatch):
    scheme = _scheme()
    q, k, v, q_pos, k_pos = _inputs(12, 12)
    if case == "spaced positions":
        q_pos, k_pos = q_pos * 2, k_pos * 2
    if case == "bfloat16":
        scheme, q, k, v = scheme.to(torch.bfloat16), q.bfloat16(), k.bfloat16(), v.bfloat16()
    if case == "subclass":
        class Doubled(type(scheme)):
            def relative_embeddings(self, distances):
                return 2 * super().relative_embeddings(distances)
        scheme.__class__ = Doubled
        assert scheme.relative_key_terms() is None
    causal = case != "bidirectional"
    assert not _takes_fused_path(scheme, q, k, v, q_pos, k_pos, monkeypatch, causal=causal)
    if case in ("bidirectional", "spaced positions"):
        with torch.no_grad():
            got = attend(q, k, v, scheme, q_pos, k_pos, causal=causal)
        torch.testing.assert_close(got, naive_transformer_xl(scheme, q, k, v, q_pos, k_pos, causal), rtol=0, atol=1e-12)


def test_training_call_keeps_every_tensor_within_a_block(monkeypatch):
    """At L = 1024, forward and backward: no tensor outgrows one block's per-distance scores (batch, heads,
    256, 256 + L - 1), far below one (L, L) matrix per head; gradients equal the tiled path's."""
    length, heads = 1024, 2
    scheme = _scheme(heads=heads, head_dim=16, dtype=torch.float32)
    q, k, v = (torch.randn(1, heads, length, 16).requires_grad_() for _ in range(3))
    pos = torch.arange(length)[None]
    bound = heads * fused.QUERY_BLOCK * (fused.QUERY_BLOCK + length - 1)
    assert bound * 3 <= heads * length * length
    assert_bounded_and_equal_to_tiled(monkeypatch, "_RELATIVE_KEYS_FUSED", scheme, q, k, v, pos, bound)


def test_plain_autograd_setting_keeps_double_backward(monkeypatch):
    scheme = _scheme()
    q, k, v, q_pos, k_pos = _inputs(12, 12)
    assert_double_backward_matches(monkeypatch, scheme, q, k, v, q_pos, k_pos, naive_transformer_xl_autograd)


@pytest.mark.parametrize("hook", ["relative_values", "prepare_relative"])
def test_subclasses_overriding_other_hooks_take_the_generic_path(hook):
    """The fused path computes Transformer-XL's own terms only: a subclass with its own value term or
    per-call state must run through the hooks (a review found both silently dropped otherwise)."""
    scheme = _scheme()
    base = type(scheme)
    subclass = type("Changed", (base,), {hook: lambda self, *a, **kw: getattr(base, hook)(self, *a, **kw)})
    scheme.__class__ = subclass
    assert scheme.relative_key_terms() is None
