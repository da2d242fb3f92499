"""2-D RoPE for vision: axial RoPE equals transformers' vision rotaries (Qwen2-VL's shared
frequencies, Pixtral's alternating ones) and Heo et al.'s complex formula in float64; RoPE-Mixed
equals a naive float64 formula of Heo et al. 2024 (Eq. 12-13), including the gradients of its
learnable frequencies, and contains axial RoPE as a special case."""
import copy
import math

import pytest
import torch

import posemb
from posemb.schemes.rope2d import AxialRoPE, RoPEMixed, axial_inv_freq


def _grid(h, w, batch=1):
    hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([hh.flatten(), ww.flatten()], dim=-1).expand(batch, h * w, 2)


def _complex_rotate(x, angles):
    """float64 rotation of interleaved pairs (2j, 2j+1) as complex numbers times e^{i angle}
    (Heo et al.'s ``apply_rotary_emb``). ``angles`` broadcasts to x's (..., d/2)."""
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


def _to_half(x):
    """Interleaved channel order (x0, y0, x1, y1, ...) -> half order (x0, x1, ..., y0, y1, ...)."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


# ---- axial -------------------------------------------------------------------------------------

def test_axial_shared_matches_qwen2_vl_vision_rotary():
    pytest.importorskip("transformers")
    from transformers.models.qwen2_vl import configuration_qwen2_vl, modeling_qwen2_vl
    from transformers.vision_utils import get_vision_position_ids

    config = configuration_qwen2_vl.Qwen2VLVisionConfig(embed_dim=64, num_heads=4, depth=1)
    position_ids = get_vision_position_ids(torch.tensor([[1, 4, 6], [1, 6, 2]]), 2)  # (N, 2) in merge order
    cos, sin = modeling_qwen2_vl.Qwen2VLVisionRotaryEmbedding(config)(torch.zeros(1), position_ids)
    torch.manual_seed(0)
    n = position_ids.shape[0]
    q, k = torch.randn(n, 4, 16), torch.randn(n, 4, 16)  # HF vision layout (seq, heads, head_dim)
    expected = modeling_qwen2_vl.apply_rotary_pos_emb_vision(q, k, cos, sin)
    scheme = AxialRoPE(16, base=config.rope_parameters["rope_theta"])
    got = scheme.rotate(q.transpose(0, 1)[None], k.transpose(0, 1)[None], position_ids[None], position_ids[None])
    torch.testing.assert_close(got[0][0].transpose(0, 1), expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1][0].transpose(0, 1), expected[1], atol=1e-5, rtol=1e-5)


def test_axial_alternate_matches_pixtral_rotary():
    pytest.importorskip("transformers")
    from transformers.models.pixtral import configuration_pixtral, modeling_pixtral

    config = configuration_pixtral.PixtralVisionConfig(hidden_size=64, num_attention_heads=4, head_dim=16,
                                                       rope_parameters={"rope_type": "axial", "rope_theta": 500.0})
    position_ids = torch.cat([_grid(3, 5)[0], _grid(4, 2)[0]])  # two images, as Pixtral flattens them
    cos, sin = modeling_pixtral.PixtralVisionRotaryEmbedding(config)(torch.zeros(1), position_ids)
    torch.manual_seed(1)
    q, k = torch.randn(1, 4, position_ids.shape[0], 16), torch.randn(1, 4, position_ids.shape[0], 16)
    expected = modeling_pixtral.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=0)
    got = AxialRoPE(16, base=500.0, axis_frequencies="alternate").rotate(q, k, position_ids[None], position_ids[None])
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-5)
    # The two conventions really differ.
    shared = AxialRoPE(16, base=500.0).rotate(q, k, position_ids[None], position_ids[None])
    assert not torch.allclose(shared[0], expected[0], atol=1e-3)


@pytest.mark.parametrize("layout", ["interleaved", "half"])
def test_axial_matches_heo_et_al_complex_formula_float64(layout):
    """rope-vit ``compute_axial_cis``: freqs θ^(-4i/d), pairs 0..d/4-1 by x, d/4..d/2-1 by y."""
    d, base = 24, 100.0
    torch.manual_seed(2)
    pos = _grid(5, 7, batch=2).clone()
    pos[1] += torch.tensor([3, 1000])  # large coordinates lose nothing in float64
    x = torch.randn(2, 3, pos.shape[1], d, dtype=torch.float64)
    freqs = base ** (-torch.arange(0, d, 4, dtype=torch.float64)[: d // 4] / d)
    angles = torch.cat([pos[..., :1] * freqs, pos[..., 1:] * freqs], dim=-1).double()[:, None]  # (B, 1, L, d/2)
    expected = _complex_rotate(x, angles)
    scheme = AxialRoPE(d, base=base, layout=layout)
    if layout == "interleaved":
        got, _ = scheme.rotate(x, x, pos, pos)
    else:  # the same rotation, channels stored half-split
        got, _ = scheme.rotate(_to_half(x), _to_half(x), pos, pos)
        expected = _to_half(expected)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def test_axial_frequency_conventions():
    d, base = 16, 10000.0
    shared, alternate = axial_inv_freq(d, base, "shared"), axial_inv_freq(d, base, "alternate")
    one_d = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    assert torch.equal(shared[: d // 4], shared[d // 4:])
    assert torch.equal(alternate, torch.cat([one_d[0::2], one_d[1::2]]))
    torch.testing.assert_close(shared[: d // 4], one_d[0::2], atol=0, rtol=1e-15)


@pytest.mark.parametrize("name", ["axial_rope", "rope_mixed"])
def test_scores_depend_only_on_coordinate_differences(name):
    torch.manual_seed(3)
    scheme = posemb.build(name, head_dim=16, **({"num_heads": 2} if name == "rope_mixed" else {})).double()
    q, k = torch.randn(1, 2, 12, 16, dtype=torch.float64), torch.randn(1, 2, 12, 16, dtype=torch.float64)
    pos = _grid(3, 4)
    scores = [a @ b.transpose(-1, -2) for a, b in [scheme.rotate(q, k, p, p) for p in
                                                   (pos, pos + torch.tensor([7, -3]) + 50)]]
    torch.testing.assert_close(scores[0], scores[1], atol=1e-10, rtol=0)
    swapped = pos.flip(-1)  # rows and columns exchanged: a different image layout
    other = [a @ b.transpose(-1, -2) for a, b in [scheme.rotate(q, k, swapped, swapped)]][0]
    assert not torch.allclose(scores[0], other)


# ---- RoPE-Mixed ----------------------------------------------------------------------------------

def _naive_mixed(x, pos, freqs):
    """Heo et al. Eq. 12-13 in float64: pair j of head h turns by p_x θx[h, j] + p_y θy[h, j]."""
    angles = (pos[..., 0, None].double()[:, None] * freqs[0].double()[None, :, None]
              + pos[..., 1, None].double()[:, None] * freqs[1].double()[None, :, None])  # (B, H, L, d/2)
    return _complex_rotate(x, angles)


@pytest.mark.parametrize("layout", ["interleaved", "half"])
def test_rope_mixed_matches_the_naive_formula_float64(layout):
    torch.manual_seed(4)
    scheme = RoPEMixed(16, 3, layout=layout).double()
    pos = _grid(4, 5, batch=2).clone()
    pos[1] = pos[1] * 3 + 11
    q, k = torch.randn(2, 3, 20, 16, dtype=torch.float64), torch.randn(2, 3, 20, 16, dtype=torch.float64)
    expected_q, expected_k = _naive_mixed(q, pos, scheme.freqs), _naive_mixed(k, pos, scheme.freqs)
    if layout == "half":
        got_q, got_k = scheme.rotate(_to_half(q), _to_half(k), pos, pos)
        expected_q, expected_k = _to_half(expected_q), _to_half(expected_k)
    else:
        got_q, got_k = scheme.rotate(q, k, pos, pos)
    torch.testing.assert_close(got_q, expected_q.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(got_k, expected_k.detach(), atol=1e-12, rtol=0)


def test_rope_mixed_frequency_gradients():
    torch.manual_seed(5)
    scheme = RoPEMixed(8, 2).double()
    pos = _grid(3, 3)
    q, k = torch.randn(1, 2, 9, 8, dtype=torch.float64), torch.randn(1, 2, 9, 8, dtype=torch.float64)

    def scores(freqs):
        probe = copy.deepcopy(scheme)
        del probe.freqs
        probe.freqs = freqs  # a plain tensor in the parameter's place, so autograd sees the input
        rq, rk = probe.rotate(q, k, pos, pos)
        return rq @ rk.transpose(-1, -2)

    freqs = scheme.freqs.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(scores, (freqs,), eps=1e-6, atol=1e-7)
    # ... and equal the naive formula's autograd gradients.
    weights = torch.randn(1, 2, 9, 9, dtype=torch.float64)
    (grad,) = torch.autograd.grad((scores(freqs) * weights).sum(), freqs)
    naive = freqs.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(
        ((_naive_mixed(q, pos, naive) @ _naive_mixed(k, pos, naive).transpose(-1, -2)) * weights).sum(), naive)
    torch.testing.assert_close(grad, expected, atol=1e-10, rtol=1e-10)
    assert grad.abs().min() > 0  # every frequency of every head learns


def test_rope_mixed_contains_axial_rope():
    """θ^y = 0 on the first half of the pairs and θ^x = 0 on the second half is axial RoPE."""
    torch.manual_seed(6)
    axial = AxialRoPE(16, base=100.0, layout="interleaved")
    mixed = RoPEMixed(16, 2, layout="interleaved")
    w = axial_inv_freq(16, 100.0).float()
    with torch.no_grad():
        mixed.freqs.zero_()
        mixed.freqs[0, :, :4] = w[:4]
        mixed.freqs[1, :, 4:] = w[4:]
    q, k, pos = torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16), _grid(3, 4)
    for got, expected in zip(mixed.rotate(q, k, pos, pos), axial.rotate(q, k, pos, pos)):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_rope_mixed_initialisation_follows_heo_et_al():
    torch.manual_seed(7)
    freqs = RoPEMixed(16, 4, base=10.0).freqs.detach().double()
    magnitude = 10.0 ** (-torch.arange(0, 16, 4, dtype=torch.float64) / 16)
    norms = freqs.pow(2).sum(0).sqrt()  # |(θx, θy)| per head and pair
    torch.testing.assert_close(norms, torch.cat([magnitude, magnitude]).expand(4, 8), atol=1e-6, rtol=1e-6)
    direction = torch.atan2(freqs[1], freqs[0])
    # The second half turns a quarter turn further than the first, and heads start at different angles.
    quarter = torch.remainder(direction[:, 4:] - direction[:, :4], 2 * math.pi)
    torch.testing.assert_close(quarter, torch.full_like(quarter, math.pi / 2), atol=1e-5, rtol=0)
    assert direction[:, 0].unique().numel() == 4


# ---- the model -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["axial_rope", "rope_mixed"])
def test_model_takes_2d_positions_and_decodes_with_its_cache(name):
    torch.manual_seed(8)
    model = posemb.TransformerLM(64, 32, 2, 2, scheme=name).eval()
    pos = _grid(3, 4, batch=2).clone()
    pos[1] += 5
    tokens = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        full = model(tokens, positions=pos)
        cache = model.new_cache()
        first = model(tokens[:, :7], positions=pos[:, :7], cache=cache)
        rest = model(tokens[:, 7:], positions=pos[:, 7:], cache=cache)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, atol=1e-5, rtol=1e-5)
    assert cache.next_position.tolist() == [4, 9]  # one past the last token's largest coordinate


def test_bidirectional_vision_model_sees_the_image_layout():
    torch.manual_seed(9)
    model = posemb.TransformerLM(64, 32, 1, 2, scheme="axial_rope", causal=False).eval()
    tokens = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        a = model(tokens, positions=_grid(3, 4))
        b = model(tokens, positions=_grid(3, 4) + 9)
        c = model(tokens, positions=_grid(3, 4).flip(-1))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, c, atol=1e-4)


@pytest.mark.parametrize("name,options,error,match", [
    ("axial_rope", dict(head_dim=18), ValueError, "head_dim must be a multiple of 4"),
    ("axial_rope", dict(head_dim=16, axis_frequencies="pixtral"), ValueError, "axis_frequencies must be one of"),
    ("axial_rope", dict(head_dim=16, base=1.0), ValueError, "base must be > 1"),
    ("axial_rope", dict(head_dim=16, layout="complex"), ValueError, "layout must be one of"),
    ("rope_mixed", dict(head_dim=16, num_heads=0), ValueError, "num_heads must be >= 1"),
    ("rope_mixed", dict(head_dim=6, num_heads=2), ValueError, "head_dim must be a multiple of 4"),
])
def test_bad_options_are_named(name, options, error, match):
    with pytest.raises(error, match=match):
        posemb.build(name, **options)


def test_bad_positions_are_named():
    q = torch.randn(1, 2, 6, 16)
    for scheme in (AxialRoPE(16), RoPEMixed(16, 2)):
        with pytest.raises(ValueError, match=r"q_positions must have shape \(batch, seq, axes\) = \(1, 6, 2\)"):
            scheme.rotate(q, q, torch.zeros(1, 6, 3, dtype=torch.long), torch.zeros(1, 6, 2, dtype=torch.long))
        with pytest.raises(TypeError, match="k_positions must be an integer tensor"):
            scheme.rotate(q, q, torch.zeros(1, 6, 2, dtype=torch.long), torch.zeros(1, 6, 2))
    with pytest.raises(ValueError, match="q must have num_heads=3"):
        RoPEMixed(16, 3).rotate(q, q, torch.zeros(1, 6, 2, dtype=torch.long), torch.zeros(1, 6, 2, dtype=torch.long))
    model = posemb.TransformerLM(64, 32, 1, 2, scheme="axial_rope")
    with pytest.raises(ValueError, match=r"positions must have shape \(batch, seq, axes\) = \(1, 6, 2\)"):
        model(torch.zeros(1, 6, dtype=torch.long), positions=torch.zeros(3, 1, 6, dtype=torch.long))
