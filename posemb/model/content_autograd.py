"""Content-site attention for training: a forward that keeps no score block, a backward that
recomputes them block by block (FlashAttention's scheme: Dao et al. 2022, arXiv 2205.14135, §3.1 and
App. B.2; Dao 2023, "FlashAttention-2", arXiv 2307.08691, Alg. 2), for every content scheme's hooks.

Forward (no autograd inside): the tiled online softmax of :func:`posemb.model.attention._content_tiles`
(whole-row blocks for ``content_whole_rows`` schemes such as CoPE); saved: q, k, v, the output O and
each row's log-sum-exp ``lse_i = log sum_j exp s_ij``. Nothing of size (Lq, Lk) outlives the forward.

Backward, per query block (all the keys it may see), with autograd on detached block leaves: the
block's logits ``s`` are recomputed by the scheme's own hooks, ``p = exp(s - lse)`` (lse a
constant), ``o = p @ v + relative_values(p)``, and ``torch.autograd.grad`` of the surrogate

    f = sum(dO * o) - sum_i D_i sum_j p_ij,        D_i = dO_i . O_i

gives every gradient at once: ``df/ds_ij = p_ij (dP_ij - D_i)`` with ``dP_ij = df/dp_ij`` is the
softmax backward (FlashAttention-2's ``dS = P o (dP - D)``), exact because ``relative_values`` is
linear in p (the hooks' contract), and ``df/dv``, ``df/d(value tables)`` are exact as o is linear in
them. So a scheme needs no backward code of its own: its parameters' gradients come out of the same
call. Tensors of the scheme's per-call state (``prepare_relative``: DeBERTa's K^r, Q^r, the
forgetting gate's cumulative log-gates, Transformer-XL's ``W_R R`` table) are replaced by detached
leaves whose gradients are summed over the blocks and backpropagated through ``prepare_relative``
once, at the end.

Double backward is refused (``once_differentiable``). ``posemb.model.attention._CONTENT_PATH =
"autograd"`` selects the older path (plain autograd through every block).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from posemb.functional.relative import DistanceTable, distance_bounds
from posemb.model import attention as _attention
from posemb.schemes.base import PositionalScheme


def content_attention(q: Tensor, k: Tensor, v: Tensor, scheme: PositionalScheme, q_positions: Tensor,
                      k_positions: Tensor, *, causal: bool) -> Tensor:
    """Content-site attention (batch, heads, Lq, value_dim) whose backward recomputes (see the module).

    Gradients reach q, k, v and every parameter of ``scheme`` that requires grad. The backward calls
    the scheme's hooks again, after the forward has returned: inside ``torch.func.functional_call``
    (parameters swapped for plain tensors, restored before the backward) that would differentiate
    the wrong tensors, so there the plain autograd path runs instead."""
    if not all(isinstance(p, torch.nn.Parameter) for p in scheme.parameters()):
        state = scheme.prepare_relative(q, k, q_positions, k_positions)
        return _attention._content_rows(q, k, v, scheme, q_positions, k_positions, causal,
                                        {} if state is None else {"state": state})
    params = tuple(p for p in scheme.parameters() if p.requires_grad)
    return _ContentAttention.apply(q, k, v, q_positions, k_positions, scheme, causal, *params)


def _forward(q: Tensor, k: Tensor, v: Tensor, scheme: PositionalScheme, q_positions: Tensor, k_positions: Tensor,
             causal: bool) -> tuple[Tensor, Tensor]:
    """The no-grad forward with each row's log-sum-exp: the tiles of the no-grad path, or whole-row
    blocks (schemes that need whole rows, or one tile covering everything)."""
    state = scheme.prepare_relative(q, k, q_positions, k_positions)
    hook_options = {} if state is None else {"state": state}
    rows, keys = _attention._content_tile(q.shape[0] * q.shape[1], q.shape[2], k.shape[2],
                                          q[..., :1].numel() * v.shape[-1])
    if (rows >= q.shape[2] and keys >= k.shape[2]) or getattr(scheme, "content_whole_rows", False):
        out, lse = _attention._content_rows(q, k, v, scheme, q_positions, k_positions, causal, hook_options,
                                            with_lse=True, block_elements=_attention._CONTENT_RECOMPUTE_ELEMENTS)
        # A row without keys (causal, Lq > Lk): +inf makes its recomputed probabilities 0, not NaN.
        lse = lse.masked_fill_(lse == float("-inf"), float("inf"))
        return out, lse
    return _attention._content_tiles(q, k, v, scheme, q_positions, k_positions, causal, hook_options, with_lse=True)


class _ContentAttention(torch.autograd.Function):
    """``apply(q, k, v, q_positions, k_positions, scheme, causal, *scheme_parameters)``."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, q_positions: Tensor, k_positions: Tensor,
                scheme: PositionalScheme, causal: bool, *params: Tensor) -> Tensor:
        out, lse = _forward(q, k, v, scheme, q_positions, k_positions, causal)
        ctx.save_for_backward(q, k, v, out, lse, q_positions, k_positions, *params)
        ctx.scheme, ctx.causal = scheme, causal
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse, q_positions, k_positions, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad
        need_q, need_k, need_v = needs[0], needs[1], needs[2]
        param_needs = needs[7:]
        grads = _backward(q, k, v, out, lse, grad_out, q_positions, k_positions, ctx.scheme, ctx.causal,
                          (need_q, need_k, need_v), [p for p, n in zip(params, param_needs) if n])
        dq, dk, dv, param_grads = grads
        param_iter = iter(param_grads)
        return (dq, dk, dv, None, None, None, None,
                *(next(param_iter) if n else None for n in param_needs))


def _backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor, q_positions: Tensor,
              k_positions: Tensor, scheme: PositionalScheme, causal: bool, needs: tuple[bool, bool, bool],
              params: list[Tensor]) -> tuple[Tensor | None, Tensor | None, Tensor | None, list[Tensor]]:
    """Gradients of q, k, v (where ``needs``) and of ``params``, block by block (see the module)."""
    need_q, need_k, need_v = needs
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[-2]
    offset, scale = k_len - q_len, scheme.logit_scale(head_dim)
    grad_out = grad_out.contiguous()
    # D_i = dO_i . O_i in the statistics' precision; 0 for a row without keys (its O is NaN).
    delta = (grad_out.to(lse.dtype) * out.to(lse.dtype)).sum(-1, keepdim=True)
    delta = delta.masked_fill_(torch.isinf(lse), 0.0)
    with torch.enable_grad():
        # The per-call state again, from leaves, so that its gradient reaches q, k and the parameters.
        q_call = q.detach().requires_grad_(need_q)
        k_call = k.detach().requires_grad_(need_k)
        state = scheme.prepare_relative(q_call, k_call, q_positions, k_positions)
        kept: list[tuple[Tensor, Tensor]] = []  # (tensor of the state, the leaf that replaces it)
        state = _state_leaves(state, kept, q_positions, k_positions)
    hook_options = {} if state is None else {"state": state}
    leaves = [leaf for _, leaf in kept]
    dq = torch.empty_like(q) if need_q else None
    dk = torch.zeros_like(k) if need_k else None
    dv = torch.zeros_like(v) if need_v else None
    leaf_grads: list[Tensor | None] = [None] * len(leaves)
    param_grads: list[Tensor | None] = [None] * len(params)
    budget = max(1, _attention._CONTENT_RECOMPUTE_ELEMENTS // (batch * heads))
    start = 0
    while start < q_len:
        stop = start + _attention._rows_within(budget, q_len - start, k_len, start + offset if causal else None)
        key_stop = min(k_len, max(1, stop + offset)) if causal else k_len
        with torch.enable_grad():
            q_block = q[:, :, start:stop].detach().requires_grad_(need_q)
            k_block = k[:, :, :key_stop].detach().requires_grad_(need_k)
            v_block = v[:, :, :key_stop].detach().requires_grad_(need_v)
            scores = _attention._content_logits(q, k, scheme, q_positions, k_positions, hook_options, scale, causal,
                                                (start, stop), (0, key_stop), offset, blocks=(q_block, k_block))
            probs = scores.sub_(lse[:, :, start:stop]).exp_()
            total = probs.sum(-1, keepdim=True)
            probs = probs.to(v.dtype)
            values = probs @ v_block
            extra = scheme.relative_values(probs, q_positions[:, start:stop], k_positions[:, :key_stop],
                                           **hook_options,
                                           **_attention._block_indices(scheme, (start, stop), (0, key_stop)))
            if extra is not None:
                values = values + extra
            inputs = [t for t, n in ((q_block, need_q), (k_block, need_k), (v_block, need_v)) if n]
            inputs += leaves + params
            got = torch.autograd.grad((values, total), inputs, (grad_out[:, :, start:stop], -delta[:, :, start:stop]),
                                      allow_unused=True)
        got = list(got)
        if need_q:
            block_grad = got.pop(0)
            dq[:, :, start:stop] = 0.0 if block_grad is None else block_grad
        if need_k:
            block_grad = got.pop(0)
            if block_grad is not None:
                dk[:, :, :key_stop] += block_grad
        if need_v:
            block_grad = got.pop(0)
            if block_grad is not None:
                dv[:, :, :key_stop] += block_grad
        for store, at in ((leaf_grads, 0), (param_grads, len(leaves))):
            for number in range(len(store)):
                block_grad = got[at + number]
                if block_grad is not None:
                    store[number] = block_grad if store[number] is None else store[number].add_(block_grad)
        start = stop
    # The state's gradients, through prepare_relative once: to q, k and the parameters.
    pairs = [(tensor, grad) for (tensor, _), grad in zip(kept, leaf_grads) if grad is not None]
    if pairs:
        inputs = [t for t, n in ((q_call, need_q), (k_call, need_k)) if n] + params
        got = list(torch.autograd.grad([t for t, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True))
        if need_q:
            block_grad = got.pop(0)
            if block_grad is not None:
                dq += block_grad
        if need_k:
            block_grad = got.pop(0)
            if block_grad is not None:
                dk += block_grad
        for number, block_grad in enumerate(got):
            if block_grad is not None:
                param_grads[number] = block_grad if param_grads[number] is None else param_grads[number].add_(block_grad)
    param_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, param_grads)]
    return dq, dk, dv, param_grads


def _state_leaves(state: Any, kept: list[tuple[Tensor, Tensor]], q_positions: Tensor, k_positions: Tensor) -> Any:
    """``state`` with every tensor that requires grad replaced by a detached leaf (recorded in ``kept``
    as ``(tensor, leaf)``), through tuples (named ones too), lists and dicts. A
    :class:`~posemb.functional.relative.DistanceTable` is embedded once for the whole call's range of
    distances and keeps a leaf (:meth:`~posemb.functional.relative.DistanceTable.keep_leaf`), when that
    range is about the size of the sequences (not for positions with huge gaps, where its scheme
    embeds per block)."""
    if isinstance(state, Tensor):
        if not state.requires_grad:
            return state
        leaf = state.detach().requires_grad_(True)
        kept.append((state, leaf))
        return leaf
    if isinstance(state, DistanceTable):
        low, high = distance_bounds(q_positions, k_positions)
        if high - low + 1 <= 4 * (q_positions.shape[-1] + k_positions.shape[-1]):
            built, leaf = state.keep_leaf(low, high)
            if built.requires_grad:
                kept.append((built, leaf))
        return state
    if isinstance(state, tuple):
        items = [_state_leaves(item, kept, q_positions, k_positions) for item in state]
        return type(state)._make(items) if hasattr(type(state), "_make") else tuple(items)
    if isinstance(state, list):
        return [_state_leaves(item, kept, q_positions, k_positions) for item in state]
    if isinstance(state, dict):
        return {key: _state_leaves(item, kept, q_positions, k_positions) for key, item in state.items()}
    return state
