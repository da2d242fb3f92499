"""The recomputing backward of content-site attention (``posemb.model.content_autograd``) against
plain autograd through the older path (``_CONTENT_PATH = "autograd"``), in float64: gradients of
q, k, v and of every scheme parameter, causal and bidirectional, KV-cache offsets (Lq < Lk),
non-consecutive positions, batch > 1, many blocks; and what the forward keeps for the backward."""
import pytest
import torch

import posemb
import posemb.model.attention as attention
from posemb.model.attention import attend

BATCH, HEADS, HEAD_DIM = 2, 3, 8
DIM = HEADS * HEAD_DIM

SCHEMES = [  # (name, options, bidirectional allowed)
    ("shaw", dict(head_dim=HEAD_DIM, max_relative_position=3), True),
    ("shaw", dict(head_dim=HEAD_DIM, num_heads=HEADS, max_relative_position=5, per_head=True), True),
    ("transformer_xl", dict(dim=DIM, num_heads=HEADS), True),
    ("deberta", dict(dim=DIM, num_heads=HEADS, max_relative_positions=4), True),
    ("deberta", dict(dim=DIM, num_heads=HEADS, max_relative_positions=20, position_buckets=6,
                     projection_bias=True, norm_rel_embeddings=True), True),
    ("fire", dict(num_heads=HEADS, mlp_width=8, threshold=6.0), False),
    ("forgetting", dict(head_dim=HEAD_DIM, num_heads=HEADS, bias_init=1.0), False),
    ("cope", dict(head_dim=HEAD_DIM, num_heads=HEADS, npos=6), False),
]
IDS = [f"{name}-{number}" for number, (name, _, _) in enumerate(SCHEMES)]
CASES = [(23, 23, True), (23, 23, False), (9, 30, True), (9, 30, False), (1, 17, True)]


def build(name, options):
    torch.manual_seed(0)
    scheme = posemb.build(name, **options).double()
    with torch.no_grad():
        for parameter in scheme.parameters():
            parameter.normal_(0, 0.4)
        if name == "fire":  # away from |c| and |m|'s kinks at 0
            scheme.c.fill_(0.4)
            scheme.threshold_multiplier.fill_(1.0)
        if name == "forgetting":
            scheme.gate_bias.fill_(1.0)
    return scheme


def positions(q_len, k_len, spacing):
    k_pos = torch.stack([torch.arange(s, s + k_len) for s in (37, 5)[:BATCH]]) * spacing
    return k_pos[:, k_len - q_len:], k_pos


def gradients(scheme, q, k, v, q_pos, k_pos, causal, path, monkeypatch):
    monkeypatch.setattr(attention, "_CONTENT_PATH", path)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = attend(*leaves, scheme, q_pos, k_pos, causal=causal)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    named = dict(scheme.named_parameters())
    grads = torch.autograd.grad((out * weight).sum(), leaves + list(named.values()), allow_unused=True)
    return out.detach(), dict(zip(["q", "k", "v", *named], grads))


@pytest.mark.parametrize("name,options,bidirectional", SCHEMES, ids=IDS)
@pytest.mark.parametrize("q_len,k_len,causal", CASES)
@pytest.mark.parametrize("spacing", [1, 3])
@pytest.mark.parametrize("blocks", ["one", "many"])
def test_recomputed_gradients_match_plain_autograd(monkeypatch, name, options, bidirectional, q_len, k_len,
                                                   causal, spacing, blocks):
    if not causal and not bidirectional:
        pytest.skip(f"{name} is causal only")
    scheme = build(name, options)
    if blocks == "many":  # backward blocks of 2-5 query rows; forward tiles of 8 x 8
        monkeypatch.setattr(attention, "_CONTENT_RECOMPUTE_ELEMENTS", BATCH * HEADS * k_len * 2)
        monkeypatch.setattr(attention, "_CONTENT_TILE_MIN_ELEMENTS", BATCH * HEADS * 64)
        monkeypatch.setattr(attention, "_CONTENT_TILE_MAX_ELEMENTS", BATCH * HEADS * 64)
    torch.manual_seed(1)
    q, k, v = (torch.randn(BATCH, HEADS, length, HEAD_DIM, dtype=torch.float64) for length in (q_len, k_len, k_len))
    q_pos, k_pos = positions(q_len, k_len, spacing)
    out, got = gradients(scheme, q, k, v, q_pos, k_pos, causal, "recompute", monkeypatch)
    reference_out, expected = gradients(scheme, q, k, v, q_pos, k_pos, causal, "autograd", monkeypatch)
    torch.testing.assert_close(out, reference_out, atol=1e-12, rtol=1e-12)
    assert set(got) == set(expected)
    for key in expected:
        if expected[key] is None:
            assert got[key] is None or got[key].abs().max() == 0, key
            continue
        assert got[key] is not None, f"{name}: no gradient for {key}"
        torch.testing.assert_close(got[key], expected[key], atol=1e-10, rtol=1e-10, msg=lambda m: f"{key}: {m}")
    assert any(expected[key] is not None and expected[key].abs().max() > 0 for key in expected if key not in "qkv")


@pytest.mark.parametrize("name,options", [(n, o) for n, o, _ in SCHEMES[2:3] + SCHEMES[5:]],
                         ids=["transformer_xl", "fire", "forgetting", "cope"])
def test_gradcheck(name, options):
    """torch.autograd.gradcheck (finite differences) of the recomputing path, parameters included."""
    scheme = build(name, options)
    q, k, v = (torch.randn(1, HEADS, length, HEAD_DIM, dtype=torch.float64, requires_grad=True)
               for length in (5, 7, 7))
    q_pos, k_pos = positions(5, 7, 1)
    params = list(scheme.parameters())
    assert torch.autograd.gradcheck(lambda q, k, v: attend(q, k, v, scheme, q_pos[:1], k_pos[:1], causal=True),
                                    (q, k, v))
    # The parameters (not inputs of gradcheck's function): central differences of a scalar loss.
    weight = torch.randn(1, HEADS, 5, HEAD_DIM, dtype=torch.float64)
    loss = (attend(q, k, v, scheme, q_pos[:1], k_pos[:1], causal=True) * weight).sum()
    grads = torch.autograd.grad(loss, params)
    for parameter, grad in zip(params, grads):
        flat = parameter.data.view(-1)
        for index in range(0, flat.numel(), max(1, flat.numel() // 5)):
            saved = flat[index].item()
            with torch.no_grad():
                flat[index] = saved + 1e-6
                up = (attend(q, k, v, scheme, q_pos[:1], k_pos[:1], causal=True) * weight).sum()
                flat[index] = saved - 1e-6
                down = (attend(q, k, v, scheme, q_pos[:1], k_pos[:1], causal=True) * weight).sum()
                flat[index] = saved
            assert abs((up - down).item() / 2e-6 - grad.view(-1)[index].item()) < 1e-6


def test_forward_saves_no_score_block_and_double_backward_is_refused():
    """What the forward keeps for the backward is O(L): q, k, v, the output, the per-row log-sum-exp
    (and the scheme's parameters), never an (Lq, Lk) block; a second derivative is refused clearly."""
    length = 256
    scheme = build("shaw", dict(head_dim=HEAD_DIM, max_relative_position=3)).float()
    q, k, v = (torch.randn(1, HEADS, length, HEAD_DIM, requires_grad=True) for _ in range(3))
    pos = torch.arange(length)[None]
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = attend(q, k, v, scheme, pos, pos, causal=True)
    assert saved and max(saved) <= HEADS * length * HEAD_DIM < length * length
    # out.pow(2): the gradient reaching the attention depends on q (a plain sum's would not).
    grad_q, = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate"):
        grad_q.sum().backward()
