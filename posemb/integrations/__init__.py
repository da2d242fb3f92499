"""Bridges to other libraries (layer 6). Each submodule imports its library lazily, inside
functions, so ``import posemb`` never requires it.

- :mod:`posemb.integrations.hf`: put posemb's rotary into a Hugging Face ``transformers``
  Llama-family model (Llama, Qwen2, Mistral) and convert q/k projection weights between the
  half-split and interleaved RoPE layouts.
"""
