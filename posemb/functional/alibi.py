"""ALiBi slopes and bias (Press et al., ICLR 2022, arXiv 2108.12409, §3)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from posemb._validation import check_int
from posemb.functional.relative import key_minus_query


def alibi_slopes(num_heads: int) -> list[float]:
    """Head slopes: the geometric sequence ``start = ratio = 2^(-8/n)`` for n a power of two.

    Otherwise (the paper's recipe, official fairseq code): the slopes of the closest smaller power
    of two ``c``, followed by every other slope of ``2c`` heads, until ``num_heads`` are filled.
    """
    check_int("num_heads", num_heads, minimum=1)

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][: num_heads - closest]


def alibi_bias(slopes: Tensor, q_positions: Tensor, k_positions: Tensor, *, causal: bool = True) -> Tensor:
    """Bias ``-m_h * |i - j|`` of shape (batch, heads, Lq, Lk), in float32.

    For a causal model only keys j <= i are visible, so this equals the paper's ``m * (j - i)``;
    bidirectionally the symmetric ``-m |i - j|`` is used.
    """
    distance = key_minus_query(q_positions, k_positions).abs().to(torch.float32)
    return -slopes.to(torch.float32)[None, :, None, None] * distance[:, None]
