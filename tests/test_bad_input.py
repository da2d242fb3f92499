"""Bad input raises ValueError/TypeError whose message names the argument, never a crash deep in PyTorch."""
import pytest
import torch

import posemb
from posemb.functional.alibi import alibi_slopes
from posemb.functional.buckets import t5_relative_bucket
from posemb.functional.sinusoidal import sinusoidal_table
from posemb.model.attention import MultiHeadAttention


def test_model_dim_must_divide_into_heads():
    with pytest.raises(ValueError, match=r"dim \(30\) must be divisible by heads \(4\)"):
        posemb.TransformerLM(256, 30, 1, 4, scheme="nope")


@pytest.mark.parametrize("argument,kwargs", [
    ("vocab_size", dict(vocab_size=0, dim=32, depth=1, heads=2)),
    ("depth", dict(vocab_size=10, dim=32, depth=0, heads=2)),
    ("heads", dict(vocab_size=10, dim=32, depth=1, heads=2.5)),
])
def test_model_sizes_are_checked(argument, kwargs):
    with pytest.raises((ValueError, TypeError), match=argument):
        posemb.TransformerLM(scheme="nope", **kwargs)


def test_tokens_must_be_a_2d_integer_tensor_within_the_vocabulary():
    model = posemb.TransformerLM(16, 32, 1, 2, scheme="nope")
    with pytest.raises(ValueError, match="tokens must have 2 dimensions"):
        model(torch.randint(0, 16, (2, 3, 4)))
    with pytest.raises(TypeError, match="tokens must be an integer tensor"):
        model(torch.rand(2, 3))
    with pytest.raises(ValueError, match=r"vocab_size=16"):
        model(torch.tensor([[1, 2, 16]]))
    with pytest.raises(ValueError, match="at least one position"):
        model(torch.zeros(1, 0, dtype=torch.long))


def test_positions_must_match_tokens_and_be_non_negative():
    model = posemb.TransformerLM(16, 32, 1, 2, scheme="alibi")
    tokens = torch.randint(0, 16, (2, 5))
    with pytest.raises(ValueError, match="positions must have the shape of tokens"):
        model(tokens, positions=torch.arange(4)[None].expand(2, 4))
    with pytest.raises(TypeError, match="positions must be an integer tensor"):
        model(tokens, positions=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="positions must be >= 0"):
        model(tokens, positions=torch.arange(-1, 4)[None].expand(2, 5))


def test_attention_input_rank_and_width_are_checked():
    attention = MultiHeadAttention(32, 4)
    pos = torch.arange(5)[None]
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        attention(torch.randn(5, 32), pos)
    with pytest.raises(ValueError, match="dim=32"):
        attention(torch.randn(1, 5, 16), pos)


def test_head_count_mismatch_between_scheme_and_attention_is_named():
    attention = MultiHeadAttention(32, 4, posemb.build("alibi", num_heads=8))
    with pytest.raises(ValueError, match="heads=4"):
        attention(torch.randn(1, 5, 32), torch.arange(5)[None])


def test_odd_dimension_where_even_is_required():
    with pytest.raises(ValueError, match="dim must be even"):
        posemb.build("sinusoidal", dim=7)
    with pytest.raises(ValueError, match="dim must be even"):
        sinusoidal_table(torch.arange(3), 5)


def test_learned_table_size_and_range():
    with pytest.raises(ValueError, match="max_positions must be >= 1"):
        posemb.build("learned", dim=8, max_positions=0)
    scheme = posemb.build("learned", dim=8, max_positions=4)
    with pytest.raises(ValueError, match="max_positions=4"):
        scheme.embed_input(torch.randn(1, 5, 8), torch.arange(5)[None])


def test_t5_bucket_counts():
    with pytest.raises(ValueError, match="num_buckets must be >= 2"):
        posemb.build("t5", num_heads=2, num_buckets=1)
    with pytest.raises(ValueError, match="num_buckets must be >= 4"):
        posemb.build("t5", num_heads=2, num_buckets=2, causal=False)
    with pytest.raises(ValueError, match="max_distance must be >= 1"):
        t5_relative_bucket(torch.arange(3), bidirectional=False, max_distance=0)


def test_alibi_head_count():
    with pytest.raises(ValueError, match="num_heads must be >= 1"):
        alibi_slopes(0)
    with pytest.raises(TypeError, match="num_heads must be an int"):
        posemb.build("alibi", num_heads="8")


def test_cache_must_come_from_the_model():
    model = posemb.TransformerLM(16, 32, 1, 2, scheme="nope")
    with pytest.raises(TypeError, match="cache must be a KVCache"):
        model(torch.randint(0, 16, (1, 3)), cache={})


def test_attention_positions_are_checked_for_every_site():
    for scheme in (None, posemb.build("alibi", num_heads=4), posemb.build("shaw", head_dim=8, num_heads=4)):
        attention = MultiHeadAttention(32, 4, scheme)
        x = torch.randn(1, 3, 32)
        with pytest.raises(ValueError, match=r"positions must have shape \(batch, seq\) = \(1, 3\)"):
            attention(x, torch.arange(5)[None])
        with pytest.raises(TypeError, match="positions must be an integer tensor"):
            attention(x, torch.zeros(1, 3))
        with pytest.raises(ValueError, match="positions must have 2 dimensions"):
            attention(x, torch.arange(3))


def test_decoding_with_another_batch_size_is_refused():
    model = posemb.TransformerLM(16, 32, 1, 2, scheme="nope")
    cache = model.new_cache()
    model(torch.randint(0, 16, (2, 3)), cache=cache)
    with pytest.raises(ValueError, match="cache holds 2 sequences, tokens has 1"):
        model(torch.randint(0, 16, (1, 1)), cache=cache)


def test_generate_arguments_are_checked():
    model = posemb.TransformerLM(16, 32, 1, 2, scheme="nope")
    prompt = torch.randint(0, 16, (1, 3))
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        model.generate(prompt, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        model.generate(prompt, 2, top_k=0)
    with pytest.raises(TypeError, match="causal must be a bool"):
        posemb.TransformerLM(16, 32, 1, 2, scheme="nope", causal="no")


@pytest.mark.parametrize("make,argument", [
    (lambda: posemb.TransformerLM(16, 32, 1, 1 << 20, scheme="nope"), "heads"),
    (lambda: posemb.TransformerLM(1 << 30, 32, 1, 2, scheme="nope"), "vocab_size"),
    (lambda: posemb.TransformerLM(16, 1 << 30, 1, 2, scheme="nope"), "dim"),
    (lambda: posemb.TransformerLM(16, 32, 1 << 20, 2, scheme="nope"), "depth"),
    (lambda: MultiHeadAttention(32, 1 << 20), "num_heads"),
    (lambda: posemb.build("alibi", num_heads=1 << 20), "num_heads"),
    (lambda: posemb.build("learned", dim=8, max_positions=1 << 30), "max_positions"),
    (lambda: posemb.build("shaw", head_dim=8, max_relative_position=1 << 30), "max_relative_position"),
    (lambda: posemb.build("t5", num_heads=2, num_buckets=1 << 30), "num_buckets"),
    (lambda: posemb.build("deberta", dim=8, num_heads=2, max_relative_positions=1 << 30), "max_relative_positions"),
    (lambda: posemb.build("rope", head_dim=1 << 20), "head_dim"),
])
def test_size_arguments_have_a_named_upper_bound(make, argument):
    """A typo in a size must not try to allocate terabytes: the error names the argument, the bound and why."""
    with pytest.raises(ValueError, match=rf"^{argument} must be <= \d+, got \d+ \(.*(memory|rows)"):
        make()
