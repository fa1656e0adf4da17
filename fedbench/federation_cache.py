"""Trained federations are cached per (method, dataset, seed, settings, held-out site), so a
second adapter on the same federation trains nothing. Files hold plain tensors and lists and load
with `torch.load(weights_only=True)`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedbench.adapter import TrainedFederation
from fedbench.checkpoint import torch_save_atomic
from fedbench.config import stable_hash
from fedbench.data import FederatedData, Site
from fedbench.engine import FederationResult, RoundCallback, train_federation
from fedbench.errors import Diverged, FedbenchError, PluginFailure

if TYPE_CHECKING:
    from fedbench.runner import ResolvedRun


def federation_key(run: ResolvedRun, holdout: str | None) -> str:
    """Everything that changes a trained federation; adapter settings deliberately excluded."""
    training_config = {k: v for k, v in run.config.items() if k != "adapter"}
    return stable_hash(
        {
            "config": training_config,
            "method": run.method.name,
            "dataset": run.dataset.name,
            "seed": run.spec.seed,
            "holdout": holdout,
            "device": run.device.type,
        }
    )


def cache_path(run: ResolvedRun, holdout: str | None, kind: str = "federations") -> Path:
    """Where the trained federation (or, kind="checkpoints", its training checkpoint) lives."""
    return Path(run.spec.results_dir) / "cache" / kind / f"{federation_key(run, holdout)}.pt"


def save(path: Path, result: FederationResult) -> None:
    """Write atomically (temp file, then rename): a killed run never leaves a half file."""
    payload = {
        "global": result.federation.global_state,
        "personalized": result.federation.personalized,
        "sites": result.federation.site_names,
        "cost": result.cost,
        "history": result.history,
        "val_best": result.val_best,
    }
    torch_save_atomic(payload, path)


def load(path: Path, run: ResolvedRun, data: FederatedData) -> FederationResult | None:
    """The cached federation, or None when the file is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        payload: dict[str, Any] = torch.load(path, map_location=run.device, weights_only=True)
    except Exception:
        return None
    federation = TrainedFederation(
        method=run.method.name,
        build_model=lambda: data.task.build_model(run.config["model"]),
        global_state=payload["global"],
        personalized=payload["personalized"],
        site_names=payload["sites"],
        device=run.device,
    )
    return FederationResult(federation, payload["cost"], payload["history"], payload["val_best"])


def trained_federation(
    run: ResolvedRun,
    data: FederatedData,
    sites: list[Site],
    holdout: str | None,
    on_round: RoundCallback,
) -> FederationResult:
    """Load the federation from the cache, or train it (resuming from its checkpoint, if a killed
    run left one) and cache it."""
    path = cache_path(run, holdout)
    cached = load(path, run, data)
    if cached is not None:
        return cached
    checkpoint = cache_path(run, holdout, "checkpoints")
    try:
        result = train_federation(
            data,
            sites,
            run.method,
            run.config,
            run.spec.seed,
            run.device,
            on_round,
            checkpoint=checkpoint,
            checkpoint_every=run.spec.checkpoint_every,
        )
    except (Diverged, FedbenchError, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise PluginFailure(
            f"method '{run.method.name}' failed in training: {type(exc).__name__}: {exc}"
        ) from exc
    save(path, result)
    if not run.spec.keep_checkpoints:
        checkpoint.unlink(missing_ok=True)
    return result
