"""Golden tests for the foundation schemes: each against a naive implementation written from the
paper's formula, plus T5 buckets against Hugging Face transformers and ALiBi slopes against the paper."""
import math

import pytest
import torch

import posemb
from posemb.functional.alibi import alibi_slopes
from posemb.functional.buckets import t5_relative_bucket
from posemb.functional.sinusoidal import sinusoid_concat, sinusoidal_table
from posemb.model.attention import attend


def naive_attention(q, k, v, bias=None, causal=True):
    """softmax(q k^T / sqrt(d) + bias) v in float64, with the causal mask by sequence index."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias.double()
    if causal:
        q_len, k_len = q.shape[-2], k.shape[-2]
        for i in range(q_len):
            scores[..., i, k_len - q_len + i + 1:] = float("-inf")
    return torch.softmax(scores, -1) @ v


def random_qkv(batch=2, heads=4, q_len=12, k_len=12, dim=16):
    return (torch.randn(batch, heads, q_len, dim), torch.randn(batch, heads, k_len, dim),
            torch.randn(batch, heads, k_len, dim))


def positions(batch, length, start=0):
    return (torch.arange(length) + start).expand(batch, length)


# ---- sinusoidal ------------------------------------------------------------------------------

def test_sinusoidal_table_matches_the_paper_formula_elementwise():
    dim, base = 16, 10000.0
    pos = torch.tensor([[0, 1, 7, 1000, 123456]])
    table = sinusoidal_table(pos, dim, base, dtype=torch.float64)
    for row, p in enumerate(pos[0].tolist()):
        for i in range(dim // 2):
            angle = p / base ** (2 * i / dim)
            assert table[0, row, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-12)
            assert table[0, row, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_sinusoid_concat_is_sin_then_cos_rounded_once(dtype):
    """Transformer-XL's order ``[sin, cos]``, negative distances included, each entry the float64
    value rounded once to ``dtype``."""
    dim, base = 12, 10000.0
    pos = torch.tensor([[-300, -1, 0, 5, 4097]])
    table = sinusoid_concat(pos, dim, base, dtype=dtype)
    assert table.shape == (1, 5, dim) and table.dtype == dtype
    for row, p in enumerate(pos[0].tolist()):
        for i in range(dim // 2):
            angle = p / base ** (2 * i / dim)
            for column, value in ((i, math.sin(angle)), (dim // 2 + i, math.cos(angle))):
                error = abs(table[0, row, column].item() - value)
                # plus a few float64 ulps of the angle itself (the float64 product rounds too)
                assert error <= 0.5 * torch.finfo(dtype).eps * abs(value) + 1e-15 * (1 + abs(p)), (p, column, error)


def test_sinusoidal_scheme_adds_the_table_at_any_length():
    x = torch.randn(2, 5, 8)
    pos = positions(2, 5, start=100_000)
    table = sinusoidal_table(pos, 8, dtype=torch.float64)
    bare = posemb.build("sinusoidal", dim=8, scale=1.0)
    torch.testing.assert_close(bare.embed_input(x, pos).double(), x.double() + table, atol=1e-6, rtol=0)
    default = posemb.build("sinusoidal", dim=8)  # scaled by 1/sqrt(dim), Vaswani's ratio
    torch.testing.assert_close(default.embed_input(x, pos).double(), x.double() + table / 8 ** 0.5,
                               atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="scale must be > 0"):
        posemb.build("sinusoidal", dim=8, scale=0.0)


# ---- learned ---------------------------------------------------------------------------------

def test_learned_scheme_adds_its_table_rows():
    scheme = posemb.build("learned", dim=8, max_positions=10)
    x = torch.randn(1, 4, 8)
    pos = torch.tensor([[9, 0, 3, 3]])
    torch.testing.assert_close(scheme.embed_input(x, pos), x + scheme.table[[9, 0, 3, 3]][None])


def test_learned_scheme_refuses_positions_beyond_its_table_and_names_n_max():
    scheme = posemb.build("learned", dim=8, max_positions=10)
    with pytest.raises(ValueError, match="max_positions=10"):
        scheme.embed_input(torch.randn(1, 11, 8), positions(1, 11))
    model = posemb.TransformerLM(256, 32, 1, 2, scheme="learned", max_positions=16)
    with pytest.raises(ValueError, match="N_max = 16"):
        model(torch.randint(0, 256, (1, 17)))


# ---- ALiBi -----------------------------------------------------------------------------------

def paper_slopes(n):
    """Press et al. §3: powers of two get 2^(-8/n)^(1..n); others take the closest smaller power of
    two, then every other slope of twice that many heads (written here recursively from the text)."""
    if n & (n - 1) == 0:
        return [2 ** (-8 * (i + 1) / n) for i in range(n)]
    closest = 1 << (n.bit_length() - 1)
    extra = paper_slopes(2 * closest)[::2][: n - closest]
    return paper_slopes(closest) + extra


@pytest.mark.parametrize("heads", range(1, 65))
def test_alibi_slopes_equal_the_papers_for_1_to_64_heads(heads):
    assert alibi_slopes(heads) == pytest.approx(paper_slopes(heads), rel=1e-12)


def test_alibi_slopes_known_values():
    assert alibi_slopes(8) == pytest.approx([2 ** -i for i in range(1, 9)])
    twelve = alibi_slopes(12)
    assert twelve[8:] == pytest.approx([0.70711, 0.35355, 0.17678, 0.08839], abs=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_alibi_attention_equals_the_naive_formula(causal):
    q, k, v = random_qkv()
    scheme = posemb.build("alibi", num_heads=4)
    pos = positions(2, 12, start=5)
    m = torch.tensor(alibi_slopes(4), dtype=torch.float64)
    i = torch.arange(12, dtype=torch.float64)
    bias = -m[:, None, None] * (i[None, :, None] - i[None, None, :]).abs()
    expected = naive_attention(q, k, v, bias, causal)
    got = attend(q, k, v, scheme, pos, pos, causal=causal)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)


# ---- T5 --------------------------------------------------------------------------------------

def test_t5_buckets_equal_transformers_for_every_distance():
    modeling_t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    reference = modeling_t5.T5Attention._relative_position_bucket
    distance = torch.arange(-2000, 2001)
    for bidirectional in (True, False):
        for num_buckets, max_distance in [(32, 128), (16, 64), (64, 256), (8, 20), (32, 1000), (4, 8)]:
            ours = t5_relative_bucket(distance, bidirectional=bidirectional, num_buckets=num_buckets,
                                      max_distance=max_distance)
            theirs = reference(distance, bidirectional=bidirectional, num_buckets=num_buckets,
                               max_distance=max_distance)
            assert torch.equal(ours, theirs), (bidirectional, num_buckets, max_distance)


def test_t5_bucket_start_distances_from_the_reference_table():
    causal = t5_relative_bucket(-torch.arange(0, 200), bidirectional=False)
    starts = {}
    for distance, bucket in enumerate(causal.tolist()):
        starts.setdefault(bucket, distance)
    assert [starts[b] for b in (15, 16, 17, 20, 25, 30, 31)] == [15, 16, 19, 27, 52, 99, 113]


@pytest.mark.parametrize("causal", [True, False])
def test_t5_attention_equals_the_naive_formula(causal):
    q, k, v = random_qkv(k_len=12)
    scheme = posemb.build("t5", num_heads=4, causal=causal, num_buckets=16, max_distance=32)
    torch.nn.init.normal_(scheme.bias.weight)
    pos = positions(2, 12, start=3)
    bias = torch.zeros(4, 12, 12, dtype=torch.float64)
    for i in range(12):
        for j in range(12):
            bucket = t5_relative_bucket(torch.tensor(j - i), bidirectional=not causal, num_buckets=16, max_distance=32)
            bias[:, i, j] = scheme.bias.weight[bucket].double()
    expected = naive_attention(q, k, v, bias, causal)
    got = attend(q, k, v, scheme, pos, pos, causal=causal)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)


# ---- nope ------------------------------------------------------------------------------------

def test_nope_bidirectional_attention_is_permutation_equivariant():
    model = posemb.TransformerLM(256, 32, 2, 2, scheme="nope", causal=False).eval()
    tokens = torch.randint(0, 256, (1, 10))
    perm = torch.randperm(10)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[:, perm], model(tokens[:, perm]), atol=1e-5, rtol=0)


def test_plain_attention_equals_the_naive_formula():
    q, k, v = random_qkv()
    pos = positions(2, 12)
    for causal in (True, False):
        got = attend(q, k, v, posemb.build("nope"), pos, pos, causal=causal)
        torch.testing.assert_close(got.double(), naive_attention(q, k, v, None, causal), atol=1e-5, rtol=0)
