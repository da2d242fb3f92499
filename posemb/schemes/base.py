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
         (+ optional ``prepare_relative``)
======== ============================================ =====================================

Shapes: ``x`` is (batch, seq, dim); ``q``/``k``/``v`` are (batch, heads, seq, head_dim);
positions are integer tensors (batch, seq). Scores follow ``s_ij = logit_scale * (q_i . k_j +
relative_logits_ij) + score_bias_ij``.

The content site is called per *block*. ``posemb.model.attention`` never builds the whole
(Lq, Lk) score matrix for these schemes: it calls ``relative_logits`` / ``relative_values`` on
blocks of queries and keys (the q, k, probabilities and positions of that block only), then
combines the blocks (an online softmax over key tiles without autograd, whole key rows with it).
So, for the hooks of this site:

* ``prepare_relative(q, k, q_positions, k_positions)`` runs once per attention call on the whole
  inputs; whatever it returns (e.g. projected distance tables, a positions check) is passed to both
  hooks of every block as the keyword ``state``. The default returns None, and then the hooks are
  called without ``state``, so a scheme written before this hook keeps working unchanged.
* ``relative_logits`` may return any tensor *broadcastable* to (batch, heads, Lq, Lk), e.g. a
  (batch, heads, Lq, 1) column when a whole block shares one clipped distance, or a view; or a
  tuple of such tensors, meaning their sum (the attention adds each in place, so a per-query column
  plus a per-key row never becomes a full block). :func:`sum_relative_logits` adds them up.
* ``relative_values`` must be linear in ``probs``: blocks pass un-normalised, partial rows (one
  key tile of the online softmax), and the attention sums and normalises the results itself.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from posemb.functional.relative import key_minus_query

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
    def prepare_relative(self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor) -> Any:
        """Per-call work shared by every block of one attention call (whole q, k and positions).

        The result reaches :meth:`relative_logits` and :meth:`relative_values` of each block as
        ``state=...``; None (the default) means the hooks are called without ``state``.
        """
        return None

    def relative_logits(self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor,
                        *, state: Any = None) -> Tensor | tuple[Tensor, ...] | None:
        """Extra logits, broadcastable to (batch, heads, Lq, Lk) (or a tuple of such terms, summed),
        added to ``q . k`` before ``logit_scale``. ``state`` is what :meth:`prepare_relative`
        returned for this call."""
        return None

    def relative_values(self, probs: Tensor, q_positions: Tensor, k_positions: Tensor,
                        *, state: Any = None) -> Tensor | None:
        """Extra output (batch, heads, Lq, head_dim) added to ``probs @ v`` (Shaw's a^V term); must be
        linear in ``probs`` (the attention may pass un-normalised rows of one key tile)."""
        return None

    def logit_scale(self, head_dim: int) -> float:
        """Multiplier of ``q . k`` (+ relative logits); 1/sqrt(d) unless the paper says otherwise."""
        return head_dim ** -0.5

    # ---- bookkeeping -------------------------------------------------------------------------
    def num_added_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"site={self.site}"


def sum_relative_logits(extra: Tensor | tuple[Tensor, ...] | None, q_len: int, k_len: int) -> Tensor | None:
    """What :meth:`PositionalScheme.relative_logits` returned, as one (batch, heads, Lq, Lk) tensor."""
    if extra is None:
        return None
    terms = extra if isinstance(extra, (tuple, list)) else (extra,)
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total.expand(*total.shape[:-2], q_len, k_len)


# ``j - i`` (key position minus query position), shape (batch, Lq, Lk); one definition, in the math layer.
relative_distance = key_minus_query
