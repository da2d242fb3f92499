"""The scheme interface: the four sites where position enters attention (``docs/architecture.md``).

A scheme sets ``site`` and overrides only that site's hooks; the attention module and the model
consult ``site`` to decide which hooks to call, so a new scheme never edits them.

======== ============================================ =====================================
site     hook(s)                                      members
======== ============================================ =====================================
none     (nothing)                                    nope
input    ``embed_input(x, positions)``                sinusoidal, learned
rotation ``rotate(q, k, q_positions, k_positions)``   rope (every frequency schedule), xpos,
                                                      mrope, axial_rope, rope_mixed, mla, pope,
                                                      nope_temperature (scales queries only)
bias     ``score_bias(q_positions, k_positions)``     t5, alibi, kerple, sandwich,
                                                      dynamic_position_bias
content  ``relative_logits`` / ``relative_values``    shaw, transformer_xl, deberta, fire,
         (+ optional ``prepare_relative``)            forgetting, cope
======== ============================================ =====================================

Shapes: ``x`` is (batch, seq, dim); ``q``/``k``/``v`` are (batch, heads, seq, head_dim);
positions are integer tensors (batch, seq), or, for a scheme whose ``position_layout`` says so,
(axes, batch, seq) (M-RoPE's temporal/height/width, transformers' ``position_ids`` of Qwen2-VL) or
(batch, seq, axes) (2-D vision RoPE); 1-D positions given to such a scheme mean every coordinate
equals the 1-D one (:func:`expand_positions`), so text tokens reduce to 1-D RoPE. Scores follow ``s_ij = logit_scale * (q_i . k_j +
relative_logits_ij) + score_bias_ij``.

The content site is called per *block*. ``posemb.model.attention`` never builds the whole
(Lq, Lk) score matrix for these schemes: it calls ``relative_logits`` / ``relative_values`` on
blocks of queries and keys (the q, k, probabilities and positions of that block only), then
combines the blocks (an online softmax over key tiles without autograd, whole key rows with it).
So, for the hooks of this site:

* ``prepare_relative(q, k, q_positions, k_positions)`` runs once per attention call on the whole
  inputs; whatever it returns (e.g. projected distance tables, a positions check) is passed to both
  hooks of every block as the keyword ``state``. The default returns None, and then the hooks are
  called without ``state``, so a scheme with no per-call work need not define it.
* ``relative_logits`` may return any tensor *broadcastable* to (batch, heads, Lq, Lk), e.g. a
  (batch, heads, Lq, 1) column when a whole block shares one clipped distance, or a view; or a
  tuple of such tensors, meaning their sum (the attention adds each in place, so a per-query column
  plus a per-key row never becomes a full block).
* ``relative_values`` must be linear in ``probs``: blocks pass un-normalised, partial rows (one
  key tile of the online softmax), and the attention sums and normalises the results itself.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # (an annotation only: functional does not import the schemes)
    from posemb.functional.fire import FireParameters


SITES = ("none", "input", "rotation", "bias", "content")
FAMILIES = ("none", "absolute", "relative", "rotary")
#: how a scheme reads positions (``PositionalScheme.position_layout``): one integer per token, or
#: ``position_axes`` coordinates per token with the axes first (M-RoPE) or last (2-D RoPE)
POSITION_LAYOUTS = ("batch seq", "axes batch seq", "batch seq axes")


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
    #: the shape of the positions the hooks receive; one of :data:`POSITION_LAYOUTS`
    position_layout: ClassVar[str] = "batch seq"
    #: coordinates per token in the multi-axis layouts (3 for M-RoPE, 2 for 2-D RoPE)
    position_axes: ClassVar[int] = 1
    #: whether shifting every position by the same amount leaves the model unchanged. None: as the
    #: family says (relative, rotary and none are; absolute are not). FIRE sets False: it is
    #: relative, but normalises by the query position (``psi(max(L, i))``).
    translation_invariant: ClassVar[bool | None] = None
    #: content site only. True: a query's terms need every key it may see at once (CoPE's gate sums
    #: run from key j up to the query), so the attention calls the hooks on whole rows of keys,
    #: never on key tiles, with or without autograd.
    content_whole_rows: ClassVar[bool] = False
    #: content site only. True: the attention also passes each block's index ranges to both hooks,
    #: ``rows=(start, stop)`` (query indices, 0 .. Lq) and ``keys=(start, stop)`` (key indices,
    #: 0 .. Lk), for terms computed from per-token state rather than positions (the forgetting
    #: gate's cumulative log-gates, made once by ``prepare_relative``). Queries are the last Lq of
    #: the Lk keys: query row r is key index r + Lk - Lq, and sees keys up to it when causal.
    content_block_indices: ClassVar[bool] = False
    #: content site only. True: the scheme's logits are a per-query column plus a per-key row and it has
    #: no value term, so causal attention runs as fused SDPA with the row in an extra q/k channel
    #: (``posemb.model.key_bias_attention``); the scheme then implements :meth:`key_bias`. The other
    #: hooks stay the reference (non-causal calls and the tests use them).
    content_key_bias: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        #: CPU masters of the buffers registered with :meth:`register_constant`
        self._constants: dict[str, Tensor] = {}

    # ---- constant buffers --------------------------------------------------------------------
    def register_constant(self, name: str, value: Tensor) -> None:
        """Register ``value`` as a non-persistent buffer ``name`` that is a function of the
        constructor's arguments only (ALiBi's slopes, xPos's ``log ζ``).

        A non-persistent buffer is in no ``state_dict``, so nothing restores it after
        ``to_empty`` (meta-device initialisation leaves it uninitialised memory), and a dtype cast
        (``model.half()``) would round it. A CPU master copy is kept instead: :meth:`_apply`
        (behind ``to``, ``to_empty``, ``half``, ``cuda``) rebuilds the buffer from it on the new
        device in its own dtype, and :meth:`constant` rebuilds it where it was left on the meta
        device (``load_state_dict(..., assign=True)``). ``value`` must hold the real values, so a
        scheme built under ``torch.device("meta")`` creates it with ``device="cpu"``.
        """
        if not isinstance(value, Tensor) or value.is_meta:
            raise ValueError(f"register_constant({name!r}) needs a tensor with real values (create it with "
                             f"device='cpu'), got {'a meta tensor' if isinstance(value, Tensor) else type(value).__name__}")
        master = value.detach().to("cpu", copy=True)
        self._constants[name] = master
        # On the device a plain factory call would use now (meta inside ``with torch.device("meta")``).
        self.register_buffer(name, master.to(torch.empty(0).device), persistent=False)

    def constant(self, name: str, device: torch.device) -> Tensor:
        """The constant buffer ``name`` on ``device``, rebuilt from its master if it is elsewhere
        (on the meta device, say)."""
        buffer = getattr(self, name)
        if buffer.device == device and not buffer.is_meta:
            return buffer
        rebuilt = self._constants[name].to(_constant_device(self._constants[name], device))
        if not torch.compiler.is_compiling():
            setattr(self, name, rebuilt)
        return rebuilt

    def _apply(self, fn, recurse: bool = True):
        result = super()._apply(fn, recurse)
        for name, master in self._constants.items():
            device = getattr(self, name).device
            if device.type != "meta":
                setattr(self, name, master.to(_constant_device(master, device)))
        return result

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

    def key_bias(self, state: Any, *, reference: int, stop: int) -> Tensor:
        """``content_key_bias`` schemes: the per-key row ``b_j - b_reference`` for keys ``0 .. stop - 1``,
        (batch, heads, stop), in logit units (added after ``logit_scale``); ``state`` is
        :meth:`prepare_relative`'s, ``reference`` a key index."""
        raise NotImplementedError(f"{type(self).__name__} sets content_key_bias but has no key_bias")

    def far_reach(self) -> int | None:
        """Content site only: R >= 1 when every causal pair at least R apart (query minus key position
        ``i - j >= R``) reads the same terms, a per-query column plus a per-key row on the logits and one
        vector on the values (:meth:`far_terms`): Shaw's clipped distances, DeBERTa's clamped rows. Causal
        attention over consecutive positions then runs the far keys on fused SDPA and the scheme's hooks
        only on a band of R keys per query (``posemb.model.far_field_attention``). None (the default):
        no such reach."""
        return None

    def far_terms(self, q: Tensor, k: Tensor, *, state: Any = None) -> "FarTerms":
        """The terms every pair at least :meth:`far_reach` apart reads (see :class:`FarTerms`); ``state``
        is :meth:`prepare_relative`'s."""
        raise NotImplementedError(f"{type(self).__name__} has a far_reach but no far_terms")

    def _overrides_any(self, owner: type, names: tuple[str, ...]) -> bool:
        """Whether this object's class overrides any of ``names`` below ``owner`` (a fused path built from
        ``owner``'s formulas must then step aside, so the subclass's own hooks run)."""
        return any(getattr(type(self), name) is not getattr(owner, name) for name in names)

    def fire_parameters(self) -> "FireParameters | None":
        """Content site only: the MLP and scalars when the logits term is FIRE's ``f(psi(i - j) r_i)``
        with ``f`` a one-input ReLU MLP (:class:`posemb.functional.fire.FireParameters`); causal
        attention over consecutive positions then runs on the fused kernel with the MLP in its piecewise
        linear form (``posemb.model.fire_attention``). None (the default): not of that form."""
        return None

    def cope_parameters(self) -> tuple[Tensor, int] | None:
        """Content site only: ``(E, npos)`` when the logits term is CoPE's, ``q_i . E[p_ij]`` interpolated at
        the clipped gate sums ``p_ij`` (``posemb.schemes.cope``); causal attention then runs on the fused
        kernel with a hand-written backward (``posemb.model.cope_attention``). None (the default)."""
        return None

    def relative_key_terms(self) -> "RelativeKeyTerms | None":
        """Content site only: the terms when the logits are Transformer-XL's
        ``(q_i + u) . k_j + (q_i + v) . r_{i-j}`` (:class:`RelativeKeyTerms`); causal attention over
        consecutive positions then runs on the fused kernel with a hand-written backward
        (``posemb.model.relative_keys_attention``). None (the default): not of that form."""
        return None

    def logit_scale(self, head_dim: int) -> float:
        """Multiplier of ``q . k`` (+ relative logits); 1/sqrt(d) unless the paper says otherwise."""
        return head_dim ** -0.5

    # ---- bookkeeping -------------------------------------------------------------------------
    def num_added_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"site={self.site}"


class RelativeKeyTerms(NamedTuple):
    """Transformer-XL's logits ``(q_i + u) . k_j + (q_i + v) . r_{i-j}`` (before ``logit_scale``)."""

    embed: Any              # distances (n,) -> r, (heads, n, head_dim), differentiable
    content_bias: Tensor    # u, (heads, head_dim)
    position_bias: Tensor   # v, (heads, head_dim)


class FarTerms(NamedTuple):
    """What a content scheme adds to every causal pair at least its ``far_reach()`` apart, each None when
    absent: logits ``column_i + row_j`` (unscaled, like ``relative_logits``: ``logit_scale`` multiplies
    them with ``q . k``), and ``value`` on the values (like ``relative_values``: ``sum_j p_ij value``)."""

    column: Tensor | None   # broadcastable to (batch, heads, Lq, 1)
    row: Tensor | None      # broadcastable to (batch, heads, 1, Lk)
    value: Tensor | None    # broadcastable to (batch, heads, 1, value_dim)


def _constant_device(master: Tensor, device: torch.device) -> torch.device:
    """Where a constant lives for ``device``: MPS has no float64, so float64 constants stay on the CPU."""
    return torch.device("cpu") if device.type == "mps" and master.dtype == torch.float64 else device



# ---- positions in every layout -----------------------------------------------------------------
def position_seq_dim(layout: str) -> int:
    """The sequence dimension of positions in ``layout`` (where the KV cache concatenates them)."""
    return 2 if layout == "axes batch seq" else 1


def expand_positions(positions: Tensor, layout: str, axes: int) -> Tensor:
    """1-D positions (batch, seq) in ``layout``: every coordinate equals the 1-D position (a text
    token of M-RoPE has t = h = w, as in Qwen2-VL's ``get_rope_index``), so a multi-axis rotary
    scheme reduces to 1-D RoPE on them. A view, no copy."""
    if layout == "axes batch seq":
        return positions.unsqueeze(0).expand(axes, *positions.shape)
    if layout == "batch seq axes":
        return positions.unsqueeze(-1).expand(*positions.shape, axes)
    return positions


def check_positions(name: str, positions: Any, layout: str, axes: int, batch: int, length: int, *,
                    batch_may_be_one: bool = False) -> Tensor:
    """Check that ``positions`` are integers for ``batch`` rows (or 1 shared row, if
    ``batch_may_be_one``) of ``length`` tokens in ``layout``; return them."""
    from posemb._validation import check_tensor

    check_tensor(name, positions, ndim=2 if layout == "batch seq" else 3, integer=True)
    expected = {"batch seq": (batch, length), "axes batch seq": (axes, batch, length),
                "batch seq axes": (batch, length, axes)}[layout]
    batch_dim = 1 if layout == "axes batch seq" else 0
    shape = tuple(positions.shape)
    if any(got != want and not (batch_may_be_one and dim == batch_dim and got == 1)
           for dim, (got, want) in enumerate(zip(shape, expected))):
        raise ValueError(f"{name} must have shape ({layout.replace(' ', ', ')}) = {expected}"
                         f"{' (batch may be 1)' if batch_may_be_one else ''}, got {shape}")
    return positions


def max_positions(positions: Tensor, layout: str) -> Tensor:
    """(batch,) largest coordinate of each row (context-dependent schedules size their context by it)."""
    if layout == "axes batch seq":
        return positions.amax(dim=(0, 2))
    if layout == "batch seq axes":
        return positions.amax(dim=(1, 2))
    return positions.amax(dim=1)


def next_positions(positions: Tensor, layout: str) -> Tensor:
    """(batch,) default position of the token after ``positions``: one past the last token's largest
    coordinate (text after an image continues past the image's positions, as in Qwen2-VL)."""
    if layout == "axes batch seq":
        return positions[..., -1].amax(dim=0) + 1
    if layout == "batch seq axes":
        return positions[:, -1].amax(dim=-1) + 1
    return positions[:, -1] + 1
