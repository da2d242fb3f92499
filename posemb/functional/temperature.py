"""Position-dependent query temperature on NoPE layers (Llama 4's ``attn_temperature_tuning``).

Llama 4 multiplies the queries of its layers without RoPE by

    tau(m) = 1 + attn_scale * log(1 + floor((m + 1) / floor_scale))

for the query at absolute position ``m`` (transformers ``models/llama4/modeling_llama4.py``,
``Llama4TextAttention.forward``: ``torch.log1p(torch.floor((positions + 1) / floor_scale)) *
attn_scale + 1``, defaults ``floor_scale = 8192``, ``attn_scale = 0.1``). The scores of that query are
then ``tau(m) q_m . k_n``: a softmax that sharpens, stepwise, as the context grows, so attention does
not flatten over long contexts. It is the stepped form of the log-length logit scaling of
Scalable-Softmax (Nakanishi 2025, arXiv 2501.19399), which the transformers code cites.

``tau`` is 1 for ``m < floor_scale - 1``; keys are untouched.
"""
from __future__ import annotations

import torch
from torch import Tensor


def query_temperature(positions: Tensor, floor_scale: float, attn_scale: float) -> Tensor:
    """``tau(m)`` (see the module docstring) for integer ``positions`` of any shape, in float64.

    float64 so that ``floor((m + 1) / floor_scale)`` is exact for every position below 2**52 (transformers
    computes it in float32, which is exact while ``m + 1 < 2**24``)."""
    steps = torch.floor((positions.to(torch.float64) + 1.0) / floor_scale)
    return torch.log1p(steps) * attn_scale + 1.0


__all__ = ["query_temperature"]
