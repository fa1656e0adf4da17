"""Files that are never half written, and hashes that do not depend on key order: what every
part that writes (records, checkpoints, caches, prepared datasets, figures) shares."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    """The process umask (reading it means setting it; it is put straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call `write(handle)` on a temp file beside `path`, flush it to disk, then rename it over
    `path`: a kill or a full disk never leaves half a file, and the old file stays until the new
    one is whole. The file gets the user's umask, as `open` would give it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
