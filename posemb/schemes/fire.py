"""FIRE: functional interpolation for relative positions (Li, Zhang, Kumar, Ainslie, Gu, Liu,
Chaudhary, Johnson, Ontañón, Sanghai, Gu, Zhou & Chen 2023, arXiv 2310.04418)."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from posemb._validation import check_bool, check_float, check_heads, check_width
from posemb.functional.fire import FireParameters, fire_normalized_distance
from posemb.registry import register
from posemb.schemes.base import PositionalScheme

#: (query, key) pairs per MLP call: its hidden layer is this many times mlp_width elements.
_MLP_PAIRS = 1 << 15


@register("fire")
class FIRE(PositionalScheme):
    """``s_ij += f_theta(psi(i - j) / psi(max(L, i)))_h``, ``psi(x) = log(c x + 1)``: a small MLP
    ``f_theta`` (1 -> ``mlp_width`` -> ReLU -> heads, the paper's §4 setting) of the normalised
    distance (:func:`posemb.functional.fire.fire_normalized_distance`), with learnable ``c`` and
    threshold ``L``. Causal only, as in the paper. Each layer owns its FIRE.

    Learnable scalars, as in the public port (mcleish7/arithmetic ``cramming/architectures/
    embeddings.py``): ``c`` is used as ``|c|``, and ``L = |m| * threshold`` with a learnable
    multiplier m (initially 1), so the optimiser moves L on the scale of its initial value.

    The bias depends on the query position ``i`` itself through ``max(L, i)``, not only on
    ``i - j``, so it runs at the content site, block by block (never an (L, L) tensor without
    autograd). Causal calls over consecutive positions on CPU take the fused path
    (:meth:`fire_parameters`, ``posemb.model.fire_attention``: the MLP in piecewise linear form, a
    hand-written backward); elsewhere the hooks below run, and with autograd the MLP's hidden layer is
    recomputed in the backward pass (``torch.utils.checkpoint``) rather than kept for every pair. Shifting all
    positions changes the output once they pass L (``translation_invariant = False``).

    Args:
        num_heads: attention heads.
        causal: must be True.
        mlp_width: hidden width of ``f_theta`` (the paper: 32).
        c: initial ``c`` (> 0; the port: 0.1).
        threshold: initial ``L`` (> 0; the port: 512).
        eps: added to the denominator ``psi(max(L, i))`` (>= 0).
    """

    site = "content"
    family = "relative"
    per_layer = True
    translation_invariant = False

    def __init__(self, num_heads: int, causal: bool = True, mlp_width: int = 32, c: float = 0.1,
                 threshold: float = 512.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_heads = check_heads("num_heads", num_heads)
        if not check_bool("causal", causal):
            raise ValueError("fire is defined for causal attention only (Li et al. 2023 normalise by the "
                             "query position i, which bounds i - j only when keys precede the query); "
                             "got causal=False")
        self.mlp_width = check_width("mlp_width", mlp_width)
        check_float("c", c, minimum=0.0, strict_minimum=True)
        self.threshold = check_float("threshold", threshold, minimum=0.0, strict_minimum=True)
        self.eps = check_float("eps", eps, minimum=0.0)
        self.mlp = nn.Sequential(nn.Linear(1, mlp_width), nn.ReLU(), nn.Linear(mlp_width, num_heads))
        self.c = nn.Parameter(torch.tensor(float(c)))
        self.threshold_multiplier = nn.Parameter(torch.tensor(1.0))

    def _heads(self, normalized: Tensor) -> Tensor:
        """``f_theta`` of normalised distances (B, Lq, Lk) -> (B, heads, Lq, Lk)."""
        return self.mlp(normalized[..., None]).permute(0, 3, 1, 2)

    def fire_bias(self, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        """The bias (batch or 1, heads, Lq, Lk) in the MLP's dtype, before any mask."""
        # Positions shared by the batch (an expanded arange, the usual case): one row of work.
        if q_positions.shape[0] > 1 and q_positions.stride(0) == 0 and k_positions.stride(0) == 0:
            q_positions, k_positions = q_positions[:1], k_positions[:1]
        threshold = self.threshold_multiplier.abs() * self.threshold
        normalized = fire_normalized_distance(q_positions, k_positions, self.c.abs(), threshold, self.eps)
        normalized = normalized.to(self.mlp[0].weight.dtype)
        recompute = torch.is_grad_enabled() and (normalized.requires_grad
                                                 or any(p.requires_grad for p in self.mlp.parameters()))
        # The hidden layer is (pairs, width): run the MLP on chunks of query rows so it never holds
        # more than _MLP_PAIRS pairs, and with autograd recompute it in the backward pass instead of
        # keeping it (only the (B, Lq, Lk) input is saved).
        batch, q_len, k_len = normalized.shape
        step = max(1, _MLP_PAIRS // (batch * k_len))
        pieces = []
        for start in range(0, q_len, step):
            piece = normalized[:, start:start + step]
            pieces.append(checkpoint(self._heads, piece, use_reentrant=False) if recompute else self._heads(piece))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)

    def fire_parameters(self) -> FireParameters | None:
        """The MLP and scalars for the fused path, or None when only the generic path knows the bias: an MLP
        that is not exactly Linear, ReLU, Linear with biases (a user replaced or extended it, or uses a
        Linear subclass, e.g. a fake-quantised one), hooks on the MLP or its layers, or a subclass that
        overrides how the bias is computed."""
        layers = list(self.mlp)
        if len(layers) != 3 or type(layers[0]) is not nn.Linear or type(layers[1]) is not nn.ReLU \
                or type(layers[2]) is not nn.Linear or layers[0].bias is None or layers[2].bias is None \
                or layers[0].in_features != 1:
            return None
        if any(module._forward_hooks or module._forward_pre_hooks for module in (self.mlp, *layers)) \
                or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return None
        if self._overrides_any(FIRE, (
                "prepare_relative", "relative_logits", "relative_values", "fire_bias", "_heads")):
            return None
        first, _, second = layers
        return FireParameters(first.weight, first.bias, second.weight, second.bias, self.c, self.threshold_multiplier,
                              self.threshold, self.eps)

    def relative_logits(self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor,
                        *, state: object = None) -> Tensor:
        # The attention multiplies (q.k + these logits) by logit_scale = 1/sqrt(d); FIRE adds its
        # bias after the scaling, so it is divided by that scale here.
        return self.fire_bias(q_positions, k_positions).to(q.dtype) / self.logit_scale(q.shape[-1])

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, mlp_width={self.mlp_width}, threshold={self.threshold}"
