"""Transformer-XL's relative attention (Dai et al. 2019, arXiv 1901.02860, §3.3 and App. B).

    A^rel_ij = q_i . k_j            (a) content
             + q_i . W_R R_{i-j}    (b) content-dependent positional bias
             + u . k_j              (c) global content bias
             + v . W_R R_{i-j}      (d) global positional bias

``R`` is the fixed sinusoid ``[sin(d * inv_freq), cos(d * inv_freq)]`` of the distance
``d = i - j`` (model width, concatenated order as in the official ``PositionalEmbedding``),
``W_R`` a learned projection separate from the key projection, ``u, v`` learned per head. As in
the official code, (b) + (d) is computed as ``(q_i + v) . W_R R_{i-j}`` and the whole sum is scaled
by 1/sqrt(head_dim).

Efficient form (App. B): ``W_R R`` is computed only for the distinct distances present
(O((Lq + Lk) * dim) work), ``(q + v)`` is scored against them, and a gather places each score at
its (i, j). The distances come from the position tensors, so decoding with a KV cache and position
offsets need no special case, and both signs of ``i - j`` (bidirectional attention) are handled.

Per attention call (``prepare_relative``): one check whether the positions are consecutive, and a
:class:`~posemb.functional.relative.DistanceTable` that embeds ``W_R R`` for the distance range of a
block and keeps it for the next block with the same range (the attention visits them in a row), so
the projection runs about once per distinct range, not once per block. With consecutive positions
the per-distance scores are placed by a strided view (``toeplitz_scores``: no index, no gather);
otherwise by a gather with an index ``high - (i - j)``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from posemb._validation import check_even, check_float, check_heads, check_width, resolve_head_dim
from posemb.functional.relative import (DistanceTable, consecutive_offset, distance_bounds, distinct_distances,
                                        gather_relative, query_minus_key, toeplitz_scores)
from posemb.functional.sinusoidal import sinusoid_concat
from posemb.registry import register
from posemb.schemes.base import PositionalScheme, RelativeKeyTerms


@register("transformer_xl")
class TransformerXLRelative(PositionalScheme):
    """Sinusoidal relative embeddings ``R_{i-j}`` with projection ``W_R`` and the biases u, v.

    Each layer owns ``W_R``, ``u`` and ``v`` (``per_layer = True``). The official code shares u
    and v across layers unless ``untie_r`` is set; owning them per layer is its ``untie_r=True``.

    Parameters per layer: ``dim * num_heads * head_dim + 2 * num_heads * head_dim`` (for
    dim = 512, 8 heads of 64: 270,336).

    Args:
        dim: model width, the width of the sinusoid ``R`` (even).
        num_heads: attention heads.
        head_dim: per-head width; default ``dim // num_heads`` (then ``dim`` must divide evenly).
        base: the sinusoid's base (10000 in the paper).
    """

    site = "content"
    family = "relative"
    per_layer = True

    def __init__(self, dim: int, num_heads: int, head_dim: int | None = None, base: float = 10000.0) -> None:
        super().__init__()
        self.dim = check_even("dim", check_width("dim", dim))
        self.num_heads = check_heads("num_heads", num_heads)
        self.head_dim = head_dim = resolve_head_dim(dim, num_heads, head_dim)
        self.base = check_float("base", base, minimum=1.0, strict_minimum=True)
        self.r_proj = nn.Linear(dim, num_heads * head_dim, bias=False)  # W_{k,R}
        # std 0.02 like the official code's init_std.
        self.content_bias = nn.Parameter(torch.randn(num_heads, head_dim) * 0.02)   # u
        self.position_bias = nn.Parameter(torch.randn(num_heads, head_dim) * 0.02)  # v

    def relative_embeddings(self, distances: Tensor) -> Tensor:
        """``W_R R_d`` for a 1-D tensor of distances: (num_heads, len(distances), head_dim)."""
        table = sinusoid_concat(distances, self.dim, self.base, dtype=self.r_proj.weight.dtype)
        projected = self.r_proj(table)
        return projected.view(-1, self.num_heads, self.head_dim).transpose(0, 1)

    def prepare_relative(self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor) -> "_CallState":
        """Once per attention call: whether the positions are consecutive, and an empty table cache."""
        if q.shape[1] != self.num_heads:
            raise ValueError(f"Transformer-XL was built for num_heads={self.num_heads}, got q of shape {tuple(q.shape)}")
        dtype = q.dtype
        table = DistanceTable(lambda distances: self.relative_embeddings(distances).to(dtype), q.device,
                              chunk=_TABLE_CHUNK)
        return _CallState(consecutive_offset(q_positions, k_positions) is not None, table)

    def relative_logits(self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor,
                        *, state: "_CallState | None" = None) -> tuple[Tensor, Tensor]:
        """Terms (b) + (d), (batch, heads, Lq, Lk) (with consecutive positions a strided view of the
        per-distance scores), and term (c), (batch, heads, 1, Lk): a tuple whose sum is the extra."""
        if state is None:  # called on its own, outside the attention's blocked loop
            state = self.prepare_relative(q, k, q_positions, k_positions)
        elif q.shape[1] != self.num_heads:
            raise ValueError(f"Transformer-XL was built for num_heads={self.num_heads}, got q of shape {tuple(q.shape)}")
        q_len, k_len = q.shape[-2], k.shape[-2]
        shifted_q = q + self.position_bias.to(q.dtype)[:, None, :]                     # q_i + v
        low, high = distance_bounds(q_positions, k_positions)                          # of i - j
        if state.consecutive:   # i - j = offset + i - j: read the scores along diagonals
            per_distance = shifted_q @ state.table.rows(low, high).transpose(-1, -2)  # (B, H, Lq, Lq+Lk-1)
            positional = toeplitz_scores(per_distance, k_len)                        # (b) + (d)
        elif high - low < q_len * k_len:   # a dense range of distances: rows high - (i - j)
            per_distance = shifted_q @ state.table.rows(low, high).transpose(-1, -2)
            positional = gather_relative(per_distance, high - query_minus_key(q_positions, k_positions))
        else:                               # positions with huge gaps: embed only the distances present
            distances, index = distinct_distances(query_minus_key(q_positions, k_positions))
            r = self.relative_embeddings(distances).to(q.dtype)                       # (H, R, d)
            positional = gather_relative(shifted_q @ r.transpose(-1, -2), index)
        content = (k @ self.content_bias.to(k.dtype)[:, :, None]).transpose(-1, -2)   # (c): (B, H, 1, Lk)
        return positional, content

    def relative_key_terms(self) -> RelativeKeyTerms | None:
        """``(W_R R_d, u, v)`` for the fused path, or None for a subclass that computes its terms another way."""
        if self._overrides_any(TransformerXLRelative, (
                "prepare_relative", "relative_logits", "relative_values", "relative_embeddings")):
            return None
        return RelativeKeyTerms(self.relative_embeddings, self.content_bias, self.position_bias)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, base={self.base}"


# Distances embedded per build step without autograd: the float64 angles of one step are
# _TABLE_CHUNK * dim / 2 values (256 KiB for dim 512), the table rows of a tile at L=4096 are ~575.
_TABLE_CHUNK = 128


class _CallState(NamedTuple):
    """What :meth:`TransformerXLRelative.prepare_relative` hands to every block of one call."""

    consecutive: bool       # positions consecutive, one offset for the batch: Toeplitz blocks
    table: DistanceTable    # W_R R_d, (H, rows, d), for the last range of distances asked for
