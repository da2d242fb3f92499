"""RoPE frequency schedules: the reference vectors of ``shared/reference/rope_scaling.md`` (§5, V1-V7),
independent scalar float64 re-implementations of each formula (plain ``math``, one pair at a time),
structural properties, static NTK against rotary-embedding-torch, and every validation error.

Parity with transformers on real model configs lives in ``tests/test_hf_config.py``.
"""
import math

import pytest
import torch

from posemb.functional.rope_schedules import (ROPE_TYPES, compute_inv_freq, default_inv_freq, dynamic_ntk_base,
                                              llama3_bands, ntk_base, validate_rope_params, wavelengths,
                                              yarn_correction_range, yarn_mscale)

LLAMA31 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


def close(actual, expected, rel):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual, expected, rtol=rel, atol=0.0)


# ---- naive scalar references (written from the formulas, not from the module) -------------------

def naive_default(d, base):
    return [base ** (-2 * j / d) for j in range(d // 2)]


def naive_llama3(d, base, factor, low, high, orig):
    out = []
    for freq in naive_default(d, base):
        wavelength = 2 * math.pi / freq
        if wavelength < orig / high:
            out.append(freq)
        elif wavelength > orig / low:
            out.append(freq / factor)
        else:
            smooth = (orig / wavelength - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return out


def naive_yarn(d, base, factor, orig, beta_fast=32.0, beta_slow=1.0, truncate=True):
    def dim_for(rotations):  # YaRN Def. 2 solved for the index: L / λ_j = rotations
        return d * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_for(beta_fast), dim_for(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    out = []
    for j, freq in enumerate(naive_default(d, base)):
        gamma = min(max((j - low) / (high - low), 0.0), 1.0)  # 1: interpolate
        out.append(gamma * freq / factor + (1 - gamma) * freq)
    return out


# ---- reference vectors (rope_scaling.md §5) ------------------------------------------------------

def test_v1_default_llama3_base():
    inv, scale = compute_inv_freq("default", 128, 500000.0)
    assert inv.dtype == torch.float64 and inv.shape == (64,) and scale == 1.0
    close(inv[0:4], [1.0, 0.814617234, 0.663601238, 0.540581005], 1e-8)
    close(inv[60:64], [4.541670481e-6, 3.699723044e-6, 3.013858152e-6, 2.455140791e-6], 1e-9)


def test_v2_llama31_bands_and_values():
    inv, scale = compute_inv_freq("llama3", 128, 500000.0, LLAMA31)
    base = default_inv_freq(128, 500000.0)
    assert scale == 1.0
    assert torch.equal(inv[:29], base[:29])                      # wavelength < 2048: kept
    close(inv[35:], base[35:] / 8, 1e-15)                          # wavelength > 8192: / 8
    close(inv[[29, 31, 34]], [2.166571e-3, 8.567514e-4, 1.785078e-4], 1e-6)
    close(wavelengths(base)[[29, 31, 34]], [2401.7, 3619.2, 6695.1], 2e-5)
    close(inv[60:64], [5.677088e-7, 4.624654e-7, 3.767323e-7, 3.068926e-7], 1e-6)
    bands = llama3_bands(base, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    assert bands.high.nonzero().flatten().tolist() == list(range(0, 29))
    assert bands.medium.nonzero().flatten().tolist() == list(range(29, 35))
    assert bands.low.nonzero().flatten().tolist() == list(range(35, 64))
    # Llama 3.2 1B/3B: d = 64, factor 32 -> the smoothed pairs are 15..17
    small = llama3_bands(default_inv_freq(64, 500000.0), low_freq_factor=1.0, high_freq_factor=4.0,
                         original_max_position_embeddings=8192)
    assert small.medium.nonzero().flatten().tolist() == [15, 16, 17]


def test_v3_qwen_yarn():
    assert yarn_correction_range(128, 1e6, 32768) == (23, 40)
    low, high = yarn_correction_range(128, 1e6, 32768, truncate=False)
    close([low, high], [23.595948, 39.650881], 1e-7)
    inv, scale = compute_inv_freq("yarn", 128, 1e6, dict(factor=4.0, original_max_position_embeddings=32768))
    assert scale == pytest.approx(1.138629436, rel=1e-9)
    ratio = default_inv_freq(128, 1e6) / inv  # 1 where extrapolated, factor where interpolated
    close(ratio[:24], torch.ones(24), 1e-14)
    close(ratio[[24, 31]], [1.046154, 1.545455], 1e-6)
    close(ratio[40:], torch.full((24,), 4.0), 1e-14)
    close(inv[60:64], [5.928434e-7, 4.777382e-7, 3.849816e-7, 3.102344e-7], 1e-6)


def test_v4_deepseek_v3_yarn_mscale():
    params = dict(factor=40.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0,
                  beta_fast=32, beta_slow=1)
    assert yarn_correction_range(64, 1e4, 4096) == (10, 23)
    close(yarn_correction_range(64, 1e4, 4096, truncate=False), [10.472241, 22.513441], 1e-7)
    _, scale = compute_inv_freq("yarn", 64, 1e4, params)
    assert scale == 1.0  # mscale/mscale_all_dim cancel; DeepSeek scales the softmax instead:
    assert yarn_mscale(40.0, 1.0) ** 2 == pytest.approx(1.873854207, rel=1e-9)
    _, plain = compute_inv_freq("yarn", 64, 1e4, dict(factor=40.0, original_max_position_embeddings=4096))
    assert plain == pytest.approx(1.368887945, rel=1e-9)


@pytest.mark.parametrize("length, theta, last", [(4096, 10000.0, 1.154782e-4), (8192, 30527.7367, 3.849273e-5),
                                                 (16384, 72195.8601, 1.649689e-5)])
def test_v5_dynamic_ntk(length, theta, last):
    assert dynamic_ntk_base(1e4, 2.0, 128, length, 4096) == pytest.approx(theta, rel=1e-8)  # 9 printed digits
    inv, scale = compute_inv_freq("dynamic", 128, 1e4, {"factor": 2.0}, seq_len=length, max_position_embeddings=4096)
    assert scale == 1.0
    assert inv[63].item() == pytest.approx(last, rel=1e-6)


def test_v6_longrope_default_attention_factor():
    flat = dict(short_factor=[1.0] * 48, long_factor=[2.0] * 48, original_max_position_embeddings=4096)
    _, scale = compute_inv_freq("longrope", 96, 1e4, flat, max_position_embeddings=131072)
    assert scale == pytest.approx(1.190238071, rel=1e-9)
    _, scale = compute_inv_freq("longrope", 96, 1e4, dict(flat, factor=4.0), max_position_embeddings=131072)
    assert scale == pytest.approx(1.080123450, rel=1e-9)  # an explicit factor wins over max/orig
    _, scale = compute_inv_freq("longrope", 96, 1e4, flat, max_position_embeddings=4096)
    assert scale == 1.0  # no extension, no scaling
    _, scale = compute_inv_freq("longrope", 96, 1e4, dict(flat, attention_factor=1.25), max_position_embeddings=131072)
    assert scale == 1.25


def test_v7_gpt_oss_yarn_without_truncation():
    params = dict(factor=32.0, original_max_position_embeddings=4096, truncate=False)
    close(yarn_correction_range(64, 150000.0, 4096, truncate=False), [8.0927791, 17.3980245], 1e-7)
    assert yarn_correction_range(64, 150000.0, 4096) == (8, 18)
    inv, scale = compute_inv_freq("yarn", 64, 150000.0, params)
    assert inv[9].item() == pytest.approx(0.031705696, rel=1e-7)
    assert scale == pytest.approx(1.346573590, rel=1e-9)
    truncated, _ = compute_inv_freq("yarn", 64, 150000.0, dict(params, truncate=True))
    assert truncated[9].item() == pytest.approx(0.031620752, rel=1e-7)


def test_llama4_scout_equal_low_and_high_has_no_medium_band():
    params = dict(factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0, original_max_position_embeddings=8192)
    inv, _ = compute_inv_freq("llama3", 128, 500000.0, params)
    base = default_inv_freq(128, 500000.0)
    assert torch.isfinite(inv).all()
    bands = llama3_bands(base, low_freq_factor=1.0, high_freq_factor=1.0, original_max_position_embeddings=8192)
    assert (int(bands.high.sum()), int(bands.medium.sum()), int(bands.low.sum())) == (35, 0, 29)
    assert torch.equal(inv[:35], base[:35])
    close(inv[35:], base[35:] / 16, 1e-15)


def test_llama3_wavelength_exactly_on_the_cut_with_equal_factors_is_finite():
    # Pair 0 has inv_freq 1, wavelength exactly 2π. Pick orig and low == high so that orig/low == 2π
    # exactly: the pair is then neither "high" nor "low", and HF's smoothing would divide 0 by 0.
    orig = next(n for n in range(1, 1000) if n / (n / (2 * math.pi)) == 2 * math.pi)
    cut = orig / (2 * math.pi)
    params = dict(factor=4.0, low_freq_factor=cut, high_freq_factor=cut, original_max_position_embeddings=orig)
    bands = llama3_bands(default_inv_freq(8, 10000.0), low_freq_factor=cut, high_freq_factor=cut,
                         original_max_position_embeddings=orig)
    assert bands.medium.tolist() == [True, False, False, False]
    inv, _ = compute_inv_freq("llama3", 8, 10000.0, params)
    assert torch.isfinite(inv).all()
    assert inv[0].item() == 0.25  # vLLM's guard: smooth = 0, so the pair is divided by the factor


# ---- independent naive implementations -------------------------------------------------------

@pytest.mark.parametrize("d, base", [(128, 500000.0), (64, 10000.0), (96, 1e6), (16, 10000.0)])
def test_default_and_linear_match_the_paper_formula(d, base):
    close(compute_inv_freq("default", d, base)[0], naive_default(d, base), 1e-14)
    close(compute_inv_freq("linear", d, base, {"factor": 4})[0], [f / 4 for f in naive_default(d, base)], 1e-14)


@pytest.mark.parametrize("d, factor, low, high, orig", [(128, 8.0, 1.0, 4.0, 8192), (64, 32.0, 1.0, 4.0, 8192),
                                                         (128, 16.0, 2.0, 8.0, 4096), (32, 4.0, 1.0, 2.0, 512)])
def test_llama3_matches_a_scalar_implementation(d, factor, low, high, orig):
    params = dict(factor=factor, low_freq_factor=low, high_freq_factor=high, original_max_position_embeddings=orig)
    close(compute_inv_freq("llama3", d, 500000.0, params)[0], naive_llama3(d, 500000.0, factor, low, high, orig), 1e-13)


@pytest.mark.parametrize("d, base, factor, orig, fast, slow, truncate", [
    (128, 1e6, 4.0, 32768, 32, 1, True), (64, 1e4, 40.0, 4096, 32, 1, True), (64, 150000.0, 32.0, 4096, 32, 1, False),
    (128, 1e4, 16.0, 4096, 16, 2, True), (32, 500.0, 2.0, 64, 8, 8, True),  # low == high
    (32, 100.0, 8.0, 65536, 32, 1, True),    # high clipped to d - 1
    (32, 1e4, 4.0, 128, 32, 1, False),       # low clipped to 0
    (32, 10.0, 4.0, 1024, 32, 1, True),      # high clipped to d - 1 (a pair index past d/2 - 1) changes the slope
])
def test_yarn_matches_a_scalar_implementation(d, base, factor, orig, fast, slow, truncate):
    params = dict(factor=factor, original_max_position_embeddings=orig, beta_fast=fast, beta_slow=slow,
                  truncate=truncate)
    inv, scale = compute_inv_freq("yarn", d, base, params)
    close(inv, naive_yarn(d, base, factor, orig, fast, slow, truncate), 1e-13)
    assert scale == pytest.approx(0.1 * math.log(factor) + 1, rel=1e-14)


def test_yarn_attention_factor_variants():
    base_params = dict(factor=16.0, original_max_position_embeddings=4096)
    assert compute_inv_freq("yarn", 64, 1e4, dict(base_params, attention_factor=0.9))[1] == 0.9
    # DeepSeek-V2 style: mscale 0.707 / mscale_all_dim 0.707 -> 1; differing values -> the ratio
    expected = (0.1 * 0.5 * math.log(16) + 1) / (0.1 * 2.0 * math.log(16) + 1)
    assert compute_inv_freq("yarn", 64, 1e4, dict(base_params, mscale=0.5, mscale_all_dim=2.0))[1] == pytest.approx(expected)
    # HF tests truthiness: mscale alone (or mscale_all_dim = 0) falls back to 0.1 ln s + 1
    plain = 0.1 * math.log(16) + 1
    assert compute_inv_freq("yarn", 64, 1e4, dict(base_params, mscale=0.707))[1] == pytest.approx(plain)
    assert compute_inv_freq("yarn", 64, 1e4, dict(base_params, mscale=0.5, mscale_all_dim=0.0))[1] == pytest.approx(plain)


def test_yarn_factor_defaults_to_max_over_original():
    explicit, _ = compute_inv_freq("yarn", 64, 1e4, dict(factor=8.0, original_max_position_embeddings=4096))
    implied, scale = compute_inv_freq("yarn", 64, 1e4, dict(original_max_position_embeddings=4096),
                                      max_position_embeddings=32768)
    assert torch.equal(explicit, implied) and scale == pytest.approx(0.1 * math.log(8) + 1)


def test_longrope_switches_to_long_factors_only_beyond_the_original_length():
    short = [1.0 + 0.01 * j for j in range(32)]
    long = [1.0 + 2.0 * j for j in range(32)]
    params = dict(short_factor=short, long_factor=long, original_max_position_embeddings=4096)
    base = naive_default(64, 1e4)
    for seq_len, factors in [(None, short), (1, short), (4096, short), (4097, long), (131072, long)]:
        inv, _ = compute_inv_freq("longrope", 64, 1e4, params, seq_len=seq_len, max_position_embeddings=131072)
        close(inv, [b / f for b, f in zip(base, factors)], 1e-14)


# ---- NTK (static, not an HF type) --------------------------------------------------------------

@pytest.mark.parametrize("d, factor", [(128, 4.0), (64, 8.0), (32, 2.0)])
def test_ntk_matches_the_base_change_formula_and_its_defining_property(d, factor):
    base = 10000.0
    inv, scale = compute_inv_freq("ntk", d, base, {"factor": factor})
    new_base = base * factor ** (d / (d - 2))
    assert ntk_base(base, factor, d) == pytest.approx(new_base, rel=1e-15)
    close(inv, naive_default(d, new_base), 1e-14)
    assert scale == 1.0
    # YaRN App. A.1: the highest frequency is untouched, the lowest is divided exactly by s (like PI)
    default = default_inv_freq(d, base)
    assert inv[0].item() == 1.0
    assert inv[-1].item() == pytest.approx(default[-1].item() / factor, rel=1e-13)


def test_ntk_yarn_paper_example_base():
    # YaRN §3.1 / formulas.md A8: d = 128, s = 4 -> b' ≈ 40,890
    assert ntk_base(10000.0, 4.0, 128) == pytest.approx(40890, rel=1e-4)


@pytest.mark.parametrize("d, factor", [(128, 4.0), (64, 8.0)])
def test_ntk_matches_rotary_embedding_torch_theta_rescale(d, factor):
    ret = pytest.importorskip("rotary_embedding_torch")
    theirs = ret.RotaryEmbedding(d, theta=10000, theta_rescale_factor=factor).freqs.detach().double()
    close(compute_inv_freq("ntk", d, 10000.0, {"factor": factor})[0], theirs, 1e-6)


def test_ntk_differs_from_vllm_ntk_variant_except_at_the_lowest_frequency():
    # vLLM 0.33 NTKScalingRotaryEmbedding (no mixed_b): inv((θ·f)) / f^(2/d). It rescales every pair,
    # the highest frequency included, so it is a different schedule; both divide the lowest one by f.
    d, base, factor = 64, 10000.0, 4.0
    vllm = torch.tensor([(base * factor) ** (-2 * j / d) / factor ** (2 / d) for j in range(d // 2)],
                        dtype=torch.float64)
    ours, _ = compute_inv_freq("ntk", d, base, {"factor": factor})
    assert ours[-1].item() == pytest.approx(vllm[-1].item(), rel=1e-12)
    assert not torch.allclose(ours[:-1], vllm[:-1], rtol=1e-3)


def test_dynamic_equals_default_within_the_trained_length_and_grows_beyond():
    default, _ = compute_inv_freq("default", 64, 1e4)
    for seq_len in (None, 1, 2048):
        inv, _ = compute_inv_freq("dynamic", 64, 1e4, {"factor": 4.0}, seq_len=seq_len, max_position_embeddings=2048)
        close(inv, default, 1e-15)
    longer, _ = compute_inv_freq("dynamic", 64, 1e4, {"factor": 4.0}, seq_len=4096, max_position_embeddings=2048)
    assert longer[0] == 1.0 and (longer[1:] < default[1:]).all()
    # the tensor form of seq_len gives the same
    same, _ = compute_inv_freq("dynamic", 64, 1e4, {"factor": 4.0}, seq_len=torch.tensor(4096),
                               max_position_embeddings=2048)
    assert torch.equal(same, longer)


def test_wavelengths_and_helpers():
    inv = default_inv_freq(8, 10000.0)
    close(wavelengths(inv), [2 * math.pi / f for f in naive_default(8, 10000.0)], 1e-15)
    assert yarn_mscale(1.0) == 1.0 and yarn_mscale(0.5) == 1.0
    with pytest.raises(TypeError, match="inv_freq"):
        wavelengths([1.0, 0.1])


def test_validate_normalises_and_fills_defaults():
    p = validate_rope_params("yarn", 64, 1e4, {"factor": 4, "original_max_position_embeddings": 4096.0}, None)
    assert p == {"factor": 4.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                 "mscale": None, "mscale_all_dim": None, "attention_factor": None, "truncate": True}
    assert validate_rope_params("default", 64, 1e4, None, None) == {}
    # agreeing meta keys are tolerated
    assert validate_rope_params("linear", 64, 1e4, {"factor": 2, "rope_type": "linear", "rope_theta": 1e4}, None) == {
        "factor": 2.0}


# ---- every error --------------------------------------------------------------------------------

LONG = dict(short_factor=[1.0] * 32, long_factor=[1.0] * 32, original_max_position_embeddings=4096)


@pytest.mark.parametrize("args, kwargs, error, match", [
    (("rope", 64, 1e4), {}, ValueError, "rope_type must be one of"),
    (("default", 63, 1e4), {}, ValueError, "rotary_dim must be even"),
    (("default", 0, 1e4), {}, ValueError, "rotary_dim must be >= 2"),
    (("default", 64.0, 1e4), {}, TypeError, "rotary_dim must be an int"),
    (("default", 64, 0.0), {}, ValueError, "base must be > 1"),
    (("default", 64, -5.0), {}, ValueError, "base must be > 1"),
    (("default", 64, float("nan")), {}, ValueError, "base must be finite"),
    (("default", 64, 1e4, {"factor": 2.0}), {}, ValueError, r"unknown key\(s\) \['factor'\]"),
    (("linear", 64, 1e4, {}), {}, ValueError, r"missing required key\(s\) \['factor'\]"),
    (("linear", 64, 1e4, {"factor": None}), {}, ValueError, "missing required key"),
    (("linear", 64, 1e4, {"factor": 0.5}), {}, ValueError, "linear factor must be >= 1"),
    (("linear", 64, 1e4, {"factor": "2"}), {}, TypeError, "linear factor must be a number"),
    (("linear", 64, 1e4, {"factor": True}), {}, TypeError, "linear factor must be a number"),
    (("linear", 64, 1e4, {"factr": 2.0}), {}, ValueError, r"unknown key\(s\) \['factr'\]"),
    (("linear", 64, 1e4, [2.0]), {}, TypeError, "params must be a dict"),
    (("linear", 64, 1e4, {"factor": 2.0, "rope_type": "yarn"}), {}, ValueError, "conflicts with rope_type"),
    (("linear", 64, 1e4, {"factor": 2.0, "rope_theta": 5e5}), {}, ValueError, "conflicts with base"),
    (("linear", 64, 1e4, {"factor": 2.0, "partial_rotary_factor": 0.5}), {}, ValueError, "rotary_dim instead"),
    (("ntk", 64, 1e4, {"factor": 0.9}), {}, ValueError, "ntk factor must be >= 1"),
    (("ntk", 2, 1e4, {"factor": 2.0}), {}, ValueError, "needs rotary_dim > 2"),
    (("dynamic", 64, 1e4, {"factor": 2.0}), {}, ValueError, "dynamic needs max_position_embeddings"),
    (("dynamic", 64, 1e4, {"factor": 2.0}), {"max_position_embeddings": 0}, ValueError, "max_position_embeddings must be >= 1"),
    (("dynamic", 64, 1e4, {"factor": 2.0}), {"max_position_embeddings": 8, "seq_len": -1}, ValueError, "seq_len must be >= 0"),
    (("dynamic", 64, 1e4, {"factor": 2.0}), {"max_position_embeddings": 8, "seq_len": 1.5}, TypeError, "seq_len must be an int"),
    (("yarn", 64, 1e4, {"factor": 4.0}), {}, ValueError, r"missing required key\(s\) \['original_max_position_embeddings'\]"),
    (("yarn", 64, 1e4, {"original_max_position_embeddings": 4096}), {}, ValueError, "yarn needs 'factor' or max_position_embeddings"),
    (("yarn", 64, 1e4, {"original_max_position_embeddings": 4096}), {"max_position_embeddings": 2048}, ValueError, "must be >= 1; set 'factor'"),
    (("yarn", 64, 1e4, {"factor": 0.5, "original_max_position_embeddings": 4096}), {}, ValueError, "yarn factor must be >= 1"),
    (("yarn", 64, 1e4, {"factor": 4.0, "original_max_position_embeddings": 4096.5}), {}, TypeError, "original_max_position_embeddings must be an int"),
    (("yarn", 64, 1e4, {"factor": 4.0, "original_max_position_embeddings": 0}), {}, ValueError, "original_max_position_embeddings must be >= 1"),
    (("yarn", 64, 1e4, {"factor": 4.0, "original_max_position_embeddings": 4096, "beta_fast": 1, "beta_slow": 32}), {}, ValueError, "beta_fast must be >= beta_slow"),
    (("yarn", 64, 1e4, {"factor": 4.0, "original_max_position_embeddings": 4096, "beta_slow": -1}), {}, ValueError, "must be > 0"),
    (("yarn", 64, 1e4, {"factor": 4.0, "original_max_position_embeddings": 4096, "attention_factor": 0.0}), {}, ValueError, "attention_factor must be > 0"),
    (("yarn", 64, 1e4, {"factor": 4.0, "original_max_position_embeddings": 4096, "truncate": "no"}), {}, TypeError, "truncate must be a bool"),
    (("yarn", 64, 1e4, {"factor": 4.0, "original_max_position_embeddings": 4096, "mscale": -1.0}), {}, ValueError, "mscale must be >= 0"),
    (("longrope", 64, 1e4, dict(LONG, short_factor=[1.0] * 31)), {"max_position_embeddings": 8192}, ValueError, "short_factor must have length rotary_dim/2 = 32, got 31"),
    (("longrope", 64, 1e4, dict(LONG, long_factor=[1.0] * 64)), {"max_position_embeddings": 8192}, ValueError, "long_factor must have length rotary_dim/2 = 32, got 64"),
    (("longrope", 64, 1e4, dict(LONG, long_factor=[1.0] * 31 + [0.0])), {"max_position_embeddings": 8192}, ValueError, r"long_factor entries must be > 0"),
    (("longrope", 64, 1e4, dict(LONG, long_factor=[1.0] * 31 + ["x"])), {"max_position_embeddings": 8192}, TypeError, r"long_factor\[31\] must be a number"),
    (("longrope", 64, 1e4, dict(LONG, long_factor=2.0)), {"max_position_embeddings": 8192}, TypeError, "long_factor must be a list of 32 numbers"),
    (("longrope", 64, 1e4, {k: v for k, v in LONG.items() if k != "long_factor"}), {}, ValueError, r"missing required key\(s\) \['long_factor'\]"),
    (("longrope", 64, 1e4, LONG), {}, ValueError, "longrope needs 'factor', 'attention_factor' or max_position_embeddings"),
    (("longrope", 64, 1e4, dict(LONG, factor=0.5)), {}, ValueError, "longrope factor must be >= 1"),
    (("llama3", 64, 1e4, dict(LLAMA31, low_freq_factor=4.0, high_freq_factor=1.0)), {}, ValueError, "low_freq_factor must be <= high_freq_factor"),
    (("llama3", 64, 1e4, dict(LLAMA31, low_freq_factor=0.0)), {}, ValueError, "low_freq_factor must be > 0"),
    (("llama3", 64, 1e4, dict(LLAMA31, factor=0.25)), {}, ValueError, "llama3 factor must be >= 1"),
    (("llama3", 64, 1e4, {k: v for k, v in LLAMA31.items() if k != "high_freq_factor"}), {}, ValueError, r"\['high_freq_factor'\]"),
    (("llama3", 64, 1e4, dict(LLAMA31, beta_fast=32)), {}, ValueError, r"unknown key\(s\) \['beta_fast'\] for rope_type='llama3'"),
])
def test_invalid_parameters_raise_naming_the_key(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        compute_inv_freq(*args, **kwargs)


def test_rope_types_are_the_contract():
    assert ROPE_TYPES == ("default", "linear", "ntk", "dynamic", "yarn", "longrope", "llama3", "proportional")
    for rope_type in ROPE_TYPES:  # every type is computable with a reasonable parameter set
        params = {"default": None, "linear": {"factor": 2}, "ntk": {"factor": 2}, "dynamic": {"factor": 2},
                  "yarn": {"factor": 2, "original_max_position_embeddings": 64}, "longrope": LONG,
                  "llama3": LLAMA31, "proportional": {"partial_rotary_factor": 0.25}}[rope_type]
        inv, scale = compute_inv_freq(rope_type, 64, 1e4, params, max_position_embeddings=8192)
        assert inv.shape == (32,) and inv.dtype == torch.float64 and torch.isfinite(inv).all() and scale > 0


# ---- proportional (p-RoPE) ---------------------------------------------------------------------
@pytest.mark.parametrize("head_dim, proportion, factor", [(512, 0.25, 1.0), (64, 0.5, 2.0), (64, 1.0, 1.0),
                                                          (64, 0.0, 1.0), (96, 0.3, 1.0)])
def test_proportional_formula(head_dim, proportion, factor):
    """θ^(-2j/d)/factor for j < floor(p·d/2), zero beyond: the kept pairs equal full RoPE's (Barbero et al. 2025)."""
    inv, scale = compute_inv_freq("proportional", head_dim, 1e6,
                                  {"partial_rotary_factor": proportion, "factor": factor})
    kept = math.floor(proportion * head_dim / 2)
    expected = [1e6 ** (-2 * j / head_dim) / factor if j < kept else 0.0 for j in range(head_dim // 2)]
    assert scale == 1.0 and inv.dtype == torch.float64
    assert torch.allclose(inv, torch.tensor(expected, dtype=torch.float64), rtol=1e-15, atol=0)
    assert int((inv > 0).sum()) == kept
    if factor == 1.0:  # the rotated pairs are exactly default RoPE's leading pairs
        assert torch.equal(inv[:kept], compute_inv_freq("default", head_dim, 1e6)[0][:kept])


def test_proportional_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for proportion, factor in ((0.25, 1.0), (0.5, 4.0)):
        config = transformers.LlamaConfig(hidden_size=512, num_attention_heads=2, head_dim=256, rope_parameters={
            "rope_type": "proportional", "rope_theta": 1e6, "partial_rotary_factor": proportion, "factor": factor})
        hf, hf_scale = ROPE_INIT_FUNCTIONS["proportional"](config, None)
        ours, scale = compute_inv_freq("proportional", 256, 1e6, {"partial_rotary_factor": proportion, "factor": factor})
        assert scale == hf_scale == 1.0
        assert torch.allclose(ours.float(), hf, rtol=1e-6, atol=0)
        assert torch.equal(ours == 0, hf == 0)


@pytest.mark.parametrize("params, error", [({"partial_rotary_factor": 1.5}, ValueError),
                                           ({"partial_rotary_factor": "0.25"}, TypeError),
                                           ({"factor": 0.5}, ValueError), ({"low_freq_factor": 1.0}, ValueError)])
def test_proportional_bad_params(params, error):
    with pytest.raises(error, match="proportional|low_freq_factor"):
        compute_inv_freq("proportional", 64, 1e4, params)


def test_partial_rotary_factor_is_a_schedule_key_only_for_proportional():
    with pytest.raises(ValueError, match="not a schedule key"):
        compute_inv_freq("linear", 64, 1e4, {"factor": 2.0, "partial_rotary_factor": 0.5})
