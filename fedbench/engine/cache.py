"""Trained federations are cached per identity (method, dataset, seed, training settings,
held-out site, device), so a second adapter on the same federation trains nothing. Files hold
plain tensors and lists (see fedbench.engine.checkpoint)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedbench.adapter import TrainedFederation
from fedbench.engine import checkpoint
from fedbench.engine.training import ModelBuilder
from fedbench.storage import stable_hash


def cache_path(results_dir: Path, identity: dict[str, Any], kind: str = "federations") -> Path:
    """Where the federation of this identity (or, kind="checkpoints", its training checkpoint)
    lives under RESULTS/cache."""
    return Path(results_dir) / "cache" / kind / f"{stable_hash(identity)}.pt"


def save(path: Path, federation: TrainedFederation) -> None:
    """Write atomically: a killed run never leaves a half file."""
    payload = {
        "global": federation.global_state,
        "personalized": federation.personalized,
        "sites": federation.site_names,
        "shared_keys": federation.shared_keys,
        "cost": federation.cost,
        "history": federation.history,
        "val_best": federation.val_best,
        "val_best_global": federation.val_best_global,
        "val_best_rounds": federation.val_best_rounds,
    }
    checkpoint.save(path, payload)


def load(path: Path, device: torch.device, build_model: ModelBuilder) -> TrainedFederation | None:
    """The cached federation, or None when the file is missing, unreadable or not one of ours
    (it is then trained again and overwritten)."""
    payload = checkpoint.load(path, device)
    if payload is None:
        return None
    try:
        return TrainedFederation(
            build_model=build_model,
            global_state=payload["global"],
            personalized=list(payload["personalized"]),
            site_names=list(payload["sites"]),
            device=device,
            shared_keys=list(payload["shared_keys"]),
            cost=dict(payload["cost"]),
            history=list(payload["history"]),
            val_best=payload["val_best"],
            val_best_global=payload["val_best_global"],
            val_best_rounds=dict(payload["val_best_rounds"]),
        )
    except (KeyError, TypeError):
        return None
