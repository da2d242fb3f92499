"""Helpers shared by the tests of the fused content paths (FIRE, CoPE, Transformer-XL): the tiled reference,
a spy that the fused path really ran, the double-backward check of ``_CONTENT_PATH = "autograd"``, the
memory-bound check against the tiled path, and the float32-against-float64 comparison."""
from __future__ import annotations

import torch

from posemb.model import attention
from posemb.model.attention import attend


def tiled(monkeypatch, flag: str, *args, **kwargs):
    """``attend(*args, **kwargs)`` with the fused path's module flag (e.g. ``"_FIRE_FUSED"``) off."""
    with monkeypatch.context() as patch:
        patch.setattr(attention, flag, False)
        return attend(*args, **kwargs)


def runs_forward(monkeypatch, module, call) -> bool:
    """Whether ``call()`` went through ``module._forward`` (so no test passes by falling back)."""
    calls = []
    original = module._forward

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(module, "_forward", spy)
        call()
    return bool(calls)


def assert_double_backward_matches(monkeypatch, scheme, q, k, v, q_pos, k_pos, naive):
    """With ``_CONTENT_PATH = "autograd"`` (plain autograd, so double backward) the once-differentiable fused
    path steps aside: the second derivative through attend() equals the one through ``naive(scheme, q, k, v,
    q_pos, k_pos)``."""
    monkeypatch.setattr(attention, "_CONTENT_PATH", "autograd")
    q = q.detach().requires_grad_(True)
    seconds = []
    for function in (lambda: attend(q, k, v, scheme, q_pos, k_pos, causal=True),
                     lambda: naive(scheme, q, k, v, q_pos, k_pos)):
        (grad,) = torch.autograd.grad(function().square().sum(), q, create_graph=True)
        seconds.append(torch.autograd.grad(grad.sum(), q)[0])
    torch.testing.assert_close(seconds[0], seconds[1], rtol=0, atol=1e-10)


def assert_bounded_and_equal_to_tiled(monkeypatch, flag: str, scheme, q, k, v, positions, bound: int) -> None:
    """Forward and backward of ``attend`` keep every tensor within ``bound`` elements, and their gradients (of
    q, k, v and the scheme's parameters; float32) equal the tiled path's (the module flag ``flag`` off)."""
    from test_newer_schemes import LargestTensor

    inputs = (q, k, v, *scheme.parameters())
    recorder = LargestTensor()
    with recorder:
        out = attend(q, k, v, scheme, positions, positions, causal=True)
        grads = torch.autograd.grad(out.square().sum(), inputs)
    assert recorder.largest <= bound, f"a tensor of {recorder.largest} elements, bound {bound}"
    reference = torch.autograd.grad(
        tiled(monkeypatch, flag, q, k, v, scheme, positions, positions, causal=True).square().sum(), inputs)
    for a, b in zip(grads, reference):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * max(1.0, b.abs().max().item()))


def assert_float32_close_to_float64(out, grads, exact_out, exact_grads) -> None:
    """A float32 call's output and gradients against the float64 call's (tolerances of the fused paths' tests)."""
    torch.testing.assert_close(out.double(), exact_out.detach(), rtol=0, atol=2e-5)
    for a, b in zip(grads, exact_grads):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=2e-4 * max(1.0, b.abs().max().item()))
