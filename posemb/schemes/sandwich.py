"""Sandwich: the dot product of sinusoidal position embeddings as a fixed attention bias (Chi, Fan,
Rudnicky & Ramadge 2023, arXiv 2212.10356; NeMo ``sandwich_relative_position_embedding.py``)."""
from __future__ import annotations

from torch import Tensor

from posemb._validation import check_bool, check_even, check_float, check_heads
from posemb.functional.distance_bias import bias_from_distances, sandwich_bias
from posemb.kernels.flex import distance_score_mod
from posemb.registry import register
from posemb.schemes.base import PositionalScheme


@register("sandwich")
class Sandwich(PositionalScheme):
    """``s_ij += (p_i . p_j - d/2) H / (8h)`` for head h = 1 .. H, with ``p`` the sinusoidal
    embedding of width d (:func:`posemb.functional.distance_bias.sandwich_bias`). No parameters.

    The bias depends only on ``j - i`` (``p_i . p_j = sum_k cos((i - j) w_k)``), so attention reads
    it through the Toeplitz fast path.

    Args:
        num_heads: attention heads.
        dim: the model width, the default sinusoid width d (NeMo uses the hidden size).
        causal: causal or bidirectional; the bias is symmetric either way.
        sandwich_dim: the sinusoid width d instead of ``dim`` (even).
        base: the sinusoid base (10000, Vaswani et al.).
    """

    site = "bias"
    family = "relative"

    def __init__(self, num_heads: int, dim: int | None = None, causal: bool = True,
                 sandwich_dim: int | None = None, base: float = 10000.0) -> None:
        super().__init__()
        self.num_heads = check_heads("num_heads", num_heads)
        self.causal = check_bool("causal", causal)
        if sandwich_dim is None and dim is None:
            raise ValueError("sandwich needs the sinusoid width: pass dim (the model width) or sandwich_dim")
        name = "dim" if sandwich_dim is None else "sandwich_dim"
        self.sandwich_dim = check_even(name, dim if sandwich_dim is None else sandwich_dim)
        self.base = check_float("base", base, minimum=1.0, strict_minimum=True)

    def distance_bias(self, distance: Tensor) -> Tensor:
        """``b_h(d)`` for integer key-minus-query distances (any shape): (heads, *shape) float32."""
        return sandwich_bias(distance, self.sandwich_dim, self.num_heads, self.base)

    def score_bias(self, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        return bias_from_distances(self.distance_bias, q_positions, k_positions)

    def score_mod(self, q_positions: Tensor, k_positions: Tensor):
        """A FlexAttention ``score_mod`` adding this bias: ``distance_bias`` once per distance in the
        positions' range, read per pair (:func:`posemb.kernels.flex.distance_score_mod`)."""
        return distance_score_mod(self.distance_bias, q_positions, k_positions)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, sandwich_dim={self.sandwich_dim}, base={self.base}"
