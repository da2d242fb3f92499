"""RoPE rotation, the ``rope`` and ``xpos`` schemes: parity with transformers / rotary-embedding-torch,
float64 properties, precision to position 10^6, the cos/sin cache (growth, dtype casts, meta device,
state_dict, torch.compile) and KV-cache decoding for every schedule."""
import math

import numpy as np
import pytest
import torch

import posemb
from posemb.functional.rope import apply_rotary, rotary_cos_sin
from posemb.functional.rope_schedules import compute_inv_freq
from posemb.schemes.rope import RoPE
from posemb.schemes.xpos import XPos

LONGROPE = {"short_factor": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7],
            "long_factor": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
            "original_max_position_embeddings": 8}
# rope_type -> scaling dict for head_dim 16 (TransformerLM(256, 64, ., 4)) with max_position_embeddings=8
SCHEDULES = {
    "default": None,
    "linear": {"factor": 2.0},
    "ntk": {"factor": 4.0},
    "dynamic": {"factor": 4.0},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 8},
    "longrope": LONGROPE,
    "llama3": {"factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 4},
}


# ---- independent float64 references ------------------------------------------------------------
def pair_index(head_dim, rotary_dim, layout):
    """(first, second) channel indices of each rotated pair."""
    half = rotary_dim // 2
    if layout == "half":
        return list(range(half)), [i + half for i in range(half)]
    return list(range(0, rotary_dim, 2)), list(range(1, rotary_dim, 2))


def naive_rotate(x, positions, inv_freq, layout, scale=1.0):
    """Float64 rotation written as a complex product per pair: (x_a + i x_b) * e^{i p w} * scale."""
    x = x.double()
    inv_freq = torch.as_tensor(inv_freq, dtype=torch.float64)
    rotary_dim = 2 * len(inv_freq)
    first, second = pair_index(x.shape[-1], rotary_dim, layout)
    pairs = torch.complex(x[..., first], x[..., second])
    angle = positions.double()[:, None, :, None] * inv_freq
    rotated = pairs * torch.polar(torch.full_like(angle, scale), angle)
    out = x.clone()
    out[..., first], out[..., second] = rotated.real, rotated.imag
    return out


def default_inv_freq64(rotary_dim, base=10000.0):
    return torch.tensor([base ** (-2 * i / rotary_dim) for i in range(rotary_dim // 2)], dtype=torch.float64)


# ---- parity with transformers -------------------------------------------------------------------
HF_TYPES = {
    "default": {},
    "linear": {"factor": 2.0},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 16},
    "llama3": {"factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
}


@pytest.mark.parametrize("rope_type", list(HF_TYPES))
def test_half_layout_matches_transformers_llama(rope_type):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    head_dim, base, max_pos = 32, 10000.0, 64
    config = transformers.LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, max_position_embeddings=max_pos,
                                      rope_parameters={"rope_type": rope_type, "rope_theta": base, **HF_TYPES[rope_type]})
    positions = torch.arange(40).expand(2, 40) + torch.tensor([[0], [7]])
    q, k = torch.randn(2, 3, 40, head_dim), torch.randn(2, 3, 40, head_dim)
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(q, positions)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)

    rope = RoPE(head_dim, base, rope_type, HF_TYPES[rope_type] or None, max_position_embeddings=max_pos)
    q_rot, k_rot = rope.rotate(q, k, positions, positions)
    # HF forms its angles in float32 (error ~ position * 6e-8); ours are float64.
    torch.testing.assert_close(q_rot, hf_q, atol=2e-5, rtol=0)
    torch.testing.assert_close(k_rot, hf_k, atol=2e-5, rtol=0)
    # Given identical cos/sin, the rotation formulas agree to rounding.
    cos, sin = rope.cos_sin(positions)
    same_q, same_k = apply_rotary_pos_emb(q, k, torch.cat([cos, cos], -1), torch.cat([sin, sin], -1))
    torch.testing.assert_close(q_rot, same_q, atol=1e-6, rtol=0)
    torch.testing.assert_close(k_rot, same_k, atol=1e-6, rtol=0)


@pytest.mark.parametrize("rope_type,scaling", [("dynamic", {"factor": 2.0}), ("longrope", None)])
def test_context_dependent_full_pass_matches_transformers(rope_type, scaling):
    """A full pass longer than the trained length: HF's dynamic_rope_update picks the same frequencies."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    head_dim, max_pos = 16, 16
    if rope_type == "longrope":
        scaling = {**LONGROPE, "original_max_position_embeddings": 16}
        max_pos = 64
    config = transformers.LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, max_position_embeddings=max_pos,
                                      rope_parameters={"rope_type": rope_type, "rope_theta": 10000.0, **scaling})
    rope = RoPE(head_dim, 10000.0, rope_type, scaling, max_position_embeddings=max_pos)
    for length in (10, 40):  # within and beyond the trained length
        positions = torch.arange(length)[None]
        hf_cos, hf_sin = LlamaRotaryEmbedding(config)(torch.randn(1, length, 2), positions)
        cos, sin = rope.cos_sin(positions)
        torch.testing.assert_close(cos, hf_cos[..., : head_dim // 2], atol=1e-5, rtol=0)
        torch.testing.assert_close(sin, hf_sin[..., : head_dim // 2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_interleaved_layout_matches_transformers_gptj(partial):
    pytest.importorskip("transformers")
    from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb, create_sinusoidal_positions

    head_dim = 32
    rotary_dim = int(head_dim * partial)
    positions = torch.arange(20).expand(2, 20) + torch.tensor([[0], [11]])
    q = torch.randn(2, 3, 20, head_dim)
    sincos = create_sinusoidal_positions(64, rotary_dim)[positions]
    sin, cos = torch.split(sincos, rotary_dim // 2, dim=-1)
    as_gptj = q.transpose(1, 2)  # GPT-J works on (batch, seq, heads, head_dim)
    expected = torch.cat([apply_rotary_pos_emb(as_gptj[..., :rotary_dim], sin, cos), as_gptj[..., rotary_dim:]], -1)

    rope = RoPE(head_dim, layout="interleaved", partial_rotary_factor=partial)
    q_rot, _ = rope.rotate(q, q, positions, positions)
    torch.testing.assert_close(q_rot, expected.transpose(1, 2), atol=1e-5, rtol=0)


def test_partial_rotary_matches_transformers_gpt_neox():
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding, apply_rotary_pos_emb

    head_dim = 64
    config = transformers.GPTNeoXConfig(hidden_size=2 * head_dim, num_attention_heads=2, rotary_pct=0.25,
                                        max_position_embeddings=64)
    positions = torch.arange(30).expand(2, 30) + torch.tensor([[0], [5]])
    q, k = torch.randn(2, 2, 30, head_dim), torch.randn(2, 2, 30, head_dim)
    cos, sin = GPTNeoXRotaryEmbedding(config)(q, positions)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, cos, sin)

    rope = RoPE(head_dim, partial_rotary_factor=0.25)
    assert rope.rotary_dim == 16
    q_rot, k_rot = rope.rotate(q, k, positions, positions)
    torch.testing.assert_close(q_rot, hf_q, atol=1e-5, rtol=0)
    torch.testing.assert_close(k_rot, hf_k, atol=1e-5, rtol=0)
    torch.testing.assert_close(q_rot[..., 16:], q[..., 16:], atol=0, rtol=0)  # pass-through is untouched


# ---- float64 properties -------------------------------------------------------------------------
LAYOUTS = ["half", "interleaved"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_rotation_equals_the_complex_product(layout, partial):
    rope = RoPE(32, base=500000.0, layout=layout, partial_rotary_factor=partial)
    x = torch.randn(2, 3, 17, 32, dtype=torch.float64)
    positions = torch.randint(0, 1_000_000, (2, 17))
    rotated, _ = rope.rotate(x, x, positions, positions)
    assert rotated.dtype == torch.float64
    expected = naive_rotate(x, positions, default_inv_freq64(rope.rotary_dim, 500000.0), layout)
    torch.testing.assert_close(rotated, expected, atol=1e-9, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("partial", [1.0, 0.25])
def test_scores_depend_only_on_the_relative_position(layout, partial):
    """RoPE's defining property (Su et al. §3.4.2): R(m)q . R(n)k = q . R(n-m)k."""
    generator = torch.Generator().manual_seed(1)
    rope = RoPE(16, layout=layout, partial_rotary_factor=partial)
    q = torch.randn(1, 1, 1, 16, dtype=torch.float64, generator=generator)
    k = torch.randn(1, 1, 1, 16, dtype=torch.float64, generator=generator)

    def score(m, n):
        q_rot, k_rot = rope.rotate(q, k, torch.tensor([[m]]), torch.tensor([[n]]))
        return float((q_rot * k_rot).sum())

    for _ in range(20):
        m, n, shift = (int(v) for v in torch.randint(0, 200_000, (3,), generator=generator))
        reference = score(m, n)
        assert math.isclose(score(m + shift, n + shift), reference, abs_tol=1e-9)
        assert math.isclose(score(0, n - m), reference, abs_tol=1e-9)
    # ... and does depend on it
    assert abs(score(0, 1) - score(0, 2)) > 1e-3


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_rotation_preserves_pair_norms(layout, partial):
    rope = RoPE(32, layout=layout, partial_rotary_factor=partial)
    x = torch.randn(2, 2, 9, 32, dtype=torch.float64)
    positions = torch.randint(0, 100_000, (2, 9))
    rotated, _ = rope.rotate(x, x, positions, positions)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1), atol=1e-12, rtol=0)
    first, second = pair_index(32, rope.rotary_dim, layout)
    torch.testing.assert_close(rotated[..., first] ** 2 + rotated[..., second] ** 2,
                               x[..., first] ** 2 + x[..., second] ** 2, atol=1e-12, rtol=0)


# ---- precision ----------------------------------------------------------------------------------
def _reference_cos_sin(positions, inv_freq64):
    angles = positions.numpy().astype(np.float64)[..., None] * inv_freq64.numpy()
    return np.cos(angles), np.sin(angles)


def test_cos_sin_are_within_1e6_of_float64_at_every_position_up_to_a_million():
    inv_freq64 = default_inv_freq64(32, 10000.0)
    worst = 0.0
    for start in range(0, 1_000_001, 1 << 16):
        positions = torch.arange(start, min(start + (1 << 16), 1_000_001))[None]
        cos, sin = rotary_cos_sin(positions, inv_freq64)
        assert cos.dtype == torch.float32 and cos.shape == (1, positions.shape[1], 16)
        ref_cos, ref_sin = _reference_cos_sin(positions, inv_freq64)
        worst = max(worst, np.abs(cos.numpy() - ref_cos).max(), np.abs(sin.numpy() - ref_sin).max())
    assert worst <= 1e-6, worst
    # The test can fail: float32 angles (what transformers does) are far off at large positions.
    p = torch.tensor([[999_999]])
    float32_angles = (p.float()[..., None] * inv_freq64.float()).cos().double()
    assert (float32_angles - torch.from_numpy(_reference_cos_sin(p, inv_freq64)[0])).abs().max() > 1e-3


def test_scheme_table_is_within_1e6_of_float64_up_to_a_million():
    rope = RoPE(8, base=10000.0)
    inv_freq64 = default_inv_freq64(8, 10000.0)
    torch.testing.assert_close(rope.inv_freq64, inv_freq64, atol=0, rtol=1e-15)
    worst = 0.0
    for start in range(0, 1_000_001, 1 << 17):
        positions = torch.arange(start, min(start + (1 << 17), 1_000_001))[None]
        cos, sin = rope.cos_sin(positions)
        ref_cos, ref_sin = _reference_cos_sin(positions, inv_freq64)
        worst = max(worst, np.abs(cos.numpy() - ref_cos).max(), np.abs(sin.numpy() - ref_sin).max())
    assert worst <= 1e-6, worst
    assert rope._cos_table.shape[0] == 1 << 20  # grown on demand to cover 10^6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_low_precision_output_error_is_at_most_twice_the_cast_error(dtype, layout):
    rope = RoPE(64, base=500000.0, layout=layout)
    x = torch.randn(2, 4, 64, 64).to(dtype)
    positions = torch.randint(0, 1_000_000, (2, 64))
    rotated, _ = rope.rotate(x, x, positions, positions)
    assert rotated.dtype == dtype
    reference = naive_rotate(x, positions, default_inv_freq64(64, 500000.0), layout)
    our_error = (rotated.double() - reference).abs().max()
    cast_error = (reference.to(dtype).double() - reference).abs().max()
    assert our_error <= 2 * cast_error, (our_error, cast_error)


# ---- the cache: growth, casts, devices, state_dict, compile -------------------------------------
def test_table_grows_on_demand_and_matches_the_direct_computation():
    rope = RoPE(16)
    assert rope._cos_table is None  # nothing is built before it is needed
    for top, expected_rows in ((9, 256), (300, 512), (5000, 8192), (100, 8192)):
        positions = torch.arange(top + 1)[None]
        cos, sin = rope.cos_sin(positions)
        assert rope._cos_table.shape == (expected_rows, 8)
        direct = rotary_cos_sin(positions, rope.inv_freq64)
        torch.testing.assert_close((cos, sin), direct, atol=0, rtol=0)
    # Negative positions (legal: offsets) bypass the table.
    negative = torch.arange(-5, 5)[None]
    torch.testing.assert_close(rope.cos_sin(negative), rotary_cos_sin(negative, rope.inv_freq64), atol=0, rtol=0)


def test_casting_the_model_to_bf16_keeps_full_precision():
    model = posemb.TransformerLM(32, 64, 1, 4, scheme="rope", rope_type="yarn",
                                 scaling={"factor": 4.0, "original_max_position_embeddings": 64},
                                 max_position_embeddings=256)
    rope = model.schemes[0]
    positions = torch.arange(0, 50_000, 7)[None]
    before_inv, before = rope.inv_freq64.clone(), rope.cos_sin(positions)
    model.to(torch.bfloat16)
    assert model.head.weight.dtype == torch.bfloat16
    assert rope.inv_freq64.dtype == torch.float64 and rope.inv_freq.dtype == torch.float32
    torch.testing.assert_close(rope.inv_freq64, before_inv, atol=0, rtol=0)
    after = rope.cos_sin(positions)
    assert after[0].dtype == torch.float32
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    model.half().float().double()
    torch.testing.assert_close(rope.inv_freq64, before_inv, atol=0, rtol=0)
    # A cast of inv_freq itself (what transformers suffers, #25681) would have been visible:
    assert (before_inv.to(torch.bfloat16).double() - before_inv).abs().max() > 1e-4


def test_meta_device_build_then_to_empty_gives_correct_values():
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    reference = RoPE(32, 500000.0, "llama3", scaling, max_position_embeddings=512)
    with torch.device("meta"):
        rope = RoPE(32, 500000.0, "llama3", scaling, max_position_embeddings=512)
        model = posemb.TransformerLM(32, 64, 1, 2, scheme="rope")
    assert rope.inv_freq64.is_meta and model.schemes[0].inv_freq64.is_meta
    rope.to_empty(device="cpu")
    model.to_empty(device="cpu")
    q, k = torch.randn(1, 2, 12, 32), torch.randn(1, 2, 12, 32)
    positions = torch.arange(100, 112)[None]
    torch.testing.assert_close(rope.rotate(q, k, positions, positions), reference.rotate(q, k, positions, positions),
                               atol=0, rtol=0)
    torch.testing.assert_close(model.schemes[0].inv_freq64, default_inv_freq64(32), atol=0, rtol=1e-15)
    # Left on meta (e.g. load_state_dict(assign=True) never touches non-persistent buffers): rebuilt lazily.
    with torch.device("meta"):
        lazy = RoPE(32, 500000.0, "llama3", scaling, max_position_embeddings=512)
    torch.testing.assert_close(lazy.rotate(q, k, positions, positions), reference.rotate(q, k, positions, positions),
                               atol=0, rtol=0)


def test_state_dict_carries_no_frequencies():
    for model in (posemb.TransformerLM(32, 64, 2, 4, scheme="rope", rope_type="linear", scaling={"factor": 4.0}),
                  posemb.TransformerLM(32, 64, 2, 4, scheme="xpos")):
        assert not [key for key in model.state_dict() if "freq" in key or "zeta" in key or "scheme" in key]
    # Loading weights trained under another schedule keeps this model's schedule.
    trained = posemb.TransformerLM(32, 64, 1, 4, scheme="rope", rope_type="linear", scaling={"factor": 4.0})
    fresh = posemb.TransformerLM(32, 64, 1, 4, scheme="rope")
    fresh.load_state_dict(trained.state_dict())
    torch.testing.assert_close(fresh.schemes[0].inv_freq64, default_inv_freq64(16), atol=0, rtol=1e-15)


def test_rotate_has_no_graph_breaks_for_static_and_longrope_schedules():
    """``torch._dynamo.explain`` traces without compiling: no ``.item()``, no graph break."""
    default = RoPE(16)
    longrope = RoPE(16, rope_type="longrope", scaling=LONGROPE, max_position_embeddings=32)

    def both(q, k, positions):
        return default.rotate(q, k, positions, positions), longrope.rotate(q, k, positions, positions)

    q, k = torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
    positions = torch.arange(12).expand(2, 12) + torch.tensor([[0], [3]])
    explanation = torch._dynamo.explain(both)(q, k, positions)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_rotate_compiles_with_fullgraph():
    rope = RoPE(16, layout="interleaved", partial_rotary_factor=0.5)
    compiled = torch.compile(rope.rotate, fullgraph=True)
    q, k = torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
    positions = torch.arange(12).expand(2, 12) + torch.tensor([[0], [70_000]])
    out = compiled(q, k, positions, positions)
    assert rope._cos_table is None  # the compiled path computes cos/sin directly, no table, no sync
    torch.testing.assert_close(out, rope.rotate(q, k, positions, positions), atol=1e-6, rtol=0)
    dense = torch.arange(12).expand(2, 12)
    torch.testing.assert_close(compiled(q, k, dense, dense), rope.rotate(q, k, dense, dense), atol=1e-6, rtol=0)
    assert rope._cos_table is not None  # eager used its table here


# ---- KV-cache decoding --------------------------------------------------------------------------
def make_lm(rope_type, depth=2, scheme="rope", sharpen=1.0):
    torch.manual_seed(0)
    options = {} if scheme == "xpos" else dict(rope_type=rope_type, scaling=SCHEDULES[rope_type],
                                                max_position_embeddings=8)
    model = posemb.TransformerLM(256, 64, depth, 4, scheme=scheme, **options).eval()
    with torch.no_grad():  # sharper attention makes positional mistakes visible in the logits
        for block in model.blocks:
            block.attn.qkv.weight.mul_(sharpen)
    return model


def decode_errors(model, tokens, prefill=3, chunk_at=(10, 13)):
    """Largest |step - full pass over the prefix| per position: a prefill, single tokens and one
    multi-token chunk (whose rows are compared with the full pass up to the chunk's end)."""
    errors = {}
    cache = model.new_cache()
    with torch.no_grad():
        spans = [(0, prefill)] + [(t, t + 1) for t in range(prefill, chunk_at[0])] + [chunk_at] + \
                [(t, t + 1) for t in range(chunk_at[1], tokens.shape[1])]
        for start, stop in spans:
            step = model(tokens[:, start:stop], cache=cache)
            # Tokens decoded together share one context (the chunk's end), as in a full pass over it.
            full = model(tokens[:, :stop])[:, start:stop]
            for t in range(start, stop):
                errors[t] = float((step[:, t - start] - full[:, t - start]).abs().max())
    return errors


@pytest.mark.parametrize("rope_type", ["default", "linear", "ntk", "yarn", "llama3", "xpos"])
def test_kv_cache_decoding_equals_the_full_pass_for_static_schedules(rope_type):
    scheme = "xpos" if rope_type == "xpos" else "rope"
    model = make_lm(rope_type, scheme=scheme)
    errors = decode_errors(model, torch.randint(0, 256, (2, 20)))
    assert max(errors.values()) <= 1e-5, errors


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_kv_cache_decoding_equals_the_full_pass_across_the_switch(rope_type):
    """dynamic grows its base past max_position_embeddings=8, longrope switches to its long factors
    past original_max_position_embeddings=8; the context runs to 20 tokens.

    Raw keys are cached and re-rotated each step with the current frequencies, so each step equals
    the full pass over its prefix; caching rotated keys (transformers #25104) does not."""
    model = make_lm(rope_type, depth=1, sharpen=8.0)
    assert model.schemes[0].caches_rotated_keys is False
    tokens = torch.randint(0, 256, (2, 20))
    ours = decode_errors(model, tokens)
    assert max(ours.values()) <= 1e-5, ours

    for scheme in model.schemes:  # the naive cache: keys keep the rotation of the step that made them
        scheme.caches_rotated_keys = True
    naive = decode_errors(model, tokens)
    assert max(naive[t] for t in range(8)) <= 1e-5  # within the trained length nothing changes ...
    assert max(naive[t] for t in range(9, 20)) > 1e-2, naive  # ... past it, stale keys


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_context_dependent_decoding_in_a_deeper_model(rope_type):
    """With depth 2 every attention layer still sees consistently rotated keys: the first layer's
    output at each step equals a full pass. Deeper layers also read hidden states that earlier steps
    computed under the frequencies of their own (shorter) context, so past the switch the logits
    equal a full pass only up to that effect (docs/decoding.md); within the trained length they are exact."""
    model = make_lm(rope_type, depth=2)
    tokens = torch.randint(0, 256, (1, 16))
    captured = []
    hook = model.blocks[0].attn.register_forward_hook(lambda module, args, out: captured.append(out))
    cache = model.new_cache()
    with torch.no_grad():
        model(tokens[:, :3], cache=cache)
        for t in range(3, 16):
            captured.clear()
            step = model(tokens[:, t:t + 1], cache=cache)[:, -1]
            full = model(tokens[:, : t + 1])[:, -1]
            torch.testing.assert_close(captured[0][:, -1], captured[1][:, -1], atol=1e-5, rtol=0)
            if t < 8:
                torch.testing.assert_close(step, full, atol=1e-5, rtol=0)
    hook.remove()


def test_dynamic_frequencies_follow_each_rows_context_length():
    rope = RoPE(16, rope_type="dynamic", scaling={"factor": 2.0}, max_position_embeddings=8)
    positions = torch.stack([torch.arange(20), torch.arange(20).clamp(max=5)])  # contexts 20 and 6
    cos, sin = rope.cos_sin(positions)
    for row, length in ((0, 20), (1, 6)):
        inv_freq, scale = compute_inv_freq("dynamic", 16, 10000.0, {"factor": 2.0}, seq_len=length,
                                           max_position_embeddings=8)
        expected = rotary_cos_sin(positions[row:row + 1], inv_freq, scale)
        torch.testing.assert_close((cos[row:row + 1], sin[row:row + 1]), expected, atol=0, rtol=0)
    assert [rope.frequency_key(n) for n in (5, 8, 9, 20)] == [0, 0, 9, 20]
    longrope = RoPE(16, rope_type="longrope", scaling=LONGROPE, max_position_embeddings=32)
    assert [longrope.frequency_key(n) for n in (8, 9)] == [0, 1]


# ---- xPos ---------------------------------------------------------------------------------------
def test_xpos_scores_match_rotary_embedding_torch():
    rotary_embedding_torch = pytest.importorskip("rotary_embedding_torch")
    theirs = rotary_embedding_torch.RotaryEmbedding(dim=32, use_xpos=True, xpos_scale_base=512)
    q, k = torch.randn(1, 2, 64, 32), torch.randn(1, 2, 64, 32)
    their_q, their_k = theirs.rotate_queries_and_keys(q, k)
    ours = XPos(32, scale_base=512, layout="interleaved")  # lucidrains pairs (2i, 2i+1)
    positions = torch.arange(64)[None]
    our_q, our_k = ours.rotate(q, k, positions, positions)
    # Both centre the positions (they at len//2, we at the midpoint): compare the scores.
    torch.testing.assert_close(our_q @ our_k.transpose(-1, -2), their_q @ their_k.transpose(-1, -2),
                               atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_xpos_scores_follow_the_paper_formula(layout):
    """score(m, n) = sum_i Re[q_i conj(k_i) e^{i(m-n)θ_i}] ζ_i^((m-n)/γ), ζ_i = (2i + 0.4d)/(1.4d)."""
    d, gamma = 16, 64.0
    xpos = XPos(d, scale_base=gamma, layout=layout)
    q, k = torch.randn(1, 1, 30, d, dtype=torch.float64), torch.randn(1, 1, 30, d, dtype=torch.float64)
    positions = torch.arange(1000, 1030)[None]
    our_q, our_k = xpos.rotate(q, k, positions, positions)
    zeta = torch.tensor([(2 * i + 0.4 * d) / (1.4 * d) for i in range(d // 2)], dtype=torch.float64)
    torch.testing.assert_close(xpos.zeta, zeta)
    # reference without centring: positions are small enough here
    inv_freq = default_inv_freq64(d)
    first, second = pair_index(d, d, layout)
    ref_q = naive_rotate(q, positions - 1000, inv_freq, layout)
    ref_k = naive_rotate(k, positions - 1000, inv_freq, layout)
    p = (positions - 1000).double()[0, :, None]
    ref_q[..., first] *= zeta ** (p / gamma)
    ref_q[..., second] *= zeta ** (p / gamma)
    ref_k[..., first] *= zeta ** (-p / gamma)
    ref_k[..., second] *= zeta ** (-p / gamma)
    torch.testing.assert_close(our_q @ our_k.transpose(-1, -2), ref_q @ ref_k.transpose(-1, -2), atol=1e-10, rtol=1e-10)


def test_xpos_is_finite_and_translation_invariant_at_large_positions():
    xpos = XPos(16)
    q, k = torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 16)
    def scores(positions):
        q_rot, k_rot = xpos.rotate(q, k, positions, positions)
        return q_rot @ k_rot.transpose(-1, -2)

    near = torch.arange(32)[None]
    far = scores(near + 1_000_000)
    assert torch.isfinite(far).all()
    torch.testing.assert_close(far, scores(near), atol=1e-5, rtol=1e-5)
    # a span of 30k tokens in one call is within the documented float32 range (future scores included)
    span = torch.tensor([[0, 30_000]])
    q_span, k_span = xpos.rotate(q[:, :, :2], k[:, :, :2], span, span)
    assert torch.isfinite(q_span @ k_span.transpose(-1, -2)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_xpos_refuses_a_span_past_its_dtype_limit(dtype):
    """``max_span = floor(ln(finfo.max) / u)``, ``u = |ln(2/7)| / scale_base``; at the limit every
    score is finite (future ones included), one token past it is refused with the numbers."""
    xpos = XPos(8, scale_base=256.0)
    limit = xpos.max_span(dtype)
    assert limit == math.floor(math.log(torch.finfo(dtype).max) * 256.0 / abs(math.log(2 / 7)))
    # the largest future-key factor, e^(u * limit), fits the dtype; e^(u * (limit + 1)) would not
    growth = abs(math.log(2 / 7)) / 256.0
    assert growth * limit <= math.log(torch.finfo(dtype).max) < growth * (limit + 1)
    q = k = torch.full((1, 1, 2, 8), 1e-3, dtype=dtype)
    at_limit = torch.tensor([[7, 7 + limit]])
    q_rot, k_rot = xpos.rotate(q, k, at_limit, at_limit)
    assert torch.isfinite((q_rot.double() @ k_rot.double().transpose(-1, -2))).all()
    assert torch.isfinite(q_rot).all() and torch.isfinite(k_rot).all()
    with pytest.raises(ValueError, match=rf"span {limit + 1} tokens.*max_span={limit}"):
        xpos.rotate(q, k, at_limit + torch.tensor([[0, 1]]), at_limit + torch.tensor([[0, 1]]))


def test_xpos_is_causal_only():
    with pytest.raises(ValueError, match="causal"):
        posemb.build("xpos", head_dim=16, causal=False)
    with pytest.raises(ValueError, match="causal"):
        posemb.TransformerLM(32, 64, 1, 4, scheme="xpos", causal=False)
    assert posemb.build("xpos", head_dim=16).caches_rotated_keys is False


# ---- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(head_dim=15), ValueError, "head_dim must be even"),
    (dict(head_dim=1), ValueError, "head_dim"),
    (dict(head_dim=20, partial_rotary_factor=0.25), ValueError, "partial_rotary_factor"),  # rotary_dim 5
    (dict(head_dim=16, partial_rotary_factor=1.5), ValueError, "partial_rotary_factor"),
    (dict(head_dim=16, partial_rotary_factor=0.0), ValueError, "partial_rotary_factor"),
    (dict(head_dim=16, layout="complex"), ValueError, "layout"),
    (dict(head_dim=16, rope_type="su"), ValueError, "rope_type"),
    (dict(head_dim=16, scaling=[("factor", 2.0)]), TypeError, "scaling"),
    (dict(head_dim=16, rope_type="linear"), ValueError, "factor"),
    (dict(head_dim=16, base=1.0), ValueError, "base"),
    (dict(head_dim=16.0), TypeError, "head_dim"),
    (dict(head_dim=16, max_position_embeddings=0), ValueError, "max_position_embeddings"),
])
def test_bad_constructor_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        RoPE(**kwargs)


def test_rotary_dim_truncates_like_transformers():
    assert RoPE(16, partial_rotary_factor=0.3).rotary_dim == 4  # int(4.8), as HF and vLLM
    assert RoPE(64, partial_rotary_factor=0.25).rotary_dim == 16


def test_bad_rotate_inputs_are_named():
    rope = RoPE(16)
    q = torch.randn(1, 2, 5, 16)
    positions = torch.arange(5)[None]
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        rope.rotate(q[0], q, positions, positions)
    with pytest.raises(ValueError, match="head_dim=16"):
        rope.rotate(torch.randn(1, 2, 5, 8), q, positions, positions)
    with pytest.raises(TypeError, match="q_positions must be an integer tensor"):
        rope.rotate(q, q, positions.float(), positions)
    with pytest.raises(ValueError, match="k_positions must have 2 dimensions"):
        rope.rotate(q, q, positions, positions[0])
    with pytest.raises(ValueError, match="k_positions must have shape"):
        rope.rotate(q, q, positions, torch.arange(4)[None])
    with pytest.raises(TypeError, match="k must be a floating-point tensor"):
        rope.rotate(q, q.long(), positions, positions)
    with pytest.raises(TypeError, match="positions must be an integer tensor"):
        rope.cos_sin(positions.double())


def test_bad_functional_inputs_are_named():
    inv_freq = default_inv_freq64(8)
    positions = torch.arange(5)[None]
    with pytest.raises(TypeError, match="positions must be an integer tensor"):
        rotary_cos_sin(positions.float(), inv_freq)
    with pytest.raises(ValueError, match="positions must have 2 dimensions"):
        rotary_cos_sin(positions[0], inv_freq)
    with pytest.raises(ValueError, match="dtype"):
        rotary_cos_sin(positions, inv_freq, dtype=torch.bfloat16)
    cos, sin = rotary_cos_sin(positions, inv_freq)
    x = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        apply_rotary(x[0], cos, sin)
    with pytest.raises(ValueError, match="rotary_dim"):
        apply_rotary(torch.randn(1, 2, 5, 6), cos, sin)
    with pytest.raises(ValueError, match="seq=4"):
        apply_rotary(torch.randn(1, 2, 4, 8), cos, sin)
    with pytest.raises(TypeError, match="interleaved must be a bool"):
        apply_rotary(x, cos, sin, interleaved="yes")
