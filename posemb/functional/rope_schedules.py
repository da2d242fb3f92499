"""RoPE frequency schedules: ``inv_freq`` and the attention (cos/sin) scale for every context-extension method.

Everything here is a pure function computed in float64 (the caller casts once, at the end), so the
schedules can be checked against closed forms and against Hugging Face transformers 5.24
(``modeling_rope_utils.py``), whose behaviour they reproduce key for key.

Notation: ``d`` is the rotary dimension (even), ``θ`` the base, ``j = 0 .. d/2-1`` the pair index,
``inv_freq[j] = θ^(-2j/d)`` and ``wavelength[j] = 2π / inv_freq[j]``.

==========  =========================================================================================
rope_type   schedule (source)
==========  =========================================================================================
default     ``θ^(-2j/d)`` (Su et al. 2021, arXiv 2104.09864, Eq. 15)
linear      ``default / factor``: position interpolation (Chen et al. 2023, arXiv 2306.15595, Eq. 4)
ntk         static NTK-aware base change ``θ' = θ·factor^(d/(d-2))`` (bloc97; YaRN, arXiv 2309.00071,
            Def. 1 and App. A.1). Not an HF type; vLLM's ``NTKScalingRotaryEmbedding`` has it.
dynamic     ``θ' = θ·(factor·L/M − (factor−1))^(d/(d−2))`` with ``L = max(seq_len, M)``,
            ``M = max_position_embeddings`` (emozilla; YaRN §3.3; HF ``_compute_dynamic_ntk_parameters``)
yarn        NTK-by-parts ramp between ``inv/factor`` and ``inv`` plus ``0.1·ln(factor)+1`` attention
            scale (YaRN Def. 2-3; HF ``_compute_yarn_parameters``, incl. DeepSeek's mscale keys)
longrope    per-pair rescale factors ``1/(ext_j·θ^(2j/d))``, long factors iff ``seq_len > orig``,
            scale ``sqrt(1 + ln(factor)/ln(orig))`` (Ding et al. 2024, arXiv 2402.13753; HF)
llama3      wavelength bands: keep short wavelengths, divide long ones by ``factor``, blend in between
            (Meta ``llama-models`` ``apply_scaling``; HF ``_compute_llama3_parameters``)
proportional  p-RoPE: ``θ^(-2j/d)/factor`` for ``j < floor(p·d/2)``, 0 beyond (unrotated pairs)
            (Barbero et al. 2025, arXiv 2410.06205; Gemma 4; HF ``_compute_proportional_rope_parameters``)
==========  =========================================================================================

The returned attention scale multiplies cos **and** sin (as in HF), so it scales ``q·k`` by its square.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from posemb._validation import check_choice, check_float, check_int

ROPE_TYPES = ("default", "linear", "ntk", "dynamic", "yarn", "longrope", "llama3", "proportional")

# Keys each type understands (besides nothing else): anything outside these is rejected, because a
# misspelled key silently falls back to a default and gives a different model.
_ALLOWED_KEYS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "ntk": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
             "mscale", "mscale_all_dim", "truncate"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings", "factor", "attention_factor"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "proportional": ("factor", "partial_rotary_factor"),
}
_REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "ntk": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("original_max_position_embeddings",),  # factor may be derived from max_position_embeddings
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "proportional": (),
}


# ---------------------------------------------------------------------------------------------
# small pure helpers
# ---------------------------------------------------------------------------------------------
def default_inv_freq(rotary_dim: int, base: float) -> Tensor:
    """``inv_freq[j] = base^(-2j/d)`` for ``j = 0 .. d/2-1``, float64 (RoPE, arXiv 2104.09864, Eq. 15)."""
    _check_rotary_dim(rotary_dim)
    base = check_float("base", base, minimum=1.0, strict_minimum=True)
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    return 1.0 / (base ** exponents)


def wavelengths(inv_freq: Tensor) -> Tensor:
    """``2π / inv_freq``: the number of positions after which pair ``j`` has turned a full circle."""
    if not isinstance(inv_freq, Tensor):
        raise TypeError(f"inv_freq must be a torch.Tensor, got {type(inv_freq).__name__}")
    return (2 * math.pi) / inv_freq.to(torch.float64)


def ntk_base(base: float, factor: float, rotary_dim: int) -> float:
    """Static NTK-aware base ``θ' = θ·s^(d/(d-2))`` (YaRN Def. 1): the lowest frequency is scaled
    exactly as position interpolation would scale it (YaRN App. A.1), the highest is untouched."""
    return base * factor ** (rotary_dim / (rotary_dim - 2))


def dynamic_ntk_base(base: float, factor: float, rotary_dim: int, seq_len: int | None,
                     max_position_embeddings: int) -> float:
    """Dynamic NTK base ``θ·(factor·L/M − (factor−1))^(d/(d−2))``, ``L = max(seq_len, M)`` (HF 5.24).

    At ``L = M`` this is ``θ`` (no change inside the trained length); it grows with ``L`` beyond.
    """
    length = max_position_embeddings if seq_len is None else max(int(seq_len), max_position_embeddings)
    ratio = factor * length / max_position_embeddings - (factor - 1)
    return base * ratio ** (rotary_dim / (rotary_dim - 2))


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's ``sqrt(1/t) = 0.1·mscale·ln(s) + 1`` for ``s > 1``, else 1 (YaRN Def. 3; DeepSeek's ``yarn_get_mscale``)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_correction_range(rotary_dim: int, base: float, original_max_position_embeddings: int,
                          beta_fast: float = 32.0, beta_slow: float = 1.0, truncate: bool = True) -> tuple[float, float]:
    """Pair indices ``(low, high)`` between which YaRN ramps from extrapolation to interpolation.

    ``r(j) = L/λ_j`` rotations fit in the original length; the dimension index where ``r = β`` is
    ``d·ln(L/(2πβ)) / (2·ln θ)`` (YaRN Def. 2, HF ``find_correction_dim``). With ``truncate`` (HF's
    default) the bounds are floored/ceiled; they are then clipped to ``[0, d-1]`` (as HF does).
    """
    def correction_dim(num_rotations: float) -> float:
        return rotary_dim * math.log(original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, rotary_dim - 1)


def yarn_ramp(low: float, high: float, num_pairs: int) -> Tensor:
    """``clamp((j - low)/(high - low), 0, 1)`` for ``j = 0 .. num_pairs-1`` in float64: 0 keeps the
    original frequency (extrapolate), 1 divides it by the factor (interpolate). ``high`` is nudged by
    0.001 when equal to ``low`` to avoid 0/0, as in HF."""
    if low == high:
        high = high + 0.001
    index = torch.arange(num_pairs, dtype=torch.float64)
    return ((index - low) / (high - low)).clamp(0.0, 1.0)


class Llama3Bands(NamedTuple):
    """Boolean masks over the ``d/2`` pairs (exactly one is True per pair)."""

    high: Tensor    #: wavelength < orig/high_freq_factor: kept
    medium: Tensor  #: in between: blended
    low: Tensor     #: wavelength > orig/low_freq_factor: divided by ``factor``


def llama3_bands(inv_freq: Tensor, *, low_freq_factor: float, high_freq_factor: float,
                 original_max_position_embeddings: int) -> Llama3Bands:
    """Which pairs of the *unscaled* ``inv_freq`` Llama 3.1 keeps, blends or divides.

    ``high`` when ``wavelength < orig/high_freq_factor``, ``low`` when ``wavelength > orig/low_freq_factor``,
    ``medium`` otherwise (HF's masks, ``_compute_llama3_parameters``). With ``low_freq_factor ==
    high_freq_factor`` (Llama 4) the medium band is empty except for a wavelength exactly at the cut.
    """
    wavelength = wavelengths(inv_freq)
    high_band = wavelength < original_max_position_embeddings / high_freq_factor
    low_band = wavelength > original_max_position_embeddings / low_freq_factor
    return Llama3Bands(high=high_band, medium=~(high_band | low_band), low=low_band)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def _check_rotary_dim(rotary_dim: int) -> int:
    check_int("rotary_dim", rotary_dim, minimum=2)
    if rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even (RoPE rotates pairs), got {rotary_dim}")
    return rotary_dim


def _positive_int(name: str, value: Any) -> int:
    """Accept an int or an integral float (JSON configs sometimes write 8192.0) and return an int."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return check_int(name, value, minimum=1)


def _factor(rope_type: str, value: Any, name: str = "factor") -> float:
    value = check_float(f"{rope_type} {name}", value)
    if value < 1.0:
        raise ValueError(f"{rope_type} {name} must be >= 1 (a context extension), got {value}")
    return value


def _factor_list(rope_type: str, name: str, value: Any, num_pairs: int) -> list[float]:
    if isinstance(value, Tensor):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{rope_type} {name} must be a list of {num_pairs} numbers, got {type(value).__name__}")
    if len(value) != num_pairs:
        raise ValueError(f"{rope_type} {name} must have length rotary_dim/2 = {num_pairs}, got {len(value)}")
    out = [check_float(f"{rope_type} {name}[{j}]", v) for j, v in enumerate(value)]
    bad = [j for j, v in enumerate(out) if v <= 0]
    if bad:
        raise ValueError(f"{rope_type} {name} entries must be > 0, got {out[bad[0]]} at index {bad[0]}")
    return out


def _validate_scale_only(rope_type: str, params: dict[str, Any], rotary_dim: int,
                         max_position_embeddings: int | None) -> dict[str, Any]:
    """linear / ntk / dynamic: one ``factor >= 1``."""
    if rope_type in ("ntk", "dynamic") and rotary_dim <= 2:
        raise ValueError(f"{rope_type} needs rotary_dim > 2 (its exponent is d/(d-2)), got {rotary_dim}")
    if rope_type == "dynamic" and max_position_embeddings is None:
        raise ValueError("dynamic needs max_position_embeddings (M in θ·(factor·L/M − (factor−1))^(d/(d−2))), got None")
    return {"factor": _factor(rope_type, params["factor"])}


def _validate_default(rope_type: str, params: dict[str, Any], rotary_dim: int,
                      max_position_embeddings: int | None) -> dict[str, Any]:
    return {}


def _validate_yarn(rope_type: str, params: dict[str, Any], rotary_dim: int,
                   max_position_embeddings: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    orig = _positive_int("yarn original_max_position_embeddings", params["original_max_position_embeddings"])
    out["original_max_position_embeddings"] = orig
    if params.get("factor") is None:
        if max_position_embeddings is None:
            raise ValueError("yarn needs 'factor' or max_position_embeddings (factor = max_position_embeddings / "
                             "original_max_position_embeddings), got neither")
        derived = max_position_embeddings / orig
        if derived < 1:
            raise ValueError(f"yarn factor derived from max_position_embeddings / original_max_position_embeddings "
                             f"= {max_position_embeddings}/{orig} = {derived} must be >= 1; set 'factor'")
        out["factor"] = derived
    else:
        out["factor"] = _factor(rope_type, params["factor"])
    beta_fast = 32.0 if params.get("beta_fast") is None else check_float("yarn beta_fast", params["beta_fast"])
    beta_slow = 1.0 if params.get("beta_slow") is None else check_float("yarn beta_slow", params["beta_slow"])
    if beta_fast <= 0 or beta_slow <= 0:
        raise ValueError(f"yarn beta_fast and beta_slow must be > 0 (rotation counts), got {beta_fast}, {beta_slow}")
    if beta_fast < beta_slow:
        raise ValueError(f"yarn beta_fast must be >= beta_slow (else the ramp runs backwards), got "
                         f"beta_fast={beta_fast}, beta_slow={beta_slow}")
    out["beta_fast"], out["beta_slow"] = beta_fast, beta_slow
    for key in ("mscale", "mscale_all_dim"):
        value = params.get(key)
        out[key] = None if value is None else check_float(f"yarn {key}", value, minimum=0.0)
    attention = params.get("attention_factor")
    out["attention_factor"] = (None if attention is None
                               else check_float("yarn attention_factor", attention, minimum=0.0, strict_minimum=True))
    truncate = params.get("truncate", True)
    if truncate is None:
        truncate = True
    if not isinstance(truncate, bool):
        raise TypeError(f"yarn truncate must be a bool, got {type(truncate).__name__} ({truncate!r})")
    out["truncate"] = truncate
    return out


def _validate_longrope(rope_type: str, params: dict[str, Any], rotary_dim: int,
                       max_position_embeddings: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    num_pairs = rotary_dim // 2
    orig = _positive_int("longrope original_max_position_embeddings", params["original_max_position_embeddings"])
    out["original_max_position_embeddings"] = orig
    out["short_factor"] = _factor_list(rope_type, "short_factor", params["short_factor"], num_pairs)
    out["long_factor"] = _factor_list(rope_type, "long_factor", params["long_factor"], num_pairs)
    attention = params.get("attention_factor")
    out["attention_factor"] = (None if attention is None
                               else check_float("longrope attention_factor", attention, minimum=0.0, strict_minimum=True))
    if params.get("factor") is not None:
        out["factor"] = _factor(rope_type, params["factor"])
    elif max_position_embeddings is not None:
        # HF: the ratio max/orig; a ratio <= 1 means "no extension" and gives attention scale 1.
        out["factor"] = max_position_embeddings / orig
    elif out["attention_factor"] is None:
        raise ValueError("longrope needs 'factor', 'attention_factor' or max_position_embeddings to set its "
                         "attention scale, got none of them")
    else:
        out["factor"] = None
    return out


def _validate_llama3(rope_type: str, params: dict[str, Any], rotary_dim: int,
                     max_position_embeddings: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {"factor": _factor(rope_type, params["factor"])}
    low = check_float("llama3 low_freq_factor", params["low_freq_factor"], minimum=0.0, strict_minimum=True)
    high = check_float("llama3 high_freq_factor", params["high_freq_factor"], minimum=0.0, strict_minimum=True)
    if low > high:
        raise ValueError(f"llama3 low_freq_factor must be <= high_freq_factor, got low_freq_factor={low}, "
                         f"high_freq_factor={high}")
    out["low_freq_factor"], out["high_freq_factor"] = low, high
    out["original_max_position_embeddings"] = _positive_int(
        "llama3 original_max_position_embeddings", params["original_max_position_embeddings"])
    return out


def _validate_proportional(rope_type: str, params: dict[str, Any], rotary_dim: int,
                           max_position_embeddings: int | None) -> dict[str, Any]:
    """p-RoPE: ``partial_rotary_factor`` p in [0, 1] is the rotated fraction (default 1), ``factor`` >= 1
    divides every frequency (default 1)."""
    proportion = params.get("partial_rotary_factor")
    proportion = 1.0 if proportion is None else check_float("proportional partial_rotary_factor", proportion,
                                                           minimum=0.0, maximum=1.0)
    factor = params.get("factor")
    return {"partial_rotary_factor": proportion,
            "factor": 1.0 if factor is None else _factor(rope_type, factor)}


#: rope_type -> validator(rope_type, params, rotary_dim, max_position_embeddings) -> normalised params.
#: One function per type, as transformers' ``ROPE_INIT_FUNCTIONS`` (``modeling_rope_utils.py``).
_VALIDATORS = {
    "default": _validate_default,
    "linear": _validate_scale_only,
    "ntk": _validate_scale_only,
    "dynamic": _validate_scale_only,
    "yarn": _validate_yarn,
    "longrope": _validate_longrope,
    "llama3": _validate_llama3,
    "proportional": _validate_proportional,
}


def validate_rope_params(rope_type: str, rotary_dim: int, base: float, params: Mapping[str, Any] | None,
                         max_position_embeddings: int | None) -> dict[str, Any]:
    """Check a schedule's parameters and return them normalised (numbers as float/int, defaults filled).

    ``params`` holds the Hugging Face keys other than ``rope_type``/``rope_theta`` (``factor``,
    ``original_max_position_embeddings``, ``low_freq_factor``, ...). A ``rope_type``/``type``/``rope_theta``
    key is tolerated only if it agrees with the arguments. Raises ``ValueError``/``TypeError`` naming the
    key for anything that would silently give a different schedule: an unknown type or key, a missing
    required key, ``factor < 1``, ``low_freq_factor > high_freq_factor`` (equal is legal: Llama 4),
    ``beta_fast < beta_slow``, factor lists of the wrong length, a non-positive base, an odd rotary dim.

    Defaults (as HF 5.24): yarn ``beta_fast=32``, ``beta_slow=1``, ``truncate=True``, ``factor =
    max_position_embeddings / original_max_position_embeddings`` when absent; longrope ``factor`` the
    same ratio when absent; proportional ``partial_rotary_factor=1``, ``factor=1``.
    ``attention_factor``/``mscale``/``mscale_all_dim`` stay ``None`` when absent. Each type's checks are
    one validator in ``_VALIDATORS``.
    """
    check_choice("rope_type", rope_type, ROPE_TYPES)
    _check_rotary_dim(rotary_dim)
    # base <= 1 would make every frequency >= 1 (and YaRN's ln(base) <= 0): never a valid RoPE
    check_float("base", base, minimum=1.0, strict_minimum=True)
    if max_position_embeddings is not None:
        max_position_embeddings = _positive_int("max_position_embeddings", max_position_embeddings)
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict of {rope_type} scaling keys or None, got {type(params).__name__}")

    params = dict(params)
    for alias in ("rope_type", "type"):
        if alias in params:
            given = params.pop(alias)
            if given != rope_type:
                raise ValueError(f"params[{alias!r}] = {given!r} conflicts with rope_type={rope_type!r}")
    if "rope_theta" in params:
        given = params.pop("rope_theta")
        if given is not None and float(given) != float(base):
            raise ValueError(f"params['rope_theta'] = {given!r} conflicts with base={base!r}")
    if "partial_rotary_factor" in params and rope_type != "proportional":
        raise ValueError("params['partial_rotary_factor'] is not a schedule key: pass the rotary dimension "
                         "(int(head_dim * partial_rotary_factor)) as rotary_dim instead")

    unknown = sorted(set(params) - set(_ALLOWED_KEYS[rope_type]))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} for rope_type={rope_type!r}; allowed keys: "
                         f"{list(_ALLOWED_KEYS[rope_type]) or 'none'}")
    missing = [key for key in _REQUIRED_KEYS[rope_type] if params.get(key) is None]
    if missing:
        raise ValueError(f"missing required key(s) {missing} for rope_type={rope_type!r}")
    return _VALIDATORS[rope_type](rope_type, params, rotary_dim, max_position_embeddings)


# ---------------------------------------------------------------------------------------------
# the schedules
# ---------------------------------------------------------------------------------------------
def _default(rotary_dim: int, base: float, p: dict[str, Any], seq_len: int | None,
             max_position_embeddings: int | None) -> tuple[Tensor, float]:
    return default_inv_freq(rotary_dim, base), 1.0


def _linear(rotary_dim: int, base: float, p: dict[str, Any], seq_len: int | None,
            max_position_embeddings: int | None) -> tuple[Tensor, float]:
    return default_inv_freq(rotary_dim, base) / p["factor"], 1.0


def _ntk(rotary_dim: int, base: float, p: dict[str, Any], seq_len: int | None,
         max_position_embeddings: int | None) -> tuple[Tensor, float]:
    return default_inv_freq(rotary_dim, ntk_base(base, p["factor"], rotary_dim)), 1.0


def _dynamic(rotary_dim: int, base: float, p: dict[str, Any], seq_len: int | None,
             max_position_embeddings: int | None) -> tuple[Tensor, float]:
    new_base = dynamic_ntk_base(base, p["factor"], rotary_dim, seq_len, max_position_embeddings)
    return default_inv_freq(rotary_dim, new_base), 1.0


def _yarn(rotary_dim: int, base: float, p: dict[str, Any], seq_len: int | None = None,
          max_position_embeddings: int | None = None) -> tuple[Tensor, float]:
    factor = p["factor"]
    if p["attention_factor"] is not None:
        attention = p["attention_factor"]
    elif p["mscale"] and p["mscale_all_dim"]:
        # DeepSeek: the ratio cancels to 1 when mscale == mscale_all_dim; their model instead multiplies
        # the softmax scale by yarn_mscale(factor, mscale_all_dim)^2. HF tests truthiness, so 0/None -> default.
        attention = yarn_mscale(factor, p["mscale"]) / yarn_mscale(factor, p["mscale_all_dim"])
    else:
        attention = yarn_mscale(factor)
    low, high = yarn_correction_range(rotary_dim, base, p["original_max_position_embeddings"],
                                      p["beta_fast"], p["beta_slow"], p["truncate"])
    extrapolated = default_inv_freq(rotary_dim, base)
    interpolated = extrapolated / factor
    ramp = yarn_ramp(low, high, rotary_dim // 2)  # 1 -> interpolate, 0 -> keep
    return interpolated * ramp + extrapolated * (1 - ramp), float(attention)


def _longrope(rotary_dim: int, base: float, p: dict[str, Any], seq_len: int | None,
              max_position_embeddings: int | None = None) -> tuple[Tensor, float]:
    orig = p["original_max_position_embeddings"]
    if p["attention_factor"] is not None:
        attention = p["attention_factor"]
    elif p["factor"] <= 1.0:
        attention = 1.0
    else:
        attention = math.sqrt(1 + math.log(p["factor"]) / math.log(orig))
    # HF: long factors only once the sequence is longer than the pretraining length.
    use_long = seq_len is not None and seq_len > orig
    ext = torch.tensor(p["long_factor"] if use_long else p["short_factor"], dtype=torch.float64)
    return default_inv_freq(rotary_dim, base) / ext, float(attention)


def _llama3(rotary_dim: int, base: float, p: dict[str, Any], seq_len: int | None = None,
            max_position_embeddings: int | None = None) -> tuple[Tensor, float]:
    inv_freq = default_inv_freq(rotary_dim, base)
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    orig = p["original_max_position_embeddings"]
    bands = llama3_bands(inv_freq, low_freq_factor=low, high_freq_factor=high,
                         original_max_position_embeddings=orig)
    if high > low:
        smooth = (orig / wavelengths(inv_freq) - low) / (high - low)
    else:
        # Llama 4 (low == high): no medium band; a wavelength exactly on the cut is divided (vLLM's guard).
        smooth = torch.zeros_like(inv_freq)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(bands.low, inv_freq / factor, inv_freq)
    return torch.where(bands.medium, blended, out), 1.0


def proportional_inv_freq(rotary_dim: int, base: float, proportion: float, factor: float = 1.0) -> Tensor:
    """p-RoPE (Barbero et al. 2025, "Round and round we go!", arXiv 2410.06205, §5; Gemma 4).

    ``inv_freq[j] = θ^(-2j/d) / factor`` for ``j < floor(p·d/2)`` and ``0`` for the remaining pairs,
    which therefore pass through unrotated (cos 1, sin 0). The exponent's denominator is the whole
    rotary width ``d`` (the head), not the rotated part: the kept pairs have exactly the frequencies of
    full RoPE. transformers 5.24: ``_compute_proportional_rope_parameters`` (``modeling_rope_utils.py``).
    """
    _check_rotary_dim(rotary_dim)
    rotated = int(proportion * rotary_dim // 2)
    inv_freq = torch.zeros(rotary_dim // 2, dtype=torch.float64)
    exponents = torch.arange(0, 2 * rotated, 2, dtype=torch.float64) / rotary_dim
    inv_freq[:rotated] = 1.0 / (float(base) ** exponents)
    return inv_freq / factor


def _proportional(rotary_dim: int, base: float, p: dict[str, Any], seq_len: int | None,
                  max_position_embeddings: int | None) -> tuple[Tensor, float]:
    return proportional_inv_freq(rotary_dim, base, p["partial_rotary_factor"], p["factor"]), 1.0


#: rope_type -> schedule(rotary_dim, base, normalised params, seq_len, max_position_embeddings)
#: -> (float64 inv_freq, attention scale); the twin of ``_VALIDATORS``.
_SCHEDULES = {
    "default": _default,
    "linear": _linear,
    "ntk": _ntk,
    "dynamic": _dynamic,
    "yarn": _yarn,
    "longrope": _longrope,
    "llama3": _llama3,
    "proportional": _proportional,
}


def compute_inv_freq(rope_type: str, rotary_dim: int, base: float, params: Mapping[str, Any] | None = None, *,
                     seq_len: int | None = None, max_position_embeddings: int | None = None) -> tuple[Tensor, float]:
    """Return ``(inv_freq, attention_scale)``: a float64 tensor of shape ``(rotary_dim // 2,)`` and a float.

    ``seq_len`` matters only for ``dynamic`` (the base grows with ``max(seq_len, M)``) and ``longrope``
    (long factors iff ``seq_len > original_max_position_embeddings``); ``None`` means "within the
    trained length". ``max_position_embeddings`` is ``M`` for ``dynamic`` and the source of the
    default ``factor`` for ``yarn``/``longrope``. See the module docstring for each formula and
    :func:`validate_rope_params` for the keys, defaults and errors.
    """
    p = validate_rope_params(rope_type, rotary_dim, base, params, max_position_embeddings)
    if max_position_embeddings is not None:
        max_position_embeddings = _positive_int("max_position_embeddings", max_position_embeddings)
    if seq_len is not None:
        if isinstance(seq_len, Tensor):
            if seq_len.numel() != 1 or seq_len.is_floating_point():
                raise ValueError(f"seq_len must be an int or a one-element integer tensor, got {seq_len!r}")
            seq_len = int(seq_len.item())
        check_int("seq_len", seq_len, minimum=0)
    return _SCHEDULES[rope_type](rotary_dim, float(base), p, seq_len, max_position_embeddings)


__all__ = ["ROPE_TYPES", "compute_inv_freq", "validate_rope_params", "default_inv_freq", "wavelengths",
           "ntk_base", "dynamic_ntk_base", "yarn_mscale", "yarn_correction_range", "yarn_ramp",
           "Llama3Bands", "llama3_bands", "proportional_inv_freq"]
