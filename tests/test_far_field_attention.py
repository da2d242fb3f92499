"""The far-field path (``posemb.model.far_field_attention``: Shaw and DeBERTa beyond their reach on the
fused CPU kernel) against the deliberately naive float64 formulas and against the tiled content path it
replaces, forward and backward, and the cases that must fall back to the tiled path."""
from __future__ import annotations

import pytest
import torch

import posemb
from posemb.model import TransformerLM, attention
from posemb.model import far_field_attention as far_field
from posemb.model.attention import attend

from test_key_bias_attention import loss_and_gradients
from test_relative_schemes import naive_deberta, naive_shaw, randomise

SCHEMES = [  # (name, options, naive reference); small reaches so that most keys are far
    ("shaw", dict(head_dim=8, max_relative_position=3), naive_shaw),
    ("shaw", dict(head_dim=8, num_heads=3, max_relative_position=5, per_head=True), naive_shaw),
    ("deberta", dict(dim=24, num_heads=3, max_relative_positions=4), naive_deberta),
    ("deberta", dict(dim=24, num_heads=3, max_relative_positions=3, pos_att_type=("c2p",)), naive_deberta),
    ("deberta", dict(dim=24, num_heads=3, max_relative_positions=3, pos_att_type="p2c", projection_bias=True,
                     norm_rel_embeddings=True), naive_deberta),
    ("deberta", dict(dim=24, num_heads=3, max_relative_positions=12, position_buckets=6), naive_deberta),
]
IDS = [f"{name}-{number}" for number, (name, _, _) in enumerate(SCHEMES)]
# (Lq, Lk): self-attention over several band blocks, a partial block of queries, one decoding query
LENGTHS = [(29, 29), (11, 23), (1, 17)]


@pytest.fixture
def small_bands(monkeypatch):
    """Band blocks of 8 query rows, so that short sequences cross several blocks."""
    monkeypatch.setattr(far_field, "BAND_ROWS", 8)


def _inputs(q_len, k_len, dtype=torch.float64, seed=0, batch=2, heads=3, head_dim=8):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=generator, dtype=dtype)
    k = torch.randn(batch, heads, k_len, head_dim, generator=generator, dtype=dtype)
    v = torch.randn(batch, heads, k_len, head_dim, generator=generator, dtype=dtype)
    k_pos = torch.stack([torch.arange(start, start + k_len) for start in (37, 5)[:batch]])
    return q, k, v, k_pos[:, k_len - q_len:], k_pos


def _scheme(name, options, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return randomise(posemb.build(name, **options)).to(dtype)


def _tiled(monkeypatch, *args, **kwargs):
    monkeypatch.setattr(attention, "_FAR_FIELD_FUSED", False)
    try:
        return attend(*args, **kwargs)
    finally:
        monkeypatch.setattr(attention, "_FAR_FIELD_FUSED", True)


def _takes_far_field(scheme, q, k, v, q_pos, k_pos, monkeypatch):
    """Whether attend() really went through the far-field path (so no test here passes by falling back)."""
    calls = []
    original = far_field._forward

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(far_field, "_forward", spy)
    try:
        with torch.no_grad():
            attend(q, k, v, scheme, q_pos, k_pos, causal=True)
    finally:
        monkeypatch.setattr(far_field, "_forward", original)
    return bool(calls)


@pytest.mark.parametrize("name,options,naive", SCHEMES, ids=IDS)
@pytest.mark.parametrize("q_len,k_len", LENGTHS)
def test_forward_equals_the_naive_formula(name, options, naive, q_len, k_len, small_bands, monkeypatch):
    scheme = _scheme(name, options)
    q, k, v, q_pos, k_pos = _inputs(q_len, k_len)
    if options.get("position_buckets", 0):
        k_pos = k_pos * 3          # distances cross the log buckets and reach the clamp within the keys
        q_pos = k_pos[:, k_len - q_len:]
        assert not _takes_far_field(scheme, q, k, v, q_pos, k_pos, monkeypatch)  # spaced: the tiled path
        q_pos, k_pos = _inputs(q_len, k_len)[3:]
    assert _takes_far_field(scheme, q, k, v, q_pos, k_pos, monkeypatch)
    with torch.no_grad():
        got = attend(q, k, v, scheme, q_pos, k_pos, causal=True)
        tiled = _tiled(monkeypatch, q, k, v, scheme, q_pos, k_pos, causal=True)
    expected = naive(scheme, q, k, v, q_pos, k_pos, True)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(got, tiled, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,options,naive", SCHEMES, ids=IDS)
@pytest.mark.parametrize("q_len,k_len", LENGTHS)
def test_gradients_equal_the_tiled_path_in_float64(name, options, naive, q_len, k_len, small_bands, monkeypatch):
    """Gradients of q, k, v and every scheme parameter through the custom backward = autograd through the
    tiled path. Absolute tolerance: some gradients are exactly zero in the mathematics (a bias on DeBERTa's
    position-key projection adds a constant per query row), and both paths give rounding noise there."""
    scheme = _scheme(name, options)
    q, k, v, q_pos, k_pos = _inputs(q_len, k_len)
    weights = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    leaves = [q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), *scheme.parameters()]
    names = ["q", "k", "v", *(n for n, _ in scheme.named_parameters())]
    ours = torch.autograd.grad((attend(q, k, v, scheme, q_pos, k_pos, causal=True) * weights).sum(), leaves,
                               allow_unused=True)
    tiled = torch.autograd.grad((_tiled(monkeypatch, q, k, v, scheme, q_pos, k_pos, causal=True) * weights).sum(),
                                leaves, allow_unused=True)
    for label, a, b in zip(names, ours, tiled):
        assert a is not None and b is not None, label
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11, msg=f"gradient of {label}")
        assert a.abs().max() > 0 or b.abs().max() < 1e-12, label


@pytest.mark.parametrize("name,options,naive", [SCHEMES[0], SCHEMES[2]], ids=[IDS[0], IDS[2]])
def test_gradients_equal_autograd_through_the_naive_formula(name, options, naive, small_bands):
    """An independent oracle for the backward: the naive formula written with autograd-able tensors
    (Shaw's tables and DeBERTa's P read through the same naive loops, in float64)."""
    scheme = _scheme(name, options)
    q, k, v, q_pos, k_pos = _inputs(19, 19, batch=1)
    for tensor in (q, k, v):
        tensor.requires_grad_()
    weights = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ours = torch.autograd.grad((attend(q, k, v, scheme, q_pos, k_pos, causal=True) * weights).sum(), (q, k, v))
    # The naive references detach the scheme's tables; q, k and v flow through them.
    expected = torch.autograd.grad((naive(scheme, q, k, v, q_pos, k_pos, True) * weights).sum(), (q, k, v))
    for label, a, b in zip("qkv", ours, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11, msg=f"gradient of {label}")


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("name,options,naive", [SCHEMES[1], SCHEMES[2]], ids=[IDS[1], IDS[2]])
def test_low_precision_is_close_to_float64(name, options, naive, dtype, tolerance):
    """Real band blocks (the module's 256 rows) at a length that crosses two of them."""
    scheme = _scheme(name, options)
    q, k, v, q_pos, k_pos = _inputs(300, 300, batch=1)
    with torch.no_grad():
        expected = attend(q, k, v, scheme, q_pos, k_pos, causal=True)
        got = attend(q.to(dtype), k.to(dtype), v.to(dtype), scheme.to(dtype), q_pos, k_pos, causal=True)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=tolerance)


def test_model_training_step_matches_tiled_path(monkeypatch):
    """A whole model's loss and parameter gradients: far-field path = tiled path (float64), Shaw and
    DeBERTa, at a length beyond one band block."""
    for scheme, options in (("shaw", dict(max_relative_position=16)), ("deberta", dict(max_relative_positions=24))):
        torch.manual_seed(3)
        model = TransformerLM(vocab_size=40, dim=24, depth=2, heads=3, scheme=scheme, **options).double()
        tokens = torch.randint(0, 40, (2, far_field.band_rows(2 * 3) + 41))

        loss, grads = loss_and_gradients(model, tokens)
        monkeypatch.setattr(attention, "_FAR_FIELD_FUSED", False)
        loss_tiled, grads_tiled = loss_and_gradients(model, tokens)
        monkeypatch.setattr(attention, "_FAR_FIELD_FUSED", True)
        torch.testing.assert_close(loss, loss_tiled, rtol=1e-12, atol=0)
        for a, b in zip(grads, grads_tiled):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_band_rows_follow_the_number_of_matrices(monkeypatch):
    assert [far_field.band_rows(n) for n in (1, 4, 32, 256, 4096)] == [256, 128, 64, 32, 32]
    monkeypatch.setattr(far_field, "BAND_ROWS", 8)
    assert far_field.band_rows(4) == 8


def test_reach_of_each_scheme():
    assert posemb.build("shaw", head_dim=8, max_relative_position=5).far_reach() == 5
    assert posemb.build("shaw", head_dim=8, max_relative_position=0).far_reach() is None
    # plain clipping: delta = clamp(i - j + span, 0, 2 span - 1) reaches the last row at i - j = span - 1
    assert posemb.build("deberta", dim=24, num_heads=3, max_relative_positions=4).far_reach() == 3
    bucketed = posemb.build("deberta", dim=24, num_heads=3, max_relative_positions=12, position_buckets=6)
    reach = bucketed.far_reach()
    rows = bucketed.rows_of(torch.arange(0, 200))   # clamp(bucket(i - j) + span, 0, 2 span - 1)
    last = 2 * bucketed.span - 1
    assert int(rows[reach - 1]) < last and bool((rows[reach:] == last).all())

@pytest.mark.parametrize("case", ["bidirectional", "spaced positions", "keys within reach", "no reach"])
def test_cases_outside_the_path_fall_back_to_the_tiled_path(case, monkeypatch):
    options = dict(head_dim=8, max_relative_position=0 if case == "no reach" else 4)
    scheme = _scheme("shaw", options)
    k_len = 4 if case == "keys within reach" else 20
    q, k, v, q_pos, k_pos = _inputs(k_len, k_len)
    if case == "spaced positions":
        q_pos, k_pos = q_pos * 2, k_pos * 2
    causal = case != "bidirectional"
    calls = []
    monkeypatch.setattr(far_field, "_forward", lambda *a, **kw: calls.append(1))
    with torch.no_grad():
        got = attend(q, k, v, scheme, q_pos, k_pos, causal=causal)
    assert not calls
    torch.testing.assert_close(got, naive_shaw(scheme, q, k, v, q_pos, k_pos, causal), rtol=0, atol=1e-12)


def test_functional_call_takes_plain_autograd(monkeypatch):
    """Inside torch.func.functional_call the parameters are plain tensors: the path falls back to plain
    autograd, and gradients reach the swapped-in tensors."""
    scheme = _scheme("shaw", dict(head_dim=8, max_relative_position=3))
    q, k, v, q_pos, k_pos = _inputs(20, 20)
    swapped = {name: p.detach().clone().requires_grad_() for name, p in scheme.named_parameters()}

    def run(module):
        return attend(q, k, v, module, q_pos, k_pos, causal=True)

    # attend takes the scheme as an argument: swap its parameters through a module that holds it
    wrapper = torch.nn.Module()
    wrapper.scheme = scheme
    wrapper.forward = lambda: run(wrapper.scheme)
    out = torch.func.functional_call(wrapper, {f"scheme.{n}": t for n, t in swapped.items()}, ())
    grads = torch.autograd.grad(out.sum(), list(swapped.values()))
    expected = torch.autograd.grad(run(scheme).sum(), list(scheme.parameters()))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,options", [("shaw", dict(head_dim=16, max_relative_position=16)),
                                          ("deberta", dict(dim=32, num_heads=2, max_relative_positions=128))])
def test_training_call_keeps_every_tensor_within_a_band_block(name, options, monkeypatch):
    """At L = 1024, forward and backward: no tensor outgrows the widened inputs (heads, L, d + 1) or one
    band block (heads, rows + reach - 1, max(rows, 2 reach + 1)): logits or a block's keys against the
    relative table, both far below one (L, L) block per
    head; the gradients still equal the tiled path's."""
    from test_relative_schemes import LargestTensor

    length, heads, head_dim = 1024, 2, 16
    scheme = _scheme(name, options, dtype=torch.float32)
    reach = scheme.far_reach()
    q, k, v = (torch.randn(1, heads, length, head_dim).requires_grad_() for _ in range(3))
    pos = torch.arange(length)[None]
    rows = far_field.band_rows(heads)
    # DeBERTa's hooks may hold one block's keys against every row of its 2 span-row table (span ~ reach)
    bound = 1.2 * max(heads * length * (head_dim + 1), heads * (rows + reach - 1) * max(rows, 2 * reach + 1))
    assert bound * 4 <= heads * length * length
    recorder = LargestTensor()
    with recorder:
        out = attend(q, k, v, scheme, pos, pos, causal=True)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert recorder.ops > 0
    assert recorder.largest <= bound, f"{name}: a tensor of {recorder.largest} elements, bound {bound:.0f}"
    tiled = torch.autograd.grad(_tiled(monkeypatch, q, k, v, scheme, pos, pos, causal=True).square().sum(), (q, k, v))
    for a, b in zip(grads, tiled):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_plain_autograd_setting_keeps_double_backward(monkeypatch):
    """_CONTENT_PATH = "autograd" promises plain autograd (so double backward): the far-field path, whose
    backward is once-differentiable, steps aside, and the second derivative is the naive formula's."""
    monkeypatch.setattr(attention, "_CONTENT_PATH", "autograd")
    scheme = _scheme("shaw", dict(head_dim=8, max_relative_position=3))
    q, k, v, q_pos, k_pos = _inputs(20, 20)
    q.requires_grad_(True)
    (grad,) = torch.autograd.grad(attend(q, k, v, scheme, q_pos, k_pos, causal=True).square().sum(), q,
                                  create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), q)
    (grad_naive,) = torch.autograd.grad(naive_shaw(scheme, q, k, v, q_pos, k_pos, True).square().sum(), q,
                                        create_graph=True)
    (second_naive,) = torch.autograd.grad(grad_naive.sum(), q)
    torch.testing.assert_close(second, second_naive, rtol=0, atol=1e-10)


def test_a_row_term_with_three_dimensions_is_sliced_by_heads():
    """FarTerms promise shapes broadcastable to (batch, heads, 1, Lk): a (heads, 1, Lk) row is sliced on its
    heads axis (third from the end) when the kernel runs one group of heads at a time."""
    from posemb.schemes.base import FarTerms

    row = torch.arange(3 * 7, dtype=torch.float64).view(3, 1, 7)
    picked = far_field._heads_of(FarTerms(None, row, None), slice(1, 2), 3)
    torch.testing.assert_close(picked.row, row[1:2])
    shared = torch.ones(1, 1, 7)
    assert far_field._heads_of(FarTerms(None, shared, None), slice(1, 2), 3).row is shared
