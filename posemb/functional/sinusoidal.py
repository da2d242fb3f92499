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
    angles = _angles(positions, dim, base)
    table = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)
    return table.to(dtype)


def sinusoid_concat(positions: Tensor, dim: int, base: float = 10000.0, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Transformer-XL's ordering: ``[sin(pos * inv_freq), cos(pos * inv_freq)]`` concatenated
    (``kimiyoung/transformer-xl`` ``PositionalEmbedding``), ``inv_freq_i = base^(-2i/dim)``.
    Positions may be negative. Returns ``positions.shape + (dim,)`` in ``dtype``.

    sin and cos of the float64 angles are written straight into the ``dtype`` table (rounded once,
    as a cast would), so the only float64 temporary is the angles, half a table in size.
    """
    angles = _angles(positions, dim, base)
    table = torch.empty(*angles.shape[:-1], dim, dtype=dtype, device=positions.device)
    torch.sin(angles, out=table[..., :dim // 2])
    torch.cos(angles, out=table[..., dim // 2:])
    return table


def _angles(positions: Tensor, dim: int, base: float) -> Tensor:
    """float64 ``positions * base^(-2i/dim)``, shape ``positions.shape + (dim // 2,)``."""
    check_even("dim", dim)
    check_float("base", base, minimum=1.0, strict_minimum=True)
    check_tensor("positions", positions, integer=True)
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    return positions.to(torch.float64)[..., None] * inv_freq
