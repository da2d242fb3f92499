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
in one call (the whole KV cache when decoding). With ``u = |ln ζ_0|/γ`` (``ζ_0 = 2/7``, so
``u = 1.2528/512`` for the paper's γ), the score of a future key carries ``e^(u S)`` at most, and
:meth:`XPos.rotate` refuses, with a ``ValueError``, a span beyond :meth:`XPos.max_span`
``= floor(ln(finfo(dtype).max) / u)`` for the dtype of q and k, so every score, masked future ones
included, stays finite:

* float32 / bf16: ``88.72 / u ≈ 36,000`` tokens at γ = 512;
* fp16: ``11.09 / u ≈ 4,500`` tokens;
* float64: ``709.8 / u ≈ 290,000`` tokens.

These limits come from the paper's formula itself (a factor ``ζ_0^(±S/(2γ))`` must be represented);
for longer contexts use a larger ``scale_base``, float64, blockwise attention as the paper does, or
plain RoPE.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from posemb._validation import check_bool, check_float
from posemb.registry import register
from posemb.schemes.rope import RoPE, _shared_rows


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
        if not check_bool("causal", causal):
            raise ValueError("xpos requires causal=True (its factor ζ^((m-n)/scale_base) grows without bound "
                             "for keys after the query), got causal=False")
        super().__init__(head_dim, base=base, layout=layout)
        self.scale_base = check_float("scale_base", scale_base, minimum=0.0, strict_minimum=True)
        self.causal = True
        log_zeta = [math.log((2 * i + 0.4 * head_dim) / (1.4 * head_dim)) for i in range(head_dim // 2)]
        self.register_constant("log_zeta64", torch.tensor(log_zeta, dtype=torch.float64, device="cpu"))
        # The centre moves with every call, so cached keys must be raw (re-scaled each step).
        self.caches_rotated_keys = False

    @property
    def zeta(self) -> Tensor:
        """float64 ``ζ_i = (2i + 0.4 d)/(1.4 d)``, shape (head_dim // 2,)."""
        return self._constants["log_zeta64"].exp()

    def max_span(self, dtype: torch.dtype) -> int:
        """The largest span ``max - min`` of the positions in one call for which every score in
        ``dtype`` is finite: ``floor(ln(finfo(dtype).max) / u)``, ``u = |ln ζ_0| / scale_base``."""
        return math.floor(math.log(torch.finfo(dtype).max) / (abs(math.log(2 / 7)) / self.scale_base))

    def _decay(self, positions: Tensor, centre: Tensor, sign: float, log_zeta: Tensor) -> Tensor:
        """float64 ``ζ^(sign (p - c)/γ)``, shape (rows, seq, head_dim/2), on a float64-capable device."""
        offset = (positions - centre[:, None]).to(device=log_zeta.device, dtype=torch.float64)
        return torch.exp(offset[..., None] * (sign / self.scale_base) * log_zeta)

    def _compute_rotation_tables(self, q: Tensor, q_positions: Tensor,
                                 k_positions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """RoPE's cos/sin times the decays: ``ζ^((m-c)/γ)`` for queries, ``ζ^(-(n-c)/γ)`` for keys, c
        the per-row midpoint of all positions, so that :meth:`RoPE.rotate` and
        :meth:`RoPE.rotate_qkv_` (the fused kernels, which are linear in cos/sin) give
        ``(ζ^((m-c)/γ) ⊙ R(m) q, ζ^(-(n-c)/γ) ⊙ R(n) k)``. Memoised per forward by
        :meth:`RoPE._rotation_tables`, so the span check's host sync runs once per forward."""
        same = q_positions is k_positions
        q_positions = _shared_rows(q_positions)
        k_positions = q_positions if same else _shared_rows(k_positions)
        cos_q, sin_q, cos_k, sin_k = self._cos_sin_pair(q, q_positions, k_positions)
        low = torch.minimum(q_positions.amin(dim=1), k_positions.amin(dim=1))
        high = torch.maximum(q_positions.amax(dim=1), k_positions.amax(dim=1))
        if not torch.compiler.is_compiling():
            span, limit = int((high - low).max()), self.max_span(q.dtype)  # one host sync
            if span > limit:
                raise ValueError(
                    f"xpos: the positions of one call span {span} tokens (the whole KV cache when decoding), "
                    f"more than max_span={limit} for {q.dtype} with scale_base={self.scale_base:g}: the decay "
                    f"factors would overflow and the scores turn inf/NaN; use a larger scale_base, float64, "
                    f"blockwise attention or plain rope")
        centre = torch.div(low + high, 2, rounding_mode="floor")
        log_zeta = self.constant("log_zeta64", q.device)
        q_decay = self._decay(q_positions, centre, 1.0, log_zeta)
        k_decay = self._decay(k_positions, centre, -1.0, log_zeta)

        def scaled(table: Tensor, decay: Tensor) -> Tensor:
            # Scale in float64, round once to the table's dtype (float32, or float64 for float64 input).
            return (table.to(device=decay.device, dtype=torch.float64) * decay).to(device=table.device, dtype=table.dtype)

        return scaled(cos_q, q_decay), scaled(sin_q, q_decay), scaled(cos_k, k_decay), scaled(sin_k, k_decay)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale_base={self.scale_base:g}, causal=True"
