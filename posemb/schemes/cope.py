"""CoPE: contextual position encoding (Golovneva, Wang, Weston & Sukhbaatar 2024, arXiv 2405.18719;
reference code facebookresearch/RAM ``projects/cope``; x-transformers ``CoPE``)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from posemb._validation import check_bool, check_heads, check_table_rows, check_width
from posemb.functional.contextual import cope_positions, interpolate_position_logits
from posemb.registry import register
from posemb.schemes.base import PositionalScheme


@register("cope")
class CoPE(PositionalScheme):
    """Positions counted by the content: gates ``g_ij = sigmoid(q_i . k_j / sqrt(d))``, the position
    of key j seen from query i is ``p_ij = min(sum_{t = j .. i} g_it, npos - 1)``, and the logits
    get ``q_i . e[p_ij]`` with the learned embedding ``e`` interpolated between ``floor(p)`` and
    ``ceil(p)`` (CoPE, §3, eqs. 3-5):

        s_ij = q_i . k_j / sqrt(d) + (1 - w) q_i . e[floor p_ij] + w q_i . e[ceil p_ij],   w = p_ij - floor p_ij

    as in the paper's code, the position term is added after the 1/sqrt(d) scaling. A gate near 1
    counts a token, near 0 skips it, so a head can count words or sentences instead of tokens.
    No positions are read (shifting them changes nothing); causal only, as in the paper.

    The gate sums run over every key from j to the query, so the hooks see whole rows of keys
    (``content_whole_rows``), in blocks of query rows; ``q_i . e[k]`` is an (Lq, npos) table that
    a gather interpolates, never an (Lq, Lk, d) tensor. On CPU the attention runs these blocks on the
    fused kernel with a hand-written backward (:meth:`cope_parameters`, ``posemb.model.cope_attention``);
    the hooks below are its reference. Decoding recomputes a query's gates from the
    cached keys: they depend on the query, so there is no running sum to carry. Each layer owns
    its embedding ``e`` (npos, head_dim), shared by the heads and zero at initialisation, as in the
    paper's code.

    Args:
        head_dim: width of one head.
        num_heads: attention heads (the embedding is shared by them).
        causal: must be True.
        npos: number of integer positions (>= 1); gate sums are clipped at ``npos - 1``.
    """

    site = "content"
    family = "relative"
    per_layer = True
    content_whole_rows = True
    content_block_indices = True

    def __init__(self, head_dim: int, num_heads: int = 1, causal: bool = True, npos: int = 64) -> None:
        super().__init__()
        self.head_dim = check_width("head_dim", head_dim)
        self.num_heads = check_heads("num_heads", num_heads)
        if not check_bool("causal", causal):
            raise ValueError("cope is defined for causal attention only (its gates are summed from each key up "
                             "to the query); got causal=False")
        self.npos = check_table_rows("npos", npos)
        self.position_embedding = nn.Parameter(torch.zeros(npos, head_dim))

    def prepare_relative(self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor) -> Any:
        return k.shape[-2] - q.shape[-2]  # query row r is key index r + offset

    def contextual_positions(self, q: Tensor, k: Tensor, offset: int, rows: tuple[int, int],
                             keys: tuple[int, int]) -> Tensor:
        """``p_ij`` (batch, heads, rows, keys) for query rows ``rows`` against keys ``keys``, which
        must reach the last key a row may see."""
        logits = (q @ k.transpose(-1, -2)) * self.logit_scale(q.shape[-1])
        query_index = torch.arange(*rows, device=q.device)[:, None] + offset
        hidden = torch.arange(*keys, device=q.device)[None, :] > query_index
        gates = torch.sigmoid(logits).masked_fill(hidden, 0.0)
        return cope_positions(gates, self.npos)

    def cope_parameters(self) -> tuple[Tensor, int] | None:
        """``(E, npos)`` for the fused path, or None for a subclass that changes how the term is computed."""
        if self._overrides_any(CoPE, (
                "prepare_relative", "relative_logits", "relative_values", "contextual_positions")):
            return None
        return self.position_embedding, self.npos

    def relative_logits(self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor, *,
                        state: Any = None, rows: tuple[int, int] = None, keys: tuple[int, int] = None) -> Tensor:
        if state is None or rows is None or keys is None:
            raise ValueError("cope's relative_logits needs state= from prepare_relative and the block's rows= "
                             "and keys= index ranges (the attention passes them)")
        if keys[0] != 0 or keys[1] < rows[1] + state:
            raise ValueError(f"cope needs whole rows of keys (0 .. the last visible one), got keys={keys} for "
                             f"rows={rows}")
        positions = self.contextual_positions(q, k, state, rows, keys)
        per_position = q @ self.position_embedding.to(q.dtype).T                 # (B, H, rows, npos)
        term = interpolate_position_logits(per_position, positions)
        # Added to q.k before the attention's 1/sqrt(d); the paper adds it after, so undo the scale.
        return term / self.logit_scale(q.shape[-1])

    def relative_values(self, probs: Tensor, q_positions: Tensor, k_positions: Tensor, *, state: Any = None,
                        rows: tuple[int, int] = None, keys: tuple[int, int] = None) -> None:
        return None  # positions only change the logits

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, npos={self.npos}"
