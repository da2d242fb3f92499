"""Layer 4: attention that consults a scheme, and a small decoder-only LM."""
from posemb.model.attention import MultiHeadAttention, attend, causal_mask
from posemb.model.cache import CacheSignature, KVCache, LayerCache
from posemb.model.transformer import TransformerLM

__all__ = ["MultiHeadAttention", "attend", "causal_mask", "CacheSignature", "KVCache", "LayerCache", "TransformerLM"]
