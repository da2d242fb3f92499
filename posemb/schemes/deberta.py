"""DeBERTa's disentangled attention (He et al. 2020, arXiv 2006.03654, §3.1; DeBERTa-v2/v3 as in
Hugging Face ``transformers/models/deberta_v2/modeling_deberta_v2.py``).

    A_ij = Q^c_i . K^c_j                 (content-to-content, the plain q . k)
         + Q^c_i . K^r[delta(i, j)]      (c2p)
         + K^c_j . Q^r[delta(i, j)]      (p2c)
    H = softmax(A / sqrt((1 + #terms) * d)) V          (p2p is dropped, as in the paper)

with ``K^r = P W_{k,r}``, ``Q^r = P W_{q,r}`` and P a learned table of ``2 * span`` relative
embeddings. ``delta(i, j) = clamp(rel + span, 0, 2 span - 1)`` where ``rel = i - j`` (query minus
key, HF's ``relative_pos``), optionally first log-bucketed (DeBERTa-v2 ``position_buckets``), and
then ``span = position_buckets``; otherwise ``span = max_relative_positions`` (the paper's k).

Index convention. The paper's Eq. 4 writes the p2c term with ``delta(j, i)``; the released code
(and HF) gather the key-by-position scores with ``clamp(-r_pos + span)`` where ``r_pos`` is
indexed [key][query], which is the same ``delta(i, j) = clamp(i - j + span)`` as c2p. This module
follows the released code, so checkpoints' P tables mean the same thing here (checked against
HF's ``DisentangledSelfAttention`` in the tests).

Computed without an (Lq, Lk, d) tensor: ``q @ K^r^T`` (Lq, 2 span) and ``k @ Q^r^T`` (Lk, 2 span)
are scored once and gathered into (Lq, Lk).

Per attention call (``prepare_relative``) K^r and Q^r are projected once for all blocks. ``delta``
is non-decreasing in ``i - j`` (clamp, and the log buckets are monotone), so a block whose smallest
and largest distance map to the same row shares that row everywhere: in a long sequence, every
block farther than ``span`` from the diagonal. Such a block gets a column ``q_i . K^r[row]`` plus a
row ``k_j . Q^r[row]`` (no index, no gather); the other blocks score only the rows between their
extreme deltas, ``rows(min) .. rows(max)``.
"""
from __future__ import annotations

from typing import Any, Iterable, NamedTuple

import torch
from torch import Tensor, nn

from posemb._validation import check_bool, check_heads, check_table_rows, check_width, resolve_head_dim
from posemb.functional.buckets import deberta_log_bucket
from posemb.functional.relative import (consecutive_offset, gather_relative, gather_relative_rows, query_minus_key,
                                       shared_row_pieces, toeplitz_scores)
from posemb.registry import register
from posemb.schemes.base import FarTerms, PositionalScheme

POSITION_TERMS = ("c2p", "p2c")
# Without autograd, blocks are cut into runs of keys of about this many keys (or the block's query
# count) where the rows of P change (``relative_logits``).
_PIECE_KEYS = 64
#: blocks with consecutive positions near the diagonal read c2p and p2c through strided views
#: (``DeBERTaRelative._toeplitz_logits``); False: the gathers everywhere (the reference)
_TOEPLITZ = True
#: ... for blocks of at least this many queries: p2c runs one product per Lq keys, which for a few queries
#: (KV-cache decoding, a short last block) costs more calls than the gathers save (measured 2.9x the
#: gathers' time at Lq = 1, Lk = 64; 7x at Lq = 2, Lk = 200 with autograd)
_TOEPLITZ_MIN_QUERIES = 16


def _parse_pos_att_type(pos_att_type: str | Iterable[str]) -> tuple[str, ...]:
    """Accept ``("c2p", "p2c")`` or HF's string form ``"p2c|c2p"``; reject p2p, repeats and empty."""
    if isinstance(pos_att_type, str):
        terms = tuple(t.strip() for t in pos_att_type.split("|") if t.strip())
    else:
        try:
            terms = tuple(pos_att_type)
        except TypeError:
            raise TypeError(f"pos_att_type must be a tuple of strings from {POSITION_TERMS} or a string "
                            f"like 'c2p|p2c', got {type(pos_att_type).__name__} ({pos_att_type!r})") from None
    if not terms:
        raise ValueError(f"pos_att_type must name at least one of {POSITION_TERMS}, got {pos_att_type!r} "
                         "(use the 'nope' scheme for attention without position)")
    for term in terms:
        if term not in POSITION_TERMS:
            raise ValueError(f"pos_att_type entries must be in {POSITION_TERMS} (p2p is dropped in DeBERTa), "
                             f"got {term!r} in {pos_att_type!r}")
    if len(set(terms)) != len(terms):
        raise ValueError(f"pos_att_type must not repeat a term, got {pos_att_type!r}")
    return terms


@register("deberta")
class DeBERTaRelative(PositionalScheme):
    """Disentangled content/position attention with relative embeddings P.

    One instance is shared by every layer (``per_layer = False``): P is shared across layers as
    in the paper. The position projections ``W_{k,r}`` (``pos_key_proj``) and ``W_{q,r}``
    (``pos_query_proj``), Linear(dim, num_heads * head_dim), live in the same instance and are
    therefore shared across layers too. DeBERTa/HF give each layer its own (``share_att_key``
    reuses that layer's key/query projections); the scheme interface gives a shared scheme no
    way to know which layer calls it, so per-layer projections are not expressible here.

    Parameters (whole model): ``2 span dim`` for P plus ``dim * num_heads * head_dim`` per
    position term (plus biases, LayerNorm when enabled). For dim 64, 4 heads, span 128, both
    terms: 16,384 + 8,192.

    Args:
        dim: model width (rows of P have this width).
        num_heads: attention heads.
        head_dim: per-head width; default ``dim // num_heads`` (then ``dim`` must divide evenly).
        max_relative_positions: k, the largest distance with its own embedding (>= 1); with
            ``position_buckets`` it is the distance where the log buckets reach the end.
        position_buckets: DeBERTa-v2 log buckets when > 0 (>= 2; v3 uses 256 with
            ``max_relative_positions=512``); 0 or -1 for plain clipping.
        pos_att_type: the position terms, a subset of ("c2p", "p2c"), or HF's "c2p|p2c" string.
        projection_bias: biases in ``W_{k,r}``, ``W_{q,r}`` (HF has them; the paper's formulas do not).
        norm_rel_embeddings: LayerNorm on P before projecting (DeBERTa-v3 ``norm_rel_ebd``).
    """

    site = "content"
    family = "relative"
    per_layer = False
    # The attention passes each block's index ranges, so that with consecutive positions (the call's
    # offset in the state) the block's distances are known without reading its positions.
    content_block_indices = True

    def __init__(self, dim: int, num_heads: int, head_dim: int | None = None, max_relative_positions: int = 128,
                 position_buckets: int = 0, pos_att_type: str | Iterable[str] = POSITION_TERMS,
                 projection_bias: bool = False, norm_rel_embeddings: bool = False) -> None:
        super().__init__()
        self.dim = check_width("dim", dim)
        self.num_heads = check_heads("num_heads", num_heads)
        self.head_dim = head_dim = resolve_head_dim(dim, num_heads, head_dim)
        # P has 2 span rows, span = max_relative_positions or position_buckets
        self.max_relative_positions = check_table_rows("max_relative_positions", max_relative_positions,
                                                       rows_per_unit=2)
        self.position_buckets = check_table_rows("position_buckets", position_buckets, minimum=-1, rows_per_unit=2)
        if position_buckets == 1:
            raise ValueError("position_buckets must be >= 2 (log buckets) or 0 / -1 (plain clipping), got 1")
        if position_buckets > 0 and max_relative_positions - 1 <= position_buckets // 2:
            # The log-bucket formula divides by log((max_position - 1) / (buckets // 2)).
            raise ValueError(f"max_relative_positions must be > position_buckets // 2 + 1 = "
                             f"{position_buckets // 2 + 1} when position_buckets={position_buckets}, "
                             f"got {max_relative_positions}")
        self.pos_att_type = _parse_pos_att_type(pos_att_type)
        check_bool("projection_bias", projection_bias)
        check_bool("norm_rel_embeddings", norm_rel_embeddings)
        self.span = position_buckets if position_buckets > 0 else max_relative_positions
        self.rel_embeddings = nn.Embedding(2 * self.span, dim)  # P
        self.rel_norm = nn.LayerNorm(dim) if norm_rel_embeddings else None
        inner = num_heads * head_dim
        self.pos_key_proj = nn.Linear(dim, inner, bias=projection_bias) if "c2p" in self.pos_att_type else None
        self.pos_query_proj = nn.Linear(dim, inner, bias=projection_bias) if "p2c" in self.pos_att_type else None
        self._far_reach: int | None = None  # far_reach(), computed once

    def logit_scale(self, head_dim: int) -> float:
        """``1 / sqrt(head_dim * (1 + #position terms))``: 1/sqrt(3d) with both c2p and p2c (§3.1)."""
        return (head_dim * (1 + len(self.pos_att_type))) ** -0.5

    def relative_index(self, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        """delta(i, j): (batch, Lq, Lk) rows of P, ``clamp(bucket(i - j) + span, 0, 2 span - 1)``."""
        return self.rows_of(query_minus_key(q_positions, k_positions))

    def rows_of(self, rel: Tensor) -> Tensor:
        """Row of P for each query-minus-key distance: ``clamp(bucket(rel) + span, 0, 2 span - 1)``
        (non-decreasing in ``rel``)."""
        if self.position_buckets > 0:
            rel = deberta_log_bucket(rel, self.position_buckets, self.max_relative_positions)
        return (rel + self.span).clamp(0, 2 * self.span - 1)

    def _projected(self, projection: nn.Linear, dtype: torch.dtype) -> Tensor:
        table = self.rel_embeddings.weight
        if self.rel_norm is not None:
            table = self.rel_norm(table)
        return projection(table).view(2 * self.span, self.num_heads, self.head_dim).transpose(0, 1).to(dtype)

    def prepare_relative(self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor) -> "_CallState":
        """Once per attention call: K^r and Q^r, (H, 2 span, d) each (None for a term not used)."""
        if q.shape[1] != self.num_heads:
            raise ValueError(f"DeBERTa was built for num_heads={self.num_heads}, got q of shape {tuple(q.shape)}")
        key_r = self._projected(self.pos_key_proj, q.dtype) if self.pos_key_proj is not None else None
        query_r = self._projected(self.pos_query_proj, k.dtype) if self.pos_query_proj is not None else None
        offset = None if q_positions is None or k_positions is None else consecutive_offset(q_positions, k_positions)
        return _CallState(key_r, query_r, offset)

    def relative_logits(self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor,
                        *, state: "_CallState | None" = None, rows: tuple[int, int] | None = None,
                        keys: tuple[int, int] | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """c2p + p2c, unscaled (``logit_scale`` scales them with q . k): (batch, heads, Lq, Lk), or,
        when every pair of the block reads one row of P, the broadcast terms (batch, heads, Lq, 1)
        and (batch, heads, 1, Lk) (a tuple, summed by the attention; one of them if one term is used).

        ``rows``, ``keys``: the block's index ranges in the attention call (given by the attention, see
        ``content_block_indices``); with the call's positions consecutive they make the block Toeplitz."""
        block_offset = None
        if state is None:  # called on its own, outside the attention's blocked loop: the state's offset is the block's
            state = self.prepare_relative(q, k, q_positions, k_positions)
            block_offset = state.offset
        elif q.shape[1] != self.num_heads:
            raise ValueError(f"DeBERTa was built for num_heads={self.num_heads}, got q of shape {tuple(q.shape)}")
        elif state.offset is not None and rows is not None and keys is not None:
            block_offset = state.offset + rows[0] - keys[0]  # the call's offset, moved to this block
        # Without autograd, cut the keys where the rows change, so the p2c scores k @ Q^r^T cover only
        # the rows each piece reads (not every key against every row: 4 MiB for a 512-key tile).
        smallest = k.shape[-2] if _needs_grad(q, k, state) else max(_PIECE_KEYS, q.shape[-2])
        pieces = shared_row_pieces(q_positions, k_positions, self._row_range, smallest)
        if len(pieces) == 1:
            first, last = pieces[0][2:]
            if (_TOEPLITZ and first != last and block_offset is not None and q.shape[-2] >= _TOEPLITZ_MIN_QUERIES
                    and 4 * (q.shape[-2] + k.shape[-2] - 1) <= 5 * (last - first + 1)):
                return self._toeplitz_logits(q, k, state, block_offset)
            return self._piece_logits(q, k, q_positions, k_positions, state, first, last)
        out = q.new_empty(*q.shape[:3], k.shape[-2])  # no autograd here: pieces are written in place
        for start, stop, first, last in pieces:
            part = self._piece_logits(q, k[:, :, start:stop], q_positions, k_positions[:, start:stop], state,
                                      first, last)
            if isinstance(part, tuple):
                torch.add(*part, out=out[..., start:stop])
            else:
                out[..., start:stop] = part
        return out

    def relative_values(self, probs: Tensor, q_positions: Tensor, k_positions: Tensor, *, state: Any = None,
                        rows: tuple[int, int] | None = None, keys: tuple[int, int] | None = None) -> None:
        return None  # DeBERTa's positions only change the logits

    def _row_range(self, low: int, high: int) -> tuple[int, int]:
        """Rows of P for the distances ``low`` and ``high`` (the extremes of a block: rows are monotone)."""
        first, last = self.rows_of(torch.tensor([low, high])).tolist()
        return first, last

    def _toeplitz_logits(self, q: Tensor, k: Tensor, state: "_CallState", offset: int) -> Tensor:
        """c2p + p2c of a block whose query-minus-key distances are ``offset + i - j``: each term scored
        against one embedding per distance and placed by a strided view
        (:func:`~posemb.functional.relative.toeplitz_scores`), with no index tensor and no gather.

        c2p: query i against the rows for the distances ``offset + Lq - 1, ..., offset - Lk + 1``
        (descending), read at ``[i, Lq - 1 - i + j]``. p2c is the same view from the keys' side (key j
        against the ascending distances, i.e. its key-minus-query distances descending, read at
        ``[j, Lk - 1 - j + i]`` and transposed), one run of ``Lq`` keys at a time: a key meets only Lq
        distances, so scoring each run against just its ``2 Lq - 1`` distances (instead of every key
        against all ``Lq + Lk - 1``) is ~3x less work in a band block of 32 queries and 158 keys
        (measured: DeBERTa's study-shape training step 0.89x the gathers' time on 1 thread, 0.95x on 2).
        Used when the block's distances are at most 1.25x the rows of P it reads: the study's band blocks
        (32 queries, 158 keys: 189 distances, 159 rows) take it; a band block of 128 queries at batch 1
        (381 distances, 256 rows) would score 1.5x more for c2p than the gathers, whose index is cheap
        there (measured there: the views' training step 1.00-1.05x the gathers' at 1 x 2048)."""
        q_len, k_len = q.shape[-2], k.shape[-2]
        table_rows = self.rows_of(torch.arange(offset + q_len - 1, offset - k_len, -1, device=q.device))
        total = None
        if state.key_r is not None:
            total = toeplitz_scores(q @ state.key_r.index_select(1, table_rows).transpose(-1, -2), k_len)
        if state.query_r is not None:
            ascending = state.query_r.index_select(1, table_rows.flip(0))
            pieces = []
            for start in range(0, k_len, q_len):
                stop = min(k_len, start + q_len)
                # keys start .. stop - 1 meet the distances offset - stop + 1 .. offset + Lq - 1 - start
                table = ascending[:, k_len - stop:k_len - start + q_len - 1]
                pieces.append(toeplitz_scores(k[..., start:stop, :] @ table.transpose(-1, -2), q_len).transpose(-1, -2))
            p2c = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
            total = p2c if total is None else total + p2c
        return total

    def _piece_logits(self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor, state: "_CallState",
                      first: int, last: int) -> Tensor:
        """c2p + p2c of a block whose pairs read rows ``first .. last`` of P."""
        if first == last:  # every pair reads row `first`: broadcast terms, no index
            terms = []
            if state.key_r is not None:      # c2p: (B, H, Lq, 1)
                terms.append(q @ state.key_r[:, first, :, None])
            if state.query_r is not None:    # p2c: (B, H, 1, Lk)
                terms.append((k @ state.query_r[:, first, :, None]).transpose(-1, -2))
            return terms[0] if len(terms) == 1 else tuple(terms)
        index = self.relative_index(q_positions, k_positions) - first   # rows first .. last only
        total = None
        if state.key_r is not None:          # c2p: q_i . K^r[delta(i, j)]
            total = gather_relative(q @ state.key_r[:, first:last + 1].transpose(-1, -2), index)
        if state.query_r is not None:        # p2c: k_j . Q^r[delta(i, j)]
            p2c = gather_relative_rows(k @ state.query_r[:, first:last + 1].transpose(-1, -2), index)
            total = p2c if total is None else total.add_(p2c)
        return total

    def far_reach(self) -> int | None:
        """The smallest query-minus-key distance whose row of P is the last one, ``2 span - 1`` (rows are
        non-decreasing in the distance, so every larger distance reads it too); None when that is
        distance 0 (span 1: no near pairs)."""
        if self._far_reach is None:
            length = 2 * max(self.span, self.max_relative_positions) + 2
            while True:  # the log buckets reach the last row by max_relative_positions; doubling is a guard
                rows = self.rows_of(torch.arange(length))
                if rows[-1] == 2 * self.span - 1:
                    break
                length *= 2
            self._far_reach = int((rows < 2 * self.span - 1).sum())
        return self._far_reach or None

    def far_terms(self, q: Tensor, k: Tensor, *, state: "_CallState | None" = None) -> FarTerms:
        """The last row of K^r and Q^r: c2p ``q_i . K^r[last]`` (a column), p2c ``k_j . Q^r[last]`` (a row)."""
        if state is None:
            state = self.prepare_relative(q, k, None, None)
        last = 2 * self.span - 1
        column = q @ state.key_r[:, last, :, None] if state.key_r is not None else None
        row = (k @ state.query_r[:, last, :, None]).transpose(-1, -2) if state.query_r is not None else None
        return FarTerms(column, row, None)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, span={self.span}, "
                f"max_relative_positions={self.max_relative_positions}, position_buckets={self.position_buckets}, "
                f"pos_att_type={self.pos_att_type}")


def _needs_grad(q: Tensor, k: Tensor, state: "_CallState") -> bool:
    tensors = (q, k, state.key_r, state.query_r)
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _CallState(NamedTuple):
    """What :meth:`DeBERTaRelative.prepare_relative` hands to every block of one call."""

    key_r: Tensor | None     # K^r = P W_{k,r}, (H, 2 span, d), for c2p
    query_r: Tensor | None   # Q^r = P W_{q,r}, (H, 2 span, d), for p2c
    offset: int | None = None  # the call's consecutive_offset: query minus key position is offset + i - j
