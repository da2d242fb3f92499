"""Randomized positional encodings (Ruoss, Delétang, Genewein, Grau-Moya, Csordás, Bennani, Legg &
Veness, ACL 2023, "Randomized Positional Encodings Boost Length Generalization of Transformers",
arXiv 2305.16843, §3; google-deepmind/randomized_positional_encodings).

During training each sequence of length n gets, instead of 0 .. n-1, a sorted random subset of n
distinct positions from [0, N) with N larger than any test length, so the model sees every
position up to N (and every distance up to N) while training on short sequences. The reference
code (``models/transformer.py``) draws such positions at test time too; the algorithmic suite
(``posemb tasks``) follows it. Any scheme can use it: it only changes the positions.
"""
from __future__ import annotations

import torch
from torch import Tensor

from posemb._validation import check_int


def randomized_positions(batch: int, length: int, max_position: int, *, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> Tensor:
    """(batch, length) int64 positions: per row, ``length`` distinct integers drawn uniformly from
    ``[0, max_position)``, in increasing order.

    Args:
        batch: rows.
        length: positions per row (the training length n).
        max_position: N, the size of the range (>= length; the paper picks it above the longest
            evaluation length, so that every evaluation position was seen in training).
        generator: a ``torch.Generator`` for reproducible draws (on ``device``).
        device: where the positions are made (default: the generator's, else the CPU).
    """
    check_int("batch", batch, minimum=1)
    check_int("length", length, minimum=1)
    check_int("max_position", max_position, minimum=1)
    if max_position < length:
        raise ValueError(f"max_position must be >= length ({length}) to draw {length} distinct positions, "
                         f"got {max_position}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    device = torch.device(device) if device is not None else (generator.device if generator is not None
                                                             else torch.device("cpu"))
    # A uniformly random subset: the indices of the `length` largest of max_position i.i.d. uniforms.
    scores = torch.rand(batch, max_position, generator=generator, device=device)
    chosen = scores.topk(length, dim=1, sorted=False).indices
    return chosen.sort(dim=1).values
