"""Reference helpers used only by the tests: the papers' tricks and small utilities that the library
itself does not need."""
from __future__ import annotations

import torch
from torch import Tensor


def sum_relative_logits(extra: Tensor | tuple[Tensor, ...] | None, q_len: int, k_len: int) -> Tensor | None:
    """What ``PositionalScheme.relative_logits`` returned, as one (batch, heads, Lq, Lk) tensor."""
    if extra is None:
        return None
    terms = extra if isinstance(extra, (tuple, list)) else (extra,)
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total.expand(*total.shape[:-2], q_len, k_len)


def relative_shift(scores: Tensor) -> Tensor:
    """The pad-and-reshape shift of Transformer-XL (App. B, ``_rel_shift``), equal to Music
    Transformer's "skew" (§3.4.1).

    ``scores[..., i, c]`` holds query i scored against the embedding of distance ``i' - j =
    Lk - 1 - c`` (columns ordered from the largest distance down to 0, as Transformer-XL's
    ``pos_seq = arange(klen - 1, -1, -1)``), where the Lq queries are the *last* Lq of the Lk keys.
    Returns ``out[..., i, j] = scores[..., i, j + Lq - 1 - i]``: the score for distance
    ``(i + Lk - Lq) - j``. Entries with ``j > i + Lk - Lq`` (future keys) are filler the causal mask
    must remove. Only valid for consecutive positions; the schemes use gathers and strided views
    instead, so that arbitrary position tensors work, and the tests use this as an oracle.
    """
    if scores.dim() < 2:
        raise ValueError(f"scores must have at least 2 dimensions (Lq, Lk), got shape {tuple(scores.shape)}")
    *lead, q_len, k_len = scores.shape
    if q_len > k_len:
        raise ValueError(f"scores must have Lq <= Lk (queries are the last Lq keys), got shape {tuple(scores.shape)}")
    padded = torch.cat([scores.new_zeros(*lead, q_len, 1), scores], dim=-1)  # (.., Lq, Lk + 1)
    # Read as (Lk + 1, Lq) rows, dropping the first row shifts row i left by (Lq - 1 - i).
    shifted = padded.reshape(*lead, k_len + 1, q_len)[..., 1:, :]
    return shifted.reshape(*lead, q_len, k_len)
