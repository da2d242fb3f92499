"""Properties every registered scheme must have inside the model. Each test iterates
``posemb.available()``, so a new scheme is covered without editing this file."""
import pytest
import torch

import posemb

SCHEMES = posemb.available()
VOCAB = 64


def make_model(name, *, causal=True, seed=0, **options):
    torch.manual_seed(seed)
    try:
        model = posemb.TransformerLM(VOCAB, 32, 2, 4, scheme=name, causal=causal, **options)
    except ValueError as error:
        if not causal and "causal" in str(error):
            pytest.skip(f"{name} is causal-only: {error}")
        raise
    # Give zero-initialised parameters (T5 bias, ...) random values so position really matters.
    with torch.no_grad():
        for scheme in model.schemes:
            for parameter in scheme.parameters():
                parameter.normal_(0, 0.5)
    return model.eval()


@pytest.mark.parametrize("name", SCHEMES)
def test_kv_cache_decoding_equals_the_full_pass(name):
    """Each decoding step equals a full forward pass over the prefix it has seen."""
    model = make_model(name)
    tokens = torch.randint(0, VOCAB, (2, 14))
    with torch.no_grad():
        cache = model.new_cache()
        chunks = [(0, 5), (5, 6), (6, 9), (9, 10), (10, 14)]  # a prefill, single tokens, multi-token chunks
        for start, stop in chunks:
            step = model(tokens[:, start:stop], cache=cache)
            for t in range(start, stop):
                full = model(tokens[:, : t + 1])[:, -1]
                torch.testing.assert_close(step[:, t - start], full, atol=1e-5, rtol=1e-5,
                                           msg=lambda m: f"{name}, position {t}: {m}")
        assert cache.length == 14


@pytest.mark.parametrize("name", SCHEMES)
def test_kv_cache_honours_explicit_positions(name):
    model = make_model(name)
    tokens = torch.randint(0, VOCAB, (1, 8))
    pos = torch.arange(3, 11)[None]
    with torch.no_grad():
        full = model(tokens, positions=pos)
        cache = model.new_cache()
        model(tokens[:, :5], positions=pos[:, :5], cache=cache)
        last = model(tokens[:, 5:], positions=pos[:, 5:], cache=cache)
    torch.testing.assert_close(last, full[:, 5:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", SCHEMES)
def test_causal_model_never_reads_the_future(name):
    model = make_model(name)
    tokens = torch.randint(0, VOCAB, (2, 16))
    changed = tokens.clone()
    changed[:, 9:] = (changed[:, 9:] + 1 + torch.randint(0, VOCAB - 1, (2, 7))) % VOCAB
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :9], after[:, :9], atol=1e-6, rtol=0)
    assert not torch.allclose(before[:, 9:], after[:, 9:])


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("causal", [True, False])
def test_relative_and_rotary_schemes_are_translation_invariant(name, causal):
    cls = posemb.scheme_class(name)
    model = make_model(name, causal=causal)
    tokens = torch.randint(0, VOCAB, (2, 12))
    base = torch.arange(12).expand(2, 12)
    # ``translation_invariant`` (None: as the family says) lets a relative scheme that also reads the
    # query's own position (FIRE's normaliser psi(max(L, i))) declare that it sees the shift; FIRE
    # sees it once positions pass its threshold L (512 at initialisation), nope_temperature's query
    # scale once they pass floor_scale - 1 (8191 by default), hence the larger shift.
    invariant = cls.translation_invariant
    if invariant is None:
        invariant = cls.family in ("relative", "rotary", "none")
    shift = 37 if invariant or cls.family == "absolute" else 10000
    with torch.no_grad():
        reference = model(tokens, positions=base)
        shifted = model(tokens, positions=base + shift)
    if invariant:
        torch.testing.assert_close(shifted, reference, atol=2e-5, rtol=1e-5)
    else:  # absolute schemes (and FIRE) must see the shift
        assert not torch.allclose(shifted, reference, atol=1e-4)


@pytest.mark.parametrize("name", SCHEMES)
def test_gradients_reach_every_learned_parameter(name):
    model = make_model(name).train()
    tokens = torch.randint(0, VOCAB, (2, 12))
    logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    loss.backward()
    for pname, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(parameter.grad).all(), pname
        assert parameter.grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"


@pytest.mark.parametrize("name", SCHEMES)
def test_outputs_are_finite_on_extreme_but_valid_inputs(name):
    model = make_model(name)
    tokens = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        for blk in model.blocks:  # huge activations: softmax must stay stable
            # every input projection (qkv, or MLA's q_proj / kv_proj / k_rope_proj), not the output
            for pname, module in blk.attn.named_modules():
                if isinstance(module, torch.nn.Linear) and pname not in ("out", "o_proj"):
                    module.weight.mul_(300.0)
        if posemb.scheme_class(name).name == "learned":
            pos = torch.tensor([[1018, 1019, 1020, 1021, 1022, 1023]])
        else:
            pos = torch.arange(1_000_000, 1_000_006)[None]
        out = model(tokens, positions=pos)
        single = model(tokens[:, :1])
    assert torch.isfinite(out).all() and torch.isfinite(single).all()


@pytest.mark.parametrize("name", SCHEMES)
def test_batch_elements_are_independent(name):
    model = make_model(name)
    tokens = torch.randint(0, VOCAB, (3, 10))
    with torch.no_grad():
        together = model(tokens)
        alone = model(tokens[1:2])
    torch.testing.assert_close(together[1:2], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_decoding_across_the_switch_equals_the_full_pass_at_every_layer(rope_type):
    """dynamic NTK's base grows past max_position_embeddings=6 and LongRoPE switches factors past 6:
    the model re-prefills when the encoding changes, so decoding stays exact at depth 3."""
    scaling = {"factor": 2.0} if rope_type == "dynamic" else {
        "short_factor": [1.0, 1.1, 1.3, 1.6], "long_factor": [1.0, 2.0, 4.0, 8.0],
        "original_max_position_embeddings": 6}
    torch.manual_seed(0)
    model = posemb.TransformerLM(VOCAB, 32, 3, 4, scheme="rope", rope_type=rope_type, scaling=scaling,
                                 max_position_embeddings=6).eval()
    with torch.no_grad():
        for blk in model.blocks:  # sharpen attention so a wrong rotation shows
            blk.attn.qkv.weight.mul_(8.0)
    tokens = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        for exact in (True, False):
            model.exact_decoding = exact
            cache, worst = model.new_cache(), 0.0
            step = model(tokens[:, :3], cache=cache)
            for t in range(3, 12):
                step = model(tokens[:, t:t + 1], cache=cache)[:, -1]
                worst = max(worst, (step - model(tokens[:, : t + 1])[:, -1]).abs().max().item())
            if exact:
                assert worst < 1e-5
            else:  # without re-prefill, deeper layers read stale hidden states
                assert worst > 1e-4
