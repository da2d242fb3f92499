"""The lab's errors: each is one line for the user, naming the file or argument and what to do.

The command line (``posemb.cli.main``) prints these, and operating-system errors through
:func:`os_error_line`, as ``posemb COMMAND: error: ...`` instead of a traceback.
"""
from __future__ import annotations

import errno
import os


class LabError(Exception):
    """A problem the user can act on; the message says what and where. ``exit_code`` is what the
    command line returns for it."""

    exit_code = 2


class OutputDirError(LabError):
    """An output directory that cannot be used: locked by another process, or holding files that
    posemb did not write (or wrote for another configuration)."""


class CorruptFileError(LabError):
    """A file in a run folder that cannot be read back (truncated, not JSON, not a checkpoint)."""

    def __init__(self, path: str | os.PathLike, reason: str, advice: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        self.advice = advice
        super().__init__(f"{self.path} is corrupt ({reason})" + (f"; {advice}" if advice else ""))

    def __reduce__(self):
        # Rebuilt from its own arguments, so that it crosses from a study worker process intact.
        return type(self), (self.path, self.reason, self.advice)


class TrainingDiverged(LabError):
    """The training loss became NaN or infinite; the run is not marked finished."""

    exit_code = 1


_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space or write somewhere else",
    errno.EDQUOT: "the disk quota is exhausted: free some space or write somewhere else",
    errno.EACCES: "not allowed: choose a place you can write to, or fix its permissions",
    errno.EPERM: "not allowed: choose a place you can write to, or fix its permissions",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "it is a directory: give a file name",
    errno.ENAMETOOLONG: "the name is too long",
    errno.ENOENT: "it does not exist",
}


def os_error_line(error: OSError) -> str:
    """``PATH: strerror (what to do)`` for an operating-system error."""
    where = error.filename if error.filename is not None else None
    if error.filename2 is not None:
        where = f"{where} -> {error.filename2}"
    reason = error.strerror or str(error)
    advice = _ADVICE.get(error.errno)
    text = f"{where}: {reason}" if where is not None else reason
    return text + (f" ({advice})" if advice and advice.lower() not in reason.lower() else "")


def with_path(error: OSError, path: str | os.PathLike) -> OSError:
    """The same kind of OS error, naming ``path`` (a write to an open file reports no file name)."""
    if error.filename is not None:
        return error
    return type(error)(error.errno, error.strerror or str(error), str(path))


def user_message(error: BaseException) -> str | None:
    """The one line to show for an error the user can act on, or None for a bug (which keeps its
    traceback). Bad arguments (``ValueError``, ``TypeError``), the lab's own errors and OS errors
    (missing, unwritable or full paths) are the user's to act on."""
    if isinstance(error, (LabError, ValueError, TypeError)):
        return str(error)
    if isinstance(error, OSError):
        return os_error_line(error)
    return None


def exit_code(error: BaseException) -> int:
    """2 for refused input (the usual code of a command-line usage error), 1 for a failure while
    working (a diverged run, a full disk)."""
    if isinstance(error, LabError):
        return error.exit_code
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError):
        return 1
    return 2
