"""M-RoPE (Qwen2-VL contiguous sections, Qwen3-VL interleaved): text tokens are exactly 1-D RoPE,
image and video positions match transformers' multimodal rotary application, the pair-to-axis
assignment matches a float64 formula written from the papers' description, and the model decodes
multimodal positions with its KV cache."""
import functools
import math
import types as types_module

import pytest
import torch

import posemb
from posemb.functional.multi_axis_rope import mrope_pair_axes
from posemb.schemes.mrope import MRoPE, default_mrope_section
from posemb.schemes.rope import RoPE


def _grid_positions(start: int, t: int, h: int, w: int) -> torch.Tensor:
    """(3, t*h*w) positions of one image/video grid starting at ``start`` (Qwen2-VL's layout)."""
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start


def _hand_built_positions() -> torch.Tensor:
    """(3, 1, L): 3 text tokens, a 2x3 image, 2 text tokens, a 2-frame 2x2 video, 2 text tokens."""
    parts, pos = [], 0
    for kind, size in (("text", 3), ("grid", (1, 2, 3)), ("text", 2), ("grid", (2, 2, 2)), ("text", 2)):
        if kind == "text":
            parts.append(torch.arange(size).expand(3, size) + pos)
            pos += size
        else:
            grid = _grid_positions(pos, *size)
            parts.append(grid)
            pos = int(grid.max()) + 1
    return torch.cat(parts, dim=1)[:, None]


def _naive_mrope(x, positions, inv_freq, pair_axes, interleaved_layout):
    """float64 rotation: pair j turns by positions[axis(j)] * inv_freq[j] (x: (B, H, L, D))."""
    x = x.double()
    pairs = inv_freq.numel()
    coords = positions.double().permute(1, 2, 0)[..., pair_axes]  # (B, L, P)
    angle = (coords * inv_freq.double())[:, None]
    if interleaved_layout:
        a, b = x[..., 0:2 * pairs:2], x[..., 1:2 * pairs:2]
    else:
        a, b = x[..., :pairs], x[..., pairs:2 * pairs]
    ra, rb = a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()
    out = x.clone()
    if interleaved_layout:
        out[..., 0:2 * pairs:2], out[..., 1:2 * pairs:2] = ra, rb
    else:
        out[..., :pairs], out[..., pairs:2 * pairs] = ra, rb
    return out


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_text_positions_are_exactly_1d_rope(interleaved, layout):
    torch.manual_seed(0)
    mrope = MRoPE(16, base=500.0, mrope_section=[2, 3, 3], mrope_interleaved=interleaved, layout=layout)
    rope = RoPE(16, base=500.0, layout=layout)
    q, k = torch.randn(2, 3, 9, 16), torch.randn(2, 3, 9, 16)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8], [5, 9, 11, 12, 13, 40, 41, 42, 1000]])
    expected = rope.rotate(q, k, pos, pos)
    # Expanded (a view, as the model passes them) and materialised t = h = w positions.
    for three in (pos.expand(3, 2, 9), pos.expand(3, 2, 9).clone()):
        got = mrope.rotate(q, k, three, three)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_text_only_model_equals_the_rope_model_exactly():
    torch.manual_seed(0)
    rope_model = posemb.TransformerLM(64, 32, 2, 2, scheme="rope").eval()
    torch.manual_seed(0)
    mrope_model = posemb.TransformerLM(64, 32, 2, 2, scheme="mrope", mrope_section=[4, 2, 2]).eval()
    tokens = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert torch.equal(rope_model(tokens), mrope_model(tokens))
        positions = torch.arange(12).expand(2, 12) + 7
        assert torch.equal(rope_model(tokens, positions=positions),
                           mrope_model(tokens, positions=positions.expand(3, 2, 12)))


# (True, (1, 1, 1)): the interleaved rule reads only the height/width counts, extra pairs are temporal
@pytest.mark.parametrize("interleaved,section", [(False, (2, 3, 3)), (True, (4, 2, 2)), (False, (0, 4, 4)),
                                                 (True, (1, 1, 1))])
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_pairs_follow_their_axis_float64(interleaved, section, layout):
    torch.manual_seed(1)
    mrope = MRoPE(20, base=1000.0, mrope_section=section, mrope_interleaved=interleaved, layout=layout,
                  partial_rotary_factor=0.8)  # 16 rotated channels, 4 pass through
    q, k = torch.randn(1, 2, 21, 20, dtype=torch.float64), torch.randn(1, 2, 21, 20, dtype=torch.float64)
    pos = _hand_built_positions()
    # The reference assignment, written out from the model cards / papers:
    if interleaved:  # Qwen3-VL: T H W T H W ..., height/width only within 3 * their section
        axes = [1 if j % 3 == 1 and j < 3 * section[1] else 2 if j % 3 == 2 and j < 3 * section[2] else 0
                for j in range(8)]
    else:  # Qwen2-VL: contiguous sections
        axes = [0] * section[0] + [1] * section[1] + [2] * section[2]
    assert mrope_pair_axes(section, interleaved=interleaved, pairs=8).tolist() == axes
    inv_freq = 1000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    got_q, got_k = mrope.rotate(q, k, pos, pos)
    torch.testing.assert_close(got_q, _naive_mrope(q, pos, inv_freq, torch.tensor(axes), layout == "interleaved"),
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(got_k, _naive_mrope(k, pos, inv_freq, torch.tensor(axes), layout == "interleaved"),
                               atol=1e-12, rtol=0)


def test_scores_depend_only_on_coordinate_differences():
    torch.manual_seed(2)
    mrope = MRoPE(16, mrope_section=[2, 3, 3])
    q, k = torch.randn(1, 2, 21, 16, dtype=torch.float64), torch.randn(1, 2, 21, 16, dtype=torch.float64)
    pos = _hand_built_positions()
    shift = torch.tensor([5, -2, 11])[:, None, None]  # a different shift per axis
    a_q, a_k = mrope.rotate(q, k, pos, pos)
    b_q, b_k = mrope.rotate(q, k, pos + 20 + shift, pos + 20 + shift)
    torch.testing.assert_close(a_q @ a_k.transpose(-1, -2), b_q @ b_k.transpose(-1, -2), atol=1e-10, rtol=0)
    # ... and they do depend on each axis: moving only the width of one token changes them.
    moved = pos.clone()
    moved[2, 0, 5] += 1
    c_q, c_k = mrope.rotate(q, k, moved, moved)
    assert not torch.allclose(a_q @ a_k.transpose(-1, -2), c_q @ c_k.transpose(-1, -2))


# ---- transformers parity ---------------------------------------------------------------------------

def _token_types_and_grids():
    # text 3 | image 1x4x4 patches (merged 2x2 -> 2x2 tokens) | text 2 | video 2x4x4 (-> 2 frames of 2x2) | text 2
    types = torch.tensor([[0] * 3 + [1] * 4 + [0] * 2 + [2] * 8 + [0] * 2])
    return types, torch.tensor([[1, 4, 4]]), torch.tensor([[2, 4, 4]])


def _rope_index(model_class, config, types, image_grid, video_grid):
    """The model's own ``get_rope_index`` without building the model: it reads only the config and
    ``get_vision_position_ids``, which uses no weights."""
    owner = types_module.SimpleNamespace(config=config)
    owner.get_vision_position_ids = functools.partial(model_class.get_vision_position_ids, owner)
    position_ids, _ = model_class.get_rope_index(owner, torch.zeros_like(types), types, image_grid_thw=image_grid,
                                                 video_grid_thw=video_grid)
    return position_ids


@pytest.fixture(scope="module")
def qwen2_vl():
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    config = transformers.Qwen2VLConfig(
        text_config=dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=2, intermediate_size=32,
                         num_hidden_layers=1, vocab_size=64, bos_token_id=0, eos_token_id=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, embed_dim=16, num_heads=2, hidden_size=32, spatial_merge_size=2,
                           patch_size=2, temporal_patch_size=2))
    return modeling_qwen2_vl, config


def test_qwen2_vl_image_and_video_positions_match_transformers(qwen2_vl):
    module, config = qwen2_vl
    types, image_grid, video_grid = _token_types_and_grids()
    position_ids = _rope_index(module.Qwen2VLModel, config, types, image_grid, video_grid)
    assert position_ids.shape == (3, 1, types.shape[1])
    assert not torch.equal(position_ids[0], position_ids[1])  # really multimodal positions
    torch.manual_seed(3)
    q, k = torch.randn(1, 2, types.shape[1], 16), torch.randn(1, 2, types.shape[1], 16)
    cos, sin = module.Qwen2VLRotaryEmbedding(config.text_config)(q, position_ids)
    expected = module.apply_rotary_pos_emb(q, k, cos, sin)
    mrope = MRoPE(16, base=10000.0, mrope_section=[2, 3, 3])
    got = mrope.rotate(q, k, position_ids, position_ids)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-5)


def test_qwen2_5_vl_uses_the_same_contiguous_mrope():
    pytest.importorskip("transformers")
    from transformers import Qwen2_5_VLTextConfig
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as module

    config = Qwen2_5_VLTextConfig(hidden_size=64, num_attention_heads=2, num_key_value_heads=2,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                   "mrope_section": [4, 6, 6]})
    position_ids = _hand_built_positions().expand(3, 2, -1).clone()
    position_ids[:, 1] += 100
    torch.manual_seed(4)
    q, k = torch.randn(2, 2, position_ids.shape[-1], 32), torch.randn(2, 2, position_ids.shape[-1], 32)
    cos, sin = module.Qwen2_5_VLRotaryEmbedding(config)(q, position_ids)
    expected = module.apply_rotary_pos_emb(q, k, cos, sin)
    got = MRoPE(32, base=1e6, mrope_section=[4, 6, 6]).rotate(q, k, position_ids, position_ids)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-5)


def test_qwen3_vl_interleaved_mrope_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3_vl import modeling_qwen3_vl as module

    config = transformers.Qwen3VLConfig(
        text_config=dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                         intermediate_size=32, num_hidden_layers=1, vocab_size=64,
                         rope_parameters={"rope_type": "default", "rope_theta": 5000.0, "mrope_section": [4, 2, 2],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=16, out_hidden_size=32,
                           spatial_merge_size=2, patch_size=2, temporal_patch_size=2, deepstack_visual_indexes=[]))
    _, image_grid, video_grid = _token_types_and_grids()
    # Qwen3-VL separates video frames by timestamp text: one grid per frame.
    types = torch.tensor([[0] * 3 + [1] * 4 + [0] * 2 + [2] * 4 + [0] + [2] * 4 + [0] * 2])
    position_ids = _rope_index(module.Qwen3VLModel, config, types, image_grid, video_grid)
    assert not torch.equal(position_ids[1], position_ids[2])
    torch.manual_seed(5)
    q, k = torch.randn(1, 2, types.shape[1], 16), torch.randn(1, 2, types.shape[1], 16)
    cos, sin = module.Qwen3VLTextRotaryEmbedding(config.text_config)(q, position_ids)
    expected = module.apply_rotary_pos_emb(q, k, cos, sin)
    mrope = MRoPE(16, base=5000.0, mrope_section=[4, 2, 2], mrope_interleaved=True)
    got = mrope.rotate(q, k, position_ids, position_ids)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-5)
    # The contiguous layout on the same positions is a different rotation.
    other = MRoPE(16, base=5000.0, mrope_section=[4, 2, 2]).rotate(q, k, position_ids, position_ids)
    assert not torch.allclose(other[0], expected[0], atol=1e-3)


# ---- the model -------------------------------------------------------------------------------------

def test_model_decodes_multimodal_positions_with_its_cache():
    torch.manual_seed(6)
    model = posemb.TransformerLM(64, 32, 2, 2, scheme="mrope", mrope_interleaved=True).eval()
    pos = _hand_built_positions().expand(3, 2, -1).clone()
    tokens = torch.randint(0, 64, (2, pos.shape[-1]))
    with torch.no_grad():
        full = model(tokens, positions=pos)
        cache = model.new_cache()
        first = model(tokens[:, :10], positions=pos[..., :10], cache=cache)
        rest = model(tokens[:, 10:], positions=pos[..., 10:], cache=cache)
        torch.testing.assert_close(torch.cat([first, rest], 1), full, atol=1e-5, rtol=1e-5)
        # Text after the video continues one past the largest coordinate so far (Qwen2-VL).
        assert cache.next_position.tolist() == [int(pos.max()) + 1] * 2
        step = model(tokens[:, :1], cache=cache)
        nxt = torch.full((2, 1), int(pos.max()) + 1)
        again = model(torch.cat([tokens, tokens[:, :1]], 1), positions=torch.cat([pos, nxt.expand(3, 2, 1)], -1))
        torch.testing.assert_close(step[:, -1], again[:, -1], atol=1e-5, rtol=1e-5)


def test_positions_of_the_wrong_shape_are_refused():
    model = posemb.TransformerLM(64, 32, 1, 2, scheme="mrope")
    tokens = torch.randint(0, 64, (2, 5))
    with pytest.raises(ValueError, match=r"positions must have shape \(axes, batch, seq\) = \(3, 2, 5\)"):
        model(tokens, positions=torch.zeros(2, 5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="positions must have the shape of tokens"):
        model(tokens, positions=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        model(tokens, positions=torch.zeros(3, 2, 5))
    with pytest.raises(ValueError, match="positions must be >= 0"):
        model(tokens, positions=-torch.ones(3, 2, 5, dtype=torch.long))
    mrope = MRoPE(16)
    with pytest.raises(ValueError, match=r"\(3, batch, seq\)"):
        mrope.mrope_cos_sin(torch.zeros(2, 1, 5, dtype=torch.long))
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="q_positions must have 3 dimensions"):
        mrope.rotate(q, q, torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))


@pytest.mark.parametrize("options,error,match", [
    (dict(mrope_section=[2, 3, 2]), ValueError, r"mrope_section must sum to rotary_dim / 2 = 8"),
    (dict(mrope_section=[4, 4]), ValueError, "mrope_section must be a list of 3"),
    (dict(mrope_section="244"), TypeError, "mrope_section must be"),
    (dict(mrope_section=[4, -1, 5]), ValueError, r"mrope_section\[1\] must be >= 0"),
    (dict(mrope_section=[4.0, 2, 2]), TypeError, r"mrope_section\[0\] must be an int"),
    (dict(mrope_interleaved="yes"), TypeError, "mrope_interleaved must be a bool"),
    (dict(base=0.5), ValueError, "base must be > 1"),
])
def test_bad_options_are_named(options, error, match):
    with pytest.raises(error, match=match):
        posemb.build("mrope", head_dim=16, **options)


def test_default_section_follows_qwen2_vl_proportions():
    assert default_mrope_section(64) == (16, 24, 24)
    for pairs in range(1, 40):
        section = default_mrope_section(pairs)
        assert sum(section) == pairs and min(section) >= 0
    assert MRoPE(128).mrope_section == (16, 24, 24)
    assert math.isclose(sum(MRoPE(64, partial_rotary_factor=0.5).mrope_section), 16)
