"""Index arithmetic for the content-position ("site 4") schemes: Shaw, Transformer-XL, DeBERTa.

Each of these schemes attaches a vector to every *relative distance* and needs, for each (query i,
key j), a score ``q_i . e_{d(i, j)}`` (or, for Shaw's values, a sum of probabilities per distance).
The naive form builds an (Lq, Lk, head_dim) tensor of embeddings. The trick shared by all three
papers is to score the query against the *R distinct* distance embeddings once, giving an
(Lq, R) matrix, and then move each score to its (i, j) cell:

* Music Transformer's "skew" (Huang et al. 2018, arXiv 1809.04281, §3.4.1) and Transformer-XL's
  ``_rel_shift`` (Dai et al. 2019, arXiv 1901.02860, App. B) do the move with a pad-and-reshape;
  they assume consecutive positions (the test suite keeps it as an oracle).
* With explicit position tensors (KV-cache decoding, offsets, per-sequence starts) the move is a
  ``gather`` by a precomputed integer index (:func:`gather_relative`, :func:`gather_relative_rows`),
  and its transpose, a ``scatter_add`` (:func:`scatter_relative`), aggregates attention
  probabilities per distance for Shaw's value term. Both cost O(Lq * Lk) per head, like the score
  matrix itself, never O(Lq * Lk * head_dim).
* When the positions are consecutive (each row ``p0 + arange``, one query-minus-key offset for the
  whole batch) the distances of a block form a Toeplitz matrix, and :func:`toeplitz_scores` reads
  the per-distance scores as a strided view, with no index tensor and no copy.

For the attention's blocked loop (``posemb.model.attention``), :func:`distance_bounds` gives the
range of distances one block sees (so a scheme can tell that a whole block shares one clipped
distance and add a broadcast column instead of gathering), and :class:`DistanceTable` keeps the
embedded distances of one range for the next block that needs the same range.

The functions are pure (no state); positions are integer tensors (batch, L).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from posemb._validation import check_int, check_tensor


def key_minus_query(q_positions: Tensor, k_positions: Tensor) -> Tensor:
    """``j - i`` (key position minus query position), shape (batch, Lq, Lk). Shaw's convention."""
    check_tensor("q_positions", q_positions, ndim=2, integer=True)
    check_tensor("k_positions", k_positions, ndim=2, integer=True)
    return k_positions[:, None, :] - q_positions[:, :, None]


def query_minus_key(q_positions: Tensor, k_positions: Tensor) -> Tensor:
    """``i - j`` (query position minus key position), shape (batch, Lq, Lk). Transformer-XL's
    ``R_{i-j}`` and Hugging Face DeBERTa's ``relative_pos = query_pos - key_pos``."""
    check_tensor("q_positions", q_positions, ndim=2, integer=True)
    check_tensor("k_positions", k_positions, ndim=2, integer=True)
    return q_positions[:, :, None] - k_positions[:, None, :]


def distance_bounds(q_positions: Tensor, k_positions: Tensor) -> tuple[int, int]:
    """``(min, max)`` of ``i - j`` (query position minus key position) over every (batch, query, key)
    pair, without building the (batch, Lq, Lk) tensor: per sequence, ``min_i p_i - max_j p_j`` and
    ``max_i p_i - min_j p_j``. One host synchronisation."""
    check_tensor("q_positions", q_positions, ndim=2, integer=True)
    check_tensor("k_positions", k_positions, ndim=2, integer=True)
    if q_positions.numel() == 0 or k_positions.numel() == 0:
        raise ValueError(f"positions must be non-empty, got shapes {tuple(q_positions.shape)} and "
                         f"{tuple(k_positions.shape)}")
    q_low, q_high = torch.aminmax(q_positions, dim=1)
    k_low, k_high = torch.aminmax(k_positions, dim=1)
    low, high = torch.stack([(q_low - k_high).min(), (q_high - k_low).max()]).tolist()
    return low, high


def consecutive_offset(q_positions: Tensor, k_positions: Tensor) -> int | None:
    """``q_positions[b, 0] - k_positions[b, 0]`` when every row of both tensors counts up by one and
    that offset is the same for every sequence; None otherwise. A batch of 1 broadcasts.

    Then ``i - j`` (query minus key position) is ``offset + i - j`` in index terms for the whole
    batch: a Toeplitz matrix, the case :func:`toeplitz_scores` handles with a view (and, negated,
    the key-minus-query ``delta`` of ``posemb.kernels.flex``'s Toeplitz bias). Checked once per
    attention call (O(batch * L), one host synchronisation); every contiguous slice inherits it.
    """
    check_tensor("q_positions", q_positions, ndim=2, integer=True)
    check_tensor("k_positions", k_positions, ndim=2, integer=True)
    if q_positions.numel() == 0 or k_positions.numel() == 0 or (
            q_positions.shape[0] != k_positions.shape[0] and 1 not in (q_positions.shape[0], k_positions.shape[0])):
        return None
    offsets = (q_positions[:, :1] - k_positions[:, :1]).reshape(-1)
    checks = [(offsets == offsets[0]).all()]
    for positions in (q_positions, k_positions):
        if positions.shape[1] > 1:
            checks.append((positions.diff(dim=1) == 1).all())
    ok, offset = torch.stack([torch.stack(checks).all().long(), offsets[0].long()]).tolist()
    return offset if ok else None


def toeplitz_scores(per_distance: Tensor, k_len: int) -> Tensor:
    """The (..., Lq, Lk) scores of a Toeplitz block as a strided view of its per-distance scores.

    ``per_distance[..., i, m]`` is query i scored against the embedding of distance ``high - m``
    (m = 0 .. Lq + Lk - 2; distances in descending order), where the block's query-minus-key
    distances are ``offset + i - j`` and ``high = offset + Lq - 1`` (see :func:`consecutive_offset`).
    Then ``out[..., i, j] = per_distance[..., i, Lq - 1 - i + j]``: stepping one row down moves
    ``Lq + Lk - 2`` elements, one column right moves 1, so the gather of :func:`gather_relative` is
    a zero-copy ``as_strided`` view (the skew of Music Transformer, §3.4.1, without its pad and copy).
    Its backward is autograd's ``as_strided`` backward (an index_add, measured faster than a gather's).
    """
    check_tensor("per_distance", per_distance)
    check_int("k_len", k_len, minimum=1)
    if per_distance.dim() < 2:
        raise ValueError(f"per_distance must have at least 2 dimensions (Lq, Lq + Lk - 1), "
                         f"got shape {tuple(per_distance.shape)}")
    *lead, q_len, width = per_distance.shape
    if width != q_len + k_len - 1:
        raise ValueError(f"per_distance's last dimension must be Lq + Lk - 1 = {q_len + k_len - 1} "
                         f"(Lq={q_len}, k_len={k_len}), got shape {tuple(per_distance.shape)}")
    per_distance = per_distance.contiguous()
    strides = list(per_distance.stride()[:-2]) + [width - 1, 1]
    return per_distance.as_strided((*lead, q_len, k_len), strides,
                                   per_distance.storage_offset() + q_len - 1)


class DistanceTable:
    """Embedded distances for one range, built on demand and kept for the next block that asks.

    ``build(distances)`` embeds a 1-D integer tensor of distances into (..., len(distances), width).
    :meth:`rows` returns the rows for distances ``high, high - 1, ..., low`` (descending, the order
    :func:`toeplitz_scores` reads): a slice of the kept range when it covers the request, otherwise
    a fresh build of exactly the request, which is kept instead. The attention visits tiles that share
    a distance range one after another, so each range is embedded once per call, and the table never
    grows beyond the range of one tile (Transformer-XL's ``W_R R`` for all 2L - 1 distances would be
    as large as the attention's output).

    The build runs ``chunk`` distances at a time into a preallocated table, so its own temporaries
    (a float64 sinusoid, say) stay small; when the first chunk requires grad, the rest is built in one
    more call and concatenated instead (autograd keeps the pieces anyway, and cannot see writes into
    a preallocated table).
    """

    def __init__(self, build: Callable[[Tensor], Tensor], device: torch.device, chunk: int = 64) -> None:
        self._build, self._device = build, device
        self._chunk = check_int("chunk", chunk, minimum=1)
        self._low, self._high, self._table = 0, -1, None
        self.builds = 0  # how many ranges were embedded (tests and benchmarks read it)

    def rows(self, low: int, high: int) -> Tensor:
        if high < low:
            raise ValueError(f"high must be >= low, got low={low}, high={high}")
        if self._table is None or low < self._low or high > self._high:
            self._table = None  # free the old range before building the new one
            self._table, self._low, self._high = self._embed(low, high), low, high
            self.builds += 1
        first = self._high - high
        return self._table[..., first:first + high - low + 1, :]

    def keep_leaf(self, low: int, high: int) -> tuple[Tensor, Tensor]:
        """Embed distances ``high .. low`` once (under the caller's grad mode) and keep, in place of
        the result, a detached copy that requires grad: every later :meth:`rows` inside the range is
        a slice of it. A recomputing backward (``posemb.model.content_autograd``) thus collects the
        table's gradient block by block and backpropagates it through ``build`` once, instead of
        embedding (and differentiating) a range per block. Returns ``(built, leaf)``."""
        if high < low:
            raise ValueError(f"high must be >= low, got low={low}, high={high}")
        self._table = None
        built = self._embed(low, high)
        leaf = built.detach().requires_grad_(built.requires_grad)
        self._table, self._low, self._high = leaf, low, high
        self.builds += 1
        return built, leaf

    def _embed(self, low: int, high: int) -> Tensor:
        distances = torch.arange(high, low - 1, -1, device=self._device)
        head = self._build(distances[:self._chunk])
        if len(distances) <= self._chunk or (torch.is_grad_enabled() and head.requires_grad):
            return head if len(distances) <= self._chunk else torch.cat(
                [head, self._build(distances[self._chunk:])], dim=-2)
        table = head.new_empty(*head.shape[:-2], len(distances), head.shape[-1])
        table[..., :self._chunk, :] = head
        del head
        for start in range(self._chunk, len(distances), self._chunk):
            table[..., start:start + self._chunk, :] = self._build(distances[start:start + self._chunk])
        return table


def shared_row_pieces(q_positions: Tensor, k_positions: Tensor, row_range: Callable[[int, int], tuple[int, int]],
                      smallest: int) -> list[tuple[int, int, int, int]]:
    """Cut a block's keys into contiguous pieces that either all read one row of a distance table or
    are at most ``smallest`` keys wide.

    ``row_range(low, high)`` gives the table rows ``(first, last)`` of the smallest and largest
    query-minus-key distance; the scheme's row must be monotone in the distance, so ``first == last``
    means every pair of the piece reads that row (the piece needs a broadcast, not a gather), and
    otherwise the piece reads only rows ``first .. last``. A piece that is neither is halved, so a
    block costs O(log(Lk / smallest)) bound checks (one host synchronisation each) per band.
    Returns ``(start, stop, first, last)`` tuples covering ``[0, Lk)`` in order; neighbours that
    share one row are merged.
    """
    check_int("smallest", smallest, minimum=1)
    pieces: list[tuple[int, int, int, int]] = []
    pending = [(0, k_positions.shape[1])]
    while pending:
        start, stop = pending.pop()
        first, last = row_range(*distance_bounds(q_positions, k_positions[:, start:stop]))
        if first != last and stop - start > smallest:
            middle = (start + stop) // 2
            pending += [(middle, stop), (start, middle)]  # left half first (a stack)
        elif pieces and first == last and pieces[-1][2] == pieces[-1][3] == first:
            pieces[-1] = (pieces[-1][0], stop, first, last)
        else:
            pieces.append((start, stop, first, last))
    return pieces


def clip_distance(distance: Tensor, max_distance: int) -> Tensor:
    """Shaw et al. 2018 (arXiv 1803.02155, §3.2): ``clip(x, k) = max(-k, min(k, x))``."""
    check_int("max_distance", max_distance, minimum=0)
    return distance.clamp(-max_distance, max_distance)


def clipped_index(distance: Tensor, max_distance: int) -> Tensor:
    """Row of a (2k+1)-row table for each distance: ``clip(distance, k) + k`` in ``[0, 2k]``."""
    return clip_distance(distance, max_distance).add_(max_distance)  # clamp made a new tensor


def distinct_distances(distance: Tensor) -> tuple[Tensor, Tensor]:
    """The distinct values of an integer ``distance`` tensor and, for every entry, its row among them.

    Returns ``(values, index)`` with ``values[index] == distance``. For consecutive positions the
    values form one range of at most Lq + Lk - 1 integers, used directly (no sort); only if the
    positions have gaps so large that the range would exceed the number of entries does this fall
    back to ``torch.unique``. Either way the caller embeds O(Lq + Lk) distances, not Lq * Lk.
    """
    check_tensor("distance", distance, integer=True)
    if distance.numel() == 0:
        raise ValueError(f"distance must be non-empty, got shape {tuple(distance.shape)}")
    low, high = int(distance.min()), int(distance.max())  # one host sync per call
    if high - low + 1 <= distance.numel():
        values = torch.arange(low, high + 1, device=distance.device, dtype=distance.dtype)
        return values, distance - low
    values, index = torch.unique(distance, return_inverse=True)
    return values, index


def gather_relative(scores: Tensor, index: Tensor) -> Tensor:
    """Move per-distance scores to their (i, j) cells: ``out[..., i, j] = scores[..., i, index[b, i, j]]``.

    ``scores``: (batch, heads, Lq, R), the query scored against the R distance embeddings.
    ``index``: (batch, Lq, Lk) integer rows in ``[0, R)``. Returns (batch, heads, Lq, Lk).
    """
    check_tensor("scores", scores, ndim=4)
    check_tensor("index", index, ndim=3, integer=True)
    batch, heads, q_len, _ = scores.shape
    expanded = index[:, None].expand(batch, heads, q_len, index.shape[-1])  # a view: no copy per head
    return torch.gather(scores, -1, expanded)


def gather_relative_rows(scores: Tensor, index: Tensor) -> Tensor:
    """The key-side version, for DeBERTa's position-to-content term: ``out[..., i, j] =
    scores[..., j, index[b, i, j]]``.

    ``scores``: (batch, heads, Lk, R), each *key* scored against the R distance embeddings.
    ``index``: (batch, Lq, Lk). Returns (batch, heads, Lq, Lk). The gather runs along the distance
    axis of the transposed scores, so no (Lk, Lk) intermediate is built when Lq < Lk.
    """
    check_tensor("scores", scores, ndim=4)
    check_tensor("index", index, ndim=3, integer=True)
    batch, heads = scores.shape[:2]
    expanded = index[:, None].expand(batch, heads, *index.shape[1:])
    return torch.gather(scores.transpose(-1, -2), -2, expanded)


def scatter_relative(probs: Tensor, index: Tensor, num_rows: int) -> Tensor:
    """Sum attention probabilities per distance row: ``out[..., i, r] = sum_{j: index[b,i,j]=r} probs[..., i, j]``.

    The transpose of :func:`gather_relative`. With it, Shaw's value term
    ``sum_j a_ij w^V_{clip(j-i)}`` becomes ``out @ w^V``, an (Lq, 2k+1) @ (2k+1, d) product.
    ``probs``: (batch, heads, Lq, Lk); ``index``: (batch, Lq, Lk). Returns (batch, heads, Lq, num_rows).
    """
    check_tensor("probs", probs, ndim=4)
    check_tensor("index", index, ndim=3, integer=True)
    check_int("num_rows", num_rows, minimum=1)
    batch, heads, q_len, k_len = probs.shape
    expanded = index[:, None].expand(batch, heads, q_len, k_len)
    buckets = probs.new_zeros(batch, heads, q_len, num_rows)
    return buckets.scatter_add(-1, expanded, probs)
