"""Output locations: checked before any work, locked while written, never overwritten by surprise.

:class:`OutputDir` owns a directory that a command fills with files of fixed names (the study's
``report.md``, ``results.csv``, ...):

* **checked first**: the directory is created if missing and must be writable, before any
  training or measuring starts;
* **one writer**: an advisory lock (``fcntl.flock`` on ``.posemb.lock``, non-blocking) is held
  while the command runs; a second command on the same directory stops at once, naming the pid
  that holds it;
* **a manifest** (``.posemb-manifest.json``) records each file posemb wrote there, with the
  configuration it was written for and the SHA-256 of its content. Before any work,
  :meth:`OutputDir.claim` refuses to replace a file that is not in the manifest (the user's own),
  whose content changed since (edited by hand), or that was written for another configuration,
  unless ``force``.

The manifest lists both the old and the new digest of a file while it is being replaced, so a kill
between the file's write and the manifest's never makes the next run refuse its own file.

:func:`check_writable_file` does the first check for a single output file named on the command
line (``--out FILE.png``, ``--output FILE.json``): the user named it, so replacing it is what was
asked for, but a path that cannot be written is refused before the work.
"""
from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path

from posemb.lab.checkpoint import atomic_write_bytes, json_bytes, read_json
from posemb.lab.errors import CorruptFileError, OutputDirError

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks, the directory is used unlocked
    fcntl = None

LOCK_NAME = ".posemb.lock"
MANIFEST_NAME = ".posemb-manifest.json"
MANIFEST_FORMAT = 1


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_digest(path: Path) -> str:
    return _sha256(path.read_bytes())


def _probe_writable(directory: Path) -> None:
    """Create and remove a temporary file: the only sure test (permissions, ACLs, read-only mounts)."""
    handle, name = tempfile.mkstemp(prefix=".posemb-write-test.", dir=directory)
    os.close(handle)
    os.unlink(name)


def _os_reason(error: OSError) -> str:
    reason = error.strerror or str(error)
    return reason + (f" ({error.filename})" if error.filename is not None else "")


def _make_writable_directory(path: Path) -> None:
    """Create ``path`` with its parents and probe it; OS errors propagate."""
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "a file is in the way, not a directory", str(path))
    path.mkdir(parents=True, exist_ok=True)
    _probe_writable(path)


def check_writable_directory(path: str | os.PathLike, argument: str) -> Path:
    """Create ``path`` (and its parents) if needed and check that files can be written in it.
    Raises :class:`OutputDirError` naming ``argument`` and the path."""
    raw = os.fspath(path)
    if not raw.strip():  # Path("") would be the current directory
        raise OutputDirError(f"{argument} must name a directory, got an empty string")
    try:
        _make_writable_directory(Path(raw))
    except OSError as error:
        raise OutputDirError(f"{argument} {raw!r} cannot be written: {_os_reason(error)}; "
                             "choose a writable place") from None
    return Path(raw)


def check_writable_file(path: str | os.PathLike, argument: str) -> Path:
    """Check, before any work, that ``path`` can be written: not a directory, and its folder
    (created if missing) writable."""
    raw = os.fspath(path)
    if not raw.strip():
        raise OutputDirError(f"{argument} must name a file, got an empty string")
    path = Path(raw)
    if path.is_dir():
        raise OutputDirError(f"{argument} {raw!r} is a directory: give a file name")
    try:
        _make_writable_directory(path.parent)
    except OSError as error:
        raise OutputDirError(f"{argument} {raw!r} cannot be written: {_os_reason(error)}; "
                             "choose a writable place") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputDirError(f"{argument} {raw!r} exists and cannot be replaced: permission denied")
    return path


class OutputDir:
    """A locked directory whose files posemb tracks (see the module docstring).

    ``identity`` names the configuration the files are written for (a hash); ``argument`` is the
    option the user gave the path with, for error messages. Use as a context manager::

        with OutputDir("study-report", identity=h, argument="--out") as out:
            out.claim(["report.md", "results.csv"], force=False)   # refuses before any work
            out.write_bytes("report.md", data)
    """

    def __init__(self, path: str | os.PathLike, *, identity: str, argument: str = "--out", lock: bool = True) -> None:
        self.raw_path = os.fspath(path)
        self.path = Path(self.raw_path)
        self.identity = identity
        self.argument = argument
        self.lock = lock
        self._lock_handle = None
        self._manifest: dict | None = None
        self._claimed: set[str] = set()

    # ---- lock ----
    def __enter__(self) -> "OutputDir":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        """Check the directory (creating it), take the lock (unless ``lock=False``: a command that
        writes a few files in a second), read the manifest."""
        check_writable_directory(self.raw_path, self.argument)
        if self.lock:
            self._take_lock()
        self._manifest = self._read_manifest()

    def _take_lock(self) -> None:
        lock_path = self.path / LOCK_NAME
        try:
            handle = open(lock_path, "a+")
        except OSError as error:
            raise OutputDirError(f"{self.argument} {str(self.path)!r}: cannot create the lock file "
                                 f"{LOCK_NAME}: {error.strerror or error}") from None
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                raise OutputDirError(f"{self.argument} {str(self.path)!r} is in use by another posemb process "
                                     f"(pid {holder}): wait for it to finish, or choose another {self.argument}")
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock_handle = handle

    def close(self) -> None:
        self._manifest = None
        if self._lock_handle is not None:
            # Closing the file releases the flock; the file itself stays (it is hidden and tiny).
            self._lock_handle.close()
            self._lock_handle = None

    # ---- manifest ----
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    def _read_manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {"format": MANIFEST_FORMAT, "files": {}}
        advice = (f"delete it to start the manifest afresh (posemb then treats every file in {str(self.path)!r} "
                  "as not its own)")
        manifest = read_json(self.manifest_path, advice=advice)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise CorruptFileError(self.manifest_path, "not a posemb manifest", advice)
        return manifest

    def _write_manifest(self) -> None:
        atomic_write_bytes(self.manifest_path, json_bytes(self._manifest))

    def owner_of(self, name: str) -> dict | None:
        """The manifest entry of ``name`` (``{"identity", "sha256": [...]}``), or None."""
        self._require_open()
        entry = self._manifest["files"].get(name)
        return entry if isinstance(entry, dict) else None

    def claim(self, names: list[str], *, force: bool = False) -> None:
        """Refuse (:class:`OutputDirError`), before any work, if one of ``names`` exists and was not
        written by posemb, was changed since, or was written for another configuration; ``force``
        accepts every one of them. Only claimed names may be written."""
        self._require_open()
        problems = []
        for name in names:
            path = self.path / name
            if path.is_dir():
                problems.append(f"{name} is a directory")
                continue
            if not path.exists() or force:
                continue
            entry = self.owner_of(name)
            if entry is None:
                problems.append(f"{name} was not written by posemb")
            elif _file_digest(path) not in entry.get("sha256", []):
                problems.append(f"{name} was changed since posemb wrote it")
            elif entry.get("identity") != self.identity:
                problems.append(f"{name} is the output of another configuration")
        if problems:
            raise OutputDirError(f"{self.argument} {str(self.path)!r}: " + "; ".join(problems) +
                                 f": rerun with --force to replace, or choose another {self.argument}")
        self._claimed.update(names)

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Write a claimed file atomically and record it in the manifest."""
        self._require_open()
        if name not in self._claimed:
            raise RuntimeError(f"{name!r} was not claimed before writing it into {str(self.path)!r}")
        digest = _sha256(data)
        files = self._manifest["files"]
        old = files.get(name, {}).get("sha256", []) if isinstance(files.get(name), dict) else []
        files[name] = {"identity": self.identity, "sha256": list(dict.fromkeys([*old[-1:], digest]))}
        self._write_manifest()
        path = atomic_write_bytes(self.path / name, data)
        files[name]["sha256"] = [digest]
        self._write_manifest()
        return path

    def _require_open(self) -> None:
        if self._manifest is None:
            raise RuntimeError("OutputDir must be opened (used as a context manager) first")
