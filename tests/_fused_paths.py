"""Helpers shared by the tests of the fused content paths (FIRE, CoPE, Transformer-XL): the tiled reference,
a spy that the fused path really ran, and the double-backward check of ``_CONTENT_PATH = "autograd"``."""
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
