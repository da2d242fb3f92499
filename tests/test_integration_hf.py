"""posemb.integrations.hf: posemb's rotary inside transformers Llama-family models, and the q/k
layout permutation. Tiny random models built from configs (no download).

Oracles: HF's own rotary (the unpatched model) for every rope_type; HF's own rotate_half on
permuted weights for posemb's interleaved path; naive index loops for the permutation; posemb's
apply_rotary in both layouts for the permutation's defining property.
"""
from __future__ import annotations

import copy
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from posemb.functional.rope import apply_rotary, rotary_cos_sin  # noqa: E402
from posemb.functional.rope_schedules import default_inv_freq  # noqa: E402
from posemb.integrations import hf  # noqa: E402
from posemb.integrations.hf import (PosembRotaryEmbedding, convert_model_layout, is_patched,  # noqa: E402
                                    patch_rotary, permute_qk_for_layout, unpatch_rotary)
from posemb.rotary import from_hf_config  # noqa: E402

TOL = 1e-5  # max |logit difference| allowed between two paths that compute the same model (float32)
MAX_POS = 64
HEAD_DIM = 16  # hidden 64 / 4 heads

# One rope_parameters dict per type. The lengths 24 / 48 / 80 cross every switch: longrope's
# original length 32, dynamic NTK's max_position_embeddings 64.
ROPE_CASES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * j for j in range(HEAD_DIM // 2)],
                 "long_factor": [1.0 + 0.5 * j for j in range(HEAD_DIM // 2)],
                 "original_max_position_embeddings": 32, "rope_theta": 10000.0},
    # base 100 so that head_dim 16 has pairs in all three bands (wavelengths 6.3 .. 353, cuts 8 and 32)
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 100.0},
}
LENGTHS = (24, 48, 80)


def _config(family: str = "llama", rope_parameters: dict | None = None, **overrides):
    kwargs = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=MAX_POS,
                  # large enough that a 1% change of the base moves the logits by ~4e-4 (40x TOL)
                  initializer_range=0.05)
    if rope_parameters is not None:
        kwargs["rope_parameters"] = dict(rope_parameters)
    kwargs.update(overrides)
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                    "mistral": transformers.MistralConfig}[family]
    return config_class(**kwargs)


def _model(family: str = "llama", rope_parameters: dict | None = None, seed: int = 0, **overrides):
    model_class = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                   "mistral": transformers.MistralForCausalLM}[family]
    torch.manual_seed(seed)
    model = model_class(_config(family, rope_parameters, **overrides)).eval()
    with torch.no_grad():  # HF initialises biases to zero; random ones exercise the bias permutation
        for name, parameter in model.named_parameters():
            if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                parameter.normal_(0.0, 0.05)
    return model


def _tokens(length: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---- patch_rotary: same logits as HF's own rotary ----------------------------------------------
@pytest.mark.parametrize("rope_type", list(ROPE_CASES))
def test_patch_keeps_logits_for_every_rope_type(rope_type):
    model = _model(rope_parameters=ROPE_CASES[rope_type])
    # Increasing lengths: HF's dynamic NTK keeps the longest length seen, posemb's is per call,
    # which agree on a growing sequence (see patch_rotary's note).
    references = [_logits(model, _tokens(length)) for length in LENGTHS]
    original = patch_rotary(model)
    assert is_patched(model) and isinstance(model.model.rotary_emb, PosembRotaryEmbedding)
    assert model.model.rotary_emb.mode == "cos_sin"
    assert model.model.rotary_emb.rope.rope_type == rope_type
    for length, reference in zip(LENGTHS, references):
        assert _max_diff(_logits(model, _tokens(length)), reference) <= TOL, (rope_type, length)
    assert unpatch_rotary(model).original is original
    assert model.model.rotary_emb is original


@pytest.mark.parametrize("rope_type", ["default", "yarn", "longrope"])
def test_patched_cos_sin_match_hf_module(rope_type):
    """The module returns what HF's rotary returns: shape (B, L, head_dim), x.dtype, scale applied."""
    model = _model(rope_parameters=ROPE_CASES[rope_type])
    hf_rotary = model.model.rotary_emb
    ours = PosembRotaryEmbedding(from_hf_config(model.config), HEAD_DIM)
    positions = torch.stack([torch.arange(40), torch.arange(5, 45)])  # 45 > 32: longrope's long factors
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.zeros(2, 40, 64, dtype=dtype)
        with torch.no_grad():
            hf_cos, hf_sin = hf_rotary(x, positions)
            cos, sin = ours(x, positions)
        assert cos.shape == hf_cos.shape == (2, 40, HEAD_DIM) and cos.dtype == dtype
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        assert _max_diff(cos.float(), hf_cos.float()) <= tolerance
        assert _max_diff(sin.float(), hf_sin.float()) <= tolerance


def test_a_different_schedule_changes_the_logits():
    """The parity tests can fail: 1% off in the base, or the wrong type, moves logits far past TOL."""
    model = _model(rope_parameters=ROPE_CASES["dynamic"])
    tokens = _tokens(80)
    reference = _logits(model, tokens)
    patch_rotary(model, from_hf_config(model.config, base=10100.0))
    assert _max_diff(_logits(model, tokens), reference) > 20 * TOL
    unpatch_rotary(model)
    patch_rotary(model, from_hf_config(model.config, rope_type="default", scaling=None))
    assert _max_diff(_logits(model, tokens), reference) > 100 * TOL


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_patch_other_llama_family_models(family):
    model = _model(family, rope_parameters=ROPE_CASES["yarn"])
    tokens = _tokens(48)
    reference = _logits(model, tokens)
    patch_rotary(model)
    assert _max_diff(_logits(model, tokens), reference) <= TOL


@pytest.mark.parametrize("rope_type", ["default", "dynamic", "longrope"])
def test_greedy_decoding_with_kv_cache_unchanged(rope_type):
    """Decoding crosses dynamic's (64) and longrope's (32) switch lengths with HF's KV cache."""
    model = _model(rope_parameters=ROPE_CASES[rope_type])
    prompt = _tokens(30 if rope_type == "longrope" else 60, batch=1)
    settings = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True,
                    pad_token_id=0)
    with torch.no_grad():
        reference = model.generate(prompt, **settings)
        patch_rotary(model)
        ours = model.generate(prompt, **settings)
    assert torch.equal(ours.sequences, reference.sequences)
    assert _max_diff(torch.stack(ours.logits), torch.stack(reference.logits)) <= TOL


# ---- mode="hooks": posemb's own rotation inside the projections ---------------------------------
@pytest.mark.parametrize("rope_type", ["default", "yarn", "dynamic"])
def test_hooks_mode_half_layout_keeps_logits(rope_type):
    model = _model(rope_parameters=ROPE_CASES[rope_type])
    tokens = _tokens(80)
    reference = _logits(model, tokens)
    patch_rotary(model, mode="hooks")
    assert model.model.rotary_emb.mode == "hooks"
    assert _max_diff(_logits(model, tokens), reference) <= TOL
    unpatch_rotary(model)
    assert all(not layer.self_attn.q_proj._forward_hooks and not layer.self_attn.k_proj._forward_hooks
               for layer in model.model.layers)
    assert _max_diff(_logits(model, tokens), reference) == 0.0


@pytest.mark.parametrize("rope_type", ["default", "yarn", "llama3"])
@pytest.mark.parametrize("kv_heads", [4, 2])  # MHA and GQA (k_proj has fewer heads)
def test_interleaved_model_equals_converted_half_model(rope_type, kv_heads):
    """An interleaved-trained model run with posemb's interleaved RoPE (hooks) equals the same
    weights permuted to half layout run with HF's own rotate_half."""
    interleaved = _model(rope_parameters=ROPE_CASES[rope_type], num_key_value_heads=kv_heads, attention_bias=True)
    half = convert_model_layout(copy.deepcopy(interleaved), to="half")
    patch_rotary(interleaved, from_hf_config(interleaved.config, layout="interleaved"))
    assert interleaved.model.rotary_emb.mode == "hooks"
    tokens = _tokens(48)
    ours, reference = _logits(interleaved, tokens), _logits(half, tokens)
    assert _max_diff(ours, reference) <= TOL
    # and the hooks really rotate: the interleaved rope on the *converted* weights is another model
    patch_rotary(half, from_hf_config(half.config, layout="interleaved"))
    assert _max_diff(_logits(half, tokens), reference) > 100 * TOL


def test_partial_rotary_interleaved_equals_partial_half():
    """Partial rotary (half the head) goes through the hooks; permuting only the rotary rows of
    each head maps the interleaved model onto the half-split one."""
    model = _model(attention_bias=True)
    rope_interleaved = from_hf_config(model.config, layout="interleaved", partial_rotary_factor=0.5)
    rope_half = from_hf_config(model.config, partial_rotary_factor=0.5)
    assert rope_half.rotary_dim == 8
    converted = convert_model_layout(copy.deepcopy(model), to="half", rotary_dim=8)
    full_reference = _logits(model, _tokens(40))
    patch_rotary(model, rope_interleaved)
    patch_rotary(converted, rope_half)
    assert converted.model.rotary_emb.mode == "hooks"  # partial rotary cannot go through cos/sin
    tokens = _tokens(40)
    ours = _logits(model, tokens)
    assert _max_diff(ours, _logits(converted, tokens)) <= TOL
    assert _max_diff(ours, full_reference) > 100 * TOL  # partial rotary is a different model


# ---- permutation --------------------------------------------------------------------------------
def _naive_to_half(weight: torch.Tensor, num_heads: int, head_dim: int, rotary_dim: int) -> torch.Tensor:
    """Row h*hd + i <- h*hd + 2i and row h*hd + r/2 + i <- h*hd + 2i + 1 (i < r/2); the rest stay."""
    out = weight.clone()
    for head in range(num_heads):
        start = head * head_dim
        for i in range(rotary_dim // 2):
            out[start + i] = weight[start + 2 * i]
            out[start + rotary_dim // 2 + i] = weight[start + 2 * i + 1]
    return out


@pytest.mark.parametrize("rotary_dim", [None, 4])
def test_permutation_matches_naive_loop_and_round_trips(rotary_dim):
    num_heads, head_dim = 3, 8
    weight = torch.randn(num_heads * head_dim, 5, dtype=torch.float64)
    bias = torch.randn(num_heads * head_dim, dtype=torch.float64)
    r = rotary_dim or head_dim
    for tensor in (weight, bias):
        to_half = permute_qk_for_layout(tensor, num_heads, head_dim, to="half", rotary_dim=rotary_dim)
        assert torch.equal(to_half, _naive_to_half(tensor, num_heads, head_dim, r))
        back = permute_qk_for_layout(to_half, num_heads, head_dim, to="interleaved", rotary_dim=rotary_dim)
        assert torch.equal(back, tensor)
        assert not torch.equal(to_half, tensor)
        assert torch.equal(permute_qk_for_layout(permute_qk_for_layout(tensor, num_heads, head_dim, to="interleaved",
                                                                       rotary_dim=rotary_dim),
                                                 num_heads, head_dim, to="half", rotary_dim=rotary_dim), tensor)


def test_permutation_turns_interleaved_scores_into_half_scores():
    """The defining property, on posemb's rotation alone: q.k with interleaved RoPE on W equals
    q.k with half-split RoPE on the permuted W."""
    num_heads, head_dim, length = 2, 8, 6
    generator = torch.Generator().manual_seed(0)
    w_q = torch.randn(num_heads * head_dim, 10, generator=generator, dtype=torch.float64)
    w_k = torch.randn(num_heads * head_dim, 10, generator=generator, dtype=torch.float64)
    x = torch.randn(1, length, 10, generator=generator, dtype=torch.float64)
    positions = torch.arange(length)[None]
    cos, sin = rotary_cos_sin(positions, default_inv_freq(head_dim, 10000.0), dtype=torch.float64)

    def scores(wq, wk, interleaved):
        def heads(w):
            return (x @ w.T).view(1, length, num_heads, head_dim).transpose(1, 2)
        q = apply_rotary(heads(wq), cos, sin, interleaved=interleaved)
        k = apply_rotary(heads(wk), cos, sin, interleaved=interleaved)
        return q @ k.transpose(-1, -2)

    reference = scores(w_q, w_k, interleaved=True)
    permuted = scores(permute_qk_for_layout(w_q, num_heads, head_dim, to="half"),
                      permute_qk_for_layout(w_k, num_heads, head_dim, to="half"), interleaved=False)
    torch.testing.assert_close(permuted, reference, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(scores(w_q, w_k, interleaved=False), reference)


def test_convert_model_layout_round_trip_is_identity():
    model = _model(attention_bias=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    convert_model_layout(model, to="half")
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, state[k])]
    assert changed and all(".q_proj." in k or ".k_proj." in k for k in changed)
    assert any(k.endswith("k_proj.bias") for k in changed)
    convert_model_layout(model, to="interleaved")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ---- bad input ----------------------------------------------------------------------------------
def test_bad_input_is_named():
    model = _model()
    with pytest.raises(TypeError, match="PreTrainedModel"):
        patch_rotary(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="mode"):
        patch_rotary(model, mode="fast")
    with pytest.raises(ValueError, match="cos_sin"):
        patch_rotary(model, from_hf_config(model.config, layout="interleaved"), mode="cos_sin")
    with pytest.raises(TypeError, match="rope"):
        patch_rotary(model, torch.nn.Identity())
    with pytest.raises(ValueError, match="not patched"):
        unpatch_rotary(model)
    patch_rotary(model)
    with pytest.raises(ValueError, match="already patched"):
        patch_rotary(model)
    weight = torch.randn(32, 4)
    with pytest.raises(ValueError, match="to must be one of"):
        permute_qk_for_layout(weight, 4, 8, to="neox")
    with pytest.raises(ValueError, match="weight.shape"):
        permute_qk_for_layout(weight, 3, 8, to="half")
    with pytest.raises(ValueError, match="rotary_dim"):
        permute_qk_for_layout(weight, 4, 8, to="half", rotary_dim=10)
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        permute_qk_for_layout(weight, 4, 8, to="half", rotary_dim=3)
    with pytest.raises(ValueError, match="weight must be"):
        permute_qk_for_layout(torch.randn(32, 4, 2), 4, 8, to="half")
    with pytest.raises(TypeError, match="weight"):
        permute_qk_for_layout([1.0] * 32, 4, 8, to="half")


def test_missing_transformers_gives_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    with pytest.raises(ImportError, match="optional dependency 'transformers'"):
        hf._require_transformers()
    # the pure-torch permutation still works
    assert permute_qk_for_layout(torch.randn(8), 1, 8, to="half").shape == (8,)


@pytest.mark.parametrize("family", ["Olmo", "Qwen2VLText"])
def test_unverified_families_are_refused_naming_the_model_class(family):
    """A family whose patched forward is not verified gets a clear error, never a silently wrong patch."""
    config = getattr(transformers, f"{family}Config")(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                                       head_dim=16, pad_token_id=0)
    model_class = getattr(transformers, f"{family}ForCausalLM", None) or getattr(transformers, f"{family}Model")
    model = model_class(config)
    with pytest.raises(TypeError, match=f"does not support {model_class.__name__}"
                                        + (".*M-RoPE positions" if family == "Qwen2VLText" else "")):
        patch_rotary(model)
    assert not is_patched(model)
