"""Rotary embeddings over several position axes: each channel pair turns with one axis.

A multi-axis RoPE gives every token ``A`` integer coordinates (M-RoPE: temporal, height, width;
2-D vision RoPE: row, column) and assigns each of the ``P = rotary_dim / 2`` channel pairs to one
axis ``a(j)``; pair ``j`` then rotates by ``p_{a(j)} * w_j``. Because each pair still turns by one
coordinate times one frequency, ``R(m)^T R(n) = R(n - m)`` per axis and ``q_m . k_n`` depends
only on the coordinate differences. When every coordinate of a token equals one 1-D position the
rotation is exactly 1-D RoPE with the same frequencies.

Pair-to-axis maps:

* M-RoPE, contiguous sections (Qwen2-VL / Qwen2.5-VL, Wang et al. 2024, arXiv 2409.12191): pairs
  ``0 .. s_0 - 1`` follow the temporal axis, the next ``s_1`` the height, the last ``s_2`` the
  width (transformers ``models/qwen2_vl/modeling_qwen2_vl.py``,
  ``Qwen2VLRotaryEmbedding.recomposition_frequencies``).
* M-RoPE, interleaved (Qwen3-VL): pair ``j`` follows height when ``j % 3 == 1`` and
  ``j < 3 s_1``, width when ``j % 3 == 2`` and ``j < 3 s_2``, and the temporal axis otherwise
  (``models/qwen3_vl/modeling_qwen3_vl.py``, ``Qwen3VLTextRotaryEmbedding.recomposition_frequencies``).
  The rule reads only ``s_1`` and ``s_2``, so the head may have more pairs than ``sum(section)``: the
  extra pairs are temporal (Qwen4-Exp's default config, 128 pairs with section ``[11, 11, 10]``).
* Axial 2-D (Heo et al. 2024, "Rotary Position Embedding for Vision Transformer", arXiv
  2403.13298, Eq. 11): the first half of the pairs follow the row axis, the second half the column.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from posemb._validation import check_bool, check_int


def mrope_pair_axes(mrope_section: Sequence[int], *, interleaved: bool = False, pairs: int | None = None) -> Tensor:
    """(P,) long tensor: the axis (0 = temporal, 1 = height, 2 = width) each pair follows.
    ``P = pairs`` (default ``sum(mrope_section)``); the contiguous layout needs ``P == sum(mrope_section)``,
    the interleaved one takes any ``P >= 1``. See the module docstring for the two layouts."""
    section = check_mrope_section(mrope_section)
    check_bool("mrope_interleaved", interleaved)
    pairs = sum(section) if pairs is None else check_int("pairs", pairs, minimum=1)
    if not interleaved:
        if pairs != sum(section):
            raise ValueError(f"mrope_section must sum to rotary_dim / 2 = {pairs} (the number of channel pairs) "
                             f"for contiguous M-RoPE, got {list(section)} (sum {sum(section)})")
        return torch.repeat_interleave(torch.arange(3), torch.tensor(section))
    index = torch.arange(pairs)
    axes = torch.zeros(pairs, dtype=torch.long)
    for axis in (1, 2):
        axes[(index % 3 == axis) & (index < 3 * section[axis])] = axis
    return axes


def check_mrope_section(mrope_section: Sequence[int]) -> tuple[int, int, int]:
    """``mrope_section`` as a tuple of three pair counts (temporal, height, width), each >= 0."""
    if isinstance(mrope_section, (str, bytes)) or not isinstance(mrope_section, Sequence) or len(mrope_section) != 3:
        raise ValueError(f"mrope_section must be a list of 3 pair counts (temporal, height, width), "
                         f"got {mrope_section!r}")
    return tuple(check_int(f"mrope_section[{i}]", n, minimum=0) for i, n in enumerate(mrope_section))


def select_pair_axes(per_axis: Tensor, pair_axes: Tensor) -> Tensor:
    """Combine per-axis tables: ``per_axis`` is (A, ..., P) (the cos or sin of every pair at every
    axis's coordinate), ``pair_axes`` (P,) the axis of each pair; returns (..., P) with
    ``out[..., j] = per_axis[pair_axes[j], ..., j]``."""
    index = pair_axes.to(per_axis.device).expand(1, *per_axis.shape[1:])
    return per_axis.gather(0, index).squeeze(0)


def multi_axis_angles(positions: Tensor, inv_freq: Tensor, pair_axes: Tensor) -> Tensor:
    """float64 angles (batch, seq, P): ``positions[b, l, a(j)] * inv_freq[j]`` for integer
    ``positions`` (batch, seq, A). The float64 reference of every multi-axis rotary scheme."""
    coordinates = positions.to(torch.float64)[..., pair_axes.to(positions.device)]
    return coordinates * inv_freq.to(device=positions.device, dtype=torch.float64)
