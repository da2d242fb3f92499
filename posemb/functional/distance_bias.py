"""Biases that depend on the positions only through the distance ``d = j - i`` (key minus query):
Kerple's kernels, Sandwich's sinusoid dot product, and the dense reference shared by every such
scheme (T5 and ALiBi aside, which predate it).

A distance-only bias is a function ``b_h(d)`` evaluated on integer distances of any shape,
returning ``(heads, *distance.shape)``. Attention normally reads it through a Toeplitz view of a
(heads, Lq + Lk - 1) table (``posemb.kernels.flex.toeplitz_bias_attention``); the dense reference
:func:`bias_from_distances` evaluates it once per distinct distance and gathers, so even the
reference never forms an (Lq, Lk, width) tensor (Sandwich's cosines, a bias MLP's hidden layer).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from posemb._validation import check_choice, check_even, check_float, check_int, check_tensor
from posemb.functional.relative import distance_bounds, key_minus_query

KERPLE_KERNELS = ("log", "power")
# Sandwich's cosines are summed this many (distance, frequency) pairs at a time, so its float64
# temporaries stay a few MiB whatever the table length and width.
_SANDWICH_CHUNK_ELEMENTS = 1 << 20


def bias_from_distances(distance_bias: Callable[[Tensor], Tensor], q_positions: Tensor,
                        k_positions: Tensor) -> Tensor:
    """Dense (batch, heads, Lq, Lk) bias ``b_h(k_pos - q_pos)`` of a distance-only scheme.

    ``distance_bias`` maps integer distances (n,) to (heads, n). It runs once on the distinct
    distances (the contiguous range between the extreme ones when that is not much larger than
    the number of pairs, else ``torch.unique``), and the result is gathered into place.
    """
    distance = key_minus_query(q_positions, k_positions)
    low, high = distance_bounds(q_positions, k_positions)  # of i - j, so j - i lies in [-high, -low]
    if high - low + 1 <= 4 * distance.numel():
        values = torch.arange(-high, -low + 1, device=distance.device)
        index = distance + high
    else:  # a few far-apart sequences (offsets of 10^6 in one batch): only the distances that occur
        values, index = torch.unique(distance, return_inverse=True)
    table = distance_bias(values)
    if table.dim() != 2 or table.shape[1] != values.numel():
        raise ValueError(f"distance_bias must return (heads, {values.numel()}), got {tuple(table.shape)}")
    return table[:, index].transpose(0, 1)


def kerple_bias(distance: Tensor, r1: Tensor, r2: Tensor, kernel: str) -> Tensor:
    """Kerple's conditionally positive definite kernels (Chi et al., NeurIPS 2022, arXiv 2205.09921, §4):

    * ``"log"``:   ``b_h(d) = -r1_h log(1 + r2_h |d|)``
    * ``"power"``: ``b_h(d) = -r1_h |d|^r2_h``   (the paper needs 0 < r2 <= 2)

    Args:
        distance: integer distances, any shape.
        r1, r2: (heads,) positive parameters (checked by the caller; differentiable).
        kernel: ``"log"`` or ``"power"``.

    Returns ``(heads, *distance.shape)`` in r1's dtype.
    """
    check_choice("kernel", kernel, KERPLE_KERNELS)
    check_tensor("distance", distance, integer=True)
    magnitude = distance.abs().to(device=r1.device, dtype=r1.dtype)[None]
    view = (-1,) + (1,) * distance.dim()
    r1, r2 = r1.reshape(view), r2.reshape(view)
    if kernel == "log":
        return -r1 * torch.log1p(r2 * magnitude)
    # |d|^r2 as exp(r2 log |d|) away from d = 0, where it is 0: pow's gradient in the exponent,
    # |d|^r2 log|d|, would be 0 * -inf = NaN there.
    powered = torch.exp(r2 * torch.log(magnitude.clamp(min=1.0)))
    return -r1 * torch.where(magnitude > 0, powered, torch.zeros_like(powered))


def sandwich_bias(distance: Tensor, dim: int, num_heads: int, base: float = 10000.0, *,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Sandwich (Chi, Fan, Rudnicky & Ramadge 2023, "Dissecting Transformer Length Extrapolation via
    the Lens of Receptive Field Analysis", arXiv 2212.10356, §5), in the form of NeMo's
    ``sandwich_relative_position_embedding.py``:

        b_h(d) = (sum_{k=1}^{dim/2} cos(d * w_k) - dim / 2) * H / (8 h),   w_k = base^(-2k / dim)

    ``sum_k cos(d w_k)`` is the dot product ``p_i . p_j`` of the sinusoidal embeddings (sin and cos
    per frequency) of positions i and j; subtracting ``dim / 2`` (its value at d = 0) makes the
    bias 0 on the diagonal and negative elsewhere, and head h = 1 .. H is compressed by ``8h / H``
    (ALiBi's slope ratios). Computed in float64 from the exact integer distances.

    Returns ``(num_heads, *distance.shape)`` in ``dtype``.
    """
    check_tensor("distance", distance, integer=True)
    check_even("dim", dim)
    check_int("num_heads", num_heads, minimum=1)
    check_float("base", base, minimum=1.0, strict_minimum=True)
    device = torch.device("cpu") if distance.device.type == "mps" else distance.device
    flat = distance.reshape(-1).to(device=device, dtype=torch.float64)
    half = dim // 2
    frequencies = base ** (-2.0 * torch.arange(1, half + 1, dtype=torch.float64, device=device) / dim)
    summed = torch.empty_like(flat)
    step = max(1, _SANDWICH_CHUNK_ELEMENTS // half)
    for start in range(0, flat.numel(), step):
        piece = flat[start:start + step]
        summed[start:start + step] = torch.cos(piece[:, None] * frequencies).sum(-1)
    scales = num_heads / (8.0 * torch.arange(1, num_heads + 1, dtype=torch.float64, device=device))
    bias = (summed - half)[None, :] * scales[:, None]
    return bias.reshape(num_heads, *distance.shape).to(device=distance.device, dtype=dtype)


def signed_log_distance(distance: Tensor) -> Tensor:
    """``sign(x) log(1 + |x|)``: the log-spaced coordinates of Swin Transformer V2's continuous
    position bias (Liu et al. 2022, arXiv 2111.09883, eq. 4, without its base-8 normalisation) and
    of x-transformers' ``DynamicPositionBias(log_distance=True)``."""
    return torch.sign(distance) * torch.log1p(distance.abs())


def inverse_softplus(value: float) -> float:
    """``x`` with ``softplus(x) = log(1 + e^x) = value`` (value > 0): ``value + log(1 - e^-value)``."""
    check_float("value", value, minimum=0.0, strict_minimum=True)
    return value + math.log(-math.expm1(-value))
