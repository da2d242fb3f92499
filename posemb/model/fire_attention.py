"""Causal FIRE attention on PyTorch's fused CPU attention kernel, the bias built per query block from the
MLP's piecewise linear form, with a hand-written backward.

FIRE's logits term (Li et al. 2023, arXiv 2310.04418, eq. 5-6) is ``f(n_ij)`` with
``n_ij = psi(i - j) r_i``, ``psi(x) = log(c x + 1)``, ``r_i = 1 / (psi(max(L, i)) + eps)`` and ``f`` a
1 -> w -> heads ReLU MLP. Evaluating the MLP on every (query, key) pair costs w hidden units per pair
forward and several (pairs x w) tensors backward: on 2 cores a 2048-token training step took 4-5x NoPE's.
But a one-input ReLU MLP is piecewise linear, ``f(n) = slope[s] n + intercept[s]`` with at most w kinks
(:func:`posemb.functional.fire.relu_segments`), and along a row of the causal block ``n`` is monotone in
the key (``psi`` grows with the distance), so each row splits into at most w + 1 runs of keys:

* segments: two batched ``searchsorted`` of the kinks in each row of ``-n`` (ascending; left and right,
  so that a pair exactly on a kink gets a segment of its own, where that kink's units are inactive as
  autograd's ``relu'(0) = 0`` has it: :func:`posemb.functional.fire.relu_kink_table`), ones scattered at
  the run boundaries and a cumulative sum give every pair's segment index (no per-pair search);
* bias: one ``embedding`` lookup of (slope, intercept) per pair, one multiply-add per head;
* attention: ``_scaled_dot_product_flash_attention_for_cpu`` per query block with that bias as its
  additive mask (the causal triangle of the block set to -inf), returning each row's log-sum-exp.

Rows are taken in reversed order inside a block (as in :mod:`posemb.kernels.flex`'s Toeplitz path) so
that ``psi(i - j)`` is a strided view ``psi_rev[u + i' + j]`` of one table: no (Lq, Lk) index tensor.

Backward, per sub-block (:func:`posemb.kernels.flex.backward_sub_blocks`): recompute the bias,
``P``, ``dS`` and the q, k, v gradients (:func:`posemb.kernels.flex.block_scores_backward`); ``dS``
summed over the batch is the bias gradient ``G``. With ``A[s] = sum over segment s of G n`` and
``B[s] = sum of G`` (per row, differences of cumulative sums at the run edges), the MLP's gradients are small sums
over segments, ``dW2[h, k] = sum_s active[s, k] (w1_k A[s, h] + b1_k B[s, h])``,
``dw1_k = sum_h W2[h, k] sum_s active[s, k] A[s, h]``, ``db1`` the same with B, ``db2 = sum_s B``; and
``dL/dn = sum_h G_h slope_h[s]`` goes to the ``psi`` table (anti-diagonal sums, as the Toeplitz path's
table gradient) and to ``r`` (row sums), and from those through autograd of the two O(L) tables to c
and the threshold. Nothing of size (Lq, Lk) is kept: q, k, v, the output and each row's log-sum-exp.

Causal, CPU, float32 / float64, values as wide as the keys, positions counting up by one (queries the last
Lq of the Lk keys); :func:`fire_attention_applies` says whether a call qualifies, the tiled content paths
take the rest. The reference it is tested against: ``attention._FIRE_FUSED = False``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from posemb.functional.fire import relu_kink_table
from posemb.functional.relative import consecutive_offset
from posemb.kernels.flex import (_TOEPLITZ_BACKWARD_ELEMENTS, QUERY_BLOCK, _antidiagonal_sums, _toeplitz_blocks,
                                 backward_sub_blocks, block_input_gradients, block_scores_backward,
                                 flash_cpu_operands, query_block_rows, run_sums)

_DTYPES = (torch.float32, torch.float64)


def fire_attention_applies(q: Tensor, k: Tensor, v: Tensor, scheme, q_positions: Tensor, k_positions: Tensor) -> bool:
    """Whether this causal call can take the fused FIRE path (see the module): CPU tensors of one supported
    dtype and batch size, as many heads as the scheme's MLP (a one-head FIRE broadcast over more heads
    takes the tiled path), values as wide as the keys, at least as many keys as queries, not traced, and
    consecutive positions with the queries the last Lq keys (one host synchronisation)."""
    parameters = scheme.fire_parameters()
    if parameters is None or parameters.w2.shape[0] != q.shape[1] or not flash_cpu_operands(q, k, v, _DTYPES):
        return False
    return consecutive_offset(q_positions, k_positions) == k.shape[-2] - q.shape[-2]


def fire_attention(q: Tensor, k: Tensor, v: Tensor, scheme, q_positions: Tensor, *, needs_grad: bool) -> Tensor:
    """Causal FIRE attention (batch, heads, Lq, d) of a call :func:`fire_attention_applies` accepted."""
    parameters = scheme.fire_parameters()
    tensors = (parameters.w1, parameters.b1, parameters.w2, parameters.b2, parameters.c, parameters.multiplier)
    # Positions shared by the batch (an expanded arange, the usual case): one bias for every sequence.
    rows = q_positions[:1] if q_positions.shape[0] == 1 or bool((q_positions == q_positions[:1]).all()) \
        else q_positions
    options = (rows, k.shape[-2], parameters.threshold, parameters.eps, scheme.logit_scale(q.shape[-1]))
    if not needs_grad:
        with torch.no_grad():
            return _forward(q, k, v, tensors, *options)[0]
    return _FIREAttention.apply(q, k, v, options, *tensors)


def _tables(c: Tensor, multiplier: Tensor, q_positions: Tensor, k_len: int, threshold: float, eps: float,
            pad: int) -> tuple[Tensor, Tensor]:
    """``(psi_rev, r)`` in float64 (with autograd when c, multiplier have it): ``psi_rev[u] = psi(Lk - 1 - u)``
    for u < Lk, then ``pad`` zeros (keys past the diagonal, which the causal mask hides), and
    ``r[b, i] = 1 / (psi(max(L, p_bi)) + eps)``, the same operations as
    :func:`posemb.functional.fire.fire_normalized_distance` on the pairs' two factors."""
    c = c.abs().to(torch.float64)
    threshold = (multiplier.abs() * threshold).to(torch.float64)
    distances = torch.arange(k_len - 1, -1, -1, device=q_positions.device, dtype=torch.float64)
    psi_rev = torch.cat([torch.log1p(c * distances), distances.new_zeros(pad)])
    query = q_positions.to(torch.float64)
    return psi_rev, 1.0 / (torch.log1p(c * torch.maximum(query, threshold)) + eps)


class _Call:
    """Per-call constants of the blocked loops: the kinks, the per-segment coefficients, the tables."""

    def __init__(self, q: Tensor, tensors: tuple, q_positions: Tensor, k_len: int, threshold: float, eps: float):
        w1, b1, w2, b2, c, multiplier = tensors
        self.segments = relu_kink_table(w1, b1, w2, b2, q.dtype)
        self.kinks = -self.segments.kinks  # in m = -n: m < -kink  <=>  n > kink
        self.count = self.kinks.numel()
        # indexed by #{kinks >= n} + #{kinks > n} (ReluKinkTable)
        self.coefficients = torch.cat([self.segments.slope, self.segments.intercept], 1).to(q.dtype)
        self.heads, self.q_len, self.k_len = w2.shape[0], q.shape[-2], k_len
        # rows per block: QUERY_BLOCK, fewer when the bias (batch or 1, heads, rows, Lk) would pass the
        # Toeplitz backward's element budget (its (rows, Lk, 2 heads) coefficients are twice that)
        self.block = query_block_rows(self.q_len, q_positions.shape[0] * self.heads * k_len, QUERY_BLOCK,
                                      _TOEPLITZ_BACKWARD_ELEMENTS)
        with torch.no_grad():
            psi_rev, r = _tables(c, multiplier, q_positions, k_len, threshold, eps, self.block)
        self.psi_rev, self.r_rev = psi_rev.to(q.dtype), r.flip(-1).to(q.dtype).contiguous()

    def block_terms(self, start: int, stop: int, keys: int,
                    runs: bool = True) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """Rows [start, stop) reversed against keys [0, keys): ``(bias, m, runs, coef)``, the bias
        (batch or 1, heads, rows, keys) with the causal triangle at -inf, ``m = -n`` (batch or 1, rows,
        keys), the keys where each row's runs start (batch or 1, rows, 2 kinks + 2: 0, the kink crossings in
        ascending order, keys; run t holds the pairs of table index t; None without ``runs``) and each
        pair's (slope, intercept) ``coef`` (..., 2 heads)."""
        rows, heads = stop - start, self.heads
        psi = self.psi_rev.as_strided((rows, keys), (1, 1), self.k_len - keys)
        r = self.r_rev[:, self.q_len - stop:self.q_len - start]
        # (into a contiguous tensor: the product would take the overlapping view's transposed strides)
        m = torch.mul(psi, r[..., None], out=psi.new_empty(r.shape[0], rows, keys)).neg_()  # ascending rows
        kinks = self.kinks.expand(*m.shape[:-1], self.count).contiguous()
        # key j is at or past boundary (left) when n_j <= kink, past (right) when n_j < kink
        boundaries = torch.cat([torch.searchsorted(m, kinks), torch.searchsorted(m, kinks, right=True)], -1)
        marks = torch.zeros(*m.shape[:-1], keys + 1, dtype=torch.int32, device=m.device)
        marks.scatter_add_(-1, boundaries, torch.ones_like(boundaries, dtype=torch.int32))
        index = marks[..., :keys].cumsum(-1, dtype=torch.int32)
        coef = F.embedding(index, self.coefficients)
        bias = m.new_empty(m.shape[0], heads, rows, keys)
        for head in range(heads):  # (one head at a time: 2.6x faster than one addcmul into a permuted output)
            torch.addcmul(coef[..., heads + head], coef[..., head], m, value=-1.0, out=bias[:, head])
        # reversed row i' sees keys j <= keys - 1 - i': the last `rows` columns hold the causal triangle
        hidden = torch.ones(rows, rows, dtype=torch.bool, device=m.device).triu_(1).flip(0)
        bias[..., keys - rows:].masked_fill_(hidden, float("-inf"))
        if not runs:  # (the forward needs only the bias)
            return bias, m, None, coef
        edges = boundaries.sort(-1).values
        first, last = edges.new_zeros(*edges.shape[:-1], 1), edges.new_full((*edges.shape[:-1], 1), keys)
        edges = torch.cat([first, edges, last], -1)
        return bias, m, edges, coef


def _forward(q: Tensor, k: Tensor, v: Tensor, tensors: tuple, q_positions: Tensor, k_len: int, threshold: float,
             eps: float, scale: float) -> tuple[Tensor, list, list, list, _Call]:
    call = _Call(q, tensors, q_positions, k_len, threshold, eps)
    call.scale = scale
    blocks = _toeplitz_blocks(call.q_len, k_len, True, call.block)
    outputs, lses = [], []
    for start, stop, keys in blocks:
        bias = call.block_terms(start, stop, keys, runs=False)[0]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[:, :, start:stop].flip(2), k[:, :, :keys], v[:, :, :keys], attn_mask=bias, scale=scale)[:2]
        outputs.append(out)
        lses.append(lse)
    result = [out.flip(2) for out in outputs]
    return (result[0] if len(result) == 1 else torch.cat(result, dim=2)), outputs, lses, blocks, call


class _FIREAttention(torch.autograd.Function):
    """See the module docstring; inputs q, k, v, the per-call options, then w1, b1, w2, b2, c, multiplier."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, options: tuple, *tensors: Tensor) -> Tensor:
        out, outputs, lses, blocks, call = _forward(q, k, v, tensors, *options)
        ctx.blocks, ctx.call, ctx.options = blocks, call, options
        ctx.save_for_backward(q, k, v, *tensors, *outputs, *lses)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, *saved = ctx.saved_tensors
        tensors, saved = saved[:6], saved[6:]
        blocks, call = ctx.blocks, ctx.call
        outputs, lses = saved[:len(blocks)], saved[len(blocks):]
        scale, heads, count = call.scale, call.heads, call.count
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        sum_g = q.new_zeros(heads, 2 * count + 1)    # B, by table index
        sum_gm = q.new_zeros(heads, 2 * count + 1)   # -A, by table index
        d_psi = q.new_zeros(call.psi_rev.shape)
        d_r = torch.zeros_like(call.r_rev)
        for start, stop, keys, out, lse in backward_sub_blocks(blocks, outputs, lses, q.shape[0] * heads, True):
            bias, m, runs, coef = call.block_terms(start, stop, keys)
            q_block, k_block, v_block = q[:, :, start:stop].flip(2), k[:, :, :keys], v[:, :, :keys]
            grad_block = grad[:, :, start:stop].flip(2)
            probs, dscores = block_scores_backward(q_block, k_block, v_block, grad_block, out, lse, bias, scale)
            block_input_gradients(q_block, k_block, grad_block, probs, dscores, scale, dq, dk, dv, start, stop, keys)
            del probs
            g = dscores if m.shape[0] == dscores.shape[0] else dscores.sum(0, keepdim=True)  # (batch or 1, heads, ...)
            # by run, summed over the batch and the rows; the runs are the same for every head
            sum_g += run_sums(g, runs[:, None]).sum((0, 2))
            sum_gm += run_sums(g * m[:, None], runs[:, None]).sum((0, 2))
            # dL/dm = -sum_h G_h slope_h (bias = intercept - slope m)
            d_m = g[:, 0] * coef[..., 0]
            for head in range(1, heads):
                d_m.addcmul_(g[:, head], coef[..., head])
            d_m.neg_()
            d_psi[call.k_len - keys:call.k_len - keys + stop - start + keys - 1] -= \
                _antidiagonal_sums(d_m * call.r_rev[:, call.q_len - stop:call.q_len - start, None]).sum(0)
            # m = -psi r: dL/dr = -sum_j dL/dm psi = sum_j dL/dm m / r
            d_r[:, call.q_len - stop:call.q_len - start] += (d_m * m).sum(-1) / \
                call.r_rev[:, call.q_len - stop:call.q_len - start]
        grads = _parameter_gradients(call, tensors, sum_g, sum_gm, d_psi, d_r, ctx.options)
        return (dq, dk, dv, None, *grads)


def _parameter_gradients(call: _Call, tensors: tuple, sum_g: Tensor, sum_gm: Tensor, d_psi: Tensor, d_r: Tensor,
                         options: tuple) -> tuple[Tensor | None, ...]:
    """The gradients of (w1, b1, w2, b2, c, multiplier) from the per-segment sums and the table gradients."""
    w1, b1, w2, b2, c, multiplier = tensors
    segments = call.segments
    by_segment_g = sum_g.to(torch.float64).T        # (2K + 1, heads): B, by table index
    by_segment_gn = -sum_gm.to(torch.float64).T     # A
    moving_w1 = w1.detach().to(torch.float64).reshape(-1)
    bias1 = b1.detach().to(torch.float64).reshape(-1)
    weights2 = w2.detach().to(torch.float64).reshape(w2.shape[0], -1)
    active_a = by_segment_gn.T @ segments.active   # (heads, n): sum over active segments of A
    active_b = by_segment_g.T @ segments.active
    d_w2 = moving_w1 * active_a + bias1 * active_b
    d_w1 = (weights2 * active_a).sum(0)
    d_b1 = (weights2 * active_b).sum(0)
    d_b2 = by_segment_g.sum(0)
    q_positions, k_len, threshold, eps, _ = options
    wants = [t for t in (c, multiplier) if t.requires_grad]
    d_c = d_multiplier = None
    if wants:
        with torch.enable_grad():
            leaves = [c.detach().requires_grad_(), multiplier.detach().requires_grad_()]
            psi_rev, r = _tables(*leaves, q_positions, k_len, threshold, eps, call.block)
            d_c, d_multiplier = torch.autograd.grad(
                [psi_rev, r.flip(-1)], leaves, [d_psi.to(torch.float64), d_r.to(torch.float64)], allow_unused=True)
    return (d_w1.reshape(w1.shape).to(w1.dtype), d_b1.to(b1.dtype), d_w2.to(w2.dtype), d_b2.to(b2.dtype),
            None if d_c is None else d_c.to(c.dtype),
            None if d_multiplier is None else d_multiplier.to(multiplier.dtype))
