"""Causal content attention whose terms stop changing beyond a reach: far keys on PyTorch's fused CPU
attention kernel, the scheme's hooks only on a band near the diagonal.

Shaw's clipped distances and DeBERTa's clamped rows of P read one table row for every causal pair at
least R apart (``PositionalScheme.far_reach``: Shaw ``i - j >= k``, DeBERTa the first distance whose row
is P's last). There the scheme adds a per-query column ``a_i`` plus a per-key row ``b_j`` to the logits
and one vector ``c`` to the values (``PositionalScheme.far_terms``). In the one softmax over the keys a
query sees:

* far keys, ``j <= i - R``: logits ``scale * (q_i . k_j + a_i + b_j)``, values ``v_j + c``;
* band keys, ``i - R < j <= i``: the scheme's own logits and values (its hooks, on blocks of
  :func:`band_rows` queries against at most that many plus ``R - 1`` keys).

A softmax ignores a constant per row, so ``a_i`` is taken off every logit of row i: the far logits become
``scale * (q'_i . k'_j)`` with ``q' = [q, 1]``, ``k' = [k, b]`` (``b`` in one extra channel, ``v`` padded by
a zero column: the kernel needs one head size), which is causal flash attention of queries ``R - offset ..``
against keys ``.. Lk - R`` (``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu``, which also
returns each row's log-sum-exp), and the band logits become the scheme's minus ``scale * a_i``. The parts
merge by their log-sum-exps (the rescaling of FlashAttention: Dao et al. 2022, arXiv 2205.14135, §3.1),
and ``c`` enters as ``c`` times each row's far probability mass.

Backward (a custom autograd Function; nothing of size (Lq, Lk) is kept, the saved tensors are q, k, v,
the output and two log-sum-exps per row): the far keys' gradients come from the fused kernel's own
backward, given the merged log-sum-exp and ``O - c`` in place of its output. It then forms the merged
probabilities ``P = exp(s - lse)`` and ``dS = P (dO_i . v_j - dO_i . (O_i - c))``, which is the softmax
backward of keys whose values are ``v_j + c`` (FlashAttention-2's ``dS = P o (dP - D)``, Dao 2023,
arXiv 2307.08691, Alg. 2), and its gradient of the extra key channel is ``b``'s. The band is recomputed
block by block with autograd on the surrogate of :mod:`posemb.model.content_autograd`
(``sum dO . o - sum_i D_i sum_j p_ij``), which also gives ``a``'s gradient; ``c``'s is
``sum_i dO_i * far mass_i``. The gradients of a, b, c and of the scheme's per-call state then go back
through ``far_terms`` and ``prepare_relative`` once, to q, k and the scheme's parameters.

CPU only (the kernel is PyTorch's CPU flash attention), float32 / float64 / bfloat16, values as wide as
the keys; :func:`far_field_reach` says whether a call qualifies, the tiled content paths take the rest.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from posemb.functional.relative import consecutive_offset
from posemb.model import attention as _attention
from posemb.model.content_autograd import _state_leaves, content_attention
from posemb.schemes.base import FarTerms, PositionalScheme

#: query rows per band block (each against at most that many + reach - 1 keys); None: :func:`band_rows`
BAND_ROWS: int | None = None


def band_rows(batch_heads: int) -> int:
    """Query rows per band block for ``batch * heads`` attention matrices: ``BAND_ROWS`` when set, else
    ``128 (4 / batch_heads)^(1/3)`` as a power of two in [32, 256].

    A band block of r rows computes r (r + R - 1) logits of which r R are band pairs, so small blocks
    waste less work but cost more calls; the fixed cost per call weighs less the more matrices one call
    holds. Measured on 2 cores (fwd + bwd, head size 32, 4 heads; ``bench/far_field_step_probe.py`` and
    the sweep in docs/performance.md): best r = 128 at batch 1, 64 at batch 8, 32 at batch 64, for both
    Shaw (R = 16) and DeBERTa (R = 127)."""
    if BAND_ROWS is not None:
        return BAND_ROWS
    rows = 128 * (4 / max(1, batch_heads)) ** (1 / 3)
    return int(min(256, max(32, 2 ** round(math.log2(rows)))))
_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def far_field_reach(q: Tensor, k: Tensor, v: Tensor, scheme: PositionalScheme, q_positions: Tensor,
                    k_positions: Tensor) -> int | None:
    """The scheme's reach R when this causal call can take the far-field path, else None: a reach, CPU
    tensors of one supported dtype and one batch size, values as wide as the keys, keys beyond the reach, and positions that
    count up by one with the queries the last Lq of the Lk keys (so index distance = position distance;
    one host synchronisation)."""
    reach = scheme.far_reach()
    if reach is None or q.device.type != "cpu" or q.dtype not in _DTYPES or not (q.dtype == k.dtype == v.dtype) \
            or v.shape[-1] != q.shape[-1] or k.shape[-2] <= reach or torch.compiler.is_compiling() \
            or not (q.shape[0] == k.shape[0] == v.shape[0]) or k.shape[1] != v.shape[1]:
        # (the fused kernel does not broadcast a batch of one; the tiled path does)
        return None
    return reach if consecutive_offset(q_positions, k_positions) == k.shape[-2] - q.shape[-2] else None


def far_field_attention(q: Tensor, k: Tensor, v: Tensor, scheme: PositionalScheme, q_positions: Tensor,
                        k_positions: Tensor, reach: int, *, needs_grad: bool) -> Tensor:
    """Causal attention (batch, heads, Lq, d) of a ``far_reach`` scheme (see the module); ``reach`` from
    :func:`far_field_reach`. With ``needs_grad`` the custom backward; inside ``torch.func.functional_call``
    (parameters swapped for plain tensors, which the backward's second look at the hooks would miss) the
    plain autograd content path instead."""
    if not needs_grad:
        return _forward(q, k, v, scheme, q_positions, k_positions, reach)[0]
    if not all(isinstance(p, torch.nn.Parameter) for p in scheme.parameters()):
        return content_attention(q, k, v, scheme, q_positions, k_positions, causal=True)  # its plain fallback
    params = tuple(p for p in scheme.parameters() if p.requires_grad)
    return _FarFieldAttention.apply(q, k, v, q_positions, k_positions, scheme, reach, *params)


def _far_operands(q: Tensor, k: Tensor, v: Tensor, terms: FarTerms, reach: int):
    """The fused kernel's operands for the far keys: (first query row, q', k', v', is_causal, mask).

    Query row r sees far keys ``0 .. r + offset - reach``: rows from ``first = max(0, reach - offset)``
    against keys ``.. Lk - reach``, a square causal block unless the KV offset exceeds the reach (then a
    bottom-right additive mask, in q's dtype as the kernel requires)."""
    q_len, k_len = q.shape[-2], k.shape[-2]
    first, far_keys = max(0, reach - (k_len - q_len)), k_len - reach
    q_far, k_far, v_far = q[:, :, first:], k[:, :, :far_keys], v[:, :, :far_keys]
    if terms.row is not None:
        row = terms.row[..., :far_keys].transpose(-1, -2).to(k.dtype)
        q_far = torch.cat([q_far, q_far.new_ones(*q_far.shape[:-1], 1)], dim=-1)
        k_far = torch.cat([k_far, row.expand(*k_far.shape[:-1], 1)], dim=-1)
        v_far = torch.nn.functional.pad(v_far, (0, 1))
    square = q_len - first == far_keys
    mask = None if square else torch.zeros(q_len - first, far_keys, dtype=q.dtype, device=q.device).masked_fill_(
        ~_attention.causal_mask(q_len - first, far_keys, q.device), float("-inf"))
    # (no .contiguous(): the kernel takes strided q, k, v, e.g. the slices above or the attention's permuted
    # views of its packed projection, and copies of them were three more (Lq, d) tensors at the peak)
    return first, q_far, k_far, v_far, square, mask


def _head_groups(q: Tensor, k: Tensor, terms: FarTerms) -> list[slice]:
    """Heads per far-field kernel call: all of them when q, k, v go in as they are (views, no copies);
    with a per-key row (q', k', v' widened copies, DeBERTa) groups whose copies (q' over Lq, k' and v' over
    Lk, each d + 1 wide) hold at most about a quarter of the output's elements, and at least one head: at
    Lq = Lk that is one head per call below about 12 heads; with a KV cache (short Lq, long Lk) one head's
    copies may exceed it, which no grouping avoids."""
    heads = q.shape[1]
    if terms.row is None:
        return [slice(0, heads)]
    per_head = q.shape[0] * (q.shape[2] + 2 * k.shape[2]) * (q.shape[3] + 1)
    size = max(1, min(heads, q.shape[0] * heads * q.shape[2] * q.shape[3] // (4 * per_head)))
    return [slice(start, min(heads, start + size)) for start in range(0, heads, size)]


def _heads_of(terms: FarTerms, group: slice, heads: int) -> FarTerms:
    """``terms`` restricted to a group of heads: each term broadcasts to (batch, heads, ., .), so its heads
    axis is the third from the end; terms broadcast over the heads (size 1 there, or fewer dimensions)
    stay as they are."""
    def pick(tensor):
        if tensor is None or tensor.dim() < 3 or tensor.shape[-3] != heads:
            return tensor
        return tensor[..., group, :, :]
    return FarTerms(pick(terms.column), pick(terms.row), pick(terms.value))


def _band_keys(rows: tuple[int, int], q_len: int, k_len: int, reach: int) -> tuple[int, int]:
    """The key range of query rows ``rows``' band keys, ``i - reach < j <= i`` (queries are the last Lq keys)."""
    offset = k_len - q_len
    return max(0, rows[0] + offset - reach + 1), min(k_len, rows[1] + offset)


def _band_logits(q: Tensor, k: Tensor, scheme: PositionalScheme, q_positions: Tensor, k_positions: Tensor,
                 hook_options: dict, scale: float, column: Tensor | None, reach: int, rows: tuple[int, int],
                 blocks: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[int, int]]:
    """Scaled logits of query rows ``rows`` against their band keys (``i - reach < j <= i``, others -inf),
    minus ``scale * column``; and the key range they span."""
    start, stop = rows
    offset = k.shape[-2] - q.shape[-2]
    keys = _band_keys(rows, q.shape[-2], k.shape[-2], reach)
    scores = _attention._content_logits(q, k, scheme, q_positions, k_positions, hook_options, scale, True,
                                        rows, keys, offset, blocks=blocks)
    if column is not None:
        scores = scores.sub_(column[:, :, start:stop].to(scores.dtype) * scale)
    far = (torch.arange(*keys, device=q.device)[None, :]
           <= torch.arange(start, stop, device=q.device)[:, None] + offset - reach)
    return scores.masked_fill_(far, float("-inf")), keys


def _forward(q: Tensor, k: Tensor, v: Tensor, scheme: PositionalScheme, q_positions: Tensor, k_positions: Tensor,
             reach: int, *, group_heads: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Output (q's dtype), the merged log-sum-exp and the far keys' log-sum-exp (-inf for rows without
    far keys), both (batch, heads, Lq) in the kernel's statistics dtype (float32, float64 for float64)."""
    batch, heads, q_len, head_dim = q.shape
    scale = scheme.logit_scale(head_dim)
    state = scheme.prepare_relative(q, k, q_positions, k_positions)
    hook_options = {} if state is None else {"state": state}
    terms = scheme.far_terms(q, k, **hook_options)
    stats = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse_far = q.new_full((batch, heads, q_len), float("-inf"), dtype=stats)
    # The output buffer starts as the far part; each band block is merged into its rows in place, so the
    # peak holds this buffer and one group of heads' kernel operands, not whole-length far and band copies.
    out = q.new_zeros(batch, heads, q_len, head_dim, dtype=stats)
    # (training: one call for all heads; the saved activations dominate its peak, and per-head calls cost time)
    for group in (_head_groups(q, k, terms) if group_heads else [slice(0, heads)]):
        first, q_far, k_far, v_far, square, mask = _far_operands(q[:, group], k[:, group], v[:, group],
                                                                 _heads_of(terms, group, heads), reach)
        far_out, far_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_far, k_far, v_far, 0.0, square, attn_mask=mask, scale=scale)
        del q_far, k_far, v_far, mask
        lse_far[:, group, first:] = far_lse
        out[:, group, first:] = far_out[..., :head_dim]
        del far_out
    if terms.value is not None:
        out[:, :, first:] += terms.value.to(stats)
    lse = torch.empty_like(lse_far)
    rows = band_rows(batch * heads)
    for start in range(0, q_len, rows):
        stop = min(q_len, start + rows)
        scores, keys = _band_logits(q, k, scheme, q_positions, k_positions, hook_options, scale, terms.column,
                                    reach, (start, stop))
        lse_band = torch.logsumexp(scores, dim=-1, keepdim=True)
        probs = scores.sub_(lse_band).exp_().to(v.dtype)
        values = probs @ v[:, :, keys[0]:keys[1]]
        extra = scheme.relative_values(probs, q_positions[:, start:stop], k_positions[:, keys[0]:keys[1]],
                                       **hook_options, **_attention._block_indices(scheme, (start, stop), keys))
        if extra is not None:
            values = values + extra
        block_far = lse_far[:, :, start:stop, None]
        merged = torch.logaddexp(block_far, lse_band.to(stats))
        rows_out = out[:, :, start:stop]
        rows_out.mul_((block_far - merged).exp_()).add_(values.to(stats) * (lse_band.to(stats) - merged).exp_())
        lse[:, :, start:stop] = merged[..., 0]
    return out.to(q.dtype), lse, lse_far


class _FarFieldAttention(torch.autograd.Function):
    """``apply(q, k, v, q_positions, k_positions, scheme, reach, *scheme_parameters)``."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, q_positions: Tensor, k_positions: Tensor,
                scheme: PositionalScheme, reach: int, *params: Tensor) -> Tensor:
        out, lse, lse_far = _forward(q, k, v, scheme, q_positions, k_positions, reach, group_heads=False)
        ctx.save_for_backward(q, k, v, out, lse, lse_far, q_positions, k_positions, *params)
        ctx.scheme, ctx.reach = scheme, reach
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse, lse_far, q_positions, k_positions, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad
        param_needs = needs[7:]
        dq, dk, dv, param_grads = _backward(q, k, v, out, lse, lse_far, grad_out, q_positions, k_positions,
                                            ctx.scheme, ctx.reach,
                                            [p for p, n in zip(params, param_needs) if n])
        param_iter = iter(param_grads)
        return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None, None, None, None,
                None, *(next(param_iter) if n else None for n in param_needs))


def _backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, lse_far: Tensor, grad_out: Tensor,
              q_positions: Tensor, k_positions: Tensor, scheme: PositionalScheme, reach: int,
              params: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """Gradients of q, k, v and ``params`` (see the module)."""
    batch, heads, q_len, head_dim = q.shape
    scale = scheme.logit_scale(head_dim)
    grad_out = grad_out.contiguous()
    delta = (grad_out.to(lse.dtype) * out.to(lse.dtype)).sum(-1, keepdim=True)   # D_i = dO_i . O_i
    with torch.enable_grad():
        # The per-call state and the far terms again, from leaves, so that their gradients reach q, k and
        # the parameters; the state's tensors are replaced by leaves whose gradients the band sums.
        q_call = q.detach().requires_grad_(True)
        k_call = k.detach().requires_grad_(True)
        kept: list[tuple[Tensor, Tensor]] = []
        state = _state_leaves(scheme.prepare_relative(q_call, k_call, q_positions, k_positions), kept,
                              q_positions, k_positions)
        hook_options = {} if state is None else {"state": state}
        terms = scheme.far_terms(q_call, k_call, **hook_options)
    column = None if terms.column is None else terms.column.detach().requires_grad_(True)
    leaves = [leaf for _, leaf in kept]
    # Far keys: the fused kernel's backward with the merged statistics and O - c as its output.
    first, q_far, k_far, v_far, square, mask = _far_operands(q, k, v, FarTerms(None, _detached(terms.row), None),
                                                             reach)
    far_out = out[:, :, first:] if terms.value is None else out[:, :, first:] - terms.value.detach().to(out.dtype)
    far_grad = grad_out[:, :, first:]
    if terms.row is not None:
        far_out, far_grad = torch.nn.functional.pad(far_out, (0, 1)), torch.nn.functional.pad(far_grad, (0, 1))
    grad_q_far, grad_k_far, grad_v_far = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        far_grad.contiguous(), q_far, k_far, v_far, far_out.contiguous(), lse[:, :, first:].contiguous(), 0.0,
        square, attn_mask=mask, scale=scale)
    far_keys = k_far.shape[-2]
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    dq[:, :, first:] = grad_q_far[..., :head_dim]
    dk[:, :, :far_keys] = grad_k_far[..., :head_dim]
    dv[:, :, :far_keys] = grad_v_far[..., :head_dim]
    # Band keys: recomputed per block with autograd on block leaves.
    inputs_after = leaves + params + ([column] if column is not None else [])
    after_grads: list[Tensor | None] = [None] * len(inputs_after)
    rows = band_rows(batch * heads)
    for start in range(0, q_len, rows):
        stop = min(q_len, start + rows)
        with torch.enable_grad():
            q_block = q[:, :, start:stop].detach().requires_grad_(True)
            keys = _band_keys((start, stop), q_len, k.shape[-2], reach)
            k_block = k[:, :, keys[0]:keys[1]].detach().requires_grad_(True)
            v_block = v[:, :, keys[0]:keys[1]].detach().requires_grad_(True)
            scores, _ = _band_logits(q, k, scheme, q_positions, k_positions, hook_options, scale, column, reach,
                                     (start, stop), blocks=(q_block, k_block))
            probs = scores.sub_(lse[:, :, start:stop, None]).exp_()
            total = probs.sum(-1, keepdim=True)
            probs = probs.to(v.dtype)
            values = probs @ v_block
            extra = scheme.relative_values(probs, q_positions[:, start:stop], k_positions[:, keys[0]:keys[1]],
                                           **hook_options, **_attention._block_indices(scheme, (start, stop), keys))
            if extra is not None:
                values = values + extra
            got = torch.autograd.grad((values, total), [q_block, k_block, v_block] + inputs_after,
                                      (grad_out[:, :, start:stop], -delta[:, :, start:stop]), allow_unused=True)
        for grad, target in zip(got[:3], (dq[:, :, start:stop], dk[:, :, keys[0]:keys[1]], dv[:, :, keys[0]:keys[1]])):
            if grad is not None:
                target += grad
        for number, grad in enumerate(got[3:]):
            if grad is not None:
                after_grads[number] = grad if after_grads[number] is None else after_grads[number].add_(grad)
    leaf_grads, param_grads = after_grads[:len(leaves)], after_grads[len(leaves):len(leaves) + len(params)]
    # The far terms' gradients, through far_terms: a's from the band, b's from the kernel's extra key
    # channel, c's from the far probability mass.
    outputs, cotangents = [], []
    if column is not None and after_grads[-1] is not None:
        outputs.append(terms.column)
        cotangents.append(after_grads[-1].to(terms.column.dtype))
    if terms.row is not None:
        with torch.enable_grad():
            row = terms.row.expand(batch, heads, 1, k.shape[-2])[..., :far_keys]
        outputs.append(row)
        cotangents.append(grad_k_far[..., head_dim].unsqueeze(-2).to(row.dtype))
    if terms.value is not None:
        far_mass = (lse_far - lse).exp_()[..., None]                           # (B, H, Lq, 1)
        with torch.enable_grad():
            value = terms.value.expand(batch, heads, 1, head_dim)
        outputs.append(value)
        cotangents.append((grad_out.to(far_mass.dtype) * far_mass).sum(-2, keepdim=True).to(value.dtype))
    # Then everything through the state's leaves and prepare_relative, once.
    _accumulate(outputs, cotangents, q_call, k_call, leaves, params, dq, dk, leaf_grads, param_grads)
    pairs = [(tensor, grad) for (tensor, _), grad in zip(kept, leaf_grads) if grad is not None]
    _accumulate([t for t, _ in pairs], [g for _, g in pairs], q_call, k_call, [], params, dq, dk, [], param_grads)
    return dq, dk, dv, [torch.zeros_like(p) if g is None else g for p, g in zip(params, param_grads)]


def _accumulate(outputs: list[Tensor], cotangents: list[Tensor], q_call: Tensor, k_call: Tensor,
                leaves: list[Tensor], params: list[Tensor], dq: Tensor, dk: Tensor,
                leaf_grads: list[Tensor | None], param_grads: list[Tensor | None]) -> None:
    """Backpropagate ``cotangents`` from ``outputs`` to q, k, the state's leaves and the parameters,
    adding into the gradients gathered so far."""
    if not outputs:
        return
    got = torch.autograd.grad(outputs, [q_call, k_call] + leaves + params, cotangents, allow_unused=True)
    if got[0] is not None:
        dq += got[0]
    if got[1] is not None:
        dk += got[1]
    for store, grads in ((leaf_grads, got[2:2 + len(leaves)]), (param_grads, got[2 + len(leaves):])):
        for number, grad in enumerate(grads):
            if grad is not None:
                store[number] = grad if store[number] is None else store[number] + grad


def _detached(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.detach()


__all__ = ["BAND_ROWS", "band_rows", "far_field_attention", "far_field_reach"]
