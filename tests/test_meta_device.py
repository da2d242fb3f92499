"""Meta-device initialisation: every registered scheme (walked through ``posemb.available()``, so new
schemes are covered) survives ``with torch.device("meta")`` + ``to_empty`` + ``load_state_dict`` with
logits identical to a normally built model; forward on the meta device, and on an empty batch, is a
clear error."""
import pytest
import torch

import posemb

SCHEMES = posemb.available()
VOCAB = 64


def build(name, **options):
    return posemb.TransformerLM(VOCAB, 32, 2, 4, scheme=name, **options)


def reference_model(name, **options):
    torch.manual_seed(0)
    model = build(name, **options)
    with torch.no_grad():  # zero-initialised tables (T5) get values, so position matters
        for scheme in model.schemes:
            for parameter in scheme.parameters():
                parameter.normal_(0, 0.5)
    return model.eval()


def materialise(model):
    """``to_empty`` with uninitialised memory filled with NaN (deterministic mode), so a buffer
    that nothing rebuilds cannot pass by luck."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        model.to_empty(device="cpu")
    finally:
        torch.use_deterministic_algorithms(previous)
    return model


CASES = [(name, {}) for name in SCHEMES] + [
    ("rope", {"rope_type": "yarn", "scaling": {"factor": 4.0, "original_max_position_embeddings": 16}}),
    ("rope", {"rope_type": "longrope", "max_position_embeddings": 64,
              "scaling": {"original_max_position_embeddings": 16, "short_factor": [1.0] * 4,
                          "long_factor": [2.0] * 4}}),
]


def test_to_empty_really_leaves_nan_without_a_rebuild():
    """The check below can fail: a plain non-persistent buffer is NaN after ``materialise``."""
    with torch.device("meta"):
        module = torch.nn.Module()
        module.register_buffer("table", torch.ones(3), persistent=False)
    assert torch.isnan(materialise(module).table).all()


@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{o.get('rope_type', 'default')}" for n, o in CASES])
def test_meta_build_to_empty_and_load_give_identical_logits(name, options):
    reference = reference_model(name, **options)
    with torch.device("meta"):
        model = build(name, **options)
    assert all(p.is_meta for p in model.parameters())
    materialise(model).load_state_dict(reference.state_dict())
    model.eval()
    tokens = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), atol=0, rtol=0)
        cache, steps = model.new_cache(), []
        for t in range(4):
            steps.append(model(tokens[:, t:t + 1], cache=cache))
        torch.testing.assert_close(torch.cat(steps, 1), reference(tokens[:, :4]), atol=1e-5, rtol=1e-5)
    for (key, got), (_, want) in zip(model.named_buffers(), reference.named_buffers()):
        torch.testing.assert_close(got, want, atol=0, rtol=0, msg=f"{name}: buffer {key}")


@pytest.mark.parametrize("name", SCHEMES)
def test_meta_build_and_assigning_load_give_identical_logits(name):
    """``load_state_dict(assign=True)`` leaves non-persistent buffers on the meta device: schemes rebuild them."""
    reference = reference_model(name)
    with torch.device("meta"):
        model = build(name)
    model.load_state_dict(reference.state_dict(), assign=True)
    model.eval()
    tokens = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), atol=0, rtol=0)


@pytest.mark.parametrize("name", SCHEMES)
def test_forward_on_the_meta_device_is_a_clear_error(name):
    with torch.device("meta"):
        model = build(name)
    with pytest.raises(ValueError, match="meta device.*to_empty"):
        model(torch.randint(0, VOCAB, (1, 4)))
    with pytest.raises(ValueError, match="tokens are on the meta device"):
        build(name)(torch.zeros(1, 4, dtype=torch.long, device="meta"))


def test_attention_refuses_meta_and_empty_inputs():
    attention = posemb.MultiHeadAttention(32, 4, posemb.build("alibi", num_heads=4))
    with pytest.raises(ValueError, match="meta device"):
        attention(torch.empty(1, 3, 32, device="meta"), torch.arange(3)[None])
    with pytest.raises(ValueError, match=r"at least one sequence.*\(0, 3, 32\)"):
        attention(torch.empty(0, 3, 32), torch.zeros(0, 3, dtype=torch.long))


def test_empty_batch_is_a_clear_error():
    model = build("rope")
    with pytest.raises(ValueError, match=r"batch >= 1.*\(0, 5\)"):
        model(torch.zeros(0, 5, dtype=torch.long))


def test_constants_keep_their_values_through_dtype_casts():
    alibi = posemb.build("alibi", num_heads=6)
    xpos = posemb.build("xpos", head_dim=8)
    slopes, zeta = alibi.slopes.clone(), xpos.log_zeta64.clone()
    alibi.half(), xpos.to(torch.bfloat16)
    assert alibi.slopes.dtype == torch.float32 and torch.equal(alibi.slopes, slopes)
    assert xpos.log_zeta64.dtype == torch.float64 and torch.equal(xpos.log_zeta64, zeta)


def test_register_constant_refuses_meta_values():
    scheme = posemb.PositionalScheme()
    with pytest.raises(ValueError, match="device='cpu'"):
        scheme.register_constant("table", torch.ones(2, device="meta"))
