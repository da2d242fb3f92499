"""Load RoPE settings from Hugging Face model configs (and write them back).

Accepts a ``transformers`` ``PretrainedConfig`` (v4 or v5) or a plain dict such as a parsed
``config.json``. The rules follow transformers 5.24 (``RotaryEmbeddingConfigMixin`` in
``modeling_rope_utils.py`` plus the per-model ``convert_rope_params_to_dict`` overrides), so a config
that transformers loads gives the same ``inv_freq`` here:

* **Where the schedule lives.** v5: ``rope_parameters`` (with ``rope_theta`` inside). v4:
  ``rope_scaling`` (``None`` for plain RoPE) plus a top-level ``rope_theta``. If both dicts are
  present they must agree. A per-layer dict (``{"full_attention": {...}, "sliding_attention": {...}}``)
  needs ``layer_type=``.
* **Type.** ``rope_type``, or the legacy ``type`` (a conflicting pair raises). Missing means
  ``"default"``. Aliases: ``"su"`` -> ``"longrope"`` (early Phi-3 configs; vLLM does the same), and for
  ``model_type == "phi3"`` also ``"yarn"`` -> ``"longrope"`` (what ``Phi3Config`` does). ``"ntk"``
  (static NTK-aware) is a posemb type that transformers does not know.
* **Base.** ``rope_theta`` in the dict, else top-level ``rope_theta``, else GPT-NeoX's
  ``rotary_emb_base``, else 10000 (HF's ``default_theta``).
* **Rotary fraction.** ``partial_rotary_factor`` in the dict or at the top level, else GPT-NeoX's
  ``rotary_pct`` (default 0.25 for ``model_type == "gpt_neox"``, as ``GPTNeoXConfig``), else GPT-J's
  absolute ``rotary_dim``, else 1. ``rotary_dim = int(head_dim * partial_rotary_factor)`` (HF's rounding).
* **Head size.** ``head_dim`` (raw ``config.json`` spelling of ChatGLM/Megatron: ``kv_channels``),
  else DeepSeek's ``qk_rope_head_dim`` (only that slice is rotated), else ``hidden_size //
  num_attention_heads`` (GPT-J's ``n_embd``/``n_head`` also work). Heterogeneous configs (Gemma 4's
  ``per_layer_config``) give each layer type its own head size.
* **Which config.** A composite (multimodal) config without rope keys of its own is read through its
  text config (``get_text_config()``, or a dict's ``text_config``), as the model's text stack does.
* **Pretraining length.** For llama3/yarn/longrope a top-level ``original_max_position_embeddings``
  (Phi-3 style) overrides the dict's; if neither exists it is ``max_position_embeddings`` (HF's
  ``standardize_rope_params``).
* **Layout.** Decided per ``model_type`` by :mod:`posemb.rotary.architectures` (each entry names the
  transformers function it mirrors: Cohere, GLM, ERNIE 4.5, Helium, GPT-J, Llama 4 and the MLA models
  pair adjacent channels although their configs are silent). For a model type the table does not
  know: ``rope_interleave`` if the config has it, else an explicit ``layout=``, else half-split with a
  warning that says so. A checkpoint whose q/k rows were permuted at conversion needs
  ``from_hf_config(config, layout="half")``.
* **Refused.** Architectures whose rotary is not a 1-D RoPE on the leading channels (M-RoPE,
  ``axial`` 2-D vision RoPE, DeepSeek-V4's trailing channels, NanoChat's -θ; ``architectures.REFUSED``)
  raise ``ValueError`` with the reason.

Anything that would load silently but compute a different model raises ``ValueError`` naming the key:
an unknown ``rope_type`` (the message lists the known ones), a missing required key, ``factor < 1``,
``low_freq_factor > high_freq_factor``, factor lists of the wrong length, a non-positive base, a
``partial_rotary_factor`` outside (0, 1], an odd rotary dimension, and (with ``strict=True``, the
default) any key the schedule does not use — transformers only warns about some of them, but keys
such as Phi-3.5-MoE's ``short_mscale`` change the model in vLLM, and Ministral 3's
``llama_4_scaling_beta`` scales its queries in transformers itself.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Mapping

from posemb._validation import check_choice, check_float, check_int
from posemb.functional.rope_schedules import ROPE_TYPES, _ALLOWED_KEYS, validate_rope_params
from posemb.functional.multi_axis_rope import check_mrope_section
from posemb.rotary import architectures

#: legacy / engine-specific names accepted for ``rope_type``
ROPE_TYPE_ALIASES = {"su": "longrope"}
_NEEDS_ORIGINAL_LENGTH = ("llama3", "yarn", "longrope")
#: keys the schedule dict may carry besides the schedule's own parameters
_META_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor")
#: M-RoPE keys; read only for the model types whose Architecture has ``mrope`` (others refuse them).
#: ``mrope_interleaved`` / ``interleaved`` (Qwen3-VL and Qwen3-Omni checkpoints carry both) are ignored:
#: the recomposition is fixed by the model's code (``Architecture.mrope``), as in transformers.
_MROPE_KEYS = ("mrope_section", "mrope_interleaved", "interleaved")
#: model types whose rotary reads an absolute ``rotary_dim`` (GPTJRotaryEmbedding, CodeGen); transformers
#: ignores the key everywhere else, so posemb does too
_ROTARY_DIM_MODEL_TYPES = ("gptj", "codegen")
#: keys that make a config a rotary config of its own (a composite config without them is read through its text config)
_ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta", "head_dim", "num_attention_heads", "n_head")
_MISSING = object()


class _Reader:
    """Reads a field from a ``PretrainedConfig`` (attributes, including ``attribute_map`` aliases) or a dict."""

    def __init__(self, config: Any, overrides: Mapping[str, Any] | None = None):
        if isinstance(config, Mapping):
            self.mapping: Mapping[str, Any] | None = config
        elif hasattr(config, "to_dict"):
            self.mapping = None
        else:
            raise TypeError(f"config must be a transformers PretrainedConfig or a dict, got {type(config).__name__}")
        self.config = config
        self.is_object = self.mapping is None
        self.overrides = dict(overrides or {})
        self.aliases = _attribute_map(self.mapping.get("model_type")) if self.mapping is not None else {}

    def get(self, *names: str, default: Any = None) -> Any:
        for name in names:
            if name in self.overrides:
                value = self.overrides[name]
            elif self.mapping is not None:
                value = self.mapping.get(name, _MISSING)
                if (value is _MISSING or value is None) and name in self.aliases:
                    value = self.mapping.get(self.aliases[name], _MISSING)
            else:
                with warnings.catch_warnings():  # v5's ``rope_scaling`` property warns on access
                    warnings.simplefilter("ignore")
                    try:
                        value = getattr(self.config, name, _MISSING)
                    except (AttributeError, KeyError):
                        value = _MISSING
            if value is not _MISSING and value is not None:
                return value
        return default


def _attribute_map(model_type: Any) -> dict[str, str]:
    """The config class's ``attribute_map`` (e.g. Zamba2 ``head_dim -> attention_head_dim``, Moonshine
    ``num_attention_heads -> decoder_num_attention_heads``), so a raw ``config.json`` dict reads the fields
    its config object would. Empty without transformers or for a model type it does not know."""
    if not isinstance(model_type, str):
        return {}
    try:
        from transformers import CONFIG_MAPPING
    except ImportError:
        return {}
    if model_type not in CONFIG_MAPPING:
        return {}
    return dict(getattr(CONFIG_MAPPING[model_type], "attribute_map", {}) or {})


def _text_config(config: Any) -> Any:
    """The config whose rotary the model's text stack builds: ``config`` itself, or its text config
    when ``config`` is a composite without rope keys of its own."""
    if isinstance(config, Mapping):
        text = config.get("text_config")
        if isinstance(text, Mapping) and not any(config.get(k) is not None for k in _ROPE_KEYS):
            return text
        return config
    if hasattr(config, "get_text_config"):
        text = config.get_text_config()
        if text is not None and text is not config and not any(
                getattr(config, k, None) is not None for k in _ROPE_KEYS if k in vars(config)):
            return text
    return config


def _layer_overrides(reader: _Reader, layer_type: str | None) -> dict[str, Any]:
    """Per-layer-type config fields of a heterogeneous config (Gemma 4: ``per_layer_config``), e.g.
    ``{"head_dim": 512}`` for its full-attention layers."""
    if layer_type is None:
        return {}
    if reader.is_object:
        if not getattr(reader.config, "is_heterogeneous", False):
            return {}
        try:
            view = reader.config.per_layer_config[layer_type]  # HF's own per-layer-type resolution
        except ValueError as error:
            raise ValueError(f"config per_layer_config: the layers of type {layer_type!r} differ across layers "
                             f"({error}); posemb builds one rotary per layer type") from error
        return {"head_dim": getattr(view, "head_dim", None)}
    per_layer = reader.get("per_layer_config")
    layer_types = reader.get("layer_types")
    if not per_layer or not layer_types:
        return {}
    found: list[dict[str, Any]] = []
    for index, kind in enumerate(layer_types):
        if kind == layer_type:
            entry = per_layer.get(str(index), per_layer.get(f"{index:02d}", per_layer.get(index, {})))
            found.append(dict(entry or {}))
    distinct = {tuple(sorted(entry.items())) for entry in found}
    if len(distinct) > 1:
        raise ValueError(f"config per_layer_config gives layers of type {layer_type!r} different overrides "
                         f"{sorted(distinct)}; posemb builds one rotary per layer type")
    return {k: v for k, v in (found[0] if found else {}).items() if k == "head_dim"}


def _schedule_dict(reader: _Reader, layer_type: str | None, arch: architectures.Architecture | None) -> dict[str, Any]:
    """The (flat) RoPE dict of the config, or {} for plain RoPE described only by top-level keys."""
    parameters = reader.get("rope_parameters")
    scaling = reader.get("rope_scaling")
    for name, value in (("rope_parameters", parameters), ("rope_scaling", scaling)):
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(f"config {name} must be a dict or None, got {type(value).__name__}")
    if parameters is not None and scaling is not None and dict(parameters) != dict(scaling):
        # v5 objects expose rope_scaling as an alias of rope_parameters, so only a real disagreement lands here
        raise ValueError(f"config has both rope_parameters={dict(parameters)!r} and rope_scaling={dict(scaling)!r} "
                         "and they differ; keep one")
    rope = dict(parameters if parameters is not None else scaling if scaling is not None else {})

    nested = bool(rope) and all(v is None or isinstance(v, Mapping) for v in rope.values())
    if nested:
        if layer_type is None:
            raise ValueError(f"config rope_parameters is per layer type {sorted(rope)}; pass layer_type= one of them "
                             "(or use posemb.rotary.layer_rotaries(config) for every layer)")
        if layer_type not in rope:
            raise ValueError(f"layer_type must be one of {sorted(rope)}, got {layer_type!r}")
        if rope[layer_type] is None:
            raise ValueError(f"rope_parameters[{layer_type!r}] is None: that layer type uses no RoPE (NoPE)")
        return dict(rope[layer_type])
    if layer_type is None:
        return rope
    layer_types = reader.get("layer_types") or ()
    if layer_type not in layer_types:
        raise ValueError(f"layer_type={layer_type!r} given but the config's layer_types are {sorted(set(layer_types))}")
    thetas = arch.layer_thetas if arch is not None else {}
    if layer_type in thetas:  # v4-style flat config of a model with per-layer-type bases (Gemma 3, ModernBERT)
        key, default, takes_scaling = thetas[layer_type]
        out = dict(rope) if takes_scaling else {}
        out["rope_theta"] = reader.get(key, default=default)
        return out
    return rope


def _rope_type(rope: dict[str, Any], model_type: str | None) -> str:
    new, legacy = rope.get("rope_type"), rope.get("type")
    if new is not None and legacy is not None and new != legacy:
        raise ValueError(f"config rope 'type'={legacy!r} conflicts with 'rope_type'={new!r}")
    rope_type = new if new is not None else legacy if legacy is not None else "default"
    if not isinstance(rope_type, str):
        raise TypeError(f"config rope_type must be a string, got {type(rope_type).__name__} ({rope_type!r})")
    rope_type = ROPE_TYPE_ALIASES.get(rope_type, rope_type)
    if model_type == "phi3" and rope_type == "yarn":
        rope_type = "longrope"  # Phi3Config's backward-compatibility rename
    if rope_type == "axial":
        raise ValueError(f"config rope_type 'axial' is refused: {architectures._AXIAL}")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"config rope_type {rope_type!r} is not supported; known rope types: {list(ROPE_TYPES)} "
                         f"(aliases: {ROPE_TYPE_ALIASES})")
    return rope_type


def _pick(name: str, in_dict: Any, top_level: Any, reader: _Reader) -> Any:
    """Dict value wins; on a plain dict config a different top-level value is an ambiguity."""
    if in_dict is not None and top_level is not None and not reader.is_object and float(in_dict) != float(top_level):
        raise ValueError(f"config {name} is {in_dict!r} inside the rope dict but {top_level!r} at the top level")
    return in_dict if in_dict is not None else top_level


def _head_dim(reader: _Reader) -> int:
    head_dim = reader.get("head_dim", "kv_channels", "qk_rope_head_dim")
    if head_dim is None:
        hidden = reader.get("hidden_size", "n_embd", "d_model")
        heads = reader.get("num_attention_heads", "n_head", "n_heads")
        if hidden is None or heads is None:
            raise ValueError("config needs head_dim, or hidden_size and num_attention_heads, to size RoPE")
        check_int("config hidden_size", hidden, minimum=1)
        check_int("config num_attention_heads", heads, minimum=1)
        head_dim = hidden // heads  # HF floors too
    return check_int("config head_dim", head_dim, minimum=1)


def _partial_rotary_factor(rope: dict[str, Any], reader: _Reader, model_type: str | None, head_dim: int) -> float:
    factor = _pick("partial_rotary_factor", rope.get("partial_rotary_factor"),
                   reader.get("partial_rotary_factor"), reader)
    if factor is None:
        factor = reader.get("rotary_pct")
    if factor is None and model_type == "gpt_neox":
        factor = 0.25  # GPTNeoXConfig's default rotary_pct
    if factor is None and model_type in _ROTARY_DIM_MODEL_TYPES and reader.get("rotary_dim") is not None:
        rotary_dim = check_int("config rotary_dim", reader.get("rotary_dim"), minimum=1)
        factor = rotary_dim / head_dim
        while int(head_dim * factor) < rotary_dim:  # keep int(head_dim * factor) == rotary_dim despite rounding
            factor = math.nextafter(factor, math.inf)
    if factor is None:
        factor = 1.0
    factor = check_float("config partial_rotary_factor", factor)
    if not 0.0 < factor <= 1.0:
        raise ValueError(f"config partial_rotary_factor must be in (0, 1], got {factor}")
    return factor


def _layout(reader: _Reader, model_type: str | None, arch: architectures.Architecture | None,
            explicit: str | None) -> str:
    if explicit is not None:
        return check_choice("layout", explicit, ("half", "interleaved"))
    interleave = reader.get("rope_interleave")
    if interleave is not None and not isinstance(interleave, bool):
        raise TypeError(f"config rope_interleave must be a bool, got {type(interleave).__name__} ({interleave!r})")
    if arch is not None:
        if arch.layout != "config":
            return arch.layout
        return "interleaved" if (arch.interleave_default if interleave is None else interleave) else "half"
    if interleave is not None:
        return "interleaved" if interleave else "half"
    warnings.warn(f"posemb does not know the RoPE layout of model_type={model_type!r} and the config has no "
                  "rope_interleave: assuming the half-split (rotate_half) pairing of Llama. Pass layout='half' or "
                  "layout='interleaved' to say which the model's apply_rotary_pos_emb uses.", stacklevel=4)
    return "half"


def _check_refusals(reader: _Reader, model_type: str | None, rope: Mapping[str, Any]) -> None:
    reason = architectures.refusal(model_type)
    if reason is not None:
        raise ValueError(f"model_type={model_type!r} is refused: {reason}")
    arch = architectures.architecture(model_type)
    mrope_model = arch is not None and arch.mrope is not None
    if not mrope_model and (rope.get("mrope_section") is not None or reader.get("mrope_section") is not None):
        raise ValueError(f"config has mrope_section: refused, {architectures._MROPE}")
    if rope.get("llama_4_scaling_beta") is not None:
        raise ValueError("config rope llama_4_scaling_beta: refused, the model multiplies its queries by "
                         "1 + beta*log(1 + floor(position / original_max_position_embeddings)) (Ministral 3, "
                         "Mistral 4: get_llama_4_attn_scale), a position-dependent scale posemb's RoPE does not apply")


def rope_parameters_from_hf_config(config: Any, *, layer_type: str | None = None, strict: bool = True,
                                   layout: str | None = None) -> dict[str, Any]:
    """Normalised RoPE settings of a Hugging Face config, without building a module.

    Returns ``{"rope_type", "base", "scaling", "head_dim", "rotary_dim", "partial_rotary_factor",
    "max_position_embeddings", "layout"}`` where ``scaling`` holds the validated schedule keys (no
    ``None`` values) ready for :func:`posemb.functional.rope_schedules.compute_inv_freq` and for
    ``RoPE(scaling=...)``; ``max_position_embeddings`` is ``None`` if the config has none. With
    ``strict=False`` keys the schedule does not use are dropped with a warning instead of raising.
    ``layout`` overrides the architecture's pairing. See the module docstring for the rules.
    For an M-RoPE architecture (``Architecture.mrope``: Qwen2-VL, Qwen2.5-VL, Qwen3-VL) the dict
    also has ``"mrope_section"`` and ``"mrope_interleaved"``, and ``from_hf_config`` builds a
    :class:`~posemb.schemes.mrope.MRoPE`.
    """
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {type(strict).__name__} ({strict!r})")
    if layer_type is not None and not isinstance(layer_type, str):
        raise TypeError(f"layer_type must be a string or None, got {type(layer_type).__name__} ({layer_type!r})")
    config = _text_config(config)
    reader = _Reader(config)
    model_type = reader.get("model_type")
    arch = architectures.architecture(model_type)
    rope = _schedule_dict(reader, layer_type, arch)
    _check_refusals(reader, model_type, rope)
    overrides = _layer_overrides(reader, layer_type)
    if arch is not None and layer_type in arch.layer_thetas and "rope_theta" in rope:
        overrides["rope_theta"] = rope["rope_theta"]  # the layer type's own base key was read (Gemma 3 / ModernBERT)
    reader = _Reader(config, overrides)
    if reader.is_object and getattr(config, "is_heterogeneous", False) and layer_type is None:
        raise ValueError("config is heterogeneous (per_layer_config: the head size differs per layer type); pass "
                         "layer_type= or use posemb.rotary.layer_rotaries(config)")
    rope_type = _rope_type(rope, model_type)

    base = _pick("rope_theta", rope.get("rope_theta"), reader.get("rope_theta"), reader)
    if base is None:
        base = reader.get("rotary_emb_base", default=10000.0)
    base = check_float("config rope_theta", base)
    if base <= 1.0:
        raise ValueError(f"config rope_theta must be > 1 (a positive RoPE base), got {base}")

    head_dim = _head_dim(reader)
    ignored = _META_KEYS + (_MROPE_KEYS if arch is not None and arch.mrope is not None else ())
    scaling = {k: v for k, v in rope.items() if k not in ignored}
    if rope_type == "proportional":
        # p-RoPE's fraction selects which frequencies are non-zero; every channel of the head is "rotated"
        # (the zero-frequency pairs by the identity), as _compute_proportional_rope_parameters builds it.
        proportion = rope.get("partial_rotary_factor", reader.get("partial_rotary_factor"))
        if proportion is not None:
            scaling["partial_rotary_factor"] = proportion
        partial_rotary_factor = 1.0
    elif rope_type == "default" and arch is not None and arch.default_full_width:
        partial_rotary_factor = 1.0  # the model's own default init ignores the fraction (architectures.py)
    else:
        partial_rotary_factor = _partial_rotary_factor(rope, reader, model_type, head_dim)
    rotary_dim = int(head_dim * partial_rotary_factor)
    if rotary_dim < 2 or rotary_dim % 2:
        raise ValueError(f"rotary dimension int(head_dim * partial_rotary_factor) = int({head_dim} * "
                         f"{partial_rotary_factor}) = {rotary_dim} must be even and >= 2")

    max_position_embeddings = reader.get("max_position_embeddings", "n_positions")
    if max_position_embeddings is not None:
        max_position_embeddings = check_int("config max_position_embeddings", max_position_embeddings, minimum=1)

    if rope_type in _NEEDS_ORIGINAL_LENGTH:
        top_level = reader.get("original_max_position_embeddings")
        if top_level is not None:
            scaling["original_max_position_embeddings"] = top_level  # Phi-3 style: top level wins (as HF)
        elif scaling.get("original_max_position_embeddings") is None and max_position_embeddings is not None:
            scaling["original_max_position_embeddings"] = max_position_embeddings

    unknown = sorted(set(scaling) - set(_ALLOWED_KEYS[rope_type]))
    if unknown:
        if strict:
            raise ValueError(f"config rope key(s) {unknown} are not used by rope_type={rope_type!r} (allowed: "
                             f"{list(_ALLOWED_KEYS[rope_type]) or 'none'}); posemb does not model them, and such "
                             "keys change the model in some engines (Phi-3.5-MoE's short_mscale/long_mscale in "
                             "vLLM, Ministral 3's llama_4_scaling_beta in transformers). Pass strict=False to drop "
                             "them if you know the model ignores them.")
        warnings.warn(f"dropping rope key(s) {unknown} unused by rope_type={rope_type!r}", stacklevel=2)
        for key in unknown:
            del scaling[key]

    normalised = validate_rope_params(rope_type, rotary_dim, base, scaling, max_position_embeddings)
    mrope = {}
    if arch is not None and arch.mrope is not None:
        # the pairing of T/H/W is the model's (architectures.py), the section the config's when it has one
        interleaved, default_section = arch.mrope
        mrope = {"mrope_section": check_mrope_section(rope.get("mrope_section") or default_section), "mrope_interleaved": interleaved}
    return {**mrope,
        "rope_type": rope_type,
        "base": base,
        "scaling": {k: v for k, v in normalised.items() if v is not None},
        "head_dim": head_dim,
        "rotary_dim": rotary_dim,
        "partial_rotary_factor": partial_rotary_factor,
        "max_position_embeddings": max_position_embeddings,
        "layout": _layout(reader, model_type, arch, layout),
    }


def from_hf_config(config: Any, *, layer_type: str | None = None, strict: bool = True, **overrides: Any):
    """Build a ``posemb`` :class:`~posemb.schemes.rope.RoPE` from a Hugging Face config (object or dict).

    ``overrides`` replace constructor arguments (e.g. ``layout="half"`` for a checkpoint whose q/k
    rows were already permuted to the rotate-half order). M-RoPE architectures (see
    :func:`rope_parameters_from_hf_config`) give an :class:`~posemb.schemes.mrope.MRoPE`, which
    takes (3, batch, seq) positions and equals the 1-D RoPE on text positions.
    """
    from posemb.schemes.rope import RoPE  # imported here: the scheme module must not be needed to parse configs

    p = rope_parameters_from_hf_config(config, layer_type=layer_type, strict=strict,
                                       layout=overrides.pop("layout", None))
    kwargs: dict[str, Any] = dict(head_dim=p["head_dim"], base=p["base"], rope_type=p["rope_type"],
                                  scaling=p["scaling"] or None, layout=p["layout"],
                                  partial_rotary_factor=p["partial_rotary_factor"])
    if p["max_position_embeddings"] is not None:
        kwargs["max_position_embeddings"] = p["max_position_embeddings"]
    if "mrope_section" in p:
        from posemb.schemes.mrope import MRoPE
        kwargs.update(mrope_section=p["mrope_section"], mrope_interleaved=p["mrope_interleaved"])
        kwargs.update(overrides)
        return MRoPE(**kwargs)
    kwargs.update(overrides)
    return RoPE(**kwargs)


def layer_rotaries(config: Any, *, strict: bool = True, **overrides: Any) -> list:
    """The rotary of every layer of a model: a :class:`~posemb.schemes.rope.RoPE`, or ``None`` for a
    layer without RoPE (NoPE), in layer order (``num_hidden_layers`` entries).

    Per-layer types follow ``layer_types`` (Gemma 2/3/4 local/global bases and head sizes, ModernBERT,
    OLMo 3, ...). NoPE layers: ``no_rope_layers[i] == 0`` (Llama 4 iRoPE, SmolLM3:
    ``DecoderLayer.use_rope = no_rope_layers[i]``), a layer type whose ``rope_parameters`` entry is
    None, Cohere2's rule (only sliding layers rotate) and EXAONE 4's (with a ``sliding_window``, only
    sliding layers rotate). Layers of one type share one module. Llama 4's query temperature on its
    NoPE layers is :func:`attention_temperature_tuning`.
    """
    config = _text_config(config)
    reader = _Reader(config)
    arch = architectures.architecture(reader.get("model_type"))
    num_layers = check_int("config num_hidden_layers", reader.get("num_hidden_layers", "n_layer"), minimum=1)
    layer_types = list(reader.get("layer_types") or [None] * num_layers)
    if len(layer_types) != num_layers:
        raise ValueError(f"config layer_types has {len(layer_types)} entries but num_hidden_layers is {num_layers}")
    no_rope_layers = reader.get("no_rope_layers")
    if no_rope_layers is not None and len(no_rope_layers) != num_layers:
        raise ValueError(f"config no_rope_layers has {len(no_rope_layers)} entries but num_hidden_layers is {num_layers}")
    parameters = reader.get("rope_parameters") or {}
    nested = bool(parameters) and all(v is None or isinstance(v, Mapping) for v in parameters.values())
    heterogeneous = bool(getattr(config, "is_heterogeneous", False)) or bool(reader.get("per_layer_config"))
    sliding_window = reader.get("sliding_window")
    built: dict[Any, Any] = {}
    out = []
    for index, layer_type in enumerate(layer_types):
        use_rope = True
        if no_rope_layers is not None:
            use_rope = bool(no_rope_layers[index])
        if nested and layer_type in parameters and parameters[layer_type] is None:
            use_rope = False
        rule = arch.no_rope if arch is not None else None
        if rule == "sliding_only":
            use_rope = use_rope and layer_type == "sliding_attention" and sliding_window is not None
        elif rule == "sliding_when_windowed":
            use_rope = use_rope and (sliding_window is None or layer_type == "sliding_attention")
        if not use_rope:
            out.append(None)
            continue
        per_type = layer_type is not None and (nested or heterogeneous or
                                               (arch is not None and layer_type in arch.layer_thetas))
        key = layer_type if per_type else None
        if key not in built:
            built[key] = from_hf_config(config, layer_type=key, strict=strict, **overrides)
        out.append(built[key])
    return out


def attention_temperature_tuning(config: Any) -> dict[str, float] | None:
    """Llama 4's query temperature on NoPE layers, or None when the config has none.

    ``q <- q * (log(floor((position + 1) / floor_scale) + 1) * attn_scale + 1)`` on layers without RoPE
    (``llama4/modeling_llama4.py``: ``Llama4TextAttention``, ``attn_temperature_tuning``). Returns
    ``{"floor_scale", "attn_scale"}``.
    """
    reader = _Reader(_text_config(config))
    enabled = reader.get("attn_temperature_tuning")
    if enabled is None:
        return None
    if not isinstance(enabled, bool):
        raise TypeError(f"config attn_temperature_tuning must be a bool, got {type(enabled).__name__} ({enabled!r})")
    if not enabled:
        return None
    return {"floor_scale": check_float("config floor_scale", reader.get("floor_scale", default=8192), minimum=1.0),
            "attn_scale": check_float("config attn_scale", reader.get("attn_scale", default=0.1), minimum=0.0)}


def to_hf_config(rope: Any) -> dict[str, Any]:
    """A v5-style config fragment describing ``rope`` that :func:`from_hf_config` reads back exactly.

    ``{"rope_parameters": {"rope_type", "rope_theta", ...schedule keys}, "head_dim",
    "max_position_embeddings", "partial_rotary_factor" (only if < 1), "rope_interleave" (only for the
    interleaved layout)}``. Reads the module's ``rope_type``, ``base``, ``scaling``, ``head_dim``,
    ``partial_rotary_factor``, ``max_position_embeddings`` and ``layout`` attributes. ``"ntk"`` is not a
    transformers type, so such a fragment loads here but not in transformers.
    """
    def attribute(name: str) -> Any:
        if not hasattr(rope, name):
            raise TypeError(f"to_hf_config needs a RoPE module with a {name!r} attribute; "
                            f"{type(rope).__name__} has none")
        return getattr(rope, name)

    scaling = attribute("scaling") or {}
    parameters: dict[str, Any] = {"rope_type": attribute("rope_type"), "rope_theta": float(attribute("base"))}
    for key, value in scaling.items():
        if value is None or (key in _META_KEYS and not (key == "partial_rotary_factor"
                                                        and parameters["rope_type"] == "proportional")):
            continue
        parameters[key] = list(value) if isinstance(value, tuple) else value
    out: dict[str, Any] = {"rope_parameters": parameters, "head_dim": int(attribute("head_dim"))}
    max_position_embeddings = getattr(rope, "max_position_embeddings", None)
    if max_position_embeddings is not None:
        out["max_position_embeddings"] = int(max_position_embeddings)
    partial_rotary_factor = float(getattr(rope, "partial_rotary_factor", 1.0))
    if partial_rotary_factor != 1.0:
        out["partial_rotary_factor"] = partial_rotary_factor
    if getattr(rope, "layout", "half") == "interleaved":
        out["rope_interleave"] = True
    return out


__all__ = ["from_hf_config", "to_hf_config", "rope_parameters_from_hf_config", "layer_rotaries",
           "attention_temperature_tuning", "ROPE_TYPE_ALIASES"]
