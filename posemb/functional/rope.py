"""Rotary position embedding, the plain-PyTorch reference (Su et al. 2021, arXiv 2104.09864).

RoPE rotates each pair of query/key channels by an angle proportional to the token's position,
``R(p) x`` with 2x2 blocks ``[[cos p*w_i, -sin p*w_i], [sin p*w_i, cos p*w_i]]`` and
``w_i = inv_freq[i]`` (paper Eq. 15 and the efficient form Eq. 34). Because ``R(m)^T R(n) = R(n - m)``,
``(R(m) q) . (R(n) k)`` depends on the positions only through ``n - m``.

Two memory layouts pair the channels differently:

* half-split (GPT-NeoX, Hugging Face ``rotate_half``): channel ``i`` pairs with ``i + r/2``;
* interleaved (GPT-J, Meta's complex form): channel ``2i`` pairs with ``2i + 1``.

Only the leading ``rotary_dim = 2 * cos.shape[-1]`` channels rotate (partial rotary, GPT-NeoX);
the rest pass through unchanged.

Precision: angles ``p * inv_freq`` are formed in float64 from the integer positions. In float32 the
product already errs by ~1e-3 rad at position 4096 and in bf16 position 257 becomes 256
(transformers #25681, gpt-neox #1003).
In float64 the angle errs by < 1e-9 rad at position 10^6, so the float32 cos/sin returned are
correctly rounded to within an ulp or two.
"""
from __future__ import annotations

import torch
from torch import Tensor

from posemb._validation import check_float, check_tensor

#: dtypes a cos/sin table may be returned in; angles are always formed in float64 first
COS_SIN_DTYPES = (torch.float32, torch.float64)


def _check_positions(name: str, positions: Tensor) -> Tensor:
    check_tensor(name, positions, ndim=2, integer=True)
    return positions


def rotary_angles_cos_sin(positions: Tensor, inv_freq: Tensor, attention_scale: float = 1.0, *,
                          dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """``(s*cos(p*w), s*sin(p*w))`` for integer ``positions`` of any shape, angles in float64.

    No argument checks (internal helper shared by the table builder and the direct path).
    Returns ``positions.shape + (len(inv_freq),)`` in ``dtype``. ``inv_freq`` may be (len,) or
    broadcastable against ``positions.shape + (len,)`` (e.g. (batch, 1, len) for per-row frequencies).
    """
    angles = positions.to(torch.float64)[..., None] * inv_freq.to(device=positions.device, dtype=torch.float64)
    cos, sin = angles.cos(), angles.sin()
    if attention_scale != 1.0:
        # YaRN / LongRoPE: HF multiplies both cos and sin, which scales q.k by attention_scale**2.
        cos, sin = cos * attention_scale, sin * attention_scale
    return cos.to(dtype), sin.to(dtype)


def rotary_cos_sin(positions: Tensor, inv_freq: Tensor, attention_scale: float = 1.0, *,
                   dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles ``positions[b, l] * inv_freq[i]``, times ``attention_scale``.

    Args:
        positions: integer tensor (batch, seq). Any integers, negative ones included.
        inv_freq: (rotary_dim // 2,) frequencies; pass float64 for full precision (a float32
            ``inv_freq`` is used at its own precision: its rounding error, not ours, then grows
            with the position).
        attention_scale: multiplies cos and sin (YaRN's / LongRoPE's ``attention_factor``).
        dtype: float32 (default) or float64.

    Returns:
        ``(cos, sin)``, each (batch, seq, rotary_dim // 2) in ``dtype``. The angles are formed in
        float64 from the exact integers, never in bf16/fp16, so with a float64 ``inv_freq`` the
        float32 result is within 1e-6 of a float64 reference at positions up to 10^6 and beyond.
    """
    _check_positions("positions", positions)
    check_tensor("inv_freq", inv_freq, ndim=1, floating=True)
    check_float("attention_scale", attention_scale, minimum=0.0, strict_minimum=True)
    if dtype not in COS_SIN_DTYPES:
        raise ValueError(f"dtype must be one of {list(COS_SIN_DTYPES)}, got {dtype}")
    return rotary_angles_cos_sin(positions, inv_freq, attention_scale, dtype=dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = False) -> Tensor:
    """Rotate the leading ``rotary_dim = 2 * cos.shape[-1]`` channels of ``x`` by the angles in cos/sin.

    The one plain-PyTorch home of the rotation: differentiable in ``x``, ``cos`` and ``sin``, and the
    oracle of the fast paths, whose dispatcher :func:`posemb.kernels.apply_rotary` (in place,
    ``out=``, back ends) runs it for ``backend="reference"``, under ``torch.compile`` and when
    cos/sin require grad.

    Half-split layout (``interleaved=False``, GPT-NeoX / HF ``rotate_half``), with ``h = rotary_dim/2``::

        out[..., i]     = x[..., i] * cos_i - x[..., i + h] * sin_i
        out[..., i + h] = x[..., i + h] * cos_i + x[..., i] * sin_i

    Interleaved layout (``interleaved=True``, GPT-J ``rotate_every_two``, Meta's complex product)::

        out[..., 2i]     = x[..., 2i] * cos_i - x[..., 2i + 1] * sin_i
        out[..., 2i + 1] = x[..., 2i + 1] * cos_i + x[..., 2i] * sin_i

    Channels ``rotary_dim ..`` pass through (partial rotary).

    Args:
        x: (batch, heads, seq, head_dim), floating point.
        cos, sin: (batch or 1, seq, rotary_dim // 2) from :func:`rotary_cos_sin`; broadcast over heads.
        interleaved: pair layout, see above.

    Returns:
        A new tensor shaped like ``x`` in ``x.dtype``. The arithmetic runs in float32 (float64 when
        ``x`` or the tables are float64), so bf16/fp16 inputs are rounded once, at the end.
    """
    check_tensor("x", x, ndim=4, floating=True)
    check_tensor("cos", cos, ndim=3, floating=True)
    check_tensor("sin", sin, ndim=3, floating=True)
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {type(interleaved).__name__} ({interleaved!r})")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    batch, _, seq, head_dim = x.shape
    half = cos.shape[-1]
    rotary_dim = 2 * half
    if half < 1 or rotary_dim > head_dim:
        raise ValueError(f"cos/sin last dimension must be in [1, head_dim/2 = {head_dim // 2}] "
                         f"(rotary_dim = 2 * cos.shape[-1] <= head_dim), got cos shape {tuple(cos.shape)}")
    if cos.shape[1] != seq or cos.shape[0] not in (1, batch):
        raise ValueError(f"cos/sin must have shape (batch={batch} or 1, seq={seq}, rotary_dim/2), "
                         f"got {tuple(cos.shape)} for x of shape {tuple(x.shape)}")
    compute = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), torch.float32)
    cos = cos.to(compute)[:, None]  # (batch, 1, seq, half): one rotation shared by every head
    sin = sin.to(compute)[:, None]
    rot = x[..., :rotary_dim].to(compute)
    if interleaved:
        even, odd = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    else:
        first, second = rot[..., :half], rot[..., half:]
        rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
    rotated = rotated.to(x.dtype)
    if rotary_dim == head_dim:
        return rotated
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)
