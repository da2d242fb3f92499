"""Byte-level corpora, deterministic train/validation splits, training batches and evaluation windows.

The default corpus is the Python standard library's own ``.py`` source on the running machine
(``sysconfig.get_paths()["stdlib"]``): present everywhere Python is, nothing to download, a few
tens of megabytes of real text with long-range structure (indentation, names defined far above).
Tokens are bytes, so the vocabulary is 256 and no tokenizer is involved.

Splits are by file, decided by a hash of the file's path relative to the corpus root (SHA-256, the
first 8 bytes read as a fraction of 2**64): the same file lands in the same split on every machine
and every run, and adding a file never moves another one across the split.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from posemb._validation import check_float, check_int

VOCAB_SIZE = 256
DEFAULT_VALIDATION_FRACTION = 0.05
# Directories under the stdlib that hold third-party or generated files, which differ by machine.
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
# Files are joined with a newline, so a file's last line never runs into the next file's first.
_SEPARATOR = b"\n"


@dataclass
class Corpus:
    """A corpus as two 1-D ``uint8`` tensors of bytes, plus where it came from."""

    train: Tensor
    validation: Tensor
    source: str
    train_files: int
    validation_files: int
    split_rule: str
    fingerprint: str

    def describe(self) -> str:
        return (f"{self.source}: {self.train.numel():,} train bytes ({self.train_files} files), "
                f"{self.validation.numel():,} validation bytes ({self.validation_files} files); {self.split_rule}")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: str | os.PathLike | None = None) -> list[str]:
    """Relative paths (POSIX, sorted) of the standard library's ``.py`` files under ``root``,
    leaving out ``site-packages`` and byte-code caches."""
    root = Path(root) if root is not None else stdlib_root()
    found = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if _EXCLUDED_DIRS.intersection(relative.parts[:-1]) or not path.is_file():
            continue
        found.append(relative.as_posix())
    return sorted(found)


def hash_fraction(relative_path: str) -> float:
    """A number in [0, 1) fixed by the path alone: SHA-256 of the UTF-8 path, first 8 bytes / 2**64."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def split_by_path(relative_paths: list[str], validation_fraction: float) -> tuple[list[str], list[str]]:
    """Assign each path to train or validation by :func:`hash_fraction`; order is kept."""
    check_float("validation_fraction", validation_fraction, minimum=0.0, maximum=1.0)
    train, validation = [], []
    for rel in relative_paths:
        (validation if hash_fraction(rel) < validation_fraction else train).append(rel)
    return train, validation


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except (PermissionError, IsADirectoryError, OSError) as error:
        # The CLI prints ValueError as one clean line; a bare OSError would be a traceback.
        raise ValueError(f"data path {str(path)!r} cannot be read: {error.strerror or error}") from error


def _join(root: Path, relative_paths: list[str]) -> bytes:
    return _SEPARATOR.join(_read(root / rel) for rel in relative_paths)


def _looks_binary(path: Path) -> bool:
    """A NUL byte in the first 8 KiB marks a binary file (images, archives), as git and grep decide."""
    with open(path, "rb") as handle:
        return b"\x00" in handle.read(8192)


def _as_tensor(data: bytes) -> Tensor:
    if not data:
        return torch.zeros(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _fingerprint(train: bytes, validation: bytes) -> str:
    digest = hashlib.sha256()
    digest.update(len(train).to_bytes(8, "big"))
    digest.update(train)
    digest.update(validation)
    return digest.hexdigest()[:16]


def _tail_split(data: bytes, validation_fraction: float) -> tuple[bytes, bytes]:
    """Last ``validation_fraction`` of the bytes is validation, cut at a line start when one is near."""
    cut = int(round(len(data) * (1.0 - validation_fraction)))
    newline = data.find(b"\n", cut)
    if newline != -1 and newline - cut < 4096:
        cut = newline + 1
    return data[:cut], data[cut:]


def load_corpus(path: str | os.PathLike | None = None, *,
                validation_fraction: float = DEFAULT_VALIDATION_FRACTION) -> Corpus:
    """Load the default corpus (``path=None``), a text file, or a directory of text files.

    * default: the stdlib's ``.py`` files, split by a hash of the relative path;
    * a directory: every regular, non-hidden, non-binary file below it, split the same way; when
      the hash puts every file on one side (a handful of files), the concatenation is split by its
      tail instead;
    * a file: its last ``validation_fraction`` of bytes is validation.

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for one that is empty,
    unreadable or gives an empty split, and for an empty string (which ``Path`` would read as the
    current directory).
    """
    check_float("validation_fraction", validation_fraction, minimum=0.0, maximum=1.0, strict_minimum=True)
    if validation_fraction >= 1.0:
        raise ValueError(f"validation_fraction must be < 1, got {validation_fraction}")
    if path is None:
        root = stdlib_root()
        files = stdlib_files(root)
        if not files:
            raise ValueError(f"no .py files found under the standard library at {str(root)!r}; pass --data PATH")
        train_files, validation_files = split_by_path(files, validation_fraction)
        train, validation = _join(root, train_files), _join(root, validation_files)
        source = f"Python {sysconfig.get_python_version()} standard library .py files ({root})"
        rule = (f"split by file: SHA-256 of the relative path < {validation_fraction:g} of 2**64 "
                "goes to validation")
        return Corpus(_as_tensor(train), _as_tensor(validation), source, len(train_files),
                      len(validation_files), rule, _fingerprint(train, validation))

    if not str(path).strip():
        raise ValueError(f"data path must name a text file or a directory, got {str(path)!r}; leave it out "
                         "for the default corpus (the standard library's source)")
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"data path {str(root)!r} does not exist")
    if root.is_file():
        data = _read(root)
        if not data.strip():
            raise ValueError(f"data path {str(root)!r} is empty")
        train, validation = _tail_split(data, validation_fraction)
        rule = f"one file: the last {validation_fraction:g} of its bytes is validation"
        return Corpus(_as_tensor(train), _as_tensor(validation), f"file {root}", 1, 1, rule,
                      _fingerprint(train, validation))
    if not root.is_dir():
        raise ValueError(f"data path {str(root)!r} is neither a file nor a directory")
    try:
        candidates = sorted(p for p in root.rglob("*") if p.is_file())
    except PermissionError as error:
        raise ValueError(f"data path {str(root)!r} cannot be listed: {error}") from error
    relative = []
    for candidate in candidates:
        rel = candidate.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        try:
            if _looks_binary(candidate):
                continue
        except OSError as error:
            raise ValueError(f"data path {str(candidate)!r} cannot be read: {error.strerror or error}") from error
        relative.append(rel.as_posix())
    if not relative:
        raise ValueError(f"data path {str(root)!r} holds no readable text files")
    train_files, validation_files = split_by_path(relative, validation_fraction)
    if train_files and validation_files:
        train, validation = _join(root, train_files), _join(root, validation_files)
        rule = f"split by file: SHA-256 of the relative path < {validation_fraction:g} of 2**64 goes to validation"
        counts = (len(train_files), len(validation_files))
    else:
        train, validation = _tail_split(_join(root, relative), validation_fraction)
        rule = (f"too few files to split by file ({len(relative)}): the last {validation_fraction:g} of the "
                "concatenated bytes is validation")
        counts = (len(relative), len(relative))
    if not (train + validation).strip():
        raise ValueError(f"data path {str(root)!r} holds only empty files")
    return Corpus(_as_tensor(train), _as_tensor(validation), f"directory {root}", counts[0], counts[1], rule,
                  _fingerprint(train, validation))


class RandomWindows:
    """Training batches: ``batch_size`` windows of ``length + 1`` bytes at random offsets.

    The batch of step ``s`` depends only on ``(seed, s)`` (its own generator), so a run resumed
    from a checkpoint at step ``s`` sees exactly the batches an uninterrupted run would, and every
    DDP rank can draw the same global batch and keep its own slice of rows.
    """

    def __init__(self, data: Tensor, length: int, batch_size: int, seed: int) -> None:
        self.length = check_int("length", length, minimum=1)
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.seed = check_int("seed", seed, minimum=0)
        if data.dim() != 1 or data.numel() < length + 1:
            raise ValueError(f"training data has {data.numel()} bytes; need at least length + 1 = {length + 1}")
        self.data = data
        self._span = torch.arange(length + 1)

    def __call__(self, step: int) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        offsets = torch.randint(0, self.data.numel() - self.length, (self.batch_size,), generator=generator)
        windows = self.data[offsets[:, None] + self._span].long()
        return windows[:, :-1], windows[:, 1:]


def evaluation_chunks(validation: Tensor, eval_tokens: int, longest: int) -> Tensor:
    """``n = eval_tokens // longest`` chunks of ``longest + 1`` validation bytes, at offsets spread
    evenly over the whole validation split: shape (n, longest + 1).

    Every evaluation length scores exactly these ``n * longest`` target bytes (so lengths differ only
    in how much context each byte sees), each chunk cut into non-overlapping windows of that length.
    Spreading the chunks over the split keeps a small budget from scoring one or two files only.
    """
    check_int("eval_tokens", eval_tokens, minimum=1)
    check_int("longest", longest, minimum=1)
    if validation.numel() < longest + 1:
        raise ValueError(f"the validation split has {validation.numel():,} bytes; evaluating at length {longest} "
                         f"needs at least {longest + 1}: use a larger --data or shorter --eval-lengths")
    wanted = max(1, eval_tokens // longest)
    fit = validation.numel() // (longest + 1)
    count = min(wanted, fit)
    stride = validation.numel() // count
    offsets = torch.arange(count) * stride
    return validation[offsets[:, None] + torch.arange(longest + 1)]


def windows(chunks: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Cut chunks (n, m + 1) into (inputs, targets) windows of ``length`` (``m`` a multiple of it):
    window ``w`` of a chunk predicts bytes ``w * length + 1 .. (w + 1) * length`` from the bytes before."""
    if chunks.dim() != 2:
        raise ValueError(f"chunks must be (n, m + 1), got shape {tuple(chunks.shape)}")
    m = chunks.shape[1] - 1
    if m % length:
        raise ValueError(f"chunks of {m} targets are not a multiple of length {length}")
    inputs = chunks[:, :-1].reshape(-1, length).long()
    targets = chunks[:, 1:].reshape(-1, length).long()
    return inputs, targets
