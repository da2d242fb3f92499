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
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))
import _hf_zoo as zoo  # noqa: E402

from posemb.rotary import architectures, from_hf_config  # noqa: E402

_SECTION_MISFIT = "mrope_section does not fit the rotary width (the model's own rotary fails on it too)"
#: refusals that follow from a config's content rather than its model type (documented in hf_config)
RULE_REFUSALS = {
    "'axial' is refused": "2-D vision RoPE (rope_type 'axial')",
    "mrope_section: refused": "M-RoPE (mrope_section)",
    "must be even and >= 2": "odd rotary width in the default config (transformers rounds it; no real checkpoint)",
    "is heterogeneous": "heterogeneous config without layer_type",
    "differ across layers": "per_layer_config differs between layers of one type",
    "llama_4_scaling_beta: refused": "llama_4_scaling_beta query scaling (Ministral 3, Mistral 4)",
    "config needs head_dim": "no head size in the config (its rotary is built from a sub-config)",
    "for contiguous M-RoPE, got": _SECTION_MISFIT,
}
# transformers rotates in float32: at position 1000 its angles carry ~1e-4 relative error; a wrong
# layout, width, sign or base moves the scores by 10-100 %.
SCORE_RTOL = 1e-4
COUNTS: collections.Counter = collections.Counter()
#: (config label, outcome) -> cases; (variant, the model's reason) -> variants the model rejects
VARIANTS: collections.Counter = collections.Counter()
SKIPPED: collections.Counter = collections.Counter()


#: (batch, seq) positions of the two checks: "short" inside the variants' pretraining length (64), "long"
#: past max_position_embeddings (256) so dynamic NTK rescales and LongRoPE switches to its long factors.
#: Both rows of "long" share their maximum: transformers picks the frequencies for the whole batch from
#: max(position_ids), posemb per row, and the two agree whenever the rows' maxima do.
POSITION_SETS = {
    "short": torch.tensor([[0, 1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12]]),
    "long": torch.tensor([[1000, 1001, 1002, 1003, 1004, 1005], [0, 3, 100, 500, 1004, 1005]]),
}


def _refusal_reason(model_type: str, error: Exception) -> str | None:
    if architectures.refusal(model_type) is not None:
        return architectures.refusal(model_type)
    for needle, reason in RULE_REFUSALS.items():
        if needle in str(error):
            return reason
    return None


def _scores_error(q_ours, k_ours, q_model, k_model) -> float:
    ours = q_ours @ k_ours.transpose(-1, -2)
    theirs = q_model.double() @ k_model.double().transpose(-1, -2)
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def _expected_frequencies(rope, positions: torch.Tensor) -> tuple[torch.Tensor, float]:
    """posemb's float64 inv_freq and attention scale for a batch whose context is max(positions) + 1."""
    if getattr(rope, "context_dependent", False):
        return rope.inv_freq_for(int(positions.max()) + 1)
    return rope.inv_freq64, rope.attention_scale


def _assert_model_fails(model_type: str, cls, config, layer_type, where: str) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q = torch.randn(1, 1, 6, head_dim, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="split_with_sizes"):  # torch's error for split sizes that do not sum
        zoo.model_rotation(model_type, cls, config, layer_type, q, q.clone(), POSITION_SETS["short"][:1])


def _check_case(model_type: str, cls, config, layer_type, raw: dict, label: str) -> str:
    """One config (default or a rope_type variant) and one layer type: "agree", or "refused: <reason>"."""
    where = f"{model_type}[{label}, {layer_type}]"
    kwargs = {} if layer_type is None else {"layer_type": layer_type}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # an assumed layout must not pass silently
            rope = from_hf_config(config, **kwargs)
    except (ValueError, TypeError) as error:
        reason = _refusal_reason(model_type, error)
        assert reason is not None, f"{where}: refused without a documented reason: {error}"
        if reason == _SECTION_MISFIT:  # only where the model cannot run the config either (GLM-4V defaults)
            _assert_model_fails(model_type, cls, config, layer_type, where)
        return "refused: " + reason
    except UserWarning as warning:
        raise AssertionError(f"{where}: posemb assumed something: {warning}") from None
    assert architectures.refusal(model_type) is None, f"{model_type} is on the refusal list but was accepted"

    batch, heads = 2, 2
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, 6, rope.head_dim, generator=generator, dtype=torch.float64)
    k = torch.randn(batch, heads, 6, rope.head_dim, generator=generator, dtype=torch.float64)
    try:
        cls(config)
    except (KeyError, AttributeError, TypeError, ValueError):
        return "transformers' own rotary class fails on its default config (unverifiable, posemb's result unchecked)"
    m_rope = getattr(rope, "position_axes", 1) == 3
    for name, positions in POSITION_SETS.items():
        q_model, k_model, inv_freq, scaling, _ = zoo.model_rotation(model_type, cls, config, layer_type, q, k, positions)
        expected_inv_freq, expected_scale = _expected_frequencies(rope, positions)
        if inv_freq is not None:  # read after the forward: a dynamic rotary has rescaled it by now
            assert inv_freq.shape == (rope.rotary_dim // 2,), f"{where}: inv_freq shape"
            assert torch.allclose(expected_inv_freq, inv_freq.double(), rtol=2e-6, atol=0), f"{where} {name}: inv_freq"
        if scaling is not None:
            assert math.isclose(expected_scale, float(scaling), rel_tol=1e-6), f"{where} {name}: attention scale"
        cos, sin = rope.cos_sin(positions, dtype=torch.float64)
        angles = positions[..., None].double() * expected_inv_freq
        assert torch.allclose(cos, angles.cos() * expected_scale, atol=1e-12), f"{where} {name}: cos"
        assert torch.allclose(sin, angles.sin() * expected_scale, atol=1e-12), f"{where} {name}: sin"
        # text tokens of an M-RoPE model have t = h = w
        text_positions = positions.expand(3, -1, -1) if m_rope else positions
        q_ours, k_ours = rope.rotate(q, k, text_positions, text_positions)
        error = _scores_error(q_ours, k_ours, q_model, k_model)
        assert error < SCORE_RTOL, f"{where} {name}: q·k differs from the model's by {error:.2e} (layout {rope.layout})"

    if m_rope:  # M-RoPE: distinct (temporal, height, width) per token too (monotone maps keep the rows' maxima equal)
        for name, grid in POSITION_SETS.items():
            positions3 = torch.stack((grid, grid // 2 + 3, grid % 3 + 7 * grid // 4))
            q_model, k_model, *_ = zoo.model_rotation(model_type, cls, config, layer_type, q, k, positions3)
            q_ours, k_ours = rope.rotate(q, k, positions3, positions3)
            error = _scores_error(q_ours, k_ours, q_model, k_model)
            assert error < SCORE_RTOL, f"{where} {name}: M-RoPE q·k on (3, B, L) positions differs by {error:.2e}"
        COUNTS["M-RoPE (3, B, L) positions agree"] += 1

    # the same config as a raw config.json-style dict
    from_dict = from_hf_config(raw, **kwargs)
    assert (from_dict.head_dim, from_dict.rotary_dim, from_dict.layout, from_dict.rope_type) == (
        rope.head_dim, rope.rotary_dim, rope.layout, rope.rope_type), f"{where}: dict form"
    assert type(from_dict) is type(rope), f"{where}: dict form gives {type(from_dict).__name__}"
    assert torch.equal(from_dict.inv_freq64, rope.inv_freq64) and from_dict.attention_scale == rope.attention_scale
    assert from_dict.scaling == rope.scaling, f"{where}: dict form schedule {from_dict.scaling} != {rope.scaling}"
    return "agree"


MODEL_TYPES = zoo.rotary_model_types()


@pytest.fixture(autouse=True)
def _one_thread():
    """The cases are tiny (2x2x6 heads): thread start-up and contention cost more than the arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _walk(model_type: str, cls, config, raw: dict, label: str) -> None:
    for layer_type in zoo.layer_types_of(cls, config):
        outcome = _check_case(model_type, cls, config, layer_type, raw, label)
        COUNTS[outcome] += 1
        VARIANTS[(label, outcome)] += 1


def _variant_pairs(model_type: str, cls, config) -> dict:
    """rotary_dim / 2 per layer type, as the model computes it for a non-proportional type (LongRoPE's list length)."""
    try:
        _, linear = zoo.rope_variant(config, cls, "linear", {})
    except zoo.VariantRejected:
        linear = config
    return {layer_type: zoo.rotary_pairs(cls, linear, layer_type) for layer_type in zoo.layer_types_of(cls, linear)}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_zoo(model_type):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.CONFIG_MAPPING[model_type]()
    cls, built_from = zoo.text_rotary_class(model_type, config)
    if cls is None:
        COUNTS["no text rotary (vision/audio/2-D forward)"] += 1
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = built_from.to_dict()
    _walk(model_type, cls, built_from, raw, "default config")
    pairs = _variant_pairs(model_type, cls, built_from)
    for variant in zoo.ROPE_VARIANTS:
        try:
            raw, variant_config = zoo.rope_variant(built_from, cls, variant, pairs)
        except zoo.VariantRejected as rejected:  # the model's own answer, not agreement
            # the reason without the class name, so that the closing table groups the same refusal
            SKIPPED[(variant, re.sub(r"'?\b\w+(Config|RotaryEmbedding)\b'?", "<model>", str(rejected)))] += 1
            continue
        _walk(model_type, cls, variant_config, raw, variant)


def test_zoo_counts(capsys):
    """Runs after the walk (same module): the closing note's numbers; a silent disagreement fails the walk itself."""
    if not COUNTS:
        pytest.skip("run together with test_zoo")
    with capsys.disabled():
        print("\nposemb vs transformers", transformers.__version__, "zoo:", len(MODEL_TYPES), "model types; cases "
              "(config x layer type):")
        for key, value in sorted(COUNTS.items(), key=lambda item: -item[1]):
            print(f"  {value:4d}  {key}")
        print("  by config (agree / refused / unverifiable):")
        for label in ("default config",) + zoo.ROPE_VARIANTS:
            rows = {outcome: n for (name, outcome), n in VARIANTS.items() if name == label}
            refused = sum(n for outcome, n in rows.items() if outcome.startswith("refused"))
            print(f"    {label:15s} {rows.get('agree', 0):4d} / {refused:4d} / "
                  f"{sum(rows.values()) - rows.get('agree', 0) - refused:4d}")
        print("  rope_type variants the model itself rejects (skipped, not agreement):")
        for (variant, reason), value in sorted(SKIPPED.items(), key=lambda item: -item[1]):
            print(f"  {value:4d}  {variant}: {reason}")
    assert COUNTS["agree"] > 150
    # every variant was tried on the models that accept it: most agree
    for variant in zoo.ROPE_VARIANTS:
        assert VARIANTS[(variant, "agree")] > 150, f"only {VARIANTS[(variant, 'agree')]} agreeing {variant} cases"


#: M-RoPE families whose default configs cannot be checked (GLM-4V's leave out the half-width factor its
#: mrope_section needs, Qwen3-Omni's give an odd head size), with the shapes of their released checkpoints
CHECKPOINT_SHAPES = {
    "glm4v_text": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                        "partial_rotary_factor": 0.5, "mrope_section": [8, 12, 12]}),
    "glm4v_moe_text": dict(head_dim=128, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "partial_rotary_factor": 0.5, "mrope_section": [8, 12, 12]}),
    "glm_image_text": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                            "partial_rotary_factor": 0.5, "mrope_section": [8, 12, 12]}),
    "qwen3_omni_moe_text": dict(head_dim=128, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                               "mrope_section": [24, 20, 20], "interleaved": True}),
}


@pytest.mark.parametrize("model_type", sorted(CHECKPOINT_SHAPES))
def test_mrope_checkpoint_shapes(model_type):
    """The M-RoPE entries the default-config walk cannot reach agree on their checkpoints' shapes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.CONFIG_MAPPING[model_type](**CHECKPOINT_SHAPES[model_type])
        raw = config.to_dict()
    cls, built_from = zoo.text_rotary_class(model_type, config)
    assert cls is not None and built_from is config
    before = COUNTS["M-RoPE (3, B, L) positions agree"]
    assert _check_case(model_type, cls, config, None, raw, "checkpoint shape") == "agree"
    assert COUNTS["M-RoPE (3, B, L) positions agree"] == before + 1  # the (3, B, L) check ran
    assert from_hf_config(config).rotary_dim == (64 if model_type.startswith("glm") else 128)
