"""A KV cache records the model that filled it; another model refuses it with one clear line."""
import pytest
import torch

import posemb
from posemb.model.cache import KVCache

VOCAB = 32


def model(scheme="rope", *, dim=32, depth=2, heads=4, **options):
    return posemb.TransformerLM(VOCAB, dim, depth, heads, scheme=scheme, **options).eval()


def filled_cache(source):
    cache = source.new_cache()
    with torch.no_grad():
        source(torch.randint(0, VOCAB, (1, 5)), cache=cache)
    return cache


@pytest.mark.parametrize("other,what", [
    (dict(scheme="alibi"), "scheme 'alibi'"),
    (dict(scheme="rope", base=500000.0), "base=500000.0"),
    (dict(depth=3), "depth 3"),
    (dict(dim=64), "dim 64"),
    (dict(heads=8), "heads 8"),
])
def test_a_cache_from_another_model_is_refused(other, what):
    cache = filled_cache(model())
    with pytest.raises(ValueError, match="cache was filled by another model") as info:
        with torch.no_grad():
            model(**other)(torch.randint(0, VOCAB, (1, 1)), cache=cache)
    message = str(info.value)
    assert "\n" not in message and what in message and "new_cache()" in message


def test_an_empty_cache_from_another_model_is_refused_too():
    with pytest.raises(ValueError, match="another model"):
        model(depth=3)(torch.randint(0, VOCAB, (1, 2)), cache=model().new_cache())


def test_the_same_configuration_accepts_the_cache_and_decodes_exactly():
    torch.manual_seed(0)
    first = model("t5")
    cache = filled_cache(first)
    twin = model("t5")
    twin.load_state_dict(first.state_dict())
    assert twin.cache_signature() == first.cache_signature()
    tokens = torch.cat([cache.tokens, torch.randint(0, VOCAB, (1, 1))], 1)
    with torch.no_grad():
        step = twin(tokens[:, -1:], cache=cache)
        torch.testing.assert_close(step[:, -1], first(tokens)[:, -1], atol=1e-5, rtol=1e-5)


def test_a_hand_built_cache_is_signed_by_its_first_model():
    cache = KVCache(2)
    first = model()
    with torch.no_grad():
        first(torch.randint(0, VOCAB, (1, 3)), cache=cache)
    assert cache.signature == first.cache_signature()
    with pytest.raises(ValueError, match="another model"):
        model("nope")(torch.randint(0, VOCAB, (1, 1)), cache=cache)


def test_a_hand_built_cache_of_the_wrong_depth_is_refused():
    with pytest.raises(ValueError, match="holds 3 layers"):
        model()(torch.randint(0, VOCAB, (1, 3)), cache=KVCache(3))
