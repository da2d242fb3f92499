"""Content-position schemes (site 4): Shaw, Transformer-XL, DeBERTa.

Golden references are naive float64 implementations written from the papers' formulas (explicit
(Lq, Lk, d) relative tensors, explicit per-pair R_{i-j}, explicit delta(i, j)), compared with the
blocked, gather-based path that ``posemb.model.attention.attend`` runs. DeBERTa is also checked
against Hugging Face's ``DisentangledSelfAttention``.
"""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import posemb
from posemb.functional.buckets import deberta_log_bucket
from posemb.functional.relative import (clip_distance, distinct_distances, gather_relative, gather_relative_rows,
                                        scatter_relative)
from posemb.model.attention import attend

from _reference import relative_shift, sum_relative_logits

NAMES = ["shaw", "transformer_xl", "deberta"]
BATCH, HEADS, HEAD_DIM = 2, 3, 8
DIM = HEADS * HEAD_DIM


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------

def make_positions(q_len, k_len, starts=(37, 5)):
    """Keys at consecutive positions from a per-sequence start; queries are the last q_len keys."""
    k_pos = torch.stack([torch.arange(s, s + k_len) for s in starts[:BATCH]])
    return k_pos[:, k_len - q_len:], k_pos


def make_qkv(q_len, k_len):
    q = torch.randn(BATCH, HEADS, q_len, HEAD_DIM)
    k = torch.randn(BATCH, HEADS, k_len, HEAD_DIM)
    v = torch.randn(BATCH, HEADS, k_len, HEAD_DIM)
    return q, k, v


def randomise(scheme, std=0.5):
    """Non-zero random parameters, so every term matters in the comparison."""
    with torch.no_grad():
        for parameter in scheme.parameters():
            parameter.normal_(0, std)
    return scheme


def softmax_attention64(logits, v, values_extra, scale, q_pos, k_pos, causal):
    """Float64 softmax attention over explicit logits (B, H, Lq, Lk); mask from positions."""
    scores = logits * scale
    if causal:
        allowed = k_pos[:, None, None, :] <= q_pos[:, None, :, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = probs @ v
    if values_extra is not None:
        out = out + torch.einsum("bhij,bhijd->bhid", probs, values_extra)
    return out


CASES = [  # (q_len, k_len, causal): full self-attention both ways, and the decode case Lq < Lk
    (9, 9, True), (9, 9, False), (3, 11, True), (1, 7, True), (4, 10, False)]


# ------------------------------------------------------------------------------------------------
# 1. Golden tests
# ------------------------------------------------------------------------------------------------

def naive_shaw(scheme, q, k, v, q_pos, k_pos, causal):
    """Shaw et al. 2018 Eq. 3-5 with the explicit (B, Lq, Lk, d) tensors a^K and a^V."""
    kk = scheme.max_relative_position
    q, k, v = q.double(), k.double(), v.double()
    w_key, w_value = scheme.key_table.detach().double(), scheme.value_table.detach().double()
    batch, heads, q_len, d = q.shape
    k_len = k.shape[-2]
    a_key = torch.zeros(batch, heads, q_len, k_len, d, dtype=torch.float64)
    a_value = torch.zeros_like(a_key)
    for b in range(batch):
        for i in range(q_len):
            for j in range(k_len):
                row = max(-kk, min(kk, int(k_pos[b, j] - q_pos[b, i]))) + kk
                for h in range(heads):
                    table = 0 if w_key.shape[0] == 1 else h
                    a_key[b, h, i, j] = w_key[table, row]
                    a_value[b, h, i, j] = w_value[table, row]
    logits = torch.einsum("bhid,bhijd->bhij", q, k[:, :, None] + a_key)
    return softmax_attention64(logits, v, a_value, 1 / math.sqrt(d), q_pos, k_pos, causal)


def naive_transformer_xl(scheme, q, k, v, q_pos, k_pos, causal):
    """Dai et al. 2019 Eq. (a)+(b)+(c)+(d) with an explicit R_{i-j} for every pair."""
    q, k, v = q.double(), k.double(), v.double()
    batch, heads, q_len, d = q.shape
    k_len = k.shape[-2]
    dim = scheme.dim
    w_r = scheme.r_proj.weight.detach().double()                  # (H*d, dim)
    u = scheme.content_bias.detach().double()
    vb = scheme.position_bias.detach().double()
    inv_freq = [1.0 / (scheme.base ** (2 * t / dim)) for t in range(dim // 2)]
    logits = torch.zeros(batch, heads, q_len, k_len, dtype=torch.float64)
    for b in range(batch):
        for i in range(q_len):
            for j in range(k_len):
                dist = int(q_pos[b, i] - k_pos[b, j])
                r = torch.tensor([math.sin(dist * f) for f in inv_freq] + [math.cos(dist * f) for f in inv_freq],
                                 dtype=torch.float64)
                wr = (w_r @ r).view(heads, d)
                for h in range(heads):
                    logits[b, h, i, j] = (q[b, h, i] @ k[b, h, j] + q[b, h, i] @ wr[h]
                                          + u[h] @ k[b, h, j] + vb[h] @ wr[h])
    return softmax_attention64(logits, v, None, 1 / math.sqrt(d), q_pos, k_pos, causal)


def py_log_bucket(rel, bucket_size, max_position):
    """DeBERTa-v2's log bucket, written from the formula for one integer (float64 math)."""
    mid = bucket_size // 2
    abs_pos = mid - 1 if -mid < rel < mid else abs(rel)
    if abs_pos <= mid:
        return rel
    log_pos = math.ceil(math.log(abs_pos / mid) / math.log((max_position - 1) / mid) * (mid - 1)) + mid
    return int(math.copysign(log_pos, rel))


def naive_deberta(scheme, q, k, v, q_pos, k_pos, causal):
    """He et al. 2020 Eq. 4 with an explicit delta(i, j) per pair, in HF's index convention
    (p2c reads Q^r at the same delta(i, j) = clamp(i - j + span) as c2p; see deberta.py)."""
    q, k, v = q.double(), k.double(), v.double()
    batch, heads, q_len, d = q.shape
    k_len = k.shape[-2]
    span = scheme.span
    table = scheme.rel_embeddings.weight.detach().double()
    if scheme.rel_norm is not None:
        table = torch.nn.functional.layer_norm(table, (table.shape[-1],), scheme.rel_norm.weight.detach().double(),
                                               scheme.rel_norm.bias.detach().double(), scheme.rel_norm.eps)

    def project(linear):
        out = table @ linear.weight.detach().double().T
        if linear.bias is not None:
            out = out + linear.bias.detach().double()
        return out.view(2 * span, heads, d)

    key_r = project(scheme.pos_key_proj) if "c2p" in scheme.pos_att_type else None
    query_r = project(scheme.pos_query_proj) if "p2c" in scheme.pos_att_type else None
    logits = q @ k.transpose(-1, -2)
    for b in range(batch):
        for i in range(q_len):
            for j in range(k_len):
                rel = int(q_pos[b, i] - k_pos[b, j])
                if scheme.position_buckets > 0:
                    rel = py_log_bucket(rel, scheme.position_buckets, scheme.max_relative_positions)
                delta = min(max(rel + span, 0), 2 * span - 1)
                for h in range(heads):
                    if key_r is not None:
                        logits[b, h, i, j] += q[b, h, i] @ key_r[delta, h]
                    if query_r is not None:
                        logits[b, h, i, j] += k[b, h, j] @ query_r[delta, h]
    scale = 1 / math.sqrt(d * (1 + len(scheme.pos_att_type)))
    return softmax_attention64(logits, v, None, scale, q_pos, k_pos, causal)


GOLDEN = [
    ("shaw", dict(head_dim=HEAD_DIM, max_relative_position=3), naive_shaw),
    ("shaw", dict(head_dim=HEAD_DIM, num_heads=HEADS, max_relative_position=2, per_head=True), naive_shaw),
    ("shaw", dict(head_dim=HEAD_DIM, max_relative_position=0), naive_shaw),
    ("transformer_xl", dict(dim=DIM, num_heads=HEADS), naive_transformer_xl),
    ("transformer_xl", dict(dim=10, num_heads=HEADS, head_dim=HEAD_DIM, base=100.0), naive_transformer_xl),
    ("deberta", dict(dim=DIM, num_heads=HEADS, max_relative_positions=4), naive_deberta),
    ("deberta", dict(dim=DIM, num_heads=HEADS, max_relative_positions=3, pos_att_type=("c2p",)), naive_deberta),
    ("deberta", dict(dim=DIM, num_heads=HEADS, max_relative_positions=3, pos_att_type="p2c",
                     projection_bias=True, norm_rel_embeddings=True), naive_deberta),
    ("deberta", dict(dim=DIM, num_heads=HEADS, max_relative_positions=40, position_buckets=6), naive_deberta),
]


@pytest.mark.parametrize("name,options,naive", GOLDEN, ids=[f"{g[0]}-{i}" for i, g in enumerate(GOLDEN)])
@pytest.mark.parametrize("q_len,k_len,causal", CASES)
def test_attend_matches_naive_formula(name, options, naive, q_len, k_len, causal):
    scheme = randomise(posemb.build(name, **options))
    q, k, v = make_qkv(q_len, k_len)
    q_pos, k_pos = make_positions(q_len, k_len)
    if name == "deberta" and options.get("position_buckets", 0) > 0:
        # Spread the positions so that distances cross many log buckets and the clamp.
        k_pos = k_pos * 9
        q_pos = k_pos[:, k_len - q_len:]
    with torch.no_grad():
        got = attend(q, k, v, scheme, q_pos, k_pos, causal=causal)
    expected = naive(scheme, q, k, v, q_pos, k_pos, causal)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def small_tiles(monkeypatch, elements):
    """Score tiles of ``elements`` (batch * heads * rows * keys) in the no-grad path (many tiles), and
    the blocks of Shaw's value term and DeBERTa's logits cut into runs of keys as short as 4."""
    import posemb.model.attention as attention
    import posemb.schemes.deberta as deberta
    import posemb.schemes.shaw as shaw

    monkeypatch.setattr(attention, "_CONTENT_TILE_MIN_ELEMENTS", elements)
    monkeypatch.setattr(attention, "_CONTENT_TILE_MAX_ELEMENTS", elements)
    monkeypatch.setattr(shaw, "_PIECES_FROM", 1)
    monkeypatch.setattr(shaw, "_PIECE_KEYS", 4)
    monkeypatch.setattr(deberta, "_PIECE_KEYS", 4)


TILED_SCHEMES = [
    ("shaw", dict(head_dim=HEAD_DIM, max_relative_position=3)),
    ("shaw", dict(head_dim=HEAD_DIM, num_heads=HEADS, max_relative_position=5, per_head=True)),
    ("shaw", dict(head_dim=HEAD_DIM, max_relative_position=0)),
    ("transformer_xl", dict(dim=DIM, num_heads=HEADS)),
    ("deberta", dict(dim=DIM, num_heads=HEADS, max_relative_positions=4)),
    ("deberta", dict(dim=DIM, num_heads=HEADS, max_relative_positions=3, pos_att_type="p2c")),
    ("deberta", dict(dim=DIM, num_heads=HEADS, max_relative_positions=20, position_buckets=6)),
]
TILED_CASES = [(40, 40, True), (40, 40, False), (13, 45, True), (13, 45, False), (1, 30, True)]


def spaced_positions(q_len, k_len, spacing):
    """``make_positions`` times ``spacing``: 1 consecutive (the Toeplitz case), 3 gaps, 100003 huge gaps
    (Transformer-XL then embeds only the distances present)."""
    q_pos, k_pos = make_positions(q_len, k_len)
    return q_pos * spacing, k_pos * spacing


@pytest.mark.parametrize("name,options", TILED_SCHEMES, ids=[f"{t[0]}-{i}" for i, t in enumerate(TILED_SCHEMES)])
@pytest.mark.parametrize("q_len,k_len,causal", TILED_CASES)
@pytest.mark.parametrize("spacing", [1, 3, 100003])
def test_tile_and_block_sizes_do_not_change_the_result(monkeypatch, name, options, q_len, k_len, causal, spacing):
    """Float64: one tile (default sizes at this length) = many small tiles (online softmax over key
    tiles, partial tiles at both ends, tiles beyond the diagonal when bidirectional) = the autograd
    path with blocks of 5 query rows."""
    import posemb.model.attention as attention

    scheme = randomise(posemb.build(name, **options)).double()
    q, k, v = (t.double() for t in make_qkv(q_len, k_len))
    q_pos, k_pos = spaced_positions(q_len, k_len, spacing)
    with torch.no_grad():
        whole = attend(q, k, v, scheme, q_pos, k_pos, causal=causal)
        results = {}
        for elements in (BATCH * HEADS * 8, BATCH * HEADS * 8 * 16):  # tiles of 8 x 8 (1 x 8), 8 x 16 (1 x 128)
            small_tiles(monkeypatch, elements)
            rows, keys = attention._content_tile(BATCH * HEADS, q_len, k_len, 1)
            assert rows < q_len or keys < k_len or q_len == 1  # really several tiles
            results[f"tiles of {elements}"] = attend(q, k, v, scheme, q_pos, k_pos, causal=causal)
    monkeypatch.setattr(attention, "_CONTENT_BLOCK_ELEMENTS", BATCH * HEADS * k_len * 5)
    q.requires_grad_(True)
    results["autograd path, blocks of 5 rows"] = attend(q, k, v, scheme, q_pos, k_pos, causal=causal).detach()
    for label, got in results.items():
        torch.testing.assert_close(got, whole, atol=1e-12, rtol=1e-12, msg=lambda m: f"{label}: {m}")


@pytest.mark.parametrize("name,options,naive", [GOLDEN[0], GOLDEN[1], GOLDEN[3], GOLDEN[5], GOLDEN[8]],
                         ids=["shaw", "shaw-per-head", "transformer_xl", "deberta", "deberta-buckets"])
@pytest.mark.parametrize("causal", [True, False])
def test_many_tiles_match_naive_formula(monkeypatch, name, options, naive, causal):
    small_tiles(monkeypatch, BATCH * HEADS * 8 * 8)
    scheme = randomise(posemb.build(name, **options))
    q, k, v = make_qkv(19, 24)
    q_pos, k_pos = make_positions(19, 24)
    if name == "deberta" and options.get("position_buckets", 0) > 0:
        q_pos, k_pos = q_pos * 3, k_pos * 3
    with torch.no_grad():
        got = attend(q, k, v, scheme, q_pos, k_pos, causal=causal)
    torch.testing.assert_close(got.double(), naive(scheme, q, k, v, q_pos, k_pos, causal), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,options", MEMORY_SCHEMES := [
    ("shaw", dict(head_dim=16, max_relative_position=16)),
    ("transformer_xl", dict(dim=32, num_heads=2)),
    ("deberta", dict(dim=32, num_heads=2, max_relative_positions=128))])
@pytest.mark.parametrize("causal", [True, False])
def test_no_grad_forward_keeps_every_tensor_within_about_one_tile(name, options, causal, monkeypatch):
    """At L = 1024 no tensor of the tiled path outgrows the score tile (or the output): no (L, L) block
    per head, no per-distance table over all 2L - 1 distances, no (keys, 2 span) DeBERTa table. The tile
    is the attention's own choice (~1/8 of the output, at least 2^16 elements); Transformer-XL's
    per-distance scores are (rows, rows + keys - 1), 1.13 tiles here. Then the same forward through
    the autograd path (one whole (L, L) block per head) gives the same result. (Causal Shaw and DeBERTa
    would take the far-field path, causal Transformer-XL its fused path; their own bounds are in
    test_far_field_attention.py and test_relative_keys_attention.py.)"""
    import posemb.model.attention as attention

    monkeypatch.setattr(attention, "_FAR_FIELD_FUSED", False)
    monkeypatch.setattr(attention, "_RELATIVE_KEYS_FUSED", False)

    length, heads, head_dim = 1024, 2, 16
    scheme = randomise(posemb.build(name, **options))
    q, k, v = (torch.randn(1, heads, length, head_dim) for _ in range(3))
    pos = torch.arange(length)[None]
    rows, keys = attention._content_tile(heads, length, length, heads * length * head_dim)
    tile = heads * rows * keys
    assert tile * 16 <= heads * length * length  # the bound below is far from an (L, L) block
    recorder = LargestTensor()
    with recorder, torch.no_grad():
        out = attend(q, k, v, scheme, pos, pos, causal=causal)
    assert recorder.ops > 0
    assert recorder.largest <= max(out.numel(), 1.2 * tile), \
        f"{name}: a tensor of {recorder.largest} elements, tile {heads}x{rows}x{keys} = {tile}"
    q.requires_grad_(True)
    reference = attend(q, k, v, scheme, pos, pos, causal=causal).detach()
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


def test_transformer_xl_embeds_each_distance_range_once_per_call(monkeypatch):
    """The per-distance table W_R R is built once per key diagonal of tiles (not once per tile)."""
    import posemb.model.attention as attention
    import posemb.schemes.transformer_xl as txl
    from posemb.functional.relative import DistanceTable

    builds = []

    class Recording(DistanceTable):
        def _embed(self, low, high):
            builds.append((low, high))
            return super()._embed(low, high)

    monkeypatch.setattr(txl, "DistanceTable", Recording)
    monkeypatch.setattr(attention, "_RELATIVE_KEYS_FUSED", False)  # (the tiled path's table; the fused one embeds once)
    length, heads, head_dim = 512, 2, 16
    scheme = posemb.build("transformer_xl", dim=heads * head_dim, num_heads=heads)
    q, k, v = (torch.randn(1, heads, length, head_dim) for _ in range(3))
    pos = torch.arange(length)[None] + 7
    small_tiles(monkeypatch, heads * 16 * 128)  # tiles of 16 rows x 128 keys: 32 blocks, 4 diagonals
    assert attention._content_tile(heads, length, length, 1) == (16, 128)
    with torch.no_grad():
        attend(q, k, v, scheme, pos, pos, causal=True)
    assert len(builds) == 4 and all(high - low + 1 == 16 + 128 - 1 for low, high in builds)


def test_a_scheme_written_without_state_still_works():
    """prepare_relative is optional: a content scheme whose hooks take no ``state`` keyword, and that
    returns a tuple of broadcast terms, runs through both paths and matches a dense computation."""

    class Toy(posemb.schemes.base.PositionalScheme):
        site = "content"

        def __init__(self):
            super().__init__()
            self.slope = torch.nn.Parameter(torch.tensor(0.3))
            self.vector = torch.nn.Parameter(torch.randn(HEAD_DIM))

        def relative_logits(self, q, k, q_positions, k_positions):
            distance = (q_positions[:, None, :, None] - k_positions[:, None, None, :]).abs()
            return -self.slope * distance, q[..., :1]            # a full term and a column

        def relative_values(self, probs, q_positions, k_positions):
            return probs.sum(-1, keepdim=True) * self.vector     # linear in probs

    scheme = Toy()
    q, k, v = make_qkv(21, 21)
    q_pos, k_pos = make_positions(21, 21)
    with torch.no_grad():
        distance = (q_pos[:, None, :, None] - k_pos[:, None, None, :]).abs()
        logits = (q @ k.transpose(-1, -2) - scheme.slope * distance + q[..., :1]) * HEAD_DIM ** -0.5
        probs = torch.softmax(logits.masked_fill(~torch.ones(21, 21, dtype=torch.bool).tril(), float("-inf")), -1)
        expected = probs @ v + scheme.vector
    import posemb.model.attention as attention

    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        small_tiles(patch, BATCH * HEADS * 8 * 8)
        tiled = attend(q, k, v, scheme, q_pos, k_pos, causal=True)
        assert attention._content_tile(BATCH * HEADS, 21, 21, 1) == (8, 8)
    rows = attend(q, k, v, scheme, q_pos, k_pos, causal=True)  # the slope requires grad: autograd path
    assert rows.requires_grad
    torch.testing.assert_close(tiled, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows.detach(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,options", [("shaw", dict(head_dim=HEAD_DIM, max_relative_position=3)),
                                          ("deberta", dict(dim=DIM, num_heads=HEADS, max_relative_positions=4)),
                                          ("deberta", dict(dim=DIM, num_heads=HEADS, max_relative_positions=9,
                                                           position_buckets=6, pos_att_type="c2p"))])
def test_blocks_that_share_one_row_give_the_gathered_logits(name, options):
    """Far from the diagonal every pair reads one row: the broadcast shortcut (a column and/or a row,
    maybe as a tuple) equals the gather of the general path, and a block that straddles the band
    (cut into pieces without autograd) equals it too."""

    scheme = randomise(posemb.build(name, **options))
    q, k = torch.randn(BATCH, HEADS, 4, HEAD_DIM), torch.randn(BATCH, HEADS, 300, HEAD_DIM)
    k_pos = torch.arange(300).expand(BATCH, 300)
    for q_start in (296, 150, 100):  # the last keys' queries; the middle; then half the keys lie ahead
        q_pos = torch.arange(q_start, q_start + 4).expand(BATCH, 4)
        if name == "shaw":
            table = scheme.key_table.detach()
            expected = gather_relative(q @ table.transpose(-1, -2), scheme.distance_index(q_pos, k_pos))
        else:
            index = scheme.relative_index(q_pos, k_pos)
            expected = 0
            if scheme.pos_key_proj is not None:
                expected = gather_relative(q @ scheme._projected(scheme.pos_key_proj, q.dtype).transpose(-1, -2), index)
            if scheme.pos_query_proj is not None:
                expected = expected + gather_relative_rows(
                    k @ scheme._projected(scheme.pos_query_proj, k.dtype).transpose(-1, -2), index)
        with torch.no_grad():
            far = sum_relative_logits(scheme.relative_logits(q, k[:, :, :40], q_pos, k_pos[:, :40]), 4, 40)
            whole = sum_relative_logits(scheme.relative_logits(q, k, q_pos, k_pos), 4, 300)
        torch.testing.assert_close(far, expected[..., :40], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(whole, expected, atol=1e-5, rtol=1e-5)
        if q_start == 296:
            assert scheme.relative_logits(q, k[:, :, :40], q_pos, k_pos[:, :40]).__class__ is tuple \
                or scheme.relative_logits(q, k[:, :, :40], q_pos, k_pos[:, :40]).shape[-1] == 1


@pytest.mark.parametrize("buckets", [-1, 16])
def test_deberta_matches_hugging_face_disentangled_attention(buckets):
    transformers = pytest.importorskip("transformers")
    from transformers.models.deberta_v2.modeling_deberta_v2 import DisentangledSelfAttention

    hidden, heads, length, max_rel = 32, 4, 20, 12 if buckets < 0 else 64
    config = transformers.DebertaV2Config(
        hidden_size=hidden, num_attention_heads=heads, relative_attention=True, pos_att_type=["c2p", "p2c"],
        max_relative_positions=max_rel, position_buckets=buckets, share_att_key=False,
        attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    hf = DisentangledSelfAttention(config).eval()
    scheme = posemb.build("deberta", dim=hidden, num_heads=heads, max_relative_positions=max_rel,
                          position_buckets=max(buckets, 0), projection_bias=True)
    randomise(scheme, std=0.3)
    with torch.no_grad():
        scheme.pos_key_proj.load_state_dict(hf.pos_key_proj.state_dict())
        scheme.pos_query_proj.load_state_dict(hf.pos_query_proj.state_dict())
    states = torch.randn(2, length, hidden)
    if buckets > 0:  # HF's rel positions are arange-based; a long sequence reaches the log buckets
        assert length < max_rel
    with torch.no_grad():
        expected, _ = hf(states, torch.ones(2, 1, length, length), rel_embeddings=scheme.rel_embeddings.weight)

        def split(linear):
            return linear(states).view(2, length, heads, hidden // heads).transpose(1, 2)

        q, k, v = split(hf.query_proj), split(hf.key_proj), split(hf.value_proj)
        positions = torch.arange(37, 37 + length).expand(2, length)  # offsets cancel: HF starts at 0
        out = attend(q, k, v, scheme, positions, positions, causal=False)
    torch.testing.assert_close(out.transpose(1, 2).reshape(2, length, hidden), expected, atol=1e-5, rtol=1e-5)


def test_deberta_log_buckets_reached_in_hugging_face_parity():
    """The bucketed HF-parity case above must really leave the exact zone (|rel| > mid = 8)."""
    rel = torch.arange(-19, 20)
    assert (deberta_log_bucket(rel, 16, 64) != rel).any()


# ------------------------------------------------------------------------------------------------
# 2. DeBERTa log buckets against transformers
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bucket_size,max_position", [(256, 512), (32, 128), (16, 64), (6, 40), (7, 50), (64, 2000)])
def test_log_buckets_equal_transformers(bucket_size, max_position):
    pytest.importorskip("transformers")
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

    rel = torch.arange(-2000, 2001)
    expected = make_log_bucket_position(rel, bucket_size, max_position).long()
    assert torch.equal(deberta_log_bucket(rel, bucket_size, max_position), expected)


# ------------------------------------------------------------------------------------------------
# Pure helpers
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("q_len,k_len", [(5, 5), (3, 8), (1, 4)])
def test_relative_shift_is_transformer_xl_rel_shift(q_len, k_len):
    """Column c holds distance Lk-1-c; after the shift, (i, j) holds distance (i + Lk - Lq) - j."""
    scores = torch.randn(2, q_len, k_len)
    shifted = relative_shift(scores)
    for i in range(q_len):
        for j in range(i + k_len - q_len + 1):  # the valid (non-future) cells
            distance = i + k_len - q_len - j
            assert shifted[:, i, j].equal(scores[:, i, k_len - 1 - distance])


def test_relative_shift_agrees_with_gather():
    q_len, k_len = 4, 9
    scores = torch.randn(1, 2, q_len, k_len)
    k_pos = torch.arange(k_len)[None]
    q_pos = k_pos[:, k_len - q_len:]
    index = (k_len - 1) - (q_pos[:, :, None] - k_pos[:, None, :])  # column of distance i - j
    valid = (k_pos[:, None, :] <= q_pos[:, :, None])[:, None]
    gathered = gather_relative(scores, index.clamp(0, k_len - 1))
    assert relative_shift(scores)[valid.expand_as(scores)].equal(gathered[valid.expand_as(scores)])


def test_gather_scatter_helpers_against_loops():
    scores = torch.randn(2, 3, 4, 5)
    keyside = torch.randn(2, 3, 6, 5)
    probs = torch.rand(2, 3, 4, 6)
    index = torch.randint(0, 5, (2, 4, 6))
    gathered = gather_relative(scores, index)
    rows = gather_relative_rows(keyside, index)
    buckets = scatter_relative(probs, index, 5)
    for b in range(2):
        for h in range(3):
            for i in range(4):
                for j in range(6):
                    r = index[b, i, j]
                    assert gathered[b, h, i, j] == scores[b, h, i, r]
                    assert rows[b, h, i, j] == keyside[b, h, j, r]
                for r in range(5):
                    expected = probs[b, h, i][index[b, i] == r].sum()
                    torch.testing.assert_close(buckets[b, h, i, r], expected)


def test_distinct_distances_and_clip():
    pos = torch.arange(5)[None]
    distance = pos[:, :, None] - pos[:, None, :]  # consecutive positions: one range, no sort
    values, index = distinct_distances(distance)
    assert values.tolist() == list(range(-4, 5)) and values[index].equal(distance)
    sparse = torch.tensor([[[0, 10**9], [5, -10**9]]])  # huge gaps: falls back to unique
    values, index = distinct_distances(sparse)
    assert values[index].equal(sparse) and len(values) == 4
    assert clip_distance(torch.arange(-5, 6), 2).tolist() == [-2, -2, -2, -2, -1, 0, 1, 2, 2, 2, 2]


def test_distance_bounds_and_consecutive_offset():
    from posemb.functional.relative import consecutive_offset, distance_bounds, query_minus_key

    torch.manual_seed(0)
    for _ in range(20):
        q_pos, k_pos = torch.randint(-50, 50, (3, 5)), torch.randint(-50, 50, (3, 7))
        rel = query_minus_key(q_pos, k_pos)
        assert distance_bounds(q_pos, k_pos) == (int(rel.min()), int(rel.max()))
    k_pos = torch.stack([torch.arange(10, 20), torch.arange(-3, 7)])
    assert consecutive_offset(k_pos[:, 6:], k_pos) == 6
    assert consecutive_offset(k_pos[:, :1], k_pos[:, :1]) == 0
    assert consecutive_offset(k_pos[:, 6:] * 2, k_pos * 2) is None                    # steps of 2
    assert consecutive_offset(k_pos[:, 6:] + torch.tensor([[0], [1]]), k_pos) is None  # offsets differ
    assert consecutive_offset(k_pos.flip(1), k_pos) is None                            # counting down


@pytest.mark.parametrize("q_len,k_len", [(1, 1), (4, 9), (9, 4), (5, 5)])
def test_toeplitz_view_equals_the_gather(q_len, k_len):
    from posemb.functional.relative import toeplitz_scores

    per_distance = torch.randn(2, 3, q_len, q_len + k_len - 1)
    i, j = torch.arange(q_len)[:, None], torch.arange(k_len)[None, :]
    index = (q_len - 1 - i + j).expand(2, q_len, k_len)  # column of distance high - (i - j)
    view = toeplitz_scores(per_distance, k_len)
    assert view.equal(gather_relative(per_distance, index))
    assert view.data_ptr() == per_distance.data_ptr() + (q_len - 1) * per_distance.element_size()  # no copy
    with pytest.raises(ValueError, match="Lq \\+ Lk - 1"):
        toeplitz_scores(per_distance, k_len + 1)
    leaf = per_distance.clone().requires_grad_(True)  # the view's backward sums over each diagonal
    toeplitz_scores(leaf, k_len).sum().backward()
    torch.testing.assert_close(leaf.grad, torch.zeros_like(leaf).scatter_add(
        -1, index[:, None].expand(2, 3, q_len, k_len), torch.ones(2, 3, q_len, k_len)))


def test_distance_table_keeps_one_range_and_builds_in_chunks():
    from posemb.functional.relative import DistanceTable

    weight = torch.randn(3, 4, requires_grad=True)
    calls = []

    def build(distances):
        calls.append(len(distances))
        return distances.double()[:, None].float() * weight[:, None, :]

    def expected(low, high):
        return torch.arange(high, low - 1, -1).float()[:, None] * weight[:, None, :]

    table = DistanceTable(build, torch.device("cpu"), chunk=4)
    with torch.no_grad():
        torch.testing.assert_close(table.rows(-5, 6), expected(-5, 6))      # 12 distances: chunks 4 + 4 + 4
        assert calls == [4, 4, 4] and table.builds == 1
        torch.testing.assert_close(table.rows(-2, 3), expected(-2, 3))      # a sub-range: kept rows
        assert table.builds == 1
        table.rows(0, 7)                                                     # beyond: rebuilt
        assert table.builds == 2
    rows = table.rows(-20, -10)                                              # autograd: 4, then the other 7
    assert calls[-2:] == [4, 7] and rows.requires_grad
    rows.sum().backward()
    assert weight.grad is not None
    with pytest.raises(ValueError, match="high must be >= low"):
        table.rows(3, 2)


def test_shared_row_pieces_cover_the_keys_and_tell_the_truth():
    from posemb.functional.relative import query_minus_key, shared_row_pieces

    def rows(rel):  # monotone, saturating at both ends, like DeBERTa's delta
        return (rel + 6).clamp(0, 11)

    def row_range(low, high):
        return int(rows(torch.tensor(low))), int(rows(torch.tensor(high)))

    for q_start, spacing in [(100, 1), (40, 1), (3, 1), (60, 7)]:
        q_pos = torch.arange(q_start, q_start + 8).expand(2, 8)
        k_pos = (torch.arange(120) * spacing).expand(2, 120)
        pieces = shared_row_pieces(q_pos, k_pos, row_range, smallest=16)
        assert pieces[0][0] == 0 and pieces[-1][1] == 120
        assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
        for start, stop, first, last in pieces:
            actual = rows(query_minus_key(q_pos, k_pos[:, start:stop]))
            assert (int(actual.min()), int(actual.max())) == (first, last)
            assert first == last or stop - start <= 16
        shared = [p for p in pieces if p[2] == p[3]]
        assert all(not (a[1] == b[0] and a[2] == b[2]) for a, b in zip(shared, shared[1:]))  # merged


# ------------------------------------------------------------------------------------------------
# 3. Invariance, gradients, model-level decoding
# ------------------------------------------------------------------------------------------------

MODEL_OPTIONS = [("shaw", {}), ("shaw", dict(per_head=True, max_relative_position=4)), ("transformer_xl", {}),
                 ("deberta", {}), ("deberta", dict(position_buckets=8, max_relative_positions=32,
                                                    projection_bias=True, norm_rel_embeddings=True))]


def make_model(name, options, causal=True):
    torch.manual_seed(0)
    model = posemb.TransformerLM(256, 64, 2, 4, scheme=name, causal=causal, **options)
    for scheme in model.schemes:
        randomise(scheme, std=0.3)
    return model


@pytest.mark.parametrize("name,options", MODEL_OPTIONS)
@pytest.mark.parametrize("causal", [True, False])
def test_shifting_all_positions_changes_nothing(name, options, causal):
    model = make_model(name, options, causal).eval()
    tokens = torch.randint(0, 256, (2, 20))
    base = torch.arange(20).expand(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, positions=base + 1000), model(tokens, positions=base),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,options", MODEL_OPTIONS)
def test_gradients_reach_every_scheme_parameter(name, options):
    model = make_model(name, options)
    tokens = torch.randint(0, 256, (2, 24))
    logits = model(tokens)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), tokens[:, 1:].reshape(-1)).backward()
    names = [n for n, _ in model.named_parameters() if ".scheme." in n]
    assert names, "the scheme has no parameters inside the model"
    for pname, parameter in model.named_parameters():
        if ".scheme." in pname:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"{name}: no gradient for {pname}"


@pytest.mark.parametrize("name,options", MODEL_OPTIONS)
def test_token_by_token_decoding_equals_full_forward(name, options):
    model = make_model(name, options).eval()
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache()
        steps = torch.cat([model(tokens[:, t:t + 1], cache=cache) for t in range(16)], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)


def test_layer_ownership_and_parameter_counts():
    dim, heads, depth = 64, 4, 2
    hd = dim // heads
    shaw = posemb.TransformerLM(256, dim, depth, heads, scheme="shaw")
    assert len(shaw.schemes) == depth and shaw.num_position_parameters() == depth * 2 * 33 * hd
    per_head = posemb.TransformerLM(256, dim, depth, heads, scheme="shaw", per_head=True)
    assert per_head.num_position_parameters() == depth * heads * 2 * 33 * hd
    txl = posemb.TransformerLM(256, dim, depth, heads, scheme="transformer_xl")
    assert len(txl.schemes) == depth and txl.num_position_parameters() == depth * (dim * dim + 2 * dim)
    deberta = posemb.TransformerLM(256, dim, depth, heads, scheme="deberta")
    assert len(deberta.schemes) == 1 and deberta.num_position_parameters() == 2 * 128 * dim + 2 * dim * dim
    assert deberta.schemes[0].logit_scale(hd) == pytest.approx(1 / math.sqrt(3 * hd))
    assert posemb.build("deberta", dim=dim, num_heads=heads, pos_att_type=["c2p"]).logit_scale(hd) == \
        pytest.approx(1 / math.sqrt(2 * hd))


# ------------------------------------------------------------------------------------------------
# 4. Bad input
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,options,argument", [
    ("shaw", dict(head_dim=8, max_relative_position=-1), "max_relative_position"),
    ("shaw", dict(head_dim=0), "head_dim"),
    ("deberta", dict(dim=32, num_heads=4, position_buckets=1), "position_buckets"),
    ("deberta", dict(dim=32, num_heads=4, position_buckets=-2), "position_buckets"),
    ("deberta", dict(dim=32, num_heads=4, position_buckets=256, max_relative_positions=128), "max_relative_positions"),
    ("deberta", dict(dim=32, num_heads=4, max_relative_positions=0), "max_relative_positions"),
    ("deberta", dict(dim=32, num_heads=4, pos_att_type=("c2p", "p2p")), "pos_att_type"),
    ("deberta", dict(dim=32, num_heads=4, pos_att_type=()), "pos_att_type"),
    ("deberta", dict(dim=32, num_heads=4, pos_att_type=("c2p", "c2p")), "pos_att_type"),
    ("deberta", dict(dim=30, num_heads=4), "dim"),
    ("transformer_xl", dict(dim=30, num_heads=4), "dim"),
    ("transformer_xl", dict(dim=31, num_heads=1), "dim"),
    ("transformer_xl", dict(dim=32, num_heads=4, base=1.0), "base"),
])
def test_bad_options_raise_naming_the_argument(name, options, argument):
    with pytest.raises(ValueError, match=argument):
        posemb.build(name, **options)


def test_bad_option_types_raise_type_error():
    with pytest.raises(TypeError, match="max_relative_position"):
        posemb.build("shaw", head_dim=8, max_relative_position=2.5)
    with pytest.raises(TypeError, match="pos_att_type"):
        posemb.build("deberta", dim=32, num_heads=4, pos_att_type=3)
    with pytest.raises(TypeError, match="per_head"):
        posemb.build("shaw", head_dim=8, per_head="yes")


def test_model_level_bad_option_and_head_mismatch():
    with pytest.raises(ValueError, match="max_relative_position"):
        posemb.TransformerLM(256, 64, 2, 4, scheme="shaw", max_relative_position=-3)
    scheme = posemb.build("transformer_xl", dim=DIM, num_heads=HEADS)
    q, k, v = torch.randn(1, HEADS + 1, 4, HEAD_DIM), torch.randn(1, HEADS + 1, 4, HEAD_DIM), None
    pos = torch.arange(4)[None]
    with pytest.raises(ValueError, match="num_heads"):
        scheme.relative_logits(q, k, pos, pos)


# ------------------------------------------------------------------------------------------------
# 5. Memory: no (L, L, head_dim) tensor
# ------------------------------------------------------------------------------------------------

class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any ATen op produces while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest, self.ops = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
                self.ops += 1
        return out


MEMORY_SCHEMES = [("shaw", dict(head_dim=32, max_relative_position=16)),
                  ("transformer_xl", dict(dim=64, num_heads=2)),
                  ("deberta", dict(dim=64, num_heads=2, max_relative_positions=64))]


@pytest.mark.parametrize("name,options", MEMORY_SCHEMES)
def test_no_tensor_of_size_length_squared_times_head_dim(name, options):
    length, heads, head_dim = 256, 2, 32
    limit = length * length * head_dim  # one (L, L, d) tensor for a single (batch, head)
    scheme = randomise(posemb.build(name, **options))
    q, k, v = (torch.randn(1, heads, length, head_dim, requires_grad=True) for _ in range(3))
    pos = torch.arange(length)[None]
    recorder = LargestTensor()
    with recorder:
        out = attend(q, k, v, scheme, pos, pos, causal=True)
        out.sum().backward()
    assert recorder.ops > 0
    assert recorder.largest < limit / 4, f"{name}: a tensor of {recorder.largest} elements (L*L*d = {limit})"
    assert all(p.grad is not None for p in scheme.parameters())


def test_memory_recorder_catches_the_naive_form():
    """The recorder can fail: the explicit a^K tensor of the naive Shaw form trips it."""
    length, head_dim = 256, 32
    scheme = randomise(posemb.build("shaw", head_dim=head_dim, max_relative_position=16))
    q = k = v = torch.randn(1, 1, length, head_dim)
    pos = torch.arange(length)[None]
    index = (pos[:, None, :] - pos[:, :, None]).clamp(-16, 16) + 16
    recorder = LargestTensor()
    with recorder, torch.no_grad():
        a_key = scheme.key_table[0][index]  # (1, L, L, d)
        torch.einsum("bid,bijd->bij", q[:, 0], k[:, 0, None] + a_key)
    assert recorder.largest >= length * length * head_dim
