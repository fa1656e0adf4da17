"""pluggy hook specifications: how methods, adapters, datasets and observers plug into fedbench."""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT = "fedbench"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def fedbench_methods() -> list[type]:
    """Return the Method classes this plugin adds."""


@hookspec
def fedbench_adapters() -> list[type]:
    """Return the Adapter classes this plugin adds."""


@hookspec
def fedbench_datasets() -> list[type]:
    """Return the Dataset classes this plugin adds."""


@hookspec
def fedbench_models() -> list[type]:
    """Return model builders (classes with a `name` and `build(task, cfg)`) this plugin adds."""


@hookspec
def fedbench_round_end(
    run_id: str, holdout: str | None, round: int, metrics: dict[str, Any]
) -> None:
    """Observe the end of a federated round (validation metrics per site)."""


@hookspec
def fedbench_run_end(record: dict[str, Any]) -> None:
    """Observe a finished run record, just after it was written."""
