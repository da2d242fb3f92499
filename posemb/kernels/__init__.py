"""Layer 2: fast paths chosen at run time by device and dtype, each tested against a plain
PyTorch reference in layer 1.

* :func:`apply_rotary`, :func:`apply_rotary_qk`: fused RoPE (in place, ``out=`` or out of place;
  eager chunked on CPU, Triton on CUDA), forward and backward; ``backend="reference"`` is the
  plain formula :func:`posemb.functional.rope.apply_rotary`.
* :func:`apply_rotary_qkv_`: the same rotation in place on a packed q|k|v projection (the model's
  training path), differentiable, backward in place on the gradient when the caller allows.
* :func:`load_compiled_cpu`: build/load the optional one-pass C++ CPU RoPE kernel, which ``auto``
  then uses (or set ``POSEMB_COMPILED_KERNELS=1`` to load it on the first CPU call).
* :mod:`posemb.kernels.flex`: T5 and ALiBi as FlexAttention ``score_mod`` functions, and
  :func:`posemb.kernels.flex.bias_attention`, the bias-site attention that avoids an (L, L) tensor.
"""
from posemb.kernels.rotary import apply_rotary, apply_rotary_qk, apply_rotary_qkv_, select_backend


def load_compiled_cpu(build: bool = True) -> bool:
    """Load the compiled single-pass CPU RoPE kernel (:mod:`posemb.kernels.rotary_compiled`),
    compiling it first when ``build`` is true and no cached build exists (tens of seconds, once
    per machine; cache in ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/posemb/torch_extensions``).

    Returns True when loaded (``backend="auto"`` then uses it for CPU tensors), False with a
    one-line ``RuntimeWarning`` when it cannot be built (no C++ compiler or ninja); never raises
    for that."""
    from posemb.kernels import rotary_compiled
    return rotary_compiled.load(build=build)


__all__ = ["apply_rotary", "apply_rotary_qk", "apply_rotary_qkv_", "load_compiled_cpu", "select_backend"]
