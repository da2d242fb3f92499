"""Dynamic (continuous) position bias: a small MLP from the relative distance to one bias per head
(Swin Transformer V2, Liu et al. 2022, arXiv 2111.09883, §3.3; x-transformers ``DynamicPositionBias``)."""
from __future__ import annotations

from torch import Tensor, nn

from posemb._validation import check_bool, check_heads, check_int, check_width
from posemb.functional.distance_bias import bias_from_distances, signed_log_distance
from posemb.kernels.flex import distance_score_mod
from posemb.registry import register
from posemb.schemes.base import PositionalScheme


@register("dynamic_position_bias")
class DynamicPositionBias(PositionalScheme):
    """``s_ij += MLP(x)_h`` with ``x = i - j`` (query minus key position, x-transformers' input), or
    ``sign(x) log(1 + |x|)`` with ``log_distance`` (Swin V2's log-spaced coordinates, which keep the
    inputs of long distances close to those seen in training). One MLP shared by all layers, as in
    x-transformers:

        Linear(1, hidden) -> [LayerNorm] -> SiLU -> (depth - 1) x [Linear(hidden, hidden) -> [LayerNorm] -> SiLU]
        -> Linear(hidden, heads)

    The MLP runs once per distinct distance (Lq + Lk - 1 of them on the Toeplitz fast path), never
    per (query, key) pair.

    Args:
        num_heads: attention heads.
        causal: causal or bidirectional (the MLP sees the sign of the distance either way).
        hidden: MLP width.
        depth: hidden layers (>= 1).
        log_distance: feed ``sign(x) log(1 + |x|)`` instead of ``x``.
        norm: LayerNorm after each hidden linear layer.
    """

    site = "bias"
    family = "relative"

    def __init__(self, num_heads: int, causal: bool = True, hidden: int = 64, depth: int = 2,
                 log_distance: bool = True, norm: bool = False) -> None:
        super().__init__()
        self.num_heads = check_heads("num_heads", num_heads)
        self.causal = check_bool("causal", causal)
        self.hidden = check_width("hidden", hidden)
        self.depth = check_int("depth", depth, minimum=1, maximum=64)
        self.log_distance = check_bool("log_distance", log_distance)
        self.norm = check_bool("norm", norm)
        layers: list[nn.Module] = []
        width_in = 1
        for _ in range(depth):
            layers.append(nn.Linear(width_in, hidden))
            if norm:
                layers.append(nn.LayerNorm(hidden))
            layers.append(nn.SiLU())
            width_in = hidden
        layers.append(nn.Linear(hidden, num_heads))
        self.mlp = nn.Sequential(*layers)

    def distance_bias(self, distance: Tensor) -> Tensor:
        """The bias of integer key-minus-query distances ``distance`` (any shape): (heads, *shape)."""
        weight = self.mlp[0].weight
        x = (-distance).to(device=weight.device, dtype=weight.dtype)
        if self.log_distance:
            x = signed_log_distance(x)
        return self.mlp(x.reshape(-1, 1)).transpose(0, 1).reshape(self.num_heads, *distance.shape)

    def score_bias(self, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        return bias_from_distances(self.distance_bias, q_positions, k_positions)

    def score_mod(self, q_positions: Tensor, k_positions: Tensor):
        """A FlexAttention ``score_mod`` adding this bias: ``distance_bias`` once per distance in the
        positions' range, read per pair (:func:`posemb.kernels.flex.distance_score_mod`); gradients
        reach the parameters through the captured table."""
        return distance_score_mod(self.distance_bias, q_positions, k_positions)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, hidden={self.hidden}, depth={self.depth}, "
                f"log_distance={self.log_distance}, norm={self.norm}")
