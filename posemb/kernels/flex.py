"""Bias-site attention (T5, ALiBi) without an (L, L) bias tensor.

The reference path (``posemb.model.attention.attend`` with ``bias_path="dense"``) asks the scheme
for ``score_bias`` (batch, heads, Lq, Lk), masks it and hands it to SDPA. Two costs dominate on
CPU (measured with ``posemb bench``): building the bias (T5's buckets take 8x the
attention itself at L=2048), and SDPA with a mask computing the whole L x L square where
``is_causal=True`` skips the upper half. Two fast paths avoid both:

**Toeplitz path** (CPU, any device; forward and backward). Both biases depend on the positions only
through the distance ``d = p_key - p_query`` (T5: Raffel et al. 2020, §2.1; ALiBi: Press et al.
2022, §3). When the positions are consecutive integers (the usual case, KV-cache offsets
included) ``d = (j - i) + delta`` for one ``delta``, so every bias row is a window of one table
``u[h, t] = b_h(t - (Lq - 1) + delta)`` of length ``Lq + Lk - 1``. Reversing the query order turns
the window into the strided view ``M[i', j] = u[i' + j]`` (strides (1, 1): ``as_strided`` allows
no negative stride), which SDPA reads directly: no (L, L) tensor in the forward pass. Queries are
processed in blocks of :data:`QUERY_BLOCK` whose keys stop at the block's diagonal, so the causal
upper triangle is mostly skipped. Gradients reach the learned T5 table through the view (the
backward makes one (heads, block, Lk) gradient per block, not an (L, L) one).

**FlexAttention path** (CUDA; ``torch.nn.attention.flex_attention``, compiled). The scheme's
``score_mod`` adds its bias inside the fused kernel; a causal ``BlockMask`` skips masked blocks.
On CPU, torch 2.13's FlexAttention has no backward and its first compiled call takes seconds, and
the Toeplitz path is faster anyway, so it is used on CPU only when asked (``path="flex"``; eager
FlexAttention then runs the unfused reference, useful for testing ``score_mod``).

Anything else (positions that are not consecutive, ``torch.compile`` tracing, schemes without
these hooks) returns None and the caller uses the dense reference.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from posemb._validation import check_choice, check_int
from posemb.functional.relative import consecutive_offset

BIAS_PATHS = ("auto", "dense", "toeplitz", "flex")
#: queries per SDPA call in the Toeplitz path: large enough to keep the kernel busy, small enough
#: that the causal upper triangle computed inside each block (block^2 / 2) stays a few percent.
QUERY_BLOCK = 256
#: score elements (batch * heads * rows * keys) of one block of the Toeplitz backward's dS: ~8 MiB
#: in fp32 (a few such tensors live at once), so a training step's peak stays near SDPA's.
_TOEPLITZ_BACKWARD_ELEMENTS = 1 << 21

_compiled_flex = None


def flex_available() -> bool:
    """True when this torch has FlexAttention."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except Exception:  # pragma: no cover - torch < 2.5
        return False
    return True


def key_query_delta(q_positions: Tensor, k_positions: Tensor) -> int | None:
    """``delta`` with ``k_positions[b, j] - q_positions[b, i] == (j - i) + delta`` for every b, i, j,
    or None when the positions are not consecutive integers with one such offset: the negated
    :func:`posemb.functional.relative.consecutive_offset` (one host sync)."""
    offset = consecutive_offset(q_positions, k_positions)
    return None if offset is None else -offset


TOEPLITZ_BACKWARDS = ("auto", "diagonal", "autograd")


def _block_bias(table: Tensor, heads: int, q_len: int, start: int, stop: int, keys: int) -> Tensor:
    """The (1, heads, stop - start, keys) bias of query block [start, stop) in reversed row order:
    ``bias[i', j] = table[h, i' + j + (q_len - stop)]``, a strided view of the table (no copy)."""
    width = table.shape[1]
    return table.as_strided((1, heads, stop - start, keys), (0, width, 1, 1), table.storage_offset() + q_len - stop)


def _toeplitz_blocks(q_len: int, k_len: int, causal: bool, block: int) -> list[tuple[int, int, int]]:
    """(start, stop, keys) of each query block: causal blocks see keys up to their last row's diagonal."""
    shift = k_len - q_len
    if not causal or q_len <= block:
        block = q_len
    return [(start, min(q_len, start + block), min(q_len, start + block) + shift if causal else k_len)
            for start in range(0, q_len, block)]


def _antidiagonal_sums(x: Tensor) -> Tensor:
    """``s[..., c] = sum_i x[..., i, c - i]`` for x (..., R, K): (..., R + K - 1).

    The skew of the rows (row i shifted right by i) is a view of x padded with R zero columns, read
    with row stride K + R - 1 instead of K + R (the zeros of row i - 1 fill row i's first i columns),
    so the sums are one pad and one reduction, with no index tensor."""
    rows, cols = x.shape[-2:]
    padded = F.pad(x, (0, rows)).flatten(-2)[..., :rows * (cols + rows - 1)]
    return padded.unflatten(-1, (rows, cols + rows - 1)).sum(-2)


def run_sums(values: Tensor, edges: Tensor) -> Tensor:
    """Sums of ``values`` (..., K) over contiguous runs of keys, (..., R): run t holds keys
    ``edges[..., t] <= j < edges[..., t + 1]`` (``edges`` (..., R + 1), ascending, from 0 to K; broadcast
    over leading dimensions of ``values`` it does not have). Each row's inclusive cumulative sum read at the
    run edges, differenced: a scatter-free segment sum (``scatter_add`` into per-run bins serialises on
    runs of equal indices: measured 1.7x slower for FIRE's runs)."""
    totals = values.cumsum(-1)
    edges = edges.expand(*totals.shape[:-1], edges.shape[-1])
    prefix = totals.gather(-1, (edges - 1).clamp_(min=0)).masked_fill_(edges == 0, 0.0)
    return prefix.diff(dim=-1)


def query_block_rows(q_len: int, per_row: int, block: int = QUERY_BLOCK,
                     budget: int = _TOEPLITZ_BACKWARD_ELEMENTS) -> int:
    """Query rows per block of a blocked fused path: ``block``, fewer when ``per_row`` elements a row (its
    mask or scores over all keys, times batch and heads) would pass ``budget`` elements a block; at least 1."""
    return max(1, min(block, q_len, budget // max(1, per_row)))


def flash_cpu_operands(q: Tensor, k: Tensor, v: Tensor, dtypes: tuple) -> bool:
    """Whether q, k, v can go to the CPU flash kernel as they are: CPU, one dtype among ``dtypes``, one batch
    size and head count (the kernel does not broadcast), values as wide as the keys, at least as many keys
    as queries, and not inside ``torch.compile`` tracing."""
    return (q.device.type == "cpu" and q.dtype in dtypes and q.dtype == k.dtype == v.dtype
            and v.shape[-1] == q.shape[-1] and k.shape[-2] >= q.shape[-2]
            and q.shape[:2] == k.shape[:2] == v.shape[:2] and not torch.compiler.is_compiling())


def block_scores_backward(q_block: Tensor, k_block: Tensor, v_block: Tensor, grad_block: Tensor, out: Tensor,
                          lse: Tensor, mask: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``(P, dS)`` of one block of ``softmax(scale q k^T + mask) v`` from its output and log-sum-exps
    (the standard attention backward, e.g. FlashAttention, Dao et al. 2022, Alg. 2, and FlashAttention-2,
    Dao 2023, Alg. 2): ``P = exp(scale q k^T + mask - lse)``, ``dS = P * (dO v^T - D)`` with
    ``D_i = dO_i . O_i``. ``dS`` is also the gradient of the additive ``mask``."""
    probs = torch.matmul(q_block, k_block.transpose(-1, -2)).mul_(scale)
    probs = probs.add_(mask).sub_(lse[..., None]).exp_()
    dscores = torch.matmul(grad_block, v_block.transpose(-1, -2))
    dscores = dscores.sub_((grad_block * out).sum(-1, keepdim=True)).mul_(probs)
    return probs, dscores


def block_input_gradients(q_block: Tensor, k_block: Tensor, grad_block: Tensor, probs: Tensor, dscores: Tensor,
                          scale: float, dq: Tensor, dk: Tensor, dv: Tensor, start: int, stop: int, keys: int) -> None:
    """Finish one block's backward from :func:`block_scores_backward`: ``dv += P^T dO``, ``dq = scale dS k``
    (rows ``start .. stop`` of dq, in reversed order like the block's q), ``dk += scale dS^T q``."""
    dv[:, :, :keys] += torch.matmul(probs.transpose(-1, -2), grad_block)
    dq[:, :, start:stop] = torch.matmul(dscores, k_block).mul_(scale).flip(2)
    dk[:, :, :keys] += torch.matmul(dscores.transpose(-1, -2), q_block).mul_(scale)


def backward_sub_blocks(blocks: list, outputs, lses, batch_heads: int, causal: bool, whole: bool = False):
    """``(start, stop, keys, out, lse)`` of the sub-blocks a blocked backward visits: reversed rows
    [a, b) of a forward block (start, stop, keys) are the rows [stop - b, stop - a) of a block of their
    own (keys up to its last row's diagonal), sized to keep dS and P near ``_TOEPLITZ_BACKWARD_ELEMENTS``
    so the backward's peak stays near SDPA's; ``whole``: the forward blocks themselves."""
    for (block_start, block_stop, block_keys), block_out, block_lse in zip(blocks, outputs, lses):
        rows = block_stop - block_start if whole else max(1, _TOEPLITZ_BACKWARD_ELEMENTS // (batch_heads * block_keys))
        for a in range(0, block_stop - block_start, rows):
            b = min(block_stop - block_start, a + rows)
            yield (block_stop - b, block_stop - a, block_keys - a if causal else block_keys,
                   block_out[:, :, a:b], block_lse[:, :, a:b])


def _toeplitz_backward_block(q: Tensor, k: Tensor, v: Tensor, grad: Tensor, table: Tensor, dq: Tensor, dk: Tensor,
                             dv: Tensor, dtable: Tensor, out: Tensor, lse: Tensor, start: int, stop: int, keys: int,
                             scale: float, cut: int | None) -> None:
    """Accumulate one query block's share of the gradients (see :class:`_ToeplitzAttention`).

    ``out``, ``lse``: the block's output and log-sum-exps in reversed row order, as the forward made them.
    """
    heads, q_len = q.shape[1], q.shape[-2]
    q_block, k_block, v_block = q[:, :, start:stop].flip(2), k[:, :, :keys], v[:, :, :keys]
    grad_block = grad[:, :, start:stop].flip(2)
    mask = _block_bias(table, heads, q_len, start, stop, keys)
    # dS = P * (dO v^T - D) for keys j >= first: every key (no cut), or the band j > i + cut of
    # the block's first row (later rows' entries below their own band are overwritten by the tail rule).
    first = 0 if cut is None else min(keys, max(0, start + cut + 1))
    probs, dscores = block_scores_backward(q_block, k_block[:, :, first:], v_block[:, :, first:], grad_block, out,
                                           lse, mask[..., first:], scale)
    if cut is None:  # the whole dS is at hand: three matmuls finish the backward
        block_input_gradients(q_block, k_block, grad_block, probs, dscores, scale, dq, dk, dv, start, stop, keys)
    else:  # only a band of dS: SDPA's fused backward is cheaper than forming the whole dS
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_block, q_block, k_block, v_block, out, lse, 0.0, False, attn_mask=mask, scale=scale)
        dq[:, :, start:stop] = gq.flip(2)
        dk[:, :, :keys] += gk
        dv[:, :, :keys] += gv
    offset = q_len - stop + first
    sums = _antidiagonal_sums(dscores)
    dtable[:, :, offset:offset + sums.shape[-1]] += sums


class _ToeplitzAttention(torch.autograd.Function):
    """Toeplitz-bias attention with a hand-written backward (CPU), for a table that needs a gradient.

    Forward: SDPA's fused CPU kernel per query block (``_scaled_dot_product_flash_attention_for_cpu``,
    which also returns each row's log-sum-exp), the bias a constant strided view of the table.
    Autograd through that view instead makes SDPA leave its fused kernel (a mask that requires grad
    runs the math kernel, which keeps each block's (L_block, L) probabilities) and runs
    ``as_strided``'s backward (an ``index_add`` over the overlapping view): measured 1.57x causal
    SDPA at L = 2048 for T5, against 1.09x for ALiBi, whose constant table stays on the fused kernel.

    Backward, per block, in the standard attention backward (e.g. FlashAttention, Dao et al. 2022,
    Alg. 2; ``P = exp(S - lse)``, ``D_i = dO_i . O_i``): ``S = scale q k^T + bias``,
    ``dS = P * (dO v^T - D)``, ``dq = scale dS k``, ``dk = scale dS^T q``, ``dv = P^T dO``; the bias
    is added to S unscaled, so ``d table[h, t] = sum of dS over the (i', j) with i' + j + offset = t``,
    an anti-diagonal sum (:func:`_antidiagonal_sums`). One block's tensors live at a time, so the
    saved state is q, k, v, the output and the log-sum-exps: no (L, L) tensor.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, table: Tensor, blocks: list, scale: float,
                cut: int | None, causal: bool) -> Tensor:
        heads, q_len = q.shape[1], q.shape[-2]
        outputs, lses = [], []
        for start, stop, keys in blocks:
            mask = _block_bias(table, heads, q_len, start, stop, keys)
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q[:, :, start:stop].flip(2), k[:, :, :keys], v[:, :, :keys], attn_mask=mask, scale=scale)
            outputs.append(out)
            lses.append(lse)
        ctx.blocks, ctx.scale, ctx.cut, ctx.causal = blocks, scale, cut, causal
        ctx.save_for_backward(q, k, v, table, *outputs, *lses)
        result = [out.flip(2) for out in outputs]
        return result[0] if len(result) == 1 else torch.cat(result, dim=2)

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v, table, *saved = ctx.saved_tensors
        blocks, scale, cut = ctx.blocks, ctx.scale, ctx.cut
        outputs, lses = saved[:len(blocks)], saved[len(blocks):]
        heads = q.shape[1]
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dtable = torch.zeros(q.shape[0], *table.shape, dtype=table.dtype, device=table.device)
        # With a cut, dS is only a band of about (rows, rows + reach): whole blocks, fewer calls.
        for start, stop, keys, out, lse in backward_sub_blocks(blocks, outputs, lses, q.shape[0] * heads,
                                                               ctx.causal, whole=cut is not None):
            _toeplitz_backward_block(q, k, v, grad, table, dq, dk, dv, dtable, out, lse, start, stop, keys, scale, cut)
        if cut is not None:
            # Each row of dS sums to 0 (sum_j P_ij dP_ij = dO_i . O_i = D_i), so the table entries
            # of j - i <= cut, which all hold one function of the parameters, receive minus the rest
            # (all on the last of them, index cut + Lq - 1; the others get 0, which sums the same).
            tail = cut + q.shape[-2] - 1
            dtable[:, :, tail] = -dtable[:, :, tail + 1:].sum(-1)
            dtable[:, :, :tail] = 0
        return dq, dk, dv, dtable.sum(0), None, None, None, None


def toeplitz_bias_attention(q: Tensor, k: Tensor, v: Tensor, distance_bias, delta: int, *, causal: bool,
                            block: int = QUERY_BLOCK, backward: str = "auto", reach: int | None = None) -> Tensor:
    """``softmax(q k^T / sqrt(d) + b(j - i + delta) [+ causal mask]) v`` with the bias read from a
    (heads, Lq + Lk - 1) table through strided views (see the module docstring).

    Args:
        q, k, v: (batch, heads, Lq or Lk, head_dim).
        distance_bias: callable mapping key-minus-query distances (n,) to the bias (heads, n).
        delta: the position offset ``p_key[0] - p_query[0]``.
        causal: query i sees keys j <= i + Lk - Lq (queries are the last Lq of the Lk tokens).
        block: queries per SDPA call.
        backward: how a table that requires grad (T5, Kerple, dynamic position bias) is
            differentiated: ``"diagonal"`` (:class:`_ToeplitzAttention`, CPU only), ``"autograd"``
            (autograd through the strided view: the earlier path, kept as the reference), or
            ``"auto"`` (diagonal on CPU, else autograd). A constant table always takes SDPA's own
            autograd, which keeps its fused kernel.
        reach: when set, ``b(d) = b(-reach)`` as the same function of the parameters for every
            ``d <= -reach`` (and ``b(d) = b(reach)`` for ``d >= reach``): T5's saturating buckets
            (a scheme's ``distance_reach``). The diagonal backward of a causal call then computes
            the bias gradient only within ``reach`` of each row's diagonal (see
            :class:`_ToeplitzAttention`); None: everywhere.
    """
    if reach is not None:
        check_int("reach", reach, minimum=1)
    check_int("block", block, minimum=1)
    check_choice("backward", backward, TOEPLITZ_BACKWARDS)
    heads, q_len, k_len = q.shape[1], q.shape[-2], k.shape[-2]
    shift = k_len - q_len
    relative = torch.arange(-(q_len - 1), k_len, device=q.device)  # j - i for table index t
    table = distance_bias(relative + delta)
    if table.shape != (heads, relative.numel()):
        raise ValueError(f"distance_bias must return (heads={heads}, {relative.numel()}), got {tuple(table.shape)}")
    table = table.to(q.dtype)
    if causal:
        table = table.masked_fill(relative > shift, float("-inf"))
    table = table.contiguous()
    blocks = _toeplitz_blocks(q_len, k_len, causal, block)
    if backward == "auto":
        backward = "diagonal" if q.device.type == "cpu" else "autograd"
    if backward == "diagonal" and q.device.type != "cpu":
        raise ValueError(f"backward='diagonal' runs SDPA's CPU kernel; q is on {q.device.type}")
    if backward == "diagonal" and torch.is_grad_enabled() and table.requires_grad:
        # Causal rows see j - i <= shift; with a reach, every pair with j - i <= -delta - reach
        # (distance <= -reach) shares one bias, and the backward resolves only the band above it.
        cut = None
        if reach is not None and causal and shift + delta < reach and -(q_len - 1) <= -delta - reach < k_len:
            cut = -delta - reach
        return _ToeplitzAttention.apply(q, k, v, table, blocks, q.shape[-1] ** -0.5, cut, causal)
    outputs = []
    for start, stop, keys in blocks:
        mask = _block_bias(table, heads, q_len, start, stop, keys)
        out = F.scaled_dot_product_attention(q[:, :, start:stop].flip(2), k[:, :, :keys], v[:, :, :keys],
                                             attn_mask=mask)
        outputs.append(out.flip(2))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


#: the widest distance table :func:`distance_score_mod` builds (heads x this many values).
MAX_SCORE_MOD_DISTANCES = 1 << 24


def distance_score_mod(distance_bias, q_positions: Tensor, k_positions: Tensor):
    """A FlexAttention ``score_mod(score, b, h, q_idx, kv_idx)`` adding ``b_h(p_kv - p_q)`` for a
    distance-only bias (Kerple, Sandwich, dynamic position bias).

    ``distance_bias`` (distances (n,) -> (heads, n)) runs once, on every distance from the smallest
    to the largest key-minus-query distance of the positions (one host sync), and the score_mod
    reads that (heads, n) table: a scheme's MLP or cosine sum never runs per (query, key) pair, and
    the table is captured with its autograd graph, so gradients reach the scheme's parameters where
    FlexAttention has a backward.

    Args:
        distance_bias: the scheme's ``distance_bias``.
        q_positions, k_positions: (batch, Lq), (batch, Lk) integer positions.
    """
    low = int(k_positions.min()) - int(q_positions.max())
    high = int(k_positions.max()) - int(q_positions.min())
    if high - low + 1 > MAX_SCORE_MOD_DISTANCES:
        raise ValueError(f"positions span {high - low + 1} key-query distances, more than the score_mod table's "
                         f"{MAX_SCORE_MOD_DISTANCES}; use bias_path='dense' (it evaluates only the distances present)")
    table = distance_bias(torch.arange(low, high + 1, device=q_positions.device))

    def distance_bias_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score + table[h, k_positions[b, kv_idx] - q_positions[b, q_idx] - low].to(score.dtype)

    return distance_bias_mod


def flex_bias_attention(q: Tensor, k: Tensor, v: Tensor, score_mod, *, causal: bool,
                        compiled: bool | None = None) -> Tensor:
    """FlexAttention with ``score_mod`` and, when ``causal``, a bottom-right causal block mask.

    ``compiled`` defaults to True on CUDA (the fused kernel) and False elsewhere (the unfused eager
    reference of FlexAttention, which materialises the scores: for tests, not speed).
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _compiled_flex
    q_len, k_len = q.shape[-2], k.shape[-2]
    shift = k_len - q_len
    block_mask = None
    if causal:
        def bottom_right_causal(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + shift

        block_mask = create_block_mask(bottom_right_causal, None, None, q_len, k_len, device=q.device)
    if compiled is None:
        compiled = q.device.type == "cuda"
    function = flex_attention
    if compiled:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        function = _compiled_flex
    if compiled:
        return function(q, k, v, score_mod=score_mod, block_mask=block_mask)
    with warnings.catch_warnings():
        # The eager call is deliberate (tests, CPU); its "use torch.compile" advice is noise here.
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return function(q, k, v, score_mod=score_mod, block_mask=block_mask)


def _distance_reach(scheme) -> int | None:
    """The scheme's ``distance_reach()`` (the |distance| beyond which its bias is one shared value), or None."""
    reach = getattr(scheme, "distance_reach", None)
    return reach() if callable(reach) else None


def bias_attention(q: Tensor, k: Tensor, v: Tensor, scheme, q_positions: Tensor, k_positions: Tensor, *,
                   causal: bool, path: str = "auto") -> Tensor | None:
    """Bias-site attention through a fast path, or None when the dense reference should run.

    ``path``: ``"auto"`` (FlexAttention on CUDA, Toeplitz elsewhere when the positions are
    consecutive, else None), ``"dense"`` (always None), ``"toeplitz"`` or ``"flex"`` (forced; they
    raise ``ValueError`` when they cannot apply).
    """
    check_choice("path", path, BIAS_PATHS)
    if path == "dense":
        return None
    has_distance = callable(getattr(scheme, "distance_bias", None))
    has_score_mod = callable(getattr(scheme, "score_mod", None))
    batch = q.shape[0]
    if path == "auto":
        if torch.compiler.is_compiling():
            return None
        if q.device.type == "cuda" and has_score_mod and flex_available():
            path = "flex"
        elif has_distance:
            path = "toeplitz"
        else:
            return None
        if path == "toeplitz":
            delta = key_query_delta(q_positions, k_positions)
            if delta is None:
                return None
            return toeplitz_bias_attention(q, k, v, scheme.distance_bias, delta, causal=causal,
                                           reach=_distance_reach(scheme))
    name = type(scheme).__name__
    if path == "toeplitz":
        if not has_distance:
            raise ValueError(f"path='toeplitz' needs a distance_bias method, which {name} does not have")
        delta = key_query_delta(q_positions, k_positions)
        if delta is None:
            raise ValueError("path='toeplitz' needs consecutive positions with one key-query offset for "
                             "every batch row; use path='auto' or 'dense' for other positions")
        return toeplitz_bias_attention(q, k, v, scheme.distance_bias, delta, causal=causal,
                                           reach=_distance_reach(scheme))
    if not has_score_mod:
        raise ValueError(f"path='flex' needs a score_mod method, which {name} does not have")
    if not flex_available():
        raise ValueError("path='flex' needs torch.nn.attention.flex_attention (torch >= 2.5)")
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("path='flex' has no backward on CPU in this torch (FlexAttention raises "
                         "NotImplementedError); use path='auto' or 'toeplitz', which have one")
    score_mod = scheme.score_mod(q_positions.expand(batch, -1), k_positions.expand(batch, -1))
    return flex_bias_attention(q, k, v, score_mod, causal=causal)
