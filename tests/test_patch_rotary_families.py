"""patch_rotary beyond Llama / Qwen2 / Mistral: every family in ``hf._FAMILIES`` on a tiny random
model built from its config class (no download).

Oracle: the unpatched model itself (HF's own rotary module and apply function): logits within
1e-5 and 20 greedy tokens with a ``DynamicCache`` identical. A perturbed base must move the logits
far past the tolerance on each family, so the parity check can fail.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from huggingface_hub.errors import StrictDataclassClassValidationError  # noqa: E402  (transformers' config checks)

from posemb.integrations import hf  # noqa: E402
from posemb.integrations.hf import PosembRotaryEmbedding, is_patched, patch_rotary, unpatch_rotary  # noqa: E402
from posemb.rotary import from_hf_config  # noqa: E402

TOL = 1e-5
_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, initializer_range=0.05,
               pad_token_id=0)
_LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 32,
             "short_factor": [1.0 + 0.1 * j for j in range(8)], "long_factor": [1.0 + 0.5 * j for j in range(8)]}

#: family -> (class name prefix, config overrides, expected mode, expected rotary_dim of head_dim 16)
FAMILIES = {
    "qwen3": ("Qwen3", dict(head_dim=16), 16),
    "granite": ("Granite", dict(), 16),
    "olmo2": ("Olmo2", dict(), 16),
    "phi3": ("Phi3", dict(rope_parameters=_LONGROPE, original_max_position_embeddings=32), 16),
    "gpt_neox": ("GPTNeoX", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "partial_rotary_factor": 0.5}), 8),
    "stablelm": ("StableLm", dict(), 4),  # default partial_rotary_factor 0.25
    "cohere": ("Cohere", dict(logit_scale=1.0), 16),  # default 0.0625 shrinks logit differences 16x
    "glm": ("Glm", dict(head_dim=16), 8),  # default partial_rotary_factor 0.5
    "glm4": ("Glm4", dict(head_dim=16), 8),
    "gemma2": ("Gemma2", dict(head_dim=16), 16),
    "smollm3": ("SmolLM3", dict(num_hidden_layers=4, no_rope_layers=[1, 0, 1, 0]), 16),
    # a local base on sliding layers, a scaled global one on full layers (one rotary module, per layer type)
    "gemma3_text": ("Gemma3Text", dict(
        head_dim=16, num_hidden_layers=4, sliding_window=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0}}), 16),
    # only the sliding layer rotates; the full layer is NoPE (Cohere2Attention)
    "cohere2": ("Cohere2", dict(head_dim=16, logit_scale=1.0, sliding_window=16,
                                layer_types=["sliding_attention", "full_attention"]), 16),
    # with a sliding_window only sliding layers rotate (Exaone4Attention)
    "exaone4": ("Exaone4", dict(sliding_window=16, layer_types=["sliding_attention", "full_attention"]), 16),
    "olmo3": ("Olmo3", dict(sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                             "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                "rope_theta": 1000.0}}), 16),
    # gpt-oss's own schedule: YaRN without truncation (GptOssConfig), scaled down to the tiny lengths
    "gpt_oss": ("GptOss", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
                               layer_types=["sliding_attention", "full_attention"],
                               rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0,
                                                "beta_slow": 1.0, "truncate": False,
                                                "original_max_position_embeddings": 16, "rope_theta": 150000.0}), 16),
    # iRoPE: layer 1 is NoPE with attention temperature tuning (floor_scale 4 so it varies within 40 tokens)
    "llama4_text": ("Llama4Text", dict(head_dim=16, num_local_experts=2, num_experts_per_tok=1,
                                       intermediate_size_mlp=128, no_rope_layers=[1, 0],
                                       layer_types=["chunked_attention", "full_attention"], attention_chunk_size=16,
                                       attn_temperature_tuning=True, floor_scale=4, attn_scale=0.5), 16),
    # MLA: an 8-channel rope sub-head next to 8 content channels, interleaved pairs (rope_interleave=True)
    "deepseek_v3": ("DeepseekV3", dict(num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                                       qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                                       n_group=1, topk_group=1, moe_intermediate_size=32,
                                       first_k_dense_replace=1), 8),
}
_MODEL_CLASS = {"gemma3_text": "Gemma3", "llama4_text": "Llama4"}  # XForCausalLM takes the text config


def _model(family: str, seed: int = 0):
    prefix, overrides, _ = FAMILIES[family]
    config = getattr(transformers, f"{prefix}Config")(**{**_COMMON, **overrides})
    torch.manual_seed(seed)
    return getattr(transformers, f"{_MODEL_CLASS.get(family, prefix)}ForCausalLM")(config).eval()


def _tokens(length: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(1))


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_every_family_in_the_table_is_tested():
    assert set(FAMILIES) | {"llama", "qwen2", "mistral"} == set(hf.PATCHABLE_MODEL_TYPES)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_patch_keeps_logits_and_greedy_decoding(family):
    model = _model(family)
    assert model.config.model_type == family
    # 40 > 32 crosses Phi-3's LongRoPE switch from short to long factors
    tokens = _tokens(40)
    reference = _logits(model, tokens)
    prompt = _tokens(8, batch=1)
    settings = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        reference_tokens = model.generate(prompt, cache=transformers.DynamicCache(config=model.config),
                                          **settings)
    original = patch_rotary(model)
    module = hf._rotary_owner(model).rotary_emb
    assert is_patched(model) and isinstance(module, PosembRotaryEmbedding) and module.mode == "cos_sin"
    assert module.rope.rotary_dim == FAMILIES[family][2]
    assert (logit_diff := (_logits(model, tokens) - reference).abs().max().item()) <= TOL, logit_diff
    with torch.no_grad():
        ours = model.generate(prompt, cache=transformers.DynamicCache(config=model.config), **settings)
    assert ours.shape[1] == prompt.shape[1] + 20
    assert torch.equal(ours, reference_tokens)
    assert unpatch_rotary(model).original is original and hf._rotary_owner(model).rotary_emb is original


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_wrong_base_is_detected_on_every_family(family):
    model = _model(family)
    tokens = _tokens(40)
    reference = _logits(model, tokens)
    if hf._FAMILIES[family].get("per_layer_type"):  # only the full layers' base is wrong (1050 for 1000)
        patch_rotary(model, {"sliding_attention": from_hf_config(model.config, layer_type="sliding_attention"),
                             "full_attention": from_hf_config(model.config, layer_type="full_attention",
                                                              base=1050.0)})
    else:
        patch_rotary(model, from_hf_config(model.config, base=from_hf_config(model.config).base * 1.05))
    assert (_logits(model, tokens) - reference).abs().max().item() > 20 * TOL


@pytest.mark.parametrize("family", ["qwen3", "cohere", "glm4"])
def test_hooks_mode_is_refused_where_it_would_be_wrong(family):
    """Qwen3 / Cohere normalise q/k heads after the projection; GLM rotates a slice itself."""
    model = _model(family)
    with pytest.raises(ValueError, match="mode='hooks' is not supported on"):
        patch_rotary(model, mode="hooks")
    assert not is_patched(model)


@pytest.mark.parametrize("family, layout", [("qwen3", "interleaved"), ("cohere", "half"), ("glm", "half")])
def test_a_rope_of_the_other_layout_is_refused(family, layout):
    model = _model(family)
    with pytest.raises(ValueError, match=f"needs a rope of layout"):
        patch_rotary(model, from_hf_config(model.config, layout=layout))
    assert not is_patched(model)


def test_per_layer_type_rotary_uses_each_layer_types_own_rope():
    """Gemma 3: the patched module returns HF's (cos, sin) for each layer type, and a mapping that
    misses a layer type is refused."""
    model = _model("gemma3_text")
    hf_rotary = hf._rotary_owner(model).rotary_emb
    patch_rotary(model)
    ours = hf._rotary_owner(model).rotary_emb
    x, positions = torch.zeros(1, 40, 64), torch.arange(40).unsqueeze(0)
    with torch.no_grad():
        pairs = {name: (hf_rotary(x, positions, name), ours(x, positions, name))
                 for name in ("sliding_attention", "full_attention")}
    for (hf_cos, hf_sin), (cos, sin) in pairs.values():
        assert (cos - hf_cos).abs().max().item() <= TOL and (sin - hf_sin).abs().max().item() <= TOL
    sliding, full = (pairs[name][1][0] for name in ("sliding_attention", "full_attention"))
    assert (sliding - full).abs().max().item() > 0.1  # the two types really differ
    with pytest.raises(ValueError, match="layer_type must be one of"):
        ours(x, positions, "chunked_attention")
    unpatch_rotary(model)
    with pytest.raises(ValueError, match="one rope per layer type"):
        patch_rotary(model, {"full_attention": from_hf_config(model.config, layer_type="full_attention")})
    assert not is_patched(model)


def _rope_case(rope_type: str, rotary_dim: int) -> dict:
    """One ``rope_parameters`` dict per type, sized for ``rotary_dim``; the 80-token check crosses every
    switch (yarn's and llama3's original length 16 / 32, longrope's 32, dynamic NTK's
    max_position_embeddings 64). Base 100 for llama3 so the tiny heads have pairs in all three bands."""
    pairs = rotary_dim // 2
    return {
        "default": {"rope_type": "default", "rope_theta": 10000.0},
        "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
        "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0},
        "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 32, "rope_theta": 100.0},
        "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 32, "rope_theta": 10000.0,
                     "short_factor": [1.0 + 0.1 * j for j in range(pairs)],
                     "long_factor": [1.0 + 0.5 * j for j in range(pairs)]},
    }[rope_type]


ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


def _model_with_rope_type(family: str, rope_type: str):
    """The family's tiny model with ``rope_type`` (on the full-attention layers of a per-layer-type
    family, the sliding ones keep the default); None when transformers itself refuses the config
    (the model does not accept that type), with the reason."""
    prefix, overrides, rotary_dim = FAMILIES[family]
    case = _rope_case(rope_type, rotary_dim)
    own = overrides.get("rope_parameters") or {}
    if hf._FAMILIES[family].get("per_layer_type"):
        parameters = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}, "full_attention": case}
    else:  # keep what is not the schedule (GPT-NeoX's partial_rotary_factor)
        parameters = {**{k: v for k, v in own.items() if k == "partial_rotary_factor"}, **case}
    settings = {**_COMMON, **overrides, "rope_parameters": parameters}
    if family == "phi3":  # Phi3Config's top-level original length wins over the dict's, as in transformers
        settings["original_max_position_embeddings"] = case.get("original_max_position_embeddings", 32)
    try:
        config = getattr(transformers, f"{prefix}Config")(**settings)
        torch.manual_seed(0)
        return getattr(transformers, f"{_MODEL_CLASS.get(family, prefix)}ForCausalLM")(config).eval(), None
    except (ValueError, KeyError, TypeError, StrictDataclassClassValidationError) as error:
        return None, f"{type(error).__name__}: {error}"


@pytest.mark.parametrize("rope_type", ROPE_TYPES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_rope_type_the_model_accepts_keeps_logits_and_decoding(family, rope_type):
    """For each rope type transformers builds the family with: logits within 1e-5 over 80 tokens and
    20 greedy tokens identical with a DynamicCache. A type transformers refuses is not the model's to
    accept; posemb must then not be the one that fails (the refusal comes from transformers' config)."""
    model, refused = _model_with_rope_type(family, rope_type)
    if model is None:
        pytest.skip(f"transformers refuses rope_type={rope_type!r} for {family}: {refused}")
    tokens = _tokens(80)
    reference = _logits(model, tokens)
    prompt = _tokens(8, batch=1)
    settings = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        reference_tokens = model.generate(prompt, cache=transformers.DynamicCache(config=model.config), **settings)
    patch_rotary(model)
    module = hf._rotary_owner(model).rotary_emb
    patched = module.layer_ropes["full_attention"] if module.layer_ropes is not None else module.rope
    assert patched.rope_type == rope_type
    assert (logit_diff := (_logits(model, tokens) - reference).abs().max().item()) <= TOL, logit_diff
    with torch.no_grad():
        ours = model.generate(prompt, cache=transformers.DynamicCache(config=model.config), **settings)
    assert torch.equal(ours, reference_tokens)


def test_deepseek_v3_half_pairing_and_mscale_refusal():
    """rope_interleave=False switches DeepSeek-V3 to rotate_half (the patch follows the config); a YaRN
    rope whose mscale^2 differs from the one the attention was built with is refused, not patched."""
    prefix, overrides, _ = FAMILIES["deepseek_v3"]
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0,
            "mscale": 1.0, "mscale_all_dim": 1.0}
    config = transformers.DeepseekV3Config(**{**_COMMON, **overrides, "rope_interleave": False,
                                              "rope_parameters": yarn})
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    tokens = _tokens(40)
    reference = _logits(model, tokens)
    patch_rotary(model)
    assert hf._rotary_owner(model).rotary_emb.rope.layout == "half"
    assert (_logits(model, tokens) - reference).abs().max().item() <= TOL
    unpatch_rotary(model)
    with pytest.raises(ValueError, match="MLA softmax factor"):
        patch_rotary(model, from_hf_config({**config.to_dict(), "rope_parameters": {**yarn, "factor": 8.0}}))
    assert not is_patched(model)
