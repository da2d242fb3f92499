"""Multi-head attention that consults a positional scheme through its site's hooks.

Fast path: ``torch.nn.functional.scaled_dot_product_attention`` (SDPA) for the none, input,
rotation and bias sites. The content site (Shaw, Transformer-XL, DeBERTa) needs extra terms
inside the softmax and on the values, so it runs a query-blocked path whose memory is
O(block * Lk) per head rather than O(Lq * Lk * head_dim).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from posemb._validation import check_int, check_tensor
from posemb.model.cache import LayerCache
from posemb.schemes.base import PositionalScheme

# Elements of one score block in the content path (block * Lk * batch * heads); ~64 MiB in fp32.
_CONTENT_BLOCK_ELEMENTS = 1 << 24


def causal_mask(q_len: int, k_len: int, device: torch.device) -> Tensor:
    """Boolean (q_len, k_len) mask, True where attention is allowed. Queries are the last ``q_len``
    tokens of the ``k_len`` keys (the KV-cache case), so query i sees keys 0 .. k_len - q_len + i."""
    offset = k_len - q_len
    q_index = torch.arange(q_len, device=device)[:, None] + offset
    return torch.arange(k_len, device=device)[None, :] <= q_index


def attend(q: Tensor, k: Tensor, v: Tensor, scheme: PositionalScheme | None, q_positions: Tensor,
           k_positions: Tensor, *, causal: bool, bias_path: str = "auto") -> Tensor:
    """Attention of already-projected (and, for the rotation site, rotated) q, k, v under ``scheme``.

    ``bias_path`` (bias site only): ``"auto"`` lets :func:`posemb.kernels.flex.bias_attention` pick
    a path without an (L, L) bias (FlexAttention on CUDA, a Toeplitz view of the bias elsewhere);
    ``"dense"`` forces the reference below (``score_bias`` + SDPA); ``"toeplitz"``/``"flex"`` force one.

    Returns (batch, heads, Lq, head_dim) in q's dtype.
    """
    site = "none" if scheme is None else scheme.site
    q_len, k_len = q.shape[-2], k.shape[-2]
    if site == "content":
        return _content_attention(q, k, v, scheme, q_positions, k_positions, causal=causal)
    if site == "bias" and bias_path != "dense":
        from posemb.kernels.flex import bias_attention  # layer 3; imported lazily to keep imports light

        fast = bias_attention(q, k, v, scheme, q_positions, k_positions, causal=causal, path=bias_path)
        if fast is not None:
            return fast
    bias = scheme.score_bias(q_positions, k_positions) if site == "bias" else None
    if bias is None:
        if not causal or q_len == 1:
            return F.scaled_dot_product_attention(q, k, v)
        if q_len == k_len:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(q_len, k_len, q.device))
    # A 4-D mask keeps SDPA off its slow math kernel (a 3-D one silently falls back to it).
    bias = bias.to(q.dtype)
    if bias.dim() != 4 or bias.shape[1] != q.shape[1] or bias.shape[-2:] != (q_len, k_len) \
            or bias.shape[0] not in (1, q.shape[0]):
        raise ValueError(f"{type(scheme).__name__}.score_bias must return shape (batch or 1, heads={q.shape[1]}, "
                         f"Lq={q_len}, Lk={k_len}), got {tuple(bias.shape)}; does the scheme's num_heads "
                         f"match the attention's?")
    if causal and q_len > 1:
        bias = bias.masked_fill(~causal_mask(q_len, k_len, q.device), float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def _content_attention(q: Tensor, k: Tensor, v: Tensor, scheme: PositionalScheme, q_positions: Tensor,
                       k_positions: Tensor, *, causal: bool) -> Tensor:
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[-2]
    scale = scheme.logit_scale(head_dim)
    block = max(1, min(q_len, _CONTENT_BLOCK_ELEMENTS // max(1, batch * heads * k_len)))
    outputs = []
    for start in range(0, q_len, block):
        stop = min(q_len, start + block)
        q_block, qp_block = q[:, :, start:stop], q_positions[:, start:stop]
        scores = q_block @ k.transpose(-1, -2)
        extra = scheme.relative_logits(q_block, k, qp_block, k_positions)
        if extra is not None:
            scores = scores + extra
        scores = scores.float() * scale
        if causal:
            allowed = causal_mask(q_len, k_len, q.device)[start:stop]
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out = probs @ v
        extra_values = scheme.relative_values(probs, qp_block, k_positions)
        if extra_values is not None:
            out = out + extra_values
        outputs.append(out)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-2)


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention, causal or bidirectional, with an optional positional scheme.

    Args:
        dim: model width.
        num_heads: number of heads; ``dim`` must be divisible by it.
        scheme: a :class:`PositionalScheme` (or None for no position information).
        causal: mask future tokens (decoder) or not (encoder).
        bias: use biases in the projections.
    """

    def __init__(self, dim: int, num_heads: int, scheme: PositionalScheme | None = None, *,
                 causal: bool = True, bias: bool = False) -> None:
        super().__init__()
        check_int("dim", dim, minimum=1)
        check_int("num_heads", num_heads, minimum=1)
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.causal = causal
        self.scheme = scheme
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: Tensor, positions: Tensor, cache: LayerCache | None = None) -> Tensor:
        check_tensor("x", x, ndim=3, floating=True)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x's last dimension must be dim={self.dim}, got shape {tuple(x.shape)}")
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scheme = self.scheme
        site = "none" if scheme is None else scheme.site
        k_positions = positions
        if site == "rotation" and (cache is None or scheme.caches_rotated_keys):
            q, k = scheme.rotate(q, k, positions, positions)
            if cache is not None:
                k, v, k_positions = cache.append(k, v, positions)
        elif site == "rotation":
            raw_k, v, k_positions = cache.append(k, v, positions)
            q, k = scheme.rotate(q, raw_k, positions, k_positions)
        elif cache is not None:
            k, v, k_positions = cache.append(k, v, positions)
        out = attend(q, k, v, scheme, positions, k_positions, causal=self.causal)
        return self.out(out.transpose(1, 2).reshape(batch, length, self.dim))
