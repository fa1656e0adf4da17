"""Two grids on one results folder never run the same cell twice: a grid claims each cell with
an advisory lock (`flock`) on RESULTS/locks/<cell>.lock while the cell runs. The operating system
releases the lock when the holder exits, killed or not, so a crashed grid leaves nothing stale.
A cell another grid holds is left to it ("busy"); a cell that another grid finished after this
one planned is skipped."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fedbench.backends.grid import Cell, CellResult, same_holdouts
from fedbench.storage import StorageError, stable_hash

try:
    import fcntl
except ImportError:  # not POSIX: no locking (one grid per results folder, as before)
    fcntl = None  # type: ignore[assignment]

BUSY = "busy"


class CellLock:
    """The claim of one cell on one results folder (held from `acquire` until `release`)."""

    def __init__(self, results_dir: Path, cell: Cell) -> None:
        name = f"{cell.config_hash}-{stable_hash(sorted(cell.holdouts))[:8]}.lock"
        self.path = Path(results_dir) / "locks" / name
        self.fd: int | None = None

    def acquire(self) -> bool:
        """Claim the cell; False when another process holds it."""
        if fcntl is None:
            return True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise StorageError(
                f"cannot claim a cell in {self.path.parent}: {exc.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as exc:  # a file system without flock
            os.close(fd)
            raise StorageError(f"cannot lock {self.path}: {exc.strerror}") from None
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None and fcntl is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
        self.fd = None


def known_records(results_dir: Path) -> frozenset[str]:
    """The record files present now: what a grid starting now has already planned with."""
    return frozenset(p.name for p in (Path(results_dir) / "runs").glob("*.json"))


def finished_elsewhere(results_dir: Path, cell: Cell, known: frozenset[str]) -> str | None:
    """The run id of a record of this cell that another grid wrote since this one started (not
    in `known`; an ok record of any age counts too), read from the records whose names carry
    the cell's config hash; None if there is none."""
    runs = Path(results_dir) / "runs"
    for path in sorted(runs.glob(f"*_{cell.config_hash[:8]}_*.json")):
        record = read_quietly(path)
        recent = path.name not in known
        if (
            record.get("config_hash") == cell.config_hash
            and (record.get("status") == "ok" or recent)
            and same_holdouts(record, list(cell.holdouts))
        ):
            return str(record.get("run_id"))
    return None


def read_quietly(path: Path) -> dict[str, Any]:
    """A record file's JSON object, or {} when it cannot be read (the grid's plan warned)."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return payload if isinstance(payload, dict) else {}


def busy_result(cell: Cell) -> CellResult:
    return CellResult(cell, BUSY, error="another grid on this results folder is running it")


def skipped_result(cell: Cell, run_id: str) -> CellResult:
    return CellResult(cell, "skipped", run_id=run_id)
