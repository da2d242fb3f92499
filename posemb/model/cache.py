"""KV cache for incremental decoding; works for every scheme because it stores positions too."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


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

    def append(self, keys: Tensor, values: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.keys is None:
            self.keys, self.values, self.positions = keys, values, positions
        else:
            if keys.shape[0] != self.keys.shape[0]:
                raise ValueError(f"batch size changed during decoding: cache has {self.keys.shape[0]}, "
                                 f"new input has {keys.shape[0]}")
            self.keys = torch.cat([self.keys, keys], dim=-2)
            self.values = torch.cat([self.values, values], dim=-2)
            self.positions = torch.cat([self.positions, positions], dim=-1)
        return self.keys, self.values, self.positions


@dataclass
class KVCache:
    """Per-layer caches plus the number of tokens already seen (the next default position)."""

    num_layers: int
    layers: list[LayerCache] = field(default_factory=list)
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

    def record(self, tokens: Tensor, positions: Tensor) -> None:
        self.tokens = tokens if self.tokens is None else torch.cat([self.tokens, tokens], dim=1)
        self.positions = positions if self.positions is None else torch.cat([self.positions, positions], dim=1)
        self.next_position = positions[:, -1] + 1

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0
