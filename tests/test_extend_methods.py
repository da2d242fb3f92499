"""posemb extend's methods: each is a rope_parameters dict that transformers turns into exactly the
frequencies posemb's schedules compute, and its per-pair stretch factors obey the closed forms."""
import math

import pytest
import torch

from posemb.functional.rope_schedules import default_inv_freq
from posemb.lab.extend import methods as M

GEOMETRY = M.RopeGeometry(base=10000.0, rotary_dim=16, trained_length=32)
TARGET = 128


def _hf_inv_freq(setting: M.MethodSetting, seq_len: int) -> torch.Tensor:
    """inv_freq of transformers' own Llama rotary built from the setting, after a forward at seq_len."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=setting.max_position_embeddings,
                                      rope_parameters=dict(setting.rope_parameters))
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    rotary(torch.zeros(1, seq_len, 16), torch.arange(seq_len)[None])
    return rotary.inv_freq.double(), rotary.attention_scaling


@pytest.mark.parametrize("method", [m for m in M.METHODS if m != "longrope"] + ["longrope"])
def test_transformers_builds_the_frequencies_posemb_computes(method):
    factors = M.seed_factor_vectors(GEOMETRY, TARGET)["yarn"] if method == "longrope" else None
    setting = M.method_setting(method, GEOMETRY, TARGET, long_factor=factors)
    hf, scale = _hf_inv_freq(setting, TARGET)
    ours = default_inv_freq(16, 10000.0) / M.stretch_factors(setting, GEOMETRY)
    torch.testing.assert_close(hf, ours, rtol=1e-6, atol=0)
    assert scale == pytest.approx(M.attention_scale(setting, GEOMETRY), rel=1e-12)


@pytest.mark.parametrize("method", ["linear", "ntk", "dynamic", "yarn", "llama3"])
def test_posemb_rotary_reads_the_same_config(method):
    """The config posemb writes is read back by posemb.rotary.from_hf_config with the same frequencies."""
    from posemb.rotary import from_hf_config

    setting = M.method_setting(method, GEOMETRY, TARGET)
    rope = from_hf_config({"model_type": "llama", "hidden_size": 32, "num_attention_heads": 2,
                           "max_position_embeddings": setting.max_position_embeddings,
                           "rope_parameters": dict(setting.rope_parameters)})
    hf, _ = _hf_inv_freq(setting, TARGET)
    positions = torch.arange(TARGET)[None]
    cos, _ = rope.cos_sin(positions)
    # cos of the last position, whichever schedule (dynamic's base depends on the length)
    expected = torch.cos((TARGET - 1) * hf) * M.attention_scale(setting, GEOMETRY)
    torch.testing.assert_close(cos[0, -1].double(), expected, atol=2e-6, rtol=0)


def test_stretch_factors_closed_forms():
    s = TARGET / GEOMETRY.trained_length
    j = torch.arange(8, dtype=torch.float64)
    linear = M.stretch_factors(M.method_setting("linear", GEOMETRY, TARGET), GEOMETRY)
    torch.testing.assert_close(linear, torch.full((8,), s, dtype=torch.float64))
    ntk = M.stretch_factors(M.method_setting("ntk", GEOMETRY, TARGET), GEOMETRY)
    torch.testing.assert_close(ntk, s ** (2 * j / (16 - 2)))  # s^(2j/(d-2)): 1 at j=0, s at j=d/2-1
    none = M.stretch_factors(M.method_setting("none", GEOMETRY, TARGET), GEOMETRY)
    torch.testing.assert_close(none, torch.ones(8, dtype=torch.float64))
    # dynamic at the target length: base * (s*N/L - (s-1))^(d/(d-2)) = base * (s^2 - s + 1)^(d/(d-2))
    # (transformers' formula with L = N, M = L_train): the slowest pair is stretched s^2 - s + 1 > s
    dynamic = M.stretch_factors(M.method_setting("dynamic", GEOMETRY, TARGET), GEOMETRY)
    torch.testing.assert_close(dynamic, (s * s - s + 1) ** (2 * j / (16 - 2)))
    inside = M.stretch_factors(M.method_setting("dynamic", GEOMETRY, TARGET), GEOMETRY, seq_len=32)
    torch.testing.assert_close(inside, torch.ones(8, dtype=torch.float64))


def test_seed_vectors_are_valid_long_factors():
    seeds = M.seed_factor_vectors(GEOMETRY, TARGET)
    assert set(seeds) == {"linear", "ntk", "yarn"}
    for name, factors in seeds.items():
        assert M.check_factors(factors, 8) == factors
        assert factors[0] >= 1 and factors[-1] == pytest.approx(4.0)
    yarn = seeds["yarn"]
    assert yarn[0] == 1.0  # the fastest pairs are kept (extrapolated)


def test_settings_record_the_lengths():
    yarn = M.method_setting("yarn", GEOMETRY, TARGET)
    assert yarn.rope_parameters["original_max_position_embeddings"] == 32
    assert yarn.max_position_embeddings == TARGET and yarn.factor == 4.0
    assert M.method_setting("dynamic", GEOMETRY, TARGET).max_position_embeddings == 32
    ntk = M.method_setting("ntk", GEOMETRY, TARGET).rope_parameters
    assert ntk["rope_type"] == "default" and ntk["rope_theta"] == pytest.approx(10000 * 4 ** (16 / 14))
    carried = M.RopeGeometry(10000.0, 8, 32, {"partial_rotary_factor": 0.5})
    assert M.method_setting("linear", carried, 64).rope_parameters["partial_rotary_factor"] == 0.5


@pytest.mark.parametrize("factors, message", [
    ([1.0] * 7, "8 entries"),
    ([0.5] + [1.0] * 7, ">= 1"),
    ([1.0, 2.0, 1.5] + [2.0] * 5, "non-decreasing"),
    ([1.0] * 7 + [math.nan], "finite"),
    ("1,2", "list"),
])
def test_bad_factors_are_refused(factors, message):
    with pytest.raises((ValueError, TypeError), match=message):
        M.check_factors(factors, 8)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="target_length must be >= 33"):
        M.method_setting("linear", GEOMETRY, 32)
    with pytest.raises(ValueError, match="method must be one of"):
        M.method_setting("rerope", GEOMETRY, TARGET)
    with pytest.raises(ValueError, match="long_factor"):
        M.method_setting("longrope", GEOMETRY, TARGET)
