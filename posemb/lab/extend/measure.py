"""Measurements of an extended model: sliding-window perplexity by length, and passkey retrieval on a
length x depth grid.

Sliding-window perplexity (the protocol of the PI paper, Chen et al. 2023 §3.2, and of YaRN's
``eval/perplexity.py``; transformers' "Perplexity of fixed-length models" guide): windows of
``length`` tokens start every ``stride`` tokens; the first window scores all of its ``length``
targets, every later one only its last ``stride`` targets, so each token is scored exactly once and,
after the first window, with at least ``length - stride`` tokens of context. Perplexity is
``exp(mean negative log-likelihood)`` over the scored tokens (nats per token: per byte for a
byte-level model).

Passkey (Mohtashami & Jaggi 2023, :mod:`posemb.lab.passkey`): a 5-digit key hidden at ``depth`` of
filler text must be repeated at the end; accuracy is the share of samples whose every key token is
the greedy prediction. A byte-level model uses :func:`posemb.lab.passkey.evaluation_set` itself; a
tokenizer model gets the same text built from token ids (filler, needle, question, key encoded
separately, so the key is whole tokens and the length is exact).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from posemb._validation import check_int
from posemb.lab import passkey
from posemb.lab.extend.codec import Codec

#: the model under test: ``fn(input_ids (B, L), keep) -> logits (B, keep or L, V)``
LogitsFn = Callable[[Tensor, int], Tensor]


def window_starts(num_tokens: int, length: int, stride: int) -> list[int]:
    """Start of every full window of ``length`` inputs (+1 target) over ``num_tokens`` tokens."""
    check_int("length", length, minimum=1)
    check_int("stride", stride, minimum=1, maximum=length)
    if num_tokens < length + 1:
        raise ValueError(f"the evaluation text has {num_tokens} tokens; a window of {length} needs {length + 1}: "
                         "give more text (--eval-tokens) or shorter lengths")
    return list(range(0, num_tokens - length, stride))


@torch.inference_mode()
def sliding_window_perplexity(model: LogitsFn, tokens: Tensor, length: int, stride: int, *, device: str = "cpu",
                              batch_tokens: int = 16_384) -> dict:
    """``{"length", "stride", "loss", "ppl", "tokens", "seconds", "window_losses"}`` of ``model`` on the
    1-D ``tokens`` (see the module docstring); ``loss`` in nats per token, ``window_losses`` the mean
    loss of each window's scored tokens (for paired comparisons of two models on the same text)."""
    starts = window_starts(tokens.numel(), length, stride)
    rows = max(1, batch_tokens // length)
    per_window: list[float] = []
    began = time.perf_counter()
    span = torch.arange(length + 1)
    autocast = device.startswith("cuda")
    # The first window is scored whole; it is run alone, the others in batches keeping `stride` logits.
    for group, keep in (([starts[0]], length), (starts[1:], stride)):
        for first in range(0, len(group), rows):
            index = torch.tensor(group[first:first + rows])
            chunk = tokens[index[:, None] + span].long().to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                logits = model(chunk[:, :-1], keep)
            targets = chunk[:, -keep:]
            nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
            per_window += nll.double().sum(1).tolist()
    counts = [length] + [stride] * (len(starts) - 1)
    loss = sum(per_window) / sum(counts)
    return {"length": length, "stride": stride, "loss": loss, "ppl": math.exp(min(loss, 700.0)),
            "tokens": sum(counts), "seconds": time.perf_counter() - began,
            "window_losses": [total / n for total, n in zip(per_window, counts)]}


def _token_sample(codec: Codec, length: int, depth: float, generator: torch.Generator) -> tuple[Tensor, int]:
    """A passkey sample of exactly ``length + 1`` token ids from a tokenizer; returns it and the key's
    token count (the key ends the sample)."""
    key = "".join(str(int(d)) for d in torch.randint(0, 10, (passkey.KEY_DIGITS,), generator=generator))
    needle = codec.encode(passkey.NEEDLE.format(key=key))
    question, answer = codec.encode(passkey.QUESTION), codec.encode(key)
    span = length + 1 - needle.numel() - question.numel() - answer.numel()
    if span < 2:
        raise ValueError(f"passkey length {length} is too short for the needle and question ({length + 1 - span} tokens)")
    unit = codec.encode(passkey.FILLER)
    filler = unit.repeat(span // max(1, unit.numel()) + 2)
    phase = int(torch.randint(0, max(1, unit.numel()), (1,), generator=generator))
    filler = filler[phase:phase + span]
    split = int(round(depth * span))
    sample = torch.cat([filler[:split], needle, filler[split:], question, answer])
    return sample, answer.numel()


def passkey_set(codec: Codec, length: int, depth: float, samples: int, seed: int) -> tuple[Tensor, int]:
    """``samples`` rows of ``length + 1`` ids and the number of answer tokens at the end of each."""
    if codec.byte_level:
        inputs, targets, _ = passkey.evaluation_set(length, depth, samples, seed)
        return torch.cat([inputs, targets[:, -1:]], dim=1), passkey.KEY_DIGITS
    generator = torch.Generator().manual_seed(10_000_019 + seed * 7919 + length * 101 + int(round(depth * 1000)))
    built = [_token_sample(codec, length, depth, generator) for _ in range(samples)]
    answer = min(b[1] for b in built)
    return torch.stack([b[0] for b in built]), answer


@torch.inference_mode()
def passkey_grid(model: LogitsFn, codec: Codec, lengths: Sequence[int], depths: Sequence[float], *,
                 samples: int = 16, seed: int = 0, device: str = "cpu", batch_tokens: int = 16_384) -> list[dict]:
    """One ``{"length", "depth", "accuracy", "key_loss", "samples"}`` per cell of ``lengths x depths``."""
    cells = []
    autocast = device.startswith("cuda")
    for length in lengths:
        rows = max(1, batch_tokens // length)
        for depth in depths:
            data, answer = passkey_set(codec, length, depth, samples, seed)
            correct, nll, digits = 0, 0.0, 0
            for first in range(0, samples, rows):
                chunk = data[first:first + rows].long().to(device)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    logits = model(chunk[:, :-1], answer).float()
                targets = chunk[:, -answer:]
                correct += int((logits.argmax(-1) == targets).all(-1).sum())
                nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
                digits += targets.numel()
            cells.append({"length": int(length), "depth": float(depth), "accuracy": correct / samples,
                          "key_loss": nll / digits, "samples": samples})
    return cells


def mean_accuracy(cells: list[dict], length: int) -> float | None:
    """Mean passkey accuracy over the depths at ``length`` (None if not measured)."""
    found = [c["accuracy"] for c in cells if c["length"] == length]
    return sum(found) / len(found) if found else None
