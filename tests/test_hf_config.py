"""Hugging Face config loading: parity with transformers on the published RoPE settings of real models,
the legacy key spellings, every config error, and the ``to_hf_config`` round trip.

Each case is the RoPE-relevant subset of a model's published ``config.json`` (v4 spelling:
``rope_scaling`` + top-level ``rope_theta``). The same values are loaded three ways -- the raw dict,
the transformers config object built from it (no download), and that object's v5 ``to_dict()`` -- and
``inv_freq``/``attention_scale`` must equal transformers' own (the model's ``XRotaryEmbedding`` for the
init-time values, ``ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=L)`` for the length-dependent
types) within 1e-6 relative. transformers computes in float32, posemb in float64.
"""
import copy
import importlib
import math
import warnings

import pytest
import torch

from posemb.functional.rope_schedules import compute_inv_freq
from posemb.rotary import (ROPE_TYPES, attention_temperature_tuning, from_hf_config, layer_rotaries,
                           rope_parameters_from_hf_config, to_hf_config)

transformers = pytest.importorskip("transformers")
# dicts without a model_type assume the half-split layout with a warning (tested below); the parity cases need no noise
pytestmark = pytest.mark.filterwarnings("ignore:posemb does not know the RoPE layout")

RTOL = 1e-6
# The parity target is transformers 5.x: v4 read rope_scaling/top-level rope_theta, had no
# rope_parameters, and older 4.x YaRN ignored original_max_position_embeddings (transformers #33783).
needs_hf5 = pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5,
                               reason="parity is checked against transformers 5.x rules")

# Phi-3-mini-128k-instruct uses 48 published short/long factors (head_dim 96). These lists are
# generated stand-ins of the right length and shape (short ~1-2, long rising to ~64), not the
# published numbers: the test checks the arithmetic, which is the same for any positive factors.
PHI3_SHORT = [round(1.0 + 0.02 * j + 0.0005 * j * j, 4) for j in range(48)]
PHI3_LONG = [round(1.0 + 63.0 * (1 - math.exp(-j / 10.0)), 4) for j in range(48)]

# id -> (config class, rotary-embedding class in transformers.models.<module>, published values,
#        seq_lens to check for length-dependent types, expected (rope_type, rotary_dim, layout))
CASES = {
    "llama-3.1-8b": ("LlamaConfig", "llama.modeling_llama.LlamaRotaryEmbedding", dict(
        model_type="llama", hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)), (), ("llama3", 128, "half")),
    "llama-3.2-1b": ("LlamaConfig", "llama.modeling_llama.LlamaRotaryEmbedding", dict(
        model_type="llama", hidden_size=2048, num_attention_heads=32, head_dim=64, num_key_value_heads=8,
        max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)), (), ("llama3", 64, "half")),
    "llama-4-scout": ("Llama4TextConfig", "llama4.modeling_llama4.Llama4TextRotaryEmbedding", dict(
        model_type="llama4_text", hidden_size=5120, num_attention_heads=40, head_dim=128, num_key_value_heads=8,
        max_position_embeddings=10485760, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                          original_max_position_embeddings=8192)), (), ("llama3", 128, "interleaved")),
    "qwen2.5-7b-yarn": ("Qwen2Config", "qwen2.modeling_qwen2.Qwen2RotaryEmbedding", dict(
        model_type="qwen2", hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
        max_position_embeddings=32768, rope_theta=1000000.0,
        rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=32768)), (), ("yarn", 128, "half")),
    "deepseek-v3": ("DeepseekV3Config", "deepseek_v3.modeling_deepseek_v3.DeepseekV3RotaryEmbedding", dict(
        model_type="deepseek_v3", hidden_size=7168, num_attention_heads=128, qk_rope_head_dim=64,
        qk_nope_head_dim=128, v_head_dim=128, max_position_embeddings=163840, rope_theta=10000,
        rope_scaling=dict(type="yarn", factor=40, beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0,
                          original_max_position_embeddings=4096)), (), ("yarn", 64, "interleaved")),
    "gpt-oss-20b": ("GptOssConfig", "gpt_oss.modeling_gpt_oss.GptOssRotaryEmbedding", dict(
        model_type="gpt_oss", hidden_size=2880, num_attention_heads=64, head_dim=64, num_key_value_heads=8,
        max_position_embeddings=131072, rope_theta=150000,
        rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                          original_max_position_embeddings=4096)), (), ("yarn", 64, "half")),
    "phi-3-mini-128k": ("Phi3Config", "phi3.modeling_phi3.Phi3RotaryEmbedding", dict(
        model_type="phi3", hidden_size=3072, num_attention_heads=32, max_position_embeddings=131072,
        original_max_position_embeddings=4096, rope_theta=10000.0,
        rope_scaling=dict(type="longrope", short_factor=PHI3_SHORT, long_factor=PHI3_LONG)),
        (1, 4096, 4097, 131072), ("longrope", 96, "half")),
    "pythia-410m": ("GPTNeoXConfig", "gpt_neox.modeling_gpt_neox.GPTNeoXRotaryEmbedding", dict(
        model_type="gpt_neox", hidden_size=1024, num_attention_heads=16, rotary_pct=0.25, rotary_emb_base=10000,
        max_position_embeddings=2048), (), ("default", 16, "half")),
    "phi-2": ("PhiConfig", "phi.modeling_phi.PhiRotaryEmbedding", dict(
        model_type="phi", hidden_size=2560, num_attention_heads=32, partial_rotary_factor=0.4,
        max_position_embeddings=2048, rope_theta=10000.0), (), ("default", 32, "half")),
    "llama-2-7b-dynamic-ntk": ("LlamaConfig", "llama.modeling_llama.LlamaRotaryEmbedding", dict(
        model_type="llama", hidden_size=4096, num_attention_heads=32, max_position_embeddings=4096, rope_theta=10000.0,
        rope_scaling=dict(type="dynamic", factor=2.0)), (1, 4096, 6000, 8192, 16384, 100000), ("dynamic", 128, "half")),
    "vicuna-7b-16k-linear": ("LlamaConfig", "llama.modeling_llama.LlamaRotaryEmbedding", dict(
        model_type="llama", hidden_size=4096, num_attention_heads=32, max_position_embeddings=4096, rope_theta=10000.0,
        rope_scaling=dict(type="linear", factor=4.0)), (), ("linear", 128, "half")),
    "mistral-7b-v0.2": ("MistralConfig", "mistral.modeling_mistral.MistralRotaryEmbedding", dict(
        model_type="mistral", hidden_size=4096, num_attention_heads=32, head_dim=128, num_key_value_heads=8,
        max_position_embeddings=32768, rope_theta=1000000.0), (), ("default", 128, "half")),
}


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _class(dotted: str):
    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(f"transformers.models.{module}"), name)


def build_config(case):
    config_cls, _, raw, _, _ = CASES[case]
    if not hasattr(transformers, config_cls):
        pytest.skip(f"transformers {transformers.__version__} has no {config_cls}")
    kwargs = {k: copy.deepcopy(v) for k, v in raw.items() if k != "model_type"}
    return _quiet(getattr(transformers, config_cls), **kwargs)


def hf_reference(case, config, seq_len=None):
    """transformers' (inv_freq float64 view of its float32 values, attention scale)."""
    if seq_len is None:
        rotary = _quiet(_class(CASES[case][1]), config=config)
        return rotary.inv_freq.double(), float(rotary.attention_scaling)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    rope_type = CASES[case][4][0]
    inv_freq, scale = _quiet(ROPE_INIT_FUNCTIONS[rope_type], config, None, seq_len=seq_len)
    return inv_freq.double(), float(scale)


def ours(config, seq_len=None):
    p = rope_parameters_from_hf_config(config)
    return compute_inv_freq(p["rope_type"], p["rotary_dim"], p["base"], p["scaling"], seq_len=seq_len,
                            max_position_embeddings=p["max_position_embeddings"])


def assert_parity(mine, theirs):
    (inv, scale), (ref_inv, ref_scale) = mine, theirs
    assert inv.shape == ref_inv.shape
    torch.testing.assert_close(inv, ref_inv, rtol=RTOL, atol=0.0)
    assert scale == pytest.approx(ref_scale, rel=RTOL)


def config_views(case):
    """The same published values as a raw v4 dict, a transformers object, and that object's v5 dict."""
    config = build_config(case)
    return {"raw v4 dict": copy.deepcopy(CASES[case][2]), "transformers object": config,
            "v5 to_dict": _quiet(config.to_dict)}


# ---- parity with transformers -------------------------------------------------------------------

@needs_hf5
@pytest.mark.parametrize("case", sorted(CASES))
def test_init_time_frequencies_match_transformers(case):
    config = build_config(case)
    reference = hf_reference(case, config)
    rope_type, rotary_dim, layout = CASES[case][4]
    for view, cfg in config_views(case).items():
        p = rope_parameters_from_hf_config(cfg)
        assert (p["rope_type"], p["rotary_dim"], p["layout"]) == (rope_type, rotary_dim, layout), view
        assert_parity(ours(cfg), reference)


@needs_hf5
@pytest.mark.parametrize("case", sorted(c for c in CASES if CASES[c][3]))
def test_length_dependent_frequencies_match_transformers(case):
    config = build_config(case)
    views = config_views(case)
    for seq_len in CASES[case][3]:
        reference = hf_reference(case, config, seq_len=seq_len)
        for cfg in views.values():
            assert_parity(ours(cfg, seq_len=seq_len), reference)


@needs_hf5
def test_every_transformers_rope_type_is_covered():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    covered = {CASES[c][4][0] for c in CASES}
    # proportional (Gemma 4) zero-pads inside the head: not a schedule of a rotary_dim-sized RoPE
    assert set(ROPE_INIT_FUNCTIONS) - {"proportional"} <= covered
    assert covered <= set(ROPE_TYPES) and "default" in covered


@needs_hf5
@pytest.mark.parametrize("case", sorted(CASES))
def test_rope_module_from_config_matches_transformers(case):
    schemes_rope = pytest.importorskip("posemb.schemes.rope", reason="posemb.schemes.rope (RoPE) not written yet")
    config = build_config(case)
    rope = from_hf_config(config)
    assert isinstance(rope, schemes_rope.RoPE)
    ref_inv, ref_scale = hf_reference(case, config)
    assert rope.inv_freq.dtype == torch.float32
    torch.testing.assert_close(rope.inv_freq.double(), ref_inv, rtol=RTOL, atol=0.0)
    assert rope.attention_scale == pytest.approx(ref_scale, rel=RTOL)
    assert rope.rotary_dim == CASES[case][4][1] and rope.layout == CASES[case][4][2]
    if hasattr(rope, "inv_freq_for"):  # length-dependent types through the module's own path
        for seq_len in CASES[case][3]:
            inv, scale = rope.inv_freq_for(seq_len)
            ref_inv, ref_scale = hf_reference(case, config, seq_len=seq_len)
            torch.testing.assert_close(inv.double(), ref_inv, rtol=RTOL, atol=0.0)
            assert scale == pytest.approx(ref_scale, rel=RTOL)


def test_deepseek_v3_softmax_mscale_is_available_from_the_parsed_config():
    from posemb.functional.rope_schedules import yarn_mscale
    p = rope_parameters_from_hf_config(CASES["deepseek-v3"][2])
    assert p["head_dim"] == 64  # qk_rope_head_dim, not hidden/heads = 56
    assert yarn_mscale(p["scaling"]["factor"], p["scaling"]["mscale_all_dim"]) ** 2 == pytest.approx(1.873854207)


@needs_hf5
def test_yarn_without_original_length_uses_max_position_embeddings_like_transformers():
    raw = dict(hidden_size=512, num_attention_heads=8, max_position_embeddings=8192, rope_theta=10000.0,
               rope_scaling=dict(rope_type="yarn", factor=4.0))
    config = _quiet(transformers.LlamaConfig, **copy.deepcopy(raw))
    p = rope_parameters_from_hf_config(raw)
    assert p["scaling"]["original_max_position_embeddings"] == 8192
    rotary = _quiet(transformers.models.llama.modeling_llama.LlamaRotaryEmbedding, config=config)
    assert_parity(ours(raw), (rotary.inv_freq.double(), rotary.attention_scaling))


@needs_hf5
def test_top_level_original_length_overrides_the_dict_like_transformers():
    raw = dict(hidden_size=512, num_attention_heads=8, max_position_embeddings=65536, rope_theta=500000.0,
               original_max_position_embeddings=4096,
               rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192))
    config = _quiet(transformers.LlamaConfig, **copy.deepcopy(raw))
    p = rope_parameters_from_hf_config(raw)
    assert p["scaling"]["original_max_position_embeddings"] == 4096
    rotary = _quiet(transformers.models.llama.modeling_llama.LlamaRotaryEmbedding, config=config)
    assert_parity(ours(raw), (rotary.inv_freq.double(), rotary.attention_scaling))
    assert_parity(ours(config), (rotary.inv_freq.double(), rotary.attention_scaling))


# ---- key spellings -------------------------------------------------------------------------------

def test_v5_rope_parameters_dict_with_theta_inside():
    cfg = {"head_dim": 64, "max_position_embeddings": 4096,
           "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0, "partial_rotary_factor": 0.5}}
    p = rope_parameters_from_hf_config(cfg)
    assert (p["rope_type"], p["base"], p["rotary_dim"], p["scaling"]) == ("linear", 500000.0, 32, {"factor": 2.0})


def test_missing_theta_defaults_to_10000_and_missing_type_to_default():
    p = rope_parameters_from_hf_config({"hidden_size": 256, "num_attention_heads": 4})
    assert (p["rope_type"], p["base"], p["head_dim"], p["rotary_dim"], p["max_position_embeddings"]) == (
        "default", 10000.0, 64, 64, None)


def test_su_is_longrope_and_phi3_yarn_is_longrope():
    raw = copy.deepcopy(CASES["phi-3-mini-128k"][2])
    reference = ours(raw, seq_len=8192)
    for legacy in ("su", "yarn"):
        raw["rope_scaling"]["type"] = legacy
        assert rope_parameters_from_hf_config(raw)["rope_type"] == "longrope"
        assert torch.equal(ours(raw, seq_len=8192)[0], reference[0])
    raw.pop("model_type")  # outside Phi-3, "yarn" means YaRN and the factor lists are foreign keys
    with pytest.raises(ValueError, match="short_factor"):
        rope_parameters_from_hf_config(raw)


def test_gpt_j_rotary_dim_and_interleaved_layout():
    p = rope_parameters_from_hf_config({"model_type": "gptj", "n_embd": 4096, "n_head": 16, "rotary_dim": 64,
                                        "n_positions": 2048})
    assert (p["head_dim"], p["rotary_dim"], p["layout"], p["max_position_embeddings"]) == (256, 64, "interleaved", 2048)
    for head_dim in range(2, 200, 2):  # the derived fraction always gives back the exact rotary_dim
        for rotary_dim in range(2, head_dim + 1, 2):
            q = rope_parameters_from_hf_config({"model_type": "gptj", "head_dim": head_dim, "rotary_dim": rotary_dim})
            assert q["rotary_dim"] == rotary_dim


def test_rotary_dim_is_ignored_where_transformers_ignores_it():
    """Only GPT-J / CodeGen's rotary reads ``rotary_dim``; a Llama config carrying one rotates the whole head."""
    config = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, rotary_dim=16)
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    for source in (config, config.to_dict()):
        p = rope_parameters_from_hf_config(source)
        assert p["rotary_dim"] == 2 * rotary.inv_freq.numel() == 64


def test_gpt_neox_defaults_to_a_quarter_rotary():
    p = rope_parameters_from_hf_config({"model_type": "gpt_neox", "hidden_size": 512, "num_attention_heads": 8})
    assert p["rotary_dim"] == 16 and p["partial_rotary_factor"] == 0.25


def test_per_layer_rope_parameters_need_a_layer_type():
    cfg = {"head_dim": 64, "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}, "nope": None}}
    with pytest.raises(ValueError, match="pass layer_type="):
        rope_parameters_from_hf_config(cfg)
    full = rope_parameters_from_hf_config(cfg, layer_type="full_attention")
    local = rope_parameters_from_hf_config(cfg, layer_type="sliding_attention")
    assert (full["rope_type"], full["base"], local["rope_type"], local["base"]) == ("linear", 1e6, "default", 1e4)
    with pytest.raises(ValueError, match="uses no RoPE"):
        rope_parameters_from_hf_config(cfg, layer_type="nope")
    with pytest.raises(ValueError, match="layer_type must be one of"):
        rope_parameters_from_hf_config(cfg, layer_type="global")
    with pytest.raises(ValueError, match="layer_types are"):
        rope_parameters_from_hf_config({"head_dim": 64}, layer_type="full_attention")


def test_strict_false_drops_unknown_keys_with_a_warning():
    cfg = {"head_dim": 96, "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
           "rope_scaling": {"type": "longrope", "short_factor": PHI3_SHORT, "long_factor": PHI3_LONG,
                            "short_mscale": 1.243, "long_mscale": 1.243}}  # Phi-3.5-MoE's vLLM-only keys
    with pytest.raises(ValueError, match=r"\['long_mscale', 'short_mscale'\].*strict=False"):
        rope_parameters_from_hf_config(cfg)
    with pytest.warns(UserWarning, match="dropping rope key"):
        p = rope_parameters_from_hf_config(cfg, strict=False)
    assert "short_mscale" not in p["scaling"] and p["rope_type"] == "longrope"


# ---- errors --------------------------------------------------------------------------------------

BASE = {"head_dim": 64, "max_position_embeddings": 8192}


def with_rope(rope_scaling, **top):
    return {**BASE, **top, "rope_scaling": rope_scaling}


@pytest.mark.parametrize("config, error, match", [
    (with_rope({"type": "linear"}), ValueError, r"missing required key\(s\) \['factor'\]"),
    (with_rope({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}), ValueError, r"\['high_freq_factor'\]"),
    (with_rope({"type": "dynamic", "factor": 0.5}), ValueError, "factor must be >= 1"),
    (with_rope({"type": "yarn", "factor": 0.9, "original_max_position_embeddings": 4096}), ValueError, "factor must be >= 1"),
    (with_rope({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                "original_max_position_embeddings": 2048}), ValueError, "low_freq_factor must be <= high_freq_factor"),
    (with_rope({"type": "longrope", "short_factor": [1.0] * 31, "long_factor": [1.0] * 32,
                "original_max_position_embeddings": 4096}), ValueError, "short_factor must have length rotary_dim/2 = 32, got 31"),
    (with_rope({"type": "longrope", "short_factor": [1.0] * 32, "long_factor": [1.0] * 48,
                "original_max_position_embeddings": 4096}), ValueError, "long_factor must have length rotary_dim/2 = 32, got 48"),
    (with_rope({"rope_type": "mystery", "factor": 2.0}), ValueError,
     r"'mystery' is not supported; known rope types: \['default', 'linear', 'ntk', 'dynamic', 'yarn', 'longrope', 'llama3', "
     r"'proportional'\]"),
    (with_rope({"type": "mrope", "mrope_section": [16, 24, 24]}), ValueError, "mrope_section: refused, M-RoPE"),
    (with_rope({"rope_type": "default", "mrope_section": [16, 24, 24]}), ValueError, "mrope_section: refused, M-RoPE"),
    (with_rope({"rope_type": "axial"}), ValueError, "'axial' is refused: 2-D vision RoPE"),
    (with_rope(None, model_type="nanochat"), ValueError, "rotates by -θ"),
    (with_rope({"rope_type": "yarn", "type": "linear", "factor": 2.0}), ValueError, "'type'='linear' conflicts with 'rope_type'='yarn'"),
    (with_rope(None, rope_theta=0.0), ValueError, "rope_theta must be > 1"),
    (with_rope(None, rope_theta=-10000.0), ValueError, "rope_theta must be > 1"),
    (with_rope({"rope_type": "default", "rope_theta": 0}), ValueError, "rope_theta must be > 1"),
    (with_rope(None, partial_rotary_factor=0.0), ValueError, r"partial_rotary_factor must be in \(0, 1\]"),
    (with_rope(None, partial_rotary_factor=1.5), ValueError, r"partial_rotary_factor must be in \(0, 1\]"),
    (with_rope({"rope_type": "default", "partial_rotary_factor": -0.25}), ValueError, r"must be in \(0, 1\]"),
    (with_rope(None, partial_rotary_factor=0.3), ValueError, r"int\(64 \* 0.3\) = 19 must be even"),
    ({"head_dim": 63}, ValueError, "= 63 must be even"),
    ({"hidden_size": 100, "num_attention_heads": 4}, ValueError, "= 25 must be even"),
    ({"max_position_embeddings": 4096}, ValueError, "needs head_dim, or hidden_size and num_attention_heads"),
    (with_rope({"type": "linear", "factor": 2.0, "rope_theta": 1e4}, rope_theta=5e5), ValueError,
     "rope_theta is 10000.0 inside the rope dict but 500000.0 at the top level"),
    (with_rope({"type": "default", "partial_rotary_factor": 0.5}, partial_rotary_factor=0.25), ValueError,
     "partial_rotary_factor is 0.5 inside the rope dict but 0.25 at the top level"),
    ({**BASE, "rope_parameters": {"rope_type": "linear", "factor": 2.0}, "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
     ValueError, "both rope_parameters"),
    (with_rope({"type": "linear", "factor": 2.0, "original_max_position_embeddings": 4096}), ValueError,
     r"\['original_max_position_embeddings'\] are not used by rope_type='linear'"),
    ({"head_dim": 64, "rope_scaling": {"type": "yarn", "factor": 4.0}}, ValueError,
     r"missing required key\(s\) \['original_max_position_embeddings'\]"),
    ({"head_dim": 64, "rope_scaling": {"type": "dynamic", "factor": 4.0}}, ValueError, "dynamic needs max_position_embeddings"),
    (with_rope("linear"), TypeError, "rope_scaling must be a dict"),
    (with_rope({"rope_type": 3}), TypeError, "rope_type must be a string"),
    (with_rope(None, max_position_embeddings=0), ValueError, "max_position_embeddings must be >= 1"),
    (42, TypeError, "config must be a transformers PretrainedConfig or a dict"),
])
def test_bad_configs_raise_naming_the_key(config, error, match):
    with pytest.raises(error, match=match):
        rope_parameters_from_hf_config(config)


def test_bad_transformers_object_raises_too():
    config = _quiet(transformers.LlamaConfig, hidden_size=512, num_attention_heads=8, rope_theta=1e4,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                                  "original_max_position_embeddings": 1024})  # transformers only warns
    with pytest.raises(ValueError, match="low_freq_factor must be <= high_freq_factor"):
        rope_parameters_from_hf_config(config)


# ---- round trip ----------------------------------------------------------------------------------

@needs_hf5
@pytest.mark.parametrize("case", sorted(CASES))
def test_to_hf_config_round_trips(case):
    pytest.importorskip("posemb.schemes.rope", reason="posemb.schemes.rope (RoPE) not written yet")
    rope = from_hf_config(build_config(case))
    fragment = to_hf_config(rope)
    assert "rope_theta" in fragment["rope_parameters"] and "rope_scaling" not in fragment
    again = from_hf_config(fragment)
    assert torch.equal(again.inv_freq, rope.inv_freq) and again.attention_scale == rope.attention_scale
    assert (again.rotary_dim, again.layout, again.rope_type, again.head_dim) == (
        rope.rotary_dim, rope.layout, rope.rope_type, rope.head_dim)
    assert to_hf_config(again) == fragment
    # and the fragment is a valid transformers v5 config: transformers computes the same frequencies
    if rope.rotary_dim == rope.head_dim:  # Llama's default path ignores partial_rotary_factor
        heads = 4
        config = _quiet(transformers.LlamaConfig, hidden_size=heads * rope.head_dim, num_attention_heads=heads,
                        **copy.deepcopy(fragment))
        rotary = _quiet(transformers.models.llama.modeling_llama.LlamaRotaryEmbedding, config=config)
        torch.testing.assert_close(rope.inv_freq.double(), rotary.inv_freq.double(), rtol=RTOL, atol=0.0)
        assert rope.attention_scale == pytest.approx(rotary.attention_scaling, rel=RTOL)


def test_ntk_round_trips_although_transformers_does_not_know_it():
    pytest.importorskip("posemb.schemes.rope", reason="posemb.schemes.rope (RoPE) not written yet")
    from posemb.schemes.rope import RoPE
    rope = RoPE(head_dim=64, base=10000.0, rope_type="ntk", scaling={"factor": 4.0}, layout="interleaved",
                partial_rotary_factor=0.5, max_position_embeddings=4096)
    fragment = to_hf_config(rope)
    assert fragment == {"rope_parameters": {"rope_type": "ntk", "rope_theta": 10000.0, "factor": 4.0}, "head_dim": 64,
                        "max_position_embeddings": 4096, "partial_rotary_factor": 0.5, "rope_interleave": True}
    again = from_hf_config(fragment)
    assert torch.equal(again.inv_freq, rope.inv_freq) and again.layout == "interleaved" and again.rotary_dim == 32


def test_from_hf_config_overrides_and_lazy_reexport():
    pytest.importorskip("posemb.schemes.rope", reason="posemb.schemes.rope (RoPE) not written yet")
    import posemb.rotary
    from posemb.schemes.rope import RoPE
    assert posemb.rotary.RoPE is RoPE
    rope = from_hf_config(CASES["deepseek-v3"][2], layout="half")
    assert rope.layout == "half"
    with pytest.raises(TypeError, match="to_hf_config needs a RoPE module"):
        to_hf_config(object())


# ---- per-layer rotaries, NoPE layers, architecture knowledge --------------------------------------
def _layers(config):
    return [None if rope is None else (rope.base, rope.head_dim, rope.rotary_dim, rope.rope_type, rope.layout)
            for rope in layer_rotaries(config)]


def test_layer_rotaries_nope_layers_follow_the_model_code():
    """Each model's DecoderLayer/Attention decides which layers rotate; layer_rotaries gives None for the rest."""
    smollm3 = transformers.SmolLM3Config(num_hidden_layers=8)
    assert [r is None for r in layer_rotaries(smollm3)] == [not flag for flag in smollm3.no_rope_layers]
    assert [r is None for r in layer_rotaries(smollm3)] == [False, False, False, True] * 2
    llama4 = transformers.Llama4TextConfig(num_hidden_layers=8)
    rotaries = layer_rotaries(llama4)
    assert [r is None for r in rotaries] == [not flag for flag in llama4.no_rope_layers]
    assert all(r.layout == "interleaved" for r in rotaries if r is not None)
    assert attention_temperature_tuning(llama4) == {"floor_scale": 8192.0, "attn_scale": 0.1}
    assert attention_temperature_tuning(transformers.LlamaConfig()) is None
    cohere2 = transformers.Cohere2Config(num_hidden_layers=8)  # only sliding layers rotate
    assert [r is None for r in layer_rotaries(cohere2)] == [t != "sliding_attention" for t in cohere2.layer_types]
    exaone = transformers.Exaone4Config(num_hidden_layers=8)
    assert [r is None for r in layer_rotaries(exaone)] == [t != "sliding_attention" for t in exaone.layer_types]
    windowless = transformers.Exaone4Config(num_hidden_layers=4)
    windowless.sliding_window = None  # Exaone4Attention then rotates every layer
    assert all(r is not None for r in layer_rotaries(windowless))


def test_layer_rotaries_local_global_bases_and_head_sizes():
    gemma3 = transformers.Gemma3TextConfig(num_hidden_layers=6)
    layers = _layers(gemma3)
    for layer_type, layer in zip(gemma3.layer_types, layers):
        assert layer[0] == (1e4 if layer_type == "sliding_attention" else 1e6)
    # Gemma 4: sliding layers default RoPE on head_dim 256, full layers p-RoPE on global_head_dim 512
    gemma4 = transformers.Gemma4TextConfig(num_hidden_layers=6)
    for layer_type, rope in zip(gemma4.layer_types, layer_rotaries(gemma4)):
        if layer_type == "full_attention":
            assert (rope.head_dim, rope.rope_type, int((rope.inv_freq64 > 0).sum())) == (512, "proportional", 64)
        else:
            assert (rope.head_dim, rope.rope_type) == (256, "default")
    rotaries = layer_rotaries(gemma4)
    sliding = [r for t, r in zip(gemma4.layer_types, rotaries) if t == "sliding_attention"]
    assert all(r is sliding[0] for r in sliding)
    # the old flat Gemma 3 config.json spelling gives the same bases as the config object
    raw = {"model_type": "gemma3_text", "num_hidden_layers": 6, "head_dim": 256, "rope_theta": 1e6,
           "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
           "layer_types": gemma3.layer_types, "max_position_embeddings": 131072}
    old = transformers.Gemma3TextConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    assert _layers(raw) == _layers(old)
    assert {layer[3] for layer, t in zip(_layers(raw), raw["layer_types"]) if t == "full_attention"} == {"linear"}
    modernbert = {"model_type": "modernbert", "num_hidden_layers": 3, "hidden_size": 768, "num_attention_heads": 12,
                  "global_rope_theta": 160000.0, "local_rope_theta": 10000.0,
                  "layer_types": ["full_attention", "sliding_attention", "sliding_attention"]}
    assert [layer[0] for layer in _layers(modernbert)] == [160000.0, 10000.0, 10000.0]
    assert _layers(modernbert) == _layers(transformers.ModernBertConfig(
        **{k: v for k, v in modernbert.items() if k != "model_type"}))


def test_layouts_come_from_the_architecture_table():
    """Cohere / GLM pair adjacent channels although their configs are silent; the table says so."""
    assert from_hf_config(transformers.CohereConfig()).layout == "interleaved"
    assert from_hf_config(transformers.Glm4Config()).layout == "interleaved"
    assert from_hf_config({"model_type": "glm4", "hidden_size": 4096, "num_attention_heads": 32,
                           "kv_channels": 128, "partial_rotary_factor": 0.5}).rotary_dim == 64
    assert from_hf_config(transformers.LlamaConfig()).layout == "half"
    v3 = transformers.DeepseekV3Config(rope_interleave=False)
    assert from_hf_config(v3).layout == "half" and from_hf_config(transformers.DeepseekV3Config()).layout == "interleaved"
    with pytest.warns(UserWarning, match="assuming the half-split"):
        assert from_hf_config({"head_dim": 64}).layout == "half"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert from_hf_config({"head_dim": 64}, layout="interleaved").layout == "interleaved"
        assert from_hf_config({"head_dim": 64, "rope_interleave": True}).layout == "interleaved"
    with pytest.raises(TypeError, match="rope_interleave must be a bool"):
        from_hf_config({"head_dim": 64, "rope_interleave": "yes"})


@pytest.mark.parametrize("strict", ["false", None, 0])
def test_strict_must_be_a_bool(strict):
    with pytest.raises(TypeError, match="strict must be a bool"):
        rope_parameters_from_hf_config({"head_dim": 64}, strict=strict)


def test_proportional_round_trips_through_to_hf_config():
    rope = from_hf_config({"model_type": "llama", "head_dim": 512, "rope_parameters": {
        "rope_type": "proportional", "rope_theta": 1e6, "partial_rotary_factor": 0.25}})
    again = from_hf_config({"model_type": "llama", **to_hf_config(rope)})
    assert torch.equal(again.inv_freq64, rope.inv_freq64) and int((rope.inv_freq64 > 0).sum()) == 64


def test_mrope_configs_give_an_mrope_with_the_models_section_and_pairing():
    """Qwen2-VL: contiguous sections, the config's mrope_section, else the model's default; Qwen3-VL:
    interleaved whatever the config says (its code never reads mrope_interleaved). Other configs
    with an mrope_section stay refused."""
    from posemb.schemes.mrope import MRoPE

    qwen2 = {"model_type": "qwen2_vl_text", "hidden_size": 512, "num_attention_heads": 8, "rope_parameters": {
        "rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}}
    rope = from_hf_config(qwen2)
    assert isinstance(rope, MRoPE) and rope.mrope_section == (8, 12, 12) and not rope.mrope_interleaved
    del qwen2["rope_parameters"]["mrope_section"]
    with pytest.raises(ValueError, match="mrope_section must sum to rotary_dim / 2 = 32"):
        from_hf_config(qwen2)  # the model's default [16, 24, 24] needs head_dim 128
    qwen3 = {"model_type": "qwen3_vl_text", "head_dim": 128, "rope_parameters": {
        "rope_type": "default", "rope_theta": 5e5, "mrope_interleaved": False}}
    rope = from_hf_config(qwen3)
    assert isinstance(rope, MRoPE) and rope.mrope_section == (24, 20, 20) and rope.mrope_interleaved
    # text positions (t = h = w): the same rotation as the 1-D RoPE
    q, k = torch.randn(2, 1, 5, 128, dtype=torch.float64), torch.randn(2, 1, 5, 128, dtype=torch.float64)
    positions = torch.arange(5)[None].expand(2, 5)
    one_d = from_hf_config({"model_type": "qwen3", "head_dim": 128, "rope_theta": 5e5})
    assert not isinstance(one_d, MRoPE)
    ours = rope.rotate(q, k, positions.expand(3, -1, -1), positions.expand(3, -1, -1))
    for a, b in zip(ours, one_d.rotate(q, k, positions, positions)):
        assert torch.allclose(a, b, atol=1e-12)
    with pytest.raises(ValueError, match="mrope_interleaved"):  # an M-RoPE key on a 1-D model is not dropped
        from_hf_config({**qwen3, "model_type": "qwen3"})
    with pytest.raises(ValueError, match="mrope_section: refused"):
        from_hf_config({**qwen2, "model_type": "llama", "rope_parameters": {"rope_theta": 1e6,
                                                                             "mrope_section": [8, 12, 12]}})


def test_default_rope_of_gemma4_and_lfm3_ignores_partial_rotary_factor_like_their_own_init():
    """Gemma 4 / LFM3 build rope_type "default" with their own compute_default_rope_parameters (dim = head_dim);
    their other types, and every other model's default, read partial_rotary_factor (checked against the
    models by tests/test_hf_zoo.py's rope_type variants)."""
    def rotary_dim(model_type, rope_type, **extra):
        config = {"model_type": model_type, "head_dim": 64, "max_position_embeddings": 256,
                  "rope_parameters": {"rope_type": rope_type, "rope_theta": 1e4, "partial_rotary_factor": 0.5,
                                      **extra}}
        return rope_parameters_from_hf_config(config)["rotary_dim"]

    assert rotary_dim("lfm3", "default") == 64
    assert rotary_dim("gemma4_text", "default") == 64
    assert rotary_dim("lfm3", "linear", factor=2.0) == 32
    assert rotary_dim("llama", "default") == 32
