"""PoPE: polar coordinate position embeddings (Gopalakrishnan, Csordás, Schmidhuber & Mozer 2025,
"Decoupling the 'What' and 'Where' With Polar Coordinate Positional Embeddings", arXiv 2509.10534;
x-transformers ``PolarEmbedding`` / ``apply_polar_pos_emb``)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from posemb._validation import check_float, check_heads, check_tensor, check_width
from posemb.registry import register
from posemb.schemes.base import PositionalScheme
from posemb.schemes.rope import PositionsMemo, _shared_rows


@register("pope")
class PoPE(PositionalScheme):
    """Each of the d features of a query or key becomes a complex number with magnitude
    ``softplus(x_c)`` (content: the *what*) and phase ``p theta_c`` (position: the *where*), plus a
    learned per-head key phase bias ``delta_c`` clamped to [-2 pi, 0]:

        q~_c = softplus(q_c) e^{i s theta_c},   k~_c = softplus(k_c) e^{i (t theta_c + delta_c)}
        a_st = Re[sum_c q~_c conj(k~_c)] / sqrt(d) = sum_c softplus(q_c) softplus(k_c) cos((s - t) theta_c - delta_c) / sqrt(d)

    with ``theta_c = base^(-c / d)``, c = 0 .. d - 1 (one frequency per feature, not per pair).
    ``rotate`` returns the real form ``[mu cos, mu sin]`` of width 2d, so attention stays a plain
    dot product (SDPA, the KV cache), and :meth:`logit_scale` keeps the ``1/sqrt(d)`` of the
    original width rather than SDPA's ``1/sqrt(2d)`` (as x-transformers, whose scale is set by
    ``dim_head``). Angles are formed in float64 (exact up to positions ~2^53). One phase bias
    shared by all layers, as in x-transformers, zero at init.

    Args:
        head_dim: d, the width of one head.
        num_heads: attention heads (one phase bias row each).
        base: frequency base (10000).
    """

    site = "rotation"
    family = "rotary"

    def __init__(self, head_dim: int, num_heads: int, base: float = 10000.0) -> None:
        super().__init__()
        self.head_dim = check_width("head_dim", head_dim)
        self.num_heads = check_heads("num_heads", num_heads)
        self.base = check_float("base", base, minimum=1.0, strict_minimum=True)
        self.register_constant("inv_freq64", base ** (-torch.arange(head_dim, dtype=torch.float64, device="cpu")
                                                      / head_dim))
        self.phase_bias = nn.Parameter(torch.zeros(num_heads, head_dim))
        self._tables_memo = PositionsMemo()

    def key_phase_bias(self) -> Tensor:
        """``delta`` (heads, d), clamped to [-2 pi, 0] (x-transformers' clamp)."""
        return self.phase_bias.clamp(-2.0 * math.pi, 0.0)

    def _cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin of ``p theta_c`` as (batch, 1, seq, d) float64 (float64 on the CPU for MPS);
        (1, 1, seq, d) when the rows of ``positions`` are one row expanded."""
        positions = _shared_rows(positions)
        device = torch.device("cpu") if positions.device.type == "mps" else positions.device
        angles = positions.to(device=device, dtype=torch.float64)[:, None, :, None] * self.constant("inv_freq64", device)
        return angles.cos(), angles.sin()

    def _position_tables(self, q: Tensor, q_positions: Tensor, k_positions: Tensor) -> tuple[Tensor, ...]:
        """``(cos_q, sin_q, cos_k, sin_k)`` in the working dtype on q's device, made once per forward:
        every layer receives the same positions object and shares this instance (PositionsMemo)."""
        work = torch.float64 if q.dtype == torch.float64 else torch.float32  # softplus of bf16 loses the magnitude

        def compute() -> tuple[Tensor, ...]:
            cos_q, sin_q = (t.to(device=q.device, dtype=work) for t in self._cos_sin(q_positions))
            if k_positions is q_positions:
                return cos_q, sin_q, cos_q, sin_q
            cos_k, sin_k = (t.to(device=q.device, dtype=work) for t in self._cos_sin(k_positions))
            return cos_q, sin_q, cos_k, sin_k

        return self._tables_memo.get((q_positions, k_positions), (work, q.device), compute)

    def _apply(self, fn, recurse: bool = True):
        result = super()._apply(fn, recurse)
        self._tables_memo.clear()
        return result

    def rotate(self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor) -> tuple[Tensor, Tensor]:
        for name, x in (("q", q), ("k", k)):
            check_tensor(name, x, ndim=4, floating=True)
            if x.shape[-1] != self.head_dim or x.shape[1] != self.num_heads:
                raise ValueError(f"{name} must be (batch, heads={self.num_heads}, seq, head_dim={self.head_dim}), "
                                 f"got {tuple(x.shape)}")
        work = torch.float64 if q.dtype == torch.float64 else torch.float32  # softplus of bf16 loses the magnitude
        cos_q, sin_q, cos_k, sin_k = self._position_tables(q, q_positions, k_positions)
        delta = self.key_phase_bias().to(device=k.device, dtype=work)[None, :, None, :]
        cos_d, sin_d = delta.cos(), delta.sin()
        # cos(t theta + delta), sin(t theta + delta) by the angle-addition formulas: the float64
        # position angle stays exact and delta keeps its gradient. (1 or batch, heads, seq, d): small.
        cos_kd, sin_kd = cos_k * cos_d - sin_k * sin_d, sin_k * cos_d + cos_k * sin_d
        if torch.compiler.is_compiling():
            return (_polar_reference(q, cos_q, sin_q, work), _polar_reference(k, cos_kd, sin_kd, work))
        return _Polar.apply(q, cos_q, sin_q, work), _Polar.apply(k, cos_kd, sin_kd, work)

    def logit_scale(self, head_dim: int) -> float:
        """``1/sqrt(d)`` for the rotated width ``head_dim = 2d``."""
        return (head_dim / 2) ** -0.5

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, num_heads={self.num_heads}, base={self.base}"


def _polar_reference(x: Tensor, cos: Tensor, sin: Tensor, work: torch.dtype) -> Tensor:
    """``[softplus(x) cos, softplus(x) sin]`` (width 2d) in plain autograd, rounded to x's dtype."""
    magnitude = F.softplus(x.to(work))
    return torch.cat([magnitude * cos, magnitude * sin], dim=-1).to(x.dtype)


class _Polar(torch.autograd.Function):
    """:func:`_polar_reference` with a backward that saves only ``x`` and the (small, broadcast)
    tables: plain autograd keeps ``softplus(x)`` (and, for bf16, its float32 copy) for every layer,
    which made PoPE's training step at 4096 tokens 1.7-1.8x NoPE's peak memory. Backward, with
    ``m = softplus(x)``, ``m' = sigmoid(x)`` and the output gradient ``[g1, g2]``:
    ``dx = (g1 cos + g2 sin) m'``, ``dcos = sum g1 m``, ``dsin = sum g2 m`` (summed over the
    dimensions the tables broadcast over)."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor, work: torch.dtype) -> Tensor:
        magnitude = F.softplus(x.to(work))
        d = x.shape[-1]
        out = torch.empty(*x.shape[:-1], 2 * d, dtype=work, device=x.device)
        torch.mul(magnitude, cos, out=out[..., :d])
        torch.mul(magnitude, sin, out=out[..., d:])
        ctx.save_for_backward(x, cos, sin)
        ctx.work = work
        return out if out.dtype == x.dtype else out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, cos, sin = ctx.saved_tensors
        work, d = ctx.work, x.shape[-1]
        x_work = x.to(work)
        g1, g2 = grad[..., :d].to(work), grad[..., d:].to(work)
        grad_x = grad_cos = grad_sin = None
        if ctx.needs_input_grad[0]:
            grad_x = (g1 * cos).addcmul_(g2, sin).mul_(torch.sigmoid(x_work)).to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            magnitude = F.softplus(x_work)
            grad_cos = _sum_to(g1 * magnitude, cos.shape) if ctx.needs_input_grad[1] else None
            grad_sin = _sum_to(g2 * magnitude, sin.shape) if ctx.needs_input_grad[2] else None
        return grad_x, grad_cos, grad_sin, None


def _sum_to(x: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``x`` over the dimensions where ``shape`` is 1 (undo a broadcast)."""
    dims = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape)) if b == 1 and a != 1)
    return x.sum(dim=dims, keepdim=True) if dims else x
