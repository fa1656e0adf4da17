"""MLflow tracker, an observer plugin: one MLflow run per fedbench run, named and tagged
(`fedbench.run_id`) with the fedbench run id. It logs the settings as params (`method`, `seed`,
`train.rounds`, ...), each round's validation score per site as metrics (`inside/val/SITE`,
`without-HOLDOUT/val/SITE`, step = round), the final scores (`inside/dice/SITE`,
`outside/hd95/SITE`, `inside-val-best/...`) and the run record as the artifact `record.json`.

Enabled by `fedbench run|grid --track mlflow`, which sets FEDBENCH_TRACK_MLFLOW=<tracking URI>
(MLFLOW_TRACKING_URI when set, else the file store RESULTS/mlruns) in its own process and so in
the Ray workers it starts; set that variable yourself to track from the Python API. Without it
both hooks return at once and MLflow is never imported. The experiment is MLFLOW_EXPERIMENT_NAME,
else "fedbench". MLflow 3 keeps its file store in maintenance mode and opens one only with
MLFLOW_ALLOW_FILE_STORE=true: this plugin sets that (unless already set) for a file store.
Rounds restored from a checkpoint or a cached federation are logged from the record's history
at the end. Install: pip install "fedbench-med[mlflow]"."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlparse

from fedbench.hookspecs import hookimpl

ENV = "FEDBENCH_TRACK_MLFLOW"
RUN_TAG = "fedbench.run_id"
DEFAULT_EXPERIMENT = "fedbench"
IDENTITY = ("method", "adapter", "dataset", "seed", "preset", "holdouts", "config_hash", "study")
MAX_VALUE = 500  # the shortest param value every MLflow release accepts
METRICS_PER_BATCH, PARAMS_PER_BATCH = 1000, 100  # MLflow's log_batch limits

_CLIENTS: dict[str, Any] = {}
#: (tracking URI, fedbench run id) -> MLflow run id, for runs this process has seen
_RUNS: dict[tuple[str, str], str] = {}

Point = tuple[str, float, int]  # metric key, value, step


def tracking_uri() -> str | None:
    """Where to track, or None when tracking with MLflow is not enabled."""
    return os.environ.get(ENV) or None


def client_for(uri: str) -> Any:
    """One MlflowClient per tracking URI in this process; MLflow is imported on first use."""
    if uri not in _CLIENTS:
        if urlparse(uri).scheme in ("", "file"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        _CLIENTS[uri] = MlflowClient(tracking_uri=uri)
    return _CLIENTS[uri]


def experiment_id(client: Any) -> str:
    """The id of the experiment runs go to, created on first use (by whichever Ray worker
    gets there first: the others find it)."""
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name)
        except Exception:
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    return found.experiment_id


def mlflow_run(client: Any, uri: str, run_id: str) -> str:
    """The MLflow run of fedbench run `run_id`: found by its tag (a Ray worker logs the rounds,
    the driver the end) or started now."""
    if (uri, run_id) not in _RUNS:
        experiment = experiment_id(client)
        query = f"tags.`{RUN_TAG}` = '{run_id}'"
        found = client.search_runs([experiment], filter_string=query, max_results=1)
        if found:
            _RUNS[uri, run_id] = found[0].info.run_id
        else:
            started = client.create_run(experiment, run_name=run_id, tags={RUN_TAG: run_id})
            _RUNS[uri, run_id] = started.info.run_id
    return _RUNS[uri, run_id]


def clean(name: str) -> str:
    """A site or holdout name as one part of an MLflow key (letters, digits, _ - . and space)."""
    return re.sub(r"[^\w.\- ]", "_", str(name)).strip(". ") or "_"


def federation_label(holdout: str | None) -> str:
    return "inside" if holdout is None else f"without-{clean(holdout)}"


def round_key(holdout: str | None, site: str) -> str:
    return f"{federation_label(holdout)}/val/{clean(site)}"


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def log_metrics(client: Any, run: str, points: list[Point]) -> None:
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    entries = [Metric(key, float(value), stamp, step) for key, value, step in points]
    for chunk in chunks(entries, METRICS_PER_BATCH):
        client.log_batch(run, metrics=list(chunk))


@hookimpl
def fedbench_round_end(
    run_id: str, holdout: str | None, round: int, metrics: dict[str, Any]
) -> None:
    """Each site's validation score of this round, as it is computed."""
    uri = tracking_uri()
    if uri is None or not metrics:
        return
    client = client_for(uri)
    points = [(round_key(holdout, site), value, round) for site, value in metrics.items()]
    log_metrics(client, mlflow_run(client, uri, run_id), points)


def flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys: {"train": {"rounds": 2}} -> {"train.rounds": 2}."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def param_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= MAX_VALUE else text[: MAX_VALUE - 3] + "..."


def run_params(record: dict[str, Any]) -> dict[str, str]:
    """The record's identity and every setting, as MLflow params."""
    params = {key: record[key] for key in IDENTITY if record.get(key) is not None}
    params.update(flatten(record.get("config") or {}))
    return {key: param_text(value) for key, value in params.items()}


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def final_scores(record: dict[str, Any]) -> list[Point]:
    """Each metric row of the record as `REGIME[-val-best]/METRIC/SITE` at step 0."""
    points = []
    for row in record.get("metrics") or []:
        if is_number(row.get("value")):
            regime = row["regime"] if row["selection"] == "final" else f"{row['regime']}-val-best"
            points.append(
                (f"{regime}/{clean(row['metric'])}/{clean(row['site'])}", row["value"], 0)
            )
    return points


def unlogged_rounds(client: Any, run: str, record: dict[str, Any]) -> list[Point]:
    """The record's per-round validation that no round_end logged (restored or cached rounds)."""
    wanted: dict[str, list[Point]] = {}
    for federation, rounds in (record.get("history") or {}).items():
        holdout = None if federation == "inside" else federation
        for entry in rounds:
            for site, value in (entry.get("val") or {}).items():
                key = round_key(holdout, site)
                wanted.setdefault(key, []).append((key, value, entry["round"]))
    missing = []
    for key, points in wanted.items():
        logged = {m.step for m in client.get_metric_history(run, key)}
        missing += [p for p in points if p[2] not in logged and is_number(p[1])]
    return missing


def run_tags(record: dict[str, Any]) -> dict[str, str]:
    tags = {"fedbench.status": record["status"]}
    if record.get("error"):
        tags["fedbench.error"] = str(record["error"])[:5000]
    return tags


@hookimpl
def fedbench_run_end(record: dict[str, Any]) -> None:
    """The settings, the rounds not yet logged, the final scores, the record; then the MLflow
    run ends (FAILED unless the fedbench run is ok)."""
    uri = tracking_uri()
    if uri is None:
        return
    from mlflow.entities import Param, RunTag

    client = client_for(uri)
    run = mlflow_run(client, uri, record["run_id"])
    params = [Param(key, value) for key, value in run_params(record).items()]
    for chunk in chunks(params, PARAMS_PER_BATCH):
        client.log_batch(run, params=list(chunk))
    client.log_batch(run, tags=[RunTag(k, v) for k, v in run_tags(record).items()])
    log_metrics(client, run, unlogged_rounds(client, run, record) + final_scores(record))
    client.log_dict(run, record, "record.json")
    client.set_terminated(run, "FINISHED" if record["status"] == "ok" else "FAILED")
