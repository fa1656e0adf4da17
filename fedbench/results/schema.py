"""The run record's schema (DESIGN.md section 5) as strict pydantic models: every field is checked
by type, never coerced (a seed "0", 1.0 or true is not the seed 1), so a record copied in from
elsewhere either reads as the suite writes it or is named and skipped. More fields may be added
to a record; the models type the ones the suite writes and let others through. (pydantic rather
than JSON Schema: a JSON Schema "integer" accepts 1.0, and the models sit beside the code.)"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedbench.engine.config import MAX_SEED

SCHEMA_VERSION = 1
REQUIRED_FIELDS = (
    "schema_version",
    "run_id",
    "status",
    "method",
    "adapter",
    "dataset",
    "seed",
    "config",
    "config_hash",
    "environment",
    "started_at",
    "finished_at",
    "wall_s",
    "cost",
    "metrics",
)
#: how much of an offending value a warning quotes
QUOTE_CHARS = 40


def iso_8601(text: str) -> str:
    """A timestamp as `now_iso` writes it (finished_at orders the runs of a repeated cell)."""
    datetime.fromisoformat(text)
    return text


Name = Annotated[str, Field(min_length=1)]
Timestamp = Annotated[str, AfterValidator(iso_8601)]
Count = Annotated[int, Field(ge=0)]
Amount = Annotated[float, Field(ge=0)]


class Part(BaseModel):
    """Strict about the fields it names, open to the ones a later version adds."""

    model_config = ConfigDict(strict=True, extra="allow")


class FederationCost(Part):
    """What one federation sent: leaderboards add bytes_up and bytes_down per regime."""

    bytes_up: Amount = 0
    bytes_down: Amount = 0
    client_steps: Count = 0


class Cost(Part):
    bytes_up: Amount
    bytes_down: Amount
    client_steps: Count
    federations: dict[str, FederationCost] = {}


def metric_range(metric: str) -> tuple[float, float]:
    """The values a metric can take, by its name: dice* and c_index in [0, 1], hd* at least 0."""
    if metric.startswith("dice") or metric == "c_index":
        return 0.0, 1.0
    if metric.startswith("hd"):
        return 0.0, math.inf
    return -math.inf, math.inf


class MetricRow(Part):
    """One figure of one site; `value` may be NaN (json writes it), never null or text."""

    regime: Literal["inside", "outside"]
    site: Name
    holdout: Name | None
    metric: Name
    value: float
    selection: Literal["final", "val-best"]

    @model_validator(mode="after")
    def value_in_range(self) -> MetricRow:
        """A score its metric can take: overlaps and concordance in [0, 1], distances finite and
        not negative, anything else finite; NaN is 'no value' (an unscorable split)."""
        value = self.value
        if math.isnan(value):
            return self
        low, high = metric_range(self.metric)
        if not (low <= value <= high and math.isfinite(value)):
            raise ValueError(f"{self.metric} value {value!r} is outside [{low}, {high}]")
        return self

    @model_validator(mode="after")
    def holdout_matches_regime(self) -> MetricRow:
        """Inside rows hold nothing out; an outside row scores the site it held out."""
        wanted = self.site if self.regime == "outside" else None
        if self.holdout != wanted:
            raise ValueError(
                f"an {self.regime} row's holdout must be {quote(wanted)}, got {quote(self.holdout)}"
            )
        return self


class HistoryPoint(Part):
    """One round of a learning curve: the validation figure per site."""

    round: Count
    val: dict[str, float]


class Record(Part):
    """A run record; only the fields of DESIGN.md section 5 without a default are required."""

    schema_version: int  # record_problem has checked it is SCHEMA_VERSION
    run_id: Name
    status: Literal["ok", "failed", "diverged"]
    method: Name
    adapter: Name | None
    dataset: Name
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)]
    preset: str | None = None
    holdouts: list[Name] = []
    config: dict[str, Any]
    config_hash: Name
    code: dict[str, Any] = {}
    data_fingerprint: str | None = None
    environment: dict[str, Any]
    started_at: Timestamp
    finished_at: Timestamp
    wall_s: Amount
    cost: Cost
    metrics: list[MetricRow]
    error: str | None = None
    history: dict[str, list[HistoryPoint]] = {}
    val_best_rounds: dict[str, dict[str, Count]] = {}
    hd95_unit: str | None = None
    profile: dict[str, float] = {}
    study: str | None = None
    variant: str | None = None
    tuning: dict[str, Any] | None = None
    shares_data: dict[str, str] = {}
    adapter_mode: str | None = None

    @model_validator(mode="after")
    def outside_rows_name_an_adapter(self) -> Record:
        """The adapter is null only when the outside regime did not run."""
        if self.adapter is None and any(row.regime == "outside" for row in self.metrics):
            raise ValueError("adapter is null, but the record has outside rows")
        return self


def record_problem(payload: Any) -> str | None:
    """Why `payload` is not a valid run record, in one line naming the first offending field,
    or None when it is one."""
    if not isinstance(payload, dict):
        return "not a JSON object"
    missing = [name for name in REQUIRED_FIELDS if name not in payload]
    if missing:
        return f"missing field(s): {', '.join(missing)}"
    version = payload["schema_version"]
    if type(version) is not int or version != SCHEMA_VERSION:
        return f"unsupported schema_version {quote(version)}"
    try:
        Record.model_validate(payload)
    except ValidationError as exc:
        return describe(exc)
    return None


def describe(error: ValidationError) -> str:
    """The first problem pydantic found, as 'bad field metrics[0].site: ... (got null)'."""
    problems = error.errors(include_url=False)
    first, where = problems[0], field_path(problems[0]["loc"])
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    if first["type"] == "missing":
        return f"missing field {where}{more}"
    if first["type"] == "value_error":  # the models' own checks say what they got
        message = first["msg"].removeprefix("Value error, ")
        message = message[:1].lower() + message[1:]
        return f"bad {'field ' + where if first['loc'] else 'record'}: {message}{more}"
    message = first["msg"][:1].lower() + first["msg"][1:]
    return f"bad field {where}: {message} (got {quote(first['input'])}){more}"


def field_path(loc: tuple[int | str, ...]) -> str:
    """('metrics', 0, 'site') -> 'metrics[0].site'; a key with a newline or quote in it is
    escaped as JSON escapes it, so the warning stays one line."""
    path = ""
    for part in loc:
        name = json.dumps(str(part))[1:-1]
        path += f"[{part}]" if isinstance(part, int) else (f".{name}" if path else name)
    return path or "record"


def quote(value: Any) -> str:
    """A short one-line rendering of an offending value, spelt as in the JSON file."""
    text = json.dumps(value, allow_nan=True, default=repr)
    return text if len(text) <= QUOTE_CHARS else text[: QUOTE_CHARS - 3] + "..."
