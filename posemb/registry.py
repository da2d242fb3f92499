"""The scheme registry: ``available()`` lists names, ``build(name, **options)`` makes the module.

Schemes register themselves with ``@register("name")`` in their own file under
``posemb/schemes/``; that folder is scanned on first use, so adding a scheme is one new file.

``build`` checks every option against the type annotation of the scheme's constructor before the
constructor runs (:func:`check_option_types`), so each scheme, present or future, refuses
``causal="yes"`` or ``num_heads=8.0`` with a ``TypeError`` naming the option, instead of turning
a string into a truthy flag.
"""
from __future__ import annotations

import collections.abc
import importlib
import inspect
import pkgutil
import types
import typing
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
    check_option_types(name, options)
    return cls(**options)


def option_types(name: str) -> dict[str, Any]:
    """The resolved constructor annotation of each option of scheme ``name`` (unannotated ones left out)."""
    cls = scheme_class(name)
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not resolve: check nothing rather than fail to build
        return {}
    return {k: v for k, v in hints.items() if k in scheme_options(name)}


def check_option_types(name: str, options: dict[str, Any]) -> None:
    """Raise ``TypeError`` naming the first option of scheme ``name`` whose value does not match its
    annotation: ``bool`` must be a real bool; ``int`` a real int (not a bool); ``float`` an int or
    float (not a bool); ``str``, ``dict``, ``tuple``, ``list`` instances of those; ``X | None``
    also allows None; a union allows any member. Annotations outside these (``Any``, protocols,
    ...) are not checked."""
    hints = option_types(name)
    for option, value in options.items():
        if option in hints and not _matches(value, hints[option]):
            raise TypeError(f"{option} must be {_describe(hints[option])} (an option of scheme {name!r}), "
                            f"got {type(value).__name__} ({value!r})")


def _members(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _matches(value: Any, annotation: Any) -> bool:
    return any(_matches_one(value, member) for member in _members(annotation))


def _matches_one(value: Any, annotation: Any) -> bool:
    if annotation is type(None) or annotation is None:
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    origin = typing.get_origin(annotation) or annotation
    if origin in (str, dict, list, tuple, collections.abc.Mapping, collections.abc.Sequence,
                  collections.abc.Iterable):
        return isinstance(value, origin)
    return True  # not a type this check knows: the constructor checks it


def _describe(annotation: Any) -> str:
    names = []
    for member in _members(annotation):
        if member is type(None):
            names.append("None")
        else:
            origin = typing.get_origin(member) or member
            word = getattr(origin, "__name__", str(origin))
            names.append("a number" if member is float else f"{'an' if word[0] in 'aeiouAEIOU' else 'a'} {word}")
    return " or ".join(names)


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
