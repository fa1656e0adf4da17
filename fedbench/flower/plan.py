"""What a Flower app needs to know of a fedbench run, on the server and on every node: the names
and settings the command line would give (`Plan`), from a simulation's closure or a deployed
app's run config (`[tool.flwr.app.config]` of the project `fedbench flower new` writes)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedbench.engine.resolve import RunSpec


@dataclass(frozen=True)
class Plan:
    """A run as the command line names it; `holdout` is the site left out of this federation
    (None: every site)."""

    method: str
    dataset: str
    seed: int = 0
    preset: str = "default"
    overrides: tuple[str, ...] = field(default_factory=tuple)
    results_dir: str = "results"
    holdout: str | None = None

    @classmethod
    def of(cls, spec: RunSpec) -> Plan:
        """The plan of a command line's run (every site: a trainer names its holdout)."""
        return cls(
            spec.method, spec.dataset, spec.seed, spec.preset, tuple(spec.overrides),
            str(spec.results_dir),
        )  # fmt: skip

    def spec(self) -> RunSpec:
        """The RunSpec of this plan (device: the node's own, as `auto` picks it)."""
        return RunSpec(
            method=self.method,
            dataset=self.dataset,
            seed=self.seed,
            preset=self.preset,
            overrides=list(self.overrides),
            results_dir=Path(self.results_dir),
            holdout="none",
        )

    def run_config(self) -> dict[str, Any]:
        """This plan as a Flower run config (flat TOML values)."""
        return {
            "method": self.method,
            "dataset": self.dataset,
            "seed": self.seed,
            "preset": self.preset,
            "settings": shlex.join(self.overrides),
            "results-dir": self.results_dir,
        }

    @classmethod
    def from_run_config(cls, config: dict[str, Any]) -> Plan:
        """The plan a deployed app's run config holds."""
        return cls(
            method=str(config["method"]),
            dataset=str(config["dataset"]),
            seed=int(config.get("seed", 0)),
            preset=str(config.get("preset", "default")),
            overrides=tuple(shlex.split(str(config.get("settings", "")))),
            results_dir=str(config.get("results-dir", "results")),
        )
