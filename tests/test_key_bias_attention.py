"""The fused per-key-bias path (``content_key_bias``: the forgetting gate) against the tiled content
path it replaces and a float64 reference written from the formula."""
from __future__ import annotations

import pytest
import torch

from posemb import build
from posemb.model import TransformerLM, attention
from posemb.model.attention import attend
from posemb.model.key_bias_attention import BLOCK_ROWS


def _gate(heads=3, d=8, seed=0, bias=1.0):
    torch.manual_seed(seed)
    scheme = build("forgetting", head_dim=d, num_heads=heads)
    with torch.no_grad():
        scheme.gate_bias.fill_(bias)  # strong forgetting: f ~ 0.73, the cumulative sums grow fast
        scheme.gate_weight.normal_(0, 0.3)
    return scheme


def _float64_reference(q, k, v, scheme):
    """softmax(q.k / sqrt(d) + c_i - c_j) v over j <= i + Lk - Lq, from FoX eq. 6, all in float64."""
    q, k, v = q.double(), k.double(), v.double()
    c = torch.cumsum(torch.nn.functional.logsigmoid(
        torch.einsum("bhld,hd->bhl", k, scheme.gate_weight.double()) + scheme.gate_bias.double()[:, None]), -1)
    offset = k.shape[2] - q.shape[2]
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + c[..., offset:, None] - c[..., None, :]
    visible = torch.arange(k.shape[2])[None, :] <= torch.arange(q.shape[2])[:, None] + offset
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v


@pytest.fixture
def tiled(monkeypatch):
    def run(*args, **kwargs):
        monkeypatch.setattr(attention, "_KEY_BIAS_FUSED", False)
        try:
            return attend(*args, **kwargs)
        finally:
            monkeypatch.setattr(attention, "_KEY_BIAS_FUSED", True)
    return run


@pytest.mark.parametrize("q_len,k_len", [(1, 1), (5, 5), (2 * BLOCK_ROWS + 37, 2 * BLOCK_ROWS + 37),
                                         (1, 300), (BLOCK_ROWS + 3, 400)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_equals_reference(q_len, k_len, dtype, tiled):
    scheme = _gate().to(dtype)
    q = torch.randn(2, 3, q_len, 8, dtype=dtype)
    k, v = torch.randn(2, 3, k_len, 8, dtype=dtype), torch.randn(2, 3, k_len, 8, dtype=dtype)
    positions_q, positions_k = torch.arange(k_len - q_len, k_len).expand(2, -1), torch.arange(k_len).expand(2, -1)
    with torch.no_grad():
        fused = attend(q, k, v, scheme, positions_q, positions_k, causal=True)
        reference = tiled(q, k, v, scheme, positions_q, positions_k, causal=True)
    expected = _float64_reference(q, k, v, scheme)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(fused.double(), expected, rtol=0, atol=tolerance)
    torch.testing.assert_close(reference.double(), expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("q_len,k_len", [(2 * BLOCK_ROWS + 11, 2 * BLOCK_ROWS + 11), (BLOCK_ROWS + 5, 300)])
def test_gradients_equal_float64(q_len, k_len):
    """Every gradient (q, k, v, the gate's weight and bias) of the fused path, through its hand-written
    backward (the kernel's own backward per block, the rows' gradients through key_bias and the gate),
    equals autograd through the float64 formula."""
    scheme = _gate().double()
    q = torch.randn(1, 3, q_len, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 3, k_len, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 3, k_len, 8, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(1, 3, q_len, 8, dtype=torch.float64)
    leaves = [q, k, v, scheme.gate_weight, scheme.gate_bias]
    positions_q, positions_k = torch.arange(k_len - q_len, k_len)[None], torch.arange(k_len)[None]
    ours = torch.autograd.grad((attend(q, k, v, scheme, positions_q, positions_k, causal=True) * weights).sum(), leaves)
    expected = torch.autograd.grad((_float64_reference(q, k, v, scheme) * weights).sum(), leaves)
    for name, a, b in zip(("q", "k", "v", "gate_weight", "gate_bias"), ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"gradient of {name}")


def test_training_takes_the_hand_written_backward_and_plain_autograd_keeps_double_backward(monkeypatch):
    """With gradients on CPU the fused path is the custom Function (a spy counts it); with
    _CONTENT_PATH = "autograd" it is the checkpointed blocks, whose second derivative is the formula's."""
    import posemb.model.key_bias_attention as key_bias

    scheme = _gate().double()
    q, k, v = (torch.randn(1, 3, BLOCK_ROWS + 9, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    positions = torch.arange(BLOCK_ROWS + 9)[None]
    calls = []
    original = key_bias._KeyBiasAttention.apply
    monkeypatch.setattr(key_bias._KeyBiasAttention, "apply", lambda *a: calls.append(1) or original(*a))
    attend(q, k, v, scheme, positions, positions, causal=True).sum().backward()
    assert calls == [1]
    monkeypatch.setattr(attention, "_CONTENT_PATH", "autograd")
    (grad,) = torch.autograd.grad(attend(q, k, v, scheme, positions, positions, causal=True).square().sum(), q,
                                  create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), q)
    assert calls == [1]
    (grad_ref,) = torch.autograd.grad(_float64_reference(q, k, v, scheme).square().sum(), q, create_graph=True)
    (second_ref,) = torch.autograd.grad(grad_ref.sum(), q)
    torch.testing.assert_close(second, second_ref, rtol=0, atol=1e-10)


def test_bfloat16_gradients_are_as_close_to_float64_as_the_tiled_paths(monkeypatch):
    """bf16 inputs: every gradient of the fused path within 1.5x the tiled path's own bf16 error, both
    against float64 on the same bf16-rounded inputs (bf16 rounds the probabilities and the output: errors
    of 10-20 % of a gradient's size occur on either path here)."""
    length = BLOCK_ROWS + 40
    q, k, v = (torch.randn(1, 3, length, 8).bfloat16().double() for _ in range(3))
    positions = torch.arange(length)[None]

    def gradients(dtype, fused):
        gate = _gate().to(dtype)
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)] + [gate.gate_weight, gate.gate_bias]
        monkeypatch.setattr(attention, "_KEY_BIAS_FUSED", fused)
        out = attend(*leaves[:3], gate, positions, positions, causal=True)
        monkeypatch.setattr(attention, "_KEY_BIAS_FUSED", True)
        return torch.autograd.grad(out.double().square().sum(), leaves)

    exact, fused, tiled = gradients(torch.float64, True), gradients(torch.bfloat16, True), gradients(torch.bfloat16, False)
    for name, a, b, c in zip(("q", "k", "v", "gate_weight", "gate_bias"), fused, tiled, exact):
        error, tiled_error = (a.double() - c).abs().max().item(), (b.double() - c).abs().max().item()
        assert error <= 1.5 * tiled_error + 1e-6, (name, error, tiled_error)


def test_model_training_step_matches_tiled_path(monkeypatch):
    """A whole model's loss and parameter gradients: fused path = tiled path (float64)."""
    torch.manual_seed(3)
    model = TransformerLM(vocab_size=40, dim=24, depth=2, heads=3, scheme="forgetting").double()
    tokens = torch.randint(0, 40, (2, 2 * BLOCK_ROWS + 9))

    loss, grads = loss_and_gradients(model, tokens)
    monkeypatch.setattr(attention, "_KEY_BIAS_FUSED", False)
    loss_tiled, grads_tiled = loss_and_gradients(model, tokens)
    torch.testing.assert_close(loss, loss_tiled, rtol=1e-12, atol=0)
    for a, b in zip(grads, grads_tiled):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def loss_and_gradients(model, tokens):
    """Next-token loss of ``tokens`` and a copy of every parameter's gradient."""
    model.zero_grad()
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, model.vocab_size), tokens[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_non_causal_is_still_refused():
    with pytest.raises(ValueError, match="causal"):
        build("forgetting", head_dim=8, num_heads=2, causal=False)
