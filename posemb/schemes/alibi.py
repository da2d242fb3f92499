"""ALiBi: a per-head linear distance penalty on the logits (Press et al., ICLR 2022)."""
from __future__ import annotations

import torch
from torch import Tensor

from posemb._validation import check_int
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
        self.num_heads = check_int("num_heads", num_heads, minimum=1)
        self.causal = bool(causal)
        self.register_buffer("slopes", torch.tensor(alibi_slopes(num_heads), dtype=torch.float32), persistent=False)

    def score_bias(self, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        return alibi_bias(self.slopes, q_positions, k_positions, causal=self.causal)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"
