"""The study's data: deterministic file splits, corpus loading and its errors, training batches,
evaluation chunks, passkey samples."""
import hashlib
from pathlib import Path

import pytest
import torch

from posemb.lab import passkey
from posemb.lab.data import (RandomWindows, evaluation_chunks, hash_fraction, load_corpus, split_by_path,
                             stdlib_files, windows)


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


def test_hash_fraction_is_sha256_of_the_relative_path():
    # Independent recomputation: first 8 bytes of SHA-256, big-endian, over 2**64.
    rel = "json/decoder.py"
    expected = int(hashlib.sha256(rel.encode()).hexdigest()[:16], 16) / 2 ** 64
    assert hash_fraction(rel) == expected
    assert 0.0 <= hash_fraction("") < 1.0


def test_split_is_by_path_alone_so_adding_files_never_moves_others():
    paths = [f"pkg/module_{i}.py" for i in range(400)]
    train, validation = split_by_path(paths, 0.05)
    assert sorted(train + validation) == sorted(paths) and not set(train) & set(validation)
    assert 5 <= len(validation) <= 40  # ~5% of 400
    more_train, more_validation = split_by_path(paths + [f"other/new_{i}.py" for i in range(50)], 0.05)
    assert set(validation) <= set(more_validation) and set(train) <= set(more_train)
    # Same decision whatever the order.
    assert split_by_path(list(reversed(paths)), 0.05)[1] == list(reversed(validation))


def test_stdlib_listing_leaves_out_site_packages_and_caches(tmp_path):
    _tree(tmp_path, {"os.py": b"x", "json/__init__.py": b"y", "site-packages/thirdparty.py": b"z",
                     "json/__pycache__/x.py": b"w", "notes.txt": b"t"})
    assert stdlib_files(tmp_path) == ["json/__init__.py", "os.py"]


def test_the_real_stdlib_gives_a_deterministic_five_percent_split():
    files = stdlib_files()
    assert len(files) > 200 and "os.py" in files
    assert not any("site-packages" in f for f in files)
    _, validation = split_by_path(files, 0.05)
    assert 0.02 < len(validation) / len(files) < 0.08
    assert split_by_path(files, 0.05)[1] == validation


def test_directory_corpus_splits_by_file_and_is_reproducible(tmp_path):
    files = {f"m{i:03d}.py": (f"# file {i}\n" + "x = 1\n" * 20).encode() for i in range(200)}
    _tree(tmp_path, files)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "secret.py").write_bytes(b"SECRET\n")
    (tmp_path / "image.bin").write_bytes(b"\x89PNG\x00\x00binary")
    corpus = load_corpus(tmp_path)
    names = sorted(files)
    train_names, validation_names = split_by_path(names, 0.05)
    assert corpus.train_files == len(train_names) and corpus.validation_files == len(validation_names)
    assert bytes(corpus.validation.tolist()) == b"\n".join(files[n] for n in validation_names)
    assert b"SECRET" not in bytes(corpus.train.tolist()) and b"PNG" not in bytes(corpus.train.tolist())
    again = load_corpus(tmp_path)
    assert again.fingerprint == corpus.fingerprint and torch.equal(again.train, corpus.train)


def test_single_file_corpus_holds_out_its_tail(tmp_path):
    text = "".join(f"line {i}\n" for i in range(2000)).encode()
    path = tmp_path / "book.txt"
    path.write_bytes(text)
    corpus = load_corpus(path)
    assert bytes(corpus.train.tolist()) + bytes(corpus.validation.tolist()) == text
    assert 0.04 < corpus.validation.numel() / len(text) < 0.06
    assert bytes(corpus.validation.tolist()).startswith(b"line ")  # cut at a line start


def test_a_few_files_fall_back_to_a_tail_split(tmp_path):
    _tree(tmp_path, {"a.txt": b"alpha " * 500, "b.txt": b"beta " * 500})
    corpus = load_corpus(tmp_path)
    assert corpus.train.numel() > 0 and corpus.validation.numel() > 0
    assert "too few files" in corpus.split_rule


def test_bad_data_paths_raise_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(tmp_path / "missing")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        load_corpus(tmp_path / "empty.txt")
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="no readable text files"):
        load_corpus(empty_dir)
    binary_dir = tmp_path / "binary"
    _tree(binary_dir, {"x.bin": b"\x00\x01\x02"})
    with pytest.raises(ValueError, match="no readable text files"):
        load_corpus(binary_dir)
    blank_dir = tmp_path / "blank"
    _tree(blank_dir, {"a.txt": b"", "b.txt": b"\n"})
    with pytest.raises(ValueError, match="only empty files"):
        load_corpus(blank_dir)
    # Permissions do not stop root, so make the read itself fail.
    readable = tmp_path / "locked.txt"
    readable.write_bytes(b"some text\n" * 100)

    def refuse(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(ValueError, match="cannot be read: Permission denied"):
        load_corpus(readable)
    with pytest.raises(ValueError, match="validation_fraction"):
        load_corpus(readable, validation_fraction=0.0)


def test_random_windows_depend_only_on_seed_and_step():
    data = torch.arange(1000, dtype=torch.int64).remainder(256).to(torch.uint8)
    source = RandomWindows(data, 16, 8, seed=3)
    inputs, targets = source(5)
    assert inputs.shape == targets.shape == (8, 16) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert torch.equal(source(5)[0], RandomWindows(data, 16, 8, seed=3)(5)[0])
    assert not torch.equal(source(5)[0], source(6)[0])
    assert not torch.equal(source(5)[0], RandomWindows(data, 16, 8, seed=4)(5)[0])
    # Each row is a contiguous slice of the data (whose bytes count up modulo 256).
    assert bool((inputs.diff(dim=1).remainder(256) == 1).all())
    with pytest.raises(ValueError, match="training data has 10 bytes"):
        RandomWindows(data[:10], 16, 2, seed=0)


def test_every_length_scores_the_same_target_bytes():
    validation = torch.randint(0, 256, (10_000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    chunks = evaluation_chunks(validation, 1024, 256)
    assert chunks.shape == (4, 257)
    # Chunks are spread over the whole split, not all taken from its start.
    assert int(chunks[-1, 0]) == int(validation[3 * (10_000 // 4)])
    reference = None
    for length in (16, 64, 256):
        inputs, targets = windows(chunks, length)
        assert inputs.shape == (1024 // length, length)
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        flat = targets.reshape(4, -1)
        reference = flat if reference is None else reference
        assert torch.equal(flat, reference)
    with pytest.raises(ValueError, match="needs at least 513"):
        evaluation_chunks(validation[:300], 1024, 512)
    with pytest.raises(ValueError, match="not a multiple"):
        windows(chunks, 100)


def test_passkey_sample_layout():
    generator = torch.Generator().manual_seed(0)
    for depth in (0.0, 0.5, 1.0):
        data, answer, key = passkey.make_sample(96, depth, generator)
        text = bytes(data.tolist()).decode()
        assert len(data) == 97 and len(key) == passkey.KEY_DIGITS and key.isdigit()
        assert text.endswith(passkey.QUESTION + key)
        needle_at = text.index(passkey.NEEDLE.format(key=key))
        filler_span = 97 - len(passkey.NEEDLE.format(key=key)) - len(passkey.QUESTION) - len(key)
        assert needle_at == round(depth * filler_span)
        # The answer positions index the key digits in the targets (data[1:]).
        targets = data[1:]
        assert bytes(targets[answer].tolist()).decode() == key
    with pytest.raises(ValueError, match="length must be >="):
        passkey.make_sample(10, 0.5, generator)
    with pytest.raises(ValueError, match="depth must be <= 1"):
        passkey.make_sample(96, 1.5, generator)


def test_passkey_batches_and_evaluation_sets_are_deterministic_and_distinct():
    batches = passkey.PasskeyBatches(64, 4, seed=1)
    a, b = batches(3), passkey.PasskeyBatches(64, 4, seed=1)(3)
    assert torch.equal(a[0], b[0]) and a[0].shape == (4, 64)
    assert not torch.equal(batches(3)[0], batches(4)[0])
    inputs, targets, answers = passkey.evaluation_set(64, 0.25, 6, seed=1)
    assert inputs.shape == (6, 64) and answers.shape == (6, passkey.KEY_DIGITS)
    assert torch.equal(inputs, passkey.evaluation_set(64, 0.25, 6, seed=1)[0])
    # Keys vary between samples.
    keys = {bytes(t[a].tolist()) for t, a in zip(targets, answers)}
    assert len(keys) > 1
