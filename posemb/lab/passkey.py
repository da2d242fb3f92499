"""Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention", section 4.2): a random key is
hidden at some depth in filler text, and at the end the model must repeat it.

Layout of one sample of ``length`` input bytes (byte-level, so every character is a token)::

    <filler ...> pass key: 48213. <filler ...> pass key? 48213
                 ^ needle, at ``depth`` of the filler span         ^ the answer: its last 5 bytes

The filler is the classic repeated sentences, entered at a random phase so that the needle's
neighbourhood differs between samples. Because the filler is predictable and the key is not, a
language-model loss on the whole sequence puts nearly all of its gradient on the one thing worth
learning: copying the key. Accuracy is exact match of the greedy prediction of every key digit
(teacher forcing: if each digit's argmax is right, greedy decoding writes the key); the loss is
the mean negative log-likelihood of the key digits at the answer.
"""
from __future__ import annotations

import torch
from torch import Tensor

from posemb._validation import check_float, check_int

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
NEEDLE = " pass key: {key}. "
QUESTION = " pass key? "
KEY_DIGITS = 5
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _fixed_bytes() -> int:
    return len(NEEDLE.format(key="0" * KEY_DIGITS)) + len(QUESTION) + KEY_DIGITS


def minimum_length() -> int:
    """The shortest sample that still holds a few filler bytes around the needle."""
    return _fixed_bytes() + 8


def make_sample(length: int, depth: float, generator: torch.Generator) -> tuple[Tensor, Tensor, str]:
    """One sample: ``length + 1`` bytes (inputs are ``[:-1]``, targets ``[1:]``), the target
    positions of the key digits at the answer, and the key."""
    check_int("length", length, minimum=minimum_length())
    check_float("depth", depth, minimum=0.0, maximum=1.0)
    key = "".join(str(int(d)) for d in torch.randint(0, 10, (KEY_DIGITS,), generator=generator))
    needle = NEEDLE.format(key=key)
    tail = QUESTION + key
    filler_span = length + 1 - len(needle) - len(tail)
    phase = int(torch.randint(0, len(FILLER), (1,), generator=generator))
    repeats = (phase + filler_span) // len(FILLER) + 2
    filler = (FILLER * repeats)[phase:phase + filler_span]
    split = int(round(depth * filler_span))
    text = filler[:split] + needle + filler[split:] + tail
    data = torch.tensor(list(text.encode("ascii")), dtype=torch.long)
    assert data.numel() == length + 1
    # Targets are data[1:], so the byte at data index t is target index t - 1.
    answer = torch.arange(length + 1 - KEY_DIGITS, length + 1) - 1
    return data, answer, key


class PasskeyBatches:
    """Training batches for ``--task passkey``: each row a sample at a random depth. Like
    :class:`posemb.lab.data.RandomWindows`, the batch of a step depends only on ``(seed, step)``."""

    def __init__(self, length: int, batch_size: int, seed: int) -> None:
        self.length = check_int("length", length, minimum=minimum_length())
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.seed = check_int("seed", seed, minimum=0)

    def __call__(self, step: int) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        rows = [make_sample(self.length, float(torch.rand((), generator=generator)), generator)[0]
                for _ in range(self.batch_size)]
        data = torch.stack(rows)
        return data[:, :-1], data[:, 1:]


def evaluation_set(length: int, depth: float, samples: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """``samples`` fixed samples (inputs, targets, answer target positions) for one (length, depth).

    The seed is offset far from the training seeds' so that evaluation keys are never training batches.
    """
    check_int("samples", samples, minimum=1)
    generator = torch.Generator().manual_seed(10_000_019 + seed * 7919 + length * 101 + int(round(depth * 1000)))
    built = [make_sample(length, depth, generator) for _ in range(samples)]
    data = torch.stack([b[0] for b in built])
    answers = torch.stack([b[1] for b in built])
    return data[:, :-1], data[:, 1:], answers
