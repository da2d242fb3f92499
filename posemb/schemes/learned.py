"""Learned absolute position table (Gehring et al. 2017; GPT-2, BERT): an (N_max x d) embedding."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from posemb._validation import check_table_rows, check_tensor, check_width
from posemb.registry import register
from posemb.schemes.base import PositionalScheme
from posemb.schemes.rope import _shared_rows


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
        rows = _shared_rows(positions)
        # one host sync (both bounds together), the price of never indexing out of range
        lowest, highest = torch.stack(torch.aminmax(rows)).tolist()
        if highest >= self.max_positions or lowest < 0:
            raise PositionOutOfRange(
                f"positions must lie in [0, max_positions={self.max_positions}) for the learned table "
                f"(N_max = {self.max_positions}), got positions in [{lowest}, {highest}]")
        # F.embedding is table[rows] with a dense scatter-add backward (the advanced-indexing
        # backward, index_put_ with accumulate, measured several times slower on CPU); expanded rows
        # look up one row and broadcast, so the backward sums over the batch instead of scattering it.
        return x + F.embedding(rows.long(), self.table).to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_positions={self.max_positions}"
