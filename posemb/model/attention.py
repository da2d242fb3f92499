"""Multi-head attention that consults a positional scheme through its site's hooks.

Fast path: ``torch.nn.functional.scaled_dot_product_attention`` (SDPA) for the none, input,
rotation and bias sites. The content site (Shaw, Transformer-XL, DeBERTa) needs extra terms
inside the softmax and on the values, so it runs its own blocked loop over the scheme's hooks:
without autograd, (rows x keys) tiles with an online softmax into the preallocated output (peak
memory: the output plus a few tiles); with autograd, query blocks against the keys they may see.
Never O(Lq * Lk * head_dim), and never a whole (Lq, Lk) score matrix without autograd. Causal calls on
CPU of the schemes with a fused path (FIRE, CoPE, Transformer-XL, the forgetting gate, Shaw and DeBERTa
beyond their reach) run PyTorch's fused CPU attention kernel with the scheme's term as its mask or in an
extra channel, each with a hand-written backward (``_content_attention``; docs/architecture.md); the
blocked loop above is their reference and takes every other call.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from posemb._validation import check_bool, check_choice, check_heads, check_int, check_tensor, check_width
from posemb.model.cache import LayerCache
from posemb.schemes.base import POSITION_LAYOUTS, PositionalScheme, check_positions

# Content site (Shaw, Transformer-XL, DeBERTa); see _content_attention and docs/performance.md.
# With autograd: elements of one score block (batch * heads * rows * keys), ~64 MiB in fp32. Autograd
# keeps every block's probabilities anyway, so large blocks (few Python iterations) cost nothing extra.
_CONTENT_BLOCK_ELEMENTS = 1 << 24
# Without autograd: a score tile holds about 1/_CONTENT_TILE_FRACTION of the output's elements (the
# footprint of plain SDPA, which allocates little besides its output), clamped to [MIN, MAX], so the
# peak stays near the output plus a few tiles; _CONTENT_TILE_ASPECT keys per query row keep each
# tile's per-distance table (Lq + Lk - 1 distances) close to the tile's own size.
_CONTENT_TILE_FRACTION = 8
_CONTENT_TILE_MIN_ELEMENTS = 1 << 16
_CONTENT_TILE_MAX_ELEMENTS = 1 << 21
_CONTENT_TILE_ASPECT = 8
# With autograd: "recompute" runs posemb.model.content_autograd (a custom autograd Function that saves
# q, k, v, the output and each row's log-sum-exp, and recomputes the tiles in the backward pass);
# "autograd" keeps the older path, plain autograd through _content_rows (every block's probabilities
# and the hooks' intermediates kept until the backward pass): the reference the tests and the
# benchmark compare against.
_CONTENT_PATH = "recompute"
# Score elements (batch * heads * rows * keys) of one block of the recomputing path, forward of
# whole-row schemes and backward of all: ~8 MiB in fp32, a handful of such tensors live at once.
# Large enough that the Python work per block (a few hook calls, one torch.autograd.grad) is small
# beside its arithmetic, small enough that the backward's peak stays near SDPA's.
_CONTENT_RECOMPUTE_ELEMENTS = 1 << 21
# Content schemes with ``content_key_bias`` (a per-key bias, the forgetting gate), causal: fused SDPA
# with the bias in an extra channel (posemb.model.key_bias_attention). False: the tiled paths above,
# the reference the tests compare it against.
_KEY_BIAS_FUSED = True
# Content schemes with a ``far_reach`` (Shaw, DeBERTa), causal, CPU, consecutive positions: far keys on the
# fused CPU flash kernel, the hooks on a band of ``reach`` keys (posemb.model.far_field_attention). False:
# the tiled paths above, the reference the tests compare it against.
_FAR_FIELD_FUSED = True
# Content schemes with ``fire_parameters`` (FIRE), causal, CPU, consecutive positions: fused CPU flash
# attention per query block with the MLP's piecewise linear bias (posemb.model.fire_attention). False: the
# tiled paths above, the reference the tests compare it against.
_FIRE_FUSED = True
# Content schemes with ``cope_parameters`` (CoPE), causal, CPU: whole-row blocks with the position logits as
# the fused kernel's mask and a hand-written backward (posemb.model.cope_attention). False: the tiled paths.
_COPE_FUSED = True
# Content schemes with ``relative_key_terms`` (Transformer-XL), causal, CPU, consecutive positions: the fused
# CPU kernel with the positional scores as a strided mask and a hand-written backward
# (posemb.model.relative_keys_attention). False: the tiled paths.
_RELATIVE_KEYS_FUSED = True


def causal_mask(q_len: int, k_len: int, device: torch.device) -> Tensor:
    """Boolean (q_len, k_len) mask, True where attention is allowed. Queries are the last ``q_len``
    tokens of the ``k_len`` keys (the KV-cache case), so query i sees keys 0 .. k_len - q_len + i."""
    offset = k_len - q_len
    q_index = torch.arange(q_len, device=device)[:, None] + offset
    return torch.arange(k_len, device=device)[None, :] <= q_index


def attend(q: Tensor, k: Tensor, v: Tensor, scheme: PositionalScheme | None, q_positions: Tensor,
           k_positions: Tensor, *, causal: bool, bias_path: str = "auto") -> Tensor:
    """Attention of already-projected (and, for the rotation site, rotated) q, k, v under ``scheme``.

    ``bias_path`` (bias site only): ``"auto"`` lets :func:`posemb.kernels.flex.bias_attention` pick
    a path without an (L, L) bias (FlexAttention on CUDA, a Toeplitz view of the bias elsewhere);
    ``"dense"`` forces the reference below (``score_bias`` + SDPA); ``"toeplitz"``/``"flex"`` force one.

    Returns (batch, heads, Lq, head_dim) in q's dtype.
    """
    site = "none" if scheme is None else scheme.site
    q_len, k_len = q.shape[-2], k.shape[-2]
    if site == "content":
        return _content_attention(q, k, v, scheme, q_positions, k_positions, causal=causal)
    if site == "bias" and bias_path != "dense":
        from posemb.kernels.flex import bias_attention  # kernels layer; imported lazily to keep imports light

        fast = bias_attention(q, k, v, scheme, q_positions, k_positions, causal=causal, path=bias_path)
        if fast is not None:
            return fast
    bias = scheme.score_bias(q_positions, k_positions) if site == "bias" else None
    if bias is None:
        # A rotation scheme may change the softmax scale (DeepSeek MLA's YaRN mscale^2); SDPA's
        # default 1/sqrt(d) otherwise.
        scale = (scheme.logit_scale(q.shape[-1]) if site == "rotation"
                 and type(scheme).logit_scale is not PositionalScheme.logit_scale else None)
        value_dim = v.shape[-1]
        if value_dim < q.shape[-1] and q.device.type == "cpu":
            # Values narrower than the keys (PoPE's 2d-wide q, k): CPU SDPA then leaves its fused
            # kernel for the math one, which forms the (Lq, Lk) scores (measured 5.7x slower at
            # L = 2048); zero columns bring v to the key width, and are sliced off the output.
            v = F.pad(v, (0, q.shape[-1] - value_dim))
            return attend(q, k, v, scheme, q_positions, k_positions, causal=causal,
                          bias_path=bias_path)[..., :value_dim]
        if not causal or q_len == 1:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        if q_len == k_len:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(q_len, k_len, q.device), scale=scale)
    # A 4-D mask keeps SDPA off its slow math kernel (a 3-D one silently falls back to it).
    bias = bias.to(q.dtype)
    if bias.dim() != 4 or bias.shape[1] != q.shape[1] or bias.shape[-2:] != (q_len, k_len) \
            or bias.shape[0] not in (1, q.shape[0]):
        raise ValueError(f"{type(scheme).__name__}.score_bias must return shape (batch or 1, heads={q.shape[1]}, "
                         f"Lq={q_len}, Lk={k_len}), got {tuple(bias.shape)}; does the scheme's num_heads "
                         f"match the attention's?")
    if causal and q_len > 1:
        bias = bias.masked_fill(~causal_mask(q_len, k_len, q.device), float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def _content_attention(q: Tensor, k: Tensor, v: Tensor, scheme: PositionalScheme, q_positions: Tensor,
                       k_positions: Tensor, *, causal: bool) -> Tensor:
    """Attention with content-site terms (Shaw, Transformer-XL, DeBERTa), block by block.

    The scheme's ``prepare_relative`` runs once; its result goes to every block's hooks as ``state``.
    Without autograd, queries and keys are cut into tiles of ``_content_tile`` size, visited one key
    diagonal at a time, and combined by an online softmax into the preallocated output: peak memory
    is the output plus a few tiles (``docs/performance.md``). With autograd, whole rows of keys per
    query block and a plain softmax, so autograd saves one probability block per block.
    """
    needs_grad = torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad or any(p.requires_grad for p in scheme.parameters()))
    # (its backward is once-differentiable: _CONTENT_PATH = "autograd", which promises plain autograd and
    # so double backward, takes the tiled path)
    if causal and _FIRE_FUSED and (_CONTENT_PATH == "recompute" or not needs_grad) \
            and scheme.fire_parameters() is not None:
        from posemb.model.fire_attention import fire_attention, fire_attention_applies  # (lazily: light imports)

        if fire_attention_applies(q, k, v, scheme, q_positions, k_positions):
            return fire_attention(q, k, v, scheme, q_positions, needs_grad=needs_grad)
    if causal and _COPE_FUSED and (_CONTENT_PATH == "recompute" or not needs_grad) \
            and scheme.cope_parameters() is not None:
        from posemb.model.cope_attention import cope_attention, cope_attention_applies  # imports this module

        if cope_attention_applies(q, k, v, scheme):
            return cope_attention(q, k, v, scheme, needs_grad=needs_grad)
    if causal and _RELATIVE_KEYS_FUSED and (_CONTENT_PATH == "recompute" or not needs_grad) \
            and scheme.relative_key_terms() is not None:
        from posemb.model.relative_keys_attention import relative_keys_attention, relative_keys_attention_applies

        if relative_keys_attention_applies(q, k, v, scheme, q_positions, k_positions, needs_grad=needs_grad):
            return relative_keys_attention(q, k, v, scheme, needs_grad=needs_grad)
    if causal and _FAR_FIELD_FUSED and (_CONTENT_PATH == "recompute" or not needs_grad) \
            and scheme.far_reach() is not None:
        from posemb.model.far_field_attention import far_field_attention, far_field_reach  # imports this module

        reach = far_field_reach(q, k, v, scheme, q_positions, k_positions)
        if reach is not None:
            return far_field_attention(q, k, v, scheme, q_positions, k_positions, reach, needs_grad=needs_grad)
    state = scheme.prepare_relative(q, k, q_positions, k_positions)
    hook_options = {} if state is None else {"state": state}
    if causal and _KEY_BIAS_FUSED and (_CONTENT_PATH == "recompute" or not needs_grad) \
            and getattr(scheme, "content_key_bias", False):
        from posemb.model.key_bias_attention import key_bias_attention

        return key_bias_attention(q, k, v, scheme, state, needs_grad=needs_grad)
    rows, keys = _content_tile(q.shape[0] * q.shape[1], q.shape[2], k.shape[2], q[..., :1].numel() * v.shape[-1])
    # One tile holds everything (decoding, short inputs): the plain softmax of the rows path is the
    # same memory with fewer operations.
    # CoPE-like schemes (``content_whole_rows``) need all of a query's keys in one call.
    if needs_grad and _CONTENT_PATH == "recompute" and not torch.compiler.is_compiling():
        from posemb.model.content_autograd import content_attention  # imports this module: lazily

        return content_attention(q, k, v, scheme, q_positions, k_positions, causal=causal)
    if needs_grad or torch.compiler.is_compiling() or (rows >= q.shape[2] and keys >= k.shape[2]) \
            or getattr(scheme, "content_whole_rows", False):
        return _content_rows(q, k, v, scheme, q_positions, k_positions, causal, hook_options)
    return _content_tiles(q, k, v, scheme, q_positions, k_positions, causal, hook_options)


def _block_indices(scheme: PositionalScheme, rows: tuple[int, int], keys: tuple[int, int]) -> dict:
    """The block's index ranges as hook keywords, for schemes that ask (``content_block_indices``)."""
    return {"rows": rows, "keys": keys} if getattr(scheme, "content_block_indices", False) else {}


def _content_logits(q: Tensor, k: Tensor, scheme: PositionalScheme, q_positions: Tensor, k_positions: Tensor,
                    hook_options: dict, scale: float, causal: bool, rows: tuple[int, int], keys: tuple[int, int],
                    offset: int, workspace: Tensor | None = None,
                    blocks: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Scaled, masked float logits of query rows ``rows`` against keys ``keys`` (absolute index ranges).

    Query row i may see key j when ``j <= i + offset`` (``offset = Lk - Lq``: queries are the last Lq keys).
    ``workspace`` (no autograd): flat memory the scores are written to, reused from tile to tile.
    ``blocks``: the (q block, k block) to score instead of slices of ``q`` and ``k`` (the recomputing
    backward passes leaves of its own, so that their gradients are block-sized).
    """
    (row_start, row_stop), (key_start, key_stop) = rows, keys
    q_block, k_block = blocks if blocks is not None else (q[:, :, row_start:row_stop], k[:, :, key_start:key_stop])
    if workspace is None:
        scores = q_block @ k_block.transpose(-1, -2)
    else:
        shape = (*q.shape[:2], row_stop - row_start, key_stop - key_start)
        scores = torch.matmul(q_block, k_block.transpose(-1, -2), out=workspace[:math.prod(shape)].view(shape))
    extra = scheme.relative_logits(q_block, k_block, q_positions[:, row_start:row_stop],
                                   k_positions[:, key_start:key_stop], **hook_options,
                                   **_block_indices(scheme, rows, keys))
    for term in () if extra is None else extra if isinstance(extra, (tuple, list)) else (extra,):
        scores = scores.add_(term) if term.dtype == scores.dtype else scores + term
    if scores.dtype not in (torch.float32, torch.float64):
        scores = scores.float()
    scores = scores.mul_(scale)
    first_hidden = row_start + offset + 1  # the first key some row of the block must not see
    if causal and first_hidden < key_stop:
        cut = max(first_hidden, key_start)
        hidden = (torch.arange(cut, key_stop, device=q.device)[None, :]
                  > torch.arange(row_start, row_stop, device=q.device)[:, None] + offset)
        scores[..., cut - key_start:].masked_fill_(hidden, float("-inf"))
    return scores


def _content_rows(q: Tensor, k: Tensor, v: Tensor, scheme: PositionalScheme, q_positions: Tensor,
                  k_positions: Tensor, causal: bool, hook_options: dict, *, with_lse: bool = False,
                  block_elements: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Query blocks against all the keys they may see (autograd path): a plain softmax per block.

    ``with_lse``: also return each row's log-sum-exp of the logits, (batch, heads, Lq, 1) float
    (the recomputing backward's statistics); ``block_elements``: score elements per block
    (default ``_CONTENT_BLOCK_ELEMENTS``)."""
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[-2]
    offset, scale = k_len - q_len, scheme.logit_scale(head_dim)
    budget = max(1, (block_elements or _CONTENT_BLOCK_ELEMENTS) // (batch * heads))
    outputs, lses, start = [], [], 0
    while start < q_len:
        stop = start + _rows_within(budget, q_len - start, k_len, start + offset if causal else None)
        key_stop = min(k_len, max(1, stop + offset)) if causal else k_len
        scores = _content_logits(q, k, scheme, q_positions, k_positions, hook_options, scale, causal,
                                 (start, stop), (0, key_stop), offset)
        if with_lse:  # exp(s - lse) is the softmax; a row without keys gets NaN, as softmax gives
            lse = torch.logsumexp(scores, dim=-1, keepdim=True)
            lses.append(lse)
            probs = scores.sub_(lse).exp_().to(v.dtype)
        else:
            probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out = probs @ v[:, :, :key_stop]
        extra_values = scheme.relative_values(probs, q_positions[:, start:stop], k_positions[:, :key_stop],
                                              **hook_options, **_block_indices(scheme, (start, stop), (0, key_stop)))
        outputs.append(out if extra_values is None else out + extra_values)
        start = stop
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-2)
    return (out, lses[0] if len(lses) == 1 else torch.cat(lses, dim=-2)) if with_lse else out


def _rows_within(budget: int, rows_left: int, k_len: int, visible_before: int | None) -> int:
    """How many query rows fit ``budget`` score elements (per batch and head), at least one. Causal
    blocks (``visible_before`` = keys the first row sees, minus one) only need keys up to their last row."""
    rows = budget // k_len
    if visible_before is not None:  # rows * (visible_before + rows) <= budget
        base = max(0, visible_before)
        rows = max(rows, (math.isqrt(base * base + 4 * budget) - base) // 2)
    return max(1, min(rows_left, rows))


def _content_tile(batch_heads: int, q_len: int, k_len: int, out_elements: int) -> tuple[int, int]:
    """Tile (query rows, keys) for the no-grad path: score tiles of about ``out_elements /
    _CONTENT_TILE_FRACTION`` elements (clamped), ``_CONTENT_TILE_ASPECT`` keys per query row,
    powers of two."""
    elements = min(_CONTENT_TILE_MAX_ELEMENTS,
                   max(_CONTENT_TILE_MIN_ELEMENTS, out_elements // _CONTENT_TILE_FRACTION))
    per_head = max(1, elements // batch_heads)
    rows = 1 << max(3, (math.isqrt(max(1, per_head // _CONTENT_TILE_ASPECT))).bit_length() - 1)
    rows = min(rows, q_len)
    keys = min(k_len, max(rows, 1 << max(0, (per_head // rows).bit_length() - 1)))
    return rows, keys


def _content_tiles(q: Tensor, k: Tensor, v: Tensor, scheme: PositionalScheme, q_positions: Tensor,
                   k_positions: Tensor, causal: bool, hook_options: dict, *,
                   with_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """No-grad path: (rows x keys) tiles, one online softmax per query row (Milakov & Gimelshein 2018,
    "Online normalizer calculation for softmax"; the FlashAttention loop, in PyTorch ops).

    Query block b covers rows [stop_b - rows, stop_b), counted from the end; its tile t covers keys
    [edge_b - (t + 1) keys, edge_b - t keys) with ``edge_b = stop_b + offset`` (the first hidden key
    of its last row, causal). t = 0 holds the diagonal and every row's last visible key, so it opens
    each row's softmax; t < 0 (bidirectional) lie beyond it. Tiles are visited one t at a time:
    with consecutive positions all tiles of one t share one range of distances, so a scheme's
    per-distance table (Transformer-XL's ``W_R R``) is built once per t, not once per tile.

    ``with_lse``: also return each row's log-sum-exp ``m + log l`` (running max m, running sum l),
    (batch, heads, Lq, 1) float; +inf for a row without keys.
    """
    batch, heads, q_len, head_dim = q.shape
    k_len, value_dim = k.shape[-2], v.shape[-1]
    offset, scale = k_len - q_len, scheme.logit_scale(head_dim)
    out_dtype = v.dtype
    rows, keys = _content_tile(batch * heads, q_len, k_len, batch * heads * q_len * value_dim)
    # The output doubles as the un-normalised accumulator when it is float32/64.
    exact = out_dtype in (torch.float32, torch.float64)
    acc = q.new_empty(batch, heads, q_len, value_dim, dtype=out_dtype if exact else torch.float32)
    row_max = q.new_empty(batch, heads, q_len, 1, dtype=acc.dtype)
    row_sum = torch.empty_like(row_max)
    # One block of memory for every tile's scores: tiles of varying size would otherwise leave holes
    # in the heap that later tiles cannot reuse (the resident set would grow past the live set).
    workspace = q.new_empty(batch * heads * rows * keys) if q.dtype in (torch.float32, torch.float64) else None
    blocks = [(max(0, stop - rows), stop) for stop in range(q_len, 0, -rows)]
    edges = [stop + offset for _, stop in blocks]
    opened = [False] * len(blocks)  # whether a block's rows have seen a tile (their softmax has started)
    # Tile t of block b exists when its keys overlap [0, k_len) (and, causal, start before the edge).
    t_last = max((edge - 1) // keys for edge in edges) if max(edges) > 0 else -1
    t_first = 0 if causal else -max(-((edge - k_len) // keys) for edge in edges)
    for t in [*range(0, t_last + 1), *range(-1, t_first - 1, -1)]:
        for number, ((row_start, row_stop), edge) in enumerate(zip(blocks, edges)):
            key_start, key_stop = max(0, edge - (t + 1) * keys), min(k_len, edge - t * keys)
            if key_start >= key_stop:
                continue
            scores = _content_logits(q, k, scheme, q_positions, k_positions, hook_options, scale, causal,
                                     (row_start, row_stop), (key_start, key_stop), offset, workspace)
            tile_max = scores.amax(dim=-1, keepdim=True)
            block_max, block_sum = row_max[:, :, row_start:row_stop], row_sum[:, :, row_start:row_stop]
            block_acc = acc[:, :, row_start:row_stop]
            first = not opened[number]
            opened[number] = True
            if first:
                block_max.copy_(tile_max)
            else:
                new_max = torch.maximum(block_max, tile_max)
                rescale = block_max.sub_(new_max).exp_()
                block_sum.mul_(rescale)
                block_acc.mul_(rescale)
                block_max.copy_(new_max)
            probs = scores.sub_(block_max).exp_()
            tile_sum = probs.sum(dim=-1, keepdim=True)
            probs = probs.to(v.dtype)
            values = probs @ v[:, :, key_start:key_stop]
            extra_values = scheme.relative_values(probs, q_positions[:, row_start:row_stop],
                                                  k_positions[:, key_start:key_stop], **hook_options,
                                                  **_block_indices(scheme, (row_start, row_stop), (key_start, key_stop)))
            if extra_values is not None:
                values = values.add_(extra_values)
            if first:
                block_sum.copy_(tile_sum)
                block_acc.copy_(values)
            else:
                block_sum.add_(tile_sum)
                block_acc.add_(values)
    for (row_start, row_stop), seen in zip(blocks, opened):  # no key at all (causal, Lq > Lk): NaN, as softmax
        if not seen:
            acc[:, :, row_start:row_stop] = float("nan")
            row_sum[:, :, row_start:row_stop] = 1.0
            row_max[:, :, row_start:row_stop] = float("inf")
    acc = acc.div_(row_sum)
    out = acc if exact else acc.to(out_dtype)
    return (out, row_max.add_(row_sum.log_())) if with_lse else out


def resolve_position_layout(scheme: PositionalScheme | None, position_layout: str | None,
                            position_axes: int | None) -> tuple[str, int]:
    """``(layout, axes)`` of the positions an attention layer receives: the scheme's, or the given
    ones, which must be the scheme's unless the scheme reads no positions (NoPE)."""
    reads = scheme is not None and scheme.site != "none"
    own = (scheme.position_layout, scheme.position_axes) if reads else ("batch seq", 1)
    if position_layout is None:
        return own
    check_choice("position_layout", position_layout, POSITION_LAYOUTS)
    axes = 1 if position_layout == "batch seq" else check_int("position_axes", position_axes, minimum=1)
    if reads and (position_layout, axes) != own:
        raise ValueError(f"position_layout={position_layout!r} with position_axes={axes} does not match scheme "
                         f"{scheme.name!r}, which reads {own[1]} coordinate(s) per token as {own[0]!r}")
    return position_layout, axes


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention, causal or bidirectional, with an optional positional scheme.

    Args:
        dim: model width.
        num_heads: number of heads; ``dim`` must be divisible by it.
        scheme: a :class:`PositionalScheme` (or None for no position information).
        causal: mask future tokens (decoder) or not (encoder).
        bias: use biases in the projections.
        position_layout: the shape of ``positions`` (:data:`posemb.schemes.base.POSITION_LAYOUTS`);
            default: the scheme's. A model whose layers mix schemes passes its own (a NoPE layer
            of an M-RoPE model receives (3, batch, seq) positions and only caches them).
        position_axes: coordinates per token for a multi-axis ``position_layout``.
    """

    def __init__(self, dim: int, num_heads: int, scheme: PositionalScheme | None = None, *,
                 causal: bool = True, bias: bool = False, position_layout: str | None = None,
                 position_axes: int | None = None) -> None:
        super().__init__()
        check_width("dim", dim)
        check_heads("num_heads", num_heads)
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.causal = check_bool("causal", causal)
        check_bool("bias", bias)
        self.scheme = scheme
        self.position_layout, self.position_axes = resolve_position_layout(scheme, position_layout, position_axes)
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: Tensor, positions: Tensor, cache: LayerCache | None = None) -> Tensor:
        check_tensor("x", x, ndim=3, floating=True)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x's last dimension must be dim={self.dim}, got shape {tuple(x.shape)}")
        batch, length, _ = x.shape
        if batch == 0 or length == 0:
            raise ValueError(f"x must hold at least one sequence and one position, got shape {tuple(x.shape)}")
        check_positions("positions", positions, self.position_layout, self.position_axes, batch, length)
        if x.is_meta or positions.is_meta:
            raise ValueError("x and positions must hold values, got a tensor on the meta device")
        scheme = self.scheme
        site = "none" if scheme is None else scheme.site
        qkv = self.qkv(x)  # (batch, seq, 3 * dim), thirds q | k | v
        # RoPE-family schemes rotate q and k in place inside the projection's output (one read and
        # write of q and k, no allocation; backward in place on the gradient): nobody else can hold
        # that tensor when the projection is a plain nn.Linear without forward hooks (a hook could
        # keep the output and would see it rotated), the rotated keys are what gets cached, and no
        # graph is being traced (torch.compile fuses the out-of-place formula instead).
        packed = (site == "rotation" and getattr(scheme, "rotates_packed", False)
                  and (cache is None or scheme.caches_rotated_keys) and type(self.qkv) is nn.Linear
                  and not self.qkv._forward_hooks and not nn.modules.module._global_forward_hooks
                  and not torch.compiler.is_compiling())
        if packed:
            # grad_inplace: qkv's only consumer is the view/permute/unbind below, whose backward
            # stacks a fresh gradient that nothing else reads.
            qkv = scheme.rotate_qkv_(qkv, positions, heads=self.num_heads, grad_inplace=True)
        # (batch, seq, 3 * dim) -> 3 x (batch, heads, seq, head_dim)
        q, k, v = qkv.view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k_positions = positions
        if packed:
            if cache is not None:
                k, v, k_positions = cache.append(k, v, positions, layout=self.position_layout)
        elif site == "rotation" and (cache is None or scheme.caches_rotated_keys):
            q, k = scheme.rotate(q, k, positions, positions)
            if cache is not None:
                k, v, k_positions = cache.append(k, v, positions, layout=self.position_layout)
        elif site == "rotation":
            raw_k, v, k_positions = cache.append(k, v, positions, layout=self.position_layout)
            q, k = scheme.rotate(q, raw_k, positions, k_positions)
        elif cache is not None:
            k, v, k_positions = cache.append(k, v, positions, layout=self.position_layout)
        out = attend(q, k, v, scheme, positions, k_positions, causal=self.causal)  # (batch, heads, seq, head_dim)
        return self.out(out.transpose(1, 2).reshape(batch, length, self.dim))     # (batch, seq, dim)
