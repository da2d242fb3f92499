"""DeepSeek MLA's decoupled RoPE: MultiHeadLatentAttention with posemb's ``mla`` scheme equals
transformers' DeepseekV3Attention on tiny configs (low-rank and full-rank queries, interleaved and
half-split rope, YaRN with the mscale^2 softmax factor), and works inside TransformerLM with its
KV cache (also for a context-dependent schedule)."""
import math

import pytest
import torch

import posemb
from posemb.model.latent_attention import MultiHeadLatentAttention
from posemb.schemes.mla import DecoupledRoPE

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32.0, "beta_slow": 1.0}
DEFAULT = {"rope_type": "default", "rope_theta": 5000.0}


def _hf_attention(rope_parameters, rope_interleave, q_lora_rank):
    pytest.importorskip("transformers")
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as module

    config = DeepseekV3Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora_rank,
                              kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
                              rope_interleave=rope_interleave, rope_parameters=dict(rope_parameters),
                              max_position_embeddings=64, num_hidden_layers=1, vocab_size=64, attention_bias=False)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    attention = module.DeepseekV3Attention(config, layer_idx=0).eval()
    with torch.no_grad():
        for parameter in attention.parameters():  # norms away from 1, projections sizeable
            parameter.normal_(0, 0.3)
    return module, config, attention


def _posemb_attention(hf_attention, rope_parameters, rope_interleave, q_lora_rank):
    options = {k: v for k, v in rope_parameters.items() if k not in ("rope_type", "rope_theta")}
    scheme = posemb.build("mla", qk_rope_head_dim=4, base=rope_parameters["rope_theta"],
                          rope_type=rope_parameters["rope_type"], scaling=options or None,
                          rope_interleave=rope_interleave, max_position_embeddings=64)
    mine = MultiHeadLatentAttention(32, 4, scheme, qk_nope_head_dim=8, v_head_dim=6, q_lora_rank=q_lora_rank,
                                    kv_lora_rank=12)
    mine.load_state_dict(hf_attention.state_dict())  # same names, one to one
    return mine.eval()


@pytest.mark.parametrize("q_lora_rank", [16, None])
@pytest.mark.parametrize("rope_interleave", [True, False])
@pytest.mark.parametrize("rope_parameters", [DEFAULT, YARN], ids=["default", "yarn"])
def test_matches_deepseek_v3_attention(rope_parameters, rope_interleave, q_lora_rank):
    module, config, hf = _hf_attention(rope_parameters, rope_interleave, q_lora_rank)
    mine = _posemb_attention(hf, rope_parameters, rope_interleave, q_lora_rank)
    torch.manual_seed(1)
    x = torch.randn(2, 40, 32)
    positions = torch.stack([torch.arange(40), torch.arange(40) + 7])  # past YaRN's original 16
    cos, sin = module.DeepseekV3RotaryEmbedding(config)(x, positions)
    mask = torch.full((40, 40), float("-inf")).triu(1)[None, None].expand(2, 1, 40, 40)
    with torch.no_grad():
        expected, _ = hf(x, position_embeddings=(cos, sin), attention_mask=mask)
        got = mine(x, positions)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_yarn_mscale_squared_multiplies_the_softmax_scale():
    pytest.importorskip("transformers")
    try:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_get_mscale
    except ImportError:  # transformers >= 5.25 keeps it in modeling_rope_utils only
        from transformers.modeling_rope_utils import yarn_get_mscale

    scaling = {k: v for k, v in YARN.items() if k not in ("rope_type", "rope_theta")}
    scheme = posemb.build("mla", qk_rope_head_dim=4, rope_type="yarn", scaling=scaling, max_position_embeddings=64)
    mscale = 0.1 * 1.0 * math.log(4.0) + 1.0
    assert math.isclose(scheme.softmax_scale_factor, mscale ** 2, rel_tol=1e-12)
    assert math.isclose(scheme.softmax_scale_factor, yarn_get_mscale(4.0, 1.0) ** 2, rel_tol=1e-12)
    assert math.isclose(scheme.logit_scale(12), 12 ** -0.5 * mscale ** 2, rel_tol=1e-12)
    # mscale == mscale_all_dim: YaRN's cos/sin factor cancels to 1 and the whole temperature is here.
    assert scheme.attention_scale == pytest.approx(1.0)
    without = posemb.build("mla", qk_rope_head_dim=4, rope_type="yarn",
                           scaling={"factor": 4.0, "original_max_position_embeddings": 16}, max_position_embeddings=64)
    assert without.softmax_scale_factor == 1.0 and without.attention_scale > 1.0
    assert DecoupledRoPE(qk_rope_head_dim=4).softmax_scale_factor == 1.0


def test_the_rope_key_is_one_head_shared_by_all():
    scheme = posemb.build("mla", qk_rope_head_dim=4)
    attention = MultiHeadLatentAttention(32, 4, scheme, kv_lora_rank=12)
    assert attention.kv_a_proj_with_mqa.out_features == 12 + 4  # latent + ONE rope head
    torch.manual_seed(2)
    x, positions = torch.randn(1, 5, 32), torch.arange(5)[None]
    _, q_rope, _, _, k_rope = attention._project(x)
    assert q_rope.shape == (1, 4, 5, 4) and k_rope.shape == (1, 1, 5, 4)
    q_rope, k_rope = scheme.rotate(q_rope, k_rope, positions, positions)
    keys = attention._keys(torch.zeros(1, 4, 5, 8), k_rope)
    assert all(torch.equal(keys[:, 0, :, 8:], keys[:, h, :, 8:]) for h in range(4))


DYNAMIC = {"rope_type": "dynamic", "scaling": {"factor": 2.0}, "max_position_embeddings": 6}


@pytest.mark.parametrize("options", [{}, {"rope_interleave": False}, DYNAMIC], ids=["interleave", "half", "dynamic"])
def test_transformer_lm_decodes_with_mla(options):
    torch.manual_seed(3)
    model = posemb.TransformerLM(64, 32, 2, 4, scheme="mla", **options).eval()
    assert isinstance(model.blocks[0].attn, MultiHeadLatentAttention)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.q_proj.weight.mul_(6.0)
            block.attn.k_rope_proj.weight.mul_(6.0)
    tokens = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        cache = model.new_cache()
        model(tokens[:, :3], cache=cache)
        for t in range(3, 10):
            step = model(tokens[:, t:t + 1], cache=cache)[:, -1]
            torch.testing.assert_close(step, model(tokens[:, :t + 1])[:, -1], atol=1e-5, rtol=1e-5)


def test_mla_layers_mix_with_other_layers():
    model = posemb.TransformerLM(64, 32, 2, 4, scheme=["mla", "nope"])
    assert type(model.blocks[0].attn).__name__ == "MultiHeadLatentAttention"
    assert type(model.blocks[1].attn).__name__ == "MultiHeadAttention"
    logits = model(torch.randint(0, 64, (1, 6)))
    assert logits.shape == (1, 6, 64) and torch.isfinite(logits).all()


@pytest.mark.parametrize("options,error,match", [
    (dict(qk_rope_head_dim=5), ValueError, "qk_rope_head_dim must be even"),
    (dict(qk_rope_head_dim=0), ValueError, "qk_rope_head_dim must be >= 2"),
    (dict(qk_rope_head_dim=4, rope_interleave="yes"), TypeError, "rope_interleave must be a bool"),
    (dict(), ValueError, "mla needs qk_rope_head_dim"),
    (dict(qk_rope_head_dim=4, rope_type="yarn"), ValueError, "original_max_position_embeddings"),
])
def test_bad_options_are_named(options, error, match):
    with pytest.raises(error, match=match):
        posemb.build("mla", **options)


def test_latent_attention_refuses_other_schemes_and_bad_sizes():
    with pytest.raises(ValueError, match="needs a decoupled-rope scheme"):
        MultiHeadLatentAttention(32, 4, posemb.build("rope", head_dim=8))
    scheme = posemb.build("mla", qk_rope_head_dim=4)
    with pytest.raises(ValueError, match="kv_lora_rank must be >= 1"):
        MultiHeadLatentAttention(32, 4, scheme, kv_lora_rank=0)
    with pytest.raises(TypeError, match="q_lora_rank must be an int"):
        MultiHeadLatentAttention(32, 4, scheme, q_lora_rank=8.0)
    attention = MultiHeadLatentAttention(32, 4, scheme)
    with pytest.raises(ValueError, match=r"positions must have shape \(batch, seq\) = \(1, 5\)"):
        attention(torch.randn(1, 5, 32), torch.arange(4)[None])
