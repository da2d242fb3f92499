"""Distance bucketing: T5's log buckets and DeBERTa-v2's log buckets."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from posemb._validation import check_int


def t5_relative_bucket(relative_position: Tensor, *, bidirectional: bool, num_buckets: int = 32,
                       max_distance: int = 128) -> Tensor:
    """T5's bucket of ``relative_position = key - query`` (Raffel et al. 2020; HF ``_relative_position_bucket``).

    Bidirectional: half the buckets per direction, keys after the query offset by ``num_buckets/2``.
    Causal: only ``n = max(query - key, 0)`` counts (future keys share bucket 0). Within a side,
    distances below ``max_exact = buckets/2`` get one bucket each; larger ones are spaced
    logarithmically up to ``max_distance``, beyond which they share the last bucket.
    """
    check_int("num_buckets", num_buckets, minimum=2)
    check_int("max_distance", max_distance, minimum=1)
    relative_position = relative_position.long()
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        if num_buckets < 4:
            raise ValueError(f"num_buckets must be >= 4 for bidirectional buckets, got {num_buckets}")
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        n = relative_position.abs()
    else:
        n = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    if max_exact < 1:
        return buckets
    if max_distance <= max_exact:
        return buckets + n.clamp(max=num_buckets - 1)
    # float32 on purpose: the bucket boundaries must match T5 and HF exactly, which compute in float32.
    ratio = torch.log(n.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (ratio * (num_buckets - max_exact)).to(torch.long)
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(n < max_exact, n, large)


def deberta_log_bucket(relative_position: Tensor, bucket_size: int, max_position: int) -> Tensor:
    """DeBERTa-v2's signed log bucket of a relative position (HF ``make_log_bucket_position``).

    ``|rel| <= bucket_size/2`` keeps its value; beyond, ``sign * (ceil(log(|rel|/mid) /
    log((max_position-1)/mid) * (mid-1)) + mid)`` with ``mid = bucket_size // 2``.
    """
    check_int("bucket_size", bucket_size, minimum=2)
    check_int("max_position", max_position, minimum=2)
    rel = relative_position.long()
    sign = torch.sign(rel)
    mid = bucket_size // 2
    abs_pos = torch.where((rel < mid) & (rel > -mid), torch.full_like(rel, mid - 1), rel.abs())
    # float32 on purpose, as in DeBERTa-v2 and HF: a ceil() boundary must land where theirs does.
    denominator = torch.log(torch.tensor((max_position - 1) / mid, dtype=torch.float32))
    log_pos = torch.ceil(torch.log(abs_pos.float() / mid) / denominator * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, rel, (log_pos * sign).long())
