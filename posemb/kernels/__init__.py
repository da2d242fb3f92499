"""Layer 3: fast paths chosen at run time by device and dtype, each tested against a plain
PyTorch reference.

* :func:`apply_rotary`, :func:`apply_rotary_qk`: fused RoPE (in place, ``out=`` or out of place;
  eager chunked on CPU, Triton on CUDA), forward and backward.
* :mod:`posemb.kernels.flex`: T5 and ALiBi as FlexAttention ``score_mod`` functions, and
  :func:`posemb.kernels.flex.bias_attention`, the bias-site attention that avoids an (L, L) tensor.
"""
from posemb.kernels.rotary import apply_rotary, apply_rotary_qk, rotary_reference, select_backend

__all__ = ["apply_rotary", "apply_rotary_qk", "rotary_reference", "select_backend"]
