"""Argument checks shared by every layer: each raises with the argument's name, its value and
what is allowed, so a user never meets a bare shape error from deep inside PyTorch."""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch


# Upper bounds on size arguments. They are far above any published model (the largest use about
# 128 heads, widths near 2^14-2^15, vocabularies near 2^18), so they only catch typos that would
# otherwise try to allocate far more memory than any machine has (and fail deep inside PyTorch,
# or swap the machine to a halt first).
MAX_HEADS = 1 << 12
MAX_WIDTH = 1 << 16
MAX_VOCAB = 1 << 24
MAX_DEPTH = 1 << 12
#: rows of a position or distance table (learned N_max, Shaw's 2k + 1, DeBERTa's 2 span, T5 buckets)
MAX_TABLE_ROWS = 1 << 22


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None,
              why: str | None = None) -> int:
    """``value`` as an int (never a bool) in ``[minimum, maximum]``; ``why`` explains the maximum."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}" + (f" ({why})" if why else ""))
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a real bool: a string such as ``"false"`` or None is truthy or falsy by
    accident, so it is refused rather than converted."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")
    return value


def check_heads(name: str, value: Any) -> int:
    """A head count in ``[1, MAX_HEADS]``."""
    return check_int(name, value, minimum=1, maximum=MAX_HEADS,
                     why="a sanity bound on head counts: larger is a typo that would exhaust memory")


def check_width(name: str, value: Any, *, minimum: int = 1) -> int:
    """A model or head width in ``[minimum, MAX_WIDTH]``."""
    return check_int(name, value, minimum=minimum, maximum=MAX_WIDTH,
                     why="a sanity bound on widths: larger is a typo that would exhaust memory")


def check_table_rows(name: str, value: Any, *, minimum: int = 1, rows_per_unit: int = 1) -> int:
    """A size that gives ``rows_per_unit * value`` rows of a position/distance table, at most
    ``MAX_TABLE_ROWS`` rows."""
    return check_int(name, value, minimum=minimum, maximum=MAX_TABLE_ROWS // rows_per_unit,
                     why=f"the table would have more than {MAX_TABLE_ROWS} rows, a sanity bound "
                         "against typos that would exhaust memory")


def check_float(name: str, value: Any, *, minimum: float | None = None, maximum: float | None = None,
                strict_minimum: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None:
        if strict_minimum and value <= minimum:
            raise ValueError(f"{name} must be > {minimum}, got {value}")
        if not strict_minimum and value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_even(name: str, value: int) -> int:
    check_int(name, value, minimum=2)
    if value % 2:
        raise ValueError(f"{name} must be even, got {value}")
    return value


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def check_tensor(name: str, value: Any, *, ndim: int | None = None, floating: bool | None = None,
                 integer: bool | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if integer and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor (positions are exact integers), got dtype {value.dtype}")
    return value


def resolve_head_dim(dim: int, num_heads: int, head_dim: int | None) -> int:
    """``head_dim`` if given, else ``dim // num_heads`` (which must divide evenly)."""
    if head_dim is None:
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}) when head_dim is not given")
        head_dim = dim // num_heads
    return check_width("head_dim", head_dim)
