"""Every bool / int / float option of every registered scheme (walked through ``posemb.available()``)
refuses values of the wrong type with a TypeError naming the option: ``registry.build`` checks each
option against the constructor's annotation, so new schemes are covered without a line here."""
import inspect
import types
import typing

import pytest

import posemb
from posemb.registry import check_option_types, option_types, scheme_options

CONTEXT = {"dim": 32, "num_heads": 4, "head_dim": 8, "causal": True}
WRONG = {
    bool: ["yes", "false", 1, 0.0],
    int: [1.5, True, "3"],
    float: ["1.0", True],
}


def _plain(annotation):
    """(base type, allows None) for ``X`` or ``X | None`` with X in WRONG, else None."""
    members = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    optional = type(None) in members
    rest = [m for m in members if m is not type(None)]
    if len(rest) == 1 and rest[0] in WRONG:
        return rest[0], optional
    return None


def _cases():
    for name in posemb.available():
        for option, annotation in option_types(name).items():
            plain = _plain(annotation)
            if plain is None:
                continue
            kind, optional = plain
            for value in WRONG[kind] + ([] if optional else [None]):
                yield pytest.param(name, option, value, id=f"{name}-{option}-{value!r}")


def _base_options(name):
    return {k: v for k, v in CONTEXT.items() if k in scheme_options(name)}


@pytest.mark.parametrize("name", posemb.available())
def test_every_option_is_annotated_so_it_can_be_checked(name):
    hints = option_types(name)
    assert set(hints) == set(scheme_options(name)), f"{name}: unannotated options {set(scheme_options(name)) - set(hints)}"


@pytest.mark.parametrize("name,option,value", list(_cases()))
def test_wrong_type_is_refused_naming_the_option(name, option, value):
    options = {**_base_options(name), option: value}
    with pytest.raises(TypeError, match=rf"^{option} must be .*scheme '{name}'"):
        posemb.build(name, **options)


@pytest.mark.parametrize("name", posemb.available())
def test_defaults_and_model_context_pass_the_check(name):
    defaults = {k: v for k, v in scheme_options(name).items() if v is not inspect.Parameter.empty}
    check_option_types(name, {**defaults, **_base_options(name)})
    posemb.build(name, **_base_options(name))


def test_legitimate_values_still_pass():
    posemb.build("rope", head_dim=8, base=500000, rope_type="linear", scaling={"factor": 2.0})
    posemb.build("sinusoidal", dim=8, scale=None)
    posemb.build("sinusoidal", dim=8, scale=1)
    posemb.build("deberta", dim=8, num_heads=2, pos_att_type="c2p|p2c")
    posemb.build("deberta", dim=8, num_heads=2, pos_att_type=("c2p",))
    posemb.build("transformer_xl", dim=8, num_heads=2, head_dim=None)
    with pytest.raises(TypeError, match="scaling must be a dict or None"):
        posemb.build("rope", head_dim=8, scaling=[("factor", 2.0)])


def test_the_model_passes_options_through_the_same_check():
    with pytest.raises(TypeError, match="per_head must be a bool"):
        posemb.TransformerLM(16, 32, 1, 4, scheme="shaw", per_head="yes")
    with pytest.raises(TypeError, match="exact_decoding must be a bool"):
        posemb.TransformerLM(16, 32, 1, 4, scheme="rope", exact_decoding=None)


@pytest.mark.parametrize("scheme,option", [("alibi", "causal"), ("t5", "causal"), ("shaw", "per_head")])
def test_direct_construction_refuses_non_bools_too(scheme, option):
    cls = posemb.scheme_class(scheme)
    with pytest.raises(TypeError, match=f"{option} must be a bool"):
        cls(**{**_base_options(scheme), option: "no"})
