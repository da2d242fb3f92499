"""Helpers for ``tests/test_hf_zoo.py``: discover every model type of the installed transformers
whose modeling module defines a text rotary class, and rotate random q/k through that model's own
rotary module and its own apply function (the oracle posemb is compared against).

Nothing here knows posemb's architecture table: layouts, widths and signs come from running the
model's code, so a wrong entry in ``posemb.rotary.architectures`` shows up as a disagreement.
"""
from __future__ import annotations

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
