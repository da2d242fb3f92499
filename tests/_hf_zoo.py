"""Helpers for ``tests/test_hf_zoo.py``: discover every model type of the installed transformers
whose modeling module defines a text rotary class, and rotate random q/k through that model's own
rotary module and its own apply function (the oracle posemb is compared against).

Nothing here knows posemb's architecture table: layouts, widths and signs come from running the
model's code, so a wrong entry in ``posemb.rotary.architectures`` shows up as a disagreement.
"""
from __future__ import annotations

import copy
import functools
import importlib
import inspect
import os
import re
import warnings

import torch

import transformers
from transformers import CONFIG_MAPPING
from transformers.models.auto.configuration_auto import model_type_to_module_name

_ROOT = os.path.dirname(transformers.__file__)


@functools.lru_cache(maxsize=None)
def modeling_modules(model_type: str) -> tuple:
    """The imported ``modeling_*.py`` modules of ``model_type`` that mention a rotary embedding class."""
    folder = os.path.join(_ROOT, "models", model_type_to_module_name(model_type))
    if not os.path.isdir(folder):
        return ()
    out = []
    for name in sorted(os.listdir(folder)):
        if name.startswith("modeling_") and name.endswith(".py"):
            with open(os.path.join(folder, name), encoding="utf-8") as handle:
                if "RotaryEmbedding" not in handle.read():
                    continue
            out.append(importlib.import_module(f"transformers.models.{model_type_to_module_name(model_type)}.{name[:-3]}"))
    return tuple(out)


def rotary_model_types() -> list[str]:
    """Every ``CONFIG_MAPPING`` type whose modeling module defines a ``*RotaryEmbedding`` class."""
    return sorted(t for t in CONFIG_MAPPING.keys() if modeling_modules(t))


def _annotated_config(cls) -> type | None:
    try:
        parameter = next(iter(list(inspect.signature(cls.__init__).parameters.values())[1:]), None)
    except (TypeError, ValueError):
        return None
    return None if parameter is None else parameter.annotation


def text_rotary_class(model_type: str, config):
    """``(rotary class, config it is built from)`` for a text rotary of the form ``forward(x,
    position_ids[, layer_type])``, or ``(None, reason)``."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for module in modeling_modules(model_type):
        for name, cls in vars(module).items():
            if not (inspect.isclass(cls) and name.endswith("RotaryEmbedding") and issubclass(cls, torch.nn.Module)):
                continue
            params = list(inspect.signature(cls.forward).parameters)[1:]
            if params[:2] != ["x", "position_ids"]:
                continue
            annotated = _annotated_config(cls)
            if annotated is type(config) or annotated is type(text):
                # the model builds it from its text config when the annotation names the composite
                return cls, text
    return None, "no text rotary class (x, position_ids) built from this config"


def layer_types_of(cls, config) -> list[str | None]:
    """The layer types a rotary class computes separately (``forward(..., layer_type)``), else [None]."""
    if "layer_type" not in inspect.signature(cls.forward).parameters:
        return [None]
    params = getattr(config, "rope_parameters", None) or {}
    present = set(getattr(config, "layer_types", None) or params)  # the rotary builds only the types in use
    keys = [k for k in params if isinstance(params[k], dict) and k in present]
    return keys or [None]


def _apply_function(module, config):
    """The function the model's attention rotates q/k with, chosen as the attention code chooses."""
    source = inspect.getsource(module)
    names = [n for n in ("apply_rotary_pos_emb_interleave", "apply_rotary_pos_emb", "apply_rotary_emb")
             if callable(getattr(module, n, None)) and getattr(module, n).__module__ == module.__name__]
    if "apply_rotary_pos_emb_interleave" in names:
        # the main (MLA) attention's call; indexer heads call it with unsqueeze_dim=2 or call the plain one
        main = re.search(r"([^\n]*)\n\s*q_rot, k_rot = apply_rotary_pos_emb_interleave\(q_rot, k_rot, cos, sin\)\n",
                         source)
        if main and "rope_interleave" not in main.group(1):
            return module.apply_rotary_pos_emb_interleave
        if main and getattr(config, "rope_interleave", False):
            return module.apply_rotary_pos_emb_interleave
        names.remove("apply_rotary_pos_emb_interleave")
    return getattr(module, names[0]) if names else None


def model_rotation(model_type: str, cls, config, layer_type, q, k, positions):
    """``(q_rot, k_rot, inv_freq or None, attention_scaling or None, rotary width)`` from the model's code.

    q, k: (batch, heads, seq, head_dim) float64 copies are rotated in float32 (as the model does)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rotary = cls(config)
        x = torch.zeros(q.shape[0], q.shape[2], 4, dtype=torch.float32)
        out = rotary(x, positions) if layer_type is None else rotary(x, positions, layer_type)
    if layer_type is not None:
        inv_freq = getattr(rotary, f"{layer_type}_inv_freq", None)
        scaling = getattr(rotary, f"{layer_type}_attention_scaling", None)
    else:
        inv_freq = getattr(rotary, "inv_freq", None)
        scaling = getattr(rotary, "attention_scaling", None)
    module = inspect.getmodule(cls)
    apply = _apply_function(module, config)
    if apply is None:
        raise LookupError(f"no apply function in {module.__name__}")
    params = list(inspect.signature(apply).parameters)
    qf, kf = q.float(), k.float()
    if torch.is_tensor(out) and out.is_complex():  # freqs_cis: (batch, seq, pairs), tensors (B, L, H, D)
        width = 2 * out.shape[-1]
        try:  # DeepSeek-V2 broadcasts over (batch, heads, seq, pairs) ...
            qr, kr = _split_call(qf, kf, width, lambda a, b: apply(a, b, out))
        except RuntimeError:  # ... Llama 4 over (batch, seq, heads, pairs)
            qr, kr = _split_call(qf, kf, width, lambda a, b: tuple(t.transpose(1, 2) for t in apply(
                a.transpose(1, 2), b.transpose(1, 2), out)))
        return qr, kr, inv_freq, scaling, width
    first, second = out
    if params[:3] == ["tensor", "sin", "cos"]:  # GPT-J: forward returns (sin, cos) of width d/2
        sin, cos = first, second
        width = 2 * cos.shape[-1]
        qr, kr = _split_call(qf, kf, width, lambda a, b: tuple(
            apply(t.transpose(1, 2), sin, cos).transpose(1, 2) for t in (a, b)))
        return qr, kr, inv_freq, scaling, width
    cos, sin = first, second
    if params[:3] == ["x", "cos", "sin"]:
        call = lambda a, b: (apply(a, cos, sin), apply(b, cos, sin))  # noqa: E731
    else:
        call = lambda a, b: apply(a, b, cos, sin)  # noqa: E731
    width = cos.shape[-1]
    try:  # the apply function may own the split into rotated and passed channels (NeoX, GLM, DeepSeek-V4) ...
        qr, kr = call(qf, kf)
        if qr.shape != qf.shape:
            raise RuntimeError("shape")
    except RuntimeError:  # ... or the attention slices the leading rotated channels first (GPT-NeoX style)
        qr, kr = None, None
    if qr is None:
        widths = sorted({width, 2 * width})
        for w in widths:
            try:
                qr, kr = _split_call(qf, kf, w, call)
                width = w
                break
            except RuntimeError:
                continue
        if qr is None:
            raise RuntimeError(f"cannot apply {apply.__name__} with cos width {cos.shape[-1]} to head_dim {q.shape[-1]}")
    return qr, kr, inv_freq, scaling, width


def _split_call(q, k, width, call):
    if width > q.shape[-1]:
        raise RuntimeError(f"rotary width {width} > head_dim {q.shape[-1]}")
    qr, kr = call(q[..., :width], k[..., :width])
    return torch.cat((qr, q[..., width:]), -1), torch.cat((kr, k[..., width:]), -1)


# ---- rope_type variants ------------------------------------------------------------------------
#: the variants the walk tries on every model besides its default config, with valid parameters
#: (transformers' _validate_<type>_rope_parameters) for a config whose max_position_embeddings is
#: VARIANT_MAX_POSITIONS and whose pretraining length is VARIANT_ORIGINAL (factor = their ratio, so
#: YaRN's implicit-factor check holds)
VARIANT_MAX_POSITIONS = 256
VARIANT_ORIGINAL = 64
VARIANT_FACTOR = VARIANT_MAX_POSITIONS / VARIANT_ORIGINAL
ROPE_VARIANTS = ("default", "linear", "dynamic", "yarn", "yarn-mscale", "longrope", "llama3")
#: keys of a layer's rope dict that are not schedule parameters and stay in every variant
_KEPT_KEYS = ("rope_theta", "partial_rotary_factor")


class VariantRejected(Exception):
    """The model rejects a rope_type variant in its config validation or its rotary's init (the reason is the text)."""


def variant_parameters(variant: str, pairs: int | None) -> dict:
    """The schedule keys of ``variant`` (``pairs``: rotary_dim / 2 of the layer, for LongRoPE's factor lists)."""
    original = {"original_max_position_embeddings": VARIANT_ORIGINAL}
    if variant == "default":
        return {"rope_type": "default"}
    if variant in ("linear", "dynamic"):
        return {"rope_type": variant, "factor": VARIANT_FACTOR}
    if variant == "yarn":
        return {"rope_type": "yarn", "factor": VARIANT_FACTOR, "beta_fast": 32.0, "beta_slow": 1.0, **original}
    if variant == "yarn-mscale":  # DeepSeek's spelling: cos/sin carry mscale / mscale_all_dim, MLA the mscale_all_dim^2
        return {"rope_type": "yarn", "factor": VARIANT_FACTOR, "mscale": 0.707, "mscale_all_dim": 1.0, **original}
    if variant == "llama3":
        return {"rope_type": "llama3", "factor": VARIANT_FACTOR, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                **original}
    if variant == "longrope":
        if pairs is None:
            raise VariantRejected("longrope: the rotary width is unknown (no inv_freq), its factor lists cannot be sized")
        return {"rope_type": "longrope", "factor": VARIANT_FACTOR, **original,
                "short_factor": [1.0 + 0.05 * j for j in range(pairs)],
                "long_factor": [1.0 + 0.5 * j for j in range(pairs)]}
    raise ValueError(f"unknown variant {variant!r}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160] if text else ''}"


def rope_variant(config, cls, variant: str, pairs: dict) -> tuple[dict, object]:
    """``(config.json-style dict, config object built from it by the config class)`` of ``config`` with every
    rope dict (flat, or each layer type's) replaced by ``variant``; raises :class:`VariantRejected` when the
    config class or the model's rotary refuses it. ``pairs``: layer type (or None) -> rotary_dim / 2."""
    raw = config.to_dict()
    params = raw.get("rope_parameters")
    if not isinstance(params, dict) or not params:
        raise VariantRejected("the config has no rope_parameters to vary")
    ignore = set(getattr(config, "ignore_keys_at_rope_validation", None) or ())
    kept = set(_KEPT_KEYS) | ignore  # model-specific keys (e.g. mrope_section) stay

    def vary(layer: dict, layer_type) -> dict:
        return {**{k: v for k, v in layer.items() if k in kept}, **variant_parameters(variant, pairs.get(layer_type))}

    nested = all(v is None or isinstance(v, dict) for v in params.values())
    raw["rope_parameters"] = ({k: (None if v is None else vary(v, k)) for k, v in params.items()} if nested
                              else vary(params, None))
    if "max_position_embeddings" in raw:
        raw["max_position_embeddings"] = VARIANT_MAX_POSITIONS
    if raw.get("original_max_position_embeddings") is not None:  # Phi-3 keeps it at the top level (it wins in HF)
        raw["original_max_position_embeddings"] = VARIANT_ORIGINAL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            built = type(config).from_dict(copy.deepcopy(raw))
        except Exception as error:  # noqa: BLE001 -- any refusal of the config class is the model's answer
            raise VariantRejected(f"config validation: {_first_line(error)}") from None
        try:
            cls(built)
        except Exception as error:  # noqa: BLE001
            raise VariantRejected(f"rotary init: {_first_line(error)}") from None
    return raw, built


def rotary_pairs(cls, config, layer_type) -> int | None:
    """rotary_dim / 2 of the model's rotary for ``layer_type`` (its inv_freq length), or None."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            rotary = cls(config)
        except Exception:  # noqa: BLE001
            return None
    inv_freq = getattr(rotary, "inv_freq" if layer_type is None else f"{layer_type}_inv_freq", None)
    return None if inv_freq is None else int(inv_freq.shape[-1])
