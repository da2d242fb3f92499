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
        magnitude_q = F.softplus(q.to(work))
        magnitude_k = F.softplus(k.to(work))
        q_out = torch.cat([magnitude_q * cos_q, magnitude_q * sin_q], dim=-1)
        # cos(t theta + delta), sin(t theta + delta) by the angle-addition formulas: the float64
        # position angle stays exact and delta keeps its gradient.
        k_out = torch.cat([magnitude_k * (cos_k * cos_d - sin_k * sin_d),
                           magnitude_k * (sin_k * cos_d + cos_k * sin_d)], dim=-1)
        return q_out.to(q.dtype), k_out.to(k.dtype)

    def logit_scale(self, head_dim: int) -> float:
        """``1/sqrt(d)`` for the rotated width ``head_dim = 2d``."""
        return (head_dim / 2) ** -0.5

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, num_heads={self.num_heads}, base={self.base}"
