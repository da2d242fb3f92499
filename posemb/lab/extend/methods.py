"""Context-extension methods as Hugging Face ``rope_parameters`` and as per-pair stretch factors.

A method turns a model trained at length ``L`` with plain RoPE (base ``θ``, rotary width ``d``) into
one meant for ``N = s·L`` tokens. Each is written as the ``rope_parameters`` dict of transformers 5.24
(``modeling_rope_utils.py``), so the exported folder needs nothing but transformers:

=========  =====================================================================================
method     rope_parameters (``s = N / L``)
=========  =====================================================================================
none       ``default``: plain extrapolation, the trained frequencies
linear     ``linear``, ``factor = s``: position interpolation (Chen et al. 2023, arXiv 2306.15595)
ntk        ``default`` with ``rope_theta = θ·s^(d/(d-2))``: static NTK-aware base change (bloc97;
           YaRN arXiv 2309.00071, Def. 1). transformers has no static NTK type, but a changed base
           is exactly it.
dynamic    ``dynamic``, ``factor = s``, ``max_position_embeddings = L`` (transformers' M: the base
           grows only beyond it)
yarn       ``yarn``, ``factor = s``, ``original_max_position_embeddings = L`` (YaRN Def. 2-3)
llama3     ``llama3``, ``factor = s``, low/high frequency factors 1 and 4 (Llama 3.1's), orig ``L``
longrope   ``longrope`` with searched ``long_factor`` (Ding et al. 2024, arXiv 2402.13753),
           ``short_factor`` all ones (inside ``L`` the trained frequencies), ``factor = s``
=========  =====================================================================================

The stretch factor of pair ``j`` is ``inv_freq_default[j] / inv_freq_method[j]`` at the target length:
what LongRoPE searches over, and what the report plots for every method. The formulas are those of
:mod:`posemb.functional.rope_schedules` (one home).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from posemb._validation import check_choice, check_float, check_int
from posemb.functional.rope_schedules import compute_inv_freq, default_inv_freq, ntk_base

METHODS = ("none", "linear", "ntk", "dynamic", "yarn", "llama3", "longrope")
#: methods that compress positions (all but plain extrapolation), for the PI paper's comparison
INTERPOLATION_METHODS = tuple(m for m in METHODS if m != "none")
#: Llama 3.1's band edges (``rope_scaling`` of meta-llama/Llama-3.1-8B)
LLAMA3_LOW_FREQ_FACTOR = 1.0
LLAMA3_HIGH_FREQ_FACTOR = 4.0


@dataclass(frozen=True)
class RopeGeometry:
    """What the methods need to know about the trained model's RoPE."""

    base: float
    rotary_dim: int
    trained_length: int
    #: keys of the model's own rope_parameters that are not the schedule (``partial_rotary_factor``)
    carried: dict = field(default_factory=dict)

    @property
    def num_pairs(self) -> int:
        return self.rotary_dim // 2


@dataclass(frozen=True)
class MethodSetting:
    """One method at one target length: the config values to write and what they mean."""

    method: str
    target_length: int
    rope_parameters: dict
    max_position_embeddings: int
    factor: float

    def to_dict(self) -> dict:
        return {"method": self.method, "target_length": self.target_length,
                "rope_parameters": self.rope_parameters, "max_position_embeddings": self.max_position_embeddings,
                "factor": self.factor}


def check_factors(factors: Sequence[float], num_pairs: int, *, name: str = "long_factor") -> list[float]:
    """LongRoPE's constraints on per-pair stretch factors: ``num_pairs`` finite numbers, each >= 1,
    non-decreasing with the pair index (slower pairs are stretched at least as much as faster ones;
    Ding et al. 2024, §3.2). Returns them as floats."""
    if isinstance(factors, Tensor):
        factors = factors.tolist()
    if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence):
        raise TypeError(f"{name} must be a list of {num_pairs} numbers, got {type(factors).__name__}")
    if len(factors) != num_pairs:
        raise ValueError(f"{name} must have rotary_dim/2 = {num_pairs} entries, got {len(factors)}")
    out = [check_float(f"{name}[{j}]", v, minimum=1.0) for j, v in enumerate(factors)]
    for j in range(1, num_pairs):
        if out[j] < out[j - 1]:
            raise ValueError(f"{name} must be non-decreasing, got {name}[{j - 1}] = {out[j - 1]} > "
                             f"{name}[{j}] = {out[j]}")
    return out


def method_setting(method: str, geometry: RopeGeometry, target_length: int,
                   long_factor: Sequence[float] | None = None) -> MethodSetting:
    """The ``rope_parameters`` and ``max_position_embeddings`` of ``method`` at ``target_length``
    (see the module docstring). ``long_factor`` is required for ``longrope`` (the searched factors)."""
    check_choice("method", method, METHODS)
    check_int("target_length", target_length, minimum=geometry.trained_length + 1)
    trained = geometry.trained_length
    s = target_length / trained
    base = float(geometry.base)
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": base}
    max_positions = target_length
    if method == "linear":
        params.update(rope_type="linear", factor=s)
    elif method == "ntk":
        params["rope_theta"] = ntk_base(base, s, geometry.rotary_dim)
    elif method == "dynamic":
        params.update(rope_type="dynamic", factor=s)
        max_positions = trained  # transformers' dynamic NTK is relative to max_position_embeddings
    elif method == "yarn":
        params.update(rope_type="yarn", factor=s, original_max_position_embeddings=trained)
    elif method == "llama3":
        params.update(rope_type="llama3", factor=s, low_freq_factor=LLAMA3_LOW_FREQ_FACTOR,
                      high_freq_factor=LLAMA3_HIGH_FREQ_FACTOR, original_max_position_embeddings=trained)
    elif method == "longrope":
        if long_factor is None:
            raise ValueError("longrope needs its long_factor (the searched per-pair factors)")
        params.update(rope_type="longrope", factor=s, original_max_position_embeddings=trained,
                      short_factor=[1.0] * geometry.num_pairs,
                      long_factor=check_factors(long_factor, geometry.num_pairs))
    params.update(geometry.carried)
    return MethodSetting(method, target_length, params, max_positions, s)


def _schedule(setting: MethodSetting, geometry: RopeGeometry, seq_len: int) -> tuple[Tensor, float]:
    params = {k: v for k, v in setting.rope_parameters.items()
              if k not in ("rope_type", "rope_theta", *geometry.carried)}
    return compute_inv_freq(setting.rope_parameters["rope_type"], geometry.rotary_dim,
                            setting.rope_parameters["rope_theta"], params, seq_len=seq_len,
                            max_position_embeddings=setting.max_position_embeddings)


def stretch_factors(setting: MethodSetting, geometry: RopeGeometry, seq_len: int | None = None) -> Tensor:
    """Per-pair stretch ``θ^(-2j/d) / inv_freq_method[j]`` (float64, shape ``(d/2,)``) at ``seq_len``
    (default: the target length): 1 keeps a pair's trained frequency, ``s`` interpolates it fully."""
    seq_len = setting.target_length if seq_len is None else seq_len
    inv_freq, _ = _schedule(setting, geometry, seq_len)
    return default_inv_freq(geometry.rotary_dim, geometry.base) / inv_freq


def attention_scale(setting: MethodSetting, geometry: RopeGeometry, seq_len: int | None = None) -> float:
    """The factor on cos and sin (YaRN's ``0.1·ln s + 1``, LongRoPE's ``sqrt(1 + ln s / ln L)``, else 1)."""
    seq_len = setting.target_length if seq_len is None else seq_len
    return float(_schedule(setting, geometry, seq_len)[1])


def seed_factor_vectors(geometry: RopeGeometry, target_length: int) -> dict[str, list[float]]:
    """The LongRoPE search's starting points: the stretch factors of PI, NTK and YaRN at the target
    length (each non-decreasing and >= 1, so already valid ``long_factor`` lists)."""
    out = {}
    for method in ("linear", "ntk", "yarn"):
        factors = stretch_factors(method_setting(method, geometry, target_length), geometry)
        # float rounding can leave 0.9999999999 at an untouched pair: those pairs are exactly 1
        out[method] = [max(1.0, float(v)) for v in torch.cummax(factors, 0).values]
    return out


def describe(setting: MethodSetting, geometry: RopeGeometry) -> str:
    """One line for the report: what the method changes."""
    p = setting.rope_parameters
    if setting.method == "none":
        return "trained frequencies"
    if setting.method == "ntk":
        return f"base {geometry.base:g} -> {p['rope_theta']:.6g}"
    if setting.method == "longrope":
        factors = p["long_factor"]
        return f"searched factors {factors[0]:.3g}..{factors[-1]:.3g}"
    return f"{p['rope_type']} factor {setting.factor:g}"

