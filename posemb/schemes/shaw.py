"""Shaw, Uszkoreit & Vaswani 2018, "Self-Attention with Relative Position Representations"
(arXiv 1803.02155, §3).

    e_ij = q_i . (k_j + a^K_ij) / sqrt(d),   alpha = softmax_j(e),   z_i = sum_j alpha_ij (v_j + a^V_ij)
    a^K_ij = w^K[clip(j - i, k)],  a^V_ij = w^V[clip(j - i, k)],  clip(x, k) = max(-k, min(k, x))

with learned ``w^K, w^V`` of shape (2k+1, head_dim). Computed without the (Lq, Lk, head_dim)
tensors a^K, a^V (the paper's §3.3 and Music Transformer's point): ``q @ w^K^T`` gives an
(Lq, 2k+1) table that a gather moves to (Lq, Lk); the value term sums the probabilities of each
clipped distance into (Lq, 2k+1) with a scatter_add and multiplies by ``w^V``.

Blocks whose distances all clip to the same row (|j - i| >= k for every pair: most of a long
causal sequence, away from the diagonal) skip the index altogether: their logits are one column
``q_i . w^K[row]`` broadcast over the keys, and their value term is ``(sum_j alpha_ij) w^V[row]``.
Without autograd the value term of the other blocks is cut the same way into runs of keys
(``shared_row_pieces``), so the scatter only touches keys within about k of the diagonal.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from posemb._validation import check_bool, check_heads, check_table_rows, check_width
from posemb.functional.relative import (clipped_index, distance_bounds, gather_relative, key_minus_query,
                                        scatter_relative, shared_row_pieces)
from posemb.registry import register
from posemb.schemes.base import FarTerms, PositionalScheme


# Blocks of at least this many (query, key) pairs per head cut their value term into runs of keys;
# below it (decoding: one query) one scatter is cheaper than the bound checks of the cutting.
_PIECES_FROM = 1 << 14
# Runs of keys near the diagonal are cut down to about this many keys (or the block's query count).
_PIECE_KEYS = 64


@register("shaw")
class ShawRelative(PositionalScheme):
    """Learned key and value vectors per clipped relative distance ``clip(j - i, k)``.

    Each layer owns its tables (``per_layer = True``, as in the paper). By default one table is
    shared by the heads of a layer, as the paper does ("sharing them across each head", §3.3);
    ``per_head=True`` gives every head its own (an (H, 2k+1, d) table).

    Parameters per layer: ``2 * (2k + 1) * head_dim`` (times ``num_heads`` with ``per_head``);
    with the default k = 16 and head_dim 64 that is 4,224.

    Args:
        head_dim: dimension of one head (d_z = d_a in the paper).
        num_heads: attention heads; only used with ``per_head=True``.
        max_relative_position: the clip distance k >= 0 (paper's base model: 16). k = 0 makes
            every distance share one vector: a^K then cancels in the softmax and the model is
            position-blind (the paper's Table 2 row k = 0).
        per_head: a separate table per head instead of one per layer.
    """

    site = "content"
    family = "relative"
    per_layer = True

    def __init__(self, head_dim: int, num_heads: int = 1, max_relative_position: int = 16,
                 per_head: bool = False) -> None:
        super().__init__()
        self.head_dim = check_width("head_dim", head_dim)
        self.num_heads = check_heads("num_heads", num_heads)
        # 2k + 1 rows per table
        self.max_relative_position = check_table_rows("max_relative_position", max_relative_position, minimum=0,
                                                      rows_per_unit=2)
        self.per_head = check_bool("per_head", per_head)
        tables = num_heads if per_head else 1
        rows = 2 * max_relative_position + 1
        # Leading axis broadcasts over heads: 1 (shared) or H (per head).
        self.key_table = nn.Parameter(torch.randn(tables, rows, head_dim) * 0.02)
        self.value_table = nn.Parameter(torch.randn(tables, rows, head_dim) * 0.02)

    @property
    def num_rows(self) -> int:
        return 2 * self.max_relative_position + 1

    def distance_index(self, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        """(batch, Lq, Lk) row of ``clip(j - i, k)`` in the tables, in ``[0, 2k]``."""
        return clipped_index(key_minus_query(q_positions, k_positions), self.max_relative_position)

    def _check_heads(self, tensor: Tensor) -> None:
        if self.per_head and tensor.shape[1] != self.num_heads:
            raise ValueError(f"per-head Shaw tables were built for num_heads={self.num_heads}, "
                             f"got a tensor with {tensor.shape[1]} heads (shape {tuple(tensor.shape)})")

    def row_range(self, low: int, high: int) -> tuple[int, int]:
        """Table rows of the query-minus-key distances ``high`` and ``low`` (Shaw's distance is
        ``j - i``): every distance in between reads a row in this range."""
        kk = self.max_relative_position
        return max(-kk, min(kk, -high)) + kk, max(-kk, min(kk, -low)) + kk

    def shared_row(self, q_positions: Tensor, k_positions: Tensor) -> int | None:
        """The table row of every (query, key) pair when they all clip to one, else None."""
        first, last = self.row_range(*distance_bounds(q_positions, k_positions))
        return first if first == last else None

    def relative_logits(self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor,
                        *, state: object = None) -> Tensor:
        """``q_i . w^K[clip(j - i, k)]`` as (batch, heads, Lq, Lk), or (batch, heads, Lq, 1) when
        every pair of the block shares one row."""
        self._check_heads(q)
        key_table = self.key_table.to(q.dtype)
        row = self.shared_row(q_positions, k_positions)
        if row is not None:
            return q @ key_table[:, row, :, None]                          # (B, H, Lq, 1)
        per_distance = q @ key_table.transpose(-1, -2)                     # (B, H, Lq, 2k+1)
        return gather_relative(per_distance, self.distance_index(q_positions, k_positions))

    def relative_values(self, probs: Tensor, q_positions: Tensor, k_positions: Tensor,
                        *, state: object = None) -> Tensor:
        """``sum_j alpha_ij w^V[clip(j - i, k)]`` as (batch, heads, Lq, head_dim) (linear in alpha)."""
        self._check_heads(probs)
        value_table = self.value_table.to(probs.dtype)
        row = self.shared_row(q_positions, k_positions)
        if row is not None:
            return probs.sum(-1, keepdim=True) * value_table[:, row, None, :]
        if (torch.is_grad_enabled() and (probs.requires_grad or value_table.requires_grad)) \
                or probs.shape[-2] * probs.shape[-1] < _PIECES_FROM:
            per_distance = scatter_relative(probs, self.distance_index(q_positions, k_positions), self.num_rows)
            return per_distance @ value_table
        # A large block without autograd: scatter only the keys near the diagonal (scatter_add is slow
        # per element); runs of keys that all clip to one row just add their probabilities' sum to it.
        per_distance = probs.new_zeros(*probs.shape[:3], self.num_rows)
        pieces = shared_row_pieces(q_positions, k_positions, self.row_range, max(_PIECE_KEYS, probs.shape[-2]))
        for start, stop, first, last in pieces:
            piece = probs[..., start:stop]
            if first == last:
                per_distance[..., first] += piece.sum(-1)
            else:
                index = self.distance_index(q_positions, k_positions[:, start:stop])
                per_distance.scatter_add_(-1, index[:, None].expand(piece.shape), piece)
        return per_distance @ value_table

    def far_reach(self) -> int | None:
        """Causal pairs with ``i - j >= k`` all clip to row 0 (distance ``-k``); None for k = 0 (every
        pair reads that row: nothing is near)."""
        return self.max_relative_position or None

    def far_terms(self, q: Tensor, k: Tensor, *, state: object = None) -> FarTerms:
        """Row 0 of the tables: logits ``q_i . w^K[0]`` (a column), values ``w^V[0]``."""
        self._check_heads(q)
        return FarTerms(q @ self.key_table.to(q.dtype)[:, 0, :, None], None,
                        self.value_table.to(q.dtype)[:, None, 0, :])

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, max_relative_position={self.max_relative_position}, "
                f"per_head={self.per_head}" + (f", num_heads={self.num_heads}" if self.per_head else ""))
