"""Index arithmetic for the content-position ("site 4") schemes: Shaw, Transformer-XL, DeBERTa.

Each of these schemes attaches a vector to every *relative distance* and needs, for each (query i,
key j), a score ``q_i . e_{d(i, j)}`` (or, for Shaw's values, a sum of probabilities per distance).
The naive form builds an (Lq, Lk, head_dim) tensor of embeddings. The trick shared by all three
papers is to score the query against the *R distinct* distance embeddings once, giving an
(Lq, R) matrix, and then move each score to its (i, j) cell:

* Music Transformer's "skew" (Huang et al. 2018, arXiv 1809.04281, §3.4.1) and Transformer-XL's
  ``_rel_shift`` (Dai et al. 2019, arXiv 1901.02860, App. B) do the move with a pad-and-reshape;
  they assume consecutive positions. :func:`relative_shift` is that trick.
* With explicit position tensors (KV-cache decoding, offsets, per-sequence starts) the move is a
  ``gather`` by a precomputed integer index (:func:`gather_relative`, :func:`gather_relative_rows`),
  and its transpose, a ``scatter_add`` (:func:`scatter_relative`), aggregates attention
  probabilities per distance for Shaw's value term. Both cost O(Lq * Lk) per head, like the score
  matrix itself, never O(Lq * Lk * head_dim).

All functions are pure (no state); positions are integer tensors (batch, L).
"""
from __future__ import annotations

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


def clip_distance(distance: Tensor, max_distance: int) -> Tensor:
    """Shaw et al. 2018 (arXiv 1803.02155, §3.2): ``clip(x, k) = max(-k, min(k, x))``."""
    check_int("max_distance", max_distance, minimum=0)
    return distance.clamp(-max_distance, max_distance)


def clipped_index(distance: Tensor, max_distance: int) -> Tensor:
    """Row of a (2k+1)-row table for each distance: ``clip(distance, k) + k`` in ``[0, 2k]``."""
    return clip_distance(distance, max_distance) + max_distance


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


def relative_shift(scores: Tensor) -> Tensor:
    """The pad-and-reshape shift of Transformer-XL (App. B, ``_rel_shift``), equal to Music
    Transformer's "skew" (§3.4.1).

    ``scores[..., i, c]`` holds query i scored against the embedding of distance ``i' - j =
    Lk - 1 - c`` (columns ordered from the largest distance down to 0, as Transformer-XL's
    ``pos_seq = arange(klen - 1, -1, -1)``), where the Lq queries are the *last* Lq of the Lk keys.
    Returns ``out[..., i, j] = scores[..., i, j + Lq - 1 - i]``: the score for distance
    ``(i + Lk - Lq) - j``. Entries with ``j > i + Lk - Lq`` (future keys) are filler the causal mask
    must remove. Only valid for consecutive positions; the schemes use gathers instead so that
    arbitrary position tensors work, and keep this as the documented, tested trick.
    """
    check_tensor("scores", scores)
    if scores.dim() < 2:
        raise ValueError(f"scores must have at least 2 dimensions (Lq, Lk), got shape {tuple(scores.shape)}")
    *lead, q_len, k_len = scores.shape
    if q_len > k_len:
        raise ValueError(f"scores must have Lq <= Lk (queries are the last Lq keys), got shape {tuple(scores.shape)}")
    padded = torch.cat([scores.new_zeros(*lead, q_len, 1), scores], dim=-1)  # (.., Lq, Lk + 1)
    # Read as (Lk + 1, Lq) rows, dropping the first row shifts row i left by (Lq - 1 - i).
    shifted = padded.reshape(*lead, k_len + 1, q_len)[..., 1:, :]
    return shifted.reshape(*lead, q_len, k_len)
