"""KV cache for incremental decoding; works for every scheme because it stores positions too."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from posemb.schemes.base import next_positions, position_seq_dim


@dataclass
class LayerCache:
    """One layer's keys, values and key positions. ``keys`` are rotated or raw, as the scheme says
    (``PositionalScheme.caches_rotated_keys``)."""

    keys: Tensor | None = None
    values: Tensor | None = None
    positions: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def append(self, keys: Tensor, values: Tensor, positions: Tensor, *,
               layout: str = "batch seq") -> tuple[Tensor, Tensor, Tensor]:
        """Add keys, values (batch, heads, seq, d) and their positions (in ``layout``, see
        :data:`posemb.schemes.base.POSITION_LAYOUTS`); return everything cached so far."""
        if self.keys is None:
            self.keys, self.values, self.positions = keys, values, positions
        else:
            if keys.shape[0] != self.keys.shape[0]:
                raise ValueError(f"batch size changed during decoding: cache has {self.keys.shape[0]}, "
                                 f"new input has {keys.shape[0]}")
            self.keys = torch.cat([self.keys, keys], dim=-2)
            self.values = torch.cat([self.values, values], dim=-2)
            self.positions = torch.cat([self.positions, positions], dim=position_seq_dim(layout))
        return self.keys, self.values, self.positions


@dataclass(frozen=True)
class CacheSignature:
    """What a KV cache's contents depend on: keys and values filled by one model are meaningless to
    a model with another scheme, depth or width, so :class:`~posemb.model.TransformerLM` refuses a
    cache whose signature is not its own."""

    scheme: str
    #: ``(name, repr(value))`` of each scheme option, sorted (``repr`` so any value compares)
    options: tuple[tuple[str, str], ...]
    depth: int
    dim: int
    heads: int
    head_dim: int
    causal: bool

    def describe(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.options)
        return (f"scheme {self.scheme!r}" + (f" ({options})" if options else "")
                + f", depth {self.depth}, dim {self.dim}, heads {self.heads}, head_dim {self.head_dim}, "
                f"{'causal' if self.causal else 'bidirectional'}")


@dataclass
class KVCache:
    """Per-layer caches plus the number of tokens already seen (the next default position).

    ``signature`` records the model that made the cache (``model.new_cache()``); a cache built by
    hand has None and takes the signature of the first model that fills it."""

    num_layers: int
    layers: list[LayerCache] = field(default_factory=list)
    signature: CacheSignature | None = None
    next_position: Tensor | None = None  # (batch,) next default position per sequence
    #: every token and position fed so far, so the model can re-prefill when the encoding changes
    tokens: Tensor | None = None
    positions: Tensor | None = None
    #: the context-dependent schemes' ``frequency_key`` per batch row when the cache was filled
    frequency_keys: tuple | None = None

    def __post_init__(self) -> None:
        if not self.layers:
            self.layers = [LayerCache() for _ in range(self.num_layers)]

    def clear_layers(self) -> None:
        self.layers = [LayerCache() for _ in range(self.num_layers)]

    def record(self, tokens: Tensor, positions: Tensor, *, layout: str = "batch seq") -> None:
        """Remember ``tokens`` (batch, seq) and their ``positions`` (in ``layout``)."""
        self.tokens = tokens if self.tokens is None else torch.cat([self.tokens, tokens], dim=1)
        self.positions = positions if self.positions is None else torch.cat(
            [self.positions, positions], dim=position_seq_dim(layout))
        self.next_position = next_positions(positions, layout)

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0
