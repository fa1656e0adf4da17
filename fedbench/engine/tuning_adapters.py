"""Tuning an adapter without its unseen site (`fedbench tune --adapter`): one tuning per real
unseen site, nested as the outside regime is.

For the real unseen site U, each other site S stands in for it in turn: the federation of every
site but U and S is trained (with the method's own settings, cached, so trials share it), the
adapter adapts to S's validation images without their labels, and S's validation labels, which
belong to the federation of U's fold, score it. A trial's value is the mean over the stand-ins.
U's images and labels are never read, so the settings chosen for U are as blind to U as the
adapter is when it meets U on the board."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedbench.data import Split
from fedbench.engine.federations import data_fingerprint, load_or_train
from fedbench.engine.registry import Registry
from fedbench.engine.reporter import Reporter
from fedbench.engine.resolve import RunSpec, resolve
from fedbench.engine.scoring import Scoring
from fedbench.engine.tuning import Tuned, as_overrides, described, opened, tune_here
from fedbench.errors import FedbenchError
from fedbench.storage import stable_hash
from fedbench.tuning import checked_space

OBJECTIVE = (
    "mean validation dice of the stand-in sites (each held out from a federation without the "
    "real unseen site), adapted without their labels"
)


def adapter_space(registry: Registry, name: str) -> dict[str, Any]:
    """An adapter's declared space (checked); one without one has nothing to tune."""
    space = checked_space(registry.get("adapters", name), "adapter")
    if not space:
        raise FedbenchError(f"adapter '{name}' declares no search space: nothing to tune")
    return space


def without(data: Any, site: str) -> Any:
    """The data without one site: the world of a fold whose unseen site it is."""
    return dataclasses.replace(data, sites=[s for s in data.sites if s.name != site])


def stand_in_score(
    spec: RunSpec, registry: Registry, unseen: str, report: Callable[[int, float], None]
) -> float:
    """The mean over the stand-ins of the adapter's validation Dice (see the module). A
    stand-in streams its train and validation images, as an unseen site streams all of its
    own, and its validation images are scored."""
    run = resolve(spec, registry)
    data = run.dataset.load(run.config["data"], spec.seed, Path(spec.results_dir) / "cache")
    scoring = Scoring(run, registry, Reporter(), "tuning", "")
    scores = []
    for step, site in enumerate(s for s in data.sites if s.name != unseen):
        federation = without_both(run, data, unseen, site.name)
        stream = Split.concat([site.train, site.val])
        outputs = scoring.adapt(federation.selected("final"), stream.inputs, site.name, data.task)
        val = site.val
        scored = outputs[len(site.train) :]
        scores.append(data.task.validation_score(scored, val.targets, val.cases))
        report(step + 1, statistics.mean(scores))
    return float(statistics.mean(scores))


def without_both(run: Any, data: Any, unseen: str, stand_in: str) -> Any:
    """The federation of every site but these two, the same whichever of them is the unseen
    one (so unseen a with stand-in b and unseen b with stand-in a share one cache entry)."""
    first, second = sorted((unseen, stand_in))
    fold = without(data, first)
    return load_or_train(run, fold, second, lambda *_: None, data_fingerprint(fold))


def tune_adapter(
    spec: RunSpec,
    registry: Registry,
    trials: int,
    unseen: str,
    on_trial: Callable[[int, int], None],
) -> Tuned:
    """The tuning of adapter `spec.adapter` on `spec.method`'s federations for the real
    unseen site `unseen` (resumed where it stopped)."""
    assert spec.adapter is not None
    space = adapter_space(registry, spec.adapter)
    runs = dataclasses.replace(
        spec, holdout=unseen, workers=1, results_dir=Path(spec.results_dir) / "tuning"
    )
    key = [spec.method, spec.dataset, spec.preset, spec.rounds, spec.seed]
    key += [sorted(spec.overrides), described(space), unseen, OBJECTIVE]
    name = f"{spec.adapter}-on-{spec.method}-without-{unseen}-{stable_hash(key)[:10]}"

    def score(settings: dict[str, Any], report: Callable[[int, float], None]) -> float:
        trial = dataclasses.replace(runs, overrides=[*runs.overrides, *as_overrides(settings)])
        return stand_in_score(trial, registry, unseen, report)

    tuning = opened(runs, name, space, score, warmup=1)
    label = f"{spec.adapter} on {spec.method}"
    return tune_here(
        tuning, spec, trials, on_trial, method=label, objective=OBJECTIVE, holdout=unseen
    )
