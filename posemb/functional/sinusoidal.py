"""Sinusoidal position encodings (Vaswani et al. 2017, arXiv 1706.03762, §3.5)."""
from __future__ import annotations

import torch
from torch import Tensor

from posemb._validation import check_even, check_float, check_tensor


def sinusoidal_table(positions: Tensor, dim: int, base: float = 10000.0, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """``PE(pos, 2i) = sin(pos / base^(2i/dim))``, ``PE(pos, 2i+1) = cos(pos / base^(2i/dim))``.

    The paper's interleaved order. Angles are formed in float64 (positions are exact integers
    there up to 2^53) so large positions keep full precision; the result is cast to ``dtype``.
    Returns ``positions.shape + (dim,)``.
    """
    check_even("dim", dim)
    check_float("base", base, minimum=1.0, strict_minimum=True)
    check_tensor("positions", positions)
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    angles = positions.to(torch.float64)[..., None] * inv_freq
    table = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)
    return table.to(dtype)


def sinusoid_concat(positions: Tensor, dim: int, base: float = 10000.0, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Transformer-XL's ordering: ``[sin(pos * inv_freq), cos(pos * inv_freq)]`` concatenated
    (``kimiyoung/transformer-xl`` ``PositionalEmbedding``). Positions may be negative."""
    check_even("dim", dim)
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    angles = positions.to(torch.float64)[..., None] * inv_freq
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype)
