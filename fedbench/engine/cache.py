"""Trained federations are cached per identity (method, dataset, seed, training settings,
held-out site, device), so a second adapter on the same federation trains nothing. Files hold
plain tensors and lists (see fedbench.engine.checkpoint); an entry that does not fit the model
or the sites being trained is named in one warning, trained again and overwritten."""

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


#: what a cache entry holds (see `save`)
ENTRY_KEYS = (
    "global",
    "personalized",
    "sites",
    "shared_keys",
    "cost",
    "history",
    "val_best",
    "val_best_global",
    "val_best_rounds",
)


def entry_problem(
    payload: dict[str, Any], shapes: checkpoint.Shapes, sites: list[str] | None
) -> str | None:
    """Why a loaded entry is not a federation of the model with `shapes` over `sites` (None:
    any sites), or None."""
    problem = checkpoint.missing_keys(payload, ENTRY_KEYS)
    if problem:
        return problem
    names = payload["sites"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return "its sites are not a list of names"
    if sites is not None and names != list(sites):
        return f"it holds sites {', '.join(names)}, the run trains {', '.join(sites)}"
    for key, kind in (("shared_keys", list), ("cost", dict), ("history", list)):
        if not isinstance(payload[key], kind):
            return f"its {key} is not a {kind.__name__}"
    if not isinstance(payload["val_best_rounds"], dict):
        return "its val_best_rounds is not a dict"
    return models_problem(payload, shapes, len(names))


def models_problem(payload: dict[str, Any], shapes: checkpoint.Shapes, count: int) -> str | None:
    """Why the entry's models (each optional one when present) do not fit the model, or None."""
    lists = {"personalized": "the personalized models", "val_best": "the val-best models"}
    single = {"global": "the global model", "val_best_global": "the val-best global model"}
    for key, what in lists.items():
        if key == "personalized" or payload[key] is not None:
            problem = checkpoint.states_problem(payload[key], shapes, count, what)
            if problem:
                return problem
    for key, what in single.items():
        if payload[key] is not None:
            problem = checkpoint.state_problem(payload[key], shapes, what)
            if problem:
                return problem
    return None


def load(
    path: Path, device: torch.device, build_model: ModelBuilder, sites: list[str] | None = None
) -> TrainedFederation | None:
    """The cached federation, or None when there is none. An entry that is unreadable or does
    not fit the model or `sites` is named in one warning and None (trained again, overwritten)."""
    payload = checkpoint.load_fitting(
        path,
        device,
        lambda entry: entry_problem(entry, checkpoint.model_shapes(build_model), sites),
        "cached federation",
        "training it again",
    )
    if payload is None:
        return None
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
