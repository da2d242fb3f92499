"""Learned absolute position table (Gehring et al. 2017; GPT-2, BERT): an (N_max x d) embedding."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from posemb._validation import check_table_rows, check_tensor, check_width
from posemb.registry import register
from posemb.schemes.base import PositionalScheme


class PositionOutOfRange(ValueError):
    """A position at or beyond the learned table's ``max_positions`` (N_max). Never clamped."""


@register("learned")
class Learned(PositionalScheme):
    """``x_i + P[i]`` with a learned table ``P`` of ``max_positions`` rows.

    Positions ``>= max_positions`` raise :class:`PositionOutOfRange` (a ``ValueError``): the table
    has no row for them, and silently clamping would give a wrong result.

    Args:
        dim: model width.
        max_positions: N_max, the number of rows.
    """

    site = "input"
    family = "absolute"

    def __init__(self, dim: int, max_positions: int = 1024) -> None:
        super().__init__()
        self.dim = check_width("dim", dim)
        self.max_positions = check_table_rows("max_positions", max_positions)
        self.table = nn.Parameter(torch.randn(max_positions, dim) * 0.02)

    def embed_input(self, x: Tensor, positions: Tensor) -> Tensor:
        check_tensor("positions", positions, ndim=2, integer=True)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x's last dimension must be dim={self.dim}, got shape {tuple(x.shape)}")
        highest = int(positions.max())  # one host sync, the price of never indexing out of range
        if highest >= self.max_positions or int(positions.min()) < 0:
            raise PositionOutOfRange(
                f"positions must lie in [0, max_positions={self.max_positions}) for the learned table "
                f"(N_max = {self.max_positions}), got positions up to {highest}")
        return x + self.table[positions].to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_positions={self.max_positions}"
