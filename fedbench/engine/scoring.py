"""Scoring a run: each federation trained (or taken from the cache), its personalized models
scored on their sites' test splits (inside) and the held-out site adapted and scored (outside),
all into the record's metric rows, costs, history and kept predictions."""

from __future__ import annotations

import time
from typing import Any

import torch

from fedbench.adapter import AdaptContext, TrainedFederation
from fedbench.data import FederatedData, Split, UnlabeledImages
from fedbench.engine.federations import load_or_train
from fedbench.engine.precision import deterministic_mode
from fedbench.engine.profiling import PROFILE
from fedbench.engine.registry import Registry
from fedbench.engine.reporter import Reporter
from fedbench.engine.resolve import Run
from fedbench.errors import Diverged, blamed_on
from fedbench.results import predictions
from fedbench.task import POOLED, Task


def metric_rows(
    regime: str, site: str, holdout: str | None, scores: dict[str, float], selection: str
) -> list[dict[str, Any]]:
    return [
        {
            "regime": regime,
            "site": site,
            "holdout": holdout,
            "metric": metric,
            "value": value,
            "selection": selection,
        }
        for metric, value in scores.items()
    ]


def pooled_scores(task: Task, parts: list[tuple[torch.Tensor, Split]]) -> dict[str, float]:
    """The task's metrics on all sites' test sets at once (each site's outputs from its own
    model); case ids are offset per site so that no two sites' cases merge."""
    cases, offset = [], 0
    for _, split in parts:
        cases.append(split.cases + offset)
        offset += int(split.cases.max()) + 1 if len(split.cases) else 0
    with PROFILE.phase("evaluation"):
        return task.score(
            torch.cat([outputs for outputs, _ in parts]),
            torch.cat([split.targets for _, split in parts]),
            torch.cat(cases),
        )


class Scoring:
    """Trains or loads each federation of a run and accumulates the record's metric rows,
    costs, history and kept predictions."""

    def __init__(
        self, run: Run, registry: Registry, reporter: Reporter, run_id: str, fingerprint: str
    ) -> None:
        self.run, self.registry, self.reporter, self.run_id = run, registry, reporter, run_id
        self.fingerprint = fingerprint
        self.val_best_rounds: dict[str, dict[str, int]] = {}
        self.rows: list[dict[str, Any]] = []
        self.costs: dict[str, dict[str, Any]] = {}
        self.history: dict[str, list[dict[str, Any]]] = {}
        self.kept: predictions.Kept = {}
        self.rgb = bool(getattr(run.dataset, "display_rgb", False))

    def federation(self, data: FederatedData, holdout: str | None) -> TrainedFederation:
        label = f"federation without {holdout}" if holdout else "federation, all sites"

        def on_round(round_index: int, scores: dict[str, float], replayed: bool) -> None:
            self.reporter.advance()
            self.registry.notify_round_end(
                run_id=self.run_id,
                holdout=holdout,
                round=round_index,
                metrics=scores,
                replayed=replayed,
                context=self.context(),
            )

        self.reporter.start(label, self.run.config["train"]["rounds"])
        try:
            federation = load_or_train(self.run, data, holdout, on_round, self.fingerprint)
        except Diverged as exc:
            raise Diverged(f"{exc}; {label}") from None
        finally:
            self.reporter.finish()
        self.costs[holdout or "inside"] = dict(federation.cost)  # a copy: adapt_s joins it
        if federation.val_best_rounds:
            self.val_best_rounds[holdout or "inside"] = federation.val_best_rounds
        return federation

    def context(self) -> dict[str, Any]:
        """What an observer needs to file a round: where the run writes and what it is."""
        spec = self.run.spec
        return {
            "results_dir": str(spec.results_dir),
            "run_id": self.run_id,
            "method": self.run.method.name,
            "adapter": self.run.adapter_name,
            "dataset": self.run.dataset.name,
            "seed": spec.seed,
        }

    def inside(self, data: FederatedData) -> None:
        federation = self.federation(data, None)
        if self.run.config["eval"]["history"]:
            self.history["inside"] = federation.history
        batch = self.run.config["eval"]["batch_size"]
        selections = [("final", federation.personalized)]
        if federation.val_best is not None:
            selections.append(("val-best", federation.val_best))
        for selection, states in selections:
            pooled: list[tuple[torch.Tensor, Split]] = []
            for site, state in zip(data.sites, states, strict=True):
                with PROFILE.phase("evaluation"):
                    model = federation.model(state)
                    outputs = data.task.predict(model, site.test.inputs, batch)
                if not torch.isfinite(outputs).all():
                    name = self.run.method.name
                    raise Diverged(f"method '{name}' gives non-finite outputs on {site.name}")
                with PROFILE.phase("evaluation"):
                    scores = data.task.score(outputs, site.test.targets, site.test.cases)
                self.rows += metric_rows("inside", site.name, None, scores, selection)
                pooled.append((outputs, site.test))
                if selection == "final":
                    self.keep("inside", site.name, site.test, outputs, data)
            if data.task.pooled_test:
                self.rows += metric_rows(
                    "inside", POOLED, None, pooled_scores(data.task, pooled), selection
                )

    def outside(self, data: FederatedData, holdout: str) -> None:
        """Adapt and score the held-out site with the last round's models and, under
        `eval.val_best`, with the validation-selected ones too."""
        federation = self.federation(data, holdout)
        every = data.site(holdout).all_samples()
        selections = ["final"] if federation.val_best is None else ["final", "val-best"]
        for selection in selections:
            clock = time.perf_counter()
            outputs = self.adapt(federation.selected(selection), every.inputs, holdout, data.task)
            spent = self.costs[holdout].get("adapt_s", 0.0) + time.perf_counter() - clock
            self.costs[holdout]["adapt_s"] = spent
            with PROFILE.phase("evaluation"):
                scores = data.task.score(outputs, every.targets, every.cases)
            self.rows += metric_rows("outside", holdout, holdout, scores, selection)
            if selection == "final":
                self.keep("outside", holdout, every, outputs, data)

    def adapt(
        self, federation: TrainedFederation, inputs: torch.Tensor, holdout: str, task: Task
    ) -> torch.Tensor:
        """The adapter's outputs for the held-out site's images (no labels), checked finite."""
        adapter = self.run.adapter(self.run.config["adapter"])
        ctx = AdaptContext(self.run.config["train"]["batch_size"], self.run.spec.seed, task)
        self.reporter.start(f"adapting {holdout} ({adapter.name})", None)
        try:
            with (
                PROFILE.phase("adaptation"),
                blamed_on(f"adapter '{adapter.name}' failed"),
                deterministic_mode(self.run.config["train"]),  # adapters train at test time
            ):
                view, restored = task.adaptation_view(inputs)
                outputs = restored(adapter.predict(federation, UnlabeledImages(view), ctx))
        finally:
            self.reporter.finish()
        if not torch.isfinite(outputs).all():
            raise Diverged(f"adapter '{adapter.name}' produced non-finite outputs on {holdout}")
        return outputs

    def keep(
        self, regime: str, site: str, split: Split, outputs: torch.Tensor, data: FederatedData
    ) -> None:
        """A few predictions for `fedbench show` (segmentation only)."""
        if data.task.dense_prediction:
            self.kept[(regime, site)] = predictions.keep(
                split.inputs, split.targets, outputs, self.rgb
            )

    def cost(self) -> dict[str, Any]:
        keys = ("bytes_up", "bytes_down", "client_steps")
        totals: dict[str, Any] = {k: sum(c[k] for c in self.costs.values()) for k in keys}
        totals["federations"] = self.costs
        return totals
