"""``nope_temperature``: Llama 4's query temperature on NoPE layers, against the formula and transformers."""
from __future__ import annotations

import math

import pytest
import torch

from posemb import build
from posemb.functional.temperature import query_temperature
from posemb.model import TransformerLM


def test_formula_float64_by_hand():
    positions = torch.tensor([[0, 1, 2, 3, 6, 7, 11, 4095]])
    tau = query_temperature(positions, floor_scale=4.0, attn_scale=0.5)
    steps = [0, 0, 0, 1, 1, 2, 3, 1024]  # floor((m + 1) / 4)
    assert tau.dtype == torch.float64
    assert tau.tolist() == [[1.0 + 0.5 * math.log(1 + s) for s in steps]]


def test_scales_queries_only():
    scheme = build("nope_temperature", floor_scale=2, attn_scale=0.25)
    q, k = torch.randn(2, 3, 5, 8, dtype=torch.float64), torch.randn(2, 3, 5, 8, dtype=torch.float64)
    positions = torch.tensor([[0, 1, 2, 3, 4], [10, 11, 12, 13, 14]])
    q2, k2 = scheme.rotate(q, k, positions, positions)
    assert k2 is k
    expected = q * (1 + 0.25 * torch.log1p(torch.floor((positions.double() + 1) / 2)))[:, None, :, None]
    torch.testing.assert_close(q2, expected, rtol=0, atol=0)


def test_plain_nope_below_floor_scale():
    """tau = 1 until m + 1 reaches floor_scale: the model equals a NoPE model with the same weights."""
    torch.manual_seed(0)
    temp = TransformerLM(vocab_size=31, dim=16, depth=2, heads=2, scheme="nope_temperature", floor_scale=64,
                         attn_scale=2.0)
    nope = TransformerLM(vocab_size=31, dim=16, depth=2, heads=2, scheme="nope")
    nope.load_state_dict(temp.state_dict())
    tokens = torch.randint(0, 31, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(temp(tokens), nope(tokens), rtol=0, atol=0)
        far = torch.arange(1000, 1040).expand(2, -1)  # past floor_scale: queries x 1 + 2 log(16) = 6.5
        assert not torch.allclose(temp(tokens, positions=far), nope(tokens, positions=far), atol=1e-4)


@pytest.mark.parametrize("bad, error, match", [
    (dict(floor_scale=0.5), ValueError, "floor_scale must be >= 1"),
    (dict(attn_scale=-0.1), ValueError, "attn_scale must be >= 0"),
    (dict(floor_scale="8192"), TypeError, "floor_scale must be"),
])
def test_bad_options(bad, error, match):
    with pytest.raises(error, match=match):
        build("nope_temperature", **bad)


def test_negative_positions_refused():
    scheme = build("nope_temperature", floor_scale=2)
    q = torch.randn(1, 1, 3, 4)
    with pytest.raises(ValueError, match="q_positions must be >= 0"):
        scheme.rotate(q, q, torch.tensor([[-3, -2, -1]]), torch.tensor([[-3, -2, -1]]))


def test_cached_decoding_equals_full_forward():
    torch.manual_seed(1)
    model = TransformerLM(vocab_size=29, dim=16, depth=4, heads=2,
                          scheme=["rope", "rope", "rope", ("nope_temperature", {"floor_scale": 3, "attn_scale": 0.7})])
    model.eval()
    tokens = torch.randint(0, 29, (2, 14))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache()
        steps = [model(tokens[:, :8], cache=cache)]
        steps += [model(tokens[:, i:i + 1], cache=cache) for i in range(8, 14)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


transformers = pytest.importorskip("transformers")


def _llama4_attention(layer_idx: int):
    from transformers.models.llama4.modeling_llama4 import Llama4TextAttention

    config = transformers.Llama4TextConfig(
        hidden_size=32, intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, head_dim=8, vocab_size=64, no_rope_layer_interval=4,
        attn_temperature_tuning=True, floor_scale=4, attn_scale=0.5, use_qk_norm=False)
    config._attn_implementation = "posemb_capture"
    assert config.no_rope_layers[layer_idx] == 0, "the test needs a NoPE layer"
    torch.manual_seed(0)
    return config, Llama4TextAttention(config, layer_idx).double()


def test_parity_with_llama4_text_attention_prefill_and_decode():
    """The queries transformers' Llama4TextAttention hands to its attention function on a NoPE layer,
    in a 6-token prefill and then one decoded token with a DynamicCache, equal posemb's."""
    from transformers import AttentionInterface, DynamicCache

    captured = []

    def capture(module, query, key, value, attention_mask, **kwargs):
        captured.append((query.detach().clone(), key.detach().clone()))
        return torch.zeros_like(query).transpose(1, 2), None

    AttentionInterface.register("posemb_capture", capture)
    config, attention = _llama4_attention(layer_idx=3)
    scheme = build("nope_temperature", floor_scale=config.floor_scale, attn_scale=config.attn_scale)
    hidden = torch.randn(2, 7, 32, dtype=torch.float64)
    cache = DynamicCache(config=config)
    with torch.no_grad():
        attention(hidden[:, :6], None, None, cache=cache)
        attention(hidden[:, 6:], None, None, cache=cache)
        for (query, key), rows in zip(captured, (slice(0, 6), slice(6, 7))):
            x = hidden[:, rows]
            q = attention.q_proj(x).view(2, -1, 4, 8).transpose(1, 2)
            k = attention.k_proj(x).view(2, -1, 4, 8).transpose(1, 2)
            positions = torch.arange(rows.start, rows.stop).expand(2, -1)
            ours_q, ours_k = scheme.rotate(q, k, positions, positions)
            torch.testing.assert_close(ours_q, query, rtol=1e-6, atol=0)  # transformers: tau in float32
            torch.testing.assert_close(ours_k, key[:, :, -q.shape[2]:], rtol=0, atol=0)
    # the decoded token (position 6) is past floor_scale - 1 = 3: its scale is not 1
    assert captured[1][0].abs().sum() > 0 and not torch.allclose(
        captured[1][0], attention.q_proj(hidden[:, 6:]).view(2, 1, 4, 8).transpose(1, 2))


def test_from_llama4_config():
    """attention_temperature_tuning(config) gives the options of the scheme, one home for the keys."""
    from posemb.rotary import attention_temperature_tuning

    config, _ = _llama4_attention(layer_idx=3)
    scheme = build("nope_temperature", **attention_temperature_tuning(config))
    assert (scheme.floor_scale, scheme.attn_scale) == (4.0, 0.5)
