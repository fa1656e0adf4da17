"""Files that are never half written, and hashes that do not depend on key order: what every
part that writes (records, checkpoints, caches, prepared datasets, figures) shares."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast

from fedbench.errors import FedbenchError


def _umask() -> int:
    """The process umask (reading it means setting it; it is put straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


class StorageError(FedbenchError, OSError):
    """fedbench could not write one of its own files or folders (a full disk, a read-only or
    misplaced folder): one line naming the path, never blamed on a plugin. An OSError too, so
    code that tolerates an unwritable cache (a dataset's own) still does."""

    def __init__(self, message: str, errno: int | None = None, strerror: str | None = None):
        super().__init__(errno, strerror or message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:  # a Ray worker's error pickles whole
        return (type(self), (self.message, self.errno, self.strerror))


def cannot_write(path: Path, exc: OSError) -> StorageError:
    """The one-line error for `path` that the OS refused, with the OS's own words."""
    return StorageError(f"cannot write {path}: {exc.strerror or exc}", exc.errno, exc.strerror)


class _WriteErrors:
    """A file handle that remembers the OSError a write raised: torch.save turns a failed
    write into a RuntimeError of its own, and the disk's answer must not be lost."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._handle.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def _write_through(handle: IO[bytes], write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write` on `handle`; an error it caused by a refused write is that OSError."""
    recorder = _WriteErrors(handle)
    try:
        write(cast(IO[bytes], recorder))
    except OSError:
        raise
    except Exception as exc:
        if recorder.error is None:
            raise
        raise recorder.error from exc


def write_atomic(path: Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call `write(handle)` on a temp file beside `path`, flush it to disk, then rename it over
    `path`: a kill or a full disk never leaves half a file, and the old file stays until the new
    one is whole. The file gets the user's umask, as `open` would give it. A write the OS
    refuses is a StorageError naming `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise cannot_write(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            _write_through(handle, write)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise cannot_write(path, exc) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_writable(folder: Path) -> None:
    """Fail before any work, naming `folder`, when fedbench could not write files in it: the
    nearest folder that exists (it creates the rest) must be a folder it can write in. Nothing
    is left behind."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = f"{folder}" if existing == folder else f"{existing} (on the way to {folder})"
        raise StorageError(f"{what} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".probe-"):
            pass
    except OSError as exc:
        raise StorageError(
            f"cannot write in {folder}: {exc.strerror or exc}", exc.errno, exc.strerror
        ) from None


def write_text_atomic(path: Path, text: str) -> Path:
    """`write_atomic` for UTF-8 text."""
    return write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


def write_json_atomic(path: Path, payload: Any) -> Path:
    """`write_atomic` for JSON (indented, NaN allowed as in the run records)."""
    return write_text_atomic(path, json.dumps(payload, indent=2, allow_nan=True))


def stable_hash(payload: Any) -> str:
    """A short hash of JSON-serialisable data that does not depend on key order."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
