"""Kerple: kernelized relative positional biases (Chi, Fan, Ramadge & Rudnicky, NeurIPS 2022,
arXiv 2205.09921; reference code chijames/KERPLE and NeMo ``kerple_relative_position_embedding.py``)."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from posemb._validation import check_bool, check_choice, check_float, check_heads
from posemb.functional.distance_bias import KERPLE_KERNELS, bias_from_distances, inverse_softplus, kerple_bias
from posemb.kernels.flex import distance_score_mod
from posemb.registry import register
from posemb.schemes.base import PositionalScheme


@register("kerple")
class Kerple(PositionalScheme):
    """``s_ij += -r1_h log(1 + r2_h |i - j|)`` (``kernel="log"``) or ``-r1_h |i - j|^r2_h``
    (``kernel="power"``), with learnable r1_h, r2_h > 0 per head, shared by all layers.

    Positivity is built in: ``r = softplus(raw)``, so no value the optimiser reaches is invalid
    (the reference code clamps the parameters in place before each use, to at least 1e-2); the
    power kernel's ``r2 <= 2`` (the paper's condition for a conditionally positive definite kernel)
    is a clamp of the softplus.

    Args:
        num_heads: attention heads.
        causal: causal or bidirectional; the bias is symmetric in ``i - j`` either way.
        kernel: ``"log"`` (the paper's best) or ``"power"``.
        r1, r2: initial values of every head's r1 and r2 (> 0; r2 <= 2 for ``"power"``).
    """

    site = "bias"
    family = "relative"

    def __init__(self, num_heads: int, causal: bool = True, kernel: str = "log", r1: float = 1.0,
                 r2: float = 1.0) -> None:
        super().__init__()
        self.num_heads = check_heads("num_heads", num_heads)
        self.causal = check_bool("causal", causal)
        self.kernel = check_choice("kernel", kernel, KERPLE_KERNELS)
        r1 = check_float("r1", r1, minimum=0.0, strict_minimum=True)
        r2 = check_float("r2", r2, minimum=0.0, strict_minimum=True, maximum=2.0 if kernel == "power" else None)
        self.raw_r1 = nn.Parameter(torch.full((num_heads,), inverse_softplus(r1)))
        self.raw_r2 = nn.Parameter(torch.full((num_heads,), inverse_softplus(r2)))

    @property
    def r1(self) -> Tensor:
        return F.softplus(self.raw_r1)

    @property
    def r2(self) -> Tensor:
        r2 = F.softplus(self.raw_r2)
        return r2.clamp(max=2.0) if self.kernel == "power" else r2

    def distance_bias(self, distance: Tensor) -> Tensor:
        """The bias of integer key-minus-query distances ``distance`` (any shape): (heads, *shape),
        differentiable in r1 and r2; the Toeplitz fast path reads it for Lq + Lk - 1 distances."""
        return kerple_bias(distance, self.r1, self.r2, self.kernel)

    def score_bias(self, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        return bias_from_distances(self.distance_bias, q_positions, k_positions)

    def score_mod(self, q_positions: Tensor, k_positions: Tensor):
        """A FlexAttention ``score_mod`` adding this bias: ``distance_bias`` once per distance in the
        positions' range, read per pair (:func:`posemb.kernels.flex.distance_score_mod`); gradients
        reach the parameters through the captured table."""
        return distance_score_mod(self.distance_bias, q_positions, k_positions)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, kernel={self.kernel!r}, causal={self.causal}"
