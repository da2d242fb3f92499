"""2-D rotary embeddings for image patches: axial RoPE and RoPE-Mixed (Heo et al. 2024, "Rotary
Position Embedding for Vision Transformer", ECCV 2024, arXiv 2403.13298).

Positions are (batch, seq, 2): two integer coordinates per token (row, column). 1-D positions
given to the model mean both coordinates equal the 1-D one
(:func:`posemb.schemes.base.expand_positions`).

**Axial** (``axial_rope``; Heo et al. Eq. 11; transformers' ``rope_type="axial"``): the first half
of the channel pairs turns with coordinate 0, the second half with coordinate 1. Two frequency
conventions are in use:

* ``axis_frequencies="shared"``: both axes use ``w_i = θ^(-4i/d)``, ``i < d/4`` (Heo et al.'s
  ``compute_axial_cis``; transformers ``Qwen2VLVisionRotaryEmbedding``, whose
  ``compute_axial_rope_parameters`` builds ``θ^(-2i/(d/2))`` over ``d/2`` channels);
* ``axis_frequencies="alternate"``: the 1-D spectrum ``θ^(-2i/d)``, ``i < d/2``, split by parity,
  even ``i`` to coordinate 0 and odd ``i`` to coordinate 1 (transformers
  ``PixtralVisionRotaryEmbedding``: ``cat([inv_freq[0::2], inv_freq[1::2]])``).

**RoPE-Mixed** (``rope_mixed``; Heo et al. Eq. 12-13): every head ``h`` and pair ``j`` has
learnable frequencies ``(θ^x_{h,j}, θ^y_{h,j})`` and the pair turns by the angle
``p_x θ^x_{h,j} + p_y θ^y_{h,j}``, so a pair may follow any direction of the image plane (axial
RoPE is the special case ``θ^y = 0`` on one half and ``θ^x = 0`` on the other). Initialisation as
in the authors' ``init_random_2d_freqs`` (naver-ai/rope-vit ``models/vit_rope.py``): magnitudes
``θ^(-4i/d)``, ``i < d/4``, each used twice, in the directions ``φ_h`` and ``φ_h + π/2`` for a
random angle ``φ_h`` per head. Each layer learns its own frequencies (``per_layer``), as in the
paper. The angle is linear in the positions, so ``q_m . k_n`` still depends only on ``n - m``.

Angles are formed in float64 from the integer coordinates (RoPE-Mixed: differentiably, from the
float32 parameters), so large coordinates lose no precision.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from posemb._validation import check_choice, check_float, check_heads, check_int, check_tensor
from posemb.functional.multi_axis_rope import multi_axis_angles
from posemb.kernels import apply_rotary, apply_rotary_qk
from posemb.registry import register
from posemb.schemes.base import PositionalScheme, check_positions

ROPE_LAYOUTS = ("half", "interleaved")
AXIS_FREQUENCIES = ("shared", "alternate")


def _check_head_dim(head_dim: int) -> int:
    check_int("head_dim", head_dim, minimum=4)
    if head_dim % 4:
        raise ValueError(f"head_dim must be a multiple of 4 for 2-D RoPE (half of the channel pairs per axis), "
                         f"got {head_dim}")
    return head_dim


def axial_inv_freq(head_dim: int, base: float, axis_frequencies: str = "shared") -> Tensor:
    """float64 (head_dim / 2,) frequencies of the pairs, coordinate 0's first (see the module docstring)."""
    quarter = head_dim // 4
    if axis_frequencies == "shared":
        per_axis = base ** (-torch.arange(0, head_dim, 4, dtype=torch.float64)[:quarter] / head_dim)
        return torch.cat([per_axis, per_axis])
    full = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return torch.cat([full[0::2], full[1::2]])


def _check_rotate_inputs(scheme: PositionalScheme, q: Tensor, k: Tensor, q_positions: Tensor,
                         k_positions: Tensor) -> None:
    for name, x in (("q", q), ("k", k)):
        check_tensor(name, x, ndim=4, floating=True)
        if x.shape[-1] != scheme.head_dim:
            raise ValueError(f"{name} must have head_dim={scheme.head_dim} as its last dimension "
                             f"(batch, heads, seq, head_dim), got shape {tuple(x.shape)}")
    check_positions("q_positions", q_positions, "batch seq axes", 2, q.shape[0], q.shape[2], batch_may_be_one=True)
    check_positions("k_positions", k_positions, "batch seq axes", 2, k.shape[0], k.shape[2], batch_may_be_one=True)


@register("axial_rope")
class AxialRoPE(PositionalScheme):
    """Axial 2-D RoPE: positions (batch, seq, 2); half of the pairs per coordinate.

    Args:
        head_dim: channels per head, a multiple of 4.
        base: ``θ`` (transformers' ``rope_theta``; 10000 for Qwen2-VL's and Pixtral's vision
            towers, 100 in Heo et al.'s ViT experiments).
        axis_frequencies: ``"shared"`` (Heo et al., Qwen2-VL vision) or ``"alternate"`` (Pixtral).
        layout: ``"half"`` (pairs ``i, i + d/2``, transformers' ``rotate_half``) or
            ``"interleaved"`` (pairs ``2i, 2i + 1``, Heo et al.'s complex form).
    """

    site = "rotation"
    family = "rotary"
    per_layer = False
    position_layout = "batch seq axes"
    position_axes = 2

    def __init__(self, head_dim: int, base: float = 10000.0, axis_frequencies: str = "shared",
                 layout: str = "half") -> None:
        super().__init__()
        self.head_dim = _check_head_dim(head_dim)
        self.base = check_float("base", base, minimum=1.0, strict_minimum=True)
        self.axis_frequencies = check_choice("axis_frequencies", axis_frequencies, AXIS_FREQUENCIES)
        self.layout = check_choice("layout", layout, ROPE_LAYOUTS)
        with torch.device("cpu"):
            self.register_constant("inv_freq64", axial_inv_freq(head_dim, self.base, axis_frequencies))
            pairs = head_dim // 2
            self.register_constant("pair_axes", (torch.arange(pairs) >= pairs // 2).long())

    def cos_sin(self, positions: Tensor, *, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """``(cos, sin)``, each (batch, seq, head_dim / 2), for integer positions (batch, seq, 2)."""
        check_tensor("positions", positions, ndim=3, integer=True)
        if positions.shape[-1] != 2:
            raise ValueError(f"positions must have shape (batch, seq, 2), got {tuple(positions.shape)}")
        device = positions.device
        work = torch.device("cpu") if device.type == "mps" else device  # MPS has no float64
        angles = multi_axis_angles(positions.to(work), self.constant("inv_freq64", work),
                                   self.constant("pair_axes", work))
        return angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)

    def rotate(self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor) -> tuple[Tensor, Tensor]:
        """``(R(q_positions) q, R(k_positions) k)`` for q, k (batch, heads, seq, head_dim)."""
        _check_rotate_inputs(self, q, k, q_positions, k_positions)
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        interleaved = self.layout == "interleaved"
        cos_q, sin_q = self.cos_sin(q_positions, dtype=dtype)
        if k_positions is q_positions:
            return apply_rotary_qk(q, k, cos_q, sin_q, interleaved=interleaved)
        cos_k, sin_k = self.cos_sin(k_positions, dtype=dtype)
        return apply_rotary_qk(q, k, cos_q, sin_q, cos_k, sin_k, interleaved=interleaved)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, base={self.base:g}, axis_frequencies={self.axis_frequencies!r}, "
                f"layout={self.layout!r}")


def rope_mixed_init(head_dim: int, num_heads: int, base: float) -> Tensor:
    """float32 (2, num_heads, head_dim / 2) initial ``(θ^x, θ^y)``: Heo et al.'s
    ``init_random_2d_freqs`` (magnitudes ``base^(-4i/d)``, directions ``φ_h`` and ``φ_h + π/2``,
    ``φ_h`` uniform in [0, 2π) per head)."""
    magnitude = base ** (-torch.arange(0, head_dim, 4, dtype=torch.float64)[: head_dim // 4] / head_dim)
    phi = torch.rand(num_heads, 1, dtype=torch.float64) * 2 * math.pi
    fx = torch.cat([magnitude * torch.cos(phi), magnitude * torch.cos(phi + math.pi / 2)], dim=-1)
    fy = torch.cat([magnitude * torch.sin(phi), magnitude * torch.sin(phi + math.pi / 2)], dim=-1)
    return torch.stack([fx, fy]).float()


@register("rope_mixed")
class RoPEMixed(PositionalScheme):
    """RoPE-Mixed: learnable per-head 2-D frequencies; positions (batch, seq, 2) = (x, y).

    Args:
        head_dim: channels per head, a multiple of 4.
        num_heads: heads (each has its own frequencies).
        base: ``θ`` of the initial magnitudes (10 in Heo et al.'s RoPE-Mixed experiments).
        layout: ``"interleaved"`` (pairs ``2i, 2i + 1``, Heo et al.'s complex form) or ``"half"``.

    Attributes:
        freqs: the (2, num_heads, head_dim / 2) parameter ``(θ^x, θ^y)``.
    """

    site = "rotation"
    family = "rotary"
    per_layer = True
    position_layout = "batch seq axes"
    position_axes = 2

    def __init__(self, head_dim: int, num_heads: int, base: float = 10.0, layout: str = "interleaved") -> None:
        super().__init__()
        self.head_dim = _check_head_dim(head_dim)
        self.num_heads = check_heads("num_heads", num_heads)
        self.base = check_float("base", base, minimum=1.0, strict_minimum=True)
        self.layout = check_choice("layout", layout, ROPE_LAYOUTS)
        with torch.device("cpu"):
            initial = rope_mixed_init(head_dim, num_heads, self.base)
        self.freqs = nn.Parameter(initial.to(torch.empty(0).device))

    def angles(self, positions: Tensor) -> Tensor:
        """Angles (batch, heads, seq, head_dim / 2) ``p_x θ^x + p_y θ^y``, differentiable in
        ``freqs``; float64 (the parameters are promoted, the coordinates are exact)."""
        check_tensor("positions", positions, ndim=3, integer=True)
        if positions.shape[-1] != 2:
            raise ValueError(f"positions must have shape (batch, seq, 2), got {tuple(positions.shape)}")
        coords = positions.to(torch.float64)[:, None, :, :, None]  # (B, 1, L, 2, 1)
        freqs = self.freqs.to(torch.float64).permute(1, 0, 2)[None, :, None]  # (1, H, 1, 2, P)
        return (coords * freqs).sum(dim=-2)

    def _rotate_one(self, x: Tensor, positions: Tensor, dtype: torch.dtype) -> Tensor:
        batch, heads, length, head_dim = x.shape
        angles = self.angles(positions).expand(batch, heads, length, head_dim // 2)
        cos = angles.cos().to(dtype).reshape(batch * heads, length, -1)
        sin = angles.sin().to(dtype).reshape(batch * heads, length, -1)
        # One rotation per (row, head): heads become rows of the kernels' (batch, 1, seq, d) input.
        flat = x.reshape(batch * heads, 1, length, head_dim)
        rotated = apply_rotary(flat, cos, sin, interleaved=self.layout == "interleaved")
        return rotated.view(batch, heads, length, head_dim)

    def rotate(self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor) -> tuple[Tensor, Tensor]:
        """``(R_h(q_positions) q, R_h(k_positions) k)`` per head ``h``, q, k (batch, heads, seq, head_dim)."""
        _check_rotate_inputs(self, q, k, q_positions, k_positions)
        for name, x in (("q", q), ("k", k)):
            if x.shape[1] != self.num_heads:
                raise ValueError(f"{name} must have num_heads={self.num_heads} heads (dimension 1), "
                                 f"got shape {tuple(x.shape)}")
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return self._rotate_one(q, q_positions, dtype), self._rotate_one(k, k_positions, dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, num_heads={self.num_heads}, base={self.base:g}, layout={self.layout!r}"
