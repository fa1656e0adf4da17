"""Torch files that are written atomically and read back safely: per-round checkpoints of a
federation in training (so a killed run resumes where it stopped and ends with the same record
as an uninterrupted one) and the federation cache. Loaded with `torch.load(weights_only=True)`,
so a file can hold tensors, numbers, strings, lists and dicts, never code. Optimizer state needs
no saving: optimizers are re-created every round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedbench.storage import write_atomic


def save(path: Path, payload: dict[str, Any]) -> None:
    """torch.save through a temp file and a rename: a kill never leaves half a file."""
    write_atomic(path, lambda handle: torch.save(payload, handle))


def load(path: Path, device: torch.device) -> dict[str, Any] | None:
    """What `save` wrote, or None when the file is missing or unreadable (training then starts
    from round 1; a cache entry is trained again)."""
    if not Path(path).is_file():
        return None
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception:
        return None
    return payload if isinstance(payload, dict) else None
