"""Causal attention whose positional term is a per-key bias, on PyTorch's fused SDPA kernels.

A content scheme that sets ``content_key_bias`` (the forgetting gate) adds ``a_i + b_j`` to query
i's logit for key j: a per-query column and a per-key row, nothing on the values. Softmax over j
ignores the column, so the attention is

    softmax_j(scale * q_i . k_j + b_j) = SDPA(q', k', v)  with  q'_i = [q_i, 1],  k'_j = [k_j, b_j / scale]

(one extra channel carries the bias; SDPA multiplies by ``scale``). The row grows with the sequence
(the forgetting gate's ``b_j = -c_j`` is a cumulative sum of log-gates), and in float32 a large ``b_j``
would round away the small differences that decide the near keys. So queries go in blocks of
``BLOCK_ROWS`` rows and each block takes the row rebased on its own first query r, ``b_j - b_r``
(the scheme's ``key_bias(state, reference=r, stop=...)``, formed in float64): near keys get small
values, far keys large negative ones, whose probabilities are negligible either way. Measured at
L = 2048 with strong forgetting (f ~ 0.73, ``bench/forgetting_fused_probe.py``): output within 9e-6
of float64 (the tiled path: 2.4e-6), gradients of q, k, v within 2-3e-6 relative (tiled: 1.2-1.6e-5),
forward + backward in about half the tiled path's time.

With autograd on CPU (:class:`_KeyBiasAttention`): each block runs PyTorch's fused CPU flash kernel
(``_scaled_dot_product_flash_attention_for_cpu``), which returns the rows' log-sum-exps, and only the
block's output and log-sum-exps are kept; the backward rebuilds the block's q', k' and calls the kernel's
own backward, whose gradient of the extra key channel is ``scale dL/db_j`` (the channel holds b_j / scale).
The rows' gradients then go back through ``key_bias`` and the per-call state to k and the scheme's
parameters by autograd, block by block (keeping every block's row and graph for one call would hold
batch * heads * Lq * Lk / BLOCK_ROWS values).
Before, each block ran under ``torch.utils.checkpoint``, which repeats the block's forward in the
backward pass: a 2048-token training step (``posemb bench --sections step``) took 1.65x NoPE's time. That
path remains for other devices and for ``attention._CONTENT_PATH = "autograd"``, which promises plain
autograd (so double backward). The block's causal mask is a strided view of one 0 / -inf row with the
block's queries in reversed order (as in ``posemb.kernels.flex``'s Toeplitz path): no (rows, Lk) mask.
Queries are the last Lq of the Lk keys (the KV-cache case): query row i sees keys ``0 .. i + Lk - Lq``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from posemb.kernels.flex import flash_cpu_operands
from posemb.model import attention as _attention
from posemb.model.attention import causal_mask
from posemb.model.content_autograd import _state_leaves
from posemb.schemes.base import PositionalScheme

_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16)

#: query rows per block: the rebased bias inside a block spans at most this many tokens' worth of
#: the row (128: output error 9e-6 against float64 at L = 2048; 64: 6e-6, ~25 % slower)
BLOCK_ROWS = 128


def _block(q: Tensor, k: Tensor, v: Tensor, scheme: PositionalScheme, state, start: int, stop: int,
           offset: int, scale: float) -> Tensor:
    key_stop = stop + offset
    row = scheme.key_bias(state, reference=start + offset, stop=key_stop)  # (batch, heads, key_stop)
    q_block = torch.cat([q[:, :, start:stop], q.new_ones(*q.shape[:2], stop - start, 1)], dim=-1)
    k_block = torch.cat([k[:, :, :key_stop], (row / scale).to(k.dtype)[..., None]], dim=-1)
    # the block's rows are the last stop - start of its key_stop keys: row i sees keys <= i + offset
    mask = causal_mask(stop - start, key_stop, q.device) if stop - start > 1 else None
    return F.scaled_dot_product_attention(q_block, k_block, v[:, :, :key_stop], attn_mask=mask, scale=scale)[..., :-1]


def key_bias_attention(q: Tensor, k: Tensor, v: Tensor, scheme: PositionalScheme, state, *,
                       needs_grad: bool) -> Tensor:
    """Causal attention of q (batch, heads, Lq, d) over k, v (batch, heads, Lk, d), Lq <= Lk, with the
    per-key bias of ``scheme.key_bias`` (see the module docstring). Returns (batch, heads, Lq, d_v)."""
    q_len, k_len = q.shape[-2], k.shape[-2]
    offset = k_len - q_len
    scale = scheme.logit_scale(q.shape[-1])
    if needs_grad and _attention._CONTENT_PATH == "recompute" and flash_cpu_operands(q, k, v, _FLASH_DTYPES):
        kept: list[tuple[Tensor, Tensor]] = []
        _state_leaves(state, kept, None, None)
        return _KeyBiasAttention.apply(q, k, v, (scheme, state, offset, scale), *(tensor for tensor, _ in kept))
    # q', k' are one channel wider than v: CPU SDPA then leaves its fused kernel for the math one,
    # which forms the (rows, Lk) scores (measured 2.2x slower for a 128-row block at Lk = 2048); a
    # zero column brings v to their width and is sliced off each block's output.
    v = F.pad(v, (0, 1))
    outputs = []
    for start in range(0, q_len, BLOCK_ROWS):
        stop = min(start + BLOCK_ROWS, q_len)
        if needs_grad:
            outputs.append(checkpoint(_block, q, k, v, scheme, state, start, stop, offset, scale,
                                      use_reentrant=False))
        else:
            outputs.append(_block(q, k, v, scheme, state, start, stop, offset, scale))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-2)


def _flash_block(q: Tensor, k: Tensor, v_wide: Tensor, scheme: PositionalScheme, state, start: int, stop: int,
                 offset: int, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fused kernel's operands for query rows [start, stop), reversed: ``(q', k', mask, row)``."""
    rows, key_stop = stop - start, stop + offset
    row = scheme.key_bias(state, reference=start + offset, stop=key_stop)
    q_block = torch.cat([q[:, :, start:stop].flip(2), q.new_ones(*q.shape[:2], rows, 1)], dim=-1)
    k_block = torch.cat([k[:, :, :key_stop], (row / scale).to(k.dtype)[..., None]], dim=-1)
    # reversed row i' sees keys j <= key_stop - 1 - i': mask[i', j] = line[i' + j]
    line = q.new_zeros(rows + key_stop - 1)
    line[key_stop:] = float("-inf")
    mask = line.as_strided((rows, key_stop), (1, 1))
    return q_block, k_block, mask, row


class _KeyBiasAttention(torch.autograd.Function):
    """``apply(q, k, v, (scheme, state, offset, scale), *state tensors that require grad)``: see the module."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, call: tuple, *state_tensors: Tensor) -> Tensor:
        scheme, state, offset, scale = call
        v_wide = F.pad(v, (0, 1))
        outputs, lses, blocks = [], [], []
        with torch.no_grad():
            for start in range(0, q.shape[-2], BLOCK_ROWS):
                stop = min(start + BLOCK_ROWS, q.shape[-2])
                q_block, k_block, mask, _ = _flash_block(q, k, v_wide, scheme, state, start, stop, offset, scale)
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q_block, k_block, v_wide[:, :, :stop + offset], attn_mask=mask, scale=scale)[:2]
                outputs.append(out)
                lses.append(lse)
                blocks.append((start, stop))
        ctx.call, ctx.blocks = call, blocks
        ctx.save_for_backward(q, k, v, *outputs, *lses)
        result = [out[..., :-1].flip(2) for out in outputs]
        return result[0] if len(result) == 1 else torch.cat(result, dim=2)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, *saved = ctx.saved_tensors
        scheme, state, offset, scale = ctx.call
        blocks = ctx.blocks
        outputs, lses = saved[:len(blocks)], saved[len(blocks):]
        head_dim = q.shape[-1]
        v_wide = F.pad(v, (0, 1))
        grad_wide = F.pad(grad, (0, 1))
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        kept: list[tuple[Tensor, Tensor]] = []
        with torch.enable_grad():
            leaf_state = _state_leaves(state, kept, None, None)
        leaves = [leaf for _, leaf in kept]
        state_grads: list[Tensor | None] = [None] * len(leaves)
        for (start, stop), out, lse in zip(blocks, outputs, lses):
            key_stop = stop + offset
            with torch.enable_grad():
                q_block, k_block, mask, row = _flash_block(q, k, v_wide, scheme, leaf_state, start, stop, offset,
                                                           scale)
            gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_wide[:, :, start:stop].flip(2).contiguous(), q_block.detach(), k_block.detach(),
                v_wide[:, :, :key_stop], out, lse, 0.0, False, attn_mask=mask, scale=scale)
            dq[:, :, start:stop] = gq[..., :head_dim].flip(2)
            dk[:, :, :key_stop] += gk[..., :head_dim]
            dv[:, :, :key_stop] += gv[..., :head_dim]
            if row.requires_grad and leaves:
                # (block by block: keeping every block's row and graph for one call would hold
                # batch * heads * Lq * Lk / BLOCK_ROWS values)
                got = torch.autograd.grad(row, leaves, (gk[..., head_dim] / scale).to(row.dtype), allow_unused=True)
                state_grads = [g if a is None else a if g is None else a.add_(g) for a, g in zip(state_grads, got)]
        return (dq, dk, dv, None, *state_grads)


__all__ = ["BLOCK_ROWS", "key_bias_attention"]
