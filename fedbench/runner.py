"""One run, end to end: resolve names and settings, train (or reuse) the federations, score the
inside regime, adapt and score the outside regime, and write the run record."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedbench import examples
from fedbench.adapter import AdaptContext, Adapter, predict_batched
from fedbench.config import (
    Config,
    apply_overrides,
    deep_merge,
    preset_config,
    stable_hash,
    validate,
)
from fedbench.data import Dataset, FederatedData, Split, UnlabeledImages
from fedbench.engine import FederationResult
from fedbench.errors import Diverged, FedbenchError, PluginFailure, unknown_name
from fedbench.federation_cache import trained_federation
from fedbench.method import Method
from fedbench.profiling import PROFILE
from fedbench.progress import Reporter
from fedbench.record import SCHEMA_VERSION, environment, new_run_id, now_iso, runs_dir, write_record
from fedbench.registry import Registry


@dataclass
class RunSpec:
    """What the user asked for on the command line."""

    method: str
    adapter: str | None = None
    dataset: str = "synth-prostate"
    holdout: str = "all"
    seed: int = 0
    preset: str = "default"
    device: str = "auto"
    rounds: int | None = None
    overrides: list[str] = field(default_factory=list)
    results_dir: Path = Path("results")
    checkpoint_every: int = 1
    keep_checkpoints: bool = False


@dataclass
class ResolvedRun:
    """A RunSpec with every name looked up and every setting fixed."""

    spec: RunSpec
    method: type[Method]
    adapter: type[Adapter] | None
    dataset: Dataset
    config: Config
    device: torch.device

    @property
    def adapter_name(self) -> str | None:
        return self.adapter.name if self.adapter else None

    @property
    def config_hash(self) -> str:
        return stable_hash(
            {
                "config": self.config,
                "method": self.method.name,
                "adapter": self.adapter_name,
                "dataset": self.dataset.name,
                "seed": self.spec.seed,
            }
        )


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FedbenchError(
            "--device cuda was asked for, but CUDA is not available on this machine"
        )
    if name not in ("cpu", "cuda"):
        raise FedbenchError(f"unknown device '{name}'; known: auto, cpu, cuda")
    return torch.device(name)


def resolve(spec: RunSpec, registry: Registry) -> ResolvedRun:
    """Look every name up and build the full config (preset, component defaults, --set)."""
    method = registry.get("methods", spec.method)
    dataset = registry.get("datasets", spec.dataset)()
    adapter = None
    if spec.holdout != "none":
        adapter = registry.get("adapters", spec.adapter or method.default_adapter)
    config = preset_config(spec.preset)
    config["data"] = copy.deepcopy(dataset.defaults)
    config = deep_merge(config, dataset.preset(spec.preset))
    config["method"] = copy.deepcopy(method.defaults)
    config["adapter"] = deep_merge(adapter.defaults, adapter.preset(spec.preset)) if adapter else {}
    if spec.rounds is not None:
        config["train"]["rounds"] = spec.rounds
    config = apply_overrides(config, spec.overrides)
    validate(config)
    return ResolvedRun(spec, method, adapter, dataset, config, pick_device(spec.device))


def holdout_sites(spec_holdout: str, site_names: list[str]) -> list[str]:
    """Parse --holdout all|none|SITE,... against the dataset's sites."""
    if spec_holdout == "none":
        return []
    if spec_holdout == "all":
        chosen = list(site_names)
    else:
        chosen = [s.strip() for s in spec_holdout.split(",") if s.strip()]
        for name in chosen:
            if name not in site_names:
                raise unknown_name("site", name, site_names)
    if len(site_names) - 1 < 2 and chosen:
        raise FedbenchError(
            f"holding out a site leaves {len(site_names) - 1} training site(s); at least two needed"
        )
    return chosen


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


class Run:
    """Executes one resolved run and accumulates its record."""

    def __init__(self, run: ResolvedRun, registry: Registry, reporter: Reporter) -> None:
        self.run, self.registry, self.reporter = run, registry, reporter
        self.rows: list[dict[str, Any]] = []
        self.costs: dict[str, dict[str, int]] = {}
        self.history: dict[str, list[dict[str, Any]]] = {}
        self.examples: examples.Kept = {}
        self.rgb = bool(getattr(run.dataset, "display_rgb", False))
        self.run_id = new_run_id(
            run.dataset.name, run.method.name, run.adapter_name, run.spec.seed, run.config_hash
        )

    def federation(self, data: FederatedData, holdout: str | None) -> FederationResult:
        sites = [s for s in data.sites if s.name != holdout]
        label = f"federation without {holdout}" if holdout else "federation, all sites"

        def on_round(round_index: int, scores: dict[str, float]) -> None:
            self.reporter.advance()
            self.registry.manager.hook.fedbench_round_end(
                run_id=self.run_id, holdout=holdout, round=round_index, metrics=scores
            )

        self.reporter.start(label, self.run.config["train"]["rounds"])
        result = trained_federation(self.run, data, sites, holdout, on_round)
        self.reporter.finish()
        self.costs[holdout or "inside"] = result.cost
        return result

    def inside(self, data: FederatedData) -> None:
        result = self.federation(data, None)
        self.history["inside"] = result.history
        batch = self.run.config["eval"]["batch_size"]
        selections = [("final", result.federation.personalized)]
        if result.val_best is not None:
            selections.append(("val-best", result.val_best))
        for selection, states in selections:
            for site, state in zip(data.sites, states, strict=True):
                with PROFILE.phase("evaluation"):
                    model = result.federation.model(state)
                    outputs = predict_batched(model, site.test.inputs, batch)
                    scores = data.task.score(outputs, site.test.targets, site.test.cases)
                self.rows += metric_rows("inside", site.name, None, scores, selection)
                if selection == "final":
                    self.keep_examples("inside", site.name, site.test, outputs, data)

    def outside(self, data: FederatedData, holdout: str) -> None:
        result = self.federation(data, holdout)
        site = data.site(holdout)
        every = site.all_samples()
        adapter = self.run.adapter(self.run.config["adapter"])
        ctx = AdaptContext(self.run.config["train"]["batch_size"], self.run.spec.seed, data.task)
        self.reporter.start(f"adapting {holdout} ({adapter.name})", None)
        try:
            with PROFILE.phase("adaptation"):
                outputs = adapter.predict(result.federation, UnlabeledImages(every.inputs), ctx)
        except (FedbenchError, Diverged, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise PluginFailure(
                f"adapter '{adapter.name}' failed: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            self.reporter.finish()
        if not torch.isfinite(outputs).all():
            raise Diverged(f"adapter '{adapter.name}' produced non-finite outputs on {holdout}")
        with PROFILE.phase("evaluation"):
            scores = data.task.score(outputs, every.targets, every.cases)
        self.rows += metric_rows("outside", holdout, holdout, scores, "final")
        self.keep_examples("outside", holdout, every, outputs, data)

    def keep_examples(
        self, regime: str, site: str, split: Split, outputs: torch.Tensor, data: FederatedData
    ) -> None:
        """A few predictions for `fedbench show` (segmentation only)."""
        if data.task.dense_prediction:
            self.examples[(regime, site)] = examples.keep(
                split.inputs, split.targets, outputs, self.rgb
            )

    def cost(self) -> dict[str, Any]:
        keys = ("bytes_up", "bytes_down", "client_steps")
        totals: dict[str, Any] = {k: sum(c[k] for c in self.costs.values()) for k in keys}
        totals["federations"] = self.costs
        return totals


def execute(run: ResolvedRun, registry: Registry, reporter: Reporter) -> dict[str, Any]:
    """Run everything, then write the kept predictions and the record (status ok, failed or
    diverged), which it returns."""
    runs_dir(run.spec.results_dir)
    record, kept = perform(run, registry, reporter)
    save_outcome(run.spec.results_dir, record, kept, registry)
    return record


def save_outcome(
    results_dir: Path, record: dict[str, Any], kept: examples.Kept, registry: Registry
) -> None:
    """The predictions first, then the record that points to them; then the run-end observers,
    for every record written (ok, failed or diverged, local or from a Ray worker)."""
    if kept and record["status"] == "ok":
        examples.save(results_dir, record["run_id"], kept)
    write_record(results_dir, record)
    registry.manager.hook.fedbench_run_end(record=record)


def perform(
    run: ResolvedRun, registry: Registry, reporter: Reporter
) -> tuple[dict[str, Any], examples.Kept]:
    """Run everything and return the record and the kept predictions, writing neither (a Ray
    worker sends both back to the driver, which writes them)."""
    started, clock = now_iso(), time.perf_counter()
    PROFILE.reset()
    with PROFILE.phase("data loading"):
        data = run.dataset.load(
            run.config["data"], run.spec.seed, Path(run.spec.results_dir) / "cache"
        )
    holdouts = holdout_sites(run.spec.holdout, [s.name for s in data.sites])
    probe = data.task.build_model(run.config["model"])
    if run.adapter is not None:
        run.adapter(run.config["adapter"]).check(run.method, probe, data.task)
    job = Run(run, registry, reporter)
    status, error = "ok", None
    try:
        job.inside(data)
        for holdout in holdouts:
            job.outside(data, holdout)
    except Diverged as exc:
        status, error = "diverged", str(exc)
    except PluginFailure as exc:
        status, error = "failed", str(exc)
    record = {
        "schema_version": SCHEMA_VERSION,
        "run_id": job.run_id,
        "status": status,
        "method": run.method.name,
        "adapter": run.adapter_name if holdouts else None,
        "dataset": run.dataset.name,
        "seed": run.spec.seed,
        "preset": run.spec.preset,
        "holdouts": holdouts,
        "config": run.config,
        "config_hash": run.config_hash,
        "environment": environment(str(run.device)),
        "started_at": started,
        "finished_at": now_iso(),
        "wall_s": round(time.perf_counter() - clock, 3),
        "cost": job.cost(),
        "metrics": job.rows if status == "ok" else [],
        "history": job.history,
        "profile": PROFILE.summary(),
    }
    if error:
        record["error"] = error
    return record, job.examples
