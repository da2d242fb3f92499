"""Multi-head Latent Attention (DeepSeek-V2, arXiv 2405.04434, Sec. 2.1; DeepSeek-V3) with its
decoupled RoPE (:mod:`posemb.schemes.mla`).

Projections, as transformers' ``DeepseekV3Attention`` names them (so weights copy one to one)::

    q          = q_b_proj(RMSNorm(q_a_proj(x)))          (q_lora_rank set)   or  q_proj(x)
    [q_nope ; q_rope] per head: qk_nope_head_dim + qk_rope_head_dim channels
    [c_kv ; k_rope] = kv_a_proj_with_mqa(x)               c_kv: kv_lora_rank, k_rope: ONE head
    [k_nope ; v]  per head = kv_b_proj(RMSNorm(c_kv))
    scores     = ([q_nope ; R(m) q_rope] . [k_nope ; R(n) k_rope]) * scale,  scale = scheme.logit_scale(d_qk)
    out        = o_proj(softmax(scores) v)

``kv_lora_rank=None`` drops the latent (``kv_proj(x)`` gives ``[k_nope ; v]`` directly, ``k_rope_proj(x)``
the rope key): the decoupled-RoPE attention at full rank, which is what
:class:`~posemb.model.TransformerLM` builds for ``scheme="mla"`` so that a study compares position
handling, not a compression rank. The KV cache holds the expanded keys and values (not DeepSeek's
compressed latent, whose memory saving is not the point here), rotated unless the schedule is
context-dependent, in which case the rope part is re-rotated at each step as for RoPE.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from posemb._validation import check_bool, check_float, check_heads, check_tensor, check_width
from posemb.model.attention import attend
from posemb.model.cache import LayerCache
from posemb.schemes.base import PositionalScheme, check_positions


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek MLA self-attention around a scheme with ``shared_key_rope`` (``posemb.build("mla")``).

    Args:
        dim: model width (``hidden_size``).
        num_heads: attention heads.
        scheme: the decoupled rope scheme; it fixes ``qk_rope_head_dim`` and the softmax scale.
        causal: mask future tokens.
        qk_nope_head_dim, v_head_dim: content channels of each query/key and value head
            (default ``dim // num_heads``).
        q_lora_rank: rank of the query compression (None: a full ``q_proj``).
        kv_lora_rank: rank of the key/value latent (None: full-rank projections, no latent).
        bias: biases on ``q_a_proj``/``q_proj``, ``kv_a_proj_with_mqa``/``kv_proj``, ``o_proj``
            (transformers' ``attention_bias``).
        norm_eps: epsilon of the latents' RMSNorms (``rms_norm_eps``).
    """

    def __init__(self, dim: int, num_heads: int, scheme: PositionalScheme, *, causal: bool = True,
                 qk_nope_head_dim: int | None = None, v_head_dim: int | None = None, q_lora_rank: int | None = None,
                 kv_lora_rank: int | None = None, bias: bool = False, norm_eps: float = 1e-6) -> None:
        super().__init__()
        check_width("dim", dim)
        check_heads("num_heads", num_heads)
        if not getattr(scheme, "shared_key_rope", False):
            raise ValueError(f"MultiHeadLatentAttention needs a decoupled-rope scheme (shared_key_rope = True, "
                             f"e.g. posemb.build('mla', ...)), got {type(scheme).__name__}")
        self.causal = check_bool("causal", causal)
        check_bool("bias", bias)
        default = max(1, dim // num_heads)
        self.dim, self.num_heads, self.scheme = dim, num_heads, scheme
        self.qk_nope_head_dim = check_width("qk_nope_head_dim",
                                            default if qk_nope_head_dim is None else qk_nope_head_dim)
        self.v_head_dim = check_width("v_head_dim", default if v_head_dim is None else v_head_dim)
        self.qk_rope_head_dim = scheme.qk_rope_head_dim
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.q_lora_rank = None if q_lora_rank is None else check_width("q_lora_rank", q_lora_rank)
        self.kv_lora_rank = None if kv_lora_rank is None else check_width("kv_lora_rank", kv_lora_rank)
        check_float("norm_eps", norm_eps, minimum=0.0, strict_minimum=True)
        heads_qk, heads_kv = num_heads * self.qk_head_dim, num_heads * (self.qk_nope_head_dim + self.v_head_dim)
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(dim, heads_qk, bias=bias)
        else:
            self.q_a_proj = nn.Linear(dim, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = nn.RMSNorm(self.q_lora_rank, eps=norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, heads_qk, bias=False)
        if self.kv_lora_rank is None:
            self.kv_proj = nn.Linear(dim, heads_kv, bias=bias)
            self.k_rope_proj = nn.Linear(dim, self.qk_rope_head_dim, bias=bias)
        else:
            self.kv_a_proj_with_mqa = nn.Linear(dim, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
            self.kv_a_layernorm = nn.RMSNorm(self.kv_lora_rank, eps=norm_eps)
            self.kv_b_proj = nn.Linear(self.kv_lora_rank, heads_kv, bias=False)
        self.o_proj = nn.Linear(num_heads * self.v_head_dim, dim, bias=bias)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """q_nope, q_rope (B, H, L, ·), k_nope, v (B, H, L, ·), k_rope (B, 1, L, r)."""
        batch, length, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(batch, length, self.num_heads, self.qk_head_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        if self.kv_lora_rank is None:
            kv, k_rope = self.kv_proj(x), self.k_rope_proj(x)
        else:
            latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
            kv = self.kv_b_proj(self.kv_a_layernorm(latent))
        kv = kv.view(batch, length, self.num_heads, self.qk_nope_head_dim + self.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        return q_nope, q_rope, k_nope, v, k_rope.view(batch, 1, length, self.qk_rope_head_dim)

    def _keys(self, k_nope: Tensor, k_rope: Tensor) -> Tensor:
        """Per-head keys ``[k_nope ; k_rope]``, the one rope key broadcast to every head."""
        return torch.cat([k_nope, k_rope.expand(-1, self.num_heads, -1, -1)], dim=-1)

    def forward(self, x: Tensor, positions: Tensor, cache: LayerCache | None = None) -> Tensor:
        check_tensor("x", x, ndim=3, floating=True)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x's last dimension must be dim={self.dim}, got shape {tuple(x.shape)}")
        batch, length, _ = x.shape
        check_positions("positions", positions, "batch seq", 1, batch, length)
        q_nope, q_rope, k_nope, v, k_rope = self._project(x)
        scheme, nope = self.scheme, self.qk_nope_head_dim
        k_positions = positions
        if cache is None or scheme.caches_rotated_keys:
            q_rope, k_rope = scheme.rotate(q_rope, k_rope, positions, positions)
            k = self._keys(k_nope, k_rope)
            if cache is not None:
                k, v, k_positions = cache.append(k, v, positions)
        else:  # context-dependent schedule: raw rope keys are cached and re-rotated together
            raw, v, k_positions = cache.append(self._keys(k_nope, k_rope), v, positions)
            q_rope, k_rope = scheme.rotate(q_rope, raw[:, :1, :, nope:], positions, k_positions)
            k = self._keys(raw[..., :nope], k_rope)
        q = torch.cat([q_nope, q_rope], dim=-1)
        out = attend(q, k, v, scheme, positions, k_positions, causal=self.causal)  # scale: scheme.logit_scale
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.v_head_dim))
