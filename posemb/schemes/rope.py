"""RoPE, every frequency schedule, as a rotation-site scheme (Su et al. 2021, arXiv 2104.09864).

``q_i -> R(i) q_i``, ``k_j -> R(j) k_j`` with the block rotations of :mod:`posemb.functional.rope`,
so ``q_i . k_j`` depends only on ``j - i``. The frequencies come from
:func:`posemb.functional.rope_schedules.compute_inv_freq` (default, linear, ntk, dynamic, yarn,
longrope, llama3, proportional); ``attention_scale`` (YaRN / LongRoPE) multiplies cos and sin, as in HF.

How the cos/sin are obtained:

* **Eager, static schedules** (default, linear, ntk, yarn, llama3): a float32 cos/sin table built
  from float64 angles, indexed by the integer positions. It grows on demand (to the next power of
  two above ``max(positions) + 1``); finding that maximum is one host sync per call. Requests the
  table would serve badly are computed directly instead: negative positions, and sparse ones
  (``max(positions) >= 8 * positions.numel()`` beyond the current table, e.g. one decoding step at
  position 10^6), so the table's memory stays proportional to the work asked of it.
* **Under ``torch.compile`` / export** (``torch.compiler.is_compiling()``) and for float64 inputs:
  cos/sin are computed directly from the positions in float64 (no table, no ``.item()``, no graph
  break). Same values as the table to within one float32 rounding; the elementwise float64
  ``sin``/``cos`` is fused by inductor.
* **Context-dependent schedules** (``dynamic``, ``longrope``): the frequencies depend on the
  context length ``max(k_positions) + 1`` of each batch row, so cos/sin are computed directly,
  per row. LongRoPE picks between two precomputed sets with ``torch.where`` (no host sync, works
  under ``torch.compile(fullgraph=True)``). Dynamic NTK needs the length as a Python int to build
  its base (one host sync per call; under ``torch.compile`` this is a graph break, so dynamic
  cannot be compiled with ``fullgraph=True``).
  These schemes set ``caches_rotated_keys = False``: the KV cache stores raw keys and every step
  re-rotates all keys with the current frequencies (the fix of transformers #25104; see
  ``docs/decoding.md``).

State: ``inv_freq64`` is a non-persistent float64 buffer (never in a ``state_dict``, so loading a
checkpoint cannot overwrite one schedule with another). Its source of truth is a tuple of Python
floats, so ``model.to(torch.bfloat16)``, ``.half()`` or ``.to_empty(device=...)`` after a meta-device
build restore it exactly (:meth:`RoPE._apply`); the cos/sin table is a plain attribute rebuilt lazily
on the positions' device and is never cast.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor

from posemb._validation import check_choice, check_float, check_int, check_tensor, check_width
from posemb.functional.rope import rotary_angles_cos_sin
from posemb.kernels import apply_rotary_qk, apply_rotary_qkv_
from posemb.registry import register
from posemb.schemes.base import PositionalScheme

ROPE_LAYOUTS = ("half", "interleaved")
#: schedules whose frequencies change with the context length (so rotated keys go stale)
CONTEXT_DEPENDENT_TYPES = ("dynamic", "longrope")
_MIN_TABLE_LENGTH = 256
#: the table grows to cover max(positions) only if that is < this many times the number of positions
_TABLE_DENSITY = 8
_DYNAMIC_MEMO_SIZE = 64


def _schedules():
    # Imported lazily so that this module (scanned by the registry) never fails to import.
    from posemb.functional import rope_schedules

    return rope_schedules


def _float64_device(device: torch.device) -> torch.device:
    """Where float64 arithmetic can run: MPS has no float64, so its tables are built on the CPU."""
    return torch.device("cpu") if device.type == "mps" else device


def _cos_sin_direct(positions: Tensor, inv_freq64: Tensor, scale: float | Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin from float64 angles, on a device able to do float64, returned on ``positions.device``."""
    device = positions.device
    work = _float64_device(device)
    cos, sin = rotary_angles_cos_sin(positions.to(work), inv_freq64.to(work), 1.0, dtype=torch.float64)
    if isinstance(scale, Tensor) or scale != 1.0:
        scale = scale.to(device=work, dtype=torch.float64) if isinstance(scale, Tensor) else scale
        cos, sin = cos * scale, sin * scale
    return cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)


class PositionsMemo:
    """The result of the last computation made from some positions tensors, reused while the same
    tensor objects come back unchanged: a model hands one ``positions`` object to every layer, and
    a scheme shared by the layers then builds its tables once per forward (one host sync at most)
    instead of once per layer.

    Keyed on the identity of the tensors (weak references: the memo keeps nothing alive, and a
    new tensor at a recycled address is a different key), their version counters (an in-place
    change of the positions invalidates it) and an ``extra`` key (dtype, device). Nothing is
    memoised under ``torch.compile`` tracing or for inference-mode tensors (they have no version
    counter)."""

    def __init__(self) -> None:
        self._entry: tuple | None = None

    def clear(self) -> None:
        self._entry = None

    def get(self, tensors: tuple[Tensor, ...], extra: tuple, compute):
        if torch.compiler.is_compiling() or any(t.is_inference() for t in tensors):
            return compute()
        key = (extra, tuple(t._version for t in tensors))
        entry = self._entry
        if entry is not None and entry[1] == key and all(ref() is t for ref, t in zip(entry[0], tensors)):
            return entry[2]
        value = compute()
        self._entry = (tuple(weakref.ref(t) for t in tensors), key, value)
        return value


def _shared_rows(positions: Tensor) -> Tensor:
    """``positions[:1]`` when every row is the same memory (``expand``ed, batch stride 0), else
    ``positions``: the rows are then equal without looking at a value (no host sync)."""
    if positions.dim() == 2 and positions.shape[0] > 1 and positions.stride(0) == 0:
        return positions[:1]
    return positions


def _check_rotate_inputs(scheme: "RoPE", q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor) -> None:
    for name, x in (("q", q), ("k", k)):
        check_tensor(name, x, ndim=4, floating=True)
        if x.shape[-1] != scheme.head_dim:
            raise ValueError(f"{name} must have head_dim={scheme.head_dim} as its last dimension "
                             f"(batch, heads, seq, head_dim), got shape {tuple(x.shape)}")
    for name, positions, x in (("q_positions", q_positions, q), ("k_positions", k_positions, k)):
        check_tensor(name, positions, ndim=2, integer=True)
        if positions.shape[1] != x.shape[2] or positions.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"{name} must have shape (batch={x.shape[0]} or 1, seq={x.shape[2]}), "
                             f"got {tuple(positions.shape)}")


@register("rope")
class RoPE(PositionalScheme):
    """Rotary position embedding with any frequency schedule, layout and partial rotary fraction.

    Args:
        head_dim: channels per head.
        base: RoPE's ``θ`` (10000 in the paper, 500000 for Llama 3).
        rope_type: one of ``posemb.functional.rope_schedules.ROPE_TYPES``.
        scaling: the schedule's keys as in a Hugging Face ``rope_scaling`` / ``rope_parameters``
            dict (``factor``, ``original_max_position_embeddings``, ...); None for ``default``.
        layout: ``"half"`` (GPT-NeoX / HF ``rotate_half``: pairs ``i, i + r/2``) or
            ``"interleaved"`` (GPT-J / Meta: pairs ``2i, 2i + 1``).
        partial_rotary_factor: fraction of the head that rotates; ``rotary_dim =
            int(head_dim * partial_rotary_factor)`` leading channels (must be even), the rest pass.
        max_position_embeddings: the trained length ``M`` (dynamic NTK's threshold; yarn/longrope's
            default factor is ``M / original_max_position_embeddings``).

    Attributes:
        rotary_dim: rotated channels per head.
        attention_scale: multiplier of cos and sin (1 except yarn/longrope).
        caches_rotated_keys: False for ``dynamic`` and ``longrope`` (see the module docstring).
    """

    site = "rotation"
    family = "rotary"
    per_layer = False

    def __init__(self, head_dim: int, base: float = 10000.0, rope_type: str = "default",
                 scaling: dict | None = None, layout: str = "half", partial_rotary_factor: float = 1.0,
                 max_position_embeddings: int = 2048) -> None:
        super().__init__()
        check_width("head_dim", head_dim, minimum=2)
        base = check_float("base", base, minimum=1.0, strict_minimum=True)
        check_choice("layout", layout, ROPE_LAYOUTS)
        partial_rotary_factor = check_float("partial_rotary_factor", partial_rotary_factor, minimum=0.0,
                                            maximum=1.0, strict_minimum=True)
        check_int("max_position_embeddings", max_position_embeddings, minimum=1)
        rotary_dim = int(head_dim * partial_rotary_factor)
        if rotary_dim < 2 or rotary_dim % 2:
            if partial_rotary_factor == 1.0:
                raise ValueError(f"head_dim must be even (RoPE rotates channel pairs), got {head_dim}")
            raise ValueError(f"partial_rotary_factor={partial_rotary_factor} with head_dim={head_dim} gives "
                             f"rotary_dim=int(head_dim*partial_rotary_factor)={rotary_dim}; it must be even and >= 2")
        if scaling is not None and not isinstance(scaling, dict):
            raise TypeError(f"scaling must be a dict of rope_scaling keys or None, got {type(scaling).__name__}")
        schedules = _schedules()
        check_choice("rope_type", rope_type, schedules.ROPE_TYPES)

        self.head_dim, self.base, self.rope_type, self.layout = head_dim, base, rope_type, layout
        self.partial_rotary_factor, self.rotary_dim = partial_rotary_factor, rotary_dim
        self.max_position_embeddings = max_position_embeddings
        self.scaling = dict(scaling or {})
        # A meta-device build (``with torch.device("meta")``) must still know the real frequencies.
        with torch.device("cpu"):
            self._params = schedules.validate_rope_params(rope_type, rotary_dim, base, self.scaling,
                                                          max_position_embeddings)
            inv_freq, scale = self._compute(None)
            if rope_type == "longrope":
                # LongRoPE switches once, when the context exceeds the pretraining length.
                self._switch_length = int(self._params["original_max_position_embeddings"])
                long_inv_freq, long_scale = self._compute(self._switch_length + 1)
        self._inv_freq_values = tuple(inv_freq.tolist())
        self._attention_scale = float(scale)
        self.register_buffer("inv_freq64", torch.tensor(self._inv_freq_values, dtype=torch.float64),
                             persistent=False)
        if rope_type == "longrope":
            self._long_inv_freq_values = tuple(long_inv_freq.tolist())
            self._long_attention_scale = float(long_scale)
            self.register_buffer("long_inv_freq64", torch.tensor(self._long_inv_freq_values, dtype=torch.float64),
                                 persistent=False)
        self._dynamic_memo: dict[int, tuple[tuple[float, ...], float]] = {}
        self._cos_table: Tensor | None = None
        self._sin_table: Tensor | None = None
        #: the last call's tables, keyed on its positions tensors (_rotation_tables)
        self._tables_memo = PositionsMemo()
        #: instance attribute (the base class has a class default): raw keys are cached when the
        #: rotation depends on the whole context.
        self.caches_rotated_keys = rope_type not in CONTEXT_DEPENDENT_TYPES

    # ---- frequencies -------------------------------------------------------------------------
    def _compute(self, seq_len: int | None) -> tuple[Tensor, float]:
        return _schedules().compute_inv_freq(self.rope_type, self.rotary_dim, self.base, self._params,
                                             seq_len=seq_len, max_position_embeddings=self.max_position_embeddings)

    @property
    def context_dependent(self) -> bool:
        """True when the frequencies depend on the context length (dynamic, longrope)."""
        return self.rope_type in CONTEXT_DEPENDENT_TYPES

    @property
    def attention_scale(self) -> float:
        """Multiplier of cos and sin within the trained length (``inv_freq``'s)."""
        return self._attention_scale

    @property
    def inv_freq(self) -> Tensor:
        """float32 ``(rotary_dim // 2,)`` frequencies within the trained length (for context-dependent
        schedules, see :meth:`inv_freq_for`). A copy; the float64 master is ``inv_freq64``."""
        return self._buffer("inv_freq64", self._inv_freq_values, self.inv_freq64.device).float()

    def inv_freq_for(self, context_length: int) -> tuple[Tensor, float]:
        """float64 ``(inv_freq, attention_scale)`` used for a context of ``context_length`` tokens."""
        check_int("context_length", context_length, minimum=1)
        values, scale = self._values_for(context_length)
        return torch.tensor(values, dtype=torch.float64, device=self.inv_freq64.device), scale

    def frequency_key(self, context_length: int) -> int:
        """An id of the frequency set used for a context of ``context_length`` tokens: 0 within the
        trained regime, otherwise a different int per set (longrope: 1 past the switch; dynamic: the
        length itself past ``max_position_embeddings``). Hidden states computed under another key are
        stale; a model that wants decoding to equal a full pass exactly at every layer re-prefills
        its KV cache when the key changes (HF Phi-3 does this once at LongRoPE's switch; see
        ``docs/decoding.md``)."""
        check_int("context_length", context_length, minimum=1)
        if self.rope_type == "longrope":
            return int(context_length > self._switch_length)
        if self.rope_type == "dynamic" and context_length > self.max_position_embeddings:
            return context_length
        return 0

    def _values_for(self, context_length: int) -> tuple[tuple[float, ...], float]:
        if self.rope_type == "longrope":
            if context_length > self._switch_length:
                return self._long_inv_freq_values, self._long_attention_scale
            return self._inv_freq_values, self._attention_scale
        if self.rope_type != "dynamic" or context_length <= self.max_position_embeddings:
            return self._inv_freq_values, self._attention_scale
        if context_length not in self._dynamic_memo:
            if len(self._dynamic_memo) >= _DYNAMIC_MEMO_SIZE:
                self._dynamic_memo.clear()
            with torch.device("cpu"):
                inv_freq, scale = self._compute(context_length)
            self._dynamic_memo[context_length] = (tuple(inv_freq.tolist()), float(scale))
        return self._dynamic_memo[context_length]

    def _buffer(self, name: str, values: tuple[float, ...], device: torch.device) -> Tensor:
        """The float64 buffer ``name`` on ``device``, rebuilt from ``values`` if it was cast, moved
        elsewhere or left on the meta device (e.g. by an FSDP buffer cast or ``load_state_dict(assign=True)``)."""
        buffer = getattr(self, name)
        if buffer.device == device and buffer.dtype == torch.float64 and not buffer.is_meta:
            return buffer
        rebuilt = torch.tensor(values, dtype=torch.float64, device=_float64_device(device))
        if not torch.compiler.is_compiling():
            setattr(self, name, rebuilt)
        return rebuilt

    def _apply(self, fn, recurse: bool = True):
        """``Module.to``/``half``/``to_empty`` pass through here: follow the device, but restore the
        exact float64 frequencies (a bf16 cast or ``to_empty`` would otherwise corrupt them) and drop
        the cos/sin table (rebuilt lazily in float32 on the new device)."""
        result = super()._apply(fn, recurse)
        device = self.inv_freq64.device
        self.inv_freq64 = torch.tensor(self._inv_freq_values, dtype=torch.float64, device=device)
        if self.rope_type == "longrope":
            self.long_inv_freq64 = torch.tensor(self._long_inv_freq_values, dtype=torch.float64, device=device)
        self._cos_table = self._sin_table = None
        self._tables_memo.clear()
        return result

    # ---- cos / sin ---------------------------------------------------------------------------
    def _table(self, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """float32 (>= length, rotary_dim/2) cos/sin tables for positions 0..length-1 on ``device``."""
        table = self._cos_table
        if table is None or table.device != device or table.shape[0] < length:
            size = max(_MIN_TABLE_LENGTH, 1 << max(0, length - 1).bit_length())
            inv_freq = self._buffer("inv_freq64", self._inv_freq_values, device)
            positions = torch.arange(size, device=_float64_device(device))
            self._cos_table, self._sin_table = (
                t.to(device) for t in rotary_angles_cos_sin(positions, inv_freq.to(positions.device),
                                                            self._attention_scale, dtype=torch.float32))
        return self._cos_table, self._sin_table

    def _context_inv_freq(self, context_length: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
        """Per-row float64 ``inv_freq`` (rows, r/2) and scale (rows,) for context lengths (rows,)."""
        if self.rope_type == "longrope":
            short = self._buffer("inv_freq64", self._inv_freq_values, device)
            long = self._buffer("long_inv_freq64", self._long_inv_freq_values, device)
            use_long = (context_length > self._switch_length).to(short.device)
            inv_freq = torch.where(use_long[:, None], long, short)
            scales = torch.tensor([self._attention_scale, self._long_attention_scale], dtype=torch.float64,
                                  device=short.device)
            scale = scales[use_long.long()]
            return inv_freq, scale
        # dynamic: the base is a nonlinear function of an integer length (one host sync)
        lengths = context_length.tolist()
        rows = [self._values_for(int(n)) for n in lengths]
        work = _float64_device(device)
        inv_freq = torch.tensor([r[0] for r in rows], dtype=torch.float64, device=work)
        scale = torch.tensor([r[1] for r in rows], dtype=torch.float64, device=work)
        return inv_freq, scale

    def cos_sin(self, positions: Tensor, context_length: Tensor | int | None = None, *,
                dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """``(cos, sin)`` of the rotation at integer ``positions`` (batch, seq), each (batch, seq,
        rotary_dim/2) in ``dtype`` (float32 or float64), already multiplied by the attention scale.

        ``context_length`` (an int or a (batch,) integer tensor) matters only for dynamic/longrope;
        it defaults to ``max(positions) + 1`` per row.
        """
        check_tensor("positions", positions, ndim=2, integer=True)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        device = positions.device
        if self.context_dependent:
            if context_length is None:
                context_length = positions.amax(dim=1) + 1
            elif isinstance(context_length, int):
                check_int("context_length", context_length, minimum=1)
                context_length = torch.full((positions.shape[0],), context_length, device=device)
            else:
                check_tensor("context_length", context_length, ndim=1, integer=True)
            inv_freq, scale = self._context_inv_freq(context_length, device)
            return _cos_sin_direct(positions, inv_freq[:, None, :], scale[:, None, None], dtype)
        if dtype == torch.float64 or torch.compiler.is_compiling() or positions.numel() == 0:
            inv_freq = self._buffer("inv_freq64", self._inv_freq_values, device)
            return _cos_sin_direct(positions, inv_freq, self._attention_scale, dtype)
        low, high = torch.stack([positions.min(), positions.max()]).tolist()  # one host sync
        table_rows = 0 if self._cos_table is None or self._cos_table.device != device else self._cos_table.shape[0]
        # Negative positions cannot index a table; a few scattered large positions (a decoding step
        # at 10^6) would need a table far larger than the request: compute those directly.
        if low < 0 or high >= max(table_rows, _MIN_TABLE_LENGTH, _TABLE_DENSITY * positions.numel()):
            inv_freq = self._buffer("inv_freq64", self._inv_freq_values, device)
            return _cos_sin_direct(positions, inv_freq, self._attention_scale, dtype)
        cos_table, sin_table = self._table(high + 1, device)
        return cos_table[positions], sin_table[positions]

    # ---- the hook ----------------------------------------------------------------------------
    def _cos_sin_pair(self, q: Tensor, q_positions: Tensor, k_positions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        # Rows expanded from one (the model's default arange) share one table row: the kernels
        # broadcast a batch-1 table, so the tables stay (1, seq, r/2) however large the batch.
        same = q_positions is k_positions
        q_positions = _shared_rows(q_positions)
        k_positions = q_positions if same else _shared_rows(k_positions)
        context = None
        if self.context_dependent:
            # Every query and key of a row shares the frequencies of the row's context length.
            context = torch.maximum(q_positions.amax(dim=1), k_positions.amax(dim=1)) + 1
        if q_positions is k_positions:
            cos, sin = self.cos_sin(q_positions, context, dtype=dtype)
            return cos, sin, cos, sin
        cos_q, sin_q = self.cos_sin(q_positions, context, dtype=dtype)
        cos_k, sin_k = self.cos_sin(k_positions, context, dtype=dtype)
        return cos_q, sin_q, cos_k, sin_k

    def _rotation_tables(self, q: Tensor, q_positions: Tensor, k_positions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(cos_q, sin_q, cos_k, sin_k)`` the kernels multiply by (subclasses that scale the
        rotation, xPos, override this and inherit both hooks), memoised per positions tensor.

        Every layer of a model receives the same ``positions`` object, and one instance of the
        scheme serves them all (``per_layer = False``), so the tables, and the host sync that
        sizes them, are made once per forward instead of once per layer. The memo is keyed on the
        identity of the positions tensors (weak references: it keeps nothing alive), their version
        counters (an in-place change of the positions invalidates it), the compute dtype and the
        device; ``_apply`` (``.to``, ``.half``) clears it."""
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return self._tables_memo.get((q_positions, k_positions), (dtype, q.device),
                                     lambda: self._compute_rotation_tables(q, q_positions, k_positions))

    def _compute_rotation_tables(self, q: Tensor, q_positions: Tensor,
                                 k_positions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self._cos_sin_pair(q, q_positions, k_positions)

    @property
    def rotates_packed(self) -> bool:
        """Whether :meth:`rotate_qkv_` is this scheme's rotation (False for subclasses that replace
        :meth:`rotate` itself, M-RoPE's sections say)."""
        return type(self).rotate is RoPE.rotate

    def rotate_qkv_(self, qkv: Tensor, positions: Tensor, *, heads: int, grad_inplace: bool = False) -> Tensor:
        """:meth:`rotate` in place on a packed projection: ``qkv`` (batch, seq, 3 * heads * head_dim),
        thirds q | k | v, queries and keys both at ``positions`` (batch, seq). Returns ``qkv``, its q and
        k thirds rotated (:func:`posemb.kernels.apply_rotary_qkv_`, differentiable; ``grad_inplace`` as
        there). Refused for a scheme whose :attr:`rotates_packed` is False."""
        if not self.rotates_packed:
            raise TypeError(f"{type(self).__name__} replaces RoPE.rotate, so it has no packed in-place rotation; "
                            "call rotate(q, k, q_positions, k_positions)")
        check_tensor("qkv", qkv, ndim=3, floating=True)
        width = 3 * heads * self.head_dim
        if qkv.shape[-1] != width:
            raise ValueError(f"qkv must be (batch, seq, 3 * heads * head_dim = {width}) for heads={heads}, "
                             f"head_dim={self.head_dim}, got {tuple(qkv.shape)}")
        check_tensor("positions", positions, ndim=2, integer=True)
        if positions.shape[1] != qkv.shape[1] or positions.shape[0] not in (1, qkv.shape[0]):
            raise ValueError(f"positions must have shape (batch={qkv.shape[0]} or 1, seq={qkv.shape[1]}), "
                             f"got {tuple(positions.shape)}")
        cos_q, sin_q, cos_k, sin_k = self._rotation_tables(qkv, positions, positions)
        return apply_rotary_qkv_(qkv, cos_q, sin_q, cos_k, sin_k, heads=heads,
                                 interleaved=self.layout == "interleaved", grad_inplace=grad_inplace)

    def rotate(self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor) -> tuple[Tensor, Tensor]:
        """``(R(q_positions) q, R(k_positions) k)`` for q, k (batch, heads, seq, head_dim); outputs in
        the inputs' dtypes, arithmetic in float32 (float64 for float64 inputs)."""
        _check_rotate_inputs(self, q, k, q_positions, k_positions)
        cos_q, sin_q, cos_k, sin_k = self._rotation_tables(q, q_positions, k_positions)
        interleaved = self.layout == "interleaved"
        # The fused kernels (posemb.kernels) rotate q and k in one call, out of place, and fall back to
        # the plain formula (posemb.functional.rope.apply_rotary, their oracle) under torch.compile.
        if cos_k is cos_q:
            return apply_rotary_qk(q, k, cos_q, sin_q, interleaved=interleaved)
        return apply_rotary_qk(q, k, cos_q, sin_q, cos_k, sin_k, interleaved=interleaved)

    def extra_repr(self) -> str:
        text = (f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, base={self.base:g}, "
                f"rope_type={self.rope_type!r}, layout={self.layout!r}")
        if self._attention_scale != 1.0:
            text += f", attention_scale={self._attention_scale:.6g}"
        return text
