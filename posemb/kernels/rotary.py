"""Fast RoPE application: one entry point that picks a back end by device and dtype.

The rotation (Su et al. 2021, RoFormer, arXiv 2104.09864, Eq. 34) turns each channel pair
``(x1, x2)`` of the first ``r = 2 * cos.shape[-1]`` channels by the angle ``theta``::

    y1 = x1 cos(theta) - x2 sin(theta),    y2 = x2 cos(theta) + x1 sin(theta)

Pairs are ``(i, i + r/2)`` in the half-split layout (Hugging Face ``rotate_half``, the default)
and ``(2i, 2i + 1)`` when ``interleaved=True``; channels past ``r`` pass through (partial rotary).
``cos``/``sin`` are (batch or 1, seq, r/2), normally float32 tables built by
:func:`posemb.functional.rope.rotary_cos_sin` from explicit positions, so position offsets (KV-cache
decoding) are just other rows of the table. Math runs in float32 (float64 for float64 inputs) and
the result is returned in ``x.dtype``.

Back ends (:func:`select_backend`):

========== ================================= ==============================================
name       when                              what
========== ================================= ==============================================
compiled   CPU tensors, once the optional C++   one compiled pass per row, reads and writes x
           kernel is loaded in this process   once (``rotary_compiled.py``); load it with
                                             ``posemb.kernels.load_compiled_cpu()`` or set
                                             ``POSEMB_COMPILED_KERNELS=1``
cpu        CPU tensors otherwise             eager chunked, in-place/``out=``: no allocation
                                             of the size of ``x`` (``rotary_cpu.py``)
triton     CUDA tensors, triton installed,   one Triton kernel (``rotary_triton.py``)
           dtype not float64
reference  anything else, or when cos/sin     the plain formula,
           require grad                      :func:`posemb.functional.rope.apply_rotary`
                                             (the oracle of the others)
========== ================================= ==============================================

Autograd: the rotation is linear in ``x`` and orthogonal, so its backward is the rotation of the
incoming gradient by ``-theta`` (the same kernel with ``sin`` negated); nothing of the size of
``x`` is saved. The backward is itself written with the autograd Function, so double backward
works too. Gradients with respect to ``cos``/``sin`` go through the reference formula.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from posemb._validation import check_choice, check_tensor
from posemb.functional.rope import apply_rotary as rotation_formula

BACKENDS = ("auto", "compiled", "cpu", "triton", "reference")


# ---- back-end selection -----------------------------------------------------------------------
def _triton_available() -> bool:
    try:
        from posemb.kernels import rotary_triton
    except Exception:  # pragma: no cover - broken triton installs
        return False
    return rotary_triton.available()


_env_load_tried = False


def _compiled_loaded() -> bool:
    """Whether the compiled CPU kernel is loaded; with ``POSEMB_COMPILED_KERNELS=1`` the first
    call builds or loads it (compiling takes tens of seconds, so it never happens unasked)."""
    global _env_load_tried
    from posemb.kernels import rotary_compiled
    if rotary_compiled.loaded():
        return True
    if not _env_load_tried and os.environ.get("POSEMB_COMPILED_KERNELS", "") == "1":
        _env_load_tried = True
        return rotary_compiled.load(build=True)
    return False


def select_backend(x: Tensor) -> str:
    """The back end :func:`apply_rotary` uses for ``x`` with ``backend="auto"``.

    On CPU: ``"compiled"`` when the optional C++ kernel is already loaded in this process (see
    ``posemb.kernels.load_compiled_cpu``), else ``"cpu"`` (and :func:`apply_rotary` keeps
    ``"cpu"`` for interleaved float32/float64, a single complex multiplication there). Under ``torch.compile`` tracing the
    reference formula is used: inductor fuses it into one kernel, and the eager kernels' pointer
    checks would only break the graph."""
    if torch.compiler.is_compiling():
        return "reference"
    if x.device.type == "cpu":
        return "compiled" if _compiled_loaded() else "cpu"
    if x.device.type == "cuda" and x.dtype != torch.float64 and _triton_available():
        return "triton"
    return "reference"


def _run_kernel(backend: str, x: Tensor, cos: Tensor, sin: Tensor, out: Tensor, interleaved: bool,
                sign: float) -> Tensor:
    if backend == "compiled":
        from posemb.kernels.rotary_compiled import rotate_compiled
        return rotate_compiled(x, cos, sin, out, interleaved=interleaved, sign=sign)
    if backend == "cpu":
        from posemb.kernels.rotary_cpu import rotate_cpu
        return rotate_cpu(x, cos, sin, out, interleaved=interleaved, sign=sign)
    if backend == "triton":
        from posemb.kernels.rotary_triton import rotate_triton
        return rotate_triton(x, cos, sin, out, interleaved=interleaved, sign=sign)
    result = rotation_formula(x, cos, sin if sign > 0 else -sin, interleaved=interleaved)
    return out.copy_(result)


class _Rotary(torch.autograd.Function):
    """``y = R(sign * theta) x`` with a fast kernel; backward is ``R(-sign * theta) grad``."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, sign: float, inplace: bool,
                backend: str) -> Tensor:
        out = x if inplace else torch.empty(x.shape, dtype=x.dtype, device=x.device)
        _run_kernel(backend, x, cos, sin, out, interleaved, sign)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        ctx.interleaved, ctx.sign, ctx.backend = interleaved, sign, backend
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        cos, sin = ctx.saved_tensors
        # The incoming gradient may be shared with other nodes: never rotate it in place.
        grad_x = _Rotary.apply(grad, cos, sin, ctx.interleaved, -ctx.sign, False, ctx.backend)
        return grad_x, None, None, None, None, None, None


# ---- packed q|k|v projections, rotated in place ---------------------------------------------------
def _packed_qk(packed: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """q and k of a packed projection as token-major views (batch * seq, heads, 1, head_dim).

    The kernels walk their (B, H, L, D) input row by row in that order; the (batch, heads, seq,
    head_dim) view of a packed projection has its rows 3 * heads * head_dim apart along the
    sequence, so that order would jump a page per row (measured 5-14x the copy floor). Seen as
    batch * seq "batches" of one position each, the rows are visited in memory order, and the
    tables become (batch * seq, 1, r/2) (:func:`_token_tables`)."""
    batch, length = packed.shape[0], packed.shape[1]
    five = packed.view(batch, length, 3, heads, -1)
    return (five[:, :, 0].reshape(batch * length, heads, 1, -1),
            five[:, :, 1].reshape(batch * length, heads, 1, -1))


def _token_tables(table: Tensor, batch: int) -> Tensor:
    """(batch or 1, seq, r/2) -> (batch * seq, 1, r/2), contiguous (a copy of a table, not of x)."""
    length, half = table.shape[1], table.shape[2]
    return table.expand(batch, length, half).reshape(batch * length, 1, half).contiguous()


class _PackedRotary(torch.autograd.Function):
    """Rotate the q and k thirds of a packed projection in place: ``y = [R q, R k, v]``.

    Backward: ``[R^-1 g_q, R^-1 g_k, g_v]``, written into the incoming gradient itself when
    ``grad_inplace`` and no double backward is being recorded, else into a copy of it."""

    @staticmethod
    def forward(ctx, packed: Tensor, cos_q: Tensor, sin_q: Tensor, cos_k: Tensor, sin_k: Tensor, heads: int,
                interleaved: bool, sign: float, backend: str, grad_inplace: bool) -> Tensor:
        q, k = _packed_qk(packed, heads)
        _run_kernel(backend, q, cos_q, sin_q, q, interleaved, sign)
        _run_kernel(backend, k, cos_k, sin_k, k, interleaved, sign)
        ctx.mark_dirty(packed)
        ctx.save_for_backward(cos_q, sin_q, cos_k, sin_k)
        ctx.options = (heads, interleaved, sign, backend, grad_inplace)
        return packed

    @staticmethod
    def backward(ctx, grad: Tensor):
        cos_q, sin_q, cos_k, sin_k = ctx.saved_tensors
        heads, interleaved, sign, backend, grad_inplace = ctx.options
        # A gradient may reach other nodes too (AddBackward hands one tensor to both inputs), so it
        # is overwritten only where the caller vouches that it is private (``grad_inplace``), and
        # never while a double backward is recorded (then the rotation is itself differentiated).
        recording = torch.is_grad_enabled()
        if not grad_inplace or recording or not grad.is_contiguous():
            grad = grad.clone(memory_format=torch.contiguous_format)
        grad_packed = _PackedRotary.apply(grad, cos_q, sin_q, cos_k, sin_k, heads, interleaved, -sign, backend,
                                          grad_inplace)
        return grad_packed, None, None, None, None, None, None, None, None, None


def apply_rotary_qkv_(qkv: Tensor, cos_q: Tensor, sin_q: Tensor, cos_k: Tensor | None = None,
                      sin_k: Tensor | None = None, *, heads: int, interleaved: bool = False,
                      backend: str = "auto", grad_inplace: bool = False) -> Tensor:
    """Rotate the queries and keys of a packed projection **in place**, differentiably.

    ``qkv`` is the output of one fused ``q|k|v`` projection, (batch, seq, 3 * heads * head_dim)
    (or the same memory viewed as (batch, seq, 3, heads, head_dim)): its thirds are q, k, v, each
    (batch, seq, heads, head_dim). Afterwards ``q = R(q positions) q`` and ``k = R(k positions) k``
    (:func:`apply_rotary`'s formula and back ends; ``cos_k``/``sin_k`` default to ``cos_q``/``sin_q``),
    v is untouched, and ``qkv`` itself is returned. The same interface as flash-attn's
    ``apply_rotary_emb_qkv_`` (``flash_attn/layers/rotary.py``), for the layout of a packed
    projection, so the rotation costs one read and one write of q and k and no allocation.

    Autograd: an ``autograd.Function`` that marks ``qkv`` dirty; its backward is the rotation by
    ``-theta`` of the q and k thirds of the gradient (nothing of the size of ``qkv`` is saved; double
    backward works). Pass the projection's output itself, not a view of it: autograd refuses an
    in-place change of a leaf that requires grad, and rewrites a view's history through a copy of
    its base. ``grad_inplace=True`` also rotates the incoming gradient in place (no allocation in
    the backward either); only a caller that knows the gradient reaching ``qkv`` is private to it
    may pass it (``MultiHeadAttention.forward`` does: ``qkv``'s only consumer is its own
    view/permute/unbind, whose backward stacks a fresh gradient).

    Never call it on a tensor someone else still reads as unrotated (a forward hook's copy of the
    projection, a KV cache of raw keys): the memory is overwritten.
    """
    check_tensor("qkv", qkv, floating=True)
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
        raise ValueError(f"heads must be a positive int, got {heads!r}")
    if qkv.dim() == 5:
        if qkv.shape[2] != 3 or qkv.shape[3] != heads:
            raise ValueError(f"qkv of 5 dimensions must be (batch, seq, 3, heads={heads}, head_dim), got "
                             f"{tuple(qkv.shape)}")
    elif qkv.dim() != 3 or qkv.shape[-1] % (3 * heads):
        raise ValueError(f"qkv must be (batch, seq, 3 * heads * head_dim) with heads={heads}, or (batch, seq, 3, "
                         f"heads, head_dim), got shape {tuple(qkv.shape)}")
    if qkv.stride(-1) != 1 or not qkv.view(qkv.shape[0], qkv.shape[1], -1).is_contiguous():
        raise ValueError(f"qkv must be contiguous (a projection's output), got strides {qkv.stride()}")
    if not isinstance(grad_inplace, bool):
        raise TypeError(f"grad_inplace must be a bool, got {type(grad_inplace).__name__} ({grad_inplace!r})")
    if (cos_k is None) != (sin_k is None):
        raise ValueError("cos_k and sin_k must be given together (or both left out to reuse cos_q/sin_q)")
    if cos_k is None:
        cos_k, sin_k = cos_q, sin_q
    batch, length = qkv.shape[0], qkv.shape[1]
    head_dim = qkv.shape[-1] if qkv.dim() == 5 else qkv.shape[-1] // (3 * heads)
    view = qkv.view(batch, length, 3, heads, head_dim)
    _check_tables("q", view[:, :, 0].transpose(1, 2), "cos_q", cos_q, "sin_q", sin_q)
    _check_tables("k", view[:, :, 1].transpose(1, 2), "cos_k", cos_k, "sin_k", sin_k)
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {type(interleaved).__name__} ({interleaved!r})")
    backend = _resolve_backend("qkv", qkv, backend, interleaved)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (cos_q, sin_q, cos_k, sin_k)):
        raise ValueError("apply_rotary_qkv_ does not differentiate through cos/sin; use apply_rotary_qk, whose "
                         "reference path does")
    shared = cos_k is cos_q and sin_k is sin_q
    cos_q, sin_q = _token_tables(cos_q, batch), _token_tables(sin_q, batch)
    cos_k, sin_k = (cos_q, sin_q) if shared else (_token_tables(cos_k, batch), _token_tables(sin_k, batch))
    q, k = _packed_qk(qkv, heads)
    if torch.is_grad_enabled() and qkv.requires_grad:
        return _PackedRotary.apply(qkv, cos_q, sin_q, cos_k, sin_k, heads, interleaved, 1.0, backend,
                                   grad_inplace)
    _run_kernel(backend, q, cos_q, sin_q, q, interleaved, 1.0)
    _run_kernel(backend, k, cos_k, sin_k, k, interleaved, 1.0)
    return qkv


# ---- validation -------------------------------------------------------------------------------
def _check_tables(x_name: str, x: Tensor, cos_name: str, cos: Tensor, sin_name: str, sin: Tensor) -> None:
    check_tensor(x_name, x, ndim=4, floating=True)
    check_tensor(cos_name, cos, ndim=3, floating=True)
    check_tensor(sin_name, sin, ndim=3, floating=True)
    if cos.shape != sin.shape:
        raise ValueError(f"{cos_name} and {sin_name} must have the same shape, got {tuple(cos.shape)} "
                         f"and {tuple(sin.shape)}")
    batch, _, length, dim = x.shape
    if cos.shape[0] not in (1, batch) or cos.shape[1] != length:
        raise ValueError(f"{cos_name} must have shape (batch or 1, seq, rotary_dim / 2) = ({batch} or 1, "
                         f"{length}, r/2) to match {x_name} of shape {tuple(x.shape)}, got {tuple(cos.shape)}")
    if cos.shape[2] < 1 or 2 * cos.shape[2] > dim:
        raise ValueError(f"{cos_name}.shape[-1] (rotary_dim / 2) must be in 1 .. head_dim / 2 = {dim // 2} "
                         f"for {x_name} of shape {tuple(x.shape)}, got {cos.shape[2]}")
    for name, table in ((cos_name, cos), (sin_name, sin)):
        if table.device != x.device:
            raise ValueError(f"{name} must be on {x_name}'s device {x.device}, got {table.device}")


def _check_out(x_name: str, x: Tensor, out: Tensor) -> None:
    if not isinstance(out, Tensor):
        raise TypeError(f"out for {x_name} must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out for {x_name} must have {x_name}'s shape {tuple(x.shape)}, dtype {x.dtype} and "
                         f"device {x.device}, got {tuple(out.shape)}, {out.dtype}, {out.device}")
    if out.data_ptr() != x.data_ptr() and _overlaps(out, x):
        raise ValueError(f"out for {x_name} partially overlaps {x_name}; pass inplace=True to rotate in place "
                         "or a separate buffer")


def _overlaps(a: Tensor, b: Tensor) -> bool:
    """Conservative check that two tensors' memory ranges intersect."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t: Tensor) -> tuple[int, int]:
        start = t.data_ptr()
        extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 0)
        return start, start + (extent + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


# ---- public API -------------------------------------------------------------------------------
def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = False, inplace: bool = False,
                 out: Tensor | None = None, backend: str = "auto") -> Tensor:
    """Rotate ``x`` (batch, heads, seq, head_dim) by the angles behind ``cos``/``sin``
    (batch or 1, seq, r/2); channels past ``r = 2 * cos.shape[-1]`` pass through.

    Args:
        interleaved: pairs (2i, 2i+1) instead of (i, i + r/2).
        inplace: overwrite ``x`` and return it (fastest: no allocation). Under autograd ``x`` must
            not be a leaf that requires grad, nor one of several views returned by ``unbind``/``split``.
        out: write into this preallocated tensor (x's shape, dtype, device) and return it; not
            differentiable, like PyTorch's own ``out=``.
        backend: ``"auto"`` (see :func:`select_backend`), ``"compiled"`` (CPU, after
            ``posemb.kernels.load_compiled_cpu()``), ``"cpu"``, ``"triton"`` or ``"reference"``.

    Returns the rotated tensor in ``x.dtype``: ``x`` itself (inplace), ``out``, or a new tensor.
    """
    return _apply("x", x, cos, sin, interleaved=interleaved, inplace=inplace, out=out, backend=backend)


def apply_rotary_qk(q: Tensor, k: Tensor, cos_q: Tensor, sin_q: Tensor, cos_k: Tensor | None = None,
                    sin_k: Tensor | None = None, *, interleaved: bool = False, inplace: bool = False,
                    out: tuple[Tensor, Tensor] | None = None, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Rotate queries and keys: ``(R(q positions) q, R(k positions) k)``.

    ``cos_k``/``sin_k`` default to ``cos_q``/``sin_q`` (same positions); pass them when the keys
    sit at other positions (KV cache: keys cover the whole context, queries the last few tokens).
    ``out`` is a pair ``(out_q, out_k)``. Other arguments as in :func:`apply_rotary`.
    """
    if (cos_k is None) != (sin_k is None):
        raise ValueError("cos_k and sin_k must be given together (or both left out to reuse cos_q/sin_q), "
                         f"got cos_k={'None' if cos_k is None else 'a tensor'}, "
                         f"sin_k={'None' if sin_k is None else 'a tensor'}")
    if cos_k is None:
        cos_k, sin_k = cos_q, sin_q
    out_q = out_k = None
    if out is not None:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError(f"out must be a pair (out_q, out_k) of tensors, got {type(out).__name__}")
        out_q, out_k = out
    rotated_q = _apply("q", q, cos_q, sin_q, interleaved=interleaved, inplace=inplace, out=out_q,
                       backend=backend, cos_name="cos_q", sin_name="sin_q")
    rotated_k = _apply("k", k, cos_k, sin_k, interleaved=interleaved, inplace=inplace, out=out_k,
                       backend=backend, cos_name="cos_k", sin_name="sin_k")
    return rotated_q, rotated_k


def _apply(name: str, x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool, inplace: bool,
           out: Tensor | None, backend: str, cos_name: str = "cos", sin_name: str = "sin") -> Tensor:
    _check_tables(name, x, cos_name, cos, sin_name, sin)
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {type(interleaved).__name__} ({interleaved!r})")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__} ({inplace!r})")
    if inplace and out is not None:
        raise ValueError("pass either inplace=True or out=, not both")
    backend = _resolve_backend(name, x, backend, interleaved)
    if out is not None:
        _check_out(name, x, out)
        inplace, out_is_x = False, out.data_ptr() == x.data_ptr() and out.stride() == x.stride()
        if out_is_x:
            inplace = True
    grad_needed = torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad)
    if grad_needed and out is not None and not inplace:
        raise ValueError(f"out= does not support autograd ({name} or its cos/sin require grad); "
                         "call without out= to get a differentiable result")
    if grad_needed and (cos.requires_grad or sin.requires_grad):
        # Gradients for the tables themselves: the plain formula, differentiable in all inputs.
        result = rotation_formula(x, cos, sin, interleaved=interleaved)
        return x.copy_(result) if inplace else result
    # Small (B|1, L, r/2) tables: contiguous copies are cheap and simplify every kernel.
    cos, sin = cos.contiguous(), sin.contiguous()
    if grad_needed:
        return _Rotary.apply(x, cos, sin, interleaved, 1.0, inplace, backend)
    if inplace:
        return _run_kernel(backend, x, cos, sin, x, interleaved, 1.0)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return _run_kernel(backend, x, cos, sin, out, interleaved, 1.0)


def _resolve_backend(name: str, x: Tensor, backend: str, interleaved: bool) -> str:
    """The back end to run for ``x``: ``backend`` checked against the device, or ``auto``'s choice."""
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        backend = select_backend(x)
        if backend == "compiled" and interleaved and x.dtype in (torch.float32, torch.float64):
            # The eager path does this case as one complex multiplication, which measured as fast
            # as the compiled loop on large tensors and faster on small rows (docs/performance.md).
            backend = "cpu"
    elif backend == "cpu" and x.device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got {name} on {x.device}")
    elif backend == "compiled" and x.device.type != "cpu":
        raise ValueError(f"backend='compiled' needs CPU tensors, got {name} on {x.device}")
    elif backend == "compiled" and not _compiled_loaded():
        raise ValueError("backend='compiled' needs the compiled CPU kernel: call "
                         "posemb.kernels.load_compiled_cpu() first (or set POSEMB_COMPILED_KERNELS=1)")
    elif backend == "triton" and not _triton_available():
        raise ValueError("backend='triton' needs triton, which is not installed")
    return backend
