"""Per-round checkpoints of a federation in training, so that a killed run resumes where it
stopped and ends with the same record as an uninterrupted one. Written atomically; loaded with
`torch.load(weights_only=True)`. Optimizer state needs no saving: optimizers are re-created
every round."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from fedbench.engine import Federation


def save_checkpoint(
    path: Path, fed: Federation, round_index: int, progress: dict[str, Any]
) -> None:
    """Everything the next round depends on: states, method state, RNG states, cost, history."""
    payload = {
        "round": round_index,
        "global_state": fed.global_state,
        "client_states": fed.client_states,
        "method_state": fed.method.state_dict(),
        "generator": fed.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cost": fed.cost,
        "progress": progress,
    }
    torch_save_atomic(payload, path)


def torch_save_atomic(payload: Any, path: Path) -> None:
    """torch.save to a temp file beside `path`, then rename: a kill never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def restore_checkpoint(path: Path, fed: Federation) -> tuple[int, dict[str, Any]] | None:
    """Load a checkpoint into `fed`; returns (last finished round, progress) or None if there is
    no usable checkpoint (missing or unreadable: training then starts from round 1)."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location=fed.device, weights_only=True)
    except Exception:
        return None
    fed.global_state = payload["global_state"]
    fed.client_states = payload["client_states"]
    fed.method.load_state_dict(payload["method_state"])
    fed.generator.set_state(payload["generator"])
    torch.set_rng_state(payload["torch_rng"])
    fed.cost = payload["cost"]
    return int(payload["round"]), payload["progress"]
