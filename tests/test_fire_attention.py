"""FIRE's fused path (``posemb.model.fire_attention``: the MLP in piecewise linear form, fused CPU attention
per query block, a hand-written backward) against the naive float64 formula, autograd through it, and the
tiled content path it replaces; the piecewise linear form against the MLP; and the calls that must fall
back to the tiled path."""
from __future__ import annotations

import math

import pytest
import torch

import posemb
from posemb.functional.fire import relu_segments
from posemb.model import TransformerLM, attention
from posemb.model import fire_attention as fire
from posemb.model.attention import attend

from _fused_paths import assert_bounded_and_equal_to_tiled, assert_double_backward_matches, runs_forward
from _fused_paths import tiled as tiled_path
from test_key_bias_attention import loss_and_gradients
from test_newer_schemes import LargestTensor, naive_attention, naive_fire_bias


@pytest.fixture
def small_blocks(monkeypatch):
    """Query blocks of 8 rows, so that short sequences cross several blocks and backward sub-blocks."""
    monkeypatch.setattr(fire, "QUERY_BLOCK", 8)


def _scheme(threshold=12.0, heads=3, width=8, seed=0, dtype=torch.float64, c=0.3, multiplier=1.0):
    torch.manual_seed(seed)
    scheme = posemb.build("fire", num_heads=heads, mlp_width=width, threshold=threshold)
    with torch.no_grad():
        for parameter in scheme.mlp.parameters():
            parameter.normal_(0.0, 0.7)
        scheme.c.fill_(c)
        scheme.threshold_multiplier.fill_(multiplier)
    return scheme.to(dtype)


def _inputs(q_len, k_len, starts=(37, 5), dtype=torch.float64, heads=3, head_dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batch = len(starts)
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=generator, dtype=dtype)
               for length in (q_len, k_len, k_len))
    k_pos = torch.stack([torch.arange(start, start + k_len) for start in starts])
    return q, k, v, k_pos[:, k_len - q_len:], k_pos


def _tiled(monkeypatch, *args, **kwargs):
    return tiled_path(monkeypatch, "_FIRE_FUSED", *args, **kwargs)


def _takes_fused_path(scheme, q, k, v, q_pos, k_pos, monkeypatch, causal=True):
    """Whether attend() really went through the fused path (so no test here passes by falling back)."""
    with torch.no_grad():
        return runs_forward(monkeypatch, fire, lambda: attend(q, k, v, scheme, q_pos, k_pos, causal=causal))


def naive_fire_autograd(scheme, q, k, v, q_pos, k_pos):
    """The paper's formula with autograd-able tensors, pair by pair in float64: n from |c| and L = |m| * 512
    through plain ops, the scheme's own Linear/ReLU layers on the (pairs, 1) column, a dense softmax."""
    c = scheme.c.abs()
    threshold = scheme.threshold_multiplier.abs() * scheme.threshold
    query = q_pos.double()[:, :, None]
    distance = (query - k_pos.double()[:, None, :]).clamp(min=0)
    n = torch.log1p(c * distance) / (torch.log1p(c * torch.maximum(query, threshold)) + scheme.eps)
    bias = scheme.mlp(n[..., None]).permute(0, 3, 1, 2)
    hidden = k_pos[:, None, :] > q_pos[:, :, None]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    return torch.softmax(scores.masked_fill(hidden[:, None], float("-inf")), dim=-1) @ v


# (threshold, starts, q_len, k_len): all rows below L (distance-only), rows on both sides, all above;
# positions differing per sequence or shared; self-attention, chunked prefill, one decoding query
CASES = [(500.0, (37, 5), 29, 29), (12.0, (3, 3), 29, 29), (12.0, (37, 5), 11, 23), (2.0, (10**6,), 1, 17),
         (20.0, (0, 9), 30, 30)]


@pytest.mark.parametrize("threshold,starts,q_len,k_len", CASES)
def test_forward_equals_the_naive_formula(threshold, starts, q_len, k_len, small_blocks, monkeypatch):
    scheme = _scheme(threshold)
    q, k, v, q_pos, k_pos = _inputs(q_len, k_len, starts)
    assert _takes_fused_path(scheme, q, k, v, q_pos, k_pos, monkeypatch)
    with torch.no_grad():
        got = attend(q, k, v, scheme, q_pos, k_pos, causal=True)
        tiled = _tiled(monkeypatch, q, k, v, scheme, q_pos, k_pos, causal=True)
    expected = naive_attention(q, k, v, naive_fire_bias(scheme, q_pos, k_pos))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(got, tiled, rtol=0, atol=1e-12)


@pytest.mark.parametrize("threshold,starts,q_len,k_len", CASES)
def test_gradients_equal_autograd_through_the_naive_formula(threshold, starts, q_len, k_len, small_blocks):
    """q, k, v and every parameter (the MLP, c, the threshold multiplier). The case of threshold 20 with
    positions 0.. puts max(L, i)'s switch on a query (i = 20): both sides split that subgradient alike."""
    scheme = _scheme(threshold)
    q, k, v, q_pos, k_pos = _inputs(q_len, k_len, starts)
    weights = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    leaves = [q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), *scheme.parameters()]
    names = ["q", "k", "v", *(name for name, _ in scheme.named_parameters())]
    ours = torch.autograd.grad((attend(q, k, v, scheme, q_pos, k_pos, causal=True) * weights).sum(), leaves)
    expected = torch.autograd.grad((naive_fire_autograd(scheme, q, k, v, q_pos, k_pos) * weights).sum(), leaves)
    for label, a, b in zip(names, ours, expected):
        # b2 (a constant per head) and, with every row below L, the multiplier have zero gradient in the
        # mathematics; both sides give rounding noise there
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11, msg=f"gradient of {label}")
    # (one query far past L: its n all lie on one segment, where b1's gradient is a row sum of dS, 0)
    dead = ("threshold_multiplier", "mlp.2.bias") + (("mlp.0.bias",) if q_len == 1 else ())
    live = [g for name, g in zip(names, ours) if name not in dead]
    assert all(g.abs().max() > 1e-6 for g in live), [(n, g.abs().max().item()) for n, g in zip(names, ours)]


@pytest.mark.parametrize("threshold,starts,q_len,k_len", CASES[1:3])
def test_gradients_equal_the_tiled_path(threshold, starts, q_len, k_len, small_blocks, monkeypatch):
    scheme = _scheme(threshold)
    q, k, v, q_pos, k_pos = _inputs(q_len, k_len, starts)
    weights = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    leaves = [q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), *scheme.parameters()]
    ours = torch.autograd.grad((attend(q, k, v, scheme, q_pos, k_pos, causal=True) * weights).sum(), leaves)
    tiled = torch.autograd.grad((_tiled(monkeypatch, q, k, v, scheme, q_pos, k_pos, causal=True) * weights).sum(),
                                leaves)
    for a, b in zip(ours, tiled):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_piecewise_linear_form_equals_the_mlp():
    """Random units, a unit with w1 = 0 (constant; one with b1 > 0, one with b1 < 0), two units with the
    same kink, and an MLP without any kink: slope * x + intercept on each segment = the MLP, float64."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(1, 9), torch.nn.ReLU(), torch.nn.Linear(9, 3)).double()
    with torch.no_grad():
        mlp[0].weight[0:2] = 0.0
        mlp[0].bias[0], mlp[0].bias[1] = 0.5, -0.5
        mlp[0].weight[3], mlp[0].bias[3] = 2.0, -1.0          # kink at 0.5
        mlp[0].weight[4], mlp[0].bias[4] = -4.0, 2.0          # kink at 0.5 too, the other way
    x = torch.linspace(-4, 4, 20001, dtype=torch.float64)
    for layers in (mlp, torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).double()):
        if layers is not mlp:
            with torch.no_grad():
                layers[0].weight.zero_()
        first, _, second = layers
        segments = relu_segments(first.weight, first.bias, second.weight, second.bias)
        assert segments.breakpoints.numel() == int((first.weight != 0).sum())
        assert bool((segments.breakpoints.diff() >= 0).all())
        index = torch.bucketize(x, segments.breakpoints)
        got = segments.slope[index] * x[:, None] + segments.intercept[index]
        torch.testing.assert_close(got, layers(x[:, None]).detach(), rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 2e-5)])
def test_float32_is_close_to_float64_at_real_blocks(dtype, tolerance):
    """The module's 256-row blocks at a length that crosses two, forward and gradients."""
    scheme = _scheme(100.0)
    q, k, v, q_pos, k_pos = _inputs(300, 300, (0,))
    leaves = [q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), *scheme.parameters()]
    expected_out = attend(q, k, v, scheme, q_pos, k_pos, causal=True)
    expected = torch.autograd.grad(expected_out.square().sum(), leaves)
    low = _scheme(100.0, dtype=dtype)
    low_leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)] + list(low.parameters())
    out = attend(*low_leaves[:3], low, q_pos, k_pos, causal=True)
    got = torch.autograd.grad(out.square().sum(), low_leaves)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected_out.detach(), rtol=0, atol=tolerance)
    for a, b in zip(got, expected):
        scale = b.abs().max().item()
        torch.testing.assert_close(a.double(), b, rtol=0, atol=tolerance * max(1.0, scale) * 10)


def test_model_training_step_matches_tiled_path(monkeypatch):
    """A whole model's loss and parameter gradients: fused = tiled (float64), beyond one query block, with
    the threshold inside the sequence."""
    torch.manual_seed(3)
    model = TransformerLM(vocab_size=40, dim=24, depth=2, heads=3, scheme="fire", threshold=100.0).double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, type(_scheme())):
                for parameter in module.mlp.parameters():
                    parameter.normal_(0.0, 0.7)
    tokens = torch.randint(0, 40, (2, fire.QUERY_BLOCK + 41))
    loss, grads = loss_and_gradients(model, tokens)
    monkeypatch.setattr(attention, "_FIRE_FUSED", False)
    loss_tiled, grads_tiled = loss_and_gradients(model, tokens)
    torch.testing.assert_close(loss, loss_tiled, rtol=1e-12, atol=0)
    for a, b in zip(grads, grads_tiled):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("case", ["bfloat16", "spaced positions", "bidirectional call", "replaced mlp",
                                  "values narrower"])
def test_calls_outside_the_path_fall_back_to_the_tiled_path(case, monkeypatch):
    scheme = _scheme()
    q, k, v, q_pos, k_pos = _inputs(20, 20)
    if case == "bfloat16":
        scheme, q, k, v = scheme.to(torch.bfloat16), q.bfloat16(), k.bfloat16(), v.bfloat16()
    if case == "spaced positions":
        q_pos, k_pos = q_pos * 2, k_pos * 2
    if case == "replaced mlp":
        scheme.mlp[1] = torch.nn.GELU()
        assert scheme.fire_parameters() is None
    if case == "values narrower":
        v = v[..., :4]
    assert not _takes_fused_path(scheme, q, k, v, q_pos, k_pos, monkeypatch, causal=case != "bidirectional call")
    if case in ("spaced positions", "values narrower"):
        with torch.no_grad():
            got = attend(q, k, v, scheme, q_pos, k_pos, causal=True)
        torch.testing.assert_close(got, naive_attention(q, k, v, naive_fire_bias(scheme, q_pos, k_pos)),
                                   rtol=0, atol=1e-12)


def test_functional_call_gradients_reach_the_swapped_tensors(small_blocks):
    """Inside torch.func.functional_call the parameters are plain tensors, which the fused path takes as
    inputs like any others: gradients reach them and equal the module's own."""
    scheme = _scheme()
    q, k, v, q_pos, k_pos = _inputs(20, 20)
    swapped = {name: p.detach().clone().requires_grad_() for name, p in scheme.named_parameters()}
    wrapper = torch.nn.Module()
    wrapper.scheme = scheme
    wrapper.forward = lambda: attend(q, k, v, wrapper.scheme, q_pos, k_pos, causal=True)
    out = torch.func.functional_call(wrapper, {f"scheme.{n}": t for n, t in swapped.items()}, ())
    grads = torch.autograd.grad(out.square().sum(), list(swapped.values()))
    expected = torch.autograd.grad(attend(q, k, v, scheme, q_pos, k_pos, causal=True).square().sum(),
                                   list(scheme.parameters()))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_training_call_keeps_every_tensor_within_a_block(monkeypatch):
    """At L = 1024, forward and backward: no tensor outgrows one query block's (batch, heads, 256, L) scores
    (the bias, P, dS) or its (256, L, 2 heads) segment coefficients, a quarter of one (L, L) matrix per
    head; the gradients still equal the tiled path's."""
    length, heads = 1024, 2
    scheme = _scheme(128.0, heads=heads, width=32, dtype=torch.float32)
    q, k, v = (torch.randn(1, heads, length, 16).requires_grad_() for _ in range(3))
    pos = torch.arange(length)[None]
    bound = 2 * heads * fire.QUERY_BLOCK * length
    assert bound * 2 <= heads * length * length
    assert_bounded_and_equal_to_tiled(monkeypatch, "_FIRE_FUSED", scheme, q, k, v, pos, bound)


def test_plain_autograd_setting_keeps_double_backward(monkeypatch):
    """_CONTENT_PATH = "autograd" promises plain autograd (so double backward): the fused path, whose
    backward is once-differentiable, steps aside."""
    scheme = _scheme()
    q, k, v, q_pos, k_pos = _inputs(20, 20)
    assert_double_backward_matches(monkeypatch, scheme, q, k, v, q_pos, k_pos, naive_fire_autograd)


def test_zero_first_layer_biases_give_autograds_gradients(small_blocks, monkeypatch):
    """TransformerLM zeroes every Linear bias, so every unit's kink is at n = 0, which every pair at
    distance 0 hits exactly: there ReLU's gradient is 0 (autograd's choice), for units of either sign of
    w1. A unit with w1 < 0 then never sees a positive input and gets no gradient at all."""
    scheme = _scheme(12.0)
    with torch.no_grad():
        scheme.mlp[0].bias.zero_()
    q, k, v, q_pos, k_pos = _inputs(29, 29)
    leaves = [q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), *scheme.parameters()]
    ours = torch.autograd.grad(attend(q, k, v, scheme, q_pos, k_pos, causal=True).square().sum(), leaves)
    expected = torch.autograd.grad(naive_fire_autograd(scheme, q, k, v, q_pos, k_pos).square().sum(), leaves)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    dead = scheme.mlp[0].weight[:, 0] < 0
    names = [name for name, _ in scheme.named_parameters()]
    assert bool((ours[3 + names.index("mlp.0.bias")][dead] == 0).all()) and bool(dead.any())


def test_kink_table_is_autograds_relu_on_the_kinks():
    """Points exactly on kinks (single, tied with both signs of w1, at 0) and between them: slope and
    intercept at the table index give the MLP's value, and the active units are those with a strictly
    positive input."""
    from posemb.functional.fire import relu_kink_table

    w1 = torch.tensor([[1.0], [-2.0], [4.0], [-1.0], [0.0], [0.5]], dtype=torch.float64)
    b1 = torch.tensor([-0.5, 1.0, 0.0, 0.0, 0.3, -0.25], dtype=torch.float64)  # kinks 0.5, 0.5, 0, 0, -, 0.5
    w2 = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    b2 = torch.randn(2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    table = relu_kink_table(w1, b1, w2, b2, torch.float64)
    points = torch.tensor([-1.0, 0.0, 0.2, 0.5, 0.7], dtype=torch.float64)
    index = (table.kinks[None] >= points[:, None]).sum(1) + (table.kinks[None] > points[:, None]).sum(1)
    hidden = points[:, None] * w1[:, 0] + b1
    torch.testing.assert_close(table.active[index], (hidden > 0).double(), rtol=0, atol=0)
    torch.testing.assert_close(table.slope[index] * points[:, None] + table.intercept[index],
                               hidden.clamp(min=0) @ w2.T + b2, rtol=0, atol=1e-14)


def test_a_one_head_fire_broadcast_over_more_heads_falls_back(monkeypatch):
    scheme = _scheme(heads=1)
    q, k, v, q_pos, k_pos = _inputs(12, 12)
    assert not _takes_fused_path(scheme, q, k, v, q_pos, k_pos, monkeypatch)
    q.requires_grad_(True)
    attend(q, k, v, scheme, q_pos, k_pos, causal=True).sum().backward()
    assert q.grad is not None


@pytest.mark.parametrize("change", ["fourth layer", "linear subclass", "forward hook", "subclass"])
def test_changed_mlps_and_subclasses_take_the_generic_path(change, monkeypatch):
    """What the fused path cannot see (extra layers, a Linear subclass with its own forward, hooks, a
    FIRE subclass with its own bias) takes the tiled path, which runs the module as it is."""
    scheme = _scheme()
    if change == "fourth layer":
        scheme.mlp.append(torch.nn.Tanh())
    if change == "linear subclass":
        class Doubled(torch.nn.Linear):
            def forward(self, x):
                return 2 * super().forward(x)
        doubled = Doubled(scheme.mlp[2].in_features, scheme.mlp[2].out_features).double()
        doubled.load_state_dict(scheme.mlp[2].state_dict())
        scheme.mlp[2] = doubled
    if change == "forward hook":
        scheme.mlp[2].register_forward_hook(lambda module, inputs, output: output * 3)
    if change == "subclass":
        class Shifted(type(scheme)):
            def fire_bias(self, q_positions, k_positions):
                return super().fire_bias(q_positions, k_positions) + 1.0
        scheme.__class__ = Shifted
    assert scheme.fire_parameters() is None
    q, k, v, q_pos, k_pos = _inputs(12, 12)
    assert not _takes_fused_path(scheme, q, k, v, q_pos, k_pos, monkeypatch)


def test_blocks_shrink_with_the_batch_when_positions_differ(monkeypatch):
    """Positions that differ across the batch give one bias per sequence: the block rows follow the element
    budget, so no tensor passes a few budgets (here 4 sequences x 2 heads x 300 keys, budget 8 rows' worth)."""
    budget = 4 * 2 * 300 * 8
    monkeypatch.setattr(fire, "_TOEPLITZ_BACKWARD_ELEMENTS", budget)
    scheme = _scheme(40.0, heads=2)
    q, k, v, q_pos, k_pos = _inputs(300, 300, starts=(0, 3, 50, 100), heads=2)
    recorder = LargestTensor()
    with recorder, torch.no_grad():
        got = attend(q, k, v, scheme, q_pos, k_pos, causal=True)
    assert recorder.largest <= 2 * budget
    torch.testing.assert_close(got, _tiled(monkeypatch, q, k, v, scheme, q_pos, k_pos, causal=True), rtol=0, atol=1e-12)
