"""M-RoPE, multimodal rotary embedding over (temporal, height, width) positions (Qwen2-VL, Wang et al.
2024, arXiv 2409.12191, Sec. 2.1; Qwen2.5-VL; Qwen3-VL's interleaved variant).

Each token has three integer coordinates ``(t, h, w)``; positions are (3, batch, seq), the layout
of transformers' ``position_ids`` for these models (``get_rope_index``). The ``P = rotary_dim / 2``
channel pairs are split by ``mrope_section = (s_t, s_h, s_w)`` (contiguous: ``s_t + s_h + s_w = P``) and pair
``j`` turns by ``p_{a(j)} * w_j``, where ``w`` are the ordinary RoPE frequencies of any schedule
and ``a(j)`` the axis of pair ``j`` (:mod:`posemb.functional.multi_axis_rope`):

* contiguous (``mrope_interleaved=False``, Qwen2-VL / Qwen2.5-VL): ``s_t`` temporal pairs, then
  ``s_h`` height pairs, then ``s_w`` width pairs (transformers ``Qwen2VLRotaryEmbedding``);
* interleaved (``mrope_interleaved=True``, Qwen3-VL): T, H, W, T, H, W, ... over the pairs
  (``Qwen3VLTextRotaryEmbedding``), so every axis sees high and low frequencies.

Text tokens have ``t = h = w``; then every pair turns by the one position and M-RoPE *is* 1-D RoPE.
1-D positions (batch, seq) given to the model are expanded that way
(:func:`posemb.schemes.base.expand_positions`), and the rotation is then bit-identical to
:class:`~posemb.schemes.rope.RoPE` with the same options.

The frequencies, cos/sin tables, attention scale and context-dependent schedules are RoPE's
(this class extends it); only the choice of coordinate per pair is new.
"""
from __future__ import annotations

import torch
from torch import Tensor

from posemb._validation import check_bool, check_tensor
from posemb.functional.multi_axis_rope import check_mrope_section, mrope_pair_axes, select_pair_axes
from posemb.kernels import apply_rotary_qk
from posemb.registry import register
from posemb.schemes.base import check_positions
from posemb.schemes.rope import RoPE


def default_mrope_section(pairs: int) -> tuple[int, int, int]:
    """Qwen2-VL's proportions (16, 24, 24 of 64 pairs: a quarter temporal, 3/8 each spatial) for
    ``pairs`` pairs, the temporal axis taking the remainder."""
    spatial = (3 * pairs) // 8
    return pairs - 2 * spatial, spatial, spatial


@register("mrope")
class MRoPE(RoPE):
    """Multimodal RoPE: positions (3, batch, seq) = (temporal, height, width) per token.

    Args:
        head_dim, base, rope_type, scaling, layout, partial_rotary_factor, max_position_embeddings:
            as for :class:`~posemb.schemes.rope.RoPE` (the frequency schedule is RoPE's).
        mrope_section: pairs per axis ``(temporal, height, width)``, summing to ``rotary_dim / 2``
            for the contiguous layout (transformers' ``rope_parameters["mrope_section"]``, e.g.
            ``[16, 24, 24]`` for Qwen2-VL's head_dim 128, ``[24, 20, 20]`` for Qwen3-VL). The
            interleaved layout reads only the height and width counts, as Qwen3-VL's code does: pairs
            past ``3 * s_h`` / ``3 * s_w`` are temporal, whatever the sum. Default: Qwen2-VL's
            proportions, :func:`default_mrope_section`.
        mrope_interleaved: False: contiguous sections (Qwen2-VL, Qwen2.5-VL); True: axes
            interleaved over the pairs (Qwen3-VL, ``rope_parameters["mrope_interleaved"]``).
    """

    position_layout = "axes batch seq"
    position_axes = 3

    def __init__(self, head_dim: int, base: float = 10000.0, mrope_section: list | tuple | None = None,
                 mrope_interleaved: bool = False, rope_type: str = "default", scaling: dict | None = None,
                 layout: str = "half", partial_rotary_factor: float = 1.0,
                 max_position_embeddings: int = 2048) -> None:
        super().__init__(head_dim, base=base, rope_type=rope_type, scaling=scaling, layout=layout,
                         partial_rotary_factor=partial_rotary_factor,
                         max_position_embeddings=max_position_embeddings)
        check_bool("mrope_interleaved", mrope_interleaved)
        pairs = self.rotary_dim // 2
        section = default_mrope_section(pairs) if mrope_section is None else check_mrope_section(mrope_section)
        self.mrope_section, self.mrope_interleaved = section, mrope_interleaved
        with torch.device("cpu"):  # raises when a contiguous section does not sum to the pairs
            self.register_constant("pair_axes", mrope_pair_axes(section, interleaved=mrope_interleaved, pairs=pairs))

    def mrope_cos_sin(self, positions: Tensor, context_length: Tensor | int | None = None, *,
                      dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """``(cos, sin)``, each (batch, seq, rotary_dim / 2), for integer ``positions`` (3, batch, seq):
        pair ``j`` at the coordinate of its axis. ``context_length`` as in :meth:`RoPE.cos_sin`
        (default: one past the largest coordinate of each row)."""
        check_tensor("positions", positions, ndim=3, integer=True)
        if positions.shape[0] != 3:
            raise ValueError(f"positions must have shape (3, batch, seq) (temporal, height, width), "
                             f"got {tuple(positions.shape)}")
        if self.context_dependent and context_length is None:
            context_length = positions.amax(dim=(0, 2)) + 1
        if positions.stride(0) == 0:
            # t = h = w (1-D positions expanded): one table lookup, and exactly 1-D RoPE.
            return self.cos_sin(positions[0], context_length, dtype=dtype)
        per_axis = [self.cos_sin(positions[axis], context_length, dtype=dtype) for axis in range(3)]
        pair_axes = self.constant("pair_axes", positions.device)
        cos = select_pair_axes(torch.stack([c for c, _ in per_axis]), pair_axes)
        sin = select_pair_axes(torch.stack([s for _, s in per_axis]), pair_axes)
        return cos, sin

    def rotate(self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor) -> tuple[Tensor, Tensor]:
        """``(R(q_positions) q, R(k_positions) k)`` for q, k (batch, heads, seq, head_dim) and positions
        (3, batch or 1, seq)."""
        for name, x in (("q", q), ("k", k)):
            check_tensor(name, x, ndim=4, floating=True)
            if x.shape[-1] != self.head_dim:
                raise ValueError(f"{name} must have head_dim={self.head_dim} as its last dimension "
                                 f"(batch, heads, seq, head_dim), got shape {tuple(x.shape)}")
        for name, positions, x in (("q_positions", q_positions, q), ("k_positions", k_positions, k)):
            check_positions(name, positions, self.position_layout, 3, x.shape[0], x.shape[2], batch_may_be_one=True)
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        context = None
        if self.context_dependent:
            # Every query and key of a row shares the frequencies of the row's context length.
            context = torch.maximum(q_positions.amax(dim=(0, 2)), k_positions.amax(dim=(0, 2))) + 1
        interleaved = self.layout == "interleaved"
        cos_q, sin_q = self.mrope_cos_sin(q_positions, context, dtype=dtype)
        if k_positions is q_positions:
            return apply_rotary_qk(q, k, cos_q, sin_q, interleaved=interleaved)
        cos_k, sin_k = self.mrope_cos_sin(k_positions, context, dtype=dtype)
        return apply_rotary_qk(q, k, cos_q, sin_q, cos_k, sin_k, interleaved=interleaved)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, mrope_section={list(self.mrope_section)}, "
                f"mrope_interleaved={self.mrope_interleaved}")
