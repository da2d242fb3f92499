"""DeepSeek's decoupled RoPE for Multi-head Latent Attention (DeepSeek-V2, arXiv 2405.04434, Sec.
2.1.3; DeepSeek-V3, arXiv 2412.19437; transformers ``models/deepseek_v3/modeling_deepseek_v3.py``).

MLA compresses keys and values into a low-rank latent, which RoPE cannot pass through: a rotation
between the latent and the key would have to be absorbed into the query projection for every
position. So position gets its own channels: each head's query is ``[q_nope ; R(m) q_rope]`` and each
key ``[k_nope ; R(n) k_rope]``, where ``q_rope`` has ``qk_rope_head_dim`` channels per head and
``k_rope`` is **one** head, projected straight from the hidden state and shared by every head. The
rope part contributes ``(R(m) q_rope) . (R(n) k_rope)``, a function of ``n - m``; the content
part carries no position at all.

This scheme is that rotation: RoPE (any schedule of :class:`~posemb.schemes.rope.RoPE`) over the
rope sub-head, interleaved pairs when ``rope_interleave`` (DeepSeek's checkpoints; transformers'
``rope_interleave=True``, whose ``apply_rotary_pos_emb_interleave`` returns the rotated pairs
de-interleaved, a permutation shared by q and k that leaves every score unchanged). It sets
``shared_key_rope = True``: the model then builds
:class:`~posemb.model.latent_attention.MultiHeadLatentAttention`, which projects the separate rope
sub-heads and the single shared rope key, and calls :meth:`rotate` on them only.

The softmax scale is ``1/sqrt(qk_nope_head_dim + qk_rope_head_dim)``, times ``mscale^2`` with
``mscale = 0.1 · mscale_all_dim · ln(factor) + 1`` when a scaled schedule (YaRN) sets
``mscale_all_dim`` (DeepSeek's ``yarn_get_mscale``; transformers ``yarn_apply_mscale``): YaRN's
temperature is applied to the whole logit, not only through cos/sin (:meth:`logit_scale`).
"""
from __future__ import annotations

from typing import ClassVar

from posemb._validation import check_bool, check_int
from posemb.registry import register
from posemb.schemes.rope import RoPE


def default_rope_head_dim(head_dim: int) -> int:
    """Half the head, rounded down to an even count (DeepSeek: 64 rope channels next to 128 content)."""
    return max(2, (head_dim // 2) // 2 * 2)


@register("mla")
class DecoupledRoPE(RoPE):
    """The decoupled rope sub-head of DeepSeek MLA.

    Args:
        head_dim: the model's head width, used only for the default ``qk_rope_head_dim``.
        qk_rope_head_dim: channels of each query's rope sub-head and of the shared rope key
            (DeepSeek-V3: 64). Default: :func:`default_rope_head_dim` of ``head_dim``.
        base, rope_type, scaling, max_position_embeddings: RoPE's schedule (DeepSeek-V3: YaRN,
            ``factor`` 40, ``mscale`` = ``mscale_all_dim`` = 1, ``original_max_position_embeddings`` 4096).
        rope_interleave: pairs ``(2i, 2i + 1)`` (True, DeepSeek) or ``(i, i + r/2)`` (False).

    Attributes:
        qk_rope_head_dim: rotated channels (also ``head_dim`` of the underlying RoPE).
        softmax_scale_factor: ``mscale^2`` (1 unless YaRN with ``mscale_all_dim``).
    """

    #: the attention projects one rope key shared by every head (see the module docstring)
    shared_key_rope: ClassVar[bool] = True

    def __init__(self, head_dim: int | None = None, qk_rope_head_dim: int | None = None, base: float = 10000.0,
                 rope_type: str = "default", scaling: dict | None = None, rope_interleave: bool = True,
                 max_position_embeddings: int = 2048) -> None:
        if qk_rope_head_dim is None:
            if head_dim is None:
                raise ValueError("mla needs qk_rope_head_dim (or head_dim, to default it to half the head)")
            qk_rope_head_dim = default_rope_head_dim(check_int("head_dim", head_dim, minimum=1))
        check_int("qk_rope_head_dim", qk_rope_head_dim, minimum=2)
        if qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even (RoPE rotates channel pairs), got {qk_rope_head_dim}")
        check_bool("rope_interleave", rope_interleave)
        super().__init__(qk_rope_head_dim, base=base, rope_type=rope_type, scaling=scaling,
                         layout="interleaved" if rope_interleave else "half",
                         max_position_embeddings=max_position_embeddings)
        self.qk_rope_head_dim, self.rope_interleave = qk_rope_head_dim, rope_interleave
        self.softmax_scale_factor = 1.0
        mscale_all_dim = self.scaling.get("mscale_all_dim")
        if rope_type != "default" and mscale_all_dim:
            from posemb.functional.rope_schedules import yarn_mscale

            factor = self._params.get("factor", self.scaling.get("factor"))
            self.softmax_scale_factor = yarn_mscale(float(factor), float(mscale_all_dim)) ** 2

    def logit_scale(self, head_dim: int) -> float:
        """Softmax scale for queries/keys of ``head_dim = qk_nope_head_dim + qk_rope_head_dim`` channels."""
        return head_dim ** -0.5 * self.softmax_scale_factor

    def extra_repr(self) -> str:
        text = f"{super().extra_repr()}, rope_interleave={self.rope_interleave}"
        if self.softmax_scale_factor != 1.0:
            text += f", softmax_scale_factor={self.softmax_scale_factor:.6g}"
        return text
