"""RoPE as one Triton kernel for CUDA tensors (also runs on CPU under ``TRITON_INTERPRET=1``).

One program handles ``BLOCK_ROWS`` rows of the flattened (batch, heads, seq) grid and all pairs of
each row: it loads ``x1``, ``x2`` (half-split pairs ``(i, i + r/2)`` or interleaved ``(2i, 2i+1)``)
and the row's ``cos``/``sin``, computes in float32::

    y1 = x1 cos - sign x2 sin,    y2 = x2 cos + sign x1 sin

(RoFormer, arXiv 2104.09864, Eq. 34; ``sign = -1`` is the inverse rotation, used by backward) and
stores in ``out``'s dtype. ``out`` may alias ``x`` (in place): each element is read before it is
written by the same program. Channels past ``r`` are copied only when ``out`` is not ``x``.
Arbitrary strides are honoured, so q and k may be views of a fused qkv projection.

Importing this module imports triton; :func:`available` says whether that works.
"""
from __future__ import annotations

import torch
from torch import Tensor

try:  # triton is optional: CPU-only installs and CI without it skip this path
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the installation
    triton = None
    tl = None


def available() -> bool:
    """True when triton imports."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _rotary_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr,
                       n_rows, heads, length, half, tail,
                       sxb, sxh, sxl, sxd, sob, soh, sol, sod, scb, scl, scd,
                       sign, pair_stride, second_offset,
                       COPY_TAIL: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_PAIRS: tl.constexpr,
                       BLOCK_TAIL: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < n_rows
        pos = rows % length
        bh = rows // length
        head = bh % heads
        batch = bh // heads
        pairs = tl.arange(0, BLOCK_PAIRS)
        pair_ok = pairs < half
        mask = row_ok[:, None] & pair_ok[None, :]
        x_row = batch.to(tl.int64) * sxb + head.to(tl.int64) * sxh + pos.to(tl.int64) * sxl
        o_row = batch.to(tl.int64) * sob + head.to(tl.int64) * soh + pos.to(tl.int64) * sol
        # cos/sin have batch stride 0 when they broadcast over the batch.
        c_row = batch.to(tl.int64) * scb + pos.to(tl.int64) * scl
        first = pairs * pair_stride
        second = first + second_offset
        x1 = tl.load(x_ptr + x_row[:, None] + first[None, :] * sxd, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + x_row[:, None] + second[None, :] * sxd, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + c_row[:, None] + pairs[None, :] * scd, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + c_row[:, None] + pairs[None, :] * scd, mask=mask, other=0.0).to(tl.float32) * sign
        y1 = x1 * c - x2 * s
        y2 = x2 * c + x1 * s
        tl.store(out_ptr + o_row[:, None] + first[None, :] * sod, y1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + o_row[:, None] + second[None, :] * sod, y2.to(out_ptr.dtype.element_ty), mask=mask)
        if COPY_TAIL:
            channels = tl.arange(0, BLOCK_TAIL)
            tail_mask = row_ok[:, None] & (channels < tail)[None, :]
            offset = 2 * half + channels
            rest = tl.load(x_ptr + x_row[:, None] + offset[None, :] * sxd, mask=tail_mask, other=0.0)
            tl.store(out_ptr + o_row[:, None] + offset[None, :] * sod, rest, mask=tail_mask)


def rotate_triton(x: Tensor, cos: Tensor, sin: Tensor, out: Tensor, *, interleaved: bool,
                  sign: float = 1.0) -> Tensor:
    """Write the rotation of ``x`` (B, H, L, D) by ``cos``/``sin`` (B or 1, L, r/2) into ``out``
    (which may be ``x``). Arguments are assumed validated by :mod:`posemb.kernels.rotary`."""
    if triton is None:
        raise RuntimeError("triton is not installed; rotate_triton cannot run")
    batch, heads, length, dim = x.shape
    half = cos.shape[-1]
    tail = dim - 2 * half
    inplace = out.data_ptr() == x.data_ptr()
    n_rows = batch * heads * length
    if n_rows == 0:
        return out
    block_pairs = triton.next_power_of_2(half)
    block_tail = triton.next_power_of_2(max(tail, 1))
    # About 4K pairs per program: enough work to hide latency, few enough registers.
    block_rows = max(1, min(64, 4096 // block_pairs))
    # cos and sin arrive contiguous with one shape (the dispatcher makes them so); a batch of one
    # broadcasts through a zero batch stride.
    cos, sin = cos.contiguous(), sin.contiguous()
    cos_b_stride = 0 if cos.shape[0] == 1 else cos.stride(0)
    grid = (triton.cdiv(n_rows, block_rows),)
    _rotary_kernel[grid](
        x, out, cos, sin, n_rows, heads, length, half, tail,
        *x.stride(), *out.stride(), cos_b_stride, cos.stride(1), cos.stride(2),
        float(sign), 2 if interleaved else 1, 1 if interleaved else half,
        COPY_TAIL=(tail > 0 and not inplace), BLOCK_ROWS=block_rows, BLOCK_PAIRS=block_pairs,
        BLOCK_TAIL=block_tail,
    )
    return out
