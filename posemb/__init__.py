"""posemb: positional encodings for transformers, every scheme behind one interface.

>>> import posemb
>>> posemb.available()                      # doctest: +SKIP
>>> rope = posemb.build("rope", head_dim=64)  # doctest: +SKIP
>>> model = posemb.TransformerLM(256, dim=128, depth=2, heads=4, scheme="alibi")  # doctest: +SKIP
"""
from posemb.model import KVCache, MultiHeadAttention, TransformerLM
from posemb.registry import available, build, register, scheme_class, scheme_options
from posemb.schemes.base import PositionalScheme

__version__ = "0.1.0"
__all__ = ["available", "build", "register", "scheme_class", "scheme_options", "PositionalScheme",
           "MultiHeadAttention", "TransformerLM", "KVCache", "__version__"]
