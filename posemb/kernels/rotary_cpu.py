"""RoPE on CPU in eager PyTorch, written to stay near the memory floor.

The rotation (Su et al. 2021, RoFormer, arXiv 2104.09864, Eq. 34) of each channel pair
``(x1, x2)`` by the angle ``theta`` is::

    y1 = x1 * cos(theta) - x2 * sin(theta)
    y2 = x2 * cos(theta) + x1 * sin(theta)

with pairs ``(i, i + r/2)`` in the half-split layout (Hugging Face ``rotate_half``) and
``(2i, 2i + 1)`` in the interleaved layout (the paper, Meta's reference code). ``sign=-1``
rotates by ``-theta`` (the inverse, which is also the backward of the rotation).

Why it is written this way (measurements in ``docs/performance.md``):

* A fresh output of >= 32 MiB costs one page fault per 4 KiB page with glibc's allocator, which
  is more than the arithmetic. So the in-place path writes back into ``x`` and the ``out=`` path
  into the caller's buffer; neither allocates anything of the size of ``x``.
* ``rotate_half`` + ``cat`` materialises two temporaries the size of ``x``. Here every product
  is written with ``out=`` / ``mul_`` / ``addcmul_`` into slices of the destination.
* The work is cut into chunks of about :data:`CHUNK_BYTES` so the few passes each chunk needs
  run in cache and only one read and one write of ``x`` reach DRAM (except the interleaved
  float32/float64 case, which is a single pass anyway and runs as one op).
* The interleaved layout is exactly a complex multiplication ``(x1 + i x2) * e^{i theta}``, which
  PyTorch does in one vectorised pass (``view_as_complex``).
* bf16/fp16 inputs are upcast chunk by chunk into a float32 scratch buffer, so the math is float32
  (as in the reference) and the result is rounded once.
* The half-split layout has no such single op (its pairs are 64 channels apart), so it costs four
  elementwise passes per chunk, in cache; on CPU it is about twice the interleaved cost.
"""
from __future__ import annotations

import threading

import torch
from torch import Tensor

#: Bytes of ``x`` processed per chunk: small enough that a chunk's temporaries stay in L2/L3,
#: large enough that the Python overhead per chunk (a few ops of ~5 us) stays negligible.
CHUNK_BYTES = 4 << 20

_scratch = threading.local()


def _scratch_buffer(name: str, numel: int, dtype: torch.dtype) -> Tensor:
    """A per-thread reusable flat buffer: a fresh multi-MiB ``empty`` would page-fault every call."""
    # A buffer made under torch.inference_mode is an inference tensor, which may not be written
    # outside it (and the reverse holds for version counters): one buffer per mode.
    key = (name, dtype, torch.is_inference_mode_enabled())
    cache = getattr(_scratch, "buffers", None)
    if cache is None:
        cache = _scratch.buffers = {}
    buffer = cache.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = cache[key] = torch.empty(numel, dtype=dtype)
    return buffer[:numel]


def _pairs(x: Tensor, rotary: int, interleaved: bool) -> tuple[Tensor, Tensor]:
    """Views of the first and second member of every rotated pair."""
    if interleaved:
        return x[..., 0:rotary:2], x[..., 1:rotary:2]
    half = rotary // 2
    return x[..., :half], x[..., half:rotary]


def _complex_view(x: Tensor, rotary: int) -> Tensor | None:
    """``x[..., :rotary]`` seen as complex numbers (pairs 2i, 2i+1), or None if the strides forbid it."""
    if x.dtype not in (torch.float32, torch.float64) or x.stride(-1) != 1:
        return None
    if x.storage_offset() % 2 or any(s % 2 for s in x.stride()[:-1]):
        return None
    pairs = x.unflatten(-1, (x.shape[-1] // 2, 2))
    return torch.view_as_complex(pairs)[..., : rotary // 2]


def _rotate_pairs_inplace(x1: Tensor, x2: Tensor, cos: Tensor, sin: Tensor, sign: float) -> None:
    """Rotate the pair halves ``x1``, ``x2`` (same dtype as cos/sin) in place, with exactly the
    operations of the out-of-place path (``y1 = mul(x1, c).addcmul_(x2, s, -sign)``, ``y2 =
    mul(x2, c).addcmul_(x1, s, sign)``), so in place and out of place agree bit for bit (addcmul
    may fuse a multiply-add, so any other order rounds differently; the model's in-place training
    path must equal the out-of-place rotation, e.g. a text-only M-RoPE model equals RoPE exactly).
    y1 goes to a chunk-sized scratch (in cache) until x1 is no longer read; five passes."""
    scratch = _scratch_buffer("pair", x1.numel(), x1.dtype).view(x1.shape)
    torch.mul(x1, cos, out=scratch).addcmul_(x2, sin, value=-sign)
    x2.mul_(cos).addcmul_(x1, sin, value=sign)
    x1.copy_(scratch)


def _rotate_chunk(x: Tensor, out: Tensor, cos: Tensor, sin: Tensor, rotary: int, interleaved: bool,
                  sign: float, phase: Tensor | None) -> None:
    """Rotate one chunk ``x`` (b, H, l, D) into ``out`` (may be ``x``); cos/sin/phase are (b|1, 1, l, r/2)."""
    inplace = out.data_ptr() == x.data_ptr() and out.stride() == x.stride()
    compute = torch.promote_types(x.dtype, cos.dtype)
    if x.dtype == compute:
        # Interleaved float32/float64 arrives here only when its strides forbid a complex view.
        x1, x2 = _pairs(x, rotary, interleaved)
        if inplace:
            _rotate_pairs_inplace(x1, x2, cos, sin, sign)
            return
        o1, o2 = _pairs(out, rotary, interleaved)
        torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-sign)
        torch.mul(x2, cos, out=o2).addcmul_(x1, sin, value=sign)
        if rotary < x.shape[-1]:
            out[..., rotary:].copy_(x[..., rotary:])
        return
    # bf16/fp16 input: upcast the rotated channels into a float32 scratch (one copy), rotate there
    # with the float32 passes above, round once on the copy back. (Writing the products straight
    # into the bf16 destination through ``out=`` casts is ~1.2x slower: mixed-dtype loops.)
    work = _scratch_buffer("upcast", x[..., :rotary].numel(), compute).view(*x.shape[:-1], rotary)
    work.copy_(x[..., :rotary])
    if interleaved and phase is not None:
        torch.view_as_complex(work.unflatten(-1, (rotary // 2, 2))).mul_(phase)
    else:
        _rotate_pairs_inplace(*_pairs(work, rotary, interleaved), cos, sin, sign)
    out[..., :rotary].copy_(work)
    if not inplace and rotary < x.shape[-1]:
        out[..., rotary:].copy_(x[..., rotary:])


def rotate_cpu(x: Tensor, cos: Tensor, sin: Tensor, out: Tensor, *, interleaved: bool, sign: float = 1.0) -> Tensor:
    """Write the rotation of ``x`` (B, H, L, D) by the angles behind ``cos``/``sin`` (B or 1, L, r/2)
    into ``out`` (``out`` may be ``x`` itself: then it is rotated in place). Returns ``out``.

    Arguments are assumed validated (see :mod:`posemb.kernels.rotary`). ``sign=-1`` applies the
    inverse rotation. Math runs in ``promote_types(x.dtype, cos.dtype)`` (float32 for bf16/fp16).
    """
    batch, heads, length, dim = x.shape
    rotary = 2 * cos.shape[-1]
    compute = torch.promote_types(x.dtype, cos.dtype)
    cos4, sin4 = cos.to(compute)[:, None], sin.to(compute)[:, None]
    phase = None
    if interleaved:
        # e^{i sign theta}: one small (B|1, 1, L, r/2) table per call, cheap next to x.
        phase = torch.complex(cos4, sin4 if sign > 0 else -sin4)
    if phase is not None and x.dtype == compute:
        # Interleaved, full precision: one complex multiplication reads and writes x exactly once,
        # so chunking would only add per-op overhead (measured: one op is fastest at every size).
        x_c, out_c = _complex_view(x, rotary), _complex_view(out, rotary)
        if x_c is not None and out_c is not None:
            if out.data_ptr() == x.data_ptr() and out.stride() == x.stride():
                x_c.mul_(phase)
            else:
                torch.mul(x_c, phase, out=out_c)
                if rotary < dim:
                    out[..., rotary:].copy_(x[..., rotary:])
            return out
    # Chunk over whole batches when a batch is small, else over sequence positions inside a batch.
    row_bytes = heads * dim * x.element_size()
    rows_per_chunk = max(1, CHUNK_BYTES // row_bytes)
    batches_per_chunk = max(1, rows_per_chunk // length)
    broadcast = cos.shape[0] == 1
    if batches_per_chunk > 1 or rows_per_chunk >= length:
        for b0 in range(0, batch, batches_per_chunk):
            b1 = min(batch, b0 + batches_per_chunk)
            tb = slice(0, 1) if broadcast else slice(b0, b1)
            _rotate_chunk(x[b0:b1], out[b0:b1], cos4[tb], sin4[tb], rotary, interleaved, sign,
                          None if phase is None else phase[tb])
        return out
    for b in range(batch):
        tb = slice(0, 1) if broadcast else slice(b, b + 1)
        for l0 in range(0, length, rows_per_chunk):
            l1 = min(length, l0 + rows_per_chunk)
            _rotate_chunk(x[b:b + 1, :, l0:l1], out[b:b + 1, :, l0:l1], cos4[tb, :, l0:l1], sin4[tb, :, l0:l1],
                          rotary, interleaved, sign, None if phase is None else phase[tb, :, l0:l1])
    return out
