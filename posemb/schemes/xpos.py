"""xPos: RoPE with an exponential decay by distance (Sun et al. 2022, "A Length-Extrapolatable
Transformer", arXiv 2212.10554, section 3).

On top of the rotation, queries are scaled by ``ζ^(m/γ)`` and keys by ``ζ^(-n/γ)`` per channel pair,
``ζ_i = (2i + 0.4 d) / (1.4 d)`` (``i = 0 .. d/2-1``, ``d = head_dim``, so ``0.29 <= ζ_i < 1``) and
``γ = scale_base`` (512 in the paper). The score of query position ``m`` and key position ``n`` then
carries ``ζ_i^((m - n)/γ)``: a decay for ``m >= n``, which is why xPos is causal only (for ``n > m``
the factor grows without bound).

Centring and range. Only ``m - n`` matters, so positions are taken relative to a centre ``c`` per
batch row and call, the midpoint of the smallest and largest position seen (rotary-embedding-torch
centres at ``len // 2``); the factors ``exp(±(p - c)/γ · ln ζ)`` are formed in float64 and rounded
once. Because the centre changes from call to call, keys are cached unrotated
(``caches_rotated_keys = False``) and re-scaled at each decoding step. Absolute positions can be
as large as you like (10^6 is fine); what is limited is the span ``S = max - min`` of the positions
in one call (the whole KV cache when decoding), with ``u = |ln ζ_0|/γ = 1.2528/512``:

* float32/bf16: every score, the masked future ones ``ζ^((m-n)/γ) = e^(u(n-m))`` included, is
  finite for ``S <~ 88.7/u ≈ 36,000`` tokens. Up to ``≈ 72,000`` the factors themselves fit and the
  causal scores are right, but future scores overflow to ``inf`` (harmless only if the attention
  kernel masks by replacement, not by adding ``-inf``). Beyond, factors overflow and scores are NaN.
* fp16 outputs: the largest factor ``e^(uS/2)`` must fit 65504 / |q|: ``S <~ 8,000`` for ``|q| ~ 1``.

These limits come from the paper's formula itself (a factor ``ζ_0^(±S/(2γ))`` must be represented);
for longer contexts use blockwise attention, as the paper does, or plain RoPE.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from posemb._validation import check_float
from posemb.functional.rope import apply_rotary
from posemb.registry import register
from posemb.schemes.rope import RoPE, _check_rotate_inputs, _float64_device


@register("xpos")
class XPos(RoPE):
    """RoPE (default schedule) with xPos's per-pair exponential decay; causal attention only.

    Args:
        head_dim: channels per head (even).
        base: RoPE's ``θ``.
        scale_base: ``γ``, the decay length scale (512 in the paper).
        layout: ``"half"`` or ``"interleaved"`` pairs (see :class:`~posemb.schemes.rope.RoPE`).
        causal: must be True; the decay becomes growth for keys after the query.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, scale_base: float = 512.0, layout: str = "half",
                 causal: bool = True) -> None:
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__} ({causal!r})")
        if not causal:
            raise ValueError("xpos requires causal=True (its factor ζ^((m-n)/scale_base) grows without bound "
                             "for keys after the query), got causal=False")
        super().__init__(head_dim, base=base, layout=layout)
        self.scale_base = check_float("scale_base", scale_base, minimum=0.0, strict_minimum=True)
        self.causal = True
        self._log_zeta_values = tuple(math.log((2 * i + 0.4 * head_dim) / (1.4 * head_dim))
                                      for i in range(head_dim // 2))
        self.register_buffer("log_zeta64", torch.tensor(self._log_zeta_values, dtype=torch.float64),
                             persistent=False)
        # The centre moves with every call, so cached keys must be raw (re-scaled each step).
        self.caches_rotated_keys = False

    @property
    def zeta(self) -> Tensor:
        """float64 ``ζ_i = (2i + 0.4 d)/(1.4 d)``, shape (head_dim // 2,)."""
        return self._buffer("log_zeta64", self._log_zeta_values, self.log_zeta64.device).exp()

    def _apply(self, fn, recurse: bool = True):
        result = super()._apply(fn, recurse)
        self.log_zeta64 = torch.tensor(self._log_zeta_values, dtype=torch.float64, device=self.log_zeta64.device)
        return result

    def _decay(self, positions: Tensor, centre: Tensor, sign: float, log_zeta: Tensor) -> Tensor:
        """float64 ``ζ^(sign (p - c)/γ)``, shape (rows, seq, head_dim/2), on a float64-capable device."""
        offset = (positions - centre[:, None]).to(device=log_zeta.device, dtype=torch.float64)
        return torch.exp(offset[..., None] * (sign / self.scale_base) * log_zeta)

    def rotate(self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor) -> tuple[Tensor, Tensor]:
        """``(ζ^((m-c)/γ) ⊙ R(m) q, ζ^(-(n-c)/γ) ⊙ R(n) k)``, c the per-row midpoint of all positions."""
        _check_rotate_inputs(self, q, k, q_positions, k_positions)
        cos_q, sin_q, cos_k, sin_k = self._cos_sin_pair(q, q_positions, k_positions)
        low = torch.minimum(q_positions.amin(dim=1), k_positions.amin(dim=1))
        high = torch.maximum(q_positions.amax(dim=1), k_positions.amax(dim=1))
        centre = torch.div(low + high, 2, rounding_mode="floor")
        log_zeta = self._buffer("log_zeta64", self._log_zeta_values, _float64_device(q.device))
        q_decay = self._decay(q_positions, centre, 1.0, log_zeta)
        k_decay = self._decay(k_positions, centre, -1.0, log_zeta)

        def scaled(table: Tensor, decay: Tensor) -> Tensor:
            # Scale in float64, round once to the table's dtype (float32, or float64 for float64 input).
            return (table.to(device=decay.device, dtype=torch.float64) * decay).to(device=table.device, dtype=table.dtype)

        interleaved = self.layout == "interleaved"
        return (apply_rotary(q, scaled(cos_q, q_decay), scaled(sin_q, q_decay), interleaved=interleaved),
                apply_rotary(k, scaled(cos_k, k_decay), scaled(sin_k, k_decay), interleaved=interleaved))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale_base={self.scale_base:g}, causal=True"
