"""Rotary position embedding: frequency schedules and Hugging Face config loading.

>>> from posemb.rotary import from_hf_config, compute_inv_freq     # doctest: +SKIP
>>> rope = from_hf_config({"rope_theta": 5e5, "head_dim": 128, "max_position_embeddings": 131072,
...     "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
...                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})  # doctest: +SKIP

``RoPE`` (the scheme module, ``posemb.schemes.rope``) is re-exported lazily so that the schedules and
the config parser stay importable on their own.
"""
from __future__ import annotations

from typing import Any

from posemb.functional.rope_schedules import ROPE_TYPES, compute_inv_freq, validate_rope_params
from posemb.rotary.hf_config import (ROPE_TYPE_ALIASES, attention_temperature_tuning, from_hf_config,
                                     layer_rotaries, rope_parameters_from_hf_config, to_hf_config)

__all__ = ["from_hf_config", "to_hf_config", "rope_parameters_from_hf_config", "layer_rotaries",
           "attention_temperature_tuning", "compute_inv_freq",
           "validate_rope_params", "ROPE_TYPES", "ROPE_TYPE_ALIASES", "RoPE"]


def __getattr__(name: str) -> Any:
    if name == "RoPE":
        from posemb.schemes.rope import RoPE
        return RoPE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
