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

With autograd each block runs under ``torch.utils.checkpoint`` (non-reentrant): the block's widened
q', k' are rebuilt in the backward pass instead of being kept, so nothing of size
(Lk, head_dim + 1) per block outlives the forward; gradients reach q, k, v and, through ``b``, the
scheme's parameters by autograd. Queries are the last Lq of the Lk keys (the KV-cache case): query
row i sees keys ``0 .. i + Lk - Lq``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from posemb.model.attention import causal_mask
from posemb.schemes.base import PositionalScheme

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


__all__ = ["BLOCK_ROWS", "key_bias_attention"]
