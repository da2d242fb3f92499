"""Every text rotary of the installed transformers: posemb agrees exactly, or refuses with a documented reason.

The model types are discovered (``CONFIG_MAPPING`` whose modeling module defines a ``*RotaryEmbedding``
with ``forward(x, position_ids[, layer_type])``), so a new transformers version is covered without
editing this file. For each default config and each of its layer types, posemb's ``from_hf_config``
either raises -- and then the model type must be in ``posemb.rotary.architectures.REFUSED`` or the
config must hit one of the documented rule refusals -- or returns a RoPE whose

* ``inv_freq`` equals the model's rotary buffer (float32 rounding), and whose attention scale equals its ``attention_scaling``;
* cos/sin equal float64 ``cos(m·θ_j)``, ``sin(m·θ_j)`` times that scale;
* rotated ``q·k`` scores equal those of the model's own rotary module + apply function (through
  ``tests/_hf_zoo.py``, which knows nothing of posemb's architecture table) within 1e-4 relative;
  for an M-RoPE result (``MRoPE``) on text positions and on distinct (3, batch, seq) positions.

The same configs as ``config.to_dict()`` dicts (what ``config.json`` holds) must give the same module.
"""
from __future__ import annotations

import collections
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))
import _hf_zoo as zoo  # noqa: E402

from posemb.rotary import architectures, from_hf_config  # noqa: E402

#: refusals that follow from a config's content rather than its model type (documented in hf_config)
RULE_REFUSALS = {
    "'axial' is refused": "2-D vision RoPE (rope_type 'axial')",
    "mrope_section: refused": "M-RoPE (mrope_section)",
    "must be even and >= 2": "odd rotary width in the default config (transformers rounds it; no real checkpoint)",
    "is heterogeneous": "heterogeneous config without layer_type",
    "differ across layers": "per_layer_config differs between layers of one type",
    "llama_4_scaling_beta: refused": "llama_4_scaling_beta query scaling (Ministral 3, Mistral 4)",
    "config needs head_dim": "no head size in the config (its rotary is built from a sub-config)",
}
# transformers rotates in float32: at position 1000 its angles carry ~1e-4 relative error; a wrong
# layout, width, sign or base moves the scores by 10-100 %.
SCORE_RTOL = 1e-4
COUNTS: collections.Counter = collections.Counter()


def _positions(batch: int, length: int) -> torch.Tensor:
    return torch.arange(length)[None].expand(batch, length) + torch.tensor([[0], [1000]])[:batch]


def _refusal_reason(model_type: str, error: Exception) -> str | None:
    if architectures.refusal(model_type) is not None:
        return architectures.refusal(model_type)
    for needle, reason in RULE_REFUSALS.items():
        if needle in str(error):
            return reason
    return None


def _check_case(model_type: str, cls, config, layer_type) -> str:
    kwargs = {} if layer_type is None else {"layer_type": layer_type}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # an assumed layout must not pass silently
            rope = from_hf_config(config, **kwargs)
    except (ValueError, TypeError) as error:
        reason = _refusal_reason(model_type, error)
        assert reason is not None, f"{model_type}[{layer_type}]: refused without a documented reason: {error}"
        return "refused: " + reason
    except UserWarning as warning:
        raise AssertionError(f"{model_type}[{layer_type}]: posemb assumed something: {warning}") from None
    assert architectures.refusal(model_type) is None, f"{model_type} is on the refusal list but was accepted"

    batch, heads, length = 2, 2, 6
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, length, rope.head_dim, generator=generator, dtype=torch.float64)
    k = torch.randn(batch, heads, length, rope.head_dim, generator=generator, dtype=torch.float64)
    positions = _positions(batch, length)
    try:
        cls(config)
    except (KeyError, AttributeError, TypeError, ValueError):
        return "transformers' own rotary class fails on its default config (unverifiable, posemb's result unchecked)"
    q_model, k_model, inv_freq, scaling, _ = zoo.model_rotation(model_type, cls, config, layer_type, q, k, positions)

    if inv_freq is not None:
        assert inv_freq.shape == (rope.rotary_dim // 2,), f"{model_type}[{layer_type}]: inv_freq shape"
        assert torch.allclose(rope.inv_freq64, inv_freq.double(), rtol=2e-6, atol=0), f"{model_type}: inv_freq"
    if scaling is not None:
        assert math.isclose(rope.attention_scale, float(scaling), rel_tol=1e-6), f"{model_type}: attention scale"
    cos, sin = rope.cos_sin(positions, dtype=torch.float64)
    angles = positions[..., None].double() * rope.inv_freq64
    assert torch.allclose(cos, angles.cos() * rope.attention_scale, atol=1e-12)
    assert torch.allclose(sin, angles.sin() * rope.attention_scale, atol=1e-12)

    # text tokens of an M-RoPE model have t = h = w
    text_positions = positions.expand(3, -1, -1) if getattr(rope, "position_axes", 1) == 3 else positions
    q_ours, k_ours = rope.rotate(q, k, text_positions, text_positions)
    ours = q_ours @ k_ours.transpose(-1, -2)
    theirs = q_model.double() @ k_model.double().transpose(-1, -2)
    error = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert error < SCORE_RTOL, f"{model_type}[{layer_type}]: q·k differs from the model's by {error:.2e} (layout {rope.layout})"

    if getattr(rope, "position_axes", 1) == 3:  # M-RoPE: distinct (temporal, height, width) per token too
        grid = _positions(batch, length)
        positions3 = torch.stack((grid, grid // 2 + 3, grid % 3 + 7 * grid // 4))
        q_model, k_model, *_ = zoo.model_rotation(model_type, cls, config, layer_type, q, k, positions3)
        q_ours, k_ours = rope.rotate(q, k, positions3, positions3)
        ours = q_ours @ k_ours.transpose(-1, -2)
        theirs = q_model.double() @ k_model.double().transpose(-1, -2)
        error = ((ours - theirs).abs().max() / theirs.abs().max()).item()
        assert error < SCORE_RTOL, f"{model_type}[{layer_type}]: M-RoPE q·k on (3, B, L) positions differs by {error:.2e}"
        COUNTS["M-RoPE (3, B, L) positions agree"] += 1

    # the same config as a raw dict
    raw = from_hf_config(config.to_dict(), **kwargs)
    assert (raw.head_dim, raw.rotary_dim, raw.layout, raw.rope_type) == (rope.head_dim, rope.rotary_dim, rope.layout,
                                                                         rope.rope_type), f"{model_type}: dict form"
    assert torch.equal(raw.inv_freq64, rope.inv_freq64) and raw.attention_scale == rope.attention_scale
    return "agree"


MODEL_TYPES = zoo.rotary_model_types()


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_zoo(model_type):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.CONFIG_MAPPING[model_type]()
    cls, built_from = zoo.text_rotary_class(model_type, config)
    if cls is None:
        COUNTS["no text rotary (vision/audio/2-D forward)"] += 1
        return
    for layer_type in zoo.layer_types_of(cls, built_from):
        COUNTS[_check_case(model_type, cls, built_from, layer_type)] += 1


def test_zoo_counts(capsys):
    """Runs after the walk (same module): the closing note's numbers; a silent disagreement fails the walk itself."""
    if not COUNTS:
        pytest.skip("run together with test_zoo")
    with capsys.disabled():
        print("\nposemb vs transformers", transformers.__version__, "zoo:", len(MODEL_TYPES), "model types")
        for key, value in sorted(COUNTS.items(), key=lambda item: -item[1]):
            print(f"  {value:4d}  {key}")
    assert COUNTS["agree"] > 150
