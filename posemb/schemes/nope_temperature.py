"""NoPE with Llama 4's query temperature (``attn_temperature_tuning`` on the NoPE layers of iRoPE).

No position enters the scores except through the query scale ``tau(m) = 1 + attn_scale * log(1 +
floor((m + 1) / floor_scale))`` of :func:`posemb.functional.temperature.query_temperature`
(transformers ``models/llama4/modeling_llama4.py``, ``Llama4TextAttention``). In a pattern it is the
NoPE layer of Llama 4: ``["rope", "rope", "rope", ("nope_temperature", {...})]``.

It sits at the rotation site (queries and keys pass through :meth:`rotate` before attention): queries
are scaled, keys are returned as they are, so the KV cache holds plain keys and decoding needs nothing
more than the new token's position.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from posemb._validation import check_float
from posemb.functional.temperature import query_temperature
from posemb.registry import register
from posemb.schemes.base import PositionalScheme, check_positions


@register("nope_temperature")
class NoPETemperature(PositionalScheme):
    """NoPE whose queries are scaled by Llama 4's ``tau(m)``; causal or not.

    Args:
        floor_scale: the context step of the temperature (Llama 4: 8192); must be >= 1.
        attn_scale: the temperature's slope per log step (Llama 4: 0.1); >= 0, and 0 is plain NoPE.
    """

    site = "rotation"
    family = "none"
    #: the scale depends on the query's absolute position
    translation_invariant: ClassVar[bool | None] = False

    def __init__(self, floor_scale: float = 8192.0, attn_scale: float = 0.1) -> None:
        super().__init__()
        self.floor_scale = check_float("floor_scale", floor_scale, minimum=1.0)
        self.attn_scale = check_float("attn_scale", attn_scale, minimum=0.0)

    def rotate(self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor) -> tuple[Tensor, Tensor]:
        """``(tau(m) q, k)``: q (batch, heads, Lq, d) scaled per query position (batch, Lq)."""
        if q.ndim != 4:
            raise ValueError(f"q must have shape (batch, heads, seq, head_dim), got {tuple(q.shape)}")
        check_positions("q_positions", q_positions, self.position_layout, self.position_axes, q.shape[0], q.shape[2],
                        batch_may_be_one=True)
        if not torch.compiler.is_compiling() and bool((q_positions < 0).any()):
            # log(1 + floor((m + 1) / floor_scale)) is -inf or NaN below m = 0
            raise ValueError(f"q_positions must be >= 0 for nope_temperature, got a minimum of {int(q_positions.min())}")
        tau = query_temperature(q_positions, self.floor_scale, self.attn_scale)  # (batch, Lq), float64
        # transformers rounds tau to the query dtype before the product (query_states * attn_scales)
        return q * tau.to(q.dtype)[:, None, :, None], k

    def extra_repr(self) -> str:
        return f"floor_scale={self.floor_scale:g}, attn_scale={self.attn_scale:g}"


__all__ = ["NoPETemperature"]
