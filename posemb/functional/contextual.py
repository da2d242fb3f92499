"""Positions that come from the content: the Forgetting Transformer's cumulative forget gates
(Lin, Nikishin, He & Courville, ICLR 2025, arXiv 2503.02130) and CoPE's gate sums (Golovneva,
Wang, Weston & Sukhbaatar 2024, "Contextual Position Encoding", arXiv 2405.18719)."""
from __future__ import annotations

import torch
from torch import Tensor

from posemb._validation import check_int, check_tensor


def cumulative_log_gates(log_gates: Tensor) -> Tensor:
    """``c_t = sum_{s <= t} log f_s`` along the last axis, in float64.

    The forgetting bias is ``D_ij = c_i - c_j = sum_{t = j+1 .. i} log f_t`` (FoX, §3, eq. 6). The
    sums grow like the sequence length while the differences that matter stay small, so they are
    kept in float64: in float32, ``c_i - c_j`` at i ~ 10^4 would lose ~1e-4 of every logit.
    """
    check_tensor("log_gates", log_gates, floating=True)
    return log_gates.to(torch.float64).cumsum(dim=-1)


def cope_positions(gates: Tensor, npos: int) -> Tensor:
    """CoPE's contextual positions ``p_ij = min(sum_{t = j .. i} g_it, npos - 1)``: a reverse
    cumulative sum of each query row's gates over the keys (CoPE, §3, eq. 3; the positions of keys
    after the query must come with gates of 0). ``gates``: (..., Lq, Lk) in [0, 1]."""
    check_tensor("gates", gates, floating=True)
    check_int("npos", npos, minimum=1)
    return gates.flip(-1).cumsum(dim=-1).flip(-1).clamp(max=npos - 1)


def interpolate_position_logits(per_position: Tensor, positions: Tensor) -> Tensor:
    """``z[p] = (1 - w) z[floor p] + w z[ceil p]``, ``w = p - floor p`` (CoPE, §3, eq. 5): the
    logits ``q_i . e[p]`` at fractional positions, from the integer ones.

    ``per_position``: (..., Lq, npos) scores ``q_i . e[k]``; ``positions``: (..., Lq, Lk) in
    [0, npos - 1]. Returns (..., Lq, Lk). Gathers from the (Lq, npos) table, so no (Lq, Lk, d)
    tensor of interpolated embeddings is formed (the paper's "computed as logits" trick).
    """
    floor = positions.detach().floor()
    weight = positions - floor
    low = per_position.gather(-1, floor.long())
    high = per_position.gather(-1, floor.long().add_(1).clamp_(max=per_position.shape[-1] - 1))
    return low + weight.to(per_position.dtype) * (high - low)
