"""NoPE: no positional information at all (Kazemnejad et al. 2023, arXiv 2305.19466).

A causal decoder can still recover position from the causal mask (their Theorem 1), which
makes NoPE the honest baseline of any comparison. Bidirectional NoPE is permutation-invariant.
"""
from __future__ import annotations

from posemb.registry import register
from posemb.schemes.base import PositionalScheme


@register("nope")
class NoPE(PositionalScheme):
    site = "none"
    family = "none"
