"""A small decoder-only language model (pre-norm, nanoGPT-like) where the positional scheme is
one argument. Every scheme supports KV-cache decoding through explicit positions."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from posemb._validation import (MAX_DEPTH, MAX_VOCAB, check_bool, check_float, check_heads, check_int, check_tensor,
                                check_width)
from posemb.model.attention import MultiHeadAttention
from posemb.model.latent_attention import MultiHeadLatentAttention
from posemb.model.cache import CacheSignature, KVCache, LayerCache
from posemb.model.scheme_pattern import build_layer_schemes, describe_pattern
from posemb.schemes.base import PositionalScheme, check_positions, expand_positions, max_positions, position_seq_dim


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(torch.nn.functional.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, scheme: PositionalScheme | None, *, causal: bool, mlp_ratio: int,
                 position_layout: str | None = None, position_axes: int | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        if getattr(scheme, "shared_key_rope", False):
            # DeepSeek's decoupled RoPE needs its own projections (separate rope sub-heads, one shared
            # rope key): MLA at full rank, so only the position handling differs from the other layers.
            self.attn = MultiHeadLatentAttention(dim, heads, scheme, causal=causal)
        else:
            self.attn = MultiHeadAttention(dim, heads, scheme, causal=causal, position_layout=position_layout,
                                           position_axes=position_axes)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio * dim)

    def forward(self, x: Tensor, positions: Tensor, cache: LayerCache | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), positions, cache)
        return x + self.mlp(self.norm2(x))


class TransformerLM(nn.Module):
    """Decoder-only LM: token embedding, positional scheme, ``depth`` pre-norm blocks, tied head.

    Args:
        vocab_size: number of tokens.
        dim: model width; ``dim // heads`` is the head dimension.
        depth: number of blocks.
        heads: attention heads.
        scheme: a name from :func:`posemb.available` (default ``"rope"``), or a per-layer pattern: a
            list of names / ``(name, options)`` pairs repeated over the depth, e.g. iRoPE's
            ``["rope", "rope", "rope", "nope"]`` (:mod:`posemb.model.scheme_pattern`).
        causal: decoder (True) or bidirectional encoder (False).
        mlp_ratio: hidden width of the MLP as a multiple of ``dim``.
        exact_decoding: with a KV cache and a context-dependent scheme (dynamic NTK, LongRoPE),
            re-prefill the cache when the scheme's encoding changes, so each decoding step equals a
            full pass over its prefix at every layer (see ``docs/decoding.md``). False keeps the
            cache and accepts stale hidden states in layers past the first, which is cheaper.
        **scheme_options: options of the scheme (see :func:`posemb.scheme_options`); with a
            pattern, they go to every entry whose scheme takes them.
    """

    def __init__(self, vocab_size: int, dim: int, depth: int, heads: int, scheme: str = "rope", *,
                 causal: bool = True, mlp_ratio: int = 4, exact_decoding: bool = True,
                 **scheme_options: Any) -> None:
        super().__init__()
        check_int("vocab_size", vocab_size, minimum=1, maximum=MAX_VOCAB,
                  why="a sanity bound: larger is a typo that would exhaust memory")
        check_width("dim", dim)
        check_int("depth", depth, minimum=1, maximum=MAX_DEPTH,
                  why="a sanity bound: larger is a typo that would exhaust memory")
        check_heads("heads", heads)
        check_int("mlp_ratio", mlp_ratio, minimum=1, maximum=64,
                  why="a sanity bound: larger is a typo that would exhaust memory")
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.vocab_size, self.dim, self.depth, self.heads = vocab_size, dim, depth, heads
        self.causal = check_bool("causal", causal)
        self.exact_decoding = check_bool("exact_decoding", exact_decoding)
        context = {"dim": dim, "num_heads": heads, "head_dim": dim // heads, "causal": causal}
        # Site-1 schemes act once, on the input; the layers then see no scheme at all.
        built = build_layer_schemes(scheme, depth, context, scheme_options)
        self.scheme_name = scheme if isinstance(scheme, str) else describe_pattern(built.specs)
        self.scheme_options = dict(scheme_options)
        #: ``(name, options)`` of each layer's scheme
        self.layer_specs = built.specs
        #: the shape positions take in this model (``posemb.schemes.base.POSITION_LAYOUTS``)
        self.position_layout, self.position_axes = built.position_layout, built.position_axes
        self.input_scheme = built.input_scheme
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, s, causal=causal, mlp_ratio=mlp_ratio,
                                          position_layout=self.position_layout, position_axes=self.position_axes)
                                    for s in built.layers)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.head.weight = self.embed.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def schemes(self) -> list[PositionalScheme]:
        """The distinct scheme instances in this model (one if shared, ``depth`` if per layer)."""
        found: dict[int, PositionalScheme] = {}
        for module in self.modules():
            if isinstance(module, PositionalScheme):
                found.setdefault(id(module), module)
        return list(found.values())

    def num_position_parameters(self) -> int:
        """Parameters the positional scheme adds to the model."""
        return sum(s.num_added_parameters() for s in self.schemes)

    def cache_signature(self) -> CacheSignature:
        """What this model's KV cache contents depend on (see :class:`~posemb.model.cache.CacheSignature`)."""
        return CacheSignature(self.scheme_name, tuple(sorted((k, repr(v)) for k, v in self.scheme_options.items())),
                              self.depth, self.dim, self.heads, self.dim // self.heads, self.causal)

    def new_cache(self) -> KVCache:
        return KVCache(self.depth, signature=self.cache_signature())

    def _check_cache(self, cache: KVCache, batch: int) -> None:
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache from model.new_cache(), got {type(cache).__name__}")
        mine = self.cache_signature()
        if cache.signature is None:  # built by hand: it belongs to the first model that fills it
            if cache.length or cache.tokens is not None or len(cache.layers) != self.depth:
                raise ValueError(f"cache has no signature and holds {len(cache.layers)} layers / {cache.length} "
                                 f"tokens; use model.new_cache() for this model ({mine.describe()})")
            cache.signature = mine
        elif cache.signature != mine:
            raise ValueError(f"cache was filled by another model ({cache.signature.describe()}); this model is "
                             f"({mine.describe()}); start a new cache with model.new_cache()")
        if cache.next_position is not None and cache.next_position.shape[0] != batch:
            raise ValueError(f"batch size changed during decoding: the cache holds {cache.next_position.shape[0]} "
                             f"sequences, tokens has {batch}; start a new cache with model.new_cache()")

    def forward(self, tokens: Tensor, positions: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """Logits (batch, seq, vocab). ``positions`` defaults to ``arange`` continuing the cache."""
        check_tensor("tokens", tokens, ndim=2, integer=True)
        batch, length = tokens.shape
        if length == 0:
            raise ValueError("tokens must contain at least one position, got shape "
                             f"{tuple(tokens.shape)}")
        if batch == 0:
            raise ValueError(f"tokens must contain at least one sequence (batch >= 1), got shape {tuple(tokens.shape)}")
        if tokens.is_meta:
            raise ValueError("tokens are on the meta device, which holds no values; pass real tokens")
        meta = next((name for name, t in self.named_parameters() if t.is_meta), None)
        if meta is not None:
            raise ValueError(f"the model's parameter {meta!r} is on the meta device (no values); after building "
                             "under torch.device('meta'), call model.to_empty(device=...) and then "
                             "model.load_state_dict(...)")
        if not torch.compiler.is_compiling():
            low, high = torch.stack(torch.aminmax(tokens)).tolist()
            if low < 0 or high >= self.vocab_size:
                raise ValueError(f"tokens must lie in [0, vocab_size={self.vocab_size}), got values in [{low}, {high}]")
        if cache is not None:
            self._check_cache(cache, batch)
        if positions is None:
            start = 0 if cache is None or cache.next_position is None else cache.next_position
            offsets = torch.arange(length, device=tokens.device)
            positions = (offsets + (start[:, None] if isinstance(start, Tensor) else start)).expand(batch, length)
        else:
            check_tensor("positions", positions, integer=True)
            if positions.dim() == 2 or self.position_layout == "batch seq":
                if positions.shape != tokens.shape:
                    raise ValueError(f"positions must have the shape of tokens {tuple(tokens.shape)}"
                                     + ("" if self.position_layout == "batch seq" else
                                        f", or ({self.position_layout.replace(' ', ', ')}) with "
                                        f"{self.position_axes} axes") + f", got {tuple(positions.shape)}")
            else:
                check_positions("positions", positions, self.position_layout, self.position_axes, batch, length)
            if bool((positions < 0).any()):
                raise ValueError("positions must be >= 0")
        positions = positions.to(device=tokens.device, dtype=torch.long)
        if positions.dim() == 2:
            # Multi-axis schemes read 1-D positions as t = h = w (text tokens): exactly 1-D RoPE.
            positions = expand_positions(positions, self.position_layout, self.position_axes)
        if cache is not None and self.exact_decoding and self._context_dependent_schemes():
            all_positions = positions if cache.positions is None else torch.cat(
                [cache.positions, positions], position_seq_dim(self.position_layout))
            contexts = (max_positions(all_positions, self.position_layout) + 1).tolist()
            keys = tuple(tuple(s.frequency_key(int(c)) for c in contexts) for s in self._context_dependent_schemes())
            stale = cache.length > 0 and keys != cache.frequency_keys
            cache.frequency_keys = keys
            if stale:
                # The encoding changed (LongRoPE's switch, dynamic NTK's growing base): hidden states
                # cached under the old one are stale in every layer past the first, so recompute the
                # whole prefix, exactly as a full pass would (what HF's Phi-3 does at the switch).
                all_tokens = torch.cat([cache.tokens, tokens], dim=1)
                cache.clear_layers()
                cache.tokens = cache.positions = None
                return self._run(all_tokens, all_positions, cache)[:, -length:]
        return self._run(tokens, positions, cache)

    def _context_dependent_schemes(self) -> list[PositionalScheme]:
        return [s for s in self.schemes
                if type(s).frequency_key is not PositionalScheme.frequency_key and not s.caches_rotated_keys]

    def _run(self, tokens: Tensor, positions: Tensor, cache: KVCache | None) -> Tensor:
        x = self.embed(tokens)
        if self.input_scheme is not None:
            x = self.input_scheme.embed_input(x, positions)
        for index, block in enumerate(self.blocks):
            x = block(x, positions, None if cache is None else cache.layers[index])
        if cache is not None:
            cache.record(tokens, positions, layout=self.position_layout)
        return self.head(self.norm(x))

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Sample ``max_new_tokens`` after ``prompt`` (batch, seq) with the KV cache; temperature 0 is greedy."""
        check_int("max_new_tokens", max_new_tokens, minimum=0)
        check_float("temperature", temperature, minimum=0.0)
        if top_k is not None:
            check_int("top_k", top_k, minimum=1)
        cache = self.new_cache()
        logits = self(prompt, cache=cache)[:, -1]
        out = [prompt]
        for _ in range(max_new_tokens):
            if temperature == 0:
                token = logits.argmax(-1, keepdim=True)
            else:
                scaled = logits / temperature
                if top_k is not None:
                    kth = torch.topk(scaled, min(top_k, scaled.shape[-1])).values[:, -1:]
                    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
                token = torch.multinomial(torch.softmax(scaled, -1), 1, generator=generator)
            out.append(token)
            logits = self(token, cache=cache)[:, -1]
        return torch.cat(out, dim=1)
