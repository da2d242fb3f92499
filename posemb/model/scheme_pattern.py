"""Per-layer positional schemes for :class:`~posemb.model.TransformerLM`.

``scheme`` is one name (every layer the same scheme) or a *pattern*: a list whose
entries are a name or a ``(name, options)`` pair, repeated over the depth. Models that mix
encodings by layer are then one argument:

* Llama 4's iRoPE (``models/llama4/modeling_llama4.py``, ``no_rope_layers``): three RoPE layers,
  then one NoPE layer, ``["rope", "rope", "rope", "nope"]``;
* Gemma 2/3 style local/global bases (``rope_local_base_freq``; the sliding window itself is not
  modelled here): ``[("rope", {"base": 1e4})] * 5 + [("rope", {"base": 1e6})]``.

Options given to the model itself (``TransformerLM(..., scheme=[...], max_position_embeddings=128)``)
go to every entry whose scheme takes them; each must be taken by at least one entry, so a typo is
still an error. An entry's own options override them. Entries with the same name and options share
one instance across layers (unless the scheme is ``per_layer``), exactly as a single scheme does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from posemb.registry import build_for_model, scheme_class, scheme_options
from posemb.schemes.base import PositionalScheme


@dataclass
class LayerSchemes:
    """What :func:`build_layer_schemes` returns."""

    #: the one input-site scheme (sinusoidal, learned), applied to the embeddings; else None
    input_scheme: PositionalScheme | None
    #: the scheme of each layer (None where the input scheme acts instead)
    layers: list[PositionalScheme | None]
    #: ``(name, options)`` of each layer, the model's options merged in
    specs: list[tuple[str, dict[str, Any]]]
    #: how every layer receives positions (the layout of the schemes that read them)
    position_layout: str
    position_axes: int


def normalize_pattern(scheme: Any, depth: int) -> list[tuple[str, dict[str, Any]]]:
    """``scheme`` (a name, or a pattern of names / ``(name, options)`` pairs) as ``depth``
    ``(name, options)`` pairs; a pattern shorter than ``depth`` is repeated and must divide it."""
    if isinstance(scheme, str):
        return [(scheme, {})] * depth
    if not isinstance(scheme, (list, tuple)) or not scheme:
        raise TypeError(f"scheme must be a scheme name or a non-empty list of names / (name, options) pairs, "
                        f"got {type(scheme).__name__} ({scheme!r})")
    entries = []
    for index, entry in enumerate(scheme):
        if isinstance(entry, str):
            name, options = entry, {}
        elif (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)
              and isinstance(entry[1], dict)):
            name, options = entry[0], dict(entry[1])
        else:
            raise TypeError(f"scheme[{index}] must be a scheme name or a (name, options dict) pair, got {entry!r}")
        scheme_class(name)  # unknown names: ValueError listing the available ones
        entries.append((name, options))
    if depth % len(entries):
        raise ValueError(f"the scheme pattern has {len(entries)} entries, which must divide depth={depth} "
                         f"(the pattern is repeated over the layers)")
    return entries * (depth // len(entries))


def build_layer_schemes(scheme: Any, depth: int, context: dict[str, Any],
                        model_options: dict[str, Any]) -> LayerSchemes:
    """Build each layer's scheme for ``scheme`` (name or pattern, see the module docstring)."""
    entries = normalize_pattern(scheme, depth)
    names = sorted({name for name, _ in entries})
    if isinstance(scheme, str):
        specs = [(scheme, dict(model_options))] * depth
    else:
        takers = {key: [n for n in names if key in scheme_options(n)] for key in model_options}
        unused = sorted(key for key, found in takers.items() if not found)
        if unused:
            raise ValueError(f"option(s) {unused} are taken by no scheme of the pattern ({', '.join(names)})")
        specs = [(name, {**{k: v for k, v in model_options.items() if k in scheme_options(name)}, **options})
                 for name, options in entries]

    classes = {name: scheme_class(name) for name in names}
    input_names = [n for n in names if classes[n].site == "input"]
    distinct = {(name, _options_key(options)) for name, options in specs}
    if input_names and len(distinct) > 1:
        raise ValueError(f"input-site scheme(s) {input_names} act once, on the embeddings, so they cannot be "
                         f"mixed with other schemes in a per-layer pattern")

    shared: dict[tuple, PositionalScheme] = {}
    layers: list[PositionalScheme | None] = []
    for name, options in specs:
        key = (name, _options_key(options))
        if classes[name].per_layer:
            layers.append(build_for_model(name, context=context, options=options))
        else:
            if key not in shared:
                shared[key] = build_for_model(name, context=context, options=options)
            layers.append(shared[key])
    input_scheme = None
    if input_names:
        input_scheme, layers = layers[0], [None] * depth

    readers = {(s.position_layout, s.position_axes): s.name for s in layers if s is not None and s.site != "none"}
    if input_scheme is not None:
        readers[(input_scheme.position_layout, input_scheme.position_axes)] = input_scheme.name
    if len(readers) > 1:
        described = ", ".join(f"{name!r} reads {axes} coordinate(s) as {layout!r}"
                              for (layout, axes), name in readers.items())
        raise ValueError(f"the layers' schemes read positions in different layouts ({described}); a model takes "
                         f"one kind of positions, so they cannot be mixed")
    layout, axes = next(iter(readers)) if readers else ("batch seq", 1)
    return LayerSchemes(input_scheme, layers, specs, layout, axes)


def describe_pattern(specs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """A readable, deterministic name of a per-layer pattern (cache signatures, reports)."""
    parts = []
    for name, options in specs:
        text = ", ".join(f"{k}={v!r}" for k, v in sorted(options.items()))
        parts.append(f"{name}({text})" if text else name)
    return "[" + ", ".join(parts) + "]"


def _options_key(options: dict[str, Any]) -> str:
    return repr(sorted(options.items()))
