"""Golden tests for the 2022-2025 schemes (Kerple, Sandwich, dynamic position bias, FIRE, PoPE, the
forgetting gate, CoPE) and randomized positions: each against a deliberately naive float64
implementation written from its paper (double loops over i, j), gradients checked in float64,
parity with x-transformers where it has the scheme, bad options, and no (L, L, d) tensors.
The registry-walking properties (KV cache, causality, translation invariance, ...) live in
``test_model_properties.py`` and cover these schemes without naming them."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import posemb
from posemb.model.attention import attend


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def naive_attention(q, k, v, logits_extra=None, causal=True, scale=None):
    """softmax(q k^T * scale + extra) v in float64, causal by sequence index (queries are the last Lq keys)."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    if logits_extra is not None:
        scores = scores + logits_extra.double()
    if causal:
        q_len, k_len = q.shape[-2], k.shape[-2]
        for i in range(q_len):
            scores[..., i, k_len - q_len + i + 1:] = float("-inf")
    return torch.softmax(scores, -1) @ v


def randomise(scheme, std=0.5):
    """Random parameters (zero-initialised ones included), so position really matters."""
    with torch.no_grad():
        for parameter in scheme.parameters():
            parameter.add_(torch.randn_like(parameter) * std)
    return scheme


def qkv(batch=2, heads=4, q_len=10, k_len=10, dim=8, dtype=torch.float64, requires_grad=False):
    return tuple(torch.randn(batch, heads, n, dim, dtype=dtype, requires_grad=requires_grad)
                 for n in (q_len, k_len, k_len))


def arange_positions(batch, length, start=0):
    return (torch.arange(length) + start).expand(batch, length)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any ATen op produces while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest, self.ops = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
                self.ops += 1
        return out


# ------------------------------------------------------------------------------------------------
# distance-only biases: Kerple, Sandwich, dynamic position bias
# ------------------------------------------------------------------------------------------------

def naive_kerple(scheme, i, j):
    r1, r2 = torch.nn.functional.softplus(scheme.raw_r1.double()), torch.nn.functional.softplus(scheme.raw_r2.double())
    d = abs(i - j)
    if scheme.kernel == "log":
        return [-r1[h].item() * math.log(1 + r2[h].item() * d) for h in range(scheme.num_heads)]
    return [-r1[h].item() * d ** min(2.0, r2[h].item()) for h in range(scheme.num_heads)]


def naive_sandwich(scheme, i, j):
    """The dot product of the two sinusoidal embeddings p_i, p_j (sin and cos per frequency
    w_k = base^(-2k/d), k = 1 .. d/2), minus d/2, head h compressed by 8h/H."""
    d, heads = scheme.sandwich_dim, scheme.num_heads
    dot = 0.0
    for kk in range(1, d // 2 + 1):
        w = scheme.base ** (-2 * kk / d)
        dot += math.sin(i * w) * math.sin(j * w) + math.cos(i * w) * math.cos(j * w)
    return [(dot - d / 2) / (8 * (h + 1) / heads) for h in range(heads)]


def naive_dynamic(scheme, i, j):
    x = torch.tensor([[float(i - j)]], dtype=torch.float64)
    if scheme.log_distance:
        x = torch.sign(x) * torch.log(1 + x.abs())
    for layer in scheme.mlp:
        if isinstance(layer, torch.nn.Linear):
            x = x @ layer.weight.double().T + layer.bias.double()
        elif isinstance(layer, torch.nn.SiLU):
            x = x * torch.sigmoid(x)
        else:
            x = torch.nn.functional.layer_norm(x, layer.normalized_shape, layer.weight.double(),
                                               layer.bias.double(), layer.eps)
    return x[0].tolist()


DISTANCE_SCHEMES = [
    ("kerple", dict(kernel="log"), naive_kerple),
    ("kerple", dict(kernel="power", r2=1.5), naive_kerple),
    ("sandwich", dict(dim=16), naive_sandwich),
    ("dynamic_position_bias", dict(hidden=8, depth=2), naive_dynamic),
    ("dynamic_position_bias", dict(hidden=8, depth=1, log_distance=False, norm=True), naive_dynamic),
]


def naive_bias(naive, scheme, qp, kp):
    batch, q_len, k_len = qp.shape[0], qp.shape[1], kp.shape[1]
    out = torch.empty(batch, scheme.num_heads, q_len, k_len, dtype=torch.float64)
    for b in range(batch):
        for i in range(q_len):
            for j in range(k_len):
                out[b, :, i, j] = torch.tensor(naive(scheme, qp[b, i].item(), kp[b, j].item()), dtype=torch.float64)
    return out


@pytest.mark.parametrize("name,options,naive", DISTANCE_SCHEMES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_len,k_len,start", [(9, 9, 0), (3, 11, 40)])
def test_distance_bias_attention_equals_the_naive_formula(name, options, naive, causal, q_len, k_len, start):
    scheme = randomise(posemb.build(name, num_heads=4, causal=causal, **options)).double()
    q, k, v = qkv(q_len=q_len, k_len=k_len)
    kp = arange_positions(2, k_len, start)
    qp = kp[:, k_len - q_len:]
    bias = naive_bias(naive, scheme, qp, kp)
    expected = naive_attention(q, k, v, bias, causal=causal)
    torch.testing.assert_close(scheme.score_bias(qp, kp).double(), bias, atol=1e-6, rtol=1e-6)
    for path in ("toeplitz", "dense"):
        got = attend(q, k, v, scheme, qp, kp, causal=causal, bias_path=path)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6, msg=lambda m: f"{path}: {m}")


@pytest.mark.parametrize("name,options,naive", DISTANCE_SCHEMES[:1] + DISTANCE_SCHEMES[2:4])
def test_distance_bias_with_scattered_positions_uses_the_dense_reference(name, options, naive):
    """Positions that are not consecutive (packed sequences, big per-row offsets) still give the
    paper's bias, through the distinct-distance table of the dense reference."""
    scheme = randomise(posemb.build(name, num_heads=4, **options)).double()
    qp = kp = torch.tensor([[0, 1, 2, 5, 6, 9], [10**6, 10**6 + 3, 10**6 + 4, 10**6 + 8, 10**6 + 9, 10**6 + 30]])
    q, k, v = qkv(q_len=6, k_len=6)
    expected = naive_attention(q, k, v, naive_bias(naive, scheme, qp, kp))
    torch.testing.assert_close(attend(q, k, v, scheme, qp, kp, causal=True), expected, atol=1e-6, rtol=1e-6)


class CallMethod(torch.nn.Module):
    """forward = one method of a scheme, so torch.func.functional_call can swap its parameters."""

    def __init__(self, scheme, method):
        super().__init__()
        self.scheme, self.method = scheme, method

    def forward(self, *args):
        return getattr(self.scheme, self.method)(*args)


def gradcheck_parameters(scheme, method, *args):
    """torch.autograd.gradcheck of ``scheme.method(*args)`` with respect to every parameter (float64)."""
    wrapper = CallMethod(scheme, method)
    names = [name for name, _ in wrapper.named_parameters()]
    values = tuple(p.detach().clone().requires_grad_(True) for _, p in wrapper.named_parameters())

    def call(*params):
        out = torch.func.functional_call(wrapper, dict(zip(names, params)), args)
        return tuple(out) if isinstance(out, (tuple, list)) else out

    return torch.autograd.gradcheck(call, values)


@pytest.mark.parametrize("name,options", [("kerple", dict(kernel="log")), ("kerple", dict(kernel="power")),
                                          ("dynamic_position_bias", dict(hidden=4, depth=2, norm=True))])
def test_distance_bias_gradients_pass_gradcheck(name, options):
    scheme = randomise(posemb.build(name, num_heads=2, **options)).double()
    assert gradcheck_parameters(scheme, "distance_bias", torch.tensor([-7, -3, -1, 0, 1, 2, 30]))


def test_distance_bias_gradients_through_the_toeplitz_path_equal_the_dense_ones():
    for name, options in (("kerple", dict(kernel="power", r2=1.2)), ("dynamic_position_bias", dict(hidden=8))):
        scheme = randomise(posemb.build(name, num_heads=4, **options))
        q, k, v = qkv(q_len=12, k_len=12, dtype=torch.float32)
        pos = arange_positions(2, 12, 5)
        grads = []
        for path in ("toeplitz", "dense"):
            scheme.zero_grad()
            attend(q, k, v, scheme, pos, pos, causal=True, bias_path=path).square().sum().backward()
            grads.append([p.grad.clone() for p in scheme.parameters()])
        for fast, dense in zip(*grads):
            assert dense.abs().sum() > 0
            torch.testing.assert_close(fast, dense, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name,options", [("kerple", {}), ("sandwich", dict(dim=64)), ("dynamic_position_bias", {})])
def test_distance_biases_take_the_fast_path_without_an_l_by_l_tensor(name, options, monkeypatch):
    """Consecutive positions go through the Toeplitz view: score_bias (the dense reference) is never
    called, and no tensor as large as one (L, L) score matrix appears, forward or backward (the
    backward's largest is one (heads, query block, L) gradient of the bias view per block)."""
    length, heads = 1024, 2
    scheme = randomise(posemb.build(name, num_heads=heads, **options))
    monkeypatch.setattr(type(scheme), "score_bias", lambda *a: pytest.fail("dense reference used"))
    q, k, v = (torch.randn(1, heads, length, 16, requires_grad=True) for _ in range(3))
    pos = arange_positions(1, length)
    recorder = LargestTensor()
    with recorder:
        attend(q, k, v, scheme, pos, pos, causal=True).sum().backward()
    assert recorder.ops > 0
    assert recorder.largest < length * length, f"{name}: a tensor of {recorder.largest} elements"


def test_dynamic_position_bias_matches_x_transformers():
    xt = pytest.importorskip("x_transformers.x_transformers")
    for log_distance in (False, True):
        theirs = xt.DynamicPositionBias(dim=8, heads=4, depth=2, log_distance=log_distance)
        ours = posemb.build("dynamic_position_bias", num_heads=4, hidden=8, depth=2, log_distance=log_distance)
        their_linears = [m for m in theirs.modules() if isinstance(m, torch.nn.Linear)]
        our_linears = [m for m in ours.modules() if isinstance(m, torch.nn.Linear)]
        assert len(their_linears) == len(our_linears) == 3
        with torch.no_grad():
            for mine, other in zip(our_linears, their_linears):
                mine.weight.copy_(other.weight)
                mine.bias.copy_(other.bias)
        i, j = 5, 13  # the last 5 of 13 tokens, as in decoding
        expected = theirs(i, j)
        got = ours.score_bias(torch.arange(j - i, j)[None], torch.arange(j)[None])[0]
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_sandwich_matches_nemo_form_and_is_zero_on_the_diagonal():
    """b_h(0) = 0, b_h <= 0, head 1 is the least compressed (largest |b|), and b is even in d."""
    scheme = posemb.build("sandwich", num_heads=8, dim=128)
    distance = torch.arange(-300, 301)
    bias = scheme.distance_bias(distance)
    assert bias.shape == (8, distance.numel())
    assert torch.all(bias[:, 300] == 0) and torch.all(bias <= 1e-6)
    torch.testing.assert_close(bias, bias.flip(-1))
    assert torch.all(bias[0].abs() >= bias[-1].abs() - 1e-6)
    # the compression is exact: head h is head H's bias times H / h
    for h in range(8):  # head h + 1 is the uncompressed sum divided by 8 (h + 1) / H
        torch.testing.assert_close(bias[h] * (h + 1), bias[7] * 8, atol=1e-4, rtol=1e-6)


@pytest.mark.parametrize("options,argument", [
    (dict(r1=0.0), "r1"), (dict(r1=-1.0), "r1"), (dict(r2=0.0), "r2"), (dict(kernel="power", r2=2.5), "r2"),
    (dict(kernel="cubic"), "kernel"), (dict(r1=float("nan")), "r1")])
def test_kerple_bad_options_name_the_option(options, argument):
    with pytest.raises((ValueError, TypeError), match=argument):
        posemb.build("kerple", num_heads=4, **options)


def test_kerple_parameters_stay_valid_whatever_the_optimiser_does():
    scheme = posemb.build("kerple", num_heads=3, kernel="power", r1=0.5, r2=2.0)
    torch.testing.assert_close(scheme.r1, torch.full((3,), 0.5))
    torch.testing.assert_close(scheme.r2, torch.full((3,), 2.0))
    with torch.no_grad():
        scheme.raw_r1.fill_(-50.0)
        scheme.raw_r2.fill_(50.0)
    assert torch.all(scheme.r1 > 0) and torch.all(scheme.r2 <= 2.0)
    assert torch.isfinite(scheme.distance_bias(torch.arange(-5, 6))).all()


@pytest.mark.parametrize("name,options,argument", [
    ("sandwich", dict(dim=15), "dim"), ("sandwich", dict(sandwich_dim=7), "sandwich_dim"),
    ("sandwich", {}, "dim"), ("sandwich", dict(dim=16, base=1.0), "base"),
    ("dynamic_position_bias", dict(hidden=0), "hidden"), ("dynamic_position_bias", dict(depth=0), "depth")])
def test_bad_options_name_the_option(name, options, argument):
    with pytest.raises((ValueError, TypeError), match=argument):
        posemb.build(name, num_heads=4, **options)


# ------------------------------------------------------------------------------------------------
# content-site schemes: every blocking of the attention gives the naive result
# ------------------------------------------------------------------------------------------------

def attend_every_way(monkeypatch, scheme, q, k, v, qp, kp, causal=True):
    """attend() through its three content paths: default (one tile here), many small no-grad
    tiles (online softmax), and the autograd path with blocks of 3 query rows."""
    import posemb.model.attention as attention

    results = {}
    with torch.no_grad():
        results["default"] = attend(q, k, v, scheme, qp, kp, causal=causal)
        with monkeypatch.context() as patch:
            elements = q.shape[0] * q.shape[1] * 4 * 4
            patch.setattr(attention, "_CONTENT_TILE_MIN_ELEMENTS", elements)
            patch.setattr(attention, "_CONTENT_TILE_MAX_ELEMENTS", elements)
            results["many tiles"] = attend(q, k, v, scheme, qp, kp, causal=causal)
    with monkeypatch.context() as patch:
        patch.setattr(attention, "_CONTENT_BLOCK_ELEMENTS", q.shape[0] * q.shape[1] * k.shape[-2] * 3)
        results["autograd blocks"] = attend(q.detach().requires_grad_(True), k, v, scheme, qp, kp,
                                            causal=causal).detach()
    return results


def naive_mlp(mlp, x):
    """A Linear/ReLU/SiLU stack on a float64 column x (n, 1)."""
    for layer in mlp:
        if isinstance(layer, torch.nn.Linear):
            x = x @ layer.weight.double().T + layer.bias.double()
        elif isinstance(layer, torch.nn.ReLU):
            x = x.clamp(min=0)
        else:
            raise AssertionError(layer)
    return x


def naive_fire_bias(scheme, qp, kp):
    """b(i, j) = f(log(c (i - j) + 1) / (log(c max(L, i) + 1) + eps)), one (i, j) at a time."""
    c = abs(scheme.c.item())
    threshold = abs(scheme.threshold_multiplier.item()) * scheme.threshold
    out = torch.zeros(qp.shape[0], scheme.num_heads, qp.shape[1], kp.shape[1], dtype=torch.float64)
    for b in range(qp.shape[0]):
        for a, i in enumerate(qp[b].tolist()):
            for m, j in enumerate(kp[b].tolist()):
                if j > i:
                    continue  # masked anyway
                u = math.log(c * (i - j) + 1) / (math.log(c * max(threshold, i) + 1) + scheme.eps)
                out[b, :, a, m] = naive_mlp(scheme.mlp, torch.tensor([[u]], dtype=torch.float64))[0]
    return out


@pytest.mark.parametrize("start,threshold", [(0, 512.0), (30, 8.0), (10**6, 512.0)])
@pytest.mark.parametrize("q_len,k_len", [(11, 11), (1, 9), (4, 13)])
def test_fire_attention_equals_the_naive_formula(monkeypatch, start, threshold, q_len, k_len):
    """Below the threshold (L = 512) FIRE is distance-only; past it (L = 8, start 30; positions ~1e6)
    the normaliser psi(i) depends on the query position."""
    scheme = randomise(posemb.build("fire", num_heads=4, mlp_width=8, threshold=threshold), std=0.3).double()
    with torch.no_grad():
        scheme.c.fill_(0.3)
        scheme.threshold_multiplier.fill_(1.0)
    q, k, v = qkv(q_len=q_len, k_len=k_len)
    kp = arange_positions(2, k_len, start) + torch.tensor([[0], [5]])
    qp = kp[:, k_len - q_len:]
    expected = naive_attention(q, k, v, naive_fire_bias(scheme, qp, kp))
    for label, got in attend_every_way(monkeypatch, scheme, q, k, v, qp, kp).items():
        torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9, msg=lambda m: f"{label}: {m}")


def test_fire_gradients_pass_gradcheck():
    scheme = randomise(posemb.build("fire", num_heads=2, mlp_width=4, threshold=6.0), std=0.3).double()
    with torch.no_grad():  # away from |c| and |m|'s kink at 0 and from max(L, i)'s switch
        scheme.c.fill_(0.4)
        scheme.threshold_multiplier.fill_(1.0)
    qp = torch.tensor([[2, 3, 9, 12]])
    kp = torch.tensor([[0, 1, 2, 3, 9, 12]])
    assert gradcheck_parameters(scheme, "fire_bias", qp, kp)


def test_fire_sees_the_query_position_past_its_threshold():
    scheme = randomise(posemb.build("fire", num_heads=2, threshold=16.0))
    near, far = torch.arange(8)[None], torch.arange(8)[None] + 100
    # below L: only i - j matters; past L the same distances give another bias
    torch.testing.assert_close(scheme.fire_bias(near, near), scheme.fire_bias(near + 5, near + 5))
    assert not torch.allclose(scheme.fire_bias(near, near), scheme.fire_bias(far, far))


def test_fire_stays_within_tiles():
    """Without autograd the largest tensor is one tile's MLP hidden layer (tile pairs x mlp_width),
    far below (L, L, mlp_width); with autograd the hidden layer is recomputed, never kept whole."""
    import posemb.model.attention as attention

    length, heads, width = 512, 2, 32
    scheme = randomise(posemb.build("fire", num_heads=heads, mlp_width=width))
    q, k, v = (torch.randn(1, heads, length, 16) for _ in range(3))
    pos = arange_positions(1, length)
    rows, keys = attention._content_tile(heads, length, length, heads * length * 16)
    recorder = LargestTensor()
    with recorder, torch.no_grad():
        attend(q, k, v, scheme, pos, pos, causal=True)
    assert recorder.largest <= max(rows * keys * width, heads * rows * keys)
    assert rows * keys * width * 4 <= length * length * width
    q.requires_grad_(True)
    recorder = LargestTensor()
    with recorder:
        attend(q, k, v, scheme, pos, pos, causal=True).sum().backward()
    assert recorder.largest < length * length * width / 4
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in scheme.parameters())


@pytest.mark.parametrize("options,argument", [
    (dict(causal=False), "causal"), (dict(c=0.0), "c"), (dict(threshold=-1.0), "threshold"),
    (dict(mlp_width=0), "mlp_width"), (dict(eps=-1e-3), "eps")])
def test_fire_bad_options_name_the_option(options, argument):
    with pytest.raises((ValueError, TypeError), match=argument):
        posemb.build("fire", num_heads=4, **options)


# ------------------------------------------------------------------------------------------------
# PoPE
# ------------------------------------------------------------------------------------------------

def naive_pope_scores(scheme, q, k, qp, kp):
    """a_st = Re[sum_c q~_c conj(k~_c)] / sqrt(d) with complex numbers, one (s, t) at a time."""
    batch, heads, q_len, d = q.shape
    delta = scheme.phase_bias.double().clamp(-2 * math.pi, 0)
    out = torch.zeros(batch, heads, q_len, k.shape[2], dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for s in range(q_len):
                for t in range(k.shape[2]):
                    total = 0.0
                    for c in range(d):
                        theta = scheme.base ** (-c / d)
                        qc = math.log1p(math.exp(q[b, h, s, c].item())) * complex(math.cos(qp[b, s].item() * theta),
                                                                                  math.sin(qp[b, s].item() * theta))
                        angle = kp[b, t].item() * theta + delta[h, c].item()
                        kc = math.log1p(math.exp(k[b, h, t, c].item())) * complex(math.cos(angle), math.sin(angle))
                        total += (qc * kc.conjugate()).real
                    out[b, h, s, t] = total / math.sqrt(d)
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_pope_attention_equals_the_naive_complex_formula(causal):
    scheme = randomise(posemb.build("pope", head_dim=6, num_heads=2, base=100.0), std=2.0).double()
    q, k, v = qkv(batch=1, heads=2, q_len=4, k_len=7, dim=6)
    kp = torch.tensor([[3, 4, 5, 9, 10, 11, 40]])
    qp = kp[:, 3:]
    scores = naive_pope_scores(scheme, q, k, qp, kp)
    rq, rk = scheme.rotate(q, k, qp, kp)
    assert rq.shape[-1] == rk.shape[-1] == 12
    assert scheme.logit_scale(12) == pytest.approx(6 ** -0.5)  # the original width's 1/sqrt(d), not SDPA's 1/sqrt(2d)
    torch.testing.assert_close(rq @ rk.transpose(-1, -2) / math.sqrt(6), scores, atol=1e-10, rtol=1e-10)
    expected = naive_attention(q, k, v, scores, causal=causal, scale=0.0)
    torch.testing.assert_close(attend(rq, rk, v, scheme, qp, kp, causal=causal), expected, atol=1e-10, rtol=1e-10)


def test_pope_matches_x_transformers_polar_embedding():
    xt = pytest.importorskip("x_transformers.x_transformers")
    if not hasattr(xt, "PolarEmbedding"):
        pytest.skip("this x-transformers has no PolarEmbedding")
    theirs = xt.PolarEmbedding(8, heads=2)
    ours = posemb.build("pope", head_dim=8, num_heads=2)
    with torch.no_grad():
        theirs.learned_bias.uniform_(-2 * math.pi, 0.0)
        ours.phase_bias.copy_(theirs.learned_bias[:, 0])
    q, k, _ = qkv(batch=2, heads=2, q_len=6, k_len=6, dim=8, dtype=torch.float32)
    pos = torch.arange(6)
    freqs, bias = theirs(pos)
    their_q = xt.apply_polar_pos_emb(q, freqs[:, None])
    their_k = xt.apply_polar_pos_emb(k, freqs[:, None] + bias)
    our_q, our_k = ours.rotate(q, k, pos[None].expand(2, 6), pos[None].expand(2, 6))
    torch.testing.assert_close(our_k, their_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(our_q, their_q, atol=1e-5, rtol=1e-5)


def test_pope_phase_bias_gradient_passes_gradcheck_and_stays_clamped():
    scheme = posemb.build("pope", head_dim=4, num_heads=2).double()
    with torch.no_grad():
        scheme.phase_bias.uniform_(-6.0, -0.3)  # inside the clamp, away from its edges
    q, k, _ = qkv(batch=1, heads=2, q_len=3, k_len=3, dim=4)
    pos = torch.tensor([[0, 5, 17]])
    assert gradcheck_parameters(scheme, "rotate", q, k, pos, pos)
    with torch.no_grad():
        scheme.phase_bias.fill_(3.0)
    assert torch.all(scheme.key_phase_bias() == 0)


def test_pope_bad_options_and_inputs():
    with pytest.raises(ValueError, match="base"):
        posemb.build("pope", head_dim=8, num_heads=2, base=0.5)
    with pytest.raises(ValueError, match="head_dim"):
        posemb.build("pope", head_dim=0, num_heads=2)
    scheme = posemb.build("pope", head_dim=8, num_heads=2)
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="head_dim=8"):
        scheme.rotate(q, q, torch.arange(3)[None], torch.arange(3)[None])


# ------------------------------------------------------------------------------------------------
# forgetting gate and CoPE
# ------------------------------------------------------------------------------------------------

def naive_forgetting_bias(scheme, k):
    """D_ij = sum_{t=j+1..i} log sigmoid(w_h . k_t + b_h), summed term by term (queries = the last Lq keys)."""
    w, b = scheme.gate_weight.double(), scheme.gate_bias.double()
    batch, heads, k_len, _ = k.shape
    log_f = torch.nn.functional.logsigmoid(torch.einsum("bhld,hd->bhl", k.double(), w) + b[:, None])
    out = torch.zeros(batch, heads, k_len, k_len, dtype=torch.float64)
    for i in range(k_len):
        for j in range(i + 1):
            for t in range(j + 1, i + 1):
                out[:, :, i, j] += log_f[:, :, t]
    return out


@pytest.mark.parametrize("q_len,k_len", [(10, 10), (1, 9), (4, 13)])
def test_forgetting_attention_equals_the_naive_formula(monkeypatch, q_len, k_len):
    scheme = randomise(posemb.build("forgetting", head_dim=8, num_heads=4, bias_init=1.0)).double()
    q, k, v = qkv(q_len=q_len, k_len=k_len)
    kp = arange_positions(2, k_len, 3)
    qp = kp[:, k_len - q_len:]
    expected = naive_attention(q, k, v, naive_forgetting_bias(scheme, k)[:, :, k_len - q_len:])
    for label, got in attend_every_way(monkeypatch, scheme, q, k, v, qp, kp).items():
        torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9, msg=lambda m: f"{label}: {m}")


def test_forgetting_gate_with_a_constant_gate_is_alibi_with_slope_minus_log_f():
    scheme = posemb.build("forgetting", head_dim=8, num_heads=2, bias_init=2.0)
    q, k, v = qkv(q_len=7, k_len=7, heads=2, dtype=torch.float32)
    pos = arange_positions(2, 7)
    slope = -torch.nn.functional.logsigmoid(torch.tensor(2.0))
    distance = (torch.arange(7)[:, None] - torch.arange(7)[None, :]).clamp(min=0).float()
    expected = naive_attention(q, k, v, -slope * distance)
    torch.testing.assert_close(attend(q, k, v, scheme, pos, pos, causal=True).double(), expected, atol=1e-5, rtol=1e-5)


def test_forgetting_matches_x_transformers_data_dependent_alibi():
    """x-transformers' gate reads the layer input x: with its weight set to W_k,h^T w_h (the gate of
    the head's key k = W_k x), both give the same bias, hence the same attention."""
    xt = pytest.importorskip("x_transformers.x_transformers")
    dim, heads, head_dim, length = 16, 2, 8, 9
    theirs = xt.DataDependentAlibi(dim, heads)
    ours = randomise(posemb.build("forgetting", head_dim=head_dim, num_heads=heads))
    x = torch.randn(2, length, dim)
    w_k = torch.randn(heads * head_dim, dim) * 0.3
    k = (x @ w_k.T).view(2, length, heads, head_dim).transpose(1, 2)
    linear = theirs.to_forget_gates[0]
    with torch.no_grad():
        linear.weight.copy_(torch.einsum("hd,hdm->hm", ours.gate_weight, w_k.view(heads, head_dim, dim)))
        linear.bias.copy_(ours.gate_bias)
    q, _, v = qkv(batch=2, heads=heads, q_len=length, k_len=length, dim=head_dim, dtype=torch.float32)
    expected = naive_attention(q, k, v, theirs(x))
    pos = arange_positions(2, length)
    torch.testing.assert_close(attend(q, k, v, ours, pos, pos, causal=True).double(), expected, atol=1e-5, rtol=1e-5)


def test_forgetting_stays_precise_over_long_sequences():
    """c_t grows with t; the rebased float32 terms keep late rows as precise as early ones."""
    length = 4096
    scheme = posemb.build("forgetting", head_dim=4, num_heads=1, bias_init=-1.0)  # log f ~ -1.3 per token
    q, k, v = (torch.randn(1, 1, length, 4) for _ in range(3))
    pos = arange_positions(1, length)
    with torch.no_grad():
        got = attend(q[:, :, -3:], k, v, scheme, pos[:, -3:], pos, causal=True)
    log_f = torch.nn.functional.logsigmoid(torch.full((length,), -1.0, dtype=torch.float64))
    cumulative = log_f.cumsum(0)
    bias = (cumulative[-3:, None] - cumulative[None, :])[None, None]
    expected = naive_attention(q[:, :, -3:], k, v, bias)
    torch.testing.assert_close(got.double(), expected, atol=2e-6, rtol=1e-5)


def naive_cope_term(scheme, q, k):
    """q_i . e[p_ij] interpolated, p_ij = min(sum_{t=j..i} sigmoid(q_i.k_t/sqrt d), npos-1), by loops."""
    batch, heads, q_len, d = q.shape
    k_len = k.shape[2]
    e = scheme.position_embedding.double()
    out = torch.zeros(batch, heads, q_len, k_len, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for a in range(q_len):
                i = a + k_len - q_len
                for j in range(i + 1):
                    p = sum(torch.sigmoid(q[b, h, a] @ k[b, h, t] / math.sqrt(d)).item() for t in range(j, i + 1))
                    p = min(p, scheme.npos - 1)
                    lo, hi = math.floor(p), math.ceil(p)
                    w = p - lo
                    out[b, h, a, j] = (1 - w) * (q[b, h, a] @ e[lo]).item() + w * (q[b, h, a] @ e[hi]).item()
    return out


@pytest.mark.parametrize("npos", [3, 64])
@pytest.mark.parametrize("q_len,k_len", [(8, 8), (1, 7), (3, 9)])
def test_cope_attention_equals_the_naive_formula(monkeypatch, npos, q_len, k_len):
    scheme = randomise(posemb.build("cope", head_dim=8, num_heads=2, npos=npos)).double()
    q, k, v = qkv(batch=1, heads=2, q_len=q_len, k_len=k_len)
    kp = arange_positions(1, k_len)
    qp = kp[:, k_len - q_len:]
    expected = naive_attention(q, k, v, naive_cope_term(scheme, q, k))
    for label, got in attend_every_way(monkeypatch, scheme, q, k, v, qp, kp).items():
        torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9, msg=lambda m: f"{label}: {m}")


def test_cope_matches_x_transformers():
    xt = pytest.importorskip("x_transformers.x_transformers")
    theirs = xt.CoPE(dim=8, heads=2, max_pos=5)
    ours = posemb.build("cope", head_dim=8, num_heads=2, npos=5)
    with torch.no_grad():
        theirs.pos_emb.normal_()
        ours.position_embedding.copy_(theirs.pos_emb)
    q, k, v = qkv(batch=2, heads=2, q_len=9, k_len=9, dtype=torch.float32)
    sim = q @ k.transpose(-1, -2) * 8 ** -0.5
    sim = sim.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), -torch.finfo(sim.dtype).max)
    expected = torch.softmax(sim + theirs(q, sim), dim=-1) @ v
    pos = arange_positions(2, 9)
    torch.testing.assert_close(attend(q, k, v, ours, pos, pos, causal=True), expected, atol=1e-5, rtol=1e-5)


class AttendWith(torch.nn.Module):
    """attend() under a scheme, as a module, so functional_call can swap the scheme's parameters."""

    def __init__(self, scheme):
        super().__init__()
        self.scheme = scheme

    def forward(self, q, k, v, pos):
        return attend(q, k, v, self.scheme, pos, pos, causal=True)


@pytest.mark.parametrize("name,options", [("forgetting", dict(head_dim=3, num_heads=2)),
                                          ("cope", dict(head_dim=3, num_heads=2, npos=4))])
def test_contextual_gradients_pass_gradcheck(name, options):
    """Gradients of the attention output with respect to the scheme's parameters (float64)."""
    scheme = randomise(posemb.build(name, **options)).double()
    q, k, v = qkv(batch=1, heads=2, q_len=5, k_len=5, dim=3)
    assert gradcheck_parameters(AttendWith(scheme), "forward", q, k, v, arange_positions(1, 5))


@pytest.mark.parametrize("name,options,argument", [
    ("forgetting", dict(head_dim=8, num_heads=2, causal=False), "causal"),
    ("forgetting", dict(head_dim=8, num_heads=2, bias_init=float("inf")), "bias_init"),
    ("cope", dict(head_dim=8, num_heads=2, causal=False), "causal"),
    ("cope", dict(head_dim=8, num_heads=2, npos=0), "npos"),
    ("cope", dict(head_dim=8, npos=2.5), "npos")])
def test_contextual_bad_options_name_the_option(name, options, argument):
    with pytest.raises((ValueError, TypeError), match=argument):
        posemb.build(name, **options)


@pytest.mark.parametrize("name", ["forgetting", "cope"])
def test_contextual_schemes_never_form_an_l_by_l_by_d_tensor(name):
    length, heads, head_dim = 256, 2, 32
    scheme = randomise(posemb.build(name, head_dim=head_dim, num_heads=heads))
    q, k, v = (torch.randn(1, heads, length, head_dim, requires_grad=True) for _ in range(3))
    pos = arange_positions(1, length)
    recorder = LargestTensor()
    with recorder:
        attend(q, k, v, scheme, pos, pos, causal=True).sum().backward()
    assert recorder.largest < length * length * head_dim / 4
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in scheme.parameters())


# ------------------------------------------------------------------------------------------------
# randomized positions (Ruoss et al. 2023)
# ------------------------------------------------------------------------------------------------

def test_randomized_positions_are_sorted_distinct_subsets_of_the_range():
    from posemb.functional.randomized import randomized_positions

    generator = torch.Generator().manual_seed(3)
    pos = randomized_positions(64, 16, 40, generator=generator)
    assert pos.shape == (64, 16) and pos.dtype == torch.int64
    assert torch.all(pos[:, 1:] > pos[:, :-1])  # increasing, hence distinct
    assert pos.min() >= 0 and pos.max() < 40
    assert torch.equal(randomized_positions(2, 40, 40), torch.arange(40).expand(2, 40))  # N = n: the ordinary ones
    again = randomized_positions(64, 16, 40, generator=torch.Generator().manual_seed(3))
    assert torch.equal(pos, again)


def test_randomized_positions_are_uniform_over_subsets():
    """Each position of [0, N) is in the subset with probability n / N (uniform subsets), and the
    smallest one follows P(min >= m) = C(N - m, n) / C(N, n)."""
    from posemb.functional.randomized import randomized_positions

    rows, n, big = 20000, 4, 10
    pos = randomized_positions(rows, n, big, generator=torch.Generator().manual_seed(0))
    frequency = torch.bincount(pos.reshape(-1), minlength=big).double() / rows
    sigma = math.sqrt(0.4 * 0.6 / rows)
    assert torch.all((frequency - n / big).abs() < 5 * sigma)
    for m in (1, 3, 5):
        expected = math.comb(big - m, n) / math.comb(big, n)
        observed = (pos[:, 0] >= m).double().mean().item()
        assert abs(observed - expected) < 5 * math.sqrt(expected * (1 - expected) / rows)


def test_randomized_positions_feed_any_scheme():
    from posemb.functional.randomized import randomized_positions

    for name in ("rope", "alibi", "learned"):
        model = posemb.TransformerLM(32, 16, 1, 2, scheme=name)
        tokens = torch.randint(0, 32, (3, 8))
        logits = model(tokens, positions=randomized_positions(3, 8, 64))
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("kwargs,argument", [(dict(batch=0, length=4, max_position=8), "batch"),
                                             (dict(batch=1, length=9, max_position=8), "max_position"),
                                             (dict(batch=1, length=0, max_position=8), "length"),
                                             (dict(batch=1, length=2, max_position=8, generator=3), "generator")])
def test_randomized_positions_bad_arguments(kwargs, argument):
    from posemb.functional.randomized import randomized_positions

    with pytest.raises((ValueError, TypeError), match=argument):
        randomized_positions(**kwargs)
