"""FIRE's normalised distance (Li et al. 2023, "Functional Interpolation for Relative Positions
Improves Long Context Transformers", arXiv 2310.04418, §3, eq. 5-6)."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from posemb._validation import check_tensor


def fire_normalized_distance(q_positions: Tensor, k_positions: Tensor, c: Tensor, threshold: Tensor,
                             eps: float = 1e-6) -> Tensor:
    """``psi(i - j) / psi(max(L, i))`` with ``psi(x) = log(c x + 1)``, shape (batch, Lq, Lk), float64.

    ``i`` is the query position, ``j`` the key position; ``c > 0`` and the threshold ``L > 0`` are
    (differentiable) scalars; ``eps`` keeps the denominator away from 0 (the public port's 1e-6).
    FIRE is causal: keys after the query (i - j < 0) get the value at distance 0; the causal mask
    hides them, and no log of a negative number reaches autograd. For every visible key the value
    lies in [0, 1] (``i - j <= i``), whatever the length: the progressive interpolation of the paper.
    """
    check_tensor("q_positions", q_positions, ndim=2, integer=True)
    check_tensor("k_positions", k_positions, ndim=2, integer=True)
    query = q_positions.to(torch.float64)[:, :, None]
    distance = (query - k_positions.to(torch.float64)[:, None, :]).clamp(min=0.0)
    c, threshold = c.to(torch.float64), threshold.to(torch.float64)
    numerator = torch.log1p(c * distance)
    denominator = torch.log1p(c * torch.maximum(query, threshold)) + eps
    return numerator / denominator


class ReluSegments(NamedTuple):
    """A one-input ReLU MLP ``f(x) = b2 + W2 relu(w1 x + b1)`` (widths 1 -> n -> heads) as the piecewise
    linear function it is: ``f(x) = slope[s] x + intercept[s]`` on segment ``s``, the number of
    ``breakpoints`` (sorted, float64) below x. Unit k's kink is at ``-b1_k / w1_k``; ``active[s, k]``
    says whether unit k is positive on segment s, so on it ``slope[s] = sum_k active W2[:, k] w1_k`` and
    ``intercept[s] = b2 + sum_k active W2[:, k] b1_k`` (units with ``w1_k = 0`` are constant: active
    on every segment when ``b1_k > 0``)."""

    breakpoints: Tensor  # (K,) float64, ascending: the kinks of the units with w1_k != 0
    slope: Tensor        # (K + 1, heads) float64
    intercept: Tensor    # (K + 1, heads) float64
    active: Tensor       # (K + 1, n) float64, 1.0 where unit k is positive on segment s


def relu_segments(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> ReluSegments:
    """:class:`ReluSegments` of ``b2 + w2 relu(w1 x + b1)``: ``w1`` (n, 1) or (n,), ``b1`` (n,),
    ``w2`` (heads, n), ``b2`` (heads,); computed in float64 without autograd (O(n^2) work)."""
    w1, b1, w2, b2 = (t.detach().to(torch.float64).reshape(shape) for t, shape in
                      ((w1, (-1,)), (b1, (-1,)), (w2, (w2.shape[0], -1)), (b2, (-1,))))
    moving = w1 != 0
    breakpoints = torch.sort(-b1[moving] / w1[moving]).values
    # One point inside each segment decides which units are positive there (the segments are open
    # intervals between kinks; points exactly on a kink are relu_kink_table's business).
    if breakpoints.numel():
        inner = (breakpoints[1:] + breakpoints[:-1]) / 2
        span = (breakpoints[-1] - breakpoints[0]).abs().clamp(min=1.0)
        points = torch.cat([breakpoints[:1] - span, inner, breakpoints[-1:] + span])
    else:
        points = breakpoints.new_zeros(1)
    active = (points[:, None] * w1 + b1 > 0).to(torch.float64)
    return ReluSegments(breakpoints, (active * w1) @ w2.T, b2 + (active * b1) @ w2.T, active)


class ReluKinkTable(NamedTuple):
    """:class:`ReluSegments` indexed for exact comparisons in one dtype, kinks included.

    A point x gets ``index = #{kinks >= x} + #{kinks > x}`` (kinks in ``dtype``): ``2 (K - s)`` strictly
    inside the segment with s kinks below, and ``2 (K - s) - m`` exactly on a value shared by m kinks
    (s below it). On a kink the units with that kink are inactive (``relu'(0) = 0``, as autograd has it;
    the other units are active as on both sides), so the gradients equal autograd's there too: every
    pair at distance 0 has ``n = 0``, the kink of each unit with ``b1 = 0`` (the model's zero bias
    initialisation). Rows of ``active``/``slope``/``intercept`` no point can reach (inside a run of
    tied kinks) repeat the tied point's."""

    kinks: Tensor      # (K,) ascending, in the comparison dtype
    slope: Tensor      # (2K + 1, heads) float64
    intercept: Tensor  # (2K + 1, heads) float64
    active: Tensor     # (2K + 1, n) float64


def relu_kink_table(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, dtype: torch.dtype) -> ReluKinkTable:
    """:class:`ReluKinkTable` of ``b2 + w2 relu(w1 x + b1)`` (shapes as :func:`relu_segments`) for points
    compared in ``dtype``."""
    segments = relu_segments(w1, b1, w2, b2)
    kinks = segments.breakpoints.to(dtype)
    count = kinks.numel()
    active = segments.active.new_zeros(2 * count + 1, segments.active.shape[1])
    for below in range(count + 1):          # strictly inside segment `below`
        active[2 * (count - below)] = segments.active[below]
    below = 0
    while below < count:                    # exactly on a value shared by kinks below .. below + ties - 1
        ties = int((kinks[below:] == kinks[below]).sum())
        on_kink = segments.active[below] * segments.active[below + ties]
        for index in range(2 * (count - below - ties) + 1, 2 * (count - below)):
            active[index] = on_kink
        below += ties
    w1, b1, w2, b2 = (t.detach().to(torch.float64).reshape(shape) for t, shape in
                      ((w1, (-1,)), (b1, (-1,)), (w2, (w2.shape[0], -1)), (b2, (-1,))))
    return ReluKinkTable(kinks, (active * w1) @ w2.T, b2 + (active * b1) @ w2.T, active)


class FireParameters(NamedTuple):
    """What a FIRE-form content scheme hands the fused attention path (``posemb.model.fire_attention``):
    the bias ``b2 + w2 relu(w1 n + b1)`` of ``n = psi(i - j) / (psi(max(L, i)) + eps)``,
    ``psi(x) = log(|c| x + 1)``, ``L = |multiplier| * threshold``, added to the scaled logits."""

    w1: Tensor           # (width, 1)
    b1: Tensor           # (width,)
    w2: Tensor           # (heads, width)
    b2: Tensor           # (heads,)
    c: Tensor            # () learnable
    multiplier: Tensor   # () learnable
    threshold: float
    eps: float
