"""ALiBi: a per-head linear distance penalty on the logits (Press et al., ICLR 2022)."""
from __future__ import annotations

import torch
from torch import Tensor

from posemb._validation import check_bool, check_heads
from posemb.functional.alibi import alibi_bias, alibi_slopes
from posemb.registry import register
from posemb.schemes.base import PositionalScheme


@register("alibi")
class ALiBi(PositionalScheme):
    """``s_ij += -m_h |i - j|`` with the paper's fixed geometric slopes ``m_h`` (no parameters).

    Args:
        num_heads: attention heads (any count; non powers of two use the paper's recipe).
        causal: only affects documentation of the bias form; the bias is ``-m |i-j|`` either way.
    """

    site = "bias"
    family = "relative"

    def __init__(self, num_heads: int, causal: bool = True) -> None:
        super().__init__()
        self.num_heads = check_heads("num_heads", num_heads)
        self.causal = check_bool("causal", causal)
        self.register_constant("slopes", torch.tensor(alibi_slopes(num_heads), dtype=torch.float32, device="cpu"))

    def score_bias(self, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        return alibi_bias(self.constant("slopes", q_positions.device), q_positions, k_positions, causal=self.causal)

    # ---- fast-path hooks (used by ``posemb.kernels.flex``; ``score_bias`` stays the reference) ----
    def distance_bias(self, distance: Tensor) -> Tensor:
        """``-m_h |d|`` for integer key-minus-query distances ``distance`` (n,): (heads, n) float32.

        The bias depends on positions only through ``d = j - i``, so attention can read it from
        this (heads, Lq + Lk - 1) table through a Toeplitz view instead of an (L, L) tensor."""
        slopes = self.constant("slopes", distance.device)
        return -slopes[:, None] * distance.to(device=slopes.device, dtype=torch.float32).abs()[None, :]

    def score_mod(self, q_positions: Tensor, k_positions: Tensor):
        """A FlexAttention ``score_mod(score, b, h, q_idx, kv_idx)`` adding ``-m_h |p_q - p_kv|``,
        with the explicit positions (batch, seq) captured (so offsets and KV caches work)."""
        slopes = self.constant("slopes", q_positions.device)

        def alibi(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            distance = (k_positions[b, kv_idx] - q_positions[b, q_idx]).abs()
            return score - (slopes[h] * distance).to(score.dtype)

        return alibi

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"
