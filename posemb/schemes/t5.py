"""T5's learned scalar bias per log-spaced distance bucket (Raffel et al. 2020, JMLR 21(140))."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from posemb._validation import check_bool, check_heads, check_int, check_table_rows
from posemb.functional.buckets import t5_relative_bucket
from posemb.functional.relative import key_minus_query
from posemb.registry import register
from posemb.schemes.base import PositionalScheme


@register("t5")
class T5Bias(PositionalScheme):
    """``s_ij += b_h[bucket(j - i)]``: one learned scalar per (bucket, head), shared by all layers
    (as in T5, where layer 0 owns it).

    Args:
        num_heads: attention heads.
        causal: causal buckets (future keys collapse to bucket 0) or bidirectional ones.
        num_buckets: number of buckets (>= 2; >= 4 when bidirectional).
        max_distance: distances beyond it share the last bucket.
    """

    site = "bias"
    family = "relative"

    def __init__(self, num_heads: int, causal: bool = True, num_buckets: int = 32, max_distance: int = 128) -> None:
        super().__init__()
        self.num_heads = check_heads("num_heads", num_heads)
        self.num_buckets = check_table_rows("num_buckets", num_buckets, minimum=2)
        self.max_distance = check_int("max_distance", max_distance, minimum=1)
        self.causal = check_bool("causal", causal)
        if not self.causal and num_buckets < 4:
            raise ValueError(f"num_buckets must be >= 4 for a bidirectional T5 bias, got {num_buckets}")
        self.bias = nn.Embedding(num_buckets, num_heads)
        nn.init.zeros_(self.bias.weight)

    def buckets(self, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        return t5_relative_bucket(key_minus_query(q_positions, k_positions), bidirectional=not self.causal,
                                  num_buckets=self.num_buckets, max_distance=self.max_distance)

    def score_bias(self, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        return self.bias(self.buckets(q_positions, k_positions)).permute(0, 3, 1, 2)

    # ---- fast-path hooks (used by ``posemb.kernels.flex``; ``score_bias`` stays the reference) ----
    def distance_bias(self, distance: Tensor) -> Tensor:
        """``b_h[bucket(d)]`` for integer key-minus-query distances ``distance`` (n,): (heads, n),
        differentiable in the bias table. Attention reads it through a Toeplitz view instead of
        building an (L, L) tensor."""
        buckets = t5_relative_bucket(distance.to(self.bias.weight.device), bidirectional=not self.causal,
                                     num_buckets=self.num_buckets, max_distance=self.max_distance)
        return self.bias(buckets).transpose(0, 1)

    def distance_reach(self) -> int:
        """``reach = max(max_distance, num_buckets)``: every distance with ``|d| >= reach`` falls in
        the bucket of ``sign(d) reach`` (the log buckets end at ``max_distance``; the exact ones, when
        ``max_distance`` is below them, at ``num_buckets - 1``). The Toeplitz backward then resolves
        the table's gradient only within ``reach`` of the diagonal (``posemb.kernels.flex``)."""
        return max(self.max_distance, self.num_buckets)

    def score_mod(self, q_positions: Tensor, k_positions: Tensor):
        """A FlexAttention ``score_mod(score, b, h, q_idx, kv_idx)`` adding ``b_h[bucket(p_kv - p_q)]``.

        Buckets saturate by ``reach = max(max_distance, num_buckets)`` (``bucket(d) ==
        bucket(sign(d) reach)`` beyond it), so the bucket of every distance comes from a
        (2 reach + 1,) lookup table; the learned table is captured, so gradients reach it where
        FlexAttention has a backward."""
        reach = self.distance_reach()
        lookup = t5_relative_bucket(torch.arange(-reach, reach + 1, device=self.bias.weight.device),
                                    bidirectional=not self.causal, num_buckets=self.num_buckets,
                                    max_distance=self.max_distance)
        table = self.bias.weight

        def t5_bias(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            distance = (k_positions[b, kv_idx] - q_positions[b, q_idx]).clamp(-reach, reach)
            return score + table[lookup[distance + reach], h].to(score.dtype)

        return t5_bias

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, num_buckets={self.num_buckets}, max_distance={self.max_distance}, causal={self.causal}"
