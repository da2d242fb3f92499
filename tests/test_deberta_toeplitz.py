"""DeBERTa's c2p and p2c read through strided views (``DeBERTaRelative._toeplitz_logits``) when a block's
positions are consecutive: equal to the naive paper formula and to the gathers (``_TOEPLITZ = False``) in
float64, forward and every gradient, on the far-field and on the tiled content paths; a spy checks the
views are really used, and that positions with gaps keep the gathers."""
import pytest
import torch

import posemb
from posemb.model import attention
from posemb.model import far_field_attention as far_field
from posemb.model.attention import attend
from posemb.schemes import deberta

from test_relative_schemes import naive_deberta, randomise

OPTIONS = [  # spans wide enough that band blocks of 16 rows read about as many rows of P as they span
    dict(dim=24, num_heads=3, max_relative_positions=64),
    dict(dim=24, num_heads=3, max_relative_positions=64, pos_att_type=("c2p",)),
    dict(dim=24, num_heads=3, max_relative_positions=64, pos_att_type="p2c", projection_bias=True,
         norm_rel_embeddings=True),
    dict(dim=24, num_heads=3, max_relative_positions=512, position_buckets=128),
]
IDS = ["both", "c2p", "p2c-bias-norm", "buckets"]


def _inputs(q_len, k_len, starts=(37, 5)):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(len(starts), 3, n, 8, generator=generator, dtype=torch.float64)
               for n in (q_len, k_len, k_len))
    k_pos = torch.stack([torch.arange(start, start + k_len) for start in starts])
    return q, k, v, k_pos[:, k_len - q_len:], k_pos


def _scheme(options):
    torch.manual_seed(0)
    return randomise(posemb.build("deberta", **options)).double()


def _run(scheme, q, k, v, q_pos, k_pos, *, toeplitz, far_field_path, monkeypatch):
    """Output and the gradients of q, k, v and every parameter, and how many blocks took the views."""
    calls = []
    original = deberta.DeBERTaRelative._toeplitz_logits

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]
    params = list(scheme.parameters())
    weights = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with monkeypatch.context() as patch:
        patch.setattr(deberta, "_TOEPLITZ", toeplitz)
        patch.setattr(deberta.DeBERTaRelative, "_toeplitz_logits", spy)
        patch.setattr(attention, "_FAR_FIELD_FUSED", far_field_path)
        patch.setattr(far_field, "BAND_ROWS", 16)  # (80 rows: 5 band blocks; 84 keys: 1.3x the reach)
        out = attend(*inputs, scheme, q_pos, k_pos, causal=True)
        grads = torch.autograd.grad((out * weights).sum(), inputs + params, allow_unused=True)
    return out.detach(), grads, len(calls)


@pytest.mark.parametrize("far_field_path", [True, False], ids=["far-field", "tiled"])
@pytest.mark.parametrize("q_len,k_len", [(80, 80), (40, 84)])
@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_views_equal_the_gathers_and_the_naive_formula(options, q_len, k_len, far_field_path, monkeypatch):
    scheme = _scheme(options)
    q, k, v, q_pos, k_pos = _inputs(q_len, k_len)
    out, grads, calls = _run(scheme, q, k, v, q_pos, k_pos, toeplitz=True, far_field_path=far_field_path,
                             monkeypatch=monkeypatch)
    assert calls > 0, "no block took the strided views"
    reference, reference_grads, reference_calls = _run(scheme, q, k, v, q_pos, k_pos, toeplitz=False,
                                                       far_field_path=far_field_path, monkeypatch=monkeypatch)
    assert reference_calls == 0
    torch.testing.assert_close(out, naive_deberta(scheme, q, k, v, q_pos, k_pos, True), rtol=0, atol=1e-12)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-12)
    names = ["q", "k", "v"] + [name for name, _ in scheme.named_parameters()]
    for name, got, expected in zip(names, grads, reference_grads):
        assert (got is None) == (expected is None), name
        if got is not None:
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-12, msg=f"gradient of {name}")


def test_positions_with_gaps_keep_the_gathers(monkeypatch):
    scheme = _scheme(OPTIONS[0])
    q, k, v, _, _ = _inputs(13, 13)
    positions = torch.tensor([[0, 1, 2, 4, 5, 6, 9, 10, 11, 12, 15, 16, 17]] * 2)
    out, _, calls = _run(scheme, q, k, v, positions, positions, toeplitz=True, far_field_path=True,
                         monkeypatch=monkeypatch)
    assert calls == 0
    torch.testing.assert_close(out, naive_deberta(scheme, q, k, v, positions, positions, True), rtol=0, atol=1e-12)


@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_relative_logits_with_block_indices_equal_the_call_without(options):
    """A block at rows 5 .. 12 against keys 2 .. 21 of a consecutive call: the views (given the indices)
    and the gathers (called without them) give the same logits."""
    scheme = _scheme(options)
    q, k, _, q_pos, k_pos = _inputs(40, 40)
    state = scheme.prepare_relative(q, k, q_pos, k_pos)
    assert state.offset == 0
    rows, keys = (5, 21), (2, 30)
    q_block, k_block = q[:, :, rows[0]:rows[1]].requires_grad_(), k[:, :, keys[0]:keys[1]]
    with_views = scheme.relative_logits(q_block, k_block, q_pos[:, rows[0]:rows[1]], k_pos[:, keys[0]:keys[1]],
                                        state=state, rows=rows, keys=keys)
    with_gathers = scheme.relative_logits(q_block, k_block, q_pos[:, rows[0]:rows[1]], k_pos[:, keys[0]:keys[1]],
                                          state=state)
    torch.testing.assert_close(with_views, with_gathers, rtol=0, atol=1e-12)
    # Called on its own (no state: the block's own positions give its offset), with or without indices.
    alone = scheme.relative_logits(q_block, k_block, q_pos[:, rows[0]:rows[1]], k_pos[:, keys[0]:keys[1]],
                                   rows=rows, keys=keys)
    torch.testing.assert_close(alone, with_gathers, rtol=0, atol=1e-12)


def test_blocks_of_few_queries_keep_the_gathers(monkeypatch):
    """Decoding (one query) and short blocks: one p2c product per query would cost more than the gathers."""
    scheme = _scheme(OPTIONS[0])
    q, k, v, q_pos, k_pos = _inputs(1, 30)
    out, _, calls = _run(scheme, q, k, v, q_pos, k_pos, toeplitz=True, far_field_path=False,
                         monkeypatch=monkeypatch)
    assert calls == 0
    torch.testing.assert_close(out, naive_deberta(scheme, q, k, v, q_pos, k_pos, True), rtol=0, atol=1e-12)
