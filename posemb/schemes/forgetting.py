"""The Forgetting Transformer's forget gate: a data-dependent ALiBi (Lin, Nikishin, He & Courville,
ICLR 2025, arXiv 2503.02130; x-transformers ``DataDependentAlibi``)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from posemb._validation import check_bool, check_float, check_heads, check_width
from posemb.functional.contextual import cumulative_log_gates
from posemb.registry import register
from posemb.schemes.base import PositionalScheme


@register("forgetting")
class ForgettingGate(PositionalScheme):
    """``s_ij += D_ij = sum_{t = j+1 .. i} log f_t`` per head, with the forget gate
    ``f_t = sigmoid(w_h . k_t + b_h)`` of token t (FoX, §3). With a constant gate this is ALiBi with
    slope ``-log f``; a learned, content-dependent gate lets each token decide how much of the past
    to forget. No positions are read, so shifting them changes nothing.

    **The gate reads the head's key k_t, not the layer input x_t** (the paper's ``w^T x_t + b``).
    Keys are linear in x_t (``k_t = W_k x_t``), so this is the paper's gate restricted to the
    head's key subspace, with ``head_dim + 1`` parameters per head instead of ``dim + 1``; and keys
    are what the attention hooks and the KV cache already hold, so decoding recomputes every gate
    exactly from the cached keys (no extra cache state, no new hook). The cost: one
    (batch, heads, Lk) gate pass per call, as cheap as one query's scores.

    Computed at the content site: ``prepare_relative`` forms the cumulative log-gates ``c`` once
    per call (float64), and each block adds a query column ``c_i - c_r`` and a key row
    ``c_r - c_j`` (r: the block's first query), never an (L, L) tensor. Each layer owns its gate;
    causal only, as in the paper. Since softmax ignores the column, the attention runs the gate as a
    per-key bias on fused SDPA (``content_key_bias``, :meth:`key_bias`,
    :mod:`posemb.model.key_bias_attention`); the tile hooks remain its reference.

    Args:
        head_dim: width of one head (the gate's input).
        num_heads: attention heads.
        causal: must be True.
        bias_init: initial ``b_h`` (x-transformers: 5, so ``f ~ 0.993``: forgetting starts slow).
    """

    site = "content"
    family = "relative"
    per_layer = True
    content_block_indices = True
    content_key_bias = True

    def __init__(self, head_dim: int, num_heads: int, causal: bool = True, bias_init: float = 5.0) -> None:
        super().__init__()
        self.head_dim = check_width("head_dim", head_dim)
        self.num_heads = check_heads("num_heads", num_heads)
        if not check_bool("causal", causal):
            raise ValueError("forgetting is defined for causal attention only (the gate accumulates over the "
                             "tokens between key and query, in order); got causal=False")
        self.bias_init = check_float("bias_init", bias_init)
        self.gate_weight = nn.Parameter(torch.zeros(num_heads, head_dim))
        self.gate_bias = nn.Parameter(torch.full((num_heads,), self.bias_init))

    def log_forget_gates(self, k: Tensor) -> Tensor:
        """``log f_t = log sigmoid(w_h . k_t + b_h)``: (batch, heads, Lk) from keys (batch, heads, Lk, d)."""
        if k.shape[1] != self.num_heads or k.shape[-1] != self.head_dim:
            raise ValueError(f"keys must be (batch, heads={self.num_heads}, seq, head_dim={self.head_dim}), "
                             f"got {tuple(k.shape)}")
        logits = torch.einsum("bhld,hd->bhl", k, self.gate_weight.to(k.dtype)) + self.gate_bias.to(k.dtype)[:, None]
        return F.logsigmoid(logits)

    def prepare_relative(self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor) -> Any:
        offset = k.shape[-2] - q.shape[-2]
        if offset < 0:
            raise ValueError(f"forgetting needs the queries among the keys (Lq <= Lk), got Lq={q.shape[-2]}, "
                             f"Lk={k.shape[-2]}")
        return cumulative_log_gates(self.log_forget_gates(k)), offset

    def relative_logits(self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor, *,
                        state: Any = None, rows: tuple[int, int] = None,
                        keys: tuple[int, int] = None) -> tuple[Tensor, Tensor]:
        if state is None or rows is None or keys is None:
            raise ValueError("forgetting's relative_logits needs state= from prepare_relative and the block's "
                             "rows= and keys= index ranges (the attention passes them)")
        cumulative, offset = state
        (row_start, row_stop), (key_start, key_stop) = rows, keys
        # Rebased on the block's first query, r, so both float32 terms stay near the size of the
        # differences the block needs (c itself grows with the length).
        reference = cumulative[..., row_start + offset, None]
        column = cumulative[..., row_start + offset:row_stop + offset] - reference
        row = reference - cumulative[..., key_start:key_stop]
        # Added to q.k before the attention's 1/sqrt(d), so undo that scale here.
        unscale = 1.0 / self.logit_scale(q.shape[-1])
        return (column[..., :, None] * unscale).to(q.dtype), (row[..., None, :] * unscale).to(q.dtype)

    def key_bias(self, state: Any, *, reference: int, stop: int) -> Tensor:
        """``D_ij = c_i - c_j`` is the query column ``c_i`` (which softmax ignores) plus the key row
        ``-c_j``; rebased on key ``reference``: ``c_reference - c_j`` for j < stop, float64."""
        cumulative, _ = state
        return cumulative[..., reference, None] - cumulative[..., :stop]

    def relative_values(self, probs: Tensor, q_positions: Tensor, k_positions: Tensor, *, state: Any = None,
                        rows: tuple[int, int] = None, keys: tuple[int, int] = None) -> None:
        return None  # the gate only biases the logits

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, num_heads={self.num_heads}"
