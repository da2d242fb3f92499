"""Per-layer scheme patterns in TransformerLM: iRoPE-style RoPE/NoPE interleaving and local/global
RoPE bases, with the KV cache, translation invariance and clear errors."""
import pytest
import torch

import posemb
from posemb.schemes.nope import NoPE
from posemb.schemes.rope import RoPE

VOCAB = 64
IROPE = ["rope", "rope", "rope", "nope"]
LOCAL_GLOBAL = [("rope", {"base": 1e4}), ("rope", {"base": 1e4}), ("rope", {"base": 1e6})]


def _model(scheme, depth, seed=0, **options):
    torch.manual_seed(seed)
    return posemb.TransformerLM(VOCAB, 32, depth, 4, scheme=scheme, **options).eval()


def test_irope_pattern_repeats_over_depth_and_shares_one_rope():
    model = _model(IROPE, 8)
    schemes = [block.attn.scheme for block in model.blocks]
    assert [type(s) for s in schemes] == [RoPE, RoPE, RoPE, NoPE] * 2
    assert len({id(s) for s in schemes if isinstance(s, RoPE)}) == 1  # one shared instance, as scheme="rope"
    assert [name for name, _ in model.layer_specs] == IROPE * 2


def test_local_and_global_bases_per_layer():
    model = _model(LOCAL_GLOBAL, 6)
    bases = [block.attn.scheme.base for block in model.blocks]
    assert bases == [1e4, 1e4, 1e6] * 2
    assert len({id(block.attn.scheme) for block in model.blocks}) == 2


def test_a_uniform_pattern_is_the_single_scheme_model():
    tokens = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        assert torch.equal(_model("rope", 2)(tokens), _model(["rope"], 2)(tokens))
        assert torch.equal(_model("rope", 2, base=500.0)(tokens), _model([("rope", {"base": 500.0})], 2)(tokens))


def test_nope_layers_ignore_positions_and_rope_layers_do_not():
    model = _model(["rope", "nope"], 2)
    x = torch.randn(1, 6, 32)
    with torch.no_grad():
        positions = torch.arange(6)[None]
        reordered = torch.tensor([[0, 5, 1, 4, 2, 3]])
        nope_attention, rope_attention = model.blocks[1].attn, model.blocks[0].attn
        assert torch.equal(nope_attention(x, positions), nope_attention(x, reordered))
        assert not torch.allclose(rope_attention(x, positions), rope_attention(x, reordered))


@pytest.mark.parametrize("pattern", [IROPE, LOCAL_GLOBAL, ["rope_mixed", "nope"], ["mrope", "nope"],
                                     [("rope", {"rope_type": "dynamic", "scaling": {"factor": 2.0},
                                                "max_position_embeddings": 6}), "nope"]],
                         ids=["irope", "local-global", "rope_mixed", "mrope", "dynamic"])
def test_decoding_equals_the_full_pass_and_shifts_change_nothing(pattern):
    model = _model(pattern, len(pattern) * 2, seed=1)
    with torch.no_grad():
        for block in model.blocks:  # sharpen attention so a wrong rotation shows
            block.attn.qkv.weight.mul_(4.0)
    tokens = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        cache = model.new_cache()
        model(tokens[:, :4], cache=cache)
        for t in range(4, 12):
            step = model(tokens[:, t:t + 1], cache=cache)[:, -1]
            torch.testing.assert_close(step, model(tokens[:, :t + 1])[:, -1], atol=1e-5, rtol=1e-5)
        if "dynamic" not in str(pattern):
            base = torch.arange(12).expand(2, 12)
            torch.testing.assert_close(model(tokens, positions=base + 29), model(tokens, positions=base),
                                       atol=2e-5, rtol=1e-5)


def test_per_layer_schemes_in_a_pattern_get_their_own_instances():
    model = _model(["rope_mixed", "nope"], 4)
    mixed = [block.attn.scheme for block in model.blocks[0::2]]
    assert mixed[0] is not mixed[1]
    assert model.num_position_parameters() == 2 * mixed[0].freqs.numel()


def test_model_options_go_to_the_schemes_that_take_them():
    model = _model(["rope", ("rope", {"base": 1e6}), "nope"], 3, base=5e5, max_position_embeddings=128)
    first, second = model.blocks[0].attn.scheme, model.blocks[1].attn.scheme
    assert (first.base, second.base) == (5e5, 1e6)  # an entry's own options win
    assert first.max_position_embeddings == second.max_position_embeddings == 128
    with pytest.raises(ValueError, match=r"option\(s\) \['num_buckets'\] are taken by no scheme of the pattern"):
        _model(IROPE, 4, num_buckets=8)


def test_caches_of_different_patterns_are_not_interchangeable():
    tokens = torch.randint(0, VOCAB, (1, 4))
    irope, other = _model(IROPE, 4), _model(["rope", "nope", "rope", "nope"], 4)
    cache = irope.new_cache()
    with torch.no_grad():
        irope(tokens, cache=cache)
        with pytest.raises(ValueError, match="filled by another model"):
            other(tokens, cache=cache)


@pytest.mark.parametrize("scheme,depth,error,match", [
    (["rope", "rope", "nope"], 4, ValueError, "the scheme pattern has 3 entries, which must divide depth=4"),
    ([], 2, TypeError, "scheme must be a scheme name or a non-empty list"),
    (["rope", 3], 2, TypeError, r"scheme\[1\] must be a scheme name or a \(name, options dict\) pair"),
    ([("rope", "base=1")], 1, TypeError, r"scheme\[0\] must be"),
    (["rope", "ropey"], 2, ValueError, "unknown scheme 'ropey'"),
    (["sinusoidal", "rope"], 2, ValueError, "input-site scheme"),
    (["mrope", "rope"], 2, ValueError, "read positions in different layouts"),
    ([("rope", {"bass": 1.0})], 1, ValueError, "unknown option"),
    ([("rope", {"base": "big"})], 1, TypeError, "base must be"),
])
def test_bad_patterns_are_named(scheme, depth, error, match):
    with pytest.raises(error, match=match):
        _model(scheme, depth)


def test_uniform_input_site_pattern_acts_once_on_the_input():
    model = _model(["sinusoidal"], 2)
    assert model.input_scheme is not None and all(block.attn.scheme is None for block in model.blocks)
