"""Algorithmic tasks for length generalization, as decoder-only sequences ``input, SEP, answer``.

The tasks of the two anchors: Kazemnejad et al., "The Impact of Positional Encoding on Length
Generalization in Transformers" (NeurIPS 2023; copy, reverse, addition, parity, sort, ...) and
Ruoss et al., "Randomized Positional Encodings Boost Length Generalization of Transformers"
(ACL 2023; duplicate string, bucket sort, parity, binary addition, ...). Every task maps an
*instance length* ``n`` (the number of input symbols; for addition, digits per operand) to a
sequence of fixed length, so every row of a batch has the same length and nothing is padded.

One small vocabulary serves every task: ``PAD`` (0, never emitted), ``SEP`` (1, "the answer
follows"), ``PLUS`` (2) and ten symbols ``3..12`` (symbol ``s`` is token ``SYMBOL_OFFSET + s``;
for the arithmetic tasks symbol ``s`` is the digit ``s``).

Everything here is pure and deterministic: an instance depends only on ``(task, seed, stream,
index)`` through SHA-256, never on global random state, the process, or the platform.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from posemb._validation import check_choice, check_int

PAD, SEP, PLUS = 0, 1, 2
SYMBOL_OFFSET = 3
NUM_SYMBOLS = 10
VOCAB_SIZE = SYMBOL_OFFSET + NUM_SYMBOLS
#: targets that carry no loss and no score (PyTorch's cross-entropy default ``ignore_index``)
IGNORE = -100


def derived_seed(*parts: object) -> int:
    """A 64-bit seed from ``parts`` through SHA-256: stable across processes and platforms
    (Python's ``hash`` is salted per process)."""
    text = "|".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


# ---- the answer functions: written as loops, so that tests can check them against Python's own
# ---- sorted / int / collections.Counter, an independent implementation

def _counting_sort(symbols: list[int], alphabet: int) -> list[int]:
    counts = [0] * alphabet
    for s in symbols:
        counts[s] += 1
    out: list[int] = []
    for s in range(alphabet):
        out.extend([s] * counts[s])
    return out


def _mode(symbols: list[int], alphabet: int) -> list[int]:
    counts = [0] * alphabet
    for s in symbols:
        counts[s] += 1
    best = 0
    for s in range(1, alphabet):
        if counts[s] > counts[best]:  # strict: a tie keeps the smaller symbol
            best = s
    return [best]


def _parity(symbols: list[int]) -> list[int]:
    bit = 0
    for s in symbols:
        bit ^= s
    return [bit]


def _add_digits(a: list[int], b: list[int]) -> list[int]:
    """Sum of two digit lists given least significant digit first; ``len(a) + 1`` digits, LSD first."""
    out, carry = [], 0
    for x, y in zip(a, b):
        total = x + y + carry
        out.append(total % 10)
        carry = total // 10
    out.append(carry)
    return out


@dataclass(frozen=True)
class Task:
    """One algorithmic task.

    ``alphabet``: input symbols are drawn uniformly from ``0..alphabet-1``. ``kind`` chooses the
    layout: ``"string"`` (``n`` symbols, then ``SEP``, then the answer) or ``"addition"`` (``n``
    digits, ``PLUS``, ``n`` digits, ``SEP``, ``n + 1`` digits of the sum). ``answer_length(n)`` is
    the number of answer tokens of an instance of length ``n``.
    """

    name: str
    alphabet: int
    kind: str
    description: str
    source: str
    solve: Callable[[list[int]], list[int]] | None = None
    answer_length: Callable[[int], int] = lambda n: n
    reversed_digits: bool = False

    def input_length(self, n: int) -> int:
        return 2 * n + 1 if self.kind == "addition" else n

    def sequence_length(self, n: int) -> int:
        """Tokens of a whole instance: input, ``SEP``, answer."""
        return self.input_length(n) + 1 + self.answer_length(n)

    def instance(self, rng: random.Random, n: int) -> tuple[list[int], list[int]]:
        """``(input tokens, answer tokens)`` of one instance of length ``n``."""
        if self.kind == "addition":
            a = [rng.randrange(10) for _ in range(n)]  # least significant digit first
            b = [rng.randrange(10) for _ in range(n)]
            total = _add_digits(a, b)
            if not self.reversed_digits:  # written as usual: most significant digit first
                a, b, total = a[::-1], b[::-1], total[::-1]
            tokens = [SYMBOL_OFFSET + d for d in a] + [PLUS] + [SYMBOL_OFFSET + d for d in b]
            return tokens, [SYMBOL_OFFSET + d for d in total]
        symbols = [rng.randrange(self.alphabet) for _ in range(n)]
        answer = self.solve(symbols)
        return [SYMBOL_OFFSET + s for s in symbols], [SYMBOL_OFFSET + s for s in answer]


def _string_task(name: str, alphabet: int, solve, answer_length, description: str, source: str) -> Task:
    return Task(name, alphabet, "string", description, source, solve, answer_length)


KAZEMNEJAD = "Kazemnejad et al. 2023"
RUOSS = "Ruoss et al. 2023"

TASKS: dict[str, Task] = {
    task.name: task for task in (
        _string_task("copy", 10, lambda s: list(s), lambda n: n,
                     "repeat the input", KAZEMNEJAD),
        _string_task("reverse", 10, lambda s: [s[len(s) - 1 - i] for i in range(len(s))], lambda n: n,
                     "the input backwards", f"{KAZEMNEJAD}; {RUOSS}"),
        _string_task("duplicate", 10, lambda s: s + s, lambda n: 2 * n,
                     "the input twice", RUOSS),
        _string_task("sort", 10, lambda s: _counting_sort(s, 10), lambda n: n,
                     "the input's symbols (ten kinds) in ascending order", KAZEMNEJAD),
        _string_task("bucket_sort", 5, lambda s: _counting_sort(s, 5), lambda n: n,
                     "sort a string over five symbols", RUOSS),
        _string_task("parity", 2, _parity, lambda n: 1,
                     "is the number of 1s in a bit string odd (one answer token)", f"{KAZEMNEJAD}; {RUOSS}"),
        _string_task("mode", 4, lambda s: _mode(s, 4), lambda n: 1,
                     "the most frequent of four symbols, ties to the smallest (majority vote, one token)",
                     "majority, as in Ruoss et al. 2023's counting tasks"),
        Task("addition", 10, "addition", "sum of two n-digit numbers, most significant digit first, "
             "the sum written with n + 1 digits", KAZEMNEJAD, answer_length=lambda n: n + 1),
        Task("addition_reversed", 10, "addition", "addition with every number written least significant "
             "digit first, so each answer digit follows its carry", f"{KAZEMNEJAD} (reversed-digit format)",
             answer_length=lambda n: n + 1, reversed_digits=True),
    )
}


def task_names() -> list[str]:
    return list(TASKS)


def get_task(name: str) -> Task:
    check_choice("task", name, TASKS)
    return TASKS[name]


@dataclass(frozen=True)
class InstanceBatch:
    """``count`` instances of one length: ``tokens`` (count, T) with the answer in columns
    ``answer_start:``; the model reads ``tokens[:, :-1]`` and is scored on ``targets``, which is
    ``IGNORE`` everywhere except where the next token is an answer token."""

    tokens: Tensor
    answer_start: int

    @property
    def inputs(self) -> Tensor:
        return self.tokens[:, :-1]

    @property
    def targets(self) -> Tensor:
        targets = self.tokens[:, 1:].clone()
        targets[:, : self.answer_start - 1] = IGNORE
        return targets


def make_batch(task: Task | str, n: int, count: int, *, seed: int, stream: str) -> InstanceBatch:
    """``count`` instances of length ``n``; the same ``(task, n, count, seed, stream)`` always
    gives the same tensor, another seed or stream other instances."""
    task = get_task(task) if isinstance(task, str) else task
    check_int("n (instance length)", n, minimum=1)
    check_int("count", count, minimum=1)
    rng = random.Random(derived_seed(task.name, seed, stream, n, count))
    rows = []
    for _ in range(count):
        question, answer = task.instance(rng, n)
        rows.append(question + [SEP] + answer)
    return InstanceBatch(torch.tensor(rows, dtype=torch.long), task.input_length(n) + 1)


def curriculum_length(seed: int, step: int, max_length: int) -> int:
    """The instance length of training step ``step``: uniform over ``1..max_length``, one length per
    batch (Ruoss et al. 2023, §4: each step samples a length, then a batch of that length)."""
    check_int("max_length", max_length, minimum=1)
    return random.Random(derived_seed("curriculum", seed, step)).randint(1, max_length)
