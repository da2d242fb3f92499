"""Hugging Face ``transformers`` bridge: posemb's rotary inside a ``transformers`` model (the
families of ``PATCHABLE_MODEL_TYPES``), and the q/k weight permutation between the two RoPE
memory layouts.

``transformers`` is an optional dependency. It is imported inside the functions that need it, so
``import posemb.integrations.hf`` works without it; those functions raise a clear ``ImportError``.

What HF expects (``transformers`` 5.24, ``models/llama/modeling_llama.py``)
-----------------------------------------------------------------------
``LlamaModel.forward`` calls ``self.rotary_emb(hidden_states, position_ids)`` once per forward
pass and hands the result to every layer; ``LlamaRotaryEmbedding.forward`` returns::

    freqs = position_ids[..., None].float() * inv_freq          # (B, L, d/2)
    emb = cat(freqs, freqs)                                      # (B, L, head_dim)
    cos, sin = emb.cos() * attention_scaling, emb.sin() * attention_scaling   # cast to x.dtype

and each attention layer applies ``q * cos + rotate_half(q) * sin`` with
``rotate_half(x) = cat(-x[d/2:], x[:d/2])``, i.e. the half-split ("NeoX") layout
(transformers ``models/llama/modeling_llama.py``: ``LlamaRotaryEmbedding``, ``apply_rotary_pos_emb``). Qwen2 and Mistral are built the same way.
The other families differ in what their apply function does with (cos, sin), recorded per model
type in ``_FAMILIES``: GPT-NeoX / StableLM / Phi-3 / GLM rotate only the leading ``cos.shape[-1]``
channels (partial rotary), GLM reads ``cos[..., :r/2].repeat_interleave(2)`` and pairs (2i, 2i+1),
Cohere's module returns ``repeat_interleave(freqs, 2)``, Gemma 3 and OLMo 3 call their module once per
layer type, gpt-oss takes one (cos, sin) per pair, Llama 4 a complex ``polar(1, freqs)``, DeepSeek-V3 the
rope sub-head's cos/sin of MLA.

Two ways to put posemb's rotary there
-------------------------------------
- ``mode="cos_sin"`` (chosen automatically for a half-split rope over the full head): the new
  ``rotary_emb`` returns exactly the (cos, sin) above, computed from posemb's ``inv_freq`` and
  ``attention_scale``. HF's own ``apply_rotary_pos_emb`` then does the rotation.
- ``mode="hooks"`` (chosen automatically for an interleaved rope or a partial rotary, neither of
  which HF's ``rotate_half`` over the whole head can express through cos/sin alone): the new
  ``rotary_emb`` returns the identity rotation (cos = 1, sin = 0) and remembers posemb's
  (cos, sin) for this forward pass; forward hooks on every ``q_proj`` / ``k_proj`` rotate the
  projections with posemb's own :func:`posemb.functional.rope.apply_rotary` before HF reshapes
  them into heads. Since HF caches keys after rotation, decoding with a KV cache still works.

Layout conversion (``rope_scaling.md`` §0): the half-split layout pairs channel ``i`` with
``i + d/2``, the interleaved (GPT-J / Meta) layout pairs ``2i`` with ``2i + 1``. Permuting the
rows of ``W_q`` and ``W_k`` (and their biases) the same way inside every head turns one into the
other without changing any attention score, because ``q . k`` is invariant under a common
permutation of channels. interleaved -> half is HF's ``convert_llama_weights_to_hf.permute``:
``w.view(n_heads, hd//2, 2, in).transpose(1, 2).reshape(out, in)``; half -> interleaved is its
inverse (torchtune ``hf_to_tune._permute``): ``w.view(n_heads, 2, hd//2, in).transpose(1, 2)``.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from posemb._validation import check_choice, check_even, check_int, check_tensor
from posemb.rotary import architectures

LAYOUTS = ("half", "interleaved")
PATCH_MODES = ("auto", "cos_sin", "hooks")
COS_FORMATS = ("cat", "repeat_interleave", "pairs", "complex")
#: what each patchable family's rotary module returns and its attention accepts (transformers 5.24
#: ``models/<model>/modeling_<model>.py``, ``<Model>RotaryEmbedding.forward`` / ``apply_rotary_pos_emb``):
#: ``cos_format``: ``"cat"`` (``cat(freqs, freqs)``), ``"repeat_interleave"`` (Cohere's
#: ``repeat_interleave(freqs, 2)``), ``"pairs"`` (one entry per pair, ``freqs`` itself: gpt-oss) or
#: ``"complex"`` (``torch.polar(1, freqs) * attention_scaling``, one complex number per pair: Llama 4);
#: ``layout``: the channel pairing of its apply function (``"config"``: ``config.rope_interleave`` decides);
#: ``partial``: its apply function rotates only ``cos.shape[-1]`` leading channels (``q[..., :rotary_dim]``),
#: so a partial rotary goes through cos/sin; ``hooks``: rotating the raw ``q_proj`` / ``k_proj`` outputs is
#: the same as rotating the heads (no q/k norm between projection and rotation, as in Qwen3 / OLMo 2 /
#: Cohere), so mode ``"hooks"`` is exact; ``per_layer_type``: the model calls its one rotary module with
#: the layer type; ``keep_float32``: the module returns float32 cos/sin whatever the activations' dtype;
#: ``mrope``: positions are (3, batch, seq) temporal/height/width (M-RoPE).
#: NoPE layers (SmolLM3, Llama 4, Cohere2, EXAONE 4) need nothing here: those layers receive the shared
#: (cos, sin) and skip the rotation themselves, so the patched module is called exactly as the original.
_FAMILIES: dict[str, dict[str, Any]] = {
    **{name: dict(cos_format="cat", layout="half", partial=False, hooks=True)
       for name in ("llama", "qwen2", "mistral")},
    # half-split over the whole head; SmolLM3's NoPE layers skip the rotation themselves (use_rope);
    # EXAONE 4 rotates only sliding layers when sliding_window is set (Exaone4Attention.forward:
    # `if self.sliding_window is None or self.is_sliding: apply_rotary_pos_emb`), after its q/k norm
    **{name: dict(cos_format="cat", layout="half", partial=False, hooks=False)
       for name in ("qwen3", "granite", "olmo2", "smollm3", "gemma2", "exaone4")},
    # half-split over the leading cos.shape[-1] channels (partial rotary, Phi-3 LongRoPE)
    **{name: dict(cos_format="cat", layout="half", partial=True, hooks=False)
       for name in ("phi3", "gpt_neox", "stablelm")},
    # GLM: apply_rotary_pos_emb takes cos[..., :r/2].repeat_interleave(2) over (2i, 2i+1), partial
    **{name: dict(cos_format="cat", layout="interleaved", partial=True, hooks=False) for name in ("glm", "glm4")},
    "cohere": dict(cos_format="repeat_interleave", layout="interleaved", partial=False, hooks=False),
    # Cohere2RotaryEmbedding.forward: repeat_interleave(freqs, 2); rotate_half over x[..., ::2], x[..., 1::2];
    # Cohere2Attention rotates only sliding layers (`if self.sliding_window is not None`), full layers are NoPE
    "cohere2": dict(cos_format="repeat_interleave", layout="interleaved", partial=False, hooks=False),
    # one rotary module for all layers, called with the layer type (Gemma3RotaryEmbedding.forward(x,
    # position_ids, layer_type)): a local base for sliding layers, the scaled global one for full ones
    "gemma3_text": dict(cos_format="cat", layout="half", partial=False, hooks=False, per_layer_type=True),
    # Olmo3RotaryEmbedding.forward(x, position_ids, layer_type): one inv_freq per layer type from
    # rope_parameters[layer_type], cat(freqs, freqs), "returns cos/sin in fp32 without casting to x.dtype"
    "olmo3": dict(cos_format="cat", layout="half", partial=False, hooks=False, per_layer_type=True,
                  keep_float32=True),
    # GptOssRotaryEmbedding.forward returns freqs.cos() (one entry per pair); _apply_rotary_emb chunks the
    # head in two halves: (x1 cos - x2 sin, x2 cos + x1 sin), the half-split pairing over the whole head
    "gpt_oss": dict(cos_format="pairs", layout="half", partial=False, hooks=False),
    # Llama4TextRotaryEmbedding.forward: torch.polar(ones, freqs) * attention_scaling; apply_rotary_emb
    # multiplies view_as_complex(x.reshape(..., -1, 2)), i.e. pairs (2i, 2i+1); NoPE layers (no_rope_layers[i]
    # == 0) skip it and scale their queries by the attention temperature themselves (Llama4TextAttention)
    "llama4_text": dict(cos_format="complex", layout="interleaved", partial=False, hooks=False),
    # DeepseekV3RotaryEmbedding.forward: cat(freqs, freqs) over the rope sub-head (config.head_dim =
    # qk_rope_head_dim); DeepseekV3Attention: `if self.config.rope_interleave: apply_rotary_pos_emb_interleave`
    # (pairs (2i, 2i+1)) else apply_rotary_pos_emb (rotate_half); its softmax scale carries YaRN's mscale^2
    # (yarn_apply_mscale), fixed at construction from the config, so a rope with another mscale is refused
    "deepseek_v3": dict(cos_format="cat", layout="config", partial=False, hooks=False, mla=True),
}
#: model types whose patched forward is tested end to end (tests/test_integration_hf.py,
#: tests/test_patch_rotary_families.py: logits within 1e-5 and identical greedy decoding); any other
#: family is refused rather than risk a silently wrong patch (per-layer-type rotary modules,
#: attention code that rotates differently)
PATCHABLE_MODEL_TYPES = tuple(_FAMILIES)
_MROPE_REASON = ("its rotary takes M-RoPE positions (3, batch, seq) split by mrope_section "
                 "(e.g. Qwen2VLRotaryEmbedding / Qwen3VLTextRotaryEmbedding.forward); posemb's MRoPE reproduces "
                 "that rotary (from_hf_config) but the patched forward of these models is not verified yet")
#: model types known to call a rotary module that patch_rotary does not replace yet, with the reason:
#: every M-RoPE architecture of posemb.rotary.architectures
_NOT_PATCHABLE: dict[str, str] = {name: _MROPE_REASON for name, arch in architectures.ARCHITECTURES.items()
                                  if arch.mrope is not None}

__all__ = ["LAYOUTS", "PATCH_MODES", "PosembRotaryEmbedding", "patch_rotary", "unpatch_rotary",
           "is_patched", "permute_qk_for_layout", "convert_model_layout"]


def _require_transformers():
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - exercised only where transformers is absent
        raise ImportError("posemb.integrations.hf needs the optional dependency 'transformers', which is "
                          "not installed; install it with `pip install 'transformers>=4.46'` "
                          "(or `pip install 'posemb[test]'`)") from error
    return transformers


def _check_hf_model(model: Any) -> None:
    transformers = _require_transformers()
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel (e.g. LlamaForCausalLM, Qwen2ForCausalLM, "
                        f"MistralForCausalLM), got {type(model).__name__}")


def _rotary_owner(model: nn.Module) -> nn.Module:
    """The module that owns ``rotary_emb``: the base model (``model.model``) or the model itself."""
    # base_model covers heads whose base model is not called `model` (GPTNeoXForCausalLM.gpt_neox).
    for owner in (model, getattr(model, "model", None), getattr(model, "base_model", None)):
        if isinstance(owner, nn.Module) and isinstance(getattr(owner, "rotary_emb", None), nn.Module):
            return owner
    raise TypeError(f"model must be a transformers model with a `rotary_emb` module at model.rotary_emb, "
                    f"model.model.rotary_emb or model.base_model.rotary_emb (e.g. Llama, Qwen2, GPT-NeoX); "
                    f"{type(model).__name__} has none")


def _config_head_dim(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None)
    if not head_dim:
        head_dim = config.hidden_size // config.num_attention_heads
    return int(head_dim)


def _qk_projections(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every ``q_proj`` / ``k_proj`` linear layer, with its qualified name."""
    found = []
    for name, module in model.named_modules():
        q_proj, k_proj = getattr(module, "q_proj", None), getattr(module, "k_proj", None)
        if isinstance(q_proj, nn.Linear) and isinstance(k_proj, nn.Linear):
            found.append((f"{name}.q_proj", q_proj))
            found.append((f"{name}.k_proj", k_proj))
    return found


def _heads_of(name: str, projection: nn.Linear, head_dim: int) -> int:
    # Counting heads from the layer itself covers grouped-query attention (k_proj has
    # num_key_value_heads heads) without trusting a config field per model family.
    if projection.out_features % head_dim:
        raise ValueError(f"{name}.out_features = {projection.out_features} is not a multiple of "
                         f"head_dim = {head_dim}")
    return projection.out_features // head_dim


class PosembRotaryEmbedding(nn.Module):
    """Drop-in replacement for HF's ``LlamaRotaryEmbedding`` (and Qwen2 / Mistral's), backed by a
    posemb rope (``posemb.rotary.RoPE``).

    ``forward(x, position_ids) -> (cos, sin)``, each (batch, seq, head_dim) in ``x.dtype``:
    ``cat(freqs, freqs).cos() * attention_scale`` (mode ``"cos_sin"``), or the identity rotation
    (mode ``"hooks"``, where the q/k projection hooks rotate instead; see the module docstring).
    """

    def __init__(self, rope: nn.Module, head_dim: int, mode: str = "cos_sin", cos_format: str = "cat",
                 layer_ropes: Mapping[str, nn.Module] | None = None, keep_float32: bool = False):
        super().__init__()
        check_int("head_dim", head_dim, minimum=2)
        check_choice("mode", mode, ("cos_sin", "hooks"))
        check_choice("cos_format", cos_format, COS_FORMATS)
        if mode == "hooks" and cos_format != "cat":
            raise ValueError(f"mode='hooks' returns an identity rotation in the 'cat' format; cos_format must be "
                             f"'cat', got {cos_format!r}")
        self.rope = rope
        self.head_dim = head_dim
        self.mode = mode
        self.cos_format = cos_format
        self.keep_float32 = bool(keep_float32)
        # Per-layer-type families (Gemma 3) pass the layer type to forward; `rope` is then one of these.
        self.layer_ropes = nn.ModuleDict(dict(layer_ropes)) if layer_ropes is not None else None
        self.interleaved = getattr(rope, "layout", "half") == "interleaved"
        # Neither of these is a submodule: the original must not be moved or saved with the model,
        # and the stash lives only for one forward pass.
        object.__setattr__(self, "original", None)
        object.__setattr__(self, "_hook_handles", [])
        object.__setattr__(self, "_stash", None)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, rotary_dim={self.rope.rotary_dim}, mode={self.mode!r}, "
                f"layout={'interleaved' if self.interleaved else 'half'}")

    def forward(self, x: Tensor, position_ids: Tensor | None = None,
                layer_type: str | None = None) -> tuple[Tensor, Tensor]:
        if position_ids is None:
            position_ids = torch.arange(x.shape[1], device=x.device).unsqueeze(0).expand(x.shape[0], -1)
        check_tensor("position_ids", position_ids, ndim=2, integer=True)
        rope = self.rope
        if self.layer_ropes is not None:
            check_choice("layer_type", layer_type, tuple(self.layer_ropes))
            rope = self.layer_ropes[layer_type]
        cos, sin = rope.cos_sin(position_ids.to(x.device))  # float32 (B, L, rotary_dim/2), times scale
        if self.mode == "cos_sin":
            # float32 kept where the model's own module does not cast (OLMo 3)
            dtype = torch.float32 if self.keep_float32 else x.dtype
            if self.cos_format == "complex":
                # Llama 4: polar(1, freqs) * attention_scaling = (cos + i sin) * scale, one per pair (2i, 2i+1)
                return torch.complex(cos, sin)
            if self.cos_format == "pairs":
                # gpt-oss: one (cos, sin) per pair; its apply splits the head in halves itself
                return cos.to(dtype), sin.to(dtype)
            if self.cos_format == "repeat_interleave":
                # Cohere's apply pairs 2i with 2i+1, so each frequency sits on two adjacent channels.
                return (cos.repeat_interleave(2, dim=-1).to(dtype), sin.repeat_interleave(2, dim=-1).to(dtype))
            # HF's rotate_half pairs channel i with i + r/2, hence the duplicated halves (GLM's apply
            # reads only the first half and interleaves it itself, as does DeepSeek-V3's interleave apply).
            return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((sin, sin), dim=-1).to(dtype)
        object.__setattr__(self, "_stash", (cos, sin))
        shape = (*position_ids.shape, self.head_dim)
        return (torch.ones(shape, dtype=x.dtype, device=x.device),
                torch.zeros(shape, dtype=x.dtype, device=x.device))

    def rotate_projection(self, projection: Tensor, num_heads: int) -> Tensor:
        """Rotate a q or k projection output (batch, seq, num_heads * head_dim) with the (cos, sin)
        of the current forward pass; the channels past ``rotary_dim`` in each head pass through."""
        from posemb.functional.rope import apply_rotary

        if self._stash is None:
            raise RuntimeError("PosembRotaryEmbedding: a q/k projection ran before rotary_emb in this forward "
                               "pass; call the whole model, not a layer on its own")
        cos, sin = self._stash
        *lead, width = projection.shape
        heads = projection.reshape(*lead, num_heads, self.head_dim).transpose(-3, -2)  # (B, H, L, hd)
        rotary_dim = self.rope.rotary_dim
        rotated = apply_rotary(heads[..., :rotary_dim], cos.to(heads.device), sin.to(heads.device),
                               interleaved=self.interleaved).to(heads.dtype)
        if rotary_dim < self.head_dim:
            rotated = torch.cat((rotated, heads[..., rotary_dim:]), dim=-1)
        return rotated.transpose(-3, -2).reshape(projection.shape)


def is_patched(model: nn.Module) -> bool:
    """True when ``model``'s ``rotary_emb`` is a :class:`PosembRotaryEmbedding`."""
    return isinstance(_rotary_owner(model).rotary_emb, PosembRotaryEmbedding)


def _fits_natively(rope: Any, head_dim: int, family: Mapping[str, Any]) -> bool:
    """Check ``rope`` is a posemb rope that fits the head; True when cos/sin alone carry it, i.e. the
    model's apply function has the rope's pairing and rotates exactly ``rope.rotary_dim`` channels
    (otherwise only the q/k hooks can)."""
    for attribute in ("cos_sin", "rotary_dim"):
        if not hasattr(rope, attribute):
            raise TypeError(f"rope must be a posemb rope with `{attribute}` (e.g. posemb.rotary.from_hf_config(...)), "
                            f"got {type(rope).__name__}")
    rotary_dim = int(rope.rotary_dim)
    if rotary_dim > head_dim:
        raise ValueError(f"rope.rotary_dim = {rotary_dim} is larger than the model's head_dim = {head_dim}")
    return getattr(rope, "layout", "half") == family["layout"] and (rotary_dim == head_dim or family["partial"])


def _layer_ropes(model: nn.Module, rope: Any) -> dict[str, Any]:
    """One rope per layer type of a per-layer-type model: the model's own (``from_hf_config(config,
    layer_type=...)``) when ``rope`` is None, ``rope`` for every type when it is one rope, or a
    mapping that must name every layer type of ``config.layer_types``."""
    layer_types = list(dict.fromkeys(model.config.layer_types))
    if rope is None:
        from posemb.rotary import from_hf_config
        return {name: from_hf_config(model.config, layer_type=name) for name in layer_types}
    if isinstance(rope, Mapping):
        if set(rope) != set(layer_types):
            raise ValueError(f"rope given as a mapping must have one rope per layer type of {type(model).__name__}, "
                             f"i.e. keys {sorted(layer_types)}; got {sorted(rope)}")
        return {name: rope[name] for name in layer_types}
    return {name: rope for name in layer_types}


def _mla_softmax_factor(rope_type: str, scaling: Mapping[str, Any]) -> float:
    """YaRN's ``mscale^2`` on the softmax scale of DeepSeek MLA: ``yarn_mscale(factor, mscale_all_dim)^2``
    when the schedule is not ``default`` and sets ``mscale_all_dim``, else 1 (transformers
    ``deepseek_v3/modeling_deepseek_v3.py``: ``yarn_apply_mscale``; posemb ``DecoupledRoPE``)."""
    from posemb.functional.rope_schedules import yarn_mscale

    mscale_all_dim = scaling.get("mscale_all_dim")
    if rope_type == "default" or not mscale_all_dim:
        return 1.0
    return yarn_mscale(float(scaling["factor"]), float(mscale_all_dim)) ** 2


def _check_mla_softmax_scale(model: nn.Module, rope: Any) -> None:
    """DeepSeek-V3's attention fixed ``scaling = qk_head_dim**-0.5 * mscale^2`` from its config when it was
    built; patching the rotary cannot change it, so a rope whose schedule implies another ``mscale^2``
    would give a silently different model: refuse it."""
    parameters = dict(model.config.rope_parameters or {})
    model_factor = _mla_softmax_factor(parameters.get("rope_type", "default"), parameters)
    ours = getattr(rope, "softmax_scale_factor", None)
    if ours is None:
        ours = _mla_softmax_factor(getattr(rope, "rope_type", "default"), dict(getattr(rope, "scaling", None) or {}))
    if abs(float(ours) - model_factor) > 1e-12 * max(1.0, model_factor):
        raise ValueError(f"rope implies an MLA softmax factor mscale^2 = {float(ours):.6g} but {type(model).__name__}'s "
                         f"attention was built with {model_factor:.6g} (yarn_apply_mscale of its config's "
                         "rope_parameters: factor, mscale_all_dim); patch_rotary replaces only the rotary, so build "
                         "the model from a config with the new rope_parameters instead")


def patch_rotary(model: nn.Module, rope: nn.Module | None = None, *, mode: str = "auto") -> nn.Module:
    """Replace the rotary embedding of a ``transformers`` model by posemb's.

    Args:
        model: a ``transformers`` model of a type in :data:`PATCHABLE_MODEL_TYPES` (Llama, Qwen2,
            Mistral, Qwen3, Granite, OLMo 2, OLMo 3, Phi-3, GPT-NeoX, StableLM, Cohere, Cohere2, GLM,
            GLM-4, Gemma 2, Gemma 3 text, SmolLM3, EXAONE 4, gpt-oss, Llama 4 text, DeepSeek-V3;
            ``XForCausalLM`` or the base model). It is changed in place.
        rope: a posemb rope (``posemb.rotary.RoPE``: ``cos_sin(positions)``, ``rotary_dim``,
            ``layout``); for a per-layer-type model (Gemma 3, OLMo 3) also a mapping ``layer_type -> rope``.
            Default: ``posemb.rotary.from_hf_config(model.config)`` (per layer type where the model
            has several), which reproduces the model's own ``rope_parameters`` (every
            ``rope_type``), so logits are unchanged.
        mode: ``"auto"`` (``"cos_sin"`` when the model's own apply function can rotate with the
            rope: same layout, and the whole head or, where the family rotates a slice, a leading
            slice; ``"hooks"`` otherwise, Llama / Qwen2 / Mistral only), ``"cos_sin"`` or
            ``"hooks"``; see the module docstring.

    Returns:
        The original rotary module (also kept as ``model...rotary_emb.original``); undo with
        :func:`unpatch_rotary`.

    Note: posemb's rope computes the frequencies from the positions of each call. For
    ``rope_type="dynamic"`` HF keeps the largest length seen so far (``max_seq_len_cached``) across
    calls, so after a long call a shorter one (still above ``max_position_embeddings``) uses a
    different base in HF than here; a single call, or decoding with growing positions, agrees.
    """
    _check_hf_model(model)
    check_choice("mode", mode, PATCH_MODES)
    model_type = getattr(model.config, "model_type", None)
    family = _FAMILIES.get(model_type)
    if family is None:
        reason = _NOT_PATCHABLE.get(model_type, "its patched forward is not verified")
        raise TypeError(f"patch_rotary does not support {type(model).__name__} (model_type={model_type!r}): "
                        f"{reason}; supported model types: {list(PATCHABLE_MODEL_TYPES)}. "
                        "posemb.rotary.from_hf_config / layer_rotaries still give its exact rotary.")
    if family["layout"] == "config":
        # the model branches on config.rope_interleave (DeepseekV3Attention.forward); the config class's
        # default is True, so a config without the key is DeepSeek's interleaved pairing
        family = {**family, "layout": "interleaved" if getattr(model.config, "rope_interleave", True) else "half"}
    owner = _rotary_owner(model)
    original = owner.rotary_emb
    if isinstance(original, PosembRotaryEmbedding):
        raise ValueError("model is already patched with posemb's rotary; call unpatch_rotary(model) first")
    layer_ropes = _layer_ropes(model, rope) if family.get("per_layer_type") else None
    if layer_ropes is not None:
        rope = next(iter(layer_ropes.values()))
    elif rope is None:
        from posemb.rotary import from_hf_config
        rope = from_hf_config(model.config)
    head_dim = _config_head_dim(model.config)
    for each in (layer_ropes or {None: rope}).values():
        native = _fits_natively(each, head_dim, family)
        if not native:
            break
    layout, rotary_dim = getattr(each, "layout", "half"), int(each.rotary_dim)
    if family.get("mla"):
        _check_mla_softmax_scale(model, each)
    if mode == "auto":
        mode = "cos_sin" if native or not family["hooks"] else "hooks"
    if mode == "cos_sin" and not native:
        span = "a leading slice of the head" if family["partial"] else f"the whole head (rotary_dim = {head_dim})"
        raise ValueError(f"mode='cos_sin' on {type(model).__name__} needs a rope of layout {family['layout']!r} over "
                         f"{span}; got layout {layout!r}, rotary_dim {rotary_dim}"
                         + ("; use mode='hooks' or 'auto'" if family["hooks"] else
                            f"; {type(model).__name__} supports only mode='cos_sin' (its q/k pass through a norm "
                            "or an apply function that hooks cannot reproduce)"))
    if mode == "hooks" and not family["hooks"]:
        raise ValueError(f"mode='hooks' is not supported on {type(model).__name__} (model_type={model_type!r}): "
                         f"only on {[name for name, f in _FAMILIES.items() if f['hooks']]}; use mode='cos_sin'")

    module = PosembRotaryEmbedding(rope, head_dim, mode, family["cos_format"], layer_ropes,
                                   keep_float32=family.get("keep_float32", False))
    device = next((buffer.device for buffer in original.buffers()), None)
    if device is not None:
        module.to(device)
    object.__setattr__(module, "original", original)
    if mode == "hooks":
        projections = _qk_projections(model)
        if not projections:
            raise TypeError(f"mode='hooks' needs attention modules with q_proj / k_proj linear layers; "
                            f"{type(model).__name__} has none")
        for name, projection in projections:
            num_heads = _heads_of(name, projection, head_dim)

            def hook(_layer, _inputs, output, num_heads=num_heads):
                return module.rotate_projection(output, num_heads)

            module._hook_handles.append(projection.register_forward_hook(hook))
    owner.rotary_emb = module
    return original


def unpatch_rotary(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_rotary`: restore the original rotary module, remove the projection hooks,
    and return the posemb module that was taken out."""
    owner = _rotary_owner(model)
    module = owner.rotary_emb
    if not isinstance(module, PosembRotaryEmbedding):
        raise ValueError(f"model is not patched (its rotary_emb is {type(module).__name__}); nothing to undo")
    for handle in module._hook_handles:
        handle.remove()
    module._hook_handles.clear()
    # The original is not a submodule (so it is not saved twice): follow any device move made meanwhile.
    device = next((buffer.device for buffer in module.buffers()), None)
    if device is not None:
        module.original.to(device)
    owner.rotary_emb = module.original
    return module


def permute_qk_for_layout(weight: Tensor, num_heads: int, head_dim: int, *, to: str,
                          rotary_dim: int | None = None) -> Tensor:
    """Permute the rows of a q or k projection weight (out, in) or bias (out,) so that a model
    trained with one RoPE layout gives the same attention scores with the other layout.

    ``to="half"``: the source is interleaved (pairs ``2i, 2i+1``); the rows of each head's rotary
    part are reordered ``view(n_heads, r/2, 2, ...).transpose(1, 2)`` so pair ``i`` lands at
    ``i, i + r/2`` (HF ``convert_llama_weights_to_hf.permute``). ``to="interleaved"`` is the
    inverse, ``view(n_heads, 2, r/2, ...).transpose(1, 2)``. With a partial rotary
    (``rotary_dim`` r < ``head_dim``) only the first r rows of each head move; the rest pass
    through unrotated in both layouts. Returns a new tensor; ``weight`` is not changed.
    """
    check_tensor("weight", weight)
    if weight.dim() not in (1, 2):
        raise ValueError(f"weight must be a projection weight (out, in) or a bias (out,), got shape "
                         f"{tuple(weight.shape)}")
    check_int("num_heads", num_heads, minimum=1)
    check_even("head_dim", head_dim)
    check_choice("to", to, LAYOUTS)
    if rotary_dim is None:
        rotary_dim = head_dim
    check_even("rotary_dim", rotary_dim)
    if rotary_dim > head_dim:
        raise ValueError(f"rotary_dim must be <= head_dim = {head_dim}, got {rotary_dim}")
    if weight.shape[0] != num_heads * head_dim:
        raise ValueError(f"weight.shape[0] must be num_heads * head_dim = {num_heads} * {head_dim} = "
                         f"{num_heads * head_dim}, got shape {tuple(weight.shape)}")
    rest = tuple(weight.shape[1:])
    per_head = weight.reshape(num_heads, head_dim, *rest)
    rotary, passthrough = per_head[:, :rotary_dim], per_head[:, rotary_dim:]
    if to == "half":
        rotary = rotary.reshape(num_heads, rotary_dim // 2, 2, *rest).transpose(1, 2)
    else:
        rotary = rotary.reshape(num_heads, 2, rotary_dim // 2, *rest).transpose(1, 2)
    rotary = rotary.reshape(num_heads, rotary_dim, *rest)
    return torch.cat((rotary, passthrough), dim=1).reshape(weight.shape).contiguous()


def convert_model_layout(model: nn.Module, *, to: str, rotary_dim: int | None = None) -> nn.Module:
    """Permute every ``q_proj`` / ``k_proj`` weight and bias of a ``transformers`` model in place
    with :func:`permute_qk_for_layout`, for all heads (``k_proj`` counts its own heads, so
    grouped-query attention works). ``to="half"`` turns interleaved-trained weights into HF's
    half-split layout; ``to="interleaved"`` undoes it. Returns ``model``.

    Only the projection weights change: evaluate the result with a rope of layout ``to``
    (HF's own rotary for ``"half"``, ``patch_rotary(model, rope_interleaved)`` for ``"interleaved"``).
    """
    _check_hf_model(model)
    check_choice("to", to, LAYOUTS)
    head_dim = _config_head_dim(model.config)
    projections = _qk_projections(model)
    if not projections:
        raise TypeError(f"model has no attention modules with q_proj / k_proj linear layers "
                        f"({type(model).__name__})")
    with torch.no_grad():
        for name, projection in projections:
            num_heads = _heads_of(name, projection, head_dim)
            projection.weight.copy_(permute_qk_for_layout(projection.weight, num_heads, head_dim, to=to,
                                                          rotary_dim=rotary_dim))
            if projection.bias is not None:
                projection.bias.copy_(permute_qk_for_layout(projection.bias, num_heads, head_dim, to=to,
                                                            rotary_dim=rotary_dim))
    return model
