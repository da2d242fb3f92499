"""Causal attention with Transformer-XL's relative terms on PyTorch's fused CPU attention kernel, with a
hand-written backward.

Transformer-XL (Dai et al. 2019, arXiv 1901.02860, §3.3) scores query i against key j as

    scale [(q_i + u) . k_j + (q_i + v) . r_{i-j}],   r_d = W_R R_d  (one table row per distance),

so the content terms are plain attention of ``q + u`` and the positional terms are a per-query score
against every distance, ``P_i[d] = scale (q_i + v) . r_d``, read along the diagonals. Per query block, rows
reversed (as in :mod:`posemb.kernels.flex`'s Toeplitz path), ``P`` against the block's distances in
descending order makes ``bias[i', j] = P[i', i' + j]``: a strided view of ``P`` (row stride one more than
its width), no index and no (rows, keys) copy; the distances past the diagonal are set to -inf in ``P``
itself (only hidden pairs read them). That view is the CPU flash kernel's additive mask.

Backward per sub-block: the kernel's probabilities and ``dS`` by hand
(:func:`posemb.kernels.flex.block_scores_backward`, then q, k, v's gradients), ``dP`` is ``dS`` written
back through the same view (each P entry feeds one pair), and ``dP`` gives ``q + v``'s gradient
(``dP r``) and the table's (``dP^T (q + v)``), which goes through the scheme's ``W_R`` by autograd once
per call. Nothing of size (Lq, Lk) is kept: q, k, v, the output and each row's log-sum-exp.

Causal, CPU, float32 / float64, values as wide as the keys, positions counting up by one with the queries
the last Lq keys (:func:`relative_keys_attention_applies`); the tiled content path takes the rest and is
the reference (``attention._RELATIVE_KEYS_FUSED = False``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from posemb.functional.relative import consecutive_offset
from posemb.kernels.flex import (_TOEPLITZ_BACKWARD_ELEMENTS, QUERY_BLOCK, _toeplitz_blocks, backward_sub_blocks,
                                 block_input_gradients, block_scores_backward, flash_cpu_operands,
                                 query_block_rows)

_DTYPES = (torch.float32, torch.float64)
#: distances embedded per step when building the table without autograd
_TABLE_CHUNK = 256


def relative_keys_attention_applies(q: Tensor, k: Tensor, v: Tensor, scheme, q_positions: Tensor,
                                    k_positions: Tensor, *, needs_grad: bool = True) -> bool:
    """Whether this causal call can take the fused path: the scheme's terms in this form, CPU tensors of
    one supported dtype, batch and head count, values as wide as the keys, at least as many keys as
    queries, not traced, and consecutive positions with the queries the last Lq keys (one host sync).

    Without autograd also: the (heads, Lk, d) distance table at most a quarter of the output. The table
    is shared by the batch, and at batch 1 it is as large as the output, which the tiled path (whose
    tables cover one diagonal of tiles) never holds: at L = 4096, batch 1, 8 heads the fused path called
    directly peaked at 29.8 MiB against 14.5 MiB tiled and 9.3 MiB for plain SDPA, for a forward only 15 %
    faster (``python bench/content_paths_probe.py 2``). Training keeps the
    fused path at any batch (its peak is dominated by the saved activations)."""
    if not needs_grad and 4 * q.shape[1] * k.shape[-2] * q.shape[-1] > q.numel():
        return False
    terms = scheme.relative_key_terms()
    if terms is None or terms.position_bias.shape[0] != q.shape[1] or not flash_cpu_operands(q, k, v, _DTYPES):
        return False
    return consecutive_offset(q_positions, k_positions) == k.shape[-2] - q.shape[-2]


def relative_keys_attention(q: Tensor, k: Tensor, v: Tensor, scheme, *, needs_grad: bool) -> Tensor:
    """Causal attention (batch, heads, Lq, d) of a call :func:`relative_keys_attention_applies` accepted."""
    terms = scheme.relative_key_terms()
    scale = scheme.logit_scale(q.shape[-1])
    k_len = k.shape[-2]
    block = _block_rows(q, k_len)
    # r_d for d = Lk - 1 .. 0 (descending), then zero rows for the distances past the diagonal
    distances = torch.arange(k_len - 1, -1, -1, device=q.device)
    if not needs_grad:
        with torch.no_grad():
            # into one buffer, _TABLE_CHUNK distances at a time: the sinusoid and projection of all Lk distances
            # at once would be several output-sized temporaries at the peak
            table = q.new_zeros(q.shape[1], k_len + block, q.shape[-1])
            for first in range(0, k_len, _TABLE_CHUNK):
                chunk = distances[first:first + _TABLE_CHUNK]
                table[:, first:first + chunk.numel()] = terms.embed(chunk)
            return _forward(q, k, v, table, terms.content_bias.to(q.dtype), terms.position_bias.to(q.dtype), scale,
                            keep=False)[0]
    table = terms.embed(distances).to(q.dtype)                                         # (H, Lk, d)
    table = torch.cat([table, table.new_zeros(table.shape[0], block, table.shape[-1])], 1)
    return _RelativeKeysAttention.apply(q, k, v, table, terms.content_bias.to(q.dtype),
                                        terms.position_bias.to(q.dtype), scale)


def _block_rows(q: Tensor, k_len: int) -> int:
    """Query rows per block: QUERY_BLOCK, fewer when a block's per-distance scores (batch, heads, rows,
    rows + Lk - 1) would pass the Toeplitz backward's element budget (so a no-grad call's peak stays a few
    such blocks beside the output)."""
    return query_block_rows(q.shape[-2], q.shape[0] * q.shape[1] * k_len, QUERY_BLOCK, _TOEPLITZ_BACKWARD_ELEMENTS)


def _block_positional(q: Tensor, table: Tensor, position_bias: Tensor, scale: float, start: int, stop: int,
                      keys: int, k_len: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rows [start, stop) reversed: ``(scaled q + v, P, bias view)``; ``P[i', t] = scale (q + v) . r_{keys - 1 - t}``
    (batch, heads, rows, rows + keys - 1), -inf for t >= keys; the bias view reads ``P[i', i' + j]``."""
    rows = stop - start
    shifted = q[:, :, start:stop].flip(2).add(position_bias[:, None, :]).mul_(scale)   # scale (q_i + v)
    width = rows + keys - 1
    per_distance = torch.matmul(shifted, table[:, k_len - keys:k_len - keys + width].transpose(-1, -2))
    per_distance[..., keys:] = float("-inf")
    bias = per_distance.as_strided((*per_distance.shape[:2], rows, keys),
                                   (*per_distance.stride()[:2], width + 1, 1), per_distance.storage_offset())
    return shifted, per_distance, bias


def _forward(q: Tensor, k: Tensor, v: Tensor, table: Tensor, content_bias: Tensor, position_bias: Tensor,
             scale: float, keep: bool = True):
    """The output, and with ``keep`` each block's kernel output and log-sum-exps (reversed rows, for the
    backward); without, each block is written into the output and dropped."""
    q_len, k_len = q.shape[-2], k.shape[-2]
    blocks = _toeplitz_blocks(q_len, k_len, True, _block_rows(q, k_len))
    result = q.new_empty(q.shape[:-1] + v.shape[-1:])
    outputs, lses = [], []
    for start, stop, keys in blocks:
        bias = _block_positional(q, table, position_bias, scale, start, stop, keys, k_len)[2]
        q_content = q[:, :, start:stop].flip(2).add_(content_bias[:, None, :])            # q_i + u
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_content, k[:, :, :keys], v[:, :, :keys], attn_mask=bias, scale=scale)[:2]
        del bias, q_content
        result[:, :, start:stop] = out.flip(2)
        if keep:
            outputs.append(out)
            lses.append(lse)
    return result, outputs, lses, blocks


class _RelativeKeysAttention(torch.autograd.Function):
    """``apply(q, k, v, table, u, v_bias, scale)``: see the module docstring."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, table: Tensor, content_bias: Tensor,
                position_bias: Tensor, scale: float) -> Tensor:
        out, outputs, lses, blocks = _forward(q, k, v, table, content_bias, position_bias, scale)
        ctx.blocks, ctx.scale = blocks, scale
        ctx.save_for_backward(q, k, v, table, content_bias, position_bias, *outputs, *lses)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, table, content_bias, position_bias, *saved = ctx.saved_tensors
        blocks, scale = ctx.blocks, ctx.scale
        outputs, lses = saved[:len(blocks)], saved[len(blocks):]
        k_len = k.shape[-2]
        q_content = q + content_bias[:, None, :]
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        d_table = torch.zeros((q.shape[0], *table.shape), dtype=table.dtype, device=table.device)
        d_shifted = torch.zeros_like(q)   # gradient of scale (q + v), rows in natural order
        for start, stop, keys, out, lse in backward_sub_blocks(blocks, outputs, lses, q.shape[0] * q.shape[1], True):
            rows = stop - start
            shifted, per_distance, bias = _block_positional(q, table, position_bias, scale, start, stop, keys, k_len)
            q_block, k_block, v_block = q_content[:, :, start:stop].flip(2), k[:, :, :keys], v[:, :, :keys]
            grad_block = grad[:, :, start:stop].flip(2)
            probs, dscores = block_scores_backward(q_block, k_block, v_block, grad_block, out, lse, bias, scale)
            block_input_gradients(q_block, k_block, grad_block, probs, dscores, scale, dq, dk, dv, start, stop, keys)
            del probs, bias
            # dS back through the view: P[i', i' + j] = bias[i', j], every P entry read by one pair
            d_per_distance = torch.zeros_like(per_distance)
            d_per_distance.as_strided((*dscores.shape[:2], rows, keys), (*d_per_distance.stride()[:2], rows + keys, 1),
                                      d_per_distance.storage_offset()).copy_(dscores)
            del dscores, per_distance
            width = rows + keys - 1
            window = table[:, k_len - keys:k_len - keys + width]
            d_shifted[:, :, start:stop] = torch.matmul(d_per_distance, window).flip(2)
            d_table[:, :, k_len - keys:k_len - keys + width] += torch.matmul(d_per_distance.transpose(-1, -2), shifted)
        d_shifted.mul_(scale)               # shifted = scale (q + v)
        d_content_bias = dq.sum((0, 2))     # dq so far is q + u's gradient
        dq += d_shifted
        return (dq, dk, dv, d_table.sum(0), d_content_bias.to(content_bias.dtype),
                d_shifted.sum((0, 2)).to(position_bias.dtype), None)
