import pytest
import torch

import posemb
from posemb.registry import build_for_model
from posemb.schemes.base import FAMILIES, SITES, PositionalScheme

EXPECTED = {"nope", "sinusoidal", "learned", "t5", "alibi"}


def test_available_lists_the_foundation_schemes_sorted():
    names = posemb.available()
    assert EXPECTED <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("name", posemb.available())
def test_every_scheme_declares_a_valid_site_and_family(name):
    cls = posemb.scheme_class(name)
    assert issubclass(cls, PositionalScheme)
    assert cls.site in SITES
    assert cls.family in FAMILIES
    assert cls.name == name


def test_build_returns_a_module_with_the_given_options():
    t5 = posemb.build("t5", num_heads=4, num_buckets=16, max_distance=64)
    assert isinstance(t5, torch.nn.Module)
    assert t5.bias.weight.shape == (16, 4)


def test_unknown_scheme_names_the_allowed_ones():
    with pytest.raises(ValueError) as info:
        posemb.build("rotary-ish")
    assert "rotary-ish" in str(info.value)
    for name in EXPECTED:
        assert name in str(info.value)


def test_unknown_option_names_the_allowed_ones():
    with pytest.raises(ValueError) as info:
        posemb.build("alibi", num_heads=4, slope_power=2)
    message = str(info.value)
    assert "slope_power" in message and "num_heads" in message


def test_missing_required_option_is_named():
    with pytest.raises(ValueError, match="num_heads"):
        posemb.build("alibi")


def test_model_context_is_passed_only_where_the_scheme_takes_it():
    scheme = build_for_model("alibi", context={"dim": 64, "num_heads": 4, "head_dim": 16}, options={})
    assert scheme.num_heads == 4
    with pytest.raises(ValueError, match="set by the model"):
        build_for_model("alibi", context={"num_heads": 4}, options={"num_heads": 8})


def test_model_rejects_unknown_scheme_options():
    with pytest.raises(ValueError, match="max_positionz"):
        posemb.TransformerLM(256, 32, 1, 2, scheme="learned", max_positionz=10)


def test_registering_a_new_scheme_needs_no_attention_edit():
    """A scheme defined outside the package works in the model through its site's hook."""

    @posemb.register("test_constant_bias")
    class ConstantBias(PositionalScheme):
        site = "bias"
        family = "relative"

        def __init__(self, num_heads: int):
            super().__init__()
            self.num_heads = num_heads

        def score_bias(self, q_positions, k_positions):
            distance = (k_positions[:, None, :] - q_positions[:, :, None]).float()
            return (-0.1 * distance.abs())[:, None].expand(-1, self.num_heads, -1, -1)

    try:
        model = posemb.TransformerLM(256, 32, 1, 2, scheme="test_constant_bias")
        assert model(torch.randint(0, 256, (1, 8))).shape == (1, 8, 256)
    finally:
        from posemb import registry
        registry._SCHEMES.pop("test_constant_bias")
