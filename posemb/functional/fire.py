"""FIRE's normalised distance (Li et al. 2023, "Functional Interpolation for Relative Positions
Improves Long Context Transformers", arXiv 2310.04418, §3, eq. 5-6)."""
from __future__ import annotations

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
