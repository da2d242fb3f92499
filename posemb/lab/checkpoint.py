"""Atomic file writes, and reading back what they wrote.

Every file the lab writes goes to a temporary file in the same directory first and is moved into
place with :func:`os.replace`, which POSIX makes atomic: a reader (or a rerun after Ctrl-C / kill)
sees either the old complete file or the new complete file, never a torn one. The file gets the
permissions of any new file (``0666`` less the umask), not the ``0600`` of a temporary file.

Reading back names the file when it is not what was written (:class:`CorruptFileError`), so a
truncated checkpoint or an edited JSON file is one clear line, never a traceback from the parser.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from posemb.lab.errors import CorruptFileError, with_path


def _new_file_mode() -> int:
    # The umask can only be read by setting it; it is restored at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file + fsync + ``os.replace``).

    An OS error (full disk, no permission) names ``path`` and leaves the old file untouched."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise with_path(error, path.parent) from error
    try:
        os.fchmod(handle, _new_file_mode())
        with os.fdopen(handle, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException as error:
        # Interrupted or failed: leave no stray temporary behind, and the old file untouched.
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        if isinstance(error, OSError):
            raise with_path(error, path) from error
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_bytes(obj: Any) -> bytes:
    """The lab's JSON layout: indented, keys in insertion order, no NaN (it is not JSON)."""
    return (json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n").encode("utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, json_bytes(obj))


def read_json(path: str | os.PathLike, *, advice: str = "") -> Any:
    """Parse a JSON file; a file that is not valid JSON raises :class:`CorruptFileError` naming it."""
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptFileError(path, f"not valid JSON: {error}", advice) from None


def torch_bytes(obj: Any) -> bytes:
    """``torch.save`` into memory."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> str:
    """:func:`torch_bytes` then :func:`atomic_write_bytes`; returns the SHA-256 of what was written."""
    data = torch_bytes(obj)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                    advice: str = "") -> dict:
    """Load a checkpoint written by :func:`atomic_torch_save` (tensors and plain Python values only).

    A file that is not such a checkpoint (truncated, overwritten, not a dict with ``model`` and
    ``step``) raises :class:`CorruptFileError` naming it; a missing one, ``FileNotFoundError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "checkpoint does not exist", str(path))
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, KeyError, AttributeError, ImportError,
            TypeError) as error:
        # torch.load reports a torn zip archive, an empty file or an unpickling failure as one of these.
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0]
        raise CorruptFileError(path, f"not a readable checkpoint: {reason}", advice) from None
    except OSError as error:
        if error.errno in (errno.EACCES, errno.EPERM, errno.ENOENT, errno.EISDIR, errno.EIO):
            raise
        # torch's zip reader reports a truncated archive as EINVAL.
        raise CorruptFileError(path, f"not a readable checkpoint: {error.strerror or error}", advice) from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CorruptFileError(path, "not a posemb checkpoint (no model weights and step)", advice)
    return state
