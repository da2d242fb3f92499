"""The task generators: every generated answer checked by an independent implementation (Python's
``sorted``, ``int`` arithmetic, ``collections.Counter``) up to the longest test length, the layout
and lengths as specified, the curriculum uniform over 1..L, and seeds reproducible."""
from collections import Counter

import pytest
import torch

from posemb.lab.algorithmic.tasks import (IGNORE, PLUS, SEP, SYMBOL_OFFSET, TASKS, VOCAB_SIZE, curriculum_length,
                                          get_task, make_batch)

LONGEST = 40  # longer than the quick and CI profiles' longest test length (4 x 8 = 32)


def _digits_to_int(digits, lsd_first):
    return int("".join(map(str, digits[::-1] if lsd_first else digits)))


def independent_answer(name: str, question: list[int]) -> list[int]:
    """The answer (as symbols) computed without the generator's code."""
    if name.startswith("addition"):
        lsd_first = name == "addition_reversed"
        split = question.index(PLUS - SYMBOL_OFFSET)
        a, b = question[:split], question[split + 1:]
        n = len(a)
        total = str(_digits_to_int(a, lsd_first) + _digits_to_int(b, lsd_first)).zfill(n + 1)
        digits = [int(c) for c in total]
        return digits[::-1] if lsd_first else digits
    if name == "copy":
        return list(question)
    if name == "reverse":
        return list(reversed(question))
    if name == "duplicate":
        return question * 2
    if name in ("sort", "bucket_sort"):
        return sorted(question)
    if name == "parity":
        return [sum(question) % 2]
    if name == "mode":
        counts = Counter(question)
        top = max(counts.values())
        return [min(s for s, c in counts.items() if c == top)]
    raise AssertionError(f"no independent checker for task {name!r}")


@pytest.mark.parametrize("name", list(TASKS))
def test_every_answer_is_right_up_to_the_longest_test_length(name):
    task = get_task(name)
    for n in range(1, LONGEST + 1):
        batch = make_batch(task, n, 16, seed=3, stream="test")
        assert batch.tokens.shape == (16, task.sequence_length(n))
        assert batch.tokens.dtype == torch.long
        assert int(batch.tokens.min()) >= 0 and int(batch.tokens.max()) < VOCAB_SIZE
        for row in batch.tokens.tolist():
            question, sep, answer = row[:batch.answer_start - 1], row[batch.answer_start - 1], row[batch.answer_start:]
            assert sep == SEP
            assert SEP not in question and SEP not in answer
            assert len(answer) == task.answer_length(n)
            symbols = [t - SYMBOL_OFFSET for t in question]
            assert [t - SYMBOL_OFFSET for t in answer] == independent_answer(name, symbols), (name, n, row)
            inputs = [s for s in symbols if s != PLUS - SYMBOL_OFFSET]
            assert all(0 <= s < task.alphabet for s in inputs)
            assert len(inputs) == (2 * n if task.kind == "addition" else n)


@pytest.mark.parametrize("name", list(TASKS))
def test_inputs_use_the_whole_alphabet_uniformly(name):
    task = get_task(name)
    symbols = Counter()
    for row in make_batch(task, 20, 200, seed=0, stream="train").tokens[:, :task.input_length(20)].tolist():
        symbols.update(t - SYMBOL_OFFSET for t in row if t != PLUS)
    total = sum(symbols.values())
    assert sorted(symbols) == list(range(task.alphabet))
    for count in symbols.values():  # 4000+ draws: each symbol within 20% of its expected share
        assert abs(count / total - 1 / task.alphabet) < 0.2 / task.alphabet


def test_targets_score_the_answer_tokens_only():
    task = get_task("duplicate")
    batch = make_batch(task, 5, 3, seed=0, stream="train")
    targets = batch.targets
    assert batch.inputs.shape == targets.shape == (3, task.sequence_length(5) - 1)
    scored = targets != IGNORE
    # The answer's tokens, and nothing else, are targets: each predicted from the position before it.
    assert scored.sum(1).tolist() == [task.answer_length(5)] * 3
    assert torch.equal(targets[scored].view(3, -1), batch.tokens[:, batch.answer_start:])
    assert bool((batch.inputs[:, batch.answer_start - 1] == SEP).all())


def test_same_seed_same_data_other_seed_or_stream_other_data():
    a = make_batch("reverse", 12, 32, seed=5, stream="train")
    assert torch.equal(a.tokens, make_batch("reverse", 12, 32, seed=5, stream="train").tokens)
    assert not torch.equal(a.tokens, make_batch("reverse", 12, 32, seed=6, stream="train").tokens)
    assert not torch.equal(a.tokens, make_batch("reverse", 12, 32, seed=5, stream="test").tokens)
    # Global random state plays no part.
    torch.manual_seed(123)
    import random
    random.seed(9)
    assert torch.equal(a.tokens, make_batch("reverse", 12, 32, seed=5, stream="train").tokens)


def test_curriculum_is_uniform_over_one_to_l_and_reproducible():
    lengths = [curriculum_length(0, step, 8) for step in range(8000)]
    assert lengths == [curriculum_length(0, step, 8) for step in range(8000)]
    assert lengths != [curriculum_length(1, step, 8) for step in range(8000)]
    counts = Counter(lengths)
    assert sorted(counts) == list(range(1, 9))
    for count in counts.values():  # expected 1000 each; 5 standard deviations is about +-150
        assert abs(count - 1000) < 150
    assert {curriculum_length(s, 0, 1) for s in range(20)} == {1}


def test_reversed_addition_writes_every_number_least_significant_digit_first():
    value = lambda ds: int("".join(str(d - SYMBOL_OFFSET) for d in ds))
    wrong_way = {"addition": 0, "addition_reversed": 0}
    for name, lsd_first in (("addition", False), ("addition_reversed", True)):
        for row in make_batch(name, 4, 50, seed=0, stream="x").tokens.tolist():
            a, b, total = row[0:4], row[5:9], row[10:]
            assert row[4] == PLUS and row[9] == SEP and len(total) == 5
            read = (lambda ds: value(ds[::-1])) if lsd_first else value
            assert read(a) + read(b) == read(total)
            other = value if lsd_first else (lambda ds: value(ds[::-1]))
            wrong_way[name] += other(a) + other(b) != other(total)
    # Read in the other order the sums are wrong (almost always), so the formats really differ.
    assert min(wrong_way.values()) > 40


@pytest.mark.parametrize("bad, message", [
    (dict(task="nosuch"), "task must be one of"),
    (dict(n=0), "n (instance length) must be >= 1"),
    (dict(count=0), "count must be >= 1"),
])
def test_bad_input_names_the_argument(bad, message):
    args = dict(task="copy", n=3, count=2)
    args.update(bad)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_batch(args["task"], args["n"], args["count"], seed=0, stream="train")
