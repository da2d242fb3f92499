"""Causal CoPE attention with a hand-written backward: whole rows of keys per query block, the forward on
PyTorch's fused CPU attention kernel, nothing of size (Lq, Lk) kept for the backward.

CoPE (Golovneva et al. 2024, arXiv 2405.18719, §3, eqs. 3-5) scores query i against key j as

    s_ij = scale q_i . k_j + z_ij,   z_ij = (1 - w) T_i[floor p_ij] + w T_i[ceil p_ij],   w = p_ij - floor p_ij,
    p_ij = min(sum_{t = j .. i} g_it, npos - 1),   g_it = sigmoid(scale q_i . k_t),   T_i = q_i E^T,

so a query's positions need all of its keys at once. Per block of query rows (against the keys they may
see, in reversed order so that ``p`` is a plain cumulative sum from the diagonal outward, the same
summation order as :func:`posemb.functional.contextual.cope_positions`), the forward computes the gates,
positions and ``z`` and runs ``_scaled_dot_product_flash_attention_for_cpu`` with ``z`` as its additive
mask (-inf past the diagonal), which returns each row's log-sum-exp. The tiled content path it replaces
(``attention._COPE_FUSED = False``) recomputes the blocks in the backward under autograd, which keeps every
intermediate of a block alive at once: a 2048-token training step took 3.6x NoPE's time and, at 4096,
2.2x its peak memory (``posemb bench --sections step``).

Backward per block, by hand (``D_i = dO_i . O_i``, ``P = exp(s - lse)``):

* ``dS = P (dO v^T - D)`` (the softmax backward), ``dv = P^T dO``;
* through z: ``dT[n]`` gathers ``dS`` and ``dS w`` over the keys with ``floor p = n`` (along a row p ascends,
  so those keys are one run: differences of the row's cumulative sums), then ``dE = dT^T q``,
  ``dq += dT E``; and ``dp = dS (T[f + 1] - T[f])``, which is 0 at the clip as the clamp's gradient is;
* through the cumulative sum: ``dg_t = sum_{u >= t} dp_u`` (the row total minus a cumulative sum), then
  through the sigmoid: ``scale g (1 - g) dg`` joins ``scale dS`` as the gradient of ``q . k``.

CPU, float32 / float64, values as wide as the keys; any positions (CoPE reads none); queries the last Lq
of the Lk keys. :func:`cope_attention_applies` says whether a call qualifies.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from posemb.kernels.flex import flash_cpu_operands, run_sums
from posemb.model import attention as _attention

_DTYPES = (torch.float32, torch.float64)
#: logits (batch * heads * rows * keys) per block, at most: a block holds about ten tensors of that size at
#: once (scores, gates, positions, weights, the two gathered tables, an int64 index). Training step of the
#: bench's model at 2048 / its peak at 4096, two runs of ``python bench/content_paths_probe.py 2``: 2^21
#: 551-635 ms / 334-349 MiB, 2^20 502-527 ms / 317 MiB, 2^19 504-519 ms / 293-330 MiB
BLOCK_ELEMENTS = 1 << 19


def cope_attention_applies(q: Tensor, k: Tensor, v: Tensor, scheme) -> bool:
    """Whether this causal call can take the fused CoPE path: CPU tensors of one supported dtype and batch
    size, values as wide as the keys, at least as many keys as queries, not traced."""
    return scheme.cope_parameters() is not None and flash_cpu_operands(q, k, v, _DTYPES)


def cope_attention(q: Tensor, k: Tensor, v: Tensor, scheme, *, needs_grad: bool) -> Tensor:
    """Causal CoPE attention (batch, heads, Lq, d) of a call :func:`cope_attention_applies` accepted."""
    embedding, npos = scheme.cope_parameters()
    call = (npos, scheme.logit_scale(q.shape[-1]))
    if not needs_grad:
        with torch.no_grad():
            return _forward(q, k, v, embedding, *call)[0]
    return _CoPEAttention.apply(q, k, v, embedding, call)


def _blocks(q: Tensor, k: Tensor) -> list[tuple[int, int, int]]:
    """(start, stop, keys) of the query blocks: at most ``min(_CONTENT_RECOMPUTE_ELEMENTS, BLOCK_ELEMENTS)``
    logits each (one query row at least)."""
    batch, heads, q_len = q.shape[:3]
    offset = k.shape[-2] - q_len
    budget = max(1, min(_attention._CONTENT_RECOMPUTE_ELEMENTS, BLOCK_ELEMENTS) // (batch * heads))
    blocks, start = [], 0
    while start < q_len:
        stop = start + _attention._rows_within(budget, q_len - start, k.shape[-2], start + offset)
        blocks.append((start, stop, stop + offset))
        start = stop
    return blocks


class _Block:
    """One block's forward quantities, keys in reversed order (column u is key ``keys - 1 - u``).

    ``z = T[f] + w (T[f + 1] - T[f])`` with ``f = floor p`` (``T[npos]`` read as ``T[npos - 1]``: the clip),
    ``T[f]`` and the step ``dT[f]`` gathered per (query, key) from the row's tables of ``npos`` values."""

    def __init__(self, q: Tensor, k: Tensor, embedding: Tensor, npos: int, scale: float, start: int, stop: int,
                 keys: int):
        rows = stop - start
        self.q = q[:, :, start:stop]
        self.k = k[:, :, :keys].flip(2)
        self.scores = torch.matmul(self.q, self.k.transpose(-1, -2)).mul_(scale)      # scale q . k
        # row a sees columns u >= rows - 1 - a: the hidden ones are a triangle in the first `rows` columns
        self.hidden = torch.ones(rows, rows, dtype=torch.bool, device=q.device).triu_(1).flip(1)
        gates = torch.sigmoid(self.scores)
        gates[..., :rows].masked_fill_(self.hidden, 0.0)
        self.gates = gates
        # p_u = sum_{t <= u} g_t, ascending along each row: keys past the clip all sit at npos - 1
        self.positions = gates.cumsum(-1).clamp_(max=npos - 1)
        floor = self.positions.floor()
        index = floor.long()
        self.weight = floor.neg_().add_(self.positions)                               # w = p - floor p
        table = torch.matmul(self.q, embedding.to(q.dtype).T)                          # T = q E^T, (B, H, r, npos)
        steps = torch.nn.functional.pad(table.diff(dim=-1), (0, 1))                   # T[n + 1] - T[n], 0 at the clip
        # (two gathers: measured 2x faster than one embedding lookup of (T, dT) pairs)
        self.low, self.step = table.gather(-1, index), steps.gather(-1, index)        # T[f], dT[f]
        del index
        self.rows, self.npos = rows, npos
        levels = torch.arange(npos + 1, device=q.device, dtype=self.positions.dtype)
        self._levels = levels.expand(*self.positions.shape[:-1], -1)

    def position_logits(self) -> Tensor:
        """z with -inf past the diagonal."""
        z = torch.addcmul(self.low, self.weight, self.step)
        z[..., :self.rows].masked_fill_(self.hidden, float("-inf"))
        return z

    def run_sums(self, values: Tensor) -> Tensor:
        """``sum of values over the keys u with floor p_u = n``, (B, H, r, npos): along a row p ascends, so
        the keys of one n are a contiguous run, found by ``searchsorted`` and summed as a difference of
        the row's cumulative sums (no ``scatter_add``, whose runs of equal indices serialise)."""
        if not hasattr(self, "_edges"):  # the first key of each run, n = 0 .. npos (once per block)
            self._edges = torch.searchsorted(self.positions, self._levels.contiguous())
        return run_sums(values, self._edges)


def _forward(q: Tensor, k: Tensor, v: Tensor, embedding: Tensor, npos: int, scale: float):
    blocks = _blocks(q, k)
    outputs, lses = [], []
    for start, stop, keys in blocks:
        block = _Block(q, k, embedding, npos, scale, start, stop, keys)
        z = block.position_logits()
        del block.scores, block.gates, block.positions, block.weight, block.low, block.step
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            block.q, block.k, v[:, :, :keys].flip(2), attn_mask=z, scale=scale)[:2]
        outputs.append(out)
        lses.append(lse)
        del block, z
    result = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return result, lses, blocks


class _CoPEAttention(torch.autograd.Function):
    """``apply(q, k, v, embedding, (npos, scale))``: see the module docstring."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, embedding: Tensor, call: tuple) -> Tensor:
        out, lses, blocks = _forward(q, k, v, embedding, *call)
        ctx.call, ctx.blocks = call, blocks
        ctx.save_for_backward(q, k, v, embedding, out, *lses)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, embedding, out, *lses = ctx.saved_tensors
        npos, scale = ctx.call
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        weights = embedding.to(q.dtype)
        d_embedding = torch.zeros_like(weights)
        delta = (grad * out).sum(-1, keepdim=True)                                     # D_i = dO_i . O_i
        for (start, stop, keys), lse in zip(ctx.blocks, lses):
            block = _Block(q, k, embedding, npos, scale, start, stop, keys)
            v_block = v[:, :, :keys].flip(2)
            grad_block = grad[:, :, start:stop]
            # P = exp(s - lse), dS = P (dO v^T - D)
            probs = block.position_logits().add_(block.scores).sub_(lse[..., None]).exp_()
            del block.scores, block.low  # (each block-sized: free them as soon as they are used)
            dscores = torch.matmul(grad_block, v_block.transpose(-1, -2)).sub_(delta[:, :, start:stop]).mul_(probs)
            dv[:, :, :keys] += torch.matmul(probs.transpose(-1, -2), grad_block).flip(2)
            del probs
            # through z = T[f] + w (T[f + 1] - T[f]): run sums by f, then the table's differences
            d_table = block.run_sums(dscores)
            d_steps = block.run_sums(dscores * block.weight)
            d_table[..., 1:] += d_steps[..., :-1]
            d_table[..., :-1] -= d_steps[..., :-1]
            del block.weight, block.positions, block._edges
            d_positions = dscores * block.step
            del block.step
            # p_u = sum_{t <= u} g_t  =>  dg_t = sum_{u >= t} dp_u = total - (sum_{u < t} dp_u); then the sigmoid
            running = d_positions.cumsum(-1)
            d_gates = d_positions.sub_(running).add_(running[..., -1:])
            del running
            d_logits = d_gates.mul_(block.gates).mul_(1.0 - block.gates).add_(dscores).mul_(scale)
            del dscores
            dq[:, :, start:stop] = torch.matmul(d_logits, block.k) + torch.matmul(d_table, weights)
            dk[:, :, :keys] += torch.matmul(d_logits.transpose(-1, -2), block.q).flip(2)
            d_embedding += torch.einsum("bhrn,bhrd->nd", d_table, block.q)
            del block, d_logits  # before the next block's tensors exist
        return dq, dk, dv, d_embedding.to(embedding.dtype), None
