"""The scheme registry: ``available()`` lists names, ``build(name, **options)`` makes the module.

Schemes register themselves with ``@register("name")`` in their own file under
``posemb/schemes/``; that folder is scanned on first use, so adding a scheme is one new file.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any, Callable, TypeVar

_SCHEMES: dict[str, type] = {}
_DISCOVERED = False

T = TypeVar("T", bound=type)


def register(name: str) -> Callable[[T], T]:
    """Class decorator that adds a scheme to the registry under ``name``."""

    def decorate(cls: T) -> T:
        if name in _SCHEMES and _SCHEMES[name] is not cls:
            raise ValueError(f"scheme name {name!r} is already registered by {_SCHEMES[name].__qualname__}")
        cls.name = name
        _SCHEMES[name] = cls
        return cls

    return decorate


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    import posemb.schemes as package

    for module in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if not module.name.startswith("_") and module.name != "base":
            importlib.import_module(f"{package.__name__}.{module.name}")
    _DISCOVERED = True


def available() -> list[str]:
    """Names of every registered positional scheme, sorted."""
    _discover()
    return sorted(_SCHEMES)


def scheme_class(name: str) -> type:
    _discover()
    if not isinstance(name, str) or name not in _SCHEMES:
        raise ValueError(f"unknown scheme {name!r}; available schemes: {', '.join(sorted(_SCHEMES))}")
    return _SCHEMES[name]


def scheme_options(name: str) -> dict[str, Any]:
    """The options ``build(name, ...)`` accepts, with their defaults (``inspect.Parameter.empty`` if required)."""
    cls = scheme_class(name)
    params = inspect.signature(cls.__init__).parameters
    return {p.name: p.default for p in params.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def build(name: str, **options: Any):
    """Build the scheme ``name`` with ``options``; unknown names or options raise ``ValueError``."""
    cls = scheme_class(name)
    allowed = scheme_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for scheme {name!r}; allowed options: {sorted(allowed)}")
    missing = sorted(k for k, v in allowed.items() if v is inspect.Parameter.empty and k not in options)
    if missing:
        raise ValueError(f"scheme {name!r} needs option(s) {missing}")
    return cls(**options)


def build_for_model(name: str, *, context: dict[str, Any], options: dict[str, Any]):
    """Build a scheme inside a model: ``context`` (dim, num_heads, head_dim, causal, ...) is passed
    only where the scheme's constructor takes it, so a scheme asks for just what it needs; ``options``
    are the user's and are checked strictly."""
    allowed = scheme_options(name)
    merged = {k: v for k, v in context.items() if k in allowed}
    overlap = sorted(set(options) & set(context))
    if overlap:
        raise ValueError(f"option(s) {overlap} are set by the model; pass them to the model instead")
    merged.update(options)
    return build(name, **merged)
