"""The scheme interface: the four sites where position enters attention (``shared/DESIGN.md``).

A scheme sets ``site`` and overrides only that site's hooks; the attention module and the model
consult ``site`` to decide which hooks to call, so a new scheme never edits them.

======== ============================================ =====================================
site     hook(s)                                      members
======== ============================================ =====================================
none     (nothing)                                    nope
input    ``embed_input(x, positions)``                sinusoidal, learned
rotation ``rotate(q, k, q_positions, k_positions)``   rope (every frequency schedule), xpos
bias     ``score_bias(q_positions, k_positions)``     t5, alibi
content  ``relative_logits`` / ``relative_values``    shaw, transformer_xl, deberta
======== ============================================ =====================================

Shapes: ``x`` is (batch, seq, dim); ``q``/``k``/``v`` are (batch, heads, seq, head_dim);
positions are integer tensors (batch, seq). Scores follow ``s_ij = logit_scale * (q_i . k_j +
relative_logits_ij) + score_bias_ij``.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

SITES = ("none", "input", "rotation", "bias", "content")
FAMILIES = ("none", "absolute", "relative", "rotary")


class PositionalScheme(nn.Module):
    """Base class of every positional scheme. Override only the hooks of your ``site``."""

    name: ClassVar[str] = "?"
    #: where position enters attention; one of :data:`SITES`
    site: ClassVar[str] = "none"
    #: the seed's family, used by the study's report; one of :data:`FAMILIES`
    family: ClassVar[str] = "none"
    #: True: each layer owns an instance (its own parameters); False: one instance shared by all layers
    per_layer: ClassVar[bool] = False
    #: rotation site only. True: rotated keys are cached for decoding. False: the rotation of a key
    #: depends on the whole context (dynamic NTK, LongRoPE's switch), so the KV cache keeps keys
    #: unrotated and all keys are re-rotated consistently at each step (see ``docs/decoding.md``).
    caches_rotated_keys: bool = True

    def frequency_key(self, context_length: int) -> int:
        """Id of the position encoding in force for a context of ``context_length`` tokens. It only
        changes for schemes whose encoding depends on the context (dynamic NTK, LongRoPE): hidden
        states computed under another id are stale, and the model re-prefills its KV cache."""
        return 0

    # ---- site "input" ------------------------------------------------------------------------
    def embed_input(self, x: Tensor, positions: Tensor) -> Tensor:
        """Return ``x + p(positions)`` for absolute schemes; identity otherwise."""
        return x

    # ---- site "rotation" ---------------------------------------------------------------------
    def rotate(self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(R(q_positions) q, R(k_positions) k)``."""
        return q, k

    # ---- site "bias" -------------------------------------------------------------------------
    def score_bias(self, q_positions: Tensor, k_positions: Tensor) -> Tensor | None:
        """Additive logit bias of shape (batch or 1, heads, Lq, Lk), added after scaling."""
        return None

    # ---- site "content" ----------------------------------------------------------------------
    def relative_logits(self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor) -> Tensor | None:
        """Extra logits (batch, heads, Lq, Lk) added to ``q . k`` before ``logit_scale``."""
        return None

    def relative_values(self, probs: Tensor, q_positions: Tensor, k_positions: Tensor) -> Tensor | None:
        """Extra output (batch, heads, Lq, head_dim) added to ``probs @ v`` (Shaw's a^V term)."""
        return None

    def logit_scale(self, head_dim: int) -> float:
        """Multiplier of ``q . k`` (+ relative logits); 1/sqrt(d) unless the paper says otherwise."""
        return head_dim ** -0.5

    # ---- bookkeeping -------------------------------------------------------------------------
    def num_added_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"site={self.site}"


def relative_distance(q_positions: Tensor, k_positions: Tensor) -> Tensor:
    """``j - i`` for every (query i, key j): shape (batch, Lq, Lk), key position minus query position."""
    return k_positions[:, None, :] - q_positions[:, :, None]
